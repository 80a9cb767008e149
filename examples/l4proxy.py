"""A small TCP (layer 4) load balancer built from reuselb's parts.

    python examples/l4proxy.py --listen 127.0.0.1:6000 \\
        --backend 127.0.0.1:6379 --backend 127.0.0.1:6380,2 --policy round-robin --workers 2

* the master makes one reuseport listener per worker and keeps them all open;
  each worker receives its own over a Unix socket (``send_sockets``);
* each worker runs asyncio: accept, ``policy.acquire()`` a backend (leases, so
  ``least-conn`` works), connect, ``async_pipe_splice`` both ways, release;
* a backend that refuses is marked down and retried after ``--retry-after`` s;
* SIGTERM or SIGINT (Ctrl-C): workers stop accepting, finish their relays (at
  most ``--drain-timeout`` s), exit; the master closes its listeners at once, so
  new connections are refused rather than queued for nobody, and exits. Workers
  ignore SIGINT and SIGHUP: a terminal sends them to the whole process group, and
  it is the master's to decide (a worker dying of Ctrl-C would cut its relays).
* SIGHUP: zero-drop restart. A new worker gets the *same* listener, then the old
  one drains and exits. The listener never closes (the master holds it), so no
  queued connection is reset. A new worker that does not start stops the restart
  and the old ones keep serving. A SIGTERM or SIGINT stops the restart at once.
* a worker that dies is replaced on the same listener at once, also while a
  restart waits for another worker's drain (connections queued there wait for
  it); if none starts, that listener leaves the group.
* a worker that cannot be started (out of fds or processes, its listener not handed
  over by ``send_sockets``/``recv_sockets``, or it exits before it is ready) is one
  line, not a traceback, and is reaped; at start-up the master then stops the workers
  already started and exits 1.
* a master that dies (kill -9, the OOM killer) takes its workers with it: they
  stop accepting and drain, as on SIGTERM, instead of serving on unsupervised.
* out of file descriptors (EMFILE): accepting pauses briefly (the connections
  wait in the kernel's queue), a client whose backend connection fails is reset.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import math
import os
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator

from reuselb import (
    AddressError,
    AddressInUse,
    BalancePolicy,
    GroupMemberError,
    HostNotFound,
    InvalidArgument,
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

#: How long accepting pauses after accept() failed for want of a resource (EMFILE).
ACCEPT_PAUSE = 0.1


def backend(text: str) -> Node:
    addr, _, weight = text.partition(",")
    # argparse turns a ValueError into a bare "invalid backend value": say why.
    try:
        number = int(weight or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid weight {weight!r} in {text!r}: must be a whole number"
        ) from None
    try:
        address = parse_address(addr)
        node = Node(address, weight=number)
    except ReuselbError as exc:  # the address, or a weight out of range
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    # Fine for listening, not for connecting: accepted, they printed "ready" and
    # then reset every client ("every backend refused", for a name that was never
    # looked up).
    if address.is_wildcard:
        typed = addr.rpartition(":")[0]  # as typed: "*", "[::]", "0.0.0.0" or none
        raise argparse.ArgumentTypeError(
            f"{text!r}: a backend needs a host to connect to"
            + (f", not the wildcard {typed!r}" if typed else "")
        )
    if address.port == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a backend needs a port to connect to, not 0")
    return node


def seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:  # also refuses nan, which fails every comparison
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def reset(sock: socket.socket) -> None:
    """Close *sock* with a reset, not a FIN: an orderly EOF could pass for an empty,
    complete answer. A socket already closed is left alone."""
    if sock.fileno() == -1:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def serve(listener: socket.socket, policy: BalancePolicy, args: argparse.Namespace) -> None:
    """A worker: relay every connection *listener* accepts until SIGTERM, or until
    the master's end of ``args.master_fd`` (None: not watched) closes; then drain."""
    loop = asyncio.get_running_loop()
    relays: set[asyncio.Task[None]] = set()
    last_report: dict[str, float] = {}
    held_back: dict[str, int] = {}

    def report(kind: str, message: str) -> None:
        # At most a line a second of each kind: out of fds, every accept and every
        # dial fails, and a line (or a traceback) each would flood the log.
        if loop.time() - last_report.get(kind, -math.inf) < 1:
            held_back[kind] = held_back.get(kind, 0) + 1
            return
        more = held_back.pop(kind, 0)
        more_text = f" ({more} more since the last such line)" if more else ""
        print(f"l4proxy worker {os.getpid()}: {message}{more_text}", file=sys.stderr, flush=True)
        last_report[kind] = loop.time()

    async def dial(key: str) -> tuple[socket.socket, Lease]:
        """A connected backend socket and its lease.

        :raises NoNodeAvailable: every backend refused or timed out (each is marked down).
        :raises OSError: no socket could be made (``EMFILE``, ``ENFILE``, ``ENOBUFS``):
            a failure of this host, so no backend is marked down.
        """
        for _ in range(len(policy)):  # each refusing backend is tried at most once
            lease = policy.acquire(key)
            try:
                sock = tcp_socket(lease.node.address.family or socket.AF_INET, nonblocking=True)
            except BaseException:
                lease.release()  # or least-conn counts this connection for ever
                raise
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
            except BaseException:  # cancelled: the drain timed out
                sock.close()
                lease.release()
                raise
            return sock, lease
        raise NoNodeAvailable(policy.name, "every backend refused")

    async def relay(client: socket.socket, peer: tuple[str, int]) -> None:
        # A client this does not hand to a relay is reset by finished().
        try:
            backend_sock, lease = await dial(peer[0])
        except NoNodeAvailable as exc:  # all refused, marked down, or none to pick
            report("dial", f"no backend for {peer[0]}: {exc}")
            return
        except OSError as exc:
            report("dial", f"no backend connection for {peer[0]}: {exc}")
            return
        try:
            await async_pipe_splice(client, backend_sock)
        except (ReuselbError, OSError, RuntimeError) as exc:
            # A relay that fails to start gives both sockets back open (docs/relay.md,
            # Ownership), e.g. no fd for the loop's epoll instance (EMFILE).
            report("start", f"relay for {peer[0]} not started: {exc}")
            reset(backend_sock)
        finally:
            lease.release()

    def finished(task: asyncio.Task[None], *, client: socket.socket) -> None:
        relays.discard(task)
        # Still open: no relay took it (no backend, a failed start, cancelled before
        # it ran). The client gets a reset, now, not a FIN whenever it is collected.
        reset(client)

    pause: asyncio.TimerHandle | None = None

    def resume() -> None:
        nonlocal pause
        pause = None
        loop.add_reader(listener.fileno(), on_accept)

    def on_accept() -> None:
        # Accept in our own reader callback rather than with a cancellable
        # loop.sock_accept(): cancelling one whose callback is already queued lets
        # that callback accept into the cancelled future (CPython 3.11), and the
        # connection is never served. Here every accept gets its relay at once.
        nonlocal pause
        for _ in range(64):  # a bounded batch per wakeup
            try:
                client, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: accept(2) fails before it takes
                # the connection off the queue, so the listener stays readable and
                # retrying at once would spin. Pause; the connections wait queued.
                report("accept", f"accept failed, pausing accepts for {ACCEPT_PAUSE} s: {exc}")
                loop.remove_reader(listener.fileno())
                pause = loop.call_later(ACCEPT_PAUSE, resume)
                return
            client.setblocking(False)
            task = asyncio.ensure_future(relay(client, peer))
            relays.add(task)
            task.add_done_callback(functools.partial(finished, client=client))

    listener.setblocking(False)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    master_fd = getattr(args, "master_fd", None)
    if master_fd is not None:

        def master_gone() -> None:
            # EOF: the master's end closed, i.e. the master died (kill -9, OOM). Serving
            # on would leave an unsupervised orphan in the group, which a new master
            # on the same port would share the connections with.
            loop.remove_reader(master_fd)
            report("master", "the master is gone: stopping")
            stop.set()

        loop.add_reader(master_fd, master_gone)
    loop.add_reader(listener.fileno(), on_accept)
    print("ready", flush=True)
    await stop.wait()
    # remove_reader() also cancels a callback already queued: no accept after this,
    # so what waits in the queue is the next worker's.
    loop.remove_reader(listener.fileno())
    if pause is not None:
        pause.cancel()
    if master_fd is not None:
        loop.remove_reader(master_fd)
    # Our fd only: in a restart the master still holds the socket and its queue for
    # the next worker; in a stop it has closed its own, and the last close resets
    # what is still queued.
    listener.close()
    if relays:
        await asyncio.wait(relays, timeout=args.drain_timeout)


#: What a terminal sends the whole process group (Ctrl-C, a hangup; also
#: ``kill -HUP -PGID``): the master's to act on, so the workers ignore it.
WORKERS_IGNORE = frozenset({signal.SIGINT, signal.SIGHUP})


@contextlib.contextmanager
def signals_blocked(signals: frozenset[int]) -> Iterator[None]:
    """Block *signals* in the master for the ``with`` body, for a worker started there.

    A worker ignores SIGINT and SIGHUP, but it can set SIG_IGN only once its interpreter
    runs its code: a Ctrl-C while it still started (importing) was a KeyboardInterrupt
    traceback and a worker that never said "ready" (at a restart, the restart given up).
    The signal mask is inherited through fork and exec, so a worker started here has
    them blocked from its first instruction, and ignore_signals() discards what came
    meanwhile. Unlike ``preexec_fn`` no Python code runs in the child before exec, which
    is unsafe in a process with threads. The master's own signals wait, pending, until
    the mask is restored.
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


def spawn(member: socket.socket, argv: list[str], lifeline: int) -> subprocess.Popen[str]:
    """Start a worker on *member*; return it once it has said "ready".

    :raises RuntimeError: it could not be started (e.g. ``EMFILE``, ``EAGAIN``: out of
        file descriptors or processes), its listener could not be sent to it, or it
        exited before it was ready (e.g. it could not receive its listener). The
        worker is gone and reaped by then.
    """
    try:
        parent, child = socket.socketpair()
    except OSError as exc:
        raise RuntimeError(f"a worker could not be started: {exc}") from None
    with parent, child:
        cmd = [sys.executable, __file__, *argv, "--channel-fd", str(child.fileno())]
        cmd += ["--master-fd", str(lifeline)]
        fds = [child.fileno(), lifeline]
        try:
            with signals_blocked(WORKERS_IGNORE):
                proc = subprocess.Popen(cmd, pass_fds=fds, stdout=subprocess.PIPE, text=True)
        except OSError as exc:
            raise RuntimeError(f"a worker could not be started: {exc}") from None
        try:
            send_sockets(parent, [member], names=["listener"])
        except (ReuselbError, OSError) as exc:
            # e.g. ENOBUFS, ENOMEM. The worker waits for its listener: it goes now
            # (SIGKILL: its own report would only repeat this one), and is reaped,
            # not left running unsupervised nor as a zombie holding its pipe.
            proc.kill()
            reap(proc)
            raise RuntimeError(
                f"worker {proc.pid} could not be started: its listener was not sent: {exc}"
            ) from None
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        reap(proc)
        raise RuntimeError(f"worker {proc.pid} failed to start")
    return proc


def reap(proc: subprocess.Popen[str], timeout: float | None = None) -> None:
    """Wait for a worker and close the pipe its "ready" line came through; one not
    gone after *timeout* s is killed."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


#: The signals that stop the proxy; SIGINT is Ctrl-C.
STOP = frozenset({signal.SIGTERM, signal.SIGINT})


@dataclasses.dataclass
class Pool:
    """The master's workers (one per member of the group) and what starting one takes."""

    group: ReuseportGroup
    argv: list[str]
    #: the read end of the pipe whose EOF tells the workers that the master is gone
    lifeline: int
    #: the signals received and not yet handled, in order
    events: list[int]
    #: the read end of the signal wakeup fd
    wake_r: int
    members: list[socket.socket] = dataclasses.field(init=False)
    procs: dict[int, subprocess.Popen[str]] = dataclasses.field(default_factory=dict)
    #: old workers a restart told to stop, not yet gone
    draining: list[subprocess.Popen[str]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.members = list(self.group.members)

    def spawn(self, i: int) -> subprocess.Popen[str]:
        return spawn(self.members[i], self.argv, self.lifeline)

    def stopping(self) -> bool:
        return not STOP.isdisjoint(self.events)

    def wait_signal(self) -> None:
        """Sleep until a signal arrives, race-free: a signal that came after the
        caller last looked at the events has left its byte in the wakeup fd."""
        select.select([self.wake_r], [], [])
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_r, 512)


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
    for sig in (*STOP, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, lambda signum, frame: events.append(signum))
    # The workers' lifeline: they hold its read end, only the master its write end
    # (os.pipe() fds are close-on-exec). However the master ends, kill -9 included,
    # the kernel closes the write end, and every worker reads EOF and stops.
    life_r, life_w = os.pipe()
    pool = Pool(group, argv, life_r, events, wake_r)
    try:
        for i in range(len(pool.members)):
            pool.procs[i] = pool.spawn(i)
        print(
            f"ready {group.address} workers={','.join(str(p.pid) for p in pool.procs.values())}",
            flush=True,
        )
        while not pool.stopping():  # a stop goes before anything queued
            if not events:
                pool.wait_signal()
                continue
            got = events.pop(0)
            if got == signal.SIGCHLD:
                replace_dead(pool)
            elif got == signal.SIGHUP:
                restart(pool)
    except (OSError, RuntimeError) as exc:
        # The first workers' start: out of fds or processes (EMFILE, EAGAIN), or a
        # worker that exited before "ready". One line, not a traceback; the workers
        # already started are stopped below. (restart() and replace_dead() handle
        # their own failures and keep serving.)
        print(f"l4proxy: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.set_wakeup_fd(-1)
        workers = [*pool.procs.values(), *pool.draining]
        for proc in workers:
            proc.terminate()
        # Our copies of the listeners go now, not after the drain: the workers close
        # theirs as they stop, so the port refuses new clients at once. Held open,
        # the kernel would go on completing handshakes for a queue nobody accepts
        # from, and reset those clients only when the master exits. (A connection
        # queued but not yet accepted when the last worker closes is reset then.)
        group.close()
        for proc in workers:
            reap(proc, timeout=args.drain_timeout + 5)
        for fd in (wake_r, wake_w, life_r, life_w):
            os.close(fd)
    return 0


def restart(pool: Pool) -> None:
    """Zero-drop restart, one worker at a time: the new one first, then drain the old.

    A new worker that does not start (a bad deploy) stops the restart: the old
    workers keep serving, and the error is reported. A stop signal ends the
    restart at once, even while an old worker drains: the master then stops every
    worker, those in ``pool.draining`` too, and they drain together rather than
    one ``--drain-timeout`` after another. A worker that dies meanwhile is
    replaced at once (``replace_dead_now``), not when the drain ends, and its
    slot is not restarted again: its replacement already runs the new code.
    """
    before = dict(pool.procs)
    for i, was in before.items():
        if pool.stopping():
            break
        replace_dead_now(pool)
        if pool.procs.get(i) is not was:
            continue  # died since the restart began: replaced, or its member left the group
        try:
            new = pool.spawn(i)
        except (OSError, RuntimeError) as exc:
            print(f"restart stopped, old workers kept: {exc}", flush=True)
            return
        old, pool.procs[i] = pool.procs[i], new
        if old.poll() is not None:
            # It died while the new one started: not a drain, a replacement.
            reap(old)
            print(f"replaced worker {old.pid} -> {new.pid}", flush=True)
            continue
        old.terminate()
        pool.draining.append(old)
        print(f"worker {old.pid} draining, replaced by {new.pid}", flush=True)
        # Its exit is a SIGCHLD, whose byte wakes us as a stop signal's does. So is
        # another worker's death: replaced now, or the connections the kernel keeps
        # queueing on its member would wait up to --drain-timeout for this drain.
        while old.poll() is None and not pool.stopping():
            pool.wait_signal()
            replace_dead_now(pool)
        if old.returncode is None:
            break
        pool.draining.remove(old)
        reap(old)
    else:
        workers = ",".join(str(p.pid) for p in pool.procs.values())
        print(f"restarted workers={workers}", flush=True)
        return
    print("restart stopped: stopping", flush=True)


def replace_dead_now(pool: Pool) -> None:
    """Handle the SIGCHLDs queued in ``pool.events`` now (during a restart, which
    holds the master's loop): replace the workers that died. The old workers a
    restart drains are not in ``pool.procs``: their exits are left to it. Not once
    a stop signal is queued: a stop goes before anything queued, and the stop ends
    every worker anyway (a worker started now would be terminated at once)."""
    if signal.SIGCHLD not in pool.events or pool.stopping():
        return
    # remove() one at a time, not a rebuilt list: a handler appending between the
    # read and the write of a new list would lose its signal.
    while signal.SIGCHLD in pool.events:
        pool.events.remove(signal.SIGCHLD)
    replace_dead(pool)


def replace_dead(pool: Pool) -> None:
    """Replace a worker that died. Its member stays open in the master, so the
    kernel keeps queueing connections there: they wait for the new worker. If
    none starts, the member leaves the group (its queued connections are reset,
    new ones go to the other members) rather than hang."""
    for i, proc in list(pool.procs.items()):
        if proc.poll() is None:
            continue  # alive (or a worker restart() already reaped and replaced)
        reap(proc)
        try:
            pool.procs[i] = pool.spawn(i)
        except (OSError, RuntimeError) as exc:
            del pool.procs[i]
            # take() is by slot, and slot i is worker i's for good (a take leaves
            # every slot where it is). Not group.members.index(): that list skips
            # the members taken already, so after one failed replacement it named
            # another worker's member, which was closed while the dead one's
            # queue hung.
            pool.group.take(i).close()
            print(f"worker {proc.pid} died and was not replaced: {exc}", flush=True)
            continue
        print(f"replaced worker {proc.pid} -> {pool.procs[i].pid}", flush=True)


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
    parser.add_argument("--master-fd", type=int, help=argparse.SUPPRESS)
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
    if not any(node.weight for node in policy.nodes):
        # Weight 0 is "no new connections": every client would be reset.
        parser.error(
            "argument --backend: every backend has weight 0, so none would get a connection"
        )
    if args.channel_fd is None:
        # a bad --listen (malformed, not local, in use) is a usage error, like --workers 0
        try:
            group = reuseport_group(args.listen, args.workers)
        except (ReuselbError, OSError) as exc:
            if bad_listen_value(exc):
                parser.error(f"argument --listen: {exc}")
            print(f"l4proxy: cannot listen: {exc}", file=sys.stderr)
            return 1
        with group:
            return master(group, args, argv)
    # A SIGHUP or SIGINT to the whole process group (a terminal hangup or Ctrl-C,
    # kill -HUP -PGID) is the master's cue to restart or to stop, and the master
    # tells the workers (SIGTERM): a worker dying of it would cut its relays.
    ignore_signals(WORKERS_IGNORE)
    if args.master_fd is not None:
        # pass_fds left the lifeline inheritable here (as it must be across the
        # exec): a program this worker started would hold the master's pipe open.
        os.set_inheritable(args.master_fd, False)
    try:
        with socket.socket(fileno=args.channel_fd) as channel:
            listener = recv_sockets(channel)["listener"]
    except (ReuselbError, OSError) as exc:
        # Out of fds as the listener arrives (the kernel drops an fd it cannot
        # install: a HandoffError), or the master's end closed before it sent. One
        # line, not a traceback; the master sees no "ready" and reports this worker
        # as not started.
        print(f"l4proxy worker {os.getpid()}: no listener: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        asyncio.run(serve(listener, policy, args))
    finally:
        if args.master_fd is not None:
            os.close(args.master_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
