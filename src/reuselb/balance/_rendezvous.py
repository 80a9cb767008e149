"""Weighted rendezvous (highest random weight) hashing, tabulated or exact.

Rules of this module: pure (no I/O), stdlib only, deterministic everywhere: every
random choice is read from SHAKE-128 (:meth:`KeyHasher.node_bytes`), never from
``hash()``. Ties are broken by what each node brings alone (a tie score per node
and bucket in the table, then ``hash_id`` order), never by the other nodes, so
removing a node never changes the winner among the remaining ones.

*Tabulated* (default, ``table_size=2**19``): a key goes to bucket
``hash32(key) % table_size`` and each bucket has one owner, so a pick is O(1) and
lock-free. Each bucket has a fixed *preference order* over all possible nodes, and
its owner is the first live node in it, so removing a node moves exactly the
buckets (keys) that were on it, as in HRW. The order is that of weighted HRW with
"arrival times" quantised into levels (see :func:`_tabulate`); it is built node by
node from bitmaps (Python ints) so that a million buckets cost C-speed bulk
operations, not a million Python steps per node. A node's arrivals are a few
shared random bit sets rotated per node, so the bucket shares carry some noise,
which grows with the total weight (see :class:`RendezvousHash`).

*Exact* (``table_size=None``): every pick scores every live node, O(N); balance
is that of the keys themselves.
"""

from __future__ import annotations

import bisect
import itertools
import sys
import zlib
from array import array
from collections.abc import Iterable, Iterator
from decimal import Decimal
from fractions import Fraction
from typing import Any, TypeAlias

from .._errors import InvalidArgument
from ._base import MAX_TABLE_SIZE, HashPolicy, Key, KeyHasher, Node, NodeLike
from ._base import words as _words

__all__ = ["DEFAULT_BUCKETS", "RendezvousHash"]

# What a rendezvous pick reads: (ranked, owners, nodes); see RendezvousHash.__init__.
_Snapshot: TypeAlias = "tuple[tuple[tuple[Node, int], ...], bytes | array[int], tuple[Node, ...]]"
# What _tabulate reads per (offset row, group): offsets, node order, any shared offset.
_Layout: TypeAlias = "tuple[list[int], list[int], bool]"

#: Buckets of the tabulated mode by default: 2**19 keeps the bucket-count noise
#: (about sqrt(N / table_size) per node with many nodes; several percent with 2-10
#: nodes, see docs/policies/hashing.md "Few nodes") under the keys' own noise.
DEFAULT_BUCKETS = 1 << 19
_M64 = (1 << 64) - 1

# Buckets are split into groups of at most 2**17 bits: each group has its own
# random offsets per node, which averages the tie-break bias over more draws.
_GROUP_BITS = 17
# Levels run from q = 2**-top arrivals per weight unit and bucket down to q = 1,
# top = log2(table_size) - _TOP_BELOW: the top level then holds about
# W * 256 / table_size arrivals per bucket (W = total weight; 0.05 for 100 nodes
# of weight 1 at 2**19, but ~49 for 100 nodes of weight 1000). Ties within a level
# go by position, not weight, so the sub-levels below order the top level's ties.
# (A deeper top level would do as well, but it changes every table; the
# sub-levels change only buckets where several nodes arrive at the top level.)
_TOP_BELOW = 8
# Sub-levels above the top one: level top + k holds the top level's arrivals
# thinned by k more random halvings (``bits(g, top) & S_1 & ... & S_k``), at the
# top level's offsets. A bucket's first candidates are then those of its deepest
# sub-level, so however many arrivals the top level gets (a total weight of 10**5
# puts ~49 per bucket there), few of them tie, and a heavy node with several
# arrivals at a bucket has several chances at depth, as in weighted HRW. The
# levels are nested (same offsets, subsets), so a bucket that the top level gives
# to one node alone keeps that owner: only buckets where several nodes arrived at
# the top level are ordered by depth before position. They stop where no unit
# position is that deep (~8 levels: the top level has 256 unit positions in all).
_SUB_MAX = 40
# Unit pools with q >= 2**-(_E_SPARSE - 1) are ANDs of random bitmaps; sparser
# ones are lists of random positions (too few points to pay for bitmaps).
_E_SPARSE = 8
# A level whose pools are all sparse and whose expected candidates (arrivals over
# all nodes and buckets) are at most this many is resolved point by point.
_SPARSE_MAX = 1 << 13
# When at most this many buckets are still empty, they are resolved one by one.
_TAIL_MAX = 64
# Tie scores: two nodes whose offsets are equal in a group (and offset row) have the
# same arrivals there (the lighter one's units), so they tie at equal d wherever both
# arrive. Index order gave all such buckets to the lower index, and the other node
# lost nearly every bucket those levels decide in that group (birthdays among 2**17
# offsets: a table of 1,000 nodes has ~15 such pairs at the first level). Ties now go
# by a per-(node, bucket) score of up to this many bits, read from shared random bit
# sets at the node's own tie offset, then by index: each keeps about half. Only the
# leading bits that some tie still needs are read.
_TIE_BITS = 32
# Rotations: rot[g][k] doubles weight 2**(k-1) pools into 2**k ones (unit i of a
# node sits at rot[g][_BITS] plus rot[g][j + 1] for each set bit j of i; see
# _Pools._unit_blocks). Node weights stop at MAX_WEIGHT (1000, 10 bits); _BITS
# stays 48 because the rotations are read at offsets that depend on it, and
# changing them would change every table.
_BITS = 48
_MAX_WEIGHT = (1 << _BITS) - 1
_UNITS = 2 * _BITS


def _mix64(z: int) -> int:
    # splitmix64's finaliser: every input bit affects every output bit.
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _pool_label(kind: str, group: int, e: int) -> str:
    # NUL cannot start an address and is not a sensible node name: the streams of
    # the pools do not collide with the streams of the nodes.
    return f"\x00rendezvous:{kind}:{group}:{e}"


class _Pools:
    """Membership-independent random bit sets, one per (group, level exponent).

    The unit pool ``(g, e)`` holds each bucket of group ``g`` with probability
    about ``2**-e``. A node's arrivals at a level are a pool rotated by the node's
    own offset, so they depend on the node and the seed only, never on the others.
    The tie planes ``(g, i)`` (:meth:`tie_bits`) hold bit *i* of every bucket's tie
    scores, read at each node's tie offset. Built lazily and kept for the policy's
    lifetime (they do not change with membership).
    """

    def __init__(self, hasher: KeyHasher, size: int, groups: int) -> None:
        self.hasher = hasher
        self.top = max(1, size.bit_length() - 1 - _TOP_BELOW)
        self.m = size // groups
        self.groups = groups
        self.full = (1 << self.m) - 1
        #: A node's words (SHAKE-128 of its identity, 32 bits each): its offset in
        #: group g for offset row r at ``r * groups + g``, its tie offset in group g
        #: at ``tie_base + g`` (after the rows, so the offsets are those of the
        #: versions that had no tie offsets: SHAKE's output is a prefix-stable stream).
        self.tie_base = (self.top + 1) * groups
        self._rand: dict[tuple[int, int], int] = {}
        self._tie: dict[tuple[int, int], tuple[int, bytes]] = {}
        self._bits: dict[tuple[int, ...], int] = {}
        self._pos: dict[tuple[int, ...], list[int]] = {}
        rot = _words(hasher.node_bytes(_pool_label("rot", 0, 0), 4 * groups * _UNITS))
        self.rot = [
            [0] + [rot[g * _UNITS + k] % self.m for k in range(1, _UNITS)] for g in range(groups)
        ]
        sub = 0
        while sub < _SUB_MAX and any(self.bits(g, self.top + sub + 1) for g in range(groups)):
            sub += 1
        #: The levels in the order they are resolved, as (e, offset row): the
        #: sub-levels (deepest first, on the top level's offsets, row 0), then
        #: e = top .. 0 on rows 0 .. top. Fixed by the seed, secret and table size.
        self.levels: list[tuple[int, int]] = [(self.top + k, 0) for k in range(sub, 0, -1)] + [
            (e, self.top - e) for e in range(self.top, -1, -1)
        ]

    def _random(self, g: int, i: int) -> int:
        r = self._rand.get((g, i))
        if r is None:
            raw = self.hasher.node_bytes(_pool_label("bits", g, i), self.m // 8)
            r = self._rand[(g, i)] = int.from_bytes(raw, "little")
        return r

    def positions(self, g: int, e: int) -> list[int]:
        """Sorted positions of a sparse unit pool (``e >= _E_SPARSE``, or a sub-level)."""
        p = self._pos.get((g, e))
        if p is None and e > self.top:
            a = self.bits(g, e)
            p = []
            while a:
                low = a & -a
                p.append(low.bit_length() - 1)
                a ^= low
            self._pos[(g, e)] = p
        if p is None:
            expected = self.m / 2.0**e
            n = int(expected)
            words = _words(self.hasher.node_bytes(_pool_label("pos", g, e), 4 * (n + 2)))
            # Randomised rounding keeps the mean density exactly 2**-e.
            if words[n + 1] < (expected - n) * 4294967296.0:
                n += 1
            mask = self.m - 1
            p = self._pos[(g, e)] = sorted({w & mask for w in words[:n]})
        return p

    def bits(self, g: int, e: int) -> int:
        """The unit pool ``(g, e)`` as a bitmap (bit b = bucket b of the group)."""
        a = self._bits.get((g, e))
        if a is None:
            if e > self.top:
                # a sub-level: the level below it, thinned by one random halving
                raw = self.hasher.node_bytes(_pool_label("sub", g, e - self.top), self.m // 8)
                a = self.bits(g, e - 1) & int.from_bytes(raw, "little")
            elif e <= 0:
                a = self.full
            elif e < _E_SPARSE:
                a = self._random(g, 0)
                for i in range(1, e):
                    a &= self._random(g, i)
            else:
                buf = bytearray(self.m // 8)
                for p in self.positions(g, e):
                    buf[p >> 3] |= 1 << (p & 7)
                a = int.from_bytes(buf, "little")
            self._bits[(g, e)] = a
        return a

    def _tie_plane(self, g: int, i: int) -> tuple[int, bytes]:
        t = self._tie.get((g, i))
        if t is None:
            raw = self.hasher.node_bytes(_pool_label("tie", g, i), self.m // 8)
            t = self._tie[(g, i)] = (int.from_bytes(raw, "little"), raw)
        return t

    def tie_bits(self, g: int, i: int, t: int) -> int:
        """Bit *i* of every bucket's tie score for tie offset *t*, as a bitmap.

        Bucket ``b`` reads bit ``(b - t) mod m`` of the tie plane ``(g, i)``.
        """
        return self._rotate(self._tie_plane(g, i)[0], t)

    def tie_bit(self, g: int, i: int, t: int, b: int) -> int:
        """Bit *i* of bucket *b*'s tie score for tie offset *t* (:meth:`tie_bits`)."""
        x = (b - t) & (self.m - 1)
        return self._tie_plane(g, i)[1][x >> 3] >> (x & 7) & 1

    def _rotate(self, a: int, c: int) -> int:
        if not c:
            return a
        return ((a << c) | (a >> (self.m - c))) & self.full

    def _doubled(self, g: int, e: int, k: int) -> int:
        """2**k unit pools (g, e) at distinct rotations, OR-ed: weight 2**k."""
        a = self._bits.get((g, e, k))
        if a is None:
            if k == 0:
                a = self.bits(g, e)
            else:
                half = self._doubled(g, e, k - 1)
                a = half | self._rotate(half, self.rot[g][k])
            self._bits[(g, e, k)] = a
        return a

    def _doubled_positions(self, g: int, e: int, k: int) -> list[int]:
        p = self._pos.get((g, e, k))
        if p is None:
            if k == 0:
                p = self.positions(g, e)
            else:
                half = self._doubled_positions(g, e, k - 1)
                c = self.rot[g][k]
                mask = self.m - 1
                p = sorted({*half, *((x + c) & mask for x in half)})
            self._pos[(g, e, k)] = p
        return p

    def _unit_blocks(self, g: int, w: int) -> Iterator[tuple[int, int]]:
        """``(k, c)`` per set bit *k* of *w*: the weight's units in blocks of ``2**k``.

        Unit ``i`` sits at rotation ``c0 + sum(rot[g][j + 1] for each set bit j of i)``,
        ``c0 = rot[g][_BITS]``; a weight-*w* node has units ``0 .. w-1``, so weight
        ``w + 1`` has every unit of weight *w* and one more (its arrivals are a
        superset, at every level). Units ``0 .. w-1`` are, for each set bit *k* of
        *w*, the ``2**k`` units whose bits above *k* are those of *w* and whose bit
        *k* is clear: :meth:`_doubled` ``(k)`` (units ``0 .. 2**k - 1`` relative to
        ``c0``) rotated by ``c0`` plus ``rot[g][j + 1]`` for the set bits ``j > k``
        of *w*. So a weight costs one rotation per set bit, as before.
        """
        rot = self.rot[g]
        c = rot[_BITS]
        w = min(w, _MAX_WEIGHT)
        for k in range(w.bit_length() - 1, -1, -1):
            if w >> k & 1:
                yield k, c
                c = (c + rot[k + 1]) % self.m

    def node_bits(self, g: int, e: int, w: int) -> int:
        """Arrival pool of a weight-*w* node (before its own offset).

        The union of *w* unit pools at distinct rotations: *w* weight-1 nodes'
        worth of arrivals, as weighted HRW wants (one unit pool of density
        ``w * 2**-e`` would overweight heavy nodes when ``2**-e`` is not small).
        The units are nested (:meth:`_unit_blocks`): raising a weight only adds
        arrivals, so it only moves buckets to the node, as in HRW.
        """
        p = 0
        for k, c in self._unit_blocks(g, w):
            p |= self._rotate(self._doubled(g, e, k), c)
        return p

    def node_positions(self, g: int, e: int, w: int) -> list[int]:
        """Sorted positions of :meth:`node_bits` (sparse pools only)."""
        mask = self.m - 1
        out: set[int] = set()
        for k, c in self._unit_blocks(g, w):
            out.update((x + c) & mask for x in self._doubled_positions(g, e, k))
        return sorted(out)


def _groups(size: int) -> int:
    return max(1, size >> _GROUP_BITS)


def _table_pos(m: int, b: int) -> int:
    """Where bucket *b* of a group sits in the group's bytes (see :func:`_to_bytes`)."""
    return (b & 7) * (m >> 3) + (b >> 3)


def _to_bytes(planes: list[int], m: int) -> bytes:
    """Bit planes (bit b of plane t = bit t of bucket b's owner) to one byte per bucket.

    Bucket ``b`` goes to byte ``(b % 8) * m/8 + b // 8`` (:func:`_table_pos`): the
    run for ``q = b % 8`` is then ``sum_t ((plane_t >> q) & 0x0101..01) << t`` read
    as bytes, a few int operations (C speed) instead of a Python step per bucket.
    """
    ones = int.from_bytes(b"\x01" * (m >> 3), "little")
    out = []
    for q in range(8):
        sel = ones << q
        v = 0
        for t, p in enumerate(planes):
            if p:
                x = p & sel
                v |= x << (t - q) if t >= q else x >> (q - t)
        out.append(v.to_bytes(m >> 3, "little"))
    return b"".join(out)


def _contains(sorted_list: list[int], x: int) -> bool:
    i = bisect.bisect_left(sorted_list, x)
    return i < len(sorted_list) and sorted_list[i] == x


def _layout(offsets: list[array[int]], idx: int, mask: int, cache: dict[int, _Layout]) -> _Layout:
    """Every node's offset ``s`` at word *idx*, the nodes by decreasing ``s`` (then
    index), and whether two of them share an ``s``. Cached per (offset row, group):
    the top level and its sub-levels all read row 0."""
    lay = cache.get(idx)
    if lay is None:
        svals = [o[idx] & mask for o in offsets]
        # sorted() is stable also with reverse=True: equal s stay in index order
        order = sorted(range(len(svals)), key=svals.__getitem__, reverse=True)
        lay = cache[idx] = (svals, order, len(set(svals)) < len(svals))
    return lay


def _tie_pick(pools: _Pools, g: int, b: int, tied: list[tuple[int, int]]) -> int:
    """The winner at bucket *b* of group *g* among *tied* (index, tie offset) pairs,
    which arrive at the same level and ``d``: the smallest tie score, its bit 0
    (most significant) first, read only while several remain; then the lowest index
    (*tied* is in index order). :func:`_tie_split` is the same rule over bitmaps."""
    for i in range(_TIE_BITS):
        if len(tied) < 2:
            break
        zeros = [x for x in tied if not pools.tie_bit(g, i, x[1], b)]
        if zeros:
            tied = zeros
    return tied[0][0]


def _tie_split(pools: _Pools, g: int, ts: list[int], xs: list[int]) -> list[int]:
    """The buckets won by nodes of one offset ``s`` (index order, tie offsets *ts*)
    out of *xs*, their arrivals at one level in buckets no earlier arrival took.

    A bucket in several ``xs`` is a tie at equal ``d``: it goes by :func:`_tie_pick`'s
    rule, bit-sliced (bit *i* of every contested bucket's score per node at once).
    """
    contested = seen = 0
    for x in xs:
        contested |= seen & x
        seen |= x
    if not contested:
        return xs
    alive = [x & contested for x in xs]
    for i in range(_TIE_BITS):
        ones = [pools.tie_bits(g, i, t) for t in ts]
        # where some candidate has a 0 bit, the candidates with a 1 bit drop out
        zero = 0
        for a, o in zip(alive, ones, strict=True):
            zero |= a ^ (a & o)
        alive = [a ^ (a & o & zero) for a, o in zip(alive, ones, strict=True)]
        seen = left = 0
        for a in alive:
            left |= seen & a
            seen |= a
        if not left:
            break
    won = []
    taken = 0
    for x, a in zip(xs, alive, strict=True):
        mine = a ^ (a & taken)  # equal scores throughout: the lowest index
        taken |= mine
        won.append((x ^ (x & contested)) | mine)
    return won


def _tabulate(pools: _Pools, offsets: list[array[int]], weights: list[int]) -> array[int] | bytes:
    """The owner (index into *weights*) of every bucket, in table order.

    Weighted HRW with exponential arrival times is the same as: each weight unit
    "arrives" at each bucket at some time, the first arrival owns the bucket.
    Time is cut into levels ``e = pools.top .. 0`` in which a weight unit arrives with
    probability ``2**-e`` (each level doubles the rate); a node's arrivals at a
    level are ``pools.node_bits(g, e, w)`` rotated by the node's own offset ``s``,
    so position ``d = (b - s) mod m`` of that pool decides bucket ``b``. Within a
    level the arrival with the smallest ``d`` wins: a per-bucket cyclic order of
    the nodes, so no node is always first on ties. Before the top level come its
    sub-levels ``top + K .. top + 1``: its own arrivals (each weight unit's),
    thinned by one random halving per sub-level, on its offsets, so the top level's
    ties go first to the earliest arrival, as in HRW, and only then by ``d``.
    ``pools.levels`` lists the levels in this order.

    Equal ``d`` at a bucket means equal offsets: nodes whose offsets coincide in a
    group and row have the same arrivals there (up to the lighter one's weight).
    Such ties go by per-(node, bucket) tie scores (:func:`_tie_pick`), then
    ``hash_id`` order; tables without such nodes never read a tie score.

    Every bucket's preference order is thus fixed by the nodes' identities, seed
    and secret alone; removing a node only hands its own buckets to the next
    live node in their orders. Levels are resolved with bitmap ANDs over a whole
    group per node (dense), point by point while arrivals are few (sparse), and
    bucket by bucket for the last few empty buckets (tail); the three agree.
    """
    m, groups, full = pools.m, pools.groups, pools.full
    n = len(weights)
    mask = m - 1
    shift = m.bit_length()
    total = sum(weights)
    empty = [full] * groups
    acc = [[0] * n for _ in range(groups)]
    claims: list[dict[int, int]] = [{} for _ in range(groups)]
    truncs = [(1 << (m - i * (m >> 3))) - 1 for i in range(8)]
    positions: dict[tuple[int, int, int], list[int]] = {}
    layouts: dict[int, _Layout] = {}
    sparse_done = False
    for lev, (e, offset_row) in enumerate(pools.levels):
        base = offset_row * groups
        if (
            not sparse_done
            and (e >= _E_SPARSE or e > pools.top)
            and total * m * groups >> e <= _SPARSE_MAX
        ):
            for g in range(groups):
                svals, _, shared = _layout(offsets, base + g, mask, layouts)
                # Candidates as ints ordered by (d, node, bucket): sort, then the
                # first candidate of each bucket is its winner at this level.
                cands: list[int] = []
                for j in range(n):
                    s = svals[j]
                    key = (g, e, weights[j])
                    pos = positions.get(key)
                    if pos is None:
                        pos = positions[key] = pools.node_positions(*key)
                    dj = j
                    cands.extend((((d * n + dj) << shift) | ((d + s) & mask)) for d in pos)
                cands.sort()
                taken = claims[g]
                if not shared:
                    for c in cands:
                        b = c & mask
                        if b not in taken:
                            taken[b] = (c >> shift) % n
                    continue
                by_s: dict[int, list[int]] = {}
                for j, s in enumerate(svals):
                    by_s.setdefault(s, []).append(j)
                dup = [len(by_s[s]) > 1 for s in svals]
                fresh = []
                for c in cands:
                    b = c & mask
                    if b not in taken:
                        j = taken[b] = (c >> shift) % n
                        if dup[j]:
                            fresh.append(b)
                # A bucket won at this level by a node that shares its offset: the
                # others with an arrival at the same d tie with it.
                for b in fresh:
                    s = svals[taken[b]]
                    d = (b - s) & mask
                    tied = [
                        (k, offsets[k][pools.tie_base + g] & mask)
                        for k in by_s[s]
                        if _contains(positions[(g, e, weights[k])], d)
                    ]
                    if len(tied) > 1:
                        taken[b] = _tie_pick(pools, g, b, tied)
            continue
        if not sparse_done:
            sparse_done = True
            for g in range(groups):
                if claims[g]:
                    buf = bytearray(m >> 3)
                    for b in claims[g]:
                        buf[b >> 3] |= 1 << (b & 7)
                    empty[g] = full ^ int.from_bytes(buf, "little")
        left = 0
        for g in range(groups):
            em = empty[g]
            if not em:
                continue
            svals, order, shared = _layout(offsets, base + g, mask, layouts)
            by_weight: dict[int, list[int]] = {}
            recs = []
            for j in order:
                w = weights[j]
                cut = by_weight.get(w)
                if cut is None:
                    # The pool cut to its low m - i*m/8 bits: pass 1 only needs the
                    # low m - s bits, and shifting fewer bits is most of the cost.
                    p = pools.node_bits(g, e, w)
                    cut = by_weight[w] = [p & trunc for trunc in truncs]
                s = svals[j]
                recs.append((s, j, cut[(s << 3) // m], cut[0]))
            ties: list[tuple[list[int], list[int], list[int], list[int]]] = []
            if shared:
                # Nodes sharing an offset become one record of their arrivals'
                # union, marked by a negative index into ties; _tie_split divides
                # what the union wins.
                merged = []
                for s, same in itertools.groupby(recs, key=lambda r: r[0]):
                    rs = list(same)
                    if len(rs) == 1:
                        merged.append(rs[0])
                        continue
                    js = [r[1] for r in rs]
                    ts = [offsets[j][pools.tie_base + g] & mask for j in js]
                    ties.append((js, [r[2] for r in rs], [r[3] for r in rs], ts))
                    low = p = 0
                    for r in rs:
                        low |= r[2]
                        p |= r[3]
                    merged.append((s, ~(len(ties) - 1), low, p))
                recs = merged
            row = acc[g]
            # Pass 1: buckets b >= s (d = b - s), nodes by decreasing s = increasing d.
            for s, j, low, _ in recs:
                won = (low << s) & em
                if won:
                    em ^= won
                    if j >= 0:
                        row[j] |= won
                    else:
                        js, lows, _, ts = ties[~j]
                        xs = [(x << s) & won for x in lows]
                        for k, x in zip(js, _tie_split(pools, g, ts, xs), strict=True):
                            row[k] |= x
            # Pass 2: buckets b < s (d = b - s + m), again by increasing d.
            for s, j, _, p in recs:
                if s:
                    won = (p >> (m - s)) & em
                    if won:
                        em ^= won
                        if j >= 0:
                            row[j] |= won
                        else:
                            js, _, ps, ts = ties[~j]
                            xs = [(x >> (m - s)) & won for x in ps]
                            for k, x in zip(js, _tie_split(pools, g, ts, xs), strict=True):
                                row[k] |= x
            empty[g] = em
            left += em.bit_count()
        if left <= _TAIL_MAX:
            if left:
                _tail(pools, offsets, weights, empty=empty, claims=claims, start=lev + 1)
            break
    width = 1 if n <= 256 else 2 if n <= 65536 else 4
    parts = []
    for k in range(width):
        chunks = []
        for g in range(groups):
            row = acc[g]
            planes = [0] * 8
            for j in range(n):
                won = row[j]
                if won:
                    v = j >> (8 * k)
                    t = 0
                    while v and t < 8:
                        if v & 1:
                            planes[t] |= won
                        v >>= 1
                        t += 1
            chunks.append(_to_bytes(planes, m))
        parts.append(b"".join(chunks))
    out: bytearray | array[int]
    if width == 1:
        out = bytearray(parts[0])
    else:
        buf = bytearray(len(parts[0]) * width)
        for k in range(width):
            buf[k::width] = parts[k]
        out = array("H" if width == 2 else "I")
        out.frombytes(bytes(buf))
        if sys.byteorder == "big":  # pragma: no cover
            out.byteswap()
    for g in range(groups):
        for b, j in claims[g].items():
            out[g * m + _table_pos(m, b)] = j
    return bytes(out) if isinstance(out, bytearray) else out


def _tail(
    pools: _Pools,
    offsets: list[array[int]],
    weights: list[int],
    *,
    empty: list[int],
    claims: list[dict[int, int]],
    start: int,
) -> None:
    """Resolve the few buckets still empty, one by one, from level index *start*."""
    m, groups = pools.m, pools.groups
    mask = m - 1
    n = len(weights)
    cache: dict[tuple[int, int, int], bytes] = {}
    for g in range(groups):
        em = empty[g]
        while em:
            low = em & -em
            em ^= low
            b = low.bit_length() - 1
            for e, row in pools.levels[start:]:
                best_d = m
                best: list[int] = []
                for j in range(n):
                    d = (b - (offsets[j][row * groups + g] & mask)) & mask
                    key = (g, e, weights[j])
                    bits = cache.get(key)
                    if bits is None:
                        bits = cache[key] = pools.node_bits(*key).to_bytes(m >> 3, "little")
                    if bits[d >> 3] >> (d & 7) & 1 and d <= best_d:
                        if d < best_d:
                            best_d, best = d, [j]
                        else:  # the same offset: a tie (see _tabulate)
                            best.append(j)
                if best:
                    if len(best) > 1:
                        tied = [(k, offsets[k][pools.tie_base + g] & mask) for k in best]
                        claims[g][b] = _tie_pick(pools, g, b, tied)
                    else:
                        claims[g][b] = best[0]
                    break
        empty[g] = 0


class RendezvousHash(HashPolicy):
    """Weighted rendezvous hashing: a key goes to the live node with the highest
    score, so when a node leaves only its own keys move (exactly 1/N on average).

    Tabulated balance depends on the total weight, although weights are relative:
    at the default 2**19 buckets each of 100 equal nodes owns a bucket share off
    its weight share by 1.2% (standard deviation) at weight 1, 1.9% at 10, 3.4% at
    100 and 6.6% at 1000 (the busiest node of 200,000 keys: 1.06x, 1.05x, 1.09x
    and 1.20x the mean). The noise halves with 4x the buckets (3.2% at weight 1000
    and 2**21). Prefer small integer weights, a larger table, ``table_size=None``
    (exact HRW) or :class:`MaglevHash` where weights must be large. A table of few
    nodes with unequal weights tilts toward the light ones: averaged over seeds, a
    weight-1 node next to one of weight 10 owns about 7% more than its weight share,
    and four of weight 1 next to one of weight 10 together 4% more, where exact HRW
    gives them their shares; use ``table_size=None`` where a small set's weight
    shares must be exact (docs/policies/hashing.md, "Few nodes"). Two nodes that
    share a random offset in a group of 2**17 buckets (by chance: ~N**2 / 2**16
    pairs at the first level of the default table) split their common arrivals, so
    each keeps about half of the buckets that level decides there, which is most of
    them with a large total weight or a small table (docs/policies/hashing.md,
    "Shared offsets"). Changing one node's weight moves keys as HRW does: raising it
    only moves keys to that node, lowering it only moves keys away from it (a
    weight's arrivals are nested in the next weight's).

    :param nodes: initial nodes.
    :param table_size: buckets of the tabulated mode (a power of two from 1024 to
        ``MAX_TABLE_SIZE``, 2**24),
        or ``None`` for exact per-key scoring (O(N) per pick).
    :param seed: reshuffles the mapping (see :class:`KeyHasher`).
    :param secret: keyed hash so chosen keys cannot aim at one node.
    :param balance_factor: bounded load, a finite real number ``>= 1`` (see
        :class:`HashPolicy`); the next candidates are the next-highest scores
        (exact) or the following buckets (tabulated).
    :raises InvalidArgument: table_size is not None or a power of two in
        ``1024..MAX_TABLE_SIZE``; seed, secret or balance_factor is out of range
        (see :class:`KeyHasher`, :class:`HashPolicy`); or *nodes* is one address
        string, a mapping or not iterable at all.
    :raises DuplicateNode: two nodes share an address or a name, or one node's name
        is another node's address.
    :raises AddressError: an address in *nodes* is malformed.
    """

    name = "rendezvous"
    lock_free_pick = True

    def __init__(
        self,
        nodes: Iterable[NodeLike] = (),
        *,
        table_size: int | None = DEFAULT_BUCKETS,
        seed: int = 0,
        secret: bytes | None = None,
        balance_factor: float | Fraction | Decimal | None = None,
    ) -> None:
        if table_size is not None and (
            isinstance(table_size, bool)
            or not isinstance(table_size, int)
            or not 1024 <= table_size <= MAX_TABLE_SIZE
            or table_size & (table_size - 1)
        ):
            raise InvalidArgument(
                "table_size",
                table_size,
                f"must be a power of two in 1024..{MAX_TABLE_SIZE} (MAX_TABLE_SIZE), or None",
            )
        self._size = table_size
        self._crc_seed = seed if secret is None else None
        # Everything a pick reads, published by one attribute store per rebuild so
        # that a lock-free pick reads one consistent membership: (ranked, owners,
        # nodes). ``ranked`` pairs each live node with its score seed (exact mode);
        # ``owners`` is the owner index per bucket (bytes, or array('H'/'I') past 256
        # nodes, one byte per bucket instead of one pointer) into ``nodes``.
        self._snap: _Snapshot = ((), b"", ())
        # The str-key fast path's own snapshot (owners, nodes, crc seed), or None.
        self._fast: tuple[bytes | array[int], tuple[Node, ...], int] | None = None
        self._pools: _Pools | None = None
        self._offsets: dict[str, array[int]] = {}
        super().__init__(nodes, seed=seed, secret=secret, balance_factor=balance_factor)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "table_size": self._size}

    @property
    def table_size(self) -> int | None:
        """Buckets, or None in exact mode."""
        return self._size

    @property
    def _table(self) -> tuple[bytes | array[int], tuple[Node, ...]]:
        """(owners, nodes) of the tabulated mode (for tests and inspection)."""
        _, owners, nodes = self._snap
        return owners, nodes

    def _rebuild(self) -> None:
        nodes = tuple(sorted(self._live, key=lambda n: n.hash_id))
        if self._size is None or not nodes:
            ranked = tuple((n, self._hasher.node_int(n.hash_id, 8)) for n in nodes)
            self._publish((ranked, b"", ()))
            return
        groups = _groups(self._size)
        if self._pools is None:
            self._pools = _Pools(self._hasher, self._size, groups)
        # A node's offsets and tie offsets (see _Pools.tie_base) depend on its
        # identity only: cached across rebuilds.
        nbytes = 4 * (self._pools.tie_base + groups)
        old = self._offsets
        offsets = {
            n.hash_id: old.get(n.hash_id) or _words(self._hasher.node_bytes(n.hash_id, nbytes))
            for n in nodes
        }
        self._offsets = offsets
        owners = _tabulate(
            self._pools, [offsets[n.hash_id] for n in nodes], [n.weight for n in nodes]
        )
        self._publish(((), owners, nodes))

    def _publish(self, snap: _Snapshot) -> None:
        self._snap = snap
        _, owners, nodes = snap
        seed = self._crc_seed
        if nodes and seed is not None and self._balance_factor is None:
            self._fast = (owners, nodes, seed)
        else:
            self._fast = None

    def pick(self, key: Key = None) -> Node:
        """The node for *key* (see :meth:`BalancePolicy.pick`).

        :param key: ``str`` (hashed as UTF-8) or bytes-like (any buffer, hashed as
            its bytes).
        :returns: a live node.
        :raises KeyRequired: no key.
        :raises InvalidKey: the key is not str or bytes-like, is a str with a
            lone surrogate, is a released memoryview or is a buffer that cannot be
            read (a closed ``mmap``).
        :raises NoNodeAvailable: no live node, or all over the load bound.
        """
        # Hot path: str key, CRC hashing, no bound: one published tuple, no lock.
        fast = self._fast
        if fast is not None and key.__class__ is str:
            owners, nodes, seed = fast
            try:
                h = zlib.crc32(key.encode(), seed)  # type: ignore[union-attr,unused-ignore]
            except UnicodeEncodeError:
                return super().pick(key)  # which reports the key (InvalidKey)
            return nodes[owners[h % len(owners)]]
        return super().pick(key)

    def _exact_scores(
        self, ranked: tuple[tuple[Node, int], ...], key: bytes
    ) -> list[tuple[float, str, Node]]:
        h = self._hasher.hash32(key)
        h = h | (h << 32)
        scale = 1.0 / (1 << 53)
        scored = []
        for n, s in ranked:
            u = ((_mix64(h ^ s) >> 11) + 0.5) * scale
            scored.append((u if n.weight == 1 else u ** (1.0 / n.weight), n.hash_id, n))
        return scored

    def _choose(self, key: bytes | None) -> Node:
        assert key is not None
        if self._balance_factor is not None:
            return self._choose_bounded(key)
        return next(self._candidates(key))

    def _candidates(self, key: bytes) -> Iterator[Node]:
        # One read of the published snapshot: a concurrent rebuild cannot pair the
        # old live set with the new table (that raised ZeroDivisionError/ValueError).
        ranked, owners, nodes = self._snap
        if self._size is None:
            if not ranked:
                raise self._unavailable()
            scored = self._exact_scores(ranked, key)
            if self._balance_factor is None:
                yield max(scored, key=lambda t: (t[0], t[1]))[2]
            else:
                scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
                yield from (t[2] for t in scored)
            return
        if not nodes:
            raise self._unavailable()
        m = len(owners)
        start = self._hasher.hash32(key) % m
        for i in range(m):
            yield nodes[owners[(start + i) % m]]
