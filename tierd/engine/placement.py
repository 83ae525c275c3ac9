"""Placement: where a put goes and which tiers it writes, where a demoted copy goes (pure functions, tested like policies).

The engine executes a :class:`PutPlan`; the one thing it learns only while
executing is whether a cxl copy found room, which decides an ``if_no_cxl``
nvme copy.

Rules
    * A put names its tier, or gets its namespace's, or host; a host put by
      default that admission refuses goes one tier down (cxl, else nvme).
    * A volatile put to ``tier="remote"`` lives only there.
    * A put whose staging extent is in the host tier and that may stay
      there keeps it as its host copy.
    * Otherwise it goes one tier down: a cxl copy when cxl is configured
      and the put may land in host or cxl (a durable object is cached there
      only if asked for cxl, or if there is room without demoting anything),
      else nvme.
    * A durable object always gets its nvme copy (an empty one too: the
      LMDB entry points at it).
    * A namespace with ``write_through`` also writes a remote copy when a
      remote tier is configured.
    * A copy demoted from host goes to cxl when configured and nothing
      below holds the object, else to nvme; one that a lower tier already
      holds (a durable nvme copy, a remote one) is dropped without I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["PutPlan", "plan_put", "put_tier", "staging_evicts", "demotion_targets"]


def put_tier(requested: str | None, namespace_tier: str | None, *, admit: Callable[[], bool], has_cxl: bool) -> str:
    """The tier a put aims at. ``admit`` (the namespace's admission policy) is asked only for a
    put that lands in host by default, and at most once (it may count the request)."""
    top = requested if requested is not None else (namespace_tier or "host")
    if top == "host" and requested is None and not admit():
        return "cxl" if has_cxl else "nvme"  # one tier down
    return top


def demotion_targets(source: str, dest: str | None, *, has_cxl: bool, below: bool) -> tuple[str, ...]:
    """Where a copy leaving ``source`` (host or cxl) is written, in order of preference.

    ``dest`` forces cxl or nvme (``move``); ``below``: nvme or remote holds the
    object already. Empty: the copy is dropped, the one below serves it.
    """
    if source == "host" and has_cxl and (dest == "cxl" or (dest is None and not below)):
        return ("cxl",) if dest == "cxl" or below else ("cxl", "nvme")
    return () if below else ("nvme",)


@dataclass(frozen=True, slots=True)
class PutPlan:
    remote_only: bool  # the remote tier is the object's one home
    keep_host: bool  # the staging extent becomes the host copy
    try_cxl: bool  # write a cxl copy (it may find no room)
    cxl_evicts: bool  # ... demoting other cxl objects to make room
    nvme: Literal["always", "if_no_cxl", "never"]
    write_through: bool  # also a remote copy


def plan_put(top: str, *, durable: bool, staged: bool, nbytes: int, has_cxl: bool, has_remote: bool,
             write_through: bool) -> PutPlan:
    """The tiers a put of ``nbytes`` to ``top`` (after admission) writes; ``staged``: it holds a host extent."""
    if top == "remote" and nbytes and not durable:
        return PutPlan(remote_only=True, keep_host=False, try_cxl=False, cxl_evicts=False, nvme="never",
                       write_through=False)
    stays_host = staged and top == "host"
    leaves_host = bool(nbytes) and not stays_host
    return PutPlan(
        remote_only=False,
        keep_host=stays_host,
        try_cxl=leaves_host and top in ("host", "cxl") and has_cxl,
        cxl_evicts=top == "cxl" or not durable,
        nvme="always" if durable else ("if_no_cxl" if leaves_host else "never"),
        write_through=has_remote and bool(nbytes) and write_through,
    )


def staging_evicts(top: str, *, durable: bool, stage: bool) -> bool:
    """Whether reserving a put's host staging extent may demote other objects.

    For a volatile put to host the extent is its final place: make room. For
    any other put it is only a staging buffer, worth demoting others for only
    when the bytes have no other way in (``stage``: a daemon client's).
    """
    return (top == "host" and not durable) or stage
