"""The put path: checks and quotas, a reservation, and placement's plan carried out.

A put has two phases so that a caller can write the bytes straight into the
host arena: :meth:`Writer.reserve` checks the request, asks admission where
it goes and reserves a staging extent (a :class:`~tierd.engine.handles.Reservation`);
:meth:`Writer.finish` (the reservation's ``commit``) writes the tiers that
:func:`~tierd.engine.placement.plan_put` names and installs the record.
Nothing already stored is lost when a phase fails: copies written for the
failed put are freed, and the old version stays until the new one commits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from tierd._buffers import writable_tensor
from tierd.codecs import get_codec
from tierd.config import Config
from tierd.engine.catalog import Catalog
from tierd.engine.handles import Reservation
from tierd.engine.index import ObjectMeta, ObjectRecord
from tierd.engine.keys import namespace_of, user_key
from tierd.engine.movement import Mover
from tierd.engine.namespaces import NamespacePolicies
from tierd.engine.placement import plan_put, put_tier, staging_evicts
from tierd.engine.remote_index import RemoteIndex
from tierd.engine.stack import TierStack
from tierd.errors import InvalidArgument, QuotaExceeded, TierdError
from tierd.tiers.host import HostLocation

__all__ = ["Writer"]

log = logging.getLogger("tierd.engine")


class Writer:
    """Carries out puts for the engine; ``commit`` installs finished records and returns those they replaced."""

    def __init__(self, config: Callable[[], Config], tiers: TierStack, catalog: Catalog,
                 policies: NamespacePolicies, moves: Mover, shared: RemoteIndex | None, *,
                 commit: Callable[[list[ObjectRecord]], list[ObjectRecord | None]]) -> None:
        self._config = config  # the engine's current config (namespaces change on reload)
        self.tiers = tiers
        self.host, self.cxl, self.nvme, self.remote = tiers.host, tiers.cxl, tiers.nvme, tiers.remote
        self._catalog = catalog
        self._policies = policies
        self._moves = moves
        self._shared = shared
        self._commit = commit

    def reserve(
        self, key: str, nbytes: int, meta: ObjectMeta, *, tier: str | None = None,
        durable: bool | None = None, codec: str | None = None, pin: bool = False,
        ttl: float | None = None, owner: int | None = None, stage: bool = False,
    ) -> Reservation:
        """First phase: check everything and reserve a host staging extent (see :meth:`Engine.reserve`)."""
        ns = namespace_of(key)
        ns_cfg = self._config().namespace(ns)
        durable = ns_cfg.durable if durable is None else bool(durable)
        codec_name = get_codec(codec if codec is not None else ns_cfg.codec).name
        top = tier if tier is not None else (ns_cfg.tier or "host")  # checked before admission counts it
        if top == "gpu":  # handled above the store by GpuTierStore when the tier is on
            raise InvalidArgument("the gpu tier is off: it needs CUDA and [tiers.gpu] budget (or fraction); "
                                  "`tierd doctor` says which is missing")
        if top not in self.tiers:
            raise InvalidArgument(f"unknown tier {top!r}; choose one of {list(self.tiers)}")
        if ttl is not None and not ttl > 0:
            raise InvalidArgument(f"ttl must be > 0 seconds, got {ttl!r}")
        self._check_quotas(key, ns, ns_cfg.quota, owner, nbytes)

        def admit() -> bool:
            with self._catalog.lock:
                return self._policies.admit(ns, key, "host", nbytes)

        top = put_tier(tier, ns_cfg.tier, admit=admit, has_cxl=self.cxl is not None)
        rec = ObjectRecord(
            key=key, namespace=ns, meta=meta, nbytes=nbytes, codec=codec_name, durable=durable,
            pinned=pin, expires_at=None if ttl is None else time.time() + ttl, owner=owner,
        )
        staging = None
        if nbytes:
            staging = self._moves.alloc_host(nbytes, evict=staging_evicts(top, durable=durable, stage=stage))
        return Reservation(self, rec, top, staging)

    def _check_quotas(self, key: str, ns: str, ns_quota: int | None, owner: int | None, nbytes: int) -> None:
        uid_quota = self._config().daemon.uid_quota if owner is not None else None
        if ns_quota is None and uid_quota is None:
            return
        catalog = self._catalog
        with catalog.lock:
            old = catalog.index.get(key)
            old_bytes = old.nbytes if old is not None else 0
            ns_used = catalog.ns_used.get(ns, 0) - old_bytes
            owner_used = catalog.owner_used.get(owner, 0) - old_bytes
        if ns_quota is not None and ns_used + nbytes > ns_quota:
            raise QuotaExceeded(
                f"namespace {ns!r} would hold {ns_used + nbytes} bytes, over its quota of "
                f"{ns_quota}; delete objects or raise namespaces.{ns}.quota"
            )
        if uid_quota is not None and owner_used + nbytes > uid_quota:
            raise QuotaExceeded(
                f"uid {owner} would hold {owner_used + nbytes} bytes, over the per-uid quota of "
                f"{uid_quota}; delete objects or raise daemon.uid_quota"
            )

    def finish(self, res: Reservation, src: torch.Tensor | memoryview | None = None) -> None:
        """Second phase: store the bytes (``src``, or those already written to the staging extent) and
        commit. Returns when readable, and for durable objects once chunks and index entry are fsync'ed.

        Raises:
            OutOfSpace (nothing already stored is lost), MediaError.
        """
        (error,) = self.finish_many([(res, src)])
        if error is not None:
            raise error

    def finish_many(self, batch: list[tuple[Reservation, torch.Tensor | memoryview | None]]) -> list[TierdError | None]:
        """:meth:`finish` for many (taken) reservations: each writes its tiers, then all commit together
        (one LMDB transaction, one pass under the catalog's lock). A put that fails gets its error in the
        result (and stores nothing); the others are stored."""
        results: list[TierdError | None] = [None] * len(batch)
        written: list[tuple[int, Reservation, bool]] = []
        try:
            for i, (res, src) in enumerate(batch):
                try:
                    written.append((i, res, self._write(res, src)))
                except TierdError as exc:
                    results[i] = exc
        except BaseException:  # not a put's error (an interrupt): nothing of the batch stays written
            for _, res, _ in written:
                self._undo(res)
            raise
        if written:
            try:
                replaced = self._commit([res.rec for _, res, _ in written])
            except BaseException as exc:
                for i, res, _ in written:
                    self._undo(res)
                    if isinstance(exc, TierdError):
                        results[i] = exc
                if not isinstance(exc, TierdError):
                    raise
            else:
                for (_, res, keep), old in zip(written, replaced, strict=True):
                    self._installed(res, keep, old)
        if self._moves.over_high_watermark():
            self._moves.wake()
        return results

    def _write(self, res: Reservation, src: torch.Tensor | memoryview | None) -> bool:
        """Write the tiers placement names for ``res`` (all but its host copy); True: the staging extent
        becomes the host copy. On failure nothing is left written, and the error is raised."""
        rec, staging = res.rec, res.staging
        nbytes = rec.nbytes
        if (isinstance(src, torch.Tensor) and src.device.type != "cpu"
                and (staging is not None or not self.device_source_ok(res))):
            src = src.cpu()  # only nvme writes straight from device memory (Note [GPUDirect Storage])
        try:
            if staging is not None:
                if src is not None:
                    self.host.copy_in(staging, src)
            elif src is None and nbytes:
                raise InvalidArgument("the put needs the bytes: no staging extent was reserved")
            plan = plan_put(res.top, durable=rec.durable, staged=staging is not None, nbytes=nbytes,
                            has_cxl=self.cxl is not None, has_remote=self.remote is not None,
                            write_through=self._config().namespace(rec.namespace).write_through)
            # The bytes as a tensor only for a tier below host (a view costs microseconds).
            below = plan.remote_only or plan.try_cxl or plan.nvme != "never" or plan.write_through
            data = self._source(staging, src) if below else None
            if plan.remote_only:
                assert self.remote is not None  # "remote" is only a valid tier when configured
                assert data is not None
                rec.copies["remote"] = self.remote.write(data, codec=get_codec(rec.codec),
                                                         itemsize=rec.meta.itemsize, durable=False, key=rec.key)
            else:
                if plan.try_cxl:
                    assert data is not None
                    cxl_loc = self._moves.write_cxl(data, nbytes, evict=plan.cxl_evicts)
                    if cxl_loc is not None:
                        rec.copies["cxl"] = cxl_loc
                if plan.nvme == "always" or (plan.nvme == "if_no_cxl" and "cxl" not in rec.copies):
                    # Note [durability] in tiers/nvme.py: chunks fsync'ed here, then
                    # the LMDB entry committed in commit, then acknowledged.
                    assert data is not None
                    rec.copies["nvme"] = self._moves.write_nvme(data, rec, durable=rec.durable)
            if plan.write_through and self.remote is not None:
                assert data is not None
                try:
                    rec.copies["remote"] = self.remote.write(data, codec=get_codec(rec.codec),
                                                             itemsize=rec.meta.itemsize, durable=False,
                                                             key=rec.key)
                except TierdError as exc:  # the remote copy is a bonus: local tiers keep working
                    self.remote.failures.warning(log, "write-through of %r to the remote tier failed: %s",
                                                 user_key(rec.key), exc)  # throttled: once per interval
            if plan.keep_host and staging is not None:
                rec.copies["host"] = staging  # volatile: its home; durable: a cached copy
            return plan.keep_host
        except BaseException:
            self._undo(res)
            raise

    def _undo(self, res: Reservation) -> None:
        """Free what a put wrote before it failed (nothing indexes it) and its staging extent."""
        rec = res.rec
        rec.copies.pop("host", None)  # the staging extent, freed below
        for tier, loc in rec.copies.items():
            self.tiers[tier].free(loc)
        rec.copies.clear()
        if res.staging is not None:
            self.host.free(res.staging)
        res.staging = None

    def _installed(self, res: Reservation, keep: bool, replaced: ObjectRecord | None) -> None:
        """After the commit: the staging extent freed unless kept, the shared index told, counters."""
        rec = res.rec
        if res.staging is not None and not keep:
            self.host.free(res.staging)
        res.staging = None
        if "remote" in rec.copies:
            if self._shared is not None:
                self._shared.publish(rec)
        elif replaced is not None and "remote" in replaced.copies and self._shared is not None:
            self._shared.forget(rec.key)  # the old remote copy is gone
        with self._catalog.lock:
            for name in rec.copies:
                self._catalog.counters[name].bytes_in += rec.nbytes

    def _source(self, staging: HostLocation | None, src: torch.Tensor | memoryview | None) -> torch.Tensor:
        """A put's bytes as a flat uint8 tensor: the staging extent, or ``src``."""
        if staging is not None:
            # The staging extent is page-aligned: O_DIRECT writes go
            # straight from it (Note [O_DIRECT alignment] in tiers/nvme.py).
            return self.host.view(staging)
        if isinstance(src, memoryview):
            return writable_tensor(src)  # the tiers work on tensors
        return src if src is not None else torch.empty(0, dtype=torch.uint8)

    def device_source_ok(self, res: Reservation) -> bool:
        """Whether :meth:`finish` can store a CUDA source without staging it: straight to nvme by
        GPUDirect Storage (Note [GPUDirect Storage] in tiers/nvme.py), with no remote copy to write."""
        rec = res.rec
        return (self.nvme.gds and rec.codec == "none" and res.top != "remote"
                and not (self.remote is not None and self._config().namespace(rec.namespace).write_through))
