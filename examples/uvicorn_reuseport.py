"""A real ASGI server (uvicorn) in N processes, each on its own reuselb listener.

``uvicorn --workers N`` binds one socket in the parent and shares it by fork: one
accept queue, and whichever worker wakes first takes the connection. Here every
worker binds its own SO_REUSEPORT listener, so the kernel spreads connections
across N queues:

    pip install uvicorn
    python examples/uvicorn_reuseport.py --listen 127.0.0.1:8000 --workers 4

Replace ``app`` with your application (any ASGI callable).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
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


def worker(address: str) -> None:
    listener = reuseport_listener(address)
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    print("ready", flush=True)
    server.run(sockets=[listener])  # uvicorn serves on our socket; SIGTERM stops it


def master(holder: socket.socket, workers: int) -> int:
    bound = parse_address(holder.getsockname()[:2])
    cmd = [sys.executable, __file__, "--worker", str(bound)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                return 1
        print(f"ready http://{bound} workers={','.join(str(p.pid) for p in procs)}", flush=True)
        for proc in procs:
            proc.wait()
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
    except (ReuselbError, OSError) as exc:
        parser.error(f"argument --listen: {exc}")
    with holder:
        return master(holder, args.workers)


if __name__ == "__main__":
    sys.exit(main())
