"""The asyncio relay hub's bookkeeping across loops and sockets: relays of loops closed
with ``loop.close()`` alone ended before a start reads its sockets, and the check
that refuses a dup of a relayed socket (sockfs inode numbers, SO_COOKIE)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

import reuselb._relay as relay_mod
from reuselb import (
    End,
    InvalidArgument,
    RelayStats,
    SocketClosed,
    WrongSocketType,
    async_pipe_splice,
    pipe_splice,
    start_pipe_splice,
)
from tests.conftest import end_loop

pytestmark = pytest.mark.linux
# Every wait is bounded by this; a relay blocked in a syscall (the loop frozen) is
# woken by _watchdog after WATCHDOG seconds, so such a test fails, never hangs.
JOIN = 30.0
WATCHDOG = 10.0


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0), backlog=128) as lst:
        yield lst


@pytest.fixture(autouse=True)
def _no_hub_left() -> Iterator[None]:
    """A test that fails mid-way may leave a closed loop's hub: ended here, so that
    the next test's start does not end it (and its sockets) instead."""
    yield
    relay_mod._end_closed_hubs()


def tcp_pair(lst: socket.socket) -> tuple[socket.socket, socket.socket]:
    c = socket.create_connection(lst.getsockname(), timeout=JOIN)
    s, _ = lst.accept()
    c.settimeout(None)  # blocking, as a caller's socket usually is
    return c, s


def _nonblocking(sock: socket.socket) -> bool:
    """Whether the open file of *sock* has O_NONBLOCK (what the kernel does, not what
    the socket object's timeout says)."""
    return bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)


@contextlib.contextmanager
def _watchdog(*peers: socket.socket) -> Iterator[None]:
    """Close *peers* if the block has not ended after WATCHDOG seconds: a relay stuck
    in a blocking recv or splice on their sockets (and its loop with it) wakes up,
    and the test fails on what it finds instead of hanging."""

    def fire() -> None:
        for peer in peers:
            with contextlib.suppress(OSError):
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            peer.close()  # a reset: wakes a splice into a full buffer too

    timer = threading.Timer(WATCHDOG, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()


async def _start_on_running_loop(
    a: socket.socket, b: socket.socket, **kw: Any
) -> asyncio.Future[RelayStats]:
    return start_pipe_splice(a, b, **kw)


def _relay_on_closed_loop(
    kind: str, a: socket.socket, b: socket.socket, *, close: bool
) -> asyncio.Future[RelayStats]:
    """A relay of *a* and *b* on a loop then closed with ``loop.close()`` alone: it
    runs no more, and holds the sockets until a start elsewhere ends it."""
    loop = _new_loop(kind)
    try:
        return loop.run_until_complete(_start_on_running_loop(a, b, close=close))
    finally:
        loop.close()


async def _start(api: str, a: socket.socket, b: socket.socket) -> asyncio.Future[RelayStats]:
    """A relay of *a* and *b* on the running loop, started by *api*; returns once
    the start ran (what it raised, raised)."""
    if api == "start":
        return start_pipe_splice(a, b)
    task = asyncio.get_running_loop().create_task(async_pipe_splice(a, b))
    await asyncio.sleep(0)  # one loop step: the task's first step, the start, ran
    if task.done():
        task.result()  # the start's exception
    return task


async def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


class _Ticks:
    """The longest gap between the runs of a 10 ms timer on the running loop: a loop
    frozen in a blocking syscall shows it as a gap that long."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.last = time.monotonic()
        self.longest = 0.0
        self.handle = self.loop.call_later(0.01, self.tick)

    def tick(self) -> None:
        now = time.monotonic()
        self.longest = max(self.longest, now - self.last)
        self.last = now
        self.handle = self.loop.call_later(0.01, self.tick)

    def stop(self) -> float:
        self.handle.cancel()
        return max(self.longest, time.monotonic() - self.last)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("api", ["start", "coroutine"])
@pytest.mark.parametrize("busy", [True, False], ids=["busy-loop", "new-hub"])
def test_a_closed_loop_s_close_false_relay_of_the_same_sockets_ends_before_the_start(
    listener: socket.socket, loop_kind: str, api: str, busy: bool
) -> None:
    # A start ended the relays of loops closed with loop.close() alone only after it
    # had built its own relay, which records each socket's timeout and TCP_NODELAY:
    # a close=False relay of the same sockets on such a loop then gave them back
    # blocking, after the new relay had read them non-blocking (as that relay left
    # them), so it never made them non-blocking, and its first recv or splice with
    # nothing to read blocked the whole loop (5 s, until the peers closed).
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    k_client, ka = tcp_pair(listener)
    kb, k_backend = tcp_pair(listener)
    loop = _new_loop(loop_kind)
    data = os.urandom(1 << 18)  # a stream: the relay splices it
    try:
        # With busy, the loop has a hub already (the sweep ran at every start of
        # it), else the start makes one (it ran when a new hub was made).
        kept = loop.run_until_complete(_start_on_running_loop(ka, kb)) if busy else None
        first = _relay_on_closed_loop(loop_kind, a, b, close=False)
        assert _nonblocking(a) and _nonblocking(b)  # the old relay made them so

        async def second() -> RelayStats:
            relay = await _start(api, a, b)
            assert first.cancelled()  # the closed loop's relay ended
            # The new relay made them non-blocking (and the old one gave them
            # back first: nothing left to undo them later).
            assert _nonblocking(a) and _nonblocking(b), "the relay runs on blocking sockets"
            assert a.gettimeout() == b.gettimeout() == 0.0
            assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            ticks = _Ticks()
            client.setblocking(False)
            backend.setblocking(False)
            loop = asyncio.get_running_loop()
            sending = loop.create_task(loop.sock_sendall(client, data))
            got = await asyncio.wait_for(_recv_exactly(backend, len(data)), JOIN)
            await asyncio.wait_for(sending, JOIN)
            assert got == data
            assert ticks.stop() < WATCHDOG / 2, "the loop stalled while relaying"
            client.shutdown(socket.SHUT_WR)
            backend.shutdown(socket.SHUT_WR)
            return await asyncio.wait_for(relay, JOIN)

        with _watchdog(client, backend):
            stats = loop.run_until_complete(second())
        assert (stats.a_to_b, stats.a_end, stats.b_end) == (len(data), End.EOF, End.EOF)
        assert list(relay_mod._HUBS) == ([loop] if busy else [])
        if kept is not None:
            kept.cancel()
        loop.run_until_complete(loop.shutdown_asyncgens())
        assert not relay_mod._HUBS
    finally:
        loop.close()
        for s in (client, a, b, backend, k_client, ka, kb, k_backend):
            s.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("api", ["start", "coroutine"])
def test_a_start_of_sockets_a_closed_loop_s_relay_closes_raises_socket_closed(
    listener: socket.socket, loop_kind: str, api: str
) -> None:
    # The same with the old relay close=True: ending it closes a and b, which the
    # new relay, built before, had taken for open; its start raised a bare OSError
    # (EBADF) instead of the SocketClosed the docs promise for a closed side.
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    loop = _new_loop(loop_kind)
    try:
        first = _relay_on_closed_loop(loop_kind, a, b, close=True)

        async def second() -> None:
            with pytest.raises(SocketClosed, match="relay side a is closed"):
                await _start(api, a, b)

        loop.run_until_complete(second())
        assert first.cancelled() and a.fileno() == b.fileno() == -1
        assert not relay_mod._HUBS  # the closed loop's hub ended, and no new one kept
        # Cut off mid-way by the old relay's end, its peers are reset, not left waiting.
        for peer in (client, backend):
            peer.settimeout(JOIN)
            with pytest.raises(ConnectionResetError):
                peer.recv(1)
    finally:
        loop.close()
        for s in (client, a, b, backend):
            s.close()


def test_a_blocking_relay_ends_a_closed_loop_s_relay_of_its_sockets_first(
    listener: socket.socket,
) -> None:
    # pipe_splice is a start too: it did not end closed loops' relays at all, so
    # one holding its sockets (close=False) kept them, and was still to give them
    # back blocking under a later relay; pipe_splice itself took them as the old
    # relay left them, and gave them back non-blocking at its end.
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    try:
        first = _relay_on_closed_loop("asyncio", a, b, close=False)
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        backend.sendall(b"response")
        backend.shutdown(socket.SHUT_WR)
        stats = pipe_splice(a, b, close=False, idle_timeout=JOIN)
        assert first.cancelled()
        assert not relay_mod._HUBS
        assert (stats.a_to_b, stats.b_to_a) == (7, 8)
        assert (stats.a_end, stats.b_end) == (End.EOF, End.EOF)
        # Given back as the caller had them before either relay.
        assert a.getblocking() and b.getblocking()
        assert not _nonblocking(a) and not _nonblocking(b)
    finally:
        for s in (client, a, b, backend):
            s.close()


@contextlib.contextmanager
def _inode_numbers(monkeypatch: pytest.MonkeyPatch, numbers: dict[int, int]) -> Iterator[None]:
    """The relay's fstat reports inode ``numbers[fd]`` for the fds listed: sockfs
    numbers sockets from a 32-bit counter (get_next_ino), which a busy proxy wraps
    in hours, so a socket relayed that long and a new one may share a number."""
    real: Callable[[int], os.stat_result] = os.fstat

    class _Stat:
        def __init__(self, st: os.stat_result, ino: int) -> None:
            self.st_ino, self.st_dev = ino, st.st_dev

    def fstat(fd: int) -> object:
        st = real(fd)
        return _Stat(st, numbers[fd]) if fd in numbers else st

    with monkeypatch.context() as patched:
        patched.setattr(relay_mod, "_fstat", fstat)
        yield


def test_a_refused_start_leaves_a_blocking_socket_blocking_under_a_default_timeout(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # To tell a dup from a socket sharing its inode number, the hub read SO_COOKIE
    # through a probe socket.socket(fileno=fd), and CPython sets O_NONBLOCK on every
    # new socket object's file while socket.setdefaulttimeout() is in force: a start
    # then refused (b already relayed) left the caller's blocking c non-blocking,
    # and its next recv raised BlockingIOError. Read through the held objects now.
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    c, c_peer = tcp_pair(listener)
    default = socket.getdefaulttimeout()

    async def main() -> None:
        first = start_pipe_splice(a, b)
        socket.setdefaulttimeout(JOIN)  # an application-wide default
        wrapped = {c.fileno(): os.fstat(a.fileno()).st_ino}  # c has a's number
        refused = pytest.raises(InvalidArgument, match="is already in a running relay")
        with _inode_numbers(monkeypatch, wrapped), refused:
            start_pipe_splice(c, b)  # b is: refused after c's check
        assert not _nonblocking(c), "the refused start made c non-blocking"
        assert c.getblocking() and c.gettimeout() is None
        assert not first.done()
        first.cancel()

    try:
        asyncio.run(main())
        c_peer.sendall(b"x")
        assert c.recv(1) == b"x"  # a blocking read: waits for the byte
    finally:
        socket.setdefaulttimeout(default)
        for s in (client, a, b, backend, c, c_peer):
            s.close()


@pytest.mark.parametrize("ends_first", ["twin", "first"])
def test_a_dup_is_refused_after_a_socket_sharing_its_inode_number_ends(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, ends_first: str
) -> None:
    # The hub kept one fd per inode number: a second socket with a relayed one's
    # number (the counter wrapped) replaced the first one's entry, and the end of
    # its relay deleted it, so a dup of the first socket, still relayed, was then
    # accepted, and two relays read it. Each socket is listed now. (ends_first
    # "first": the entry of the socket still relayed is the twin's.)
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    c_client, c = tcp_pair(listener)
    d, d_backend = tcp_pair(listener)
    e, e_peer = tcp_pair(listener)
    number = os.fstat(a.fileno()).st_ino
    dups: list[socket.socket] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        first = start_pipe_splice(a, b)
        with _inode_numbers(monkeypatch, {c.fileno(): number}):
            twin = start_pipe_splice(c, d)  # another socket: other cookie, accepted
        hub = relay_mod._HUBS[loop]
        ended, kept, kept_peers = (
            (twin, a, (client, backend))
            if ends_first == "twin"
            else (first, c, (c_client, d_backend))
        )
        live = first if ends_first == "twin" else twin
        ended.cancel()
        assert hub.sockets.get(number) == kept.fileno()  # the socket still relayed
        dup = kept.dup()
        dups.append(dup)
        kept_fd = kept.fileno()
        wrapped = {dup.fileno(): number, c.fileno(): number}
        refused = pytest.raises(InvalidArgument, match=f"is the socket of fd {kept_fd},")
        with _inode_numbers(monkeypatch, wrapped), refused:
            start_pipe_splice(dup, e)
        assert e.getblocking() and dup.fileno() != -1  # nothing touched
        # The relay still running has its bytes, all of them.
        source, sink = kept_peers
        source.setblocking(False)
        sink.setblocking(False)
        await loop.sock_sendall(source, b"m" * 2000)
        assert await asyncio.wait_for(_recv_exactly(sink, 2000), JOIN) == b"m" * 2000
        source.shutdown(socket.SHUT_WR)
        sink.shutdown(socket.SHUT_WR)
        stats = await asyncio.wait_for(live, JOIN)
        assert (stats.a_to_b, stats.a_end, stats.b_end) == (2000, End.EOF, End.EOF)
        assert not hub.owners and not hub.sockets and not hub.inodes and not hub.twins

    try:
        asyncio.run(main())
        e_peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            e_peer.recv(1)  # nothing reached the unrelated socket
        assert not relay_mod._HUBS
    finally:
        for s in (client, a, b, backend, c_client, c, d, d_backend, e, e_peer, *dups):
            s.close()


def test_three_sockets_sharing_an_inode_number_are_all_listed_until_they_end(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bookkeeping is exact however the relays of sockets sharing a number end:
    # a dup of each one still relayed is refused, and nothing is left behind.
    pairs = [(tcp_pair(listener), tcp_pair(listener)) for _ in range(3)]
    sides = [(a, b) for (_client, a), (b, _backend) in pairs]
    number = os.fstat(sides[0][0].fileno()).st_ino
    other, other_peer = tcp_pair(listener)  # the second side of each refused start
    dups: list[socket.socket] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with _inode_numbers(monkeypatch, {a.fileno(): number for a, _b in sides}):
            futures = [start_pipe_splice(a, b) for a, b in sides]
        hub = relay_mod._HUBS[loop]
        for ending in (1, 0, 2):
            futures[ending].cancel()
            for i, (a, _b) in enumerate(sides):
                if futures[i].done():
                    continue
                dup = a.dup()
                dups.append(dup)
                refused = pytest.raises(InvalidArgument, match=f"socket of fd {a.fileno()},")
                with _inode_numbers(monkeypatch, {dup.fileno(): number}), refused:
                    start_pipe_splice(dup, other)
        assert not hub.owners and not hub.sockets and not hub.inodes and not hub.twins

    try:
        asyncio.run(main())
        assert not relay_mod._HUBS
    finally:
        for (client, a), (b, backend) in pairs:
            for s in (client, a, b, backend):
                s.close()
        for s in (other, other_peer, *dups):
            s.close()


class _Parked:
    """A blocking pipe_splice in thread "sweeper", stopped in the sweep it makes first
    just as it starts ending the relays of the closed loop *closed* (at the top of
    ``_Hub.shutdown``, where a GIL switch may come in its first syscall): the moment
    a start in another thread races it. The sweeper goes on when this thread's start
    looks at *closed* (calls its ``is_closed()``: it found the hub, and waits for the
    sweep if it waits at all), or when :meth:`release` is called; never later than
    JOIN seconds."""

    def __init__(
        self,
        listener: socket.socket,
        monkeypatch: pytest.MonkeyPatch,
        closed: asyncio.AbstractEventLoop,
    ) -> None:
        self.parked, self.go = threading.Event(), threading.Event()
        self.errors: list[BaseException] = []
        self.stats: list[RelayStats] = []
        x, xp = tcp_pair(listener)
        y, yp = tcp_pair(listener)
        self.sockets = (x, xp, y, yp)
        xp.shutdown(socket.SHUT_WR)  # EOF both ways: ends once it runs
        yp.shutdown(socket.SHUT_WR)
        real = relay_mod._Hub.shutdown

        def shutdown(hub: relay_mod._Hub) -> None:
            if threading.current_thread().name == "sweeper":
                self.parked.set()
                self.go.wait(JOIN)
            real(hub)

        main = threading.get_ident()

        def is_closed() -> bool:
            if threading.get_ident() == main and self.parked.is_set():
                self.go.set()  # the start saw the hub being ended
            return True

        monkeypatch.setattr(relay_mod._Hub, "shutdown", shutdown)
        monkeypatch.setattr(closed, "is_closed", is_closed)

        def sweep() -> None:
            try:
                self.stats.append(pipe_splice(x, y, idle_timeout=JOIN))
            except BaseException as exc:  # reported by join()
                self.errors.append(exc)

        self.thread = threading.Thread(target=sweep, name="sweeper", daemon=True)
        self.thread.start()
        assert self.parked.wait(JOIN), "the sweeper never reached the closed loop's hub"

    def release(self) -> None:
        self.go.set()

    def join(self) -> None:
        self.go.set()
        self.thread.join(JOIN)
        assert not self.thread.is_alive(), "the sweeper is stuck"
        for s in self.sockets:
            s.close()
        assert not self.errors, self.errors
        assert [(s.a_end, s.b_end) for s in self.stats] == [(End.EOF, End.EOF)]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_start_waits_for_the_closed_loop_s_relays_another_thread_is_ending(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, loop_kind: str
) -> None:
    # A sweep took a closed loop's hub out of _HUBS before it ended the hub's
    # relays, and shutdown() makes syscalls that let other threads run: a start in
    # another thread then found no closed loop's hub, took a and b as the closed
    # loop's close=False relay left them (non-blocking), and that relay gave them
    # back blocking a moment later: the new relay ran on blocking sockets and froze
    # its loop at its first read (82 in 3000 starts, unpatched, on 2 cores). The
    # hub stays listed until its relays have ended, and the start waits for them.
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    closed = asyncio.new_event_loop()  # an instance is_closed() can be patched on
    loop = _new_loop(loop_kind)
    data = os.urandom(1 << 18)
    started: list[asyncio.Future[RelayStats]] = []
    try:
        try:
            first = closed.run_until_complete(_start_on_running_loop(a, b, close=False))
        finally:
            closed.close()
        sweeper = _Parked(listener, monkeypatch, closed)

        async def second() -> RelayStats:
            try:
                started.append(start_pipe_splice(a, b))
                ended_first = first.cancelled()
            finally:
                sweeper.release()  # if the start did not wait, the sweep goes on now
            sweeper.join()
            assert _nonblocking(a) and _nonblocking(b), "the relay runs on blocking sockets"
            assert ended_first, "the start did not wait for the closed loop's relay"
            ticks = _Ticks()
            client.setblocking(False)
            backend.setblocking(False)
            loop = asyncio.get_running_loop()
            sending = loop.create_task(loop.sock_sendall(client, data))
            got = await asyncio.wait_for(_recv_exactly(backend, len(data)), JOIN)
            await asyncio.wait_for(sending, JOIN)
            assert got == data
            assert ticks.stop() < WATCHDOG / 2, "the loop stalled while relaying"
            client.shutdown(socket.SHUT_WR)
            backend.shutdown(socket.SHUT_WR)
            return await asyncio.wait_for(started[0], JOIN)

        with _watchdog(client, backend):
            stats = loop.run_until_complete(second())
        assert (stats.a_to_b, stats.a_end, stats.b_end) == (len(data), End.EOF, End.EOF)
        assert list(relay_mod._HUBS) == []
    finally:
        for future in started:
            future.cancel()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        for s in (client, a, b, backend):
            s.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_start_racing_the_end_of_a_closed_loop_s_relay_that_closes_its_sockets(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, loop_kind: str
) -> None:
    # The same with the closed loop's relay close=True: the start in the other
    # thread returned a future for a and b, the sweep then closed them, and the
    # new relay, its fds gone from its epoll, stayed pending forever. It raises
    # SocketClosed now, as when the sweep is its own.
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    closed = asyncio.new_event_loop()
    loop = _new_loop(loop_kind)
    started: list[asyncio.Future[RelayStats]] = []
    try:
        try:
            first = closed.run_until_complete(_start_on_running_loop(a, b, close=True))
        finally:
            closed.close()
        sweeper = _Parked(listener, monkeypatch, closed)

        async def second() -> None:
            try:
                with pytest.raises(SocketClosed, match="relay side a is closed"):
                    started.append(start_pipe_splice(a, b))
            finally:
                sweeper.release()
                sweeper.join()

        loop.run_until_complete(second())
        assert first.cancelled() and a.fileno() == b.fileno() == -1
        assert not relay_mod._HUBS
    finally:
        for future in started:
            future.cancel()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        for s in (client, a, b, backend):
            s.close()


def _blocking_relay(listener: socket.socket) -> Callable[[], RelayStats]:
    """A blocking pipe_splice (a start: it sweeps first) of two sockets whose peers
    have sent their EOF, to run in any thread: the callable returned runs it."""
    x, xp = tcp_pair(listener)
    y, yp = tcp_pair(listener)
    xp.shutdown(socket.SHUT_WR)
    yp.shutdown(socket.SHUT_WR)

    def run() -> RelayStats:
        try:
            return pipe_splice(x, y, idle_timeout=JOIN)
        finally:
            for s in (x, xp, y, yp):
                s.close()

    return run


def _blocking_relay_in_a_thread(listener: socket.socket) -> RelayStats:
    """:func:`_blocking_relay` run in a daemon thread, joined (JOIN at most: a start
    stuck on the sweep fails the test, never hangs it); returns its stats."""
    run = _blocking_relay(listener)
    out: list[RelayStats | BaseException] = []

    def target() -> None:
        try:
            out.append(run())
        except BaseException as exc:  # raised in the joining thread
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(JOIN)
    assert not thread.is_alive(), "a start waits for ever on the sweep"
    (result,) = out
    if isinstance(result, BaseException):
        raise result
    return result


def test_a_sweep_interrupted_part_way_is_finished_by_the_next_start(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A KeyboardInterrupt between two of a closed loop's relays: the relay that
    # ended has its future settled (it was left pending for ever: no longer the
    # hub's, no later shutdown saw it), the hub stays listed and is not taken for
    # one being ended, and the next start, in any thread, ends the rest.
    pairs = [(tcp_pair(listener), tcp_pair(listener)) for _ in range(2)]
    sides = [(a, b) for (_client, a), (b, _backend) in pairs]
    x, x_peer = tcp_pair(listener)
    y, y_peer = tcp_pair(listener)
    closed = asyncio.new_event_loop()

    async def start_both() -> list[asyncio.Future[RelayStats]]:
        return [start_pipe_splice(a, b, close=False) for a, b in sides]

    try:
        try:
            futures = closed.run_until_complete(start_both())
        finally:
            closed.close()
        hub = relay_mod._HUBS[closed]
        real = relay_mod._Driven.finalize
        calls: list[object] = []

        def finalize(driven: relay_mod._Driven) -> RelayStats | None:
            stats = real(driven)
            calls.append(driven)
            if len(calls) == 1:
                raise KeyboardInterrupt  # Ctrl-C as the first relay has ended
            return stats

        with monkeypatch.context() as patched:
            patched.setattr(relay_mod._Driven, "finalize", finalize)
            x_peer.shutdown(socket.SHUT_WR)  # were it to run, it would end
            y_peer.shutdown(socket.SHUT_WR)
            with pytest.raises(KeyboardInterrupt):
                pipe_splice(x, y, close=False, idle_timeout=JOIN)
        assert x.getblocking() and not _nonblocking(x)  # the start never built its relay
        assert futures[0].cancelled()
        assert not _nonblocking(sides[0][0]) and not _nonblocking(sides[0][1])
        assert not futures[1].done() and _nonblocking(sides[1][0])  # still held
        assert relay_mod._HUBS.get(closed) is hub and not hub.ending
        # A start in another thread is not locked out, and ends the rest.
        assert _blocking_relay_in_a_thread(listener).a_end is End.EOF
        assert futures[1].cancelled() and hub.ep.closed
        assert not _nonblocking(sides[1][0]) and not _nonblocking(sides[1][1])
        assert not relay_mod._HUBS
    finally:
        for (client, a), (b, backend) in pairs:
            for s in (client, a, b, backend):
                s.close()
        for s in (x, x_peer, y, y_peer):
            s.close()


class _StartsOnClose:
    """A SocketLike side whose close() closes its socket, then runs *then* (which
    starts another relay)."""

    def __init__(self, sock: socket.socket, then: Callable[[], None]) -> None:
        self._sock, self._then = sock, then

    def close(self) -> None:
        self._sock.close()
        self._then()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_a_start_made_by_a_wrapper_s_close_as_a_sweep_ends_its_relay_does_not_wait(
    listener: socket.socket,
) -> None:
    # A closed loop's relay's end closes its wrapper side, whose close() may start
    # a relay in the sweeping thread: that start finds the hub being ended, which
    # it must not wait for (its own thread holds the sweep; a lock that is not
    # reentrant would wait for ever) nor end again from within its shutdown().
    pairs = [(tcp_pair(listener), tcp_pair(listener)) for _ in range(2)]
    (_client1, a1), (b1, _backend1) = pairs[0]
    (_client2, a2), (b2, _backend2) = pairs[1]
    closed = asyncio.new_event_loop()
    run_nested = _blocking_relay(listener)
    seen: list[object] = []
    futures: list[asyncio.Future[RelayStats]] = []

    def nested() -> None:
        seen.append(run_nested())
        seen.append(futures[1].done())  # the rest of the loop's relays: not yet
        seen.append(closed in relay_mod._HUBS)

    async def start_both() -> None:
        futures.append(start_pipe_splice(_StartsOnClose(a1, nested), b1))
        futures.append(start_pipe_splice(a2, b2, close=False))

    try:
        try:
            closed.run_until_complete(start_both())
        finally:
            closed.close()
        assert _blocking_relay_in_a_thread(listener).a_end is End.EOF  # the sweep
        stats, rest_done, listed = seen
        assert isinstance(stats, RelayStats) and (stats.a_end, stats.b_end) == (End.EOF,) * 2
        assert (rest_done, listed) == (False, True)
        assert futures[0].cancelled() and futures[1].cancelled()
        assert a1.fileno() == b1.fileno() == -1 and not _nonblocking(a2)
        assert not relay_mod._HUBS
    finally:
        for (client, a), (b, backend) in pairs:
            for s in (client, a, b, backend):
                s.close()


def test_two_sockets_sharing_an_inode_number_are_relayed_together(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pair check took two sockets with one sockfs inode number for one socket
    # (a dup) and refused them ("is the same socket as a"): numbers come from a
    # 32-bit counter, which a busy proxy wraps, so a pooled backend connection and
    # a new client may share one. SO_COOKIE tells them apart, as in the hub.
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    dup = a.dup()
    number = os.fstat(a.fileno()).st_ino
    try:
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        backend.sendall(b"response")
        backend.shutdown(socket.SHUT_WR)
        with _inode_numbers(monkeypatch, {b.fileno(): number}):
            stats = pipe_splice(a, b, close=False, idle_timeout=JOIN)
            assert (stats.a_to_b, stats.b_to_a) == (7, 8)
            assert (stats.a_end, stats.b_end) == (End.EOF, End.EOF)
            # A dup is still refused; so are the two where SO_COOKIE cannot be read
            # (the shared number must do then).
            with pytest.raises(InvalidArgument, match="is the same socket as a"):
                pipe_splice(a, dup)
            monkeypatch.setattr(relay_mod, "_cookie", lambda sock: None)
            with pytest.raises(InvalidArgument, match="is the same socket as a"):
                pipe_splice(a, b)
        assert a.getblocking() and b.getblocking() and dup.getblocking()
    finally:
        for s in (client, a, b, backend, dup):
            s.close()


class _Closing:
    """A SocketLike side that counts its close() calls; close() closes the socket,
    then raises *raises* (if given) or runs *then* (if given)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        raises: type[BaseException] | None = None,
        then: Callable[[], object] | None = None,
    ) -> None:
        self._sock, self._raises, self._then = sock, raises, then
        self.closes = 0

    def close(self) -> None:
        self.closes += 1
        self._sock.close()
        if self._raises is not None:
            raise self._raises
        if self._then is not None:
            self._then()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("api", ["start", "coroutine"])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_from_a_wrapper_s_close_at_the_idle_timeout_cancels_the_relay(
    listener: socket.socket, loop_kind: str, api: str, exc: type[BaseException]
) -> None:
    # The idle timeout's path (_Driven.on_timer) caught only Exception: a
    # KeyboardInterrupt or SystemExit out of a wrapper's close() left the loop with
    # the relay's future (or its task's await) pending for ever. As on every other
    # path, the relay is ended as a cancel ends it, then the exception goes on.
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    wa = _Closing(a, raises=exc)
    loop = _new_loop(loop_kind)

    async def start() -> asyncio.Future[RelayStats]:
        if api == "start":
            return start_pipe_splice(wa, b, idle_timeout=0.05)
        return asyncio.ensure_future(async_pipe_splice(wa, b, idle_timeout=0.05))

    relay: asyncio.Future[RelayStats] | None = None
    try:
        relay = loop.run_until_complete(start())
        with pytest.raises(exc):
            loop.run_until_complete(asyncio.wait([relay], timeout=JOIN))
        loop.run_until_complete(asyncio.wait([relay], timeout=JOIN))  # a task's last step
        assert relay.cancelled()
        assert a.fileno() == b.fileno() == -1 and wa.closes == 1
        assert loop not in relay_mod._HUBS
    finally:
        end_loop(loop, cancel=[relay], close=(client, a, b, backend))


@pytest.mark.parametrize("how", ["cancel", "idle-timeout", "task-cancel"])
@pytest.mark.parametrize("where", ["after-detach", "mid-detach"])
@pytest.mark.parametrize("close", [True, False], ids=["close", "keep"])
def test_an_interrupt_as_a_relay_leaves_its_hub_still_ends_it(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, how: str, where: str, close: bool
) -> None:
    # A KeyboardInterrupt from a signal handler landing in _Driven.detach() (most
    # often in one of its epoll_ctl calls), between taking the relay out of the hub
    # and finish(): nothing ended it any more. Its sockets stayed open (or, with
    # close=False, non-blocking), its pipes held, its future pending for ever. The
    # relay is ended all the same now, the rest of its detach done, and the
    # interrupt goes on.
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    relays: list[relay_mod._Relay] = []
    armed: list[bool] = []
    real_begin = relay_mod._Relay.begin
    real_unwatch = relay_mod._Hub.unwatch
    real_close_if_idle = relay_mod._Hub.close_if_idle

    def begin(relay: relay_mod._Relay) -> None:
        relays.append(relay)
        real_begin(relay)

    def interrupt() -> None:
        if armed:
            armed.clear()
            raise KeyboardInterrupt  # what the default SIGINT handler raises

    def unwatch(hub: relay_mod._Hub, fd: int, driven: relay_mod._Driven | relay_mod._Quick) -> None:
        real_unwatch(hub, fd, driven)
        if where == "mid-detach":
            interrupt()  # the first side unwatched, the other not

    def close_if_idle(hub: relay_mod._Hub) -> None:
        real_close_if_idle(hub)
        if where == "after-detach":
            interrupt()  # the relay is out of the hub, the hub closed

    real_promote = relay_mod._Quick.promote

    def promote(quick: relay_mod._Quick) -> relay_mod._Driven:
        # A close=True start of plain sockets is a _Quick until it hands over (here:
        # at the cancel), its _Relay built then.
        driven = real_promote(quick)
        if driven.relay not in relays:
            relays.append(driven.relay)
        return driven

    monkeypatch.setattr(relay_mod._Relay, "begin", begin)
    monkeypatch.setattr(relay_mod._Quick, "promote", promote)
    monkeypatch.setattr(relay_mod._Hub, "unwatch", unwatch)
    monkeypatch.setattr(relay_mod._Hub, "close_if_idle", close_if_idle)
    loop = asyncio.new_event_loop()

    async def start() -> asyncio.Future[RelayStats]:
        if how == "task-cancel":
            task = asyncio.ensure_future(async_pipe_splice(a, b, close=close))
            await asyncio.sleep(0)  # its first step: the relay runs
            return task
        return start_pipe_splice(
            a, b, close=close, idle_timeout=0.05 if how == "idle-timeout" else None
        )

    relay: asyncio.Future[RelayStats] | None = None
    try:
        relay = loop.run_until_complete(start())
        ending = relay

        def end() -> None:
            if how != "idle-timeout":
                ending.cancel()
            if how != "cancel":  # a task's cancel, the timer: the loop runs them
                loop.run_until_complete(asyncio.wait([ending], timeout=JOIN))

        armed.append(True)
        with pytest.raises(KeyboardInterrupt):
            end()
        assert not armed, "the interrupt came from elsewhere"
        (ended,) = relays
        assert ended.stats is not None, "the relay was never finished"
        assert [(f.pipe_r, f.pipe_w) for f in ended.flows] == [(-1, -1)] * 2
        assert loop not in relay_mod._HUBS  # the hub closed with its only relay
        assert relay.done()
        if how == "task-cancel":
            # What a task does with a KeyboardInterrupt out of its coroutine.
            assert isinstance(relay.exception(), KeyboardInterrupt)
        else:
            assert relay.cancelled()
        if close:
            assert a.fileno() == b.fileno() == -1
        else:
            assert not _nonblocking(a) and not _nonblocking(b)
    finally:
        armed.clear()
        end_loop(loop, cancel=[relay], close=(client, a, b, backend))


@pytest.mark.parametrize("api", ["start", "coroutine"])
@pytest.mark.parametrize("where", ["entry", "pipes"])
@pytest.mark.parametrize("close", [True, False], ids=["close", "keep"])
def test_an_interrupt_as_a_cancelled_relay_finishes_still_ends_it(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, close: bool, where: str, api: str
) -> None:
    # A KeyboardInterrupt from a signal handler as finish() is entered, or in its
    # first step (freeing the pipes), while a cancel ends the relay: the relay was
    # out of its hub and its future cancelled, so nothing ended it any more; its
    # sockets stayed open (or, with close=False, non-blocking), its peers waiting,
    # and it stayed in the running set for good.
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    armed: list[bool] = []
    real_close_pipe = relay_mod._Flow.close_pipe
    real_finish = relay_mod._Relay.finish

    def close_pipe(flow: relay_mod._Flow) -> None:
        if armed and where == "pipes":
            armed.clear()
            raise KeyboardInterrupt
        real_close_pipe(flow)

    def finish(relay: relay_mod._Relay) -> RelayStats:
        if armed and where == "entry":
            armed.clear()
            raise KeyboardInterrupt
        return real_finish(relay)

    monkeypatch.setattr(relay_mod._Flow, "close_pipe", close_pipe)
    monkeypatch.setattr(relay_mod._Relay, "finish", finish)
    loop = asyncio.new_event_loop()
    relay: asyncio.Future[RelayStats] | None = None
    try:
        relay = loop.run_until_complete(_start(api, a, b) if close else _start_keep(api, a, b))
        ending = relay

        def end() -> None:
            ending.cancel()
            if api == "coroutine":  # the task's cancel: the loop runs it
                loop.run_until_complete(asyncio.wait([ending], timeout=JOIN))

        armed.append(True)
        with pytest.raises(KeyboardInterrupt):
            end()
        assert not armed, "the interrupt came from elsewhere"
        assert relay.done()
        assert not [r for r in relay_mod._RUNNING if r.a is a]
        assert loop not in relay_mod._HUBS
        if close:
            assert a.fileno() == b.fileno() == -1
            client.settimeout(JOIN)
            with pytest.raises(ConnectionResetError):
                client.recv(1)
        else:
            assert not _nonblocking(a) and not _nonblocking(b)
    finally:
        armed.clear()
        end_loop(loop, cancel=[relay], close=(client, a, b, backend))


class _Clock:
    """The relay module's ``time``, whose monotonic() is interrupted once when armed:
    a signal handler's KeyboardInterrupt as finish() reads the duration, after the
    sides were closed and before the stats are recorded."""

    armed = False

    def monotonic(self) -> float:
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return time.monotonic()


def test_an_interrupt_after_a_cancelled_relay_closed_its_sides_closes_nothing_twice(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # finish() interrupted after both close() calls but before the stats: the hub
    # runs it again so that the relay ends, and that second run called each
    # wrapper's close() (and the resets before them) a second time.
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    wa, wb = _Closing(a), _Closing(b)
    clock = _Clock()
    monkeypatch.setattr(relay_mod, "time", clock)
    loop = asyncio.new_event_loop()
    relay: asyncio.Future[RelayStats] | None = None
    try:
        relay = loop.run_until_complete(_start_on_running_loop(wa, wb))  # type: ignore[arg-type]
        ending = relay
        clock.armed = True
        with pytest.raises(KeyboardInterrupt):
            ending.cancel()
        assert not clock.armed, "the interrupt came from elsewhere"
        assert (wa.closes, wb.closes) == (1, 1)
        assert relay.cancelled()
        assert not [r for r in relay_mod._RUNNING if r.a is wa]
        assert a.fileno() == b.fileno() == -1
        client.settimeout(JOIN)
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    finally:
        end_loop(loop, cancel=[relay], close=(client, a, b, backend))


class _PollInterrupted:
    """The hub's epoll, whose poll() is interrupted (a signal handler's
    KeyboardInterrupt, as the call returns) once it returns events, when armed; or,
    with *at_iter*, as the hub iterates over them."""

    def __init__(self, ep: Any, *, at_iter: bool = False) -> None:
        self.ep = ep
        self.armed = False
        self.at_iter = at_iter

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        events: list[tuple[int, int]] = self.ep.poll(timeout, maxevents)
        if self.armed and events:
            self.armed = False
            if self.at_iter:
                return _InterruptedBatch(events)
            raise KeyboardInterrupt
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ep, name)


class _InterruptedBatch(list[tuple[int, int]]):
    """A batch of events whose iteration is interrupted as it starts."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        raise KeyboardInterrupt


class _OwnersInterrupted(dict[int, Any]):
    """The hub's owners, whose first get() when armed is interrupted: a signal
    landing between an event taken from the batch and its delivery."""

    armed = False

    def get(self, key: int, default: Any = None) -> Any:
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return super().get(key, default)


@pytest.mark.parametrize("api", ["start", "coroutine"])
@pytest.mark.parametrize("where", ["poll", "iter", "delivery"])
def test_an_interrupt_as_the_hub_takes_its_events_loses_none(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, where: str, api: str
) -> None:
    # A KeyboardInterrupt as the hub's epoll_wait returned (or before an event was
    # handed to its relay) lost the batch: edge-triggered, those events never came
    # back, and the relays waited for ever for bytes sitting in their sockets once
    # the loop ran again. Every relay's fds are re-armed (EPOLL_CTL_MOD re-polls).
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    loop = asyncio.new_event_loop()
    relay: asyncio.Future[RelayStats] | None = None
    try:
        relay = loop.run_until_complete(_start(api, a, b))
        hub = relay_mod._HUBS[loop]
        polls = _PollInterrupted(hub.ep, at_iter=where == "iter")
        owners = _OwnersInterrupted(hub.owners)
        monkeypatch.setattr(hub, "ep", polls)
        monkeypatch.setattr(hub, "owners", owners)
        if where == "delivery":
            owners.armed = True
        else:
            polls.armed = True
        client.sendall(b"hello")
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(asyncio.sleep(JOIN))
        assert not (polls.armed or owners.armed), "the interrupt came from elsewhere"
        backend.setblocking(False)
        got = loop.run_until_complete(asyncio.wait_for(loop.sock_recv(backend, 16), JOIN))
        assert got == b"hello"
        client.shutdown(socket.SHUT_WR)
        backend.shutdown(socket.SHUT_WR)
        stats = loop.run_until_complete(asyncio.wait_for(relay, JOIN))
        assert (stats.a_to_b, stats.a_end, stats.b_end) == (5, End.EOF, End.EOF)
    finally:
        end_loop(loop, cancel=[relay], close=(client, a, b, backend))


async def _start_keep(api: str, a: socket.socket, b: socket.socket) -> asyncio.Future[RelayStats]:
    """As _start, with close=False."""
    if api == "start":
        return start_pipe_splice(a, b, close=False)
    task = asyncio.get_running_loop().create_task(async_pipe_splice(a, b, close=False))
    await asyncio.sleep(0)
    return task


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_closed_loop_s_relay_cancelled_as_another_thread_s_start_ends_it_ends_once(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, loop_kind: str
) -> None:
    # A start_pipe_splice future of a loop closed with loop.close() alone, cancelled
    # by the thread holding it while a start in another thread (the sweep) was
    # ending that very relay: both ran finish(), so each side's close() was called
    # twice and a pipe could be pooled by both threads (one fd in two pools: a
    # later EBADF, or the close of an unrelated file given that number). Here the
    # sweep is held inside the wrapper's close() until the cancel either waits for
    # the sweep's lock (it is let go then) or has returned.
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    parked, go = threading.Event(), threading.Event()

    def hold_the_sweeper() -> None:
        if threading.current_thread().name == "sweeper":
            parked.set()
            go.wait(JOIN)

    wa = _Closing(a, then=hold_the_sweeper)
    closed = _new_loop(loop_kind)
    real_lock = relay_mod._SWEEP_LOCK
    main = threading.get_ident()

    class Watched:
        """_SWEEP_LOCK, letting the sweeper go on as this thread waits for it."""

        def __enter__(self) -> None:
            if threading.get_ident() == main and parked.is_set():
                go.set()
            real_lock.acquire()

        def __exit__(self, *exc_info: object) -> None:
            real_lock.release()

    out: list[object] = []
    sweep = _blocking_relay(listener)

    def sweeper() -> None:
        try:
            out.append(sweep())
        except BaseException as exc:  # raised in this thread below
            out.append(exc)

    thread = threading.Thread(target=sweeper, name="sweeper", daemon=True)
    try:
        try:
            relay = closed.run_until_complete(_start_on_running_loop(wa, b))  # type: ignore[arg-type]
        finally:
            closed.close()
        monkeypatch.setattr(relay_mod, "_SWEEP_LOCK", Watched())
        thread.start()
        assert parked.wait(JOIN), "the sweep never closed the wrapper"
        try:
            relay.cancel()
        finally:
            go.set()
        thread.join(JOIN)
        assert not thread.is_alive(), "the sweeper is stuck"
        (stats,) = out
        assert isinstance(stats, RelayStats), stats
        assert (stats.a_end, stats.b_end) == (End.EOF, End.EOF)
        assert wa.closes == 1, "the relay was ended twice"
        assert relay.cancelled()
        assert a.fileno() == b.fileno() == -1
        assert not relay_mod._HUBS
    finally:
        go.set()
        for s in (client, a, b, backend):
            s.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_wrapper_s_close_cancelling_its_own_relay_is_called_once(
    listener: socket.socket, loop_kind: str
) -> None:
    # Ending a relay calls its wrapper's close(), which may cancel the relay's own
    # future (a wrapper that stops what it belongs to): that cancel ended the relay
    # again, from within its end, and every close() ran twice. A relay being ended
    # is ended once.
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    futures: list[asyncio.Future[RelayStats]] = []

    def cancel_the_relay() -> None:
        futures[0].cancel()

    wa = _Closing(a, then=cancel_the_relay)
    loop = _new_loop(loop_kind)

    async def run() -> None:
        futures.append(start_pipe_splice(wa, b))
        client.shutdown(socket.SHUT_WR)
        backend.shutdown(socket.SHUT_WR)
        await asyncio.wait(futures, timeout=JOIN)

    try:
        loop.run_until_complete(run())
        assert wa.closes == 1
        assert futures[0].cancelled()  # the close()'s cancel came before the result
        assert a.fileno() == b.fileno() == -1
        assert loop not in relay_mod._HUBS
    finally:
        for future in futures:
            future.cancel()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        for s in (client, a, b, backend):
            s.close()


class _CancelsItselfThenRaises:
    """A SocketLike whose close() cancels its own relay's future, then raises."""

    def __init__(self, sock: socket.socket, then: Callable[[], object]) -> None:
        self.sock, self.then = sock, then

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_into(self, buf: Any) -> int:
        return self.sock.recv_into(buf)

    def send(self, data: Any) -> int:
        return self.sock.send(data)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def close(self) -> None:
        self.sock.close()
        self.then()
        raise ValueError("flush failed")


def test_a_wrapper_s_close_that_cancels_its_relay_then_raises_is_reported() -> None:
    # The relay ends at both EOFs; its close() cancels the future (which cannot hold
    # an exception any more), then raises. Before, the ValueError went nowhere: the
    # await raised CancelledError and the loop's exception handler got nothing.
    client, a = socket.socketpair()
    b, backend = socket.socketpair()
    a.setblocking(False)
    handled: list[dict[str, Any]] = []
    futures: list[asyncio.Future[RelayStats]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: handled.append(ctx))
        wrapper = _CancelsItselfThenRaises(a, lambda: futures[0].cancel())  # noqa: PLW0108 (not made yet)
        futures.append(start_pipe_splice(wrapper, b, close=True))
        client.shutdown(socket.SHUT_WR)
        backend.shutdown(socket.SHUT_WR)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(futures[0], 10)

    try:
        asyncio.run(main())
        assert [(h.get("message"), type(h.get("exception"))) for h in handled] == [
            ("closing a cancelled relay's sockets failed", ValueError)
        ]
        assert a.fileno() == -1 and b.fileno() == -1
    finally:
        for s in (client, a, b, backend):
            s.close()


def test_cancelling_a_closed_loop_s_future_with_callbacks_ends_its_relay() -> None:
    # The C Future marks itself cancelled, then fails to schedule its callbacks on
    # the closed loop (RuntimeError "Event loop is closed"). Before, that error left
    # cancel() before the relay was ended: sockets held, the peer waiting, and a
    # second cancel() returned False, until some other start's sweep.
    a1, a2 = socket.socketpair()
    b1, b2 = socket.socketpair()
    loop = asyncio.new_event_loop()

    async def start() -> asyncio.Future[RelayStats]:
        return start_pipe_splice(a1, b1, close=True)

    try:
        future = loop.run_until_complete(start())
        future.add_done_callback(lambda _f: None)
        loop.close()
        assert future.cancel() is True
        assert future.cancelled()
        assert a1.fileno() == -1 and b1.fileno() == -1
        a2.settimeout(10)
        assert a2.recv(10) == b""  # the peer sees the end at once
        assert future.cancel() is False
    finally:
        loop.close()
        for s in (a1, a2, b1, b2):
            s.close()


class _ClosedIn(socket.socket):
    """A socket that records the thread its close() ran in."""

    threads: list[int]

    def close(self) -> None:
        self.threads.append(threading.get_ident())
        super().close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_wrong_thread_s_cancel_of_a_running_debug_loop_s_future_ends_the_relay_there(
    loop_kind: str,
) -> None:
    # A debug-mode loop's call_soon refuses another thread (RuntimeError
    # "Non-thread-safe operation") after the C Future has marked itself cancelled,
    # and drops its done-callbacks. The relay must not end in the wrong thread
    # (2ace530: its loop runs it), but it must end: it ran on, bytes flowing, its
    # future cancelled, a later cancel() from the loop's thread returning False, and
    # a task awaiting it waited for ever. Its loop ends it now, and wakes the task.
    threads: list[int] = []
    a1, a2, b1, b2 = (
        _ClosedIn(fileno=sock.detach()) for _ in range(2) for sock in socket.socketpair()
    )
    for sock in (a1, a2, b1, b2):
        sock.threads = threads
    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    loop.set_debug(True)
    started = threading.Event()
    stop = asyncio.Event()
    futures: list[asyncio.Future[RelayStats]] = []
    waiters: list[asyncio.Task[Any]] = []

    async def main() -> None:
        futures.append(start_pipe_splice(a1, b1, close=True))
        waiters.append(asyncio.ensure_future(asyncio.wait_for(futures[0], JOIN)))
        await asyncio.sleep(0)  # the waiter awaits it: a done-callback
        started.set()
        await asyncio.wait_for(stop.wait(), JOIN)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        assert started.wait(JOIN)
        with pytest.raises(RuntimeError, match="Non-thread-safe"):
            futures[0].cancel()
        # The peers see the end (AF_UNIX: EOF; nothing while the relay ran on).
        for peer in (a2, b2):
            peer.settimeout(WATCHDOG)
            assert peer.recv(100) == b""
        woken = asyncio.run_coroutine_threadsafe(asyncio.wait([waiters[0]]), loop)
        woken.result(JOIN)
        assert waiters[0].cancelled()  # its await raised CancelledError
        assert threads[:2] == [thread.ident, thread.ident]  # a1, b1: in the loop's thread
        assert a1.fileno() == -1 and b1.fileno() == -1
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(JOIN)
        end_loop(loop, close=[a1, a2, b1, b2])


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_an_idle_timer_that_fires_early_does_not_spin_the_loop(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, loop_kind: str
) -> None:
    # uvloop (libuv) counts timers in whole milliseconds of a cached loop time and
    # fires them up to 1 ms early; the relay re-armed call_later(left) for the rest,
    # under 1 ms, which uvloop ran as a 0 ms timer: hundreds of timer callbacks per
    # relay (761-4271 for 40 relays), the loop spinning until the deadline passed.
    calls = 0
    real_on_timer = relay_mod._Driven.on_timer

    def counted(self: Any) -> None:
        nonlocal calls
        calls += 1
        real_on_timer(self)

    monkeypatch.setattr(relay_mod._Driven, "on_timer", counted)
    pairs = [(*tcp_pair(listener), *tcp_pair(listener)) for _ in range(20)]

    async def main() -> list[RelayStats]:
        futures = []
        for i, (client, a, b, _backend) in enumerate(pairs):
            futures.append(start_pipe_splice(a, b, idle_timeout=0.1 + i * 0.0037))
            client.sendall(b"x")  # one byte, then silence
        return await asyncio.wait_for(asyncio.gather(*futures), JOIN)

    loop = _new_loop(loop_kind)
    try:
        with _watchdog(*(s for q in pairs for s in q)):
            stats = loop.run_until_complete(main())
    finally:
        end_loop(loop)
        for q in pairs:
            for s in q:
                s.close()
    assert [s.a_end for s in stats] == [End.TIMEOUT] * len(pairs)
    # One callback per relay at the deadline, a few more where it fired early (each
    # re-arm at least 1 ms): not hundreds.
    assert calls <= 4 * len(pairs), calls


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_transport_s_socket_is_refused_on_both_loops(
    listener: socket.socket, loop_kind: str
) -> None:
    # get_extra_info("socket") of a transport: asyncio's TransportSocket lacks the
    # I/O methods and was refused, but uvloop's PseudoSocket has each of them (each
    # raising TypeError), so it passed as a SocketLike: the relay started, failed at
    # its first read, and with close=True reset the caller's other socket.
    b, backend = tcp_pair(listener)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        made: asyncio.Future[asyncio.BaseTransport] = loop.create_future()

        class Protocol(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                made.set_result(transport)

        server = await loop.create_server(Protocol, "127.0.0.1", 0)
        with socket.create_connection(server.sockets[0].getsockname(), timeout=JOIN):
            transport = await asyncio.wait_for(made, JOIN)
            try:
                for start in (start_pipe_splice, async_pipe_splice):
                    with pytest.raises(WrongSocketType, match="a transport's socket") as info:
                        await start(transport.get_extra_info("socket"), b)
                    assert "relay side a" in str(info.value)
            finally:
                transport.close()
                server.close()
                await server.wait_closed()

    loop = _new_loop(loop_kind)
    try:
        loop.run_until_complete(main())
    finally:
        end_loop(loop)
    try:
        # b untouched: open, blocking, and its peer hears nothing (no reset).
        assert b.fileno() != -1 and b.gettimeout() is None
        b.sendall(b"still here")
        backend.settimeout(JOIN)
        assert backend.recv(64) == b"still here"
    finally:
        b.close()
        backend.close()
