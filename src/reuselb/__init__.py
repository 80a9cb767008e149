"""reuselb: Linux socket and load-balancing primitives.

SO_REUSEPORT listeners and groups, socket handoff, CPU steering, pluggable
balance policies and a splice(2) relay. No server loop of its own: every helper
runs in the caller's thread or on the caller's asyncio loop.

This module only re-exports; each primitive lives in one private module.
"""

from ._address import Address, AddressLike, parse_address
from ._errors import (
    AddressError,
    AddressInUse,
    DuplicateNode,
    GroupMemberError,
    HandoffError,
    HostNotFound,
    InvalidArgument,
    InvalidKey,
    KeyRequired,
    LeaseReleased,
    NoNodeAvailable,
    ReuselbError,
    ReuseportUnsupported,
    SocketClosed,
    SteeringError,
    UnknownNode,
    UnknownPolicy,
    WrongSocketType,
)
from ._handoff import (
    DrainResult,
    drain_close,
    inherit_sockets,
    inherited_sockets,
    listen_fds,
    recv_sockets,
    send_sockets,
    tcp_migrate_req,
)
from ._relay import End, RelayStats, async_pipe_splice, pipe_splice, release_pipes
from ._sockets import (
    ReuseportGroup,
    SocketInfo,
    connect_tcp,
    hold_port,
    reuseport_group,
    reuseport_listener,
    reuseport_udp,
    socket_info,
    supports_reuseport,
    tcp_socket,
    udp_socket,
)
from ._steering import (
    attach_cpu_steering,
    attach_hash_steering,
    detach_steering,
    get_incoming_cpu,
    hash_steering_index,
    set_incoming_cpu,
    steer_all_to,
    steer_away_from,
)
from ._version import __version__
from .balance import (
    BalanceDiff,
    BalancePolicy,
    KeyHasher,
    Lease,
    LeastConn,
    MaglevHash,
    Node,
    NodeState,
    PowerOfTwo,
    RendezvousHash,
    RingHash,
    RoundRobin,
    diff,
    make_policy,
)

__all__ = (
    "__version__",
    # errors
    "ReuselbError",
    "AddressError",
    "AddressInUse",
    "GroupMemberError",
    "HandoffError",
    "HostNotFound",
    "InvalidArgument",
    "ReuseportUnsupported",
    "SocketClosed",
    "SteeringError",
    "WrongSocketType",
    "NoNodeAvailable",
    "UnknownNode",
    "DuplicateNode",
    "LeaseReleased",
    "UnknownPolicy",
    "KeyRequired",
    "InvalidKey",
    # handoff, restarts, steering
    "DrainResult",
    "drain_close",
    "inherit_sockets",
    "inherited_sockets",
    "tcp_migrate_req",
    "attach_cpu_steering",
    "attach_hash_steering",
    "hash_steering_index",
    "detach_steering",
    "get_incoming_cpu",
    "set_incoming_cpu",
    "steer_all_to",
    "steer_away_from",
    "listen_fds",
    "recv_sockets",
    "send_sockets",
    # relay
    "End",
    "RelayStats",
    "async_pipe_splice",
    "pipe_splice",
    "release_pipes",
    # addresses
    "Address",
    "AddressLike",
    "parse_address",
    # sockets
    "ReuseportGroup",
    "SocketInfo",
    "connect_tcp",
    "hold_port",
    "reuseport_group",
    "reuseport_listener",
    "reuseport_udp",
    "socket_info",
    "supports_reuseport",
    "tcp_socket",
    "udp_socket",
    # balance policies
    "BalanceDiff",
    "BalancePolicy",
    "KeyHasher",
    "Lease",
    "LeastConn",
    "MaglevHash",
    "Node",
    "NodeState",
    "PowerOfTwo",
    "RendezvousHash",
    "RingHash",
    "RoundRobin",
    "diff",
    "make_policy",
)
