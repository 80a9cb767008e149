"""The socket layer on real loopback sockets: factories, listeners, groups, probes."""

from __future__ import annotations

import collections
import errno
import fcntl
import json
import math
import os
import select
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any, Literal

import pytest

import reuselb
from reuselb import (
    AddressError,
    AddressInUse,
    GroupMemberError,
    InvalidArgument,
    ReuseportUnsupported,
    SocketClosed,
    WrongSocketType,
    _sockets,
    connect_tcp,
    reuseport_group,
    reuseport_listener,
    reuseport_udp,
    socket_info,
    tcp_socket,
    udp_socket,
)
from reuselb import _steering as steering
from reuselb._address import resolve_address
from reuselb._demo import start_workers, stop_workers
from tests.conftest import fds_left, open_fds, run_in_netns, without_bind_privilege
from tests.test_address import _fake_resolver, ipv4_only_localhost  # noqa: F401 (a fixture)

pytestmark = pytest.mark.linux

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _case_in_netns(case: Callable[..., object], *args: object) -> Any:
    """Call this module's function *case* with *args* in a new network namespace.

    For the cases that bind the wildcard address, every interface of the host:
    there the only interface is the namespace's own loopback. Root only (see
    :func:`run_in_netns`); returns what *case* returns, through JSON. A failing
    assertion in *case* fails the test with the child's traceback.
    """
    return run_in_netns(
        "import json, sys\n"
        f"sys.path.insert(0, {_REPO!r})\n"
        "from tests import test_sockets\n"
        f"print(json.dumps(test_sockets.{case.__name__}(*{args!r})))\n"
    )


@pytest.fixture
def refused_address() -> Iterator[str]:
    """127.0.0.1 and a port bound but never listening, held for the test.

    A call that must never connect is given this rather than a fixed port (9,
    1...), where some service may listen: if it does connect, the connect is
    refused and the test fails on that, having touched nothing.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


def _cloexec(sock: socket.socket) -> bool:
    return bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def _somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())


# --------------------------------------------------------------------------- factories


@pytest.mark.parametrize("factory", [tcp_socket, udp_socket])
@pytest.mark.parametrize("nonblocking", [False, True])
def test_factories_cloexec_and_nonblocking(factory: object, nonblocking: bool) -> None:
    with factory(socket.AF_INET, nonblocking=nonblocking) as s:  # type: ignore[operator]
        assert _cloexec(s)
        assert not os.get_inheritable(s.fileno())
        assert s.getblocking() is (not nonblocking)
        flags = fcntl.fcntl(s.fileno(), fcntl.F_GETFL)
        assert bool(flags & os.O_NONBLOCK) is nonblocking


def test_tcp_nodelay_and_bad_family() -> None:
    with tcp_socket(nodelay=True) as s:
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    with pytest.raises(InvalidArgument, match="invalid family"):
        tcp_socket(socket.AF_UNIX)
    with pytest.raises(InvalidArgument, match="invalid family 99"):
        udp_socket(99)  # type: ignore[arg-type]


@pytest.mark.parametrize("factory", [tcp_socket, udp_socket])
@pytest.mark.parametrize("family", [2.0, 10.0, True, "2", None])
def test_factories_refuse_a_family_that_is_not_an_int(
    factory: Callable[..., socket.socket], family: object, no_fd_leak: None
) -> None:
    # Before: 2.0 and 10.0 compared equal to AF_INET and AF_INET6 and were taken.
    with pytest.raises(InvalidArgument) as info:
        factory(family)
    assert str(info.value) == (
        f"invalid family {family!r}: expected socket.AF_INET or socket.AF_INET6"
    )


# --------------------------------------------------------------------------- listeners


def test_listener_defaults() -> None:
    with reuseport_listener("127.0.0.1:0") as lst:
        info = socket_info(lst)
        assert info.listening
        assert info.reuseport
        assert info.reuseaddr
        assert not info.inheritable
        assert info.backlog == _somaxconn()
        assert info.address is not None
        assert info.address.port == lst.getsockname()[1]
        assert info.v6only is None


def test_listener_options() -> None:
    with reuseport_listener(
        ("127.0.0.1", 0), backlog=7, fastopen=5, defer_accept=3, nodelay=True, nonblocking=True
    ) as lst:
        assert socket_info(lst).backlog == 7
        assert lst.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == 5
        assert lst.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        assert lst.getblocking() is False
        with connect_tcp(lst.getsockname(), nodelay=False) as client:
            client.sendall(b"x")  # TCP_DEFER_ACCEPT wakes accept only once data arrives
            lst.setblocking(True)
            lst.settimeout(10)
            conn, _ = lst.accept()
            with conn:
                # Linux copies the listener's TCP_NODELAY to accepted sockets.
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"backlog": 0}, "invalid backlog 0"),
        ({"backlog": -3}, "invalid backlog -3"),
        ({"backlog": True}, "invalid backlog True"),
        ({"fastopen": 0}, "invalid fastopen 0"),
        ({"defer_accept": -1}, "invalid defer_accept -1"),
    ],
)
def test_listener_rejects_bad_options(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        reuseport_listener("127.0.0.1:0", **kwargs)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_listener_options_up_to_c_int_max_are_clamped_by_the_kernel() -> None:
    top = 2**31 - 1
    with reuseport_listener("127.0.0.1:0", backlog=top, fastopen=top, defer_accept=top) as lst:
        assert socket_info(lst).backlog == _somaxconn()  # listen() caps at somaxconn
        assert lst.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == _somaxconn()
        # Seconds become at most 255 SYN-ACK retransmits: read back far below top.
        assert 0 < lst.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) < top


@pytest.mark.parametrize("name", ["backlog", "fastopen", "defer_accept"])
@pytest.mark.parametrize("value", [2**31, 2**40])
def test_listener_options_beyond_c_int_are_invalid_arguments(name: str, value: int) -> None:
    before = open_fds()
    with pytest.raises(InvalidArgument) as info:
        reuseport_listener("127.0.0.1:0", **{name: value})  # type: ignore[arg-type]
    assert f"invalid {name} {value}: must be <= 2147483647" in str(info.value)
    # A group reports the bad option itself, before making any member.
    with pytest.raises(InvalidArgument) as group_info:
        reuseport_group("127.0.0.1:0", 3, **{name: value})  # type: ignore[arg-type]
    assert f"invalid {name} {value}" in str(group_info.value)
    assert open_fds() == before


def test_v4_mapped_address_needs_dualstack() -> None:
    before = open_fds()
    for factory in (reuseport_listener, reuseport_udp, reuselb.hold_port):
        with pytest.raises(AddressError) as info:
            factory("[::ffff:127.0.0.1]:0")
        message = str(info.value)
        assert "'[::ffff:127.0.0.1]:0'" in message
        assert "IPv4-mapped" in message and "dualstack=True" in message
        assert "bind 127.0.0.1 instead" in message
    # A group reports the address's own fault as itself, not as "member 0 failed".
    for kind in ("tcp", "udp"):
        with pytest.raises(AddressError, match="IPv4-mapped"):
            reuseport_group("[::ffff:127.0.0.1]:0", 2, kind=kind)
        with pytest.raises(AddressError, match="'127.0.0.1:0': dualstack=True needs"):
            reuseport_group("127.0.0.1:0", 2, kind=kind, dualstack=True)
    assert open_fds() == before


@pytest.mark.ipv6
def test_v4_mapped_address_with_dualstack_takes_ipv4() -> None:
    with reuseport_listener("[::ffff:127.0.0.1]:0", dualstack=True) as lst:
        assert socket_info(lst).v6only is False
        with connect_tcp(("127.0.0.1", lst.getsockname()[1]), timeout=5):
            lst.settimeout(10)
            conn, peer = lst.accept()
            conn.close()
        assert peer[0] == "::ffff:127.0.0.1"


def test_two_members_share_a_port_and_each_accepts() -> None:
    with reuseport_group("127.0.0.1:0", 2) as group:
        a, b = group
        assert a.getsockname() == b.getsockname()
        assert socket_info(a).inode != socket_info(b).inode


def test_address_in_use_names_the_address() -> None:
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        port = plain.getsockname()[1]
        with pytest.raises(AddressInUse) as info:
            reuseport_listener(("127.0.0.1", port))
        assert f"127.0.0.1:{port}" in str(info.value)
        assert "not in a reuseport group" in str(info.value)
        assert info.value.errno == errno.EADDRINUSE
        assert isinstance(info.value, OSError)


def test_address_in_use_at_listen_is_address_in_use(
    monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    # An outsider bound with SO_REUSEADDR only may share the port while neither
    # listens; if it starts listening between the listener's bind() and listen(),
    # listen() fails with EADDRINUSE. Before: a bare OSError, not AddressInUse.
    with socket.socket() as outsider:
        outsider.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        outsider.bind(("127.0.0.1", 0))
        port = outsider.getsockname()[1]
        real = _sockets._somaxconn

        def outsider_listens_first() -> int:  # runs between bind() and listen()
            outsider.listen()
            return real()

        monkeypatch.setattr(_sockets, "_somaxconn", outsider_listens_first)
        with pytest.raises(AddressInUse) as info:
            reuseport_listener(("127.0.0.1", port))
        assert f"127.0.0.1:{port}" in str(info.value)
        assert info.value.errno == errno.EADDRINUSE


@pytest.mark.parametrize("reuseaddr", [False, True])
def test_an_outsider_bound_without_reuseport_as_documented(reuseaddr: bool) -> None:
    # docs/sockets.md: a bound, not listening socket without SO_REUSEPORT blocks
    # the group only without SO_REUSEADDR; with it, members bind and the outsider
    # then cannot listen (the docs once said every later bind failed).
    with socket.socket() as outsider:
        if reuseaddr:
            outsider.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        outsider.bind(("127.0.0.1", 0))
        port = outsider.getsockname()[1]
        if not reuseaddr:
            with pytest.raises(AddressInUse):
                reuseport_listener(("127.0.0.1", port))
            return
        with reuseport_listener(("127.0.0.1", port)):
            with pytest.raises(OSError, match="Address already in use") as info:
                outsider.listen()
            assert info.value.errno == errno.EADDRINUSE


def test_non_local_address() -> None:
    with pytest.raises(AddressError, match="not an address of this host"):
        reuseport_listener("192.0.2.1:0")


def _absent_interface_index() -> int:
    return max(index for index, _name in socket.if_nameindex()) + 1000


_BINDERS: list[Callable[[str], object]] = [
    reuseport_listener,
    reuseport_udp,
    reuselb.hold_port,
    lambda a: reuseport_group(a, 2),
    lambda a: reuseport_group(a, 2, kind="udp"),
]


@pytest.mark.ipv6
@pytest.mark.parametrize("binder", _BINDERS)
def test_link_local_address_needs_a_zone_naming_an_interface(
    binder: Callable[[str], object], no_fd_leak: None
) -> None:
    # Before: bare OSError EINVAL (no zone) and ENODEV (no such interface) that
    # did not name the address; a group wrapped them in GroupMemberError.
    absent = _absent_interface_index()
    for value, needle in [
        ("[fe80::abcd]:0", "a link-local address needs a zone"),
        ("[ff02::1]:0", "a link-local address needs a zone"),
        (f"[fe80::abcd%{absent}]:0", f"no interface with index {absent}"),
        # Before: HostNotFound "unknown host ...: Name or service not known", glibc's
        # EAI_NONAME for a literal that never goes to DNS.
        ("[fe80::abcd%nosuchif0]:0", "no interface named 'nosuchif0'"),
        ("[2001:db8::1%nosuchif0]:0", "no interface named 'nosuchif0'"),
    ]:
        with pytest.raises(AddressError) as info:
            binder(value)
        assert needle in str(info.value)
        assert repr(value) in str(info.value)


@pytest.mark.ipv6
def test_connect_to_link_local_literal_needs_a_zone_naming_an_interface(
    no_fd_leak: None,
) -> None:
    # Before: "connect to [fe80::abcd]:1: Invalid argument", an OSError blaming the peer.
    absent = _absent_interface_index()
    with pytest.raises(AddressError, match=r"'\[fe80::abcd\]:1'.*needs a zone"):
        connect_tcp("[fe80::abcd]:1", timeout=5)
    with pytest.raises(AddressError, match=f"no interface with index {absent}"):
        connect_tcp(f"[fe80::abcd%{absent}]:1", timeout=5)
    with pytest.raises(AddressError, match=r"'\[fe80::abcd%nosuchif0\]:1'.*no interface named"):
        connect_tcp("[fe80::abcd%nosuchif0]:1", timeout=5)
    with pytest.raises(AddressError, match=r"'\[fe80::1%nosuchif0\]:0'.*no interface named"):
        connect_tcp("[::1]:1", source="[fe80::1%nosuchif0]:0", timeout=5)


@pytest.mark.ipv6
def test_bind_einval_and_enodev_are_address_errors(
    monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    # What the up-front check cannot foresee (an interface removed meanwhile, an
    # EINVAL it does not know of) still reaches bind(): the kernel's answer must
    # come back as an AddressError naming the address, not as a bare OSError.
    monkeypatch.setattr(_sockets, "_check_zone", lambda *args: None, raising=False)
    absent = _absent_interface_index()
    with pytest.raises(AddressError, match=r"fe80::abcd\]:0.*refused to bind it"):
        reuseport_listener("[fe80::abcd]:0")
    with pytest.raises(AddressError, match=f"no interface with index {absent}"):
        reuseport_udp(f"[fe80::abcd%{absent}]:0")


@pytest.mark.ipv6
def test_a_zone_may_name_its_interface(no_fd_leak: None) -> None:
    # glibc resolves a named zone for link-local addresses only: "[::1%lo]" was
    # HostNotFound, though "[::1%1]" bound (the kernel ignores the scope of a
    # non-link-local address). A name gives the same sockaddr as its index.
    index = socket.if_nametoindex("lo")
    with reuseport_listener("[::1%lo]:0") as by_name:
        assert by_name.getsockname()[:2] == ("::1", by_name.getsockname()[1])
        with connect_tcp(by_name.getsockname()[:2], source="[::1%lo]:0", timeout=5) as c:
            assert c.getsockname()[0] == "::1"
    with reuseport_udp(f"[::1%{index}]:0") as by_index:
        assert by_index.getsockname()[0] == "::1"


def test_unknown_host(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_resolver(monkeypatch, {})  # no query leaves the host
    with pytest.raises(reuselb.HostNotFound, match="no-such-host.invalid"):
        reuseport_listener("no-such-host.invalid:0")


@pytest.mark.ipv6
def test_ipv6_listener_is_v6only() -> None:
    with reuseport_listener("[::1]:0") as lst:
        info = socket_info(lst)
        assert info.family == socket.AF_INET6
        assert info.v6only is True
        lst.settimeout(10)
        with connect_tcp(("::1", lst.getsockname()[1]), timeout=5):
            conn, _ = lst.accept()
            conn.close()


def _dualstack_wildcard_peers() -> list[object]:
    """Run by _case_in_netns (binds [::]): the V6ONLY flag, and the peer of each family."""
    with reuseport_listener(":0", dualstack=True) as lst:
        lst.settimeout(10)
        info = socket_info(lst)
        out: list[object] = [info.family == socket.AF_INET6, info.v6only]
        for host in ("127.0.0.1", "::1"):
            with connect_tcp((host, lst.getsockname()[1]), timeout=5):
                conn, peer = lst.accept()
                conn.close()
                out.append(peer[0])
    return out


@pytest.mark.root
@pytest.mark.ipv6
def test_dualstack_wildcard_takes_ipv4() -> None:
    # Only the wildcard is dual-stack: bind() sets V6ONLY on any other IPv6
    # address (inet6_bind), so this binds [::] and runs in a namespace of its own.
    assert _case_in_netns(_dualstack_wildcard_peers) == [True, False, "::ffff:127.0.0.1", "::1"]


def test_dualstack_needs_an_ipv6_or_wildcard_address() -> None:
    with pytest.raises(AddressError, match="dualstack=True needs the any-address"):
        reuseport_listener("127.0.0.1:0", dualstack=True)


def test_dualstack_refuses_ipv4s_any_address_saying_why(no_fd_leak: None) -> None:
    # Before: "dualstack=True needs an IPv6 or wildcard address, not IPv4", for an
    # address that is a wildcard (Address.is_wildcard), and no docstring said so.
    expected = (
        "invalid address '0.0.0.0:8080': dualstack=True needs the any-address of both "
        "families (':8080', '*:8080' or '[::]:8080') or an IPv4-mapped IPv6 address, "
        "not 0.0.0.0, which is IPv4's alone"
    )
    factories: list[Callable[..., object]] = [
        reuseport_listener,
        reuseport_udp,
        reuselb.hold_port,
    ]
    for factory in factories:
        with pytest.raises(AddressError) as info:
            factory("0.0.0.0:8080", dualstack=True)
        assert str(info.value) == expected
        # Documented where the others are: ":raises AddressError: ... an IPv4
        # address with *dualstack* (``0.0.0.0`` too ...".
        raises = (factory.__doc__ or "").split(":raises AddressError:")[1].split(":raises")[0]
        assert "``0.0.0.0`` too" in " ".join(raises.split())
    with pytest.raises(AddressError, match="not an IPv4 address"):
        reuseport_listener("127.0.0.1:0", dualstack=True)
    # That the spellings the message offers do bind both families:
    # test_dualstack_binds_the_any_address_in_every_spelling (in a namespace).


@pytest.mark.usefixtures("ipv4_only_localhost")
def test_dualstack_with_a_name_without_ipv6_says_so(no_fd_leak: None) -> None:
    # Before: HostNotFound "unknown host 'localhost': Name or service not known",
    # for a name that resolves (to 127.0.0.1), only not to the IPv6 address that
    # dualstack=True needs. What it needs leads, as for a name that resolves to ::1.
    expected = (
        "invalid address 'localhost:0': dualstack=True needs the any-address of both "
        "families (':0', '*:0' or '[::]:0') or an IPv4-mapped IPv6 address, not "
        "'localhost', which has no IPv6 address, only IPv4 (127.0.0.1)"
    )
    calls: list[Callable[[], object]] = [
        lambda: reuseport_listener("localhost:0", dualstack=True),
        lambda: reuseport_udp("localhost:0", dualstack=True),
        lambda: reuselb.hold_port("localhost:0", dualstack=True),
        lambda: reuseport_group("localhost:0", 2, kind="udp", dualstack=True),
    ]
    for call in calls:
        with pytest.raises(AddressError) as info:
            call()
        assert not isinstance(info.value, reuselb.HostNotFound)
        assert str(info.value) == expected
    with reuseport_listener("localhost:0") as lst:  # without dualstack: IPv4
        assert lst.getsockname()[0] == "127.0.0.1"


def _dualstack_factories(address: str) -> list[Callable[[], object]]:
    """Every factory that takes dualstack=True, called with *address*."""
    return [
        lambda: reuseport_listener(address, dualstack=True),
        lambda: reuseport_udp(address, dualstack=True),
        lambda: reuselb.hold_port(address, dualstack=True),
        lambda: reuseport_group(address, 2, dualstack=True),
        lambda: reuseport_group(address, 2, kind="udp", dualstack=True),
    ]


def test_dualstack_refuses_a_specific_ipv6_address(no_fd_leak: None) -> None:
    # Before: accepted, but Linux's bind() sets IPV6_V6ONLY on a socket bound to a
    # specific, non-mapped IPv6 address (__inet6_bind), so the "dual-stack" listener
    # was IPv6-only and IPv4 clients of its port were refused.
    expected = (
        "invalid address '[::1]:0': dualstack=True needs the any-address of both "
        "families (':0', '*:0' or '[::]:0') or an IPv4-mapped IPv6 address, not ::1: "
        "Linux makes a socket bound to any other IPv6 address IPv6-only"
    )
    for call in _dualstack_factories("[::1]:0"):
        with pytest.raises(AddressError) as info:
            call()
        assert not isinstance(info.value, reuselb.GroupMemberError)
        assert str(info.value) == expected
    # A 4-tuple, a zoned link-local address and a multicast one are specific too.
    for value in (("::1", 0, 0, 0), "[fe80::1%1]:0", "[ff02::1%1]:0", "[2001:db8::1]:0"):
        with pytest.raises(AddressError, match=r"dualstack=True needs .*IPv6-only"):
            reuseport_listener(value, dualstack=True)
    # Documented with the others.
    for factory in (reuseport_listener, reuseport_udp, reuselb.hold_port, reuseport_group):
        raises = (factory.__doc__ or "").split(":raises AddressError:")[1].split(":raises")[0]
        assert "other than ``::`` or an IPv4-mapped" in " ".join(raises.split())


def test_dualstack_with_a_name_of_a_specific_ipv6_address_names_it(
    monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    # Before: "'localhost' has no IPv6 address, only IPv4" led the message for a
    # name with IPv4 addresses only, as if an IPv6 address were what it lacked; a
    # name with one (::1) is refused too (Linux makes a socket on it IPv6-only),
    # and that message named ::1 but not the name. Both lead with what dualstack
    # needs and name the name as the caller wrote it.
    _fake_resolver(monkeypatch, {"v6host": ["::1"], "anyhost": ["::"]})
    needs = (
        "dualstack=True needs the any-address of both families (':0', '*:0' or "
        "'[::]:0') or an IPv4-mapped IPv6 address"
    )
    calls: list[Callable[[], object]] = [
        lambda: reuseport_listener("v6host:0", dualstack=True),
        lambda: reuseport_udp("v6host:0", dualstack=True),
        lambda: reuselb.hold_port("v6host:0", dualstack=True),
        lambda: reuseport_group("v6host:0", 2, dualstack=True),
    ]
    for call in calls:
        with pytest.raises(AddressError) as info:
            call()
        assert not isinstance(info.value, reuselb.GroupMemberError)
        assert str(info.value) == (
            f"invalid address 'v6host:0': {needs}, not 'v6host' (it resolves to ::1): "
            "Linux makes a socket bound to any other IPv6 address IPv6-only"
        )
    # That a name of "::", the any-address of both families, binds dual-stack:
    # test_dualstack_binds_the_any_address_in_every_spelling (in a namespace).
    for factory in (reuseport_listener, reuseport_udp, reuselb.hold_port, reuseport_group):
        raises = (factory.__doc__ or "").split(":raises AddressError:")[1].split(":raises")[0]
        assert "a name that resolves to neither with" in " ".join(raises.split())


def test_dualstack_refuses_the_mapped_ipv4_any_address(
    monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    # Before: "[::ffff:0.0.0.0]:0" bound with dualstack=True. It is mapped, so Linux
    # leaves V6ONLY off (__inet6_bind), but it binds the socket as 0.0.0.0: every
    # IPv4 address and no IPv6 one, exactly what 0.0.0.0 is refused for, and not
    # the "IPv4 to that one address" the docs promised for a mapped address.
    needs = (
        "dualstack=True needs the any-address of both families (':0', '*:0' or "
        "'[::]:0') or an IPv4-mapped IPv6 address"
    )
    for call in _dualstack_factories("[::ffff:0.0.0.0]:0"):
        with pytest.raises(AddressError) as info:
            call()
        assert not isinstance(info.value, reuselb.GroupMemberError)
        assert str(info.value) == (
            f"invalid address '[::ffff:0.0.0.0]:0': {needs}, not ::ffff:0.0.0.0, "
            "which is IPv4's alone"
        )
    with pytest.raises(AddressError, match="IPv4's alone"):  # a 4-tuple spelling
        reuseport_listener(("::ffff:0.0.0.0", 0, 0, 0), dualstack=True)
    _fake_resolver(monkeypatch, {"v4any": ["::ffff:0.0.0.0"]})
    with pytest.raises(AddressError) as info:
        reuseport_listener("v4any:0", dualstack=True)
    assert str(info.value) == (
        f"invalid address 'v4any:0': {needs}, not 'v4any' (it resolves to "
        "::ffff:0.0.0.0), which is IPv4's alone"
    )
    # Documented with 0.0.0.0, and the mapped addresses' wording no longer reads as
    # if a mapped address were the any-address of both families.
    for factory in (reuseport_listener, reuseport_udp, reuselb.hold_port, reuseport_group):
        text = " ".join((factory.__doc__ or "").split())
        raises = text.split(":raises AddressError:")[1].split(":raises")[0]
        assert "``::ffff:0.0.0.0``" in raises
    udp_doc = " ".join((reuseport_udp.__doc__ or "").split())
    param = udp_doc.split(":param dualstack:")[1].split(":param")[0]
    assert "an IPv4-mapped address takes IPv4 to that one address" in param
    assert "(or an IPv4-mapped address), the any-address" not in param
    # Without dualstack, the mapped-address error's advice must not send the caller
    # to dualstack=True, which is refused for this one address (above).
    with pytest.raises(AddressError) as info:
        reuseport_listener("[::ffff:0.0.0.0]:0")
    assert str(info.value).endswith("cannot bind; bind 0.0.0.0 instead")
    with pytest.raises(AddressError, match=r"bind 127\.0\.0\.1 instead, or pass dualstack=True"):
        reuseport_listener("[::ffff:127.0.0.1]:0")


def _dualstack_any_address_spellings(
    values: list[str | tuple[str, int, int, int]],
) -> list[list[object]]:
    """Run by _case_in_netns (binds [::]): a dualstack=True listener on each of
    *values* (the name ``anyhost`` resolves to ``::``), its family and V6ONLY flag."""
    out: list[list[object]] = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        _fake_resolver(monkeypatch, {"anyhost": ["::"]})
        for value in values:
            with reuseport_listener(value, dualstack=True) as lst:
                v6only = lst.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                out.append([repr(value), lst.family == socket.AF_INET6, v6only])
    return out


@pytest.mark.root
@pytest.mark.ipv6
def test_dualstack_binds_the_any_address_in_every_spelling() -> None:
    # What _DUALSTACK_NEEDS offers (test_dualstack_refuses_ipv4s_any_address_saying_why's
    # message), a 4-tuple, and a name that resolves to "::"
    # (test_dualstack_with_a_name_of_a_specific_ipv6_address_names_it): each binds
    # an IPv6 socket with V6ONLY off, which takes both families. Each binds every
    # interface, so in a namespace of its own (loopback its only interface).
    spellings: list[str | tuple[str, int, int, int]] = [
        ":0",
        "*:0",
        "[::]:0",
        ("::", 0, 0, 0),
        "anyhost:0",
    ]
    expected = [[repr(value), True, 0] for value in spellings]
    assert _case_in_netns(_dualstack_any_address_spellings, spellings) == expected


@pytest.mark.ipv6
def test_dualstack_still_binds_mapped_addresses() -> None:
    # What _DUALSTACK_NEEDS offers besides the any-address (bound in
    # test_dualstack_binds_the_any_address_in_every_spelling): a mapped address, IPv4
    # to that address (bind() leaves V6ONLY off for IPV6_ADDR_MAPPED).
    with reuseport_listener("[::ffff:127.0.0.1]:0", dualstack=True) as lst:
        assert lst.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    group = reuseport_group("[::ffff:127.0.0.1]:0", 2, kind="udp", dualstack=True)
    with group, udp_socket() as client:
        client.sendto(b"x", ("127.0.0.1", group.port))
        got = select.select(list(group), [], [], 5)[0]
        assert len(got) == 1
        assert got[0].recvfrom(16)[0] == b"x"


# --------------------------------------------------------------------------- UDP


def test_udp_member_never_reuseaddr() -> None:
    with reuseport_group("127.0.0.1:0", 2, kind="udp") as group:
        for member in group:
            info = socket_info(member)
            assert info.type == socket.SOCK_DGRAM
            assert info.reuseport
            assert not info.reuseaddr
            assert not info.inheritable
    with reuseport_udp("127.0.0.1:0", nonblocking=True) as s:
        assert s.getblocking() is False


def _ephemeral_span() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
    return high - low + 1


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("127.0.0.1", "udp"),
        ("127.0.0.1", "group"),
        pytest.param("::1", "udp", marks=pytest.mark.ipv6),
    ],
)
def test_udp_port_zero_never_takes_a_port_another_reuseport_socket_holds(
    host: str, kind: str, no_fd_leak: None
) -> None:
    # Before: Linux's UDP autobind (udp_lib_get_port) counts a port held only by
    # SO_REUSEPORT sockets of the same user as free for a socket that has
    # SO_REUSEPORT too, so a port-0 member (set before bind) landed on a port of
    # another group, or another service, of this user and split its datagrams:
    # with 1,000 such ports held, about one try in 28 of the default 28,232-port
    # range. The tries are enough for 25 expected collisions on old code (it
    # passes with odds of e^-25); the member now gets a port no socket holds.
    import resource

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(open_fds()) + 1_100
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    others: list[socket.socket] = []
    try:
        # Another service of this user: plain SO_REUSEPORT UDP sockets on port 0.
        for _ in range(1_000):
            other = socket.socket(family, socket.SOCK_DGRAM)
            others.append(other)
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            other.bind((host, 0))
        held = {o.getsockname()[1] for o in others}
        shared = []
        for _ in range(min(math.ceil(25 * _ephemeral_span() / len(held)), 5_000)):
            if kind == "group":
                with reuseport_group(f"{host}:0", 2, kind="udp") as group:
                    port = group.port
            else:
                with reuseport_udp((host, 0)) as member:
                    port = member.getsockname()[1]
            if port in held:
                shared.append(port)
        assert not shared, f"port-0 members joined held ports {shared}"
    finally:
        for other in others:
            other.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _datagrams_per_member(
    members: tuple[socket.socket, ...], dest: tuple[str, int], count: int
) -> list[int]:
    """Send *count* datagrams to *dest*, each from a new client port; who got each."""
    family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
    for i in range(count):
        with socket.socket(family, socket.SOCK_DGRAM) as client:
            client.sendto(b"%d" % i, dest)
    got = [0] * len(members)
    while sum(got) < count:
        ready = select.select(list(members), [], [], 10)[0]
        assert ready, f"{count - sum(got)} of {count} datagrams never arrived: {got}"
        for member in ready:
            member.recv(16)
            got[members.index(member)] += 1
    return got


@pytest.mark.parametrize(
    ("address", "dualstack", "dest"),
    [
        ("127.0.0.1:0", False, "127.0.0.1"),
        pytest.param("[::1]:0", False, "::1", marks=pytest.mark.ipv6),
        # Dual-stack is the wildcard's alone (inet6_bind sets V6ONLY on any other
        # IPv6 address): these bind [::], in a network namespace of their own.
        pytest.param(":0", True, "127.0.0.1", marks=[pytest.mark.ipv6, pytest.mark.root]),
        pytest.param(":0", True, "::1", marks=[pytest.mark.ipv6, pytest.mark.root]),
    ],
)
def test_a_port_zero_udp_member_is_a_kernel_group(
    address: str, dualstack: bool, dest: str, no_fd_leak: None
) -> None:
    # A port-0 UDP member gets SO_REUSEPORT only after bind (see the test above).
    # It must still be a full kernel group: steerable alone (a socket given the
    # option after bind has no group of its own until another joins, and the
    # kernel refuses a program through it with EINVAL), with later members
    # joining it in order and the kernel's hash spreading datagrams over all.
    if reuselb.parse_address(address).is_wildcard:
        assert _case_in_netns(_port_zero_udp_kernel_group, address, dualstack, dest) is None
    else:
        _port_zero_udp_kernel_group(address, dualstack, dest)


def _port_zero_udp_kernel_group(address: str, dualstack: bool, dest: str) -> None:
    """test_a_port_zero_udp_member_is_a_kernel_group's case (_case_in_netns runs it too)."""
    with reuseport_udp(address, dualstack=dualstack) as lone:
        steering.steer_all_to([lone], 0)
        steering.detach_steering(lone)
    with reuseport_group(address, 3, kind="udp", dualstack=dualstack) as group:
        target = (dest, group.port)
        steering.steer_all_to(group, 0)  # attached through member 0
        steering.detach_steering(group[0])
        # 90 client ports: a member misses them all with odds 3 * (2/3)**90, ~4e-16.
        assert 0 not in _datagrams_per_member(group.members, target, 90)
        steering.steer_all_to(group, 2)  # join order is the kernel's index order
        assert _datagrams_per_member(group.members, target, 20) == [0, 0, 20]
        # A member of another program joins the port as reuseport_udp's would.
        with socket.socket(group[0].family, socket.SOCK_DGRAM) as late:
            late.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if late.family == socket.AF_INET6:
                late.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dualstack else 1)
            late.bind(group[0].getsockname())
            steering.steer_all_to([*group.members, late], 3)
            assert _datagrams_per_member((*group.members, late), target, 10) == [0, 0, 0, 10]


def test_a_port_zero_udp_member_that_cannot_start_its_group_is_closed(no_fd_leak: None) -> None:
    # Its group is started by a helper socket (see _start_group), the second fd of
    # the call: when there is none, the member made first is closed, not leaked.
    assert reuselb.supports_reuseport()  # probed with fds to spare
    with fds_left(1):
        with pytest.raises(OSError, match="Too many open files") as info:
            reuseport_udp("127.0.0.1:0")
        assert info.value.errno == errno.EMFILE
        with pytest.raises(GroupMemberError) as group_info:
            reuseport_group("127.0.0.1:0", 1, kind="udp")
        assert group_info.value.errno == errno.EMFILE
        udp_socket().close()  # the one fd is free again


# --------------------------------------------------------------------------- groups


def test_group_port_zero_uses_first_members_port() -> None:
    with reuseport_group("127.0.0.1:0", 3) as group:
        ports = {m.getsockname()[1] for m in group}
        assert ports == {group.port}
        assert group.port != 0
        assert len(group) == 3
        assert group.address.port == group.port
        assert group.fileno(1) == group[1].fileno()
        assert "3/3 members" in repr(group)


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_group_resolves_a_name_once(
    monkeypatch: pytest.MonkeyPatch, kind: Literal["tcp", "udp"], no_fd_leak: None
) -> None:
    # Before: each member resolved the name again, and with DNS round robin the
    # members landed on different addresses: two kernel groups reported as one.
    real = socket.getaddrinfo
    lookups = 0

    def round_robin(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal lookups
        if host != "web.internal":
            return real(host, port, *args, **kwargs)
        lookups += 1
        hosts = ["127.0.0.1", "127.0.0.2"][:: 1 if lookups % 2 else -1]
        return [info for h in hosts for info in real(h, port, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", round_robin)
    with reuseport_group("web.internal:0", 4, kind=kind) as group:
        assert len({m.getsockname() for m in group}) == 1
        assert group.address == reuselb.Address("web.internal", group.port)
        steering.attach_cpu_steering(group, strict=False)  # checks one kernel group


def test_group_take_and_close() -> None:
    group = reuseport_group("127.0.0.1:0", 2)
    taken = group.take(0)
    with pytest.raises(IndexError, match="member 0 was taken"):
        group[0]
    group.close()
    group.close()  # idempotent
    assert taken.fileno() != -1, "a taken member belongs to the caller"
    assert group.members == ()
    taken.close()


def test_a_closed_group_says_it_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: "member 0 was taken from the group" and, from steering, "all were
    # taken", about members nobody took.
    from reuselb import _handoff, drain_close

    group = reuseport_group("127.0.0.1:0", 3)
    taken = group.take(2)
    try:
        group.close()
        assert "closed" in repr(group)
        for call in (group.__getitem__, group.take, group.fileno):
            with pytest.raises(IndexError, match="no member 0: the group is closed"):
                call(0)
        steers: list[Callable[[], object]] = [
            lambda: steering.steer_all_to(group, 0),
            lambda: steering.steer_away_from(group, 0),
            lambda: steering.attach_cpu_steering(group, strict=False),
            lambda: steering.attach_hash_steering(group),
        ]
        for steer in steers:
            with pytest.raises(InvalidArgument, match="the group is closed") as info:
                steer()
            assert "taken" not in str(info.value)
        for migrate in (False, True):
            monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda m=migrate: m)
            # The taken member is still in the kernel's group, so a closed group
            # that gave it away is not refused as closed; but nothing else is left
            # to take the connections.
            with pytest.raises(InvalidArgument, match="no (open )?member besides listener"):
                drain_close(taken, group=group)
            assert taken.fileno() != -1, "refused before anything changed"
    finally:
        taken.close()


@pytest.mark.parametrize("index", ["a", 1.0, True, None, slice(0, 2)])
def test_group_index_must_be_an_int(index: object, no_fd_leak: None) -> None:
    # Before: a bare TypeError from the list ("list indices must be integers"),
    # and True silently meant member 1.
    with reuseport_group("127.0.0.1:0", 2) as group:
        calls: list[Callable[[Any], object]] = [group.take, group.fileno, group.__getitem__]
        for call in calls:
            with pytest.raises(InvalidArgument) as info:
                call(index)
            assert f"invalid index {index!r}: must be an int" in str(info.value)
        assert len(group.members) == 2, "nothing was taken"
        with pytest.raises(IndexError, match="no member 5: the group has 2"):
            group.take(5)
        # Negative indexes still count from the end.
        with group.take(-1), pytest.raises(IndexError, match="member -1 was taken"):
            group[-1]


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda s: steering.steer_all_to(s, 0), "invalid group <socket.socket"),
        (lambda s: steering.steer_away_from(s, 0), "invalid group <socket.socket"),
        (steering.attach_hash_steering, "invalid group <socket.socket"),
        (steering.attach_cpu_steering, "invalid group <socket.socket"),
        (lambda s: steering.attach_cpu_steering(None), "invalid group None"),  # type: ignore[arg-type]
        (lambda s: steering.steer_all_to(5, 0), "invalid group 5"),  # type: ignore[arg-type]
    ],
)
def test_steering_refuses_what_is_not_a_group(
    call: Callable[[socket.socket], None], needle: str, no_fd_leak: None
) -> None:
    # Before: TypeError "'socket' object is not iterable", naming no argument.
    with reuseport_listener("127.0.0.1:0") as lst:
        with pytest.raises(InvalidArgument) as info:
            call(lst)
        assert needle in str(info.value)
        if isinstance(info.value.value, socket.socket):
            assert "one socket is not a group" in str(info.value)
    with pytest.raises(WrongSocketType, match="group member 0: expected a socket.socket, got str"):
        steering.steer_all_to("ab", 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["set", "frozenset", "dict", "generator", "iterator"])
@pytest.mark.parametrize(
    "call",
    [
        lambda g: steering.steer_all_to(g, 0),
        lambda g: steering.steer_away_from(g, 0),
        steering.attach_hash_steering,
        lambda g: steering.attach_cpu_steering(g, strict=False),
    ],
    ids=["steer_all_to", "steer_away_from", "attach_hash_steering", "attach_cpu_steering"],
)
def test_steering_takes_only_a_sequence_group(
    call: Callable[[object], None], kind: str, no_fd_leak: None
) -> None:
    # Before: a set (or a generator, a dict of members) was taken as the group in
    # join order: the program went on through whichever member came first, and an
    # index named whichever member the set's order put there.
    with reuseport_group("127.0.0.1:0", 3) as group:
        members = list(group.members)
        bad: object
        if kind == "set":
            bad = set(members)
        elif kind == "frozenset":
            bad = frozenset(members)
        elif kind == "dict":
            bad = dict.fromkeys(members)
        elif kind == "generator":
            bad = (m for m in members)
        else:
            bad = iter(members)
        with pytest.raises(InvalidArgument) as info:
            call(bad)
        assert str(info.value).startswith(
            f"invalid group {bad!r}: must be a ReuseportGroup or a sequence of sockets"
        )
        # Refused before a program was attached: detaching finds none.
        with pytest.raises(reuselb.SteeringError) as detach:
            steering.detach_steering(members[0])
        assert isinstance(detach.value.__cause__, OSError)
        assert detach.value.__cause__.errno == errno.ENOENT
        # The same members as a tuple are a group, and so are a dict's ordered
        # values (insertion order, as a list's).
        call(tuple(members))
        steering.detach_steering(members[0])
        call(dict(enumerate(members)).values())
        steering.detach_steering(members[0])


def test_steering_refuses_members_that_are_not_one_kernel_group(no_fd_leak: None) -> None:
    # Before: the program was attached through members[0] whatever it was: a
    # hold_port() socket got a group of its own and the listeners none, without
    # an error; a socket on another port counted in the modulus.
    with reuseport_group("127.0.0.1:0", 2) as group:
        port = group.port
        with reuselb.hold_port(f"127.0.0.1:{port}") as holder:
            with pytest.raises(InvalidArgument) as info:
                steering.steer_all_to([holder, *group], 1)
            assert str(info.value).startswith(
                f"invalid group member 0 {holder!r}: is not listening"
            )
        with reuseport_listener("127.0.0.1:0") as other:
            with pytest.raises(InvalidArgument) as info:
                steering.attach_hash_steering([*group, other])
            assert f"invalid group member 2 {other!r}: is TCP on 127.0.0.1:" in str(info.value)
            assert f"but group member 0 is TCP on 127.0.0.1:{port}" in str(info.value)
        with (
            reuseport_udp(f"127.0.0.1:{port}") as udp,
            pytest.raises(InvalidArgument, match="invalid group member 1 .* is UDP on"),
        ):
            steering.steer_away_from([group[0], udp], 0)
        with socket.socket() as plain:
            plain.bind(("127.0.0.1", 0))
            plain.listen()
            with pytest.raises(InvalidArgument, match="lacks SO_REUSEPORT"):
                steering.steer_all_to([plain], 0)
        with (
            socket.socket(socket.AF_UNIX) as unix,
            pytest.raises(InvalidArgument, match="is not a TCP or UDP socket"),
        ):
            steering.steer_all_to([unix], 0)
        # A dup is the same socket under another fd: the kernel group has it once.
        with group[1].dup() as twin:
            with pytest.raises(InvalidArgument) as info:
                steering.attach_hash_steering([*group, twin])
            assert str(info.value).startswith(f"invalid group member 2 {twin!r}: ")
            assert "is the same socket as group member 1" in str(info.value)
        # One group, its own way: a program is attached, and a UDP group's members
        # (bound, never listening) are one group too.
        steering.steer_all_to(list(group), 1)
        steering.detach_steering(group[0])
    with reuseport_group("127.0.0.1:0", 2, kind="udp") as udp_group:
        steering.steer_away_from(udp_group, 1)
        steering.detach_steering(udp_group[0])


def _both_v6only_settings_refused() -> str:
    """Run by _case_in_netns (binds [::]): steer_all_to's error for [::] of both settings."""
    with reuseport_listener("[::]:0") as v6only:
        port = v6only.getsockname()[1]
        with reuseport_listener(f"[::]:{port}", dualstack=True) as dual:
            with pytest.raises(InvalidArgument) as info:
                steering.steer_all_to([v6only, dual], 0)
            return str(info.value)


@pytest.mark.root
@pytest.mark.ipv6
def test_steering_refuses_ipv6_members_of_both_v6only_settings() -> None:
    # [::]:port with V6ONLY on and off: both bind, each in a group of its own.
    # Only the wildcard has both settings (inet6_bind sets V6ONLY on any other
    # IPv6 address): it binds every interface, so in a namespace of its own.
    message = _case_in_netns(_both_v6only_settings_refused)
    assert "(dual-stack) but group member 0 is TCP on [::]:" in message
    assert "(IPv6-only)" in message


@pytest.mark.parametrize(
    ("count", "kind", "needle"),
    [
        (0, "tcp", "invalid count 0"),
        (-2, "tcp", "invalid count -2"),
        ("3", "tcp", "invalid count '3'"),
        (2, "sctp", "invalid kind 'sctp'"),
    ],
)
def test_group_rejects_bad_arguments(count: object, kind: str, needle: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        reuseport_group("127.0.0.1:0", count, kind=kind)  # type: ignore[arg-type]
    assert needle in str(info.value)


@pytest.mark.parametrize("failing", [0, 1, 3])
def test_group_all_or_nothing(monkeypatch: pytest.MonkeyPatch, failing: int) -> None:
    real = _sockets.reuseport_listener
    made: list[socket.socket] = []
    calls = 0

    def flaky(*args: object, **kwargs: object) -> socket.socket:
        nonlocal calls
        calls += 1
        if calls - 1 == failing:
            raise OSError(errno.EMFILE, "injected: too many open files")
        sock = real(*args, **kwargs)  # type: ignore[arg-type]
        made.append(sock)
        return sock

    monkeypatch.setattr(_sockets, "reuseport_listener", flaky)
    before = open_fds()
    with pytest.raises(GroupMemberError) as info:
        reuseport_group("127.0.0.1:0", 4)
    assert info.value.index == failing
    assert f"member {failing} of 4 failed" in str(info.value)
    assert "injected" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.errno == errno.EMFILE  # the member's code, as a plain OSError has it
    assert all(s.fileno() == -1 for s in made)
    assert open_fds() == before


@pytest.mark.parametrize("error", [KeyboardInterrupt, TypeError])
def test_group_closes_its_members_on_any_exception(
    monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    real = _sockets.reuseport_udp
    made: list[socket.socket] = []

    def flaky(*args: object, **kwargs: object) -> socket.socket:
        if len(made) == 2:
            raise error("injected")
        sock = real(*args, **kwargs)  # type: ignore[arg-type]
        made.append(sock)
        return sock

    monkeypatch.setattr(_sockets, "reuseport_udp", flaky)
    before = open_fds()
    with pytest.raises(error, match="injected") as info:
        reuseport_group("127.0.0.1:0", 4, kind="udp")
    assert type(info.value) is error  # not wrapped: it is not a member's socket error
    assert len(made) == 2 and all(s.fileno() == -1 for s in made)
    assert open_fds() == before


def test_group_member_conflict_is_reported() -> None:
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        with pytest.raises(GroupMemberError, match="member 0 of 2 failed") as info:
            reuseport_group(plain.getsockname(), 2)
        assert isinstance(info.value.__cause__, AddressInUse)
        assert info.value.errno == errno.EADDRINUSE


# --------------------------------------------------------------------------- clients


def test_connect_tcp() -> None:
    with reuseport_listener("127.0.0.1:0") as lst:
        lst.settimeout(10)
        port = lst.getsockname()[1]
        with connect_tcp(f"127.0.0.1:{port}", source="127.0.0.1:0", timeout=5) as c:
            assert not os.get_inheritable(c.fileno())
            assert c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert c.gettimeout() is None
            conn, peer = lst.accept()
            conn.close()
            assert peer == c.getsockname()
        with connect_tcp(("127.0.0.1", port), nonblocking=True) as c:
            assert c.getblocking() is False
            lst.accept()[0].close()


def test_connect_refused_names_the_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connect is refused
        with pytest.raises(ConnectionRefusedError, match=f"connect to 127.0.0.1:{port}"):
            connect_tcp(("127.0.0.1", port))
        with pytest.raises(InvalidArgument, match="invalid timeout -1"):
            connect_tcp(("127.0.0.1", port), timeout=-1)


@pytest.mark.parametrize(
    "timeout", ["5", math.inf, -math.inf, math.nan, 0, 0.0, -1, True, 10**400, 1e10, [5]]
)
def test_connect_tcp_rejects_bad_timeouts_before_making_a_socket(
    timeout: object, refused_address: str
) -> None:
    before = open_fds()
    with pytest.raises(InvalidArgument) as info:
        connect_tcp(refused_address, timeout=timeout)  # type: ignore[arg-type]
    assert f"invalid timeout {timeout!r}" in str(info.value)
    assert open_fds() == before


def test_connect_tcp_source_of_the_other_family(monkeypatch: pytest.MonkeyPatch) -> None:
    with reuseport_listener("127.0.0.1:0") as lst:
        peer = lst.getsockname()
        before = open_fds()
        with pytest.raises(AddressError) as info:
            connect_tcp(peer, source="[::1]:0", timeout=5)
        message = str(info.value)
        assert "'[::1]:0'" in message
        assert f"source is IPv6 but the peer 127.0.0.1:{peer[1]} is IPv4" in message
        # An unknown source name is reported as itself, message intact (the name
        # answered from memory: no query leaves the host).
        _fake_resolver(monkeypatch, {})
        with pytest.raises(reuselb.HostNotFound) as unknown:
            connect_tcp(peer, source="no-such-host.invalid:0", timeout=5)
        assert "unknown host 'no-such-host.invalid'" in str(unknown.value)
        assert "None" not in str(unknown.value)
        # A source that is not an address of this host (TEST-NET-1, RFC 5737) is the
        # source's fault, not the peer's.
        with pytest.raises(AddressError, match="'192.0.2.1:0': not an address of this host"):
            connect_tcp(peer, source="192.0.2.1:0", timeout=5)
        # A source port another socket holds.
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            held = holder.getsockname()[1]
            with pytest.raises(reuselb.AddressInUse):
                connect_tcp(peer, source=f"127.0.0.1:{held}", timeout=5)
        assert open_fds() == before


def test_connect_tcp_source_in_use_names_the_source(no_fd_leak: None) -> None:
    # Before: "address 127.0.0.1:<port> is already in use by a socket that is not in
    # a reuseport group with this one (it lacks SO_REUSEPORT, or belongs to another
    # user id)": false of a holder with SO_REUSEPORT and our uid; it is connect_tcp's
    # own socket that has no SO_REUSEPORT.
    with (
        reuseport_listener("127.0.0.1:0") as peer,
        reuseport_listener("127.0.0.1:0") as holder,
    ):
        source = holder.getsockname()
        with pytest.raises(reuselb.AddressInUse) as info:
            connect_tcp(peer.getsockname(), source=source, timeout=5)
        assert str(info.value) == (
            f"source address 127.0.0.1:{source[1]} is in use by another socket or a "
            f"recent connection in TIME_WAIT: {os.strerror(errno.EADDRINUSE)}"
        )
        assert info.value.errno == errno.EADDRINUSE
        assert info.value.address == f"127.0.0.1:{source[1]}"


def test_connect_tcp_source_held_by_time_wait_says_so(no_fd_leak: None) -> None:
    # Before: "is in use by another socket", with no socket open on the port: the
    # holder is connect_tcp's own earlier connection from that source, which closed
    # first and sits in TIME_WAIT (FIN_WAIT_2 until the peer's FIN), still bound.
    with reuseport_listener("127.0.0.1:0") as peer:
        peer.settimeout(10)
        with socket.socket() as probe:  # a free port to use as the fixed source
            probe.bind(("127.0.0.1", 0))
            source = probe.getsockname()
        first = connect_tcp(peer.getsockname(), source=source, timeout=5)
        conn = peer.accept()[0]
        with conn:
            first.close()  # the active close: this side goes to TIME_WAIT
            conn.settimeout(10)
            assert conn.recv(1) == b""
        with pytest.raises(reuselb.AddressInUse) as info:
            connect_tcp(peer.getsockname(), source=source, timeout=5)
        assert str(info.value) == (
            f"source address 127.0.0.1:{source[1]} is in use by another socket or a "
            f"recent connection in TIME_WAIT: {os.strerror(errno.EADDRINUSE)}"
        )
        assert info.value.errno == errno.EADDRINUSE


def test_connect_tcp_time_wait_is_not_shared_by_reuseaddr_on_the_new_socket(
    no_fd_leak: None,
) -> None:
    # Before: the docstring said the TIME_WAIT blocks the source port because
    # "this socket has no SO_REUSEADDR to share it". Linux shares a TIME_WAIT port
    # only when both the closed socket and the new one had SO_REUSEADDR
    # (inet_csk_bind_conflict checks sk_reuse of each); connect_tcp sets it on
    # neither, so a new socket with it alone is still refused.
    with reuseport_listener("127.0.0.1:0") as peer:
        peer.settimeout(10)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            source = probe.getsockname()
        first = connect_tcp(peer.getsockname(), source=source, timeout=5)
        conn = peer.accept()[0]
        with conn:
            first.close()  # the active close: this side goes to TIME_WAIT
            conn.settimeout(10)
            assert conn.recv(1) == b""
        with socket.socket() as again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError, match="Address already in use") as info:
                again.bind(source)
            assert info.value.errno == errno.EADDRINUSE
    doc = " ".join((connect_tcp.__doc__ or "").split())
    in_use = doc.split(":raises AddressInUse:")[1].split(":raises")[0]
    assert "this socket has no SO_REUSEADDR" not in in_use
    assert "both that connection's socket and the new one had it" in in_use


@pytest.mark.ipv6
@pytest.mark.usefixtures("ipv4_only_localhost")
def test_connect_tcp_source_name_without_the_peers_family(no_fd_leak: None) -> None:
    # Before: HostNotFound "unknown host 'localhost': Name or service not known",
    # though the docstring promised AddressError for a source of another family
    # than every peer address, and "localhost" resolves (to 127.0.0.1).
    with reuseport_listener("[::1]:0") as lst:
        port = lst.getsockname()[1]
        with pytest.raises(AddressError) as info:
            connect_tcp(("::1", port), source="localhost:0", timeout=5)
        assert not isinstance(info.value, reuselb.HostNotFound)
        assert str(info.value) == (
            "invalid address 'localhost:0': 'localhost' has no IPv6 address, only IPv4 "
            f"(127.0.0.1), and the peer [::1]:{port} is IPv6"
        )
    # A peer of its family: it dials.
    with (
        reuseport_listener("127.0.0.1:0") as lst,
        connect_tcp(lst.getsockname(), source="localhost:0", timeout=5) as c,
    ):
        assert c.getsockname()[0] == "127.0.0.1"
        lst.settimeout(10)
        lst.accept()[0].close()


@pytest.mark.ipv6
def test_connect_tcp_source_bind_failure_blames_the_source(
    monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    # Before: "connect to [::1]:<port>: Invalid argument" (or "No such device"),
    # an OSError naming the peer, after trying every other peer address too.
    with reuseport_listener("[::1]:0") as lst:
        peer = f"[::1]:{lst.getsockname()[1]}"
        with pytest.raises(AddressError, match=r"'\[fe80::abcd\]:0'.*needs a zone"):
            connect_tcp(peer, source="[fe80::abcd]:0", timeout=5)

        # With the up-front check off, the source reaches bind() (ENODEV here): the
        # error still names the source, and the second candidate is not tried.
        monkeypatch.setattr(_sockets, "_check_zone", lambda *args: None, raising=False)

        def two_candidates(*args: Any, **kwargs: Any) -> Any:
            found = resolve_address(*args, **kwargs)
            return found if kwargs["passive"] else found * 2

        made: list[socket.socket] = []
        real_new_socket = _sockets._new_socket

        def counting(*args: Any) -> socket.socket:
            made.append(real_new_socket(*args))
            return made[-1]

        monkeypatch.setattr(_sockets, "resolve_address", two_candidates)
        monkeypatch.setattr(_sockets, "_new_socket", counting)
        source = f"[fe80::abcd%{_absent_interface_index()}]:0"
        with pytest.raises(AddressError) as info:
            connect_tcp(peer, source=source, timeout=5)
        assert repr(source) in str(info.value)
        assert "no interface with index" in str(info.value)
        assert "connect to" not in str(info.value)
        assert len(made) == 1 and made[0].fileno() == -1


def test_enodev_from_an_ipv4_bind_is_reported_not_an_index_error(
    monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    # Before: IndexError("tuple index out of range") from every factory: the ENODEV
    # branch read the IPv6 scope id, sockaddr[3], of an IPv4 2-tuple. A seccomp
    # filter (a container runtime's profile) can make bind() fail with any errno.
    reuselb.supports_reuseport()  # the probe binds too: run it before the patch
    with socket.create_server(("127.0.0.1", 0)) as peer:
        port = peer.getsockname()[1]
        real_bind = socket.socket.bind

        def enodev_for_ipv4(self: socket.socket, address: Any) -> None:
            if self.family == socket.AF_INET:
                raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
            real_bind(self, address)

        monkeypatch.setattr(socket.socket, "bind", enodev_for_ipv4)
        makers: list[Callable[[], object]] = [
            lambda: reuseport_listener("127.0.0.1:0"),
            lambda: reuseport_udp("127.0.0.1:0"),
            lambda: reuselb.hold_port("127.0.0.1:0"),
        ]
        for make in makers:
            with pytest.raises(OSError, match="No such device") as info:
                make()
            assert type(info.value) is OSError and info.value.errno == errno.ENODEV
        with pytest.raises(GroupMemberError) as member:
            reuseport_group("127.0.0.1:0", 2)
        assert isinstance(member.value.__cause__, OSError)
        assert member.value.__cause__.errno == errno.ENODEV
        # connect_tcp blames the source, as for any other errno bind gives it.
        with pytest.raises(AddressError) as source:
            connect_tcp(f"127.0.0.1:{port}", source="127.0.0.1:0", timeout=5)
        assert "'127.0.0.1:0'" in str(source.value)
        assert "No such device" in str(source.value)
        assert isinstance(source.value.__cause__, OSError)
        assert source.value.__cause__.errno == errno.ENODEV


def test_connect_error_keeps_its_class_errno_and_cause() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(ConnectionRefusedError) as info:
            connect_tcp(("127.0.0.1", port), timeout=5)
    assert info.value.errno == errno.ECONNREFUSED
    assert str(info.value) == f"[Errno {errno.ECONNREFUSED}] connect to 127.0.0.1:{port}: " + (
        os.strerror(errno.ECONNREFUSED)
    )
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


# --------------------------------------------------------------------------- socket_info


def test_socket_info_tells_fork_sharing_from_a_group() -> None:
    with (
        reuseport_listener("127.0.0.1:0") as lst,
        socket.socket(fileno=os.dup(lst.fileno())) as dup,
    ):
        dup.set_inheritable(False)
        assert socket_info(dup).inode == socket_info(lst).inode
        with reuseport_listener(lst.getsockname()) as other:
            assert socket_info(other).inode != socket_info(lst).inode


def test_socket_info_bad_input() -> None:
    s = socket.socket()
    s.close()
    with pytest.raises(SocketClosed, match="socket is closed"):
        socket_info(s)
    with pytest.raises(WrongSocketType, match="expected a socket.socket, got int"):
        socket_info(3)  # type: ignore[arg-type]
    with socket.socket(socket.AF_UNIX) as unix:
        info = socket_info(unix)
        assert info.address is None
        assert info.backlog is None


# --------------------------------------------------------------------------- link-local IPv6

# The host's loopback has no link-local address, and the host's network must not be
# touched: each of these tests runs a script in a network namespace of its own
# (unshare needs root), where a veth pair gets fe80::abcd without duplicate address
# detection, so the address is usable as soon as `ip` returns.
_NETNS_SETUP = (
    "ip link set lo up && ip link add d0 type veth peer name d1 && "
    "ip link set d0 up && ip link set d1 up && ip -6 addr add fe80::abcd/64 dev d0 nodad"
)
_NETNS_PRELUDE = f"""
import json, socket, subprocess
from reuselb import *
subprocess.run({_NETNS_SETUP!r}, shell=True, check=True)
INDEX = socket.if_nametoindex("d0")
out = {{"index": INDEX}}
def outcome(call):
    try:
        result = call()
    except Exception as exc:
        return f"{{type(exc).__name__}}: {{exc}}"
    if isinstance(result, socket.socket):
        result.close()
    return "ok"
"""


def _in_netns(script: str) -> dict[str, Any]:
    """Run *script* in a fresh network namespace; it fills the dict ``out``."""
    proc = subprocess.run(
        [
            "unshare",
            "--net",
            sys.executable,
            "-c",
            _NETNS_PRELUDE + script + "\nprint(json.dumps(out))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


@pytest.mark.root
@pytest.mark.ipv6
def test_socket_info_address_keeps_the_link_local_zone() -> None:
    # Before: socket_info() dropped the scope id, and its address could not be
    # dialed or bound again (EINVAL).
    out = _in_netns(
        """
with reuseport_listener("[fe80::abcd%d0]:0") as lst:
    info = socket_info(lst)
    out["address"] = str(info.address)
    out["port"] = lst.getsockname()[1]
    out["connect"] = outcome(lambda: connect_tcp(info.address, timeout=10))
    out["rebind"] = outcome(lambda: reuseport_listener(info.address))
"""
    )
    assert out["address"] == f"[fe80::abcd%{out['index']}]:{out['port']}"
    assert out["connect"] == "ok"
    assert out["rebind"] == "ok"


# --------------------------------------------------------------------------- other systems


@pytest.fixture
def fake_platform(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    _sockets._capability.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    _sockets._capability.cache_clear()


def test_macos_refuses_balanced_listener(fake_platform: pytest.MonkeyPatch) -> None:
    fake_platform.setattr(sys, "platform", "darwin")
    assert reuselb.supports_reuseport(balanced=False)
    assert not reuselb.supports_reuseport()
    with pytest.raises(ReuseportUnsupported, match="last socket bound") as info:
        reuseport_listener("127.0.0.1:0")
    assert "balanced=False" in str(info.value)
    assert isinstance(info.value, OSError)
    with reuseport_listener("127.0.0.1:0", balanced=False) as lst:
        assert socket_info(lst).listening


def test_windows_has_no_reuseport(fake_platform: pytest.MonkeyPatch) -> None:
    fake_platform.setattr(sys, "platform", "win32")
    assert not reuselb.supports_reuseport(balanced=False)
    with pytest.raises(ReuseportUnsupported, match="Windows has no SO_REUSEPORT"):
        reuseport_udp("127.0.0.1:0", balanced=False)


def test_kernel_refusing_the_option(fake_platform: pytest.MonkeyPatch) -> None:
    fake_platform.setattr(_sockets, "_probe", lambda option: False)
    assert not reuselb.supports_reuseport(balanced=False)
    with pytest.raises(ReuseportUnsupported, match="kernel refused"):
        reuseport_group("127.0.0.1:0", 2)


def test_probe_without_fds_is_an_error_and_not_remembered(
    fake_platform: pytest.MonkeyPatch,
) -> None:
    # No fd left (EMFILE) says nothing about SO_REUSEPORT: the probe raises, and the
    # next call, with fds again, probes afresh instead of answering "unsupported".
    with fds_left(0), pytest.raises(OSError, match="Too many open files") as info:
        reuselb.supports_reuseport()
    assert info.value.errno == errno.EMFILE
    assert reuselb.supports_reuseport()
    with reuseport_listener("127.0.0.1:0") as lst:
        assert socket_info(lst).reuseport


def test_group_probe_without_fds_raises_the_documented_oserror(
    fake_platform: pytest.MonkeyPatch,
) -> None:
    # Before: the bare OSError (and the probe's AddressInUse) from the first call's
    # SO_REUSEPORT probe were in no :raises: of reuseport_group, which listed only
    # GroupMemberError for an OSError.
    before = open_fds()
    with (
        fds_left(1),
        pytest.raises(OSError, match="Too many open files") as info,
    ):  # the probe needs two
        reuseport_group("127.0.0.1:0", 2)
    assert info.value.errno == errno.EMFILE
    assert not isinstance(info.value, reuselb.GroupMemberError)
    assert open_fds() == before
    doc = " ".join((reuseport_group.__doc__ or "").split())
    assert ":raises OSError: that probe could not run (``EMFILE``: no fd left)" in doc
    assert ":raises AddressInUse: the process's first SO_REUSEPORT probe" in doc
    with reuseport_group("127.0.0.1:0", 2) as group:  # probed afresh
        assert len(group) == 2


# Run by run_in_netns: ip_local_port_range is per network namespace, so narrowing
# it there leaves the host's alone. Two sockets per family take both ports.
_PORTS_EXHAUSTED = """
import json, socket
import reuselb
RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
with open(RANGE) as f:
    wide = f.read()
hogs = []
def exhaust():
    with open(RANGE, "w") as f:
        f.write("40000 40001")
    for _ in range(2):
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                s = socket.socket(family, kind)
                s.bind((host, 0))
                hogs.append(s)
def free():
    for s in hogs:
        s.close()
    with open(RANGE, "w") as f:
        f.write(wide)
out = {}
def outcome(call):
    try:
        result = call()
    except OSError as exc:
        return [type(exc).__name__, exc.errno, str(exc)]
    if isinstance(result, (socket.socket, reuselb.ReuseportGroup)):
        result.close()
        return "socket"
    return result
"""


@pytest.mark.root
def test_probe_without_a_free_port_is_an_error_and_not_remembered() -> None:
    # Before: the probe's first bind (port 0) failing with EADDRINUSE was taken as
    # the kernel refusing SO_REUSEPORT, and remembered: every later listener of the
    # process raised ReuseportUnsupported, long after ports were free again.
    out = run_in_netns(
        _PORTS_EXHAUSTED
        + """
exhaust()
out["first"] = outcome(lambda: reuselb.reuseport_listener("127.0.0.1:0"))
out["exhausted"] = outcome(reuselb.supports_reuseport)
free()
out["freed"] = outcome(reuselb.supports_reuseport)
out["listener"] = outcome(lambda: reuselb.reuseport_listener("127.0.0.1:0"))
print(json.dumps(out))
"""
    )
    # The probe's own failure is AddressInUse, as the docs promise for a port-0
    # bind with no free port, also for the process's first listener (which probes).
    for name in ("first", "exhausted"):
        assert isinstance(out[name], list), out
        kind, err, message = out[name]
        assert (kind, err) == ("AddressInUse", errno.EADDRINUSE)
        assert "no free port left in the ephemeral range" in message
        assert "probe" in message
    assert out["freed"] is True
    assert out["listener"] == "socket"


def test_fixed_port_factories_document_the_probes_errors() -> None:
    # Before: only reuseport_group's :raises: named the process's first SO_REUSEPORT
    # probe; reuseport_listener, reuseport_udp and hold_port probe too (_bound calls
    # _reuseport_option first) and raise its AddressInUse for a fixed port no socket
    # holds, and its EMFILE, but their docs spoke of port 0 and the kernel only.
    for factory in (reuseport_listener, reuseport_udp, reuselb.hold_port):
        doc = " ".join((factory.__doc__ or "").split())
        in_use = doc.split(":raises AddressInUse:")[1].split(":raises")[0]
        assert "for any port, a fixed one too, the process's first SO_REUSEPORT probe" in (
            in_use
        ), factory.__name__
        assert "no free TCP or UDP port in the ephemeral range" in in_use
        os_error = doc.split(":raises OSError:")[1].split(":raises")[0]
        assert "that probe could not run (``EMFILE``: no fd left" in os_error


def test_fixed_port_listener_probe_without_fds_raises_the_documented_oserror(
    fake_platform: pytest.MonkeyPatch,
) -> None:
    # The EMFILE the docstring now lists, from a fixed-port listener's probe.
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        address = free.getsockname()
    before = open_fds()
    with fds_left(1), pytest.raises(OSError, match="Too many open files") as info:
        reuseport_listener(address)  # the probe needs two fds
    assert info.value.errno == errno.EMFILE
    assert open_fds() == before


@pytest.mark.root
def test_fixed_port_factories_raise_the_probes_address_in_use() -> None:
    # The first fixed-port call of a process with no ephemeral port free fails in
    # the probe, not on its own address (which no socket holds): AddressInUse with
    # the probe's message, as the :raises AddressInUse: of each now says.
    out = run_in_netns(
        _PORTS_EXHAUSTED
        + """
exhaust()
out["listener"] = outcome(lambda: reuselb.reuseport_listener("127.0.0.1:40500"))
out["udp"] = outcome(lambda: reuselb.reuseport_udp("127.0.0.1:40501"))
out["hold_port"] = outcome(lambda: reuselb.hold_port("127.0.0.1:40502"))
free()
out["freed"] = outcome(lambda: reuselb.reuseport_listener("127.0.0.1:40500"))
print(json.dumps(out))
"""
    )
    for name in ("listener", "udp", "hold_port"):
        assert isinstance(out[name], list), out
        kind, err, message = out[name]
        assert (kind, err) == ("AddressInUse", errno.EADDRINUSE)
        assert "no free port left in the ephemeral range" in message
        assert "the SO_REUSEPORT probe needs one" in message
    assert out["freed"] == "socket"


@pytest.mark.root
def test_probe_without_a_free_tcp_port_answers_from_udp() -> None:
    # Before: a process whose TCP ephemeral ports were all taken (a proxy holding
    # ~28k outgoing connections) could not make its first reuseport listener even
    # on a fixed port, because the probe binds TCP port 0. UDP ports are counted
    # apart: the probe answers from UDP, and the fixed-port listener is made.
    out = run_in_netns(
        _PORTS_EXHAUSTED
        + """
with open(RANGE, "w") as f:
    f.write("40000 40001")
for _ in range(2):
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind((host, 0))
        hogs.append(s)
out["tcp_port0"] = outcome(lambda: socket.create_server(("127.0.0.1", 0)))
out["fixed"] = outcome(lambda: reuselb.reuseport_listener("127.0.0.1:40500"))
out["supported"] = outcome(reuselb.supports_reuseport)
free()
print(json.dumps(out))
"""
    )
    assert out["tcp_port0"][:2] == ["OSError", errno.EADDRINUSE], out  # TCP truly used up
    assert out["fixed"] == "socket", out
    assert out["supported"] is True


@pytest.mark.root
def test_port_zero_without_a_free_port_says_so() -> None:
    # Before: AddressInUse blamed "a socket that is not in a reuseport group with
    # this one (it lacks SO_REUSEPORT...)": for port 0 no socket holds the address,
    # the ephemeral range is used up.
    out = run_in_netns(
        _PORTS_EXHAUSTED
        + """
assert reuselb.supports_reuseport()  # probed while ports are free
exhaust()
for name, call in (
    ("listener", lambda: reuselb.reuseport_listener("127.0.0.1:0")),
    ("udp", lambda: reuselb.reuseport_udp("[::1]:0")),
    ("hold_port", lambda: reuselb.hold_port("127.0.0.1:0")),
    ("group", lambda: reuselb.reuseport_group("127.0.0.1:0", 2)),
):
    out[name] = outcome(call)
free()
print(json.dumps(out))
"""
    )
    for name in ("listener", "udp", "hold_port", "group"):
        kind, err, message = out[name]
        assert kind == ("GroupMemberError" if name == "group" else "AddressInUse"), out[name]
        assert err == errno.EADDRINUSE
        assert "no free port left in the ephemeral range" in message
        assert "SO_REUSEPORT" not in message


@pytest.mark.root
def test_udp_port_zero_takes_the_one_free_port_of_a_narrow_range() -> None:
    # The same fault as test_udp_port_zero_never_takes_a_port_another_reuseport_
    # socket_holds, made certain: with 9 of the 10 ports of the range held by
    # another service's SO_REUSEPORT UDP sockets (same user), a port-0 member used
    # to take one of them 9 times in 10, the probe (on UDP when no TCP port is
    # free) joined them too, and with all 10 held both "succeeded". Now every member
    # gets the one free port, and with none free they raise AddressInUse.
    out = run_in_netns(
        _PORTS_EXHAUSTED
        + """
assert reuselb.supports_reuseport()  # probed while ports are free
with open(RANGE, "w") as f:
    f.write("40000 40009")
def hold(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hogs.append(s)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", port))
for port in range(40000, 40009):
    hold(port)
ports = set()
for _ in range(20):
    with reuselb.reuseport_udp("127.0.0.1:0") as s:
        ports.add(s.getsockname()[1])
    with reuselb.reuseport_group("127.0.0.1:0", 2, kind="udp") as g:
        ports.add(g.port)
out["ports"] = sorted(ports)
hold(40009)
out["full"] = outcome(lambda: reuselb.reuseport_udp("127.0.0.1:0"))
for _ in range(10):  # no TCP port free either: the probe tries UDP
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    hogs.append(s)
reuselb._sockets._capability.cache_clear()
out["probe"] = outcome(reuselb.supports_reuseport)
free()
print(json.dumps(out))
"""
    )
    assert out["ports"] == [40009], out
    for name in ("full", "probe"):
        kind, err, message = out[name]
        assert (kind, err) == ("AddressInUse", errno.EADDRINUSE), out
        assert "no free port left in the ephemeral range" in message


def test_probe_falls_back_to_ipv6_loopback(fake_platform: pytest.MonkeyPatch) -> None:
    # An IPv6-only namespace has no 127.0.0.1: the probe answers from ::1.
    real = _sockets._new_socket

    def no_ipv4(family: socket.AddressFamily, kind: socket.SocketKind, nb: bool) -> socket.socket:
        if family == socket.AF_INET:
            raise OSError(errno.EAFNOSUPPORT, "no IPv4 here")
        return real(family, kind, nb)

    fake_platform.setattr(_sockets, "_new_socket", no_ipv4)
    assert reuselb.supports_reuseport()


#: Each call with a flag's value (its first argument) and refused_address (its second,
#: for the calls that would connect).
_FLAG_CALLS: dict[str, Callable[[Any, str], object]] = {
    "supports_reuseport(balanced)": lambda v, _: reuselb.supports_reuseport(balanced=v),
    "tcp_socket(nodelay)": lambda v, _: tcp_socket(nodelay=v),
    "tcp_socket(nonblocking)": lambda v, _: tcp_socket(nonblocking=v),
    "udp_socket(nonblocking)": lambda v, _: udp_socket(nonblocking=v),
    "reuseport_listener(nodelay)": lambda v, _: reuseport_listener("127.0.0.1:0", nodelay=v),
    "reuseport_listener(balanced)": lambda v, _: reuseport_listener("127.0.0.1:0", balanced=v),
    "reuseport_listener(dualstack)": lambda v, _: reuseport_listener("[::1]:0", dualstack=v),
    "reuseport_udp(nonblocking)": lambda v, _: reuseport_udp("127.0.0.1:0", nonblocking=v),
    "hold_port(balanced)": lambda v, _: reuselb.hold_port("127.0.0.1:0", balanced=v),
    "reuseport_group(balanced)": lambda v, _: reuseport_group("127.0.0.1:0", 2, balanced=v),
    "reuseport_group(nodelay)": lambda v, _: reuseport_group("127.0.0.1:0", 2, nodelay=v),
    "connect_tcp(nodelay)": lambda v, to: connect_tcp(to, nodelay=v),
    "connect_tcp(nonblocking)": lambda v, to: connect_tcp(to, nonblocking=v),
    "listen_fds(unset_environment)": lambda v, _: reuselb.listen_fds(unset_environment=v),
    "inherited_sockets(unset_environment)": lambda v, _: reuselb.inherited_sockets(
        unset_environment=v
    ),
}


@pytest.mark.parametrize("call", sorted(_FLAG_CALLS))
@pytest.mark.parametrize("value", ["no", 0, None])
def test_flags_must_be_bools(
    call: str, value: object, refused_address: str, no_fd_leak: None
) -> None:
    # A flag read for its truth would turn "no" (from a config file) into True.
    name = call[call.index("(") + 1 : -1]
    with pytest.raises(InvalidArgument, match="must be a bool") as info:
        _FLAG_CALLS[call](value, refused_address)
    assert info.value.name == name
    assert info.value.value == value
    assert repr(value) in str(info.value)


def test_freebsd_uses_reuseport_lb() -> None:
    option, balances, _ = _sockets._platform_option("freebsd14")
    assert option == getattr(socket, "SO_REUSEPORT_LB", 0x10000)
    assert balances


# --------------------------------------------------------------------------- leaks


def test_no_fd_leak_over_1000_calls() -> None:
    with (
        socket.socket() as plain,
        socket.socket(type=socket.SOCK_DGRAM) as plain_udp,
        socket.socket() as closed_port,
    ):
        closed_port.bind(("127.0.0.1", 0))  # bound, never listening: connect is refused
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        taken = plain.getsockname()
        plain_udp.bind(taken)  # the same port, held for UDP too
        failing = [
            lambda: connect_tcp(closed_port.getsockname()),
            lambda: reuseport_udp("300.0.0.1:0"),
            lambda: reuseport_listener("127.0.0.1:0", backlog=0),
            lambda: reuseport_udp(taken),
        ]
        before = open_fds()
        for i in range(250):
            with reuseport_listener("127.0.0.1:0"):
                pass
            with pytest.raises(AddressInUse):
                reuseport_listener(taken)
            with pytest.raises(GroupMemberError):
                reuseport_group(taken, 2, kind="tcp" if i % 2 else "udp")
            with pytest.raises(
                (ConnectionRefusedError, AddressError, InvalidArgument, AddressInUse)
            ):
                failing[i % 4]()
        assert open_fds() == before


# --------------------------------------------------------------------------- processes

_CHILD = """
import json, os, socket
fds = []
for name in os.listdir("/proc/self/fd"):
    fd = int(name)
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        continue
    fds.append(fd)
    s.close()
print(json.dumps(fds))
"""


def test_nothing_is_inherited_across_exec() -> None:
    socks = [
        tcp_socket(),
        udp_socket(),
        reuseport_listener("127.0.0.1:0"),
        reuseport_udp("127.0.0.1:0"),
    ]
    group = reuseport_group("127.0.0.1:0", 2)
    try:
        lst = socks[2]
        lst.settimeout(10)
        client = connect_tcp(lst.getsockname())
        accepted, _ = lst.accept()
        socks += [client, accepted]
        ours = {s.fileno() for s in socks} | {m.fileno() for m in group}
        out = subprocess.run(
            [sys.executable, "-c", _CHILD],
            close_fds=False,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        inherited_sockets = set(json.loads(out))
        assert not (ours & inherited_sockets), f"inherited: {sorted(ours & inherited_sockets)}"
    finally:
        group.close()
        for s in socks:
            s.close()


def test_kernel_balances_across_four_processes() -> None:
    with _reserve() as holder:
        port = holder.getsockname()[1]
        procs = start_workers(4, port)
        try:
            served: collections.Counter[int] = collections.Counter()
            sources = set()
            for _ in range(400):
                with connect_tcp(("127.0.0.1", port), timeout=10) as c:
                    c.settimeout(10)
                    sources.add(c.getsockname()[1])
                    served[int(c.makefile().readline())] += 1
        finally:
            stop_workers(procs)
    print("\nconnections per worker process:", dict(served))
    assert len(sources) == 400
    assert sum(served.values()) == 400
    assert set(served) == {p.pid for p in procs}, "every process accepted some"
    assert all(p.returncode == 0 for p in procs)


def _reserve() -> socket.socket:
    return reuselb.hold_port("127.0.0.1:0")


def test_hold_port_reserves_without_taking_connections() -> None:
    with reuselb.hold_port("127.0.0.1:0") as holder:
        info = socket_info(holder)
        assert info.reuseport
        assert not info.listening
        port = holder.getsockname()[1]
        with pytest.raises(OSError, match="Address already in use"):  # held against outsiders
            socket.create_server(("127.0.0.1", port)).close()
        with reuseport_listener(("127.0.0.1", port)) as worker:
            for _ in range(20):  # every connection reaches the listening member
                with connect_tcp(("127.0.0.1", port), timeout=5):
                    worker.settimeout(10)
                    worker.accept()[0].close()


@pytest.mark.parametrize("taken", [False, True])
def test_group_removal_interrupted_at_any_line_is_all_or_nothing(taken: bool) -> None:
    # drain_close takes a member out with _remove and, after an interrupt, tells a
    # finished removal by the size. _remove used to pop the last member before moving
    # it into the freed slot: a signal handler raising between the two left the
    # closed member listed and the last one in no slot (closed by the garbage
    # collector, resetting the clients queued on it).
    import types

    def run(k: int) -> tuple[bool, list[str | None], dict[int, str | None]]:
        count = 0
        code = reuselb.ReuseportGroup._remove.__code__

        def tracer(frame: types.FrameType, event: str, arg: object) -> Any:
            if frame.f_code is not code:
                return None

            def local(frame: types.FrameType, event: str, arg: object) -> Any:
                nonlocal count
                if event == "line":
                    count += 1
                    if count == k:
                        raise KeyboardInterrupt
                return local

            return local

        with reuseport_group("127.0.0.1:0", 3) as group:
            m0, m1, m2 = group.members
            if taken:
                group.take(2)
            previous = sys.gettrace()
            interrupted = False
            try:
                sys.settrace(tracer)
                try:
                    group._remove(0)
                finally:
                    sys.settrace(previous)
            except KeyboardInterrupt:
                interrupted = True
            members = list(group._members)
            slots = {i: ref() for i, ref in group._taken.items()}
            names = {id(m0): "m0", id(m1): "m1", id(m2): "m2", id(None): None}
            state = ([names[id(m)] for m in members], {i: names[id(s)] for i, s in slots.items()})
            for m in (m0, m1, m2):  # a removed or taken member is not the group's
                m.close()
        return interrupted, *state

    before = (["m0", "m1", None], {2: "m2"}) if taken else (["m0", "m1", "m2"], {})
    after = ([None, "m1"], {0: "m2"}) if taken else (["m2", "m1"], {})
    seen_interrupts = 0
    for k in range(1, 200):  # bounded: _remove has a few dozen line events at most
        interrupted, members, slots = run(k)
        assert (members, slots) in (before, after), (k, members, slots)
        if not interrupted:
            assert (members, slots) == after
            break
        seen_interrupts += 1
    else:
        pytest.fail("_remove never completed")
    assert seen_interrupts >= 3


def test_a_refused_privileged_port_names_the_address() -> None:
    # Before: bind's EACCES came out as a bare "[Errno 13] Permission denied", the one
    # bind failure whose message did not name the address.
    prefix = without_bind_privilege()
    code = (
        "import os, reuselb\n"
        "calls = [('listener', lambda: reuselb.reuseport_listener('127.0.0.1:1')),\n"
        "         ('udp', lambda: reuselb.reuseport_udp('[::1]:1')),\n"
        "         ('hold', lambda: reuselb.hold_port(('127.0.0.1', 1))),\n"
        "         ('group', lambda: reuselb.reuseport_group('127.0.0.1:1', 2))]\n"
        "before = len(os.listdir('/proc/self/fd'))\n"
        "for name, call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except OSError as exc:\n"
        "        print(name, type(exc).__name__, exc.errno, exc.strerror, '|', exc)\n"
        "print('fds', len(os.listdir('/proc/self/fd')) - before)\n"
    )
    out = subprocess.run(
        [*prefix, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    # strerror stays the kernel's text (the examples quote it after the address).
    assert out[0] == (
        "listener PermissionError 13 Permission denied | "
        "[Errno 13] Permission denied: '127.0.0.1:1'"
    )
    assert out[1] == (
        "udp PermissionError 13 Permission denied | [Errno 13] Permission denied: '[::1]:1'"
    )
    assert out[2] == (
        "hold PermissionError 13 Permission denied | [Errno 13] Permission denied: '127.0.0.1:1'"
    )
    # A group reports which member failed, the cause naming the address.
    assert out[3].startswith("group GroupMemberError 13 ")
    assert "reuseport group on 127.0.0.1:1: member 0" in out[3]
    assert "(PermissionError: [Errno 13] Permission denied: '127.0.0.1:1')" in out[3]
    assert out[4] == "fds 0"


def test_socket_info_reads_a_family_and_a_type_python_does_not_name() -> None:
    # Before: ValueError "44 is not a valid AddressFamily" / "10 is not a valid
    # SocketKind" from the enum conversions, for a socket the docstring covers.
    made = []
    for family, kind in ((44, socket.SOCK_RAW), (socket.AF_PACKET, 10)):  # AF_XDP, SOCK_PACKET
        try:
            made.append(socket.socket(family, kind))
        except OSError as exc:  # pragma: no cover - needs CAP_NET_RAW and these families
            pytest.skip(f"cannot make a ({family}, {kind}) socket here: {exc}")
    xdp, packet = made
    try:
        info = socket_info(xdp)
        assert (info.family, info.type) == (44, socket.SOCK_RAW)
        assert info.address is None and info.listening is False
        info = socket_info(packet)
        assert (info.family, info.type) == (socket.AF_PACKET, 10)
        assert type(info.type) is int
    finally:
        for s in made:
            s.close()


def test_socket_info_of_a_listening_unix_socket_has_no_backlog(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sock_diag's inet request is for AF_INET/AF_INET6 only: an AF_UNIX listener got
    # one anyway, read by the kernel as another struct. It is not sent now.
    def no_request(*args: Any) -> None:
        raise AssertionError(f"an inet sock_diag request for an AF_UNIX socket: {args}")

    monkeypatch.setattr(reuselb._sockets, "_sock_diag", no_request)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(tmp_path / "l.sock"))
        s.listen(5)
        info = socket_info(s)
    assert info.listening is True
    assert (info.address, info.backlog, info.queued) == (None, None, None)
