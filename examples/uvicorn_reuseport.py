"""A real ASGI server (uvicorn) in N processes, each on its own reuselb listener.

``uvicorn --workers N`` binds one socket in the parent and passes it to each
worker it spawns: one socket, one accept queue, and whichever worker wakes first
takes the connection. Here every
worker binds its own SO_REUSEPORT listener, so the kernel spreads connections
across N queues:

    pip install uvicorn
    python examples/uvicorn_reuseport.py --listen 127.0.0.1:8000 --workers 4

Replace ``app`` with your application (any ASGI callable). The master replaces a
worker that dies, and on SIGTERM or SIGINT (Ctrl-C) stops every worker and exits 0. A
worker that cannot be started, at start-up or as a replacement (out of fds or
processes, or it exits before it is ready), is one line naming its slot ("worker 3 of
4"): the master stops the other workers and exits 1.
Workers stop at EOF on their stdin, a pipe from the master, so they also stop when
the master is killed (kill -9, the OOM killer): none outlives it. A worker that stops
or dies closes its listener: connections still queued there, not yet accepted, are
reset (the master's ``hold_port`` socket never listens, so it keeps no queue for them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn

from reuselb import ReuselbError, hold_port, parse_address, reuseport_listener


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = f"served by pid {os.getpid()}\n".encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Ctrl-C sends SIGINT to the whole process group and the master stops the
        # workers; uvicorn would also shut down and then re-raise SIGINT (a
        # KeyboardInterrupt traceback per worker), so a worker ignores it.
        if sig != signal.SIGINT:
            super().handle_exit(sig, frame)


def worker(address: str) -> None:
    ignore_sigint()  # until uvicorn installs handle_exit
    listener = reuseport_listener(address)
    server = Server(uvicorn.Config(app, log_level="warning", lifespan="off"))

    def stop_at_eof() -> None:
        # The master never writes to our stdin: read() returns at EOF, when the
        # master closed it or died (the kernel closes a dead process's pipe ends).
        sys.stdin.read()
        server.should_exit = True  # uvicorn checks it every 0.1 s, then shuts down

    threading.Thread(target=stop_at_eof, daemon=True).start()
    print("ready", flush=True)
    server.run(sockets=[listener])  # uvicorn serves on our socket; SIGTERM stops it too


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
    parser.add_argument("--listen", default="127.0.0.1:8000", help="host:port (port 0: any)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workers < 1:  # 0 would print "ready" and serve nothing
        parser.error(f"--workers must be at least 1, not {args.workers}")
    if args.worker:
        worker(args.worker)
        return 0
    # a bad --listen (malformed, not local, in use) is a usage error, like --workers 0
    try:
        holder = hold_port(args.listen)  # holds the port for the group; never listens
    except ReuselbError as exc:  # its message names the address
        parser.error(f"argument --listen: {exc}")
    except OSError as exc:  # e.g. EACCES: a port below 1024 without CAP_NET_BIND_SERVICE
        parser.error(f"argument --listen: cannot bind {args.listen}: {exc.strerror or exc}")
    with holder:
        return master(holder, args.workers)


if __name__ == "__main__":
    sys.exit(main())
