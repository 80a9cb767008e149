"""Relays composed from reuselb parts, plus the plain Python copy relay baseline.

    python relays.py MODE LISTEN_PORT TARGET_PORT

MODE: ``threads-splice`` (a thread per connection running ``pipe_splice``),
``asyncio-splice`` (a task per connection running ``async_pipe_splice`` on one
asyncio loop), ``asyncio-start`` / ``uvloop-start`` (``start_pipe_splice`` from the
accept callback: no task per connection; on asyncio's loop and on uvloop),
``uvloop-splice`` (tasks, on uvloop), ``threads-copy`` (two threads per connection,
recv/sendall: what people write by hand).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import sys
import threading

from reuselb import (
    async_pipe_splice,
    connect_tcp,
    pipe_splice,
    reuseport_listener,
    start_pipe_splice,
)


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


async def asyncio_splice(listener: socket.socket, target: int, *, start: bool = False) -> None:
    """Accept in batches from a reader callback, connect without waiting, relay.

    No future per accept and none per connect: the relay starts while the backend
    connect is in flight (it waits for the socket to become writable, and a refused
    connect ends it with side b failed), which is one loop iteration less per
    connection than ``await loop.sock_accept()`` + ``await loop.sock_connect()``.
    """
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    tasks: set[asyncio.Task[object]] = set()
    addr = ("127.0.0.1", target)

    def on_accept() -> None:
        for _ in range(64):  # bounded: let the relays run between batches
            try:
                client, _peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and the like: try again on the next wakeup
            backend = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            err = backend.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS):
                client.close()
                backend.close()
                continue
            if start:
                # No coroutine and no task per connection; the relay keeps itself
                # alive (the loop's epoll hub holds it) until it ends.
                start_pipe_splice(client, backend)
                continue
            task = loop.create_task(async_pipe_splice(client, backend))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    loop.add_reader(listener.fileno(), on_accept)
    await loop.create_future()  # serve until cancelled


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
    elif mode == "asyncio-start":
        asyncio.run(asyncio_splice(listener, target, start=True))
    elif mode == "uvloop-start":
        import uvloop

        uvloop.run(asyncio_splice(listener, target, start=True))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
