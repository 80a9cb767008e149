"""The relay: move bytes both ways between two stream sockets until both are done.

Rules of this module:

* one state machine (:class:`_Relay`) does all the work on non-blocking sockets; the
  blocking driver (:func:`pipe_splice`) waits with ``poll`` in the caller's thread,
  the asyncio driver (:func:`async_pipe_splice`) with ``add_reader``/``add_writer``
  on the caller's loop. No helper thread, ever;
* zero copy where the kernel allows: socket -> pipe -> socket with ``splice(2)``;
  a copy through one reused buffer per direction elsewhere (TLS sockets, non-Linux,
  ``EINVAL`` at run time), with the same semantics;
* no byte is lost or reordered: bytes sitting in a direction's pipe belong to that
  connection and are delivered before its half-close;
* every pipe is created close-on-exec and closed when the relay ends, on every path;
  caller-owned sockets (``close=False``) are never closed, only restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import os
import select
import socket
import ssl
import sys
import time
from dataclasses import dataclass

from ._errors import InvalidArgument, SocketClosed, WrongSocketType

__all__ = ["End", "RelayStats", "async_pipe_splice", "pipe_splice"]

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
# SPLICE_F_MORE is deliberately never passed: it corks the output socket, and a
# relay prototype measured 112 req/s instead of ~25k with it on small replies.
# SPLICE_F_NONBLOCK is needed even on non-blocking sockets: it is what makes the
# *pipe* side non-blocking (splice(2)).
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_HAS_SPLICE = sys.platform.startswith("linux") and hasattr(os, "splice")
_COPY_BUFFER = 64 * 1024
_DEFAULT_PIPE = 1 << 20
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})
# struct linger {l_onoff=1, l_linger=0}: close() then sends RST instead of FIN.
_LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"
_POLLIN = select.POLLIN if hasattr(select, "POLLIN") else 1
_POLLOUT = select.POLLOUT if hasattr(select, "POLLOUT") else 4
_POLLERR = select.POLLERR if hasattr(select, "POLLERR") else 8


class End(str, enum.Enum):
    """How one side of a relay ended (what the relay saw *reading* from it)."""

    #: the side sent EOF (FIN) after its last byte; forwarded as a half-close
    EOF = "eof"
    #: the side reset the connection (ECONNRESET/EPIPE)
    RESET = "reset"
    #: no byte moved either way for ``idle_timeout`` seconds
    TIMEOUT = "timeout"
    #: another socket error; see :attr:`RelayStats.error`
    ERROR = "error"
    #: the relay ended it because the other side failed
    ABORTED = "aborted"


@dataclass(frozen=True)
class RelayStats:
    """What a relay did.

    :ivar a_to_b: bytes delivered from *a* to *b*.
    :ivar b_to_a: bytes delivered from *b* to *a*.
    :ivar a_end: how side *a* ended.
    :ivar b_end: how side *b* ended.
    :ivar failed: ``"a"``, ``"b"`` or None: which side failed first (reset/error).
    :ivar error: that side's exception, if any.
    :ivar spliced: True when both directions ran on splice(2) throughout.
    :ivar duration: seconds from start to end.
    """

    a_to_b: int
    b_to_a: int
    a_end: End
    b_end: End
    failed: str | None
    error: OSError | None
    spliced: bool
    duration: float


def _pipe_capacity_limit() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _DEFAULT_PIPE


_PIPE_MAX = _pipe_capacity_limit() if _HAS_SPLICE else _DEFAULT_PIPE


class _Flow:
    """One direction, src -> dst: a pipe (splice) or a buffer (copy)."""

    __slots__ = (
        "blocked",
        "buf",
        "cap",
        "dst",
        "dst_fd",
        "eof",
        "moved",
        "name",
        "pending",
        "pipe_r",
        "pipe_w",
        "shut",
        "splice",
        "src",
        "src_fd",
        "start",
        "tls",
        "view",
    )

    def __init__(
        self, name: str, src: socket.socket, dst: socket.socket, use_splice: bool, pipe_size: int
    ) -> None:
        self.name = name
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.tls = isinstance(src, ssl.SSLSocket)
        self.moved = 0
        self.pending = 0  # bytes read from src, not yet written to dst
        self.eof = False
        self.shut = False
        # The pipe looked full: splice-in returned EAGAIN with bytes pending. Slots are
        # pages and partly-filled slots count as used, so EAGAIN can come long before
        # `pending == cap` (sozu-proxy#1323); wait for the write side, not for src.
        self.blocked = False
        self.pipe_r = self.pipe_w = -1
        self.buf = bytearray()
        self.view = memoryview(self.buf)
        self.start = 0
        self.splice = use_splice
        self.cap = 0
        if use_splice:
            self.pipe_r, self.pipe_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            # EPERM past fs.pipe-user-pages-soft for unprivileged users: keep the
            # default size rather than fail the relay.
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, min(pipe_size, _PIPE_MAX))
            self.cap = fcntl.fcntl(self.pipe_w, _F_GETPIPE_SZ)
        else:
            self._to_copy()

    def _to_copy(self) -> None:
        self.buf = bytearray(max(_COPY_BUFFER, self.pending))
        self.view = memoryview(self.buf)
        self.cap = len(self.buf)

    def to_copy(self) -> None:
        """Switch to the copy path (splice said EINVAL), keeping pending bytes."""
        data = b""
        while len(data) < self.pending:
            chunk = os.read(self.pipe_r, self.pending - len(data))
            if not chunk:
                break
            data += chunk
        self.close_pipe()
        self.splice = False
        self._to_copy()
        self.view[: len(data)] = data
        self.start = 0
        self.pending = len(data)

    def close_pipe(self) -> None:
        for fd in (self.pipe_r, self.pipe_w):
            if fd >= 0:
                os.close(fd)
        self.pipe_r = self.pipe_w = -1

    @property
    def wants_read(self) -> bool:
        return not self.eof and not self.blocked and self.pending < self.cap

    @property
    def wants_write(self) -> bool:
        return self.pending > 0

    @property
    def done(self) -> bool:
        return self.shut


class _Failure(Exception):
    def __init__(self, side: str, end: End, error: OSError) -> None:
        self.side, self.end, self.error = side, end, error


class _Relay:
    """The state machine both drivers run."""

    def __init__(
        self,
        a: socket.socket,
        b: socket.socket,
        *,
        pipe_size: int | None,
        idle_timeout: float | None,
        close: bool,
        force_copy: bool = False,
    ) -> None:
        _check_pair(a, b)
        if pipe_size is not None and (
            isinstance(pipe_size, bool) or not isinstance(pipe_size, int) or pipe_size < 4096
        ):
            raise InvalidArgument("pipe_size", pipe_size, "must be an int >= 4096 bytes")
        if idle_timeout is not None and (
            isinstance(idle_timeout, bool)
            or not isinstance(idle_timeout, (int, float))
            or not idle_timeout > 0
        ):
            raise InvalidArgument("idle_timeout", idle_timeout, "must be > 0 seconds or None")
        self.a, self.b = a, b
        self.close = close
        self.idle_timeout = idle_timeout
        self.started = time.monotonic()
        self.last = self.started
        self.ends: dict[str, End] = {}
        self.failed: str | None = None
        self.error: OSError | None = None
        self.saved = [(s, s.gettimeout(), _nodelay(s)) for s in (a, b)]
        use_splice = (
            _HAS_SPLICE
            and not force_copy
            and not isinstance(a, ssl.SSLSocket)
            and not isinstance(b, ssl.SSLSocket)
        )
        self.spliced = use_splice
        self.flows: list[_Flow] = []
        try:
            for s in (a, b):
                s.setblocking(False)
                # The relay forwards bytes as they come; holding a small segment
                # back (Nagle) would add a 40-200 ms stall per request/response.
                if s.family in (socket.AF_INET, socket.AF_INET6):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            size = pipe_size or _DEFAULT_PIPE
            self.flows.append(_Flow("a", a, b, use_splice, size))
            self.flows.append(_Flow("b", b, a, use_splice, size))
        except BaseException:
            self.finish()
            raise

    # -------------------------------------------------------------- moving bytes

    def pump(self, flow: _Flow) -> None:
        """Move what can move now in one direction without blocking."""
        # Each try costs a syscall. A short read means the socket had no more bytes,
        # and a short write means the destination is full: trying again at once
        # would only return EAGAIN, so wait for poll instead (it is level-triggered,
        # nothing is missed). TLS sockets may hold decrypted bytes poll cannot see,
        # so they keep reading until EAGAIN.
        can_read = can_write = True
        progress = True
        while progress:
            progress = False
            if can_read and flow.wants_read:
                room = flow.cap - flow.pending
                n = self._read(flow)
                progress = n > 0
                can_read = n >= room or (n > 0 and flow.tls)
            if can_write and flow.pending:
                before = flow.pending
                n = self._write(flow)
                progress = progress or n > 0
                can_write = n >= before
                if n > 0:
                    can_read = True  # the pipe has room again
        if flow.eof and not flow.pending and not flow.shut:
            flow.shut = True
            self.ends.setdefault(flow.name, End.EOF)
            try:
                # Every byte before the EOF was delivered (pending == 0): half-close.
                _half_close(flow.dst)
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    raise _Failure(_other(flow.name), End.RESET, exc) from None

    def _read(self, flow: _Flow) -> int:
        try:
            if flow.splice:
                n = os.splice(
                    flow.src_fd, flow.pipe_w, flow.cap - flow.pending, flags=_SPLICE_FLAGS
                )
            else:
                end = flow.start + flow.pending
                if end == flow.cap:  # compact: the buffer is reused, never grown
                    flow.view[: flow.pending] = flow.view[flow.start : end]
                    flow.start, end = 0, flow.pending
                n = flow.src.recv_into(flow.view[end:])
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            if flow.pending and flow.splice:
                flow.blocked = True
            return 0
        except OSError as exc:
            self._io_error(flow, exc, flow.name)
            return flow.cap  # retry at once on the copy path
        if n == 0:
            flow.eof = True
            return 0
        flow.pending += n
        self.last = time.monotonic()
        return n

    def _io_error(self, flow: _Flow, exc: OSError, side: str) -> None:
        """EINVAL from splice: switch *flow* to copying (returns). Anything else: *side* failed."""
        if exc.errno == errno.EINVAL and flow.splice:
            # A socket the kernel cannot splice (seen with some socket types): keep
            # the bytes already in the pipe and carry on through the copy path.
            flow.to_copy()
            self.spliced = False
            return
        end_kind = End.RESET if exc.errno in _RESET_ERRNOS else End.ERROR
        raise _Failure(side, end_kind, exc) from None

    def _write(self, flow: _Flow) -> int:
        try:
            if flow.splice:
                n = os.splice(flow.pipe_r, flow.dst_fd, flow.pending, flags=_SPLICE_FLAGS)
            else:
                n = flow.dst.send(flow.view[flow.start : flow.start + flow.pending])
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return 0
        except OSError as exc:
            self._io_error(flow, exc, _other(flow.name))
            return flow.pending  # retry at once on the copy path
        flow.pending -= n
        flow.moved += n
        flow.blocked = False
        if not flow.splice:
            flow.start = 0 if not flow.pending else flow.start + n
        self.last = time.monotonic()
        return n

    def step(self, fd: int, readable: bool, writable: bool) -> None:
        """React to readiness of *fd*: pump the directions that touch it."""
        for flow in self.flows:
            if flow.shut:
                continue
            if (readable and flow.src_fd == fd) or (writable and flow.dst_fd == fd):
                self.pump(flow)

    def interest(self) -> dict[int, int]:
        """fd -> poll mask the relay waits for now."""
        masks: dict[int, int] = {self.flows[0].src_fd: 0, self.flows[1].src_fd: 0}
        for flow in self.flows:
            if flow.wants_read:
                masks[flow.src_fd] |= _POLLIN
            if flow.wants_write:
                masks[flow.dst_fd] |= _POLLOUT
        return masks

    @property
    def done(self) -> bool:
        return all(f.done for f in self.flows)

    def idle_left(self) -> float | None:
        if self.idle_timeout is None:
            return None
        return self.last + self.idle_timeout - time.monotonic()

    # -------------------------------------------------------------- ending

    def fail(self, failure: _Failure) -> None:
        self.failed, self.error = failure.side, failure.error
        self.ends[failure.side] = failure.end
        self.ends.setdefault(_other(failure.side), End.ABORTED)
        self._abort(self.b if failure.side == "a" else self.a)

    def timeout(self) -> None:
        for name in ("a", "b"):
            self.ends.setdefault(name, End.TIMEOUT)
        for s in (self.a, self.b):
            self._abort(s)

    def _abort(self, sock: socket.socket) -> None:
        # Never leave the survivor hanging: with close=True reset it (SO_LINGER 0 makes
        # close() send RST); a caller-owned socket gets a shutdown, so its peer sees EOF.
        try:
            if self.close:
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            else:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def finish(self) -> RelayStats:
        for flow in self.flows:
            flow.close_pipe()
        for sock, timeout, nodelay in self.saved:
            if self.close:
                sock.close()
            elif sock.fileno() != -1:
                try:
                    sock.settimeout(timeout)
                    if sock.family in (socket.AF_INET, socket.AF_INET6):
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))
                except OSError:
                    pass
        moved = [f.moved for f in self.flows] + [0, 0]  # flows may be missing if init failed
        return RelayStats(
            a_to_b=moved[0],
            b_to_a=moved[1],
            a_end=self.ends.get("a", End.ABORTED),
            b_end=self.ends.get("b", End.ABORTED),
            failed=self.failed,
            error=self.error,
            spliced=self.spliced,
            duration=time.monotonic() - self.started,
        )


def _half_close(sock: socket.socket) -> None:
    sslobj = getattr(sock, "_sslobj", None)
    if isinstance(sock, ssl.SSLSocket) and sslobj is not None:
        # A bare FIN under TLS is an "unexpected EOF": OpenSSL 3 answers it with a
        # decode_error alert and the peer's next read fails. Send close_notify
        # instead (SSL_shutdown once); the TLS state stays usable for reading.
        try:
            sslobj.shutdown()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass  # close_notify is out; the peer's own close_notify comes later
        except ssl.SSLError:
            pass
        return
    socket.socket.shutdown(sock, socket.SHUT_WR)


def _other(name: str) -> str:
    return "b" if name == "a" else "a"


def _nodelay(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    except OSError:
        return False


def _check_pair(a: object, b: object) -> None:
    for name, sock in (("a", a), ("b", b)):
        if not isinstance(sock, socket.socket):
            raise WrongSocketType(f"relay side {name}", "a socket.socket", type(sock).__name__)
        if sock.fileno() == -1:
            raise SocketClosed(sock, f"relay side {name}")
        if sock.type != socket.SOCK_STREAM:
            raise WrongSocketType(f"relay side {name}", "a SOCK_STREAM socket", str(sock.type))
    assert isinstance(a, socket.socket) and isinstance(b, socket.socket)
    if a is b or a.fileno() == b.fileno():
        raise InvalidArgument("b", b, "is the same socket as a")


def pipe_splice(
    a: socket.socket,
    b: socket.socket,
    *,
    pipe_size: int | None = None,
    idle_timeout: float | None = None,
    close: bool = True,
) -> RelayStats:
    """Relay bytes both ways between *a* and *b* in the calling thread until both are done.

    Each direction moves socket -> pipe -> socket with splice(2) (zero copy), or
    through a reused buffer where splice cannot work (TLS sockets, non-Linux, EINVAL).
    When one side sends EOF, the other gets ``shutdown(SHUT_WR)`` after every byte
    before the EOF was delivered, and the other direction keeps flowing. A reset or
    error on one side ends the relay at once: the other side is reset (``close=True``)
    or shut down (``close=False``). Both sockets get ``TCP_NODELAY`` while relaying.

    :param a: a connected stream socket (e.g. the client).
    :param b: a connected stream socket (e.g. the backend).
    :param pipe_size: bytes per direction's pipe (default 1 MiB, capped by
        ``/proc/sys/fs/pipe-max-size``); also bounds memory per direction.
    :param idle_timeout: end with :attr:`End.TIMEOUT` after this many seconds without
        a byte moving either way.
    :param close: close both sockets at the end (default). With False they are left
        open, restored to their blocking mode and TCP_NODELAY setting.
    :returns: :class:`RelayStats`.
    :raises WrongSocketType: a side is not a stream socket.
    :raises SocketClosed: a side is closed.
    :raises InvalidArgument: *a* and *b* are the same socket, or a bad option.
    """
    relay = _Relay(a, b, pipe_size=pipe_size, idle_timeout=idle_timeout, close=close)
    return _run_blocking(relay)


def _run_blocking(relay: _Relay) -> RelayStats:
    poller = select.poll()
    registered: dict[int, int] = {}
    # fds that reported POLLHUP while the relay wanted nothing from them. poll reports
    # POLLHUP/POLLERR even for an empty mask, and HUP stays set (both directions shut,
    # e.g. the peer's FIN after our half-close) while the pipe is full and the relay
    # waits for the other side: polling such an fd would spin. It is left out until
    # the relay wants to read or write it again.
    muted: set[int] = set()
    try:
        for flow in relay.flows:
            relay.pump(flow)
        while not relay.done:
            masks = relay.interest()
            for fd, mask in masks.items():
                if not mask and fd in muted:
                    if fd in registered:
                        poller.unregister(fd)
                        del registered[fd]
                    continue
                muted.discard(fd)
                if registered.get(fd) != mask:
                    if fd in registered:
                        poller.modify(fd, mask)
                    else:
                        poller.register(fd, mask)
                    registered[fd] = mask
            left = relay.idle_left()
            if left is not None and left <= 0:
                relay.timeout()
                break
            events = poller.poll(None if left is None else max(1, int(left * 1000) + 1))
            for fd, ev in events:
                if ev & _POLLERR:
                    # A pending socket error (a reset) is reported here even when the
                    # relay is not reading that side (its pipe is full): end now, not
                    # at the idle timeout, and do not spin on the sticky POLLERR.
                    _raise_pending_error(relay, fd)
                # POLLHUP/POLLERR wake both ways: the next read/write reports what happened.
                hup = bool(ev & ~(_POLLIN | _POLLOUT))
                if hup and not registered.get(fd):
                    muted.add(fd)
                relay.step(fd, bool(ev & _POLLIN) or hup, bool(ev & _POLLOUT) or hup)
    except _Failure as failure:
        relay.fail(failure)
    finally:
        for fd in registered:
            with contextlib.suppress(KeyError, ValueError):
                poller.unregister(fd)
    return relay.finish()


def _raise_pending_error(relay: _Relay, fd: int) -> None:
    for name, sock in (("a", relay.a), ("b", relay.b)):
        if sock.fileno() == fd:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                end_kind = End.RESET if err in _RESET_ERRNOS else End.ERROR
                raise _Failure(name, end_kind, OSError(err, os.strerror(err)))
            return


async def async_pipe_splice(
    a: socket.socket,
    b: socket.socket,
    *,
    pipe_size: int | None = None,
    idle_timeout: float | None = None,
    close: bool = True,
) -> RelayStats:
    """:func:`pipe_splice` on the caller's running asyncio loop (default loop or uvloop).

    The relay waits with ``loop.add_reader``/``add_writer`` on the two sockets, so one
    thread drives thousands of relays; no thread is started. Cancelling the task
    ends the relay, closes its pipes (and the sockets, with ``close=True``) and
    re-raises :class:`asyncio.CancelledError`.

    :param a: a connected stream socket.
    :param b: a connected stream socket.
    :param pipe_size: as for :func:`pipe_splice`.
    :param idle_timeout: as for :func:`pipe_splice`.
    :param close: as for :func:`pipe_splice`.
    :returns: :class:`RelayStats`.
    :raises WrongSocketType: a side is not a stream socket.
    :raises SocketClosed: a side is closed.
    :raises InvalidArgument: *a* and *b* are the same socket, or a bad option.
    """
    asyncio.get_running_loop()  # RuntimeError before touching the sockets
    relay = _Relay(a, b, pipe_size=pipe_size, idle_timeout=idle_timeout, close=close)
    return await _run_async(relay)


async def _run_async(relay: _Relay) -> RelayStats:
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    readers: set[int] = set()
    writers: set[int] = set()
    timer: asyncio.TimerHandle | None = None

    def settle() -> None:
        # Each fd is the source of one direction and the destination of the other,
        # so a reader on fd X always serves the flow reading X, a writer the flow
        # writing X; callbacks get their flow and need no lookup.
        if finished.done():
            return
        if relay.done:
            finished.set_result(None)
            return
        for flow in relay.flows:
            src, dst = flow.src_fd, flow.dst_fd
            if flow.wants_read and not flow.shut:
                if src not in readers:
                    loop.add_reader(src, on_ready, flow)
                    readers.add(src)
            elif src in readers:
                loop.remove_reader(src)
                readers.discard(src)
            if flow.pending:
                if dst not in writers:
                    loop.add_writer(dst, on_ready, flow)
                    writers.add(dst)
            elif dst in writers:
                loop.remove_writer(dst)
                writers.discard(dst)

    def on_ready(flow: _Flow) -> None:
        # The common case (a message read and written in full) leaves the flow
        # wanting exactly what it wanted before: nothing to re-register.
        before = (flow.wants_read, flow.pending > 0)
        try:
            if not flow.shut:
                relay.pump(flow)
        except _Failure as failure:
            relay.fail(failure)
            if not finished.done():
                finished.set_result(None)
            return
        if flow.shut or (flow.wants_read, flow.pending > 0) != before:
            settle()

    def on_timer() -> None:
        nonlocal timer
        left = relay.idle_left()
        assert left is not None
        if left <= 0:
            relay.timeout()
            if not finished.done():
                finished.set_result(None)
        else:
            timer = loop.call_later(left, on_timer)

    try:
        try:
            for flow in relay.flows:
                relay.pump(flow)
        except _Failure as failure:
            relay.fail(failure)
            finished.set_result(None)
        if relay.idle_timeout is not None:
            timer = loop.call_later(relay.idle_timeout, on_timer)
        settle()
        await finished
    finally:
        if timer is not None:
            timer.cancel()
        for fd in readers:
            loop.remove_reader(fd)
        for fd in writers:
            loop.remove_writer(fd)
        stats = relay.finish()
    return stats
