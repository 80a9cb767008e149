"""``python -m reuselb demo``: the library's scenarios, runnable on a fresh install.

Not library API. Each scenario is one function that starts its own processes,
waits for them to be ready over pipes (never by sleeping), prints what happened
and stops everything it started, whatever goes wrong.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from ._relay import RelayStats, async_pipe_splice
from ._sockets import connect_tcp, hold_port, reuseport_listener
from .balance import RoundRobin

__all__ = ["DemoError", "proxy_scenario", "reuseport_scenario", "start_workers", "stop_workers"]

_T = TypeVar("_T")

_READY_TIMEOUT = 20.0
#: Seconds a demo client waits to connect and for a worker's answer.
_ANSWER_TIMEOUT = 10.0


class DemoError(RuntimeError):
    """A scenario could not run; the message says why (``python -m reuselb`` prints it)."""


def _refuse_a_taken_port(port: int) -> None:
    """Raise :class:`DemoError` if a socket listens on ``127.0.0.1:port`` or holds it
    without SO_REUSEADDR, or if this process may not bind the port at all.

    The demo's workers and its hold_port() socket join with SO_REUSEPORT, which the
    kernel lets every socket of this user id share: on a port where another of the
    user's servers listens with it, the workers would join *that* group and the
    kernel would hand part of the demo's connections to the other server, whose
    clients time out. A socket without SO_REUSEPORT cannot share a port with a
    listener (nor with a socket bound without SO_REUSEADDR), so binding one is the
    test. It sets SO_REUSEADDR so that an earlier run's connections in TIME_WAIT on
    this port do not count: they are not listeners, and the kernel still refuses
    the bind next to one. (A server that starts listening between this check and
    the workers' start is not caught: the answers then say so. Nor is a socket only
    bound, with SO_REUSEADDR and SO_REUSEPORT: the kernel lets the probe bind next
    to it.)

    :raises DemoError: the port is taken, or the kernel refused the bind otherwise
        (``EACCES``: a port below ``net.ipv4.ip_unprivileged_port_start``, 1024 by
        default, without ``CAP_NET_BIND_SERVICE``); the message names the port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EACCES:
                raise DemoError(
                    f"port {port} on 127.0.0.1 may not be bound by this process "
                    f"({exc.strerror}): ports below net.ipv4.ip_unprivileged_port_start "
                    "(1024 by default) need root or CAP_NET_BIND_SERVICE; choose a "
                    "higher port, or omit --port to let the kernel pick one"
                ) from None
            if exc.errno != errno.EADDRINUSE:
                raise DemoError(f"port {port} on 127.0.0.1 cannot be bound: {exc}") from None
            raise DemoError(
                f"port {port} on 127.0.0.1 is already in use by another socket (the demo's "
                "workers must be the only listeners there, or they would share its "
                "connections): choose a free port, or omit --port to let the kernel pick one"
            ) from None


def _worker_main(port: int) -> int:
    """A demo worker: its own reuseport listener; answers each connection with its PID.

    It stops when its stdin reaches EOF (the parent closed it or died), so a
    crashed demo never leaves a worker behind. It ignores SIGINT: Ctrl-C sends it to
    the whole process group and the parent stops its workers itself (a worker dying
    of it first printed a KeyboardInterrupt traceback and reset the connection the
    parent's client was making).
    """
    # Ignored before unblocked: start_workers() starts a worker with SIGINT blocked,
    # so a Ctrl-C that came while it started is pending here, and setting SIG_IGN
    # discards a pending signal (POSIX), so it never reaches the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    listener = reuseport_listener(("127.0.0.1", port))
    with listener:
        sys.stdout.write(f"ready {os.getpid()}\n")
        sys.stdout.flush()
        stdin = sys.stdin.fileno()
        while True:
            readable, _, _ = select.select([listener, stdin], [], [])
            if stdin in readable and not os.read(stdin, 4096):
                return 0
            if listener in readable:
                # A client that is gone by now (a connect-scan's reset, a health
                # check that closes at once) ends only its own connection: before,
                # its ConnectionResetError killed the worker with a traceback.
                with contextlib.suppress(ConnectionError):
                    conn, _ = listener.accept()
                    with conn:
                        conn.sendall(f"{os.getpid()}\n".encode())


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread for the ``with`` body, for a child to inherit.

    A worker ignores SIGINT (Ctrl-C reaches the whole process group, and the parent
    stops its workers itself), but it can set SIG_IGN only once its interpreter has
    started and imported reuselb: a Ctrl-C before that was a KeyboardInterrupt
    traceback from the worker. The signal mask survives fork() and exec(), so a
    worker started in the body has SIGINT blocked from its first instruction, and
    _worker_main() ignores it before unblocking it. No Python code runs in the
    child between fork and exec, as ``preexec_fn`` would, which is unsafe where the
    parent has threads. A SIGINT for this process that comes meanwhile stays
    pending, and is delivered (KeyboardInterrupt here) when the mask is restored.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_workers(count: int, port: int) -> list[subprocess.Popen[str]]:
    """Start *count* worker processes listening on *port*; return once all are ready.

    :raises DemoError: a worker could not be started (e.g. ``EMFILE``, ``EAGAIN``:
        out of file descriptors or processes) or did not report ready in time (the
        workers already started are stopped).
    :raises KeyboardInterrupt: Ctrl-C, once the workers already started are stopped.
    """
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(count):
            try:
                with _sigint_blocked():  # a KeyboardInterrupt here comes after append()
                    procs.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "reuselb._demo", "worker", str(port)],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE,
                            text=True,
                        )
                    )
            except OSError as exc:
                raise DemoError(
                    f"demo worker {len(procs) + 1} of {count} could not be started: {exc}"
                ) from None
        deadline = time.monotonic() + _READY_TIMEOUT
        for proc in procs:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
            line = proc.stdout.readline() if ready else ""
            if not line.startswith("ready"):
                raise DemoError(f"demo worker {proc.pid} did not start (got {line!r})")
    except BaseException:
        stop_workers(procs)
        raise
    return procs


def stop_workers(procs: Sequence[subprocess.Popen[str]]) -> None:
    """Stop the workers (EOF on stdin, then kill after 5 s) and reap them."""
    for proc in procs:
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def reuseport_scenario(workers: int = 3, requests: int = 20, port: int = 0) -> dict[int, int]:
    """Kernel balancing: *workers* processes, one reuseport listener each, one port.

    :param port: the port, or 0 for one the kernel picks.
    :returns: connections served per worker PID.
    :raises DemoError: *port* is in use by another socket or may not be bound
        (checked before any worker starts), a worker did not start, a connection
        was reset or refused, or it got no answer, or one that is not a demo
        worker's PID, within 10 seconds.
    :raises AddressInUse: *port* was taken by a socket without SO_REUSEPORT.
    :raises KeyboardInterrupt: Ctrl-C, once the workers are stopped.
    """
    if port:
        # The kernel's own pick (port 0) is free; a port given by the user may be
        # another server's, whose group the workers would join.
        _refuse_a_taken_port(port)
    with hold_port(("127.0.0.1", port)) as holder:
        port = holder.getsockname()[1]
        print(f"reuseport: {workers} workers, each with its own listener on 127.0.0.1:{port}")
        procs = start_workers(workers, port)
        try:
            served: collections.Counter[int] = collections.Counter({p.pid: 0 for p in procs})
            for i in range(requests):
                where = f"connection {i + 1} to 127.0.0.1:{port}"
                try:
                    with connect_tcp(("127.0.0.1", port), timeout=_ANSWER_TIMEOUT) as conn:
                        conn.settimeout(_ANSWER_TIMEOUT)
                        local_port = conn.getsockname()[1]
                        # Closed here, not as a temporary: a finalizer's close()
                        # discards what it raises (CPython outside dev mode), and a
                        # Ctrl-C landing there was lost (the demo ran on, status 0).
                        with conn.makefile() as reader:
                            line = reader.readline()
                except TimeoutError:
                    # A worker answers at once: silence means the connection went to
                    # a socket that is not one (or a worker hung).
                    raise DemoError(
                        f"{where} got no answer within {_ANSWER_TIMEOUT:g} s: "
                        "is another server listening on the port?"
                    ) from None
                except ConnectionError as exc:
                    # Reset or refused, however soon: a listener closed with the
                    # connection in its queue (a worker exited), or another server
                    # on the port closed it, or nothing listens there any more.
                    raise DemoError(
                        f"{where} failed ({exc}): did a demo worker exit, or is another "
                        "server listening on the port?"
                    ) from None
                try:
                    pid = int(line)
                except ValueError:
                    pid = -1  # not a PID: refused below with what came
                if pid not in served:
                    raise DemoError(
                        f"{where} was answered with {line!r}, not the PID of a demo "
                        "worker: is another server listening on the port?"
                    )
                served[pid] += 1
                print(f"  connection {i + 1:3d} from port {local_port:5d} -> worker {pid}")
        finally:
            stop_workers(procs)
    print("distribution:")
    for pid, n in served.items():
        print(f"  worker {pid}: {n:4d} {'#' * n}")
    return dict(served)


async def _backend(name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer one line with *name*; a connection the proxy reset ends quietly.

    It runs as a task whose result nobody reads: an exception that left it was
    logged as "Task exception was never retrieved", with a traceback, when the
    task was collected. Ctrl-C makes that happen: it
    cancels the proxy's relays, whose upstream sockets then close with the
    request or the answer in flight (a reset, seen at readline() or drain()).
    """
    try:
        request = await reader.readline()
        writer.write(f"{name} answers {request.decode().strip()!r}\n".encode())
        await writer.drain()
    except ConnectionError:
        pass  # the proxy went away: nobody is left to answer
    finally:
        writer.close()
        # A reset is also the exception of the future wait_closed() awaits: left
        # unread, Python 3.13 logged it when that future was collected ("Future
        # exception was never retrieved", with a traceback).
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


class _Backends:
    """The proxy scenario's two embedded backends, and the connections they serve.

    Each listens on a socket of its own, accepted from in a reader callback, not
    with ``asyncio.start_server()``: asyncio's server skips an address whose
    ``socket()`` fails, taking EMFILE for an unsupported family, and returned a
    server without a socket (the demo then died of an IndexError traceback), and
    an ``accept()`` failing with EMFILE is logged by it with a traceback and retried
    every second for as long as the demo's client waits. Here either failure is the
    demo's :class:`DemoError`.
    """

    def __init__(self) -> None:
        self.listeners: list[socket.socket] = []
        #: each connection's handler task; its socket or streams are its own
        self.handlers: set[asyncio.Task[None]] = set()
        #: accepted sockets whose handler has not taken its first step yet
        self.unserved: set[socket.socket] = set()

    def start(self, failed: asyncio.Future[DemoError]) -> list[tuple[str, int]]:
        """Listen on two ports of 127.0.0.1; return their addresses.

        :param failed: given a :class:`DemoError` if a backend's ``accept()`` fails
            later (e.g. ``EMFILE``); that backend stops accepting.
        :raises DemoError: a listening socket could not be made (e.g. ``EMFILE``);
            the ones already made are closed by :meth:`close`.
        """
        loop = asyncio.get_running_loop()
        for i in (1, 2):
            name = f"backend-{i}"
            try:
                listener = socket.socket(
                    socket.AF_INET,
                    socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                )
            except OSError as exc:
                raise DemoError(f"the proxy's {name} could not listen: {exc}") from None
            self.listeners.append(listener)
            try:
                listener.bind(("127.0.0.1", 0))
                listener.listen()
            except OSError as exc:
                raise DemoError(f"the proxy's {name} could not listen: {exc}") from None
            loop.add_reader(listener.fileno(), self._accept, name, listener, failed)
        return [listener.getsockname() for listener in self.listeners]

    def _accept(
        self, name: str, listener: socket.socket, failed: asyncio.Future[DemoError]
    ) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # reset while it waited in the queue
            except OSError as exc:  # EMFILE, ENOBUFS: it would fail again at once
                asyncio.get_running_loop().remove_reader(listener.fileno())
                if not failed.done():
                    failed.set_result(
                        DemoError(f"the proxy's {name} could not accept a connection: {exc}")
                    )
                return
            # The handler's task is made here, so that close() can cancel it and wait
            # for it: one still running when asyncio.run() returns is cancelled by it
            # (for a task of asyncio's own server, Python 3.11 logged that as
            # "Exception in callback ... CancelledError" with a traceback, CPython
            # gh-113538).
            task = asyncio.ensure_future(self._serve(name, conn))
            self.handlers.add(task)
            # A task cancelled before its first step (close() right after this
            # accept, its wake-up queued ahead of the handler's first step) throws the
            # CancelledError into a coroutine that has not started, which ends it
            # without running a line of it: _serve()'s own close is not reached, and
            # this callback closes the socket instead.
            self.unserved.add(conn)
            task.add_done_callback(functools.partial(self._handler_done, conn))

    def _handler_done(self, conn: socket.socket, task: asyncio.Task[None]) -> None:
        self.handlers.discard(task)
        if conn in self.unserved:  # the handler never started: nobody closed it
            self.unserved.discard(conn)
            conn.close()

    async def close(self) -> None:
        """Stop accepting, end every connection and wait for the handlers to end.

        The listeners are closed before the first ``await``, so a cancellation of
        the caller (Ctrl-C) while it waits leaves none open; the handlers are
        cancelled by then, and each closes its connection as it ends.
        """
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            loop.remove_reader(listener.fileno())
            listener.close()
        # Cancelled, not waited for: a handler waits for its line as long as its
        # peer keeps the connection open.
        handlers = list(self.handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers)

    async def _serve(self, name: str, conn: socket.socket) -> None:
        """Serve one accepted connection as backend *name* (see :func:`_backend`)."""
        # From here on the socket is this handler's to close (or its transport's):
        # not _handler_done()'s, which would close it under a transport still
        # flushing or closing it.
        self.unserved.discard(conn)
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except BaseException as exc:
            conn.close()  # not yet a transport's, which would close it
            if isinstance(exc, OSError):
                return  # the peer is gone already: nobody to answer
            raise
        await _backend(name, reader, writer)


def _close(sock: socket.socket, _: object) -> None:
    """Close *sock* (a done callback's signature; closing a closed socket does nothing)."""
    sock.close()


async def _end(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel *tasks* and wait until each has ended (an exception other than the
    cancellation is left in its task, which asyncio logs if nobody retrieves it)."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)


async def _proxy(clients: int) -> list[tuple[int, str, int, int, bool]]:
    """Run the proxy scenario's backends, proxy and *clients* clients; return their rows.

    :raises DemoError: a socket of the backends, the proxy or a client could not be
        made, or an ``accept()`` failed (e.g. ``EMFILE``: out of file descriptors);
        everything already made is closed and every task ended first.
    """
    loop = asyncio.get_running_loop()
    backends = _Backends()
    relays: list[asyncio.Task[None]] = []  # proxy_one() for each accepted connection
    talk: asyncio.Task[list[tuple[int, str, int]]] | None = None
    listener: socket.socket | None = None
    # The first failure of the backends, the proxy's accept loop or a relay. Each
    # happens in a callback or a task nobody awaits: the demo's client would wait
    # for an answer in vain (or the task's exception was logged with a traceback).
    failed: asyncio.Future[DemoError] = loop.create_future()

    def fail(message: str) -> None:
        if not failed.done():
            failed.set_result(DemoError(message))

    try:
        policy = RoundRobin(backends.start(failed))
        try:
            listener = reuseport_listener("127.0.0.1:0", nonblocking=True)
        except OSError as exc:
            raise DemoError(f"the proxy could not listen on 127.0.0.1: {exc}") from None
        port = listener.getsockname()[1]
        print(f"proxy: 127.0.0.1:{port} -> {', '.join(str(n) for n in policy.nodes)} (round-robin)")
        stats: dict[int, RelayStats] = {}  # by the client's source port

        async def proxy_one(client: socket.socket, client_port: int) -> None:
            try:
                upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as exc:
                fail(f"the proxy could not open a connection to a backend: {exc}")
                return
            backend = "a backend"
            try:
                with policy.acquire() as lease:
                    addr = (lease.node.address.host, lease.node.address.port)
                    backend = f"{addr[0]}:{addr[1]}"
                    await loop.sock_connect(upstream, addr)
                    stats[client_port] = await async_pipe_splice(client, upstream)
            except OSError as exc:
                # e.g. EMFILE making the relay's epoll hub (one per event loop, made
                # by its first relay): left in this task, nobody would have read it,
                # and the client would have waited for an answer.
                fail(f"the proxy could not relay a connection to {backend}: {exc}")
            finally:
                upstream.close()  # the relay closed it, unless it never ran

        def on_accept(listener: socket.socket) -> None:
            # Accepted in a reader callback rather than by awaiting loop.sock_accept():
            # Ctrl-C cancelled the pending sock_accept() whose callback asyncio had
            # already queued, which then ran on the listener closed meanwhile and
            # logged "Exception in callback ... _sock_accept ... Bad file descriptor"
            # (InvalidStateError: it set the cancelled future), or took a connection
            # into the cancelled future, lost. remove_reader() also cancels an
            # on_accept() already queued, so nothing is accepted after it.
            while len(relays) < clients:
                try:
                    client, peer = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except ConnectionAbortedError:
                    continue  # reset while it waited in the queue
                except OSError as exc:  # EMFILE, ENOBUFS: it would fail again at once
                    loop.remove_reader(listener.fileno())
                    fail(f"the proxy could not accept a connection: {exc}")
                    return
                client.setblocking(False)
                relay = asyncio.ensure_future(proxy_one(client, peer[1]))
                # Closed by the relay, unless it never ran: e.g. cancelled (Ctrl-C)
                # before its first step, or the connect to the backend failed.
                relay.add_done_callback(functools.partial(_close, client))
                relays.append(relay)
            loop.remove_reader(listener.fileno())

        async def run_clients() -> list[tuple[int, str, int]]:
            rows = []
            for i in range(clients):
                # Bounded as the reuseport scenario's are: a connection from outside
                # the demo (a port scanner) takes one of the proxy's `clients`
                # accepts, and the last demo client then waited for ever.
                silent = DemoError(
                    f"demo client {i + 1} got no answer within {_ANSWER_TIMEOUT:g} s: "
                    "did something outside the demo connect to the proxy's port?"
                )
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", port), _ANSWER_TIMEOUT
                    )
                except asyncio.TimeoutError:
                    raise silent from None
                except OSError as exc:
                    raise DemoError(
                        f"demo client {i + 1} could not connect to the proxy: {exc}"
                    ) from None
                try:
                    source = writer.get_extra_info("sockname")[1]
                    writer.write(f"hello {i}\n".encode())
                    await writer.drain()
                    line = await asyncio.wait_for(reader.readline(), _ANSWER_TIMEOUT)
                    answer = line.decode().strip()
                except asyncio.TimeoutError:
                    raise silent from None
                except ConnectionError as exc:
                    # The proxy closed the connection (with the request unread: a
                    # reset) because it failed: `failed` names why, not this.
                    raise DemoError(f"demo client {i + 1} got no answer: {exc}") from None
                finally:
                    writer.close()  # also when cancelled (Ctrl-C)
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
                rows.append((i, answer, source))
            return rows

        loop.add_reader(listener.fileno(), on_accept, listener)
        talk = asyncio.ensure_future(run_clients())
        first: list[asyncio.Future[Any]] = [talk, failed]
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if not failed.done():
            rows = talk.result()  # a DemoError of a client's
            # Each answer came through its relay, which ends once the backend has
            # closed its side: wait for them, or for a relay's failure.
            gathered = asyncio.gather(*relays)
            then: list[asyncio.Future[Any]] = [gathered, failed]
            await asyncio.wait(then, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            if gathered.done():
                gathered.result()  # a relay's exception other than an OSError
            elif not failed.done():
                gathered.cancel()
                raise DemoError("the proxy's relays did not end within 30 s")
            else:
                gathered.cancel()
        if failed.done():
            if talk.done() and not talk.cancelled():
                # Its failure (a reset, an empty answer) was only a consequence.
                talk.exception()
            raise failed.result()
    finally:
        # In this order, so that nothing is left to fail or be cancelled later: no
        # accept any more, then the clients and relays end (closing the sockets of
        # each), then the backends, whose connections the relays no longer use (a
        # relay connecting to a backend closed under it failed with a reset that no
        # one retrieved: "Task exception was never retrieved").
        if listener is not None:
            loop.remove_reader(listener.fileno())
            listener.close()  # connections still queued on it are reset
        try:
            await _end([*([talk] if talk is not None else []), *relays])
            if talk is not None and talk.done() and not talk.cancelled():
                # Cancelled just as its connect or read failed (asyncio.wait_for
                # then raises the failure, not CancelledError): a consequence of
                # what is raised here (a failure, Ctrl-C), not to be logged as an
                # unretrieved exception. (Had it failed first, talk.result() above
                # raised its error.)
                talk.exception()
        finally:
            # Also when Ctrl-C cancels this task while _end() waits: the
            # CancelledError left this finally before, and both backends' listening
            # sockets stayed open (an "unclosed socket" ResourceWarning). _end() has
            # cancelled the relays by then; they end while the backends close.
            await backends.close()
    return [
        (i, answer, stats[src].a_to_b, stats[src].b_to_a, stats[src].spliced)
        for i, answer, src in rows
    ]


async def _cancelled_by_ctrl_c(main: Coroutine[Any, Any, _T]) -> _T:
    """Await *main*; Ctrl-C cancels it, then raises KeyboardInterrupt.

    This is what ``asyncio.run`` does itself since Python 3.11. On 3.10 the
    KeyboardInterrupt came out of whichever task ran when SIGINT arrived, which
    kept it as its exception: after the demo had stopped, the event loop logged
    "Task exception was never retrieved" with a traceback. Left alone where the
    SIGINT handler is not Python's default (the caller's own) or where no signal
    handler can be set (not the main thread).

    :raises KeyboardInterrupt: SIGINT came while *main* ran (and it is cancelled).
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        return await main
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await main
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)  # back to default_int_handler


def proxy_scenario(clients: int = 10) -> list[tuple[int, str, int, int, bool]]:
    """A round-robin L4 proxy built from reuselb parts, in front of two embedded backends.

    :returns: (client, answer, bytes client->backend, bytes backend->client, spliced).
    :raises DemoError: out of file descriptors (``EMFILE``) or another resource for
        the event loop, a socket of the backends, the proxy or a client, or a relay,
        or an ``accept()`` of the proxy or a backend failed; the message names which.
    :raises KeyboardInterrupt: Ctrl-C, once the relays have ended and the listener and
        the backends (with their connections) are closed.
    """
    try:
        # The fds asyncio.run()'s event loop makes first, made and closed here: an
        # epoll and its self-pipe's socket pair. A loop whose __init__ fails half-way
        # (EMFILE) is still collected, and its __del__ closes it: an AttributeError
        # ('_ssock') printed as "Exception ignored in ... BaseEventLoop.__del__" with
        # a traceback (CPython 3.10 to 3.13), and the coroutines handed to
        # asyncio.run() are never awaited (RuntimeWarnings). This process has no
        # other thread to take the fds back in between.
        with contextlib.ExitStack() as made:
            made.enter_context(selectors.DefaultSelector())
            for sock in socket.socketpair():
                made.enter_context(sock)
    except OSError as exc:
        raise DemoError(f"the proxy's event loop could not be made: {exc}") from None
    rows = asyncio.run(_cancelled_by_ctrl_c(_proxy(clients)))
    for i, answer, up, down, spliced in rows:
        print(
            f"  client {i + 1:2d}: {answer:<40} relayed {up}+{down} bytes, "
            f"{'spliced' if spliced else 'copied (short messages skip the pipe)'}"
        )
    per_backend = collections.Counter(answer.split()[0] for _, answer, *_ in rows)
    print("per backend: " + ", ".join(f"{k}: {v}" for k, v in sorted(per_backend.items())))
    return rows


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    sys.exit(_worker_main(int(sys.argv[2])))
