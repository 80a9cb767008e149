"""Relays composed from reuselb parts, plus the plain Python copy relay baseline.

    python relays.py MODE LISTEN_PORT TARGET_PORT

MODE: ``threads-splice`` (a thread per connection running ``pipe_splice``),
``asyncio-splice`` (a task per connection running ``async_pipe_splice`` on one
asyncio loop), ``asyncio-start`` / ``uvloop-start`` (``start_pipe_splice`` from the
accept callback: no task per connection; on asyncio's loop and on uvloop),
``uvloop-splice`` (tasks, on uvloop), ``threads-copy`` (two threads per connection,
recv/sendall: what people write by hand), ``epoll-floor`` (one bare epoll loop
copying through one buffer: a reference for what a Python relay costs with none of
reuselb's checks and guarantees, see :func:`epoll_floor`).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import select
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
            try:
                backend = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError:  # EMFILE: drop this client, try again on the next wakeup
                client.close()
                return
            err = backend.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS):
                client.close()
                backend.close()
                continue
            if start:
                # No coroutine and no task per connection; the relay keeps itself
                # alive (the loop's epoll hub holds it) until it ends.
                try:
                    start_pipe_splice(client, backend)
                except OSError:
                    # EMFILE creating the loop's epoll hub: nothing started and the
                    # sockets are still ours. Drop this client, go on with the next.
                    client.close()
                    backend.close()
                continue
            task = loop.create_task(async_pipe_splice(client, backend))
            tasks.add(task)
            task.add_done_callback(functools.partial(finished, client, backend))

    def finished(client: socket.socket, backend: socket.socket, task: asyncio.Task[object]) -> None:
        tasks.discard(task)
        # A relay that could not start (EMFILE creating the loop's epoll hub) raised
        # with both sockets left as they were: read the error, so asyncio does not
        # log "Task exception was never retrieved", and close them. (A relay that
        # ran has closed them itself; closing again does nothing.)
        if not task.cancelled() and task.exception() is not None:
            client.close()
            backend.close()

    loop.add_reader(listener.fileno(), on_accept)
    await loop.create_future()  # serve until cancelled


def epoll_floor(listener: socket.socket, target: int) -> None:
    """The least a Python relay can do per connection: a reference, not a relay to use.

    One edge-triggered epoll, recv_into one buffer and send; a partial send keeps the
    rest and waits for the destination to be writable. It checks nothing at the
    start (a dup, a listening or unconnected socket, the same socket twice), keeps
    no statistics, has no idle timeout, no splice (bulk bytes go through Python),
    no urgent data, TLS or wrapper support, no cancel or fork handling, and on any
    error it closes both sides. What reuselb's relay costs above this is the price
    of those guarantees and of running on an asyncio loop.
    """
    ep = select.epoll()
    lfd = listener.fileno()
    listener.setblocking(False)
    ep.register(lfd, select.EPOLLIN)
    arm = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
    socks: dict[int, socket.socket] = {}
    peer: dict[int, int] = {}
    left: dict[int, memoryview] = {}  # fd -> bytes still to send to it
    eof: set[int] = set()  # fds whose EOF was read
    buf = memoryview(bytearray(65536))
    addr = ("127.0.0.1", target)
    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def drop(fd: int) -> None:
        for x in (fd, peer[fd]):
            ep.unregister(x)
            socks.pop(x).close()
            del peer[x]
            left.pop(x, None)
            eof.discard(x)

    def pump(src: int) -> bool:
        """Move what *src* has to its peer; False when the pair must be dropped."""
        dst = peer[src]
        out = socks[dst]
        rest = left.get(dst)
        if rest is not None:
            try:
                n = out.send(rest)
            except BlockingIOError:
                n = 0  # dst still full: EPOLLOUT stays armed
            if n < len(rest):
                left[dst] = rest[n:]
                return True
            del left[dst]
            ep.modify(dst, arm)
        if src in eof:
            return True
        sock = socks[src]
        while True:
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                return True
            if n == 0:
                eof.add(src)
                out.shutdown(socket.SHUT_WR)
                return True
            try:
                sent = out.send(buf[:n])
            except BlockingIOError:
                sent = 0
            if sent < n:
                left[dst] = memoryview(bytes(buf[sent:n]))
                ep.modify(dst, arm | select.EPOLLOUT)
                return True

    while True:
        for fd, ev in ep.poll():
            if fd == lfd:
                for _ in range(64):
                    try:
                        client, _peer = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break  # EMFILE and the like: try again on the next wakeup
                    client.setblocking(False)
                    client.setsockopt(*nodelay)
                    try:
                        backend = socket.socket(
                            socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                        )
                    except OSError:  # EMFILE: drop this client, try again on the next wakeup
                        client.close()
                        break
                    backend.setsockopt(*nodelay)
                    backend.connect_ex(addr)
                    cfd, bfd = client.fileno(), backend.fileno()
                    socks[cfd], socks[bfd] = client, backend
                    peer[cfd], peer[bfd] = bfd, cfd
                    ep.register(cfd, arm)
                    ep.register(bfd, arm)
                continue
            if fd not in socks:
                continue  # its pair was dropped earlier in this batch
            try:
                # Readable: move fd's bytes; writable: flush what waited for fd,
                # then read its peer again (it stopped while fd was full).
                pump(fd)
                if ev & select.EPOLLOUT:
                    pump(peer[fd])
            except OSError:
                drop(fd)
                continue
            # Both EOFs read: nothing is left to send (an EOF is read only once
            # what waited for the other side went out), both half-closes are out.
            if fd in eof and peer[fd] in eof:
                drop(fd)


def main() -> None:
    mode, port, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    listener = reuseport_listener(("127.0.0.1", port))
    print("ready", flush=True)
    if mode == "threads-splice":
        threads_splice(listener, target)
    elif mode == "threads-copy":
        threads_copy(listener, target)
    elif mode == "epoll-floor":
        epoll_floor(listener, target)
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
