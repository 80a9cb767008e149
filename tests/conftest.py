"""Shared test configuration: capability markers defined once, fd accounting."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import pytest
from hypothesis import settings

IS_LINUX = sys.platform.startswith("linux")

# Hypothesis fails an example that takes over 200 ms by default: a speed assertion,
# which a GC pause or a busy 2-CPU CI host trips ("Unreliable test timings"). Every
# property test runs without one; pytest-timeout still catches a hang.
settings.register_profile("reuselb", deadline=None)
settings.load_profile("reuselb")


def _has_ipv6_loopback() -> bool:
    # Probe by trying (urllib3 style): constants can exist without a usable stack.
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _has_ipv6_loopback()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "linux" in item.keywords and not IS_LINUX:
            item.add_marker(pytest.mark.skip(reason="needs Linux"))
        if "ipv6" in item.keywords and not HAS_IPV6:
            item.add_marker(pytest.mark.skip(reason="no IPv6 loopback (binding ::1 failed)"))
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="needs root"))


def open_fds() -> set[int]:
    """The file descriptors open in this process right now (Linux /proc)."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


@contextmanager
def fds_left(free: int) -> Iterator[None]:
    """Let this process open exactly *free* more fds, then fail with EMFILE.

    Lowers the soft RLIMIT_NOFILE to just above the highest open fd plus *free*
    and fills the holes below it (the kernel hands out the lowest free number).
    """
    import errno
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(open_fds())
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
    try:
        for _ in range(top + 1):
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                if exc.errno != errno.EMFILE:
                    raise
                break
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1 + free, hard))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def end_loop(
    loop: asyncio.AbstractEventLoop,
    *,
    cancel: Iterable[asyncio.Future[Any] | None] = (),
    close: Iterable[socket.socket] = (),
) -> None:
    """A relay test's teardown: cancel *cancel* (None skipped), shut the loop down
    (its hub's relays end), close it, then close *close*. An error while shutting
    down is not the test's finding (the test has failed already, or asserted what it
    checks), so it does not hide the test's own exception."""
    with contextlib.suppress(BaseException):
        for future in cancel:
            if future is not None:
                future.cancel()
        loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
    for sock in close:
        sock.close()


@pytest.fixture(autouse=True, scope="session")
def _sigint_as_in_a_terminal() -> Iterator[None]:
    # Tests of Ctrl-C send SIGINT to a child and expect it to stop, as a terminal's
    # foreground job does. A pytest started as a background job of a
    # non-interactive shell (`pytest &`, nohup) has SIGINT ignored, and exec()
    # passes SIG_IGN on, so every child would ignore the Ctrl-C (the library
    # rightly leaves an ignored SIGINT alone) and those tests would fail. A handled
    # signal is reset to SIG_DFL at exec(), so Python's own handler here gives each
    # child the default disposition.
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(autouse=True)
def _no_exception_left_handled() -> Iterator[None]:
    # CPython 3.11+ leaves the exception being handled set in sys.exc_info() for
    # good when a trace function raises at some lines of an except block (see
    # test_drain_close_interrupted_at_any_line_leaves_nothing_behind). Every later
    # exception in that thread then has it as __context__, and tests far away that
    # check __context__ fail, depending on the order the tests run in. Fail the
    # test that left it instead.
    yield
    left = sys.exc_info()[1]
    assert left is None, f"the test left {left!r} as the exception being handled"


@pytest.fixture
def fd_limit() -> Iterator[Callable[[int], None]]:
    """A function that lets this test open fds up to a number, for this test only.

    ``fd_limit(n)`` raises the soft ``RLIMIT_NOFILE`` to at least *n* (the limit is
    one above the highest fd number allowed, not a count), and the hard limit too
    where it is below *n*, which needs ``CAP_SYS_RESOURCE``: without it the test
    skips, saying how many fds it needs. Both limits are put back when the test
    ends, so no later test passes only because an earlier one raised them.

    :raises pytest.skip.Exception: when the hard limit is below *n* and may not be
        raised.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def raise_to(n: int) -> None:
        now_soft, now_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if now_soft != resource.RLIM_INFINITY and now_soft < n:
            new_hard = now_hard
            if now_hard != resource.RLIM_INFINITY and now_hard < n:
                new_hard = n
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (n, new_hard))
            except (ValueError, OSError) as exc:
                # EPERM without CAP_SYS_RESOURCE, or above fs.nr_open.
                pytest.skip(f"needs {n} fds (RLIMIT_NOFILE is {now_soft}/{now_hard}): {exc}")

    try:
        yield raise_to
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves file descriptors open."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    # listdir itself opens a directory fd that is closed again; anything left is a leak.
    assert not leaked, f"leaked fds: {sorted(leaked)}"


# Each example's stderr, by pid, until example_stderr() reads it.
_STDERR: dict[int, IO[bytes]] = {}


def popen_example(script: str, *args: str) -> subprocess.Popen[str]:
    """Run an example script as a user would, stdout piped (its "ready" line).

    ResourceWarning is shown (Python ignores it by default), so an example that
    leaves a pipe or socket unclosed at exit says so on stderr, which is kept in a
    file for :func:`example_stderr`.
    """
    err = tempfile.TemporaryFile()  # noqa: SIM115 (kept open until example_stderr)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-W", "always::ResourceWarning", script, *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    except BaseException:
        err.close()
        raise
    _STDERR[proc.pid] = err
    return proc


def example_stderr(proc: subprocess.Popen[str]) -> str:
    """What an example started by :func:`popen_example` wrote to stderr (read once)."""
    with _STDERR.pop(proc.pid) as err:
        err.seek(0)
        return err.read().decode(errors="replace")


def run_in_netns(script: str) -> Any:
    """Run a Python *script* in a new network namespace (loopback up); its JSON stdout.

    Root only (the callers carry the ``root`` marker). Sysctls such as
    ``net.ipv4.tcp_migrate_req`` are per namespace, so a script may turn them on
    without changing what the host, or any other test, sees. Skips the test where
    the kernel or container allows no new namespace.
    """
    import json
    import shutil

    if not (shutil.which("unshare") and shutil.which("ip")):
        pytest.skip("needs unshare(1) and ip(8)")
    out = subprocess.run(
        [
            "unshare",
            "--net",
            "sh",
            "-c",
            'ip link set lo up && exec "$0" -c "$1"',
            sys.executable,
            script,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,  # a failing child's stderr goes into the assertion message
    )
    if out.returncode != 0 and "unshare failed" in out.stderr:
        pytest.skip(f"no new network namespace here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def until_in_or(
    thread: threading.Thread, function: str, done: Callable[[], bool], timeout: float = 30
) -> None:
    """Until ``done()``, or *thread* is inside *function* (a frame of its stack).

    How a test knows that another thread is blocked on a lock that *function*
    takes (a drain waiting for another drain, a fork waiting for the fork gate)
    without a timed wait deciding it; where the lock is missing, the other thread
    gets through instead, and ``done()`` says so. Bounded by *timeout*.
    """
    deadline = time.monotonic() + timeout
    while not done():
        frame = sys._current_frames().get(thread.ident or -1)
        while frame is not None:
            if frame.f_code.co_name == function:
                return
            frame = frame.f_back
        assert time.monotonic() < deadline, f"{thread.name} never reached {function}"
        select.select([], [], [], 0.001)  # a bounded re-check


def without_bind_privilege() -> list[str]:
    """A command prefix under which binding port 1 fails with EACCES.

    Root keeps CAP_NET_BIND_SERVICE unless setpriv(1) (util-linux) drops it from the
    bounding set for the command it runs.
    """
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        if int(f.read()) <= 1:
            pytest.skip("net.ipv4.ip_unprivileged_port_start is 0 or 1: no port needs a privilege")
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv(1) to run without CAP_NET_BIND_SERVICE as root")
    return [setpriv, "--bounding-set", "-net_bind_service"]
