"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted, with bounded load.

Rules of this module: pure (no I/O). A lookup table of prime size M is filled from
per-node permutations (offset, skip) when membership, weights or states change,
and published by one attribute store; an unbounded pick is one CRC-32 and one
index, without the lock. Nodes are placed in ``hash_id`` order, so processes that
add the same nodes in another order build the same table.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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

    :param nodes: initial nodes.
    :param table_size: a prime M ``<= MAX_TABLE_SIZE`` (2**24); must stay greater
        than 100 x the number of live nodes (Maglev's bound for ~1% balance); a
        rebuild with more live nodes raises.
    :param seed: reshuffles the mapping (see :class:`KeyHasher`).
    :param secret: keyed hash so chosen keys cannot aim at one node.
    :param balance_factor: bounded load (``>= 1``); the next candidates are the
        following table entries.
    :raises InvalidArgument: table_size is not a prime, is above ``MAX_TABLE_SIZE``
        or is too small for the nodes; seed, secret or balance_factor is out of
        range (see :class:`KeyHasher`, :class:`HashPolicy`); or *nodes* is one
        address string or not iterable at all.
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
        balance_factor: float | None = None,
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
        weights = [n.weight for n in nodes]
        wmax = max(weights)
        credit = [0] * len(nodes)
        entry = [-1] * m
        pos = offsets
        filled = 0
        count = len(nodes)
        # Weighted Maglev: each round every node earns its weight in credit and
        # fills one entry per wmax of credit, so shares follow the weights.
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
