"""The relay's contract with its sides, its caller and a forked child: whose methods it
calls, what it closes, what its errors and documentation say."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import inspect
import os
import re
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import uvloop

import reuselb._relay as relay_mod
from reuselb import End, RelayStats, WrongSocketType, pipe_splice, start_pipe_splice
from tests.conftest import open_fds, until_in_or
from tests.test_relay import (
    _MSG_ZEROCOPY,
    _SO_ZEROCOPY,
    JOIN,
    RUNNERS,
    Relay,
    _file_id,
    _fork_reporting,
    _recv_bytes,
    _relay_with_an_error_queue,
    tcp_pair,
)
from tests.test_relay_tls import Running, Setup, _tls_contexts, make_setup

pytestmark = pytest.mark.linux

# Every form: the blocking one, asyncio and uvloop (the epoll hub), start_pipe_splice
# from a callback, and the driver used where there is no epoll.
FORMS = ["splice", "asyncio", "uvloop", "asyncio-start", "asyncio-selector"]


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0), backlog=1024) as lst:
        yield lst


# --------------------------------------------------------------------------- shutdown


class Framed(socket.socket):
    """A framing layer's socket: its shutdown() ends the stream with a marker of its
    own before the FIN, and records every call."""

    calls: list[int]

    def shutdown(self, how: int, /) -> None:
        self.calls.append(how)
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            with_marker = socket.socket.send(self, b"<END>")
            assert with_marker == 5
        super().shutdown(how)


class FramedIO(Framed):
    """The same with its own recv_into/send: relayed as a wrapper (Fallback.WRAPPER)."""

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0, /) -> int:
        return super().recv_into(buffer, nbytes, flags)

    def send(self, data: Any, flags: int = 0, /) -> int:
        return super().send(data, flags)


def _framed(sock: socket.socket, cls: type[Framed]) -> Framed:
    framed = cls(fileno=sock.detach())
    framed.calls = []
    return framed


def _read_to_eof(sock: socket.socket) -> bytes:
    sock.settimeout(JOIN)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("cls", [FramedIO, Framed])
@pytest.mark.parametrize("mode", FORMS)
def test_a_socket_subclass_s_own_shutdown_is_the_half_close(
    listener: socket.socket, mode: str, cls: type[Framed]
) -> None:
    # A socket.socket subclass that overrides shutdown() (a framing layer's
    # end-of-stream record, here "<END>" before the FIN) had it bypassed: the relay
    # called socket.socket.shutdown on it directly, so the client got the backend's
    # bytes and a bare FIN, without the layer's marker. Whether it overrides
    # recv_into/send too (relayed as a wrapper) or not (spliced).
    client, s = tcp_pair(listener)
    a = _framed(s, cls)
    b, backend = tcp_pair(listener)
    try:
        backend.sendall(b"response")
        backend.shutdown(socket.SHUT_WR)  # b's EOF: the relay half-closes a
        client.shutdown(socket.SHUT_WR)
        stats: RelayStats = RUNNERS[mode](a, b, idle_timeout=JOIN)
        assert (stats.a_end, stats.b_end, stats.failed) == (End.EOF, End.EOF, None)
        assert stats.fallback == (relay_mod.Fallback.WRAPPER if cls is FramedIO else None)
        assert _read_to_eof(client) == b"response<END>"
        assert a.calls == [socket.SHUT_WR]
        assert _read_to_eof(backend) == b""
    finally:
        for sock in (client, a, b, backend):
            sock.close()


@pytest.mark.parametrize("mode", FORMS)
def test_a_socket_subclass_s_own_shutdown_ends_a_close_false_relay(
    listener: socket.socket, mode: str
) -> None:
    # close=False: the idle timeout (as an error would) shuts both sides down,
    # SHUT_RDWR, so their peers see the end. A subclass's override was bypassed
    # there too: its peer got no marker.
    client, s = tcp_pair(listener)
    a = _framed(s, FramedIO)
    b, backend = tcp_pair(listener)
    try:
        stats: RelayStats = RUNNERS[mode](a, b, idle_timeout=0.2, close=False)
        assert (stats.a_end, stats.b_end) == (End.TIMEOUT, End.TIMEOUT)
        assert a.calls == [socket.SHUT_RDWR]
        assert a.fileno() != -1  # the caller's still
        assert _read_to_eof(client) == b"<END>"
        assert _read_to_eof(backend) == b""  # a plain side: the kernel's shutdown
    finally:
        for sock in (client, a, b, backend):
            sock.close()


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return _tls_contexts(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("mode", FORMS)
def test_a_tls_side_given_back_after_a_timeout_keeps_its_tls_state(
    listener: socket.socket, contexts: tuple[ssl.SSLContext, ssl.SSLContext], mode: str
) -> None:
    # The SSLSocket case the subclass rule must keep: ssl.SSLSocket.shutdown sets
    # _sslobj to None before the kernel's call, so the relay's close=False shutdown
    # of a TLS side is the kernel's alone, and the caller gets the TLS state back.
    setup = make_setup(listener, contexts, "client-tls")
    try:
        r = Running(RUNNERS[mode], setup, idle_timeout=0.2, close=False)
        stats = r.join()
        assert (stats.a_end, stats.b_end) == (End.TIMEOUT, End.TIMEOUT)
        assert isinstance(setup.a, ssl.SSLSocket)
        assert setup.a._sslobj is not None  # type: ignore[attr-defined]
    finally:
        setup.close()


class LoggedSSL(ssl.SSLSocket):
    """An ssl.SSLSocket subclass (SSLContext.sslsocket_class) whose shutdown() records
    its calls and ends in SSLSocket.shutdown, which drops the TLS state."""

    calls: ClassVar[list[int]] = []

    def shutdown(self, how: int) -> None:
        LoggedSSL.calls.append(how)
        super().shutdown(how)


@pytest.fixture(scope="module")
def logged_contexts(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server, client = _tls_contexts(tmp_path_factory.mktemp("tls-logged"))
    server.sslsocket_class = LoggedSSL
    return server, client


def _read_tls_to_eof(sock: socket.socket) -> bytes:
    sock.settimeout(JOIN)
    data = b""
    while chunk := sock.recv(65536):  # b"" at the peer's close_notify
        data += chunk
    return data


@pytest.mark.parametrize("mode", FORMS)
def test_an_ssl_socket_subclass_s_shutdown_is_not_called(
    listener: socket.socket, logged_contexts: tuple[ssl.SSLContext, ssl.SSLContext], mode: str
) -> None:
    # 284a437 bypassed only ssl.SSLSocket.shutdown itself: a subclass overriding it
    # (here logging, then super()) had it called for close=False's SHUT_RDWR, which
    # dropped the TLS state the caller gets back (_sslobj None), while its half-close
    # was the relay's close_notify all the same. No SSLSocket's shutdown is called.
    setup = make_setup(listener, logged_contexts, "client-tls")
    LoggedSSL.calls = []
    try:
        assert isinstance(setup.a, LoggedSSL)
        setup.backend.sendall(b"response")
        setup.backend.shutdown(socket.SHUT_WR)  # b's EOF: a close_notify to a
        r = Running(RUNNERS[mode], setup, idle_timeout=0.3, close=False)
        assert _read_tls_to_eof(setup.client) == b"response"
        stats = r.join()
        assert (stats.a_end, stats.b_end, stats.b_to_a) == (End.TIMEOUT, End.EOF, 8)
        assert LoggedSSL.calls == []
        assert setup.a._sslobj is not None  # type: ignore[attr-defined]
    finally:
        setup.close()


class FailingShutdown(socket.socket):
    """A framing layer whose end-of-stream record cannot be written: its shutdown()
    fails with *errno_* (a class attribute set per test)."""

    errno_ = errno.EIO

    def shutdown(self, how: int, /) -> None:
        raise OSError(self.errno_, f"framing layer: shutdown({how}) failed")


class FailingShutdownIO(FailingShutdown):
    """The same relayed as a wrapper (its own recv_into/send)."""

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0, /) -> int:
        return super().recv_into(buffer, nbytes, flags)

    def send(self, data: Any, flags: int = 0, /) -> int:
        return super().send(data, flags)


class ClosingShutdown(socket.socket):
    """A layer whose end-of-stream also ends the socket: its shutdown() closes it."""

    def shutdown(self, how: int, /) -> None:
        self.close()


class ClosingShutdownIO(ClosingShutdown):
    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0, /) -> int:
        return super().recv_into(buffer, nbytes, flags)

    def send(self, data: Any, flags: int = 0, /) -> int:
        return super().send(data, flags)


class Like:
    """A SocketLike (not a socket.socket) whose shutdown() fails with *fail* or, if
    *fail* is None, closes it."""

    def __init__(self, sock: socket.socket, fail: int | None) -> None:
        self.sock, self.fail = sock, fail

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_into(self, buffer: memoryview, /) -> int:
        return self.sock.recv_into(buffer)

    def send(self, data: memoryview | bytes, /) -> int:
        return self.sock.send(data)

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()

    def shutdown(self, how: int, /) -> None:
        if self.fail is None:
            self.sock.close()
        else:
            raise OSError(self.fail, f"wrapper: shutdown({how}) failed")

    def close(self) -> None:
        self.sock.close()


class LikeRaising(Like):
    """A SocketLike whose fileno() raises OSError(EBADF) once closed, as some
    wrappers' do (a socket.socket's reads -1)."""

    def fileno(self) -> int:
        fd = self.sock.fileno()
        if fd == -1:
            raise OSError(errno.EBADF, "wrapper: closed")
        return fd


SIDE_KINDS = ["subclass", "subclass-wrapper", "socketlike", "socketlike-raising"]


def _side(sock: socket.socket, kind: str, fail: int | None) -> Any:
    if kind == "socketlike":
        return Like(sock, fail)
    if kind == "socketlike-raising":
        return LikeRaising(sock, fail)
    if fail is None:
        return (ClosingShutdown if kind == "subclass" else ClosingShutdownIO)(fileno=sock.detach())
    cls = FailingShutdown if kind == "subclass" else FailingShutdownIO
    side = cls(fileno=sock.detach())
    side.errno_ = fail
    return side


@pytest.mark.parametrize(
    ("fail", "end"), [(errno.EIO, End.ERROR), (errno.EPIPE, End.RESET)], ids=["EIO", "EPIPE"]
)
@pytest.mark.parametrize("kind", SIDE_KINDS)
@pytest.mark.parametrize("mode", FORMS)
def test_a_failed_half_close_is_a_reset_only_for_a_reset_s_errno(
    listener: socket.socket, mode: str, kind: str, fail: int, end: End
) -> None:
    # A half-close whose shutdown() failed was End.RESET whatever the errno; End.RESET
    # is ECONNRESET, EPIPE, ECONNABORTED and ETIMEDOUT only, any other error
    # End.ERROR, as for every other failure of a side.
    client, s = tcp_pair(listener)
    a = _side(s, kind, fail)
    b, backend = tcp_pair(listener)
    try:
        backend.sendall(b"response")
        backend.shutdown(socket.SHUT_WR)  # b's EOF: the relay half-closes a
        stats: RelayStats = RUNNERS[mode](a, b, idle_timeout=JOIN)
        assert (stats.a_end, stats.b_end, stats.failed) == (end, End.EOF, "a")
        assert isinstance(stats.error, OSError)
        assert stats.error.errno == fail
        assert "shutdown(1) failed" in str(stats.error)
    finally:
        for sock in (client, a, b, backend):
            sock.close()


@pytest.mark.parametrize("close", [True, False], ids=["close", "keep"])
@pytest.mark.parametrize("kind", SIDE_KINDS)
@pytest.mark.parametrize("mode", FORMS)
def test_a_side_whose_shutdown_closes_it_ends_the_relay_at_once(
    listener: socket.socket, mode: str, kind: str, close: bool
) -> None:
    # A side whose own shutdown() closes it: the blocking form's next read of it
    # ended the relay (side closed while the relay ran); the close took the fd out of
    # the epoll hub and the loop's selector, and the asyncio forms waited for the
    # idle timeout (for ever without one). The idle timeout here only bounds the old
    # failure: the relay must end long before it.
    client, s = tcp_pair(listener)
    a = _side(s, kind, None)
    b, backend = tcp_pair(listener)
    try:
        backend.sendall(b"response")
        backend.shutdown(socket.SHUT_WR)  # b's EOF: the relay half-closes a
        # (close=False: the give-back of a wrapper whose fileno() raises once closed
        # raised that OSError out of the relay instead of returning the stats.)
        stats: RelayStats = RUNNERS[mode](a, b, idle_timeout=5, close=close)
        assert (stats.a_end, stats.b_end, stats.failed) == (End.ERROR, End.EOF, "a")
        assert isinstance(stats.error, OSError)
        assert stats.error.errno == errno.EBADF
        assert str(stats.error) == "[Errno 9] relay side a was closed while the relay ran"
        assert stats.b_to_a == 8
        if close:
            with pytest.raises(ConnectionResetError):  # b reset: a's stream was cut off
                _read_to_eof(backend)
        else:
            assert b.fileno() != -1  # the caller's, given back open
    finally:
        for sock in (client, a, b, backend):
            sock.close()


@pytest.mark.parametrize("close", [True, False], ids=["close", "keep"])
@pytest.mark.parametrize("kind", SIDE_KINDS)
@pytest.mark.parametrize("mode", FORMS)
def test_a_side_whose_shutdown_closes_it_after_its_eof_ends_cleanly(
    listener: socket.socket, mode: str, kind: str, close: bool
) -> None:
    # The same close once the relay has read a to its EOF: nothing reads a any more,
    # so both directions are complete and the relay ends as usual.
    client, s = tcp_pair(listener)
    a = _side(s, kind, None)
    b, backend = tcp_pair(listener)
    try:
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        r = Running(RUNNERS[mode], Setup(client, a, b, backend), idle_timeout=JOIN, close=close)
        assert _read_to_eof(backend) == b"request"  # a's EOF forwarded: a read to its end
        backend.sendall(b"response")
        backend.shutdown(socket.SHUT_WR)
        stats = r.join()
        assert (stats.a_end, stats.b_end, stats.failed) == (End.EOF, End.EOF, None)
        assert (stats.a_to_b, stats.b_to_a) == (7, 8)
        assert _read_to_eof(client) == b"response"
    finally:
        for sock in (client, a, b, backend):
            sock.close()


class ClosingRecorded(ClosingShutdownIO):
    """:class:`ClosingShutdownIO` (relayed as a wrapper) telling when the relay read
    its EOF, when a send to it found it full, and when its shutdown() closed it."""

    eof: threading.Event
    full: threading.Event
    closed: threading.Event

    def shutdown(self, how: int, /) -> None:
        super().shutdown(how)
        self.closed.set()

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0, /) -> int:
        n = super().recv_into(buffer, nbytes, flags)
        if n == 0:
            self.eof.set()
        return n

    def send(self, data: Any, flags: int = 0, /) -> int:
        try:
            return super().send(data, flags)
        except BlockingIOError:
            self.full.set()
            raise


class LikeRecorded(Like):
    """The same as a SocketLike."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, None)
        self.eof, self.full = threading.Event(), threading.Event()

    def recv_into(self, buffer: memoryview, /) -> int:
        n = super().recv_into(buffer)
        if n == 0:
            self.eof.set()
        return n

    def send(self, data: memoryview | bytes, /) -> int:
        try:
            return super().send(data)
        except BlockingIOError:
            self.full.set()
            raise


def _small_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A connection whose accepted end's sends fill up after a few KB: small send
    buffer, and a peer (the connecting end) with a small receive window."""
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # before connect: the window
    c.connect(listener.getsockname())
    s, _ = listener.accept()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    return c, s


def _unacked(sock: socket.socket) -> int:
    """tcpi_unacked of *sock* (struct tcp_info: 8 one-byte fields, then rto, ato,
    snd_mss, rcv_mss, unacked as u32s)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 28)
    return int.from_bytes(info[24:28], sys.byteorder)


def _fill(sock: socket.socket) -> int:
    """Send to *sock* until it stays full (its peer reads nothing): the byte count.

    Full: a send fails while no byte is in flight unacknowledged (tcpi_unacked 0),
    so no ACK can come to free room; the peer's closed window holds the rest. Tried,
    not polled: room for a few bytes is not POLLOUT (a third of the buffer), and an
    unread error queue's POLLERR would end every poll at once.
    """
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + JOIN
    try:
        while time.monotonic() < deadline:
            try:
                while True:
                    sent += sock.send(b"p" * 4096)
            except BlockingIOError:
                pass
            if _unacked(sock):
                # ACKs still to come (loopback: microseconds): a bounded re-check
                select.select([], [], [], 0.001)
                continue
            try:
                sent += sock.send(b"p")
            except BlockingIOError:
                return sent
        raise AssertionError("the socket never stayed full")
    finally:
        sock.setblocking(True)


def _wait_armed_for_writing(fd: int) -> None:
    """Until an epoll of this process waits for *fd* (this very socket) to be
    writable, as its fdinfo says: the relay has stalled writing to it, and only
    its peer's reading wakes it."""
    ino = os.fstat(fd).st_ino
    line = re.compile(rf"tfd:\s+{fd} events:\s+([0-9a-f]+) .* ino:([0-9a-f]+) ")
    deadline = time.monotonic() + JOIN
    while True:
        for ep in _epolls():
            try:
                with open(f"/proc/self/fdinfo/{ep}") as info:
                    text = info.read()
            except OSError:
                continue  # closed since
            for events, tino in line.findall(text):
                if int(events, 16) & select.EPOLLOUT and int(tino, 16) == ino:
                    return
        assert time.monotonic() < deadline, f"fd {fd} was never armed for writing"
        select.select([], [], [], 0.005)  # nothing to wait on: a bounded re-check


def _count_to_eof(sock: socket.socket) -> int:
    sock.settimeout(JOIN)
    n = 0
    while chunk := sock.recv(65536):
        n += len(chunk)
    return n


@pytest.mark.parametrize("kind", ["subclass-wrapper", "socketlike"])
@pytest.mark.parametrize("mode", [*FORMS, "splice-edge"])
def test_a_side_closing_itself_after_its_eof_loses_nothing_it_was_armed_for(
    listener: socket.socket, mode: str, kind: str
) -> None:
    # a's own shutdown() closes it after the relay read its EOF, while the relay
    # still holds bytes from a for b (b is full) and a was armed for writing (the
    # bytes toward it had stalled). The epoll hub kept the closed fd armed: its
    # re-arm (EPOLL_CTL_MOD on a closed fd fails) took a for closed behind the
    # relay's back, and close=True reset b, the bytes for it lost; so did the
    # blocking form once edge-triggered (b's unread error queue), at its next
    # re-arm. Every form delivers everything, as poll and the selector driver did.
    client, a0 = _small_pair(listener)
    backend, b = _small_pair(listener)
    if mode == "splice-edge":
        # A MSG_ZEROCOPY completion b's owner has not read: POLLERR with SO_ERROR 0,
        # and the blocking form waits edge-triggered.
        b.setsockopt(socket.SOL_SOCKET, _SO_ZEROCOPY, 1)
        assert b.send(b"zc", _MSG_ZEROCOPY) == 2
        assert backend.recv(2) == b"zc"
        p = select.poll()
        p.register(b, 0)
        assert p.poll(JOIN * 1000) == [(b.fileno(), select.POLLERR)]  # the completion
    a: Any = ClosingRecorded(fileno=a0.detach()) if kind != "socketlike" else LikeRecorded(a0)
    if kind != "socketlike":
        a.eof, a.full, a.closed = threading.Event(), threading.Event(), threading.Event()
    raw = a if kind != "socketlike" else a.sock
    try:
        to_backend = _fill(b)  # bytes the caller queued: b is full
        to_client = _fill(raw)  # and a too
        client.sendall(b"x" * 3000)
        client.shutdown(socket.SHUT_WR)
        backend.sendall(b"r" * 3000)
        backend.shutdown(socket.SHUT_WR)
        runner = RUNNERS["splice" if mode == "splice-edge" else mode]
        r = Running(runner, Setup(client, a, b, backend), idle_timeout=JOIN)
        # a read to its EOF (its 3000 bytes held for b), and the bytes toward it
        # stalled: a is armed for writing (where an epoll waits: not poll's form).
        assert a.eof.wait(JOIN)
        assert a.full.wait(JOIN)
        if mode != "splice":
            _wait_armed_for_writing(a.fileno())
        # Taking them lets the relay half-close a, which closes a, a's bytes for b
        # still held.
        assert _count_to_eof(client) == to_client + 3000
        assert _count_to_eof(backend) == to_backend + 3000
        stats = r.join()
        assert (stats.a_end, stats.b_end, stats.failed) == (End.EOF, End.EOF, None)
        assert (stats.a_to_b, stats.b_to_a) == (3000, 3000)
    finally:
        for sock in (client, a, b, backend):
            sock.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_side_closing_itself_after_its_eof_keeps_its_relay_when_its_fd_is_reused(
    listener: socket.socket, loop: str
) -> None:
    # The same close, then another relay of the loop gets the closed side's fd
    # number. The hub still listed that number as the first relay's: the new
    # relay's watch took it over, failing the first relay as closed behind its
    # back, and close=True reset b, the bytes it held for b lost.
    async def main() -> None:
        client, a0 = tcp_pair(listener)
        backend, b = _small_pair(listener)
        a = ClosingRecorded(fileno=a0.detach())
        a.eof, a.full, a.closed = threading.Event(), threading.Event(), threading.Event()
        fd = a.fileno()
        run = asyncio.get_running_loop().run_in_executor
        extra: list[socket.socket] = []
        try:
            to_backend = _fill(b)
            client.sendall(b"x" * 3000)
            client.shutdown(socket.SHUT_WR)
            first = start_pipe_splice(a, b, idle_timeout=JOIN)
            assert await run(None, a.eof.wait, JOIN)
            backend.sendall(b"response")
            backend.shutdown(socket.SHUT_WR)  # b's EOF: the relay half-closes a
            assert await run(None, a.closed.wait, JOIN)
            assert a.fileno() == -1
            assert not first.done()  # a's 3000 bytes still held for b
            # Sockets until one has a's old number (the lowest free one, or close).
            for _ in range(64):
                extra.extend(tcp_pair(listener))
                if fd in (extra[-2].fileno(), extra[-1].fileno()):
                    break
            else:
                pytest.fail(f"no new socket got fd {fd}")
            reused = extra[-2] if extra[-2].fileno() == fd else extra[-1]
            extra.extend(tcp_pair(listener))
            second = start_pipe_splice(reused, extra[-1], idle_timeout=JOIN)
            got = await run(None, _count_to_eof, backend)
            assert got == to_backend + 3000
            stats = await asyncio.wait_for(first, JOIN)
            assert (stats.a_end, stats.b_end, stats.failed) == (End.EOF, End.EOF, None)
            assert (stats.a_to_b, stats.b_to_a) == (3000, 8)
            # Already here (the first relay ended after moving it): bounded all the
            # same, as a blocking read inside the loop would stall it for ever.
            client.settimeout(JOIN)
            assert client.recv(100) == b"response"
            assert not second.done()  # untouched by the first relay's end
            second.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(second, JOIN)
        finally:
            for sock in (client, a, b, backend, *extra):
                sock.close()

    if loop == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


# --------------------------------------------------------------------------- fork


def _epolls() -> set[int]:
    found = set()
    for fd in open_fds():
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventpoll]":
                found.add(fd)
        except OSError:
            pass  # the fd listdir used to read /proc/self/fd, gone already
    return found


def test_a_forked_child_closes_a_blocking_relay_s_edge_triggered_epoll(
    listener: socket.socket,
) -> None:
    # A pipe_splice whose side b has an unread error queue (a MSG_ZEROCOPY
    # completion: POLLERR with SO_ERROR 0) waits on an epoll of its own,
    # edge-triggered (_drive_edge). A child forked from another thread meanwhile
    # kept that epoll fd for its life: the relay's thread does not exist there,
    # and the at-fork cleanup closed only its pipes and sockets.
    before = _epolls()
    r: Relay = _relay_with_an_error_queue(listener, RUNNERS["splice"], close=False)
    try:
        deadline = time.monotonic() + JOIN
        while not (new := _epolls() - before):  # until the relay waits on its epoll
            assert r.thread.is_alive(), "the relay ended"
            assert time.monotonic() < deadline, "the relay never waited edge-triggered"
            select.select([], [], [], 0.005)  # nothing to wait on: a bounded re-check
        assert len(new) == 1
        files = {fd: _file_id(fd) for fd in new}
        pid, go, report = _fork_reporting(files, [r.client, r.backend])
        os.close(go)
        os.waitpid(pid, 0)
        assert report == b"[]"
        # The parent's relay is undisturbed: bytes still flow, and it ends as usual.
        r.client.sendall(b"ping")
        assert _recv_bytes(r.backend, 4) == b"ping"
        r.client.shutdown(socket.SHUT_WR)
        r.backend.shutdown(socket.SHUT_WR)
        stats = r.join()
        assert (stats.a_end, stats.b_end, stats.a_to_b) == (End.EOF, End.EOF, 4)
        assert not _epolls() - before
    finally:
        # The peers first: their EOFs end the relay (close=False, no idle timeout),
        # which a close of a or b behind its back would leave waiting for ever.
        r.close()
        r.thread.join(JOIN)
        r.a.close()
        r.b.close()


def test_a_fork_while_the_edge_epoll_is_made_waits_until_it_is_named(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The test above failed once in CI: the parent forked as soon as the epoll fd
    # showed in /proc/self/fd, and the relay's thread, back from epoll_create1
    # (which runs without the GIL), had not named it in relay.edge_ep yet, so the
    # child's at-fork cleanup missed it. The fd is now made and named under a gate
    # that os.fork() takes first. Here the window is held open: the relay's thread
    # makes the epoll, then waits (bounded) for the fork to happen; with the gate the
    # fork cannot until the fd is named, and the child closes its copy.
    real_epoll = select.epoll
    made = threading.Event()
    forked = threading.Event()
    main = threading.current_thread()

    def held_open(*args: Any, **kwargs: Any) -> select.epoll:
        ep = real_epoll(*args, **kwargs)
        if threading.current_thread() is not main and not made.is_set():
            made.set()
            # Until the fork waits for the gate this thread holds (or, without
            # one, has returned): the window stays open for it either way.
            until_in_or(main, "_gate_before_fork", forked.is_set)
        return ep

    before = _epolls()
    monkeypatch.setattr(select, "epoll", held_open)
    r: Relay = _relay_with_an_error_queue(listener, RUNNERS["splice"], close=False)
    try:
        assert made.wait(JOIN), "the relay never waited edge-triggered"
        new = _epolls() - before
        assert len(new) == 1
        files = {fd: _file_id(fd) for fd in new}
        pid, go, report = _fork_reporting(files, [r.client, r.backend])
        forked.set()
        os.close(go)
        os.waitpid(pid, 0)
        assert report == b"[]"
        r.client.shutdown(socket.SHUT_WR)
        r.backend.shutdown(socket.SHUT_WR)
        stats = r.join()
        assert (stats.a_end, stats.b_end) == (End.EOF, End.EOF)
    finally:
        r.close()
        r.thread.join(JOIN)
        r.a.close()
        r.b.close()


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize("name", ["SOCK_DGRAM", "SOCK_SEQPACKET"])
def test_the_wrong_socket_type_is_named(listener: socket.socket, name: str) -> None:
    # str(sock.type) is the bare number from Python 3.11 on (SocketKind is an
    # IntEnum): the message said "got 2".
    a, s = tcp_pair(listener)
    try:
        with socket.socket(socket.AF_UNIX, socket.SocketKind[name]) as bad:
            with pytest.raises(WrongSocketType) as caught:
                pipe_splice(a, bad)
            assert caught.value.got == name
            assert str(caught.value) == f"relay side b: expected a SOCK_STREAM socket, got {name}"
            assert bad.fileno() != -1  # refused: nothing closed
    finally:
        a.close()
        s.close()


def test_an_unknown_socket_type_is_given_as_its_number() -> None:
    assert relay_mod._kind_name(socket.SOCK_DGRAM) == "SOCK_DGRAM"
    assert relay_mod._kind_name(12345) == "12345"


def test_end_reset_names_every_errno_it_stands_for() -> None:
    # _RESET_ERRNOS maps ETIMEDOUT and ECONNABORTED to End.RESET too; End.RESET's
    # documentation and docs/relay.md named only ECONNRESET/EPIPE.
    names = {errno.errorcode[e] for e in relay_mod._RESET_ERRNOS}
    assert names == {"ECONNRESET", "EPIPE", "ECONNABORTED", "ETIMEDOUT"}
    source = inspect.getsource(relay_mod.End)
    doc = re.search(r"((?:\s*#:.*\n)+)\s*RESET = ", source)
    assert doc is not None
    assert {n for n in names if n not in doc.group(1)} == set()
    guide = (Path(__file__).parent.parent / "docs" / "relay.md").read_text()
    para = guide[guide.index("`End.RESET` is") :][:400]
    assert {n for n in names if f"`{n}`" not in para} == set()
    for e in relay_mod._RESET_ERRNOS:
        assert relay_mod._end_kind(OSError(e, os.strerror(e))) is End.RESET


# ------------------------------------------------------------------------- giving back


class NoSetTimeout:
    """A SocketLike with gettimeout() and setblocking() but no settimeout()."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_into(self, buffer: memoryview, /) -> int:
        return self.sock.recv_into(buffer)

    def send(self, data: memoryview | bytes, /) -> int:
        return self.sock.send(data)

    def shutdown(self, how: int, /) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)


@pytest.mark.parametrize("timeout", [None, 7.5], ids=["blocking", "timeout"])
@pytest.mark.parametrize("mode", FORMS)
def test_a_close_false_wrapper_without_settimeout_is_given_back_blocking(
    listener: socket.socket, mode: str, timeout: float | None
) -> None:
    # close=False gives each side back the timeout it had, through its settimeout().
    # A wrapper without one was made non-blocking (setblocking(False)) and handed
    # back so: the caller's next blocking recv() failed with BlockingIOError. It
    # gets its blocking mode back (setblocking(True)); its exact timeout cannot be
    # set back without settimeout().
    client, s = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    s.settimeout(timeout)
    a: Any = NoSetTimeout(s)
    try:
        client.sendall(b"up")
        client.shutdown(socket.SHUT_WR)
        backend.sendall(b"down")
        backend.shutdown(socket.SHUT_WR)
        stats: RelayStats = RUNNERS[mode](a, b, idle_timeout=JOIN, close=False)
        assert (stats.a_end, stats.b_end, stats.failed) == (End.EOF, End.EOF, None)
        assert s.fileno() != -1  # the caller's still
        assert s.getblocking()
        assert not fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert b.gettimeout() is None  # a socket.socket: its own timeout back
        assert _read_to_eof(client) == b"down"
        assert _read_to_eof(backend) == b"up"
    finally:
        for sock in (client, s, b, backend):
            sock.close()
