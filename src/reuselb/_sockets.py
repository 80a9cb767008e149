"""Socket factories, reuseport listeners and groups, capability probes.

Rules of this module:

* every socket is created with SOCK_CLOEXEC in the same ``socket(2)`` call, so a
  ``fork()+exec()`` in another thread can never inherit it (setting FD_CLOEXEC
  afterwards leaves a window; see PEP 446);
* every factory closes what it made when it fails, and never closes a socket
  the caller passed in;
* nothing here runs a loop or starts a thread.
"""

from __future__ import annotations

import socket

__all__ = ["tcp_socket", "udp_socket"]

# Linux and the BSDs have the flag; elsewhere CPython still makes sockets
# non-inheritable (PEP 446), only not atomically.
_CLOEXEC: int = getattr(socket, "SOCK_CLOEXEC", 0)
_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)


def _new_socket(
    family: socket.AddressFamily, kind: socket.SocketKind, nonblocking: bool
) -> socket.socket:
    flags = _CLOEXEC | (_NONBLOCK if nonblocking else 0)
    sock = socket.socket(family, kind | flags)
    if nonblocking and not _NONBLOCK:
        sock.setblocking(False)
    return sock


def tcp_socket(
    family: socket.AddressFamily = socket.AF_INET,
    *,
    nonblocking: bool = False,
    nodelay: bool = False,
) -> socket.socket:
    """A new TCP socket, created close-on-exec in the same syscall.

    :param family: ``AF_INET`` or ``AF_INET6``.
    :param nonblocking: create it with ``SOCK_NONBLOCK`` (timeout 0).
    :param nodelay: set ``TCP_NODELAY``.
    :raises OSError: the kernel refused to create it.
    """
    sock = _new_socket(family, socket.SOCK_STREAM, nonblocking)
    try:
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def udp_socket(
    family: socket.AddressFamily = socket.AF_INET, *, nonblocking: bool = False
) -> socket.socket:
    """A new UDP socket, created close-on-exec in the same syscall.

    :param family: ``AF_INET`` or ``AF_INET6``.
    :param nonblocking: create it with ``SOCK_NONBLOCK`` (timeout 0).
    :raises OSError: the kernel refused to create it.
    """
    return _new_socket(family, socket.SOCK_DGRAM, nonblocking)
