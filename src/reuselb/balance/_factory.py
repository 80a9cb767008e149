"""``make_policy``: policies by name (pure, no I/O)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from .._errors import InvalidArgument, UnknownPolicy
from ._base import BalancePolicy, NodeLike, _secret_error
from ._leastconn import LeastConn, PowerOfTwo
from ._maglev import MaglevHash
from ._rendezvous import RendezvousHash
from ._ring import RingHash
from ._roundrobin import RoundRobin

__all__ = ["POLICIES", "make_policy"]

POLICIES: dict[str, type[BalancePolicy]] = {
    "round-robin": RoundRobin,
    "least-conn": LeastConn,
    "p2c": PowerOfTwo,
    "hash": MaglevHash,
    "maglev": MaglevHash,
    "ring": RingHash,
    "rendezvous": RendezvousHash,
}
"""Every name ``make_policy`` accepts, and its class (``"hash"`` is Maglev)."""


#: make_policy's default nodes (compared by identity: ``nodes != ()`` would run a
#: caller's ``__ne__``).
_NO_NODES: tuple[()] = ()


class _UnknownOption(InvalidArgument, TypeError):
    """An option the policy does not take: an InvalidArgument (a ReuselbError) that is
    also the TypeError the class itself raises, so ``except TypeError`` keeps working."""


def _accepted_options(cls: type[BalancePolicy]) -> tuple[str, ...] | None:
    """The keyword options *cls* takes besides its nodes, or None for ``**kwargs``."""
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):  # no signature to read: let the class decide
        return None
    kind = inspect.Parameter
    if any(p.kind is kind.VAR_KEYWORD for p in params):
        return None
    # the first positional parameter takes the nodes
    if params and params[0].kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD):
        params = params[1:]
    return tuple(
        p.name for p in params if p.kind in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)
    )


def make_policy(
    name: str, nodes: Iterable[NodeLike] = _NO_NODES, /, **options: Any
) -> BalancePolicy:
    """Build a policy by name.

    ``name`` and ``nodes`` are positional-only, so every keyword (even ``name=``) is
    an option of the policy; ``nodes=`` is still taken as the nodes.

    :param name: one of :data:`POLICIES`: ``"round-robin"``, ``"least-conn"``,
        ``"p2c"``, ``"hash"`` (= ``"maglev"``), ``"maglev"``, ``"ring"``,
        ``"rendezvous"``.
    :param nodes: initial nodes (``Node`` objects or addresses).
    :param options: keyword arguments of that policy's class.
    :returns: the policy.
    :raises UnknownPolicy: unknown name.
    :raises InvalidArgument: an option the policy does not take (the error names it
        and lists the options the policy takes; it is also a ``TypeError``, as the
        policy's class raises; a ``secret=`` is described by its type and length only,
        never shown), an option out of range, the nodes given twice
        (positionally and as ``nodes=``), or *nodes* is not an iterable of nodes.
    :raises DuplicateNode: two nodes share an address or a name.
    :raises AddressError: an address is malformed.
    """
    cls = POLICIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UnknownPolicy(name, tuple(POLICIES))
    if "nodes" in options:
        given = options.pop("nodes")
        if nodes is not _NO_NODES:
            raise InvalidArgument("nodes", given, "given twice: positionally and as nodes=")
        nodes = given
    accepted = _accepted_options(cls)
    if accepted is not None:
        for option, value in options.items():
            if option not in accepted:
                takes = f"only {', '.join(accepted)}" if accepted else "no options"
                reason = f"not an option of {name!r} ({cls.__name__}), which takes {takes}"
                if option == "secret":
                    # A config switched from "maglev" to "round-robin" still
                    # carries its key: name its type and length only, as the hash
                    # policies do for a bad secret, or the key lands in the logs.
                    raise _secret_error(value, reason, _UnknownOption)
                raise _UnknownOption(option, value, reason)
    return cls(nodes, **options)
