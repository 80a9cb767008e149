"""pipe_splice / async_pipe_splice on real loopback TCP: integrity, half-close, faults."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import random
import resource
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
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
)
from tests.conftest import open_fds

pytestmark = pytest.mark.linux
JOIN = 120.0


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0), backlog=4096) as lst:
        yield lst


def tcp_pair(lst: socket.socket) -> tuple[socket.socket, socket.socket]:
    c = socket.create_connection(lst.getsockname())
    s, _ = lst.accept()
    return c, s


Runner = Callable[..., RelayStats]


def run_blocking(a: socket.socket, b: socket.socket, **kw: object) -> RelayStats:
    return pipe_splice(a, b, **kw)  # type: ignore[arg-type]


def run_copy(a: socket.socket, b: socket.socket, **kw: Any) -> RelayStats:
    r = relay_mod._Relay(
        a,
        b,
        pipe_size=kw.get("pipe_size"),
        idle_timeout=kw.get("idle_timeout"),
        close=kw.get("close", True),
        force_copy=True,
    )
    return relay_mod._run_blocking(r)


def run_asyncio(a: socket.socket, b: socket.socket, **kw: object) -> RelayStats:
    return asyncio.run(async_pipe_splice(a, b, **kw))  # type: ignore[arg-type]


def run_asyncio_copy(a: socket.socket, b: socket.socket, **kw: Any) -> RelayStats:
    async def main() -> RelayStats:
        r = relay_mod._Relay(
            a,
            b,
            pipe_size=kw.get("pipe_size"),
            idle_timeout=kw.get("idle_timeout"),
            close=kw.get("close", True),
            force_copy=True,
        )
        return await relay_mod._run_async(r)

    return asyncio.run(main())


def run_uvloop(a: socket.socket, b: socket.socket, **kw: object) -> RelayStats:
    return uvloop.run(async_pipe_splice(a, b, **kw))  # type: ignore[arg-type]


RUNNERS = {
    "splice": run_blocking,
    "copy": run_copy,
    "asyncio": run_asyncio,
    "asyncio-copy": run_asyncio_copy,
    "uvloop": run_uvloop,
}


class Relay:
    """A relay under test in a thread: client <-> [a relay b] <-> backend."""

    def __init__(self, lst: socket.socket, runner: Runner, **kw: object) -> None:
        self.client, self.a = tcp_pair(lst)
        self.b, self.backend = tcp_pair(lst)
        self.stats: RelayStats | None = None
        self.exc: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(runner, kw))
        self.thread.start()

    def _run(self, runner: Runner, kw: dict[str, object]) -> None:
        try:
            self.stats = runner(self.a, self.b, **kw)
        except BaseException as exc:
            self.exc = exc

    def join(self) -> RelayStats:
        self.thread.join(JOIN)
        assert not self.thread.is_alive(), "relay did not end"
        assert self.exc is None, self.exc
        assert self.stats is not None
        return self.stats

    def close(self) -> None:
        self.client.close()
        self.backend.close()


def _send_all_then_eof(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def _recv_digest(sock: socket.socket, out: list[tuple[int, str]]) -> None:
    h, n = hashlib.sha256(), 0
    sock.settimeout(JOIN)
    while chunk := sock.recv(1 << 20):
        h.update(chunk)
        n += len(chunk)
    out.append((n, h.hexdigest()))


def exchange(r: Relay, up: bytes, down: bytes) -> tuple[tuple[int, str], tuple[int, str]]:
    got_up: list[tuple[int, str]] = []
    got_down: list[tuple[int, str]] = []
    threads = [
        threading.Thread(target=_send_all_then_eof, args=(r.client, up)),
        threading.Thread(target=_send_all_then_eof, args=(r.backend, down)),
        threading.Thread(target=_recv_digest, args=(r.backend, got_up)),
        threading.Thread(target=_recv_digest, args=(r.client, got_down)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
    assert not any(t.is_alive() for t in threads)
    return got_up[0], got_down[0]


# --------------------------------------------------------------------------- integrity


@pytest.mark.parametrize("mode", list(RUNNERS))
@pytest.mark.parametrize("size", [0, 1, "random", 64 << 20])
def test_integrity_both_ways_at_once(listener: socket.socket, mode: str, size: object) -> None:
    rng = random.Random(f"{mode}{size}")
    n_up = rng.randrange(1, 3 << 20) if size == "random" else int(size)  # type: ignore[call-overload]
    n_down = rng.randrange(1, 3 << 20) if size == "random" else max(0, int(size) - 12345)  # type: ignore[call-overload]
    up, down = rng.randbytes(n_up), rng.randbytes(n_down)
    r = Relay(listener, RUNNERS[mode])
    try:
        got_up, got_down = exchange(r, up, down)
        stats = r.join()
    finally:
        r.close()
    assert got_up == (len(up), hashlib.sha256(up).hexdigest())
    assert got_down == (len(down), hashlib.sha256(down).hexdigest())
    assert (stats.a_to_b, stats.b_to_a) == (len(up), len(down))
    assert (stats.a_end, stats.b_end, stats.failed) == (End.EOF, End.EOF, None)
    assert stats.spliced is ("copy" not in mode)


# --------------------------------------------------------------------------- half-close


@pytest.mark.parametrize("mode", list(RUNNERS))
@pytest.mark.parametrize("first", ["client", "backend"])
def test_half_close_keeps_the_other_direction(
    listener: socket.socket, mode: str, first: str
) -> None:
    r = Relay(listener, RUNNERS[mode])
    try:
        closer, other = (r.client, r.backend) if first == "client" else (r.backend, r.client)
        closer.sendall(b"request")
        closer.shutdown(socket.SHUT_WR)
        other.settimeout(JOIN)
        got = b""
        while chunk := other.recv(100):  # all bytes, then EOF from the half-close
            got += chunk
        assert got == b"request"
        for i in range(50):  # the reverse direction still flows after the EOF
            other.sendall(b"reply %d;" % i)
        other.shutdown(socket.SHUT_WR)
        closer.settimeout(JOIN)
        back = b""
        while chunk := closer.recv(4096):
            back += chunk
        assert back == b"".join(b"reply %d;" % i for i in range(50))
        stats = r.join()
        assert (stats.a_end, stats.b_end) == (End.EOF, End.EOF)
    finally:
        r.close()


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("mode", list(RUNNERS))
def test_reset_mid_stream_ends_promptly(listener: socket.socket, mode: str) -> None:
    r = Relay(listener, RUNNERS[mode])
    try:
        r.client.sendall(b"x" * 100_000)
        r.backend.settimeout(JOIN)
        r.backend.recv(1000)  # data is flowing
        r.backend.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        r.backend.close()  # RST to the relay, with unread data
        stats = r.join()
        assert stats.failed == "b"
        assert stats.b_end is End.RESET
        assert stats.a_end is End.ABORTED
        assert isinstance(stats.error, OSError)
        r.client.settimeout(JOIN)
        with pytest.raises(ConnectionResetError):  # the survivor is reset, not left hanging
            _drain(r.client)
    finally:
        r.client.close()


def _drain(sock: socket.socket) -> None:
    """Read until EOF (bounded); a reset raises ConnectionResetError."""
    for _ in range(1000):
        if not sock.recv(65536):
            return


@pytest.mark.parametrize("mode", ["splice", "copy", "asyncio", "uvloop"])
def test_backend_that_never_reads_bounds_memory(listener: socket.socket, mode: str) -> None:
    r = Relay(listener, RUNNERS[mode], pipe_size=65536, idle_timeout=1.5)
    try:
        r.client.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until everything on the way is full
            try:
                sent += r.client.send(b"\0" * 65536)
            except BlockingIOError:
                ready = select.select([], [r.client], [], 0.3)[1]
                if not ready:
                    break
        # Socket buffers on both hops plus one 64 KiB pipe: never the whole stream.
        assert 0 < sent < 64 << 20
        stats = r.join()  # the idle timeout ends the stalled relay
        assert stats.a_end is End.TIMEOUT
        assert stats.a_to_b < sent
    finally:
        r.close()


@pytest.mark.parametrize("mode", ["splice", "copy"])
def test_reset_while_backpressured_ends_without_waiting_for_timeout(
    listener: socket.socket, mode: str
) -> None:
    # The client's direction is stalled (backend never reads, pipe full), so the relay
    # is not reading the client when its reset arrives: poll's POLLERR must end it.
    r = Relay(listener, RUNNERS[mode], pipe_size=65536, idle_timeout=60)
    try:
        r.client.setblocking(False)
        for _ in range(100_000):  # until everything on the way is full
            try:
                r.client.send(b"\0" * 65536)
            except BlockingIOError:
                if not select.select([], [r.client], [], 0.3)[1]:
                    break
        r.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        r.client.close()
        stats = r.join()
        assert (stats.a_end, stats.failed) == (End.RESET, "a")
        assert stats.b_end is End.ABORTED
        assert stats.duration < 60
    finally:
        r.close()


@pytest.mark.parametrize("mode", list(RUNNERS))
def test_idle_timeout(listener: socket.socket, mode: str) -> None:
    r = Relay(listener, RUNNERS[mode], idle_timeout=0.3)
    try:
        stats = r.join()
        assert (stats.a_end, stats.b_end) == (End.TIMEOUT, End.TIMEOUT)
        assert stats.duration >= 0.3
        r.client.settimeout(JOIN)
        with pytest.raises(ConnectionResetError):
            r.client.recv(1)
    finally:
        r.close()


def test_einval_at_run_time_falls_back_to_copy(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.splice
    calls = 0

    def flaky(*args: int, **kw: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.EINVAL, "injected EINVAL")
        return real(*args, **kw)

    monkeypatch.setattr(os, "splice", flaky)
    data = os.urandom(3 << 20)
    r = Relay(listener, run_blocking)
    try:
        got_up, got_down = exchange(r, data, data[::-1])
        stats = r.join()
    finally:
        r.close()
    assert got_up == (len(data), hashlib.sha256(data).hexdigest())
    assert got_down == (len(data), hashlib.sha256(data[::-1]).hexdigest())
    assert stats.spliced is False


def _make_cert(tmp: Path) -> tuple[str, str]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(cert), str(key)


def test_tls_socket_uses_the_copy_path(listener: socket.socket, tmp_path: Path) -> None:
    cert, key = _make_cert(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=cert)
    raw_client, raw_a = tcp_pair(listener)
    b, backend = tcp_pair(listener)
    result: list[object] = []

    def terminate_tls() -> None:
        tls_a = server_ctx.wrap_socket(raw_a, server_side=True)
        result.append(pipe_splice(tls_a, b))

    t = threading.Thread(target=terminate_tls)
    t.start()
    client = client_ctx.wrap_socket(raw_client, server_hostname="localhost")
    up, down = os.urandom(1 << 20), os.urandom(300_000)

    def backend_side() -> None:
        got = b""
        backend.settimeout(JOIN)
        while len(got) < len(up):
            got += backend.recv(65536)
        assert got == up
        backend.sendall(down)
        backend.shutdown(socket.SHUT_WR)  # forwarded to the TLS side as close_notify

    bk = threading.Thread(target=backend_side)
    bk.start()
    try:
        client.sendall(up)
        back = b""
        client.settimeout(JOIN)
        while chunk := client.recv(65536):  # clean EOF: no "unexpected EOF" alert
            back += chunk
        assert back == down
        client.close()
        bk.join(JOIN)
        t.join(JOIN)
        stats = result[0]
        assert isinstance(stats, RelayStats)
        assert stats.spliced is False
        assert (stats.a_to_b, stats.b_to_a) == (len(up), len(down))
        assert (stats.a_end, stats.b_end, stats.failed) == (End.EOF, End.EOF, None)
    finally:
        client.close()
        backend.close()


# --------------------------------------------------------------------------- resources


def _is_pipe(fd: int) -> bool:
    try:  # the fd listdir used to read /proc/self/fd is already gone
        return os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
    except FileNotFoundError:
        return False


def test_pipes_are_cloexec_sized_and_closed(listener: socket.socket) -> None:
    before = open_fds()
    r = Relay(listener, run_blocking, pipe_size=256 * 1024)
    try:
        r.client.sendall(b"ping")
        r.backend.settimeout(JOIN)
        assert r.backend.recv(10) == b"ping"  # the relay is running: its pipes exist
        pipes = [fd for fd in open_fds() - before if _is_pipe(fd)]
        assert len(pipes) == 4  # two per direction
        for fd in pipes:
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert fcntl.fcntl(fd, 1032) == 256 * 1024  # F_GETPIPE_SZ
        r.client.shutdown(socket.SHUT_WR)
        r.backend.shutdown(socket.SHUT_WR)
        r.join()
    finally:
        r.close()
    assert open_fds() == before


def test_close_false_leaves_sockets_to_the_caller(listener: socket.socket) -> None:
    r = Relay(listener, run_blocking, close=False)
    try:
        exchange(r, b"abc", b"defg")
        stats = r.join()
        assert (stats.a_to_b, stats.b_to_a) == (3, 4)
        for s in (r.a, r.b):
            assert s.fileno() != -1
            assert s.getblocking()
    finally:
        r.close()
        r.a.close()
        r.b.close()


def test_bad_input(listener: socket.socket) -> None:
    a, b = tcp_pair(listener)
    try:
        with pytest.raises(InvalidArgument, match="same socket"):
            pipe_splice(a, a)
        with pytest.raises(InvalidArgument, match="invalid pipe_size 100"):
            pipe_splice(a, b, pipe_size=100)
        with pytest.raises(InvalidArgument, match="invalid idle_timeout 0"):
            pipe_splice(a, b, idle_timeout=0)
        with (
            socket.socket(type=socket.SOCK_DGRAM) as udp,
            pytest.raises(WrongSocketType, match="expected a SOCK_STREAM socket"),
        ):
            pipe_splice(a, udp)
        with pytest.raises(WrongSocketType, match="got str"):
            pipe_splice(a, "b")  # type: ignore[arg-type]
        closed = socket.socket()
        closed.close()
        with pytest.raises(SocketClosed, match="relay side b is closed"):
            pipe_splice(a, closed)
        assert a.fileno() != -1, "a failed call never closes the caller's sockets"
    finally:
        a.close()
        b.close()


def test_thousand_relays_back_to_back_leak_nothing(listener: socket.socket) -> None:
    threads_before = threading.active_count()
    fds_before = open_fds()
    for i in range(1000):
        client, a = tcp_pair(listener)
        b, backend = tcp_pair(listener)
        client.sendall(b"%d" % i)
        client.shutdown(socket.SHUT_WR)
        backend.sendall(b"ok")
        backend.shutdown(socket.SHUT_WR)
        stats = pipe_splice(a, b)  # in this thread: both sides already sent EOF
        assert (stats.a_to_b, stats.b_to_a) == (len(b"%d" % i), 2)
        assert backend.recv(16) == b"%d" % i
        assert client.recv(16) == b"ok"
        client.close()
        backend.close()
    assert open_fds() == fds_before
    assert threading.active_count() == threads_before


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_thousand_concurrent_relays_on_one_loop(listener: socket.socket, loop_kind: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20000)), hard))
    n = 1000
    pairs = [(tcp_pair(listener), tcp_pair(listener)) for _ in range(n)]
    fds_before = open_fds()

    async def one(i: int) -> tuple[RelayStats, bytes, bytes]:
        (client, a), (b, backend) = pairs[i]
        loop = asyncio.get_running_loop()
        for s in (client, backend):
            s.setblocking(False)
        relay = asyncio.ensure_future(async_pipe_splice(a, b, pipe_size=65536))
        await loop.sock_sendall(client, b"hello %d" % i)
        client.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := await loop.sock_recv(backend, 100):
            got += chunk
        await loop.sock_sendall(backend, got.upper())
        backend.shutdown(socket.SHUT_WR)
        back = b""
        while chunk := await loop.sock_recv(client, 100):
            back += chunk
        return await relay, got, back

    async def main() -> list[tuple[RelayStats, bytes, bytes]]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), JOIN)

    runner = uvloop.run if loop_kind == "uvloop" else asyncio.run
    threads = threading.active_count()
    try:
        results = runner(main())
    finally:
        for (client, _a), (_b, backend) in pairs:
            client.close()
            backend.close()
    assert threading.active_count() == threads  # no thread per relay
    for i, (stats, got, back) in enumerate(results):
        assert got == b"hello %d" % i
        assert back == got.upper()
        assert stats.a_to_b == stats.b_to_a == len(got)
    assert open_fds() <= fds_before


# --------------------------------------------------------------------------- latency


@pytest.mark.parametrize("mode", ["splice", "copy", "asyncio", "uvloop"])
def test_ping_pong_has_no_nagle_or_cork_stalls(listener: socket.socket, mode: str) -> None:
    r = Relay(listener, RUNNERS[mode])
    stalls = 0
    try:
        for s in (r.client, r.backend):
            s.settimeout(JOIN)
        for _ in range(1000):
            t0 = time.monotonic()
            r.client.sendall(b"?")
            assert r.backend.recv(1) == b"?"
            r.backend.sendall(b"!")
            assert r.client.recv(1) == b"!"
            if time.monotonic() - t0 > 0.035:  # a Nagle/cork stall is 40-200 ms
                stalls += 1
        r.client.shutdown(socket.SHUT_WR)
        r.backend.shutdown(socket.SHUT_WR)
        r.join()
    finally:
        r.close()
    print(f"\n{mode}: 1000 round trips, {stalls} over 35 ms")
    assert stalls <= 10  # scheduling noise on a busy box, not a 40 ms stall per trip
