"""CI's first-run check, inside a fresh virtualenv that holds only the README's base install.

Starts the installed ``tierd serve`` on the embedded default config (only the
socket and the nvme directory moved into a temporary directory), waits for
its READY=1, stores and reads back through ``tierd.connect()``, runs
``tierd status`` and ``tierd doctor``, then sends SIGTERM and requires exit 0.
Exits non-zero, with the daemon's log, on any failure.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

EXTRAS = ("redis", "kvikio", "matplotlib", "safetensors", "zipnn", "pytest", "hypothesis")


def main() -> int:
    present = [m for m in EXTRAS if importlib.util.find_spec(m) is not None]
    if present:
        print(f"smoke: not a base-only environment, {present} are installed", file=sys.stderr)
        return 1
    import torch

    import tierd
    from tierd.daemon.launch import spawn

    script = shutil.which("tierd")
    if script is None or not Path(script).resolve().is_relative_to(Path(sys.prefix).resolve()):
        print(f"smoke: the tierd script is not this environment's ({script})", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="tierd-smoke-") as tmp:
        env = {**os.environ, "TIERD_SOCKET": f"{tmp}/tierd.sock", "TIERD_TIERS_NVME_PATH": f"{tmp}/nvme",
               "TIERD_LOG_LEVEL": "INFO"}
        log_path = Path(tmp) / "serve.log"
        with open(log_path, "wb") as log:
            proc = spawn(None, command=["tierd", "serve"], env=env, log=log, timeout_s=120)
            try:
                with tierd.connect(env["TIERD_SOCKET"]) as store:
                    big = torch.randn(1024, 1024)  # 4 MiB: through the shared arena
                    small = torch.arange(100, dtype=torch.int16)
                    store.put("smoke/big", big)
                    store.put("smoke/small", small, tier="nvme")  # O_DIRECT slab files
                    store.put("smoke/bytes", b"tierd")
                    assert torch.equal(store.get("smoke/big"), big), "smoke/big came back different"
                    assert torch.equal(store.get("smoke/small"), small), "smoke/small came back different"
                    assert store.get("smoke/bytes") == b"tierd"
                    assert store.keys("smoke/") == ["smoke/big", "smoke/bytes", "smoke/small"], store.keys()
                    print("smoke: put/get through tierd.connect() round-trips (host and nvme)")
                for cmd in (["tierd", "status"], ["tierd", "doctor"]):
                    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
                    if res.returncode != 0:
                        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout}{res.stderr}")
                    print(f"smoke: {' '.join(cmd)} exits 0")
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(timeout=60)
                if rc != 0:
                    raise AssertionError(f"tierd serve exited {rc} after SIGTERM")
                print("smoke: tierd serve exits 0 on SIGTERM")
            except BaseException as exc:
                proc.kill()
                proc.wait()
                log.flush()
                print(f"smoke: FAILED: {exc}\n--- tierd serve log ---\n{log_path.read_text()}", file=sys.stderr)
                return 1
        print(log_path.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
