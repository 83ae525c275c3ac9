"""KV-cache policies: eviction that knows prefixes, admission that keeps one-shot blocks out.

A prefix cache's blocks form a forest: block ``i`` of a request is only
useful after blocks ``0..i-1`` (its parent chain), a shared system prompt is
the parent of many requests' blocks, and a session's history is a chain only
it extends. :class:`PrefixHints` holds what the cache says of each block
(``PrefixKVStore`` declares each request's chain, head first: parent and
depth) and what the stream shows of it (reads, the gap between its last two
reads, children), in a bounded table that doubles as the ghost of recently
seen keys. Time is counted in events (the namespace's reads and first
stores), so nothing here reads a clock.

Each new block gets a *kind* from its parent when it is first stored:

* ``root``: no parent (the first block of a request, or no hints at all);
* ``fresh``: the parent was never read either (a new document, a new
  session's first turn, block after block);
* ``continue``: the parent was read and has no other child (a session
  extending its own history: its next turn reads this block again);
* ``branch``: the parent was read and has other children (a new branch off a
  shared prefix such as a system prompt).

:class:`PrefixPolicy` (eviction ``"prefix"``) evicts the block expected back
last, per chance that it comes back at all and per byte, among a sample of
candidates (``O(samples)`` a victim, no sort):

* prefix-aware: only leaves are candidates, so a block whose children are
  cached in the tier stays until they are gone (a shared system prompt stays
  while anything below it stays; a chain is cut from its tail). Only if the
  caller skips every leaf (being read, moved, pinned) come the blocks above
  the skipped ones, tail upwards;
* the chance a block is read again is learned: per kind and reads so far (a
  session's block is read again as long as the session goes on; a document's
  never), or for a new block, its kind and depth band's reuse rate;
* when it comes back, two experts estimate: *recency* (as long as it has
  been idle, LRU's guess) and *rhythm* (its last read gap less its idle time:
  a user's think time repeats; overdue twice over, as recency). Which one
  decides is learned as LeCaR does (Vietri et al., HotStorage '18): a block
  read again soon after an expert evicted it costs that expert trust;
* cost-aware: ``depth_gain`` weighs a block by the recomputation it saves: a
  block at depth ``d`` is attention over ``d`` blocks (Marconi, PBKV,
  BatchLLM); 0.1 by default.

:class:`PrefixAdmission` (admission ``"prefix"``) keeps new blocks that are
not worth their room out of the fast tier; they go one tier down, where a
read still finds them (and promotes them: a block read twice is no longer
one-shot). While the tier has room without evicting, every block is
admitted. Then a block whose kind (and depth band) is read again at least
half the time is admitted. Below that, with the ``prefix`` eviction policy, a
block is admitted if it is expected back sooner (per chance, per byte) than
the worst of a sample of the tier's leaves, as TinyLFU asks of a candidate;
a block of a kind that is almost never read again (under 10 %) only if that
leaf is expected back 16 times later still: a tier with room to spare holds
old, unread leaves and takes it, a busy one does not. Without the prefix
eviction policy, below half is refused. A key seen before (a rewrite, a
block read already) is always admitted.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Sequence

from tierd.policies.base import AdmissionPolicy, EvictionPolicy

__all__ = ["PrefixHints", "PrefixPolicy", "PrefixAdmission", "KINDS"]

KINDS = ("root", "fresh", "continue", "branch")
_ROOT, _FRESH, _CONTINUE, _BRANCH = range(4)
_BANDS = 6  # depth bands for admission: 0, 1, 2-3, 4-7, 8-15, 16+
# A block of a kind read again less than PrefixAdmission.floor of the time displaces a leaf only if that
# leaf is expected back this many times later: in a tier with room to spare (old, unread leaves) it may.
_ONE_SHOT_MARGIN = 16.0


def _band(depth: int) -> int:
    return min(depth.bit_length(), _BANDS - 1)


def _kind(block: _Block | None) -> int:
    """The kind of a block's (kind, band) class; ``root`` before its first store."""
    return block.kind // _BANDS if block is not None and block.kind >= 0 else _ROOT


class _Block:
    __slots__ = ("parent", "pref", "depth", "children", "reads", "puts", "last", "gap", "kind", "counted", "done")

    def __init__(self, parent: str | None, depth: int, pref: _Block | None = None) -> None:
        self.parent = parent
        self.pref = pref  # the parent's entry this block is counted in (a re-made entry for the key is not it)
        self.depth = depth
        self.children = 0
        self.reads = 0
        self.puts = 0
        self.last = -1  # the read clock at its last read (or first store)
        self.gap = -1  # reads between its last two reads; -1: read at most once
        self.kind = -1  # (kind, band) of its first store through admission; -1: none
        self.counted = False  # whether a read again was counted for its kind
        self.done = False  # its chain was declared over and no other chain shares it: not expected back


class PrefixHints:
    """Each known block's parent, depth, children and reads, and how often each kind is read again.

    Entries are kept in recency order and the oldest are dropped beyond
    ``max_entries`` (a dropped key is simply unknown again: depth 0, no
    parent). Shared by a namespace's eviction and admission policies.
    """

    def __init__(self, *, max_entries: int = 1 << 18, window: int = 1 << 13) -> None:
        self.max_entries = max_entries
        self.window = window
        self._blocks: OrderedDict[str, _Block] = OrderedDict()
        self.clock = 0  # reads and first stores observed: the time of everything here
        self.dropped = 0
        # Per (kind, depth band): of the blocks stored whose fate is known, how many were read again,
        # decayed (recent blocks count most). A block's fate is known at its first read, or when it
        # has gone unread for ``horizon()`` reads. Every class starts at one read again of two.
        self.stored = [2.0] * (len(KINDS) * _BANDS)
        self.reused = [1.0] * (len(KINDS) * _BANDS)
        self._pending: list[tuple[int, int, _Block]] = []  # heap of (deadline, seq, block): fate unknown
        self._seq = 0
        self.typical_gap = 64.0  # events between two reads of a block (EWMA of what is seen)
        self.first_gap = [64.0] * len(KINDS)  # events from a block's store to its first read, per kind (EWMA)
        # Of the blocks read k times (k = 1, 2, 3+), how many were read again: decayed counts.
        self._read_k = [2.0] * (4 * len(KINDS))  # by (kind, reads)
        self._again_k = [1.0] * (4 * len(KINDS))

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: str) -> bool:
        return key in self._blocks

    def get(self, key: str) -> _Block | None:
        return self._blocks.get(key)

    # -- what the cache says -------------------------------------------------------

    def declare(self, keys: Sequence[str]) -> None:
        """``keys`` is one prefix chain, head first: each key's parent is the one before it."""
        parent: str | None = None
        for key in keys:
            self.link(key, parent).done = False  # a chain declared is live, whatever was finished in it
            parent = key

    def link(self, key: str, parent: str | None) -> _Block:
        """``key``'s parent is ``parent`` (``None``: a chain's head); its entry, now the most recent."""
        block = self._blocks.get(key)
        pblock = self._blocks.get(parent) if parent is not None else None
        depth = pblock.depth + 1 if pblock is not None else (1 if parent is not None else 0)
        if block is None:
            block = self._blocks[key] = _Block(parent, depth, pblock)
            if pblock is not None:
                pblock.children += 1
            self._trim()
            return block
        if block.parent != parent or block.pref is not pblock:  # another parent (or its entry re-made)
            self._unparent(block)
            if pblock is not None:
                pblock.children += 1
            block.parent, block.pref = parent, pblock
        block.depth = depth
        self._blocks.move_to_end(key)
        return block

    def finish(self, key: str) -> int:
        """The chain ending at ``key`` is over: it and the blocks above it that no other chain
        shares (up to the first with another child) are not expected back. How many were marked.

        Nothing is marked if another chain goes on from ``key`` itself."""
        block, marked = self._blocks.get(key), 0
        if block is not None and block.children:
            return 0
        while block is not None and not block.done and block.children <= 1:
            block.done = True
            marked += 1
            block = block.pref
        return marked

    def forget(self, key: str) -> None:
        """``key`` was deleted: it is no longer anyone's parent, and its fate no longer counts."""
        block = self._blocks.pop(key, None)
        if block is not None:
            self._unparent(block)
            block.counted = True

    # -- what the stream shows -------------------------------------------------------

    def touch(self, key: str) -> _Block:
        block = self._blocks.get(key)
        if block is None:
            block = self._blocks[key] = _Block(None, 0)
            self._trim()
        else:
            self._blocks.move_to_end(key)
        return block

    def read(self, key: str) -> _Block:
        """``key`` was read (from any tier): the clock ticks, its gap and its kind's reuse are counted."""
        block = self.touch(key)
        block.done = False  # back after all
        base = 4 * _kind(block)
        if block.reads:
            self._again_k[base + min(block.reads, 3)] += 1
        block.reads += 1
        k = base + min(block.reads, 3)
        self._read_k[k] += 1
        if self._read_k[k] > self.window:
            self._read_k[k] /= 2
            self._again_k[k] /= 2
        block.gap = self.clock - block.last if block.last >= 0 else -1
        if block.gap >= 0:
            self.typical_gap += (block.gap - self.typical_gap) / 256
            if block.reads == 1 and block.kind >= 0:
                k = _kind(block)
                self.first_gap[k] += (block.gap - self.first_gap[k]) / 64
        block.last = self.clock
        self.clock += 1
        if block.kind >= 0 and not block.counted:
            block.counted = True
            self._count(block.kind, 1.0)
        self._settle()
        return block

    def horizon(self) -> int:
        """Reads after which a stored block that was not read counts as one-shot."""
        # At most the table's size: one pending entry per event, so the queue stays within the bound too.
        return min(max(256, int(4 * self.typical_gap)), self.max_entries)

    def _count(self, cls: int, reused: float) -> None:
        self.stored[cls] += 1
        self.reused[cls] += reused
        if self.stored[cls] > self.window:
            self.stored[cls] /= 2
            self.reused[cls] /= 2

    def _settle(self) -> None:
        pending = self._pending
        while pending and pending[0][0] <= self.clock:
            _, _, block = heapq.heappop(pending)
            if not block.counted:
                block.counted = True
                self._count(block.kind, 0.0)

    def put(self, key: str) -> _Block:
        """``key`` is stored (the engine calls this before placing it); the first store gives its class."""
        block = self.touch(key)
        block.puts += 1
        block.done = False
        if block.kind >= 0:
            return block
        block.kind = self.kind(key) * _BANDS + _band(block.depth)
        parent = self._blocks.get(block.parent) if block.parent is not None else None
        if parent is not None and parent.gap >= 0 and self.clock - parent.last <= 1:
            block.gap = parent.gap  # extends a chain just read: expect the chain's rhythm
        block.last = self.clock
        self._seq += 1
        heapq.heappush(self._pending, (self.clock + self.horizon(), self._seq, block))
        self.clock += 1
        self._settle()
        return block

    def kind(self, key: str) -> int:
        """The kind of block ``key`` by its parent (see the module docstring)."""
        block = self._blocks.get(key)
        if block is None or block.parent is None:
            return _ROOT
        parent = self._blocks.get(block.parent)
        if parent is None or parent.reads == 0:
            return _FRESH
        return _CONTINUE if parent.children <= 1 else _BRANCH

    def read_again(self, block: _Block | None) -> float:
        """The chance ``block`` is read again: by its reads so far, or its kind's reuse rate if never read."""
        if block is None:
            return 0.5
        if block.reads:
            k = 4 * _kind(block) + min(block.reads, 3)
            return self._again_k[k] / self._read_k[k]
        if block.kind >= 0:
            return self.reuse_rate(block.kind)
        return 0.5

    def reuse_rate(self, cls: int) -> float:
        """Of the blocks of (kind, band) class ``cls`` stored lately, the share read again."""
        return self.reused[cls] / self.stored[cls]

    def _unparent(self, block: _Block) -> None:
        pref = block.pref
        if pref is not None and self._blocks.get(block.parent) is pref:  # type: ignore[arg-type]
            pref.children -= 1
        block.pref = None

    def _trim(self) -> None:
        while len(self._blocks) > self.max_entries:
            _, block = self._blocks.popitem(last=False)
            self.dropped += 1
            self._unparent(block)
            block.counted = True  # dropped unsettled: its fate is unknown, not "never read"


class PrefixAdmission(AdmissionPolicy):
    """Admits a new block to ``tier`` if blocks of its kind and depth band are read again often enough.

    Anything is admitted while the tier has room for it without evicting
    (``room``). Then a class read again at least ``threshold`` of the time is admitted; below,
    ``judge`` decides where there is one (the prefix eviction policy: is it
    worth more than what it would displace?), with a wide margin for a class
    read again less than ``floor`` of the time (one-shot blocks); else refused.
    A key seen before is always admitted.
    """

    def __init__(self, hints: PrefixHints | None = None, *, tier: str = "host", threshold: float = 0.5,
                 floor: float = 0.1, judge: Callable[[str, int, str, float], bool] | None = None,
                 room: Callable[[str, int], bool] | None = None) -> None:
        self.hints = hints if hints is not None else PrefixHints()
        self.tier = tier
        self.threshold = threshold
        self.floor = floor
        # Whether ``nbytes`` fit in the tier without evicting anything (the engine: under the low
        # watermark): then every block is admitted, as TinyLFU filters only a full cache.
        self.room = room
        # With the prefix eviction policy: whether a new block is worth more than what it would
        # displace (PrefixPolicy.worth_admitting), instead of a fixed threshold.
        self.judge = judge
        self.admitted = [0] * (len(KINDS) * _BANDS)
        self.refused = [0] * (len(KINDS) * _BANDS)

    def admit(self, key: str, tier: str, nbytes: int, now: float) -> bool:
        if tier != self.tier:
            return True
        block = self.hints.get(key)
        if block is None or block.kind < 0:  # the caller did not tell the hints of this put
            block = self.hints.put(key)
        if block.reads > 0 or block.puts > 1:
            return True  # seen before: a rewrite, or read already (the ghost)
        if self.room is not None and self.room(tier, nbytes):
            ok = True
        elif (rate := self.hints.reuse_rate(block.kind)) >= self.threshold or self.judge is None:
            ok = rate >= self.threshold
        else:  # if it is worth more than what it displaces; a one-shot kind, by a wide margin
            ok = self.judge(key, nbytes, tier, 1.0 if rate >= self.floor else _ONE_SHOT_MARGIN)
        (self.admitted if ok else self.refused)[block.kind] += 1
        return ok

    def table(self) -> list[dict[str, object]]:
        """Per kind and depth band with any traffic: reuse rate, admitted, refused."""
        rows = []
        for cls in range(len(self.admitted)):
            if self.admitted[cls] or self.refused[cls]:
                kind, band = divmod(cls, _BANDS)
                rows.append({"kind": KINDS[kind], "depth": f">= {(1 << band) >> 1}", "reuse": self.hints.reuse_rate(cls),
                             "admitted": self.admitted[cls], "refused": self.refused[cls]})
        return rows


_LEARNING_RATE = 0.45  # LeCaR's: how fast a regret moves trust between the experts


class _Tier:
    """One tier's blocks: leaves in an array (sampled), each block's size and parent."""

    __slots__ = ("meta", "kids", "leaves", "where", "weights", "chosen", "history")

    def __init__(self) -> None:
        self.meta: dict[str, list] = {}  # key -> [size, parent when inserted, last access (read clock)]
        self.kids: dict[str, int] = {}  # key -> its children in this tier (counted before it arrives too)
        self.leaves: list[str] = []
        self.where: dict[str, int] = {}  # leaf -> its index in leaves
        self.weights = [0.5, 0.5]  # trust in each expert (recency, rhythm)
        self.chosen: dict[str, int] = {}  # offered victims -> the expert that chose them
        self.history: OrderedDict[str, tuple[int, int]] = OrderedDict()  # evicted -> (expert, when)

    def add_leaf(self, key: str) -> None:
        if key not in self.where:
            self.where[key] = len(self.leaves)
            self.leaves.append(key)

    def drop_leaf(self, key: str) -> None:
        i = self.where.pop(key, None)
        if i is None:
            return
        last = self.leaves.pop()
        if last != key:
            self.leaves[i] = last
            self.where[last] = i


class PrefixPolicy(EvictionPolicy):
    """Prefix-aware eviction by predicted next read (see the module docstring)."""

    name = "prefix"

    def __init__(self, hints: PrefixHints | None = None, *, depth_gain: float = 0.1, samples: int = 32,
                 seed: int = 0) -> None:
        super().__init__()
        self.hints = hints if hints is not None else PrefixHints()
        self.depth_gain = depth_gain
        self.samples = samples
        self._rng = random.Random(seed)
        self._tiers: defaultdict[str, _Tier] = defaultdict(_Tier)

    def _on_insert(self, key: str, tier: str, nbytes: int, now: float) -> None:
        t = self._tiers[tier]
        if key in t.meta:
            self._on_remove(key, tier)
        regret = t.history.pop(key, None)
        if regret is not None:  # back soon after an expert evicted it: trust that expert less
            expert, at = regret
            n = max(len(t.meta), 16)
            t.weights[expert] *= math.exp(-_LEARNING_RATE * 0.005 ** ((self.hints.clock - at) / n))
            total = sum(t.weights)
            t.weights = [max(w / total, 0.01) for w in t.weights]
        block = self.hints.get(key)
        parent = block.parent if block is not None else None
        if parent is not None:
            t.kids[parent] = t.kids.get(parent, 0) + 1
            t.drop_leaf(parent)  # if it is here, it is no longer a leaf
        t.meta[key] = [nbytes, parent, self.hints.clock]
        if key not in t.kids:
            t.add_leaf(key)

    def experts(self, tier: str = "host") -> dict[str, float]:
        """How far each expert is trusted in ``tier`` (they sum to 1)."""
        t = self._tiers.get(tier)
        weights = t.weights if t is not None else [0.5, 0.5]
        return {"recency": weights[0], "rhythm": weights[1]}

    def _on_access(self, key: str, tier: str, now: float) -> None:
        m = self._tiers[tier].meta.get(key)
        if m is not None:
            m[2] = self.hints.clock

    def _on_remove(self, key: str, tier: str) -> None:
        t = self._tiers[tier]
        m = t.meta.pop(key, None)
        if m is None:
            return
        expert = t.chosen.pop(key, None)
        if expert is not None:
            t.history[key] = (expert, self.hints.clock)
            while len(t.history) > max(len(t.meta), 16):
                t.history.popitem(last=False)
        t.drop_leaf(key)
        parent = m[1]
        if parent is None:
            return
        left = t.kids[parent] - 1
        if left:
            t.kids[parent] = left
        else:
            del t.kids[parent]
            if parent in t.meta:  # a leaf again
                t.add_leaf(parent)

    def _score(self, key: str, m: list, expert: int) -> float:
        """Expected events until ``key`` is read again, per chance it is, times its size: the largest goes first.

        Expert 0 (recency) takes the time since the block's last use for it, expert 1
        (rhythm) the block's last read gap minus that time, and the time since the
        last use again once it is more than twice overdue.
        """
        hints = self.hints
        block = hints.get(key)
        if block is not None and block.done:
            return math.inf  # its chain is over: not expected back
        age = hints.clock - (block.last if block is not None and block.last >= 0 else m[2])
        gap = -1 if expert == 0 or block is None else self._rhythm(key, block)
        remaining = abs(gap - age) if 0 <= gap and age <= 2 * gap else age
        return self._cost(remaining, m[0], block)

    def _rhythm(self, key: str, block: _Block) -> float:
        """The rhythm expert's guess of ``key``'s read gap (-1: none): its last one."""
        return block.gap

    def _cost(self, remaining: float, nbytes: int, block: _Block | None) -> float:
        """What keeping a block costs: events until it is back, per chance it comes back, times its size,
        less for a deep block (it saves more recomputation)."""
        cost = (remaining + 1) * nbytes / max(self.hints.read_again(block), 1e-3)
        if self.depth_gain and block is not None:
            cost /= 1 + self.depth_gain * block.depth
        return cost

    def worth_admitting(self, key: str, nbytes: int, tier: str, margin: float = 1.0) -> bool:
        """Whether new block ``key`` is expected back sooner (per byte, per chance) than the worst of a
        sample of ``tier``'s leaves: what TinyLFU asks of a candidate, in this policy's own terms.

        A new block's time to its first read is its kind's typical one; a tier with
        room to spare holds old, unread leaves, so it admits nearly everything.
        """
        t = self._tiers[tier]
        leaves = t.leaves
        if not leaves:
            return True  # empty: nothing to displace
        block = self.hints.get(key)
        mine = self._cost(self.hints.first_gap[_kind(block)], nbytes, block)
        expert = 0 if t.weights[0] >= t.weights[1] else 1
        worst = max(self._score(k, t.meta[k], expert) for k in self._sample(leaves))
        return mine * margin < worst

    def _sample(self, leaves: list[str]) -> Iterator[str] | list[str]:
        """``samples`` leaves at random (with replacement), or every leaf if there are no more."""
        n = len(leaves)
        if n <= self.samples:
            return leaves
        rng = self._rng
        return (leaves[int(rng.random() * n)] for _ in range(self.samples))

    def _candidates(self, tier: str, need_bytes: int, now: float) -> Iterator[str]:
        t = self._tiers[tier]
        offered: set[str] = set()
        leaves, rng = t.leaves, self._rng
        if len(t.chosen) > 4096:
            t.chosen.clear()  # offered long ago and never removed
        while leaves and len(offered) < len(t.meta):
            expert = 0 if rng.random() < t.weights[0] else 1
            best, best_s = None, -1.0
            for key in self._sample(leaves):
                if key not in offered:
                    sc = self._score(key, t.meta[key], expert)
                    if sc > best_s:
                        best, best_s = key, sc
            if best is None:
                break  # the samples found only what the caller skipped
            offered.add(best)
            if best_s < math.inf:  # a finished block goes by its hint, not by this expert's judgement
                t.chosen[best] = expert
            yield best
        # The caller skipped what the samples found (being read or moved, pinned): the other leaves,
        # then the blocks above what was skipped, tail upwards (never a head before its chain), then
        # anything left (blocks whose parents form a cycle). No sort: a scan at worst.
        for key in list(leaves):
            if key not in offered:
                offered.add(key)
                yield key
        frontier = list(offered)
        while frontier:
            above = []
            for key in frontier:
                m = t.meta.get(key)
                parent = m[1] if m is not None else None
                if parent is not None and parent in t.meta and parent not in offered:
                    offered.add(parent)
                    above.append(parent)
                    yield parent
            frontier = above
        for key in list(t.meta):
            if key not in offered:
                offered.add(key)
                yield key
