"""A supervised UDP group: the master keeps every member, workers are replaceable.

    python examples/udp_workers.py --listen 127.0.0.1:5353 --workers 4

With SO_REUSEPORT the kernel hashes each flow (source address and port) to one
member. If a worker's member closed when the worker died, the group would be
re-ordered and flows would jump to other workers. Here the master creates all
members and never closes them; worker i receives member i over a Unix socket
(``send_sockets``). When a worker dies, datagrams wait in its member's queue, the
master starts a replacement with the *same* member, and no flow moves.

Each worker answers ``<index> <pid> <datagram>``. SIGTERM or SIGINT (Ctrl-C) stops
everything. A worker that cannot be started, at start-up or as a replacement (out of
fds or processes, its member not handed over, or it exits before it is ready), is one
line naming its index: the master stops the other workers and exits 1. Workers stop at
EOF on their stdin, a pipe from the master, so they also stop when the master is killed
(kill -9, the OOM killer): none outlives it.
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
from collections.abc import Iterator

from reuselb import (
    AddressError,
    AddressInUse,
    GroupMemberError,
    HostNotFound,
    InvalidArgument,
    ReuselbError,
    ReuseportGroup,
    recv_sockets,
    reuseport_group,
    send_sockets,
)


def worker(channel_fd: int, index: int) -> int:
    try:
        with socket.socket(fileno=channel_fd) as channel:
            member = recv_sockets(channel)["member"]
    except (ReuselbError, OSError) as exc:
        # Out of fds as the member arrives (the kernel drops an fd it cannot install:
        # a HandoffError), or the master's end closed before it sent. One line, not a
        # traceback; the master sees no "ready" and reports this worker.
        print(f"worker {index}: no member: {exc}", file=sys.stderr, flush=True)
        return 1
    print("ready", flush=True)
    stdin = sys.stdin.fileno()
    with member:
        while True:
            readable, _, _ = select.select([member, stdin], [], [])
            # The master never writes to our stdin: it is readable only at EOF, when
            # the master closed it or died (the kernel closes a dead process's pipes).
            if stdin in readable:
                return 0
            data, peer = member.recvfrom(65535)
            # An answer that cannot be sent is lost, as a datagram may be, and the
            # worker goes on: e.g. EMSGSIZE, the prefix making the answer to a
            # datagram near the UDP maximum (65,507 bytes over IPv4) too long.
            with contextlib.suppress(OSError):
                member.sendto(f"{index} {os.getpid()} ".encode() + data, peer)


#: What a terminal sends the whole process group that the master alone acts on: Ctrl-C.
WORKERS_IGNORE = frozenset({signal.SIGINT})


@contextlib.contextmanager
def signals_blocked(signals: frozenset[int]) -> Iterator[None]:
    """Block *signals* in the master for the ``with`` body, for a worker started there.

    A worker ignores SIGINT, but it can set SIG_IGN only once its interpreter runs its
    code: a Ctrl-C while it still started (importing) was a KeyboardInterrupt traceback
    and a worker that never said "ready". The signal mask is inherited through fork and
    exec, so a worker started here has them blocked from its first instruction, and
    ignore_signals() discards what came meanwhile. Unlike ``preexec_fn`` no Python code
    runs in the child before exec, which is unsafe in a process with threads. The
    master's own signals wait, pending, until the mask is restored.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_signals(signals: frozenset[int]) -> None:
    """In a worker: ignore *signals*, then unblock them (the master started us with
    them blocked). SIG_IGN discards a signal already pending (POSIX), so one that
    came while this worker started is dropped too."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def spawn(member: socket.socket, index: int, *, respawn: bool = False) -> subprocess.Popen[str]:
    """Start worker *index* on *member*; return it once it has said "ready".

    :param respawn: it replaces worker *index*, which died (the message says so).
    :raises RuntimeError: it could not be started (e.g. ``EMFILE``, ``EAGAIN``: out of
        file descriptors or processes), its member could not be sent to it, or it
        exited before it was ready (e.g. it could not receive its member). The
        worker is gone and reaped by then.
    """
    failed = f"worker {index} " + (
        "died and could not be restarted" if respawn else "could not be started"
    )
    try:
        parent, child = socket.socketpair()
    except OSError as exc:
        raise RuntimeError(f"{failed}: {exc}") from None
    with parent, child:
        cmd = [sys.executable, __file__, "--worker", str(index)]
        cmd += ["--channel-fd", str(child.fileno())]
        try:
            with signals_blocked(WORKERS_IGNORE):
                proc = subprocess.Popen(
                    cmd,
                    pass_fds=[child.fileno()],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
        except OSError as exc:
            raise RuntimeError(f"{failed}: {exc}") from None
        try:
            send_sockets(parent, [member], names=["member"])
        except (ReuselbError, OSError) as exc:
            # e.g. ENOBUFS, ENOMEM (was a traceback, the worker left running). The
            # worker waits for its member: it goes now (SIGKILL: its own report
            # would only repeat this one) and is reaped.
            proc.kill()
            stop_workers([proc])
            raise RuntimeError(f"{failed}: its member was not sent: {exc}") from None
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        stop_workers([proc])
        raise RuntimeError(f"{failed}: pid {proc.pid} exited before it was ready")
    return proc


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


def master(group: ReuseportGroup) -> int:
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    # Handlers first, so that a SIGTERM right after "ready" cannot kill the master
    # by the default action. A signal also writes to the wakeup fd, so one that
    # comes just before select() still wakes it (no lost wakeup).
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # Ctrl-C; the workers ignore it and get EOF
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a worker died
    procs: list[subprocess.Popen[str]] = []
    try:
        for i, member in enumerate(group):
            procs.append(spawn(member, i))
        print(f"ready {group.address} workers={','.join(str(p.pid) for p in procs)}", flush=True)
        while not stop:
            select.select([wake_r], [], [])
            os.read(wake_r, 4096)
            for i, proc in enumerate(procs):
                if not stop and proc.poll() is not None:  # died: same member, new worker
                    stop_workers([proc])
                    procs[i] = spawn(group[i], i, respawn=True)
                    print(f"replaced worker {i}: {proc.pid} -> {procs[i].pid}", flush=True)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        stop_workers(procs)
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
    return 0


def bad_listen_value(exc: BaseException) -> bool:
    """Whether reuseport_group() failed because of the --listen value (malformed, not
    an address of this host, in use, a port below 1024 without the privilege): a usage
    error. Anything else (EMFILE for member 36 of 50) is this host's, and is no reason
    to blame the argument."""
    cause = exc.__cause__ if isinstance(exc, GroupMemberError) else exc
    usage = (AddressError, AddressInUse, HostNotFound, InvalidArgument, PermissionError)
    return isinstance(cause, usage)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:5353", help="host:port (port 0: any)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--channel-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workers < 1:  # 0 would print "ready" and serve nothing
        parser.error(f"--workers must be at least 1, not {args.workers}")
    if args.worker is not None:
        # Ctrl-C sends SIGINT to the whole process group: the master stops the workers.
        ignore_signals(WORKERS_IGNORE)
        return worker(args.channel_fd, args.worker)
    # a bad --listen (malformed, not local, in use) is a usage error, like --workers 0
    try:
        group = reuseport_group(args.listen, args.workers, kind="udp")
    except (ReuselbError, OSError) as exc:
        if bad_listen_value(exc):
            parser.error(f"argument --listen: {exc}")
        print(f"udp_workers: cannot listen: {exc}", file=sys.stderr)
        return 1
    with group:  # kept open for the master's life
        return master(group)


if __name__ == "__main__":
    sys.exit(main())
