"""``python -m reuselb demo``: the library's scenarios, runnable on a fresh install.

Not library API. Each scenario is one function that starts its own processes,
waits for them to be ready over pipes (never by sleeping), prints what happened
and stops everything it started, whatever goes wrong.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from ._relay import RelayStats, async_pipe_splice
from ._sockets import connect_tcp, hold_port, reuseport_listener
from .balance import RoundRobin

__all__ = ["DemoError", "proxy_scenario", "reuseport_scenario", "start_workers", "stop_workers"]

_READY_TIMEOUT = 20.0
#: Seconds a demo client waits to connect and for a worker's answer.
_ANSWER_TIMEOUT = 10.0


class DemoError(RuntimeError):
    """A scenario could not run; the message says why (``python -m reuselb`` prints it)."""


def _refuse_a_taken_port(port: int) -> None:
    """Raise :class:`DemoError` if a socket listens on (or holds) ``127.0.0.1:port``.

    The demo's workers and its hold_port() socket join with SO_REUSEPORT, which the
    kernel lets every socket of this user id share: on a port where another of the
    user's servers listens with it, the workers would join *that* group and the
    kernel would hand part of the demo's connections to the other server, whose
    clients time out. A socket without SO_REUSEPORT cannot share a port with a
    listener (nor with a socket bound without SO_REUSEADDR), so binding one is the
    test. It sets SO_REUSEADDR so that an earlier run's connections in TIME_WAIT on
    this port do not count: they are not listeners, and the kernel still refuses
    the bind next to one. (A server that starts listening between this check and
    the workers' start is not caught: the answers then say so.)
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise DemoError(
                f"port {port} on 127.0.0.1 is already in use by another socket (the demo's "
                "workers must be the only listeners there, or they would share its "
                "connections): choose a free port, or omit --port to let the kernel pick one"
            ) from None


def _worker_main(port: int) -> int:
    """A demo worker: its own reuseport listener; answers each connection with its PID.

    It stops when its stdin reaches EOF (the parent closed it or died), so a
    crashed demo never leaves a worker behind.
    """
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
                conn, _ = listener.accept()
                with conn:
                    conn.sendall(f"{os.getpid()}\n".encode())


def start_workers(count: int, port: int) -> list[subprocess.Popen[str]]:
    """Start *count* worker processes listening on *port*; return once all are ready.

    :raises DemoError: a worker did not report ready in time (all are stopped).
    """
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(count):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "reuselb._demo", "worker", str(port)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
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
    :raises DemoError: *port* is in use by another socket (checked before any worker
        starts), a worker did not start, or a connection got no answer, or one
        that is not a demo worker's PID, within 10 seconds.
    :raises AddressInUse: *port* was taken by a socket without SO_REUSEPORT.
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
                        line = conn.makefile().readline()
                except (TimeoutError, ConnectionError) as exc:
                    # A worker answers at once: silence means the connection went to
                    # a socket that is not one (or a worker hung).
                    raise DemoError(
                        f"{where} got no answer within {_ANSWER_TIMEOUT:g} s ({exc}): "
                        "is another server listening on the port?"
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


async def _proxy(clients: int) -> list[tuple[int, str, int, int, bool]]:
    loop = asyncio.get_running_loop()

    async def backend(
        name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request = await reader.readline()
        writer.write(f"{name} answers {request.decode().strip()!r}\n".encode())
        await writer.drain()
        writer.close()

    servers = [
        await asyncio.start_server(functools.partial(backend, f"backend-{i}"), "127.0.0.1", 0)
        for i in (1, 2)
    ]
    policy = RoundRobin([s.sockets[0].getsockname() for s in servers])
    listener = reuseport_listener("127.0.0.1:0", nonblocking=True)
    port = listener.getsockname()[1]
    print(f"proxy: 127.0.0.1:{port} -> {', '.join(str(n) for n in policy.nodes)} (round-robin)")
    stats: dict[int, RelayStats] = {}  # by the client's source port

    async def proxy_one(client: socket.socket, client_port: int) -> None:
        with policy.acquire() as lease:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            await loop.sock_connect(upstream, (lease.node.address.host, lease.node.address.port))
            stats[client_port] = await async_pipe_splice(client, upstream)

    async def accept_loop() -> None:
        tasks = []
        for _ in range(clients):
            client, peer = await loop.sock_accept(listener)
            tasks.append(asyncio.ensure_future(proxy_one(client, peer[1])))
        await asyncio.gather(*tasks)

    acceptor = asyncio.ensure_future(accept_loop())
    rows = []
    try:
        for i in range(clients):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            source = writer.get_extra_info("sockname")[1]
            writer.write(f"hello {i}\n".encode())
            await writer.drain()
            answer = (await reader.readline()).decode().strip()
            writer.close()
            await writer.wait_closed()
            rows.append((i, answer, source))
        await asyncio.wait_for(acceptor, 30)
    finally:
        acceptor.cancel()
        listener.close()
        for s in servers:
            s.close()
            await s.wait_closed()
    return [
        (i, answer, stats[src].a_to_b, stats[src].b_to_a, stats[src].spliced)
        for i, answer, src in rows
    ]


def proxy_scenario(clients: int = 10) -> list[tuple[int, str, int, int, bool]]:
    """A round-robin L4 proxy built from reuselb parts, in front of two embedded backends.

    :returns: (client, answer, bytes client->backend, bytes backend->client, spliced).
    """
    rows = asyncio.run(_proxy(clients))
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
