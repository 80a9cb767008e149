"""Relays composed from reuselb parts, plus the plain Python copy relay baseline.

    python relays.py MODE LISTEN_PORT TARGET_PORT

MODE: ``threads-splice`` (a thread per connection running ``pipe_splice``),
``asyncio-splice`` (``async_pipe_splice`` on one asyncio loop), ``uvloop-splice``
(the same on uvloop), ``threads-copy`` (two threads per connection, recv/sendall:
what people write by hand).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading

from reuselb import async_pipe_splice, connect_tcp, pipe_splice, reuseport_listener


def threads_splice(listener: socket.socket, target: int) -> None:
    def serve(client: socket.socket) -> None:
        try:
            backend = connect_tcp(("127.0.0.1", target))
        except OSError:
            client.close()
            return
        pipe_splice(client, backend)

    while True:
        client, _ = listener.accept()
        threading.Thread(target=serve, args=(client,), daemon=True).start()


def threads_copy(listener: socket.socket, target: int) -> None:
    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def serve(client: socket.socket) -> None:
        backend = socket.create_connection(("127.0.0.1", target))
        for s in (client, backend):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = threading.Thread(target=pump, args=(backend, client), daemon=True)
        t.start()
        pump(client, backend)
        t.join()
        client.close()
        backend.close()

    while True:
        client, _ = listener.accept()
        threading.Thread(target=serve, args=(client,), daemon=True).start()


async def asyncio_splice(listener: socket.socket, target: int) -> None:
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()

    async def serve(client: socket.socket) -> None:
        backend = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            await loop.sock_connect(backend, ("127.0.0.1", target))
        except OSError:
            backend.close()
            client.close()
            return
        await async_pipe_splice(client, backend)

    while True:
        client, _ = await loop.sock_accept(listener)
        task = asyncio.ensure_future(serve(client))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def main() -> None:
    mode, port, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    listener = reuseport_listener(("127.0.0.1", port))
    print("ready", flush=True)
    if mode == "threads-splice":
        threads_splice(listener, target)
    elif mode == "threads-copy":
        threads_copy(listener, target)
    elif mode == "asyncio-splice":
        asyncio.run(asyncio_splice(listener, target))
    elif mode == "uvloop-splice":
        import uvloop

        uvloop.run(asyncio_splice(listener, target))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
