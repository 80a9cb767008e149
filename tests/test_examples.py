"""Every example under examples/ runs as a user would run it."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import resource
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.conftest import example_stderr, popen_example, without_bind_privilege

pytestmark = pytest.mark.linux

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _start(script: str, *args: str) -> tuple[subprocess.Popen[str], str, list[int]]:
    proc = popen_example(str(EXAMPLES / script), *args)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    m = re.match(r"ready (?:http://)?(\S+) workers=([\d,]+)", line)
    if not m:
        proc.kill()
        proc.wait()
        pytest.fail(f"{script} did not report ready: {line!r}; stderr: {example_stderr(proc)}")
    return proc, m.group(1), [int(p) for p in m.group(2).split(",")]


def _get(hostport: str) -> str:
    host, port = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read().decode()
    finally:
        conn.close()


def _stop(proc: subprocess.Popen[str], workers: list[int]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    if proc.stdout is not None:
        proc.stdout.close()
    stderr = example_stderr(proc)
    assert "ResourceWarning" not in stderr, stderr
    for pid in workers:  # no stray worker left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(params=["prefork_http.py", "uvicorn_reuseport.py"])
def http_example(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[int]]]:
    proc, hostport, workers = _start(request.param, "--listen", "127.0.0.1:0", "--workers", "3")
    try:
        yield hostport, workers
    finally:
        if proc.poll() is None:
            _stop(proc, workers)
        else:
            example_stderr(proc)


def test_http_workers_share_one_port(http_example: tuple[str, list[int]]) -> None:
    hostport, workers = http_example
    pids = [int(re.findall(r"\d+", _get(hostport))[-1]) for _ in range(60)]
    print(f"\nresponses per worker pid: { {p: pids.count(p) for p in set(pids)} }")
    assert set(pids) <= set(workers)
    assert len(set(pids)) > 1, "responses came from one process only"


def test_udp_workers_keep_flows_when_a_worker_dies() -> None:
    proc, hostport, workers = _start("udp_workers.py", "--listen", "127.0.0.1:0", "--workers", "3")
    assert proc.stdout is not None
    host, port = hostport.rsplit(":", 1)
    flows = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(32)]
    try:

        def mapping() -> list[bytes]:
            out = []
            for i, f in enumerate(flows):
                f.sendto(b"%d" % i, (host, int(port)))
                f.settimeout(30)
                out.append(f.recv(200).split()[0])  # the member index that answered
            return out

        for f in flows:
            f.bind(("127.0.0.1", 0))
        before = mapping()
        assert len(set(before)) > 1
        os.kill(workers[1], signal.SIGKILL)
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith(f"replaced worker 1: {workers[1]} -> "), line
        workers[1] = int(line.split()[-1])
        assert mapping() == before  # no flow moved to another member
    finally:
        for f in flows:
            f.close()
        _stop(proc, workers)


@pytest.fixture
def backend() -> Iterator[str]:
    """A ``--backend`` for l4proxy that no one serves, held for the test.

    127.0.0.1 and a port bound but never listening: these tests never have the
    proxy connect to its backend, and if one did, that connect would be refused,
    where a fixed port (1) might reach some service.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


#: Stands for the backend fixture's address in a parametrized case (its port is
#: only known in the test): _filled() puts the address in its place.
_BACKEND_HERE = "{backend}"
_BACKEND = ["--backend", _BACKEND_HERE]


def _filled(args: list[str], backend: str) -> list[str]:
    """*args* with the *backend* address in place of :data:`_BACKEND_HERE`."""
    return [arg.replace(_BACKEND_HERE, backend) for arg in args]


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("prefork_http.py", ["--workers", "0"], "--workers must be at least 1, not 0"),
        ("udp_workers.py", ["--workers", "-1"], "--workers must be at least 1, not -1"),
        ("uvicorn_reuseport.py", ["--workers", "0"], "--workers must be at least 1, not 0"),
        ("l4proxy.py", [*_BACKEND, "--policy", "bogus"], "invalid choice: 'bogus'"),
        ("l4proxy.py", [*_BACKEND, "--workers", "0"], "at least 1, not 0"),
    ],
)
def test_examples_refuse_bad_arguments_up_front(
    script: str, args: list[str], message: str, backend: str
) -> None:
    # Before: --workers 0 printed "ready" and served nothing (or exited 0), and a bad
    # policy name came out of a worker as two tracebacks.
    _assert_refused(script, ["--listen", "127.0.0.1:0", *_filled(args, backend)], message)


def _assert_refused(script: str, args: list[str], *messages: str) -> None:
    """*script* run with *args* exits 2 (a usage error), says *messages*, no traceback."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert all(m in done.stderr for m in messages), done.stderr
    assert "Traceback" not in done.stderr and "ready" not in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Before: each worker died on DuplicateNode, then the master on "worker N
        # failed to start": two tracebacks, status 1.
        ([*_BACKEND, *_BACKEND], f"argument --backend: duplicate node '{_BACKEND_HERE}'"),
        # Before: accepted. -1 printed "ready" then reset every client; -10 crashed
        # the master on SIGTERM (TimeoutExpired) before its cleanup.
        ([*_BACKEND, "--connect-timeout", "-1"], "--connect-timeout: must be a positive"),
        ([*_BACKEND, "--connect-timeout", "0"], "number of seconds, not '0'"),
        ([*_BACKEND, "--drain-timeout", "-10"], "--drain-timeout: must be a positive"),
        ([*_BACKEND, "--retry-after", "nan"], "number of seconds, not 'nan'"),
        ([*_BACKEND, "--retry-after", "inf"], "number of seconds, not 'inf'"),
        # Before: accepted, "ready", then every client reset with nothing logged.
        (["--backend", f"{_BACKEND_HERE},0"], "every backend has weight 0"),
        # Before: accepted, "ready", then every client reset, logged as "every
        # backend refused".
        (["--backend", "127.0.0.1:0"], "'127.0.0.1:0': a backend needs a port"),
        (["--backend", ":6379"], "':6379': a backend needs a host to connect to"),
        (
            ["--backend", "*:6379"],
            "'*:6379': a backend needs a host to connect to, not the wildcard '*'",
        ),
        (["--backend", "[::]:6379"], "not the wildcard '[::]'"),
    ],
)
def test_l4proxy_refuses_bad_backends_and_timeouts(
    args: list[str], message: str, backend: str
) -> None:
    _assert_refused(
        "l4proxy.py",
        ["--listen", "127.0.0.1:0", "--workers", "1", *_filled(args, backend)],
        message.replace(_BACKEND_HERE, backend),
    )


SCRIPTS = ["prefork_http.py", "udp_workers.py", "uvicorn_reuseport.py", "l4proxy.py"]


def _listen_args(script: str, listen: str, backend: str | None) -> list[str]:
    """*script*'s arguments to listen on *listen*, with *backend* for l4proxy."""
    if script != "l4proxy.py":
        return ["--listen", listen, "--workers", "1"]
    assert backend is not None, "l4proxy needs a backend"
    return ["--listen", listen, "--workers", "1", "--backend", backend]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("bogus", "invalid address 'bogus': no port given"),
        ("192.0.2.1:0", "'192.0.2.1:0': not an address of this host"),  # TEST-NET-1
        ("[fe80::1]:0", "'[fe80::1]:0': a link-local address needs a zone"),
        ("127.0.0.1:65536", "port 65536 out of range"),
    ],
)
def test_examples_refuse_a_bad_listen_address(
    script: str, listen: str, message: str, backend: str
) -> None:
    # Before: a traceback (AddressError, or GroupMemberError), status 1.
    _assert_refused(script, _listen_args(script, listen, backend), "argument --listen: ", message)


@pytest.mark.parametrize("script", SCRIPTS)
def test_examples_refuse_a_listen_address_in_use(script: str, backend: str) -> None:
    # A socket without SO_REUSEPORT holds the port: no reuseport socket can join it.
    kind = socket.SOCK_DGRAM if script == "udp_workers.py" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as holder:
        holder.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            holder.listen()
        listen = f"127.0.0.1:{holder.getsockname()[1]}"
        _assert_refused(
            script,
            _listen_args(script, listen, backend),
            "--listen: ",
            f"{listen} is already in use",
        )


class _Lines:
    """The lines a child writes to a pipe, each waited for under a deadline (a bare
    readline() waits forever on a child that hangs; select() on a buffered file object
    misses lines already in its buffer)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.fd = stream.fileno()
        self.buf = b""

    def next(self, timeout: float) -> str:
        """The next line, or "" if none came within *timeout* s or the pipe closed."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return ""
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return ""
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


class _Job:
    """An example running as a shell runs a foreground job: a process group of its own."""

    def __init__(self, proc: subprocess.Popen[bytes], err: IO[bytes]) -> None:
        self.proc = proc
        self.err = err
        assert proc.stdout is not None
        self.lines = _Lines(proc.stdout)
        line = self.lines.next(60)
        m = re.match(r"ready (?:http://)?(\S+) workers=([\d,]+)", line)
        assert m, f"not ready: {line!r}; stderr: {self.stderr()}"
        self.hostport = m.group(1)
        self.workers = [int(p) for p in m.group(2).split(",")]

    def stderr(self) -> str:
        """Everything master and workers wrote to stderr so far."""
        self.err.seek(0)
        return self.err.read().decode(errors="replace")


@contextlib.contextmanager
def _job(script: str, *args: str, env: dict[str, str] | None = None) -> Iterator[_Job]:
    """Run *script* in a process group of its own until its "ready" line, so that
    os.killpg() reaches the master and its workers as Ctrl-C in a terminal does.

    At the end the whole group is SIGKILLed (with any worker a master left behind)
    and the master reaped, whatever the test did.
    """
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-W", "always::ResourceWarning", str(EXAMPLES / script), *args],
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
            env=env,
        )
        try:
            yield _Job(proc, err)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.stdout is not None
            proc.stdout.close()


def _assert_reaped(pids: list[int]) -> None:
    for pid in pids:  # not even a zombie: the master waited for it
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("script", ["prefork_http.py", "udp_workers.py", "uvicorn_reuseport.py"])
def test_ctrl_c_stops_an_example_quietly(script: str) -> None:
    # Ctrl-C sends SIGINT to the whole foreground process group. Before, every
    # worker died with a KeyboardInterrupt traceback (uvicorn's master too, status
    # -2); now the workers ignore it and the master stops them as on SIGTERM.
    with _job(script, "--listen", "127.0.0.1:0", "--workers", "2") as job:
        os.killpg(job.proc.pid, signal.SIGINT)
        rc = job.proc.wait(timeout=30)
        err = job.stderr()
        assert rc == 0, err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        assert "ResourceWarning" not in err, err
        _assert_reaped(job.workers)


@pytest.mark.parametrize("script", ["prefork_http.py", "udp_workers.py", "uvicorn_reuseport.py"])
def test_workers_exit_when_the_master_is_killed(script: str) -> None:
    # Before, after kill -9 of the master (or the OOM killer) its workers served on
    # for ever, unsupervised; a new master on the port joined their group. Each
    # worker now stops at EOF of a pipe from the master, which the kernel closes.
    with _job(script, "--listen", "127.0.0.1:0", "--workers", "2") as job:
        # pidfds, taken while the master is alive: no PID reuse can fool them, and
        # one becomes readable when its process exits (not a child of this one).
        pidfds = [os.pidfd_open(pid) for pid in job.workers]
        try:
            job.proc.kill()
            job.proc.wait(timeout=30)
            deadline = time.monotonic() + 30
            running = list(pidfds)
            while running and time.monotonic() < deadline:
                exited, _, _ = select.select(running, [], [], deadline - time.monotonic())
                running = [fd for fd in running if fd not in exited]
            assert not running, f"{len(running)} worker(s) still running 30 s after the master"
            assert "Traceback" not in job.stderr(), job.stderr()
        finally:
            for fd in pidfds:
                os.close(fd)


@pytest.mark.parametrize("script", ["prefork_http.py", "uvicorn_reuseport.py"])
def test_http_examples_replace_a_dead_worker(script: str) -> None:
    # Before, a dead worker stayed a zombie and was not replaced: with every worker
    # dead, prefork's master ran on with the port refusing everyone and uvicorn's
    # exited 0 without a word. Now each is reaped and replaced, as udp_workers does.
    with _job(script, "--listen", "127.0.0.1:0", "--workers", "2") as job:
        for pid in job.workers:
            os.kill(pid, signal.SIGKILL)
        replaced = {}
        for _ in job.workers:
            line = job.lines.next(60)
            m = re.fullmatch(r"replaced worker [12] of 2: (\d+) -> (\d+)", line)
            assert m, f"{line!r}; stderr: {job.stderr()}"
            replaced[int(m.group(1))] = int(m.group(2))
        assert sorted(replaced) == sorted(job.workers)
        _assert_reaped(job.workers)
        pid = int(re.findall(r"\d+", _get(job.hostport))[-1])
        assert pid in replaced.values()
        job.proc.send_signal(signal.SIGTERM)
        assert job.proc.wait(timeout=30) == 0, job.stderr()
        _assert_reaped(list(replaced.values()))


def test_prefork_http_ignores_clients_that_send_no_whole_request() -> None:
    # A port probe or TCP health check (connect, close) and a head over asyncio's
    # 64 KiB line limit each logged an "Unhandled exception in client_connected_cb"
    # traceback (IncompleteReadError, LimitOverrunError) in the worker.
    with _job("prefork_http.py", "--listen", "127.0.0.1:0", "--workers", "1") as job:
        host, port = job.hostport.rsplit(":", 1)
        for _ in range(3):
            socket.create_connection((host, int(port)), timeout=30).close()
        with socket.create_connection((host, int(port)), timeout=30) as big:
            big.sendall(b"GET /" + b"a" * 70_000)
            assert big.recv(100) == b""  # no answer; the worker closed it
        assert "hello from worker" in _get(job.hostport)  # the worker is still serving
        # A graceful stop: the worker's loop runs every callback already scheduled,
        # such as asyncio's logging of a handler's exception, before it exits.
        job.proc.send_signal(signal.SIGTERM)
        assert job.proc.wait(timeout=30) == 0
        err = job.stderr()
        assert "Traceback" not in err and "Unhandled exception" not in err, err


#: Seconds a stop may take: far more than one takes, far less than the 10 s after
#: which the master kills a worker that has not exited.
_STOPPED_WITHIN = 5


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_prefork_http_stops_with_an_idle_client_connected(stop: signal.Signals) -> None:
    # A client connected that has sent no request yet (a slow client, a health check
    # that holds its connection). Before: from Python 3.12.1 on, Server.wait_closed()
    # waited for it to leave, so the worker ran on until the master killed it after
    # 10 s; on 3.11 asyncio.run() cancelled its handler, which asyncio logged as
    # "Exception in callback ... CancelledError" with a traceback (CPython gh-113538).
    with _job("prefork_http.py", "--listen", "127.0.0.1:0", "--workers", "1") as job:
        host, port = job.hostport.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as idle:
            # One worker, one accept queue, served in order: once this later request
            # is answered, the idle connection's handler is running.
            assert "hello from worker" in _get(job.hostport)
            if stop == signal.SIGINT:
                os.killpg(job.proc.pid, stop)  # Ctrl-C: the whole process group
            else:
                job.proc.send_signal(stop)
            try:
                rc = job.proc.wait(timeout=_STOPPED_WITHIN)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running {_STOPPED_WITHIN} s after {stop.name}; {job.stderr()}")
            assert idle.recv(100) == b""  # closed unanswered: it asked nothing
        assert rc == 0, job.stderr()
        assert job.stderr() == ""
        _assert_reaped(job.workers)


def test_udp_worker_survives_an_answer_too_long_to_send() -> None:
    # Any client could kill a worker: the answer to a 65,507-byte datagram (the
    # IPv4 maximum) plus its prefix is too long, and sendto's EMSGSIZE was uncaught.
    with (
        _job("udp_workers.py", "--listen", "127.0.0.1:0", "--workers", "1") as job,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        host, port = job.hostport.rsplit(":", 1)
        client.settimeout(30)
        client.sendto(b"x" * 65_507, (host, int(port)))
        client.sendto(b"small", (host, int(port)))  # queued behind the big one
        index, pid, data = client.recv(200).split()
        assert (index, int(pid), data) == (b"0", job.workers[0], b"small"), job.stderr()
        job.proc.send_signal(signal.SIGTERM)
        assert job.proc.wait(timeout=30) == 0
        assert "Traceback" not in job.stderr(), job.stderr()


@pytest.mark.parametrize("script", ["udp_workers.py", "l4proxy.py"])
def test_examples_out_of_fds_at_start_is_not_a_bad_listen_address(
    script: str, backend: str
) -> None:
    # Before: EMFILE making member 36 of 50 came out as "argument --listen: ...",
    # status 2, blaming a good address; their docstrings promise one line, status 1.
    args = _listen_args(script, "127.0.0.1:0", backend)
    args[args.index("--workers") + 1] = "50"
    command = " ".join([shlex.quote(sys.executable), str(EXAMPLES / script), *args])
    done = subprocess.run(
        ["sh", "-c", f"ulimit -n 40 && exec {command}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "cannot listen" in done.stderr and "Too many open files" in done.stderr
    assert "argument --listen" not in done.stderr and "usage:" not in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize("script", ["prefork_http.py", "udp_workers.py", "uvicorn_reuseport.py"])
def test_examples_name_a_listen_address_they_may_not_bind(script: str) -> None:
    # Before: "argument --listen: [Errno 13] Permission denied", no address named.
    done = subprocess.run(
        [
            *without_bind_privilege(),
            sys.executable,
            str(EXAMPLES / script),
            *_listen_args(script, "127.0.0.1:1", None),  # port 1: privileged on purpose
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "argument --listen: " in done.stderr, done.stderr
    assert "127.0.0.1:1" in done.stderr and "Permission denied" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


#: Imported by every Python process started with :class:`WorkerGate`'s ``env``: a
#: worker (not the test's own child, the master) stops in its interpreter's start-up,
#: where a worker used to be too early to ignore SIGINT, until the test lets it go.
_GATE_SITECUSTOMIZE = """\
import os
import socket

if os.getppid() != int(os.environ["REUSELB_TEST_GATE_TOP"]):
    with socket.socket(socket.AF_UNIX) as _gate:
        _gate.settimeout(60)
        try:
            _gate.connect(os.environ["REUSELB_TEST_GATE"])
            _gate.sendall(b"%d\\n" % os.getpid())
            _gate.recv(1)
        except OSError:
            pass  # the gate is closed: start
"""


class WorkerGate:
    """Holds each worker of a master started with :attr:`env` at its interpreter's
    start-up (a ``sitecustomize`` on PYTHONPATH), before any of its own code has run,
    until :meth:`release`: a Ctrl-C sent meanwhile deterministically reaches a worker
    still starting, as a terminal's does in the ~100 ms a worker spends importing.
    """

    def __init__(self, directory: str) -> None:
        with open(os.path.join(directory, "sitecustomize.py"), "w") as f:
            f.write(_GATE_SITECUSTOMIZE)
        path = os.path.join(directory, "gate")  # short: a Unix socket path has 108 bytes
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [directory, os.environ.get("PYTHONPATH")])),
            "REUSELB_TEST_GATE": path,
            "REUSELB_TEST_GATE_TOP": str(os.getpid()),
        }
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(64)
        self.held: list[socket.socket] = []

    def arrival(self, timeout: float = 60) -> int:
        """Wait for the next worker to reach the gate; its pid."""
        self.listener.settimeout(timeout)
        conn, _ = self.listener.accept()
        self.held.append(conn)
        conn.settimeout(timeout)
        with conn.makefile("rb") as f:
            return int(f.readline())

    def release(self) -> None:
        """Let the workers at the gate go on, and every later one pass."""
        for conn in self.held:
            with contextlib.suppress(OSError):
                conn.sendall(b"g")
            conn.close()
        self.held.clear()
        self.listener.close()  # a worker queued or still to come passes


@contextlib.contextmanager
def worker_gate() -> Iterator[WorkerGate]:
    with tempfile.TemporaryDirectory(prefix="gate") as directory:
        gate = WorkerGate(directory)
        try:
            yield gate
        finally:
            gate.release()


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_while_a_worker_starts_is_quiet(script: str, backend: str) -> None:
    # Before: a worker set SIGINT to SIG_IGN only once its imports and argument
    # parsing were done; a Ctrl-C in that window was a KeyboardInterrupt traceback,
    # the master reported "worker ... failed to start" and exited 1 (l4proxy's master
    # with a RuntimeError traceback). Workers now start with SIGINT blocked.
    args = ["--listen", "127.0.0.1:0", "--workers", "2"]
    if script == "l4proxy.py":
        args += ["--backend", backend]
    with worker_gate() as gate, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-W", "always::ResourceWarning", str(EXAMPLES / script), *args],
            stdout=subprocess.PIPE,
            stderr=err,
            env=gate.env,
            start_new_session=True,  # a process group of its own, as a shell's job
        )
        try:
            worker = gate.arrival()  # the first worker, held as it starts
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the master and its workers
            gate.release()
            out, _ = proc.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.stdout is not None
            proc.stdout.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    assert proc.returncode == 0, (out, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "ResourceWarning" not in stderr, stderr
    _assert_reaped([worker])


def finish_session(proc: subprocess.Popen[Any], timeout: float) -> tuple[Any, Any, bool]:
    """Wait up to *timeout* for *proc* (started with ``start_new_session=True``);
    return its stdout, its stderr (as ``communicate()`` gives them) and whether any
    process of its group was still running when it ended. Whatever is left of the
    group is killed and *proc* reaped, also when the wait times out."""
    try:
        out, err = proc.communicate(timeout=timeout)
        group_left = True
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            group_left = False
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    return out, err, group_left


def run_at_fds(
    argv: list[str], limit: int = 64, timeout: float = 120
) -> tuple[int, str, str, bool]:
    """Run ``python *argv*`` with RLIMIT_NOFILE *limit* in a session of its own; return
    its status, stdout, stderr and whether any process of its group was left running.

    The limit is set by a small launcher that then execs the program (same pid, same
    process group), rather than by a preexec_fn, which runs Python code in the forked
    child of this possibly threaded process.
    """
    launcher = (
        "import os, resource, sys; n = int(sys.argv[1]); "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, str(limit), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out, err, group_left = finish_session(proc, timeout)
    return proc.returncode, out, err, group_left


@pytest.mark.parametrize("script", SCRIPTS)
def test_examples_out_of_fds_at_start_say_so_and_stop_their_workers(
    script: str, backend: str
) -> None:
    # Before: the Popen of a worker failed with EMFILE as a traceback, and the workers
    # already started were left running (each then died of a BrokenPipeError
    # traceback writing "ready" to the master that had gone). The master keeps 2 fds
    # per worker (l4proxy 1), udp_workers and l4proxy also the group's members (40
    # here): the 64 fds allowed run out within 30 workers.
    workers = "40" if script in ("udp_workers.py", "l4proxy.py") else "64"
    args = ["--listen", "127.0.0.1:0", "--workers", workers]
    if script == "l4proxy.py":
        args += ["--backend", backend]

    returncode, out, err, group_left = run_at_fds([str(EXAMPLES / script), *args])
    assert returncode == 1, (out, err)
    assert "Traceback" not in err, err
    assert re.fullmatch(r"\S.* could not be started: \[Errno 24\] Too many open files\n", err), err
    assert not group_left, "workers were left running"


@pytest.mark.parametrize("script", ["prefork_http.py", "uvicorn_reuseport.py"])
def test_a_failed_respawn_names_the_worker_slot(script: str) -> None:
    # Before: a dead worker was respawned as a pool of one, and a respawn that failed
    # said "worker 1 of 1 could not be started" whichever of the 4 had died.
    with _job(script, "--listen", "127.0.0.1:0", "--workers", "4") as job:
        _, hard = resource.prlimit(job.proc.pid, resource.RLIMIT_NOFILE)
        # fds 0-2 are open: at a soft limit of 3 every new fd of the master is EMFILE
        resource.prlimit(job.proc.pid, resource.RLIMIT_NOFILE, (3, hard))
        os.kill(job.workers[2], signal.SIGKILL)
        assert job.proc.wait(timeout=60) == 1, job.stderr()
        assert job.stderr() == (
            "worker 3 of 4 died and could not be restarted: [Errno 24] Too many open files\n"
        )
        _assert_reaped(job.workers)


#: A ``sitecustomize`` that makes reuselb's socket handoff fail in a process started
#: with PYTHONPATH on it while a flag file exists: "send" in the master (ENOBUFS),
#: "recv" in a worker (out of fds as the socket arrives, a real EMFILE).
_HANDOFF_FAULTS_SITECUSTOMIZE = """\
import errno
import os
import resource

import reuselb

_flags = os.environ["REUSELB_TEST_FAULTS"]
_send, _recv = reuselb.send_sockets, reuselb.recv_sockets


def send_sockets(*args, **kwargs):
    if os.path.exists(os.path.join(_flags, "send")):
        raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
    return _send(*args, **kwargs)


def recv_sockets(channel):
    if os.path.exists(os.path.join(_flags, "recv")):
        free = os.dup(0)  # the lowest free fd
        os.close(free)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (free, hard))
    return _recv(channel)


reuselb.send_sockets, reuselb.recv_sockets = send_sockets, recv_sockets
"""


@contextlib.contextmanager
def _handoff_faults() -> Iterator[tuple[str, dict[str, str]]]:
    """A directory to put the "send" or "recv" flag file in, and the environment
    that makes an example's handoff fail while it is there."""
    with tempfile.TemporaryDirectory(prefix="faults") as directory:
        with open(os.path.join(directory, "sitecustomize.py"), "w") as f:
            f.write(_HANDOFF_FAULTS_SITECUSTOMIZE)
        path = os.pathsep.join(filter(None, [directory, os.environ.get("PYTHONPATH")]))
        yield directory, {**os.environ, "PYTHONPATH": path, "REUSELB_TEST_FAULTS": directory}


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("side", ["send", "recv"])
@pytest.mark.parametrize("script", ["udp_workers.py", "l4proxy.py"])
def test_a_failed_socket_handoff_at_start_is_one_line(script: str, side: str, backend: str) -> None:
    # Before: a master whose send_sockets failed died of an OSError traceback
    # (udp_workers) or left the worker running, unreaped (l4proxy); a worker whose
    # recv_sockets failed died of a HandoffError traceback.
    args = ["--listen", "127.0.0.1:0", "--workers", "2"]
    if script == "l4proxy.py":
        args += ["--backend", backend]
    with _handoff_faults() as (flags, env), tempfile.TemporaryFile() as err:
        open(os.path.join(flags, side), "w").close()
        proc = subprocess.Popen(
            [sys.executable, "-W", "always::ResourceWarning", str(EXAMPLES / script), *args],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            start_new_session=True,
        )
        out, _, group_left = finish_session(proc, 60)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    assert proc.returncode == 1, (out, stderr)
    assert b"ready" not in out, out
    assert "Traceback" not in stderr and "ResourceWarning" not in stderr, stderr
    lines = stderr.splitlines()
    if side == "send":  # the master's line alone: it killed the worker
        assert len(lines) == 1 and "was not sent: [Errno 105] No buffer space" in lines[0], lines
    else:  # the worker's line, then the master's
        assert len(lines) == 2, lines
        assert re.fullmatch(r"(l4proxy )?worker \d+: no (listener|member): .*fd.*", lines[0]), lines
        assert re.search(r"worker \d+ (failed to start|could not be started)", lines[1]), lines
    assert not group_left, "workers were left running"


@pytest.mark.parametrize("side", ["send", "recv"])
@pytest.mark.parametrize("script", ["udp_workers.py", "l4proxy.py"])
def test_a_failed_socket_handoff_at_a_respawn_is_one_line(
    script: str, side: str, backend: str
) -> None:
    # Before: as at start (a traceback, a worker left unreaped with its pipe open in
    # the master). Now each keeps its policy for a replacement that does not start:
    # udp_workers stops (status 1), l4proxy takes the member out of the group and
    # serves on with the other workers.
    args = ["--listen", "127.0.0.1:0", "--workers", "2"]
    if script == "l4proxy.py":
        args += ["--backend", backend]
    with _handoff_faults() as (flags, env), _job(script, *args, env=env) as job:
        fds = _open_fds(job.proc.pid)
        open(os.path.join(flags, side), "w").close()
        os.kill(job.workers[0], signal.SIGKILL)
        if script == "udp_workers.py":
            assert job.proc.wait(timeout=60) == 1, job.stderr()
            lines = job.stderr().splitlines()
            assert lines[-1].startswith("worker 0 died and could not be restarted: "), lines
            assert len(lines) == (1 if side == "send" else 2), lines
            _assert_reaped(job.workers)
        else:
            line = job.lines.next(60)
            assert line.startswith(f"worker {job.workers[0]} died and was not replaced: "), line
            # its member and the dead worker's pipe closed; nothing of the new one held
            assert _open_fds(job.proc.pid) == fds - 2
            assert job.proc.poll() is None  # serving on with the other worker
            job.proc.send_signal(signal.SIGTERM)
            assert job.proc.wait(timeout=60) == 0, job.stderr()
            lines = job.stderr().splitlines()
            assert len(lines) == (0 if side == "send" else 1), lines
            _assert_reaped(job.workers)
        assert "Traceback" not in job.stderr(), job.stderr()
