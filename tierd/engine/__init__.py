"""The engine: the object index, placement, movement between tiers, leases and durability.

The library's core: ``tierd.open()`` runs it inside the calling process and
``tierd serve`` runs it behind the daemon's socket. It depends on ``tiers/``
and ``policies/``, never on ``daemon/`` or ``clients/``.
"""

from tierd.engine.core import Engine
from tierd.engine.handles import Lease, Reservation
from tierd.engine.index import ObjectMeta, ObjectRecord
from tierd.engine.keys import validate_key

__all__ = ["Engine", "Lease", "ObjectMeta", "ObjectRecord", "Reservation", "validate_key"]
