"""Every exception reuselb raises.

Rules of this module:

* one class per condition; each message is built in ``__init__`` from the
  offending value, lowercase, so ``str(exc)`` always names what was wrong;
* leaves also subclass the builtin a caller already catches (``ValueError`` for
  bad arguments, ``OSError`` for what the kernel refused, ``LookupError`` for
  missing nodes), so ``except OSError`` around socket code keeps working;
* the offending values stay available as attributes for programs.
"""

from __future__ import annotations

import errno as _errno
from typing import Any

__all__ = [
    "AddressError",
    "DuplicateNode",
    "InvalidKey",
    "KeyRequired",
    "LeaseReleased",
    "NoNodeAvailable",
    "UnknownNode",
    "UnknownPolicy",
    "InvalidArgument",
    "AddressInUse",
    "GroupMemberError",
    "HandoffError",
    "HostNotFound",
    "ReuselbError",
    "ReuseportUnsupported",
    "SocketClosed",
    "SteeringError",
    "WrongSocketType",
]


def shown(value: object) -> str:
    """``repr(value)`` for a message, which must not fail on the value it reports.

    CPython 3.11+ refuses to turn an int of more than ``sys.get_int_max_str_digits()``
    (4,300) digits into text (the CVE-2020-10735 limit), so ``repr(10**5000)``, or
    of a tuple holding it, raises ``ValueError``: building the message raised that
    instead of the error that names the value. Such an int is shown by its size, a
    tuple item by item (one level: an address tuple), and any other value whose
    ``repr()`` fails (a user's ``__repr__``, a tuple nested past the recursion
    limit) by its type and the failure. Never raises (an ``Exception``).
    """
    try:
        return repr(value)
    except Exception:
        if type(value) is tuple:
            items = [_shown_alone(x) for x in value]
            return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
        return _shown_alone(value)


def _shown_alone(value: object) -> str:
    """:func:`shown` without looking into a tuple: never recursive."""
    try:
        return repr(value)
    except Exception as exc:
        try:
            if isinstance(value, int):
                # log10(2) = 0.30103: the digit count without making the digits
                digits = int(int.bit_length(value) * 0.30103) + 1
                sign = "negative " if int.__lt__(value, 0) else ""
                return f"<{sign}int of about {digits:,} digits>"
        except Exception:  # an int subclass that is odd beyond that
            pass
        return f"<{type(value).__name__} whose repr() raised {type(exc).__name__}>"


def _rebuild(
    cls: type[ReuselbError],
    args: tuple[Any, ...],
    state: dict[str, Any],
    os_fields: tuple[Any, ...] | None,
) -> ReuselbError:
    # Rebuild without calling the subclass's __init__: its parameters are the
    # offending values, not the message in args, so calling it again with args
    # nested the message ("unknown node \"unknown node 'n'\"") or failed outright.
    exc = cls.__new__(cls)
    if isinstance(exc, OSError) and os_fields is not None:
        OSError.__init__(exc, *args)
        exc.errno, exc.strerror, exc.filename, exc.filename2 = os_fields
    else:
        Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class ReuselbError(Exception):
    """Base class of every exception raised by reuselb.

    Every subclass survives :mod:`pickle` and :func:`copy.copy` with its message,
    ``args``, attributes and, for the :class:`OSError` ones, ``errno`` intact (so an
    error raised in a worker process reads the same in its parent), provided its
    attributes can be pickled (:class:`SocketClosed`'s socket cannot).
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException.__reduce__ gives (cls, args, __dict__): unpickling calls
        # cls(*args), but our __init__s take the offending values and build the
        # message from them, so args (the message) do not fit them. errno is kept
        # apart: GroupMemberError and SteeringError set it after OSError.__init__.
        os_fields = None
        if isinstance(self, OSError):
            os_fields = (self.errno, self.strerror, self.filename, self.filename2)
        return (_rebuild, (type(self), self.args, dict(self.__dict__), os_fields))


class InvalidArgument(ReuselbError, ValueError):
    """An argument is out of its allowed range (a negative count, a zero backlog, ...).

    :ivar name: the parameter's name.
    :ivar value: the value passed, or where that is a collection whose size is
        what is wrong, its size as the message shows it (``"3 members"`` for a
        group, ``0`` for an empty ``socks``).
    """

    def __init__(self, name: str, value: object, reason: str) -> None:
        self.name = name
        self.value = value
        super().__init__(f"invalid {name} {shown(value)}: {reason}")


# --------------------------------------------------------------------------- addresses


class AddressError(ReuselbError, ValueError):
    """An address could not be parsed or is out of range.

    :ivar value: the value that was passed.
    :ivar reason: what is wrong with it.
    """

    def __init__(self, value: object, reason: str) -> None:
        self.value = value
        self.reason = reason
        super().__init__(f"invalid address {shown(value)}: {reason}")


class HostNotFound(ReuselbError, OSError):
    """A host name did not resolve (wraps :class:`socket.gaierror`)."""

    def __init__(self, host: str, reason: str) -> None:
        self.host = host
        self.reason = reason
        OSError.__init__(self, f"unknown host {host!r}: {reason}")

    def __str__(self) -> str:
        return str(self.args[0])


# --------------------------------------------------------------------------- sockets


class ReuseportUnsupported(ReuselbError, OSError):
    """The platform cannot give a kernel-balanced SO_REUSEPORT group.

    Raised instead of silently handing back sockets that do not balance (macOS
    sends every connection to the last socket bound; Windows has no such option).
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        OSError.__init__(self, f"SO_REUSEPORT load balancing unavailable: {reason}")

    def __str__(self) -> str:
        return str(self.args[0])


class AddressInUse(ReuselbError, OSError):
    """``bind`` failed with EADDRINUSE.

    On Linux this means another socket holds the address *without* SO_REUSEPORT
    (or under another user id, which the kernel also refuses to share), or, for
    port 0 (*ephemeral*), that no port of the ephemeral range was free.
    """

    def __init__(self, address: str, detail: str = "", *, ephemeral: bool = False) -> None:
        self.address = address
        if ephemeral:
            # bind() to port 0 answers EADDRINUSE when the kernel found no free port
            # in net.ipv4.ip_local_port_range: no other socket is at fault.
            msg = (
                f"no free port left in the ephemeral range (net.ipv4.ip_local_port_range) "
                f"to bind {address}"
            )
        else:
            msg = (
                f"address {address} is already in use by a socket that is not in a "
                "reuseport group with this one (it lacks SO_REUSEPORT, or belongs to "
                "another user id)"
            )
        if detail:
            msg = f"{msg}: {detail}"
        OSError.__init__(self, _errno.EADDRINUSE, msg)

    def __str__(self) -> str:
        return str(self.args[1])


class WrongSocketType(ReuselbError, ValueError):
    """A socket of the wrong family/type was passed (for example UDP where TCP is expected)."""

    def __init__(self, what: str, expected: str, got: str) -> None:
        self.expected = expected
        self.got = got
        super().__init__(f"{what}: expected {expected}, got {got}")


class SocketClosed(ReuselbError, ValueError):
    """A closed socket (``fileno() == -1``) was passed where an open one is needed.

    :ivar sock: the closed socket.
    """

    def __init__(self, sock: Any, what: str = "socket", detail: str = "") -> None:
        self.sock = sock
        super().__init__(f"{what} is closed: {sock!r}" + (f"; {detail}" if detail else ""))


class GroupMemberError(ReuselbError, OSError):
    """Creating member *index* of a reuseport group failed; every member made so far was closed.

    :ivar index: zero-based index of the member that failed.
    :ivar count: how many members were asked for.
    :ivar errno: the member's own ``errno`` (``EMFILE``, ``EADDRINUSE``, ...) when it
        failed with an :class:`OSError`, else ``None``, so that code written for the
        plain socket calls (``exc.errno == errno.EMFILE``) reads the cause here too.
    The original exception is chained as ``__cause__``.
    """

    def __init__(self, index: int, count: int, address: str, cause: BaseException) -> None:
        self.index = index
        self.count = count
        self.address = address
        OSError.__init__(
            self,
            f"reuseport group on {address}: member {index} of {shown(count)} failed "
            f"({type(cause).__name__}: {cause}); the {index} member(s) already made were closed",
        )
        # OSError's one-argument form leaves errno None; the message above is kept
        # as the only argument (str() is unchanged), the code is copied over.
        if isinstance(cause, OSError):
            self.errno = cause.errno

    def __str__(self) -> str:
        return str(self.args[0])


# --------------------------------------------------------------------------- balance


class NoNodeAvailable(ReuselbError, LookupError):
    """No node can take a new pick; *reason* says why (empty, all down, all draining, ...)."""

    def __init__(self, policy: str, reason: str) -> None:
        self.policy = policy
        self.reason = reason
        super().__init__(f"{policy}: no node available: {reason}")


class UnknownNode(ReuselbError, LookupError):
    """A node was named (by Node, address or name) that the policy does not have."""

    def __init__(self, ref: object) -> None:
        self.ref = ref
        super().__init__(f"unknown node {shown(ref)}")

    def __str__(self) -> str:
        return str(self.args[0])


class DuplicateNode(ReuselbError, ValueError):
    """A node with this address or name is already in the policy."""

    def __init__(self, ref: object) -> None:
        self.ref = ref
        super().__init__(f"duplicate node {shown(ref)}: a node with this address or name exists")


class LeaseReleased(ReuselbError, RuntimeError):
    """``Lease.release()`` was called a second time."""

    def __init__(self, node: object) -> None:
        self.node = node
        super().__init__(f"lease on {node} was already released")


class UnknownPolicy(ReuselbError, ValueError):
    """``make_policy`` was given a name it does not know."""

    def __init__(self, name: object, known: tuple[str, ...]) -> None:
        self.name = name
        super().__init__(f"unknown policy {shown(name)}; known: {', '.join(known)}")


class KeyRequired(ReuselbError, ValueError):
    """A hash policy was asked to pick without a key."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        super().__init__(
            f"{policy} needs a key (str or a bytes-like object) to pick a node, got None"
        )


class InvalidKey(ReuselbError, TypeError):
    """A pick key is neither ``str`` nor bytes-like, or is a ``str`` with no UTF-8 form.

    :ivar key: the key.
    :ivar reason: what is wrong with it.
    """

    def __init__(self, key: object, reason: str | None = None) -> None:
        self.key = key
        self.reason = (
            f"expected str or a bytes-like object, got {type(key).__name__}"
            if reason is None
            else reason
        )
        super().__init__(f"invalid key {shown(key)}: {self.reason}")


# --------------------------------------------------------------------------- relay
# (relay errors: added by the relay module)


# --------------------------------------------------------------------------- handoff / steering


class HandoffError(ReuselbError, OSError):
    """Sockets handed over between processes were missing, truncated or not as declared."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        OSError.__init__(self, f"socket handoff failed: {reason}")

    def __str__(self) -> str:
        return str(self.args[0])


class SteeringError(ReuselbError, OSError):
    """The kernel refused a reuseport BPF program (or there was none to detach).

    :ivar reason: what failed, and why.
    :ivar errno: the kernel's own ``errno`` when it refused (``ENOENT``: no program
        to detach; ``EINVAL``, ``ENOMEM``, ...), else ``None``, so that code written
        for the plain ``setsockopt`` (``exc.errno == errno.ENOENT``) reads it here
        too. The kernel's :class:`OSError` is chained as ``__cause__``.
    """

    def __init__(self, reason: str, errno: int | None = None) -> None:
        self.reason = reason
        OSError.__init__(self, reason)
        # OSError's one-argument form leaves errno None; the message stays the only
        # argument (str() is unchanged) and the code is set on its own.
        self.errno = errno

    def __str__(self) -> str:
        return str(self.args[0])
