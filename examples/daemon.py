"""Two processes share tensors through one tierd daemon.

    python examples/daemon.py

Starts a private ``tierd serve`` (a 128 MiB host tier, nvme in a temporary
directory, its own socket), then a producer process stashes a tensor and a
consumer process, a different process, fetches it: the bytes go through
the daemon's shared-memory arena, not the socket, because both run as the
daemon's own uid (a uid the daemon does not trust with its arena gets the
same API, with the bytes streamed through the socket; see README
"Reliability and security"). Runs on a CPU-only machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
from pathlib import Path

import torch

import tierd
from tierd.daemon.launch import spawn


def producer(sock: str) -> None:
    with tierd.connect(sock) as store:
        weights = torch.arange(4 << 20, dtype=torch.float32).reshape(1024, -1)  # 16 MiB
        store.put("kv/shared-prefix", weights)
        store.put("ckpt/step-100", weights[:8].clone(), durable=True)
        print(f"producer {os.getpid()}: put {weights.numel() * 4 >> 20} MiB, on {store.info('kv/shared-prefix').tier}")
        print(f"producer maps the daemon's arena (zero-copy): {store.has_arena}")


def consumer(sock: str) -> None:
    with tierd.connect(sock) as store:
        got = store.get("kv/shared-prefix")
        expected = torch.arange(4 << 20, dtype=torch.float32).reshape(1024, -1)
        print(f"consumer {os.getpid()}: got {tuple(got.shape)}, equal: {torch.equal(got, expected)}")
        print(f"consumer sees keys {store.keys()}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="tierd-ex-", dir="/tmp") as tmp:
        sock = str(Path(tmp) / "tierd.sock")
        config = Path(tmp) / "tierd.toml"
        config.write_text(
            f'[tiers.host]\nsize = "128MiB"\n[tiers.nvme]\npath = "{tmp}/nvme"\nsize = "1GiB"\n'
            f'[daemon]\nsocket = "{sock}"\nmetrics = ""\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIERD_")}
        daemon = spawn(config, env=env)  # returns once the daemon sent READY=1
        try:
            for target in (producer, consumer):
                proc = mp.get_context("spawn").Process(target=target, args=(sock,))
                proc.start()
                proc.join()
                assert proc.exitcode == 0
            with tierd.connect(sock) as store:
                host = store.stats()["host"]
                print(f"daemon host tier: {host.used_bytes >> 20} MiB used, {host.hits} hits")
        finally:
            daemon.terminate()  # SIGTERM: drains and stops
            daemon.wait(timeout=60)
