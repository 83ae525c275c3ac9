"""Placement as a pure function: which tiers a put writes, for every combination of its inputs."""

from __future__ import annotations

import itertools

import pytest

from tierd.engine.placement import plan_put, staging_evicts

TOPS = ("host", "cxl", "nvme", "remote")


def _plans():
    for top, durable, staged, nbytes, has_cxl, has_remote, wt in itertools.product(
            TOPS, (False, True), (False, True), (0, 4096), (False, True), (False, True), (False, True)):
        yield (top, durable, staged, nbytes, has_cxl, has_remote, wt), plan_put(
            top, durable=durable, staged=staged, nbytes=nbytes, has_cxl=has_cxl, has_remote=has_remote,
            write_through=wt)


def test_nothing_is_stored_nowhere_and_durable_means_nvme() -> None:
    for (_top, durable, _staged, nbytes, has_cxl, has_remote, wt), plan in _plans():
        if durable:
            assert plan.nvme == "always" and not plan.remote_only
        if nbytes:  # the bytes land somewhere, whatever a cxl write finds
            assert plan.remote_only or plan.keep_host or plan.nvme in ("always", "if_no_cxl")
        assert not (plan.keep_host and plan.try_cxl)  # one home above nvme
        assert not (plan.try_cxl and not has_cxl)
        assert not (plan.write_through and (not has_remote or not wt or plan.remote_only))


@pytest.mark.parametrize(
    ("top", "durable", "staged", "has_cxl", "want"),
    [
        ("host", False, True, True, (False, True, False, "never")),  # stays on host
        ("host", False, False, True, (False, False, True, "if_no_cxl")),  # host full: cxl, else nvme
        ("host", False, False, False, (False, False, False, "if_no_cxl")),  # host full, no cxl: nvme
        ("cxl", False, True, True, (False, False, True, "if_no_cxl")),  # asked for cxl
        ("nvme", False, True, True, (False, False, False, "if_no_cxl")),  # straight to nvme
        ("remote", False, True, True, (True, False, False, "never")),  # a remote-only object
        ("remote", True, True, True, (False, False, False, "always")),  # durable: nvme first
        ("host", True, True, True, (False, True, False, "always")),  # durable, cached on host
    ],
)
def test_where_a_put_goes(top: str, durable: bool, staged: bool, has_cxl: bool, want: tuple) -> None:
    plan = plan_put(top, durable=durable, staged=staged, nbytes=1 << 20, has_cxl=has_cxl, has_remote=False,
                    write_through=False)
    assert (plan.remote_only, plan.keep_host, plan.try_cxl, plan.nvme) == want


def test_a_durable_object_is_cached_on_cxl_without_demoting_unless_asked() -> None:
    kw = {"staged": False, "nbytes": 4096, "has_cxl": True, "has_remote": False, "write_through": False}
    assert not plan_put("host", durable=True, **kw).cxl_evicts
    assert plan_put("cxl", durable=True, **kw).cxl_evicts
    assert plan_put("host", durable=False, **kw).cxl_evicts


def test_staging_demotes_others_only_for_its_final_place_or_a_daemon_client() -> None:
    assert staging_evicts("host", durable=False, stage=False)
    assert not staging_evicts("host", durable=True, stage=False)
    assert not staging_evicts("nvme", durable=False, stage=False)
    assert staging_evicts("nvme", durable=True, stage=True)
