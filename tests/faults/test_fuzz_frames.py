"""Random and mutated frames against a live daemon: no crash, no hang, bounded memory."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import msgspec
import psutil
import pytest
from daemon import Daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierd import protocol as p
from tierd.engine.index import ObjectMeta

EXAMPLES = 400 if os.environ.get("TIERD_FULL_FAULTS") else 80


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("nvme"), host="16MiB", nvme="64MiB",
               daemon={"max_frame_bytes": "1MiB"}).start()
    yield d
    d.close()


def _hello(sock: socket.socket) -> None:
    sock.sendall(p.encode_frame(p.Hello(id=1, version=p.PROTOCOL_VERSION)))
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
    for fd in fds:
        os.close(fd)


_VALID = [
    p.Put(id=2, key="f/a", nbytes=4, meta=ObjectMeta("bytes", "uint8", (4,), 1), data=b"abcd"),
    p.Get(id=3, key="f/a"),
    p.Exists(id=4, key="f/a"),
    p.Keys(id=5, prefix="f/"),
    p.Put(id=6, key="f/b", nbytes=1 << 20, meta=ObjectMeta("bytes", "uint8", (1 << 20,), 1)),
    p.PutCommit(id=7, put_id=1),
    p.Release(id=8, lease_id=3),
]


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in edits:
        if not buf:
            break
        pos %= len(buf)
        if kind == 0:
            buf[pos] ^= value & 0xFF or 1
        elif kind == 1:
            buf.insert(pos, value & 0xFF)
        else:
            del buf[pos]
    return bytes(buf)


frames = st.one_of(
    st.binary(max_size=64).map(lambda b: p.HEADER.pack(len(b)) + b),  # random bodies
    st.binary(max_size=64),  # no framing at all
    st.tuples(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1 << 16),
                                                          st.integers(0, 255)), max_size=6))
    .map(lambda t: _mutate(p.encode_frame(t[0]), t[1])),  # mutated valid requests
    st.dictionaries(st.sampled_from(["type", "id", "key", "nbytes", "meta", "data", "put_id", "lease_id"]),
                    st.one_of(st.integers(-(2**40), 2**40), st.text(max_size=8), st.binary(max_size=8), st.none(),
                              st.sampled_from(["Put", "Get", "Hello", "Release", "PutCommit", "Status"])),
                    max_size=6)
    .map(lambda d: (lambda b: p.HEADER.pack(len(b)) + b)(msgspec.msgpack.encode(d))),  # plausible msgpack
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=frames)
def test_fuzzed_frames(daemon: Daemon, frame: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        _hello(sock)
        sock.sendall(frame)
        sock.shutdown(socket.SHUT_WR)  # a truncated frame ends here: the daemon must not wait forever
        try:
            while sock.recv(1 << 16):  # whatever it answers, it ends the connection
                pass
        except ConnectionResetError:
            pass
    # Everyone else is still served.
    with daemon.connect() as s:
        s.put("ok/x", b"still here")
        assert s.get("ok/x") == b"still here"


def test_daemon_survived_the_fuzzing_with_bounded_memory(daemon: Daemon, fault_report: Any) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None
    rss = psutil.Process(daemon.proc.pid).memory_info().rss
    assert rss < 1 << 30, f"daemon RSS {rss >> 20} MiB after fuzzing"
    fault_report("fuzzed frames", frames=EXAMPLES, daemon_crashes=0, rss_after_mib=str(rss >> 20))
    with daemon.connect() as s:
        assert s.stats()["host"].used_bytes < 16 << 20
