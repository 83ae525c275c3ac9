"""Remote tier: 1 MiB chunks to and from Redis beside redis-benchmark (the C client), and a failover.

    python bench/remote.py [--quick] [--out DIR]

On one redis-server and on a 3-primary / 3-replica Redis Cluster, both on
loopback and started by this script, in one run:

* tierd's remote tier putting and getting a 64 MiB object in 1 MiB chunks
  (codec none, xxh3 per chunk, gets received straight into the destination),
  in GB/s; the same gets through redis-py's parser (the fallback path);
* what a user would write instead: a redis-py pipeline of 1 MiB SET / GET
  (redis-py's parser: hiredis when installed);
* the physical limit on this machine for the same bytes: ``redis-benchmark``
  (the C client, hiredis) with 1 MiB values on one connection, without
  pipelining and with 4 commands in flight (what tierd's reads use); the
  ratio is to the better of the two;
* on a cluster of its own: a primary SIGKILLed under two readers that look
  48 objects up by key (index entry, then chunks, as another machine does
  on a miss) every 50 ms through tiers whose only seed is the dead node,
  one that waits for the promotion and one that reads a replica meanwhile:
  objects that failed on the dead shard and on the healthy ones, wrong
  bytes, seconds from the kill until each reader's last failure and until
  the replica was promoted (node timeout 2 s).
"""

from __future__ import annotations

import csv
import io
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import MIB, BenchContext, median_gbs, pyplot, row, save_figure, standalone  # noqa: E402
from tierd.codecs import get_codec  # noqa: E402
from tierd.testing.redis import RedisCluster, RedisServer, read_through_failover  # noqa: E402
from tierd.tiers.remote import RemoteTier  # noqa: E402

CHUNK = MIB


def _redis_benchmark(port: int, *, cluster: bool, pipeline: int, n: int, new_keys: bool = False) -> dict[str, float]:
    """redis-benchmark's SET and GET GB/s with 1 MiB values, one connection, ``pipeline`` in flight.

    By default every SET overwrites one key (the server reuses the value's memory) and GET reads
    it; ``new_keys`` SETs a new key each time (``-r``: the server allocates, as for tierd's puts,
    which write new objects) and measures no GET (they would miss)."""
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set" if new_keys else "set,get",
           "-d", str(CHUNK), "-n", str(n), "-c", "1", "-P", str(pipeline), "--csv",
           *(["-r", "1000000000"] if new_keys else []), *(["--cluster"] if cluster else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    start = out.index('"test"')  # --cluster prints the topology first
    rps = {r["test"]: float(r["rps"]) for r in csv.DictReader(io.StringIO(out[start:]))}
    res = {"put_gbs": rps["SET"] * CHUNK / 1e9}
    if not new_keys:
        res["get_gbs"] = rps["GET"] * CHUNK / 1e9
    return res


def _c_client(port: int, *, cluster: bool, n: int) -> dict[str, dict[str, float]]:
    runs = {f"P{p}": _redis_benchmark(port, cluster=cluster, pipeline=p, n=n) for p in (1, 4)}
    runs["P4 new keys"] = _redis_benchmark(port, cluster=cluster, pipeline=4, n=n, new_keys=True)
    return runs


def _tierd(tier: RemoteTier, nbytes: int, reps: int) -> dict[str, float]:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    out = torch.empty_like(src)
    none = get_codec("none")

    # Each timed put writes a new object; the one before is deleted outside the timing, so that the
    # server reuses its memory, as it does for redis-benchmark's SETs of one key (new memory would
    # time the server's page faults instead).
    times = []
    loc = tier.write(src, codec=none, itemsize=1, durable=False)
    for rep in range(reps + 2):  # two more first: the server's memory grows to its steady state
        t0 = time.perf_counter()
        new = tier.write(src, codec=none, itemsize=1, durable=False)
        if rep >= 2:
            times.append(time.perf_counter() - t0)
        tier.free(loc)
        tier.drain()
        loc = new
    res = {"put_gbs": nbytes / statistics.median(times) / 1e9}
    res["get_gbs"] = median_gbs(lambda: tier.read_into(loc, out, itemsize=1), nbytes, reps)
    if not torch.equal(out, src):
        raise RuntimeError("the remote tier returned other bytes")
    res["direct_fallbacks"] = tier.slow_reads
    tier._direct = False  # redis-py's parser, as a fallback reads
    try:
        res["get_parser_gbs"] = median_gbs(lambda: tier.read_into(loc, out, itemsize=1), nbytes, reps)
    finally:
        tier._direct = True
    tier.free(loc)
    tier.drain()
    return res


def _redis_py(client: Any, nbytes: int, reps: int) -> dict[str, float]:
    """A redis-py pipeline of 1 MiB SET, then GET, 4 in flight (keys on one slot: a cluster pipeline)."""
    values = [torch.randint(0, 256, (CHUNK,), dtype=torch.uint8).numpy().tobytes() for _ in range(4)]
    keys = [f"bench:{{obj}}:{i}" for i in range(nbytes // CHUNK)]

    def put() -> None:
        for b in range(0, len(keys), 4):
            pipe = client.pipeline(transaction=False)
            for i, key in enumerate(keys[b : b + 4]):
                pipe.set(key, values[i])
            pipe.execute()

    def get() -> None:
        for b in range(0, len(keys), 4):
            pipe = client.pipeline(transaction=False)
            for key in keys[b : b + 4]:
                pipe.get(key)
            pipe.execute()

    res = {"put_gbs": median_gbs(put, nbytes, reps), "get_gbs": median_gbs(get, nbytes, reps)}
    client.delete(*keys)
    return res


def _failover(workdir: Path) -> dict[str, Any]:
    import msgspec

    from tierd.tiers.remote import RemoteLocation

    cluster = RedisCluster(workdir / "failover", node_timeout_ms=2000)
    try:
        victim = cluster.primaries()[0]
        url = f"redis://127.0.0.1:{victim}"
        writer = RemoteTier(cluster.seeds, 1 << 30, chunk_size=64 << 10, cluster=True, timeout_s=1.0)
        readers = {"waits": RemoteTier(url, 1 << 30, cluster=True, timeout_s=1.0, replica_reads=False),
                   "replica": RemoteTier(url, 1 << 30, cluster=True, timeout_s=1.0)}
        decode = msgspec.msgpack.Decoder(RemoteLocation).decode
        try:
            values = [torch.randint(0, 256, (256 << 10,), dtype=torch.uint8) for _ in range(48)]
            keys = [f"kv/{i}" for i in range(48)]
            for key, v in zip(keys, values, strict=True):  # what a store's put and publish do
                loc = writer.write(v, codec=get_codec("none"), itemsize=1, durable=False, key=key)
                writer.index_put(key, msgspec.msgpack.encode(loc))
            on_victim = {k for k in keys if cluster.primary_of(writer._index_key(k)) == victim}

            def reader(tier: RemoteTier, i: int) -> Any:
                def read() -> bool:
                    entry = tier.index_get(keys[i])
                    if entry is None:
                        return False
                    out = torch.zeros(256 << 10, dtype=torch.uint8)
                    tier.read_into(decode(entry), out, itemsize=1)
                    return torch.equal(out, values[i])
                return read

            reads = {f"{name} {i}": reader(tier, i) for name, tier in readers.items() for i in range(48)}
            report = read_through_failover(cluster, victim, reads,
                                           {f"waits {i}" for i, k in enumerate(keys) if k in on_victim},
                                           timeout_s=60, through_promotion=True)
            replica_hits = readers["replica"].replica_hits
        finally:
            for tier in (writer, *readers.values()):
                tier.close()
    finally:
        cluster.stop()
    out: dict[str, Any] = {"objects": 48, "on_victim": len(on_victim), "wrong": report.wrong, "rounds": report.rounds,
                           "promoted_s": report.promoted_s, "node_timeout_s": 2.0, "replica_hits": replica_hits,
                           # failed reads: on the dead shard without replica reads; anywhere else
                           "victim_failures": report.victim_failures, "healthy_failures": report.healthy_failures}
    for name in readers:
        failed = {keys[int(r.split()[1])] for r in report.failed if r.startswith(name + " ")}
        out[name] = {"failed_objects": len(failed), "failed_on_victim": len(failed & on_victim),
                     "failed_elsewhere": len(failed - on_victim),
                     "failed_reads": sum(n for r, n in report.failed.items() if r.startswith(name + " ")),
                     "last_failure_s": max((t for r, t in report.last_failed_s.items() if r.startswith(name + " ")),
                                           default=None)}
    return out


def run(ctx: BenchContext) -> dict[str, Any]:
    if shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None:
        return {"skipped": "redis-server and redis-benchmark are not installed (apt-get install redis-server)"}
    import redis

    nbytes = (8 if ctx.smoke else 32 if ctx.quick else 64) * MIB
    reps = 2 if ctx.smoke else 5
    n = 256 if ctx.smoke else 1024  # redis-benchmark's requests: enough that its start does not count
    task = ctx.progress.add_task("remote: redis-server, cluster, failover", total=3)
    from redis.utils import HIREDIS_AVAILABLE

    res: dict[str, Any] = {"chunk_bytes": CHUNK, "object_bytes": nbytes, "hiredis": bool(HIREDIS_AVAILABLE),
                           "memcpy_gbs": ctx.memcpy()}
    server = RedisServer(ctx.workdir / "redis")
    try:
        tier = RemoteTier(server.url, 1 << 40, chunk_size=CHUNK)
        try:
            res["server"] = {"tierd": _tierd(tier, nbytes, reps)}
        finally:
            tier.close()
        res["server"]["redis_py"] = _redis_py(redis.Redis.from_url(server.url), nbytes, reps)
        res["server"]["redis_benchmark"] = _c_client(server.port, cluster=False, n=n)
    finally:
        server.stop()
    ctx.progress.advance(task)
    cluster = RedisCluster(ctx.workdir / "cluster")
    try:
        tier = RemoteTier(cluster.seeds, 1 << 40, chunk_size=CHUNK, cluster=True)
        try:
            res["cluster"] = {"tierd": _tierd(tier, nbytes, reps)}
        finally:
            tier.close()
        res["cluster"]["redis_py"] = _redis_py(cluster.client(), nbytes, reps)
        res["cluster"]["redis_benchmark"] = _c_client(cluster.ports[0], cluster=True, n=n)
    finally:
        cluster.stop()
    ctx.progress.advance(task)
    t0 = time.perf_counter()
    res["failover"] = _failover(ctx.workdir)
    res["failover"]["wall_s"] = time.perf_counter() - t0
    ctx.progress.advance(task)
    for where in ("server", "cluster"):
        r = res[where]
        for op in ("put", "get"):
            r[f"c_best_{op}_gbs"] = max(v[f"{op}_gbs"] for v in r["redis_benchmark"].values() if f"{op}_gbs" in v)
    return res


def markdown(res: dict[str, Any]) -> str:
    if "skipped" in res:
        return f"Not run: {res['skipped']}.\n"
    lines = [f"#### 1 MiB chunks, a {res['object_bytes'] // MIB} MiB object, GB/s "
             f"(redis-py's parser: {'hiredis' if res['hiredis'] else 'pure Python'}; "
             f"memcpy {res['memcpy_gbs']:.1f} GB/s)", "",
             "| Redis | client | put | get | put / C client | get / C client |", "|---|---|---|---|---|---|"]
    for where, title in (("server", "one server"), ("cluster", "cluster 3+3")):
        r = res[where]
        bp, bg = r["c_best_put_gbs"], r["c_best_get_gbs"]
        t, p = r["tierd"], r["redis_py"]
        lines.append(f"| {title} | tierd remote tier | {t['put_gbs']:.2f} | {t['get_gbs']:.2f} | "
                     f"{t['put_gbs'] / bp:.2f}x | {t['get_gbs'] / bg:.2f}x |")
        lines.append(f"| {title} | tierd, gets through redis-py's parser | | {t['get_parser_gbs']:.2f} | | "
                     f"{t['get_parser_gbs'] / bg:.2f}x |")
        lines.append(f"| {title} | redis-py pipeline, 4 in flight | {p['put_gbs']:.2f} | {p['get_gbs']:.2f} | "
                     f"{p['put_gbs'] / bp:.2f}x | {p['get_gbs'] / bg:.2f}x |")
        for name, v in r["redis_benchmark"].items():
            get = f"{v['get_gbs']:.2f} | " if "get_gbs" in v else "- | "
            vs_get = f"{v['get_gbs'] / bg:.2f}x |" if "get_gbs" in v else "- |"
            lines.append(f"| {title} | redis-benchmark -c 1 -{name} | {v['put_gbs']:.2f} | {get}"
                         f"{v['put_gbs'] / bp:.2f}x | {vs_get}")
    f = res["failover"]
    promoted = f"{f['promoted_s']:.2f} s" if f["promoted_s"] is not None else "not within 60 s"
    lines += ["", "#### A primary killed (SIGKILL) under readers that look objects up by key; their only seed "
              f"is the dead node (node timeout {f['node_timeout_s']:.0f} s, replica promoted after {promoted})", "",
              "| reader | objects | on the dead shard | objects that failed there | elsewhere | failed reads | "
              "wrong bytes | last failure after the kill |", "|---|---|---|---|---|---|---|---|"]
    for name, title in (("waits", "waits for the promotion"), ("replica", "reads a replica meanwhile")):
        r = f[name]
        last = f"{r['last_failure_s']:.2f} s" if r["last_failure_s"] is not None else "none failed"
        lines.append(f"| {title} | {f['objects']} | {f['on_victim']} | {r['failed_on_victim']} | "
                     f"{r['failed_elsewhere']} | {r['failed_reads']} (in {f['rounds']} rounds) | {f['wrong']} | {last} |")
    return "\n".join(lines) + "\n"


def headline(res: dict[str, Any], limits: dict[str, Any]) -> list[dict[str, Any]]:
    if "skipped" in res:
        return [row("remote tier vs redis-benchmark", "-", status=f"not run: {res['skipped']}", issue=19)]
    rows = []
    for where, title in (("server", "one server"), ("cluster", "cluster")):
        r = res[where]
        for op in ("put", "get"):
            ours, c, py = r["tierd"][f"{op}_gbs"], r[f"c_best_{op}_gbs"], r["redis_py"][f"{op}_gbs"]
            note = ""
            if op == "put" and ours < 0.5 * c:
                fresh = r["redis_benchmark"]["P4 new keys"]["put_gbs"]
                note = (f"each put is a new object, for which the server allocates; redis-benchmark's SETs overwrite "
                        f"one key (with new keys it gave {fresh:.2f} GB/s)")
            rows.append(row(f"remote {op}, 1 MiB chunks, {title}", f"{ours:.2f} GB/s", limit=f"{c:.2f} GB/s",
                            peer=f"{py:.2f} GB/s", vs_limit=f"{ours / c:.2f}x", vs_peer=f"{ours / py:.2f}x", issue=19,
                            target=">= 0.5x redis-benchmark", status="met" if ours >= 0.5 * c else "missed",
                            note=note))
    f = res["failover"]
    w, r = f["waits"], f["replica"]
    ok = w["failed_elsewhere"] == 0 and r["failed_objects"] == 0 and f["wrong"] == 0
    rows.append(row("failover: objects failed off the dead shard, with replica reads, wrong bytes",
                    f"{w['failed_elsewhere']}, {r['failed_objects']}, {f['wrong']}", issue=19,
                    target="0, 0, 0", ratio="-", status="met" if ok else "missed",
                    note=f"without replica reads {w['failed_on_victim']} of {f['on_victim']} objects on the dead "
                         "shard failed until " + (f"{w['last_failure_s']:.1f} s" if w["last_failure_s"] else "-")
                         + " after the kill"))
    return rows


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None or "skipped" in res:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    clients = [("tierd", lambda r, op: r["tierd"][f"{op}_gbs"]),
               ("redis-py pipeline", lambda r, op: r["redis_py"][f"{op}_gbs"]),
               ("redis-benchmark -P1", lambda r, op: r["redis_benchmark"]["P1"][f"{op}_gbs"]),
               ("redis-benchmark -P4", lambda r, op: r["redis_benchmark"]["P4"][f"{op}_gbs"])]
    for ax, where in zip(axes, ("server", "cluster"), strict=True):
        for k, (name, fig_of) in enumerate(clients):
            ax.bar([x + k * 0.2 for x in (0, 1)], [fig_of(res[where], "put"), fig_of(res[where], "get")],
                   width=0.2, label=name)
        ax.set_xticks([0.3, 1.3], ["put", "get"])
        ax.set_title("one redis-server" if where == "server" else "Redis Cluster, 3 primaries + 3 replicas")
        ax.set_ylabel("GB/s (1 MiB chunks)")
    axes[0].legend()
    return save_figure(fig, out, "remote")


def main(argv: list[str] | None = None) -> int:
    return standalone(sys.modules[__name__], "remote", argv)


if __name__ == "__main__":
    raise SystemExit(main())
