"""N worker processes serving HTTP on one port, the kernel balancing between them.

Each worker binds its *own* SO_REUSEPORT listener (not one socket shared by fork),
so each has its own accept queue and the kernel hashes every new connection to
one of them. Run it, then try ``curl -s http://127.0.0.1:8080/`` a few times:

    python examples/prefork_http.py --listen 127.0.0.1:8080 --workers 4

The master holds the port with a bound, never-listening reuseport socket (it gets
no connections), starts the workers, prints one ``ready`` line and waits for
SIGTERM/SIGINT, then stops every worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys

from reuselb import ReuselbError, hold_port, parse_address, reuseport_listener


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")  # the request head; the body is ignored
    body = f"hello from worker {os.getpid()}\n".encode()
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    writer.close()


async def worker(address: str) -> None:
    listener = reuseport_listener(address)
    server = await asyncio.start_server(handle, sock=listener)  # asyncio owns it now
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


def master(holder: socket.socket, workers: int) -> int:
    bound = parse_address(holder.getsockname()[:2])
    cmd = [sys.executable, __file__, "--worker", str(bound)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                print(f"worker {proc.pid} failed to start", file=sys.stderr)
                return 1
        print(f"ready http://{bound} workers={','.join(str(p.pid) for p in procs)}", flush=True)
        while not stopping:
            signal.pause()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()  # the pipe the "ready" line came through
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
        asyncio.run(worker(args.worker))
        return 0
    # a bad --listen (malformed, not local, in use) is a usage error, like --workers 0
    try:
        holder = hold_port(args.listen)  # holds the port; never listens
    except (ReuselbError, OSError) as exc:
        parser.error(f"argument --listen: {exc}")
    with holder:
        return master(holder, args.workers)


if __name__ == "__main__":
    sys.exit(main())
