"""Connection-counting policies: :class:`LeastConn` and :class:`PowerOfTwo`.

Rules of this module: pure (no I/O); they count :class:`~reuselb.Lease` objects,
so use ``acquire``/``release`` (``pick`` sees the counts but adds nothing). Both
pick under the policy lock, since they read every candidate's count.
"""

from __future__ import annotations

import itertools
import random
from bisect import bisect_right
from collections.abc import Iterable
from typing import Any

from .._errors import InvalidArgument
from ._base import BalancePolicy, Node, NodeLike, _Slot

__all__ = ["LeastConn", "PowerOfTwo"]


class LeastConn(BalancePolicy):
    """Fewest active leases relative to weight (``active / weight``).

    Ties are broken round robin: the scan starts just after the node picked last,
    so the nodes tied for the fewest leases take turns, an even share each, whatever
    busier nodes sit between them. O(N) per pick under the lock.

    :param nodes: initial nodes.
    :raises DuplicateNode: two nodes share an address or a name, or one node's name
        is another node's address.
    :raises AddressError: an address in *nodes* is malformed.
    :raises InvalidArgument: *nodes* is one address string, a mapping or not
        iterable at all.
    """

    name = "least-conn"

    def __init__(self, nodes: Iterable[NodeLike] = ()) -> None:
        self._next = 0
        self._ring: list[tuple[_Slot, int]] = []
        #: each slot's position in ``_ring`` (one lookup per pick, not per node).
        self._index: dict[_Slot, int] = {}
        super().__init__(nodes)

    def _rebuild(self) -> None:
        self._ring = [(self._slots[n.address], n.weight) for n in self._live]
        self._index = {slot: i for i, (slot, _) in enumerate(self._ring)}

    def _choose(self, key: bytes | None) -> Node:
        ring = self._ring
        n = len(ring)
        if not n:
            raise self._unavailable()
        start = self._next % n
        best, best_w = ring[start]
        best_a = best.active
        for slot, w in itertools.chain(ring[start + 1 :], ring[:start]):
            a = slot.active
            # a / w < best_a / best_w without floats
            if a * best_w < best_a * w:
                best, best_a, best_w = slot, a, w
        # The next scan starts after the winner, not after ``start``: the first
        # tied node after a busy run would otherwise win every scan that starts
        # in the run (one busy node among three gave the next idle one 2/3).
        self._next = self._index[best] + 1
        return best.node


class PowerOfTwo(BalancePolicy):
    """Power of two choices: two random distinct live nodes (weighted), the less
    loaded (``active / weight``) wins; ties go to the first drawn.

    The first node is drawn with probability proportional to its weight, the
    second from the other live nodes, again in proportion to their weights (one
    draw each, whatever the weights).

    Max load falls from ``ln n / ln ln n`` (one random choice) to
    ``ln ln n / ln 2`` (Mitzenmacher). O(log N) per pick under the lock (two
    binary searches of the running weight totals).

    :param nodes: initial nodes.
    :param seed: an int seeding the policy's own ``random.Random`` (tests, replay),
        or None for a fresh random seed.
    :raises InvalidArgument: the seed is not an int or None, or *nodes* is one
        address string, a mapping or not iterable at all.
    :raises DuplicateNode: two nodes share an address or a name, or one node's name
        is another node's address.
    :raises AddressError: an address in *nodes* is malformed.
    """

    name = "p2c"

    def __init__(self, nodes: Iterable[NodeLike] = (), *, seed: int | None = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            # random.Random would take str/bytes/float too, or raise a bare TypeError
            raise InvalidArgument("seed", seed, "must be an int or None")
        self._seed = seed
        self._rng = random.Random(seed)
        self._cum: list[int] = []
        super().__init__(nodes)

    def _options(self) -> dict[str, Any]:
        return {"seed": self._seed}

    def _rebuild(self) -> None:
        total = 0
        cum = []
        for n in self._live:
            total += n.weight
            cum.append(total)
        self._cum = cum

    def _choose(self, key: bytes | None) -> Node:
        live = self._live
        if not live:
            raise self._unavailable()
        if len(live) == 1:
            return live[0]
        cum = self._cum
        total = cum[-1]
        randrange = self._rng.randrange
        i = bisect_right(cum, randrange(total))
        a = live[i]
        w = a.weight
        # The second node is drawn from the other nodes' weights in one draw: r
        # runs over the total less node i's weight, and stepping over node i's
        # slice [cum[i] - w, cum[i]) of the cumulative weights maps it onto the
        # others in proportion to their weights. (Redrawing until another node
        # came up gave up after 64 draws landing on a heavy node and took the node
        # after it: with weights 1000, 1, 1 that fallback picked node 2 as the
        # second choice ~88% of the time, so the two weight-1 nodes took 336 and
        # 219 of 200,000 picks, and those 64 draws cost ~16 us a pick.) Every live
        # node has a weight > 0, so with two or more of them total - w > 0.
        r = randrange(total - w)
        if r >= cum[i] - w:
            r += w
        b = live[bisect_right(cum, r)]
        slots = self._slots
        if slots[b.address].active * a.weight < slots[a.address].active * b.weight:
            return b
        return a
