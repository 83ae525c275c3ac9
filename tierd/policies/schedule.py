"""Access schedules: declared by the caller or learned, and the policies that use them.

Training repeats the same access order every step. :class:`Schedule` learns
one iteration of it (or takes a declared one), follows where the stream is
in it, and re-learns when the stream stops matching, so a wrong schedule
costs hits for a while but never wedges anything.

Learning: when a key recurs after ``p`` accesses (counting back over its
last few occurrences), ``p`` is a candidate period; it is believed once the
last 16 accesses repeat the ones ``p`` before them, wherever in the stream
that happens (so a random stretch does not stop a later cycle from being
learned). A key that occurs twice in one iteration (an activation put in
forward and read in backward) gives short candidates that the check rejects.
An order that turns out wrong (dropped after ``relearn_after`` accesses off
it) doubles the accesses the next one must repeat (up to 1024), and a whole
iteration followed in step brings it back to 16: a stream that only looks
cyclic for moments (a conversation's turns over its own prefix) stops
installing orders that every eviction would then have to plan with.

The first pass: the period is learned one iteration and 16 accesses in, but
what the cache keeps during that first iteration decides the next one's hits
(LRU keeps the step's tail, which the next step needs last). So until an
order is installed, the schedule guesses that the stream so far is the first
iteration of a cycle still going on: each key is next used one period after
its first access, and a period not over after ``n`` accesses is guessed as
``2n`` (its median when nothing says where in it we are; only the ranking
between sizes depends on it). Evicting on that guess keeps a step's head, as
Belady would. One exception: a key used in the last ``_RECENT`` (4) accesses
is guessed as LRU would, next used as soon as it was last used ago, so a
read is not evicted before its write-back (the optimizer reads a
parameter's m and v, then writes them back; a key stream cannot tell that
from a read and a re-read).

The guess ends for good at the first installed (or declared) order, or when
a key occurs a fifth time before any order was (a hot key of a non-cyclic
stream, such as a shared KV prefix; a cycle that re-reads a key that often
within one step just goes without the guess), or when the recording is
trimmed, or when it keeps being wrong: :class:`ScheduleEviction` counts the
keys it evicted on the guess that are accessed again while the guess lasts
(regrets), and ends it after more than ``_REGRETS`` (32). Were the stream a
cycle's first pass, an evicted key (out of the recent window) would not come
back before the cycle repeats, and then the order is installed at the 16th
access of the second pass (the ``2p``-th for periods ``p`` under 8), so at
most 15 come back first; 32 leaves about as many again for keys a cycle
re-reads within its step (an activation put in forward and read in
backward). A cycle that re-reads more than that within a step goes on as
LRU (on the activations trace, as many hits: Belady keeps the forward's
tail too). A stream whose keys are re-read a few times soon after their
first access (no key hot, nothing cyclic) thus costs about 32 re-reads that
LRU would have hit, then runs as LRU. After the guess, no order means LRU
as before; the guess is never made again after an order is dropped.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Sequence

from tierd.policies.base import PrefetchPolicy
from tierd.policies.farthest import FarthestFirst
from tierd.policies.lru import LRUPolicy

__all__ = ["Schedule", "ScheduleEviction", "SchedulePrefetch"]

_CONFIRM = 16  # accesses that must repeat before a period is believed (the first time)
_MAX_CONFIRM = 1024  # after each order that turned out wrong, twice as many, up to this
_OCCURRENCES = 4  # of each key, remembered while learning
_MAX_RECORD = 1 << 18  # accesses kept while learning; periods up to half of it are learnable
# The first pass's guess ends when more of the keys it evicted come back while it lasts than this:
# a cycle's second pass brings back at most _CONFIRM - 1 before its order is installed, and as many
# again are left for keys a cycle re-reads within its step (see the module docstring).
_REGRETS = 2 * _CONFIRM
_RECENT = 4  # while guessing, a key used in the last 4 accesses is guessed as LRU would (read, then write-back)


class Schedule:
    """A cyclic access order and the stream's position in it."""

    def __init__(self, *, relearn_after: int = 16) -> None:
        self.order: list[str] = []
        self.cyclic = True
        self.declared = False
        self.cursor = 0  # index in ``order`` of the next expected access
        self.clock = 0  # accesses observed while following (absolute positions)
        self.relearns = 0
        self._positions: dict[str, list[int]] = {}
        self._recording: list[str] = []
        self._last_seen: dict[str, list[int]] = {}
        self._misses = 0
        self._in_step = 0  # consecutive accesses at their expected position
        self._confirm = _CONFIRM
        self._relearn_after = relearn_after
        # The stream's first pass (see the module docstring): where each key first occurred in it,
        # while no order has been installed and nothing has ruled the guess out.
        self._first: dict[str, int] | None = {}
        # Bumped when the order itself changes (learned, declared, dropped): every distance is new.
        self.epoch = 0
        self._listeners: list[Callable[[str, int, int | None], None]] = []

    def listen(self, callback: Callable[[str, int, int | None], None]) -> None:
        """Call ``callback(key, before, moved)`` after each access is observed while following:
        the cursor was at ``before`` and advanced ``moved`` positions (1 in step, 0 for a key the
        order does not know, more after a resync); ``moved`` is None when the order changed
        (see :attr:`epoch`) or while learning, and 0 during the first pass's guess (every
        guessed distance grows by one, except the accessed key's and :meth:`aged`'s)."""
        self._listeners.append(callback)

    @property
    def active(self) -> bool:
        """Whether there is a schedule to plan with (learned or declared, and matching), or the
        first pass's guess (:attr:`guessing`)."""
        return bool(self.order) or self._first is not None

    @property
    def guessing(self) -> bool:
        """Whether distances are the first pass's guess: nothing learned yet, and the stream so far
        may be the first iteration of a cycle."""
        return not self.order and self._first is not None

    def stop_guessing(self) -> None:
        """End the first pass's guess for good (no order: LRU); :class:`ScheduleEviction` does when
        the keys it evicted on the guess keep coming back."""
        if self._first is not None:
            self._first = None
            self.epoch += 1

    def declare(self, keys: Sequence[str], *, cyclic: bool = True) -> None:
        self._install(list(keys), cursor=0)
        self.cyclic = cyclic
        self.declared = True

    def _install(self, order: list[str], cursor: int) -> None:
        self._first = None
        self.epoch += 1
        self.order = order
        self._positions = {}
        for i, key in enumerate(order):
            self._positions.setdefault(key, []).append(i)
        self.cursor = cursor % len(order) if order else 0
        self._recording = []
        self._last_seen = {}
        self._misses = 0

    def _relearn(self) -> None:
        self.epoch += 1
        self.order = []
        self._positions = {}
        self.declared = False
        self._recording = []
        self._last_seen = {}
        self._misses = 0
        self.relearns += 1

    def observe(self, key: str) -> None:
        """One access of ``key`` happened."""
        before, moved = self.cursor, None
        if self.order:
            epoch = self.epoch
            self._follow(key)
            if self.order and self.epoch == epoch:
                moved = (self.cursor - before) % len(self.order)
        else:
            epoch = self.epoch
            self._learn(key)
            if self.guessing and self.epoch == epoch:
                moved = 0  # nothing comes nearer: every guessed distance grows by one (see distance)
        for callback in self._listeners:
            callback(key, before, moved)

    def _follow(self, key: str) -> None:
        n = len(self.order)
        self.clock += 1
        if self.order[self.cursor] == key:
            self.cursor = (self.cursor + 1) % n
            self._misses = 0
            self._in_step += 1
            if self._in_step >= n:  # a whole iteration in step: the order is right, trust the next one soon
                self._confirm = _CONFIRM
            return
        self._in_step = 0
        # Off the expected position: resynchronise at the key's next occurrence.
        nxt = self._next_index(key)
        if nxt is not None:
            self.cursor = (nxt + 1) % n
        self._misses += 1
        if self._misses >= self._relearn_after:
            # Wrong: the next order must repeat for longer before it is believed. A stream that
            # only looks cyclic for a moment (a conversation's turns) stops installing orders.
            self._confirm = min(2 * self._confirm, _MAX_CONFIRM)
            self._relearn()
            self._learn(key)

    def _learn(self, key: str) -> None:
        rec = self._recording
        i = len(rec)
        rec.append(key)
        seen = self._last_seen.setdefault(key, [])
        if self._first is not None:
            if len(seen) >= _OCCURRENCES:
                # A key this hot before any order was learned: not one iteration of a cycle (or
                # one that re-reads keys more than the learner tracks); plan without a guess (LRU).
                self.stop_guessing()
            else:
                self._first.setdefault(key, i)
        # A key may occur several times per iteration (put in forward, get in
        # backward): the period is the distance to one of its last occurrences.
        for last in reversed(seen):
            p = i - last
            # Believed once the last 16 accesses repeat the ones p earlier (two
            # whole repetitions for periods under 16), wherever in the stream: one
            # iteration plus a little is enough to start planning, and a wrong
            # belief is dropped after relearn_after mismatches.
            span = self._confirm if p >= self._confirm else min(2 * p, self._confirm)
            if len(rec) >= span + p and rec[-span:] == rec[-span - p : -p]:
                self._install(rec[-p:], cursor=0)
                return
        seen.append(i)
        if len(seen) > _OCCURRENCES:
            del seen[0]
        if len(rec) > _MAX_RECORD:
            # Keep the recent half: a period longer than that is not learnable here (nor guessed).
            self.stop_guessing()
            keep = rec[-(_MAX_RECORD // 2) :]
            self._recording = keep
            self._last_seen = {}
            for j, k in enumerate(keep):
                self._last_seen.setdefault(k, []).append(j)
                del self._last_seen[k][:-_OCCURRENCES]

    def _next_index(self, key: str) -> int | None:
        positions = self._positions.get(key)
        if not positions:
            return None
        i = bisect.bisect_left(positions, self.cursor)
        if i < len(positions):
            return positions[i]
        return positions[0] if self.cyclic else None

    def distance(self, key: str) -> float:
        """Accesses from the latest one until ``key`` is next used (1 = the next access); inf if unknown."""
        if not self.order:
            first = self._first.get(key) if self._first is not None else None
            if first is None:
                return math.inf
            n = len(self._recording)
            ago = n - 1 - self._last_seen[key][-1]
            if ago < _RECENT:
                # Used in the last few accesses: maybe again soon (a read before its write-back);
                # as LRU ranks it, as soon as it was used ago.
                return ago + 1
            # The first pass: next used one period after its first access, and the period, not
            # over after n accesses, is guessed as 2n (the median, knowing nothing of where in it
            # we are). From the latest access (n - 1): first + 2n - (n - 1).
            return first + n + 1
        nxt = self._next_index(key)
        if nxt is None:
            return math.inf
        return ((nxt - self.cursor) % len(self.order) if self.cyclic else nxt - self.cursor) + 1

    def aged(self) -> str | None:
        """While guessing: the key whose guessed distance the latest access changed other than its
        own (it was used ``_RECENT`` accesses ago and not since: see :meth:`distance`), or None."""
        if not self.guessing:
            return None
        rec = self._recording
        i = len(rec) - 1 - _RECENT
        if i < 0 or self._last_seen[rec[i]][-1] != i:
            return None
        return rec[i]

    def upcoming(self, k: int) -> list[str]:
        """The next ``k`` distinct keys the schedule expects."""
        out: list[str] = []
        n = len(self.order)
        for i in range(min(n, 4 * k + 8)):
            if not self.cyclic and self.cursor + i >= n:
                break
            key = self.order[(self.cursor + i) % n]
            if key not in out:
                out.append(key)
                if len(out) == k:
                    break
        return out


class ScheduleEviction(LRUPolicy):
    """Belady on the schedule: evict the object whose next use is farthest away
    (size-weighted: ``distance x size``, so mixed sizes do not silt the tier up
    with large objects).

    Objects the schedule does not know go first (least recently used first);
    during the first pass it plans with the schedule's guess (see the module
    docstring), and with no schedule and no guess it is LRU.

    The guess's feedback: a key offered as a victim while guessing and then
    removed from that tier before it is touched again counts as evicted on the
    guess (one the caller skipped and then read or rewrote stays a kept key;
    one it skipped and then deleted is taken for evicted, which matters only
    if it is put again while the guess lasts). The first access to such a key
    while the guess lasts is a regret; more than ``_REGRETS`` end the guess
    for good (:meth:`Schedule.stop_guessing`). The policy sees keys, not
    operations, so a write-back of an evicted key counts as much as a read of
    it: the recent window (see :meth:`Schedule.distance`) is what keeps the
    optimizer's reads from being evicted before their write-backs. The
    bookkeeping is ``O(1)`` a victim and an access, and holds at most the
    tier's objects and the keys evicted while the guess lasts.

    Each tier's objects sit in a :class:`FarthestFirst` by their next use on
    the schedule's clock (``clock + distance``), so a victim costs
    ``O(sizes + log n)``, not a sort. Following the schedule changes no key's
    next use except the one just accessed. A resync (the cursor jumps ``d``
    positions) moves every next use by the same ``1 - d`` (kept as one
    per-tier shift) except for the keys at the skipped positions, which are
    set again: ``O(d)``, or a rebuild when ``d`` exceeds the tier's objects.
    During the first pass every guessed distance grows by one per access (the
    same shift, ``moved = 0``) but the accessed key's and that of the key that
    just left the recent window (:meth:`Schedule.aged`), which are set again.
    A new order (``Schedule.epoch``) rebuilds at the next eviction.
    """

    name = "schedule"

    def __init__(self, schedule: Schedule | None = None) -> None:
        super().__init__()
        self.schedule = schedule or Schedule()
        self.schedule.listen(self._observed)
        self._size: dict[tuple[str, str], int] = {}
        self._recency: dict[tuple[str, str], int] = {}  # LRU order: ties go to the least recent
        self._tick = 0
        self._ff: dict[str, FarthestFirst] = {}
        self._built: dict[str, int] = {}  # tier -> the schedule epoch its entries were made in
        self._shift: dict[str, float] = {}  # tier -> true next use minus the stored one
        self.rebuilds = 0
        # The guess's feedback (see the class docstring): victims offered while guessing, until
        # removed (evicted) or touched (kept); the keys it evicted, until they come back (regrets).
        self._offered: set[tuple[str, str]] = set()
        self._evicted: set[str] = set()
        self.regrets = 0

    def _fresh(self, tier: str) -> FarthestFirst | None:
        ff = self._ff.get(tier)
        return ff if ff is not None and self._built.get(tier) == self.schedule.epoch else None

    def _track(self, key: str, tier: str, ff: FarthestFirst) -> None:
        next_use = self.schedule.clock + self.schedule.distance(key) - self._shift[tier]
        ff.set(key, self._size[(tier, key)], next_use, self._recency[(tier, key)])

    def _touch(self, key: str, tier: str) -> None:
        if self._offered:
            self._offered.discard((tier, key))  # offered but kept (the caller skipped it): not evicted
        self._tick += 1
        self._recency[(tier, key)] = self._tick
        ff = self._fresh(tier)
        if ff is not None:
            self._track(key, tier, ff)

    def _on_insert(self, key: str, tier: str, nbytes: int, now: float) -> None:
        super()._on_insert(key, tier, nbytes, now)
        self._size[(tier, key)] = max(nbytes, 1)
        self._touch(key, tier)

    def _on_access(self, key: str, tier: str, now: float) -> None:
        super()._on_access(key, tier, now)
        if (tier, key) in self._size:
            self._touch(key, tier)

    def _on_remove(self, key: str, tier: str) -> None:
        super()._on_remove(key, tier)
        if self._offered and (tier, key) in self._offered:
            self._offered.discard((tier, key))
            if self.schedule.guessing:
                self._evicted.add(key)
        self._size.pop((tier, key), None)
        self._recency.pop((tier, key), None)
        ff = self._ff.get(tier)
        if ff is not None:
            ff.discard(key)

    def _observed(self, key: str, before: int, moved: int | None) -> None:
        """The schedule saw ``key``; its cursor moved ``moved`` positions from ``before``."""
        if self._evicted or self._offered:
            self._feedback(key)
        if moved is None:
            return  # a new order or none: rebuilt at the next eviction
        order = self.schedule.order
        aged = self.schedule.aged() if moved == 0 and self.schedule.guessing else None
        for tier, ff in self._ff.items():
            if self._fresh(tier) is None:
                continue
            self._shift[tier] += 1 - moved
            if moved > 4 * len(ff) + 16:
                self._built[tier] = -1  # cheaper to rebuild than to walk the skipped stretch
                continue
            for i in range(moved):
                k = order[(before + i) % len(order)]
                if (tier, k) in self._size:
                    self._track(k, tier, ff)
            if (tier, key) in self._size:
                self._track(key, tier, ff)
            if aged is not None and (tier, aged) in self._size:
                self._track(aged, tier, ff)

    def _feedback(self, key: str) -> None:
        """``key`` was accessed: a regret if the guess evicted it (see the class docstring)."""
        if not self.schedule.guessing:  # over (an order, or ruled out): nothing more to judge
            self._offered.clear()
            self._evicted.clear()
            return
        if key not in self._evicted:
            return
        self._evicted.discard(key)
        self.regrets += 1
        if self.regrets > _REGRETS:
            self.schedule.stop_guessing()
            self._offered.clear()
            self._evicted.clear()

    def _rebuild(self, tier: str) -> FarthestFirst:
        self.rebuilds += 1
        ff = FarthestFirst()
        self._ff[tier], self._built[tier], self._shift[tier] = ff, self.schedule.epoch, 0.0
        for key in self._tier(tier):
            self._track(key, tier, ff)
        return ff

    def _candidates(self, tier: str, need_bytes: int, now: float) -> Iterator[str]:
        if not self.schedule.active:
            yield from super()._candidates(tier, need_bytes, now)
            return
        if not self.schedule.guessing:
            yield from self._ranked(tier)
            return
        for key in self._ranked(tier):  # the guess: what it offers is remembered
            self._offered.add((tier, key))  # evicted if removed before it is touched again
            yield key

    def _ranked(self, tier: str) -> Iterator[str]:
        """Every key of ``tier``, farthest next use (times size) first."""
        ff = self._fresh(tier)
        if ff is None:
            ff = self._rebuild(tier)
        # (true next use - clock) x size = distance x size
        yield from ff.farthest(self.schedule.clock - self._shift[tier])

    def declare_schedule(self, keys: Sequence[str], *, cyclic: bool = True) -> None:
        self.schedule.declare(keys, cyclic=cyclic)


class SchedulePrefetch(PrefetchPolicy):
    """Bring up the next ``depth`` keys of the schedule after every access."""

    name = "schedule"

    def __init__(self, schedule: Schedule | None = None, *, depth: int = 2) -> None:
        self.schedule = schedule or Schedule()
        self.depth = depth

    def on_access(self, key: str, now: float) -> list[str]:
        return self.schedule.upcoming(self.depth) if self.schedule.active else []

    def declare_schedule(self, keys: Sequence[str], *, cyclic: bool = True) -> None:
        self.schedule.declare(keys, cyclic=cyclic)
