"""A ``tierd.connect()`` store outlives its daemon: kill -9, SIGTERM and a restart on the same socket.

While the daemon is away every call fails with ``DaemonUnavailable`` and returns (never hangs);
once a daemon serves on the socket again, the same store object serves again by itself, and
nothing of the old connection (a lease, a staging reservation) reaches the new daemon.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from daemon import Daemon

import tierd
from tierd.testing import wait_until

_RETURNS_S = 60.0  # a call that has not returned by then hangs (a generous bound, not a speed check)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as ex:
        yield ex


def _arena_mappings() -> list[str]:
    """This process's mappings of a daemon's host arena (its memfd is named tierd-host)."""
    with open("/proc/self/maps") as maps:
        return [line for line in maps if "tierd-host" in line]


def _down(pool: ThreadPoolExecutor, call: Callable[[], Any]) -> tierd.DaemonUnavailable:
    """``call()`` raises DaemonUnavailable, and returns at all (run on a thread: a hang fails the test)."""
    future = pool.submit(call)
    exc = future.exception(timeout=_RETURNS_S)
    assert isinstance(exc, tierd.DaemonUnavailable), repr(exc)
    return exc


def _calls_while_down(pool: ThreadPoolExecutor, s: tierd.RemoteStore, keys: list[str]) -> list[str]:
    """Every kind of call fails cleanly while no daemon serves; returns the messages."""
    big = torch.ones(1 << 20, dtype=torch.uint8)  # through the arena, not inline
    calls: list[Callable[[], Any]] = [
        lambda: s.get(keys[0]), lambda: s.put("v/x", b"small"), lambda: s.put("v/big", big),
        lambda: s.exists(keys[0]), lambda: s.delete("v/none"), lambda: s.keys(), lambda: s.stats(),
        lambda: s.get_many(keys), lambda: s.put_many({"v/a": b"a", "v/b": big}),
        lambda: s.exists_many(keys, lease=True), lambda: s.prefix_length(keys), lambda: s.delete_many(keys),
        lambda: s.get_async(keys[0]).result(timeout=_RETURNS_S), lambda: s.put_async("v/y", big).result(timeout=_RETURNS_S),
        lambda: s.declare_prefix(["kv/a", "kv/b"]),
    ]
    messages = [str(_down(pool, call)) for call in calls]
    assert not s.healthy()
    assert s.stage(1 << 20) is None  # no arena to stage in now: the caller uses its own memory
    return messages


def _restart_serves_the_same_store(d: Daemon, pool: ThreadPoolExecutor, stop: Callable[[], Any], *,
                                   shrink_host: bool = False) -> tuple[tierd.RemoteStore, list[str]]:
    """Stop the daemon under a connected store, call while it is away, start it again (with an 8 MiB
    host tier if ``shrink_host``): the same store serves at its next call. Returns the store, open."""
    durable = torch.randn(512, 1024)  # 2 MiB: written through the arena
    big = torch.randint(0, 255, (12 << 20,), dtype=torch.uint8)  # larger than the shrunk host tier
    s = d.connect()
    s.put("ckpt/a", durable, durable=True)
    s.put("ckpt/big", big, durable=True)
    s.put_many({f"ckpt/{i}": torch.full((100,), i) for i in range(4)}, durable=True)
    s.put("tmp/v", torch.ones(10))
    s.declare_prefix(["plain/a", "plain/b"])  # the default config keeps no prefix hints:
    assert not s.exists("plain/a") and "plain" in s._unhinted  # the store stops declaring there
    first_pid = s.daemon_pid
    stop()
    messages = _calls_while_down(pool, s, ["ckpt/a", "ckpt/0"])
    if shrink_host:
        text = d.config_path.read_text()
        assert 'size = "32MiB"' in text
        d.config_path.write_text(text.replace('size = "32MiB"', 'size = "8MiB"'))
    d.start()
    # The very next call is served, with nothing done by the caller.
    assert torch.equal(s.get("ckpt/a"), durable)
    assert s.daemon_pid != first_pid
    assert not s._unhinted  # what the old daemon said of its namespaces is forgotten
    assert torch.equal(s.get("ckpt/big"), big)  # streamed when no arena extent is that large
    got = s.get_many([f"ckpt/{i}" for i in range(4)] + ["tmp/v"])
    assert [int(t[0]) for t in got[:4]] == [0, 1, 2, 3] and got[4] is None and not got.errors
    assert s.stats()["host"].capacity_bytes == (8 << 20 if shrink_host else 32 << 20)  # the new daemon's
    s.put("x/new", torch.arange(500_000))  # 4 MiB through the new arena
    assert torch.equal(s.get("x/new"), torch.arange(500_000))
    assert all(s.put_many({f"x/{i}": b"v" for i in range(8)}))
    assert s.has_arena and s.healthy()
    return s, messages


def test_kill_9_then_restart_the_same_store_serves_again(nvme_dir: Path, pool: ThreadPoolExecutor) -> None:
    d = Daemon(nvme_dir)
    try:
        d.start()
        s, messages = _restart_serves_the_same_store(d, pool, d.kill)
        # The first call found the connection dead before its request left, and tried to reconnect
        # (or, within 100 ms of the last connect, did not try yet).
        assert messages[0].startswith(f"no tierd daemon answers on {d.socket} ("), messages[0]
        assert all(str(d.socket) in m and "reconnects by itself" in m for m in messages), messages
        # Closing while the daemon is dead returns and raises nothing; closed stays closed.
        d.kill()
        _down(pool, lambda: s.get("ckpt/a"))
        pool.submit(s.close).result(timeout=_RETURNS_S)
        with pytest.raises(tierd.StoreClosed):
            s.get("ckpt/a")
        assert not s.healthy()
        s.close()
    finally:
        d.close()


def test_sigterm_then_restart_with_a_smaller_host_tier_serves_the_same_store(
        nvme_dir: Path, pool: ThreadPoolExecutor) -> None:
    d = Daemon(nvme_dir, host="32MiB")
    try:
        d.start()
        s, _ = _restart_serves_the_same_store(d, pool, lambda: d.stop(signal.SIGTERM), shrink_host=True)
        s.close()
    finally:
        d.close()


def test_leases_and_staging_of_the_old_connection_never_reach_the_new_daemon(nvme_dir: Path) -> None:
    d = Daemon(nvme_dir)
    try:
        d.start()
        with d.connect() as s:
            # Inline puts take no ids; then the staging is put 1 and the lease 2 of this connection,
            # as the ones below are of the next: the old ones must not name the new ones.
            s.put_many({f"d/{i}": torch.full((1000,), i) for i in range(8)}, durable=True)
            old_staging = s.stage(1 << 20)
            assert old_staging is not None
            old = s.exists_many(["d/0", "d/1"], lease=True)
            assert old.lease is not None and list(old) == [True, True]
            mapped = len(_arena_mappings())
            d.kill()
            d.start()
            new_staging = s.stage(1 << 20)
            assert new_staging is not None
            new = s.exists_many(["d/4", "d/5"], lease=True)
            assert new.lease is not None
            with pytest.raises(tierd.DaemonUnavailable):
                old.lease.get_many()  # never the new lease's values
            old.lease.release()  # never raises
            used = s.stats()["host"].used_bytes
            old_staging.buffer.fill_(7)  # still mapped memory: writing it harms nobody
            assert int(old_staging.buffer.sum()) == 7 << 20
            old_staging.release()  # does nothing: its reservation went with the old daemon
            assert s.stats()["host"].used_bytes == used  # the new staging is still reserved
            assert len(_arena_mappings()) == mapped + 1  # the old arena stays mapped while its staging lives
            del old_staging
            assert len(_arena_mappings()) == mapped  # and goes with it: no dead daemon's memory is kept
            got = new.lease.get_many()
            assert [int(t[0]) for t in got] == [4, 5]
            new.lease.release()
            used = s.stats()["host"].used_bytes
            new_staging.release()
            assert s.stats()["host"].used_bytes == used - (1 << 20)
    finally:
        d.close()


def test_calls_racing_a_kill_9_fail_cleanly_and_serve_again_after(nvme_dir: Path) -> None:
    d = Daemon(nvme_dir)
    try:
        d.start()
        s = d.connect()
        values = {f"r/{i}": torch.full((20_000 * (1 + i % 4),), i, dtype=torch.int32) for i in range(16)}
        assert all(s.put_many(values))
        restarted = threading.Event()
        lock = threading.Lock()
        done = {"ops": 0, "after": 0}
        errors: list[BaseException] = []
        wrong: list[str] = []
        down: set[int] = set()

        def worker(n: int) -> None:
            i = 0
            while done["after"] < 40:
                i += 1
                key = f"r/{(n * 7 + i) % 16}"
                try:
                    if i % 4 == 0:
                        s.put(key, values[key])
                    elif i % 4 == 1:
                        got = s.get_many([key, f"r/{(n + i) % 16}"])
                        for k, v in zip([key, f"r/{(n + i) % 16}"], got, strict=True):
                            if v is not None and not torch.equal(v, values[k]):
                                wrong.append(k)
                    elif i % 4 == 2:
                        s.put_many({key: values[key]})
                    else:
                        if not torch.equal(s.get(key), values[key]):
                            wrong.append(key)
                except tierd.NotFound:
                    pass  # volatile objects are gone after the restart
                except BaseException as exc:  # noqa: BLE001 - recorded and checked below
                    with lock:
                        errors.append(exc)
                        down.add(n)
                        if restarted.is_set():
                            return  # a failure after the restart: the assertion below shows it
                    restarted.wait()
                    continue
                with lock:
                    done["ops"] += 1
                    if restarted.is_set():
                        done["after"] += 1

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        try:
            assert wait_until(lambda: done["ops"] >= 40, timeout_s=60)
            d.kill()
            assert wait_until(lambda: len(down) == 4, timeout_s=60)  # every thread saw it
            failed_before = len(errors)
            d.start()
            restarted.set()
        finally:
            restarted.set()
            for t in threads:
                t.join(timeout=_RETURNS_S)
        assert not any(t.is_alive() for t in threads)
        assert all(isinstance(e, tierd.DaemonUnavailable) for e in errors), [repr(e) for e in errors]
        assert len(errors) == failed_before  # every call after the restart was served
        assert not wrong
        assert done["after"] >= 40
        s.close()
    finally:
        d.close()


def test_a_hung_daemon_times_calls_out_and_serves_once_it_answers(nvme_dir: Path, pool: ThreadPoolExecutor) -> None:
    """A daemon that stops answering (SIGSTOP) is given up after the store's call timeout: the call
    raises DaemonUnavailable instead of waiting forever; once it answers again, the store reconnects."""
    d = Daemon(nvme_dir).start()
    try:
        assert d.proc is not None
        with tierd.connect(d.socket, timeout_s=2.0) as s:
            s.put("ckpt/kept", torch.arange(1000), durable=True)
            d.proc.send_signal(signal.SIGSTOP)
            try:
                exc = _down(pool, lambda: s.get("ckpt/kept"))
                assert "no answer within the call timeout" in str(exc)
            finally:
                d.proc.send_signal(signal.SIGCONT)
            assert wait_until(s.healthy, timeout_s=30)
            assert torch.equal(s.get("ckpt/kept"), torch.arange(1000))
        with pytest.raises(tierd.InvalidArgument, match="timeout_s"):
            tierd.connect(d.socket, timeout_s=0)
    finally:
        d.close()
