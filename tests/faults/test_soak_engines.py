"""The soak, short: engines' clients store 10x the tiers while the daemon is restarted 4 times.

bench/soak.py's run, scaled down (host 8 MiB + nvme 32 MiB; 64 KiB items): a real
``tierd serve`` on a real Unix socket is stopped with SIGTERM, SIGKILL, SIGTERM, SIGKILL
and started again on the same socket and nvme directory while LMCache's L2 adapter
(built by LMCache's own native_plugin factory over tierd's connector), SGLang's HiCache
backend (built by SGLang's backend factory), a ``PrefixKVStore`` over ``tierd.connect()``
and a durable writer keep storing and reading back. Asserted: nothing raised into the
engines and no call hung, no read returned wrong bytes, every acknowledged durable put
reads back the same after every restart and at the end, every client stored again after
every restart without being rebuilt, and the bytes stored reach 10x the tiers.
How fast they serve again is the bench's figure (``tierd bench soak``), not asserted.

Without LMCache and SGLang (the main test run in CI; ``.ci/run``'s engines step runs this
file with them), the ``PrefixKVStore`` and durable-writer soak runs instead, on smaller
tiers (host 4 MiB + nvme 16 MiB).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # bench/ beside the package

from bench.soak import SoakConfig, run_soak  # noqa: E402

_ENGINES = ("lmcache.v1.distributed.l2_adapters.native_plugin_l2_adapter",
            "sglang.srt.mem_cache.storage.backend_factory")


def _engines_installed() -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None for m in _ENGINES)
    except ModuleNotFoundError:
        return False


def _check(res: dict[str, Any], clients: list[str]) -> None:
    assert list(res["clients"]) == clients, res["not_run"]
    # Nothing escaped into an engine, no call hung, no read returned another item's bytes.
    escaped = {n: c["escaped_samples"] for n, c in res["clients"].items() if c["escaped"]}
    assert not escaped, escaped
    hung = {n: c["hung"] for n, c in res["clients"].items() if c["hung"]}
    assert not hung, hung
    assert all(c["died"] is None for c in res["clients"].values()), {n: c["died"] for n, c in res["clients"].items()}
    assert res["summary"]["corrupt_reads"] == 0
    # 4 restarts, in order, each seen by every client as failed calls (not a hang), each followed
    # by a store of every client into the new daemon through the objects built before it.
    assert [(r["signal"], r["exit_code"]) for r in res["restarts"]] == [
        ("SIGTERM", 0), ("SIGKILL", -9), ("SIGTERM", 0), ("SIGKILL", -9)]
    for r in res["restarts"]:
        assert all(r["failed_while_down"].values()), (r["n"], r["failed_while_down"])
        missing = [n for n, t in r["first_store_s"].items() if t is None]
        assert not missing, f"restart {r['n']} ({r['signal']}): never stored again: {missing}"
    # Every acknowledged durable put reads back, byte for byte, after each restart and at the end.
    checks = res["durable"]["checks"]
    assert len(checks) == 5 and all(ch["checked"] > 0 for ch in checks), checks
    for ch in checks:
        assert ch["lost"] == ch["corrupt"] == ch["unreadable"] == 0, ch
    # Reads found what was stored while the daemon was up (volatile items are gone after a restart).
    for name in clients:
        if name != "durable":
            assert res["clients"][name]["hits"] > 0, name
    assert res["stored_bytes"] >= 10 * res["capacity_bytes"], (res["stored_bytes"], res["capacity_bytes"])


def _report(fault_report: Callable[..., None], name: str, res: dict[str, Any]) -> None:
    s = res["summary"]
    checked = sum(c["checked"] for c in res["durable"]["checks"])
    fault_report(name, runs=1, restarts=s["restarts"], durable_checked=checked, lost=s["durable_lost"],
                 escaped=s["escaped"], multiple=res["multiple"], worst_first_store_s=s["worst_first_store_s"])


def test_soak_lmcache_and_sglang_through_four_restarts(tmp_path: Path, fault_report: Callable[..., None]) -> None:
    for module in _ENGINES:
        pytest.importorskip(module)
    res = run_soak(SoakConfig.short(), tmp_path)
    _check(res, ["lmcache", "sglang", "kv", "durable"])
    _report(fault_report, "soak with the engines", res)


@pytest.mark.skipif(_engines_installed() or not os.environ.get("TIERD_FULL_FAULTS"),
                    reason="the engines' soak runs these clients too (CI's engines step); without the engines, "
                           "TIERD_FULL_FAULTS=1 runs this one (~30 s)")
def test_soak_prefix_kv_and_durable_writer_through_four_restarts(tmp_path: Path,
                                                                 fault_report: Callable[..., None]) -> None:
    cfg = SoakConfig.short(engines=False)
    cfg.host, cfg.nvme = 4 << 20, 16 << 20
    res = run_soak(cfg, tmp_path)
    _check(res, ["kv", "durable"])
    _report(fault_report, "soak without the engines", res)
