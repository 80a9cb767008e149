"""Weighted rendezvous (highest random weight) hashing, tabulated or exact.

Rules of this module: pure (no I/O). A node's score for a slot is a 32-bit word
``u`` read from SHAKE-128 of the node's identity (see
:meth:`KeyHasher.node_bytes`); weighted HRW (score ``-w / ln(u)``) is evaluated in
the equivalent form ``u ** (1 / w)``, with weight-1 nodes compared on the raw
word. Ties are broken by ``hash_id`` order, which does not depend on the other
nodes, so removing a node never changes the winner among the remaining ones.

*Tabulated* (default, ``table_size=65536``): the HRW winner of each of
``table_size`` buckets is computed when membership changes; a key goes to bucket
``hash32(key) % table_size``, so a pick is O(1) and lock-free. Removing a node
moves exactly the buckets (keys) that were on it, as in HRW; the balance is that
of ``table_size`` random buckets (about ``1/sqrt(table_size/N)`` spread per node).

*Exact* (``table_size=None``): every pick scores every live node, O(N); balance
is that of the keys themselves.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Iterator
from itertools import repeat
from operator import add, mul, truediv
from typing import Any

from .._errors import InvalidArgument
from ._base import Node, NodeLike, TableHashPolicy

__all__ = ["DEFAULT_BUCKETS", "RendezvousHash"]

#: Buckets of the tabulated mode by default.
DEFAULT_BUCKETS = 65536
_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    # splitmix64's finaliser: every input bit affects every output bit.
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class RendezvousHash(TableHashPolicy):
    """Weighted rendezvous hashing: a key goes to the live node with the highest
    score, so when a node leaves only its own keys move (exactly 1/N on average).

    :param nodes: initial nodes.
    :param table_size: buckets of the tabulated mode (``>= 1024``), or ``None``
        for exact per-key scoring (O(N) per pick).
    :param seed: reshuffles the mapping (see :class:`KeyHasher`).
    :param secret: keyed hash so chosen keys cannot aim at one node.
    :param balance_factor: bounded load (``>= 1``); the next candidates are the
        next-highest scores (exact) or the following buckets (tabulated).
    :raises InvalidArgument: bad table_size.
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
        balance_factor: float | None = None,
    ) -> None:
        if table_size is not None and (
            isinstance(table_size, bool) or not isinstance(table_size, int) or table_size < 1024
        ):
            raise InvalidArgument("table_size", table_size, "must be an int >= 1024 or None")
        self._size = table_size
        self._crc_seed = seed if secret is None else None
        self._table: list[Node] = []
        self._fast: tuple[list[Node], int] | None = None
        self._ranked: tuple[tuple[Node, int], ...] = ()
        super().__init__(nodes, seed=seed, secret=secret, balance_factor=balance_factor)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "table_size": self._size}

    @property
    def table_size(self) -> int | None:
        """Buckets, or None in exact mode."""
        return self._size

    def _rebuild(self) -> None:
        nodes = sorted(self._live, key=lambda n: n.hash_id)
        self._ranked = tuple((n, self._hasher.node_int(n.hash_id, 8)) for n in nodes)
        if self._size is None or not nodes:
            self._table = []
            self._publish()
            return
        b = self._size
        cols = []
        for idx, n in enumerate(nodes):
            raw = self._hasher.node_bytes(n.hash_id, 4 * b)
            col = array("Q")
            if n.weight == 1:
                # (word << 16) | idx laid out as little-endian 64-bit ints with slice
                # copies (C speed): bytes 0-1 idx, bytes 2-5 the word, bytes 6-7 zero.
                buf = bytearray(8 * b)
                for j in range(4):
                    buf[2 + j :: 8] = raw[j::4]
                buf[0::8] = bytes((idx & 0xFF,)) * b
                buf[1::8] = bytes((idx >> 8,)) * b
                col.frombytes(bytes(buf))
                if sys.byteorder == "big":
                    col.byteswap()
            else:
                words = array("I")
                words.frombytes(raw)
                if sys.byteorder == "big":
                    words.byteswap()  # the words are defined little-endian
                # u ** (1/w) with u = (word + 0.5) / 2**32, back on the 32-bit scale.
                u = map(truediv, map(add, words, repeat(0.5)), repeat(4294967296.0))
                q = map(int, map(mul, map(pow, u, repeat(1.0 / n.weight)), repeat(4294967295.0)))
                col.extend(map(add, map(mul, q, repeat(65536)), repeat(idx)))
            # (score << 16) | idx: max() picks the best score, ties by hash_id order.
            cols.append(col)
        self._table = [nodes[v & 0xFFFF] for v in map(max, zip(*cols, strict=True))]
        self._publish()

    def _publish(self) -> None:
        seed = self._crc_seed
        if self._table and seed is not None and self._balance_factor is None:
            self._fast = (self._table, seed)
        else:
            self._fast = None

    def _exact_scores(self, key: bytes) -> list[tuple[float, str, Node]]:
        h = self._hasher.hash32(key)
        h = h | (h << 32)
        scale = 1.0 / (1 << 53)
        scored = []
        for n, s in self._ranked:
            u = ((_mix64(h ^ s) >> 11) + 0.5) * scale
            scored.append((u if n.weight == 1 else u ** (1.0 / n.weight), n.hash_id, n))
        return scored

    def _exact_order(self, key: bytes) -> list[Node]:
        scored = self._exact_scores(key)
        scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
        return [t[2] for t in scored]

    def _choose(self, key: bytes | None) -> Node:
        assert key is not None
        if self._balance_factor is not None:
            return self._choose_bounded(key)
        return next(self._candidates(key))

    def _candidates(self, key: bytes) -> Iterator[Node]:
        if not self._live:
            raise self._unavailable()
        if self._size is None:
            if self._balance_factor is None:
                yield max(self._exact_scores(key), key=lambda t: (t[0], t[1]))[2]
            else:
                yield from self._exact_order(key)
            return
        table = self._table
        m = len(table)
        start = self._hasher.hash32(key) % m
        for i in range(m):
            yield table[(start + i) % m]
