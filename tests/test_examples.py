"""Every example under examples/ runs as a user would run it."""

from __future__ import annotations

import http.client
import os
import re
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import example_stderr, popen_example

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


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("prefork_http.py", ["--workers", "0"], "--workers must be at least 1, not 0"),
        ("udp_workers.py", ["--workers", "-1"], "--workers must be at least 1, not -1"),
        ("uvicorn_reuseport.py", ["--workers", "0"], "--workers must be at least 1, not 0"),
        (
            "l4proxy.py",
            ["--backend", "127.0.0.1:1", "--policy", "bogus"],
            "invalid choice: 'bogus'",
        ),
        ("l4proxy.py", ["--backend", "127.0.0.1:1", "--workers", "0"], "at least 1, not 0"),
    ],
)
def test_examples_refuse_bad_arguments_up_front(script: str, args: list[str], message: str) -> None:
    # Before: --workers 0 printed "ready" and served nothing (or exited 0), and a bad
    # policy name came out of a worker as two tracebacks.
    _assert_refused(script, ["--listen", "127.0.0.1:0", *args], message)


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


_BACKEND = ["--backend", "127.0.0.1:1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Before: each worker died on DuplicateNode, then the master on "worker N
        # failed to start": two tracebacks, status 1.
        ([*_BACKEND, *_BACKEND], "argument --backend: duplicate node '127.0.0.1:1'"),
        # Before: accepted. -1 printed "ready" then reset every client; -10 crashed
        # the master on SIGTERM (TimeoutExpired) before its cleanup.
        ([*_BACKEND, "--connect-timeout", "-1"], "--connect-timeout: must be a positive"),
        ([*_BACKEND, "--connect-timeout", "0"], "number of seconds, not '0'"),
        ([*_BACKEND, "--drain-timeout", "-10"], "--drain-timeout: must be a positive"),
        ([*_BACKEND, "--retry-after", "nan"], "number of seconds, not 'nan'"),
        ([*_BACKEND, "--retry-after", "inf"], "number of seconds, not 'inf'"),
    ],
)
def test_l4proxy_refuses_bad_backends_and_timeouts(args: list[str], message: str) -> None:
    _assert_refused("l4proxy.py", ["--listen", "127.0.0.1:0", "--workers", "1", *args], message)


SCRIPTS = ["prefork_http.py", "udp_workers.py", "uvicorn_reuseport.py", "l4proxy.py"]


def _listen_args(script: str, listen: str) -> list[str]:
    return ["--listen", listen, "--workers", "1", *(_BACKEND if script == "l4proxy.py" else [])]


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
def test_examples_refuse_a_bad_listen_address(script: str, listen: str, message: str) -> None:
    # Before: a traceback (AddressError, or GroupMemberError), status 1.
    _assert_refused(script, _listen_args(script, listen), "argument --listen: ", message)


@pytest.mark.parametrize("script", SCRIPTS)
def test_examples_refuse_a_listen_address_in_use(script: str) -> None:
    # A socket without SO_REUSEPORT holds the port: no reuseport socket can join it.
    kind = socket.SOCK_DGRAM if script == "udp_workers.py" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as holder:
        holder.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            holder.listen()
        listen = f"127.0.0.1:{holder.getsockname()[1]}"
        _assert_refused(
            script, _listen_args(script, listen), "--listen: ", f"{listen} is already in use"
        )
