"""A backend that never reads: the relay waits, and its memory stays bounded.

docs/relay.md: "a side that stops reading stops the relay reading from the other;
memory stays at most one pipe (or buffer) per direction". Measured here, in each
form (splice, the copy path forced, the asyncio hub on asyncio and uvloop, a TLS
client side), while the client tries to push 64 MiB through a relay whose backend
reads nothing:

- the bytes the client got in are bounded by what the kernel's buffers on the way
  hold (each socket's SO_SNDBUF/SO_RCVBUF, read once the stream stalled) plus the
  relay's own pipe or buffer, and what the relay holds itself (sent, minus what
  waits in the kernel's queues on either side of it) by that pipe or buffer;
- the Python memory allocated meanwhile (tracemalloc's peak) and the process's
  resident memory (VmRSS) do not grow with the stream.
"""

from __future__ import annotations

import fcntl
import gc
import select
import socket
import ssl
import termios
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

from reuselb import RelayStats
from tests.test_relay import (
    JOIN,
    run_asyncio,
    run_asyncio_copy,
    run_blocking,
    run_copy,
    run_uvloop,
)
from tests.test_relay_tls import connected_pair, contexts  # noqa: F401 (a fixture, by name)

pytestmark = pytest.mark.linux

Runner = Callable[..., RelayStats]

# form: (runner, TLS on the client side)
FORMS: dict[str, tuple[Runner, bool]] = {
    "splice": (run_blocking, False),
    "copy": (run_copy, False),
    "asyncio": (run_asyncio, False),
    "asyncio-copy": (run_asyncio_copy, False),
    "uvloop": (run_uvloop, False),
    "tls": (run_blocking, True),
    "tls-asyncio": (run_asyncio, True),
    "tls-uvloop": (run_uvloop, True),
}

STREAM = 64 << 20  # what the client tries to push
QUIET = 0.5  # s without progress: the stream is stalled
# The documented figures (docs/relay.md), not the implementation's constants: a
# pipe of 1 MiB by default, capped by fs.pipe-max-size; a 64 KiB copy buffer; a
# TLS source also has up to one record (16 KiB of plaintext) inside OpenSSL.
PIPE_DEFAULT = 1 << 20
COPY_BUFFER = 64 << 10
TLS_RECORD = (16 << 10) + 256
# Explicit slack: a send() the kernel takes whole while its queue is just under
# SO_SNDBUF may pass it by up to one 64 KiB segment, on each of the two senders;
# and one skb's worth of rounding on each of the four queues.
SLACK = 2 * (64 << 10) + 4 * (4 << 10)
TRACED_PEAK_MAX = 1 << 20  # Python allocations while stalled, peak
RSS_GROWTH_MAX = 8 << 20


def _pipe_capacity() -> int:
    with open("/proc/sys/fs/pipe-max-size", encoding="ascii") as f:
        return min(PIPE_DEFAULT, int(f.read()))


def _ioctl_int(sock: socket.socket, request: int) -> int:
    return int.from_bytes(fcntl.ioctl(sock.fileno(), request, bytes(4)), "little")


def _inq(sock: socket.socket) -> int:
    """Bytes in *sock*'s receive queue, not read yet (SIOCINQ)."""
    return _ioctl_int(sock, termios.FIONREAD)


def _outq(sock: socket.socket) -> int:
    """Bytes in *sock*'s send queue, not acknowledged yet (SIOCOUTQ)."""
    return _ioctl_int(sock, termios.TIOCOUTQ)


def _buf(sock: socket.socket, opt: int) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, opt)


def _vm_rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0), backlog=64) as lst:
        yield lst


def _push(sock: socket.socket, a: socket.socket, backend: socket.socket) -> int:
    """Push up to STREAM bytes from non-blocking *sock* until the relay is stalled;
    returns the bytes sent. Sends one preallocated buffer over and over: the pushing
    allocates nothing that grows with the stream.

    Stalled: QUIET s pass without progress while bytes wait unread both at the
    backend (the relay filled its way there) and at *a* (the relay stopped reading
    the client). A quiet period alone also comes from a relay thread that is merely
    descheduled on a busy host, whose bytes would then move while they are counted.
    """
    chunk = memoryview(bytes(64 << 10))
    sent = 0
    deadline = time.monotonic() + JOIN
    while sent < STREAM:
        assert time.monotonic() < deadline
        try:
            sent += sock.send(chunk)  # a TLS retry is the same bytes: all zeros
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            if not select.select([], [sock], [], QUIET)[1] and _inq(a) and _inq(backend):
                break
    return sent


@pytest.mark.parametrize("form", list(FORMS))
def test_a_backend_that_never_reads_bounds_what_the_relay_holds(
    listener: socket.socket, request: pytest.FixtureRequest, form: str
) -> None:
    runner, tls = FORMS[form]
    # Only the TLS forms ask for the certificate: the fixture skips where openssl(1)
    # is missing, and taking it as a parameter skipped the plain forms there too.
    tls_contexts = request.getfixturevalue("contexts") if tls else None
    client, a = connected_pair(listener, tls_contexts)
    b, backend = connected_pair(listener, None)
    out: list[RelayStats] = []
    failed: list[BaseException] = []

    def relay() -> None:
        try:
            out.append(runner(a, b, idle_timeout=JOIN))
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    try:
        # Warm up: the relay runs (its loop, buffers and pipes exist) before the
        # measurement, and the backend reads this one byte, then nothing.
        client.sendall(b"w")
        backend.settimeout(JOIN)
        assert backend.recv(1) == b"w"
        client.setblocking(False)

        gc.collect()
        tracemalloc.start()
        try:
            traced_before = tracemalloc.get_traced_memory()[0]
            rss_before = _vm_rss()
            sent = _push(client, a, backend)
            rss_after = _vm_rss()
            traced_peak = tracemalloc.get_traced_memory()[1] - traced_before
        finally:
            tracemalloc.stop()
        assert thread.is_alive() and not out, "the stalled relay ended"

        # Where the bytes the client sent are now, read while nothing moves.
        queued_before = _outq(client) + _inq(a)
        queued_after = _outq(b) + _inq(backend)
        buffers = (
            _buf(client, socket.SO_SNDBUF)
            + _buf(a, socket.SO_RCVBUF)
            + _buf(b, socket.SO_SNDBUF)
            + _buf(backend, socket.SO_RCVBUF)
        )
        capacity = COPY_BUFFER + TLS_RECORD if tls else COPY_BUFFER
        if not tls and "copy" not in form:
            capacity = _pipe_capacity() + COPY_BUFFER
    finally:
        # A reset ends the stalled relay at once (idle_timeout is the safety net).
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        client.close()
        thread.join(JOIN)
        backend.close()
        for s in (a, b):
            s.close()
    assert not thread.is_alive() and not failed, failed
    stats = out[0]

    # Every check, then one failure that lists all those that failed.
    problems = []
    report = (
        f"sent {sent}, kernel buffers {buffers}, relay capacity {capacity}, a_to_b "
        f"{stats.a_to_b}, queued before the relay {queued_before}, after it {queued_after}, "
        f"tracemalloc peak {traced_peak}, VmRSS growth {rss_after - rss_before}"
    )
    # (a) What the client got in: bounded by the kernel's buffers on the way plus
    # the relay's own; the stream stalled (the relay waits) well short of 64 MiB.
    if not 0 < sent < STREAM:
        problems.append("the stream never stalled")
    if sent > buffers + capacity + SLACK:
        problems.append("more went in than the buffers on the way and the relay's hold")
    # What the relay holds itself (read from a, not written to b): at most its pipe
    # or buffer. (TLS: the queues before the relay hold ciphertext, a little more
    # than the plaintext it carries, so this underestimates, never over.)
    if sent - queued_before - stats.a_to_b > capacity + SLACK:
        problems.append("the relay holds more than its pipe or buffer")
    if stats.a_to_b > queued_after + SLACK:
        problems.append("bytes the relay wrote are not queued toward the backend")
    # (b) The relay's memory does not grow with the stream: Python allocations (in
    # every thread) and the resident set, while the client pushed all it could.
    if traced_peak >= TRACED_PEAK_MAX:
        problems.append(f"Python allocations peaked at {traced_peak} B")
    if rss_after - rss_before >= RSS_GROWTH_MAX:
        problems.append(f"VmRSS grew by {rss_after - rss_before} B")
    assert not problems, f"{'; '.join(problems)} ({report})"
