"""Steering programs: which groups the steering functions take, and their errors."""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from reuselb import (
    InvalidArgument,
    ReuseportGroup,
    SocketClosed,
    SteeringError,
    WrongSocketType,
    attach_cpu_steering,
    attach_hash_steering,
    connect_tcp,
    detach_steering,
    get_incoming_cpu,
    hold_port,
    reuseport_group,
    reuseport_listener,
    reuseport_udp,
    set_incoming_cpu,
    steer_all_to,
    steer_away_from,
    tcp_socket,
)
from reuselb import _steering as steering

pytestmark = pytest.mark.linux

Steer = Callable[[Sequence[socket.socket]], None]
_STEERS: list[Steer] = [
    lambda g: steer_all_to(g, 1),
    lambda g: steer_away_from(g, 0),
    attach_hash_steering,
    lambda g: attach_cpu_steering(g, strict=False),
]
_STEER_IDS = ["steer_all_to", "steer_away_from", "attach_hash_steering", "attach_cpu_steering"]


def _no_program(member: socket.socket) -> bool:
    """True when *member*'s group has no steering program."""
    try:
        detach_steering(member)
    except SteeringError as exc:
        if exc.errno != errno.ENOENT:
            raise
        return True
    return False


_NO_PROGRAM = (
    "no program is attached, or the socket is in no kernel reuseport group (e.g. "
    "SO_REUSEPORT set after a UDP socket's bind or a TCP socket's listen)"
)


def _lands_on(members: Sequence[socket.socket], port: int) -> int:
    """The index in *members* of the member one new connection reaches."""
    with connect_tcp(("127.0.0.1", port)):
        ready = select.select(list(members), [], [], 10)[0]
        assert len(ready) == 1
        ready[0].accept()[0].close()
        return list(members).index(ready[0])


@pytest.mark.parametrize("steer", _STEERS, ids=_STEER_IDS)
@pytest.mark.parametrize(
    ("order", "again", "first"), [((0, 0, 1), 1, 0), ((0, 1, 1), 2, 1), ((0, 1, 0), 2, 0)]
)
def test_a_socket_listed_twice_is_refused(
    steer: Steer, order: tuple[int, ...], again: int, first: int
) -> None:
    # Before: the same object listed twice was taken for two members (meant for
    # drain_close's stand-ins): [a, a, b] gave attach_hash_steering the modulus
    # 3 for a kernel group of 2, and steer_all_to(..., 2) an index the kernel
    # does not have (its hash picked instead).
    with reuseport_group("127.0.0.1:0", 2) as group:
        listed = [group[i] for i in order]
        for kind in (list, tuple):
            with pytest.raises(InvalidArgument) as info:
                steer(kind(listed))
            assert str(info.value) == (
                f"invalid group member {again} {listed[again]!r}: is group member {first} "
                "listed again: a kernel reuseport group holds each socket once (list every "
                "member once, in join order)"
            )
            assert _no_program(group[0]), "refused before a program was attached"


def test_a_member_listed_twice_is_refused_before_the_cpu_count() -> None:
    with (
        reuseport_group("127.0.0.1:0", 1) as group,
        pytest.raises(InvalidArgument, match="is group member 0 listed again"),
    ):
        attach_cpu_steering([group[0]] * 2)


@pytest.mark.parametrize("steer", _STEERS, ids=_STEER_IDS)
@pytest.mark.parametrize("closed", [0, 1, 2])
def test_a_group_member_closed_by_hand_is_refused(steer: Steer, closed: int) -> None:
    # Before: a closed member was skipped but still counted; the kernel had moved
    # the last member into its slot, so the program's indexes and modulus were
    # stale (steer_all_to(g, 1) after g[1].close() sent everything to member 2).
    with reuseport_group("127.0.0.1:0", 3) as group:
        members = list(group)
        members[closed].close()
        with pytest.raises(SocketClosed) as info:
            steer(group)  # type: ignore[arg-type]
        assert str(info.value).startswith(
            f"group member {closed} is closed: {members[closed]!r}; closed by hand, it "
            "left the kernel's reuseport group"
        )
        assert info.value.sock is members[closed]
        assert all(_no_program(m) for m in members if m.fileno() != -1)
        # What the message suggests: the open members as a list, in the kernel's
        # order (the last one moved into the closed one's slot).
        kernel = members[:]
        kernel[closed] = kernel[-1]
        kernel.pop()
        for index in (1, 0):
            steer_all_to(kernel, index)
            assert _lands_on(kernel, group.port) == index


@pytest.mark.parametrize("steer", _STEERS, ids=_STEER_IDS)
def test_a_udp_group_member_closed_by_hand_is_told_only_what_works(steer: Steer) -> None:
    # Before: the message suggested drain_close(member, group=group) for a UDP
    # group too, which takes listening TCP sockets only (WrongSocketType).
    with reuseport_group("127.0.0.1:0", 3, kind="udp") as group:
        members = list(group)
        members[1].close()
        with pytest.raises(SocketClosed) as info:
            steer(group)  # type: ignore[arg-type]
        assert str(info.value) == (
            f"group member 1 is closed: {members[1]!r}; closed by hand, it left the "
            "kernel's reuseport group, which moved its last member into the slot: the "
            "group's indexes no longer match the kernel's (pass the open members as a "
            "list, in the kernel's order)"
        )
        # What it suggests works: member 2 moved into slot 1.
        kernel = [members[0], members[2]]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for index in (1, 0):
                steer_all_to(kernel, index)
                client.sendto(b"x", ("127.0.0.1", group.port))
                ready = select.select(kernel, [], [], 10)[0]
                assert ready == [kernel[index]]
                ready[0].recv(1)
    with reuseport_group("127.0.0.1:0", 2) as tcp_group:  # TCP keeps both remedies
        tcp_group[1].close()
        with pytest.raises(SocketClosed, match=r"drain_close\(member, group=group\)"):
            steer(tcp_group)  # type: ignore[arg-type]


def _always_lands_on(members: Sequence[socket.socket], port: int) -> int:
    """The index in *members* that 20 new connections all reach (each its own port).

    Twenty: a group of n members without the program spreads them by the hash of
    their ports, and all 20 land on one member with odds n * n**-20 (2e-6 for 2).
    """
    landed = {_lands_on(members, port) for _ in range(20)}
    assert len(landed) == 1, f"connections landed on members {sorted(landed)}"
    return landed.pop()


def test_a_taken_member_is_not_checked() -> None:
    # A member given away with take() may be open in another process: the group
    # cannot tell, so it still counts, closed here or not, and keeps its index.
    with reuseport_group("127.0.0.1:0", 3) as group:
        with group.take(1) as taken:  # open, as in the process it went to
            kernel = [group[0], taken, group[2]]
            for index in (2, 1):  # not shifted down past the taken slot
                steer_all_to(group, index)
                assert _always_lands_on(kernel, group.port) == index
        # Closed here, not checked: the kernel moved member 2 into its slot, and
        # the index of the member before it still holds.
        steer_all_to(group, 0)
        assert _always_lands_on([group[0], group[2]], group.port) == 0
        detach_steering(group[0])


def test_steering_error_carries_the_kernels_errno() -> None:
    # Before: errno was always None and the message only quoted the OSError.
    with reuseport_listener("127.0.0.1:0") as listener:
        with pytest.raises(SteeringError) as info:
            detach_steering(listener)
        assert info.value.errno == errno.ENOENT
        assert isinstance(info.value, OSError)
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.ENOENT
        assert str(info.value) == (
            f"detaching the reuseport program failed: {_NO_PROGRAM} "
            "([Errno 2] No such file or directory)"
        )
        # A program the kernel refuses (an opcode cBPF does not have).
        with pytest.raises(SteeringError) as info:
            steering._attach(listener, [(0xFFFF, 0, 0, 0)], "listener")
        assert info.value.errno == errno.EINVAL
        assert str(info.value).startswith("attaching the reuseport program through listener (")
        assert str(info.value).endswith("([Errno 22] Invalid argument)")


@pytest.mark.parametrize("kind", ["tcp", "udp"])
@pytest.mark.parametrize(
    "steer",
    [
        lambda g: steer_all_to(g, 0),
        attach_hash_steering,
        lambda g: attach_cpu_steering(g, strict=False),
    ],
    ids=["steer_all_to", "attach_hash_steering", "attach_cpu_steering"],
)
def test_attach_through_a_member_in_no_kernel_group_names_it(kind: str, steer: Steer) -> None:
    # SO_REUSEPORT set after listen (TCP) or bind (UDP): every check passes, but the
    # kernel made no group. Before: "attaching the reuseport program failed: [Errno
    # 22] Invalid argument", naming neither the member nor the cause.
    with (
        tcp_socket() if kind == "tcp" else socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ) as sock:
        sock.bind(("127.0.0.1", 0))
        if kind == "tcp":
            sock.listen()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(SteeringError) as info:
            steer([sock])
        assert info.value.errno == errno.EINVAL
        port = sock.getsockname()[1]
        reason = _NO_PROGRAM.removeprefix("no program is attached, or ")
        assert str(info.value) == (
            f"attaching the reuseport program through group member 0 (127.0.0.1:{port}) "
            f"failed: {reason} ([Errno 22] Invalid argument)"
        )


def test_detach_steering_refuses_a_socket_in_no_group() -> None:
    # Before: SteeringError with the kernel's bare EINVAL or ENOENT.
    with tcp_socket() as plain:
        with pytest.raises(InvalidArgument) as info:
            detach_steering(plain)
        assert str(info.value) == (
            f"invalid member {plain!r}: lacks SO_REUSEPORT: it is in no reuseport group"
        )
    with (
        hold_port("127.0.0.1:0") as holder,
        pytest.raises(InvalidArgument, match="is not listening"),
    ):
        detach_steering(holder)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unbound:
        unbound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(InvalidArgument, match="is not bound to a port"):
            detach_steering(unbound)
    with socket.socket(socket.AF_UNIX) as unix:
        with pytest.raises(InvalidArgument) as info:
            detach_steering(unix)
        assert str(info.value) == (
            f"invalid member {unix!r}: is not a TCP or UDP socket: it is in no reuseport group"
        )


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_detach_steering_through_a_member_whose_so_reuseport_was_cleared(kind: str) -> None:
    # Before: InvalidArgument "lacks SO_REUSEPORT: it is in no reuseport group",
    # checked before the kernel was asked. Cleared after joining, the option leaves
    # the member in its group's array, and the kernel detaches through it (which
    # undoes a program the steering functions would now refuse to attach).
    with reuseport_group("127.0.0.1:0", 2, kind=kind) as group:  # type: ignore[arg-type]
        steer_all_to(group, 1)
        for member in group:
            member.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
        detach_steering(group[0])
        # No program is left: the kernel's ENOENT, not "in no group".
        with pytest.raises(SteeringError) as info:
            detach_steering(group[1])
        assert info.value.errno == errno.ENOENT
        assert str(info.value).startswith(f"detaching the reuseport program failed: {_NO_PROGRAM}")


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["tcp", "udp"])
def test_detach_steering_on_a_socket_given_so_reuseport_too_late(
    kind: socket.SocketKind,
) -> None:
    # Before: "no program is attached to the member's reuseport group", but the
    # socket is in no group: given SO_REUSEPORT after bind (UDP) or listen (TCP),
    # it has none, and the kernel answers ENOENT as for no program.
    with socket.socket(socket.AF_INET, kind) as late:
        late.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            late.listen()
        late.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(SteeringError) as info:
            detach_steering(late)
        assert info.value.errno == errno.ENOENT
        assert str(info.value) == (
            f"detaching the reuseport program failed: {_NO_PROGRAM} "
            "([Errno 2] No such file or directory)"
        )


def test_incoming_cpu_is_minus_one_until_the_kernel_records_one() -> None:
    # What get_incoming_cpu's docstring says.
    with tcp_socket() as fresh:
        assert get_incoming_cpu(fresh) == -1
    with reuseport_listener("127.0.0.1:0") as listener:
        listener.settimeout(10)  # a connection that never arrives fails, not hangs
        with connect_tcp(listener.getsockname()):
            listener.accept()[0].close()
        assert get_incoming_cpu(listener) == -1  # no SYN's CPU is recorded
        set_incoming_cpu(listener, 0)
        assert get_incoming_cpu(listener) == 0
    with (
        reuseport_udp("127.0.0.1:0") as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        server.settimeout(10)
        # Bound first: sendto() would bind it to 0.0.0.0, and connecting the server
        # to its getsockname() would then connect it to ('0.0.0.0', port).
        client.bind(("127.0.0.1", 0))
        client.sendto(b"x", server.getsockname())
        server.recv(1)
        assert get_incoming_cpu(server) == -1  # unconnected: nothing recorded
        server.connect(client.getsockname())
        client.sendto(b"x", server.getsockname())
        server.recv(1)
        assert get_incoming_cpu(server) >= 0


def _accepted_per_member(group: Sequence[socket.socket], port: int, n: int) -> list[int]:
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
    try:
        got = [0] * len(group)
        for _ in range(n):  # each round accepts at least one, or select timed out
            ready = select.select(list(group), [], [], 10)[0]
            assert ready, f"only {sum(got)} of {n} connections arrived"
            for member in ready:
                member.accept()[0].close()
                got[list(group).index(member)] += 1
            if sum(got) == n:
                break
        return got
    finally:
        for client in clients:
            client.close()


def test_set_incoming_cpu_minus_one_clears_the_preference() -> None:
    # Before: InvalidArgument "must be an int in 0..2**31-1", though -1 is the
    # kernel's "no CPU" (every socket's default): a preference once set could not
    # be undone, and from Linux 6.2 the member kept every SYN its CPU handled.
    cpu = min(os.sched_getaffinity(0))
    with reuseport_group("127.0.0.1:0", 2) as group:
        set_incoming_cpu(group[0], cpu)
        set_incoming_cpu(group[0], -1)
        assert get_incoming_cpu(group[0]) == -1
        # The group is hashed again: with this thread (and so loopback's SYN
        # processing) on that CPU, a kept preference would give member 1 nothing.
        affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})
        try:
            got = _accepted_per_member(list(group), group.port, 40)
        finally:
            os.sched_setaffinity(0, affinity)
        assert sum(got) == 40 and min(got) > 0, got
    with tcp_socket() as sock:
        for bad in (-2, 2**31, 0.0, True):
            with pytest.raises(InvalidArgument) as info:
                set_incoming_cpu(sock, bad)  # type: ignore[arg-type]
            assert str(info.value) == (
                f"invalid cpu {bad!r}: must be -1 (clear) or an int in 0..2**31-1"
            )


def test_cpu_steering_not_strict_starves_members_beyond_the_cpus() -> None:
    # What the strict=False docs now say (they spoke only of CPUs beyond the group):
    # member i takes the SYNs of CPU i alone, so in a group one larger than the CPU
    # count the last member gets nothing.
    cpus = os.cpu_count() or 1
    allowed = sorted(cpu for cpu in os.sched_getaffinity(0) if cpu < cpus)
    if not allowed:
        pytest.skip(f"none of the CPUs this process may use is below os.cpu_count() {cpus}")
    doc = " ".join((attach_cpu_steering.__doc__ or "").split())
    assert "members beyond the last CPU's index get no connection at all" in doc
    with reuseport_group("127.0.0.1:0", cpus + 1) as group:
        attach_cpu_steering(group, strict=False)
        got = [0] * len(group)
        affinity = os.sched_getaffinity(0)
        try:
            for cpu in allowed:
                os.sched_setaffinity(0, {cpu})  # this thread: the SYN is sent on `cpu`
                for index, n in enumerate(_accepted_per_member(list(group), group.port, 8)):
                    got[index] += n
        finally:
            os.sched_setaffinity(0, affinity)
        assert sum(got) == 8 * len(allowed) and got[-1] == 0, got


@pytest.mark.parametrize("kind", ["tcp", "udp"])
@pytest.mark.parametrize("steer", _STEERS, ids=_STEER_IDS)
@pytest.mark.parametrize("cleared", [0, 1])
def test_steering_refuses_a_member_whose_so_reuseport_was_cleared(
    kind: str, steer: Steer, cleared: int
) -> None:
    # Before: taken (docs/restarts.md said the kernel still steered to such a member,
    # and suggested clearing the option to keep other sockets off the port), and the
    # program attached never ran: the kernel runs a group's hash or program only when
    # the socket its lookup finds first has the option (see the test below).
    with reuseport_group("127.0.0.1:0", 2, kind=kind) as group:  # type: ignore[arg-type]
        group[cleared].setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
        for given in (group, list(group)):
            with pytest.raises(InvalidArgument) as info:
                steer(given)  # type: ignore[arg-type]
            assert str(info.value) == (
                f"invalid group member {cleared} {group[cleared]!r}: lacks SO_REUSEPORT: the "
                "kernel balances and steers a group only through sockets that have it (one "
                "that never had it is in no group; one whose option was cleared after it "
                "joined takes every connection, with no hash and no program run, whenever "
                "the kernel's lookup finds it first)"
            )
            assert info.value.value is group[cleared]
        assert _no_program(group[1])  # refused before a program was attached


@pytest.mark.parametrize(("address", "host"), [("127.0.0.1:0", "127.0.0.1"), ("[::1]:0", "::1")])
def test_a_group_whose_members_lost_so_reuseport_is_not_balanced(address: str, host: str) -> None:
    # Why the steering functions and drain_close refuse such members: the kernel's
    # listener lookup (inet_lhash2_lookup -> inet_lookup_reuseport, and the IPv6
    # twin) runs the group's selection only when the first socket it finds has
    # SO_REUSEPORT. With the option cleared on every member after they joined, one
    # member takes every connection: no hash, and no program even when one is
    # attached (the kernel attaches it through a member all the same). With the hash,
    # 30 connections on one of 3 members would come once in 3**29. The one found
    # first is the last to listen for IPv4 and the first for IPv6 (the kernel adds
    # IPv4 reuseport listeners at the head of the lookup list, IPv6 ones at the
    # tail), never member 1, where the program sends everything.
    with reuseport_group(address, 3) as group:
        steer_all_to(group, 1)  # attached while every member has the option
        for member in group:
            member.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
        landed = set()
        for _ in range(30):
            with connect_tcp((host, group.port)):
                ready = select.select(list(group), [], [], 10)[0]
                assert len(ready) == 1
                ready[0].accept()[0].close()
                landed.add(list(group).index(ready[0]))
        assert len(landed) == 1, landed
        assert landed != {1}  # the program's choice never ran


def test_a_first_member_without_so_reuseport_in_no_group_is_refused() -> None:
    # Refused up front, before a program is attached: without the option now, a
    # socket is in no group or is one the kernel would not balance through.
    with tcp_socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        with pytest.raises(InvalidArgument) as info:
            steer_all_to([plain], 0)
        assert str(info.value).startswith(
            f"invalid group member 0 {plain!r}: lacks SO_REUSEPORT: the kernel balances "
            "and steers a group only through sockets that have it (one that never had it "
            "is in no group;"
        )


def test_tcp_members_are_indexed_in_listen_order() -> None:
    # The docs said "join (bind) order" and "the order members bound": for TCP the
    # kernel adds a member to its group's array when it listens.
    assert "listened for TCP and bound for UDP" in " ".join((ReuseportGroup.__doc__ or "").split())
    assert "join (bind) order" not in (steering.__doc__ or "")
    assert "listen() them in that order for TCP" in " ".join(
        (attach_cpu_steering.__doc__ or "").split()
    )
    with tcp_socket() as first_bound, tcp_socket() as second_bound:
        for sock in (first_bound, second_bound):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        first_bound.bind(("127.0.0.1", 0))
        port = first_bound.getsockname()[1]
        second_bound.bind(("127.0.0.1", port))
        second_bound.listen()
        first_bound.listen()
        members = [second_bound, first_bound]  # listen order
        for index in (0, 1):
            steer_all_to(members, index)
            assert _lands_on(members, port) == index


@pytest.mark.parametrize("steer", _STEERS, ids=_STEER_IDS)
def test_a_bad_member_of_a_sequence_is_named_by_position(steer: Steer) -> None:
    # Before: "group member is closed: <socket.socket [closed] ...>" and "group
    # member: expected a socket.socket, got str", naming no position, while a
    # ReuseportGroup said "group member 2 is closed".
    with reuseport_group("127.0.0.1:0", 4) as group:
        members: list[Any] = list(group)
        members[2].close()
        with pytest.raises(SocketClosed) as info:
            steer(members)
        assert str(info.value).startswith("group member 2 is closed: ")
        members[2] = "not a socket"
        with pytest.raises(WrongSocketType) as wrong:
            steer(members)
        assert str(wrong.value).startswith("group member 2: expected a socket.socket, got str")
