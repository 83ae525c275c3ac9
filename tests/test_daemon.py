"""A real ``tierd serve`` process on a real socket: lifecycle, clients, faults, frames."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import msgspec
import pytest
import torch
from daemon import Daemon, client_process, open_to_all

import tierd
from tierd import protocol as p
from tierd.testing import wait_until

_client = client_process


def _raw(daemon: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(daemon.socket))
    return sock


def _read_reply(sock: socket.socket) -> p.Reply:
    reader = p.FrameReader(sock, 1 << 30)
    return msgspec.msgpack.decode(reader.read(), type=p.Reply)


# -- lifecycle -------------------------------------------------------------------


def test_ready_stopping_and_watchdog_reach_notify_socket(nvme_dir: Path) -> None:
    d = Daemon(nvme_dir)
    notify_path = d.run_dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(60)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERD_")}
    env |= {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "tierd", "serve", "--config", str(d.config_path)], env=env,
                            stderr=subprocess.PIPE)
    try:
        seen: list[str] = []
        while "WATCHDOG=1" not in seen:
            seen += sock.recv(4096).decode().split("\n")
        assert "READY=1" in seen and seen.index("READY=1") < seen.index("WATCHDOG=1")
        assert any(f.startswith("STATUS=serving on") for f in seen)
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in seen:
            seen += sock.recv(4096).decode().split("\n")
        assert proc.wait(timeout=60) == 0
        assert not d.socket.exists()  # removed on a clean stop
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
        d.close()


def test_second_daemon_on_same_socket_is_refused(daemon: Daemon) -> None:
    res = subprocess.run([sys.executable, "-m", "tierd", "serve", "--config", str(daemon.config_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "another tierd daemon" in res.stdout + res.stderr
    with daemon.connect() as s:  # the first one is unharmed
        s.put("x/a", torch.ones(3))
        assert torch.equal(s.get("x/a"), torch.ones(3))


def test_stale_socket_after_kill_is_replaced_and_durable_objects_survive(daemon: Daemon) -> None:
    t = torch.randn(300, 300)
    with daemon.connect() as s:
        s.put("ckpt/a", t, durable=True)
        s.put("tmp/v", t)
    daemon.kill()
    assert daemon.socket.exists()  # left behind by kill -9
    daemon.start()
    with daemon.connect() as s:
        assert torch.equal(s.get("ckpt/a"), t)
        assert not s.exists("tmp/v")
    assert daemon.stop() == 0


def test_sigterm_during_durable_puts_keeps_every_acknowledged_object(daemon: Daemon) -> None:
    writer = _client(
        f"""
        s = tierd.connect({str(daemon.socket)!r})
        for i in range(100000):
            try:
                s.put(f"d/{{i}}", torch.full((20000,), i, dtype=torch.int32), durable=True)
            except tierd.TierdError:
                break
            print(i, flush=True)
        """
    )
    assert writer.stdout is not None
    acked = []
    for line in writer.stdout:
        acked.append(int(line))
        if len(acked) == 30:
            daemon.stop(signal.SIGTERM)
    acked += [int(line) for line in writer.stdout]
    writer.wait(timeout=60)
    assert daemon.proc is not None and daemon.proc.returncode == 0
    daemon.start()
    with daemon.connect() as s:
        for i in acked:
            assert torch.equal(s.get(f"d/{i}"), torch.full((20000,), i, dtype=torch.int32)), i


def test_sighup_reloads_quotas(daemon: Daemon) -> None:
    with daemon.connect() as s:
        s.put("q/a", torch.zeros(1000, dtype=torch.uint8))
        text = daemon.config_path.read_text() + '\n[namespaces.q]\nquota = "1KiB"\n'
        daemon.config_path.write_text(text)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)

        def refused() -> bool:
            try:
                s.put("q/b", torch.zeros(100, dtype=torch.uint8))
            except tierd.QuotaExceeded:
                return True
            s.delete("q/b")
            return False

        assert wait_until(refused, timeout_s=30)
        with pytest.raises(tierd.QuotaExceeded, match="namespaces.q.quota"):
            s.put("q/c", torch.zeros(100, dtype=torch.uint8))
        assert torch.equal(s.get("q/a"), torch.zeros(1000, dtype=torch.uint8))  # nothing lost


def test_metrics_endpoint_serves_tier_gauges(daemon: Daemon) -> None:
    with daemon.connect() as s:
        s.put("m/x", torch.ones(1 << 20, dtype=torch.uint8))
        s.get("m/x")
        port = s.status()["metrics_port"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    assert 'tierd_tier_capacity_bytes{tier="host"} 3.3554432e+07' in body
    assert 'tierd_tier_used_bytes{tier="host"} 1.048576e+06' in body
    assert 'tierd_op_seconds_count{op="Get"}' in body


def test_status_command_prints_tables(daemon: Daemon) -> None:
    with daemon.connect() as s:
        s.put("acts/x", torch.ones(100))
        res = subprocess.run([sys.executable, "-m", "tierd", "status", "--socket", str(daemon.socket)],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "host" in res.stdout and "nvme" in res.stdout and "acts" in res.stdout and "clients" in res.stdout


def test_top_refreshes_live_view(daemon: Daemon) -> None:
    res = subprocess.run([sys.executable, "-m", "tierd", "top", "--socket", str(daemon.socket), "--iterations", "2",
                          "--interval", "0.1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "host" in res.stdout and "clients" in res.stdout


def test_connect_without_daemon_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(tierd.DaemonUnavailable, match="start one with `tierd serve`"):
        tierd.connect(tmp_path / "none.sock")


def test_daemon_death_fails_calls_clearly(daemon: Daemon) -> None:
    s = daemon.connect()
    s.put("x/y", torch.ones(4))
    assert s.healthy()
    daemon.kill()
    with pytest.raises(tierd.DaemonUnavailable, match="reconnects by itself"):
        s.get("x/y")
    assert not s.healthy()
    s.close()  # with the daemon dead: returns, raises nothing
    assert not s.healthy()


def test_a_socket_that_never_answers_fails_the_connect_at_its_timeout(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # A daemon stuck before it accepts (or anything else listening there): the handshake times out.
    from tierd.clients import remote

    monkeypatch.setattr(remote, "_CONNECT_TIMEOUT_S", 0.2)
    path = tmp_path / "stuck.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(8)  # never accepts
        with pytest.raises(tierd.DaemonUnavailable, match="at the handshake"):
            tierd.connect(path)


# -- clients ---------------------------------------------------------------------


def _host_used(daemon: Daemon) -> int:
    with daemon.connect() as s:
        return s.stats()["host"].used_bytes


def test_killed_client_gives_back_its_lease_and_allocation(daemon: Daemon) -> None:
    with daemon.connect() as s:
        s.put("big/held", torch.ones(4 << 20, dtype=torch.uint8))
    baseline = _host_used(daemon)
    holder = _client(
        f"""
        from tierd import protocol as p
        s = tierd.connect({str(daemon.socket)!r})
        meta = p.ObjectMeta("tensor", "uint8", (8 << 20,), 1)
        s._call(p.Put, key="big/never", nbytes=8 << 20, meta=meta)   # prepared, never committed
        ready, _ = s._call(p.Get, key="big/held")                     # leased, never released
        assert ready.lease_id
        s.delete("big/held")                                          # the lease keeps its bytes alive
        print("HOLDING", flush=True)
        sys.stdin.read()
        """,
        stdin=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "HOLDING", holder.stderr.read() if holder.stderr else ""
    assert _host_used(daemon) >= baseline + (8 << 20)
    with daemon.connect() as other:
        other.put("o/x", torch.arange(10))
        holder.kill()
        holder.wait(timeout=30)
        # Space back within a second: the daemon hears the socket close at once.
        assert wait_until(lambda: _host_used(daemon) <= baseline - (4 << 20) + 8192, timeout_s=1.0)
        assert torch.equal(other.get("o/x"), torch.arange(10))  # others unaffected


def test_killed_client_gives_back_its_batch_leases(daemon: Daemon) -> None:
    with daemon.connect() as s:
        s.put_many({f"big/{i}": torch.full((2 << 20,), i, dtype=torch.uint8) for i in range(3)})
    baseline = _host_used(daemon)
    holder = _client(
        f"""
        s = tierd.connect({str(daemon.socket)!r})
        found = s.exists_many(["big/0", "big/1", "big/2", "big/none"], lease=True)
        assert list(found) == [True, True, True, False]
        s.delete_many(["big/0", "big/1", "big/2"])        # the batch lease keeps their bytes alive
        got = found.lease.get_many()
        assert [int(t[0]) for t in got[:3]] == [0, 1, 2] and got[3] is None
        print("HOLDING", flush=True)
        sys.stdin.read()
        """,
        stdin=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "HOLDING", holder.stderr.read() if holder.stderr else ""
    assert _host_used(daemon) >= baseline - 8192  # deleted, but still leased
    holder.kill()
    holder.wait(timeout=30)
    assert wait_until(lambda: _host_used(daemon) <= baseline - (6 << 20) + 8192, timeout_s=2.0)


def test_get_many_names_only_its_own_batch_lease(daemon: Daemon) -> None:
    with daemon.connect() as s:
        s.put("b/x", b"x")
        with pytest.raises(tierd.ProtocolError, match="no batch lease 12345"):
            s._call(p.GetMany, keys=["b/x"], lease_id=12345)
        found = s.exists_many(["b/x"], lease=True)
        assert found.lease is not None
        found.lease.release()
        with pytest.raises(tierd.StoreClosed):
            found.lease.get_many()
        assert s.get_many(["b/x"]) == [b"x"]  # the connection goes on


def test_a_batch_larger_than_a_frame_still_comes_back_whole(nvme_dir: Path) -> None:
    d = Daemon(nvme_dir, host="64MiB", daemon={"max_frame_bytes": "1MiB"}).start()
    try:
        blocks = {f"f/{i}": torch.full((64 << 10,), i, dtype=torch.uint8) for i in range(64)}  # 4 MiB in all
        with d.connect() as s:
            assert all(s.put_many(blocks))
            got = s.get_many(list(blocks))  # more than one frame could carry inline
            assert not got.errors and all(torch.equal(g, b) for g, b in zip(got, blocks.values(), strict=True))
        assert d.stop() == 0
    finally:
        d.close()


def test_small_volatile_put_over_a_durable_object_does_not_come_back(daemon: Daemon) -> None:
    with daemon.connect() as s:
        s.put("d/k", b"durable", durable=True)
        s.put("d/k", b"volatile")  # small and inline: the daemon's one-pass path must not skip LMDB
        s.put_many({"d/m": b"durable"}, durable=True)
        s.put_many({"d/m": b"volatile"})
        assert s.get_many(["d/k", "d/m"]) == [b"volatile", b"volatile"]
    daemon.stop()
    daemon.start()
    with daemon.connect() as s:  # volatile objects go with the daemon; the durable ones were replaced
        assert s.get_many(["d/k", "d/m"]) == [None, None]


def test_two_clients_share_objects_in_one_uid(daemon: Daemon) -> None:
    with daemon.connect() as a, daemon.connect() as b:
        t = torch.randn(512, 512)
        a.put("acts/shared", t)
        assert torch.equal(b.get("acts/shared"), t)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root")
def test_other_uid_is_isolated_unless_namespace_shared(nvme_dir: Path) -> None:
    d = Daemon(nvme_dir, namespaces={"pub": {"shared": True}}).start()
    try:
        open_to_all(d)
        with d.connect() as mine:
            mine.put("priv/x", torch.ones(10))
            mine.put("pub/x", torch.full((10,), 7.0))
            other = _client(
                f"""
                s = tierd.connect({str(d.socket)!r})
                print("uid", s.uid)
                print("keys", s.keys())
                print("pub", s.get("pub/x").tolist()[0])
                try:
                    s.get("priv/x"); print("LEAK")
                except tierd.NotFound:
                    print("priv hidden")
                print("delete", s.delete("priv/x"))
                s.put("priv/x", torch.zeros(3))   # its own priv/x, a different object
                print("own", s.get("priv/x").tolist())
                """,
                uid=65534,
            )
            out, err = other.communicate(timeout=120)
            assert other.returncode == 0, err
            assert "uid 65534" in out and "keys ['pub/x']" in out and "pub 7.0" in out
            assert "priv hidden" in out and "delete False" in out and "own [0.0, 0.0, 0.0]" in out
            assert "LEAK" not in out
            assert torch.equal(mine.get("priv/x"), torch.ones(10))  # untouched by the other uid
            assert mine.keys() == ["priv/x", "pub/x"]
    finally:
        d.close()


def test_messages_and_listings_show_the_users_key(daemon: Daemon) -> None:
    # The daemon scopes private keys per uid internally; none of that reaches a user.
    with daemon.connect() as s:
        s.put("acts/x", torch.ones(4))
        s.put("acts/brief", torch.ones(4), ttl=0.05)
        wait_until(lambda: not s.exists("acts/brief"), timeout_s=10)
        calls = [lambda: s.get("acts/y"), lambda: s.info("acts/y"), lambda: s.move("acts/y", "nvme"),
                 lambda: s.get("acts/brief"), lambda: s.move("acts/x", "gpu")]
        for call in calls:
            with pytest.raises(tierd.TierdError) as err:
                call()
            assert "\x00" not in str(err.value) and "\\x00" not in str(err.value), str(err.value)
        with pytest.raises(tierd.NotFound, match=r"^no object 'acts/y'$"):
            s.get("acts/y")
        assert s.keys() == ["acts/x"] and s.keys("acts/") == ["acts/x"]
        assert s.info("acts/x").key == "acts/x"
    assert "\\x00" not in daemon.log.read_text()


def test_uid_quota(nvme_dir: Path) -> None:
    d = Daemon(nvme_dir, daemon={"uid_quota": "1MiB"}).start()
    try:
        with d.connect() as s:
            s.put("a/x", torch.zeros(900_000, dtype=torch.uint8))
            with pytest.raises(tierd.QuotaExceeded, match="per-uid quota"):
                s.put("b/y", torch.zeros(200_000, dtype=torch.uint8))
            s.put("a/x", torch.zeros(1_000_000, dtype=torch.uint8))  # replacing counts the old bytes out
    finally:
        d.close()


def test_many_requests_in_flight_on_one_connection(daemon: Daemon) -> None:
    with daemon.connect() as s:
        tensors = [torch.full((50_000,), i, dtype=torch.int32) for i in range(32)]
        futs = [s.put_async(f"f/{i}", t) for i, t in enumerate(tensors)]
        for f in futs:
            f.result(timeout=60)
        gets = [s.get_async(f"f/{i}") for i in range(32)]
        assert all(torch.equal(g.result(timeout=60), t) for g, t in zip(gets, tensors, strict=True))


def test_objects_larger_than_the_arena_stream_through_the_socket(daemon: Daemon) -> None:
    with daemon.connect() as s:
        big = torch.randint(0, 255, (40 << 20,), dtype=torch.uint8)  # host tier is 32 MiB
        s.put("big/x", big)
        assert s.info("big/x").tier == "nvme"
        assert torch.equal(s.get("big/x"), big)


# -- frames ----------------------------------------------------------------------


def _hello(sock: socket.socket) -> None:
    sock.sendall(p.encode_frame(p.Hello(id=1, version=p.PROTOCOL_VERSION)))
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
    for fd in fds:
        os.close(fd)
    assert data


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",  # not msgpack
        (lambda b: p.HEADER.pack(len(b)) + b)(msgspec.msgpack.encode([1, 2, 3])),  # not a request
        p.encode_frame(p.Ok(id=9)),  # a reply sent as a request
        (lambda b: p.HEADER.pack(len(b)) + b)(msgspec.msgpack.encode({"type": "Nope", "id": 4})),  # unknown tag
        (lambda b: p.HEADER.pack(len(b)) + b)(msgspec.msgpack.encode({"type": "Get", "id": 5, "key": 12})),
    ],
)
def test_malformed_frames_get_an_error_and_the_connection_lives(daemon: Daemon, frame: bytes) -> None:
    with _raw(daemon) as sock:
        _hello(sock)
        sock.sendall(frame)
        reply = _read_reply(sock)
        assert isinstance(reply, p.Fail) and reply.kind == "ProtocolError"
        sock.sendall(p.encode_frame(p.Exists(id=77, key="a/b")))  # still served
        reply = _read_reply(sock)
        assert isinstance(reply, p.Ok) and reply.id == 77 and reply.value is False


def test_oversized_frame_is_refused_before_its_body(daemon: Daemon) -> None:
    with _raw(daemon) as sock:
        _hello(sock)
        sock.sendall(p.HEADER.pack(1 << 31))  # 2 GiB announced, nothing sent
        reply = _read_reply(sock)
        assert isinstance(reply, p.Fail) and "over the limit" in reply.message
        assert sock.recv(1) == b""  # then a clean disconnect
    with daemon.connect() as s:  # everyone else is still served
        s.put("x/ok", torch.ones(2))


def test_truncated_frame_and_silent_disconnect(daemon: Daemon) -> None:
    for junk in (p.HEADER.pack(100) + b"abc", b"\x00\x00"):
        with _raw(daemon) as sock:
            _hello(sock)
            sock.sendall(junk)
    with _raw(daemon) as sock:  # no Hello first
        sock.sendall(p.encode_frame(p.Exists(id=3, key="a/b")))
        reply = _read_reply(sock)
        assert isinstance(reply, p.Fail) and "Hello" in reply.message
    with daemon.connect() as s:
        s.put("x/ok", torch.ones(2))
        assert s.exists("x/ok")


def test_wrong_protocol_version_is_refused(daemon: Daemon) -> None:
    with _raw(daemon) as sock:
        sock.sendall(p.encode_frame(p.Hello(id=1, version=999)))
        reply = _read_reply(sock)
        assert isinstance(reply, p.Fail) and "protocol 999" in reply.message
