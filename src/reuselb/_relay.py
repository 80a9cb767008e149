"""The relay: move bytes both ways between two stream sockets until both are done.

Rules of this module:

* one state machine (:class:`_Relay`) does all the work on non-blocking sockets; the
  blocking driver (:func:`pipe_splice`) waits with ``poll`` in the caller's thread,
  the asyncio driver (:func:`async_pipe_splice`) through one epoll instance per
  event loop (:class:`_Hub`). No helper thread, ever;
* zero copy for streams: socket -> pipe -> socket with ``splice(2)``; short messages
  are copied through a per-thread scratch buffer (cheaper than two splices), and
  TLS sockets, non-Linux and ``EINVAL`` at run time use a copy buffer per direction,
  with the same semantics;
* no byte is lost or reordered: bytes sitting in a direction's pipe or buffer belong
  to that connection and are delivered before its half-close;
* every pipe is created close-on-exec; when the relay ends it is closed, or kept for
  the thread's next relay only when it is empty; caller-owned sockets
  (``close=False``) are never closed, only restored.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import enum
import errno
import fcntl
import itertools
import math
import os
import select
import socket
import ssl
import stat
import sys
import termios
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from ._errors import InvalidArgument, SocketClosed, WrongSocketType
from ._sockets import check_flag

__all__ = [
    "End",
    "Fallback",
    "RelayStats",
    "SocketLike",
    "async_pipe_splice",
    "pipe_splice",
    "release_pipes",
    "start_pipe_splice",
]

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
#: A relay side: a socket, or a socket-like object (see :class:`SocketLike`).
Side: TypeAlias = "socket.socket | SocketLike"
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})
# struct linger {l_onoff=1, l_linger=0}: close() then sends RST instead of FIN.
_LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"
_POLLIN = select.POLLIN if hasattr(select, "POLLIN") else 1
_POLLOUT = select.POLLOUT if hasattr(select, "POLLOUT") else 4
_POLLERR = select.POLLERR if hasattr(select, "POLLERR") else 8
# TCP urgent data pending (see _Flow): asked for with POLLIN, never alone.
_POLLPRI = select.POLLPRI if hasattr(select, "POLLPRI") else 2
_POLLIN_PRI = _POLLIN | _POLLPRI
# poll(2) takes its timeout as a C int of milliseconds, and CPython raises
# OverflowError past INT_MAX (~24.8 days): longer waits are made of several polls.
_POLL_MAX_MS = 2**31 - 1


class SocketLike(Protocol):
    """What the relay needs from a side that is not a plain ``socket.socket``.

    A socket wrapper (instrumented, PROXY-protocol, TLS by another library...) can be
    relayed if it has these methods with socket semantics, is non-blocking (or says
    by ``gettimeout()`` that it is not, and has ``setblocking()`` to make it so: a
    wrapper without ``gettimeout()`` is taken to be non-blocking), and its
    ``fileno()`` polls readable when
    ``recv_into`` may return bytes. Such sides are always copied, never spliced:
    the bytes must pass through the object's own methods.

    ``close()`` of a side whose asyncio loop was closed without shutting it down is
    called by the next relay start, under a process-wide lock that starts in other
    threads then wait for: it must not wait for another thread that may be starting
    a relay (see "When the loop shuts down" in docs/relay.md).
    """

    def fileno(self) -> int: ...

    def recv_into(self, buffer: memoryview, /) -> int: ...

    def send(self, data: memoryview | bytes, /) -> int: ...

    def shutdown(self, how: int, /) -> None: ...

    def close(self) -> None: ...


class End(str, enum.Enum):
    """How one side of a relay ended (what the relay saw *reading* from it)."""

    #: the side sent EOF (FIN) after its last byte; forwarded as a half-close
    EOF = "eof"
    #: the side's connection was reset or broken: ECONNRESET, EPIPE, ECONNABORTED, or
    #: ETIMEDOUT (retransmissions, keepalive probes or TCP_USER_TIMEOUT gave up)
    RESET = "reset"
    #: no byte moved either way for ``idle_timeout`` seconds
    TIMEOUT = "timeout"
    #: another socket error; see :attr:`RelayStats.error`
    ERROR = "error"
    #: the relay ended it because the other side failed
    ABORTED = "aborted"


class Fallback(str, enum.Enum):
    """Why a relay moved bytes through the copy path instead of splice(2)
    (:attr:`RelayStats.fallback`).

    The first three are decided when the relay starts and hold for both directions;
    the last two happen to one direction while it runs, when it first tries splice.
    """

    #: no splice here: not Linux, or a Python without ``os.splice``
    UNSUPPORTED = "unsupported"
    #: a side is an ``ssl.SSLSocket``: its bytes exist in clear only in user space
    TLS = "tls"
    #: a side is not a kernel socket (a :class:`SocketLike` wrapper, or a
    #: ``socket.socket`` subclass overriding ``recv_into``/``send``): its bytes must
    #: pass through its own methods
    WRAPPER = "wrapper"
    #: splice(2) failed with ``EINVAL`` at run time: that direction copies from then
    #: on (the bytes already in its pipe are carried over)
    EINVAL = "einval"
    #: no pipe could be had (``EMFILE``, ``ENFILE``...) when a direction was to start
    #: splicing: that direction copies from then on
    NO_PIPE = "no-pipe"


@dataclass(frozen=True)
class RelayStats:
    """What a relay did.

    :ivar a_to_b: bytes delivered from *a* to *b*.
    :ivar b_to_a: bytes delivered from *b* to *a*.
    :ivar a_end: how side *a* ended.
    :ivar b_end: how side *b* ended.
    :ivar failed: ``"a"``, ``"b"`` or None: which side failed first (reset/error).
        A side that sent its EOF (delivered) before it failed keeps ``End.EOF``.
    :ivar error: that side's exception, if any.
    :ivar spliced: True when splice(2) moved bytes. A direction starts by copying
        through a small per-thread buffer (cheaper than splice for short messages)
        and switches to splice at the first read of a full 64 KiB; TLS sockets,
        non-Linux systems and splice's EINVAL keep it on the copy path
        (``fallback`` says which).
    :ivar spliced_bytes: how many of the bytes delivered (both ways) went through
        splice(2), zero copy.
    :ivar duration: seconds from start to end.
    :ivar fallback: why splice(2) was kept off, or None when it never was. A
        start-time reason (:attr:`Fallback.UNSUPPORTED`, :attr:`Fallback.TLS`,
        :attr:`Fallback.WRAPPER`, the first that applies in that order) covers both
        directions and is set even if no byte moved. Otherwise it is the first
        run-time fallback of either direction (:attr:`Fallback.EINVAL`,
        :attr:`Fallback.NO_PIPE`), which says nothing about the other direction
        (it may have spliced: see ``spliced_bytes``). Copying short messages before
        a direction's first full 64 KiB read is not a fallback: a relay of short
        messages only reports ``spliced`` False and ``fallback`` None. Last, with
        a default, so that positional constructions of the first nine fields keep
        working.
    """

    a_to_b: int
    b_to_a: int
    a_end: End
    b_end: End
    failed: str | None
    error: OSError | None
    spliced: bool
    duration: float
    spliced_bytes: int
    fallback: Fallback | None = None


def _pipe_capacity_limit() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _DEFAULT_PIPE


_PIPE_MAX = _pipe_capacity_limit() if _HAS_SPLICE else _DEFAULT_PIPE

# ------------------------------------------------------------------ the pipe pool
#
# Creating and sizing a pipe costs three syscalls (pipe2, F_SETPIPE_SZ, F_GETPIPE_SZ)
# and closing it two more: ~8 us per pipe here, 17 us per relay, more than the relay
# itself spends on a short HTTP exchange. Empty pipes are therefore kept per thread
# (a relay runs in one thread) and reused. A pipe goes back only when the relay's
# own count *and* FIONREAD say it is empty: bytes of one connection must never leak
# into another. Pools are closed with their thread, by release_pipes(), and in a
# forked child (which must not share a pipe with its parent).

# Idle pipes kept per thread (32 fds at most). Each 1 MiB pipe counts 256 pages against
# fs.pipe-user-pages-soft (16,384 per unprivileged user by default), so the pool
# stays small enough not to starve the next relays of full-size pipes.
_POOL_MAX = 16
_FIONREAD = getattr(termios, "FIONREAD", 0x541B)
_ZERO_INT = bytes(4)


# Held while a relay's fd is made, pooled or closed together with whatever names it
# (a flow's pipe_r/pipe_w, the pool, a blocking relay's edge_ep), and taken by
# os.fork() before it forks (at-fork hooks), so a child never holds such an fd
# unnamed, where the at-fork cleanups below cannot find it: a fork waits those
# microseconds. An RLock: a signal handler of the relay's own thread (the main
# thread) that forks inside the gate must not wait for itself (its child may then
# keep the fd).
_FORK_GATE = threading.RLock()


def _gate_before_fork() -> None:
    _FORK_GATE.acquire()


def _gate_after_fork_in_parent() -> None:
    # Not held if a signal handler raised while the hook waited for it (CPython
    # reports that and forks anyway).
    with contextlib.suppress(RuntimeError):
        _FORK_GATE.release()


def _gate_after_fork_in_child() -> None:
    # A new gate: the parent's may be held there by a thread the child does not
    # have (when the hook's wait was interrupted), and every use of it, from the
    # pools' cleanup below on, waited for ever.
    global _FORK_GATE  # noqa: PLW0603 (a new lock, not the parent's copy)
    _FORK_GATE = threading.RLock()


if hasattr(os, "register_at_fork"):
    # Before the other hooks of this module: the child's ones run in this order,
    # and the pools' cleanup takes the gate.
    os.register_at_fork(
        before=_gate_before_fork,
        after_in_parent=_gate_after_fork_in_parent,
        after_in_child=_gate_after_fork_in_child,
    )


class _Idle:
    """One thread's idle pipes; closes them when the thread's locals go away."""

    __slots__ = ("__weakref__", "pipes")

    def __init__(self) -> None:
        self.pipes: list[tuple[int, int, int, int]] = []  # (read, write, capacity, asked)
        _ALL_POOLS.add(self)

    def close(self) -> int:
        if not self.pipes:
            return 0  # most pools, e.g. of threads that made no stream relay
        # Under _FORK_GATE (see above): a child forked while these closes ran
        # (without the GIL, the pipes already out of the list) kept the rest.
        with _FORK_GATE:
            pipes, self.pipes = self.pipes, []
            for r, w, _cap, _asked in pipes:
                os.close(r)
                os.close(w)
        return len(pipes)

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter exit this may run after the module's
        # globals were cleared (the gate was None: "Exception ignored in
        # _Idle.__del__" at the end of a CI run); the process's fds close with it.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass


_ALL_POOLS: weakref.WeakSet[_Idle] = weakref.WeakSet()
_local = threading.local()


def _pool() -> _Idle:
    try:
        return _local.idle  # type: ignore[no-any-return]
    except AttributeError:
        _local.idle = idle = _Idle()
        return idle


def _forget_pools_in_child() -> None:
    # A forked child inherits every thread's pool: the same pipes as its parent.
    for idle in list(_ALL_POOLS):
        with contextlib.suppress(OSError):
            idle.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)


def _take_pipe(size: int) -> tuple[int, int, int]:
    pipes = _pool().pipes
    for i in range(len(pipes) - 1, -1, -1):
        r, w, cap, asked = pipes[i]
        if asked == size:
            del pipes[i]
            return r, w, cap
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        # EPERM past fs.pipe-user-pages-soft for unprivileged users: keep the
        # default size rather than fail the relay.
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, _F_SETPIPE_SZ, min(size, _PIPE_MAX))
        cap = fcntl.fcntl(w, _F_GETPIPE_SZ)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    return r, w, cap


def _give_pipe(r: int, w: int, cap: int, size: int) -> None:
    pipes = _pool().pipes
    try:
        empty = len(pipes) < _POOL_MAX and fcntl.ioctl(r, _FIONREAD, _ZERO_INT) == _ZERO_INT
    except OSError:
        empty = False
    if empty:
        pipes.append((r, w, cap, size))
    else:
        os.close(r)
        os.close(w)


def release_pipes() -> int:
    """Close the idle pipes the calling thread keeps for reuse by later relays.

    Relays in one thread reuse empty pipes (at most 16 idle per thread); they are
    closed when the thread exits and in a forked child. Call this where every fd
    counts, e.g. before checking for leaks or before a long idle period.

    :returns: how many pipes were closed.
    :raises OSError: closing failed (should not happen).
    """
    return _pool().close()


_SPLICE, _COPY, _SMALL = 0, 1, 2
_NO_BUFFER = bytearray()
_NO_VIEW = memoryview(_NO_BUFFER)


def _scratch() -> memoryview:
    try:
        return _local.scratch  # type: ignore[no-any-return]
    except AttributeError:
        _local.scratch = view = memoryview(bytearray(_COPY_BUFFER))
        return view


class _Flow:
    """One direction, src -> dst.

    Modes: ``_SMALL`` (the start when splice is possible): recv_into a per-thread
    scratch buffer and send at once. For short messages this is cheaper than two
    splices through a pipe (measured here: 7.7 us against 8.5 us per 100-byte
    message, 9.1 against 10.8 at 16 kB, splice ahead only from ~60 kB) and needs no
    pipe at all, which is what connection churn pays for. A read that fills the
    whole 64 KiB scratch means a stream: the flow switches to ``_SPLICE`` for good
    (HAProxy's ``splice-auto`` makes the same bet). ``_COPY``: a private buffer,
    for TLS (decrypted bytes exist only in user space), non-Linux, and after
    splice said EINVAL.

    TCP urgent data (``MSG_OOB``): splice (tcp_read_sock) stops at the urgent mark
    and, at the mark, returns EAGAIN (or 0 once the FIN is in) for as long as the
    mark is not passed; recv stops just before the mark and passes it at the next
    call (dropping the urgent byte, or delivering it with ``SO_OOBINLINE``). So a
    source's EPOLLPRI/POLLPRI sets ``urgent``: reads go on past a short read until
    EAGAIN, and a splice that stops at the mark with the pipe empty switches the
    flow back to ``_SMALL`` (bytes still in the pipe go out first), whose recv
    passes the mark; the next full read brings it back to splice.
    """

    __slots__ = (
        "asked",
        "blocked",
        "buf",
        "buffered",
        "bursty",
        "can_splice",
        "cap",
        "deferred",
        "dst",
        "dst_fd",
        "eof",
        "held",
        "left",
        "mode",
        "moved",
        "name",
        "pending",
        "pipe_r",
        "pipe_w",
        "queued",
        "queued_moved",
        "read_needs_write",
        "shut",
        "spliced",
        "src",
        "src_fd",
        "start",
        "upgrade",
        "urgent",
        "view",
        "write_needs_read",
    )

    def __init__(
        self, name: str, src: Side, dst: Side, use_splice: bool, pipe_size: int, *, bursty: bool
    ) -> None:
        self.name = name
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        # *bursty*: a read of src may stop short with more waiting. TLS sockets and
        # other wrappers may hold bytes poll cannot see, and an AF_UNIX read stops
        # after a message carrying fds (SCM_RIGHTS) or before an MSG_OOB byte. Such
        # sources are read until EAGAIN (`buffered`), and so is a TCP source while
        # urgent data is pending (`urgent`, see above).
        self.bursty = self.buffered = bursty
        self.urgent = False
        self.moved = 0
        self.spliced = 0  # of which through splice(2)
        self.pending = 0  # bytes read from src, not yet written to dst
        self.eof = False
        self.shut = False
        # TLS destinations (see _Relay._close_notify): this flow's close_notify waits
        # until the relay has read what dst sent (`deferred`), or OpenSSL holds it
        # back because dst's send buffer was full (`held`). Any destination: the
        # FIN waits for dst's non-blocking connect to complete (`held`, see
        # _Relay._connected). While `held` the flow is not shut, and the drivers
        # wait for dst to be writable to retry. Per flow: with TLS on both sides,
        # both directions can wait at once.
        self.deferred = False
        self.held = False
        # TLS: OpenSSL must read before it can write (`write_needs_read`: dst's
        # handshake is unfinished, a renegotiation) or write before it can read
        # (`read_needs_write`: a handshake record that src's send buffer had no room
        # for). The poll-based drivers then wait for the other readiness of that fd
        # (see _Relay._write): waiting for the usual one spins on a level-triggered
        # poll, or never ends.
        self.write_needs_read = self.read_needs_write = False
        # idle_timeout: dst's send queue (SIOCOUTQ) when this flow's write last
        # stalled, and `moved` then (the value is of that stall only while no write
        # of this flow succeeded since). See _Relay.note_queue.
        self.queued = self.queued_moved = -1
        # The pipe looked full: splice-in returned EAGAIN with bytes pending. Slots are
        # pages and partly-filled slots count as used, so EAGAIN can come long before
        # `pending == cap` (sozu-proxy#1323); wait for the write side, not for src.
        self.blocked = False
        self.pipe_r = self.pipe_w = -1
        self.buf = _NO_BUFFER  # a private buffer only on the copy path
        self.view = _NO_VIEW
        self.left = b""  # _SMALL: what dst did not take yet
        self.upgrade = False  # _SMALL: switch to splice once `left` is out
        self.start = 0
        self.asked = pipe_size
        self.can_splice = use_splice
        if use_splice:
            self.mode = _SMALL
            self.cap = _COPY_BUFFER
        else:
            self.mode = _COPY
            self._to_copy()

    def _to_copy(self) -> None:
        self.buf = bytearray(max(_COPY_BUFFER, self.pending))
        self.view = memoryview(self.buf)
        self.cap = len(self.buf)

    def room(self) -> int:
        """How many bytes the next read asks for (compacting the copy buffer first
        when its tail is used up: the buffer is reused, never grown)."""
        if self.mode == _SPLICE:
            return self.cap - self.pending
        end = self.start + self.pending
        if end == self.cap:
            self.view[: self.pending] = self.view[self.start : end]
            self.start, end = 0, self.pending
        return self.cap - end

    def to_splice(self) -> bool:
        """_SMALL -> _SPLICE (nothing pending). False if no pipe could be had."""
        try:
            # Under _FORK_GATE, which os.fork() takes first: from pipe2() (which
            # runs without the GIL) or the pool until pipe_r/pipe_w name it, a
            # child forked by another thread would keep the pipe unnamed by either,
            # so neither of its at-fork cleanups would close it.
            with _FORK_GATE:
                self.pipe_r, self.pipe_w, self.cap = _take_pipe(self.asked)
        except OSError:
            self.can_splice = False  # EMFILE and the like: carry on copying
            return False
        self.mode = _SPLICE
        return True

    def set_urgent(self) -> None:
        """src reported urgent data (POLLPRI): see the class docstring."""
        self.urgent = self.buffered = True

    def clear_urgent(self) -> None:
        """src was read until EAGAIN: its urgent mark, if any, is passed."""
        self.urgent = False
        self.buffered = self.bursty

    def to_small(self) -> None:
        """_SPLICE -> _SMALL at an urgent mark, the pipe empty: recv passes the mark."""
        self.close_pipe()  # empty: back to the pool, for the next full read
        self.mode = _SMALL
        self.cap = _COPY_BUFFER
        self.blocked = self.upgrade = False
        self.set_urgent()

    def to_copy(self) -> None:
        """Switch to the copy path (splice said EINVAL), keeping pending bytes."""
        data = b""
        while len(data) < self.pending:
            chunk = os.read(self.pipe_r, self.pending - len(data))
            if not chunk:
                break
            data += chunk
        self.close_pipe()
        self.mode = _COPY
        self.can_splice = False
        self._to_copy()
        self.view[: len(data)] = data
        self.start = 0
        self.pending = len(data)

    def close_pipe(self) -> None:
        if self.pipe_r < 0:
            return
        # Under _FORK_GATE (see to_splice): between pipe_r/pipe_w letting go of the
        # pipe and the pool taking it (or close(), which runs without the GIL),
        # nothing named it, and a child forked meanwhile kept it.
        with _FORK_GATE:
            r, w = self.pipe_r, self.pipe_w
            self.pipe_r = self.pipe_w = -1
            if self.pending == 0:
                _give_pipe(r, w, self.cap, self.asked)
            else:
                os.close(r)
                os.close(w)

    @property
    def wants_read(self) -> bool:
        if self.eof or self.blocked:
            return False
        return self.pending == 0 if self.mode == _SMALL else self.pending < self.cap

    @property
    def wants_write(self) -> bool:
        return self.pending > 0

    @property
    def done(self) -> bool:
        return self.shut


def _settable(exc: Exception) -> Exception:
    """*exc*, or a RuntimeError from it if it is a StopIteration.

    ``Future.set_exception(StopIteration())`` raises TypeError (asyncio refuses it:
    it would end a generator awaiting the future), which left a relay whose
    SocketLike raised StopIteration ended but its future never done. A coroutine
    turns a StopIteration raised inside it into RuntimeError (PEP 479); so does
    this, with the original chained as ``__cause__``.
    """
    if isinstance(exc, StopIteration):
        wrapped = RuntimeError(f"a relayed socket raised StopIteration: {exc!r}")
        wrapped.__cause__ = exc
        return wrapped
    return exc


class _Failure(Exception):
    def __init__(self, side: str, end: End, error: OSError) -> None:
        self.side, self.end, self.error = side, end, error


class _Relay:
    """The state machine both drivers run."""

    # What finish() raised (a wrapper's close(), or the give-back of a close=False
    # side), to tell it from what a method of the running relay raised: the hub's
    # crash path reports each for what it is. A class default, set only then: no
    # cost in __init__, which every connection pays.
    finish_error: BaseException | None = None
    # How far finish() got with the steps that must not run twice (the aborts, each
    # side's close() or give-back): a finish() interrupted (a signal handler's
    # KeyboardInterrupt) before it recorded the stats is run again to end the relay
    # (see _Driven.finalize), and a wrapper's close() must not be called twice. A
    # class default, as above.
    finish_step = 0

    def __init__(
        self,
        a: Side,
        b: Side,
        *,
        pipe_size: int | None,
        idle_timeout: float | None,
        close: bool,
        force_copy: bool = False,
    ) -> None:
        # Each side's sockfs inode, or None (a wrapper): see _Hub.watch.
        inodes = _check_pair(a, b)
        if pipe_size is not None and (
            isinstance(pipe_size, bool) or not isinstance(pipe_size, int) or pipe_size < 4096
        ):
            raise InvalidArgument("pipe_size", pipe_size, "must be an int >= 4096 bytes")
        # close="no" must not mean True: the caller's sockets would be closed.
        close = check_flag("close", close)
        idle = _check_idle_timeout(idle_timeout)
        # What close=False must restore, and what a failed start restores: each
        # side's timeout and old TCP_NODELAY (True: on already, begin() leaves it
        # alone; False: begin() turns it on, restoring turns it off; None: not
        # read, begin() turns it on and nothing restores it).
        if close and a.__class__ is socket.socket and b.__class__ is socket.socket:
            # The common case, without the generic lookups (relays start thousands
            # of times a second under connection churn): plain sockets are kernel
            # sockets. With close=True, only a start that fails at b's TCP_NODELAY
            # gives back a side whose TCP_NODELAY changed: a, set first. Its old
            # value is read (one getsockopt, ~0.5 us); b's is not needed.
            fa = _raw_family(a)
            nodelay_a: bool | None = None
            if fa in _INET:
                try:  # noqa: SIM105 (contextlib.suppress costs ~0.5 us per call here)
                    nodelay_a = _raw_getsockopt(a, _IPPROTO_TCP, _TCP_NODELAY) != 0
                except OSError:
                    pass  # not TCP: begin() reports it
            saved: list[tuple[SocketLike, float | None, bool | None]] = [
                (a, a.gettimeout(), nodelay_a),
                (b, b.gettimeout(), None),
            ]
            kernel = (True, True)
            unix_a, unix_b = fa == _AF_UNIX, _raw_family(b) == _AF_UNIX
            unblocking = saved
        else:
            # b's TCP_NODELAY is read whatever close says: a wrapper's setblocking()
            # may fail after begin() set it.
            saved = [(a, _timeout(a), _nodelay(a)), (b, _timeout(b), _nodelay(b))]
            # A socket's own setblocking() cannot fail on an open fd; a wrapper's may.
            # Wrappers first, so that such a failure finds the other side untouched.
            unblocking = saved[::-1] if _own_setblocking(a) else saved
            kernel = (_is_kernel_socket(a), _is_kernel_socket(b))
            # (_raw_family: a kernel socket is a socket.socket.)
            unix_a = kernel[0] and _raw_family(a) == _AF_UNIX
            unix_b = kernel[1] and _raw_family(b) == _AF_UNIX
        self._build(
            a,
            b,
            inodes,
            close=close,
            idle_timeout=idle,
            pipe_size=pipe_size,
            saved=saved,
            unblocking=unblocking,
            kernel=kernel,
            unix_a=unix_a,
            unix_b=unix_b,
            force_copy=force_copy,
        )
        flow_b = self.flows[1]
        # The same close, of a socket.socket or of a wrapper whose fileno() reads -1
        # once closed: _Flow() kept fd -1, and the blocking form failed with a bare
        # OSError (EBADF from poll), the hub with ValueError from epoll.register(-1).
        # flow_b read each side's fd last (b's, then a's as its dst), and a closed
        # side stays closed: these two int tests see any close since _check_pair (a
        # close after them is one while the relay runs, which its fileno() checks
        # find). Side a first, as _check_pair names it.
        if flow_b.src_fd < 0 or flow_b.dst_fd < 0:
            self.abandon()  # as above (begin() has not run: nothing to give back yet)
            name, sock = ("a", a) if flow_b.dst_fd < 0 else ("b", b)
            raise SocketClosed(sock, f"relay side {name}")

    def _build(
        self,
        a: Side,
        b: Side,
        inodes: tuple[int | None, int | None],
        *,
        close: bool,
        idle_timeout: float | None,
        pipe_size: int | None,
        saved: list[tuple[SocketLike, float | None, bool | None]],
        unblocking: list[tuple[SocketLike, float | None, bool | None]],
        kernel: tuple[bool, bool],
        unix_a: bool,
        unix_b: bool,
        force_copy: bool,
    ) -> None:
        """Set up a checked pair's state (also :meth:`_Quick.promote`'s, which checked
        the pair itself)."""
        self.inodes = inodes
        self.a, self.b = a, b
        self.close = close
        self.idle_timeout = idle_timeout
        self.started = time.monotonic()
        self.last = self.started
        self.ends: dict[str, End] = {}
        self.failed: str | None = None
        self.error: OSError | None = None
        # How many flows have a deferred close_notify (_Flow.deferred): pump() looks
        # at the flows only when some do, one int test otherwise.
        self.deferring = 0
        # How many flows wait for the other readiness of a TLS side (_Flow.
        # write_needs_read, read_needs_write): pump() and step() look only when some do.
        self.crossing = 0
        # Bumped whenever a flow's `deferred`, `held`, `write_needs_read` or
        # `read_needs_write` changes: the fallback driver compares it around a pump
        # to know when to re-register.
        self.hold_changes = 0
        # Called when a flow's `held` is set, or cleared without the flow being shut
        # (a TLS retry deferred until the TLS side's bytes are read): changes the
        # epoll hub does not compare per event.
        self.on_notify: Callable[[], None] | None = None
        # The fd numbers of sides whose own shutdown() closed them after their EOF
        # was read (see _shut): no driver may watch them any more. Empty nearly
        # always, so that interest() and the drivers pay one truth test.
        self.gone: set[int] = set()
        # Called with such a number at once (the epoll hub lets go of it there).
        self.on_gone: Callable[[int], None] | None = None
        # abandon() ran: the relay never started and the caller has the sockets.
        self.abandoned = False
        # The blocking form's edge-triggered epoll while _drive_edge waits on it: a
        # forked child closes it (_end_relays_in_child).
        self.edge_ep: select.epoll | None = None
        # finish()'s result: the relay ends once, whoever ends it first.
        self.stats: RelayStats | None = None
        # TCP_NODELAY and the blocking mode are changed by begin(), once nothing
        # else can fail the start, so that a start refused before (a socket already
        # in a relay, no fd for the hub's epoll, a loop shutting down) touches
        # neither. Restoring a timeout is not an exact undo: settimeout() sets
        # O_NONBLOCK on the open file from the timeout alone, and a socket object
        # whose file is shared (detach() and re-wrapped, socket(fileno=...), a dup
        # or an fd received from another process) may have a timeout that disagrees
        # with the file's flag, which another relay or process relies on.
        self.nodelay_set = False
        # How many entries of `unblocking` had setblocking(False) called by begin():
        # only those are restored.
        self.unblocked = 0
        self.saved = saved
        self.unblocking = unblocking
        # A side that is not a kernel socket (an ssl.SSLSocket, a SocketLike) may
        # hold bytes its fd does not show: decrypted in OpenSSL, or in a wrapper's
        # own buffer. The epoll hub must read such a source once at the start
        # (_Driven.prime): EPOLL_CTL_ADD reports only what is in the kernel socket.
        self.opaque = not (kernel[0] and kernel[1])
        # force_copy (tests only): relay as where there is no splice.
        use_splice = _HAS_SPLICE and not force_copy and kernel[0] and kernel[1]
        # RelayStats.fallback: the start-time reason here, or the first run-time one.
        self.fallback: Fallback | None = None
        if not use_splice:
            if not _HAS_SPLICE or force_copy:
                self.fallback = Fallback.UNSUPPORTED
            elif isinstance(a, ssl.SSLSocket) or isinstance(b, ssl.SSLSocket):
                self.fallback = Fallback.TLS
            else:
                self.fallback = Fallback.WRAPPER
        self.flows: list[_Flow] = []
        try:
            size = pipe_size or _DEFAULT_PIPE
            # A read of such a source may stop short with more waiting: see _Flow.
            bursty_a = unix_a or not kernel[0]
            bursty_b = unix_b or not kernel[1]
            self.flows.append(_Flow("a", a, b, use_splice, size, bursty=bursty_a))
            flow_b = _Flow("b", b, a, use_splice, size, bursty=bursty_b)
            self.flows.append(flow_b)
        except BaseException as exc:
            self.abandon()
            if isinstance(exc, OSError):
                # Only the sides' fileno() raises OSError in _Flow(): a wrapper
                # closed since _check_pair (by its own gettimeout() or getsockopt()
                # above, or another thread). The same closed side as there.
                for name, sock in (("a", a), ("b", b)):
                    if _fileno(sock) < 0:
                        raise SocketClosed(sock, f"relay side {name}") from exc
            raise

    def begin(self) -> None:
        """Nothing else can fail the start: set TCP_NODELAY, then make the sides
        non-blocking (undone by :meth:`abandon` if this fails).

        The relay forwards bytes as they come; holding a small segment back (Nagle)
        would add a 40-200 ms stall per request/response. The drivers call this
        last, after the steps that may refuse the start, and before any I/O.
        """
        self.nodelay_set = True
        try:
            for s, _timeout, nodelay in self.saved:
                if nodelay is not True and _is_inet(s):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
            for s, timeout, _nd in self.unblocking:
                if timeout != 0.0:
                    # Counted first: a wrapper's setblocking() that raises may have
                    # changed something, and its settimeout() is its own undo.
                    self.unblocked += 1
                    s.setblocking(False)  # type: ignore[attr-defined]
        except BaseException:
            self.abandon()
            raise
        # Running from here until finish(): a forked child closes its pipes and, with
        # close=True, its copies of the sockets (see _end_relays_in_child).
        _RUNNING.add(self)

    def _give_back(self) -> None:
        """Restore what begin() changed: the timeouts of the sides it made
        non-blocking, and each TCP_NODELAY it turned on (read: not None)."""
        # Each side is given back whatever the other's wrapper raised (a socket
        # subclass's settimeout(), a signal handler): b must not be left
        # non-blocking because a's failed. The first exception goes on at the end.
        error: BaseException | None = None
        done = 0
        for sock, timeout, _nd in self.unblocking:
            if done == self.unblocked:
                break
            if timeout != 0.0:
                done += 1
                try:
                    if _fileno(sock) != -1:
                        _restore_timeout(sock, timeout)
                except BaseException as exc:
                    error = error or exc
        if self.nodelay_set:
            for sock, _timeout, nodelay in self.saved:
                try:
                    if nodelay is False and _fileno(sock) != -1 and _is_inet(sock):
                        with contextlib.suppress(OSError):
                            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)  # type: ignore[attr-defined]
                except BaseException as exc:
                    error = error or exc
        if error is not None:
            raise error

    def abandon(self) -> None:
        """The relay never ran: the caller keeps both sockets, as they were.

        Idempotent: begin() undoes itself and its caller's cleanup calls this too.
        """
        if self.abandoned:
            return
        self.abandoned = True
        _RUNNING.discard(self)
        for flow in self.flows:
            flow.close_pipe()
        # begin() sets a's TCP_NODELAY first: when b's fails, a's is restored
        # (whatever close says; b's, not read with close=True on the fast path, did
        # not change: nothing after it can fail there).
        self._give_back()

    def closed_behind(self, name: str) -> _Failure:
        """Side *name* was closed by someone else while the relay ran (or by its own
        ``shutdown()``, a subclass's or a :class:`SocketLike`'s: see :meth:`_shut`).

        The relay keeps each side's fd number (splice, poll and epoll take numbers),
        and after that close the number may already name an unrelated socket (the
        kernel hands out the lowest free fd): nothing may be done with it. That side
        fails with EBADF, as a recv on the closed socket object reports it.
        """
        exc = OSError(errno.EBADF, f"relay side {name} was closed while the relay ran")
        return _Failure(name, End.ERROR, exc)

    def failure(self, name: str, exc: OSError) -> _Failure:
        """Side *name* failed with *exc* (said the same way for a side closed behind
        the relay's back, whichever call met it).

        :raises OSError: *exc* itself when it cannot be the socket's: an
            :class:`OSError` without an errno met at a ``socket.socket`` side (a
            syscall always sets one) was raised by a signal handler, which Python
            runs as the call returns, inside the relay's ``except OSError``: a
            ``SIGALRM`` watchdog's ``TimeoutError`` was reported as that side's
            failure, not raised as a ``KeyboardInterrupt`` is (the caller ends the
            relay and lets it go on).
        """
        if exc.errno is None and isinstance(self.a if name == "a" else self.b, socket.socket):
            raise exc
        if exc.errno == errno.EBADF and self.lost(name):
            return self.closed_behind(name)
        if isinstance(exc, (ssl.SSLEOFError, ssl.SSLSyscallError)):
            # A TLS side's transport failed under OpenSSL: a reset reads as these
            # (see _tls_reset), and is one for End as for a plain side. Protocol
            # errors (a bad record, an alert) stay End.ERROR.
            return self._tls_failure(name, exc)
        return _Failure(name, _end_kind(exc), exc)

    def _tls_failure(self, name: str, exc: OSError) -> _Failure:
        """Side *name* (TLS) failed with *exc*, which may be its reset in disguise."""
        reset = _tls_reset(self.a if name == "a" else self.b)
        if reset is None:
            return _Failure(name, End.ERROR, exc)
        reset.__cause__ = exc
        return _Failure(name, _end_kind(reset), reset)

    def lost(self, name: str) -> bool:
        """Whether side *name* no longer owns the fd number the relay keeps for it."""
        flow = self.flows[0] if name == "a" else self.flows[1]
        return _fileno(flow.src) != flow.src_fd

    def let_go(self, fd: int) -> None:
        """A side whose reading is over closed itself (see :meth:`_shut`): stop
        watching its fd number *fd* in every driver, and never touch it again."""
        self.gone.add(fd)
        if self.on_gone is not None:
            self.on_gone(fd)

    # -------------------------------------------------------------- moving bytes

    def pump(self, flow: _Flow, drain: bool = False) -> None:
        """Move what can move now in one direction without blocking.

        *drain*: the source sent its FIN (EPOLLRDHUP), so read on past a short read:
        the EOF is found now, not one wakeup later.
        """
        if flow.mode == _SMALL:
            self._pump_small(flow, drain)
        if flow.mode != _SMALL:
            self._pump_buffered(flow, drain)
            while flow.mode == _SMALL:
                # Splice stopped at an urgent mark (Flow.to_small): recv passes it,
                # and a full read after it goes back to splice.
                self._pump_small(flow, drain)
                if flow.mode == _SMALL:
                    break
                self._pump_buffered(flow, drain)
        if flow.eof and not flow.pending and not flow.shut:
            self._shut(flow)
        if self.deferring:
            for other in self.flows:
                if other.deferred and other is not flow:
                    # The other direction moved (it reads the TLS side this
                    # half-close waits for): perhaps everything it sent is read now.
                    self._shut(other)
        if self.crossing:
            reverse = self.flows[0] if flow is self.flows[1] else self.flows[1]
            if reverse.write_needs_read or reverse.read_needs_write:
                # This flow read the TLS side *reverse* writes, or wrote the one it
                # reads: that may have moved OpenSSL on (taken the handshake bytes
                # *reverse* waited for, so that no poll will report them again).
                # *reverse* goes back to waiting for its usual readiness, which
                # retries it at once if OpenSSL is still stuck (once per event of
                # this flow's, never a spin).
                self._uncross(reverse, reading=True)
                self._uncross(reverse, reading=False)

    def _shut(self, flow: _Flow) -> None:
        """Every byte before *flow*'s EOF was delivered (pending == 0): half-close its
        destination, unless that is a TLS side with bytes still unread.

        :raises _Failure: the destination's shutdown failed (``ENOTCONN`` aside), or
            closed it while the reverse flow still reads it; or as
            :meth:`_connected` and :meth:`_close_notify` raise.
        """
        dst = flow.dst
        if dst.__class__ is not socket.socket and isinstance(dst, ssl.SSLSocket):
            sslobj = getattr(dst, "_sslobj", None)
            if sslobj is not None:
                self._close_notify(flow, dst, sslobj)
                return
        reverse = self.flows[0] if flow is self.flows[1] else self.flows[1]
        if (
            # Nothing came from dst: its connect may still be in flight (one test on
            # the common path, where dst's bytes or EOF proved it connected). Bytes
            # sent to a TCP dst prove nothing: with TCP_FASTOPEN_CONNECT, send() puts
            # them in the SYN and returns their count in SYN_SENT, and a shutdown()
            # then dropped the connect (a request and its EOF, before the SYN-ACK).
            # Sent to a dst that is not TCP (AF_UNIX, a wrapper without TCP_INFO),
            # they still prove it: _connected() could only poll it, and a dst merely
            # full would hold the FIN (and the EOF read would end up reported as a
            # timeout or an abort).
            (flow.held or not (reverse.moved or reverse.pending or reverse.eof))
            and (flow.held or not flow.moved or _tcp_state(dst) >= 0)
            and not self._connected(flow)
        ):
            return
        flow.shut = True
        self.ends.setdefault(flow.name, End.EOF)
        try:
            _shutdown(dst, socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                # Said as any other failure of that side: a reset's errno is
                # End.RESET, anything else (an EIO from a framing layer's own
                # shutdown) End.ERROR, EBADF on a side closed behind the relay's
                # back that failure.
                raise self.failure(_other(flow.name), exc) from None
        if _fileno(dst) != flow.dst_fd:
            # dst's own shutdown() (a subclass's or a SocketLike's) closed it. A
            # close removes the fd from every epoll (the kernel drops a
            # registration with the file's last reference), and the kernel may give
            # its number to the next socket opened, anyone's.
            if not reverse.eof:
                # The reverse flow still reads it: the hub and the loop's selector
                # would never report it again, and the relay would wait for the
                # idle timeout, or for ever. Ended now, as the blocking form's next
                # read of it ends it.
                raise self.closed_behind(_other(flow.name))
            # Its EOF was read: nothing reads it any more, and the reverse flow
            # goes on delivering what it holds for the other side. Its number is
            # dropped from the drivers now: a re-arm of it (EPOLL_CTL_MOD on a
            # closed fd fails), or another relay of the hub given that number,
            # took the closed side for a failure and lost those bytes.
            self.let_go(flow.dst_fd)

    def _connected(self, flow: _Flow) -> bool:
        """Whether *flow*'s half-close may go out now: False (the flow is `held`) while
        dst's connect is still in flight.

        shutdown(SHUT_WR) on a TCP socket in SYN_SENT does not queue a FIN: Linux
        (inet_shutdown) drops the connection attempt instead, and the backend
        of a client that sent its EOF before a byte ("server speaks first": SMTP,
        SSH banners, ``nc -N < /dev/null``) would never be reached, nor that of a
        request sent in a Fast Open SYN and ended before the SYN-ACK. Called only
        when nothing came from dst (its bytes or its EOF prove it connected; bytes
        sent to a TCP dst do not, see :meth:`_shut`), so the common path, where dst
        answered before the EOF, pays nothing.

        SYN_SENT is read from TCP_INFO, not inferred from writability: a socket
        with TCP_FASTOPEN_CONNECT whose connect() returned 0 sits in SYN_SENT
        without having sent its SYN (the connect waits for the first write, to
        carry data), and tcp_poll reports it writable. An empty send() starts
        that connect (it returns EINPROGRESS); on an ordinary connect in flight
        it only returns EAGAIN. Then the flow waits for dst to be writable, as
        bytes would. A connected dst that is merely full (the caller filled it
        before the relay) is half-closed at once: the FIN queues behind its bytes.
        Sockets TCP_INFO cannot tell about (not TCP, a wrapper without
        getsockopt) wait until poll says dst is writable, as before.

        :raises _Failure: dst has a pending error (its connect failed), or was closed.
        """
        if _fileno(flow.dst) != flow.dst_fd:
            # Closed behind the relay's back: its fd number may name another socket.
            raise self.closed_behind(_other(flow.name))
        state = _tcp_state(flow.dst)
        if state < 0:
            ready = _poll_out(flow.dst_fd)
            if ready & _POLLERR:
                _raise_pending_error(self, flow.dst_fd)
            connecting = not ready
        elif state == _TCP_SYN_SENT:
            try:
                flow.dst.send(b"")  # starts a deferred (Fast Open) connect
            except (BlockingIOError, InterruptedError):
                pass  # EINPROGRESS (started), EAGAIN (in flight already)
            except OSError as exc:
                raise _Failure(_other(flow.name), _end_kind(exc), exc) from None
            connecting = True
        else:
            if state == _TCP_CLOSE:
                # A connect that failed (refused, timed out) ends here: its error.
                _raise_pending_error(self, flow.dst_fd)
            connecting = False
        if not connecting:
            if flow.held:
                flow.held = False
                self.hold_changes += 1
            return True
        if not flow.held:
            flow.held = True
            self.hold_changes += 1
            if self.on_notify is not None:
                self.on_notify()  # the hub arms dst for writing
        return False

    def _close_notify(self, flow: _Flow, dst: ssl.SSLSocket, sslobj: Any) -> None:
        # A bare FIN under TLS is an "unexpected EOF": OpenSSL 3 answers it with a
        # decode_error alert and the peer's next read fails. The half-close is a
        # close_notify instead, and the TLS state stays usable for reading (TLS
        # allows each direction to end on its own). But CPython's shutdown() calls
        # SSL_shutdown twice, and the second call reads, waiting for the peer's own
        # close_notify: a record of application data it meets there is discarded
        # and fails the connection (APPLICATION_DATA_AFTER_CLOSE_NOTIFY). So the
        # close_notify waits until the relay has read everything that side sent
        # (nothing decrypted pending, nothing in the kernel's receive queue) or
        # that side's own EOF; the direction reading it keeps going meanwhile.
        reverse = self.flows[0] if flow is self.flows[1] else self.flows[1]
        # A retry of a close_notify OpenSSL held back (see the WANT_WRITE case below).
        held = flow.held
        if held:
            flow.held = False
            self.hold_changes += 1
        if not reverse.eof and _tls_unread(dst):
            # Also before a retry: once the held close_notify is out, CPython calls
            # SSL_shutdown a second time, and that call reads as described above.
            if not flow.deferred:
                flow.deferred = True
                self.deferring += 1
                self.hold_changes += 1
            if held and self.on_notify is not None:
                self.on_notify()  # wait for the bytes to be read, not for writability
            return
        if flow.deferred:
            flow.deferred = False
            self.deferring -= 1
            self.hold_changes += 1
        flow.shut = True
        # The side's end is EOF once its close_notify is out (not when OpenSSL
        # holds it back: a timeout or reset meanwhile is how it ended).
        labelled = flow.name not in self.ends
        self.ends.setdefault(flow.name, End.EOF)
        try:
            sslobj.shutdown()
        except ssl.SSLWantReadError:
            pass  # close_notify is out; the peer's own close_notify comes later
        except ssl.SSLWantWriteError:
            # The TLS side's send buffer was full (its peer is not reading): OpenSSL
            # keeps the close_notify record (s3.alert_dispatch) and writes it only
            # when SSL_shutdown is called again. Until then the flow is not shut: the
            # drivers wait for the socket to be writable and pump it, which retries
            # here; the other direction keeps flowing meanwhile.
            flow.shut = False
            if labelled:
                del self.ends[flow.name]
            flow.held = True
            self.hold_changes += 1
            if not held and self.on_notify is not None:
                self.on_notify()
            return
        except ssl.SSLEOFError as exc:
            # SSL_shutdown's read met a bare FIN from that side (no close_notify; e.g.
            # its peer closed right after reading ours, before the second call). No
            # record was read, so nothing was discarded: that is the side's EOF, as
            # a recv() meeting the same FIN reports it (suppress_ragged_eofs, the
            # default). Only a socket that asked for strict EOFs fails here. (Not a
            # reset: CPython keeps SSL_shutdown's errno and raises the OSError it is,
            # ConnectionResetError or BrokenPipeError, handled below; unlike a
            # read's or a write's, see _tls_reset.)
            if not reverse.eof:
                # (typeshed does not declare the attribute; ssl.SSLSocket has it.)
                if not getattr(dst, "suppress_ragged_eofs", True):
                    raise _Failure(reverse.name, End.ERROR, exc) from None
                self._take_eof(reverse)
        except ssl.SSLError as exc:
            if not reverse.eof:
                # Bytes arrived between the check above and SSL_shutdown's read and
                # were discarded by OpenSSL: the stream from that side has a hole.
                # Fail it (the other side is reset or shut down), never a clean EOF.
                raise _Failure(reverse.name, End.ERROR, exc) from None
            # That side had ended already: the read found its FIN, nothing to lose.
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise _Failure(reverse.name, _end_kind(exc), exc) from None
        else:
            # No WANT_READ: SSL_shutdown's read found the peer's own close_notify
            # (it can answer ours that fast) and took it off the socket, so neither
            # poll nor a read will report that EOF again: take it as read here.
            if not reverse.eof:
                self._take_eof(reverse)

    def _cross(self, flow: _Flow, *, reading: bool) -> None:
        """*flow*'s read (*reading*) or write met OpenSSL's need of the other I/O."""
        if reading:
            if flow.read_needs_write:
                return
            flow.read_needs_write = True
        else:
            if flow.write_needs_read:
                return
            flow.write_needs_read = True
        self.crossing += 1
        self.hold_changes += 1

    def _uncross(self, flow: _Flow, *, reading: bool) -> None:
        """Undo :meth:`_cross`: *flow* waits for its usual readiness again."""
        if reading:
            if not flow.read_needs_write:
                return
            flow.read_needs_write = False
        else:
            if not flow.write_needs_read:
                return
            flow.write_needs_read = False
        self.crossing -= 1
        self.hold_changes += 1

    def _take_eof(self, flow: _Flow) -> None:
        """*flow*'s source ended inside SSL_shutdown: no read will report it again."""
        flow.eof = True
        if not flow.pending and not flow.shut:
            self._shut(flow)

    def _pump_small(self, flow: _Flow, drain: bool) -> None:
        # Read into the thread's scratch buffer and send at once: the scratch is
        # shared by every relay of this thread, so nothing may stay in it; what
        # dst does not take is kept in `left`, and reading waits until it is out.
        if flow.pending and not self._send_left(flow):
            if self.idle_timeout is not None:
                self.note_queue(flow)
            return
        # The scratch of the thread running this now, looked up here and not kept
        # from the start: a loop can be started in one thread and run in another
        # (run_until_complete in the main thread, then run_forever in a worker),
        # and two threads moving bytes through one buffer, the GIL released
        # between recv_into and send, sent one connection's bytes on another.
        scratch = _scratch()
        size = len(scratch)
        src, dst = flow.src, flow.dst
        while not flow.eof:
            if flow.upgrade:
                if flow.to_splice():
                    return
                flow.upgrade = False  # and for good: can_splice is False now
                if self.fallback is None:
                    self.fallback = Fallback.NO_PIPE
            try:
                n = src.recv_into(scratch)
            except (BlockingIOError, InterruptedError):
                if flow.urgent:
                    flow.clear_urgent()  # read until EAGAIN: past the mark
                return
            except OSError as exc:
                raise self.failure(flow.name, exc) from None
            if n == 0:
                flow.eof = True
                return
            try:
                m = dst.send(scratch[:n])
            except (BlockingIOError, InterruptedError):
                m = 0
            except OSError as exc:
                raise self.failure(_other(flow.name), exc) from None
            flow.moved += m
            if self.idle_timeout is not None:
                self.last = time.monotonic()
            # A full scratch read means more was waiting: a stream, worth a pipe.
            flow.upgrade = n == size and flow.can_splice
            if m < n:
                flow.left = bytes(scratch[m:n])
                flow.pending = n - m
                if self.idle_timeout is not None:
                    self.note_queue(flow)
                return
            if n < size and not (drain or flow.buffered):
                return  # a short read emptied the socket: no EAGAIN round trip

    def _send_left(self, flow: _Flow) -> bool:
        try:
            m = flow.dst.send(flow.left)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            raise self.failure(_other(flow.name), exc) from None
        flow.moved += m
        flow.pending -= m
        if self.idle_timeout is not None:
            self.last = time.monotonic()
        if flow.pending:
            flow.left = flow.left[m:]
            return False
        flow.left = b""
        return True

    def _pump_buffered(self, flow: _Flow, drain: bool = False) -> None:
        # Each try costs a syscall. A read that got less than it asked for means the
        # socket had no more bytes, and a short write means the destination is full:
        # trying again at once would only return EAGAIN, so wait for the next event.
        # The asyncio form's epoll is edge-triggered, so the socket must really be
        # empty: a copy-path read into the buffer's tail (bytes still pending at an
        # offset) asks for less than the buffer holds, and filling that tail means
        # more may be waiting, which no new edge would report. A read can also stop
        # short because the pipe ran out of slots; the next write makes room and
        # reading resumes at once. TLS sockets may hold decrypted bytes poll cannot
        # see, so they keep reading until EAGAIN.
        can_read = can_write = True
        progress = True
        while progress:
            progress = False
            full = False
            if can_read and flow.wants_read:
                want = flow.room()
                n = self._read(flow, want)
                progress = n > 0
                full = n >= want
                can_read = full or (n > 0 and (flow.buffered or drain))
            if can_write and flow.pending:
                before = flow.pending
                n = self._write(flow)
                progress = progress or n > 0
                can_write = n >= before
                if not can_write and self.idle_timeout is not None:
                    self.note_queue(flow)
                if n > 0 and (full or flow.mode == _SPLICE):
                    can_read = True  # the pipe or buffer has room again

    def _read(self, flow: _Flow, want: int) -> int:
        """Read up to *want* bytes (what :meth:`_Flow.room` said) into the pipe or buffer."""
        try:
            if flow.mode == _SPLICE:
                # splice takes the fd number the relay kept: if the caller closed the
                # socket, that number may name an unrelated socket by now (the kernel
                # reuses the lowest free fd), whose bytes would be relayed. A socket
                # object's own calls fail with EBADF once closed; this is that check
                # (one fileno() call, ~30 ns, against a ~2-5 us splice).
                if flow.src.fileno() != flow.src_fd:
                    raise self.closed_behind(flow.name)
                n = os.splice(flow.src_fd, flow.pipe_w, want, flags=_SPLICE_FLAGS)
            else:
                if flow.read_needs_write:
                    self._uncross(flow, reading=True)  # set again if OpenSSL still is
                end = flow.start + flow.pending
                n = flow.src.recv_into(flow.view[end : end + want])
        except ssl.SSLWantWriteError:
            # OpenSSL must write before it reads on (see _Flow.read_needs_write):
            # src being readable changes nothing, src being writable does.
            self._cross(flow, reading=True)
            return 0
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            if flow.mode == _SPLICE:
                if flow.pending:
                    flow.blocked = True  # the pipe is full, or see below
                elif flow.urgent:
                    # At the urgent mark splice returns EAGAIN until the mark is
                    # passed, which only recv does. With bytes in the pipe the flow
                    # waits as blocked: they go out first, then this comes again.
                    flow.to_small()
            elif flow.urgent:
                flow.clear_urgent()  # read until EAGAIN: past the mark
            return 0
        except ssl.SSLZeroReturnError:
            # The TLS side's close_notify, its clean EOF. CPython returns 0 for it only
            # while no close_notify was sent its way; after the relay half-closed that
            # side (SSL_shutdown), SSL_read reports it as this error instead.
            flow.eof = True
            return 0
        except OSError as exc:
            self._io_error(flow, exc, flow.name)
            return flow.cap  # retry at once on the copy path
        if n == 0:
            if flow.mode == _SPLICE and _at_mark(flow.src_fd):
                # Not the EOF: at the urgent mark splice returns 0 once the FIN is
                # in, bytes still queued after the mark (one ioctl per spliced
                # stream's end). Handled as EAGAIN at the mark is (above).
                if flow.pending:
                    flow.blocked = True
                else:
                    flow.to_small()
                return 0
            if flow.mode == _COPY and (reset := _tls_reset(flow.src, after_eof=True)) is not None:
                # A TLS side's 0 may be its reset (see _tls_reset): end as a plain
                # side's read of the reset does, never forward it as a half-close
                # after a truncated stream. One isinstance test per EOF for other
                # sides. An RST after the peer's FIN (EPIPE) is still its EOF.
                raise _Failure(flow.name, _end_kind(reset), reset)
            flow.eof = True
            return 0
        flow.pending += n
        if self.idle_timeout is not None:
            self.last = time.monotonic()
        return n

    def _io_error(self, flow: _Flow, exc: OSError, side: str) -> None:
        """EINVAL from splice: switch *flow* to copying (returns). Anything else: *side* failed."""
        if exc.errno == errno.EINVAL and flow.mode == _SPLICE:
            # A socket the kernel cannot splice (seen with some socket types): keep
            # the bytes already in the pipe and carry on through the copy path.
            flow.to_copy()
            if self.fallback is None:
                self.fallback = Fallback.EINVAL
            return
        raise self.failure(side, exc) from None

    def _write(self, flow: _Flow) -> int:
        try:
            if flow.mode == _SPLICE:
                # The destination's fd number: see _read (the bytes would go to an
                # unrelated connection and be counted as delivered).
                if flow.dst.fileno() != flow.dst_fd:
                    raise self.closed_behind(_other(flow.name))
                n = os.splice(flow.pipe_r, flow.dst_fd, flow.pending, flags=_SPLICE_FLAGS)
                flow.spliced += n
            else:
                if flow.write_needs_read:
                    self._uncross(flow, reading=False)  # set again if OpenSSL still is
                n = flow.dst.send(flow.view[flow.start : flow.start + flow.pending])
        except ssl.SSLWantReadError:
            # OpenSSL must read before it can write: dst's TLS handshake is not done
            # (an SSLSocket wrapped with do_handshake_on_connect=False whose peer has
            # not sent its part yet) or is being redone. dst is writable all along,
            # so waiting for that, the blocking form's and the fallback driver's
            # level-triggered poll reported it at once, again and again: a 100 %
            # CPU spin until the peer's handshake came. The flow waits for dst to be
            # readable instead (see _Flow.write_needs_read).
            self._cross(flow, reading=False)
            return 0
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
            return 0
        except OSError as exc:
            self._io_error(flow, exc, _other(flow.name))
            return flow.pending  # retry at once on the copy path
        flow.pending -= n
        flow.moved += n
        flow.blocked = False
        if flow.mode != _SPLICE:
            flow.start = 0 if not flow.pending else flow.start + n
        if self.idle_timeout is not None:
            self.last = time.monotonic()
        return n

    def urgent(self, fd: int) -> None:
        """*fd* reported urgent data (POLLPRI/EPOLLPRI): see :class:`_Flow`."""
        for flow in self.flows:
            if flow.src_fd == fd:
                flow.set_urgent()

    def step(self, fd: int, readable: bool, writable: bool) -> None:
        """React to readiness of *fd*: pump the directions that touch it."""
        for flow in self.flows:
            if flow.shut:
                continue
            if (
                (readable and flow.src_fd == fd)
                or (writable and flow.dst_fd == fd)
                or (
                    self.crossing
                    and (
                        (readable and flow.dst_fd == fd and flow.write_needs_read)
                        or (writable and flow.src_fd == fd and flow.read_needs_write)
                    )
                )
            ):
                self.pump(flow)

    def interest(self) -> dict[int, int]:
        """fd -> poll mask the relay waits for now (a side's number it let go of,
        never: see :meth:`let_go`)."""
        masks: dict[int, int] = {self.flows[0].src_fd: 0, self.flows[1].src_fd: 0}
        for flow in self.flows:
            if flow.wants_read:
                # (read_needs_write: OpenSSL must write first, see _Flow.)
                masks[flow.src_fd] |= _POLLOUT if flow.read_needs_write else _POLLIN_PRI
            # `held`: to retry a half-close that waits for dst (the flow is not shut).
            if flow.wants_write or flow.held:
                masks[flow.dst_fd] |= _POLLIN if flow.write_needs_read else _POLLOUT
        if self.gone:
            # Nothing is read from or written to it (its flows are at EOF and shut).
            for fd in self.gone:
                del masks[fd]
        return masks

    @property
    def done(self) -> bool:
        return all(f.done for f in self.flows)

    def idle_left(self) -> float | None:
        if self.idle_timeout is None:
            return None
        left = self.last + self.idle_timeout - time.monotonic()
        if left <= 0:
            for flow in self.flows:
                if flow.pending and flow.queued_moved == flow.moved:
                    self.note_queue(flow)  # may find bytes left since: not idle
            left = self.last + self.idle_timeout - time.monotonic()
        return left

    def note_queue(self, flow: _Flow) -> None:
        """*flow*'s write stalled (dst is full), or the idle timeout is due while it
        is: bytes that left dst's send queue since its last stall are activity.

        A slow reader's kernel takes bytes from dst's send queue as it reads, but
        the relay hears of it only when poll reports dst writable, and TCP does that
        only once a third of the send buffer is free (sk_stream_is_writeable): with
        a send buffer autotuned to megabytes, a reader taking less than that per
        ``idle_timeout`` saw its download ended as idle. A TLS destination hid more:
        CPython enables no partial writes (SSL_MODE_ENABLE_PARTIAL_WRITE), so
        ``SSLSocket.send`` raises SSLWantWriteError until all it was given is out
        (up to 64 KiB here), though records reach the kernel as room comes. The
        kernel's count of bytes not yet acknowledged by the peer (SIOCOUTQ) changes
        exactly when they move: one ioctl per stall, and one per flow when the
        timeout is due. Unchanged (a peer that does not read, its window closed):
        idle, as before.
        """
        if _fileno(flow.dst) != flow.dst_fd:
            return  # closed behind the relay's back: its number is not dst's any more
        try:
            out = fcntl.ioctl(flow.dst_fd, _SIOCOUTQ, _ZERO_INT)
            queued = int.from_bytes(out, sys.byteorder, signed=True)
        except OSError:
            return  # not a TCP socket, or no SIOCOUTQ here: poll alone decides
        if flow.queued_moved == flow.moved and queued != flow.queued:
            # The same stall (no write of this flow succeeded since), and its queue
            # changed: the kernel sent bytes, or OpenSSL put more of a record in.
            self.last = time.monotonic()
        flow.queued, flow.queued_moved = queued, flow.moved

    # -------------------------------------------------------------- ending

    def fail(self, failure: _Failure) -> None:
        self.failed, self.error = failure.side, failure.error
        # setdefault: a side whose EOF was delivered (its stream complete) keeps
        # End.EOF if it fails afterwards (a backend resetting the client's next
        # byte after its full response); `failed` and `error` say what came next.
        self.ends.setdefault(failure.side, failure.end)
        self.ends.setdefault(_other(failure.side), End.ABORTED)
        if not self.close:
            # Never leave the survivor hanging: a caller-owned socket gets a
            # shutdown, so its peer sees EOF. (close=True: finish() resets it.)
            self._abort(self.b if failure.side == "a" else self.a)

    def timeout(self) -> None:
        for name in ("a", "b"):
            self.ends.setdefault(name, End.TIMEOUT)
        if not self.close:
            for s in (self.a, self.b):
                self._abort(s)

    def _abort(self, sock: Side) -> None:
        # With close=True reset it (SO_LINGER 0 makes close() send RST); a
        # caller-owned socket gets a shutdown, so its peer sees EOF.
        try:
            if self.close:
                # A wrapper without setsockopt can only be closed (its peer sees EOF).
                setsockopt = getattr(sock, "setsockopt", None)
                if callable(setsockopt):
                    setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            else:
                _shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def finish(self) -> RelayStats:
        if self.stats is not None:
            return self.stats
        error: BaseException | None = None
        for flow in self.flows:
            # As every step below, whatever an earlier one raised: a KeyboardInterrupt
            # from a signal handler here left both sockets open and the relay in
            # _RUNNING for good (out of its hub, its future cancelled: nothing would
            # end it any more). It goes on once the relay has ended.
            try:
                flow.close_pipe()
            except BaseException as exc:
                error = error or exc
        if self.close:
            # Ended before both directions were done (an error, the idle timeout, a
            # cancel, the loop's shutdown, an exception out of the blocking wait):
            # a stream that did not reach its EOF is cut off, and what was in
            # flight (in the pipe, in the sockets' buffers) is dropped. A plain
            # close() would send its destination's peer a FIN, a clean EOF that
            # could pass for a complete response: reset that side. Not a side
            # whose incoming direction was complete (its half-close went out):
            # its bytes and FIN are queued already, maybe not yet sent (a slow
            # reader), and SO_LINGER 0 would discard what RelayStats counts as
            # delivered; it is closed normally.
            #
            # Every step runs whatever an earlier one raised (a SocketLike's close()
            # may raise after closing its socket, e.g. flushing a log): b must not
            # be leaked because a's wrapper failed. The first exception is raised
            # once the stats are recorded, so a second finish() (the hub's crash
            # path, the fallback's done callback) closes nothing twice.
            #
            # Each step is counted as it starts (finish_step): run again after an
            # interrupt, finish() goes on from the next one.
            if self.finish_step < 1:
                for flow in self.flows:
                    if not flow.shut:
                        try:
                            self._abort(flow.dst)
                        except BaseException as exc:
                            error = error or exc
                # Counted once both resets are done: an interruption between them
                # (at the loop's jump back) made the retry skip the second, and its
                # peer took the truncated stream for a complete one. Run again, a
                # reset is only set again (SO_LINGER 0 twice).
                self.finish_step = 1
            for step, sock in ((2, self.a), (3, self.b)):
                if self.finish_step < step:
                    self.finish_step = step
                    try:
                        sock.close()
                    except BaseException as exc:
                        error = error or exc
                        # A signal handler's exception inside socket.close() (after
                        # it set _closed, before the fd's close) left the fd open:
                        # once more, which closes nothing twice for a socket.socket.
                        # (Not after an Exception: a socket.socket subclass's close()
                        # that raised by itself is not called twice.)
                        if (
                            not isinstance(exc, Exception)
                            and isinstance(sock, socket.socket)
                            and _fileno(sock) != -1
                        ):
                            with contextlib.suppress(BaseException):
                                sock.close()
        if not self.close and self.finish_step < 1:
            # As for close=True: a SocketLike's settimeout(), or a signal handler,
            # may raise here; the stats are recorded (and the relay leaves
            # _RUNNING, which would otherwise pin it and its sockets for the
            # process's life) before the error goes on.
            self.finish_step = 1
            try:
                self._give_back()
            except BaseException as exc:
                error = error or exc
                if not isinstance(exc, Exception):
                    # A signal handler's (KeyboardInterrupt) may have cut it short,
                    # even as it was entered: once more (restoring twice is harmless).
                    with contextlib.suppress(BaseException):
                        self._give_back()
        if len(self.flows) == 2:
            f0, f1 = self.flows
            moved, spliced = (f0.moved, f1.moved), f0.spliced + f1.spliced
        else:  # the start failed part way
            moved, spliced = (0, 0), 0
        # Not RelayStats(...): a frozen dataclass's __init__ sets each field through
        # object.__setattr__ (~2.4 us for these ten, ~0.7 us this way), paid by
        # every relay under connection churn.
        stats = object.__new__(RelayStats)
        stats.__dict__.update(
            a_to_b=moved[0],
            b_to_a=moved[1],
            a_end=self.ends.get("a", End.ABORTED),
            b_end=self.ends.get("b", End.ABORTED),
            failed=self.failed,
            error=self.error,
            spliced=spliced > 0,
            duration=time.monotonic() - self.started,
            spliced_bytes=spliced,
            fallback=self.fallback,
        )
        self.stats = stats
        _RUNNING.discard(self)  # last: a fork until here still frees what it holds
        if error is not None:
            self.finish_error = error
            raise error
        return stats


def _own_setblocking(sock: object) -> bool:
    """Whether *sock*'s setblocking() is the socket's own (it cannot fail on an open fd)."""
    return getattr(type(sock), "setblocking", None) is _socket.socket.setblocking


# Linux's (asm-generic) value; where an architecture has its own (alpha, mips...)
# the ioctl fails and the mark is not seen: splice's 0 is the EOF, as before.
_SIOCATMARK = getattr(termios, "SIOCATMARK", 0x8905)


# Bytes in a socket's send queue not yet acknowledged by its peer (TIOCOUTQ; Linux's
# asm-generic value where termios does not have it).
_SIOCOUTQ = getattr(termios, "TIOCOUTQ", 0x5411)


def _at_mark(fd: int) -> bool:
    """Whether the next byte to read from *fd* is TCP's urgent mark (SIOCATMARK)."""
    try:
        return fcntl.ioctl(fd, _SIOCATMARK, _ZERO_INT) != _ZERO_INT
    except OSError:
        return False  # not a socket that has a mark


def _tls_unread(sock: ssl.SSLSocket) -> bool:
    """Whether bytes *sock*'s peer sent wait unread: decrypted in OpenSSL, or still in
    the kernel's receive queue (FIONREAD)."""
    try:
        if sock.pending():
            return True
        return fcntl.ioctl(sock.fileno(), _FIONREAD, _ZERO_INT) != _ZERO_INT
    except (OSError, ValueError):
        return False  # closed or failed: the shutdown that follows reports it


def _check_idle_timeout(value: object) -> float | None:
    """*idle_timeout* as the relay uses it: seconds > 0, or None (``inf`` is None)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidArgument("idle_timeout", value, "must be > 0 seconds, math.inf or None")
    try:
        seconds = float(value)
    except OverflowError:  # an int past float range: longer than any wait
        return None
    return None if seconds == math.inf else seconds


# socket.socket's family/type properties build an IntEnum on every access (~1 us
# each, several per relay); the C-level attributes underneath give the plain int.
_raw_family = _socket.socket.family.__get__
_raw_type = _socket.socket.type.__get__
_INET = frozenset({int(socket.AF_INET), int(socket.AF_INET6)})
_AF_UNIX = int(getattr(socket, "AF_UNIX", -1))


def _kind_name(kind: int) -> str:
    """A socket type's name for a message (``SOCK_DGRAM``), or its number if unknown.

    Not ``str(sock.type)``: ``SocketKind`` is an ``IntEnum``, whose ``str()`` is the
    bare number from Python 3.11 on ("got 2").
    """
    try:
        return socket.SocketKind(kind).name or str(kind)
    except ValueError:
        return str(kind)


def _end_kind(exc: OSError) -> End:
    return End.RESET if exc.errno in _RESET_ERRNOS else End.ERROR


def _other(name: str) -> str:
    return "b" if name == "a" else "a"


def _nodelay(sock: Side) -> bool:
    """*sock*'s TCP_NODELAY before the relay, as :attr:`_Relay.saved` keeps it.

    A wrapper without a ``getsockopt``, or whose read fails, counts as on (True):
    begin() then leaves it alone. Setting what cannot be read could not be undone,
    and a caller's socket is given back as it was (the relay used to take a failed
    read for off, and turned TCP_NODELAY off under close=False).
    """
    if not _is_inet(sock):
        return False
    getsockopt = getattr(sock, "getsockopt", None)
    if not callable(getsockopt):
        return True
    try:
        return bool(getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    except OSError:
        return True


def _is_kernel_socket(sock: object) -> bool:
    """A socket.socket whose recv_into/send are the kernel's (splice sees the same bytes)."""
    if not isinstance(sock, socket.socket):
        return False
    cls = type(sock)
    return cls.recv_into is _socket.socket.recv_into and cls.send is _socket.socket.send


def _shutdown(sock: Side, how: int) -> None:
    """``shutdown(how)`` of a relay side: its own method, unless that is the socket's.

    A ``socket.socket`` subclass's override is the side's way to end its stream (a
    framing layer's end-of-stream record before the FIN, a count, a log line) and is
    called, as a :class:`SocketLike`'s ``shutdown`` is. The kernel's call is made
    directly for a socket that does not override it, and for every
    ``ssl.SSLSocket``, a subclass of it too: ``ssl.SSLSocket.shutdown`` sets
    ``_sslobj`` to None before the kernel's call, and a TLS side given back with
    ``close=False`` would lose its TLS state (OpenSSL's decrypted bytes, ``unwrap``);
    a subclass's override ends in it (``super().shutdown``). A TLS side's
    half-close is its ``close_notify`` (:meth:`_Relay._close_notify`), never this.

    :raises OSError: what the shutdown raised (``ENOTCONN``: the caller's to ignore).
    :raises Exception: whatever else a subclass's or a :class:`SocketLike`'s own
        ``shutdown`` raises.
    """
    if isinstance(sock, socket.socket):
        if isinstance(sock, ssl.SSLSocket):
            _socket.socket.shutdown(sock, how)
            return
        if getattr(type(sock), "shutdown", None) is _socket.socket.shutdown:
            _socket.socket.shutdown(sock, how)
            return
    sock.shutdown(how)


def _is_inet(sock: object) -> bool:
    if isinstance(sock, _socket.socket):
        return _raw_family(sock) in _INET
    family = getattr(sock, "family", None)
    return family in _INET and callable(getattr(sock, "setsockopt", None))


def _timeout(sock: object) -> float | None:
    """The side's timeout (0.0: non-blocking); a wrapper without gettimeout counts as 0."""
    if sock.__class__ is socket.socket:
        return sock.gettimeout()
    get = getattr(sock, "gettimeout", None)
    if not callable(get):
        return 0.0
    value = get()
    return None if value is None else float(value)


def _restore_timeout(sock: object, timeout: float | None) -> None:
    """Give *sock*, made non-blocking by begin(), its *timeout* (never 0.0) back."""
    if callable(getattr(sock, "settimeout", None)):
        with contextlib.suppress(OSError):
            sock.settimeout(timeout)  # type: ignore[attr-defined]
        return
    # A wrapper with gettimeout() and setblocking() but no settimeout() (SocketLike
    # requires neither): its exact timeout cannot be set back, its blocking mode
    # can. It was handed back non-blocking. (_check_pair refuses a blocking side
    # without setblocking().)
    setblocking = getattr(sock, "setblocking", None)
    if callable(setblocking):
        with contextlib.suppress(OSError):
            setblocking(timeout is None or timeout > 0)


_SOCKET_LIKE = ("fileno", "recv_into", "send", "shutdown", "close")
_raw_getsockopt = _socket.socket.getsockopt
_IPPROTO_TCP = int(socket.IPPROTO_TCP)
_TCP_NODELAY = int(socket.TCP_NODELAY)
_fstat = os.fstat
_SOL_SOCKET = int(socket.SOL_SOCKET)
# -1 where the platform lacks it: getsockopt then fails and the check is skipped.
_SO_ACCEPTCONN = int(getattr(socket, "SO_ACCEPTCONN", -1))


# Linux's (asm-generic) SO_PEERNAME, which CPython does not export. Its getsockopt
# fails with ENOTCONN for a socket neither connected nor connecting (a listening one
# too) and costs about what SO_ACCEPTCONN does (~0.15 us more): where it is known
# it replaces that check on the fast path. A connect in flight, or one that failed
# after the call returned (refused), has a peer: the relay reports that failure.
_SO_PEERNAME = int(getattr(socket, "SO_PEERNAME", 28 if sys.platform.startswith("linux") else -1))


def _listening(sock: socket.socket) -> bool:
    """Whether *sock* listens (SO_ACCEPTCONN): it carries no stream. Reading it fails
    with ENOTCONN, and epoll reports it readable only when a connection comes in, so
    the asyncio form would wait on it forever."""
    try:
        return _raw_getsockopt(sock, _SOL_SOCKET, _SO_ACCEPTCONN) != 0
    except OSError:
        return False  # not a socket that knows the option: the relay reports what it meets


def _not_a_stream(sock: socket.socket) -> str | None:
    """What *sock* is when it can carry no stream: a listening socket, or one never
    connected (no connect(), or a blocking connect() that failed), whose first write
    would fail with EPIPE and look like a reset. None otherwise, or when unknown."""
    if _SO_PEERNAME >= 0:
        try:
            _raw_getsockopt(sock, _SOL_SOCKET, _SO_PEERNAME, 1)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                if _listening(sock):
                    return "a listening socket"
                return "a socket neither connected nor connecting"
        else:
            return None
    return "a listening socket" if _listening(sock) else None


def _inode(sock: object, fd: int) -> int | None:
    """The sockfs inode of *sock* (whose ``fileno()`` is *fd*), which every fd of the
    socket shares (``a.dup()``, ``socket(fileno=...)``), or None for a wrapper, whose
    ``fileno()`` may be anything pollable (it is not compared)."""
    if not isinstance(sock, socket.socket):
        return None
    try:
        return _fstat(fd).st_ino
    except OSError:
        return None  # an fd closed behind the socket's back: the relay reports it


# Linux's SO_COOKIE (asm-generic and x86: 57; since Linux 4.12), which CPython does
# not export: a 64-bit number the kernel gives each socket once and never again.
_SO_COOKIE = int(getattr(socket, "SO_COOKIE", 57 if sys.platform.startswith("linux") else -1))


def _cookie(sock: socket.socket) -> bytes | None:
    """The SO_COOKIE of *sock*, or None where it cannot be read (no SO_COOKIE, or
    *sock* is closed). Read through the socket object the relay already holds: a
    probe ``socket.socket(fileno=fd)`` would set O_NONBLOCK on the caller's file
    whenever ``socket.setdefaulttimeout()`` is in force (CPython's init_sockobject
    applies the default timeout to every new socket object), and a refused start
    must not touch the socket."""
    try:
        return _raw_getsockopt(sock, _SOL_SOCKET, _SO_COOKIE, 8)
    except OSError:
        return None


def _same_socket(sock: socket.socket, other: Side, other_fd: int, inode: int) -> bool:
    """Whether *other*, the socket a running relay watches as fd *other_fd* (which the
    hub lists for sockfs inode *inode*), is the socket of *sock*, which has that
    inode (a dup): asked only on that match.

    The inode alone could be wrong: sockfs numbers sockets from a 32-bit counter
    (get_next_ino), which a busy proxy wraps in hours, so a socket kept that long
    and a new one may share it. The cookie tells them apart. Where *other* no
    longer holds *other_fd* (closed or detached behind its relay's back: the relay
    ends at its next event), or there is no SO_COOKIE, the inode of what
    *other_fd* names now must do (fstat changes nothing).
    """
    # (A listed socket is a socket.socket: wrappers are not listed, see _inode.)
    if isinstance(other, socket.socket) and other.fileno() == other_fd:
        return _same_cookie(sock, other)
    try:
        return _fstat(other_fd).st_ino == inode
    except OSError:
        return False  # *other_fd* is closed: not a running relay's socket


def _is_transport_socket(sock: object) -> bool:
    """Whether *sock* is the stand-in that an asyncio or uvloop transport gives out
    as ``get_extra_info("socket")``: its I/O methods raise, the transport owns the fd."""
    cls = type(sock)
    return (cls.__module__, cls.__name__) in {
        ("uvloop.loop", "PseudoSocket"),
        ("asyncio.trsock", "TransportSocket"),
    }


def _check_pair(a: object, b: object) -> tuple[int | None, int | None]:
    """Refuse a pair that cannot be relayed; return the sides' sockfs inodes (see
    :func:`_inode`), which the asyncio hub keys its sockets by."""
    if a.__class__ is socket.socket and b.__class__ is socket.socket:
        # The common case, checked without the generic lookups below (relays are
        # started thousands of times a second under connection churn), the helpers
        # inlined. Its four syscalls (SO_PEERNAME, or SO_ACCEPTCONN, and fstat per
        # side) cost ~2.5 us.
        fa, fb = a.fileno(), b.fileno()
        if (
            fa >= 0
            and fb >= 0
            and fa != fb
            and _raw_type(a) == socket.SOCK_STREAM
            and _raw_type(b) == socket.SOCK_STREAM
        ):
            try:
                streams: object
                if _SO_PEERNAME >= 0:
                    # ENOTCONN (an OSError) for a side with no peer: see _not_a_stream.
                    # Else one byte of the peer's address: true.
                    streams = _raw_getsockopt(a, _SOL_SOCKET, _SO_PEERNAME, 1) and (
                        _raw_getsockopt(b, _SOL_SOCKET, _SO_PEERNAME, 1)
                    )
                else:
                    streams = not (
                        _raw_getsockopt(a, _SOL_SOCKET, _SO_ACCEPTCONN)
                        or _raw_getsockopt(b, _SOL_SOCKET, _SO_ACCEPTCONN)
                    )
                if streams:
                    sa, sb = _fstat(fa), _fstat(fb)
                    if sa.st_ino != sb.st_ino or sa.st_dev != sb.st_dev:
                        return sa.st_ino, sb.st_ino
            except OSError:
                pass  # the checks below say which side and what
    fds: list[int] = []
    for name, sock in (("a", a), ("b", b)):
        if not isinstance(sock, socket.socket):
            if _is_transport_socket(sock):
                # uvloop's PseudoSocket has every method, each raising TypeError: it
                # passed as a SocketLike, the relay started, failed at its first
                # read, and with close=True reset the caller's other side. (asyncio's
                # TransportSocket lacks them and was refused below.)
                raise WrongSocketType(
                    f"relay side {name}",
                    "a socket.socket or an object with " + ", ".join(_SOCKET_LIKE),
                    f"{type(sock).__name__} (a transport's socket: relay the socket "
                    "itself, before a transport owns it)",
                )
            missing = [m for m in _SOCKET_LIKE if not callable(getattr(sock, m, None))]
            if missing:
                raise WrongSocketType(
                    f"relay side {name}",
                    "a socket.socket or an object with " + ", ".join(_SOCKET_LIKE),
                    f"{type(sock).__name__} (no {', '.join(missing)})",
                )
            if _timeout(sock) != 0.0 and not callable(getattr(sock, "setblocking", None)):
                raise InvalidArgument(
                    f"relay side {name}", sock, "is blocking and has no setblocking()"
                )
        try:
            fd = sock.fileno()  # type: ignore[attr-defined]
        except OSError as exc:
            # A closed wrapper's fileno() may raise (EBADF) where a socket.socket's
            # reads -1: the same closed side.
            raise SocketClosed(sock, f"relay side {name}") from exc
        if not isinstance(fd, int) or fd < 0:
            raise SocketClosed(sock, f"relay side {name}")
        fds.append(fd)
        if not isinstance(sock, socket.socket):
            continue
        kind = _raw_type(sock)
        if kind != socket.SOCK_STREAM:
            raise WrongSocketType(f"relay side {name}", "a SOCK_STREAM socket", _kind_name(kind))
        what = _not_a_stream(sock)
        if what is not None:
            raise WrongSocketType(f"relay side {name}", "a connected stream socket", what)
    fa, fb = fds
    # Two fds of one socket (a dup): compared only where fileno() is known to be the
    # kernel socket (sockfs: one st_dev for all sockets).
    ia, ib = _inode(a, fa), _inode(b, fb)
    if a is b or fa == fb or (ia is not None and ia == ib and _same_cookie(a, b)):
        raise InvalidArgument("b", b, "is the same socket as a")
    return ia, ib


def _same_cookie(a: object, b: object) -> bool:
    """Whether *a* and *b*, two fds sharing a sockfs inode number, are one socket (a
    dup) rather than two whose numbers collide: sockfs numbers sockets from a 32-bit
    counter (get_next_ino), which a busy proxy wraps in hours, so a pooled backend
    connection kept that long and a new client may share one. SO_COOKIE tells them
    apart; where either cannot be read (no SO_COOKIE), the shared number must do."""
    assert isinstance(a, socket.socket) and isinstance(b, socket.socket)  # _inode's
    ca, cb = _cookie(a), _cookie(b)
    return ca is None or cb is None or ca == cb


def pipe_splice(
    a: socket.socket | SocketLike,
    b: socket.socket | SocketLike,
    *,
    pipe_size: int | None = None,
    idle_timeout: float | None = None,
    close: bool = True,
) -> RelayStats:
    """Relay bytes both ways between *a* and *b* in the calling thread until both are done.

    A stream moves socket -> pipe -> socket with splice(2) (zero copy); short
    messages are copied through a per-thread buffer (cheaper than two splices), and
    so is everything where splice cannot work (TLS sockets, non-Linux, EINVAL).
    Empty pipes are kept per thread for the next relay (see :func:`release_pipes`).
    When one side sends EOF, the other gets ``shutdown(SHUT_WR)`` after every byte
    before the EOF was delivered, and the other direction keeps flowing. A reset or
    error on one side ends the relay at once: the other side is reset (``close=True``)
    or shut down (``close=False``), unless its incoming stream was complete (its
    half-close forwarded): that side is closed normally, so what is queued for it
    still goes out (the same after the idle timeout). Both sockets get
    ``TCP_NODELAY`` while relaying. TCP urgent data (``MSG_OOB``) is dropped from
    the stream as ``read(2)`` drops it, or relayed inline where the caller set
    ``SO_OOBINLINE`` on the source.

    :param a: a connected stream socket (e.g. the client).
    :param b: a connected stream socket (e.g. the backend).
    :param pipe_size: bytes per direction's pipe (default 1 MiB, capped by
        ``/proc/sys/fs/pipe-max-size``); the kernel rounds it up to a power of two
        pages (5000 gives 8192), and that bounds the memory of a spliced direction.
        A copied direction (TLS, a wrapper, short messages) uses a 64 KiB buffer
        instead (larger only to take over what a pipe held when splice gave way).
    :param idle_timeout: end with :attr:`End.TIMEOUT` after this many seconds without
        a byte moving either way; None or ``math.inf``: no timeout.
    :param close: close both sockets at the end (default). With False they are left
        open, restored to their blocking mode and TCP_NODELAY setting.
    :returns: :class:`RelayStats`. Socket errors while relaying end the relay and
        are reported there, not raised.
    :raises WrongSocketType: a side is not a stream socket, is a listening socket, or
        is neither connected nor connecting (no ``connect()``, or one that failed).
    :raises SocketClosed: a side is closed (its ``fileno()`` is -1 or raises
        :class:`OSError`; also by a relay of a loop closed with
        ``loop.close()`` alone that held it: every start ends those first).
    :raises InvalidArgument: *a* and *b* are the same socket (two fds of one socket
        too, e.g. ``b = a.dup()``), a bad option, or a :class:`SocketLike` side
        that is blocking (its ``gettimeout()`` is not 0) and has no
        ``setblocking()``.
    :raises OSError: making a side non-blocking or setting ``TCP_NODELAY`` failed
        (the sockets are given back as they were), or ``poll`` failed.
    :raises Exception: what a :class:`SocketLike` side's method, or the
        ``shutdown()`` override of a ``socket.socket`` subclass side (the relay calls
        it for the half-close; never that of an ``ssl.SSLSocket`` subclass), raised
        that is not an :class:`OSError` (the relay is ended first, as described
        below).

    An exception raised while it waits (``KeyboardInterrupt``, or any exception from
    a signal handler) ends the relay as cancelling :func:`async_pipe_splice` does
    (pipes closed; sockets closed with ``close=True``, restored with ``close=False``)
    and propagates. With ``close=True`` a side whose incoming stream was cut off
    before its EOF is reset (``SO_LINGER`` 0), as after an error: its peer never
    takes a truncated stream for a complete one. (An AF_UNIX side cannot be made to
    reset: it is closed, and its peer sees EOF, or ``ECONNRESET`` only when bytes it
    sent were still unread; so is a :class:`SocketLike` without ``setsockopt``.)

    A child forked while the relay runs (from another thread) closes its copies of
    the relay's pipes, and of its sockets with ``close=True``: the relay does not run
    there, and they would keep the pipes' memory, and the connections, for the
    child's life.
    """
    _sweep_closed_hubs(None)
    relay = _Relay(a, b, pipe_size=pipe_size, idle_timeout=idle_timeout, close=close)
    return _run_blocking(relay)


# The shortest re-arm of an idle timer that fired before the deadline. uvloop
# (libuv) counts timers in whole milliseconds of a cached loop time, so it fires
# them up to 1 ms early, and a re-arm for the rest (under 1 ms) was a 0 ms timer:
# the loop spun, 27 callbacks in 0.13 ms, until the deadline had passed. At most
# 1 ms late instead.
_TIMER_MIN = 0.001

# How many times _finish_after() runs a finish() that signal handlers' exceptions cut
# short: each run goes on from the step after the last one started.
_FINISH_TRIES = 16


def _run_blocking(relay: _Relay) -> RelayStats:
    # Whatever escapes (KeyboardInterrupt or another exception from a signal
    # handler, MemoryError...) still ends the relay as cancelling the asyncio form
    # does: pipes closed, sockets closed (close=True) or restored (close=False).
    pending: BaseException | None = None
    try:
        registered: dict[int, int] = {}
        # fds that reported POLLHUP while the relay wanted nothing from them. poll
        # reports POLLHUP/POLLERR even for an empty mask, and HUP stays set (both
        # directions shut, e.g. the peer's FIN after our half-close) while the pipe
        # is full and the relay waits for the other side: polling such an fd would
        # spin. It is left out until the relay wants to read or write it again.
        # (Made before begin(): set() is a call, where a signal handler may run,
        # and nothing but this try's end may come between begin() and the next.)
        muted: set[int] = set()
        poller = select.poll()
        relay.begin()
    except BaseException:
        # Also a KeyboardInterrupt landing just after begin() returned: no byte has
        # moved yet, so the caller gets both sockets back as they were.
        relay.abandon()
        raise
    try:
        _drive(relay, poller, registered, muted)
    except _Failure as failure:
        relay.fail(failure)
    except BaseException as exc:
        pending = exc
        raise
    finally:
        # (No poller.unregister(): select.poll keeps its fds in user space, and the
        # poller is dropped here. Each call would be one more place for a signal
        # handler's exception to skip the finish.)
        try:
            stats = _finish_after(relay, pending)
        except BaseException as cut:
            _finish_again(relay, pending, cut)
            raise
    return stats


def _note(exc: BaseException, text: str) -> None:
    """``exc.add_note(text)``, also before Python 3.11 (PEP 678: a ``__notes__``
    list, which 3.11+ tracebacks print and the exceptiongroup backport shows)."""
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(text)
    else:  # Python 3.10
        setattr(exc, "__notes__", [*getattr(exc, "__notes__", ()), text])  # noqa: B010


def _finish_after(relay: _Relay, pending: BaseException | None) -> RelayStats:
    """``relay.finish()`` from a ``finally`` that *pending* may be leaving.

    What ``finish()`` raises (a SocketLike's ``close()`` failing) would replace the
    exception already ending the relay, a KeyboardInterrupt included, which
    ``except Exception`` would then swallow. It is noted on *pending* instead, and
    the first exception goes on, as the hub's crash path does.

    A signal handler's exception (a second Ctrl-C, a watchdog's) may also land
    between finish()'s steps, outside the ``try`` that guards each one, and leave
    the relay without stats: its pipes, and with ``close=True`` its sockets, open,
    and the relay pinned in ``_RUNNING``. finish() counts its steps, so it is run
    again from the step after the last one started, up to :data:`_FINISH_TRIES`
    times, and the interruption goes on once the relay has ended (or is noted on
    *pending*, which goes on). One landing as this function is entered, before its
    ``try``, is for the caller: :func:`_finish_again`.
    """
    cut: BaseException | None = None
    for _ in range(_FINISH_TRIES):
        try:
            try:
                stats = relay.finish()
            except Exception as late:
                if pending is None or late is pending:
                    raise
                _note(pending, f"and ending the relay raised {late!r}")
                assert relay.stats is not None  # finish() records them before raising
                stats = relay.stats
        except BaseException as exc:
            if relay.stats is not None or exc is pending:
                # finish() ended the relay and raised what one of its steps raised
                # (a SocketLike's close()). An interruption that cut an earlier run
                # short must not be lost to it (a caller catching OSError would
                # carry on after a Ctrl-C): it goes on, with that error noted.
                if cut is not None and pending is None and exc is not cut:
                    _note(cut, f"and ending the relay raised {exc!r}")
                    raise cut from None
                raise
            cut = cut or exc
            continue
        if cut is None:
            return stats
        if pending is None:
            raise cut
        _note(pending, f"and ending the relay was interrupted by {cut!r}")
        return stats
    assert cut is not None
    raise cut


def _finish_again(relay: _Relay, pending: BaseException | None, cut: BaseException) -> None:
    """After :func:`_finish_after` raised *cut*: if that was an interruption before
    the relay recorded its end (as the function was entered), end it now. The
    caller then raises *cut*."""
    if relay.stats is None and cut is not pending:
        with contextlib.suppress(BaseException):
            _finish_after(relay, pending or cut)


def _drive(relay: _Relay, poller: Any, registered: dict[int, int], muted: set[int]) -> None:
    """The blocking form's loop: until both directions are done or the idle timeout."""
    for flow in relay.flows:
        relay.pump(flow)
    while not relay.done:
        masks = relay.interest()
        if relay.gone:
            # A side closed itself after its EOF (_Relay.let_go): its number may
            # name anyone's socket now. (select.poll keeps its fds in user space:
            # unregistering a closed one is fine.)
            for fd in relay.gone:
                if fd in registered:
                    poller.unregister(fd)
                    del registered[fd]
                muted.discard(fd)
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
        if left is None:
            wait: int | None = None
        elif left <= 0:
            relay.timeout()
            break
        else:
            # Capped: the loop polls again until a long timeout is due.
            wait = min(_POLL_MAX_MS, int(left * 1000) + 1)
        events = poller.poll(wait)
        noise = False
        for fd, ev in events:
            if ev & _POLLERR:
                # A pending socket error (a reset) is reported here even when the
                # relay is not reading that side (its pipe is full): end now, not
                # at the idle timeout, and do not spin on the sticky POLLERR.
                _raise_pending_error(relay, fd)
                noise = True  # POLLERR, and no error: see below
            if ev & _POLLPRI:
                relay.urgent(fd)  # reported only while the relay reads fd
            # POLLHUP/POLLERR wake both ways: the next read/write reports what happened.
            hup = bool(ev & ~(_POLLIN_PRI | _POLLOUT))
            if hup and not registered.get(fd):
                muted.add(fd)
            relay.step(fd, bool(ev & _POLLIN_PRI) or hup, bool(ev & _POLLOUT) or hup)
        if noise and not relay.done and _HAS_EPOLL_ET:
            # POLLERR with SO_ERROR 0: the socket's error queue is not empty
            # (MSG_ZEROCOPY completions, SO_TIMESTAMPING TX timestamps, IP_RECVERR
            # reports that its owner has not read with MSG_ERRQUEUE yet). tcp_poll
            # reports POLLERR for as long as it is not empty, and poll(2) reports
            # POLLERR whatever the mask: every poll would return at once, a 100 %
            # CPU spin until the relay ends. The queue is the caller's: reading it
            # would take the completions they wait for. poll cannot be told to
            # leave out one fd's errors while still watching its bytes, so the rest
            # of this relay waits edge-triggered, where that state is reported once
            # per change, not at every wait.
            _drive_edge(relay)
            return


# Where there is no epoll (not Linux) there is no socket error queue either.
_HAS_EPOLL_ET = hasattr(select, "epoll")


def _drive_edge(relay: _Relay) -> None:
    """The rest of a blocking relay on an edge-triggered epoll (see :func:`_drive`).

    Edges are safe for the same reasons as in the asyncio form's hub: a flow stops
    reading only at EAGAIN (both flows now read until EAGAIN, as bursty sources
    do, so a FIN behind the last bytes is not left for an edge that already came),
    at its EOF, or when it stalls, and an fd is re-armed with EPOLL_CTL_MOD, which
    re-polls it, whenever what the relay waits for on it changes.
    """
    for flow in relay.flows:
        flow.bursty = flow.buffered = True
    # Kept on the relay, which is in _RUNNING until it finishes: a child forked
    # meanwhile (from another thread) closes its copy (_end_relays_in_child), which
    # it otherwise kept for its life, unreachable (this thread does not exist there).
    # Made and named under _FORK_GATE, which os.fork() takes first: a fork while
    # epoll_create1 ran (without the GIL) gave the child the fd before edge_ep named
    # it (a CI run's child kept it).
    with _FORK_GATE:
        relay.edge_ep = ep = select.epoll()
    try:
        armed: dict[int, int] = {}
        while not relay.done:
            masks = relay.interest()
            if relay.gone:
                # A side closed itself after its EOF (_Relay.let_go): disarmed, not
                # taken for lost below. The close dropped its registration unless
                # its file lives on elsewhere (a dup): then EPOLL_CTL_DEL by number
                # meets EBADF, or ENOENT on a number reused since, and what is left
                # is skipped below by number.
                for fd in relay.gone:
                    if armed.pop(fd, None) is not None:
                        with contextlib.suppress(OSError):
                            ep.unregister(fd)
            for fd, mask in masks.items():
                if armed.get(fd) == mask:
                    continue
                events = _EPOLLET
                if mask & _POLLIN:
                    events |= _EPOLLIN | _EPOLLPRI
                if mask & _POLLOUT:
                    events |= _EPOLLOUT
                for flow in relay.flows:
                    # Never arm a number its side gave up (let go of: not a failure).
                    if relay.lost(flow.name) and flow.src_fd not in relay.gone:
                        raise relay.closed_behind(flow.name)
                if fd in armed:
                    ep.modify(fd, events)
                else:
                    ep.register(fd, events)
                armed[fd] = mask
            left = relay.idle_left()
            if left is None:
                wait = -1.0
            elif left <= 0:
                relay.timeout()
                break
            else:
                wait = min(_POLL_MAX_MS / 1000, left + 0.001)
            for fd, ev in ep.poll(wait):
                if relay.gone and fd in relay.gone:
                    continue  # (see above)
                if ev & _EPOLLERR:
                    _raise_pending_error(relay, fd)  # a real error still ends it now
                if ev & _EPOLLPRI:
                    relay.urgent(fd)
                hup = bool(ev & (_EPOLLERR | _EPOLLHUP))
                readable = bool(ev & (_EPOLLIN | _EPOLLPRI)) or hup
                relay.step(fd, readable, bool(ev & _EPOLLOUT) or hup)
    finally:
        # Under the gate too: a fork inside close() (which runs without the GIL, the
        # object already marked closed) gave the child a copy that its ep.close()
        # could not close any more.
        with _FORK_GATE:
            ep.close()
            relay.edge_ep = None


# From include/net/tcp_states.h (tcpi_state, the first byte of struct tcp_info).
# Linux's numbering: elsewhere _tcp_state() tells nothing and poll decides.
_TCP_SYN_SENT = 2
_TCP_CLOSE = 7
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None


def _tcp_state(sock: Side) -> int:
    """*sock*'s TCP state from TCP_INFO (one getsockopt), or -1 when it cannot tell."""
    if _TCP_INFO is None:
        return -1
    getsockopt = getattr(sock, "getsockopt", None)
    if not callable(getsockopt):
        return -1
    try:
        info = getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)
    except OSError:
        return -1  # not TCP (AF_UNIX...)
    return info[0] if isinstance(info, bytes) and info else -1


def _tls_reset(sock: object, *, after_eof: bool = False) -> OSError | None:
    """If *sock* is a TLS side whose connection was reset, the reset as a plain
    side's read would report it; None otherwise (or when it cannot tell).

    Asked only when a TLS side's read said EOF (0) or its I/O raised
    ``SSLEOFError``/``SSLSyscallError``: CPython 3.10+ reports an ``ECONNRESET``
    met inside OpenSSL by a read or a write as ``SSLEOFError`` ("EOF occurred in
    violation of protocol"), and
    ``recv_into`` returns 0 for it (``suppress_ragged_eofs``, the default), so
    the exception cannot tell a reset from a ragged EOF and the 0 cannot tell
    it from a ``close_notify`` either. The kernel can: Linux moves a socket to
    ``TCP_CLOSE`` when an RST arrives (``tcp_reset`` -> ``tcp_done``), while a
    FIN leaves it in ``CLOSE_WAIT``. (A socket also reaches ``TCP_CLOSE`` after
    both FINs crossed, through ``TIME_WAIT``, but the relay never sends a FIN on
    a TLS side: its half-close is a ``close_notify`` record. Only a caller who
    shut the TCP connection under TLS down before the relay would see that FIN
    exchange taken for a reset.) Not a socket whose TLS layer is gone
    (``_sslobj`` None: its reads are plain ``recv``, which report a reset as
    such). Where there is no ``TCP_INFO`` (:func:`_tcp_state` says -1) nothing
    changes: such a reset reads as that side's EOF.

    The error is the socket's pending one (``SO_ERROR``) if OpenSSL's ``recv``
    left it there, else ``ECONNRESET`` (the ``recv`` that met the reset consumed
    it; ``ETIMEDOUT``, a keepalive or user timeout, ends in ``TCP_CLOSE`` too and
    is also a reset for :class:`End`).

    *after_eof* (a read returned 0): an RST that came after the peer's FIN does
    not make the stream before it a truncated one. Linux's ``tcp_reset`` leaves
    ``EPIPE`` pending for a socket in ``CLOSE_WAIT`` (``ECONNRESET`` otherwise),
    and a ``recv`` that meets the FIN returns 0 without taking it. The common
    cause is this very read: OpenSSL 3 answers a FIN without ``close_notify``
    (a "ragged" EOF, what most clients that just ``close()`` send) with a fatal
    alert, and a peer that has closed its socket answers that with an RST, on
    loopback before this check runs. That is the side's EOF, as it was before
    this check existed; the next write toward it fails as a plain side's does.
    """
    if not isinstance(sock, ssl.SSLSocket) or getattr(sock, "_sslobj", None) is None:
        return None
    if _tcp_state(sock) != _TCP_CLOSE:
        return None
    try:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:
        err = 0
    if after_eof and err == errno.EPIPE:
        return None
    code = err or errno.ECONNRESET
    return OSError(code, f"{os.strerror(code)} (under TLS, which reported it as an EOF)")


def _poll_out(fd: int) -> int:
    """*fd*'s poll events for writing, now (0: not writable, no error)."""
    if not hasattr(select, "poll"):
        return _POLLOUT  # nothing to ask: half-close at once, as always
    poller = select.poll()
    poller.register(fd, _POLLOUT)
    events = poller.poll(0)
    return events[0][1] if events else 0


def _fileno(sock: Side) -> int:
    """*sock*'s ``fileno()``, or -1 where it raises OSError.

    A socket.socket's reads -1 once closed; a SocketLike's may raise instead (an
    ``OSError(EBADF)``). Called raw in the relay's checks for a side closed behind
    its back, it let that OSError escape pipe_splice and the await, where it is that
    side's failure (End.ERROR, closed while the relay ran).
    """
    try:
        return sock.fileno()
    except OSError:
        return -1


def _raise_pending_error(relay: _Relay, fd: int) -> None:
    for name, sock in (("a", relay.a), ("b", relay.b)):
        if _fileno(sock) == fd:
            getsockopt = getattr(sock, "getsockopt", None)
            if not callable(getsockopt):
                return  # the next read or write reports it
            err = getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                exc = OSError(err, os.strerror(err))
                raise _Failure(name, _end_kind(exc), exc)
            return


async def async_pipe_splice(
    a: socket.socket | SocketLike,
    b: socket.socket | SocketLike,
    *,
    pipe_size: int | None = None,
    idle_timeout: float | None = None,
    close: bool = True,
) -> RelayStats:
    """:func:`pipe_splice` on the caller's running asyncio loop (default loop or uvloop).

    All relays of a loop share one epoll instance that the loop watches, so one
    thread drives thousands of relays; no thread is started. *b* may still be
    connecting (non-blocking ``connect`` in flight). Cancelling the task
    ends the relay, closes its pipes (and the sockets, with ``close=True``,
    resetting a side whose incoming stream was cut off before its EOF) and
    re-raises :class:`asyncio.CancelledError`; a task cancelled before its first
    step never ran this coroutine, so its sockets are untouched and still the
    caller's (:func:`start_pipe_splice` owns them from the call on).

    :param a: a connected stream socket.
    :param b: a connected stream socket.
    :param pipe_size: as for :func:`pipe_splice`.
    :param idle_timeout: as for :func:`pipe_splice`.
    :param close: as for :func:`pipe_splice`.
    :returns: :class:`RelayStats`.
    :raises RuntimeError: the coroutine is not run by an event loop, or the loop is
        shutting down (it closed its async generators: nothing would end the relay).
    :raises WrongSocketType: a side is not a stream socket, is a listening socket, or
        is neither connected nor connecting (no ``connect()``, or one that failed).
    :raises SocketClosed: a side is closed (its ``fileno()`` is -1 or raises
        :class:`OSError`; also by a relay of a loop closed with
        ``loop.close()`` alone that held it: every start ends those first).
    :raises InvalidArgument: *a* and *b* are the same socket (or two fds of it), a
        bad option, a :class:`SocketLike` side that is blocking and has no
        ``setblocking()``, or a socket is already in another running relay of this loop
        (also as another fd of it, e.g. ``a.dup()``; a :class:`SocketLike` is known
        by its ``fileno()``; checked by the loop's epoll hub, i.e. on Linux).
    :raises OSError: the loop's epoll instance could not be created (e.g. ``EMFILE``),
        or making a side non-blocking or setting ``TCP_NODELAY`` failed.
    :raises Exception: what a :class:`SocketLike` side's method, or the
        ``shutdown()`` override of a ``socket.socket`` subclass side (never called
        for an ``ssl.SSLSocket`` subclass), raised that is not an :class:`OSError`;
        the relay was ended first (as :func:`pipe_splice` does).

    Whatever fails before the relay runs gives both sockets back as they were
    (blocking mode, ``TCP_NODELAY``), whatever *close* says.
    """
    loop = asyncio.get_running_loop()  # RuntimeError before touching the sockets
    _sweep_closed_hubs(loop)
    if _is_quick(a, b, close, idle_timeout, pipe_size):
        quick = _start_quick(a, b, loop, _HeldFuture)
        return await _until_done(quick, quick.future)
    relay = _Relay(a, b, pipe_size=pipe_size, idle_timeout=idle_timeout, close=close)
    return await _run_async(relay)


def start_pipe_splice(
    a: socket.socket | SocketLike,
    b: socket.socket | SocketLike,
    *,
    pipe_size: int | None = None,
    idle_timeout: float | None = None,
    close: bool = True,
) -> asyncio.Future[RelayStats]:
    """Start :func:`async_pipe_splice` on the running loop and return its future.

    For accept loops written as callbacks (``loop.add_reader`` on a listener): no
    coroutine and no task per connection, which is measurable at thousands of new
    connections per second. The relay runs as soon as this returns; the future
    gets the :class:`RelayStats`. Cancelling the future ends the relay at once as
    cancelling :func:`async_pipe_splice` does (pipes closed; sockets closed with
    ``close=True``). A relay still running when the loop shuts down
    (``asyncio.run``, ``uvloop.run``, ``loop.shutdown_asyncgens()``) ends the same
    way; so does one of a loop closed with ``loop.close()`` alone, at the next start
    (a cancel of its future meanwhile waits for such a start ending it, in any
    thread, and returns False if that start ended it first). Must be called from the
    loop's thread, and the future cancelled there (``loop.call_soon_threadsafe(
    future.cancel)`` from another thread): a debug-mode loop's ``cancel()`` from
    another thread of a future with done-callbacks raises :class:`RuntimeError` as
    for any asyncio future, and the relay then ends in the loop's thread, its
    future's callbacks run there; one without (nothing awaits it), or on a loop not
    in debug mode, is not checked and ends the relay in the calling thread. What a
    :class:`SocketLike` side's method, or the ``shutdown()`` override of a
    ``socket.socket`` subclass side (never called for an ``ssl.SSLSocket``
    subclass), raises that is not an :class:`OSError` while the relay runs ends the
    relay and is set on the future; raised while it starts (``gettimeout()``,
    ``setblocking()``, ``getsockopt()`` of a wrapper), it is raised by this call,
    nothing started. A child forked while the relay runs closes its copies of the
    relay's pipes, and of its sockets with ``close=True``.

    :param a: a connected stream socket.
    :param b: a connected stream socket (its non-blocking connect may be in flight).
    :param pipe_size: as for :func:`pipe_splice`.
    :param idle_timeout: as for :func:`pipe_splice`.
    :param close: as for :func:`pipe_splice`.
    :returns: an :class:`asyncio.Future` of :class:`RelayStats`.
    :raises RuntimeError: no running event loop in this thread, or the loop is
        shutting down (it closed its async generators: nothing would end the relay).
    :raises WrongSocketType: a side is not a stream socket, is a listening socket, or
        is neither connected nor connecting (no ``connect()``, or one that failed).
    :raises SocketClosed: a side is closed (its ``fileno()`` is -1 or raises
        :class:`OSError`; also by a relay of a loop closed with
        ``loop.close()`` alone that held it: every start ends those first).
    :raises InvalidArgument: *a* and *b* are the same socket (or two fds of it), a
        bad option, a :class:`SocketLike` side that is blocking and has no
        ``setblocking()``, or a socket is already in another running relay of this loop
        (also as another fd of it, e.g. ``a.dup()``; a :class:`SocketLike` is known
        by its ``fileno()``; checked by the loop's epoll hub, i.e. on Linux).
    :raises OSError: the loop's epoll instance could not be created (e.g. ``EMFILE``),
        or making a side non-blocking or setting ``TCP_NODELAY`` failed.
    :raises Exception: what a :class:`SocketLike` side's method raised, other than
        an :class:`OSError`, while the relay started (its ``gettimeout()``,
        ``setblocking()`` or ``getsockopt()``). As for every failure above, nothing
        was started and both sockets are as they were.
    """
    loop = asyncio.get_running_loop()  # RuntimeError before touching the sockets
    _sweep_closed_hubs(loop)
    if _is_quick(a, b, close, idle_timeout, pipe_size):
        # The common case of a proxy's accept loop: see _Quick.
        return _start_quick(a, b, loop, _RelayFuture).future
    relay = _Relay(a, b, pipe_size=pipe_size, idle_timeout=idle_timeout, close=close)
    if not _HAS_EPOLL:
        try:
            _refuse_late_start(loop)
            task = loop.create_task(_run_async_selector(relay))
            # A task cancelled before its first step never runs its coroutine: the
            # CancelledError is thrown into it before its first line, so its
            # `finally` (which ends the relay) never runs either. The callback ends
            # the relay then (finish() runs once: after the coroutine's own finish
            # it only returns the stats). Not after a failed start: abandon() gave
            # the sockets back to the caller, and finish() would close them.
            task.add_done_callback(lambda _task: None if relay.abandoned else relay.finish())
        except BaseException:
            relay.abandon()
            raise
        return task
    try:
        future = _RelayFuture(loop=loop)
    except BaseException:
        relay.abandon()
        raise
    driven = future.driven = _start_async(relay, loop, future)
    if relay.opaque:
        # After future.driven is set: a relay that ends here breaks that cycle.
        driven.prime()
    return future


async def _run_async_selector(relay: _Relay) -> RelayStats:
    # Where there is no epoll: the loop's own add_reader/add_writer, re-armed when
    # what the relay waits for changes.
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    # fd -> the flow its reader or writer callback pumps.
    readers: dict[int, _Flow] = {}
    writers: dict[int, _Flow] = {}
    timer: asyncio.TimerHandle | None = None

    def arm(fd: int, flow: _Flow | None, table: dict[int, _Flow], writer: bool) -> None:
        """Have *fd*'s reader (writer) pump *flow*, or nothing if it is None."""
        armed = table.get(fd)
        if armed is flow:
            return
        if armed is not None:
            (loop.remove_writer if writer else loop.remove_reader)(fd)
            del table[fd]
        if flow is not None:
            (loop.add_writer if writer else loop.add_reader)(fd, on_ready, flow)
            table[fd] = flow

    def settle() -> None:
        # Each fd is the source of one direction and the destination of the other:
        # a reader on fd X serves the flow reading X, a writer the flow writing X,
        # and callbacks get their flow and need no lookup. Except while OpenSSL
        # needs the other I/O of a TLS side (_Flow.write_needs_read,
        # read_needs_write): then the flow writing X waits for X to be readable, or
        # the one reading it for X to be writable (after the flow that usually
        # waits for that readiness, whose pump sends the other back to its own).
        if finished.done():
            return
        if relay.done:
            finished.set_result(None)
            return
        f0, f1 = relay.flows
        for reading, writing in ((f0, f1), (f1, f0)):
            reads = reading.wants_read and not reading.shut
            # A held-back half-close waits for its destination to be writable, as
            # bytes do.
            writes = bool(writing.pending) or (writing.held and not writing.shut)
            reader = writer = None
            if reads and not reading.read_needs_write:
                reader = reading
            elif writes and writing.write_needs_read:
                reader = writing
            if writes and not writing.write_needs_read:
                writer = writing
            elif reads and reading.read_needs_write:
                writer = reading
            fd = reading.src_fd
            arm(fd, reader, readers, False)
            arm(fd, writer, writers, True)

    def on_ready(flow: _Flow) -> None:
        # The common case (a message read and written in full) leaves the flow
        # wanting exactly what it wanted before: nothing to re-register.
        before = (flow.wants_read, flow.pending > 0, relay.hold_changes)
        try:
            if not flow.shut:
                if flow.mode == _SPLICE:  # never where there is no splice (no Linux)
                    read = flow.moved + flow.pending
                    relay.pump(flow)
                    if (
                        flow.moved + flow.pending == read
                        and flow.wants_read
                        and not flow.urgent
                        and _at_mark(flow.src_fd)
                    ):
                        # The loop's selector does not report POLLPRI, and its
                        # readiness is level-triggered: a splice stopped at an urgent
                        # mark would be called again and again. Nothing was read:
                        # one ioctl tells.
                        flow.set_urgent()
                        relay.pump(flow)
                else:
                    relay.pump(flow)
            # relay.hold_changes moves when this pump half-closed the *other*
            # direction (a TLS side's deferred close_notify), which may have ended
            # the relay, or when a half-close was held back (OpenSSL kept a
            # close_notify, a FIN waits for the connect) or finally went out.
            if flow.shut or (flow.wants_read, flow.pending > 0, relay.hold_changes) != before:
                settle()
        except _Failure as failure:
            ended(failure)
        except Exception as exc:
            # Not a socket error (a SocketLike method raising ValueError...): the
            # coroutine raises it once the relay is ended, as pipe_splice does.
            lost(exc)
        except BaseException:
            # KeyboardInterrupt, SystemExit: out to the loop, as asyncio lets them
            # out of callbacks; the relay ends as if cancelled.
            finished.cancel()
            raise

    def ended(failure: _Failure) -> None:
        # relay.fail() shuts the surviving side down with close=False, calling its
        # own shutdown(): a SocketLike's or a socket.socket subclass's may raise
        # something other than OSError. Handled as on_ready's own exceptions are:
        # raised from a handler of on_ready's, it escaped its sibling clauses to the
        # loop's exception handler, and the task stayed pending for ever.
        def end() -> bool:
            relay.fail(failure)
            return True

        conclude(end)

    def conclude(end: Callable[[], bool]) -> None:
        """Run *end*, which ends the relay and returns True (False: not yet), then
        wake the coroutine; what *end* raises is handled as on_ready's own
        exceptions are."""
        try:
            if not end():
                return
        except Exception as exc:
            lost(exc)
            return
        except BaseException:
            finished.cancel()
            raise
        if not finished.done():
            finished.set_result(None)

    def lost(exc: Exception) -> None:
        """*exc*, raised by a wrapper while the relay runs or ends, for the await to
        raise; or, if the relay was cancelled meanwhile (that wrapper's shutdown()
        cancelled it, then raised), for the loop's exception handler, as the hub
        reports it (_Driven.crash): `finished` cannot hold it any more, and it was
        dropped without a word."""
        if not finished.done():
            finished.set_exception(_settable(exc))
        elif finished.cancelled():
            _report_lost(loop, exc, _RAISED_AFTER_CANCEL)

    def on_timer() -> None:
        nonlocal timer
        if finished.done():
            # The relay ended in this same loop iteration, before its timer's turn
            # (a reset read, then the timer due: a loop blocked past the timeout
            # runs both): `timer` is cancelled only when the coroutine resumes, in
            # the next iteration. Timing it out now ran timeout() on an ended relay,
            # a close=False wrapper's shutdown() called a second time.
            return

        # idle_left() calls dst's fileno() (note_queue), and timeout() the sides'
        # shutdown() with close=False: a wrapper's may raise (a closed io-style
        # wrapper's ValueError). Handled as on_ready does: unhandled, it went to the
        # loop's exception handler (a KeyboardInterrupt out of the loop) and the
        # task stayed pending for ever, its timer spent and nothing left to wake it.
        def end() -> bool:
            nonlocal timer
            left = relay.idle_left()
            assert left is not None
            if left > 0:
                timer = loop.call_later(max(left, _TIMER_MIN), on_timer)
                return False
            relay.timeout()
            return True

        conclude(end)

    try:
        relay.begin()
    except BaseException:
        finished.cancel()
        raise
    pending: BaseException | None = None
    dropped: BaseException | None = None
    try:
        try:
            try:
                for flow in relay.flows:
                    relay.pump(flow)
            except _Failure as failure:
                ended(failure)
        except (KeyboardInterrupt, SystemExit) as exc:
            # From a wrapper's method (its shutdown() as the other side's failure
            # ends the relay) or a signal handler, at this first pump, in the task's
            # own step: it goes on out of the coroutine now (the `finally` below
            # ends the relay first), and asyncio lets it out of the loop at once,
            # the task ending holding it, as for any interrupt in a task's step.
            # Re-raised from a later callback instead, it was lost when the loop
            # stopped in this iteration (run_until_complete() of a coroutine that
            # did not await the relay, then close()), and under asyncio.run() came
            # out of its shutdown_asyncgens(), cutting the shutdown short.
            _retrieve_when_done(exc)
            raise
        if relay.idle_timeout is not None:
            timer = loop.call_later(relay.idle_timeout, on_timer)
        settle()
        await finished
    except BaseException as exc:
        pending = exc
        if isinstance(exc, asyncio.CancelledError) and finished.done() and not finished.cancelled():
            # The task was cancelled after `finished` got a wrapper's exception
            # (lost()) but before the task resumed (a wait_for() timeout or a
            # cancel() due in the same loop iteration): Task.cancel() returns True
            # for a task whose awaited future is done already, and asyncio throws
            # CancelledError in here instead of the exception, which nothing would
            # raise or report: to the loop's exception handler once the relay has
            # ended, as the hub's coroutine form does (_run_async).
            dropped = finished.exception()
        raise
    finally:
        try:
            if timer is not None:
                timer.cancel()
            for fd in readers:
                loop.remove_reader(fd)
            for fd in writers:
                loop.remove_writer(fd)
        finally:
            try:
                stats = _finish_after(relay, pending)
            except BaseException as cut:
                _finish_again(relay, pending, cut)
                raise
        if isinstance(dropped, Exception):  # lost() sets nothing else
            _report_lost(loop, dropped, _DROPPED_BY_CANCEL)
    return stats


# ------------------------------------------------------------------ asyncio on epoll
#
# Driving relays through the loop's add_reader/add_writer costs a Handle, a
# selector-key lookup and a context switch per event, plus an epoll_ctl each time
# a wait changes. Instead every relay of one loop shares one epoll instance (the
# hub); the loop watches only the hub's fd, and the hub dispatches its events
# straight to the relays in one tight loop. An fd's interest is re-armed only when
# its relay stalls or resumes (a full pipe or destination), not per event.
#
# Edge-triggered: a level-triggered fd whose direction has ended (EOF) stays
# readable and must be disarmed, one epoll_ctl per connection that edges do not
# need. Edges lose nothing here: a flow stops reading only at a short read (the
# socket was empty; new bytes bring a new edge), at its EOF, or at a stall, and a
# stalled source is disarmed and, when the flow resumes, re-armed with
# EPOLL_CTL_MOD, which re-polls the socket and reports what arrived meanwhile.
# Arming everything once without disarming stalled sources (as nginx does) was
# measured too: every segment arriving at a stalled source then wakes the hub,
# ~8 % more CPU per GB in bulk here.

_EPOLLIN = getattr(select, "EPOLLIN", 1)
_EPOLLOUT = getattr(select, "EPOLLOUT", 4)
_EPOLLERR = getattr(select, "EPOLLERR", 8)
_EPOLLHUP = getattr(select, "EPOLLHUP", 16)
_EPOLLRDHUP = getattr(select, "EPOLLRDHUP", 0x2000)
_EPOLLET = getattr(select, "EPOLLET", 1 << 31)
_HAS_EPOLL = hasattr(select, "epoll")
_EPOLLPRI = getattr(select, "EPOLLPRI", 2)
_READ_EVENTS = _EPOLLIN | _EPOLLPRI | _EPOLLRDHUP | _EPOLLHUP | _EPOLLERR
_WRITE_EVENTS = _EPOLLOUT | _EPOLLHUP | _EPOLLERR
# RDHUP with IN: a peer's FIN comes flagged with its last bytes, and the relay reads
# the EOF in the same wakeup (one event less per closed connection).
# PRI: TCP urgent data, which stops splice at its mark (see _Flow).
_ARM_IN = _EPOLLIN | _EPOLLPRI | _EPOLLRDHUP | _EPOLLET
# The events of the fast path in _Driven.event: bytes, perhaps with the FIN.
_NOT_PLAIN_READ = ~(_EPOLLIN | _EPOLLRDHUP)


class _Hub:
    """One epoll instance per event loop, shared by all of that loop's relays."""

    __slots__ = ("closer", "ending", "ep", "fd", "inodes", "loop", "owners", "sockets", "twins")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # True while _end_closed_hubs ends this (closed) loop's relays: the hub
        # stays in _HUBS until the last of them has given its sockets back (see
        # close_if_idle), and a start that finds it there waits for the end.
        self.ending = False
        self.ep = select.epoll()  # close-on-exec since Python 3.4
        self.fd = self.ep.fileno()
        self.owners: dict[int, _Driven | _Quick] = {}
        # Which fd number watches each socket (by sockfs inode), and back: epoll
        # keys a registration on the open file *and* the fd number, so it takes a
        # dup of a watched socket as another file, and `owners` (by number) does
        # not see it either; two relays would then read one socket. Wrappers'
        # fds are not listed (see _inode).
        self.sockets: dict[int, int] = {}
        self.inodes: dict[int, int] = {}
        # The fds of further sockets whose inode number a listed one has: sockfs
        # numbers sockets from a 32-bit counter, which wraps, so two live sockets
        # may share one. Listed too, or the first one's entry would be overwritten
        # and, once the second's relay ended, a dup of the first accepted. (Empty
        # nearly always: unwatch() looks at it only when it is not.)
        self.twins: dict[int, list[int]] = {}
        self.closer: AsyncGenerator[None, None] | None = None
        reading = False
        try:
            loop.add_reader(self.fd, self.dispatch)
            reading = True
            # Starting the hook calls the loop's first-iteration hook, which may be
            # a foreign one that raises (or warnings turned into errors): the
            # epoll fd and the loop's reader on it must not outlive this hub.
            self.closer = _shutdown_hook(self)
        except BaseException:
            if reading:
                with contextlib.suppress(Exception):
                    loop.remove_reader(self.fd)
            self.ep.close()
            raise

    def dispatch(self) -> None:
        owners = self.owners
        try:
            events = iter(self.ep.poll(0))
        except BaseException:
            # Interrupted (a signal handler's KeyboardInterrupt) as epoll_wait
            # returned: whatever it took is lost, and an edge-triggered event not
            # delivered never comes back. Every fd is re-armed (below).
            self.repoll((fd, 0) for fd in list(owners))
            raise
        taken = -1  # the fd of the event taken and not yet delivered, if any
        try:
            for fd, ev in events:
                taken = fd
                driven = owners.get(fd)
                if driven is not None:
                    driven.event(fd, ev)
                taken = -1
        except BaseException:
            # event() ends its own relay on any exception; one that still escapes
            # (KeyboardInterrupt, a wrapper's close() failing), or an interrupt
            # before the event reached its relay, goes to the loop, but the rest of
            # this batch belongs to other relays, and an edge-triggered event not
            # delivered never comes back: re-arm their fds (EPOLL_CTL_MOD re-polls,
            # so what is ready is reported again at the hub's next wakeup; a relay
            # that ended is no longer an owner, and is left alone).
            self.repoll(itertools.chain(((taken, 0),) if taken >= 0 else (), events))
            raise

    def repoll(self, events: Iterator[tuple[int, int]]) -> None:
        for fd, _ev in events:
            driven = self.owners.get(fd)
            if driven is not None:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    self.ep.modify(fd, driven.masks[fd])

    def watch(self, fd: int, driven: _Driven | _Quick, inode: int | None, sock: Side) -> None:
        """Register *sock* (fd *fd*, sockfs inode *inode*, or None for a wrapper) for
        *driven*'s relay.

        :raises InvalidArgument: *sock* is in another running relay of the hub, by
            this fd or another fd of it (a dup).
        :raises OSError: epoll refused the fd.
        """
        owner = self.owners.get(fd)
        lost = None if owner is None else owner.lost(fd)
        if owner is not None and lost is None:
            raise InvalidArgument("socket", fd, "is already in a running relay")
        if inode is not None and inode in self.sockets and isinstance(sock, socket.socket):
            self.refuse_dup(fd, sock, inode)
        # A relay whose socket was closed behind its back (close() removed it from
        # the epoll: the kernel drops an fd's registration with its last reference)
        # still holds the number the kernel gave to this new socket. The number is
        # this relay's now: taken over first, so that ending the old relay neither
        # unregisters it nor closes the hub when it was the only other relay.
        try:
            self.ep.register(fd, _ARM_IN)
        except FileExistsError:
            # The number still names the file the running relay registered: its
            # socket object let go of the fd without closing it (detach(), or a
            # socket.socket(fileno=...) over the same fd), so fileno() reads -1
            # while the relay's socket lives on. Not lost, and not a second relay's.
            raise InvalidArgument("socket", fd, "is already in a running relay") from None
        self.owners[fd] = driven
        if owner is not None:
            self.forget(fd)  # the lost socket's entry: that relay never unwatches fd
        if inode is not None:
            self.inodes[fd] = inode
            if self.sockets.setdefault(inode, fd) != fd:
                self.twins.setdefault(inode, []).append(fd)  # another socket's number
        if owner is not None and lost is not None:
            owner.lose(fd, lost)

    def refuse_dup(self, fd: int, sock: socket.socket, inode: int) -> None:
        """Raise InvalidArgument if a socket the hub lists for *inode* is *sock*
        (fd *fd*) itself, i.e. *sock* is a dup of a relayed socket.

        :raises InvalidArgument: it is.
        """
        for other in (self.sockets[inode], *self.twins.get(inode, ())):
            owner = self.owners.get(other)
            if (
                other != fd
                and owner is not None
                and _same_socket(sock, owner.source(other), other, inode)
            ):
                raise InvalidArgument(
                    "socket", fd, f"is the socket of fd {other}, which is in a running relay"
                )

    def forget(self, fd: int) -> None:
        """Drop *fd*'s inode entry: its relay let go of it, or lost it."""
        inode = self.inodes.pop(fd, None)
        if inode is None:
            return
        twins = self.twins.get(inode)
        if twins is None:
            if self.sockets.get(inode) == fd:
                del self.sockets[inode]
            return
        if fd in twins:
            twins.remove(fd)
        elif self.sockets.get(inode) == fd:
            self.sockets[inode] = twins.pop()  # a twin still relayed stays listed
        if not twins:
            del self.twins[inode]

    def unwatch(self, fd: int, driven: _Driven | _Quick) -> None:
        if self.owners.get(fd) is driven:
            del self.owners[fd]
            if self.twins:
                self.forget(fd)  # some inode number is shared: the whole bookkeeping
            else:
                inode = self.inodes.pop(fd, None)  # forget(), inlined: once per side
                if inode is not None and self.sockets.get(inode) == fd:
                    del self.sockets[inode]
            try:  # noqa: SIM105 (contextlib.suppress costs ~0.5 us per call here)
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass  # closed behind the relay's back: nothing left to unregister

    def close_if_idle(self) -> None:
        if not self.owners and not self.ep.closed:
            # Nothing left: give the fd back rather than hold it for the loop's life.
            # A hub being ended stays listed: this runs as its last relay detaches,
            # before that relay gives its sockets back, and a start in another
            # thread that found no closed loop's hub would read them meanwhile
            # (_end_closed_hubs drops it once the whole shutdown() has run).
            if not self.ending and _HUBS.get(self.loop) is self:
                # pop: another thread may drop it meanwhile (a sweep, or a closed
                # loop's relay cancelled from the thread that holds its future).
                _HUBS.pop(self.loop, None)
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.fd)
            self.ep.close()
            closer, self.closer = self.closer, None
            if closer is not None:
                # Finished here, so the loop's shutdown has nothing to close and
                # the asyncgen finalizer never schedules a task for it.
                with contextlib.suppress(StopIteration):
                    closer.aclose().send(None)

    def shutdown(self) -> None:
        """End every relay of this hub as cancelling it would, then close the hub.

        Run when the loop shuts down (see :func:`_shutdown_hook`) or was found
        closed: relays started with :func:`start_pipe_splice` have no task that
        ``asyncio.run`` could cancel, and would otherwise keep their sockets, pipes
        and this epoll fd open, and their peers waiting, for the life of the process.
        """
        for driven in list(dict.fromkeys(self.owners.values())):
            try:
                driven.finalize()  # detaches; the last one closes the hub
            except Exception as exc:  # a SocketLike's close(): the await raises it
                if not driven.future.done():
                    with contextlib.suppress(RuntimeError):
                        driven.future.set_exception(_settable(exc))
                elif driven.future.cancelled():  # (its close() cancelled it first)
                    _report_lost(self.loop, exc)
            finally:
                # Also when a KeyboardInterrupt ends the loop here: a relay that
                # ended (or was detached) is no longer the hub's, and the next
                # shutdown() would never settle its future.
                if not driven.future.done():
                    with contextlib.suppress(RuntimeError):  # a closed loop's callbacks
                        driven.future.cancel()
        self.close_if_idle()


_HUBS: dict[asyncio.AbstractEventLoop, _Hub] = {}
# Held while a closed loop's hub is ended (see _end_closed_hubs); taken only by a
# start that finds such a hub, never on the way of one that finds none. Reentrant:
# ending a relay calls a SocketLike's close(), which may start a relay itself.
_SWEEP_LOCK = threading.RLock()


def _forget_hubs_in_child() -> None:
    # A forked child inherits every hub's epoll fd, an instance it would share with
    # its parent (an epoll instance lives on in the kernel while any fd refers to
    # it). Its loops are the parent's and do not run here: close the fds and start
    # afresh; a loop the child runs gets a hub of its own. (Their relays' pipes and
    # sockets: _end_relays_in_child, which runs next.)
    # A lock another thread of the parent held at the fork stays held in the child,
    # where that thread does not exist: the child's first sweep would wait forever.
    global _SWEEP_LOCK  # noqa: PLW0603 (a new lock, not the parent's copy)
    _SWEEP_LOCK = threading.RLock()
    hubs = list(_HUBS.values())
    _HUBS.clear()
    for hub in hubs:
        closer, hub.closer = hub.closer, None
        if closer is not None:
            # Finished now (hub.closer is None: it does nothing), so that no
            # asyncgen finalizer calls into the parent's loop when it is collected.
            with contextlib.suppress(StopIteration, RuntimeError):
                closer.aclose().send(None)
        with contextlib.suppress(OSError, ValueError):
            hub.ep.close()


# Every relay between begin() and the end of finish(), in any thread and driver (the
# hubs', the blocking form's, the fallback's): what a forked child must let go of.
# Strong references, but a running relay is held by its driver anyway (a hub, a
# thread's frame, a task). set.add/discard are atomic under the GIL.
_RUNNING: set[_Relay | _Quick] = set()


def _end_relays_in_child() -> None:
    """In a forked child: close the running relays' pipes (and a blocking relay's own
    epoll, see :func:`_drive_edge`), and the child's copies of the sockets of those
    that own them (``close=True``).

    The child inherits every fd of its parent, but none of the relays runs here (a
    hub's loop is the parent's, and its epoll fd is closed; a blocking relay's
    thread does not exist in the child). Their pipes (two fds each, up to *pipe_size*
    of kernel memory while they hold bytes) would stay open and unreachable for the
    child's life. And a socket is closed only when its last fd is: the parent's
    close() of a relay it cancelled would send neither the reset nor the EOF while
    the child lives (``multiprocessing`` forks by default on Linux up to Python 3.13).

    Runs in the child right after fork() (an at-fork hook): it must not raise,
    and calls no code of the caller's (a ``SocketLike``'s methods may take a lock a
    thread of the parent held at the fork, which nobody would release here). A
    relay's sockets are the caller's with ``close=False``, and stay open, as any
    socket across fork(); so do a ``SocketLike``'s, whose fd is the wrapper's
    business. One ``close`` per pipe or epoll fd, an ``fstat`` and a ``dup2`` per
    socket.
    """
    relays = list(_RUNNING)
    _RUNNING.clear()
    for relay in relays:
        # A blocking relay's own epoll (_drive_edge: a side with an unread error
        # queue); its close() is select.epoll's, idempotent and the caller's code
        # nowhere near it.
        ep = relay.edge_ep
        if ep is not None:
            relay.edge_ep = None
            with contextlib.suppress(OSError, ValueError):
                ep.close()
        for flow in relay.flows:
            # The numbers are forgotten first, so that nothing in the child closes or
            # pools them again once the kernel reuses them. (Library-owned: a flow
            # sets them to -1 before closing or pooling its pipe, and only after
            # the pipe was made, so a fork in another thread's close_pipe() or
            # to_splice() never has them name something else.)
            r, w = flow.pipe_r, flow.pipe_w
            flow.pipe_r = flow.pipe_w = -1
            for fd in (r, w):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
    placeholder = -1
    try:
        for relay in relays:
            if not relay.close:
                continue
            for sock, inode in zip((relay.a, relay.b), relay.inodes, strict=True):
                if inode is None:
                    continue  # a SocketLike (see above)
                # The C method: no Python override of a socket.socket subclass.
                fd = _socket.socket.fileno(sock)  # type: ignore[arg-type]
                try:
                    # The relay's socket still, not a number reused after a close
                    # behind its back (which the relay would have reported).
                    st = os.fstat(fd) if fd >= 0 else None
                    if st is None or st.st_ino != inode or not stat.S_ISSOCK(st.st_mode):
                        continue
                    if placeholder < 0:
                        # Opened after the pipes and the hubs' epoll fds were
                        # closed: those free numbers in a child of a parent that had
                        # reached its fd limit.
                        placeholder = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                    # Replaced, not closed: the child's socket object still holds
                    # the number, and its close() (or its finalizer) must not close
                    # whatever file the kernel would give that number next. The
                    # child's reference to the socket goes; the parent's fd, a
                    # reference of its own, is untouched.
                    os.dup2(placeholder, fd, inheritable=False)
                except OSError:
                    # fstat or dup2 refused, or no /dev/null (a chroot): this copy
                    # stays, as it did before (the pipes are closed all the same).
                    continue
    finally:
        if placeholder >= 0:
            os.close(placeholder)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_hubs_in_child)
    # After the hubs: their epoll fds are closed by then (see above).
    os.register_at_fork(after_in_child=_end_relays_in_child)


async def _loop_shutdown(hub: _Hub) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        if hub.closer is not None:  # else the hub closed itself and closes this
            hub.closer = None
            hub.shutdown()


def _shutdown_hook(hub: _Hub) -> AsyncGenerator[None, None]:
    """An async generator, started on the hub's loop, whose closing ends the hub.

    asyncio has no "loop closing" callback, but every orderly shutdown (``asyncio.run``,
    ``asyncio.Runner``, ``uvloop.run``, or the documented
    ``loop.run_until_complete(loop.shutdown_asyncgens())``) closes the async
    generators the loop has seen start: the loop's first-iteration hook records
    this one when it starts here, and its ``aclose()`` runs :meth:`_Hub.shutdown`.
    """
    agen = _loop_shutdown(hub)
    with contextlib.suppress(StopIteration):
        agen.asend(None).send(None)  # to its yield: the loop's firstiter hook sees it
    return agen


class _TooLate(Exception):
    """Raised by :class:`_Probe` when the loop's async generators were closed."""


class _Probe:
    """Stands for an async generator in :func:`_refuse_late_start`."""

    __slots__ = ("__weakref__",)  # the loop keeps its async generators in a WeakSet

    def __repr__(self) -> str:
        raise _TooLate

    async def aclose(self) -> None:
        """What a loop's shutdown would call; the probe never lives that long."""


def _refuse_late_start(loop: asyncio.AbstractEventLoop) -> None:
    """Raise RuntimeError if *loop* already closed its async generators.

    A relay is ended at the loop's shutdown by the async generator the hub starts
    (:func:`_shutdown_hook`); a task relay (the fallback driver) by the task
    cancelling that ``asyncio.run`` does just before. Both run before
    ``shutdown_default_executor()`` and ``loop.close()``, while the loop still runs
    callbacks: a relay started from one then (an accept callback) would never be
    ended, its sockets, pipes and the hub's epoll kept open and its peers left
    waiting. There is no "loop closing" callback to end it later, so the start is
    refused instead, the sockets given back unchanged as on every failed start.

    How to know: asyncio keeps ``_asyncgens_shutdown_called`` in a Python
    attribute (private, but there since 3.6; read with a default, so a loop
    without it goes on to the probe). uvloop keeps it in a C field nobody can
    read, but its first-iteration hook (``sys.get_asyncgen_hooks()``), like
    asyncio's, warns about an async generator started after the shutdown and
    formats the warning with its ``repr()``: a probe whose ``repr()`` raises
    tells, before any warning is issued. Otherwise the hook adds the probe to the
    loop's WeakSet of async generators, which drops it as soon as the probe goes
    away, here. The probe is trusted only with the loop's own hook: a foreign one
    (a tracer that logs ``repr(agen)`` and chains to the loop's) may call
    ``repr()`` itself on a healthy loop; with such a hook the relay starts, as
    it did before the check.

    :raises RuntimeError: the loop closed its async generators (it is shutting down).
    """
    closed = getattr(loop, "_asyncgens_shutdown_called", None)
    if closed is None:
        firstiter = sys.get_asyncgen_hooks().firstiter
        if firstiter is None or getattr(firstiter, "__self__", None) is not loop:
            return  # no hook, or a foreign one: it cannot tell
        try:
            firstiter(_Probe())  # type: ignore[arg-type]
        except _TooLate:
            closed = True
        except Exception:
            pass  # a loop hook that cannot take the probe tells nothing: start
    if closed:
        raise RuntimeError(
            f"{loop!r} is shutting down (its async generators were closed): a relay "
            "started now would never be ended"
        )


class _Driven:
    """A relay driven by a hub: reacts to events, re-arms its fds, ends its future."""

    __slots__ = ("ending", "fds", "future", "hub", "masks", "relay", "timer")

    def __init__(self, relay: _Relay, hub: _Hub, future: asyncio.Future[RelayStats]) -> None:
        self.relay, self.hub, self.future = relay, hub, future
        self.fds: list[int] = []
        self.masks: dict[int, int] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.ending = False  # finalize() is running (see there)

    def start(self) -> None:
        # No first read here: both fds are armed for reading, edge-triggered
        # (EPOLLET). EPOLL_CTL_ADD polls the socket once, so bytes (or a FIN)
        # already waiting raise an edge for the hub's next poll, and a side with
        # nothing to say costs no recv/EAGAIN round trip.
        relay = self.relay
        hub = self.hub
        for flow, inode in zip(relay.flows, relay.inodes, strict=True):  # a's, b's
            fd = flow.src_fd
            # Listed first: whatever watch() did before it failed, detach() undoes
            # (unwatch() lets go only of an fd this relay owns).
            self.fds.append(fd)
            hub.watch(fd, self, inode, flow.src)
            self.masks[fd] = _ARM_IN
        if relay.idle_timeout is not None:
            self.timer = self.hub.loop.call_later(relay.idle_timeout, self.on_timer)
        # A half-close held back (a TLS close_notify, or a FIN toward a socket still
        # connecting) waits for dst to be writable: the hub re-arms on the changes
        # event() compares, and this is not one of them. (A cycle relay <-> driven,
        # broken by detach().)
        relay.on_notify = self.rearm
        relay.on_gone = self.let_go

    def prime(self) -> None:
        """Read once, now, each source that may hold bytes its fd does not show.

        start() relies on EPOLL_CTL_ADD to report bytes already waiting, but it
        polls the kernel socket only: an ssl.SSLSocket whose caller read part of a
        TLS record (a proxy's ``recv(7)`` of a routing header) has the rest
        decrypted inside OpenSSL (``pending()``), with nothing left in the kernel,
        so no edge ever comes and the relay would wait for bytes it already has; a
        SocketLike may buffer the same way. Such a source is read as if it had
        reported readable (until EAGAIN: it is bursty); plain sockets never get
        here. The blocking and fallback drivers pump both flows at the start anyway.
        """
        for flow in self.relay.flows:
            if self.relay.stats is not None:
                return  # the first read ended the relay
            if not _is_kernel_socket(flow.src):
                self.event(flow.src_fd, _EPOLLIN)

    def event(self, fd: int, ev: int) -> None:
        relay = self.relay
        f0, f1 = relay.flows
        reader, writer = (f0, f1) if f0.src_fd == fd else (f1, f0)
        # One try for the whole event (free in CPython 3.11+ until something raises):
        # whatever escapes a relay must end that relay, not the hub's batch (see
        # _Hub.dispatch), and must reach whoever awaits it.
        try:
            if (
                not ev & _NOT_PLAIN_READ
                and reader.mode == _SMALL
                and not (reader.pending or reader.eof or relay.crossing)
            ):
                # Bytes (and perhaps the FIN) of short messages, the events of
                # keep-alive traffic and of connection churn: only *reader* can
                # change, and when its message went out in full it waits for
                # exactly what it waited for before: nothing to compare or re-arm.
                relay.pump(reader, ev != _EPOLLIN)
                if f0.shut and f1.shut:
                    self.end()
                elif reader.pending or reader.mode != _SMALL:
                    self.rearm()  # stalled, or a stream now: what it waits for changed
                return
            # What the two flows wait for; the common event (a message read and
            # written in full) changes none of it, and then there is nothing to re-arm.
            before = (f0.wants_read, f0.pending, f0.shut, f1.wants_read, f1.pending, f1.shut)
            # A TLS read OpenSSL answered with SSLWantWriteError (_Flow.
            # read_needs_write: a handshake message, e.g. the ~26 KB certificate
            # chain a TLS 1.3 post-handshake CertificateRequest asks for, that
            # the socket's send buffer had no room for) waits for its fd to be
            # writable. Edge-triggered, nothing else retries it: the bytes that
            # followed may sit decrypted in OpenSSL, and no readable edge comes.
            crossed = (f0.read_needs_write, f1.read_needs_write) if relay.crossing else None
            changes = relay.hold_changes
            if ev & _EPOLLERR:
                # A pending error (a reset) ends the relay now, even while it is not
                # reading that side (its pipe is full).
                _raise_pending_error(relay, fd)
            if ev & _EPOLLPRI:
                reader.set_urgent()
            if ev & _READ_EVENTS and not reader.shut and (reader.wants_read or ev & _EPOLLHUP):
                relay.pump(reader, bool(ev & _EPOLLRDHUP))
            # `writer.held` (a held-back half-close to retry) is looked at only
            # when no bytes are pending, i.e. never in a plain stream.
            if ev & _WRITE_EVENTS and (writer.pending or writer.held) and not writer.shut:
                relay.pump(writer)
            if ev & _WRITE_EVENTS and reader.read_needs_write and not reader.shut:
                relay.pump(reader)  # OpenSSL's pending write may go now, the read on
            if crossed is not None:
                for flow, was in zip((f0, f1), crossed, strict=True):
                    if was and not (flow.read_needs_write or flow.shut) and flow.wants_read:
                        # Sent back to its usual wait by the other flow's write (which
                        # flushed OpenSSL's pending bytes): what OpenSSL now lets it
                        # read may already be inside it, so read now, not at an edge
                        # that may never come (one read more when it read on itself).
                        relay.pump(flow)
            if f0.shut and f1.shut:
                self.end()
            elif relay.hold_changes != changes or before != (
                f0.wants_read,
                f0.pending,
                f0.shut,
                f1.wants_read,
                f1.pending,
                f1.shut,
            ):
                self.rearm()
        except _Failure as failure:
            self.fail(failure)
        except Exception as exc:
            # Not a socket error: a bug, or a SocketLike method raising something
            # else (a PROXY-protocol wrapper's ValueError). The relay ends as an
            # exception out of pipe_splice's wait ends it, and the await raises it.
            self.crash(exc)
        except BaseException:
            # KeyboardInterrupt, SystemExit (e.g. from a signal handler): the loop
            # lets them out of its callbacks, and so does the relay, after ending
            # itself (its state may be torn mid-pump) as a cancel would.
            self.crash(None)
            raise

    def go_on(self, reader: _Flow, drain: bool) -> None:
        """Go on with an event a :class:`_Quick` handed over part way (see
        :meth:`_Quick.promote`): *reader* read what it says, and the rest is as
        :meth:`event`'s fast path does it."""
        relay = self.relay
        try:
            if not reader.pending:
                relay.pump(reader, drain)
            f0, f1 = relay.flows
            if f0.shut and f1.shut:
                self.end()
            elif reader.pending or reader.mode != _SMALL:
                self.rearm()
        except _Failure as failure:
            self.fail(failure)
        except Exception as exc:
            self.crash(exc)
        except BaseException:
            self.crash(None)
            raise

    def source(self, fd: int) -> Side:
        """The side this relay watches as fd *fd*."""
        f0, f1 = self.relay.flows
        return f0.src if f0.src_fd == fd else f1.src

    def lost(self, fd: int) -> str | None:
        """The side whose fd *fd* was, if it was closed behind the relay's back."""
        for flow in self.relay.flows:
            if flow.src_fd == fd and _fileno(flow.src) != fd:
                return flow.name
        return None

    def lose(self, fd: int, name: str) -> None:
        """Side *name* was closed by someone else and its fd number *fd* went to a
        new relay (:meth:`_Hub.watch`): end this relay as that side's failure,
        without touching *fd* again."""
        self.fds.remove(fd)
        self.fail(self.relay.closed_behind(name))

    def let_go(self, fd: int) -> None:
        """The side whose fd was *fd* closed itself after its EOF
        (:meth:`_Relay.let_go`): *fd* is out of the hub now, as if this relay had
        never watched it.

        Kept, its closed number stayed registered to this relay: the next re-arm
        (EPOLL_CTL_MOD on it fails) or another relay given that number
        (:meth:`_Hub.watch` takes it over) ended this one as closed behind its back,
        and the bytes it still held for the other side were lost. The close took
        the registration with it (unless a dup keeps the file open): unwatch()
        ignores the EBADF or ENOENT of its EPOLL_CTL_DEL.
        """
        if fd in self.fds:
            self.fds.remove(fd)
            self.masks.pop(fd, None)
            self.hub.unwatch(fd, self)

    def fail(self, failure: _Failure) -> None:
        """End the relay as *failure* says. Ending it calls the sides' shutdown() or
        close(), and a SocketLike's may raise: that ends the relay as any exception
        from a wrapper does (the await raises it), not in the loop's handler."""
        try:
            self.relay.fail(failure)
            self.end()
        except Exception as exc:
            self.crash(exc)
        except BaseException:
            self.crash(None)
            raise

    def crash(self, exc: Exception | None) -> None:
        """Something other than a socket error escaped the relay: end it (pipes freed,
        sockets closed or restored as *close* says) and fail its future with *exc*
        (cancel it when None)."""
        try:
            self.finalize()
        except Exception as late:
            # A wrapper's close() failed too, or only it (end() raised, and this is
            # its second finalize, which closes nothing again): the await raises
            # the first exception.
            if exc is None:
                raise
            if late is not exc:
                _note(exc, f"and ending the relay raised {late!r}")
        finally:
            if not self.future.done():
                if exc is None:
                    self.future.cancel()
                else:
                    self.future.set_exception(_settable(exc))
            elif exc is not None and self.future.cancelled():
                # A wrapper's method (its recv_into(), the shutdown() a failure
                # calls, or its close() as the relay ends) cancelled its own
                # relay's future, then raised: the future cannot hold it, so it
                # goes where a cancel puts it (_RelayFuture._cancel), not nowhere.
                loop = self.future.get_loop()
                if exc is self.relay.finish_error:  # a close() (or give-back) failed
                    _report_lost(loop, exc)
                else:
                    _report_lost(loop, exc, _RAISED_AFTER_CANCEL)

    def rearm(self) -> None:
        # An fd is armed (always edge-triggered) for what its relay waits for:
        # reading unless the flow is stalled, writing while bytes are pending.
        # A direction that has ended
        # keeps whatever it had: an edge-triggered EOF does not repeat, and a
        # later error or hang-up is worth one event.
        masks = self.masks
        relay = self.relay
        f0, f1 = relay.flows
        for reader, writer in ((f0, f1), (f1, f0)):
            fd = reader.src_fd
            armed = masks.get(fd)
            if armed is None:
                continue  # a side that closed itself after its EOF (see let_go)
            if reader.eof or reader.shut:
                mask = armed & _ARM_IN
            else:
                mask = _ARM_IN if reader.wants_read else _EPOLLET
            # A held-back half-close (a close_notify OpenSSL kept, a FIN waiting
            # for the connect) goes out when the socket is writable, and so does
            # the handshake message a TLS read must write first (read_needs_write).
            if ((writer.pending or writer.held) and not writer.shut) or (
                reader.read_needs_write and reader.wants_read and not reader.shut
            ):
                mask |= _EPOLLOUT
            if armed != mask:
                try:
                    self.hub.ep.modify(fd, mask)
                except OSError:
                    # ENOENT/EBADF: the socket was closed behind the relay's back
                    # (its registration went with it); not an error of the relay's.
                    if relay.lost(reader.name):
                        raise relay.closed_behind(reader.name) from None
                    raise
                masks[fd] = mask

    def on_timer(self) -> None:
        try:
            # idle_left() calls dst's fileno() (note_queue): a wrapper's may raise
            # too (a closed io-style wrapper's ValueError), and unhandled it went to
            # the loop's exception handler, the relay pending for ever (its timer
            # spent, its sockets perhaps silent).
            left = self.relay.idle_left()
            assert left is not None
            if left > 0:
                self.timer = self.hub.loop.call_later(max(left, _TIMER_MIN), self.on_timer)
                return
            self.relay.timeout()
            self.end()
        except Exception as exc:  # a SocketLike's fileno(), shutdown() or close()
            self.crash(exc)
        except BaseException:
            # KeyboardInterrupt, SystemExit (a signal handler, a wrapper's shutdown()
            # or close()): out to the loop as from event(), after ending the relay
            # as a cancel would. Nothing else would: its timer has fired, and with
            # close=False it stayed in the hub, its sockets non-blocking.
            self.crash(None)
            raise

    def end(self) -> None:
        stats = self.finalize()
        if stats is not None and not self.future.done():
            self.future.set_result(stats)

    def finalize(self) -> RelayStats | None:
        """End the relay, once: take it out of the hub, then finish() it.

        :returns: its stats, or None while this thread is ending it further up the
            stack (a SocketLike's ``close()`` cancelling its own relay's future).
        :raises BaseException: what ``finish()`` raised (a SocketLike's ``close()``),
            or what interrupted the detach (a KeyboardInterrupt), once the relay has
            ended all the same.
        """
        # Only finalize() finishes a hub-driven relay, so relay.stats says whether
        # it already ran, and `ending` whether it is running: a finalize() reentered
        # meanwhile (from a wrapper's close()) ran finish()'s body a second time,
        # every close() twice. Another thread never comes in between: a loop's
        # relays are ended in its thread, and a closed loop's (off it) only under
        # _SWEEP_LOCK, by the sweep or by _RelayFuture.cancel.
        stats = self.relay.stats
        if stats is not None or self.ending:
            return stats
        self.ending = True
        try:
            try:
                # Unregister before the sockets close: epoll keys on the open file,
                # and a dup of it elsewhere would keep a closed fd's registration
                # alive.
                self.detach()
            except BaseException as exc:
                # A KeyboardInterrupt from a signal handler, most likely in one of
                # detach()'s epoll_ctl calls: the relay is out of the hub (or partly),
                # where nothing would end it any more (its future pending for ever,
                # its sockets and four pipe fds held). What is left of the detach
                # (each step is idempotent), then the finish, then the interrupt.
                try:
                    self.detach()
                finally:
                    _finish_after(self.relay, exc)
                raise
            try:
                return self.relay.finish()  # may raise what a wrapper's close() raised
            except BaseException as exc:
                if self.relay.stats is None:
                    # Interrupted before it recorded the end (a KeyboardInterrupt as
                    # it was entered): the relay is out of the hub, where nothing
                    # would end it any more, its sockets open for good. finish()
                    # again (it goes on from the step it reached), then the
                    # interrupt.
                    _finish_after(self.relay, exc)
                raise
        finally:
            self.ending = False  # an interrupted finish() may be run again
            if isinstance(self.future, _HeldFuture):
                # Break the future <-> relay cycle: refcounting frees both at once,
                # not the cyclic GC after thousands of relays have piled up. (Both
                # futures that know their driver: start_pipe_splice's, and a quick
                # async_pipe_splice's, which held its relay, flows and hub in a
                # cycle once handed over.)
                self.future.driven = None

    def detach(self) -> None:
        self.relay.on_notify = self.relay.on_gone = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for fd in self.fds:
            self.hub.unwatch(fd, self)
        self.fds = []
        self.hub.close_if_idle()


# What a _Quick relay handles itself: bytes, perhaps with the FIN, or the hang-up
# that follows its own half-close. Anything else (an error, urgent data, a write
# event) is the full machinery's (see _Quick.event).
_NOT_QUICK = ~(_EPOLLIN | _EPOLLRDHUP | _EPOLLHUP)


class _Quick:
    """A :func:`start_pipe_splice` relay of two plain TCP sockets (``socket.socket``
    itself, AF_INET or AF_INET6) with ``close=True`` and neither *idle_timeout* nor
    *pipe_size*, for as long as it only moves messages that the scratch buffer holds
    and the destination takes in full: what connection churn is made of.

    On that path it makes the syscalls a :class:`_Driven` over a :class:`_Relay`
    makes, in the same order, with one object where they need five (the relay,
    its two flows, the driver and its lists), and none of their generic lookups:
    ~6 us of Python per connection less (user time over a ``wrk`` churn run, see
    docs/performance.md). At the first thing it does not handle (an event other
    than readable, EOF or hang-up; a send that left bytes; a read that filled the
    scratch, i.e. a stream; an EOF before any byte went either way, whose FIN may
    have to wait for the connect; a failure; a cancel; the loop's shutdown) it
    hands itself over (:meth:`promote`) to a :class:`_Driven` and :class:`_Relay`
    built from its state, which take the event on from where it stood. The hub,
    the future, the fork hook and the sweeps see it as they see a :class:`_Driven`
    (the same methods) until then.
    """

    __slots__ = (
        "a",
        "b",
        "done_a",
        "done_b",
        "fa",
        "fb",
        "future",
        "hub",
        "inodes",
        "moved_a",
        "moved_b",
        "nodelay_a",
        "promoted",
        "started",
        "stats",
        "ta",
        "tb",
    )
    # What the fork hook (_end_relays_in_child) reads of a running relay: this one
    # owns its sockets and has no pipe and no epoll of its own.
    close = True
    flows: tuple[_Flow, ...] = ()
    edge_ep: select.epoll | None = None

    def __init__(
        self,
        a: socket.socket,
        b: socket.socket,
        inodes: tuple[int | None, int | None],
        hub: _Hub,
        *,
        future: _HeldFuture,
        ta: float | None,
        tb: float | None,
        nodelay_a: bool | None,
    ) -> None:
        self.a, self.b = a, b
        self.fa, self.fb = a.fileno(), b.fileno()
        self.inodes = inodes
        self.hub, self.future = hub, future
        # What begin() would record (see _Relay.saved): the timeouts, a's old
        # TCP_NODELAY.
        self.ta, self.tb, self.nodelay_a = ta, tb, nodelay_a
        self.moved_a = self.moved_b = 0
        # A direction is done when its EOF was read and its half-close went out
        # (a _Flow's eof and shut: this relay never has one without the other).
        self.done_a = self.done_b = False
        self.promoted: _Driven | None = None
        self.stats: RelayStats | None = None
        self.started = time.monotonic()

    @property
    def masks(self) -> dict[int, int]:
        # Both fds stay armed as registered (_ARM_IN): a message that went out in
        # full changes nothing a re-arm would.
        return {self.fa: _ARM_IN, self.fb: _ARM_IN}

    def event(self, fd: int, ev: int) -> None:
        """As :meth:`_Driven.event`: one epoll event of fd *fd*."""
        try:
            if ev & _NOT_QUICK:
                # (In the try: an interrupt in promote() ends the relay, below.)
                self.promote().event(fd, ev)
                return
            if fd == self.fa:
                if self.done_a:
                    return  # a hang-up after a's EOF: nothing more to read
                src, dst, name = self.a, self.b, "a"
            else:
                if self.done_b:
                    return
                src, dst, name = self.b, self.a, "b"
            # This thread's scratch, looked up per event (see _Relay._pump_small).
            scratch = _scratch()
            while True:
                try:
                    n = src.recv_into(scratch)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    driven = self.promote()
                    driven.fail(driven.relay.failure(name, exc))
                    return
                if n == 0:
                    self._eof(name, dst, ev != _EPOLLIN)
                    return
                try:
                    m = dst.send(scratch[:n])
                except (BlockingIOError, InterruptedError):
                    m = 0  # full, or its connect still in flight
                except OSError as exc:
                    driven = self.promote()
                    driven.fail(driven.relay.failure(_other(name), exc))
                    return
                if name == "a":
                    self.moved_a += m
                else:
                    self.moved_b += m
                if m < n or n == _COPY_BUFFER:
                    self._hand_over(name, scratch, n, m, ev != _EPOLLIN)
                    return
                if ev == _EPOLLIN:
                    return  # a short read without the FIN emptied the socket
        except Exception as exc:
            # Not a socket error (a MemoryError, a bug): ended as _Driven.event ends it.
            self.promote().crash(exc)
        except BaseException:
            self.promote().crash(None)
            raise

    def _hand_over(self, name: str, scratch: memoryview, n: int, m: int, drain: bool) -> None:
        """A send of *n* bytes took *m*: keep the rest for dst, and/or go to splice
        (the read filled the scratch: a stream). The full relay's from here."""
        driven = self.promote()
        flow = driven.relay.flows[0] if name == "a" else driven.relay.flows[1]
        # As _Relay._pump_small leaves a flow after such a send.
        flow.upgrade = n == _COPY_BUFFER and flow.can_splice
        if m < n:
            flow.left = bytes(scratch[m:n])
            flow.pending = n - m
        driven.go_on(flow, drain)

    def _eof(self, name: str, dst: socket.socket, drain: bool) -> None:
        """Side *name* sent its EOF: half-close *dst*, as _Relay._shut does."""
        # dst's bytes or EOF prove its connect done; bytes sent to it do not (a Fast
        # Open connect takes them in SYN_SENT): see _Relay._shut.
        answered = self.moved_b or self.done_b if name == "a" else self.moved_a or self.done_a
        if not answered and (self.moved_a if name == "a" else self.moved_b):
            # A request went to dst and no answer came yet (HTTP/1.0 style): one
            # TCP_INFO read tells a connected dst, whose half-close goes out here
            # as ever, from a Fast Open connect still in SYN_SENT (or one that
            # failed), which the full relay waits for (or reports).
            answered = _tcp_state(dst) not in {_TCP_SYN_SENT, _TCP_CLOSE}
        if not answered:
            # dst's connect may still be in flight, and a shutdown() then would drop
            # it: the full relay checks (see _Relay._connected).
            driven = self.promote()
            flow = driven.relay.flows[0] if name == "a" else driven.relay.flows[1]
            flow.eof = True
            driven.go_on(flow, drain)
            return
        if name == "a":
            self.done_a = True
        else:
            self.done_b = True
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                driven = self.promote()
                driven.fail(driven.relay.failure(_other(name), exc))
                return
        if self.done_a and self.done_b:
            self._end()

    def _end(self) -> None:
        """Both directions are done: as _Driven.end (detach, then _Relay.finish)."""
        hub = self.hub
        hub.unwatch(self.fa, self)
        hub.unwatch(self.fb, self)
        hub.close_if_idle()
        error: BaseException | None = None
        try:
            self.a.close()
        except BaseException as exc:
            error = exc
        try:
            self.b.close()
        except BaseException as exc:
            error = error or exc
        # As _Relay.finish builds it (no frozen dataclass __init__).
        stats = object.__new__(RelayStats)
        stats.__dict__.update(
            a_to_b=self.moved_a,
            b_to_a=self.moved_b,
            a_end=End.EOF,
            b_end=End.EOF,
            failed=None,
            error=None,
            spliced=False,
            duration=time.monotonic() - self.started,
            spliced_bytes=0,
            fallback=None,
        )
        self.stats = stats
        _RUNNING.discard(self)
        future = self.future
        future.driven = None  # the cycle future <-> relay, as finalize() breaks it
        if error is None:
            if not future.done():
                future.set_result(stats)
            return
        # A close() failed (EBADF: closed behind the relay's back at the last
        # moment), or was interrupted: as _Driven.crash reports what finish() raised.
        if isinstance(error, Exception):
            if not future.done():
                future.set_exception(_settable(error))
            elif future.cancelled():
                _report_lost(future.get_loop(), error)
            return
        if not future.done():
            future.cancel()
        raise error

    def promote(self) -> _Driven:
        """Hand the relay over to a :class:`_Driven` and :class:`_Relay` in the same
        state (built once; later calls return that driver), which take its place in
        the hub, its future and the running set.

        Each call completes the hand-over: a KeyboardInterrupt from a signal handler
        may land anywhere in it, and the caller's cleanup (a crash, a finalize)
        promotes again, which must leave no entry behind (the hub's or the running
        set's, where nothing would end it)."""
        driven = self.promoted
        if driven is None:
            driven = self._successor()
            self.promoted = driven
        hub = self.hub
        owners = hub.owners
        for fd in (self.fa, self.fb):
            if owners.get(fd) is self:
                owners[fd] = driven
        if self.future.driven is self:
            self.future.driven = driven
        if self in _RUNNING:
            _RUNNING.add(driven.relay)  # first: a fork in between finds one of them
            _RUNNING.discard(self)
        return driven

    def _successor(self) -> _Driven:
        """The :class:`_Driven` over a :class:`_Relay` in this relay's state."""
        a, b = self.a, self.b
        relay = _Relay.__new__(_Relay)
        saved: list[tuple[SocketLike, float | None, bool | None]] = [
            (a, self.ta, self.nodelay_a),
            (b, self.tb, None),
        ]
        relay._build(
            a,
            b,
            self.inodes,
            close=True,
            idle_timeout=None,
            pipe_size=None,
            saved=saved,
            unblocking=saved,
            kernel=(True, True),
            unix_a=False,
            unix_b=False,
            force_copy=False,
        )
        f0, f1 = relay.flows
        # The numbers this relay watches, not what fileno() reads now: a side closed
        # behind its back reads -1, and the relay must find it lost by its number.
        f0.src_fd = f1.dst_fd = self.fa
        f0.dst_fd = f1.src_fd = self.fb
        f0.moved, f1.moved = self.moved_a, self.moved_b
        for flow, done in ((f0, self.done_a), (f1, self.done_b)):
            if done:
                flow.eof = flow.shut = True
                relay.ends[flow.name] = End.EOF
        relay.started = relay.last = self.started
        relay.nodelay_set = True
        relay.unblocked = (self.ta != 0.0) + (self.tb != 0.0)
        relay.stats = self.stats
        hub = self.hub
        driven = _Driven(relay, hub, self.future)
        driven.fds = [self.fa, self.fb]
        driven.masks = {self.fa: _ARM_IN, self.fb: _ARM_IN}
        relay.on_notify = driven.rearm
        relay.on_gone = driven.let_go
        return driven

    def finalize(self) -> RelayStats | None:
        """As :meth:`_Driven.finalize` (a cancel, the loop's shutdown)."""
        if self.stats is not None:
            return self.stats
        try:
            driven = self.promote()
        except BaseException:
            # Interrupted (a signal handler's KeyboardInterrupt) while handing over:
            # the relay is ended all the same, as _Driven.finalize ends one
            # interrupted in its detach, then the interrupt goes on.
            self.promote().finalize()
            raise
        return driven.finalize()

    def prime(self) -> None:
        """As :meth:`_Driven.prime`: nothing to read, plain sockets hold no bytes
        their fds do not show."""

    def source(self, fd: int) -> Side:
        return self.a if fd == self.fa else self.b

    def lost(self, fd: int) -> str | None:
        if fd == self.fa and _fileno(self.a) != fd:
            return "a"
        if fd == self.fb and _fileno(self.b) != fd:
            return "b"
        return None

    def lose(self, fd: int, name: str) -> None:
        self.promote().lose(fd, name)


def _is_quick(a: object, b: object, close: object, idle_timeout: object, pipe_size: object) -> bool:
    """Whether a relay of *a* and *b* with these options starts as a :class:`_Quick`:
    two plain TCP sockets (socket.socket itself, IPv4 or IPv6), close=True, no
    idle_timeout, no pipe_size, on Linux."""
    return (
        close is True
        and idle_timeout is None
        and pipe_size is None
        and a.__class__ is socket.socket
        and b.__class__ is socket.socket
        and _HAS_EPOLL  # a hub to run it (tests take it away to run the fallback)
        and _HAS_SPLICE
        and _raw_family(a) in _INET
        and _raw_family(b) in _INET
    )


def _start_quick(
    a: Any, b: Any, loop: asyncio.AbstractEventLoop, future_type: type[_HeldFuture]
) -> _Quick:
    """A relay of two plain TCP sockets with close=True and no options (see
    :func:`_is_quick`): the steps of _Relay(), _start_async() and begin(), for a
    :class:`_Quick`, whose future (a *future_type*) is the relay's."""
    inodes = _check_pair(a, b)
    nodelay_a: bool | None = None
    try:  # noqa: SIM105 (contextlib.suppress costs ~0.5 us per call here)
        nodelay_a = _raw_getsockopt(a, _IPPROTO_TCP, _TCP_NODELAY) != 0
    except OSError:
        pass  # not TCP: setting it below reports it
    ta, tb = a.gettimeout(), b.gettimeout()
    future = future_type(loop=loop)
    hub = _HUBS.get(loop)
    if hub is None:
        # Only a new hub can be late: a loop's shutdown ends and drops its hub.
        _refuse_late_start(loop)
        hub = _HUBS[loop] = _Hub(loop)
    quick: _Quick | None = None
    nodelay_set = False
    unblocked = 0
    try:
        quick = _Quick(a, b, inodes, hub, future=future, ta=ta, tb=tb, nodelay_a=nodelay_a)
        future.driven = quick
        if quick.fa < 0 or quick.fb < 0:
            # Closed since _check_pair (by another thread, or by a signal handler):
            # the same closed side, not a ValueError from epoll.register(-1). Side
            # a first, as _check_pair names it (see _Relay.__init__).
            name, sock = ("a", a) if quick.fa < 0 else ("b", b)
            raise SocketClosed(sock, f"relay side {name}")
        hub.watch(quick.fa, quick, inodes[0], a)
        hub.watch(quick.fb, quick, inodes[1], b)
        # begin()'s steps, in its order.
        nodelay_set = True
        if nodelay_a is not True:
            a.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
        b.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
        if ta != 0.0:
            unblocked += 1
            a.setblocking(False)
        if tb != 0.0:
            unblocked += 1
            b.setblocking(False)
    except BaseException:
        # As a failed _start_async: out of the hub, and both sockets given back as
        # they were (through the full relay's own undo).
        if quick is None:
            hub.close_if_idle()
            raise
        driven = quick.promote()
        driven.relay.nodelay_set = nodelay_set
        driven.relay.unblocked = unblocked
        try:
            driven.detach()
        finally:
            driven.relay.abandon()
            future.driven = None
        raise
    # Running from here until it ends: a forked child closes its copies of the
    # sockets (see _end_relays_in_child).
    _RUNNING.add(quick)
    return quick


class _HeldFuture(asyncio.Future[RelayStats]):
    """The future of a relay that knows its driver (a :class:`_Quick` hands it over
    to the :class:`_Driven` it promotes to): :func:`async_pipe_splice`'s quick
    relays, whose coroutine ends the relay when cancelled, as for any relay."""

    __slots__ = ("driven",)
    driven: _Driven | _Quick | None


class _RelayFuture(_HeldFuture):
    """The future :func:`start_pipe_splice` returns: cancelling it ends the relay."""

    __slots__ = ()

    def cancel(self, msg: Any | None = None) -> bool:
        if self.get_loop().is_closed():
            # Another thread's start may be ending this closed loop's relays at this
            # moment (_end_closed_hubs), this one among them: both ran finish(), each
            # side's close() twice, and a pipe closed by one was pooled by the other
            # (two threads' pools then held one fd: a later EBADF, or a close of an
            # unrelated file that took the number). Under the sweep's lock the relay
            # has one ender: this waits for a sweep under way, which ends the relay
            # and cancels the future first (this then returns False), or the sweep
            # waits for this cancel and finds the relay gone from its hub.
            with _SWEEP_LOCK:
                return self._cancel(msg)
        return self._cancel(msg)

    def _cancel(self, msg: Any | None) -> bool:
        # The done-callbacks, which asyncio drops when it cannot schedule them (below).
        callbacks = getattr(self, "_callbacks", None) or ()
        try:
            if not super().cancel(msg):
                return False
        except RuntimeError:
            # A closed loop's future with done-callbacks: the C Future marks itself
            # cancelled, then fails to schedule them ("Event loop is closed"). The
            # relay must still end here, or it keeps its sockets, pipes and the hub
            # until some later start's sweep, its peers waiting.
            if not self.cancelled():
                raise
            loop = self.get_loop()
            if not loop.is_closed():
                # A wrong thread's cancel() of a running debug-mode loop's future
                # (asyncio's and uvloop's call_soon check the thread only then):
                # marked cancelled the same way, then "Non-thread-safe operation",
                # the callbacks dropped. The relay must not end in this thread, which
                # its loop's thread may be running at this moment, but it must end:
                # the future is done, so a later cancel() returns False, and the
                # relay ran on, its bytes flowing, until the loop's shutdown. Its
                # loop ends it, then runs the callbacks (a task awaiting the future
                # gets its CancelledError instead of waiting for ever); the error
                # still tells the caller. (A loop closed meanwhile: the next
                # start's sweep ends the relay.)
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._end_cancelled, callbacks)
                raise
        self._end_relay()
        return True

    def _end_relay(self) -> None:
        """End the relay of this cancelled future, in its loop's thread (or under
        _SWEEP_LOCK for a closed loop's)."""
        if self.driven is not None:
            try:
                self.driven.finalize()
            except Exception as exc:
                # A SocketLike's close() failed as the relay ended: the future is
                # cancelled and cannot hold it, and cancel() may be called by asyncio
                # itself (wait_for, gather): report it as a failed callback is.
                _report_lost(self.get_loop(), exc)

    def _end_cancelled(self, callbacks: Any) -> None:
        """On the loop, after another thread's cancel() raised: end the relay, then
        schedule the done-callbacks *callbacks* ((callback, context) pairs) that
        asyncio could not."""
        try:
            self._end_relay()
        finally:
            loop = self.get_loop()
            for callback, context in callbacks:
                loop.call_soon(callback, self, context=context)


def _retrieve_when_done(exc: BaseException) -> None:
    """Mark *exc* retrieved on the current task if it ends holding it.

    *exc*, a KeyboardInterrupt or SystemExit, is leaving the task's step: asyncio
    sets it on the task and lets it out of the loop, and nothing awaits the task
    any more, so the task's collection logged "Task exception was never retrieved".
    A done-callback retrieves it when the task ends, if the loop runs again
    (asyncio.run() and Runner do, in their shutdown; uvloop runs it before it lets
    the interrupt out): a loop closed without running again never runs it, as for
    any task an interrupt leaves. The task may end later than this step: its
    coroutine may await in a ``finally`` (``await writer.wait_closed()``) or an
    ``async with`` exit (a TaskGroup's children) while the interrupt leaves it.

    The callback keeps the interrupt's id, not the interrupt: a caller that catches
    it and runs on, relaying in the same task, would otherwise keep every caught
    interrupt, its traceback, the relay's frames and the sockets they held, until
    the task ended (it keeps one small callback per caught interrupt). So only an
    exception with that id is retrieved, and only if the task ends holding it: one
    the caller raised later is not this relay's to silence (unless, freed, it
    reused the interrupt's id: then its log alone is lost).
    """
    task = asyncio.current_task()
    if task is None:  # driven by something other than an asyncio task
        return
    ident = id(exc)

    def retrieve(done: asyncio.Future[Any]) -> None:
        # _exception (C and Python futures alike) is read first because exception()
        # marks whatever the task holds retrieved; it raises for a cancelled task.
        if not done.cancelled() and id(getattr(done, "_exception", None)) == ident:
            done.exception()

    task.add_done_callback(retrieve)


# _report_lost's messages for what a cancelled relay could not raise: a wrapper's
# exception that ended the relay, dropped when its task was cancelled before it
# resumed to raise it; an exception a wrapper's method (recv_into(), send(),
# shutdown()...) raised while the relay ran or failed, after that method, or one
# before it, cancelled the relay; and a close() failing as the relay's sockets are
# closed or given back (the default).
_DROPPED_BY_CANCEL = "a relay cancelled before it raised its wrapper's exception"
_RAISED_AFTER_CANCEL = "a cancelled relay's wrapper raised"


def _report_lost(
    loop: asyncio.AbstractEventLoop,
    exc: Exception,
    message: str = "closing a cancelled relay's sockets failed",
) -> None:
    """Hand *exc*, from closing a relay whose future is cancelled (or what *message*
    says), to *loop*'s exception handler: the future cannot hold it any more."""
    loop.call_exception_handler({"message": message, "exception": exc})


def _end_closed_hubs() -> None:
    """End the relays of loops closed without an orderly shutdown (``loop.close()``
    alone) and close their hubs: they can never run again, and would keep their
    sockets, pipes, epoll fd and loop for the life of the process, their peers
    waiting. Called by every start, in any thread (see :func:`_sweep_closed_hubs`);
    returns once no closed loop's hub is left, other than one being ended further
    up this thread's stack (a start made by a SocketLike's close() that it calls).
    """
    # list() copies in one step: loops in other threads add and drop hubs. No lock
    # for the look (the common case: every hub's loop open, or none but this one).
    for hub in list(_HUBS.values()):
        if hub.loop.is_closed():
            break
    else:
        return
    # One thread at a time ends closed loops' hubs, and each stays in _HUBS until
    # its shutdown() has run (close_if_idle leaves an ending hub listed): a start
    # in another thread that comes meanwhile finds it, and waits here for the
    # relays, and what they give back or close, to end before it reads its own
    # sockets. (A hub dropped before its relays ended let such a start see
    # nothing to end, and build its relay on sockets a close=False relay was
    # about to give back blocking, or a close=True one to close.)
    with _SWEEP_LOCK:
        for old in list(_HUBS.values()):
            # ending: this thread is ending it already, further up the stack.
            if old.ending or not old.loop.is_closed() or _HUBS.get(old.loop) is not old:
                continue
            try:
                old.ending = True
                old.shutdown()
            finally:
                # Also on KeyboardInterrupt part-way: the hub stays listed, not
                # ending, so the next start ends the rest.
                old.ending = False
            if _HUBS.get(old.loop) is old:
                _HUBS.pop(old.loop, None)  # its relays have all ended: let it go


def _sweep_closed_hubs(loop: asyncio.AbstractEventLoop | None) -> None:
    """Run :func:`_end_closed_hubs` if a loop other than *loop* (the starting relay's,
    or None for the blocking form) has a hub, which may be a closed loop's.

    Every start calls this first, before it builds its :class:`_Relay`: a closed
    loop's relay may hold the very sockets being started, and ending it closes them
    (``close=True``) or gives them back blocking, with their old ``TCP_NODELAY``
    (``close=False``). A relay built before would have recorded them as that relay
    left them (non-blocking, ``TCP_NODELAY`` on), so its begin() would not make them
    non-blocking, and a blocking splice or recv would freeze the new relay's loop;
    or its start would meet their fds closed (a bare OSError, not SocketClosed).
    Relays another thread is ending at that moment are waited for, for the same
    reason (see :func:`_end_closed_hubs`). Looked for at every start, not only at a
    new hub's, or a proxy whose loop always has a relay would never free them (a
    len() and a lookup per start with one loop; with hubs of several loops, a copy
    of the list and an ``is_closed()`` per loop).
    """
    if len(_HUBS) > (loop in _HUBS):
        _end_closed_hubs()


def _start_async(
    relay: _Relay, loop: asyncio.AbstractEventLoop, future: asyncio.Future[RelayStats] | None = None
) -> _Driven:
    # Every failure here (a socket already in another relay of this loop, no fd
    # left for the hub's epoll...) gives both sockets back as they were, whatever
    # close= says: the relay never ran, and another relay may own a socket.
    driven: _Driven | None = None
    hub: _Hub | None = None
    try:
        hub = _HUBS.get(loop)
        if hub is None:
            # Only a new hub can be late: a loop's shutdown ends and drops its hub.
            _refuse_late_start(loop)
            hub = _HUBS[loop] = _Hub(loop)
        driven = _Driven(relay, hub, future if future is not None else loop.create_future())
        driven.start()
        relay.begin()
    except BaseException:
        if driven is not None:
            driven.detach()  # the hub closes if this relay was its only one
        elif hub is not None:
            hub.close_if_idle()
        relay.abandon()
        raise
    return driven


async def _run_async(relay: _Relay) -> RelayStats:
    if not _HAS_EPOLL:
        try:
            _refuse_late_start(asyncio.get_running_loop())
        except BaseException:
            relay.abandon()
            raise
        return await _run_async_selector(relay)
    driven = _start_async(relay, asyncio.get_running_loop())
    return await _until_done(driven, driven.future, prime=relay.opaque)


async def _until_done(
    driven: _Driven | _Quick, future: asyncio.Future[RelayStats], *, prime: bool = False
) -> RelayStats:
    """Wait for the hub-driven relay *driven*, whose future is *future*, to end (read
    its opaque sources first with *prime*); a cancel ends it here."""
    dropped: BaseException | None = None
    try:
        if prime:
            driven.prime()
        return await future
    except asyncio.CancelledError:
        if future.done() and not future.cancelled():
            # The task was cancelled after a wrapper's exception ended the relay
            # (_Driven.crash set it on `future`) but before the task resumed (a
            # wait_for() timeout or a cancel() due in the same loop iteration):
            # Task.cancel() returns True for a task whose awaited future is done
            # already (it asks only a pending one to cancel), and asyncio throws
            # CancelledError in here instead of the exception, which nothing would
            # raise or report. It goes to the loop's exception handler once the
            # relay has ended, as the fallback driver's does. (A stats result is
            # dropped as any cancelled relay's.)
            dropped = future.exception()
        raise
    finally:
        try:
            driven.finalize()  # a no-op unless cancelled: then the relay ends here
        finally:
            # (`is not None` first: the per-connection path pays only that.)
            if dropped is not None and isinstance(dropped, Exception):
                # (crash() and the hub's shutdown() set nothing else)
                _report_lost(future.get_loop(), dropped, _DROPPED_BY_CANCEL)
