"""The engine's tier stack: order, what lies below, and nothing left open when a tier fails."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, get_args

import pytest
from conftest import small_config

import tierd
from tierd.config import TierName, load_config
from tierd.engine.index import ObjectRecord
from tierd.engine.stack import TIER_ORDER, TierStack


def test_one_list_of_tiers() -> None:
    assert get_args(TierName) == TIER_ORDER
    rec = ObjectRecord(key="k", namespace="default", meta=None, nbytes=0, codec="none",  # type: ignore[arg-type]
                       durable=False, pinned=False, expires_at=None, copies={"remote": 1, "host": 2})
    assert rec.tiers == ("host", "remote") and rec.tier == "host"  # a record's copies, in TIER_ORDER


def test_order_below_and_capabilities(nvme_dir: Path, redis_server: Any) -> None:
    cfg = small_config(nvme_dir)
    cfg["tiers"]["remote"] = {"url": redis_server.url}
    stack = TierStack(load_config(cfg))
    try:
        assert list(stack) == ["host", "nvme", "remote"]
        assert stack.below("host") == ("nvme", "remote") and stack.below("cxl") == ("nvme", "remote")
        assert stack.below("remote") == ()
        assert stack.persistent == ("nvme", "remote") and stack.remote is stack["remote"]
        assert stack.arena("host") is stack.host
        with pytest.raises(KeyError):
            stack.arena("nvme")
        assert [arena.name for arena, _, _ in stack.watermarks] == ["host"]
    finally:
        stack.close()


def test_a_tier_that_cannot_start_leaves_nothing_open(nvme_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # as in a base install
    cfg = small_config(nvme_dir)
    cfg["tiers"]["remote"] = {"url": "redis://127.0.0.1:1"}
    with pytest.raises(tierd.ConfigError, match=r"tiers\.remote\.url .* pip install 'tierd\[redis\]'"):
        tierd.open(cfg)
    with tierd.open(small_config(nvme_dir)) as store:  # the nvme directory is not left locked
        store.put("a/x", b"still works")
        assert store.get("a/x") == b"still works"
