"""The relay's own cost per short connection, in one process, without the load generators.

Pre-connected loopback TCP pairs each get what one HTTP/1.1 "Connection: close"
exchange brings: the request and the client's FIN queued on side a, the response
and the server's FIN queued on side b. Timed: ``start_pipe_splice`` for every pair
on one asyncio loop until every relay has ended (start, three events, half-closes,
close). Not timed: connecting, accepting, queuing.

Two figures per relay: the thread's CPU time (``time.thread_time()``, user and
system, syscalls included: every relay runs on the loop's one thread) and wall time.
They are not the same on a shared machine: wall time also counts the time another
process held the CPU (a busy neighbour on the same CPU nearly doubled it, with the
same CPU time), so compare CPU figures; wall time shows how much the run was
disturbed. The best and the median of the repetitions are reported.

For an A/B comparison run two source trees alternately on the same CPU::

    for i in 1 2 3; do
      PYTHONPATH=/path/to/old/src taskset -c 1 python benchmarks/relay/cycle.py
      taskset -c 1 python benchmarks/relay/cycle.py
    done
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import statistics
import time

from reuselb import start_pipe_splice

REQ = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


def _pairs(listener: socket.socket, n: int) -> list[tuple[socket.socket, socket.socket]]:
    out = []
    for _ in range(n):
        c = socket.create_connection(listener.getsockname())
        s, _ = listener.accept()
        out.append((c, s))
    return out


async def _one_round(listener: socket.socket, n: int) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) per relay for *n* relays."""
    clients = _pairs(listener, n)  # (client, a)
    servers = _pairs(listener, n)  # (b, server)
    try:
        sides = []
        for (client, a), (b, server) in zip(clients, servers, strict=True):
            client.sendall(REQ)
            client.shutdown(socket.SHUT_WR)
            server.sendall(RESP)
            server.shutdown(socket.SHUT_WR)
            b.setblocking(False)  # as a backend dialled non-blocking would be
            sides.append((a, b))
        gc.collect()
        t0, c0 = time.perf_counter(), time.thread_time()
        futures = [start_pipe_splice(a, b) for a, b in sides]
        stats = await asyncio.gather(*futures)
        cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
        for st in stats:  # the work was done, not skipped
            assert (st.a_to_b, st.b_to_a) == (len(REQ), len(RESP)), st
        return cpu / n, wall / n
    finally:
        for x, y in clients + servers:
            x.close()
            y.close()


async def _main(n: int, reps: int) -> list[tuple[float, float]]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        return [await _one_round(listener, n) for _ in range(reps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--relays", type=int, default=4000, help="relays per repetition")
    parser.add_argument("--reps", type=int, default=5, help="repetitions")
    args = parser.parse_args()
    for name in ("relays", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, not {getattr(args, name)}")
    runs = asyncio.run(_main(args.relays, args.reps))
    cpu = sorted(c for c, _ in runs)
    wall = sorted(w for _, w in runs)
    print(
        f"us per relay, thread CPU: best {cpu[0] * 1e6:.1f}, "
        f"median {statistics.median(cpu) * 1e6:.1f}; "
        f"wall: best {wall[0] * 1e6:.1f}, median {statistics.median(wall) * 1e6:.1f} "
        f"({args.reps} x {args.relays} relays)"
    )


if __name__ == "__main__":
    main()
