"""``make_policy``: policies by name (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .._errors import UnknownPolicy
from ._base import BalancePolicy, NodeLike
from ._leastconn import LeastConn, PowerOfTwo
from ._maglev import MaglevHash
from ._rendezvous import RendezvousHash
from ._ring import RingHash
from ._roundrobin import RoundRobin

__all__ = ["POLICIES", "make_policy"]

#: Every name ``make_policy`` accepts, and its class (``"hash"`` is Maglev).
POLICIES: dict[str, type[BalancePolicy]] = {
    "round-robin": RoundRobin,
    "least-conn": LeastConn,
    "p2c": PowerOfTwo,
    "hash": MaglevHash,
    "maglev": MaglevHash,
    "ring": RingHash,
    "rendezvous": RendezvousHash,
}


def make_policy(name: str, nodes: Iterable[NodeLike] = (), **options: Any) -> BalancePolicy:
    """Build a policy by name.

    :param name: one of :data:`POLICIES`: ``"round-robin"``, ``"least-conn"``,
        ``"p2c"``, ``"hash"`` (= ``"maglev"``), ``"maglev"``, ``"ring"``,
        ``"rendezvous"``.
    :param nodes: initial nodes (``Node`` objects or addresses).
    :param options: keyword arguments of that policy's class.
    :returns: the policy.
    :raises UnknownPolicy: unknown name.
    :raises TypeError: an option the policy does not take.
    """
    cls = POLICIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UnknownPolicy(name, tuple(POLICIES))
    return cls(nodes, **options)
