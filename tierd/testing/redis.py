"""Real Redis for tests and benchmarks: one ``redis-server``, or a Redis Cluster with replicas.

    server = RedisServer(tmp_path)                 # .url; .stop()
    cluster = RedisCluster(tmp_path)               # 3 primaries, 3 replicas on loopback
    cluster.seeds                                  # "redis://127.0.0.1:p1,redis://127.0.0.1:p2,..."
    cluster.kill(cluster.primary_of("tierd:{oid}:0"))   # a primary dies; its replica takes over
    cluster.wait_ok()                              # until every node reports cluster_state:ok
    cluster.stop()

Both need ``redis-server`` (and the cluster ``redis-cli``) on PATH; under
pytest they skip the calling test when it is missing. Both have ``.url``,
``.cluster`` (what ``[tiers.remote] cluster`` must say) and ``.client()`` (a
redis-py client that routes by slot on the cluster), so a test can take
either. Nothing here is mocked: the
processes are the real servers, on free loopback ports, with persistence
off and their files under the given directory.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RedisServer", "RedisCluster", "FailoverReport", "free_cluster_ports", "read_through_failover"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_ports(n: int) -> list[int]:
    """``n`` distinct free ports whose cluster bus ports (port + 10000, below 65536) are free too."""
    import random

    ports: list[int] = []
    for _ in range(1000 * n):
        port = random.randrange(20000, 45000)
        if any(abs(port - p) == 10000 or port == p for p in ports):
            continue
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free port pairs for cluster nodes")


def _exe(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        why = f"{name} is not installed (apt-get install redis-server; .ci/run does)"
        pytest = sys.modules.get("pytest")  # under pytest: skip the test; elsewhere (a benchmark): say why
        if pytest is None:
            raise RuntimeError(why)
        pytest.skip(why)
    return exe


class RedisServer:
    """A real redis-server on a loopback port, started and stopped by the test."""

    cluster = False

    def __init__(self, workdir: Path, port: int | None = None, *extra: str, unix: bool = False) -> None:
        """``unix=True`` serves on a Unix socket in ``workdir`` only (``.url`` is ``unix://...``)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = str(workdir / "redis.sock") if unix else None
        if self.socket is not None:
            self.port = 0
            self.url = f"unix://{self.socket}"
            listen = ["--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700"]
        else:
            self.port = port or _free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
            listen = ["--port", str(self.port), "--bind", "127.0.0.1"]
        self.proc = subprocess.Popen(
            [_exe("redis-server"), *listen, "--save", "", "--appendonly", "no", "--dir", str(workdir), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self._wait_ping()
        except BaseException:
            self.stop()
            raise

    def client(self, **kwargs: Any) -> Any:
        import redis

        where = {"unix_socket_path": self.socket} if self.socket else {"host": "127.0.0.1", "port": self.port}
        return redis.Redis(**where, socket_connect_timeout=1, **kwargs)

    def _wait_ping(self) -> None:
        import redis

        client = self.client()
        try:
            for _ in range(500):  # redis has no readiness signal to wait on: PING until it answers
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, FileNotFoundError):
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"redis-server at {self.url} exited at start") from None
                    threading.Event().wait(0.02)
            raise RuntimeError(f"redis-server at {self.url} did not answer PING")
        finally:
            client.close()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


class RedisCluster:
    """``primaries`` redis-servers in cluster mode, each with ``replicas`` replicas, made one cluster
    by ``redis-cli --cluster create``.

    ``node_timeout_ms`` is the cluster's failure-detection time: a replica is
    promoted that long (plus an election of about a second) after its primary dies.
    ``full_coverage`` is the servers' ``cluster-require-full-coverage``: Redis's
    default (yes) makes every node refuse every command (CLUSTERDOWN) while any
    slot has no primary, from a failure's detection until the promotion; with no
    (what tierd's README recommends, and the default here) the healthy shards serve.
    """

    cluster = True

    def __init__(self, workdir: Path, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 2000,
                 full_coverage: bool = False, ports: list[int] | None = None) -> None:
        self.node_timeout_ms = node_timeout_ms
        self.nodes: dict[int, RedisServer] = {}
        count = primaries * (1 + replicas)
        ports = ports or free_cluster_ports(count)
        if len(ports) != count:
            raise ValueError(f"{count} nodes need {count} ports, not {len(ports)}")
        try:
            for port in ports:
                self.nodes[port] = RedisServer(
                    workdir / f"node-{port}", port, "--cluster-enabled", "yes", "--cluster-config-file",
                    "nodes.conf", "--cluster-node-timeout", str(node_timeout_ms),
                    "--cluster-require-full-coverage", "yes" if full_coverage else "no")
            out = subprocess.run(
                [_exe("redis-cli"), "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.nodes),
                 "--cluster-replicas", str(replicas), "--cluster-yes"],
                capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
            self.wait_ok(expect_replicas=primaries * replicas)
        except BaseException:
            self.stop()
            raise

    @property
    def ports(self) -> list[int]:
        return list(self.nodes)

    @property
    def url(self) -> str:
        """One node's URL (a single seed)."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    @property
    def seeds(self) -> str:
        """Every node's URL, comma-separated: ``[tiers.remote] url`` accepts that in cluster mode."""
        return ",".join(f"redis://127.0.0.1:{p}" for p in self.ports)

    def client(self, **kwargs: Any) -> Any:
        """A redis-py cluster client (it routes each key to its slot's primary)."""
        import redis

        node = self._alive()[0]
        return redis.RedisCluster(host="127.0.0.1", port=node.port, socket_connect_timeout=1, **kwargs)

    def _alive(self) -> list[RedisServer]:
        return [n for n in self.nodes.values() if n.alive]

    def _nodes_table(self) -> dict[int, dict[str, Any]]:
        """CLUSTER NODES, as one live node sees it: port -> redis-py's parsed entry."""
        for node in self._alive():
            client = node.client(socket_timeout=2)
            try:
                table = client.execute_command("CLUSTER NODES")
                return {int(addr.split("@")[0].rsplit(":", 1)[1]): entry for addr, entry in table.items()}
            except Exception:  # noqa: BLE001, S112 - ask the next live node
                continue
            finally:
                client.close()
        raise RuntimeError("no live cluster node answers CLUSTER NODES")

    @staticmethod
    def _serving(entry: dict[str, Any]) -> bool:
        return "master" in entry["flags"] and "fail" not in entry["flags"]

    @classmethod
    def _serves(cls, entry: dict[str, Any], slot: int) -> bool:
        """Whether a CLUSTER NODES entry is a live primary owning ``slot`` (ranges or single slots)."""
        return cls._serving(entry) and any(
            int(r[0]) <= slot <= int(r[-1]) for r in entry["slots"] if r and str(r[0]).isdigit())

    def primaries(self) -> list[int]:
        """Ports of the primaries that are up, as the cluster sees them now."""
        return [port for port, e in self._nodes_table().items() if self._serving(e) and e["slots"]]

    def primary_of(self, key: str) -> int:
        """The port of the primary serving ``key``'s slot now."""
        client = self._alive()[0].client(socket_timeout=2)
        try:
            slot = int(client.execute_command("CLUSTER KEYSLOT", key))
        finally:
            client.close()
        for port, e in self._nodes_table().items():
            if self._serves(e, slot):
                return port
        raise RuntimeError(f"no primary serves slot {slot}")

    def move_slot(self, slot: int, to: int) -> None:
        """Reshard: move ``slot`` and its keys to the primary on port ``to``, as ``redis-cli --cluster
        reshard`` does (IMPORTING / MIGRATING, MIGRATE, then SETSLOT NODE on every primary)."""
        table = self._nodes_table()
        frm = next(p for p, e in table.items() if self._serves(e, slot))
        if frm == to:
            return
        src, dst = self.nodes[frm].client(socket_timeout=10), self.nodes[to].client(socket_timeout=10)
        try:
            src_id, dst_id = table[frm]["node_id"], table[to]["node_id"]
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", to, "", 0, 10_000, "KEYS", *keys)
            for port in self.primaries():
                client = self.nodes[port].client(socket_timeout=10)
                try:
                    client.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
                finally:
                    client.close()
        finally:
            src.close()
            dst.close()

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (nothing flushed, no goodbye to the cluster)."""
        self.nodes[port].stop()

    def wait_replicated(self, port: int, timeout_s: float = 5.0) -> None:
        """Block until every write the primary on ``port`` took has reached its replicas (WAIT)."""
        client = self.nodes[port].client(socket_timeout=timeout_s + 1)
        try:
            replicas = int(client.info("replication").get("connected_slaves", 0))
            acked = int(client.execute_command("WAIT", replicas, int(timeout_s * 1000)))
        finally:
            client.close()
        if acked < replicas:
            raise RuntimeError(f"only {acked} of {replicas} replicas of {port} acknowledged within {timeout_s} s")

    def wait_ok(self, timeout_s: float = 60.0, expect_replicas: int | None = None) -> float:
        """Wait until every live node reports ``cluster_state:ok`` (and, given ``expect_replicas``,
        that many replicas are linked to their primaries); returns the seconds waited."""
        t0 = time.monotonic()
        while True:
            try:
                ok = all(self._state_ok(n) for n in self._alive())
                if ok and expect_replicas is not None:
                    linked = sum(1 for e in self._nodes_table().values() if "slave" in e["flags"] and e["connected"])
                    ok = linked >= expect_replicas and self._replicas_synced()
                if ok:
                    return time.monotonic() - t0
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"the cluster did not reach cluster_state:ok within {timeout_s:.0f} s")
            threading.Event().wait(0.05)

    def wait_failover(self, dead: int, timeout_s: float = 60.0) -> float:
        """After :meth:`kill` of primary ``dead``: wait until a replica serves its slots and every
        live node reports ``cluster_state:ok``; returns the seconds waited."""
        t0 = time.monotonic()
        while True:
            try:
                table = self._nodes_table()
                if dead not in table or not self._serving(table[dead]):
                    self.wait_ok(timeout_s=max(0.0, timeout_s - (time.monotonic() - t0)))
                    return time.monotonic() - t0
            except RuntimeError:
                pass
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"no replica took over from {dead} within {timeout_s:.0f} s")
            threading.Event().wait(0.05)

    @staticmethod
    def _state_ok(node: RedisServer) -> bool:
        client = node.client(socket_timeout=2)
        try:
            info = client.execute_command("CLUSTER INFO")
            state = info.get("cluster_state") if isinstance(info, dict) else None
            return state == "ok" or (isinstance(info, bytes | str) and "cluster_state:ok" in str(info))
        finally:
            client.close()

    def _replicas_synced(self) -> bool:
        for node in self._alive():
            client = node.client(socket_timeout=2)
            try:
                info = client.info("replication")
            finally:
                client.close()
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def flush(self) -> None:
        """Empty every primary (between tests sharing one cluster)."""
        for port in self.primaries():
            client = self.nodes[port].client(socket_timeout=5)
            try:
                client.flushall()
            finally:
                client.close()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()


@dataclass
class FailoverReport:
    """What :func:`read_through_failover` saw: failed reads on the dead shard and on the others,
    reads that returned other bytes, and seconds from the kill until the reads that failed read
    again (``recovered_s``: the end of the first round of the final run of rounds without a
    failure; None if the reads never came back) and until a replica served the dead primary's
    slots (``promoted_s``, measured when reading went on through the promotion).
    ``failed`` counts the failed reads of each read that failed at least once, and ``last_failed_s``
    says when (seconds after the kill) each of them failed last."""

    victim_failures: int
    healthy_failures: int
    wrong: int
    rounds: int
    recovered_s: float | None
    failed: dict[str, int] = field(default_factory=dict)
    promoted_s: float | None = None
    last_failed_s: dict[str, float] = field(default_factory=dict)


def read_through_failover(cluster: RedisCluster, victim: int, reads: dict[str, Callable[[], bool]],
                          on_victim: set[str], *, timeout_s: float = 30.0, poll_s: float = 0.05,
                          through_promotion: bool = False) -> FailoverReport:
    """SIGKILL primary ``victim``, then call every read (True: the right bytes; False: other bytes;
    a ``TierdError``: failed) in rounds every ``poll_s`` until a round has no failure (with
    ``through_promotion``: a round after a replica has taken over the victim's slots, so that
    reads that never fail are watched through the whole failover).

    ``on_victim`` names the reads whose keys lie in the victim's slots: their
    failures are expected while the replica is promoted; any other read that
    fails counts as a healthy failure.
    """
    from tierd.errors import TierdError

    table = cluster._nodes_table()
    ranges = [r for r in table[victim]["slots"] if r and str(r[0]).isdigit()]
    slot = int(ranges[0][0])  # one of the victim's slots: served by another node once it is promoted

    def promoted() -> bool:
        try:
            return any(port != victim and cluster._serves(e, slot) for port, e in cluster._nodes_table().items())
        except RuntimeError:
            return False

    cluster.wait_replicated(victim)  # replication is asynchronous: a kill right after a write may lose it
    cluster.kill(victim)
    killed = time.monotonic()
    victim_failures = healthy_failures = wrong = rounds = 0
    failed_reads: dict[str, int] = {}
    last_failed: dict[str, float] = {}
    clean_since: float | None = None
    promoted_s: float | None = None
    while time.monotonic() - killed < timeout_s:
        rounds += 1
        failed = False
        for name, read in reads.items():
            try:
                wrong += not read()
            except TierdError:
                failed = True
                failed_reads[name] = failed_reads.get(name, 0) + 1
                last_failed[name] = time.monotonic() - killed
                if name in on_victim:
                    victim_failures += 1
                else:
                    healthy_failures += 1
        now = time.monotonic()
        clean_since = None if failed else clean_since if clean_since is not None else now - killed
        if through_promotion and promoted_s is None and promoted():
            promoted_s = time.monotonic() - killed
        if not failed and (not through_promotion or promoted_s is not None):
            return FailoverReport(victim_failures, healthy_failures, wrong, rounds, clean_since, failed_reads,
                                  promoted_s, last_failed)
        threading.Event().wait(poll_s)
    return FailoverReport(victim_failures, healthy_failures, wrong, rounds, None, failed_reads, promoted_s, last_failed)
