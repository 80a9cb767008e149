"""start_pipe_splice's quick path against the full relay.

A start_pipe_splice() of two plain TCP sockets with close=True and no options runs as a
``_Quick`` (short messages and half-closes), which hands over to a ``_Driven`` and
``_Relay`` built from its state at anything else. Each test runs the same traffic
through that and through async_pipe_splice() (the full relay, with the same close=True
semantics) on asyncio's loop and on uvloop: the same RelayStats (all but the duration),
the same bytes and the same end (EOF or reset) at the peers; and the quick relay hands
over where the case says (recorded by ``_Spy``), or never.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import select
import socket
import threading
import warnings
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

import reuselb._relay as relay_mod
from reuselb import (
    InvalidArgument,
    RelayStats,
    SocketClosed,
    WrongSocketType,
    async_pipe_splice,
    start_pipe_splice,
)
from tests.conftest import end_loop
from tests.test_relay import (
    _file_id,
    _fork_reporting,
    _how_it_ends,
    _open_files,
    _peer_sees_the_end,
    _reap,
    _steal_fd_number,
    _stuck_in_syn_sent,
    _unread,
    tcp_pair,
)
from tests.test_relay_hub import (
    JOIN,
    _new_loop,
    _nonblocking,
    _recv_exactly,
    _start,
    _start_on_running_loop,
)

pytestmark = pytest.mark.linux
LOOPS = ["asyncio", "uvloop"]
# The quick path (start_pipe_splice, then async_pipe_splice in a task), then the full
# one (async_pipe_splice with the quick path off), with the same traffic.
FORMS = ("quick", "quick-async", "full")
T = TypeVar("T")
Seen = dict[str, Any]


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0), backlog=4096) as lst:
        yield lst


class _Spy:
    """What the test's ``_Quick`` relays did: each one's hand-over (promotion) with the
    epoll event it was handling then (None: outside an event, e.g. a cancel, the loop's
    shutdown, a side lost to a new relay, a refused start), the sends that handed
    over, as (bytes read, bytes sent), and how many starts took the quick path."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.promotions: list[tuple[relay_mod._Quick, int | None]] = []
        self.hand_overs: list[tuple[relay_mod._Quick, int, int]] = []
        self.quick_starts = 0  # start_pipe_splice calls that took the quick path
        _STARTED.clear()
        handling: list[int] = []  # the events being handled, innermost last
        real_event = relay_mod._Quick.event
        real_promote = relay_mod._Quick.promote
        real_hand_over = relay_mod._Quick._hand_over
        real_start_quick = relay_mod._start_quick

        def event(quick: relay_mod._Quick, fd: int, ev: int) -> None:
            handling.append(ev)
            try:
                real_event(quick, fd, ev)
            finally:
                handling.pop()

        def promote(quick: relay_mod._Quick) -> relay_mod._Driven:
            if quick.promoted is None:  # later calls return the same driver
                self.promotions.append((quick, handling[-1] if handling else None))
            return real_promote(quick)

        def hand_over(  # noqa: PLR0917 - _Quick._hand_over's own signature
            quick: relay_mod._Quick, name: str, scratch: memoryview, n: int, m: int, drain: bool
        ) -> None:
            self.hand_overs.append((quick, n, m))
            real_hand_over(quick, name, scratch, n, m, drain)

        def start_quick(a: Any, b: Any, loop: asyncio.AbstractEventLoop, kind: Any) -> Any:
            self.quick_starts += 1
            quick = real_start_quick(a, b, loop, kind)
            _STARTED.append(quick)  # for _begin: a task's may hand over before it looks
            return quick

        monkeypatch.setattr(relay_mod, "_start_quick", start_quick)
        monkeypatch.setattr(relay_mod._Quick, "event", event)
        monkeypatch.setattr(relay_mod._Quick, "promote", promote)
        monkeypatch.setattr(relay_mod._Quick, "_hand_over", hand_over)

    def sends(self, quick: relay_mod._Quick | None) -> list[tuple[int, int]]:
        """The sends at which *quick* handed over, as (bytes read, bytes sent)."""
        return [(n, m) for q, n, m in self.hand_overs if q is quick]

    def of(self, quick: relay_mod._Quick | None) -> list[int | None]:
        """The events at which *quick* handed over (at most one)."""
        return [ev for q, ev in self.promotions if q is quick]


# The _Quick relays started in this test (recorded by _Spy).
_STARTED: list[relay_mod._Quick] = []


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    return _Spy(monkeypatch)


def _run(loop_kind: str, coro: Coroutine[Any, Any, T]) -> T:
    """Run *coro* with asyncio.run or uvloop.run: nothing may reach the loop's exception
    handler, and no warning may be issued, from the start to the end of the shutdown."""
    handled: list[dict[str, Any]] = []

    async def main() -> T:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: handled.append(ctx))
        return await coro

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = uvloop.run(main()) if loop_kind == "uvloop" else asyncio.run(main())
    assert not handled, handled
    assert not caught, [str(w.message) for w in caught]
    return result


async def _full_relay(a: socket.socket, b: socket.socket) -> RelayStats:
    """async_pipe_splice(a, b) on the full relay's path: its body without the quick
    path's branch."""
    relay = relay_mod._Relay(a, b, pipe_size=None, idle_timeout=None, close=True)
    return await relay_mod._run_async(relay)


async def _begin(
    form: str, a: socket.socket, b: socket.socket
) -> tuple[asyncio.Future[RelayStats], relay_mod._Quick | None]:
    """A relay of *a* and *b*, running: start_pipe_splice's quick one (and it),
    async_pipe_splice's quick one in a task (and it), or async_pipe_splice's full one
    in a task (and None)."""
    fut: asyncio.Future[RelayStats]
    if form == "full":
        fut = asyncio.ensure_future(_full_relay(a, b))
        await asyncio.sleep(0)  # one loop step: the task's first step, the start, ran
        if fut.done():
            fut.result()  # the start's exception
    else:
        fut = await _start("start" if form == "quick" else "coroutine", a, b)
    owner = relay_mod._HUBS[asyncio.get_running_loop()].owners[a.fileno()]
    if form == "full":
        assert isinstance(owner, relay_mod._Driven)
        assert not isinstance(owner.future, relay_mod._HeldFuture)  # no _Quick's
        return fut, None
    # The quick path: the hub's owner is the _Quick, or already the driver it handed
    # over to (a task's first step and the relay's first events may share a loop
    # iteration before this looks).
    (quick,) = [q for q in _STARTED if q.a is a and q.b is b]  # the quick path
    assert owner is quick or owner is quick.promoted
    if form == "quick":
        assert isinstance(fut, relay_mod._RelayFuture) and fut is quick.future
    else:
        assert type(quick.future) is relay_mod._HeldFuture  # the task's: no cancel()
    return fut, quick


def _same_in_every_form(see: Callable[[str], T]) -> dict[str, T]:
    """What *see* saw in each of FORMS, asserted the same in all three."""
    seen = {form: see(form) for form in FORMS}
    assert seen["quick"] == seen["quick-async"] == seen["full"]
    return seen


def _stats(stats: RelayStats) -> Seen:
    """*stats* but its duration (and the error as its type, errno and text)."""
    error = stats.error
    return {
        "a_to_b": stats.a_to_b,
        "b_to_a": stats.b_to_a,
        "a_end": stats.a_end,
        "b_end": stats.b_end,
        "failed": stats.failed,
        "error": None if error is None else (type(error), error.errno, str(error)),
        "spliced": stats.spliced,
        "spliced_bytes": stats.spliced_bytes > 0,
        "fallback": stats.fallback,
    }


def _digest(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


async def _send_then_eof(sock: socket.socket, data: bytes) -> None:
    await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, data), JOIN)
    sock.shutdown(socket.SHUT_WR)


async def _read_end(sock: socket.socket) -> tuple[bytes, str]:
    """Read *sock* to its end: (the bytes, "eof" or "reset")."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    for _ in range(100_000):  # bounded: each read takes a byte or is the end
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), JOIN)
        except ConnectionResetError:
            return bytes(data), "reset"
        if not chunk:
            return bytes(data), "eof"
        data += chunk
    raise AssertionError("no end in sight")


async def _ping_pong(client: socket.socket, backend: socket.socket, rounds: int) -> None:
    """*rounds* short messages each way, each read before the next is sent."""
    loop = asyncio.get_running_loop()
    for i in range(rounds):
        for src, dst, what in ((client, backend, b"ping"), (backend, client, b"pong")):
            message = b"%s %d;" % (what, i)
            await asyncio.wait_for(loop.sock_sendall(src, message), JOIN)
            assert await asyncio.wait_for(_recv_exactly(dst, len(message)), JOIN) == message


def _nonblocking_peers(*peers: socket.socket) -> None:
    for peer in peers:
        peer.setblocking(False)


def _closed(*socks: socket.socket) -> list[bool]:
    return [s.fileno() == -1 for s in socks]


# --------------------------------------------------------------------------- traffic


def _any_pair(lst: socket.socket) -> tuple[socket.socket, socket.socket]:
    """tcp_pair for a listener of either family (an AF_INET6 one's getsockname() has
    four fields, create_connection() takes host and port)."""
    c = socket.create_connection(lst.getsockname()[:2])
    s, _ = lst.accept()
    return c, s


async def _churn(
    lst: socket.socket, form: str, exchanges: list[tuple[bytes, bytes]], spy: _Spy
) -> list[Seen]:
    seen = []
    for request, response in exchanges:
        client, a = _any_pair(lst)
        b, backend = _any_pair(lst)
        try:
            fut, quick = await _begin(form, a, b)
            _nonblocking_peers(client, backend)
            await _send_then_eof(client, request)
            got_request = await _read_end(backend)
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_sendall(backend, response), JOIN)
            backend.close()  # answered: a close, not a half-close
            got_response = await _read_end(client)
            stats = await asyncio.wait_for(fut, JOIN)
            if quick is not None:
                assert spy.of(quick) == [], "a request and its response are the quick path's"
            seen.append(
                {
                    "request": (_digest(got_request[0]), got_request[1]),
                    "response": (_digest(got_response[0]), got_response[1]),
                    "stats": _stats(stats),
                    "closed": _closed(a, b),
                }
            )
        finally:
            for s in (client, a, b, backend):
                s.close()
    return seen


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("family", ["ipv4", pytest.param("ipv6", marks=pytest.mark.ipv6)])
def test_request_response_churn_stays_quick_end_to_end(
    listener: socket.socket, loop_kind: str, family: str, spy: _Spy
) -> None:
    # A client sends its request and its EOF, the backend answers and closes: what a
    # proxy under connection churn relays, and the quick path's whole reason to be.
    rng = random.Random(f"{loop_kind} {family}")
    exchanges = [
        (rng.randbytes(rng.randrange(1, 4096)), rng.randbytes(rng.randrange(1, 4096)))
        for _ in range(10)
    ]
    if family == "ipv6":
        with socket.create_server(("::1", 0), family=socket.AF_INET6, backlog=64) as lst:
            seen = _same_in_every_form(lambda f: _run(loop_kind, _churn(lst, f, exchanges, spy)))
    else:
        seen = _same_in_every_form(lambda f: _run(loop_kind, _churn(listener, f, exchanges, spy)))
    for (request, response), one in zip(exchanges, seen["quick"], strict=True):
        assert one["request"] == (_digest(request), "eof")
        assert one["response"] == (_digest(response), "eof")
        assert one["stats"]["a_to_b"] == len(request)
        assert one["stats"]["b_to_a"] == len(response)
        assert one["closed"] == [True, True]
    assert spy.promotions == []


async def _half_closes(lst: socket.socket, form: str, first: str, before: bool, spy: _Spy) -> Seen:
    client, a = tcp_pair(lst)
    b, backend = tcp_pair(lst)
    try:
        fut, quick = await _begin(form, a, b)
        _nonblocking_peers(client, backend)
        loop = asyncio.get_running_loop()
        closer, other = (client, backend) if first == "client" else (backend, client)
        last = b""
        if before:
            await _ping_pong(client, backend, 5)
            # The closer's last messages, sent at once, then its EOF: the other side
            # gets every byte before the EOF, and only then the EOF.
            last = b"".join(b"last %d;" % i for i in range(3))
            for i in range(3):
                await asyncio.wait_for(loop.sock_sendall(closer, b"last %d;" % i), JOIN)
        closer.shutdown(socket.SHUT_WR)
        got_last = await _read_end(other)
        # The other direction keeps flowing.
        for i in range(5):
            message = b"after %d;" % i
            await asyncio.wait_for(loop.sock_sendall(other, message), JOIN)
            assert await asyncio.wait_for(_recv_exactly(closer, len(message)), JOIN) == message
        other.shutdown(socket.SHUT_WR)
        got_after = await _read_end(closer)
        stats = await asyncio.wait_for(fut, JOIN)
        if quick is not None:
            # Short messages and half-closes are the quick path's; an EOF before any
            # byte went either way is not (its FIN may have to wait for a connect:
            # here b is connected, and the full relay sends it at once).
            handed = spy.of(quick)
            assert handed == [] if before else (len(handed) == 1 and handed[0] is not None)
        assert got_last == (last, "eof")
        return {
            "last": got_last,
            "after": got_after,
            "stats": _stats(stats),
            "closed": _closed(a, b),
        }
    finally:
        for s in (client, a, b, backend):
            s.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("first", ["client", "backend"])
@pytest.mark.parametrize("before", [True, False], ids=["after-messages", "before-any-byte"])
def test_short_messages_and_half_closes_stay_quick(
    listener: socket.socket, loop_kind: str, first: str, before: bool, spy: _Spy
) -> None:
    seen = _same_in_every_form(
        lambda f: _run(loop_kind, _half_closes(listener, f, first, before, spy))
    )
    assert seen["quick"]["after"] == (b"", "eof")
    assert seen["quick"]["closed"] == [True, True]
    assert seen["quick"]["stats"]["failed"] is None


async def _streams(lst: socket.socket, form: str, up: bytes, down: bytes, spy: _Spy) -> Seen:
    client, a = tcp_pair(lst)
    b, backend = tcp_pair(lst)
    try:
        fut, quick = await _begin(form, a, b)
        _nonblocking_peers(client, backend)
        _, _, got_up, got_down = await asyncio.gather(
            _send_then_eof(client, up),
            _send_then_eof(backend, down),
            _read_end(backend),
            _read_end(client),
        )
        stats = await asyncio.wait_for(fut, JOIN)
        if quick is not None:
            # Handed over once, at an event, by a read that filled the 64 KiB scratch
            # (a stream) or by a send that the other side did not take in full.
            [ev] = spy.of(quick)
            assert ev is not None and spy.hand_overs
        return {
            "up": (_digest(got_up[0]), got_up[1]),
            "down": (_digest(got_down[0]), got_down[1]),
            "stats": _stats(stats),
            "closed": _closed(a, b),
        }
    finally:
        for s in (client, a, b, backend):
            s.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_stream_each_way_at_once_hands_over_and_splices(
    listener: socket.socket, loop_kind: str, spy: _Spy
) -> None:
    rng = random.Random(f"streams {loop_kind}")
    up, down = rng.randbytes(8 << 20), rng.randbytes(8 << 20)
    seen = _same_in_every_form(lambda f: _run(loop_kind, _streams(listener, f, up, down, spy)))
    assert seen["quick"]["up"] == (_digest(up), "eof")
    assert seen["quick"]["down"] == (_digest(down), "eof")
    assert seen["quick"]["stats"]["spliced"] is True


def _stalled(fd: int) -> bool:
    """Whether the running loop's relay that reads fd *fd* holds bytes its destination
    did not take (a partial send): the quick relay handed over by then."""
    owner = relay_mod._HUBS[asyncio.get_running_loop()].owners.get(fd)
    return isinstance(owner, relay_mod._Driven) and owner.relay.flows[0].pending > 0


async def _slow_backend(form: str, payload: bytes, spy: _Spy) -> Seen:
    # Small, fixed buffers (set on the listeners, so that the windows agree): the
    # client's sends block once they hold less than the payload, and no read of a
    # fills the relay's 64 KiB scratch (a's queue holds less), so a partial send is
    # the only way out of the quick path.
    with socket.create_server(("127.0.0.1", 0)) as lst_a:
        lst_a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        client, a = tcp_pair(lst_a)
    with socket.create_server(("127.0.0.1", 0)) as lst_b:
        lst_b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        b, backend = tcp_pair(lst_b)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    try:
        fut, quick = await _begin(form, a, b)
        _nonblocking_peers(client, backend)
        sent, stalled, blocked = 0, False, False
        while sent < len(payload) and not blocked:
            try:
                sent += client.send(payload[sent : sent + 1000])
            except BlockingIOError:
                blocked = True  # more than the buffers on the way hold
                break
            for _ in range(1000):
                # Until the relay read it (a short read), or stalled: one message
                # per read, so that the relay's reads stay short.
                stalled = stalled or _stalled(a.fileno())
                if stalled or _unread(a) == 0:
                    break
                await asyncio.sleep(0)  # nothing to wait on: a bounded re-check
            else:
                raise AssertionError("the relay never read the client's bytes")
        assert blocked and stalled, (sent, stalled)
        # The backend reads from here: every byte, in order, then the EOF.
        _, got = await asyncio.gather(_send_then_eof(client, payload[sent:]), _read_end(backend))
        backend.shutdown(socket.SHUT_WR)
        back = await _read_end(client)
        stats = await asyncio.wait_for(fut, JOIN)
        if quick is not None:
            assert len(spy.of(quick)) == 1
            [(n, m)] = spy.sends(quick)  # the send that handed over: partial
            assert m < n < relay_mod._COPY_BUFFER
        return {
            "got": (_digest(got[0]), got[1]),
            "back": back,
            "stats": _stats(stats),
            "closed": _closed(a, b),
        }
    finally:
        for s in (client, a, b, backend):
            s.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_backend_that_reads_late_gets_every_byte_in_order(loop_kind: str, spy: _Spy) -> None:
    payload = random.Random(f"late {loop_kind}").randbytes(1 << 20)
    seen = _same_in_every_form(lambda f: _run(loop_kind, _slow_backend(f, payload, spy)))
    assert seen["quick"]["got"] == (_digest(payload), "eof")
    assert seen["quick"]["stats"]["a_to_b"] == len(payload)


async def _urgent(lst: socket.socket, form: str, inline: bool, spy: _Spy) -> Seen:
    client, a = tcp_pair(lst)
    b, backend = tcp_pair(lst)
    if inline:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    try:
        fut, quick = await _begin(form, a, b)
        _nonblocking_peers(client, backend)
        loop = asyncio.get_running_loop()
        await _ping_pong(client, backend, 2)
        await asyncio.wait_for(loop.sock_sendall(client, b"head"), JOIN)
        client.send(b"!", socket.MSG_OOB)
        await _send_then_eof(client, b"tail")
        got = await _read_end(backend)
        backend.shutdown(socket.SHUT_WR)
        back = await _read_end(client)
        stats = await asyncio.wait_for(fut, JOIN)
        if quick is not None:
            [ev] = spy.of(quick)  # at the urgent data's event
            assert ev is not None and ev & select.EPOLLPRI
        return {"got": got, "back": back, "stats": _stats(stats), "closed": _closed(a, b)}
    finally:
        for s in (client, a, b, backend):
            s.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("inline", [False, True], ids=["dropped", "oobinline"])
def test_urgent_data_hands_over_and_is_relayed_as_the_full_relay_does(
    listener: socket.socket, loop_kind: str, inline: bool, spy: _Spy
) -> None:
    seen = _same_in_every_form(lambda f: _run(loop_kind, _urgent(listener, f, inline, spy)))
    # (recv passes the mark, dropping the urgent byte unless SO_OOBINLINE.)
    expected = b"head" + (b"!" if inline else b"") + b"tail"
    assert seen["quick"]["got"] == (expected, "eof")


# --------------------------------------------------------------------------- connect


async def _syn_sent_case(lst0: socket.socket, form: str, variant: str, spy: _Spy) -> Seen:
    client, a = tcp_pair(lst0)
    lst, filler, b = _stuck_in_syn_sent()
    backend: socket.socket | None = None
    loop = asyncio.get_running_loop()
    try:
        if variant == "request-first":
            client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)  # before any byte went the other way
        fut, quick = await _begin(form, a, b)
        if variant == "refused":
            lst.close()  # b's next SYN is refused
        else:
            queued, _ = lst.accept()  # room for b's next SYN (sent again after ~1 s)
            queued.close()
            lst.setblocking(False)
            conn, _ = await asyncio.wait_for(loop.sock_accept(lst), 10)
            conn.setblocking(False)
            backend = conn
        seen: Seen = {}
        client.setblocking(False)
        if backend is not None:
            seen["request"] = await _read_end(backend)  # the client's EOF reached it
            await _send_then_eof(backend, b"220 banner\r\n")
        seen["back"] = await _read_end(client)
        seen["stats"] = _stats(await asyncio.wait_for(fut, JOIN))
        seen["closed"] = _closed(a, b)
        if quick is not None:
            # The EOF before any byte (its FIN may have to wait for the connect), or
            # the send that b in SYN_SENT did not take, handed over.
            [ev] = spy.of(quick)
            assert ev is not None and ev & select.EPOLLIN
        return seen
    finally:
        for s in (client, a, b, lst, filler, backend):
            if s is not None:
                s.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_an_eof_before_any_byte_waits_for_the_backend_connect(
    listener: socket.socket, loop_kind: str, spy: _Spy
) -> None:
    # shutdown(SHUT_WR) of a socket in SYN_SENT drops the connection attempt: the
    # quick path hands over at such an EOF, and the FIN waits for the connect, as
    # the full relay's does. All at once: each waits ~1 s for b's SYN to be resent.
    variants = ["eof-first", "request-first", "refused"]

    async def main() -> list[Seen]:
        return await asyncio.gather(
            *(
                _syn_sent_case(listener, form, variant, spy)
                for form in FORMS
                for variant in variants
            )
        )

    seen = _run(loop_kind, main())
    k = len(variants)
    quick, quick_async, full = seen[:k], seen[k : 2 * k], seen[2 * k :]
    assert quick == quick_async == full
    eof_first, request_first, refused = quick
    assert eof_first["request"] == (b"", "eof")
    assert eof_first["back"] == (b"220 banner\r\n", "eof")
    assert request_first["request"] == (b"hello", "eof")
    assert (eof_first["stats"]["failed"], request_first["stats"]["failed"]) == (None, None)
    assert refused["stats"]["failed"] == "b"
    assert refused["stats"]["error"][1] == errno.ECONNREFUSED
    assert len(spy.promotions) == 2 * len(variants)  # each quick form's
    # request-first: b in SYN_SENT took none of the 5 bytes (EAGAIN), which handed over.
    assert [(n, m) for _q, n, m in spy.hand_overs] == [(5, 0)] * 2


# --------------------------------------------------------------------------- failures


async def _reset(lst: socket.socket, form: str, who: str, spy: _Spy) -> Seen:
    client, a = tcp_pair(lst)
    b, backend = tcp_pair(lst)
    try:
        fut, quick = await _begin(form, a, b)
        _nonblocking_peers(client, backend)
        await _ping_pong(client, backend, 3)  # nothing unread anywhere
        resetter, survivor = (client, backend) if who == "client" else (backend, client)
        resetter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        resetter.close()
        seen: Seen = {"survivor": await _read_end(survivor)}
        seen["stats"] = _stats(await asyncio.wait_for(fut, JOIN))
        seen["closed"] = _closed(a, b)
        if quick is not None:
            [ev] = spy.of(quick)  # the reset's event
            assert ev is not None and ev & select.EPOLLERR
        return seen
    finally:
        for s in (client, a, b, backend):
            s.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("who", ["client", "backend"])
def test_a_peer_reset_fails_that_side_and_resets_the_other(
    listener: socket.socket, loop_kind: str, who: str, spy: _Spy
) -> None:
    seen = _same_in_every_form(lambda f: _run(loop_kind, _reset(listener, f, who, spy)))
    failed = "a" if who == "client" else "b"
    assert seen["quick"]["stats"]["failed"] == failed
    assert seen["quick"]["survivor"] == (b"", "reset")


async def _cancelled(lst: socket.socket, form: str, when: str, spy: _Spy) -> Seen:
    client, a = tcp_pair(lst)
    b, backend = tcp_pair(lst)
    try:
        before = _open_files()  # this loop's own, the four sockets
        sides = {what for what in before if what[0] in (a.fileno(), b.fileno())}
        fut, quick = await _begin(form, a, b)
        _nonblocking_peers(client, backend)
        seen: Seen = {}
        if when != "fresh":
            await _ping_pong(client, backend, 2)
        if when == "half-closed":
            # The request is complete (its EOF delivered): only the response is cut.
            await _send_then_eof(client, b"request")
            seen["request"] = await _read_end(backend)
        fut.cancel()
        if form == "quick":
            assert fut.cancelled() and _closed(a, b) == [True, True], "ended at once"
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(fut, JOIN)
        if quick is not None:
            assert spy.of(quick) == [None]  # handed over by the cancel, to end
        seen["cancelled"] = fut.cancelled()
        seen["closed"] = _closed(a, b)
        after = _open_files()
        # a and b closed, the hub's epoll too, and nothing else opened or closed.
        seen["fds"] = (before - after == sides, after - before)
        seen["client"] = await _read_end(client)
        seen["backend"] = await _read_end(backend)
        return seen
    finally:
        for s in (client, a, b, backend):
            s.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("when", ["fresh", "after-bytes", "half-closed"])
def test_a_cancel_while_quick_ends_the_relay_as_the_full_relay_s_does(
    listener: socket.socket, loop_kind: str, when: str, spy: _Spy
) -> None:
    # A direction that did not reach its EOF is cut off: its peer is reset, never
    # sent a FIN that would pass for a complete stream.
    seen = _same_in_every_form(lambda f: _run(loop_kind, _cancelled(listener, f, when, spy)))
    assert seen["quick"]["cancelled"] and seen["quick"]["fds"] == (True, set())
    assert seen["quick"]["client"] == (b"", "reset")
    assert seen["quick"]["backend"] == (b"", "eof" if when == "half-closed" else "reset")


async def _left_running(
    sockets: tuple[socket.socket, socket.socket, socket.socket, socket.socket],
    form: str,
    when: str,
) -> asyncio.Future[RelayStats]:
    client, a, b, backend = sockets
    fut, _quick = await _begin(form, a, b)
    _nonblocking_peers(client, backend)
    if when == "half-closed":
        await _send_then_eof(client, b"request")
        assert await _read_end(backend) == (b"request", "eof")
    return fut  # still running: the loop's shutdown ends it


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("when", ["fresh", "half-closed"])
def test_the_loop_s_shutdown_ends_a_quick_relay_as_it_ends_a_full_one(
    listener: socket.socket, loop_kind: str, when: str, spy: _Spy
) -> None:
    # asyncio.run / uvloop.run cancel the full relay's task; the quick relay has none,
    # and the hub's shutdown hook ends it: the same end, nothing in the loop's handler.
    _run(loop_kind, asyncio.sleep(0))  # uvloop keeps a process-wide pipe from its first run
    seen: dict[str, Seen] = {}
    for form in FORMS:
        client, a = tcp_pair(listener)
        b, backend = tcp_pair(listener)
        try:
            before = _open_files()
            sides = {what for what in before if what[0] in (a.fileno(), b.fileno())}
            fut = _run(loop_kind, _left_running((client, a, b, backend), form, when))
            after = _open_files()
            seen[form] = {
                "cancelled": fut.cancelled(),
                "closed": _closed(a, b),
                # a and b closed, the hub's epoll and the loop's fds too, nothing else.
                "fds": (before - after == sides, after - before),
                "client": _how_it_ends(client),
                "backend": _how_it_ends(backend),
                "hubs": len(relay_mod._HUBS),
            }
        finally:
            for s in (client, a, b, backend):
                s.close()
    assert seen["quick"] == seen["quick-async"] == seen["full"]
    assert seen["quick"]["cancelled"] and seen["quick"]["fds"] == (True, set())
    assert seen["quick"]["closed"] == [True, True]
    assert seen["quick"]["client"] == "reset"
    assert seen["quick"]["backend"] == ("eof" if when == "half-closed" else "reset")
    # By the shutdown, to end them: start_pipe_splice's, then async_pipe_splice's.
    assert [ev for _q, ev in spy.promotions] == [None, None]


# --------------------------------------------------------------------------- sockets


async def _closed_behind(lst: socket.socket, form: str, side: str, spy: _Spy) -> Seen:
    client, a = tcp_pair(lst)
    b, backend = tcp_pair(lst)
    c2, d = tcp_pair(lst)
    stolen: socket.socket | None = None
    peer: socket.socket | None = None
    try:
        fut, quick = await _begin(form, a, b)
        _nonblocking_peers(client, backend, c2)
        await _ping_pong(client, backend, 2)
        victim = a if side == "a" else b
        number = victim.fileno()
        # The caller closes a side behind the relay's back, and the kernel gives its
        # fd number to a new connection, relayed by a new start.
        stolen, peer = _steal_fd_number(victim, lst)
        assert stolen.fileno() == number
        second, second_quick = await _begin(form, stolen, d)
        seen: Seen = {"stats": _stats(await asyncio.wait_for(fut, JOIN))}
        seen["client"] = await _read_end(client)
        seen["backend"] = await _read_end(backend)
        if quick is not None:
            assert spy.of(quick) == [None]  # by the new relay's start, to end it
        # The new relay works.
        peer.setblocking(False)
        await _ping_pong(peer, c2, 2)
        await _send_then_eof(peer, b"bye")
        await _send_then_eof(c2, b"bye")
        seen["second"] = (await _read_end(c2), await _read_end(peer))
        seen["second_stats"] = _stats(await asyncio.wait_for(second, JOIN))
        if second_quick is not None:
            assert spy.of(second_quick) == []
        seen["closed"] = _closed(a, b, stolen, d)
        return seen
    finally:
        for s in (client, a, b, backend, c2, d, stolen, peer):
            if s is not None:
                s.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("side", ["a", "b"])
def test_a_side_closed_behind_a_quick_relay_and_its_number_reused_fails_that_side(
    listener: socket.socket, loop_kind: str, side: str, spy: _Spy
) -> None:
    seen = _same_in_every_form(lambda f: _run(loop_kind, _closed_behind(listener, f, side, spy)))
    stats = seen["quick"]["stats"]
    assert (stats["failed"], stats["error"][1]) == (side, errno.EBADF)
    ends = {"a": seen["quick"]["client"], "b": seen["quick"]["backend"]}
    # The side closed by the caller: a plain close (an EOF); the other one is reset.
    assert ends[side] == (b"", "eof")
    assert ends["b" if side == "a" else "a"] == (b"", "reset")
    assert seen["quick"]["second"] == ((b"bye", "eof"), (b"bye", "eof"))
    assert seen["quick"]["second_stats"]["failed"] is None


def _state(sock: socket.socket) -> tuple[object, ...]:
    """What a refused start must leave as it was: open, the timeout, the open file's
    O_NONBLOCK, TCP_NODELAY."""
    if sock.fileno() == -1:
        return ("closed",)
    nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    return sock.gettimeout(), _nonblocking(sock), nodelay


def _watched(*socks: socket.socket) -> list[bool]:
    """Whether the running loop's hub watches each of *socks* (by its fd number)."""
    hub = relay_mod._HUBS.get(asyncio.get_running_loop())
    return [hub is not None and s.fileno() in hub.owners for s in socks]


async def _refused(form: str, x: socket.socket, y: socket.socket) -> Exception:
    """What a start of *x* and *y* the *form* way raised."""
    try:
        if form == "quick":
            start_pipe_splice(x, y)
        elif form == "full":
            await asyncio.wait_for(_full_relay(x, y), JOIN)
        else:
            await asyncio.wait_for(async_pipe_splice(x, y), JOIN)
    except Exception as exc:
        return exc
    raise AssertionError("the relay started")


async def _dup_refused(lst: socket.socket, form: str, as_side: str, spy: _Spy) -> Seen:
    client, a = tcp_pair(lst)
    b, backend = tcp_pair(lst)
    c, c_peer = tcp_pair(lst)
    dup = a.dup()
    try:
        fut, quick = await _begin(form, a, b)
        _nonblocking_peers(client, backend, c_peer)
        await _ping_pong(client, backend, 1)
        pair = (dup, c) if as_side == "a" else (c, dup)
        states = (_state(c), _state(dup))
        starts = spy.quick_starts
        refused = await _refused(form, *pair)
        assert spy.quick_starts == starts + (form != "full")
        assert isinstance(refused, InvalidArgument)
        assert refused.value == dup.fileno()  # named: the fd passed, and the relayed one
        text = str(refused).replace(f"socket {dup.fileno()}:", "socket <dup>:")
        text = text.replace(f"fd {a.fileno()},", "fd <a>,")
        seen: Seen = {"refused": (type(refused), refused.name, text)}
        assert (_state(c), _state(dup)) == states
        seen["watched"] = _watched(c, dup)
        # The running relay goes on as if nothing had happened.
        await _ping_pong(client, backend, 2)
        await _send_then_eof(client, b"bye")
        await _send_then_eof(backend, b"bye")
        seen["ends"] = (await _read_end(backend), await _read_end(client))
        seen["stats"] = _stats(await asyncio.wait_for(fut, JOIN))
        if quick is not None:
            assert spy.of(quick) == []
        # Nothing reached c's peer.
        with pytest.raises(BlockingIOError):
            c_peer.recv(1)
        return seen
    finally:
        for s in (client, a, b, backend, c, c_peer, dup):
            s.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("as_side", ["a", "b"])
def test_a_dup_of_a_quick_relay_s_socket_is_refused_and_the_relay_goes_on(
    listener: socket.socket, loop_kind: str, as_side: str, spy: _Spy
) -> None:
    seen = _same_in_every_form(lambda f: _run(loop_kind, _dup_refused(listener, f, as_side, spy)))
    assert seen["quick"]["refused"] == (
        InvalidArgument,
        "socket",
        "invalid socket <dup>: is the socket of fd <a>, which is in a running relay",
    )
    assert seen["quick"]["watched"] == [False, False]
    assert seen["quick"]["ends"] == ((b"bye", "eof"), (b"bye", "eof"))


REFUSALS = ["same-socket", "two-fds", "listening-a", "listening-b", "in-a-relay-a", "in-a-relay-b"]


async def _refusals(lst: socket.socket, refusal: str, spy: _Spy) -> dict[str, Seen]:
    # The same sockets for both forms: a refused start must leave them as they were,
    # so the second form's start finds what the first one did.
    x, x_peer = tcp_pair(lst)
    y, y_peer = tcp_pair(lst)
    r1, r1_peer = tcp_pair(lst)
    r2, r2_peer = tcp_pair(lst)
    server = socket.create_server(("127.0.0.1", 0))
    twin = x.dup()
    x.settimeout(None)  # blocking
    y.settimeout(7.5)  # a timeout: O_NONBLOCK on the file, given back as a timeout
    server.settimeout(2.5)
    all_socks = (x, y, twin, server)
    running: asyncio.Future[RelayStats] | None = None
    try:
        if refusal.startswith("in-a-relay"):
            # One relay, a quick one, for both forms' refused starts: what is compared
            # here is the refused start's path (test_relay refuses starts of a socket
            # in a full relay).
            running, _quick = await _begin("quick", r1, r2)
        pair = {
            "same-socket": (x, x),
            "two-fds": (x, twin),
            "listening-a": (server, y),
            "listening-b": (y, server),
            "in-a-relay-a": (r1, y),
            "in-a-relay-b": (y, r1),
        }[refusal]
        states = [_state(s) for s in all_socks]
        seen: dict[str, Seen] = {}
        for form in FORMS:
            starts = spy.quick_starts
            refused = await _refused(form, *pair)
            assert spy.quick_starts == starts + (form != "full"), "the quick path's start"
            assert [_state(s) for s in all_socks] == states, "touched by a refused start"
            seen[form] = {
                "refused": (type(refused), str(refused)),
                "watched": _watched(*all_socks),
                "relay": running is None or not running.done(),
            }
        # Not registered, not changed: later starts of them work.
        if running is not None:
            _nonblocking_peers(r1_peer, r2_peer)
            await _ping_pong(r1_peer, r2_peer, 2)
            await _send_then_eof(r1_peer, b"bye")
            await _send_then_eof(r2_peer, b"bye")
            assert (await _read_end(r2_peer), await _read_end(r1_peer)) == (
                (b"bye", "eof"),
                (b"bye", "eof"),
            )
            stats = await asyncio.wait_for(running, JOIN)
            assert (stats.failed, stats.a_to_b) == (None, 2 * len(b"ping 0;") + 3)
        _nonblocking_peers(x_peer, y_peer)
        fut, _quick = await _begin("quick", x, y)
        await _ping_pong(x_peer, y_peer, 2)
        x_peer.shutdown(socket.SHUT_WR)
        y_peer.shutdown(socket.SHUT_WR)
        stats = await asyncio.wait_for(fut, JOIN)
        assert (stats.failed, stats.b_to_a) == (None, 2 * len(b"pong 0;"))
        assert server.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert twin.fileno() != -1
        return seen
    finally:
        if running is not None:
            running.cancel()
        for s in (x, x_peer, y, y_peer, r1, r1_peer, r2, r2_peer, server, twin):
            s.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("refusal", REFUSALS)
def test_a_refused_quick_start_leaves_the_sockets_as_they_were(
    listener: socket.socket, loop_kind: str, refusal: str, spy: _Spy
) -> None:
    seen = _run(loop_kind, _refusals(listener, refusal, spy))
    assert seen["quick"] == seen["quick-async"] == seen["full"]
    kind = WrongSocketType if refusal.startswith("listening") else InvalidArgument
    assert seen["quick"]["refused"][0] is kind
    assert seen["quick"]["watched"] == [False] * 4
    assert seen["quick"]["relay"]


# --------------------------------------------------------------------------- fork


def _fork_while_running(lst: socket.socket, loop_kind: str, form: str, spy: _Spy) -> Seen:
    loop = _new_loop(loop_kind)
    handled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: handled.append(ctx))
    client, a = tcp_pair(lst)
    b, backend = tcp_pair(lst)
    fut: asyncio.Future[RelayStats] | None = None

    async def start() -> asyncio.Future[RelayStats]:
        fut, quick = await _begin(form, a, b)
        _nonblocking_peers(client, backend)
        await _ping_pong(client, backend, 2)
        if quick is not None:
            assert quick.promoted is None and quick in relay_mod._RUNNING  # quick still
        return fut

    try:
        fut = loop.run_until_complete(start())
        files = {fd: _file_id(fd) for fd in (a.fileno(), b.fileno())}
        # The child closes its copies of the peers, and says which of a's and b's it
        # still holds; it lives on until `go` is closed.
        pid, go, report = _fork_reporting(files, [client, backend])
        try:
            fut.cancel()  # the quick relay's ends at once; the task's, once it runs
            if form != "quick":
                loop.run_until_complete(asyncio.wait([fut], timeout=JOIN))
            # While the child lives: the reset is the parent's close, not its exit.
            seen = _peer_sees_the_end(client)
        finally:
            os.close(go)
            _reap(pid)
        if form == "quick":
            assert spy.promotions and spy.promotions[-1][1] is None  # by the cancel
        return {
            "report": report,
            "client": seen,
            "cancelled": fut.cancelled(),
            "closed": _closed(a, b),
            "handled": handled,
        }
    finally:
        end_loop(loop, cancel=[fut], close=[client, a, b, backend])


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_forked_child_lets_go_of_a_quick_relay_s_sockets(
    listener: socket.socket, loop_kind: str, spy: _Spy
) -> None:
    seen = _same_in_every_form(lambda f: _fork_while_running(listener, loop_kind, f, spy))
    assert seen["quick"]["report"] == b"[]"  # the child let go of both sockets
    # Within 10 s, while the child lives: were its copies of a still open, the
    # parent's close would send nothing until the child's exit ("nothing").
    assert seen["quick"]["client"] == "reset"
    assert seen["quick"]["handled"] == []


# ------------------------------------------------------------- closes and interrupts


@pytest.mark.parametrize("side", ["a", "b"])
def test_a_side_closed_while_a_quick_relay_starts_is_a_closed_side(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, side: str
) -> None:
    # Closed after the pair's checks (another thread, a signal handler; here by the
    # gettimeout() the start reads next): the quick start met fd -1 at
    # epoll.register and raised a bare ValueError; the full start says SocketClosed,
    # naming the side, and so does this one. Nothing is left in a hub.
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    victim, other = (a, b) if side == "a" else (b, a)
    real = socket.socket.gettimeout
    calls: list[int] = []

    def gettimeout(sock: socket.socket) -> float | None:
        calls.append(1)
        if sock is victim and victim.fileno() >= 0:
            victim.close()
        return real(sock)

    async def main() -> None:
        monkeypatch.setattr(socket.socket, "gettimeout", gettimeout)
        try:
            with pytest.raises(SocketClosed, match=f"relay side {side}"):
                start_pipe_splice(a, b)
        finally:
            monkeypatch.undo()
        assert calls, "the start read no timeout: the close never happened"
        assert asyncio.get_running_loop() not in relay_mod._HUBS

    try:
        asyncio.run(main())
        assert victim.fileno() == -1 and other.fileno() >= 0
        assert other.gettimeout() is None  # left blocking, as it was
        assert not _nonblocking(other)
    finally:
        for s in (client, a, b, backend):
            s.close()


class _InterruptOnce:
    """Raise KeyboardInterrupt (what the default SIGINT handler raises) from the first
    ``_Driven`` built, or from the first store of one as a future's driver: a signal
    landing in the middle of a _Quick's hand-over."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
        self.armed = True
        if where == "build":
            real_init = relay_mod._Driven.__init__

            def init(driven: relay_mod._Driven, *args: Any) -> None:
                real_init(driven, *args)
                self.fire()

            monkeypatch.setattr(relay_mod._Driven, "__init__", init)
            return
        slot = relay_mod._HeldFuture.__dict__["driven"]

        def get(fut: relay_mod._HeldFuture) -> Any:
            return slot.__get__(fut, relay_mod._HeldFuture)

        def put(fut: relay_mod._HeldFuture, value: Any) -> None:
            slot.__set__(fut, value)
            if isinstance(value, relay_mod._Driven):
                self.fire()  # the hub's owners swapped, the running set not yet

        monkeypatch.setattr(relay_mod._HeldFuture, "driven", property(get, put))

    def fire(self) -> None:
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["build", "swap"])
@pytest.mark.parametrize("how", ["cancel", "reset"])
def test_an_interrupt_in_a_quick_relay_s_hand_over_still_ends_it(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, how: str, where: str
) -> None:
    # A KeyboardInterrupt in promote() (its ~150 lines of Python) left the relay
    # running: after a cancel, the future cancelled but the sockets open and still
    # relaying; after the backend's reset (an EPOLLERR event, consumed), the future
    # pending for ever and the client never reset; interrupted between its swaps, a
    # second relay built and one left in the running set for good. It is ended as
    # the full relay ends one interrupted in its detach, and the interrupt goes on.
    client, a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    loop = asyncio.new_event_loop()
    fut: asyncio.Future[RelayStats] | None = None
    try:

        async def begin() -> asyncio.Future[RelayStats]:
            started = start_pipe_splice(a, b)
            assert isinstance(started, relay_mod._RelayFuture)
            assert isinstance(started.driven, relay_mod._Quick)
            return started

        fut = loop.run_until_complete(begin())
        ending = fut

        def end() -> None:
            if how == "cancel":
                ending.cancel()
                return
            backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            backend.close()  # a reset: an EPOLLERR event on b
            loop.run_until_complete(asyncio.wait([ending], timeout=JOIN))

        interrupt = _InterruptOnce(monkeypatch, where)
        with pytest.raises(KeyboardInterrupt):
            end()
        assert not interrupt.armed, "the interrupt came from elsewhere"
        monkeypatch.undo()
        assert fut.done()
        assert _closed(a, b) == [True, True]
        assert loop not in relay_mod._HUBS  # its only relay ended: the hub closed
        assert not [r for r in relay_mod._RUNNING if r.a is a]  # nothing left running
        assert _peer_sees_the_end(client) == "reset"
    finally:
        monkeypatch.undo()
        end_loop(loop, cancel=[fut], close=(client, a, b, backend))


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("form", ["quick", "full"])
def test_a_loop_run_in_another_thread_copies_through_that_thread_s_scratch(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, kind: str, form: str
) -> None:
    # Before: a relay kept the scratch buffer of the thread that started it. A loop
    # started in the main thread (run_until_complete) and then run in a worker
    # (run_forever) copied its relays' messages through the main thread's buffer
    # while the main thread's own relays used it too, and as the GIL is released
    # between recv_into and send, one connection's bytes went out on another. Which
    # thread reads into which buffer is recorded, so no race is needed to see it.
    readers: dict[int, set[int]] = {}  # id of a buffer's memory -> threads reading into it
    real_recv_into = socket.socket.recv_into

    def recv_into(sock: socket.socket, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        memory = buffer.obj if isinstance(buffer, memoryview) else buffer
        readers.setdefault(id(memory), set()).add(threading.get_ident())
        return real_recv_into(sock, buffer, nbytes, flags)

    monkeypatch.setattr(socket.socket, "recv_into", recv_into)
    options: dict[str, Any] = {} if form == "quick" else {"idle_timeout": 60.0}
    pairs = [(*tcp_pair(listener), *tcp_pair(listener)) for _ in range(2)]
    (client1, a1, b1, backend1), (client2, a2, b2, backend2) = pairs
    worker_loop, main_loop = _new_loop(kind), _new_loop(kind)
    fut1 = fut2 = None
    worker: threading.Thread | None = None
    try:
        fut1 = worker_loop.run_until_complete(_start_on_running_loop(a1, b1, **options))
        worker = threading.Thread(target=worker_loop.run_forever, daemon=True)
        worker.start()
        client1.sendall(b"from the worker's loop")
        backend1.settimeout(JOIN)
        got = b""
        while len(got) < 22:  # bounded: each recv waits JOIN at most
            chunk = backend1.recv(22 - len(got))
            assert chunk, f"EOF after {got!r}"
            got += chunk
        assert got == b"from the worker's loop"

        async def through_main() -> bytes:
            nonlocal fut2
            fut2 = start_pipe_splice(a2, b2, **options)
            client2.sendall(b"from the main loop")
            backend2.setblocking(False)
            got = b""
            while len(got) < 18:  # bounded by the wait_for below
                got += await asyncio.get_running_loop().sock_recv(backend2, 18 - len(got))
            return got

        got = main_loop.run_until_complete(asyncio.wait_for(through_main(), JOIN))
        assert got == b"from the main loop"
        assert len(readers) >= 2, readers  # each thread read into a buffer
        shared = {memory: threads for memory, threads in readers.items() if len(threads) > 1}
        assert not shared, f"a scratch buffer read into by several threads: {shared}"
    finally:
        if worker is not None:
            if fut1 is not None:
                worker_loop.call_soon_threadsafe(fut1.cancel)
            worker_loop.call_soon_threadsafe(worker_loop.stop)
            worker.join(JOIN)
            assert not worker.is_alive()
        end_loop(worker_loop, cancel=[fut1])
        end_loop(main_loop, cancel=[fut2])
        for pair in pairs:
            for s in pair:
                s.close()
