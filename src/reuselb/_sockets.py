"""Socket factories, reuseport listeners and groups, capability probes, socket_info.

Rules of this module:

* every socket is created with SOCK_CLOEXEC in the same ``socket(2)`` call, so a
  ``fork()+exec()`` in another thread can never inherit it (setting FD_CLOEXEC
  afterwards leaves a window; see PEP 446);
* SO_REUSEPORT is set before ``bind``: the kernel decides group membership at bind
  time (socket(7)). One exception: a UDP socket binding port 0 on Linux gets it
  just after, so that it gets a port no other socket holds (_udp_option_after_bind);
* every factory closes what it made when it fails, and never closes a socket the
  caller passed in;
* asking for a kernel-balanced listener on a system whose kernel does not balance
  raises :class:`~reuselb.ReuseportUnsupported` instead of silently handing back
  sockets that all feed one process;
* nothing here runs a loop or starts a thread.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import math
import os
import socket
import struct
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from typing_extensions import Self

from ._address import Address, AddressLike, parse_address, resolve_address
from ._errors import (
    AddressError,
    AddressInUse,
    GroupMemberError,
    HostNotFound,
    InvalidArgument,
    ReuselbError,
    ReuseportUnsupported,
    SocketClosed,
    WrongSocketType,
)

__all__ = [
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
]

# Linux and the BSDs have the flag; elsewhere CPython still makes sockets
# non-inheritable (PEP 446), only not atomically.
_CLOEXEC: int = getattr(socket, "SOCK_CLOEXEC", 0)
_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)
# FreeBSD 12+ balances only with SO_REUSEPORT_LB (0x10000 in <sys/socket.h>);
# CPython does not export the constant on every version.
_SO_REUSEPORT_LB = 0x00010000
# Linux 4.2+: bind() with port 0 before connect() defers the port choice to
# connect(), so a proxy dialing from a fixed source IP does not exhaust ports.
_IP_BIND_ADDRESS_NO_PORT = 24
_TCP_FASTOPEN = getattr(socket, "TCP_FASTOPEN", 23)
_TCP_DEFER_ACCEPT = getattr(socket, "TCP_DEFER_ACCEPT", 9)
# CPython keeps timeouts as int64 nanoseconds and raises OverflowError beyond about
# 9.2e9 s (292 years); a billion seconds (31 years) is past any wait a caller means.
_MAX_SECONDS = 1e9
# listen() and setsockopt() take a C int: a larger Python int makes CPython raise
# OverflowError (listen) or TypeError (setsockopt falls back to a bytes buffer).
_C_INT_MAX = 2**31 - 1

Kind = Literal["tcp", "udp"]


# --------------------------------------------------------------------------- capabilities


@dataclass(frozen=True)
class _Capability:
    option: int | None  # the sockopt that gives kernel balancing, if any
    exists: bool  # SO_REUSEPORT (or _LB) can be set and two sockets can bind
    balances: bool  # the kernel spreads connections across members
    reason: str  # why not, when balances is False


def _platform_option(platform: str) -> tuple[int | None, bool, str]:
    """(option, kernel balances, reason) from what the platform is documented to do."""
    if platform.startswith("linux"):
        # Linux 3.9+: members hash by 4-tuple (LWN 542629).
        return getattr(socket, "SO_REUSEPORT", 15), True, ""
    if platform.startswith("freebsd"):
        # FreeBSD 12+: SO_REUSEPORT only allows the bind; SO_REUSEPORT_LB balances.
        return getattr(socket, "SO_REUSEPORT_LB", _SO_REUSEPORT_LB), True, ""
    if platform == "darwin":
        return (
            getattr(socket, "SO_REUSEPORT", None),
            False,
            "macOS accepts SO_REUSEPORT but delivers every connection to the last socket "
            "bound; use one listener shared by fork, or Linux",
        )
    if platform in ("win32", "cygwin"):
        return None, False, "Windows has no SO_REUSEPORT"
    opt = getattr(socket, "SO_REUSEPORT", None)
    return opt, False, f"{platform} is not known to balance SO_REUSEPORT groups"


# What a kernel (or a seccomp filter) that does not allow a SO_REUSEPORT group
# answers: the option unknown, the second bind refused, the call forbidden. Only
# the SO_REUSEPORT setsockopt and the second bind can say so: any other error
# (EMFILE, ENOBUFS...; EADDRINUSE from the first bind, when no ephemeral port is
# free) says nothing about SO_REUSEPORT and is raised, so that a probe made while
# the process was out of fds or ports is not remembered as "no".
_PROBE_REFUSED = frozenset(
    {errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP, errno.EADDRINUSE, errno.EPERM, errno.EACCES}
)
# No IPv4 loopback here (an IPv6-only namespace): probe on ::1 instead.
_PROBE_NO_FAMILY = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL})


def _probe(option: int) -> bool:
    """Bind two sockets to one loopback port with *option*: does the kernel allow it?

    Only the SO_REUSEPORT setsockopts and the second bind answer the question.
    TCP first; when no TCP port of the ephemeral range is free (a proxy holding
    ~28k outgoing connections has used them up), UDP, whose ports are counted
    apart and whose SO_REUSEPORT groups came with the same kernels (Linux 3.9).

    :raises AddressInUse: the first bind found no free ephemeral port, TCP or UDP.
    :raises OSError: the probe could not run (e.g. EMFILE); nothing is learnt then.
    """
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with contextlib.ExitStack() as made:
                try:
                    first = made.enter_context(_new_socket(family, kind, False))
                except OSError as exc:
                    if exc.errno in _PROBE_NO_FAMILY and family == socket.AF_INET:
                        break
                    raise
                # UDP on Linux: the option after bind, as _bound gives it to a port-0
                # UDP member; set before, the first bind could pick a port another
                # group of this user holds (see _udp_option_after_bind), and both probe
                # sockets would take a share of that group's datagrams meanwhile.
                after_bind = _udp_option_after_bind(kind)
                if not after_bind and not _probe_option(first, option):
                    return False
                try:
                    first.bind((host, 0))
                except OSError as exc:
                    if exc.errno in _PROBE_NO_FAMILY and family == socket.AF_INET:
                        break
                    if exc.errno == errno.EADDRINUSE:
                        if kind == socket.SOCK_STREAM:
                            continue  # no free TCP port: UDP answers the same question
                        # Port 0 and EADDRINUSE for TCP and UDP: every port of the
                        # namespace's net.ipv4.ip_local_port_range is taken. One
                        # socket with SO_REUSEPORT says nothing about a group yet.
                        # AddressInUse, as the caller's own port-0 bind would raise
                        # (its docs promise that type); a fixed-port caller learns
                        # that the probe, not its address, lacked a port.
                        raise AddressInUse(
                            f"{host} port 0",
                            "the SO_REUSEPORT probe needs one (TCP or UDP); nothing was "
                            "remembered, the next call probes again",
                            ephemeral=True,
                        ) from exc
                    raise
                if after_bind and not _probe_option(first, option):
                    return False
                second = made.enter_context(_new_socket(family, kind, False))
                try:
                    second.setsockopt(socket.SOL_SOCKET, option, 1)
                    second.bind(first.getsockname())
                except OSError as exc:
                    if exc.errno in _PROBE_REFUSED:
                        return False
                    raise
                return True
    raise AssertionError("unreachable")  # pragma: no cover


def _probe_option(sock: socket.socket, option: int) -> bool:
    """Set *option* on a probe socket: False when the kernel refuses it.

    :raises OSError: any other error, which says nothing about SO_REUSEPORT.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, option, 1)
    except OSError as exc:
        if exc.errno in _PROBE_REFUSED:
            return False
        raise
    return True


@functools.cache
def _capability() -> _Capability:
    # Probed once per process, by trying (a constant can exist on a kernel that
    # rejects it, e.g. Linux < 3.9 or seccomp-filtered containers). A probe that
    # raises is not cached (functools.cache keeps only results): the next call
    # probes again.
    option, balances, reason = _platform_option(sys.platform)
    if option is None:
        return _Capability(None, False, False, reason)
    if not _probe(option):
        return _Capability(
            option, False, False, "the kernel refused to bind two sockets with SO_REUSEPORT"
        )
    return _Capability(option, True, balances, reason)


def supports_reuseport(*, balanced: bool = True) -> bool:
    """Whether this system can build SO_REUSEPORT groups.

    The answer comes from a real probe (two sockets bound to one loopback port),
    made once per process.

    :param balanced: ask whether the *kernel balances* connections across members
        (Linux; FreeBSD with SO_REUSEPORT_LB), not only whether the option exists
        (macOS accepts it but sends everything to the last socket bound).
    :returns: True when the requested level is available.
    :raises InvalidArgument: *balanced* is not a bool.
    :raises AddressInUse: the probe found no free TCP or UDP port in the ephemeral range (an
        ``OSError`` with ``EADDRINUSE``); no answer is remembered then, and the next
        call probes again.
    :raises OSError: the probe could not run (``EMFILE``: no fd left); the same.
    """
    balanced = check_flag("balanced", balanced)
    cap = _capability()
    return cap.balances if balanced else cap.exists


def _reuseport_option(balanced: bool) -> int:
    cap = _capability()
    if cap.option is None or not cap.exists:
        raise ReuseportUnsupported(cap.reason or "SO_REUSEPORT is not available")
    if balanced and not cap.balances:
        raise ReuseportUnsupported(
            f"{cap.reason} (pass balanced=False to get the socket without balancing)"
        )
    return cap.option


# --------------------------------------------------------------------------- factories


def _new_socket(
    family: socket.AddressFamily, kind: socket.SocketKind, nonblocking: bool
) -> socket.socket:
    flags = _CLOEXEC | (_NONBLOCK if nonblocking else 0)
    sock = socket.socket(family, kind | flags)
    if nonblocking and not _NONBLOCK:
        try:
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
    return sock


def _check_family(family: object) -> socket.AddressFamily:
    # An int (AddressFamily is one) and not a bool: "in" alone compares by ==, which
    # let 2.0 and 10.0 through as AF_INET and AF_INET6.
    if (
        isinstance(family, bool)
        or not isinstance(family, int)
        or family not in (socket.AF_INET, socket.AF_INET6)
    ):
        raise InvalidArgument("family", family, "expected socket.AF_INET or socket.AF_INET6")
    return socket.AddressFamily(family)


def tcp_socket(
    family: socket.AddressFamily = socket.AF_INET,
    *,
    nonblocking: bool = False,
    nodelay: bool = False,
) -> socket.socket:
    """A new TCP socket, created close-on-exec in the same syscall.

    An ``AF_INET6`` socket keeps the kernel's default ``IPV6_V6ONLY``
    (``net.ipv6.bindv6only``, 0 on most systems): set it before ``bind`` where it
    matters, as the listener factories do.

    :param family: ``AF_INET`` or ``AF_INET6``.
    :param nonblocking: create it with ``SOCK_NONBLOCK`` (Python timeout 0).
    :param nodelay: set ``TCP_NODELAY``.
    :returns: the socket; the caller owns it.
    :raises InvalidArgument: *family* is not ``AF_INET`` or ``AF_INET6`` (an int; a
        float or a bool is refused), or a flag is not a bool.
    :raises OSError: the kernel refused to create it.
    """
    family = _check_family(family)
    nodelay = check_flag("nodelay", nodelay)
    sock = _new_socket(family, socket.SOCK_STREAM, check_flag("nonblocking", nonblocking))
    try:
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def udp_socket(
    family: socket.AddressFamily = socket.AF_INET, *, nonblocking: bool = False
) -> socket.socket:
    """A new UDP socket, created close-on-exec in the same syscall.

    An ``AF_INET6`` socket keeps the kernel's default ``IPV6_V6ONLY``
    (``net.ipv6.bindv6only``, 0 on most systems): set it before ``bind`` where it
    matters, as the listener factories do.

    :param family: ``AF_INET`` or ``AF_INET6``.
    :param nonblocking: create it with ``SOCK_NONBLOCK`` (Python timeout 0).
    :returns: the socket; the caller owns it.
    :raises InvalidArgument: *family* is not ``AF_INET`` or ``AF_INET6`` (an int; a
        float or a bool is refused), or *nonblocking* is not a bool.
    :raises OSError: the kernel refused to create it.
    """
    family = _check_family(family)
    return _new_socket(family, socket.SOCK_DGRAM, check_flag("nonblocking", nonblocking))


def _somaxconn() -> int:
    # The kernel silently caps listen()'s backlog at net.core.somaxconn, so asking
    # for exactly that gives the largest queue the administrator allows.
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return socket.SOMAXCONN


def _check_zone(family: socket.AddressFamily, sockaddr: Any, value: object) -> None:
    """Refuse a link-local IPv6 address whose zone names no interface, before any socket.

    The same ``fe80::1`` can be on every link, so the kernel needs the interface
    (``__ipv6_addr_needs_scope_id``: link-local unicast, and interface- or
    link-local multicast) and answers ``bind``/``connect`` without one with a bare
    EINVAL, and with an index no interface has with ENODEV. A numeric zone passes
    getaddrinfo whether or not the interface exists, hence the lookup here. The
    scope id of any other address is ignored by the kernel.
    """
    if family != socket.AF_INET6:
        return
    ip = ipaddress.IPv6Address(sockaddr[0].partition("%")[0])
    if not (ip.is_link_local or (ip.is_multicast and (ip.packed[1] & 0x0F) in (1, 2))):
        return
    if not sockaddr[3]:
        raise AddressError(
            value,
            f"a link-local address needs a zone naming its interface, e.g. [{ip}%eth0]",
        )
    try:
        socket.if_indextoname(sockaddr[3])
    except OSError:
        raise AddressError(
            value, f"no interface with index {sockaddr[3]} (the address's zone)"
        ) from None


# The addresses a dual-stack socket binds: parse_address gives the any-address of
# both families (host "", bound as "::" with V6ONLY off) for ":port", "*:port", an
# int port and ("", port) or ("*", port); "::" itself; and an IPv4-mapped address,
# which takes IPv4 to that address alone. Linux's bind() sets IPV6_V6ONLY on a
# socket bound to any other IPv6 address (net/ipv6/af_inet6.c, __inet6_bind: not
# IPV6_ADDR_ANY and not IPV6_ADDR_MAPPED), so dualstack would take no IPv4 there.
# ::ffff:0.0.0.0 is mapped too, but it is 0.0.0.0: every IPv4 address and no IPv6
# one (__inet6_bind binds the socket's IPv4 address to INADDR_ANY), so it is
# refused as 0.0.0.0 is.
_DUALSTACK_NEEDS = (
    "dualstack=True needs the any-address of both families (':{port}', '*:{port}' "
    "or '[::]:{port}') or an IPv4-mapped IPv6 address"
)


def _bind_target(
    address: Address, kind: socket.SocketKind, dualstack: bool, value: object
) -> tuple[socket.AddressFamily, Any]:
    # *value* is what the caller passed: errors name it as they wrote it.
    needs = _DUALSTACK_NEEDS.format(port=address.port)
    if dualstack:
        if address.host == "":
            return socket.AF_INET6, ("::", address.port, 0, 0)
        if address.family == socket.AF_INET:
            # 0.0.0.0 is a wildcard too (Address.is_wildcard), but of IPv4 alone: an
            # AF_INET socket, which V6ONLY does not apply to, never takes IPv6.
            what = (
                "not 0.0.0.0, which is IPv4's alone"
                if address.is_wildcard
                else "not an IPv4 address"
            )
            raise AddressError(value, f"{needs}, {what}")
    family = socket.AF_INET6 if dualstack else socket.AF_UNSPEC
    try:
        target = resolve_address(address, kind, passive=True, family=family, value=value)[0]
    except AddressError as exc:
        if address.is_literal:
            raise  # a zone naming no interface: nothing to do with dualstack
        # A name with IPv4 addresses only (say "localhost" in an /etc/hosts without
        # ::1): what dualstack needs comes first, as for a name that resolves to
        # ::1 below; resolve_address's reason ("'localhost' has no IPv6 address,
        # only IPv4 (127.0.0.1)") says what the name has instead.
        reason = exc.reason.removeprefix(f"{address.host!r} ")
        raise AddressError(value, f"{needs}, not {address.host!r}, which {reason}") from None
    if target[0] == socket.AF_INET6:
        ip = ipaddress.IPv6Address(target[1][0].partition("%")[0])
        mapped = ip.ipv4_mapped
        # A name is named as the caller wrote it, with the address it resolved to.
        shown = (
            target[1][0]
            if address.is_literal
            else f"{address.host!r} (it resolves to {target[1][0]})"
        )
        if dualstack and mapped is not None and mapped.is_unspecified:
            # ::ffff:0.0.0.0 is 0.0.0.0 (see _DUALSTACK_NEEDS): Linux binds it as
            # IPv4's any-address, so the "dual-stack" socket would take no IPv6.
            raise AddressError(value, f"{needs}, not {shown}, which is IPv4's alone")
        if dualstack and not ip.is_unspecified and mapped is None:
            # Linux's bind() turns IPV6_V6ONLY back on for a specific, non-mapped
            # IPv6 address (__inet6_bind), so dualstack=True would silently give an
            # IPv6-only socket: no IPv4 client ever reaches it.
            raise AddressError(
                value,
                f"{needs}, not {shown}: "
                "Linux makes a socket bound to any other IPv6 address IPv6-only",
            )
        if mapped is not None and not dualstack:
            # Every IPv6 socket made here is V6ONLY unless dualstack, and Linux
            # refuses to bind a V6ONLY socket to an IPv4-mapped address with a bare
            # EINVAL (net/ipv6/af_inet6.c, __inet6_bind): say why before making it.
            # (dualstack=True is no way out for ::ffff:0.0.0.0, refused above.)
            alternative = "" if mapped.is_unspecified else ", or pass dualstack=True"
            raise AddressError(
                value,
                f"{target[1][0]} is an IPv4-mapped address, which an IPv6-only socket "
                f"cannot bind; bind {mapped} instead{alternative}",
            )
    _check_zone(target[0], target[1], value)
    return target


def _bound(
    address: AddressLike,
    kind: socket.SocketKind,
    *,
    dualstack: bool,
    nonblocking: bool,
    balanced: bool,
    reuseaddr: bool,
) -> socket.socket:
    dualstack = check_flag("dualstack", dualstack)
    nonblocking = check_flag("nonblocking", nonblocking)
    addr = parse_address(address)
    option = _reuseport_option(check_flag("balanced", balanced))
    family, sockaddr = _bind_target(addr, kind, dualstack, address)
    # Linux's UDP autobind takes a port that only SO_REUSEPORT sockets of this user
    # hold for one that has SO_REUSEPORT too (see _udp_option_after_bind): a port-0
    # UDP member is bound without it, so it gets a port no socket holds.
    after_bind = sockaddr[1] == 0 and _udp_option_after_bind(kind)
    sock = _new_socket(family, kind, nonblocking)
    try:
        if reuseaddr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if not after_bind:
            sock.setsockopt(socket.SOL_SOCKET, option, 1)
        if family == socket.AF_INET6:
            # Explicit either way: the default comes from net.ipv6.bindv6only and a
            # [::] member with V6ONLY off also takes IPv4 (and conflicts with 0.0.0.0).
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dualstack else 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(
                    str(parse_address(sockaddr)), exc.strerror or "", ephemeral=sockaddr[1] == 0
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise AddressError(str(addr), "not an address of this host") from None
            if exc.errno == errno.ENODEV and family == socket.AF_INET6 and sockaddr[3]:
                # The interface went away after _bind_target looked it up. Only an
                # IPv6 sockaddr has a zone (an IPv4 one is a 2-tuple); an ENODEV
                # without one (a seccomp filter can return any errno) is left bare.
                raise AddressError(
                    str(addr), f"no interface with index {sockaddr[3]} (the address's zone)"
                ) from None
            if exc.errno == errno.EINVAL:
                # Whatever EINVAL _bind_target cannot foresee is still this address's
                # fault (the socket is new and unbound), not a failure to report bare.
                raise AddressError(
                    str(addr), f"the kernel refused to bind it ({exc.strerror})"
                ) from None
            if exc.errno is None:
                raise
            # EACCES for a port below net.ipv4.ip_unprivileged_port_start, or what a
            # seccomp or LSM policy returns: the same OSError subclass (OSError(errno,
            # ...) picks PermissionError for EACCES/EPERM) and strerror, naming the
            # address as its filename ("[Errno 13] Permission denied: '127.0.0.1:1'"),
            # which the kernel's bare "[Errno 13] Permission denied" does not.
            raise OSError(exc.errno, exc.strerror, str(addr)) from exc
        if after_bind:
            sock.setsockopt(socket.SOL_SOCKET, option, 1)
            _start_group(sock, option)
    except BaseException:
        sock.close()
        raise
    return sock


def _udp_option_after_bind(kind: socket.SocketKind) -> bool:
    """Whether a UDP socket binding port 0 gets SO_REUSEPORT only after ``bind``.

    Linux's UDP autobind (``udp_lib_get_port``) treats a port whose sockets all
    have SO_REUSEPORT and this user id as free for a new socket that has
    SO_REUSEPORT too (``udp_lib_lport_inuse``), so a port-0 member could land on a
    port another group, or another program, of the same user holds, join its group
    and take a share of its datagrams (TCP's ``inet_csk_find_open_port`` skips such
    ports). Bound without the option, the socket gets a port no socket holds; the
    option set afterwards lets the group's other members join it. Linux only:
    FreeBSD puts a socket in its SO_REUSEPORT_LB group when it binds, so the option
    must come first there.
    """
    return kind == socket.SOCK_DGRAM and sys.platform.startswith("linux")


def _start_group(sock: socket.socket, option: int) -> None:
    """Make *sock*, bound without SO_REUSEPORT and given it since, a kernel group.

    Linux makes a socket's group (``sk_reuseport_cb``) when the socket binds with
    SO_REUSEPORT, or when a second socket joins it (``reuseport_add_sock`` makes
    it for the first). Until then a socket given the option after ``bind`` has
    none, and a reuseport BPF program attached through it fails with EINVAL
    (``reuseport_attach_prog``): a one-member group could not be steered. So a
    helper joins and leaves at once; the group stays, with *sock* its member 0.
    A datagram that reaches the helper in those microseconds, sent to a port the
    kernel has just chosen, is lost.

    :raises OSError: the helper could not be made or bound (e.g. EMFILE).
    """
    with _new_socket(sock.family, socket.SOCK_DGRAM, False) as helper:
        helper.setsockopt(socket.SOL_SOCKET, option, 1)
        if sock.family == socket.AF_INET6:
            # The kernel groups only sockets with the same V6ONLY setting.
            v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            helper.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        # getsockname() keeps an IPv6 scope id, so the helper binds the same device.
        helper.bind(sock.getsockname())


def _positive_int(name: str, value: object, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(name, value, "must be an int")
    if value < minimum:
        raise InvalidArgument(name, value, f"must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise InvalidArgument(name, value, f"must be <= {maximum}")
    return value


def _check_listener_options(backlog: object, fastopen: object, defer_accept: object) -> None:
    # Each is a C int to the kernel, so anything up to INT_MAX is accepted and the
    # kernel clamps it to what it can do; beyond INT_MAX CPython cannot pass it.
    if backlog is not None:
        # listen(2) caps the backlog at net.core.somaxconn without an error.
        _positive_int("backlog", backlog, minimum=1, maximum=_C_INT_MAX)
    if fastopen is not None:
        # TCP_FASTOPEN's pending-request limit is capped at net.core.somaxconn too.
        _positive_int("fastopen", fastopen, minimum=1, maximum=_C_INT_MAX)
    if defer_accept is not None:
        # The kernel turns seconds into a count of SYN-ACK retransmits, at most 255:
        # values above about 30,000 s (8.3 hours) all read back as that limit.
        _positive_int("defer_accept", defer_accept, minimum=0, maximum=_C_INT_MAX)


def reuseport_listener(
    address: AddressLike,
    *,
    backlog: int | None = None,
    dualstack: bool = False,
    nonblocking: bool = False,
    fastopen: int | None = None,
    defer_accept: int | None = None,
    nodelay: bool = False,
    balanced: bool = True,
) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT set before ``bind``.

    Each process (or thread) that calls this with the same address joins one
    reuseport group, and the kernel spreads new connections across the members by
    a hash of the 4-tuple. Each member has its own accept queue.

    SO_REUSEADDR is also set: on a TCP listener it only allows rebinding while old
    connections sit in TIME_WAIT after a restart; it never lets two listeners share
    a port (that is SO_REUSEPORT's job, with its same-user-id check).

    :param address: ``"host:port"``, ``"[v6]:port"``, ``":port"``/``"*:port"`` (all
        interfaces), ``(host, port)`` or an int port; see :func:`parse_address`.
    :param backlog: accept queue length, ``1`` to ``2**31 - 1`` (the kernel caps it at
        ``net.core.somaxconn``); ``None`` means that cap.
    :param dualstack: for ``::``, the any-address of both families (``":port"``,
        ``"*:port"``, ``"[::]:port"``), accept IPv4 too (V6ONLY off); an
        IPv4-mapped address (``"[::ffff:127.0.0.1]:port"``) is accepted too and
        takes IPv4 to that address alone. Not for IPv4 addresses (``0.0.0.0``
        included, and ``::ffff:0.0.0.0``, which is it: IPv4's any-address alone)
        nor any other IPv6 address: Linux's ``bind`` makes a socket on one
        IPv6-only. Without it IPv6 listeners set ``IPV6_V6ONLY``.
    :param nonblocking: create the socket non-blocking.
    :param fastopen: enable TCP Fast Open with this many pending requests, ``1`` to
        ``2**31 - 1`` (the kernel caps it at ``net.core.somaxconn``).
    :param defer_accept: seconds to wait for data before waking ``accept``
        (``TCP_DEFER_ACCEPT``), ``0`` to ``2**31 - 1`` (the kernel rounds it to a
        count of SYN-ACK retransmits and stops at about 30,000 s).
    :param nodelay: set ``TCP_NODELAY``; on Linux accepted sockets inherit it.
    :param balanced: require that the kernel balances the group (default); pass
        False to accept SO_REUSEPORT without balancing (macOS).
    :returns: the listening socket; the caller owns it.
    :raises AddressError: the address is malformed, not an address of this host,
        an IPv4-mapped IPv6 address without *dualstack*, an IPv4 address with
        *dualstack* (``0.0.0.0`` too, or ``::ffff:0.0.0.0``: it is IPv4's
        any-address alone; ``":port"`` or ``"[::]:port"`` is both families'), an
        IPv6 address other than ``::`` or an IPv4-mapped one with *dualstack*, a
        name that resolves to neither with *dualstack* (IPv4 only, or ``::1``), a
        link-local IPv6 address without a zone, an IPv6 address whose zone names no
        interface, or refused by ``bind`` with EINVAL.
    :raises HostNotFound: the host name does not resolve (in any family).
    :raises AddressInUse: a socket outside this reuseport group holds the address
        (``bind`` refused it, or ``listen`` did: a socket bound with SO_REUSEADDR
        only may share the port until one of the two listens), or, for port 0, no
        port of the ephemeral range is free; for any port, a fixed one too, the
        process's first SO_REUSEPORT probe (see :func:`supports_reuseport`) found
        no free TCP or UDP port in the ephemeral range (nothing is made; the next
        call probes again).
    :raises ReuseportUnsupported: the system cannot give what *balanced* asks for.
    :raises InvalidArgument: *backlog*, *fastopen* or *defer_accept* is not an int or
        out of its range, or a flag is not a bool (checked before any socket is made).
    :raises OSError: the kernel refused otherwise (for example ``PermissionError``
        for a port below 1024), or that probe could not run (``EMFILE``: no fd
        left; the next call probes again).
    """
    _check_listener_options(backlog, fastopen, defer_accept)
    nodelay = check_flag("nodelay", nodelay)
    sock = _bound(
        address,
        socket.SOCK_STREAM,
        dualstack=dualstack,
        nonblocking=nonblocking,
        balanced=balanced,
        reuseaddr=True,
    )
    try:
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if fastopen is not None:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_FASTOPEN, fastopen)
        if defer_accept is not None:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_DEFER_ACCEPT, defer_accept)
        try:
            sock.listen(_somaxconn() if backlog is None else backlog)
        except OSError as exc:
            # Linux lets a socket with SO_REUSEADDR but without SO_REUSEPORT stay
            # bound on the port next to ours while neither listens; if it starts
            # listening between our bind() and listen(), the conflict shows here.
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(
                    str(parse_address(sock.getsockname())), exc.strerror or ""
                ) from None
            raise
    except BaseException:
        sock.close()
        raise
    return sock


def reuseport_udp(
    address: AddressLike,
    *,
    dualstack: bool = False,
    nonblocking: bool = False,
    balanced: bool = True,
) -> socket.socket:
    """A bound UDP socket with SO_REUSEPORT, never SO_REUSEADDR.

    SO_REUSEADDR on UDP lets any local process bind the same port and steal
    datagrams (CPython's asyncio dropped ``reuse_address`` for UDP for this reason);
    SO_REUSEPORT keeps the same-user-id check.

    With port 0 the socket gets a port that no socket holds. Linux's UDP autobind
    would hand a socket that has SO_REUSEPORT a port held only by SO_REUSEPORT
    sockets of the same user, joining their group and taking a share of their
    datagrams; so on Linux this socket binds first and sets SO_REUSEPORT just after
    (a helper socket joins and leaves at once to start the kernel group, which a
    steering program needs: the call briefly uses a second fd). Members that bind
    the port afterwards join it. Other code of the same user that binds port 0 with
    SO_REUSEPORT set can still be handed this port by the kernel later, and join.

    :param address: see :func:`reuseport_listener`.
    :param dualstack: for ``::``, the any-address of both families, take IPv4 too
        (V6ONLY off); an IPv4-mapped address takes IPv4 to that one address (see
        :func:`reuseport_listener`).
    :param nonblocking: create the socket non-blocking.
    :param balanced: require kernel balancing (see :func:`reuseport_listener`).
    :returns: the bound socket; the caller owns it.
    :raises AddressError: the address is malformed, not local, an IPv4-mapped
        IPv6 address without *dualstack*, an IPv4 address with *dualstack*
        (``0.0.0.0`` too, or ``::ffff:0.0.0.0``: it is IPv4's any-address alone;
        ``":port"`` or ``"[::]:port"`` is both families'), an IPv6 address other
        than ``::`` or an IPv4-mapped one with *dualstack*, a name that resolves to
        neither with *dualstack* (IPv4 only, or ``::1``), a link-local IPv6 address
        without a zone, an IPv6 address whose zone names no interface, or refused by
        ``bind`` with EINVAL.
    :raises HostNotFound: the host name does not resolve (in any family).
    :raises AddressInUse: a socket outside this reuseport group holds the address,
        or, for port 0, no port of the ephemeral range is free; for any port, a
        fixed one too, the process's first SO_REUSEPORT probe (see
        :func:`supports_reuseport`) found no free TCP or UDP port in the ephemeral
        range (nothing is made; the next call probes again).
    :raises ReuseportUnsupported: the system cannot give what *balanced* asks for.
    :raises InvalidArgument: a flag is not a bool.
    :raises OSError: the kernel refused otherwise, or that probe could not run
        (``EMFILE``: no fd left; the next call probes again).
    """
    return _bound(
        address,
        socket.SOCK_DGRAM,
        dualstack=dualstack,
        nonblocking=nonblocking,
        balanced=balanced,
        reuseaddr=False,
    )


def hold_port(
    address: AddressLike, *, dualstack: bool = False, balanced: bool = True
) -> socket.socket:
    """A bound, never-listening SO_REUSEPORT TCP socket that reserves a port for a group.

    A supervisor makes one before starting its workers (with port 0 the kernel picks
    a free port: read it back with ``getsockname()``), so the port stays reserved
    while workers start, crash and restart. It never receives a connection: only
    *listening* members are in the kernel's TCP lookup. (There is no UDP version: a
    bound UDP member does receive datagrams.)

    :param address: see :func:`reuseport_listener`.
    :param dualstack: as for :func:`reuseport_listener` (the workers must match).
    :param balanced: as for :func:`reuseport_listener`.
    :returns: the bound socket; close it to release the port.
    :raises AddressError: the address is malformed, not local, an IPv4-mapped
        IPv6 address without *dualstack*, an IPv4 address with *dualstack*
        (``0.0.0.0`` too, or ``::ffff:0.0.0.0``: it is IPv4's any-address alone;
        ``":port"`` or ``"[::]:port"`` is both families'), an IPv6 address other
        than ``::`` or an IPv4-mapped one with *dualstack*, a name that resolves to
        neither with *dualstack* (IPv4 only, or ``::1``), a link-local IPv6 address
        without a zone, an IPv6 address whose zone names no interface, or refused by
        ``bind`` with EINVAL.
    :raises HostNotFound: the host name does not resolve (in any family).
    :raises AddressInUse: a socket outside this reuseport group holds the address,
        or, for port 0, no port of the ephemeral range is free; for any port, a
        fixed one too, the process's first SO_REUSEPORT probe (see
        :func:`supports_reuseport`) found no free TCP or UDP port in the ephemeral
        range (nothing is made; the next call probes again).
    :raises ReuseportUnsupported: the system cannot give what *balanced* asks for.
    :raises InvalidArgument: a flag is not a bool.
    :raises OSError: the kernel refused otherwise, or that probe could not run
        (``EMFILE``: no fd left; the next call probes again).
    """
    # No SO_REUSEADDR: Linux lets two SO_REUSEADDR sockets share a port while neither
    # listens, so an outsider with it (socket.create_server sets it) could take the
    # port from under a holder that had it. Workers still join through SO_REUSEPORT.
    return _bound(
        address,
        socket.SOCK_STREAM,
        dualstack=dualstack,
        nonblocking=False,
        balanced=balanced,
        reuseaddr=False,
    )


# --------------------------------------------------------------------------- groups


class ReuseportGroup:
    """Members of one reuseport group, owned together, in join order.

    Join order matters: a reuseport BPF program returns an index into the group in
    the order members joined it, the order they listened for TCP and bound for UDP
    (see ``attach_cpu_steering``). The group closes every
    member it still owns on :meth:`close` or when its ``with`` block ends;
    :meth:`take` hands one member to the caller, who then owns it.
    """

    def __init__(self, members: list[socket.socket], address: Address, kind: Kind) -> None:
        self._members: list[socket.socket | None] = list(members)
        # The members given away with take(), by slot: weak, because the caller owns
        # them now (a strong reference would keep a dropped socket's fd open). They
        # let drain_close() find a taken member's slot to keep the group in step.
        self._taken: dict[int, weakref.ref[socket.socket]] = {}
        # Apart from the taken slots: after close() every slot is empty too, and
        # "member 0 was taken" would then be wrong.
        self._closed = False
        self.address = address
        self.kind: Kind = kind

    @property
    def members(self) -> tuple[socket.socket, ...]:
        """The members still owned by the group, in join order."""
        return tuple(m for m in self._members if m is not None)

    @property
    def port(self) -> int:
        """The port every member is bound to."""
        return self.address.port

    def fileno(self, index: int) -> int:
        """The file descriptor of member *index*.

        :raises InvalidArgument: *index* is not an int.
        :raises IndexError: no member at *index*, it was taken, or the group is closed.
        """
        return self[index].fileno()

    def take(self, index: int) -> socket.socket:
        """Give member *index* to the caller: the group will no longer close it.

        :raises InvalidArgument: *index* is not an int.
        :raises IndexError: no member at *index*, it was already taken, or the group
            is closed.
        """
        sock = self[index]
        self._members[index] = None
        self._taken[index % len(self._members)] = weakref.ref(sock)
        return sock

    def _slot(self, sock: socket.socket) -> int:
        """The slot of *sock*, held or taken; -1 when it is not a member."""
        for i, m in enumerate(self._members):
            if m is sock or (m is None and (ref := self._taken.get(i)) and ref() is sock):
                return i
        return -1

    def _remove(self, index: int) -> tuple[list[socket.socket | None], dict[int, Any]]:
        # Mirror the kernel: when a member leaves, the last member takes its slot in
        # the group's array (net/core/sock_reuseport.c), and BPF indexes follow that.
        # The new state is built aside and published by one tuple assignment (no
        # call between the two stores, so no signal handler runs there): drain_close
        # tells a finished removal by the size, and an interrupt after a pop() but
        # before the move left the closed member listed and the last one dropped
        # (closed by the garbage collector, resetting the clients in its queue).
        members = self._members[:]
        taken = dict(self._taken)
        last_index = len(members) - 1
        last = members.pop()
        last_taken = taken.pop(last_index, None)
        taken.pop(index, None)
        if index < last_index:
            members[index] = last
            if last_taken is not None:
                taken[index] = last_taken
        before = self._members, self._taken
        self._members, self._taken = members, taken
        return before

    def _taken_back(
        self,
        before: tuple[list[socket.socket | None], dict[int, Any]],
        index: int,
        sock: socket.socket,
    ) -> None:
        """Undo a ``_remove(index)`` that returned *before*, for a member whose
        socket stayed in the kernel's group (drain_close found another copy of it
        open): its slot is back, held as a taken member's, by *sock*."""
        members, taken = list(before[0]), dict(before[1])
        members[index] = None
        taken[index] = weakref.ref(sock)
        self._members, self._taken = members, taken

    def close(self) -> None:
        """Close every member the group still owns (idempotent)."""
        self._closed = True
        for i, sock in enumerate(self._members):
            if sock is not None:
                sock.close()
                self._members[i] = None

    def __len__(self) -> int:
        return len(self._members)

    def __getitem__(self, index: int) -> socket.socket:
        # Checked here for every caller (take, fileno): a str would be a bare
        # TypeError from the list, a bool a member (True is 1), a slice a list.
        if isinstance(index, bool) or not isinstance(index, int):
            raise InvalidArgument("index", index, "must be an int")
        if self._closed:
            raise IndexError(f"no member {index}: the group is closed")
        if not -len(self._members) <= index < len(self._members):
            raise IndexError(f"no member {index}: the group has {len(self._members)}")
        sock = self._members[index]
        if sock is None:
            raise IndexError(f"member {index} was taken from the group")
        return sock

    def __iter__(self) -> Iterator[socket.socket]:
        return iter(self.members)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return f"<ReuseportGroup {self.kind} {self.address} closed>"
        return (
            f"<ReuseportGroup {self.kind} {self.address} "
            f"{len(self.members)}/{len(self._members)} members>"
        )


def reuseport_group(
    address: AddressLike, count: int, *, kind: Kind = "tcp", **options: Any
) -> ReuseportGroup:
    """*count* members bound to one port, made all or nothing.

    With port 0 the kernel picks a port that no socket holds for the first member
    (for UDP on Linux, because that member sets SO_REUSEPORT only after ``bind``:
    see :func:`reuseport_udp`) and the rest bind to it. A host name is resolved
    once: the other members bind the address the first one got, so all are in one
    kernel group even when the name has several addresses. If any member fails,
    every member already made is closed and the error says which member failed and
    why.

    :param address: see :func:`reuseport_listener`.
    :param count: how many members (>= 1).
    :param kind: ``"tcp"`` (listening sockets) or ``"udp"`` (bound sockets).
    :param options: passed to :func:`reuseport_listener` or :func:`reuseport_udp`.
    :returns: a :class:`ReuseportGroup` owning the members.
    :raises InvalidArgument: *count* < 1, *kind* unknown, a listener option out
        of range or a flag not a bool (before any socket is made).
    :raises GroupMemberError: member *k* failed with an ``OSError`` or
        ``ValueError``; the cause is chained.
    :raises AddressError: the address is malformed, IPv4-mapped IPv6 without
        ``dualstack=True``, IPv4 (``0.0.0.0`` included, IPv4's any-address alone,
        and ``::ffff:0.0.0.0``) or IPv6 other than ``::`` or an IPv4-mapped address
        with it, or a name that resolves to neither with it,
        link-local IPv6 without a zone, or IPv6 with a zone naming no interface
        (before any socket is made).
    :raises HostNotFound: the host name does not resolve, in any family (before
        any socket).
    :raises ReuseportUnsupported: see :func:`reuseport_listener` (before any socket).
    :raises AddressInUse: the process's first SO_REUSEPORT probe (see
        :func:`supports_reuseport`) found no free TCP or UDP port in the ephemeral
        range (before any member is made; the next call probes again).
    :raises OSError: that probe could not run (``EMFILE``: no fd left), before any
        member is made; the next call probes again.
    :raises TypeError: an option the factory does not take. Any other exception
        (``KeyboardInterrupt`` included) also propagates unchanged, after the
        members already made are closed.
    """
    count = _positive_int("count", count, minimum=1)
    if kind not in ("tcp", "udp"):
        raise InvalidArgument("kind", kind, "expected 'tcp' or 'udp'")
    factory = reuseport_listener if kind == "tcp" else reuseport_udp
    addr = parse_address(address)
    if kind == "tcp":
        # A bad option is the caller's, not member 0's: report it as itself.
        _check_listener_options(
            options.get("backlog"), options.get("fastopen"), options.get("defer_accept")
        )
    # Checked once up front: no member is worth making on a system that cannot
    # give the group the caller asked for.
    for flag in ("balanced", "dualstack", "nonblocking", "nodelay"):
        if flag in options:
            check_flag(flag, options[flag])
    _reuseport_option(options.get("balanced", True))
    # So are the address's own faults (IPv4-mapped without dualstack, IPv4 with it):
    # they are the caller's, named as the caller wrote them, not "member 0 failed".
    _bind_target(
        addr,
        socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM,
        bool(options.get("dualstack", False)),
        address,
    )
    members: list[socket.socket] = []
    # What the members bind: after member 0, the address it actually got. A host
    # name resolved again per member could give another address each time (DNS
    # round robin, a changed /etc/hosts), and members on two addresses are two
    # kernel groups. The 4-tuple keeps an IPv6 scope id as the zone.
    target = addr
    try:
        for index in range(count):
            try:
                sock = factory(target, **options)
            except (OSError, ValueError) as exc:
                raise GroupMemberError(index, count, str(addr), exc) from exc
            members.append(sock)
            if index == 0:
                bound = sock.getsockname()
                addr = addr.with_port(bound[1])
                target = parse_address(bound)
    except BaseException:
        # Whatever stopped the loop (a member's error, a TypeError from an unknown
        # option, KeyboardInterrupt between two members), the group is all or
        # nothing: close what was made, then let the exception go on unchanged.
        for sock in members:
            sock.close()
        raise
    return ReuseportGroup(members, addr, kind)


# --------------------------------------------------------------------------- clients


def connect_tcp(
    address: AddressLike,
    *,
    timeout: float | None = None,
    nodelay: bool = True,
    source: AddressLike | None = None,
    nonblocking: bool = False,
) -> socket.socket:
    """A connected, close-on-exec TCP client socket: what a proxy dials backends with.

    Each resolved address is tried in turn; the first that connects wins.

    :param address: the peer, see :func:`parse_address` (a wildcard means loopback).
    :param timeout: seconds for the connect (a positive, finite int or float; None
        waits as long as the kernel does); the returned socket is blocking (or
        non-blocking with *nonblocking*), without a timeout.
    :param nodelay: set ``TCP_NODELAY`` (default: proxies relay small messages).
    :param source: local address to bind first; with port 0 the port is chosen at
        connect time (``IP_BIND_ADDRESS_NO_PORT``) so many dials from one source IP
        do not exhaust ephemeral ports. Only peers of the source's family are
        tried.
    :param nonblocking: return the socket non-blocking.
    :returns: the connected socket; the caller owns it.
    :raises InvalidArgument: *timeout* is not a positive, finite int or float (at
        most 1e9 seconds), or a flag is not a bool.
    :raises AddressError: an address is malformed, *address* is a link-local IPv6
        literal without a zone or an IPv6 literal whose zone names no interface,
        *source* is not an address of this host, is link-local without a usable
        zone, is of another family (IPv4/IPv6) than every address of the peer (for
        a name: has no address in any of the peer's families), or cannot be bound
        for another reason (the ``OSError`` is chained; no other peer address is
        tried).
    :raises AddressInUse: *source* names a port that another socket holds, or a
        recent connection from it still in TIME_WAIT (Linux keeps the port bound
        for 60 seconds after an active close; SO_REUSEADDR would share it only if
        both that connection's socket and the new one had it, and
        ``connect_tcp`` sets it on neither).
    :raises HostNotFound: a host name does not resolve (in any family).
    :raises OSError: every candidate failed (the last error, naming the address:
        ``ConnectionRefusedError``, ``TimeoutError``, ...; the original is chained).
    """
    if timeout is not None:
        # Before any socket exists: settimeout() would raise OverflowError for inf
        # and TypeError for a str.
        timeout = check_seconds("timeout", timeout, allow_zero=False)
    nodelay = check_flag("nodelay", nodelay)
    nonblocking = check_flag("nonblocking", nonblocking)
    addr = parse_address(address)
    src = parse_address(source) if source is not None else None
    last: OSError | None = None
    mismatch: ReuselbError | None = None
    for family, sockaddr in resolve_address(addr, socket.SOCK_STREAM, passive=False, value=address):
        if addr.is_literal:
            # The caller's own literal: the kernel's EINVAL/ENODEV would read as a
            # connect failure of the peer. (A name's candidates are tried in turn.)
            _check_zone(family, sockaddr, address)
        peer = parse_address(sockaddr)
        src_sockaddr = None
        if src is not None:
            # A socket has one family: an IPv6 source cannot dial an IPv4 peer.
            # Skip such candidates (a name may have both families) and say so only
            # if none is left.
            if src.family not in (socket.AF_UNSPEC, family):
                mismatch = AddressError(
                    source,
                    f"the source is {_family_name(src.family)} but the peer {peer} is "
                    f"{_family_name(family)}",
                )
                continue
            try:
                src_sockaddr = resolve_address(
                    src, socket.SOCK_STREAM, passive=True, family=family, value=source
                )[0][1]
            except HostNotFound as exc:
                mismatch = exc
                continue
            except AddressError as exc:
                # A source name with no address of this peer's family ("localhost"
                # with 127.0.0.1 only, for a peer on ::1): another candidate of the
                # peer may fit it. A literal's AddressError (a zone naming no
                # interface) is the source's own fault, whatever the peer.
                if src.is_literal:
                    raise
                mismatch = AddressError(
                    source, f"{exc.reason}, and the peer {peer} is {_family_name(family)}"
                )
                continue
            _check_zone(family, src_sockaddr, source)
        sock = _new_socket(family, socket.SOCK_STREAM, False)
        try:
            if nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if src is not None and src_sockaddr is not None:
                _bind_source(sock, src_sockaddr, source, src)
        except BaseException:
            sock.close()
            raise
        # Only the connect is the peer's: its failure moves on to the next candidate.
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            sock.settimeout(0.0 if nonblocking else None)
        except OSError as exc:
            sock.close()
            last = _connect_error(exc, peer)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    if last is None:
        # No candidate was tried: the source fits none of the peer's families.
        assert mismatch is not None  # resolve_address never returns an empty list
        raise mismatch
    raise last


def _bind_source(sock: socket.socket, sockaddr: Any, source: object, src: Address) -> None:
    """Bind *sock* to connect_tcp's *source*: whatever bind says is the source's fault.

    Raised, not recorded as a candidate's failure: no other address of the peer can
    fix a source that does not bind, and a connect error naming the peer would
    mislead.
    """
    if sockaddr[1] == 0 and sys.platform.startswith("linux"):
        sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            if sockaddr[1] == 0:
                raise AddressInUse(str(src), exc.strerror or "", ephemeral=True) from None
            raise _source_in_use(src, exc.strerror or "") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise AddressError(source, "not an address of this host") from None
        if exc.errno == errno.ENODEV and sock.family == socket.AF_INET6 and sockaddr[3]:
            # The zone's interface went away after _check_zone looked it up. Only an
            # IPv6 sockaddr has a zone: an IPv4 2-tuple has no sockaddr[3].
            reason = f"no interface with index {sockaddr[3]} (the address's zone)"
        else:
            reason = f"the kernel refused to bind the source ({exc.strerror or exc})"
        # Chained: the errno (EACCES for a port below 1024...) stays readable.
        raise AddressError(source, reason) from exc


def _source_in_use(src: Address, detail: str) -> AddressInUse:
    """The AddressInUse of a connect_tcp *source* whose port another socket holds.

    Not AddressInUse's own message, which blames the holder ("lacks SO_REUSEPORT,
    or belongs to another user id"): connect_tcp's socket has no SO_REUSEPORT, so
    any socket holding the port refuses it, whatever that socket's options. The
    holder need not be a socket anyone has open: a connection from the same
    source that this process closed first stays in TIME_WAIT for 60 seconds and
    keeps the port bound (inet_csk_bind_conflict counts it), which is the usual
    cause when a caller reuses a fixed source port.
    """
    exc = AddressInUse(str(src), detail)
    msg = f"source address {src} is in use by another socket or a recent connection in TIME_WAIT"
    # OSError.__init__ again, as AddressInUse.__init__ calls it: errno, strerror
    # and args (which __str__ reads) all take the new message.
    OSError.__init__(exc, errno.EADDRINUSE, f"{msg}: {detail}" if detail else msg)
    return exc


def _family_name(family: socket.AddressFamily) -> str:
    return "IPv6" if family == socket.AF_INET6 else "IPv4"


def _connect_error(exc: OSError, peer: Address) -> OSError:
    """*exc* again, with its errno (so its ``OSError`` subclass) and a message naming *peer*."""
    if exc.errno is None and isinstance(exc, TimeoutError):
        new: OSError = TimeoutError(f"connect to {peer} timed out")
    elif exc.errno is None:
        new = OSError(f"connect to {peer}: {exc}")
    else:
        # OSError(errno, msg) returns the errno's subclass (ConnectionRefusedError,
        # ...), so callers' except clauses still match. Rebuilding with type(exc)
        # would call a subclass's own __init__ with the wrong arguments.
        new = OSError(exc.errno, f"connect to {peer}: {exc.strerror or exc}")
    new.__cause__ = exc
    return new


# --------------------------------------------------------------------------- inspection


@dataclass(frozen=True)
class SocketInfo:
    """What a socket really is, read back from the kernel.

    :ivar fd: the file descriptor.
    :ivar family: ``AF_INET``/``AF_INET6``/... (a :class:`socket.AddressFamily`, or
        the plain int for a family that enum does not name, such as ``AF_XDP``).
    :ivar type: ``SOCK_STREAM``/``SOCK_DGRAM``/... (a :class:`socket.SocketKind`, or
        the plain int for a type it does not name, such as ``SOCK_PACKET``).
    :ivar address: the bound IP address (``AF_INET``/``AF_INET6``), or None when
        unbound or of another family (an ``AF_UNIX`` path is not an address
        here: read it with ``sock.getsockname()``). A link-local IPv6
        address keeps its zone (as the interface index: ``[fe80::1%2]:80``), so it
        can be passed to :func:`connect_tcp` or a listener again.
    :ivar reuseport: SO_REUSEPORT is set.
    :ivar reuseaddr: SO_REUSEADDR is set.
    :ivar v6only: ``IPV6_V6ONLY`` for IPv6 sockets, None otherwise.
    :ivar inheritable: the fd would survive ``exec`` (FD_CLOEXEC clear).
    :ivar listening: ``listen()`` was called (SO_ACCEPTCONN).
    :ivar backlog: the accept queue's limit as the kernel applies it (after the
        ``somaxconn`` cap), for listening TCP sockets on Linux; else None, and None
        too when the kernel's sock_diag netlink interface could not be read (no fd
        left for its socket, or netlink refused by a sandbox).
    :ivar queued: connections waiting in the accept queue now (same conditions).
    :ivar inode: the socket's inode: two fds with the same inode are ONE socket
        (shared by fork or dup), distinct inodes on one port are a reuseport group.
    """

    fd: int
    family: socket.AddressFamily | int
    type: socket.SocketKind | int
    address: Address | None
    reuseport: bool
    reuseaddr: bool
    v6only: bool | None
    inheritable: bool
    listening: bool
    backlog: int | None
    queued: int | None
    inode: int


def check_flag(name: str, value: object) -> bool:
    """*value* if it is a bool.

    A flag is not read for its truth: ``close="no"`` or ``nonblocking="false"``
    (a value from a config file) would otherwise mean True.

    :raises InvalidArgument: *value* is not a bool.
    """
    if value is True or value is False:
        return value
    raise InvalidArgument(name, value, "must be a bool (True or False)")


def check_seconds(name: str, value: object, *, allow_zero: bool) -> float:
    """*value* as float seconds if it is a finite, non-negative int or float.

    :raises InvalidArgument: a bool, a non-number, NaN, an infinity, a negative
        value, zero unless *allow_zero*, or more than a billion seconds.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(name, value, "must be a number of seconds (int or float)")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise InvalidArgument(name, value, f"must be {'>=' if allow_zero else '>'} 0 seconds")
    if seconds > _MAX_SECONDS:
        raise InvalidArgument(name, value, f"must be finite and at most {_MAX_SECONDS:.0e} seconds")
    return seconds


def check_open(sock: object, what: str = "socket") -> socket.socket:
    """Return *sock* if it is an open socket object; raise a specific error otherwise."""
    if not isinstance(sock, socket.socket):
        raise WrongSocketType(what, "a socket.socket", type(sock).__name__)
    if sock.fileno() == -1:
        raise SocketClosed(sock, what)
    return sock


def socket_info(sock: socket.socket) -> SocketInfo:
    """Read back what the kernel says about *sock*.

    Use it to tell a real reuseport group (distinct inodes, ``reuseport=True``)
    from one socket shared by fork (one inode), or to check what a socket
    received from elsewhere is.

    :param sock: an open socket (any family or type).
    :returns: a :class:`SocketInfo`.
    :raises SocketClosed: *sock* is closed.
    :raises WrongSocketType: *sock* is not a socket object.
    """
    check_open(sock)
    fd = sock.fileno()
    # CPython's enums name only the families and types it was built knowing: a
    # socket of another (AF_XDP, or SOCK_PACKET) raised ValueError here.
    family: socket.AddressFamily | int = sock.family
    with contextlib.suppress(ValueError):
        family = socket.AddressFamily(sock.family)
    kind: socket.SocketKind | int = sock.type
    with contextlib.suppress(ValueError):
        kind = socket.SocketKind(sock.type)

    def flag(level: int, opt: int) -> bool:
        try:
            return bool(sock.getsockopt(level, opt))
        except OSError:
            return False

    address: Address | None = None
    if family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError, AddressError):
            name = sock.getsockname()
            if name[1] != 0:
                # The whole IPv6 4-tuple: its scope id becomes the zone, without which
                # a link-local address cannot be bound or dialed again (EINVAL).
                address = parse_address(name)
    opt = _platform_option(sys.platform)[0]
    listening = flag(socket.SOL_SOCKET, getattr(socket, "SO_ACCEPTCONN", 30))
    inode = os.fstat(fd).st_ino
    backlog = queued = None
    if (
        listening
        and kind == socket.SOCK_STREAM
        and family in (socket.AF_INET, socket.AF_INET6)
        and sys.platform.startswith("linux")
    ):
        # inet_diag only: a listening AF_UNIX socket's request would be read as the
        # wrong struct (unix_diag_req), and only TCP listeners have these figures here.
        found = _diag_listener(socket.AddressFamily(family), inode)
        if found is not None:
            queued, backlog = found
    return SocketInfo(
        fd=fd,
        family=family,
        type=kind,
        address=address,
        reuseport=opt is not None and flag(socket.SOL_SOCKET, opt),
        reuseaddr=flag(socket.SOL_SOCKET, socket.SO_REUSEADDR),
        v6only=flag(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) if family == socket.AF_INET6 else None,
        inheritable=os.get_inheritable(fd),
        listening=listening,
        backlog=backlog,
        queued=queued,
        inode=inode,
    )


# sock_diag (netlink) is the only interface that reports a listener's backlog
# limit: /proc/net/tcp shows the current queue but not the limit. `ss -lt` reads
# the same fields (idiag_rqueue = queued, idiag_wqueue = max backlog). It also lists
# the request socks of handshakes not yet accepted (`ss -t state syn-recv`).
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_TCP_SYN_RECV_STATE = 3
_TCP_LISTEN_STATE = 10
_NLMSGHDR = struct.Struct("=IHHII")
# struct inet_diag_req_v2: family, protocol, ext, pad, states, then struct
# inet_diag_sockid, of which only idiag_sport (network order) is set: the kernel's
# dump skips sockets on other local ports.
_DIAG_REQ = struct.Struct("=BBBxI2s46x")
# struct inet_diag_msg: family, state, timer, retrans, then inet_diag_sockid
# (sport, dport, src, dst in network order; ifindex; the socket's cookie) ...
_DIAG_HEAD = struct.Struct("=BBBB2s2s16s16sIQ")
# ... then expires, rqueue, wqueue, uid, inode.
_DIAG_MSG = struct.Struct("=BBBB48xIIIII")


def _sock_diag(family: int, states: int, port: int, visit: Callable[[bytes, int], bool]) -> bool:
    """Dump the TCP sockets of *family* in *states* (a bit per TCP state).

    Only sockets on local *port* when it is not 0. Calls ``visit(data, offset)``
    with each ``struct inet_diag_msg`` until it returns True. Returns False when
    the dump could not be read whole (no netlink, an error, a hang), True when it
    was, or *visit* stopped it.
    """
    family_netlink = getattr(socket, "AF_NETLINK", None)  # Linux only
    if family_netlink is None:
        return False
    try:
        nl = socket.socket(family_netlink, socket.SOCK_DGRAM | _CLOEXEC, _NETLINK_SOCK_DIAG)
    except OSError:
        return False
    with nl:
        nl.settimeout(2.0)
        req = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, states, port.to_bytes(2, "big"))
        try:
            nl.send(
                _NLMSGHDR.pack(
                    _NLMSGHDR.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0
                )
                + req
            )
        except OSError:
            return False
        # Bounded: a dump of one family's sockets, in at most 10,000 datagrams.
        for _ in range(10_000):
            try:
                data = nl.recv(65536)
            except OSError:
                return False
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, _f, _s, _p = _NLMSGHDR.unpack_from(data, offset)
                if mtype == _NLMSG_ERROR or length < _NLMSGHDR.size:
                    return False
                if mtype == _NLMSG_DONE:
                    # Its payload is the dump's status: 0, or a negative errno.
                    body = offset + _NLMSGHDR.size
                    return len(data) < body + 4 or struct.unpack_from("=i", data, body)[0] == 0
                if len(data) >= offset + _NLMSGHDR.size + _DIAG_MSG.size and visit(
                    data, offset + _NLMSGHDR.size
                ):
                    return True
                offset += (length + 3) & ~3
        return False


def _diag_listener(family: socket.AddressFamily, inode: int) -> tuple[int, int] | None:
    found: tuple[int, int] | None = None

    def visit(data: bytes, offset: int) -> bool:
        nonlocal found
        *_head, _exp, rqueue, wqueue, _uid, ino = _DIAG_MSG.unpack_from(data, offset)
        if ino == inode:
            found = rqueue, wqueue
        return found is not None

    _sock_diag(family, 1 << _TCP_LISTEN_STATE, 0, visit)
    return found
