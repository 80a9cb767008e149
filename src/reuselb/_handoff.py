"""Socket handoff between processes: SCM_RIGHTS, systemd socket activation.

Rules of this module:

* a listening socket handed to another process keeps its accept queue: this is
  how HAProxy (``-x``), Envoy hot restart and tableflip restart without resetting
  connections. A *new* reuseport socket never takes over an old one's queue;
* every received fd is close-on-exec from the moment it exists (MSG_CMSG_CLOEXEC)
  and is checked against what the sender said it was (family, type, listening),
  never assumed;
* on any failure every fd received so far is closed; the sender's sockets are the
  sender's (it may close them after a successful send).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import os
import re
import select
import socket
import stat
import struct
import termios
import threading
import time
import weakref
from collections.abc import (
    Callable,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    Sequence,
    ValuesView,
)
from dataclasses import dataclass, field
from typing import Any

from ._errors import HandoffError, InvalidArgument, SocketClosed, SteeringError, WrongSocketType
from ._sockets import (
    _C_INT_MAX,
    _DIAG_HEAD,
    _NONBLOCK,
    _TCP_DEFER_ACCEPT,
    _TCP_SYN_RECV_STATE,
    ReuseportGroup,
    _diag_listener,
    _sock_diag,
    check_flag,
    check_open,
    check_seconds,
)
from ._steering import GroupLike, _as_sequence, _check_one_group, _held_members, _refuse_repeats

__all__ = [
    "DrainResult",
    "drain_close",
    "inherit_sockets",
    "inherited_sockets",
    "listen_fds",
    "recv_sockets",
    "send_sockets",
    "tcp_migrate_req",
]

_MAGIC = b"RLB1"
_HEADER = struct.Struct("!4sI")  # magic, JSON length
# The kernel's SCM_MAX_FD: at most 253 descriptors in one SCM_RIGHTS message.
_MAX_FDS = 253
# Bound on one handoff: each socket costs an fd on both sides; beyond this the
# caller is almost certainly passing the wrong list.
_MAX_SOCKETS = 65536
_CHUNK_MARK = b"+"
# The largest AF_UNIX datagram below which ENOBUFS is taken for what it says (memory),
# not for the size ceiling (see send_sockets): 4 MiB, the kmalloc limit with 4 KiB pages.
_DGRAM_CEILING = 1 << 22
#: Longest name send_sockets takes, in bytes of its JSON form: a printable ASCII
#: character counts 1 (2 for " and \), \b \f \n \r \t 2, any other character is
#: escaped as \u and four hex digits (6 bytes, e.g. \u00e9; 12 beyond U+FFFF, a
#: surrogate pair). Bounded so that the largest handoff has a bounded header.
_MAX_NAME = 255


def _header(names: Sequence[str], kinds: Sequence[dict[str, object]]) -> bytes:
    """The JSON header of one handoff (ASCII: json.dumps escapes the rest)."""
    entries = [{"name": n, **k} for n, k in zip(names, kinds, strict=True)]
    return json.dumps({"sockets": entries}).encode()


def _max_header() -> int:
    """The receiver's bound on the header: that of the largest handoff send_sockets takes.

    _MAX_SOCKETS entries whose names all have _MAX_NAME bytes, with the widest
    family and type numbers (an sa_family_t is 16 bits; a socket type is smaller):
    15 bytes of ``{"sockets": []}``, 319 per entry and 2 between entries, so
    21,037,069 bytes (about 20 MiB). Computed from one entry: building the whole
    header would cost 20 MiB at import.
    """
    widest: dict[str, object] = {"family": 65535, "type": 65535, "listening": False}
    empty = len(_header([], []))
    entry = len(_header(["x" * _MAX_NAME], [widest])) - empty
    return empty + _MAX_SOCKETS * entry + (_MAX_SOCKETS - 1) * len(", ")


#: Every header send_sockets accepts fits; a length field beyond it is refused
#: before anything is read or allocated.
_MAX_JSON = _max_header()
#: Bytes read per recvmsg() of a stream header: recvmsg allocates its whole
#: buffer up front, whatever arrives.
_READ_CHUNK = 1 << 20
_MSG_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)
#: SCM_PIDFD (Linux 6.5+, <asm-generic/socket.h>): a pidfd of the sender, installed
#: as an fd in the receiver when the channel has SO_PASSPIDFD set.
_SCM_PIDFD = getattr(socket, "SCM_PIDFD", 4)
#: Control buffer of every recvmsg here. The kernel writes, in this order (net/core/
#: scm.c, __scm_recv_common and scm_recv_unix): SCM_CREDENTIALS when the channel
#: has SO_PASSCRED (a struct ucred, 12 bytes), SCM_SECURITY when it has SO_PASSSEC
#: (the sender's security label: a few dozen bytes, but an SELinux context with MLS
#: categories can run to kilobytes), SCM_RIGHTS (up to SCM_MAX_FD fds), then
#: SCM_PIDFD with SO_PASSPIDFD (one int). A buffer sized for the fds alone leaves
#: none of them room: the fds that do not fit are closed by the kernel and flagged
#: MSG_CTRUNC, so a full chunk of 253 always failed on a channel with SO_PASSCRED.
_CMSG_BUFSIZE = (
    socket.CMSG_SPACE(12)  # struct ucred
    + socket.CMSG_SPACE(4096)  # security label
    + socket.CMSG_SPACE(_MAX_FDS * 4)
    + socket.CMSG_SPACE(4)  # pidfd
)
_SO_ACCEPTCONN = getattr(socket, "SO_ACCEPTCONN", 30)
_POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)  # Linux's, since 2.6.17


def _describe(sock: socket.socket) -> dict[str, object]:
    listening = bool(sock.getsockopt(socket.SOL_SOCKET, _SO_ACCEPTCONN))
    return {"family": int(sock.family), "type": int(sock.type), "listening": listening}


def _items(name: str, value: object, what: str) -> list[Any]:
    """*value* as a list, if it is a sequence of several things.

    One socket, ``None`` or an int would otherwise fail with a bare ``TypeError``
    from ``iter()``, and a str would be taken apart into one item per character.
    Only a sequence is taken (see :func:`_as_sequence`): names are paired with
    sockets, and a group's members with the kernel's indexes, by position, which
    a set's or a dict's order does not keep.
    """
    if isinstance(value, (socket.socket, str, bytes)):
        raise InvalidArgument(name, value, f"must be a sequence of {what}, not one")
    if isinstance(value, ReuseportGroup):
        # It iterates over the members it holds, skipping taken ones, so positions
        # in it are not its slots: the caller says which members are meant.
        raise InvalidArgument(
            name, value, "must be a sequence of sockets: pass group.members (a tuple)"
        )
    return _as_sequence(name, value, f"a sequence of {what} (a list or tuple)")


def _check_channel(channel: object, *, sending: bool) -> socket.socket:
    sock = check_open(channel, "handoff channel")
    if sock.family != socket.AF_UNIX:
        raise InvalidArgument("channel", sock, "must be an AF_UNIX socket")
    # Passing the server's socket instead of the connection accept() returned is an
    # easy slip, and the kernel's answer names nothing (recvmsg: EINVAL; sendmsg:
    # ENOTCONN). A datagram socket may receive unconnected (bound), not send.
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise InvalidArgument(
            "channel", sock, "is a listening socket: pass a connection (what accept() returns)"
        )
    if sending or sock.type != socket.SOCK_DGRAM:
        try:
            sock.getpeername()
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
            raise InvalidArgument("channel", sock, "is not connected") from None
    return sock


def send_sockets(
    channel: socket.socket,
    socks: Sequence[socket.socket] | ValuesView[socket.socket],
    *,
    names: Sequence[str] | KeysView[str] | None = None,
) -> None:
    """Send sockets to another process over a Unix socket (SCM_RIGHTS).

    Each socket travels with its name and kind (family, type, listening) so the
    receiver can check what it got. The sender keeps its own copies: it may keep
    using them, or close them once the receiver confirmed (a listening socket's
    queue lives as long as any process holds it).

    :param channel: a connected ``AF_UNIX`` stream or datagram socket.
    :param socks: the sockets to send, a sequence such as a list or tuple (up to
        65,536). The kernel carries at most 253 descriptors in one message
        (SCM_MAX_FD), so larger handoffs go in chunks: the first with the header,
        each further one on a one-byte marker.
    :param names: a sequence of one unique name per socket, the n-th naming the
        n-th socket, each at most 255 bytes as JSON (a printable ASCII character is
        one byte, ``"`` and ``\\`` two, as are the control characters JSON writes
        as ``\\n``, ``\\t``, ``\\r``, ``\\b`` and ``\\f``; JSON escapes any other
        as ``\\u`` and four hex digits, 6 bytes, 12 beyond U+FFFF), and text: no
        surrogate code point (U+D800-U+DFFF); default ``"0"``, ``"1"``, ... Within
        these bounds every handoff fits the header size :func:`recv_sockets` accepts.
    :raises InvalidArgument: *socks* or *names* is not a sequence (one socket or a
        str is not a list of them; a set, a mapping, an iterator or a
        :class:`~reuselb.ReuseportGroup` is refused, since names are paired
        with sockets by position), no sockets, too many, names of the wrong count, repeated,
        not ``str``, too long or with a surrogate, a header larger than the
        receiver accepts (checked before anything is sent), a header too large for
        one message on a datagram or seqpacket channel (nothing is sent then), or
        a channel that is not a Unix socket, is a listening socket or is not
        connected.
    :raises SocketClosed: a socket or the channel is closed.
    :raises WrongSocketType: a socket or the channel is not a socket object.
    :raises OSError: the channel failed.
    """
    channel = _check_channel(channel, sending=True)
    items = _items("socks", socks, "sockets")
    if not items or len(items) > _MAX_SOCKETS:
        raise InvalidArgument("socks", len(items), f"must send 1 to {_MAX_SOCKETS} sockets")
    labels = [str(i) for i in range(len(items))] if names is None else _items("names", names, "str")
    for n in labels:
        # JSON keys are strings on the other side: 1 and "1" would collide there.
        if not isinstance(n, str):
            raise InvalidArgument("names", n, "each name must be a str")
        # A lone surrogate is not text; JSON writes it as such an escape (\udc80),
        # and its decoder joins a high and a low one into one character:
        # "\ud83d\ude00" arrived as "\U0001f600", another name (and a duplicate,
        # if that was sent too).
        try:
            n.encode()
        except UnicodeEncodeError:
            raise InvalidArgument(
                "name", n, "contains a surrogate code point (U+D800-U+DFFF): not text"
            ) from None
        # Bounded so that the largest handoff's header fits the receiver's limit.
        if (size := len(json.dumps(n)) - 2) > _MAX_NAME:
            raise InvalidArgument(
                "name", n, f"is {size} bytes as JSON; a name may have at most {_MAX_NAME}"
            )
    if len(labels) != len(items):
        raise InvalidArgument(
            "number of names", len(labels), f"must be that of the sockets, {len(items)}"
        )
    first: dict[str, int] = {}
    for i, n in enumerate(labels):
        # The repeated name and where, not the whole list: 20,000 names with one
        # repeat made a 4 MB message that did not say which one.
        if (j := first.setdefault(n, i)) != i:
            raise InvalidArgument("name", n, f"is given twice (names[{j}] and names[{i}])")
    # Which one is bad, by name or position: "socket is closed" alone did not say.
    sent_socks = [
        check_open(s, f"socks[{i}]" if names is None else f"socket {labels[i]!r}")
        for i, s in enumerate(items)
    ]
    header = _header(labels, [_describe(s) for s in sent_socks])
    # Refused here, before any byte is sent: the receiver would refuse it only
    # after reading its length, and this side would see a broken channel, not why.
    if len(header) > _MAX_JSON:
        raise InvalidArgument(
            "socks",
            f"{len(items)} sockets",
            f"header too large ({len(header)} bytes, limit {_MAX_JSON})",
        )
    payload = _HEADER.pack(_MAGIC, len(header)) + header
    all_fds = [s.fileno() for s in sent_socks]
    chunks = [all_fds[i : i + _MAX_FDS] for i in range(0, len(all_fds), _MAX_FDS)]
    # The first chunk rides on the header's first byte; the rest of the header
    # follows as plain stream data (sendmsg may send less than asked on a stream).
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", chunks[0]))]
    try:
        sent = channel.sendmsg([payload], rights)
    except OSError as exc:
        # A datagram or seqpacket channel sends the header as one message, which
        # AF_UNIX caps at the channel's SO_SNDBUF (net/unix/af_unix.c): nothing has
        # been sent, and the fix is the caller's (a stream channel, or a larger
        # SO_SNDBUF), so say so rather than pass on EMSGSIZE.
        # Past ~4 MiB the kernel cannot allocate the message's buffer at all, whatever
        # SO_SNDBUF says (its linear part is one kmalloc, at most KMALLOC_MAX_SIZE,
        # 4 MiB with 4 KiB pages, plus MAX_SKB_FRAGS pages): ENOBUFS, also nothing sent.
        too_big = exc.errno == errno.EMSGSIZE or (
            exc.errno in (errno.ENOBUFS, errno.ENOMEM) and len(payload) > _DGRAM_CEILING
        )
        if too_big and channel.type != socket.SOCK_STREAM:
            if len(payload) > _DGRAM_CEILING:
                limit = ""
                fix = (
                    "use a SOCK_STREAM channel (one AF_UNIX message stops at about "
                    "4 MiB, whatever SO_SNDBUF says)"
                )
            else:
                limit, fix = " (its SO_SNDBUF)", "use a SOCK_STREAM channel or raise SO_SNDBUF"
            raise InvalidArgument(
                "socks",
                f"{len(items)} sockets",
                f"header of {len(payload)} bytes is over what one message on this "
                f"{channel.type.name} channel can carry{limit}; {fix}",
            ) from exc
        raise
    if sent < len(payload):
        channel.sendall(payload[sent:])
    for chunk in chunks[1:]:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", chunk))]
        channel.sendmsg([_CHUNK_MARK], rights)


def _new_holder() -> socket.socket:
    """A socket object that owns no fd yet (``fileno()`` is -1), for :func:`_adopt`.

    Made, and kept by the caller, before it takes an fd: whatever interrupts the
    adoption, the fd's owner is then the object if its ``fileno()`` is the fd, the
    caller's list otherwise. A ``socket.socket(fileno=fd)`` that an interrupt (a
    signal handler raising) stops after it took the fd leaves an object nobody
    holds, which closes the fd again when collected: by then maybe another file.
    """
    return socket.socket.__new__(socket.socket)


def _adopt(fd: int, holder: socket.socket) -> socket.socket:
    """*holder*, now owning *fd*, blocking or not as the fd already is.

    ``socket(fileno=)`` reads family and type from the kernel but not O_NONBLOCK:
    it reports a blocking socket (``gettimeout()`` None) on an fd the sender made
    non-blocking, and a "blocking" ``accept()`` then raises ``BlockingIOError`` at
    once. The flag belongs to the open file description, which the sender still
    shares, so it is read and the Python socket follows it; it is never changed,
    whatever ``socket.setdefaulttimeout()`` says (the socket does not take the
    default timeout: that would need O_NONBLOCK set under the sender).

    :param holder: from :func:`_new_holder`, already in the caller's cleanup list.
    :raises OSError: *fd* is not open or not a socket. On any exception (an
        interrupt included) *holder* is left owning no fd (``fileno()`` -1): the
        caller still owns *fd*.
    """
    try:
        blocking = os.get_blocking(fd)
        if blocking and socket.getdefaulttimeout() is None:
            # No default timeout: CPython's init leaves the flag alone (and reads
            # the type itself), so the socket is blocking, as the fd is.
            socket.socket.__init__(holder, fileno=fd)
        else:
            # With a default timeout in force CPython's init_sockobject applies it
            # with ioctl(FIONBIO), setting O_NONBLOCK on the description the sender
            # shares (its blocking accept() then raises BlockingIOError), unless
            # the type has SOCK_NONBLOCK: then it takes the socket as non-blocking
            # (timeout 0) and makes no call. A type given is kept, not read from
            # the kernel, so a guess is replaced by the real one (SO_TYPE).
            socket.socket.__init__(holder, -1, socket.SOCK_STREAM | _NONBLOCK, -1, fd)
            kind = holder.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
            if kind != socket.SOCK_STREAM:
                holder.detach()
                socket.socket.__init__(holder, -1, kind | _NONBLOCK, -1, fd)
        if blocking and holder.gettimeout() is not None:
            # A blocking fd under a default timeout (or one another thread set in
            # between): Python's view is made blocking. CPython cannot say so
            # without ioctl(FIONBIO, 0), which writes the value just read.
            holder.settimeout(None)
    except BaseException:
        # Gives the fd back if __init__ took it (a no-op on a fileno() of -1).
        holder.detach()
        raise
    return holder


_FILE_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
}


def _socket_fd_problem(fd: int) -> tuple[bool, str] | None:
    """Why *fd* is not an open socket: ``(open, detail)``; None when it is one.

    Reads only (fstat): an fd it refuses is left exactly as it was. It may be
    the caller's stdout named by a stray variable, whose close-on-exec flag is
    not ours to set.
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:  # EBADF: the variable promises an fd we do not have
        return False, exc.strerror or str(exc)
    if stat.S_ISSOCK(mode):
        return None
    return True, _FILE_KINDS.get(stat.S_IFMT(mode), f"a file of mode {stat.S_IFMT(mode):#o}")


#: The sockets listen_fds() and inherited_sockets() made, by fd, while their
#: objects live: with ``unset_environment=False`` a second call reads the same
#: variable, and a second socket object on one fd would, closed, close the fd of
#: the first (or a file that took its number). Weak: a dropped socket is gone.
_ADOPTED: weakref.WeakValueDictionary[int, socket.socket] = weakref.WeakValueDictionary()
#: One adoption at a time: two threads must not both find an fd free and adopt it.
_ADOPTED_LOCK = threading.Lock()


def _adopt_listed(
    listed: Sequence[tuple[str, int, str]],
    refused: Callable[[int, str, bool, str], HandoffError],
    what: str,
) -> dict[str, socket.socket]:
    """Adopt each ``(key, fd, label)`` of a variable: ``{key: socket}``.

    Every fd is checked first, and a refusal changes nothing: no fd is adopted,
    closed or made close-on-exec (a refused one may be the caller's stdout; the
    others stay the caller's, to handle or close). Then every listed fd is made
    close-on-exec before the first is adopted, as ``sd_listen_fds`` does: if an
    adoption still fails, the sockets adopted so far are closed (each once) and
    none of the rest leaks into a child.

    :param refused: builds the error for ``(fd, label, is_open, detail)``.
    :param what: how the errors name the fds.
    :raises HandoffError: an fd is not an open socket, an earlier call's socket
        still owns it, or it could not be adopted.
    """
    with _ADOPTED_LOCK:
        return _adopt_listed_locked(listed, refused, what)


def _adopt_listed_locked(
    listed: Sequence[tuple[str, int, str]],
    refused: Callable[[int, str, bool, str], HandoffError],
    what: str,
) -> dict[str, socket.socket]:
    for _, fd, label in listed:
        if (problem := _socket_fd_problem(fd)) is not None:
            raise refused(fd, label, *problem)
        # fileno() == fd: a socket closed (or detached) since gave the fd up.
        if (owner := _ADOPTED.get(fd)) is not None and owner.fileno() == fd:
            how = (
                "whose close() left the fd to its open makefile() objects: close those"
                if getattr(owner, "_closed", False)
                else "use that socket, or close it first"
            )
            raise HandoffError(
                f"{what} fd {fd} ({label!r}) is already adopted by an earlier call, as "
                f"{owner!r}, {how} (two socket objects on one fd would each close it)"
            )
    out: dict[str, socket.socket] = {}
    # Held before it takes its fd (see _new_holder): an interrupt right after an
    # adoption still finds the socket here and closes it, as documented.
    made: list[socket.socket] = []
    try:
        for _, fd, label in listed:
            try:
                os.set_inheritable(fd, False)
            except OSError as exc:  # closed by another thread since the check
                raise HandoffError(
                    f"{what} fd {fd} ({label!r}) could not be adopted: {exc}"
                ) from None
        for key, fd, label in listed:
            made.append(holder := _new_holder())
            try:
                out[key] = _adopt(fd, holder)  # family/type read from the kernel
            except OSError as exc:
                raise HandoffError(
                    f"{what} fd {fd} ({label!r}) could not be adopted: {exc}"
                ) from None
    except BaseException:
        for sock in made:
            # A holder that did not take its fd has none to close (and close()
            # needs what socket.__init__ sets up).
            if sock.fileno() != -1:
                sock.close()
        raise
    for sock in out.values():
        _ADOPTED[sock.fileno()] = sock
    return out


class _Received(list[int]):
    """The fds received so far (the caller owns and closes them), and why some were
    lost, if any were: a truncated handoff is read to its end before the error is
    raised (:func:`recv_sockets`)."""

    __slots__ = ("lost",)

    def __init__(self) -> None:
        super().__init__()
        self.lost: str | None = None


def _take_fds(ancdata: list[tuple[int, int, bytes]], flags: int, fds: _Received) -> None:
    """Add the SCM_RIGHTS fds of one recvmsg to *fds*; close any other fd it installed.

    The caller owns what lands in *fds* (it closes them on failure). With
    SO_PASSPIDFD set on the channel (Linux 6.5+) the kernel also installs a pidfd
    of the sender in every recvmsg that has a control buffer (SCM_PIDFD): nobody
    asked this function for it, so it is closed here.

    Control data truncated (MSG_CTRUNC) sets ``fds.lost`` to the error to raise
    once the rest of the handoff is read (the first such message only; it names
    the receiver's fd limit when that is why): raised at once, it left the rest of
    the handoff queued, and the next call, after the caller raised the limit as
    told and the sender sent again, read that rest as a handoff and failed.
    """
    others: list[int] = []
    received = 0
    # The room the kernel had for SCM_RIGHTS: what the control messages written
    # before it (credentials, security label) left of the buffer. SCM_PIDFD comes
    # after it, so it does not count.
    room = _CMSG_BUFSIZE
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % 4
            fds.extend(array.array("i", cdata[:usable]))
            received += usable // 4
        elif level == socket.SOL_SOCKET and kind == _SCM_PIDFD:
            others.extend(array.array("i", cdata[: len(cdata) - len(cdata) % 4]))
        elif not received:
            room -= socket.CMSG_SPACE(len(cdata))
    for fd in others:
        # scm_pidfd_recv() writes pidfd_prepare()'s result into the message even
        # when it failed: a negative errno (-EMFILE at the fd limit), not an fd.
        if fd >= 0:
            os.close(fd)
    if flags & socket.MSG_CTRUNC:
        # scm_detach_fds() installs fds until the buffer is full or installing one
        # fails, closes the rest and sets MSG_CTRUNC in both cases. Fewer than the
        # buffer had room for: installing failed, almost always with EMFILE (this
        # process at its RLIMIT_NOFILE); an LSM refusing one (EPERM) is the other
        # way. The sender still has its sockets.
        if fds.lost is not None:
            return
        fits = (room - socket.CMSG_LEN(0)) // 4
        if received < fits:
            fds.lost = (
                f"control data truncated: the kernel installed {_descriptors(received)} "
                f"of the message, fewer than the buffer has room for, and closed the "
                f"rest: this process is probably at its fd limit (RLIMIT_NOFILE soft "
                f"limit {_nofile_limit()}); close some or raise the limit, and send again"
            )
        else:
            fds.lost = "control data truncated: descriptors were lost in transit"


def _nofile_limit() -> str:
    """The soft RLIMIT_NOFILE, for an error message."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return "unknown"
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


def _recv_exact(
    channel: socket.socket, n: int, fds: _Received, what: str = "header bytes"
) -> bytes:
    """*n* bytes of the channel, adding the fds that come with them to *fds*.

    :param what: what the bytes are, for the error when the channel closes early.
    :raises HandoffError: the channel closed first.
    """
    # A bytearray: a header of megabytes comes in many reads, and bytes += bytes
    # would copy everything read so far at each one.
    data = bytearray()
    while len(data) < n:
        msg, ancdata, flags, _ = channel.recvmsg(
            min(n - len(data), _READ_CHUNK), _CMSG_BUFSIZE, _MSG_CMSG_CLOEXEC
        )
        _take_fds(ancdata, flags, fds)
        if not msg:
            raise HandoffError(f"channel closed after {len(data)} of {n} {what}")
        data += msg
    return bytes(data)


def _descriptors(n: int) -> str:
    return f"{n} descriptor{'' if n == 1 else 's'}"


def _recv_chunks(channel: socket.socket, count: int, fds: _Received) -> None:
    """Receive the fds of a handoff of *count* sockets that did not come with the header.

    send_sockets puts exactly ``min(count, 253)`` fds on the header and each further
    chunk of up to 253 on a one-byte marker, so any other number is refused at
    once: waiting for fds that no sender will send would block, and on a stream
    channel read the next handoff's first byte as a marker. Once descriptors were
    lost (``fds.lost``: the kernel closed those it could not install), the counts
    say nothing and are not checked; the markers still are.

    :raises HandoffError: a wrong count of fds, a wrong marker, or the channel closed.
    """
    if fds.lost is None and len(fds) != min(count, _MAX_FDS):
        raise HandoffError(
            f"header lists {count} socket{'' if count == 1 else 's'} but "
            f"{_descriptors(len(fds))} came with it"
            + ("" if count <= _MAX_FDS else f" (a sender puts {_MAX_FDS} on the header)")
        )
    done = min(count, _MAX_FDS)
    while done < count:  # further chunks, one marker byte each
        before = len(fds)
        want = min(count - done, _MAX_FDS)
        chunk = f"the chunk of descriptors after {done} of {count}"
        mark = _recv_exact(channel, 1, fds, what=f"marker bytes of {chunk}")
        if mark != _CHUNK_MARK:
            raise HandoffError(f"expected the marker of {chunk}, got {mark!r}")
        if fds.lost is None and len(fds) - before != want:
            raise HandoffError(f"{chunk} has {_descriptors(len(fds) - before)}, expected {want}")
        done += want


def _check_length(magic: bytes, length: int) -> None:
    if magic != _MAGIC:
        raise HandoffError(f"not a reuselb handoff message (header {magic!r}, {length})")
    if length > _MAX_JSON:
        # No send_sockets writes one (it refuses first); a length field this large
        # is not read, let alone allocated.
        raise HandoffError(f"header too large ({length} bytes, limit {_MAX_JSON})")


def _shut_for_reading(channel: socket.socket) -> bool:
    """Whether *channel* will read nothing more: its peer closed or shut down writing.

    Asked with poll (it waits for nothing and reads nothing): POLLRDHUP is set once
    the kernel marks the socket RCV_SHUTDOWN, which an AF_UNIX stream or seqpacket
    peer's close does (a datagram peer's does not: there is no end to report). The
    flag says that no more will come, not that nothing is left: messages the peer
    sent before it closed are still queued, and are read before the end. So the
    queue must be empty too (FIONREAD, the kernel's SIOCINQ: on an AF_UNIX stream or
    seqpacket socket, the bytes of every queued message), read after the flag, when
    the peer can add nothing more. A queued empty message counts 0 bytes as well,
    but it reads as the end does, and carries nothing either way.
    """
    poller = select.poll()
    poller.register(channel, select.POLLIN | _POLLRDHUP)
    if not any(events & _POLLRDHUP for _, events in poller.poll(0)):
        return False
    try:
        queued = fcntl.ioctl(channel.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False  # unknown: not said to be closed
    count: int = struct.unpack("i", queued)[0]
    return count == 0


def _recv_header(channel: socket.socket, fds: _Received) -> bytes:
    """The JSON header of one handoff, whatever the channel's type."""
    if channel.type == socket.SOCK_STREAM:
        magic, length = _HEADER.unpack(_recv_exact(channel, _HEADER.size, fds))
        _check_length(magic, length)
        return _recv_exact(channel, length, fds)
    # A datagram (or seqpacket) channel carries the whole header in one message:
    # reading it in two parts, as on a stream, would let the kernel discard the
    # rest of the datagram after the first read and then wait for one that never
    # comes.
    # The datagram's real length first (MSG_TRUNC with MSG_PEEK reports it on AF_UNIX
    # and consumes nothing; without a control buffer no fd is installed): recvmsg
    # allocates the whole buffer it is given, and _MAX_JSON is ~20 MiB.
    # (recv_into, not recv: CPython's recv would grow its 1-byte result to that length.)
    size = channel.recv_into(bytearray(1), 1, socket.MSG_PEEK | socket.MSG_TRUNC)
    want = min(max(size, _HEADER.size), _HEADER.size + _MAX_JSON + 1)
    msg, ancdata, flags, _ = channel.recvmsg(want, _CMSG_BUFSIZE, _MSG_CMSG_CLOEXEC)
    _take_fds(ancdata, flags, fds)
    if not msg and not ancdata and _shut_for_reading(channel):
        # A seqpacket channel whose peer closed (or shut down writing) reads as an
        # empty message, as an empty message does; the kernel's RCV_SHUTDOWN
        # (POLLRDHUP) with nothing left queued tells the end from one. An empty
        # message followed by a handoff and the close is not the end: the next call
        # reads the handoff.
        raise HandoffError(f"channel closed after 0 of {_HEADER.size} header bytes")
    if len(msg) < _HEADER.size:
        raise HandoffError(f"not a reuselb handoff message ({len(msg)} bytes)")
    magic, length = _HEADER.unpack_from(msg)
    _check_length(magic, length)
    if flags & socket.MSG_TRUNC or length != len(msg) - _HEADER.size:
        raise HandoffError(f"not a reuselb handoff message (header {magic!r}, {length})")
    return msg[_HEADER.size :]


def _parse_header(raw: bytes) -> list[tuple[str, dict[str, object]]]:
    """``(name, {family, type, listening})`` per socket, checked before any fd is used."""
    try:
        meta = json.loads(raw)["sockets"]
    # RecursionError: json's decoder recurses per nesting level, so a header of a
    # few hundred KiB of "[[[[..." exhausts the stack well under the size limit.
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise HandoffError(f"malformed handoff header: {exc!r}") from None
    # No send_sockets call sends 0 sockets (it refuses them), nor more than the bound.
    if not isinstance(meta, list) or not 1 <= len(meta) <= _MAX_SOCKETS:
        raise HandoffError(f"malformed handoff header: 'sockets' is {meta!r:.80}")
    out: list[tuple[str, dict[str, object]]] = []
    names: set[str] = set()
    for entry in meta:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise HandoffError(f"malformed handoff entry {entry!r:.80}")
        try:
            want = {k: entry[k] for k in ("family", "type", "listening")}
        except KeyError as exc:
            raise HandoffError(f"handoff entry {entry['name']!r} lacks {exc}") from None
        if entry["name"] in names:
            raise HandoffError(f"handoff entry name {entry['name']!r} is repeated")
        names.add(entry["name"])
        out.append((entry["name"], want))
    return out


def recv_sockets(channel: socket.socket) -> dict[str, socket.socket]:
    """Receive the sockets one :func:`send_sockets` call sent.

    :param channel: the other end of the sender's Unix socket.
    :returns: ``{name: socket}``; every socket is close-on-exec and matches the
        family, type and listening state the sender declared. A socket the sender
        made non-blocking arrives non-blocking (``gettimeout()`` is 0), a blocking
        one blocking (``gettimeout()`` None, whatever ``socket.setdefaulttimeout()``
        says): O_NONBLOCK belongs to the file description both processes share, so
        it is read, not changed.
    :raises HandoffError: the message is malformed or truncated, its header is
        larger than any :func:`send_sockets` call writes ("header too large", about
        20 MiB), the header or a chunk comes with another number of descriptors
        than :func:`send_sockets` puts on it (refused at once, without waiting for
        more), the channel closes before the last chunk, or a socket is not what
        the sender said, or this process ran out of fds (at ``RLIMIT_NOFILE`` the
        kernel installs what it can and closes the rest; the message says so, and
        is raised once the rest of that handoff was read, so the sender may send
        again on the same channel). Every fd received is then closed, as it is on
        any other exception, each exactly once; a ``KeyboardInterrupt`` from a
        signal handler too, except one raised in the instant between ``recvmsg``
        returning and its descriptors being recorded, which leaves that message's
        fds open.
    :raises InvalidArgument: the channel is not a Unix socket, is a listening
        socket, or is a stream or seqpacket socket that is not connected.
    :raises SocketClosed: the channel is closed.
    :raises WrongSocketType: the channel is not a socket object.
    :raises OSError: the channel failed.
    """
    channel = _check_channel(channel, sending=False)
    fds = _Received()
    # Each fd received is owned by the object in *made* whose fileno() it is, or
    # else by *fds* alone; an object joins *made* before it takes its fd. A
    # failure at any point (an interrupt between two statements included) closes
    # each fd exactly once: a second close could hit an unrelated file that
    # reused the number.
    made: list[socket.socket] = []
    out: dict[str, socket.socket] = {}
    try:
        try:
            meta = _parse_header(_recv_header(channel, fds))
            _recv_chunks(channel, len(meta), fds)
        except HandoffError as exc:
            if fds.lost is None:
                raise
            raise HandoffError(fds.lost) from exc  # the first cause, and the one to fix
        if fds.lost is not None:
            # Read to its end (see _take_fds): the channel is ready for the next one.
            raise HandoffError(fds.lost)
        for (name, want), fd in zip(meta, fds, strict=True):  # _recv_chunks checked the count
            made.append(holder := _new_holder())
            try:
                sock = _adopt(fd, holder)
            except OSError as exc:  # ENOTSOCK: the sender passed some other file
                raise HandoffError(f"handoff entry {name!r} is not a socket: {exc}") from None
            out[name] = sock
            got = _describe(sock)
            if got != want:
                raise HandoffError(f"socket {name!r} is {got}, sender said {want}")
    except BaseException:
        owned = {sock.fileno() for sock in made}
        for sock in made:
            if sock.fileno() != -1:  # close() needs what socket.__init__ sets up
                sock.close()
        for fd in fds:
            if fd not in owned:
                os.close(fd)
        raise
    return out


#: Every variable systemd sets for socket activation (LISTEN_PIDFDID since v258);
#: all are removed together, as ``sd_listen_fds`` does.
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_PIDFDID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: First fd systemd passes (SD_LISTEN_FDS_START).
_LISTEN_FDS_START = 3
_MAX_LISTEN_FDS = 65536
_DECIMAL_RE = re.compile(r"[0-9]{1,10}\Z")
#: LISTEN_PIDFDID is a u64 (a pidfs inode id): up to 20 digits.
_U64_RE = re.compile(r"[0-9]{1,20}\Z")
_U64_MAX = 2**64 - 1


def _listen_number(
    name: str, text: str, maximum: int, pattern: re.Pattern[str] = _DECIMAL_RE
) -> int:
    # Plain ASCII decimal only, as systemd writes them. int() would also take
    # "1_0", " 10", "+1" and digits of other scripts ("\u0661"); sd_listen_fds
    # refuses the underscore, the other scripts and trailing junk, and reuselb
    # refuses the sign and spaces too: no service manager writes them, so a value
    # with them was not written by one.
    if not pattern.match(text):
        raise HandoffError(f"malformed {name}={text!r}: expected a decimal number")
    value = int(text)
    if not 1 <= value <= maximum:
        raise HandoffError(f"malformed {name}={text!r}: expected 1 to {maximum}")
    return value


def _own_pidfd_id(value: str) -> int | None:
    """This process's pidfd inode id, what systemd v258 writes to ``LISTEN_PIDFDID``.

    None where there is no pidfd to ask: no ``os.pidfd_open`` (not Linux), or
    ``pidfd_open(2)`` failing with ``ENOSYS`` (Linux before 5.3), ``EOPNOTSUPP``,
    or ``EPERM`` (a seccomp filter that denies the call). *value* is the variable's
    text, for the error message.

    :raises HandoffError: ``pidfd_open(2)`` failed otherwise (``EMFILE``, say).
    """
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        pidfd = pidfd_open(os.getpid())
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
            return None
        raise HandoffError(
            f"cannot check LISTEN_PIDFDID={value!r}: pidfd_open() of this process failed: {exc}"
        ) from None
    try:
        # On pidfs (Linux 6.9+, 64-bit) a pidfd's inode number is the process's
        # id, unique for the boot: unlike a pid it is never reused. systemd sets
        # the variable only when it read such an id for the child, so this
        # process's pidfd is on pidfs too.
        return os.fstat(pidfd).st_ino
    finally:
        os.close(pidfd)


def listen_fds(*, unset_environment: bool = True) -> dict[str, socket.socket]:
    """Adopt the sockets systemd passed by socket activation (``sd_listen_fds``).

    Checks ``LISTEN_PID`` against this process (the variables may have been
    inherited by a child that must not take them), and ``LISTEN_PIDFDID`` when
    set (systemd v258+: the inode id of a pidfd of the process meant, which,
    unlike a pid, is never reused) against the inode of a pidfd of this one
    (``pidfd_open(2)``, closed again; the check is skipped where there is none:
    ``ENOSYS`` before Linux 5.3), honours ``LISTEN_FDNAMES``, starts
    at fd 3, detects each fd's family and type from the kernel instead of assuming
    TCP (uvicorn#295), sets close-on-exec (systemd passes them inheritable), and by
    default removes ``LISTEN_PID``, ``LISTEN_PIDFDID``, ``LISTEN_FDS`` and
    ``LISTEN_FDNAMES`` from the environment so children do not see them
    (systemd#36899), also when it raises.

    ``LISTEN_PID`` and ``LISTEN_FDS`` must be plain ASCII decimal numbers (1 or
    more), ``LISTEN_PIDFDID``, when set, too (up to ``2**64-1``; it is read only
    when ``LISTEN_PID`` names this process), and ``LISTEN_FDNAMES``, when set,
    must hold exactly one name per fd;
    like ``sd_listen_fds_with_names``, anything else is an error, checked before
    any fd is touched. So is every fd it lists (``fstat``: open, and a socket):
    then all of them are made close-on-exec, as ``sd_listen_fds`` does, and only
    then adopted.

    :param unset_environment: remove the ``LISTEN_*`` variables (default True).
        With False a later call reads them again: while a socket an earlier call
        (of this function or :func:`inherited_sockets`) returned for an fd is
        open, it raises :class:`~reuselb.HandoffError` naming the fd rather than
        wrap that fd in a second socket object (closing either would close the
        other's fd, or whatever file took the number next).
    :returns: ``{name: socket}``; names from ``LISTEN_FDNAMES`` (a name repeated for
        several fds is kept by the first; the others are ``"name.<fd>"``), else
        ``"fd3"``, ... A socket passed non-blocking (``NonBlocking=yes``) has
        ``gettimeout()`` 0, a blocking one None (whatever
        ``socket.setdefaulttimeout()`` says); its O_NONBLOCK flag is read, not
        changed.
        Empty when this process was not socket-activated (no ``LISTEN_PID`` or
        ``LISTEN_FDS``, or ``LISTEN_PID`` or ``LISTEN_PIDFDID`` names another
        process).
    :raises HandoffError: a variable is malformed (the message names it and its
        value; a repeated name whose ``"name.<fd>"`` is another fd's name counts),
        ``pidfd_open(2)`` failed with ``LISTEN_PIDFDID`` set (``EMFILE``, say;
        not ``ENOSYS``, ``EOPNOTSUPP`` or ``EPERM``, which skip the check),
        an fd it lists is not open or not a socket, or is owned by a socket an
        earlier call returned that is still open (the message names the fd).
        Each is found before any fd is touched: no fd is adopted, closed or
        changed, and all stay the caller's. If adopting an fd fails after the
        checks, the sockets adopted so far are closed and every listed fd is left
        close-on-exec.
    :raises InvalidArgument: *unset_environment* is not a bool (nothing is read).
    """
    unset_environment = check_flag("unset_environment", unset_environment)
    env = {key: os.environ.get(key) for key in _LISTEN_VARS}
    if unset_environment:
        # Before anything can raise: a child must never see them, error or not.
        for key in _LISTEN_VARS:
            os.environ.pop(key, None)
    pid, count, names = env["LISTEN_PID"], env["LISTEN_FDS"], env["LISTEN_FDNAMES"]
    if pid is None or count is None:
        return {}
    # 10 digits hold any pid (the kernel's limit is 2**22).
    if _listen_number("LISTEN_PID", pid, _C_INT_MAX) != os.getpid():
        return {}
    pidfdid = env["LISTEN_PIDFDID"]
    if pidfdid is not None:
        # systemd v258 names the process by its pidfd id as well: a pid can be
        # reused (the service's process died and another got its pid, and with it
        # the variables), a pidfd id cannot. sd_listen_fds returns 0 when it names
        # another process, as for another LISTEN_PID. Checked before LISTEN_FDS,
        # as sd_listen_fds does.
        wanted = _listen_number("LISTEN_PIDFDID", pidfdid, _U64_MAX, _U64_RE)
        own = _own_pidfd_id(pidfdid)
        if own is not None and own != wanted:
            return {}
    n = _listen_number("LISTEN_FDS", count, _MAX_LISTEN_FDS)
    if names is None:
        labels = [f"fd{_LISTEN_FDS_START + i}" for i in range(n)]
    else:
        labels = names.split(":") if names else []  # systemd: "" holds no name
        if len(labels) != n:
            raise HandoffError(
                f"LISTEN_FDNAMES={names!r} has {len(labels)} name(s) for LISTEN_FDS={count!r}"
            )
    # systemd repeats a name for every fd of one socket unit ("web.socket" with two
    # ListenStream= lines): the first keeps it, the others get "name.fd". Keys are
    # settled before any fd is adopted, and one that a literal name already holds
    # ("a.5:a:a") is refused: a dict entry overwritten would drop (and, collected,
    # close) a passed socket.
    keys: list[str] = []
    for i, label in enumerate(labels):
        key = label if label not in keys else f"{label}.{_LISTEN_FDS_START + i}"
        if key in keys or (key != label and key in labels):
            raise HandoffError(
                f"LISTEN_FDNAMES={names!r}: fd {_LISTEN_FDS_START + i} would be named "
                f"{key!r}, which another fd already has"
            )
        keys.append(key)

    def refused(fd: int, label: str, is_open: bool, detail: str) -> HandoffError:
        if not is_open:  # the variables promise more fds than we have
            return HandoffError(
                f"LISTEN_FDS={count!r} lists fd {fd} ({label!r}), which is not open: {detail}"
            )
        return HandoffError(f"LISTEN_FDS fd {fd} ({label!r}) is not a socket: {detail}")

    listed = [
        (key, _LISTEN_FDS_START + i, label)
        for i, (label, key) in enumerate(zip(labels, keys, strict=True))
    ]
    return _adopt_listed(listed, refused, "LISTEN_FDS")


_MIGRATE_SYSCTL = "/proc/sys/net/ipv4/tcp_migrate_req"


def tcp_migrate_req() -> bool | None:
    """Whether ``net.ipv4.tcp_migrate_req`` is on in this network namespace.

    With it (Linux 5.14+), closing or shutting down one member of a reuseport group
    migrates its queued and half-open connections to another member instead of
    resetting them.

    :returns: True or False, or None where the kernel has no such setting (< 5.14).
    :raises OSError: the setting exists but could not be read (e.g. ``EMFILE``, or
        ``EACCES`` under a restrictive LSM): an unknown answer is not a "no".
    """
    try:
        with open(_MIGRATE_SYSCTL, encoding="ascii") as f:
            return f.read().strip() == "1"
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class DrainResult:
    """What :func:`drain_close` did.

    :ivar path: ``"migrate"`` (the kernel moved the queue to another member) or
        ``"steer"`` (new SYNs were steered away and the queue was accepted here).
    :ivar accepted: connections taken from the member's queue; the caller owns
        them and hands them on (empty on the migrate path).
    :ivar timed_out: the steer path reached *timeout* before the queue stayed empty
        for *grace* and the handshakes it waits for had ended (a
        ``TCP_DEFER_ACCEPT`` period longer than *timeout*, say). The connections
        already in the queue were still taken (one last non-blocking sweep) and are
        in *accepted*, but a handshake still in flight when the member closed may
        have been reset.
    :ivar steering_error: ``None`` when the group's steering was left as
        documented: the program *restore* attached, or none (steer path; also
        when *restore* attached none) or whatever it had (migrate path). Otherwise
        why not: the exception *restore* raised (drain_close's own program was
        detached before *restore* ran, on the steer path), or the steer path could
        not detach its program because every other member was closed meanwhile
        (by another thread), or *restore* was not called because the socket still
        listens (*still_listening*) and *group* is a list, which cannot name its
        slot (a :class:`~reuselb.SteeringError`). The drain
        itself succeeded: *listener* is closed and *accepted* holds every
        connection taken. The group may still carry drain_close's program:
        re-attach yours, or call :func:`~reuselb.detach_steering` through a member
        that is open.
    :ivar accept_error: ``None``, or why the steer path stopped accepting early:
        ``accept()`` failed for want of a resource (``EMFILE``, ``ENFILE``,
        ``ENOBUFS``, ``ENOMEM``). The connections taken before are in *accepted*
        (not closed: they are served or handed on like any other); those still
        queued were reset when *listener* closed.
    :ivar still_listening: the socket still listened once *listener* was closed:
        another copy of it is open (a dup, a process it was handed to), so it
        stays in the kernel's reuseport group and gets its share of new
        connections, which whoever holds the copy accepts (the migrate path
        migrated nothing). A :class:`ReuseportGroup` keeps its slot, as that of a
        member taken from it, so that its indexes stay the kernel's. Close every
        copy to take it out; the group does not see that close (the kernel then
        moves its last member into the slot, as for any taken member closed by its
        holder): steer by a list of the members in the kernel's order from then on,
        or make a new group. Known where sock_diag can be read (netlink);
        ``False`` otherwise.
    """

    path: str
    accepted: list[socket.socket] = field(default_factory=list)
    timed_out: bool = False
    steering_error: Exception | None = None
    accept_error: OSError | None = None
    still_listening: bool = False


# accept(2): Linux passes a queued connection's pending network error to accept(),
# "treat them like EAGAIN by retrying": the next connection in the queue is fine.
_ACCEPT_RETRY = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
        "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH",
    )
    if hasattr(errno, name)
)  # fmt: skip

_TCP_INFO = getattr(socket, "TCP_INFO", 11)


def _queue_capacity(listener: socket.socket) -> int:
    """How many connections the listener's accept queue holds when full."""
    try:
        # struct tcp_info of a listener: tcpi_unacked (offset 24) is the queue's
        # length, tcpi_sacked (offset 28) its limit; the kernel takes one more.
        info = listener.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 32)
        return int(struct.unpack_from("=I", info, 28)[0]) + 1
    except (OSError, struct.error):
        return 65536  # net.core.somaxconn's usual ceiling


# How often the steer path asks the kernel again whether the handshakes it waits for
# have ended. One that completes wakes the drain at once (its connection is queued);
# only one that ends otherwise (the client gave up, the kernel dropped it) or that
# another member's queue took is seen this late.
_RECHECK = 0.05


def _diag_handshakes(family: int, port: int) -> list[tuple[int, bytes, bytes, int, int]] | None:
    """``(family, local address, remote address, remote port, retransmissions)``.

    One for each handshake on local TCP *port*, as sock_diag lists them in state
    SYN_RECV: the request socks (one per SYN answered whose connection is not in an
    accept queue yet), Fast Open children in SYN_RECV, and for a few microseconds
    the child a completing request becomes (see :func:`_handshakes`). Addresses are
    16 bytes, an IPv4 one in the first 4. The retransmissions are
    ``idiag_retrans``, for a request sock the kernel's ``req->num_retrans``
    (``inet_req_diag_fill()``): the SYN-ACKs it retransmitted
    (``inet_rtx_syn_ack()`` counts each one sent), a byte. None when sock_diag
    could not be read.
    """
    found: list[tuple[int, bytes, bytes, int, int]] = []

    def visit(data: bytes, offset: int) -> bool:
        fam, state, _t, retrans, sport, dport, src, dst, _if, _cookie = _DIAG_HEAD.unpack_from(
            data, offset
        )
        # The kernel filters by port and state already; checked again, cheaply.
        if state == _TCP_SYN_RECV_STATE and int.from_bytes(sport, "big") == port:
            found.append((fam, src, dst, int.from_bytes(dport, "big"), retrans))
        return False

    if not _sock_diag(family, 1 << _TCP_SYN_RECV_STATE, port, visit):
        return None
    return found


# A handshake as sock_diag lists it: (family, local address, remote address, remote
# port), the addresses 16 bytes. The local port is the listener's.
_Endpoints = tuple[int, bytes, bytes, int]


def _handshakes(listener: socket.socket) -> dict[_Endpoints, int] | None:
    """The kernel's pending handshakes that may be *listener*'s, to retransmits.

    A connection whose handshake has not completed in the kernel's eyes is a request
    sock, counted in the listener's SYN queue but not in its accept queue, and
    ``close()`` drops it: the client, which may already think itself connected, is
    reset by the next segment it sends. Two kinds outlive a short *grace*:

    * with ``TCP_DEFER_ACCEPT``, the kernel takes the client's final ACK but keeps
      the request until data arrives, or until the defer period ends and a last
      SYN-ACK is answered (``tcp_check_req()``; ``syn_ack_recalc()``);
    * on an accept queue that was full when the final ACK came, the kernel drops the
      ACK and keeps the request (``tcp_abort_on_overflow=0``), to complete it when
      the client answers the next SYN-ACK retransmission, 1, 3, 7 ... s after the
      SYN.

    No interface says which listener a request belongs to (sock_diag reports it
    with no inode), so this is every handshake in state SYN_RECV on the listener's
    local port and address (any address for a wildcard listener), of IPv4 too for
    an IPv6 listener that takes it. Each is keyed by its endpoints, not by its
    sock_diag cookie: a completing request is swapped in the kernel's hash table
    for its child socket, in state SYN_RECV with a cookie of its own, under the
    table bucket's lock (``inet_ehash_nolisten()``); the child is queued
    (``inet_csk_complete_hashdance()``) before it leaves SYN_RECV
    (``tcp_child_process()``). Keyed by endpoints, a handshake stays listed until
    its connection is in the accept queue (or it was dropped): under its cookie it
    would be gone for the microseconds in which it is in neither list. Each maps
    to the SYN-ACKs the kernel has retransmitted for it so far (see
    :func:`drain_close` for why that count matters). None when sock_diag could not
    be read.
    """
    try:
        host = listener.getsockname()[0].partition("%")[0]  # no zone: fe80::1%lo
        mine = socket.inet_pton(listener.family, host)
        families = [int(listener.family)]
        if listener.family == socket.AF_INET6 and not listener.getsockopt(
            socket.IPPROTO_IPV6, socket.IPV6_V6ONLY
        ):
            families.append(socket.AF_INET)  # IPv4 clients of a dual-stack listener
        port = listener.getsockname()[1]
    except OSError:
        return None
    wildcard = not any(mine)
    requests: dict[_Endpoints, int] = {}
    for family in families:
        found = _diag_handshakes(family, port)
        if found is None:
            return None
        for fam, src, dst, dport, retrans in found:
            if fam == socket.AF_INET:
                local = src[:4]
                if len(mine) == 16:  # an IPv6 listener sees IPv4 as ::ffff:a.b.c.d
                    local = b"\0" * 10 + b"\xff\xff" + local
            else:
                local = src
            if wildcard or local == mine:
                requests[(fam, src, dst, dport)] = retrans
    return requests


def _defer_hold(listener: socket.socket, grace: float) -> float:
    """How long a deferred handshake of *listener* may wait for the kernel; 0 without.

    ``TCP_DEFER_ACCEPT`` reads back as the kernel keeps it: the sum of the SYN-ACK
    timeouts it covers (1 + 2 + 4 = 7 s for 5). The request's timers may fire up to
    an eighth late (the timer wheel's granularity), and the last SYN-ACK's answer
    takes up to *grace* (as any handshake in flight): a quarter more, plus *grace*.
    """
    try:
        defer = listener.getsockopt(socket.IPPROTO_TCP, _TCP_DEFER_ACCEPT)
    except OSError:
        return 0.0
    return defer * 1.25 + grace if defer > 0 else 0.0


def _detach_through(candidates: Iterable[socket.socket]) -> Exception | None:
    """Detach the group's program through the first candidate that lets us.

    Any member of the group will do, and the one chosen before the drain may have
    been closed since by another thread: one failure must not leave the program
    attached (nor lose the connections already accepted). Returns the error when
    no candidate worked, ``None`` when the program is gone.
    """
    from ._steering import detach_steering

    error: Exception | None = None
    no_program = False
    for member in candidates:
        if member.fileno() == -1:
            continue
        try:
            detach_steering(member)
            return None
        except SteeringError as exc:
            if exc.errno == errno.ENOENT:
                # No program on this member's group: try the others, but ENOENT
                # from all of them means it is gone.
                no_program = True
            else:
                error = exc
        except InvalidArgument:
            # In no group any more (shut down by another thread): it can neither
            # detach the program nor say that there is none. Try the others.
            continue
        # Closed by another thread since the check above: SocketClosed, or an
        # OSError from _group_key's getsockopt()/fstat() as detach_steering explains
        # a refusal (a SteeringError, EBADF included, is handled above).
        except (SocketClosed, OSError) as exc:
            error = exc
    if error is None and no_program:
        return None
    return error or SteeringError(
        "detaching drain_close's steering program failed: no other member of the group is open "
        "(and still in it)"
    )


def _restore(
    restore: Callable[[ReuseportGroup | Sequence[socket.socket]], object],
    group: GroupLike,
    members: list[socket.socket],
    index: int,
    held: bool = False,
) -> Exception | None:
    """Call the caller's *restore* with the group *listener* left; its error, if any.

    *held*: the socket still listens (DrainResult.still_listening), in its slot. A
    ReuseportGroup keeps that slot as a taken member's; a plain list has nothing to
    put there (its member is closed), and the list without it, in the order the
    kernel would have after a real leave, would give restore indexes off by one
    slot: restore is not called, and the error says why.
    """
    if held and not isinstance(group, ReuseportGroup):
        return SteeringError(
            "restore was not called: the listener's socket still listens in its slot "
            "(another copy of it is open), which a list of sockets cannot name; pass "
            "a ReuseportGroup, or re-attach steering once every copy is closed"
        )
    if isinstance(group, ReuseportGroup):
        remaining: ReuseportGroup | Sequence[socket.socket] = group  # updated by _remove()
    else:
        # The kernel's order after the close: the last member took the slot.
        rest = list(members)
        last = rest.pop()
        if index < len(rest):
            rest[index] = last
        remaining = rest
    try:
        restore(remaining)
    except Exception as exc:  # reported in DrainResult.steering_error
        return exc
    return None


def _has_another_member(
    listener: socket.socket,
    group: GroupLike,
    members: list[socket.socket],
    index: int,
) -> bool:
    """Whether *group* has a member besides *listener* that is still open.

    A member taken from a :class:`ReuseportGroup` counts: it is in the kernel's
    group for as long as anyone holds it, maybe another process, so closing it
    here proves nothing. _drain_members refused a held member closed by hand (it
    has left the group); one another thread closes since does not count.
    """
    if isinstance(group, ReuseportGroup):
        # An empty slot is a taken member only if take() emptied it: close() empties
        # the slots of the members it closed too, and those have left the group.
        return any(
            i != index and (m.fileno() != -1 if m is not None else i in group._taken)
            for i, m in enumerate(group._members)
        )
    # A plain sequence (its list, in *members*): every member in it was
    # checked open by _drain_members. Compared as kernel sockets (inodes), not as
    # objects: a dup() of the listener is the listener, and would keep its socket
    # (and queue) open after listener.close().
    mine = os.fstat(listener.fileno()).st_ino
    return any(os.fstat(m.fileno()).st_ino != mine for m in members)


def _drain_members(
    listener: socket.socket, group: GroupLike
) -> tuple[list[socket.socket], int, socket.socket | None]:
    """``(members in kernel order, the listener's index, another member we hold)``.

    A :class:`ReuseportGroup` keeps a slot for each member it gave away with
    ``take()``: that member is still in the kernel's group (its new owner holds
    it), so it still counts for the index and the size a steering program uses.

    :raises SocketClosed: a member of a plain *group*, or one a
        :class:`ReuseportGroup` holds, is closed (see ``_steering._held_members``:
        closed by hand, it left the kernel's group and the group's indexes are
        stale, so the group would be updated wrong and a program steer to the
        wrong members).
    :raises InvalidArgument: a socket object listed twice in a plain *group*.
    """
    if isinstance(group, ReuseportGroup):
        # A closed group still knows the members it gave away: they stay in the
        # kernel's group (``with reuseport_group(...) as g: a, b = g.take(0),
        # g.take(1)`` closes g but not them), so only a group with none is refused.
        if group._closed and not group._taken:
            raise InvalidArgument("group", group, "the group is closed")
        _held_members(group)
        slots = list(group._members)
        index = group._slot(listener)  # a member taken from it keeps its slot
    else:
        listed = [
            check_open(m, f"group member {i}")
            for i, m in enumerate(_items("group", group, "sockets"))
        ]
        # Listed twice, the listener (or another member) counted twice in the
        # program's size, the steer path attached a program for a group the
        # kernel does not have, and restore= got the closed listener back.
        _refuse_repeats([(f"group member {i}", m) for i, m in enumerate(listed)])
        slots = list(listed)  # a copy only for its type (list[socket | None]; invariant)
        index = next((i for i, m in enumerate(slots) if m is listener), -1)
    if index < 0:
        raise InvalidArgument("listener", listener, "is not a member of group")
    other = next((m for m in slots if m is not None and m is not listener), None)
    # The program only needs the size and the listener's index and can be attached
    # through any member, so the listener stands in for members given away.
    members = [listener if m is None else m for m in slots]
    return members, index, other


def drain_close(
    listener: socket.socket,
    *,
    group: GroupLike | None = None,
    grace: float = 0.2,
    timeout: float = 10.0,
    restore: Callable[[ReuseportGroup | Sequence[socket.socket]], object] | None = None,
) -> DrainResult:
    """Take one member out of a reuseport group without resetting a connection.

    Closing a member normally resets every connection in its accept queue and every
    half-open one. Two ways around it, chosen in this order:

    * ``net.ipv4.tcp_migrate_req=1`` (Linux 5.14+): the member is closed and the
      kernel migrates its queued and half-open connections to another member;
    * otherwise (Linux 4.5+, needs *group*): a reuseport cBPF program sends new SYNs
      to the other members, the queue is accepted here until it stays empty for
      *grace* seconds (handshakes already in flight complete within that time on a
      LAN; raise it for long round trips) and the handshakes the kernel still
      holds for the listener have ended, then the member is closed and the
      program detached (through any other member still open; if none lets it,
      :attr:`DrainResult.steering_error` says why). The accepted connections are
      returned to the caller, also then.

    On the steer path a client whose ``connect()`` has returned may not be in the
    accept queue yet, and closing the member would reset it. The kernel keeps it as
    a request until the handshake is complete on its side: on a listener with
    ``TCP_DEFER_ACCEPT`` (*defer_accept*) until the client sends data or the defer
    period ends; when the final ACK found the accept queue full, until the client
    answers a SYN-ACK retransmission (1, 3, 7 ... seconds after its SYN). So the
    steer path also waits, up to *timeout*, until the requests pending on the
    listener's port and address when the drain began have ended (sock_diag, as
    ``ss -t state syn-recv`` reads them; it cannot tell which member holds a
    request, so another member's count too). Each one that ends makes the queue
    stay quiet for *grace* again, as a completed handshake's connection may be
    queued just after the drain found the queue empty. A request whose SYN-ACK the
    kernel retransmits once the queue has room (from the drain's first empty
    accept on: before, a full queue may have dropped a live client's answer) and
    that is still pending *grace* later is not waited for: a live client answers
    within a round trip (a deferred one gets no SYN-ACK until its defer period
    ends), so its client is gone, e.g. a scanner's SYN, which the kernel keeps for
    about a minute. Where sock_diag cannot be read it
    waits out the listener's ``TCP_DEFER_ACCEPT`` period instead (a quarter more,
    plus *grace*), and a request behind a full queue may then be reset. Keep
    *timeout* above the defer period.

    **A steering program of yours does not survive.** The kernel keeps one program
    per group and cannot hand it back, so the steer path replaces yours with its
    own and removes that at the end: the kernel's hash picks members afterwards.
    Your program would be wrong for the smaller group anyway (its size, and the
    last member moved into the freed slot), so re-attach it for the new group:
    pass *restore* (e.g. ``restore=attach_hash_steering``), which drain_close calls
    with the group once *listener* has left it, on both paths. On the steer path
    drain_close detaches its own program first, so a *restore* that attaches
    nothing leaves the kernel's hash, as no *restore* does; until *restore*
    attaches its program (microseconds), the kernel's hash picks among the
    remaining members, so no connection is lost, only steered by the hash.

    **One drain at a time per kernel group.** The kernel keeps one program per
    group, so two steer-path drains of one group would replace each other's: in
    this process a drain_close waits until the one running on the same kernel
    group (same address, port, family, ``IPV6_V6ONLY`` and device, whatever the
    objects passed as *group*) has returned, then reads the group as that one
    left it. Drains in other processes are not seen: run those one after
    another, or set ``net.ipv4.tcp_migrate_req=1``, whose path attaches nothing.
    A drain of the same group from within a drain in the same thread (from
    *restore*, or from a signal handler) would wait for itself: it raises
    ``InvalidArgument`` instead (from *restore*: in
    :attr:`DrainResult.steering_error`).

    **The listener's blocking mode is put back.** The steer path accepts with
    ``O_NONBLOCK`` set, a flag of the open file description that every holder of
    the listener shares (a ``dup()``, a process it was handed to); a blocking
    listener is made blocking again before it is closed.

    Every argument is checked before anything changes: when this raises
    ``InvalidArgument``, ``SocketClosed`` or ``WrongSocketType``, *listener* is
    still open, *group* is as it was and no program is attached. An interrupt
    (``KeyboardInterrupt`` or ``SystemExit`` from a signal handler) propagates
    from any point and leaves one of two states: *listener* open in *group* with
    its queue and no program attached, as before the call (an interrupt before
    *listener* starts to leave, or during the steer path's attach, whose program
    is detached again), or *listener* closed and *group* updated, with the
    connections accepted so far closed (no result can carry them to you) and
    drain_close's program detached, once more if the interrupt came during the
    detach. *restore* is still called after an interrupt during the drain (its
    program, or none, then stays attached).

    :param listener: the member to remove, a listening TCP socket; it is closed on
        return. (Where another copy of it stays open, the socket stays in the
        group: see :attr:`DrainResult.still_listening`.)
    :param group: every member in join order, *listener* included: a
        :class:`~reuselb.ReuseportGroup` or a sequence of sockets (a list or
        tuple; not a set, whose order is not join order). A
        :class:`~reuselb.ReuseportGroup` is updated on both paths the way the
        kernel reorders its members (the last one takes the closed one's slot);
        members taken from it with ``take()`` still count, as they are still in
        the kernel's group, and *listener* may be one of them (drain a taken
        member with its group to keep the group in step; closing it any other
        way leaves the group's indexes stale). Optional with ``tcp_migrate_req=1``
        unless *restore* is given; pass it anyway, since only with it can
        drain_close check that another member will take the connections (the
        kernel migrates them only to a member of the same group, and resets them
        when there is none).
    :param grace: seconds the queue must stay empty before closing, and a pending
        request is waited for after a SYN-ACK retransmission (steer path), ``0`` to
        ``1e9``.
    :param timeout: stop waiting for the queue to go quiet, and for pending
        handshakes, after this many seconds (steer path), more than ``0`` and at
        most ``1e9``. What is queued then is still accepted, and
        :attr:`DrainResult.timed_out` is set: a handshake still in flight at that
        point is reset when the member closes.
    :param restore: called once *listener* has left the group (or, where it
        still listens, was closed), with the remaining members in the kernel's
        order (the updated :class:`~reuselb.ReuseportGroup`, or a new list for a
        plain sequence; with a plain sequence it is not called where the socket
        still listens, see :attr:`DrainResult.steering_error`) to attach your
        steering program for them (on the steer path drain_close's own
        program is detached by then). An ``Exception`` it raises is not raised
        again: it is in :attr:`DrainResult.steering_error`, since raising would
        drop the connections already accepted. A ``KeyboardInterrupt`` or
        ``SystemExit`` (any ``BaseException`` that is not an ``Exception``)
        propagates, *listener* closed and the group updated as on return; on the
        steer path drain_close closes the connections it accepted (no result can
        carry them to you).
    :returns: a :class:`DrainResult`.
    :raises InvalidArgument: *grace* or *timeout* is not an int or float in range
        (bools, NaN and infinities are refused), *restore* is not callable or is
        given without *group*, *group* is neither a
        :class:`~reuselb.ReuseportGroup` nor a sequence of sockets such as a list
        or tuple (one socket is not a group; a set, a mapping or an iterator is
        refused: positions are the kernel's indexes), a
        :class:`~reuselb.ReuseportGroup` that is closed, *listener* is not a
        member of *group*, a member of *group* is not in the listener's
        kernel group (not listening, as a :func:`~reuselb.hold_port` socket; not
        TCP; without SO_REUSEPORT; or another address, ``IPV6_V6ONLY`` setting or
        bound device: the message names the member), a socket object is listed
        twice in *group*, a member is the same socket
        as *listener* or another member under another fd (a ``dup()``: one inode;
        it would keep the listener's socket open), *group* has no open member
        besides *listener*
        (on both paths: closing it would reset its queue; a member taken from a
        :class:`~reuselb.ReuseportGroup` counts), or (steer path) there is no
        *group*, or no other member the :class:`~reuselb.ReuseportGroup` still
        holds to detach the program through, or this thread is draining the
        listener's group already (a drain from *restore* or a signal handler).
    :raises SocketClosed: *listener* is closed, or a member of *group*: one in a
        sequence, or one a :class:`~reuselb.ReuseportGroup` holds (closed by hand,
        it has left the kernel's group, whose last member moved into its slot: the
        group's indexes are stale; the message names it). Nothing was changed.
    :raises WrongSocketType: *listener* is not a listening TCP socket.
    :raises SteeringError: the kernel refused the steering program (nothing was
        closed).
    :raises OSError: ``net.ipv4.tcp_migrate_req`` could not be read (see
        :func:`tcp_migrate_req`; nothing was closed).
    """
    listener = check_open(listener, "listener")
    if (
        listener.family not in (socket.AF_INET, socket.AF_INET6)
        or listener.type != socket.SOCK_STREAM
        or not listener.getsockopt(socket.SOL_SOCKET, _SO_ACCEPTCONN)
    ):
        raise WrongSocketType("listener", "a listening TCP socket", repr(listener))
    grace = check_seconds("grace", grace, allow_zero=True)
    timeout = check_seconds("timeout", timeout, allow_zero=False)
    if restore is not None and not callable(restore):
        raise InvalidArgument("restore", restore, "must be a callable taking the group")
    if restore is not None and group is None:
        raise InvalidArgument("restore", restore, "needs the group to re-attach a program to")
    if group is None:
        return _drain_close(listener, None, grace, timeout, restore)
    # One drain at a time per kernel group, in this process: the kernel keeps one
    # program per group, so a second steer-path drain replaced the first's program
    # (whose listener then got new connections until its timeout), and both sized
    # the group on entry, so a ReuseportGroup lost track of the second close. The
    # group is read (and checked) only once the one before has ended.
    result: DrainResult | None = None
    try:
        with _one_drain_per_group(listener):
            result = _drain_close(listener, group, grace, timeout, restore)
        # Named, not returned from inside the with: the handler below must reach
        # the result if the interrupt comes as the lock is let go.
        return result  # noqa: RET504
    except BaseException:
        # An interrupt as the lock is let go, after _drain_close returned: no
        # result reaches the caller, so its connections are closed, as on an
        # interrupt inside it (the listener is closed and the group updated).
        if result is not None:
            for conn in result.accepted:
                conn.close()
        raise


_DRAINS_LOCK = threading.Lock()
#: Per kernel group (see _group_key) that a drain_close is running on or waiting
#: for: its lock, and how many drains hold or wait for it.
_DRAINS: dict[Any, tuple[threading.Lock, int]] = {}
#: ``keys``: the kernel groups this thread is draining (see _one_drain_per_group).
_draining = threading.local()


def _forget_drains_in_child() -> None:
    # A child forked while a drain ran (in another thread) would inherit its group's
    # lock held by a thread it does not have: its own drain_close of that group
    # waited for ever. A drain the forking thread itself was running goes on in the
    # child, with its own (inherited) lock, which it finds gone from the table.
    global _DRAINS_LOCK, _DRAINS  # noqa: PLW0603 (new ones, not the parent's copies)
    _DRAINS_LOCK = threading.Lock()
    _DRAINS = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_drains_in_child)


@contextlib.contextmanager
def _one_drain_per_group(listener: socket.socket) -> Iterator[None]:
    """Hold the drain lock of *listener*'s kernel group while the body runs.

    :raises InvalidArgument: this thread is draining that group already: a drain
        from *restore*, or from a signal handler that interrupted a drain, which
        would otherwise wait for itself (or, re-entering, run alongside it).
    """
    from ._steering import _group_key

    # option=False: a listener without SO_REUSEPORT is refused by the checks that
    # run under the lock, with the message they give.
    key = _group_key(listener, "listener", option=False)
    mine: set[Any] = _draining.__dict__.setdefault("keys", set())
    if key in mine:
        raise InvalidArgument(
            "listener",
            listener,
            "is in a group that a drain_close in this thread is draining already "
            "(a drain from restore, or from a signal handler): drains of one group "
            "run one after another",
        )
    with _DRAINS_LOCK:
        lock, users = _DRAINS.get(key) or (threading.Lock(), 0)
        _DRAINS[key] = (lock, users + 1)
    try:
        with lock:
            try:
                mine.add(key)
                yield
            finally:
                mine.discard(key)
    finally:
        with _DRAINS_LOCK:
            entry = _DRAINS.get(key)
            # (Not this lock's entry: the table was renewed in a forked child.)
            if entry is not None and entry[0] is lock:
                if entry[1] <= 1:
                    del _DRAINS[key]
                else:
                    _DRAINS[key] = (lock, entry[1] - 1)


def _drain_close(
    listener: socket.socket,
    group: GroupLike | None,
    grace: float,
    timeout: float,
    restore: Callable[[ReuseportGroup | Sequence[socket.socket]], object] | None,
) -> DrainResult:
    """drain_close once its arguments of its own are checked (see there)."""
    # Again: a drain of the same group that this one waited for may have closed it.
    listener = check_open(listener, "listener")
    members: list[socket.socket] = []
    index = -1
    other: socket.socket | None = None
    if group is not None:
        members, index, other = _drain_members(listener, group)
        # Every member must be in the listener's kernel group: one that is not (a
        # hold_port() socket, bound but not listening) would take the steering
        # program into a group of its own, and SYNs would keep reaching listener.
        # The listener is compared once, as the reference: its own slot and the
        # slots it stands in for (members taken from a ReuseportGroup) are left
        # out, and _drain_members refused a plain group listing it twice.
        _check_one_group(
            [
                ("listener", listener),
                *((f"group member {i}", m) for i, m in enumerate(members) if m is not listener),
            ]
        )
        # On both paths: the kernel migrates to, or the program steers to, another
        # member; with none, closing *listener* resets its queue, and the migrate
        # path would report that as a success.
        if not _has_another_member(listener, group, members, index):
            raise InvalidArgument(
                "group",
                group,
                "has no open member besides listener to take its connections "
                "(closing it would reset them)",
            )
    # The group's size before *listener* leaves it: leave() removes the slot only
    # while the size is unchanged (_remove pops one), so the handlers below can call
    # it again after an interrupt without removing a second member.
    size = len(group) if isinstance(group, ReuseportGroup) else 0
    # O_NONBLOCK belongs to the open file description, which other holders of the
    # listener share (a dup, a process it was handed to): the steer path sets it
    # to accept until the queue is empty, and leave() puts it back (a worker's
    # blocking accept() on its copy raised BlockingIOError after the drain).
    was_blocking = os.get_blocking(listener.fileno())
    # To tell, after the close, whether the socket left the kernel's group (see
    # still_listening()).
    family, inode = listener.family, os.fstat(listener.fileno()).st_ino
    # The group as it was before leave() removed the listener's slot.
    before: list[tuple[list[socket.socket | None], dict[int, Any]]] = []

    def leave() -> None:
        """Take *listener* out of *group*, then close it; safe to call again."""
        # The group first: it must mirror the kernel even if the close is where an
        # interrupt (a signal handler raising) comes.
        if isinstance(group, ReuseportGroup) and len(group) == size:
            before.append(group._remove(index))
        if was_blocking and (fd := listener.fileno()) != -1:
            with contextlib.suppress(OSError):
                os.set_blocking(fd, True)
        listener.close()

    def still_listening() -> bool:
        """Whether the socket still listens after leave() closed *listener*.

        Closing one fd of a socket takes it out of the kernel's group only when it
        was the last: a copy held elsewhere (a dup, a process it was handed to)
        keeps it listening, in its slot, getting its share of new connections.
        The group then keeps the slot, as that of a member taken from it: removed,
        its indexes no longer matched the kernel's, and steering by them (restore's
        program included) picked the wrong members. Only where sock_diag can be
        read (False otherwise).
        """
        if _diag_listener(family, inode) is None:
            return False
        if isinstance(group, ReuseportGroup) and before and len(group) == size - 1:
            group._taken_back(before[0], index, listener)
        return True

    if tcp_migrate_req():
        try:
            leave()
        except BaseException:
            # An interrupt between the update and the close would leave an open
            # listener the group no longer lists (or, the other way round, a closed
            # one it still lists, with stale indexes).
            leave()
            raise
        held = still_listening()
        error = None
        if restore is not None and group is not None:
            error = _restore(restore, group, members, index, held)
        return DrainResult("migrate", steering_error=error, still_listening=held)
    if group is None:
        raise InvalidArgument(
            "group",
            None,
            "without net.ipv4.tcp_migrate_req=1, drain_close needs the group to steer SYNs away",
        )
    if other is None:
        # The program must be detached after the listener closes (before, new SYNs
        # could still hash to it and be reset), through a member that stays open.
        raise InvalidArgument(
            "group", group, "holds no member besides listener to detach the steering through"
        )
    # Not steer_away_from(members, ...): *members* lists the listener again for
    # each member taken from a ReuseportGroup (the size must count them), which a
    # caller's list may not do. Everything the program needs was checked above.
    from ._steering import _attach_away_from

    accepted: list[socket.socket] = []
    timed_out = False
    accept_error: OSError | None = None
    # Two full queues: bounds the retries of take() and the sweep after a timeout.
    # It only matters if something else steers new SYNs back to this member.
    bound = 2 * _queue_capacity(listener)
    candidates = [other, *members]

    def take() -> bool:
        """Accept one queued connection: False when the queue is empty."""
        nonlocal accept_error
        # Each retry consumes one queued connection (whose error accept reported).
        for _ in range(bound):
            try:
                # Owned as accept() returns, in one statement: an interrupt (a
                # signal handler raising) before the append would leave a
                # connection no one closes (kept open by the traceback's frame).
                # One window stays: socket.accept() wraps the fd only after
                # _accept() returned it, and a handler raising in between leaks
                # that fd (documented in docs/restarts.md).
                accepted.append(listener.accept()[0])
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY:
                    continue
                # EMFILE and the like: keep what was taken (closing it would reset
                # connections the caller can still serve) and say why we stopped.
                accept_error = exc
                return False
            accepted[-1].setblocking(True)
            return True
        return False

    def detach() -> Exception | None:
        """Detach drain_close's program through a member other than *listener*."""
        held = candidates
        if isinstance(group, ReuseportGroup):
            held = held + [m for ref in group._taken.values() if (m := ref()) is not None]
        return _detach_through(m for m in held if m is not listener)

    def drain() -> BaseException | None:
        """Take the queued connections until the queue stays quiet (see above).

        Returns the exception that stopped it (an interrupt, or any error), which
        drain_close raises once *listener* has left the group and restore was
        called. Returned, not caught by a ``try`` in drain_close: CPython leaves a
        nested ``try`` statement's own instruction (a ``NOP``, where a trace
        function may raise) out of the enclosing ``try``'s handler range.
        """
        nonlocal timed_out
        try:
            listener.setblocking(False)
            # poll, not select: select() refuses fds above 1023, common in a proxy.
            poller = select.poll()
            poller.register(listener, select.POLLIN)
            start = time.monotonic()
            deadline = start + timeout
            quiet_since = start
            # The handshakes the listener may still complete (see _handshakes):
            # taken now that the program sends every new SYN to another member, so
            # no new one is the listener's. (A SYN the kernel is handling on another
            # CPU while the program is attached may still pick the listener and add
            # its request a few microseconds after this; its handshake gets *grace*,
            # as before.) Each maps to its SYN-ACK retransmissions when first seen.
            # (An endpoint that a new SYN reuses after its request ended between
            # two reads is waited for again: rare, and bounded as any request.)
            pending = _handshakes(listener)
            # Where sock_diag cannot be read (no netlink in a sandbox), wait out the
            # listener's TCP_DEFER_ACCEPT period instead: a deferred handshake whose
            # client sends nothing is queued when the kernel's last SYN-ACK of that
            # period is answered. A request stuck behind a full queue is not
            # covered then.
            hold_until = start
            if pending is None:
                hold_until += _defer_hold(listener, grace)
                pending = {}
            # When each pending request was first seen to have retransmitted since.
            resent: dict[_Endpoints, float] = {}
            rebased = False
            while True:
                if (now := time.monotonic()) >= deadline:
                    timed_out = True
                    break
                if take():
                    quiet_since = time.monotonic()
                    continue
                if accept_error is not None:
                    break
                if not rebased:
                    rebased = True
                    # The queue has room now that take() found it empty. A live
                    # client answers a SYN-ACK retransmitted before (since the
                    # snapshot, or before it), but the kernel drops that answer
                    # too while the queue is full: retransmissions count from
                    # here, or such a request would be given up below and its
                    # client reset when the member closes.
                    current = _handshakes(listener) if pending else None
                    if current is not None:
                        for key in pending:
                            if key in current:
                                pending[key] = current[key]
                if now - quiet_since < grace:
                    # Wake when a connection arrives or the quiet time is up.
                    wait = grace - (now - quiet_since)
                else:
                    if pending:
                        # Ended handshakes leave the kernel's list: completed ones
                        # were queued (and taken above if they were the listener's),
                        # the others were dropped.
                        current = _handshakes(listener)
                        if current is None:  # sock_diag failed since: as if never read
                            hold_until = max(hold_until, start + _defer_hold(listener, grace))
                            current = {}
                        ended = False
                        for key, retrans in list(pending.items()):
                            if key not in current:
                                del pending[key]
                                ended = True
                            elif current[key] != retrans:
                                # A request that retransmits its SYN-ACK is not one
                                # that can still complete unseen: a deferred
                                # client's ACKed request gets no SYN-ACK until its
                                # defer period ends (syn_ack_recalc()), and one
                                # whose ACK a full queue dropped completes when the
                                # client answers the first retransmission, now that
                                # the drain makes room; either answer comes within a
                                # round trip. Still pending *grace* later, at a later
                                # check, its client is gone (a SYN whose sender
                                # vanished, a scanner): it would retransmit for a
                                # minute (tcp_synack_retries=5), possibly held by
                                # another member, so it is not waited for.
                                if key not in resent:
                                    resent[key] = now
                                elif now - resent[key] >= grace:
                                    del pending[key]
                        if ended:
                            # A completed handshake's connection is queued by the
                            # time it leaves the list (see _handshakes), but that
                            # may be after take() found the queue empty above:
                            # take again, and the queue must stay quiet for *grace*
                            # once more (poll wakes at once for a queued one).
                            # Ending here would reset that client: a deferred one
                            # whose data came between take() and this read, or one
                            # behind a full queue that answered its retransmission.
                            quiet_since = now
                            continue
                    if not pending and now >= hold_until:
                        break
                    wait = _RECHECK if pending else hold_until - now
                # One day at most per wait (poll takes a C int of ms).
                wait = min(wait, deadline - now, 86400.0)
                poller.poll(max(wait, 0.0) * 1000)
            if timed_out:
                # The queue still holds connections that finished their handshake:
                # closing now would reset them. New SYNs go to the other members, so
                # the queue only shrinks; take what is in it.
                for _ in range(bound):
                    if not take():
                        break
        except BaseException as exc:
            return exc
        return None

    # The attach and everything after it share the handler at the end, so no point
    # lies between the program being attached and the code that removes it. An
    # interrupt can come as the attach's setsockopt() returns (a signal arriving
    # during the call is handled then, inside _attach), after the kernel attached
    # the program: *attaching* is cleared only once the attach has returned, so a
    # handler that finds it set detaches the program and leaves *listener* open.
    attaching = True
    # Whether drain_close's program was detached (restore runs only after that, so
    # a program found later is the caller's, which must not be detached).
    detached = False
    drain_error: BaseException | None = None
    try:
        _attach_away_from(
            members[0],
            len(members),
            index,
            "listener" if members[0] is listener else "group member 0",
        )
        attaching = False
        # An interrupt (or any error) during the drain: *listener* still leaves the
        # group and restore is still called; then it propagates, and the handler
        # at the end closes the accepted connections.
        drain_error = drain()
        leave()
        held = still_listening()
        # Detached before restore runs, not replaced by its program: a restore that
        # attaches nothing (one that attaches only when a condition holds) left this
        # program, made for the group before the close, steering away from the
        # member now in the listener's slot. The kernel's hash picks among the
        # remaining members for the moment until restore attaches its program.
        # A failure is reported, not raised: raising here would drop the
        # connections already accepted (reset when collected).
        steering_error = detach()
        detached = True
        if restore is not None:
            # After the close: the caller's program is for the group without
            # listener. Its error, if any, is the one reported.
            steering_error = _restore(restore, group, members, index, held) or steering_error
        if drain_error is not None:
            raise drain_error
        return DrainResult(
            "steer", accepted, timed_out, steering_error, accept_error, still_listening=held
        )
    except BaseException as exc:
        if attaching:
            # The kernel refused the program (SteeringError): nothing changed. Any
            # other exception came during the attach, which may have attached the
            # program before the signal's handler ran: detached again, *listener*
            # is left open in its group, as before the call.
            if not isinstance(exc, SteeringError):
                detach()
            raise
        # KeyboardInterrupt or SystemExit from a signal handler at any point after
        # the attach, or from restore (_restore keeps an Exception), or the drain's
        # error raised again above: no DrainResult reaches the caller, so the
        # accepted connections would be owned by nobody. The group is updated and
        # the listener closed (again: leave() may be where it came), and the
        # program (for the group before the close) detached unless that was done
        # (restore runs only after it: what is attached then is the caller's); one
        # more try if the interrupt came during the detach (one that reached the
        # kernel makes this one find no program). Each step runs even if a
        # second signal interrupts the one before.
        try:
            leave()
        finally:
            try:
                if not detached:
                    detach()
            finally:
                for conn in accepted:
                    conn.close()
        raise


#: The environment variable that carries ``name=fd`` pairs across one exec.
INHERIT_ENV = "REUSELB_INHERITED_FDS"
_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")


def inherit_sockets(socks: Mapping[str, socket.socket]) -> tuple[list[int], dict[str, str]]:
    """Prepare sockets to be inherited by one exec'd child (graceful binary upgrade).

    The sockets stay close-on-exec in this process; pass the returned fds as
    ``subprocess.Popen(..., pass_fds=fds, env={**os.environ, **env})`` and the child
    (and only that exec) inherits them, then adopts them with
    :func:`inherited_sockets`. No other child, thread or exec sees them.

    :param socks: ``{name: socket}``; names of letters, digits and ``_.:-``, one
        name per socket: the same socket (fd) under two names is refused, since the
        child would get one fd for both and closing one name would close the other.
    :returns: ``(pass_fds, env)``.
    :raises InvalidArgument: *socks* is not a mapping (a list has no names), no
        sockets, a name that cannot travel in the variable, or one socket (one fd)
        under two names.
    :raises SocketClosed: a socket is closed.
    :raises WrongSocketType: a value is not a socket object.
    """
    if not isinstance(socks, Mapping):
        raise InvalidArgument("socks", socks, "must be a mapping of name to socket")
    if not socks:
        raise InvalidArgument("socks", socks, "must name at least one socket")
    pairs: list[tuple[str, int]] = []
    names_by_fd: dict[int, str] = {}
    for name, sock in socks.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise InvalidArgument("name", name, "must be 1-64 of letters, digits and _.:-")
        fd = check_open(sock, f"socket {name!r}").fileno()
        if fd in names_by_fd:
            # The name, not the whole mapping (80 KB for 1,000 sockets).
            raise InvalidArgument(
                "name", name, f"names fd {fd}, as {names_by_fd[fd]!r} does: one name per socket"
            )
        names_by_fd[fd] = name
        pairs.append((name, fd))
    env = {INHERIT_ENV: ",".join(f"{name}={fd}" for name, fd in pairs)}
    return [fd for _, fd in pairs], env


def inherited_sockets(*, unset_environment: bool = True) -> dict[str, socket.socket]:
    """Adopt the sockets a parent passed with :func:`inherit_sockets`.

    Each fd's family and type are read from the kernel, close-on-exec is set again
    at once, and the variable is removed from the environment (so a grandchild
    never tries to adopt fds it does not have). The whole variable, and every fd
    it names (``fstat``: open, and a socket), is checked before any fd is touched;
    then all are made close-on-exec, and only then adopted.

    :param unset_environment: remove the variable (default True). With False a
        later call reads it again: while a socket an earlier call (of this
        function or :func:`listen_fds`) returned for an fd is open, it raises
        :class:`~reuselb.HandoffError` naming the fd rather than wrap that fd in a
        second socket object (closing either would close the other's fd, or
        whatever file took the number next).
    :returns: ``{name: socket}``; empty when nothing was inherited. A socket the
        parent made non-blocking has ``gettimeout()`` 0, a blocking one None
        (whatever ``socket.setdefaulttimeout()`` says; O_NONBLOCK is read, not
        changed: the parent shares it).
    :raises HandoffError: the variable is malformed (an fd above a C int, a name
        or an fd given twice), an fd is not an open socket, or an fd is owned by a
        socket an earlier call returned that is still open. Each is found
        before any fd is touched: no fd is adopted, closed or changed (a stray
        variable naming stdout does not make it close-on-exec). If adopting an
        fd fails after the checks, the sockets adopted so far are closed (each
        once) and every listed fd is left close-on-exec.
    :raises InvalidArgument: *unset_environment* is not a bool (nothing is read).
    """
    unset_environment = check_flag("unset_environment", unset_environment)
    value = os.environ.get(INHERIT_ENV)
    if unset_environment:
        os.environ.pop(INHERIT_ENV, None)
    if not value:
        return {}
    # The whole variable is read before any fd is looked at: an error in a later
    # entry must not leave earlier fds adopted, closed or changed.
    listed: list[tuple[str, int, str]] = []
    names: set[str] = set()
    names_by_fd: dict[int, str] = {}
    for item in value.split(","):
        name, sep, fd_text = item.partition("=")
        if (
            not sep
            or not _NAME_RE.match(name)
            or not fd_text.isascii()
            or not fd_text.isdigit()
            # An fd is a C int: a longer number would overflow set_inheritable.
            or len(fd_text) > 10
            or int(fd_text) > _C_INT_MAX
        ):
            raise HandoffError(f"malformed {INHERIT_ENV} entry {item!r}")
        if name in names:
            raise HandoffError(f"{INHERIT_ENV} names {name!r} twice")
        fd = int(fd_text)
        # Two socket objects on one fd: closing one would leave the other to
        # close whatever file reuses the number next. inherit_sockets never
        # writes this.
        if fd in names_by_fd:
            raise HandoffError(
                f"{INHERIT_ENV} gives fd {fd} twice ({names_by_fd[fd]!r} and {name!r})"
            )
        names.add(name)
        names_by_fd[fd] = name
        listed.append((name, fd, name))

    def refused(fd: int, name: str, is_open: bool, detail: str) -> HandoffError:
        state = "a socket" if is_open else "an open socket"
        return HandoffError(f"inherited fd {fd} ({name!r}) is not {state}: {detail}")

    return _adopt_listed(listed, refused, "inherited")
