"""Security of the daemon: who gets the arena, the socket's modes, frames before Hello, per-uid limits.

Tests that change uid need root (a child process imports as root, then
``os.setuid(65534)`` before it connects; see ``daemon.client_process``).
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from daemon import Daemon, client_process, open_to_all

import tierd
from tierd import protocol as p
from tierd.config import default_socket_path, load_config
from tierd.daemon.identity import SocketClaim
from tierd.testing import wait_until

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root")


def _recv_all(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Everything the daemon sends until it closes (or goes quiet for 2 s), and every fd that came with it."""
    data, fds = b"", []
    sock.settimeout(2)
    size = socket.CMSG_SPACE(16 * array.array("i").itemsize)
    while True:
        try:
            chunk, ancdata, _, _ = sock.recvmsg(1 << 16, size)
        except (TimeoutError, ConnectionResetError):
            break
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
        if not chunk:
            break
        data += chunk
    for fd in fds:
        os.close(fd)
    return data, fds


def _replies(data: bytes) -> list[p.Reply]:
    out = []
    while len(data) >= p.HEADER.size:
        (n,) = p.HEADER.unpack_from(data)
        out.append(msgspec.msgpack.decode(data[p.HEADER.size : p.HEADER.size + n], type=p.Reply))
        data = data[p.HEADER.size + n :]
    return out


def _raw(d: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(d.socket))
    return sock


@pytest.fixture
def daemon(nvme_dir: Path) -> Iterator[Daemon]:
    d = Daemon(nvme_dir, namespaces={"pub": {"shared": True}}, daemon={"max_connections_per_uid": 3}).start()
    yield d
    d.close()


# -- the arena goes to trusted uids only (Note [arena trust] in tierd/daemon/server.py) ---------


# Run as uid 65534 against a daemon holding root's objects: no arena fd, every size round-trips
# through the socket, and nothing of root's comes back by any request.
_UNTRUSTED = """
import socket, msgspec
from tierd import protocol as p
from tierd.engine.index import ObjectMeta
sock_path, marker = sys.argv[1], int(sys.argv[2])

def leaked(data):
    return bytes([marker]) * 4096 in data   # a page of root's marker; random bytes never hold one

raw = socket.socket(socket.AF_UNIX)
raw.connect(sock_path)
raw.sendall(p.encode_frame(p.Hello(id=1, version=p.PROTOCOL_VERSION)))
data, fds, _, _ = socket.recv_fds(raw, 1 << 16, 4)
print("raw fds", len(fds))
raw.close()

s = tierd.connect(sock_path)
print("has_arena", s.has_arena)
g = torch.Generator().manual_seed(0)
kept = {}
sizes = [0, 1, 100, 64 << 10, (64 << 10) + 1, 1 << 20, 5 << 20, 40 << 20]   # 40 MiB: over the 32 MiB arena
for n in sizes:
    t = kept[n] = torch.randint(0, 255, (n,), dtype=torch.uint8, generator=g)
    s.put(f"priv/{n}", t)
    assert torch.equal(s.get(f"priv/{n}"), t), n
    out = torch.empty_like(t)
    assert s.get(f"priv/{n}", out=out) is out and torch.equal(out, t), n
base = torch.randn(512, 1024, generator=g)
s.put("priv/strided", base[:, ::2])
assert torch.equal(s.get("priv/strided"), base[:, ::2].contiguous())
out = torch.empty(512, 512).t()
s.get("priv/strided", out=out)
assert torch.equal(out, base[:, ::2])
s.put("priv/durable", base, durable=True)
assert torch.equal(s.get("priv/durable"), base)
futs = [s.put_async(f"priv/a{i}", torch.full((300_000,), i)) for i in range(16)]
[f.result(60) for f in futs]
assert all(torch.equal(s.get_async(f"priv/a{i}").result(60), torch.full((300_000,), i)) for i in range(16))
s.move("priv/1048576", "nvme")
assert torch.equal(s.get("priv/1048576"), kept[1 << 20])  # from nvme, through the socket
print("round trips ok")

# root's objects: invisible through every request
got = []
for call in (lambda: s.get("root/big"), lambda: s.get("root/small"), lambda: s.info("root/big")):
    try:
        got.append(call())
    except tierd.NotFound:
        pass
print("found", len(got), "exists", s.exists("root/big"), "keys", [k for k in s.keys() if k.startswith("root")],
      "delete", s.delete("root/big"))
try:
    s.move("root/big", "nvme"); print("LEAK move")
except tierd.NotFound:
    pass
s.prefetch(["root/big"])
st = s.status()
print("status", sorted(st["namespaces"]), sorted({c["uid"] for c in st["clients"]}))

# Stale arena bytes: root freed a 4 MiB object full of the marker. A put that sends
# fewer bytes than it announced must never commit (else its get would return them).
meta = ObjectMeta("tensor", "uint8", (4 << 20,), 1)
for sent in (0, 1 << 20):
    ready, _ = s._call(p.Put, key="priv/stale", nbytes=4 << 20, meta=meta)
    print("offset", ready.offset)
    if sent:
        s._send(p.PutChunk(id=0, put_id=ready.put_id, offset=0, data=bytes(sent)))
    try:
        s._call(p.PutCommit, put_id=ready.put_id); print("LEAK commit")
    except tierd.InvalidArgument as exc:
        print("refused:", exc)
ready, _ = s._call(p.Put, key="priv/stale", nbytes=4 << 20, meta=meta)
s._send(p.PutChunk(id=0, put_id=ready.put_id, offset=1 << 20, data=bytes(1 << 20)))   # out of order
try:
    s._call(p.PutCommit, put_id=ready.put_id); print("LEAK commit")
except tierd.InvalidArgument as exc:
    print("refused:", exc)
print("stale exists", s.exists("priv/stale"))
for k in s.keys():
    v = s.get(k)
    if leaked(v.view(-1).view(torch.uint8).numpy().tobytes() if isinstance(v, torch.Tensor) else v):
        print("LEAK bytes", k)
try:   # the arena memfd through /proc: a root process's fds are not ours to open
    for name in os.listdir(f"/proc/{s.daemon_pid}/fd"):
        os.open(f"/proc/{s.daemon_pid}/fd/{name}", os.O_RDONLY); print("LEAK proc", name)
except PermissionError:
    print("proc refused")
print("done")
"""


@needs_root
def test_untrusted_uid_gets_no_arena_and_still_round_trips(daemon: Daemon) -> None:
    open_to_all(daemon)
    marker = 0xA5
    with daemon.connect() as mine:
        assert mine.has_arena  # root is trusted
        secret = torch.full((4 << 20,), marker, dtype=torch.uint8)
        mine.put("root/big", secret)
        mine.put("root/small", b"\xa5" * 1000)
        mine.put("root/gone", secret)
        mine.delete("root/gone")  # its extent, full of the marker, is free for the next put
        child = client_process(f"sys.argv[1:] = [{str(daemon.socket)!r}, '{marker}']\n" + _UNTRUSTED, uid=NOBODY)
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, out + err
        assert "raw fds 0" in out and "has_arena False" in out and "round trips ok" in out
        assert "found 0 exists False keys [] delete False" in out
        assert f"status [] [{NOBODY}]" in out  # no other uid's namespaces or processes
        assert out.count("offset None") == 2  # an untrusted client never learns an arena offset
        assert "refused: put of 'priv/stale' refused: only 0 of 4194304 bytes were sent" in out
        assert "only 1048576 of 4194304" in out and "does not follow the 0 bytes received" in out
        assert "stale exists False" in out and "proc refused" in out and "done" in out
        assert "LEAK" not in out
        assert torch.equal(mine.get("root/big"), secret)  # untouched
        assert mine.get("root/small") == b"\xa5" * 1000
        # No streamed put left staging behind.
        assert mine.stats()["host"].used_bytes < 32 << 20


@needs_root
def test_trusted_uids_get_the_arena(nvme_dir: Path) -> None:
    d = Daemon(nvme_dir, daemon={"trusted_uids": [NOBODY]}).start()
    try:
        open_to_all(d)
        child = client_process(f"""
            s = tierd.connect({str(d.socket)!r})
            s.put("x/big", torch.ones(1 << 20))
            print("has_arena", s.has_arena, s.get("x/big").sum().item())
            """, uid=NOBODY)
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        assert "has_arena True 1048576.0" in out
    finally:
        d.close()


def test_trusted_uids_config_is_checked(nvme_dir: Path) -> None:
    base = {"tiers": {"nvme": {"path": str(nvme_dir)}}}
    cfg = load_config(base, env={"TIERD_DAEMON_TRUSTED_UIDS": "1000, 1001"})
    assert cfg.daemon.trusted_uids == [1000, 1001]
    with pytest.raises(tierd.ConfigError, match="daemon.trusted_uids"):
        load_config({**base, "daemon": {"trusted_uids": [-1]}}, env={})


# -- the socket ---------------------------------------------------------------------------


def test_socket_is_0660_in_a_0700_directory_it_creates(nvme_dir: Path) -> None:
    d = Daemon(nvme_dir)
    d.socket = d.run_dir / "made" / "here" / "tierd.sock"
    d.config_path.write_text(d.config_path.read_text().replace(str(d.run_dir / "tierd.sock"), str(d.socket)))
    try:
        d.start()
        assert stat.S_IMODE(d.socket.stat().st_mode) == 0o660
        assert stat.S_IMODE(d.socket.parent.stat().st_mode) == 0o700
        with d.connect() as s:
            s.put("x/y", b"ok")
    finally:
        d.close()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o757])
def test_socket_directory_others_can_write_is_refused(tmp_path: Path, nvme_dir: Path, mode: int) -> None:
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(mode)
    cfg = load_config({"tiers": {"nvme": {"path": str(nvme_dir)}}, "daemon": {"socket": str(run / "t.sock")}},
                      env={})
    with pytest.raises(tierd.TierdError, match=r"socket directory .* is writable by (group|others)"):
        SocketClaim(default_socket_path(cfg))  # the check alone, no engine
    run.chmod(0o750)  # what systemd's RuntimeDirectoryMode=0750 gives: accepted
    SocketClaim(default_socket_path(cfg)).release()


@needs_root
def test_socket_directory_of_another_uid_is_refused(tmp_path: Path, nvme_dir: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chown(run, NOBODY, NOBODY)  # e.g. /tmp/tierd-0 made by someone else first
    cfg = load_config({"tiers": {"nvme": {"path": str(nvme_dir)}}, "daemon": {"socket": str(run / "t.sock")}},
                      env={})
    with pytest.raises(tierd.TierdError, match=f"owned by uid {NOBODY}"):
        SocketClaim(default_socket_path(cfg))


# -- memfds only after an accepted Hello ---------------------------------------------------


def test_no_fd_before_or_without_an_accepted_hello(daemon: Daemon) -> None:
    with _raw(daemon) as sock:  # a request before Hello
        sock.sendall(p.encode_frame(p.Get(id=3, key="x/y")))
        data, fds = _recv_all(sock)
        assert fds == [] and [type(r) for r in _replies(data)] == [p.Fail]
    with _raw(daemon) as sock:  # a Hello of another protocol version
        sock.sendall(p.encode_frame(p.Hello(id=1, version=p.PROTOCOL_VERSION + 1)))
        data, fds = _recv_all(sock)
        assert fds == [] and "upgrade the older side" in _replies(data)[0].message  # type: ignore[union-attr]
    with _raw(daemon) as sock:  # garbage instead of a Hello
        sock.sendall(p.HEADER.pack(3) + b"\xc1\xc1\xc1" + p.encode_frame(p.Hello(id=1, version=p.PROTOCOL_VERSION)))
        sock.shutdown(socket.SHUT_WR)  # then the daemon ends the connection: no waiting for silence
        data, fds = _recv_all(sock)
        replies = _replies(data)
        # The malformed frame is answered; the Hello behind it is then accepted, and only it brings the fd.
        assert isinstance(replies[0], p.Fail) and isinstance(replies[1], p.Welcome) and len(fds) == 1


def test_connections_over_the_per_uid_limit_get_no_fd(daemon: Daemon) -> None:
    stores = [daemon.connect() for _ in range(3)]  # max_connections_per_uid = 3
    try:
        with _raw(daemon) as sock:
            with contextlib.suppress(BrokenPipeError):  # refused at accept: it may have closed already
                sock.sendall(p.encode_frame(p.Hello(id=1, version=p.PROTOCOL_VERSION)))
            data, fds = _recv_all(sock)
            assert fds == []
            (fail,) = _replies(data)
            assert isinstance(fail, p.Fail) and fail.kind == "QuotaExceeded"
            assert "max_connections_per_uid" in fail.message
        with pytest.raises(tierd.QuotaExceeded, match="3 connections, the limit is 3"):
            daemon.connect()
        stores.pop().close()
        assert wait_until(lambda: _connects(daemon), timeout_s=10)  # a freed slot is usable again
    finally:
        for s in stores:
            s.close()


def _connects(daemon: Daemon) -> bool:
    try:
        daemon.connect().close()
    except tierd.QuotaExceeded:
        return False
    return True


# -- per-connection limits ----------------------------------------------------------------


def test_frame_size_limit_is_exact(nvme_dir: Path) -> None:
    d = Daemon(nvme_dir, daemon={"max_frame_bytes": "1MiB"}).start()
    try:
        limit = 1 << 20
        for body_len, refused in ((limit, False), (limit + 1, True)):
            with _raw(d) as sock:
                sock.sendall(p.encode_frame(p.Hello(id=1, version=p.PROTOCOL_VERSION)))
                reader = p.FrameReader(sock, 1 << 30)
                reader.feed(socket.recv_fds(sock, 1 << 16, 1)[0])
                reader.read()  # the Welcome
                sock.sendall(p.HEADER.pack(body_len))
                with contextlib.suppress(BrokenPipeError):  # refused after the header: the body may bounce
                    sock.sendall(b"\xc1" * body_len)
                reply = msgspec.msgpack.decode(reader.read(), type=p.Reply)
                assert isinstance(reply, p.Fail)
                # At the limit: read, found not to be msgpack. Over it: refused before the body.
                assert ("over the limit of 1048576" in reply.message) is refused, reply.message
                assert ("malformed request" in reply.message) is not refused
    finally:
        d.close()


def test_in_flight_limit_stops_reading_the_connection(nvme_dir: Path) -> None:
    """With max_inflight = 1, a request behind a stuck one is not even read until the first ends."""
    d = Daemon(nvme_dir, daemon={"max_inflight": 1}).start()
    try:
        with d.connect() as s:
            s.put("big/x", torch.ones(40 << 20, dtype=torch.uint8))  # over the arena: a get streams it
            s.put("small/victim", b"v")
            with _raw(d) as sock:
                sock.sendall(p.encode_frame(p.Hello(id=1, version=p.PROTOCOL_VERSION)))
                socket.recv_fds(sock, 1 << 16, 1)
                # The get blocks sending 40 MiB to a reader who does not read; the delete must wait.
                sock.sendall(p.encode_frame(p.Get(id=2, key="big/x")) + p.encode_frame(p.Delete(id=3, key="small/victim")))
                assert wait_until(lambda: _newest_client(s)["requests"] == 3, timeout_s=30)  # Hello, Get, Delete
                assert not wait_until(lambda: not s.exists("small/victim"), timeout_s=1.0)
                reader = p.FrameReader(sock, 1 << 30)
                kinds = []
                while not kinds or kinds[-1] != (p.Ok, 3):  # drain the stream: then the delete runs
                    reply = msgspec.msgpack.decode(reader.read(), type=p.Reply)
                    kinds.append((type(reply), reply.id))
                assert kinds == [(p.GetReady, 2), (p.Chunk, 2), (p.Chunk, 2), (p.Ok, 3)]
                assert not s.exists("small/victim")
    finally:
        d.close()


def _newest_client(store: tierd.RemoteStore) -> dict[str, Any]:
    return max(store.status()["clients"], key=lambda c: c["since"])
