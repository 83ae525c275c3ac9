"""Placement as a pure function: which tiers a put writes, for every combination of its inputs."""

from __future__ import annotations

import itertools

import pytest

from tierd.engine.placement import demotion_targets, plan_put, put_tier, staging_evicts

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


def test_put_tier_asks_admission_only_for_a_default_host_put() -> None:
    asked: list[int] = []

    def admit(answer: bool):
        def ask() -> bool:
            asked.append(1)
            return answer
        return ask

    assert put_tier(None, None, admit=admit(True), has_cxl=True) == "host" and len(asked) == 1
    assert put_tier(None, None, admit=admit(False), has_cxl=True) == "cxl"
    assert put_tier(None, None, admit=admit(False), has_cxl=False) == "nvme"
    assert put_tier(None, "host", admit=admit(False), has_cxl=False) == "nvme"  # the namespace's default, too
    asked.clear()
    assert put_tier("host", None, admit=admit(False), has_cxl=True) == "host"  # asked for: never refused
    assert put_tier(None, "nvme", admit=admit(False), has_cxl=True) == "nvme"
    assert asked == []


@pytest.mark.parametrize(("source", "dest", "has_cxl", "below", "targets"), [
    ("host", None, True, False, ("cxl", "nvme")),  # one tier down, nvme if cxl is full
    ("host", None, True, True, ()),  # a copy below serves it: dropped without I/O
    ("host", None, False, False, ("nvme",)),
    ("host", None, False, True, ()),
    ("host", "cxl", True, False, ("cxl",)),  # move(key, "cxl"): cxl or nothing
    ("host", "cxl", True, True, ("cxl",)),
    ("host", "nvme", True, False, ("nvme",)),  # move(key, "nvme") skips cxl
    ("host", "nvme", True, True, ()),
    ("cxl", None, True, False, ("nvme",)),
    ("cxl", None, True, True, ()),
])
def test_demotion_targets(source: str, dest: str | None, has_cxl: bool, below: bool,
                          targets: tuple[str, ...]) -> None:
    assert demotion_targets(source, dest, has_cxl=has_cxl, below=below) == targets
