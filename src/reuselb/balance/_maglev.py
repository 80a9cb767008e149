"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted, with bounded load.

Rules of this module: pure (no I/O). A lookup table of prime size M is filled from
per-node permutations (offset, skip) when membership, weights or states change,
and published by one attribute store; an unbounded pick is one CRC-32 and one
index, without the lock. Nodes are placed in ``hash_id`` order, so processes that
add the same nodes in another order build the same table.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from decimal import Decimal
from fractions import Fraction
from typing import Any

from .._errors import InvalidArgument
from ._base import MAX_TABLE_SIZE, Node, NodeLike, TableHashPolicy

__all__ = ["DEFAULT_TABLE_SIZE", "MaglevHash", "is_prime"]

#: Maglev's table size by default (prime, > 100 x 655 nodes).
DEFAULT_TABLE_SIZE = 65537


def is_prime(n: int) -> bool:
    """Trial division (table sizes are small)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


#: The round-by-round fill visits every node once a round, ``count x wmax / W`` visits
#: per entry claimed; above this many it is slower than scheduling the claims on a
#: heap (measured crossover 5-9 visits at 20 to 655 nodes, M = 65,537; CPython 3.11).
_VISITS_PER_CLAIM = 8


def _fill(offsets: list[int], skips: list[int], weights: list[int], m: int) -> list[int]:
    """The weighted Maglev table: entry -> index of the node that owns it.

    Each round every node earns its weight in credit and claims one entry per
    ``wmax`` (the largest weight) of credit, the nodes of a round in index order;
    a claim takes the next free entry of the node's permutation (*offsets*,
    *skips*, advanced in place). Node ``i``'s k-th claim therefore falls in round
    ``ceil(k x wmax / weights[i])``, and the table depends only on the order of the
    claims: by round, then by node index. Both fills below follow that order, so
    they build the same table (part of the stability promise: the mapping must not
    change with the implementation).

    :param offsets: each node's first entry (``0..m-1``); advanced in place.
    :param skips: each node's step (``1..m-1``).
    :param weights: the nodes' weights, all ``>= 1``.
    :param m: the table size, a prime.
    :returns: the table as node indexes.
    """
    count = len(weights)
    if count * max(weights) <= _VISITS_PER_CLAIM * sum(weights):
        return _fill_by_rounds(offsets, skips, weights, m)
    return _fill_by_heap(offsets, skips, weights, m)


def _fill_by_rounds(pos: list[int], skips: list[int], weights: list[int], m: int) -> list[int]:
    """:func:`_fill`, round by round: ``M x count x wmax / W`` node visits.

    Cheapest when the weights are close (one visit per claim when they are equal),
    but one heavy node among many light ones makes most visits idle: weights
    [1000] + [1] x 654 at M = 65,537 took ~0.9 s, 16x the equal-weight build.
    """
    wmax = max(weights)
    credit = [0] * len(weights)
    entry = [-1] * m
    filled = 0
    count = len(weights)
    while filled < m:
        for i in range(count):
            c_i = credit[i] + weights[i]
            if c_i < wmax:
                credit[i] = c_i
                continue
            credit[i] = c_i - wmax
            c = pos[i]
            s = skips[i]
            while entry[c] >= 0:
                c += s
                if c >= m:
                    c -= m
            entry[c] = i
            c += s
            if c >= m:
                c -= m
            pos[i] = c
            filled += 1
            if filled == m:
                break
    return entry


def _fill_by_heap(pos: list[int], skips: list[int], weights: list[int], m: int) -> list[int]:
    """:func:`_fill`, claim by claim: ``M`` heap steps of ``log(count)``, whatever
    the weights.

    The heap holds each node's next claim as ``round x count + index``, so it pops
    the claims in the rounds' order: by round, then by index.
    """
    wmax = max(weights)
    count = len(weights)
    entry = [-1] * m
    # node i's first claim is in round ceil(wmax / w_i)
    heap = [-(-wmax // w) * count + i for i, w in enumerate(weights)]
    heapq.heapify(heap)
    claims = [1] * count  # each node's claims so far, counting the one on the heap
    replace = heapq.heapreplace
    for _ in range(m):
        i = heap[0] % count
        c = pos[i]
        s = skips[i]
        while entry[c] >= 0:
            c += s
            if c >= m:
                c -= m
        entry[c] = i
        c += s
        if c >= m:
            c -= m
        pos[i] = c
        k = claims[i] + 1
        claims[i] = k
        replace(heap, -(-k * wmax // weights[i]) * count + i)
    return entry


class MaglevHash(TableHashPolicy):
    """Maglev: near-perfect balance, and about 1/N of keys move when one of N nodes
    leaves (plus a little more: ~1.5/N at N=100, measured 1.53/N, the price of the
    even table; up to ~2.5/N when the table is near its 100 x N minimum, ~1.6/N
    above 400 x N).

    Balance: with equal weights each of N nodes owns ``M / N`` table entries to
    within one. With unequal weights a node of weight ``w`` (``W`` the live nodes'
    total) owns ``M * w / W`` entries to within ``1 + N * w / W``: the table fills
    in rounds, and the credit the lighter nodes have not spent when it is full goes
    to the others (weights [1000] + [1] x 50 at M = 65537: the heavy node owns
    62,437 entries for 62,416.2, +20.8). Since ``M > 100 x N``, that is under 1% of
    the node's share, plus one entry.

    Cost: every membership, weight or state change rebuilds the table, in about
    ``M ln M`` steps whatever the weights (~0.03-0.05 s at M = 65,537 for 100 to
    655 nodes; one node of weight 1000 among 654 of weight 1 took ~0.9 s while the
    fill visited every node once a round, and now costs what equal weights do).

    :param nodes: initial nodes.
    :param table_size: a prime M ``<= MAX_TABLE_SIZE`` (2**24); must stay greater
        than 100 x the number of live nodes (Maglev's bound for ~1% balance); a
        rebuild with more live nodes raises.
    :param seed: reshuffles the mapping (see :class:`KeyHasher`).
    :param secret: keyed hash so chosen keys cannot aim at one node.
    :param balance_factor: bounded load, a finite real number ``>= 1`` (see
        :class:`HashPolicy`); the next candidates are the following table entries.
    :raises InvalidArgument: table_size is not a prime, is above ``MAX_TABLE_SIZE``
        or is too small for the nodes; seed, secret or balance_factor is out of
        range (see :class:`KeyHasher`, :class:`HashPolicy`); or *nodes* is one
        address string, a mapping or not iterable at all.
        Later, :meth:`add`, :meth:`mark_up` and :meth:`set_weight` raise it too when
        the change would leave ``table_size <= 100 x`` the live nodes; the policy is
        then left as it was.
    :raises DuplicateNode: two nodes share an address or a name, or one node's name
        is another node's address.
    :raises AddressError: an address in *nodes* is malformed.
    """

    name = "maglev"
    lock_free_pick = True

    def __init__(
        self,
        nodes: Iterable[NodeLike] = (),
        *,
        table_size: int = DEFAULT_TABLE_SIZE,
        seed: int = 0,
        secret: bytes | None = None,
        balance_factor: float | Fraction | Decimal | None = None,
    ) -> None:
        if (
            isinstance(table_size, bool)
            or not isinstance(table_size, int)
            # The bound first: it keeps the primality check below cheap too.
            or not 2 <= table_size <= MAX_TABLE_SIZE
            or not is_prime(table_size)
        ):
            raise InvalidArgument(
                "table_size", table_size, f"must be a prime <= MAX_TABLE_SIZE ({MAX_TABLE_SIZE})"
            )
        self._size = table_size
        self._table: list[Node] = []
        self._fast: tuple[list[Node], int] | None = None
        self._crc_seed = seed if secret is None else None
        super().__init__(nodes, seed=seed, secret=secret, balance_factor=balance_factor)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "table_size": self._size}

    @property
    def table_size(self) -> int:
        """M, the number of table entries."""
        return self._size

    def _rebuild(self) -> None:
        nodes = sorted(self._live, key=lambda n: n.hash_id)
        if not nodes:
            self._table = []
            self._publish()
            return
        m = self._size
        if m <= 100 * len(nodes):
            raise InvalidArgument(
                "table_size", m, f"must be greater than 100 x {len(nodes)} live nodes"
            )
        offsets = []
        skips = []
        for n in nodes:
            h = self._hasher.node_bytes(n.hash_id, 16)
            offsets.append(int.from_bytes(h[:8], "little") % m)
            skips.append(int.from_bytes(h[8:], "little") % (m - 1) + 1)
        entry = _fill(offsets, skips, [n.weight for n in nodes], m)
        self._table = [nodes[i] for i in entry]
        self._publish()

    def _publish(self) -> None:
        seed = self._crc_seed
        if self._table and seed is not None and self._balance_factor is None:
            self._fast = (self._table, seed)
        else:
            self._fast = None

    def _choose(self, key: bytes | None) -> Node:
        assert key is not None
        if self._balance_factor is not None:
            return self._choose_bounded(key)
        table = self._table
        if not table:
            raise self._unavailable()
        return table[self._hasher.hash32(key) % len(table)]

    def _candidates(self, key: bytes) -> Iterator[Node]:
        table = self._table
        m = len(table)
        start = self._hasher.hash32(key) % m
        for i in range(m):
            yield table[(start + i) % m]
