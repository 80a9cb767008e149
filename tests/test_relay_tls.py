"""TLS sides (ssl.SSLSocket) through the relay's fault matrix, in every driver.

The relay copies wherever a side is an ``ssl.SSLSocket`` (the bytes must pass
through OpenSSL): these tests run that copy path through what the plain relay's
tests check (tests/test_relay.py), with TLS on the client side (the relay
terminates TLS), on the backend side (the relay originates it) or on both, in each
form: blocking ``pipe_splice``, ``async_pipe_splice`` on asyncio and uvloop,
``start_pipe_splice``, and the fallback driver used where there is no epoll.

docs/relay.md says where a half-close toward a TLS side loses bytes: the relay's
``close_notify`` goes out through ``SSL_shutdown``, which CPython calls twice, and
OpenSSL discards application data the second call's read meets. That includes a
backend answering a request or the EOF itself just as the client's EOF reaches it,
not only a peer that streams. The integrity tests stay out of that window: a peer
half-closes only once it has received every byte the other peer sends, so the side
the relay then half-closes has stopped sending. Two tests go into it on purpose
(the answer made to arrive in the window every time, and met there by chance) and
check that a lost answer is reported (b failed, the ``ssl.SSLError``) and the client
reset, never given a clean EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import os
import random
import select
import shutil
import socket
import ssl
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop

import reuselb._relay as relay_mod
from reuselb import End, RelayStats, release_pipes
from tests.conftest import open_fds
from tests.test_relay import (
    JOIN,
    _make_cert,
    _wait_unread,
    run_asyncio,
    run_asyncio_selector,
    run_blocking,
    run_start,
    run_uvloop,
)

pytestmark = pytest.mark.linux

Runner = Callable[..., RelayStats]

# Every form the relay runs in. (The forced-copy runners of tests/test_relay.py
# add nothing here: a TLS side is copied whatever they say.)
FORMS: dict[str, Runner] = {
    "blocking": run_blocking,
    "asyncio": run_asyncio,
    "uvloop": run_uvloop,
    "asyncio-start": run_start,
    "asyncio-selector": run_asyncio_selector,  # the driver used where there is no epoll
}

# Which relay sides are TLS: (a, b). a faces the client, b the backend.
SIDES = {
    "client-tls": (True, False),  # the relay terminates TLS
    "backend-tls": (False, True),  # the relay originates TLS
    "both-tls": (True, True),  # re-encrypted
}

_WANT = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0), backlog=1024) as lst:
        yield lst


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for a self-signed certificate made now (openssl(1);
    an EC key keeps the many handshakes cheap)."""
    return _tls_contexts(tmp_path_factory.mktemp("tls"))


def _tls_contexts(
    tmp: Path, num_tickets: int | None = None
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = _make_cert(tmp)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    if num_tickets is not None:
        server.num_tickets = num_tickets
    return server, ssl.create_default_context(cafile=str(cert))


def handshake(
    raw_client: socket.socket,
    raw_server: socket.socket,
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """Wrap a connected pair in TLS: (client, server), handshake done, both blocking."""
    server: list[ssl.SSLSocket] = []
    failed: list[BaseException] = []

    def accept() -> None:
        try:
            server.append(contexts[0].wrap_socket(raw_server, server_side=True))
        except BaseException as exc:  # reported below
            failed.append(exc)

    raw_client.settimeout(JOIN)
    raw_server.settimeout(JOIN)
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        client = contexts[1].wrap_socket(raw_client, server_hostname="localhost")
    finally:
        t.join(JOIN)
        raw_server.close()  # (the SSLSocket has its fd; closes it if the wrap failed)
    assert server, failed
    client.settimeout(None)
    server[0].settimeout(None)
    return client, server[0]


def connected_pair(
    lst: socket.socket, contexts: tuple[ssl.SSLContext, ssl.SSLContext] | None
) -> tuple[socket.socket, socket.socket]:
    """(connecting end, accepted end) on loopback; TLS (client, server) if *contexts*."""
    c = socket.create_connection(lst.getsockname())
    s, _ = lst.accept()
    if contexts is None:
        return c, s
    return handshake(c, s, contexts)


@dataclasses.dataclass
class Setup:
    """client <-> [a relay b] <-> backend, TLS where :data:`SIDES` says."""

    client: socket.socket
    a: socket.socket
    b: socket.socket
    backend: socket.socket

    def close(self) -> None:
        for s in (self.client, self.a, self.b, self.backend):
            s.close()


def with_backend(
    lst: socket.socket,
    client: socket.socket,
    a: socket.socket,
    contexts: tuple[ssl.SSLContext, ssl.SSLContext] | None,
) -> Setup:
    """The setup of a made (client, a) pair and a new (b, backend) pair, TLS with
    *contexts*; (client, a) is closed if the second pair cannot be made."""
    try:
        b, backend = connected_pair(lst, contexts)
    except BaseException:
        client.close()
        a.close()
        raise
    return Setup(client, a, b, backend)


def make_setup(
    lst: socket.socket, contexts: tuple[ssl.SSLContext, ssl.SSLContext], sides: str
) -> Setup:
    tls_a, tls_b = SIDES[sides]
    client, a = connected_pair(lst, contexts if tls_a else None)
    return with_backend(lst, client, a, contexts if tls_b else None)


class Running:
    """A relay of *setup*'s a and b, run by *runner* in a thread."""

    def __init__(self, runner: Runner, setup: Setup, **kw: object) -> None:
        self.stats: RelayStats | None = None
        self.exc: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(runner, setup, kw), daemon=True)
        self.thread.start()

    def _run(self, runner: Runner, setup: Setup, kw: dict[str, object]) -> None:
        try:
            self.stats = runner(setup.a, setup.b, **kw)
        except BaseException as exc:
            self.exc = exc

    def join(self, timeout: float = JOIN) -> RelayStats:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "relay did not end"
        assert self.exc is None, self.exc
        assert self.stats is not None
        return self.stats


# --------------------------------------------------------------------------- peers


def half_close(sock: socket.socket) -> bool:
    """Send *sock*'s EOF without waiting: a close_notify for TLS, else a FIN.

    False if OpenSSL holds the close_notify back (the send buffer is full): call
    again once *sock* is writable. TLS: ``unwrap()`` on a non-blocking socket sends
    the close_notify and raises SSLWantReadError while the peer's is yet to come;
    it returns once the peer's has arrived too (the TLS layer is then gone).
    """
    if not isinstance(sock, ssl.SSLSocket):
        sock.shutdown(socket.SHUT_WR)
        return True
    try:
        sock.unwrap()
    except ssl.SSLWantReadError:
        return True
    except ssl.SSLWantWriteError:
        return False
    return True


@dataclasses.dataclass
class PeerResult:
    received: int
    digest: str
    tls_closed: bool  # TLS: close_notify both ways, the TLS layer unwrapped


def run_peer(sock: socket.socket, out: bytes, expect: int, result: list[PeerResult]) -> None:
    """Send *out* while reading, half-close once everything went out and *expect*
    bytes came in (never earlier: see the module docstring), read on to the EOF.

    Non-blocking, one thread per peer: an SSLSocket must not be read and written
    from two threads at once. A TLS write that would block is retried with the
    same bytes, as OpenSSL requires.
    """
    sock.setblocking(False)
    tls = isinstance(sock, ssl.SSLSocket)
    view = memoryview(out)
    h = hashlib.sha256()
    sent = got = 0
    eof = shut = unwrapped = False
    deadline = time.monotonic() + JOIN
    while not (eof and shut):
        if not shut and sent == len(out) and got >= expect:
            shut = half_close(sock)
            unwrapped = shut and tls and sock._sslobj is None  # type: ignore[attr-defined]
            if unwrapped:
                eof = True  # unwrap() took the peer's close_notify: that is its EOF
        while not eof:
            try:
                chunk = sock.recv(1 << 16)
            except _WANT:
                break
            except ssl.SSLZeroReturnError:  # the peer's close_notify after our own
                chunk = b""
            if not chunk:
                eof = True
            h.update(chunk)
            got += len(chunk)
        while sent < len(out):
            try:
                sent += sock.send(view[sent : sent + (1 << 16)])
            except _WANT:
                break
        if eof and shut:
            break
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"peer stuck: sent {sent}/{len(out)}, got {got}, eof {eof}"
        wants_write = sent < len(out) or (not shut and sent == len(out) and got >= expect)
        select.select([] if eof else [sock], [sock] if wants_write else [], [], remaining)
    if isinstance(sock, ssl.SSLSocket) and not unwrapped:
        # Both close_notify are through: SSL_shutdown completes without I/O.
        sock.settimeout(JOIN)
        sock.unwrap()
        unwrapped = True
    sock.setblocking(True)
    result.append(PeerResult(got, h.hexdigest(), unwrapped))


def exchange(setup: Setup, up: bytes, down: bytes) -> tuple[PeerResult, PeerResult]:
    """Both peers at once: the client sends *up*, the backend *down*."""
    at_client: list[PeerResult] = []
    at_backend: list[PeerResult] = []
    threads = [
        threading.Thread(
            target=run_peer, args=(setup.client, up, len(down), at_client), daemon=True
        ),
        threading.Thread(
            target=run_peer, args=(setup.backend, down, len(up), at_backend), daemon=True
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
    assert not any(t.is_alive() for t in threads)
    assert at_client and at_backend, "a peer failed (its exception is printed above)"
    return at_client[0], at_backend[0]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- integrity


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("sides", list(SIDES))
@pytest.mark.parametrize("size", [0, 1, (64 << 10) + 1, 3 << 20], ids=["0", "1", "64K+1", "3M"])
def test_integrity_both_ways_at_once(
    listener: socket.socket,
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    form: str,
    sides: str,
    size: int,
) -> None:
    rng = random.Random(f"{form}{sides}{size}")
    up = rng.randbytes(size)
    down = rng.randbytes(max(size - 12345, 0) if size > 1 else size)  # sizes differ
    setup = make_setup(listener, contexts, sides)
    try:
        r = Running(FORMS[form], setup)
        at_client, at_backend = exchange(setup, up, down)
        stats = r.join()
    finally:
        setup.close()
    assert (at_backend.received, at_backend.digest) == (len(up), digest(up))
    assert (at_client.received, at_client.digest) == (len(down), digest(down))
    # Each TLS peer got the relay's close_notify and the relay took its own: the
    # TLS layer ended cleanly both ways (no bare FIN, no alert).
    tls_a, tls_b = SIDES[sides]
    assert (at_client.tls_closed, at_backend.tls_closed) == (tls_a, tls_b)
    assert (stats.a_to_b, stats.b_to_a) == (len(up), len(down))
    assert (stats.a_end, stats.b_end, stats.failed, stats.error) == (End.EOF, End.EOF, None, None)
    assert (stats.spliced, stats.spliced_bytes) == (False, 0)  # TLS is copied


# ------------------------------------------------- a half-close toward a TLS side


_REQUEST = b"GET / HTTP/1.0\r\n\r\n"
_ANSWER = b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 2000


def _check_lost_answer(stats: RelayStats, got: bytes, client_end: str) -> None:
    """The relay's close_notify toward the TLS backend (the client's EOF) made
    OpenSSL discard the backend's answer: reported, and the client reset."""
    assert (stats.failed, stats.b_end, stats.a_end) == ("b", End.ERROR, End.EOF), stats
    assert isinstance(stats.error, ssl.SSLError), stats.error
    assert stats.error.reason == "APPLICATION_DATA_AFTER_CLOSE_NOTIFY", stats.error
    assert (stats.a_to_b, stats.b_to_a) == (len(_REQUEST), len(got))
    assert got != _ANSWER
    assert client_end == "reset"  # never a clean EOF after a lost answer


@pytest.mark.parametrize("form", list(FORMS))
def test_an_answer_met_by_the_close_notify_s_read_is_reported_lost(
    listener: socket.socket,
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    form: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # docs/relay.md, "TLS half-close": the relay forwards the client's EOF to the
    # TLS backend as a close_notify through SSL_shutdown, which CPython calls twice;
    # the second call reads, and OpenSSL discards application data it meets there
    # (APPLICATION_DATA_AFTER_CLOSE_NOTIFY). Here the backend's answer is made to
    # arrive in that window every time: the relay's check that nothing from the
    # backend waits unread (_tls_unread) waits until the whole answer is in b's
    # receive queue, then says nothing is. The answer is lost: RelayStats says so
    # (b failed, the SSLError) and the client is reset, never given a clean EOF.
    setup = make_setup(listener, contexts, "backend-tls")
    real = relay_mod._tls_unread
    go = threading.Event()
    answered = threading.Event()

    def late_answer(sock: ssl.SSLSocket) -> bool:
        if sock is not setup.b or go.is_set():
            return real(sock)
        queued = _unread(sock)  # (a TLS 1.3 server's session tickets, maybe)
        go.set()
        deadline = time.monotonic() + JOIN
        # The answer is one TLS record: 22 bytes of header, type and tag more.
        while not (answered.is_set() and _unread(sock) >= queued + len(_ANSWER) + 22):
            assert time.monotonic() < deadline, "the answer never arrived"
            select.select([], [], [], 0.001)  # bounded re-check, as _wait_for_reset
        return False

    def backend() -> None:
        setup.backend.settimeout(JOIN)
        with contextlib.suppress(OSError):  # the relay's end: checked by its stats
            assert _recv_exactly(setup.backend, len(_REQUEST)) == _REQUEST
            if go.wait(JOIN):
                setup.backend.sendall(_ANSWER)
                answered.set()
                setup.backend.recv(1)

    monkeypatch.setattr(relay_mod, "_tls_unread", late_answer)
    server = threading.Thread(target=backend, daemon=True)
    server.start()
    try:
        setup.client.sendall(_REQUEST)
        setup.client.shutdown(socket.SHUT_WR)  # HTTP/1.0-style: request, then EOF
        stats = Running(FORMS[form], setup, idle_timeout=JOIN).join()
        server.join(JOIN)
        assert go.is_set() and answered.is_set()
        _check_lost_answer(stats, b"", _how_it_ends(setup.client))
    finally:
        setup.close()


def _unread(sock: socket.socket) -> int:
    """Bytes in *sock*'s kernel receive queue (FIONREAD)."""
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)), "little")


@pytest.mark.parametrize("form", list(FORMS))
def test_a_tls_backend_answering_the_eof_gets_its_answer_through_or_reported_lost(
    listener: socket.socket, contexts: tuple[ssl.SSLContext, ssl.SSLContext], form: str
) -> None:
    # The same window, met by chance: the client sends its request and its EOF
    # at once, and the TLS backend answers the EOF (the relay's close_notify) at
    # once. The answer may arrive between SSL_shutdown's two calls (more often when
    # other threads hold the GIL the second call needs: here the backend's and this
    # test's). Whichever happens, the relay says it: the client has the whole answer
    # and a clean EOF, or b failed, the answer is lost and the client is reset. Never
    # a clean EOF after part of it, never a silent loss.
    outcomes = {"delivered": 0, "lost": 0}
    for _ in range(10):
        setup = make_setup(listener, contexts, "backend-tls")

        def backend(sock: socket.socket = setup.backend) -> None:
            sock.settimeout(JOIN)
            with contextlib.suppress(OSError):  # the relay's end: checked by its stats
                request = b""
                while chunk := sock.recv(1 << 16):  # to the close_notify
                    request += chunk
                sock.sendall(_ANSWER)
                sock.unwrap()  # type: ignore[attr-defined]

        server = threading.Thread(target=backend, daemon=True)
        server.start()
        try:
            r = Running(FORMS[form], setup, idle_timeout=JOIN)
            setup.client.sendall(_REQUEST)
            setup.client.shutdown(socket.SHUT_WR)
            setup.client.settimeout(JOIN)
            got = b""
            try:
                while chunk := setup.client.recv(1 << 16):
                    got += chunk
                client_end = "eof"
            except ConnectionResetError:
                client_end = "reset"
            stats = r.join()
            server.join(JOIN)
            if client_end == "eof" and got == _ANSWER:
                assert (stats.a_end, stats.b_end, stats.failed) == (End.EOF, End.EOF, None)
                assert (stats.a_to_b, stats.b_to_a) == (len(_REQUEST), len(_ANSWER))
                outcomes["delivered"] += 1
            else:
                _check_lost_answer(stats, got, client_end)
                outcomes["lost"] += 1
        finally:
            setup.close()
    assert sum(outcomes.values()) == 10, outcomes


# --------------------------------------------------------------------------- faults


def _reset(sock: socket.socket) -> None:
    """Close *sock* with an RST (SO_LINGER 0), not a FIN or a close_notify."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # (SSLSocket.close sends no close_notify)


def _how_it_ends(sock: socket.socket) -> str:
    """Read *sock*'s TCP stream to its end (bounded): "eof" (a FIN) or "reset".

    Below TLS, on the kernel socket: CPython reports a reset met by an SSLSocket
    read as a ragged EOF (SSLEOFError, returned as b"" by default), which cannot
    tell a reset from a FIN.
    """
    sock.setblocking(True)
    sock.settimeout(JOIN)
    try:
        for _ in range(10_000):  # each read takes at least one byte
            if not socket.socket.recv(sock, 1 << 16):
                return "eof"
    except ConnectionResetError:
        return "reset"
    raise AssertionError("no end in sight")


def _check_reset_end(stats: RelayStats, failed: str) -> None:
    """*failed* reset its connection: RelayStats names it and says how, the same
    for a TLS side as for a plain one (End.RESET, whether the relay met the reset
    in a read, a write, a close_notify or poll's POLLERR)."""
    ends = (stats.a_end, stats.b_end) if failed == "a" else (stats.b_end, stats.a_end)
    assert stats.failed == failed
    assert isinstance(stats.error, OSError)
    assert ends == (End.RESET, End.ABORTED), stats
    assert stats.error.errno in (errno.ECONNRESET, errno.EPIPE), stats.error


# Every peer resets, TLS or plain, while receiving and while sending. A TLS peer's
# reset is met by the relay inside OpenSSL, where CPython reports it as a ragged
# EOF (SSLEOFError, or a read of 0): taken for the side's clean EOF, it once made
# the relay half-close the survivor after a truncated stream and wait on (here,
# until the join timed out).
RESETS = [
    (who, while_, sides)
    for sides in SIDES
    for who in ("client", "backend")
    for while_ in ("receiving", "sending")
]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("case", RESETS, ids="-".join)
def test_a_reset_mid_stream_ends_the_relay_and_resets_the_other_side(
    listener: socket.socket,
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    form: str,
    case: tuple[str, str, str],
) -> None:
    # *who* resets its connection mid-stream: while *receiving* a stream from the
    # other peer (it read the first bytes and resets with the rest unread), or
    # after *sending* part of one (the relay delivered it and waits to read more).
    who, while_, sides = case
    setup = make_setup(listener, contexts, sides)
    resetter, survivor = (
        (setup.client, setup.backend) if who == "client" else (setup.backend, setup.client)
    )
    failed = "a" if who == "client" else "b"
    try:
        r = Running(FORMS[form], setup, idle_timeout=JOIN)
        sender, receiver = (survivor, resetter) if while_ == "receiving" else (resetter, survivor)
        sender.sendall(b"x" * 100_000)
        receiver.settimeout(JOIN)
        if while_ == "receiving":
            assert receiver.recv(1000)  # data is flowing
        else:
            assert _recv_exactly(receiver, 100_000) == b"x" * 100_000
        _reset(resetter)
        # The survivor's stream was cut off: it is reset, never given a clean EOF.
        # Promptly: a relay that missed the reset would end only at its idle timeout
        # (JOIN), with TIMEOUT ends that _check_reset_end() fails, if _how_it_ends()
        # had not timed out first. No time bound: it would add nothing but
        # scheduling noise (a few ms here).
        assert _how_it_ends(survivor) == "reset"
        stats = r.join()
        _check_reset_end(stats, failed)
    finally:
        setup.close()


@pytest.fixture(scope="module")
def no_ticket_contexts(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """As :func:`contexts`, but the server sends no TLS 1.3 session tickets."""
    return _tls_contexts(tmp_path_factory.mktemp("tls-no-tickets"), num_tickets=0)


@pytest.mark.parametrize("form", list(FORMS))
def test_a_tls_client_that_sends_and_closes_is_an_eof_without_session_tickets(
    listener: socket.socket, no_ticket_contexts: tuple[ssl.SSLContext, ssl.SSLContext], form: str
) -> None:
    # relay.md's advice for fire-and-forget TLS 1.3 clients: with session tickets
    # unread, such a client's close() is an RST (a reset, End.RESET, since the TLS
    # reset check); with none sent, it is a FIN: the request arrives whole, then a
    # clean EOF, and the reset check must not take it for a reset.
    setup = make_setup(listener, no_ticket_contexts, "client-tls")
    try:
        assert isinstance(setup.client, ssl.SSLSocket) and setup.client.version() == "TLSv1.3"
        r = Running(FORMS[form], setup, idle_timeout=JOIN)
        request = random.Random(form).randbytes(1000)
        setup.client.sendall(request)
        setup.client.close()  # no close_notify, nothing read: a bare FIN
        setup.backend.settimeout(JOIN)
        assert _recv_exactly(setup.backend, 1000) == request
        assert setup.backend.recv(1) == b""  # a clean EOF, not a reset
        setup.backend.close()
        stats = r.join()
        assert (stats.a_to_b, stats.a_end) == (1000, End.EOF)
    finally:
        setup.close()


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("sides", ["client-tls", "backend-tls"])
def test_a_tls_side_s_reset_is_not_taken_for_its_eof(
    listener: socket.socket,
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    form: str,
    sides: str,
) -> None:
    # The TLS peer sends part of a request and dies (RST) before the relay reads
    # it: the relay's first read gets the bytes, the next one meets the reset. A
    # plain side's relay resets the other peer at once (tests/test_relay.py); a
    # TLS side's must too, not half-close it as if the request were complete.
    setup = make_setup(listener, contexts, sides)
    failed = "a" if sides == "client-tls" else "b"
    resetter, survivor = (
        (setup.client, setup.backend) if failed == "a" else (setup.backend, setup.client)
    )
    dead = setup.a if failed == "a" else setup.b
    try:
        resetter.sendall(b"x" * 50_000)
        _reset(resetter)
        _wait_for_reset(dead)
        r = Running(FORMS[form], setup, idle_timeout=JOIN)
        survivor_end = _how_it_ends(survivor)
        # Promptly (a few ms here); a relay that took the reset for an EOF waits on.
        r.thread.join(2.0 if survivor_end == "reset" else 0.0)
        ended = not r.thread.is_alive()
        survivor.close()  # ends a relay still waiting for it
        stats = r.join()
        assert (survivor_end, ended) == ("reset", True), stats
        _check_reset_end(stats, failed)
    finally:
        setup.close()


def _wait_for_reset(sock: socket.socket) -> None:
    """Until *sock*'s kernel socket has taken its peer's RST (bounded)."""
    deadline = time.monotonic() + JOIN
    while sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != _TCP_CLOSE:
        assert time.monotonic() < deadline, "the reset never arrived"
        select.select([], [], [], 0.001)  # no fd reports it: a bounded re-check


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("tls", [True, False], ids=["tls-backend", "plain-backend"])
@pytest.mark.parametrize("before", ["request", "eof"])
def test_a_dead_backend_met_by_a_write_or_close_notify_is_a_reset(
    listener: socket.socket,
    request: pytest.FixtureRequest,
    form: str,
    tls: bool,
    before: str,
) -> None:
    # The backend dies (RST) before the relay starts, after the client sent a
    # request or only its EOF. The blocking form pumps a -> b first, so it meets
    # the reset in a write: the request's (CPython raises SSLEOFError for it, once
    # taken for End.ERROR) or the close_notify carrying the client's EOF (which
    # SSL_shutdown reports as ECONNRESET). The hub forms read the TLS side first
    # (_Driven.prime), where the reset reads as 0 (once taken for the backend's
    # clean EOF: the client was half-closed, not reset). A TLS backend must end as
    # a plain one does (the control).
    # The plain-backend control takes no certificate: it runs without openssl(1).
    contexts = request.getfixturevalue("contexts") if tls else None
    client, a = connected_pair(listener, None)
    setup = with_backend(listener, client, a, contexts)
    b, backend = setup.b, setup.backend
    try:
        if before == "request":
            client.sendall(b"x" * 1000)
        else:
            client.shutdown(socket.SHUT_WR)
        assert select.select([a], [], [], JOIN)[0]  # it is there for the relay's read
        # b takes what it was sent (a TLS 1.3 server's session tickets): with
        # nothing unread the close_notify is not deferred (see _Relay._close_notify).
        b.setblocking(False)
        with pytest.raises((ssl.SSLWantReadError, BlockingIOError)):
            b.recv(1)
        b.setblocking(True)
        _reset(backend)
        _wait_for_reset(b)
        stats = Running(FORMS[form], setup, idle_timeout=JOIN).join()
        assert (stats.failed, stats.b_end) == ("b", End.RESET), stats
        assert isinstance(stats.error, OSError)
        assert stats.error.errno in (errno.ECONNRESET, errno.EPIPE), stats.error
        # The client's EOF, if it went out (towards a dead socket) before the reset
        # was seen, keeps a's End.EOF: its stream was complete.
        assert stats.a_end in ((End.ABORTED,) if before == "request" else (End.ABORTED, End.EOF))
        assert stats.a_to_b == 0  # nothing reached the dead backend
        assert _how_it_ends(client) == "reset"  # never a clean EOF toward it
    finally:
        setup.close()


_TCP_CLOSE = 7  # include/net/tcp_states.h: tcpi_state after a reset


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("sides", list(SIDES))
def test_idle_timeout(
    listener: socket.socket,
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    form: str,
    sides: str,
) -> None:
    setup = make_setup(listener, contexts, sides)
    try:
        started = time.monotonic()
        stats = Running(FORMS[form], setup, idle_timeout=0.3).join()
        assert (stats.a_end, stats.b_end, stats.failed) == (End.TIMEOUT, End.TIMEOUT, None)
        assert 0.3 <= stats.duration < 0.3 + 2.0
        assert time.monotonic() - started >= 0.3
        # Neither stream was complete: both peers are reset, no clean EOF.
        assert _how_it_ends(setup.client) == "reset"
        assert _how_it_ends(setup.backend) == "reset"
    finally:
        setup.close()


def _slow_reader_pair(
    lst: socket.socket, contexts: tuple[ssl.SSLContext, ssl.SSLContext] | None
) -> tuple[socket.socket, socket.socket]:
    """(client, a) on loopback, as over a real link to a slow client: the client
    advertises a 1 KiB MSS and a 64 KiB receive buffer (loopback's 64 KiB segments
    would move its bytes in bursts), a has a fixed 2 MiB send buffer (SO_SNDBUF 1 MiB,
    doubled), as autotuning gives a fast link. TLS (client, server) if *contexts*."""
    c = socket.socket()
    try:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1024)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        c.connect(lst.getsockname())
    except BaseException:
        c.close()
        raise
    s, _ = lst.accept()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    if contexts is None:
        return c, s
    return handshake(c, s, contexts)


# A TLS client in every form; the plain control where the code paths differ
# (blocking: poll; asyncio: the epoll hub).
SLOW_READERS = [(form, True) for form in FORMS] + [("blocking", False), ("asyncio", False)]


@pytest.mark.parametrize(
    ("form", "tls"),
    SLOW_READERS,
    ids=[f"{form}-{'tls' if tls else 'plain'}-client" for form, tls in SLOW_READERS],
)
def test_idle_timeout_spares_a_slow_reader(
    listener: socket.socket, request: pytest.FixtureRequest, form: str, tls: bool
) -> None:
    # The client reads a download at ~320 KB/s, its bytes leaving the relay's send
    # queue toward it all the while. The relay once counted only its own reads and
    # writes as activity, and heard of that progress only when poll said a was
    # writable, which TCP says once a third of the send buffer is free (~0.7 MB
    # here: 2 s at this pace), so the relay ended as idle after 0.5 s (with 0.25
    # of 4 MiB delivered). A TLS side
    # hid more: SSLSocket.send() raises SSLWantWriteError until all of its up to
    # 64 KiB are out. The plain client is the same case without TLS.
    contexts = request.getfixturevalue("contexts") if tls else None
    client, a = _slow_reader_pair(listener, contexts)
    setup = with_backend(listener, client, a, None)
    backend = setup.backend
    data = random.Random(form).randbytes(4 << 20)  # more than the way holds
    try:
        r = Running(FORMS[form], setup, idle_timeout=0.5)

        def push() -> None:
            with contextlib.suppress(OSError):  # reported by the relay's stats
                backend.sendall(data)
                backend.shutdown(socket.SHUT_WR)

        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        client.settimeout(JOIN)
        h, got = hashlib.sha256(), 0
        # 1 s (two idle timeouts) at 16 KiB per 50 ms, then as fast as it comes. The
        # pause between reads is the slow client's pace, not a synchronisation.
        slow = 20 * (16 << 10)
        while True:
            try:
                chunk = client.recv(16 << 10 if got < slow else 1 << 16)
            except ssl.SSLZeroReturnError:
                chunk = b""
            except ConnectionResetError:
                break  # (reported below)
            if not chunk:
                break
            h.update(chunk)
            got += len(chunk)
            if got < slow:
                time.sleep(0.05)
        pusher.join(JOIN)
        if got < len(data):  # cut off (a TLS client reads a reset as its EOF)
            raise AssertionError(f"{got} of {len(data)} bytes came: {r.join()}")
        client.setblocking(False)
        assert half_close(client)  # the client's EOF: the relay ends
        stats = r.join()
    finally:
        setup.close()
    assert (got, h.hexdigest()) == (len(data), digest(data))
    assert (stats.a_end, stats.b_end, stats.failed) == (End.EOF, End.EOF, None), stats
    assert stats.b_to_a == len(data)


@pytest.mark.parametrize("form", list(FORMS))
def test_a_tls_side_whose_handshake_comes_late_costs_no_cpu(
    listener: socket.socket, contexts: tuple[ssl.SSLContext, ssl.SSLContext], form: str
) -> None:
    # a is wrapped with do_handshake_on_connect=False (as a non-blocking server
    # wraps what it accepts), and the backend speaks first (an SMTP banner): the
    # relay's write of the banner to a meets the unfinished handshake, and OpenSSL
    # says it must read first (SSLWantReadError). The blocking form and the
    # fallback driver waited for a to be writable, which it was all along: their
    # level-triggered poll returned at once, again and again, a 100 % CPU spin
    # until the client's handshake came. Now they wait for a to be readable.
    raw_client, raw_a = connected_pair(listener, None)
    a = contexts[0].wrap_socket(raw_a, server_side=True, do_handshake_on_connect=False)
    setup = with_backend(listener, raw_client, a, None)
    backend = setup.backend
    try:
        backend.sendall(b"220 banner\r\n")
        r = Running(FORMS[form], setup, idle_timeout=JOIN)
        assert r.thread.ident is not None
        clock = time.pthread_getcpuclockid(r.thread.ident)
        cpu, wall = time.clock_gettime(clock), time.monotonic()
        # The client's handshake comes 0.5 s late: the delay is what is tested.
        time.sleep(0.5)
        cpu, wall = time.clock_gettime(clock) - cpu, time.monotonic() - wall
        raw_client.settimeout(JOIN)
        client = setup.client = contexts[1].wrap_socket(raw_client, server_hostname="localhost")
        assert _recv_exactly(client, 12) == b"220 banner\r\n"
        client.sendall(b"QUIT\r\n")
        backend.settimeout(JOIN)
        assert _recv_exactly(backend, 6) == b"QUIT\r\n"
        backend.shutdown(socket.SHUT_WR)  # a close_notify toward the client
        assert client.recv(1) == b""
        client.unwrap()  # the client's close_notify: its EOF
        assert backend.recv(1) == b""
        stats = r.join()
    finally:
        setup.close()
    # The relay's thread slept in poll: a few ms of CPU (its start), not the wait.
    # (A spin got 40-100 % of a CPU here, or less on a busy machine: the bound is
    # well below that and far above a sleeping thread's.)
    assert cpu < 0.1 * wall, f"{cpu:.3f} s of CPU in {wall:.3f} s"
    assert (stats.a_to_b, stats.b_to_a) == (6, 12)
    assert (stats.a_end, stats.b_end, stats.failed) == (End.EOF, End.EOF, None), stats


class Pusher:
    """Sends a known stream from a non-blocking socket, as fast as it is taken."""

    def __init__(self, sock: socket.socket, seed: str) -> None:
        self.sock = sock
        self.block = memoryview(random.Random(seed).randbytes(1 << 20))
        self.sent = 0
        self.h = hashlib.sha256()
        sock.setblocking(False)

    def _send_some(self) -> bool:
        # A TLS write that would block must be retried with the same bytes: the
        # chunk depends only on `sent`, which changes only when a write succeeded.
        off = self.sent % len(self.block)
        chunk = self.block[off : off + (1 << 16)]
        try:
            n = self.sock.send(chunk)
        except _WANT:
            return False
        self.h.update(chunk[:n])
        self.sent += n
        return True

    def push_until_stalled(
        self, limit: int, quiet: float, stalled: Callable[[], bool] = lambda: True
    ) -> int:
        """Until *limit* bytes went, or nothing was taken for *quiet* s and
        ``stalled()`` (bounded).

        *stalled* tells a relay that stopped from one that is merely late (its
        thread descheduled on a busy host), which leaves the client quiet too.
        """
        deadline = time.monotonic() + JOIN
        while self.sent < limit:
            assert time.monotonic() < deadline, "the relay never stalled"
            if (
                not self._send_some()
                and not select.select([], [self.sock], [], quiet)[1]
                and stalled()
            ):
                break
        return self.sent

    def complete(self) -> None:
        """Finish a TLS write OpenSSL may hold half-sent (call once the peer reads).

        An SSL_write that said WANT_WRITE keeps its record, and a close_notify sent
        before it completes is a "bad write retry". One more successful write (of
        the same bytes, or a new chunk if none was pending) leaves none pending.
        """
        if not isinstance(self.sock, ssl.SSLSocket):
            return
        deadline = time.monotonic() + JOIN
        while not self._send_some():
            assert time.monotonic() < deadline, "the TLS write never completed"
            select.select([], [self.sock], [], 1.0)


def _read_all(sock: socket.socket, out: list[tuple[int, str]]) -> None:
    sock.settimeout(JOIN)
    h, n = hashlib.sha256(), 0
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except ssl.SSLZeroReturnError:
            chunk = b""
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
    out.append((n, h.hexdigest()))


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("sides", list(SIDES))
def test_a_backend_that_does_not_read_makes_the_relay_wait(
    listener: socket.socket,
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    form: str,
    sides: str,
) -> None:
    # The backend reads nothing: the client can push only what the buffers on the
    # way hold (tests/test_relay_memory.py measures how much), and the relay waits,
    # neither ending nor dropping. Then the backend reads: every byte, in order.
    setup = make_setup(listener, contexts, sides)
    try:
        r = Running(FORMS[form], setup, idle_timeout=JOIN)
        pusher = Pusher(setup.client, f"{form}{sides}")
        # Stalled: bytes wait unread at the backend (the relay filled its way there)
        # and at a (the relay stopped reading the client).
        sent = pusher.push_until_stalled(
            64 << 20, quiet=0.3, stalled=lambda: bool(_unread(setup.backend) and _unread(setup.a))
        )
        assert 1 << 20 < sent < 64 << 20  # past the relay's buffer, short of the stream
        assert r.thread.is_alive() and r.stats is None, "the stalled relay ended"
        got: list[tuple[int, str]] = []
        reader = threading.Thread(target=_read_all, args=(setup.backend, got), daemon=True)
        reader.start()
        pusher.complete()  # a TLS record OpenSSL held half-sent goes out now
        deadline = time.monotonic() + JOIN
        while not half_close(setup.client):  # the client's EOF, once its buffer drains
            assert time.monotonic() < deadline
            select.select([], [setup.client], [], 1.0)
        reader.join(JOIN)
        assert got == [(pusher.sent, pusher.h.hexdigest())]
        # The client sends nothing more: the backend's EOF may go back to it now.
        setup.backend.setblocking(False)
        assert half_close(setup.backend)
        setup.client.setblocking(True)
        setup.client.settimeout(JOIN)
        back: list[tuple[int, str]] = []
        _read_all(setup.client, back)  # the EOF (a close_notify toward a TLS client)
        assert back == [(0, digest(b""))]
        stats = r.join()
        assert (stats.a_to_b, stats.b_to_a) == (pusher.sent, 0)
        assert (stats.a_end, stats.b_end, stats.failed) == (End.EOF, End.EOF, None)
    finally:
        setup.close()


# --------------------------------------------------------------------------- ownership


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("sides", list(SIDES))
def test_close_false_leaves_both_sockets_open_and_usable(
    listener: socket.socket,
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    form: str,
    sides: str,
) -> None:
    # With close=False the relay gives the sockets back as it found them (blocking,
    # TCP_NODELAY off). Its half-close toward a TLS side is a close_notify: the TCP
    # connection under it stays up, so once the TLS layer is unwrapped the caller
    # can go on talking on it, in plain text, both ways.
    setup = make_setup(listener, contexts, sides)
    try:
        for s in (setup.a, setup.b):
            assert s.getblocking() and not s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        r = Running(FORMS[form], setup, close=False)
        at_client, at_backend = exchange(setup, b"request", b"response")
        stats = r.join()
        assert (at_backend.received, at_client.received) == (7, 8)
        assert (stats.a_end, stats.b_end, stats.failed) == (End.EOF, End.EOF, None)
        for side, peer in ((setup.a, setup.client), (setup.b, setup.backend)):
            assert side.fileno() != -1
            assert side.gettimeout() is None  # blocking, as it was
            assert not side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            if isinstance(side, ssl.SSLSocket):
                # (A plain side's TCP connection was half-closed both ways, so it
                # is closed; the TLS side's half-closes were close_notify records.)
                assert side.getpeername() == peer.getsockname()
                plain = side.unwrap()  # both close_notify exchanged: no I/O
                peer.settimeout(JOIN)
                plain.settimeout(JOIN)
                plain.sendall(b"plain after TLS")
                assert _recv_exactly(peer, 15) == b"plain after TLS"
                peer.sendall(b"and back")
                assert _recv_exactly(plain, 8) == b"and back"
    finally:
        setup.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    for _ in range(n):  # each read takes at least one byte
        if len(data) == n:
            break
        chunk = sock.recv(n - len(data))
        assert chunk, "EOF"
        data += chunk
    return data


# --------------------------------------------------------------------------- resources


def _is_pipe_or_epoll(fd: int) -> bool:
    try:  # (the fd listdir used to read /proc/self/fd is gone already)
        target = os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return False
    return target.startswith("pipe:") or target == "anon_inode:[eventpoll]"


@pytest.mark.parametrize("form", list(FORMS))
def test_hundred_tls_relays_back_to_back_leave_nothing_behind(
    listener: socket.socket, contexts: tuple[ssl.SSLContext, ssl.SSLContext], form: str
) -> None:
    # Each relay carries a 128 KiB request (a plain relay would take a pipe for it)
    # and a reply, TLS on both sides every other time. Afterwards: no fd, pipe,
    # epoll or thread left, and no pipe ever pooled (TLS never splices).
    if form != "blocking":  # the loop implementation's own first-run fds
        (uvloop.run if form == "uvloop" else asyncio.run)(asyncio.sleep(0))
    release_pipes()
    threads_before = threading.active_count()
    fds_before = open_fds()
    request = random.Random(form).randbytes(128 << 10)
    for i in range(100):
        setup = make_setup(listener, contexts, "both-tls" if i % 2 else "client-tls")
        try:
            r = Running(FORMS[form], setup)
            reply = b"reply %d" % i
            at_client, at_backend = exchange(setup, request, reply)
            stats = r.join()
        finally:
            setup.close()
        assert (at_backend.received, at_backend.digest) == (len(request), digest(request))
        assert (at_client.received, at_client.digest) == (len(reply), digest(reply))
        assert (stats.a_to_b, stats.b_to_a, stats.spliced_bytes) == (len(request), len(reply), 0)
        assert (stats.a_end, stats.b_end, stats.failed) == (End.EOF, End.EOF, None)
    left = open_fds() - fds_before
    assert not [fd for fd in left if _is_pipe_or_epoll(fd)], "a pipe or a hub's epoll left"
    assert open_fds() == fds_before
    assert threading.active_count() == threads_before
    assert release_pipes() == 0  # this thread never pooled a pipe


@pytest.mark.parametrize("form", ["asyncio", "uvloop", "start"])
def test_a_tls_read_that_must_write_first_goes_on_once_the_side_is_writable(
    listener: socket.socket, tmp_path: Path, form: str
) -> None:
    # TLS 1.3 post-handshake client auth through a relay whose side b is its TLS
    # client: the backend's CertificateRequest comes before its "ping", and the
    # relay's read of it must first write a ~30 KB certificate chain that b's small
    # send buffer cannot take while the backend does not read (SSLWantWriteError).
    # The hub forms waited only for b to be readable: nothing came, and the relay
    # stalled until its idle timeout. It goes on once b is writable.
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = _make_cert(tmp_path)
    chain = tmp_path / "chain.pem"
    chain.write_text(Path(cert).read_text() * 50)  # extra chain certificates: bulk
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    server.verify_mode = ssl.CERT_REQUIRED
    server.post_handshake_auth = True
    server.load_verify_locations(cert)
    client_ctx = ssl.create_default_context(cafile=cert)
    client_ctx.post_handshake_auth = True
    client_ctx.load_cert_chain(str(chain), key)
    client, a = connected_pair(listener, None)
    raw_b = socket.socket()
    raw_b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    raw_b.connect(listener.getsockname())
    raw_backend, _ = listener.accept()
    raw_backend.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    made: list[ssl.SSLSocket] = []
    accept = threading.Thread(
        target=lambda: made.append(server.wrap_socket(raw_backend, server_side=True))
    )
    accept.start()
    b = client_ctx.wrap_socket(raw_b, server_hostname="localhost")
    accept.join(JOIN)
    backend = made[0]
    idle = 20.0
    done: list[RelayStats] = []

    def run() -> None:
        async def main() -> RelayStats:
            if form == "start":
                return await relay_mod.start_pipe_splice(a, b, idle_timeout=idle)
            return await relay_mod.async_pipe_splice(a, b, idle_timeout=idle)

        done.append(uvloop.run(main()) if form == "uvloop" else asyncio.run(main()))

    relay = threading.Thread(target=run, daemon=True)
    relay.start()
    try:
        backend.verify_client_post_handshake()
        backend.sendall(b"ping")  # the CertificateRequest goes out before it
        # The relay's certificate fills b's buffers while the backend reads nothing
        # (a precondition: without it the test would go on and prove nothing).
        _wait_unread(backend, 2048)
        client.settimeout(JOIN)

        def answer() -> None:
            if client.recv(4) == b"ping":
                client.sendall(b"pong")

        answering = threading.Thread(target=answer, daemon=True)
        answering.start()
        started = time.monotonic()
        backend.settimeout(idle)
        assert backend.recv(4) == b"pong"
        answering.join(JOIN)
        assert time.monotonic() - started < idle / 4
        assert backend.getpeercert()
    finally:
        for s in (client, backend):
            s.close()
        relay.join(JOIN)
        for s in (a, b):
            s.close()
    assert done
