"""Balance policies: pure (no I/O), pluggable, thread-safe.

See :mod:`reuselb.balance._base` for the rules every policy follows.
"""

from ._base import (
    MAX_TABLE_SIZE,
    MAX_WEIGHT,
    BalanceDiff,
    BalancePolicy,
    HashPolicy,
    Key,
    KeyHasher,
    Lease,
    Node,
    NodeLike,
    NodeRef,
    NodeState,
    diff,
)
from ._factory import POLICIES, make_policy
from ._leastconn import LeastConn, PowerOfTwo
from ._maglev import MaglevHash
from ._rendezvous import RendezvousHash
from ._ring import (
    KETAMA_MODES,
    MAX_POINTS,
    MAX_VNODES,
    RingHash,
    ketama_points,
    libketama_digests,
    libmemcached_digests,
)
from ._roundrobin import RoundRobin, smooth_wrr_cycle

__all__ = (
    "KETAMA_MODES",
    "MAX_POINTS",
    "MAX_TABLE_SIZE",
    "MAX_VNODES",
    "MAX_WEIGHT",
    "POLICIES",
    "BalanceDiff",
    "BalancePolicy",
    "HashPolicy",
    "Key",
    "KeyHasher",
    "Lease",
    "LeastConn",
    "MaglevHash",
    "Node",
    "NodeLike",
    "NodeRef",
    "NodeState",
    "PowerOfTwo",
    "RendezvousHash",
    "RingHash",
    "RoundRobin",
    "diff",
    "ketama_points",
    "libketama_digests",
    "libmemcached_digests",
    "make_policy",
    "smooth_wrr_cycle",
)
