"""A small TCP (layer 4) load balancer built from reuselb's parts.

    python examples/l4proxy.py --listen 127.0.0.1:6000 \\
        --backend 127.0.0.1:6379 --backend 127.0.0.1:6380,2 --policy round-robin --workers 2

* the master makes one reuseport listener per worker and keeps them all open;
  each worker receives its own over a Unix socket (``send_sockets``);
* each worker runs asyncio: accept, ``policy.acquire()`` a backend (leases, so
  ``least-conn`` works), connect, ``async_pipe_splice`` both ways, release;
* a backend that refuses is marked down and retried after ``--retry-after`` s;
* SIGTERM: workers stop accepting, finish their relays, exit; the master exits.
* SIGHUP: zero-drop restart. A new worker gets the *same* listener, then the old
  one drains and exits. The listener never closes (the master holds it), so no
  queued connection is reset. A new worker that does not start stops the restart
  and the old ones keep serving.
* a worker that dies is replaced on the same listener (connections queued there
  wait for it); if none starts, that listener leaves the group.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import select
import signal
import socket
import struct
import subprocess
import sys

from reuselb import (
    BalancePolicy,
    Lease,
    Node,
    NoNodeAvailable,
    ReuselbError,
    ReuseportGroup,
    async_pipe_splice,
    make_policy,
    parse_address,
    recv_sockets,
    reuseport_group,
    send_sockets,
    tcp_socket,
)
from reuselb.balance import POLICIES


def backend(text: str) -> Node:
    addr, _, weight = text.partition(",")
    return Node(parse_address(addr), weight=int(weight or 1))


def seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:  # also refuses nan, which fails every comparison
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


async def serve(listener: socket.socket, policy: BalancePolicy, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    relays: set[asyncio.Task[None]] = set()

    async def dial(key: str) -> tuple[socket.socket, Lease]:
        for _ in range(len(policy)):  # each refusing backend is tried at most once
            lease = policy.acquire(key)
            sock = tcp_socket(lease.node.address.family or socket.AF_INET, nonblocking=True)
            try:
                addr = (lease.node.address.host, lease.node.address.port)
                await asyncio.wait_for(loop.sock_connect(sock, addr), args.connect_timeout)
            except (OSError, asyncio.TimeoutError):
                sock.close()
                lease.release()
                with contextlib.suppress(LookupError):
                    policy.mark_down(lease.node)
                    loop.call_later(args.retry_after, policy.mark_up, lease.node)
                continue
            return sock, lease
        raise NoNodeAvailable(policy.name, "every backend refused")

    async def relay(client: socket.socket, peer: tuple[str, int]) -> None:
        try:
            backend_sock, lease = await dial(peer[0])
        except NoNodeAvailable:
            # Reset, not FIN: an orderly EOF could pass for an empty, complete answer.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        try:
            await async_pipe_splice(client, backend_sock)
        finally:
            lease.release()

    def on_accept() -> None:
        # Accept in our own reader callback rather than with a cancellable
        # loop.sock_accept(): cancelling one whose callback is already queued lets
        # that callback accept into the cancelled future (CPython 3.11), and the
        # connection is never served. Here every accept gets its relay at once.
        for _ in range(64):  # a bounded batch per wakeup
            try:
                client, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            client.setblocking(False)
            task = asyncio.ensure_future(relay(client, peer))
            relays.add(task)
            task.add_done_callback(relays.discard)

    listener.setblocking(False)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(listener.fileno(), on_accept)
    print("ready", flush=True)
    await stop.wait()
    # remove_reader() also cancels a callback already queued: no accept after this,
    # so what waits in the queue is the next worker's.
    loop.remove_reader(listener.fileno())
    listener.close()  # our fd only: the master still holds the socket and its queue
    if relays:
        await asyncio.wait(relays, timeout=args.drain_timeout)


def spawn(member: socket.socket, argv: list[str]) -> subprocess.Popen[str]:
    parent, child = socket.socketpair()
    with parent, child:
        cmd = [sys.executable, __file__, *argv, "--channel-fd", str(child.fileno())]
        proc = subprocess.Popen(cmd, pass_fds=[child.fileno()], stdout=subprocess.PIPE, text=True)
        send_sockets(parent, [member], names=["listener"])
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        reap(proc)
        raise RuntimeError(f"worker {proc.pid} failed to start")
    return proc


def reap(proc: subprocess.Popen[str], timeout: float | None = None) -> None:
    """Wait for a worker and close the pipe its "ready" line came through."""
    proc.wait(timeout=timeout)
    if proc.stdout is not None:
        proc.stdout.close()


def master(group: ReuseportGroup, args: argparse.Namespace, argv: list[str]) -> int:
    # Handlers first: a SIGHUP sent as soon as "ready" is read must not meet the
    # default action (terminate) and take the master and its listeners down. The
    # wakeup fd makes waiting race-free: a signal arriving just before select()
    # still leaves a byte that wakes it.
    events: list[int] = []
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, lambda signum, frame: events.append(signum))
    members = list(group.members)
    procs: dict[int, subprocess.Popen[str]] = {}
    try:
        for i, member in enumerate(members):
            procs[i] = spawn(member, argv)
        print(
            f"ready {group.address} workers={','.join(str(p.pid) for p in procs.values())}",
            flush=True,
        )
        while True:
            while not events:
                select.select([wake_r], [], [])
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
            got = events.pop(0)
            if got == signal.SIGCHLD:
                replace_dead(procs, members, group, argv)
            elif got == signal.SIGHUP:
                restart(procs, members, argv)
            else:
                break
    finally:
        signal.set_wakeup_fd(-1)
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            reap(proc, timeout=args.drain_timeout + 5)
        os.close(wake_r)
        os.close(wake_w)
    return 0


def restart(
    procs: dict[int, subprocess.Popen[str]], members: list[socket.socket], argv: list[str]
) -> None:
    """Zero-drop restart, one worker at a time: the new one first, then drain the old.

    A new worker that does not start (a bad deploy) stops the restart: the old
    workers keep serving, and the error is reported.
    """
    for i in list(procs):
        try:
            new = spawn(members[i], argv)
        except (OSError, RuntimeError) as exc:
            print(f"restart stopped, old workers kept: {exc}", flush=True)
            return
        old, procs[i] = procs[i], new
        old.terminate()
        reap(old)
    print(f"restarted workers={','.join(str(p.pid) for p in procs.values())}", flush=True)


def replace_dead(
    procs: dict[int, subprocess.Popen[str]],
    members: list[socket.socket],
    group: ReuseportGroup,
    argv: list[str],
) -> None:
    """Replace a worker that died. Its member stays open in the master, so the
    kernel keeps queueing connections there: they wait for the new worker. If
    none starts, the member leaves the group (its queued connections are reset,
    new ones go to the other members) rather than hang."""
    for i, proc in list(procs.items()):
        if proc.poll() is None:
            continue  # alive (or a worker restart() already reaped and replaced)
        reap(proc)
        try:
            procs[i] = spawn(members[i], argv)
        except (OSError, RuntimeError) as exc:
            del procs[i]
            group.take(group.members.index(members[i])).close()
            print(f"worker {proc.pid} died and was not replaced: {exc}", flush=True)
            continue
        print(f"replaced worker {proc.pid} -> {procs[i].pid}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", required=True, help="host:port to accept on")
    parser.add_argument(
        "--backend",
        type=backend,
        action="append",
        required=True,
        help="host:port[,weight]; repeat for each backend",
    )
    parser.add_argument("--policy", default="round-robin", choices=sorted(POLICIES))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--connect-timeout", type=seconds, default=3.0)
    parser.add_argument("--retry-after", type=seconds, default=5.0)
    parser.add_argument("--drain-timeout", type=seconds, default=30.0)
    parser.add_argument("--channel-fd", type=int, help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    if args.workers < 1:  # 0 would print "ready" and serve nothing
        parser.error(f"--workers must be at least 1, not {args.workers}")
    # Built here, in the master too, so that a bad backend list (the same backend
    # twice) is refused now rather than by every worker as it starts.
    try:
        policy = make_policy(args.policy, args.backend)
    except ReuselbError as exc:
        parser.error(f"argument --backend: {exc}")
    if args.channel_fd is None:
        # a bad --listen (malformed, not local, in use) is a usage error, like --workers 0
        try:
            group = reuseport_group(args.listen, args.workers)
        except (ReuselbError, OSError) as exc:
            parser.error(f"argument --listen: {exc}")
        with group:
            return master(group, args, argv)
    # A SIGHUP to the whole process group (a terminal hangup, kill -HUP -PGID) is
    # the master's cue to restart: the worker must not die of it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with socket.socket(fileno=args.channel_fd) as channel:
        listener = recv_sockets(channel)["listener"]
    asyncio.run(serve(listener, policy, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
