"""The documentation stays true to the code."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import reuselb
import reuselb.balance

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def test_every_public_name_is_in_the_api_reference() -> None:
    text = (DOCS / "api.md").read_text()
    missing = [
        n
        for n in reuselb.__all__
        if n != "__version__" and f"reuselb.{n}\n" not in text and f"### {n}\n" not in text
    ]
    assert not missing, f"add to docs/api.md: {missing}"


def test_every_public_balance_name_is_in_the_api_reference() -> None:
    # api.md says that names not listed are private; reuselb.balance exported
    # ketama_points, MAX_POINTS, POLICIES, ... without an entry
    text = (DOCS / "api.md").read_text()
    missing = [
        n
        for n in reuselb.balance.__all__
        if f"::: reuselb.{n}\n" not in text
        and f"::: reuselb.balance.{n}\n" not in text
        and f"### {n}\n" not in text
    ]
    assert not missing, f"add to docs/api.md: {missing}"


def test_every_public_function_documents_what_it_raises() -> None:
    undocumented = []
    for module in (reuselb, reuselb.balance):
        for name in module.__all__:
            obj = getattr(module, name)
            qualified = f"{module.__name__}.{name}"
            if callable(obj) and not isinstance(obj, type) and ":raises" not in (obj.__doc__ or ""):
                undocumented.append(qualified)
    assert not undocumented, undocumented


def test_first_listener_heading_counts_its_example_lines() -> None:
    # The heading said "in 10 lines" of an example of 11.
    text = (DOCS / "index.md").read_text()
    m = re.search(
        r"^## Your first listener in (\d+) lines\n\n```python\n(.*?)^```", text, re.S | re.M
    )
    assert m, "docs/index.md has no 'Your first listener in N lines' with its example"
    assert int(m.group(1)) == len(m.group(2).splitlines()), m.group(2)


def _section_code(page: str, heading: str) -> str:
    """The first ```python block of the section *heading* of docs/*page*."""
    text = (DOCS / page).read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    m = BLOCK.search(section)
    assert m, f"docs/{page}: no python example under '## {heading}'"
    return m.group(1)


def _connect_once_listening(proc: subprocess.Popen[bytes], port: int) -> socket.socket:
    """A connection to *port* once *proc* listens there. Until then the port, reserved
    by a socket that does not listen, refuses at once; between tries this waits on
    *proc* itself, so a snippet that exits early fails the test with its stderr."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except ConnectionRefusedError:
            pass
        try:
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                pytest.fail(f"nothing listens on port {port} 30 s after the start")
            continue
        assert proc.stderr is not None
        pytest.fail(f"exited ({proc.returncode}) before it listened: {proc.stderr.read()!r}")


#: Seconds the recipe may take to stop: it takes a fraction of one.
_STOPPED_WITHIN = 10


@contextlib.contextmanager
def _asyncio_recipe() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """docs/recipes.md's asyncio recipe running on a free port: (process, port).

    Its stderr is a pipe; a process still running at the end is killed."""
    code = _section_code("recipes.md", "asyncio: serve on a reuseport listener")
    assert code.count('"127.0.0.1:9000"') == 1, code
    # A bound SO_REUSEPORT socket that does not listen holds a free port: the recipe's
    # listener (same user) joins it there, and only the listener takes connections.
    with socket.socket() as reserve:
        reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserve.bind(("127.0.0.1", 0))
        port = reserve.getsockname()[1]
        code = code.replace('"127.0.0.1:9000"', f'"127.0.0.1:{port}"')
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            yield proc, port
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def _stop(proc: subprocess.Popen[bytes]) -> bytes:
    """Ctrl-C *proc*; its stderr once it has exited within _STOPPED_WITHIN."""
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=_STOPPED_WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {_STOPPED_WITHIN} s after SIGINT")
    return err


@pytest.mark.linux
def test_asyncio_recipe_stops_on_ctrl_c_with_an_idle_client() -> None:
    # The recipe served with `async with server: await server.serve_forever()`. From
    # Python 3.12.1 on Server.wait_closed(), which a cancelled serve_forever() calls,
    # waits until every client has left, so with a client connected idle Ctrl-C did not
    # stop it; on 3.11 it died of the KeyboardInterrupt (status -2) after asyncio logged
    # "Exception in callback ... CancelledError" for the idle handler (CPython gh-113538).
    with _asyncio_recipe() as (proc, port):
        with _connect_once_listening(proc, port) as idle:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as echo:
                echo.sendall(b"hello\n")
                answer = b""
                while not answer.endswith(b"\n") and (chunk := echo.recv(100)):
                    answer += chunk
                # One listener, its queue accepted in order: once this later
                # connection is answered, the idle one's handler is running.
                assert answer == b"hello\n"
            err = _stop(proc)
            assert idle.recv(100) == b""  # closed unanswered: it asked nothing
        assert proc.returncode == 0, err.decode(errors="replace")
        assert err == b""


@pytest.mark.linux
def test_asyncio_recipe_ends_a_connection_whose_line_is_too_long() -> None:
    # StreamReader.readline() raises ValueError for a line over its 64 KiB limit; the
    # handler caught only ConnectionError, so asyncio logged "Unhandled exception in
    # client_connected_cb" with the traceback for every such client.
    with _asyncio_recipe() as (proc, port):
        with _connect_once_listening(proc, port) as client:
            try:
                client.sendall(b"x" * (70 * 1024))  # no newline, over the limit
                # bounded by the socket's timeout: the handler closes it
                while client.recv(65536):
                    pass
            except (ConnectionResetError, BrokenPipeError):
                pass  # closed with the line unread: the kernel sends a reset
            err = _stop(proc)
        assert proc.returncode == 0, err.decode(errors="replace")
        assert err == b"", err.decode(errors="replace")
