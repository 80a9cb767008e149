"""Smooth weighted round robin (nginx's order), precomputed: a pick is O(1) and lock-free.

Rules of this module: pure (no I/O); the whole cycle is computed when membership,
weights or states change, and published by one attribute store, so a pick only
reads ``schedule[next(counter) % len(schedule)]``. ``next()`` on an
``itertools.count`` is one C call, atomic under the GIL, so concurrent pickers get
distinct positions without a lock.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from operator import add

from ._base import (
    BalancePolicy,
    Key,
    Node,
    NodeLike,
    NodeState,
    check_weight,
    key_bytes,
    node_list,
)

__all__ = ["RoundRobin", "smooth_wrr_cycle"]


def smooth_wrr_cycle(nodes: Iterable[NodeLike]) -> list[Node]:
    """One full cycle of nginx's smooth weighted round robin.

    Each step adds every node's weight to its running ``current``, picks the
    largest ``current`` (first in order on ties) and subtracts the total weight
    from it. Weights are divided by their gcd first; the cycle has
    ``sum(weights) / gcd`` entries and each node appears ``weight / gcd`` times.

    The cost is O(distinct weights x cycle length), not O(nodes x cycle length):
    nodes of equal weight are simulated as one group (see below), so 100 nodes
    with weights 1000 and 999 (a 99,950-entry cycle) take ~50 ms, where 100
    distinct weights near 1000 still take 0.5-0.7 s.

    :param nodes: what a policy constructor takes: :class:`Node` objects or
        addresses (each a ``Node`` of weight 1), read once; those that are down,
        draining or of weight 0 are left out, as :class:`RoundRobin` schedules
        none of them (all are checked for duplicates; the weights of those kept,
        as RoundRobin checks them).
    :returns: the cycle, of :class:`Node` objects.
    :raises InvalidArgument: *nodes* is one address (a string, or a
        ``(host, port)`` or IPv6 4-tuple), a mapping or not iterable at all, or a
        weight is not an int in ``0..MAX_WEIGHT`` (a Node whose weight was forced
        past its check); the error names the value.
    :raises AddressError: an item of *nodes* is neither a :class:`Node` nor an
        address (``None``, ``1.5``, bytes, a ``[host, port]`` list) or is a
        malformed address, or *nodes* is a tuple that can only be one address and a
        malformed one.
    :raises DuplicateNode: two nodes share an address or a name, or one node's name
        is another node's address (listed twice, a node would get twice its turns).
    """
    # Checked as a whole (duplicates among down nodes too), the up ones cycled: the
    # cycle of RoundRobin(nodes).schedule. (_cycle checks the weights and leaves
    # out those of weight 0.)
    return _cycle([n for n in node_list(nodes) if n.state is NodeState.UP])


def _cycle(nodes: Sequence[Node]) -> list[Node]:
    """:func:`smooth_wrr_cycle` of *nodes* that passed a policy's checks already.

    RoundRobin calls this on its live nodes at every rebuild: the duplicate checks
    of :func:`node_list` (a name parsed as an address for each named node) would
    triple the cost of a rebuild of 100 nodes, for nodes the policy checked when
    they were added.
    """
    live = []
    for n in nodes:
        # Node checks its weight, but a forced one (object.__setattr__) would turn
        # into a negative-length or endless cycle here: check again, cheaply.
        if check_weight(n.weight) > 0:
            live.append(n)
    if not live:
        return []
    g = 0
    for n in live:
        g = math.gcd(g, n.weight)
    # Nodes of equal weight take their turns in node order: their ``current``
    # values differ only by ``total`` x (picks so far), so the largest is the one
    # picked least, the first of those on a tie. A group of them therefore behaves
    # like one node whose ``current`` is its next member's, and which drops by
    # ``total`` only when all its members have had their turn. Simulating groups
    # gives the very same order with one entry per distinct weight.
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(live):
        groups.setdefault(n.weight // g, []).append(i)
    members = list(groups.values())
    total = sum(w * len(m) for w, m in groups.items())
    # One int per group, current x k + (k - 1 - next member's index): max() then
    # compares current first and, on a tie, prefers the lower node index, as
    # nginx does; and the per-step work is three C passes (map, max, index).
    k = len(live)
    keys = [k - 1 - m[0] for m in members]
    step = [w * k for w in groups]
    drop = total * k
    picks = [0] * len(members)
    out: list[Node] = []
    for _ in range(total):
        keys = list(map(add, keys, step))
        best = keys.index(max(keys))
        group = members[best]
        p = picks[best]
        turn = group[p % len(group)]
        p += 1
        picks[best] = p
        after = group[p % len(group)]
        # the next member's tie-break field; the group drops once all had a turn
        keys[best] += turn - after - (drop if p % len(group) == 0 else 0)
        out.append(live[turn])
    return out


class RoundRobin(BalancePolicy):
    """Smooth weighted round robin: a node of weight 3 gets 3 of every ``sum(w)`` picks,
    spread out, never bursts: weights ``a=3, b=1`` give ``a a b a``, where plain
    weighted round robin gives ``a a a b``.

    Memory is one list entry per weight unit (after dividing by the gcd). Every
    membership, weight or state change rebuilds the cycle under the policy lock,
    in O(distinct weights x cycle length): see :func:`smooth_wrr_cycle`.

    :param nodes: initial nodes.
    :raises DuplicateNode: two nodes share an address or a name, or one node's name
        is another node's address.
    :raises AddressError: an address in *nodes* is malformed.
    :raises InvalidArgument: *nodes* is one address string, a mapping or not
        iterable at all.
    """

    name = "round-robin"
    lock_free_pick = True

    def __init__(self, nodes: Iterable[NodeLike] = ()) -> None:
        self._schedule: tuple[Node, ...] = ()
        self._next = itertools.count().__next__
        super().__init__(nodes)

    def _rebuild(self) -> None:
        self._schedule = tuple(_cycle(self._live))

    def _choose(self, key: bytes | None) -> Node:
        schedule = self._schedule
        if not schedule:
            raise self._unavailable()
        return schedule[self._next() % len(schedule)]

    def pick(self, key: Key = None) -> Node:
        """The next node of the cycle; *key* is checked but ignored.

        :param key: ignored (``str``, bytes-like or ``None``), but checked as every
            policy checks it.
        :returns: a live node.
        :raises InvalidKey: the key is not str or bytes-like, is a str with a
            lone surrogate, is a released memoryview or is a buffer that cannot be
            read (a closed ``mmap``).
        :raises NoNodeAvailable: no live node.
        """
        # The key is ignored but checked like everywhere else, so switching policy
        # never turns an accepted key into an error. isascii() is a flag test: an
        # ASCII str always encodes, anything else goes through the full check.
        if key is not None and (key.__class__ is not str or not key.isascii()):
            key_bytes(key)
        schedule = self._schedule
        if schedule:
            return schedule[self._next() % len(schedule)]
        raise self._unavailable()

    @property
    def schedule(self) -> tuple[Node, ...]:
        """The current cycle (read only)."""
        return self._schedule
