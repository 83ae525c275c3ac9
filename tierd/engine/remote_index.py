"""The remote tier's shared index: how stores on other machines find an object.

Next to each object's chunks, the remote tier keeps one entry per key
(``<prefix>:{<tag>}:idx:<key>``, in the same hash slot as the chunks of the
key's objects: Note [remote tier on a cluster] in tiers/remote.py): the
object's meta, size, codec and remote location. A store that misses a key
locally looks it up there and adopts the object (it reads the same
chunks); a store that deletes or replaces an object that had a remote copy
drops its entry. Failures are never fatal for the local store: the remote
copy and its entry are a bonus, so they are logged, at most once per
interval for the whole tier (:class:`~tierd.tiers.remote.FailureLog`).

Entries written before the key's tag was part of the index key
(``<prefix>:idx:<key>``) are not looked up: the remote tier is a cache, and
they are misses until Redis drops them (TTL, maxmemory) or they are deleted.
"""

from __future__ import annotations

import logging

import msgspec

from tierd.engine.index import ObjectMeta, ObjectRecord
from tierd.engine.keys import user_key
from tierd.errors import TierdError
from tierd.tiers.remote import RemoteLocation, RemoteTier

__all__ = ["RemoteEntry", "RemoteIndex"]

log = logging.getLogger("tierd.engine.remote_index")


class RemoteEntry(msgspec.Struct, frozen=True, array_like=True):
    """The remote index's value: enough for another store to read the object."""

    meta: ObjectMeta
    nbytes: int
    codec: str
    location: RemoteLocation


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(RemoteEntry)


class RemoteIndex:
    """The shared index of ``remote``; network I/O, so never called under the engine's lock."""

    def __init__(self, remote: RemoteTier) -> None:
        self.remote = remote

    def publish(self, rec: ObjectRecord) -> None:
        """Describe ``rec``'s remote copy (other stores adopt it from here); logged if it fails."""
        loc = rec.on("remote")
        if loc is None:
            return
        try:
            self.remote.index_put(rec.key, _encoder.encode(RemoteEntry(rec.meta, rec.nbytes, rec.codec, loc)))
        except TierdError as exc:
            self.remote.failures.warning(log, "remote index update for %r failed: %s", user_key(rec.key), exc)

    def lookup(self, key: str) -> RemoteEntry | None:
        """``key``'s entry, or None (absent, or an entry that does not decode: logged).

        Raises:
            TierdError: the server cannot be reached.
        """
        raw = self.remote.index_get(key)
        if raw is None:
            return None
        try:
            return _decoder.decode(raw)
        except msgspec.DecodeError:
            log.error("remote index entry for %r does not decode; ignored", user_key(key))
            return None

    def forget(self, key: str) -> None:
        """Drop ``key``'s entry: its remote copy is gone or stale (logged if the server is away)."""
        self.remote.index_delete(key)
