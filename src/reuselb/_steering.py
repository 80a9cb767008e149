"""Classic BPF programs that choose the member of a reuseport group (Linux 4.5+).

Rules of this module:

* a program attached with SO_ATTACH_REUSEPORT_CBPF to any member governs the whole
  group; it returns an index into the group's member array, and an index out of
  range falls back to the kernel's 4-tuple hash (socket(7));
* the member array starts in join order: a TCP socket joins when it listens, a UDP
  socket when it binds (the order of bind() does not count for TCP); when a member
  leaves, the kernel moves the *last* member into its slot. ``ReuseportGroup``
  follows the same rule;
* programs are built with ``struct`` and ``ctypes`` only, and every one is small
  enough to read in its docstring.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence, ValuesView
from collections.abc import Set as AbstractSet
from typing import Any, TypeAlias, cast

from ._address import parse_address
from ._errors import AddressError, InvalidArgument, SocketClosed, SteeringError
from ._sockets import _C_INT_MAX, ReuseportGroup, check_flag, check_open

__all__ = [
    "attach_cpu_steering",
    "attach_hash_steering",
    "hash_steering_index",
    "detach_steering",
    "get_incoming_cpu",
    "set_incoming_cpu",
    "steer_all_to",
    "steer_away_from",
]

SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68
SO_INCOMING_CPU = getattr(socket, "SO_INCOMING_CPU", 49)
_SO_ACCEPTCONN = getattr(socket, "SO_ACCEPTCONN", 30)
_SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
_IFNAMSIZ = 16
_SKF_AD_OFF = -0x1000
_SKF_AD_CPU = 36

# cBPF opcodes (linux/bpf_common.h)
_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_LD_IMM = 0x00 | 0x00  # BPF_LD | BPF_IMM
_ALU_MOD_K = 0x04 | 0x90  # BPF_ALU | BPF_MOD | BPF_K
_ALU_ADD_K = 0x04 | 0x00  # BPF_ALU | BPF_ADD | BPF_K
_JGE_K = 0x05 | 0x30  # BPF_JMP | BPF_JGE | BPF_K
_RET_A = 0x06 | 0x10  # BPF_RET | BPF_A
_LD_H_ABS = 0x00 | 0x08 | 0x20  # BPF_LD | BPF_H | BPF_ABS
_LD_B_ABS = 0x00 | 0x10 | 0x20  # BPF_LD | BPF_B | BPF_ABS
_JEQ_K = 0x05 | 0x10  # BPF_JMP | BPF_JEQ | BPF_K
_JA = 0x05 | 0x00  # BPF_JMP | BPF_JA
_TAX = 0x07 | 0x00  # BPF_MISC | BPF_TAX
_ALU_XOR_X = 0x04 | 0xA0 | 0x08  # BPF_ALU | BPF_XOR | BPF_X
_ALU_MUL_K = 0x04 | 0x20  # BPF_ALU | BPF_MUL | BPF_K
_ALU_RSH_K = 0x04 | 0x70  # BPF_ALU | BPF_RSH | BPF_K
_SKF_NET_OFF = -0x100000
#: Knuth's multiplicative constant (2^32 / golden ratio): spreads xor-ed bits upward.
_GOLDEN32 = 2654435761
_INSN = struct.Struct("=HBBI")

Insn = tuple[int, int, int, int]


# A dict's keys(), values() and items() keep insertion order and match each other
# position by position (so do an OrderedDict's, subclasses of these): as good as a
# sequence here, and ``send_sockets(ch, d.values(), names=d.keys())`` is natural.
# (dict_keys and dict_items register as sets, whose order is otherwise arbitrary.)
_ORDERED: tuple[type, ...] = (Sequence, type({}.keys()), type({}.values()), type({}.items()))

#: What the steering functions and :func:`~reuselb.drain_close` take as a group: a
#: :class:`~reuselb.ReuseportGroup`, or its members in join order as a sequence (or
#: a dict's ``values()``, which keep insertion order).
GroupLike: TypeAlias = "ReuseportGroup | Sequence[socket.socket] | ValuesView[socket.socket]"


def _as_sequence(name: str, value: object, expected: str) -> list[Any]:
    """*value*'s items as a list, if it is a :class:`collections.abc.Sequence`.

    Every caller gives positions a meaning: a steering program returns an index
    into the group in join order, and a handoff pairs the n-th name with the
    n-th socket. A set iterates in an arbitrary order (for str items it changes
    with PYTHONHASHSEED, so from one run to the next), and so does a frozenset;
    a mapping iterates over its keys; an iterator is read once, and a call that
    then fails has consumed it. Taking any iterable turned those into wrong
    pairings and wrong indexes without an error, so only a sequence (or a dict's
    ordered keys/values/items view) is taken.
    A str is a sequence too: callers that must refuse one check it first.

    :raises InvalidArgument: *value* is not a sequence; the message names it and,
        for a set, a mapping or an iterator, says why it cannot stand for one.
    """
    if isinstance(value, _ORDERED):
        return list(cast("Iterable[Any]", value))
    if isinstance(value, AbstractSet):
        why = (
            ", not a set: a set's order is arbitrary (for str items it changes "
            "with PYTHONHASHSEED) and positions count here"
        )
    elif isinstance(value, Mapping):
        why = ", not a mapping: pass a list or tuple of the items in order"
    elif isinstance(value, Iterator):
        why = ", not an iterator (or generator): pass a list or tuple"
    else:
        why = ""
    raise InvalidArgument(name, value, f"must be {expected}{why}")


#: Why a socket that looks like a member (_group_key passes it) is in no kernel group.
_NO_KERNEL_GROUP = (
    "the socket is in no kernel reuseport group (e.g. SO_REUSEPORT set after a UDP "
    "socket's bind or a TCP socket's listen)"
)
#: Why a member without SO_REUSEPORT is refused: the kernel's listener and UDP
#: lookups (inet_lhash2_lookup / udp4_lib_lookup2 -> inet_lookup_reuseport, and
#: their IPv6 twins) run the group's selection, its hash or its program, only when
#: the socket they find first has sk_reuseport set. A member whose option was
#: cleared after it joined stays in the group's array, but when it is found first
#: (for IPv4 TCP the last to listen) it takes every connection and no program
#: runs; a socket that never had the option is in no group at all.
_NO_OPTION_MEMBER = (
    "lacks SO_REUSEPORT: the kernel balances and steers a group only through "
    "sockets that have it (one that never had it is in no group; one whose option "
    "was cleared after it joined takes every connection, with no hash and no "
    "program run, whenever the kernel's lookup finds it first)"
)
#: Why the kernel refused to attach through a socket without SO_REUSEPORT.
_NO_OPTION_NO_GROUP = (
    "lacks SO_REUSEPORT and is in no kernel reuseport group (a socket joins one only "
    "when it binds (UDP) or listens (TCP) with the option set)"
)


def _has_option(sock: socket.socket) -> bool:
    """Whether *sock* has SO_REUSEPORT now (True if it cannot be read)."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, _SO_REUSEPORT))
    except OSError:
        return True


def _attach_member(sock: socket.socket, program: Sequence[Insn], name: str) -> None:
    """:func:`_attach`, for the public steering functions.

    A socket the kernel finds without SO_REUSEPORT and in no group is the caller's
    mistake, as the other members' checks are: :class:`InvalidArgument`, as when
    _group_key refused it up front. drain_close calls :func:`_attach` and keeps the
    SteeringError: its handler takes any other exception during the attach for an
    interrupt and detaches the group's program.
    """
    try:
        _attach(sock, program, name)
    except SteeringError as exc:
        if exc.errno == errno.EINVAL and not _has_option(sock):
            raise InvalidArgument(name, sock, _NO_OPTION_NO_GROUP) from exc.__cause__
        raise


def _attach(sock: socket.socket, program: Sequence[Insn], name: str) -> None:
    """Attach *program* to the group of *sock*, which errors call *name*."""
    code = b"".join(_INSN.pack(op, jt, jf, k & 0xFFFFFFFF) for op, jt, jf, k in program)
    buf = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        # reuseport_attach_prog(): EINVAL for a socket bound or listening (hashed)
        # without a group: the kernel makes a socket's group only when it binds or
        # listens with SO_REUSEPORT. The callers checked the option, the listening
        # state and the port, so here the socket got the option only after it bound
        # (UDP) or listened (TCP), joining no group (or lost it since the check).
        # (The other EINVAL, from bpf_check_classic(), is for an invalid program,
        # and this module's programs are valid.)
        why = ""
        if exc.errno == errno.EINVAL:
            why = (
                _NO_KERNEL_GROUP if _has_option(sock) else f"the socket {_NO_OPTION_NO_GROUP}"
            ) + " "
        try:
            where = f" ({parse_address(sock.getsockname())})"
        except (OSError, AddressError):
            where = ""
        raise SteeringError(
            f"attaching the reuseport program through {name}{where} failed: {why}({exc})",
            exc.errno,
        ) from exc


_GroupKey = tuple[int, int, tuple[Any, ...], bool, bytes]


def _group_key(sock: socket.socket, name: str, *, option: bool = True) -> _GroupKey:
    """What the kernel compares to put *sock* in a reuseport group.

    ``(family, type, address, IPV6_V6ONLY, bound device)``: sockets that differ in
    any of them are in different groups, even on one port (the kernel's
    reuseport_add_sock callers in inet_hashtables.c and udp.c; they also compare
    the user id, which bind() already enforces). A TCP socket joins a group only
    when it listens: a bound one, such as :func:`~reuselb.hold_port`'s, gets a
    group of its own if a program is attached through it. Five syscalls at most.

    :param option: whether SO_REUSEPORT is required. A socket needs it to join a
        group, but one whose option was cleared after it joined stays in the
        group's array, so :func:`detach_steering` passes ``False`` after the
        kernel's ``ENOENT`` (which it returns for a socket in no group only when
        it has the option): the detach went through the kernel, which attaches and
        detaches through such a member. :func:`_check_one_group` refuses a member
        without the option itself, for another reason (:data:`_NO_OPTION_MEMBER`).
    :raises InvalidArgument: *sock* is in no group it could share: not TCP or UDP,
        without SO_REUSEPORT (when *option*), a TCP socket not listening, or not
        bound.
    """
    family, kind = sock.family, sock.type
    if family not in (socket.AF_INET, socket.AF_INET6) or kind not in (
        socket.SOCK_STREAM,
        socket.SOCK_DGRAM,
    ):
        raise InvalidArgument(name, sock, "is not a TCP or UDP socket: it is in no reuseport group")
    if option and not sock.getsockopt(socket.SOL_SOCKET, _SO_REUSEPORT):
        raise InvalidArgument(name, sock, "lacks SO_REUSEPORT: it is in no reuseport group")
    if kind == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, _SO_ACCEPTCONN):
        raise InvalidArgument(
            name,
            sock,
            "is not listening: a TCP socket joins its port's reuseport group only when "
            "it listens (a hold_port() socket never does)",
        )
    address = sock.getsockname()
    if address[1] == 0:
        raise InvalidArgument(name, sock, "is not bound to a port: it is in no reuseport group")
    v6only = family == socket.AF_INET6 and bool(
        sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    )
    device = sock.getsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, _IFNAMSIZ).rstrip(b"\0")
    return family, kind, tuple(address), v6only, device


def _describe_key(key: _GroupKey) -> str:
    family, kind, address, v6only, device = key
    text = f"{'TCP' if kind == socket.SOCK_STREAM else 'UDP'} on {parse_address(address)}"
    if family == socket.AF_INET6:
        text += " (IPv6-only)" if v6only else " (dual-stack)"
    if device:
        text += f" bound to device {device.decode(errors='replace')}"
    return text


def _check_one_group(named: Sequence[tuple[str, socket.socket]]) -> None:
    """Refuse members that cannot all be in the first one's kernel reuseport group.

    A program is attached through one member and governs that member's group,
    and its indexes and modulus count the members given: an odd member (a
    hold_port() socket, a socket on another address) would make it steer a
    different group than the caller's, with no error from the kernel.

    :param named: ``(name for errors, socket)`` pairs, the reference first; all open.
        A caller that stands a member in for one it does not hold (drain_close, for
        the members taken from a :class:`~reuselb.ReuseportGroup`) leaves the
        stand-ins out.
    :raises InvalidArgument: a member can be in no group, is in another group than
        the first, is listed twice, or is a socket already listed under another fd
        (a dup: the same inode); the message names both.
    """
    _refuse_repeats(named)
    ref_name, ref = named[0]
    # Every member must have SO_REUSEPORT now, not only when it joined: the kernel
    # runs the group's hash or program only through a socket that has it (see
    # _NO_OPTION_MEMBER). Taking members whose option was cleared after they
    # joined (as these functions did, for docs that said the kernel still steered
    # to them) attached programs that never ran: every connection went to the
    # cleared member the lookup found first, and a steer-path drain_close waited
    # out its timeout. A socket given the option after it joined (in no kernel
    # group) passes this check; the kernel's EINVAL names it (_attach) when the
    # program is attached through it, and one listed after it is counted unchecked
    # (no syscall tells it from a member without changing the group's program).
    want = _group_key(ref, ref_name, option=False)
    if not _has_option(ref):
        raise InvalidArgument(ref_name, ref, _NO_OPTION_MEMBER)
    # The kernel's group holds sockets, not fds: a dup() (or an fd received for
    # a socket already listed) is the same socket, one inode, under another fd.
    # Listed twice it would count as two members (a program's modulus one too
    # large), and drain_close would take it for another member to hand the
    # listener's connections to, while its fd keeps the listener's socket open.
    names_by_inode = {os.fstat(ref.fileno()).st_ino: ref_name}
    for name, sock in named[1:]:
        inode = os.fstat(sock.fileno()).st_ino
        if (same := names_by_inode.setdefault(inode, name)) != name:
            raise InvalidArgument(
                name,
                sock,
                f"is the same socket as {same} (one inode, {inode}, under another fd: "
                "a dup); a kernel reuseport group holds each socket once",
            )
        got = _group_key(sock, name, option=False)
        if not _has_option(sock):
            raise InvalidArgument(name, sock, _NO_OPTION_MEMBER)
        if got != want:
            raise InvalidArgument(
                name,
                sock,
                f"is {_describe_key(got)} but {ref_name} is {_describe_key(want)}: "
                "they are not in one kernel reuseport group",
            )


def _refuse_repeats(named: Sequence[tuple[str, socket.socket]]) -> None:
    """Refuse a socket object listed twice.

    The kernel's group holds each socket once, and a program's indexes and
    modulus count the members listed: ``[a, a, b]`` for a group of two made
    ``attach_hash_steering`` take the modulus 3 (a third of the clients hashed to
    an index with no member, so to the kernel's hash) and ``steer_all_to(..., 2)``
    an index the kernel does not have.

    :raises InvalidArgument: naming the second listing and the first.
    """
    first: dict[int, str] = {}
    for name, sock in named:
        if (earlier := first.setdefault(id(sock), name)) != name:
            raise InvalidArgument(
                name,
                sock,
                f"is {earlier} listed again: a kernel reuseport group holds each socket "
                "once (list every member once, in join order)",
            )


def _held_members(group: ReuseportGroup) -> list[tuple[str, socket.socket]]:
    """``(name for errors, member)`` for each member *group* holds, in slot order.

    A slot the group emptied itself is skipped: take() emptied it (that member is
    still in the kernel's group, held by its new owner, maybe in another process)
    or close() did (then the group is closed, every slot empty). A member the
    group still holds is closed only by hand, and has left the kernel's group:
    the kernel moved the group's last member into its slot
    (reuseport_detach_sock), which the group, not told, did not mirror.
    Counting it kept every index past it and the modulus one too high:
    ``steer_all_to(g, 1)`` after ``g[1].close()`` in a group of 3 sent every
    connection to member 2, and ``steer_all_to(g, 2)`` let the kernel's hash pick.

    :raises SocketClosed: a member the group holds is closed; the message names it
        and the remedies that work for the group's kind.
    """
    held = []
    for i, m in enumerate(group._members):
        if m is None:
            continue
        if m.fileno() == -1:
            # drain_close is for listening TCP sockets (WrongSocketType for UDP), so
            # a UDP group is told only of the list.
            remedy = "pass the open members as a list, in the kernel's order"
            if group.kind == "tcp":
                remedy = (
                    "drain_close(member, group=group) takes a member out and keeps them "
                    f"in step; or {remedy}"
                )
            raise SocketClosed(
                m,
                f"group member {i}",
                "closed by hand, it left the kernel's reuseport group, which moved its "
                "last member into the slot: the group's indexes no longer match the "
                f"kernel's ({remedy})",
            )
        held.append((f"group member {i}", m))
    return held


def _members(group: GroupLike) -> tuple[int, socket.socket, str]:
    """``(the group's size in the kernel, a member to attach through, its name)``."""
    if isinstance(group, ReuseportGroup):
        # A BPF program's return value indexes the kernel's array of the group, and a
        # member handed out with take() is still in it (it stays bound and listening
        # in whoever now owns it). Counting only the members the group still holds
        # would shift every index after a taken one and shrink the modulus.
        if group._closed:
            raise InvalidArgument("group", group, "the group is closed")
        # The members it holds (a taken one may be in another process by now).
        held = _held_members(group)
        if not held:
            raise InvalidArgument(
                "group", group, "holds no member to attach through (all were taken)"
            )
        _check_one_group(held)
        return len(group), held[0][1], held[0][0]
    # Checked, not left to iter(): one socket, None or an int would otherwise end
    # in a bare TypeError ("'socket' object is not iterable") that names nothing.
    # A single socket is refused even though only the first member is attached
    # through: the program's modulus and indexes need the whole group.
    if isinstance(group, socket.socket):
        raise InvalidArgument(
            "group",
            group,
            "one socket is not a group: pass the ReuseportGroup or all its members in join order",
        )
    # Only a sequence: the program's indexes are positions in it (see _as_sequence).
    items = _as_sequence("group", group, "a ReuseportGroup or a sequence of sockets")
    # Named by position, as a ReuseportGroup's members are: "group member is closed"
    # did not say which of a long list it was.
    members = [check_open(s, f"group member {i}") for i, s in enumerate(items)]
    if not members:
        raise InvalidArgument("group", group, "has no members")
    _check_one_group([(f"group member {i}", m) for i, m in enumerate(members)])
    return len(members), members[0], "group member 0"


def attach_cpu_steering(group: GroupLike, *, strict: bool = True) -> None:
    """Send each new connection to the member whose index is the CPU that took its SYN.

    Program: ``ld [SKF_AD_CPU]; ret a``. Join the members in CPU order (listen()
    them in that order for TCP, bind() them for UDP; member *i* is served by a
    worker pinned to CPU *i*) and a connection is accepted on the CPU where its
    packets already are: no cross-CPU wake-up.

    :param group: the members in join order (a :class:`~reuselb.ReuseportGroup` or a
        sequence of sockets, such as a list or tuple: a set, a mapping or an
        iterator is refused, since positions are the kernel's indexes); the
        program is attached through the first. Members
        taken from a group with ``take()`` keep their index: they stay in the
        kernel's group while they are open. (When a member closes, the kernel moves
        the last member into its slot; :func:`~reuselb.drain_close` keeps a group in
        step.)
    :param strict: require exactly one member per CPU (``os.cpu_count()``); with
        False, CPUs beyond the group fall back to the kernel's hash, and in a group
        larger than the CPU count the members beyond the last CPU's index get no
        connection at all (no CPU's SYN selects them).
    :raises InvalidArgument: *group* is not a group or a sequence of sockets (one
        socket is not a group, nor is a set, a mapping or an iterator of them:
        the message names it), the group is empty, closed or has every member
        taken, a member is not in the first one's kernel group (see below), or,
        with *strict*, its size differs from the CPU count; *strict* is not a bool.
        A member must be a listening TCP or a bound UDP socket that had
        SO_REUSEPORT when it joined, of the first member's family, type, address,
        ``IPV6_V6ONLY`` setting and bound device (the kernel's rules for one group;
        the message names the member), and listed once: the same socket object
        twice, or a ``dup()`` of a member (the same socket, one inode), is
        refused. A member must have SO_REUSEPORT now: one whose option was cleared
        after it joined is refused ("lacks SO_REUSEPORT"), as the kernel runs a
        group's hash or program only through sockets that have it (cleared, the
        member takes every connection whenever the kernel's lookup finds it
        first). This holds for every steering function.
    :raises SteeringError: the kernel refused the program (its ``errno``):
        ``EINVAL`` when the member it was attached through (named in the message)
        is in no kernel group although it looks like a member, having got
        SO_REUSEPORT after a UDP socket's bind or a TCP socket's listen.
    :raises SocketClosed: a member is closed: one in the sequence, or one the
        :class:`~reuselb.ReuseportGroup` holds (closed by hand, it has left the
        kernel's group, whose last member moved into its slot: the group's
        indexes are stale; the message names it). A member given away with
        ``take()`` is not checked: it may be open in another process. This holds
        for every steering function.
    :raises WrongSocketType: a member is not a socket object.
    """
    strict = check_flag("strict", strict)
    n, via, name = _members(group)
    cpus = os.cpu_count() or 1
    if strict and n != cpus:
        raise InvalidArgument(
            "group", f"{n} members", f"cpu steering needs one member per CPU ({cpus})"
        )
    _attach_member(via, [(_LD_W_ABS, 0, 0, _SKF_AD_OFF + _SKF_AD_CPU), (_RET_A, 0, 0, 0)], name)


def steer_all_to(group: GroupLike, index: int) -> None:
    """Send every new connection to member *index* (``ld #index; ret a``).

    Useful to fill one member's queue on purpose (tests, canaries).

    :raises InvalidArgument: *group* is not a group or a non-empty sequence of
        sockets (one socket, a set, a mapping or an iterator is not; as for
        :func:`attach_cpu_steering`), a group that is closed or has every
        member taken, a member not in the first one's kernel group (as for
        :func:`attach_cpu_steering`), or *index* is not a member's index.
    :raises SteeringError: the kernel refused the program (its ``errno``):
        ``EINVAL`` when the member it was attached through (named in the message)
        is in no kernel group although it looks like a member, having got
        SO_REUSEPORT after a UDP socket's bind or a TCP socket's listen.
    :raises SocketClosed: a member is closed (as for :func:`attach_cpu_steering`).
    :raises WrongSocketType: a member is not a socket object.
    """
    n, via, name = _members(group)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        raise InvalidArgument("index", index, f"must be 0..{n - 1}")
    _attach_member(via, [(_LD_IMM, 0, 0, index), (_RET_A, 0, 0, 0)], name)


def steer_away_from(group: GroupLike, index: int) -> None:
    """Spread new connections over every member except *index*, by the client's address.

    Program: the hash of :func:`attach_hash_steering` (client's source address and
    port) modulo ``n - 1``, then one added to results from *index* on, so *index*
    gets nothing and every other member a share::

        ldb [ip version]; a >>= 4; if a == 6 goto v6
        ld [ip src]; tax; ldh [tcp/udp src port]; goto hash
        v6: ld [last 32 bits of ip6 src]; tax; ldh [tcp/udp src port]
        hash: a ^= x; a *= 2654435761; a >>= 16; a %= n-1
        if a >= index: a += 1
        ret a

    A client keeps its member (while the group's size and *index* stay the same):
    every datagram of a UDP flow reaches the same member, as without a program,
    and a TCP client's retransmitted SYN the member that got the first. For an
    IPv4 client the member is ``hash_steering_index(ip, port, n - 1)``, plus one
    if that is *index* or above. (IPv4 options or IPv6 extension headers, which
    such packets practically never carry, move the port's offset: the client is
    then steered by other bytes of its header, still never to *index*.) Unicast
    only: the kernel runs no reuseport selection, and so no program, for a
    broadcast or multicast datagram, which every member bound to its address gets
    a copy of, *index* included.

    :raises InvalidArgument: *group* is not a group or a sequence of sockets (one
        socket, a set, a mapping or an iterator is not; as for
        :func:`attach_cpu_steering`), it has fewer than 2 members, is closed or has every
        member taken, a member is not in the first one's kernel group (as for
        :func:`attach_cpu_steering`), or *index* is out of range.
    :raises SteeringError: the kernel refused the program (its ``errno``):
        ``EINVAL`` when the member it was attached through (named in the message)
        is in no kernel group although it looks like a member, having got
        SO_REUSEPORT after a UDP socket's bind or a TCP socket's listen.
    :raises SocketClosed: a member is closed (as for :func:`attach_cpu_steering`).
    :raises WrongSocketType: a member is not a socket object.
    """
    n, via, name = _members(group)
    if n < 2:
        raise InvalidArgument("group", f"{n} member", "needs another member to steer to")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        raise InvalidArgument("index", index, f"must be 0..{n - 1}")
    _attach_member(via, _away_from_program(n, index), name)


def _attach_away_from(via: socket.socket, n: int, index: int, name: str) -> None:
    """Attach :func:`steer_away_from`'s program through *via* (*name*), for a group of *n*.

    Nothing is checked: drain_close calls it with a group it checked itself, whose
    size counts the members taken from a :class:`~reuselb.ReuseportGroup`, which
    it does not hold and so cannot list.
    """
    _attach(via, _away_from_program(n, index), name)


def _away_from_program(n: int, index: int) -> list[Insn]:
    """:func:`steer_away_from`'s program for a group of *n*, away from *index*."""
    # A hash of the source, not SKF_AD_RANDOM (the program before): a random
    # member per packet scattered one UDP flow's datagrams over the members. The
    # version is read from the packet, not the group's family: a dual-stack IPv6
    # group receives IPv4 packets too. Every load stays inside a SYN or a UDP
    # datagram's headers (a load past the packet would end the program with 0,
    # the member index 0, which may be *index*).
    return [
        (_LD_B_ABS, 0, 0, _SKF_NET_OFF + 0),  # version (high nibble) and IHL
        (_ALU_RSH_K, 0, 0, 4),
        (_JEQ_K, 4, 0, 6),  # IPv6: to the v6 loads; IPv4: fall through
        (_LD_W_ABS, 0, 0, _SKF_NET_OFF + 12),  # IPv4 source address
        (_TAX, 0, 0, 0),
        (_LD_H_ABS, 0, 0, _SKF_NET_OFF + 20),  # source port, after a 20-byte header
        (_JA, 0, 0, 3),  # to the hash
        (_LD_W_ABS, 0, 0, _SKF_NET_OFF + 20),  # IPv6 source address, last 32 bits
        (_TAX, 0, 0, 0),
        (_LD_H_ABS, 0, 0, _SKF_NET_OFF + 40),  # source port, after a 40-byte header
        (_ALU_XOR_X, 0, 0, 0),
        (_ALU_MUL_K, 0, 0, _GOLDEN32),
        (_ALU_RSH_K, 0, 0, 16),
        (_ALU_MOD_K, 0, 0, n - 1),
        (_JGE_K, 0, 1, index),  # a >= index: fall through to the add; else skip it
        (_ALU_ADD_K, 0, 0, 1),
        (_RET_A, 0, 0, 0),
    ]


def hash_steering_index(src_ip: str, src_port: int, members: int) -> int:
    """The member :func:`attach_hash_steering` picks for a client (for tests and tools).

    :param src_ip: the client's IPv4 address.
    :param src_port: the client's port.
    :param members: the group's size.
    :returns: the member's index.
    :raises InvalidArgument: not an IPv4 address, a port outside 0-65535, members < 1.
    """
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise InvalidArgument("members", members, "must be an int >= 1")
    if isinstance(src_port, bool) or not isinstance(src_port, int) or not 0 <= src_port <= 65535:
        raise InvalidArgument("src_port", src_port, "must be 0-65535")
    try:
        ip = int.from_bytes(socket.inet_pton(socket.AF_INET, src_ip), "big")
    # ValueError: inet_pton refuses a str with an embedded NUL before parsing it.
    except (OSError, TypeError, ValueError):
        raise InvalidArgument("src_ip", src_ip, "must be an IPv4 address") from None
    return ((((ip ^ src_port) * _GOLDEN32) & 0xFFFFFFFF) >> 16) % members


def attach_hash_steering(group: GroupLike) -> None:
    """Steer by the client's address: a stable, documented member per (source IP, port).

    Program (IPv4 without IP options, which a SYN practically never carries)::

        ld [ip src]; tax; ldh [tcp/udp src port]; a ^= x
        a *= 2654435761; a >>= 16; a %= n; ret a

    The kernel's own choice is also a 4-tuple hash, but keyed with a per-boot secret;
    this one is the same on every host and boot and predictable with
    :func:`hash_steering_index`, so a flow's member can be computed outside the kernel.

    :raises InvalidArgument: *group* is not a group or a sequence of sockets (one
        socket, a set, a mapping or an iterator is not; as for
        :func:`attach_cpu_steering`), or it is empty, closed, has every member taken,
        has a member not in the first one's kernel group (as for
        :func:`attach_cpu_steering`) or is not IPv4.
    :raises SteeringError: the kernel refused the program (its ``errno``):
        ``EINVAL`` when the member it was attached through (named in the message)
        is in no kernel group although it looks like a member, having got
        SO_REUSEPORT after a UDP socket's bind or a TCP socket's listen.
    :raises SocketClosed: a member is closed (as for :func:`attach_cpu_steering`).
    :raises WrongSocketType: a member is not a socket object.
    """
    n, via, name = _members(group)
    if via.family != socket.AF_INET:
        raise InvalidArgument("group", via, "hash steering reads IPv4 headers only")
    _attach_member(
        via,
        [
            (_LD_W_ABS, 0, 0, _SKF_NET_OFF + 12),  # IPv4 source address
            (_TAX, 0, 0, 0),
            (_LD_H_ABS, 0, 0, _SKF_NET_OFF + 20),  # source port, after a 20-byte header
            (_ALU_XOR_X, 0, 0, 0),
            (_ALU_MUL_K, 0, 0, _GOLDEN32),
            (_ALU_RSH_K, 0, 0, 16),
            (_ALU_MOD_K, 0, 0, n),
            (_RET_A, 0, 0, 0),
        ],
        name,
    )


def detach_steering(member: socket.socket) -> None:
    """Remove the group's program; the kernel's 4-tuple hash chooses again.

    The kernel is asked first: a member whose SO_REUSEPORT was cleared after it
    joined is still in its group's array, and the program is detached through it
    (the steering functions refuse such a member: the kernel would not run their
    program through it). Only when the kernel refuses is *member* checked, to say
    why.

    :param member: any member of the group.
    :raises InvalidArgument: the kernel refused (``EINVAL`` or ``ENOENT``) and
        *member* is in no reuseport group: not TCP or UDP, without SO_REUSEPORT
        and in no group (``EINVAL``), a TCP socket not listening (such as a
        :func:`~reuselb.hold_port` socket), or not bound. The message says which;
        the kernel's code said neither.
    :raises SteeringError: ``errno`` ``ENOENT``: no program is attached to
        *member*'s group, or *member* looks like a member but is in no kernel
        group: it got SO_REUSEPORT after it was bound (UDP) or listening (TCP),
        and the kernel makes a socket's group only when it binds or listens with
        the option (or another socket joins it). Any other ``errno``: the kernel
        refused.
    :raises SocketClosed: *member* is closed.
    :raises WrongSocketType: *member* is not a socket object.
    """
    check_open(member, "group member")
    try:
        member.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
    except OSError as exc:
        code = exc.errno
        # reuseport_detach_prog(): EINVAL for a socket in no group and without
        # SO_REUSEPORT; ENOENT for one in no group with it, or in a group without a
        # program. So after ENOENT the option proves nothing (cleared after joining,
        # the member is still in its group's array) and is not checked; what _group_key
        # finds besides is a socket the kernel has in no group.
        if code in (errno.EINVAL, errno.ENOENT):
            try:
                _group_key(member, "member", option=code == errno.EINVAL)
            except InvalidArgument as refused:
                raise refused from exc
        # A socket that passes _group_key can still be in no kernel group: one given
        # SO_REUSEPORT after bind (UDP) or listen (TCP) has none (see
        # _sockets._start_group), and the kernel answers ENOENT as for no program.
        why = (
            f"no program is attached, or {_NO_KERNEL_GROUP}"
            if code == errno.ENOENT
            else "the kernel refused"
        )
        raise SteeringError(f"detaching the reuseport program failed: {why} ({exc})", code) from exc


def set_incoming_cpu(sock: socket.socket, cpu: int) -> None:
    """Set SO_INCOMING_CPU: among reuseport members, Linux prefers the one whose
    incoming CPU matches the CPU handling the SYN (a softer form of steering).

    Inside a reuseport group this works from Linux 6.2 on: from 4.6 (the array
    lookup of reuseport groups) the kernel ignored the option there and hashed
    as usual, until commit b261eda84ec1 ("soreuseport: Fix socket selection for
    SO_INCOMING_CPU"). A steering program, where one is attached, chooses instead.

    :param sock: the socket (a reuseport member, for the preference to matter).
    :param cpu: the CPU whose SYNs this member should take, or ``-1`` to clear the
        preference (every socket's default, which :func:`get_incoming_cpu` reads
        back): the member is then picked by the hash again.
    :raises InvalidArgument: *cpu* is not ``-1`` or an int in ``0..2**31-1`` (the
        option is a C int; the kernel stores any such value, a CPU that does not
        exist matches no SYN).
    :raises SocketClosed: *sock* is closed.
    :raises WrongSocketType: *sock* is not a socket object.
    :raises OSError: the kernel refused.
    """
    check_open(sock)
    # -1 is the kernel's "no CPU" (sk_incoming_cpu's initial value): setting it
    # takes the member out of the group's count of CPU-bound members
    # (reuseport_update_incoming_cpu), so the group is hashed as before. Other
    # negative values the kernel also stores as "none"; they are refused as typos.
    if isinstance(cpu, bool) or not isinstance(cpu, int) or not -1 <= cpu <= _C_INT_MAX:
        raise InvalidArgument("cpu", cpu, "must be -1 (clear) or an int in 0..2**31-1")
    sock.setsockopt(socket.SOL_SOCKET, SO_INCOMING_CPU, cpu)


def get_incoming_cpu(sock: socket.socket) -> int:
    """SO_INCOMING_CPU: for an accepted socket, the CPU that last received its packets.

    :returns: the CPU, or the one :func:`set_incoming_cpu` set; ``-1`` when there
        is neither: a socket that has received nothing, a listener (it records the
        CPU of none of its SYNs) or an unconnected UDP socket (the kernel records
        it for connected ones only).
    :raises SocketClosed: *sock* is closed.
    :raises WrongSocketType: *sock* is not a socket object.
    :raises OSError: the kernel refused.
    """
    check_open(sock)
    return int(sock.getsockopt(socket.SOL_SOCKET, SO_INCOMING_CPU))
