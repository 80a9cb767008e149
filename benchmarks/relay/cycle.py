"""The relay's own cost per short connection, in one process, without the load generators.

Pre-connected loopback TCP pairs each get what one HTTP/1.1 "Connection: close"
exchange brings: the request and the client's FIN queued on side a, the response
and the server's FIN queued on side b. Timed: ``start_pipe_splice`` for every pair
on one asyncio loop until every relay has ended (start, three events, half-closes,
close). Not timed: connecting, accepting, queuing. The figure is wall time per
relay on one thread, which is its CPU time (syscalls included); the best of the
repetitions is reported, as the machine is shared.

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


async def _one_round(listener: socket.socket, n: int) -> float:
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
        t0 = time.perf_counter()
        futures = [start_pipe_splice(a, b) for a, b in sides]
        stats = await asyncio.gather(*futures)
        elapsed = time.perf_counter() - t0
        for st in stats:  # the work was done, not skipped
            assert (st.a_to_b, st.b_to_a) == (len(REQ), len(RESP)), st
        return elapsed / n
    finally:
        for x, y in clients + servers:
            x.close()
            y.close()


async def _main(n: int, reps: int) -> list[float]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        return [await _one_round(listener, n) for _ in range(reps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--relays", type=int, default=4000, help="relays per repetition")
    parser.add_argument("--reps", type=int, default=5, help="repetitions")
    args = parser.parse_args()
    per_relay = sorted(asyncio.run(_main(args.relays, args.reps)))
    print(
        f"us per relay: best {per_relay[0] * 1e6:.1f}, "
        f"median {statistics.median(per_relay) * 1e6:.1f} "
        f"({args.reps} x {args.relays} relays)"
    )


if __name__ == "__main__":
    main()
