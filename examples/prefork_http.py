"""N worker processes serving HTTP on one port, the kernel balancing between them.

Each worker binds its *own* SO_REUSEPORT listener (not one socket shared by fork),
so each has its own accept queue and the kernel hashes every new connection to
one of them. Run it, then try ``curl -s http://127.0.0.1:8080/`` a few times:

    python examples/prefork_http.py --listen 127.0.0.1:8080 --workers 4

The master holds the port with a bound, never-listening reuseport socket (it gets
no connections), starts the workers, prints one ``ready`` line, replaces a worker
that dies, and on SIGTERM or SIGINT (Ctrl-C) stops every worker and exits 0. A worker
that cannot be started, at start-up or as a replacement (out of fds or processes, or it
exits before it is ready), is one line naming its slot ("worker 3 of 4"): the master
stops the other workers and exits 1.
Workers stop at EOF on their stdin, a pipe from the master, so they also stop
when the master is killed (kill -9, the OOM killer): none outlives it. A stopping
worker finishes an answer being sent (for up to 5 s); every other client of it is
closed unanswered: one that has not sent a whole request, or was accepted just as
the worker stopped, gets EOF, and one still queued in the worker's listener, not yet
accepted, is reset when that listener closes (a worker that dies resets its queue
too). The master's ``hold_port`` socket never listens, so it keeps no queue for
them; the other workers' listeners take only new connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

from reuselb import ReuselbError, hold_port, parse_address, reuseport_listener

#: Seconds a stopping worker gives answers already being sent (the master kills a
#: worker still running after 10 s).
STOP_GRACE = 5.0


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")  # the request head; the body is ignored
        body = f"hello from worker {os.getpid()}\n".encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        # The client closed before a whole head (a port probe, a TCP health check) or
        # reset, or sent a head over the reader's 64 KiB limit: nothing to answer.
        pass
    finally:
        writer.close()


async def worker(address: str) -> None:
    listener = reuseport_listener(address)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    writers: set[asyncio.StreamWriter] = set()  # the connections being served

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if stop.is_set():  # accepted just as the worker began to stop
            writer.close()
            return
        writers.add(writer)
        try:
            await handle(reader, writer)
        finally:
            writers.discard(writer)

    server = await asyncio.start_server(serve, sock=listener)  # asyncio owns it now
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # The master never writes to our stdin: it becomes readable only at EOF, when the
    # master closed it or died (the kernel closes a dead process's pipe ends).
    loop.add_reader(sys.stdin.fileno(), stop.set)
    print("ready", flush=True)
    await stop.wait()
    await stop_serving(server, writers)


async def stop_serving(server: asyncio.Server, writers: set[asyncio.StreamWriter]) -> None:
    """Stop accepting, close every connection and wait for their handlers to end.

    A connection is closed, not waited for: a client may stay connected without
    sending a whole request head (a slow client, a TCP health check that holds its
    connection). From Python 3.12.1 on ``Server.wait_closed()`` waits for every
    connection to close, so one such client held the worker until the master
    killed it 10 s later; and a handler still running when the worker returns is
    cancelled by ``asyncio.run()``, which Python 3.11 reports as "Exception in
    callback ... CancelledError" with a traceback (CPython gh-113538). Closed, a
    handler waiting for the head reads EOF and ends as for a client that left; an
    answer already being written is sent first (``close()`` flushes the buffer),
    for up to ``STOP_GRACE`` s, then the connection is aborted.
    """
    server.close()  # the listener closes: connections still queued on it are reset
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STOP_GRACE
    me = asyncio.current_task()
    # Every other task, not only the handlers seen so far: asyncio.run() would cancel
    # whatever is left, and that includes an accept asyncio had under way, whose
    # handler starts later (and sees ``stop`` set).
    while (left := deadline - loop.time()) > 0 and (rest := asyncio.all_tasks() - {me}):
        for writer in writers:
            writer.close()
        await asyncio.wait(rest, timeout=left, return_when=asyncio.FIRST_COMPLETED)
    if rest := asyncio.all_tasks() - {me}:  # a client that does not read its answer
        for writer in writers:
            writer.transport.abort()  # its drain() returns, the handler ends
        await asyncio.wait(rest, timeout=1)
    # From Python 3.12.1 on this waits for the connections' transports to close (no
    # longer any): bounded all the same, the master kills a worker that hangs.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 1)


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """Block SIGINT in the master for the ``with`` body, for a worker started there.

    A worker ignores SIGINT, but it can set SIG_IGN only once its interpreter runs
    its code: a Ctrl-C while it still started (importing) was a KeyboardInterrupt
    traceback and a worker that never said "ready". The signal mask is inherited
    through fork and exec, so a worker started here has SIGINT blocked from its
    first instruction and ignore_sigint() discards what came meanwhile. Unlike
    ``preexec_fn`` no Python code runs in the child before exec, which is unsafe
    in a process with threads. The master's own SIGINT waits, pending, until the
    mask is restored.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_sigint() -> None:
    """In a worker: ignore SIGINT, then unblock it (the master started us with it
    blocked). Ctrl-C sends SIGINT to the whole process group and the master stops
    the workers; SIG_IGN discards a SIGINT already pending (POSIX), so a Ctrl-C
    that came while this worker started is dropped too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def start_workers(
    cmd: list[str], count: int, *, respawn: int | None = None
) -> list[subprocess.Popen[str]]:
    """Start all *count* workers, or with *respawn* only the worker in that slot
    (0-based) in place of one that died, and return them once each has said "ready".

    A worker is named by its slot, "worker 3 of 4", at start-up and at a respawn
    alike (a respawn was started as a pool of one: "worker 1 of 1").

    :raises RuntimeError: a worker could not be started (e.g. ``EMFILE``, ``EAGAIN``:
        out of file descriptors or processes) or exited before it was ready; the
        message names its slot and says whether it was a respawn. The workers this
        call already started are stopped.
    """
    slots = range(count) if respawn is None else [respawn]
    failed = "could not be started" if respawn is None else "died and could not be restarted"
    procs: list[subprocess.Popen[str]] = []
    try:
        for slot in slots:
            try:
                with sigint_blocked():
                    procs.append(
                        subprocess.Popen(
                            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                        )
                    )
            except OSError as exc:
                raise RuntimeError(f"worker {slot + 1} of {count} {failed}: {exc}") from None
        for slot, proc in zip(slots, procs, strict=True):  # one proc per slot by now
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(
                    f"worker {slot + 1} of {count} {failed}: "
                    f"pid {proc.pid} exited before it was ready"
                )
    except BaseException:
        stop_workers(procs)
        raise
    return procs


def stop_workers(procs: list[subprocess.Popen[str]]) -> None:
    """Close each worker's stdin (it stops at EOF) and reap it; SIGKILL after 10 s."""
    for proc in procs:
        if proc.stdin is not None:
            proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()  # the pipe the "ready" line came through


def master(holder: socket.socket, workers: int) -> int:
    bound = parse_address(holder.getsockname()[:2])
    cmd = [sys.executable, __file__, "--worker", str(bound)]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    # Handlers first, so that a SIGTERM right after "ready" cannot kill the master
    # by the default action. A signal also writes to the wakeup fd, so one that
    # comes just before select() still wakes it (no lost wakeup).
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # Ctrl-C; the workers ignore it and get EOF
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a worker died
    procs: list[subprocess.Popen[str]] = []
    try:
        procs = start_workers(cmd, workers)
        print(f"ready http://{bound} workers={','.join(str(p.pid) for p in procs)}", flush=True)
        while not stopping:
            select.select([wake_r], [], [])
            os.read(wake_r, 4096)
            for i, proc in enumerate(procs):
                if not stopping and proc.poll() is not None:  # died (now reaped)
                    stop_workers([proc])
                    procs[i] = start_workers(cmd, workers, respawn=i)[0]
                    print(
                        f"replaced worker {i + 1} of {workers}: {proc.pid} -> {procs[i].pid}",
                        flush=True,
                    )
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        stop_workers(procs)
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", help="host:port (port 0: any)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workers < 1:  # 0 would print "ready" and serve nothing
        parser.error(f"--workers must be at least 1, not {args.workers}")
    if args.worker:
        ignore_sigint()  # Ctrl-C reaches the whole process group: the master stops us
        asyncio.run(worker(args.worker))
        return 0
    # a bad --listen (malformed, not local, in use) is a usage error, like --workers 0
    try:
        holder = hold_port(args.listen)  # holds the port; never listens
    except ReuselbError as exc:  # its message names the address
        parser.error(f"argument --listen: {exc}")
    except OSError as exc:  # e.g. EACCES: a port below 1024 without CAP_NET_BIND_SERVICE
        parser.error(f"argument --listen: cannot bind {args.listen}: {exc.strerror or exc}")
    with holder:
        return master(holder, args.workers)


if __name__ == "__main__":
    sys.exit(main())
