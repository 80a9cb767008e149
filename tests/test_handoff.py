"""send_sockets / recv_sockets over real Unix sockets; listen_fds in a real subprocess."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import math
import os
import re
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from reuselb import (
    DrainResult,
    HandoffError,
    InvalidArgument,
    ReuseportGroup,
    SocketClosed,
    SteeringError,
    WrongSocketType,
    _handoff,
    attach_cpu_steering,
    connect_tcp,
    detach_steering,
    drain_close,
    inherit_sockets,
    listen_fds,
    recv_sockets,
    reuseport_group,
    reuseport_listener,
    reuseport_udp,
    send_sockets,
    socket_info,
    steer_all_to,
    tcp_migrate_req,
    udp_socket,
)
from tests.conftest import fds_left, open_fds, run_in_netns, until_in_or

pytestmark = pytest.mark.linux

_RECEIVER = """
import socket, sys
from reuselb import recv_sockets
with socket.socket(fileno=int(sys.argv[1])) as channel:
    socks = recv_sockets(channel)
lst = socks["web"]
lst.settimeout(30)
conn, _ = lst.accept()        # a connection queued before the handoff
print(conn.recv(100).decode(), flush=True)
conn.close()
lst.close()
"""


def test_listener_queue_survives_handoff_to_another_process() -> None:
    lst = reuseport_listener("127.0.0.1:0")
    client = connect_tcp(lst.getsockname())  # queued, not yet accepted
    client.sendall(b"queued before handoff")
    parent, child = socket.socketpair()
    proc: subprocess.Popen[str] | None = None
    try:
        with child:
            proc = subprocess.Popen(
                [sys.executable, "-c", _RECEIVER, str(child.fileno())],
                pass_fds=[child.fileno()],
                stdout=subprocess.PIPE,
                text=True,
            )
        send_sockets(parent, [lst], names=["web"])
        lst.close()  # the old process lets go; the queue lives on in the new one
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert out.strip() == "queued before handoff"
    finally:
        if proc is not None:
            # communicate(timeout=) raises TimeoutExpired and leaves the child running.
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()
        lst.close()
        parent.close()
        client.close()


def test_round_trip_checks_and_cloexec() -> None:
    a, b = socket.socketpair()
    tcp = reuseport_listener("127.0.0.1:0")
    udp = udp_socket()
    before = open_fds()
    try:
        send_sockets(a, [tcp, udp], names=["tcp", "udp"])
        got = recv_sockets(b)
        assert set(got) == {"tcp", "udp"}
        assert got["tcp"].type == socket.SOCK_STREAM
        assert got["udp"].type == socket.SOCK_DGRAM
        assert got["tcp"].getsockname() == tcp.getsockname()
        for s in got.values():
            assert fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            s.close()
        assert open_fds() == before
    finally:
        for s in (a, b, tcp, udp):
            s.close()


def test_mismatched_declaration_is_refused_and_nothing_leaks() -> None:
    a, b = socket.socketpair()
    udp = udp_socket()
    try:
        header = json.dumps(
            {"sockets": [{"name": "x", "family": 2, "type": 1, "listening": True}]}
        ).encode()
        payload = struct.pack("!4sI", b"RLB1", len(header)) + header
        a.sendmsg(
            [payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", udp.fileno()))]
        )
        before = open_fds()
        with pytest.raises(HandoffError, match="sender said"):
            recv_sockets(b)
        assert open_fds() == before
    finally:
        for s in (a, b, udp):
            s.close()


def _forged(entries: object, fds: list[int]) -> tuple[socket.socket, socket.socket]:
    """A channel whose next message is a handoff header with *entries* and *fds*."""
    a, b = socket.socketpair()
    header = json.dumps({"sockets": entries}).encode()
    payload = struct.pack("!4sI", b"RLB1", len(header)) + header
    a.sendmsg(
        [payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
    )
    return a, b


_GOOD = {"name": "x", "family": 2, "type": 1, "listening": True}


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        (5, "'sockets' is 5"),
        ([7], "malformed handoff entry 7"),
        ([{"name": 1, "family": 2, "type": 1, "listening": True}], "malformed handoff entry"),
        ([{"name": "x", "type": 1, "listening": True}], "'x' lacks 'family'"),
        ([_GOOD, dict(_GOOD, listening=False)], "name 'x' is repeated"),
    ],
)
def test_malformed_header_closes_each_fd_once(entries: object, match: str) -> None:
    listeners = [reuseport_listener("127.0.0.1:0") for _ in range(2)]
    a, b = _forged(entries, [s.fileno() for s in listeners])
    try:
        before = open_fds()
        with pytest.raises(HandoffError, match=match):
            recv_sockets(b)
        assert open_fds() == before
        # A file opened now may reuse a received fd's number: no socket object may
        # still own that number and close it later (it used to, on these paths).
        victim = os.open(os.devnull, os.O_RDONLY)
        try:
            gc.collect()
            os.fstat(victim)
        finally:
            os.close(victim)
    finally:
        for s in (a, b, *listeners):
            s.close()


def _udp_entries(n: int) -> list[dict[str, object]]:
    return [
        {
            "name": f"s{i}",
            "family": int(socket.AF_INET),
            "type": int(socket.SOCK_DGRAM),
            "listening": False,
        }
        for i in range(n)
    ]


def _send_forged(channel: socket.socket, payload: bytes, fds: list[int]) -> None:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
    channel.sendmsg([payload], rights)


def _forged_header(entries: list[dict[str, object]]) -> bytes:
    header = json.dumps({"sockets": entries}).encode()
    return struct.pack("!4sI", b"RLB1", len(header)) + header


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["stream", "dgram"])
def test_a_header_with_too_few_descriptors_is_refused_at_once(kind: int) -> None:
    # Before: recv_sockets waited for a chunk no sender sends (send_sockets always
    # puts min(n, 253) fds on the header): it blocked until the channel's timeout,
    # and on a stream read the next handoff's first byte as the chunk's marker.
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    udp, good = udp_socket(), udp_socket()
    try:
        b.settimeout(10)  # a hang fails as TimeoutError, not as a stuck test
        before = open_fds()
        _send_forged(a, _forged_header(_udp_entries(2)), [udp.fileno()])
        send_sockets(a, [good], names=["good"])  # queued behind the bad one
        with pytest.raises(HandoffError, match="header lists 2 sockets but 1 descriptor came"):
            recv_sockets(b)
        assert open_fds() == before
        got = recv_sockets(b)  # the stream is still in step
        assert os.fstat(got["good"].fileno()).st_ino == os.fstat(good.fileno()).st_ino
        got["good"].close()
    finally:
        for s in (a, b, udp, good):
            s.close()


@pytest.mark.parametrize(
    ("chunk", "then_close", "match"),
    [
        (
            [],
            True,
            r"closed after 0 of 1 marker bytes of the chunk of descriptors after 253 of 300",
        ),
        (10, False, r"chunk of descriptors after 253 of 300 has 10 descriptors, expected 47"),
        (0, False, r"chunk of descriptors after 253 of 300 has 0 descriptors, expected 47"),
        (
            b"?",
            False,
            r"expected the marker of the chunk of descriptors after 253 of 300, got b'\?'",
        ),
    ],
    ids=["closed", "short", "empty", "wrong-marker"],
)
def test_a_chunk_that_is_not_what_the_header_promised_is_refused(
    chunk: object, then_close: bool, match: str
) -> None:
    # Before: a closed channel read as "N of 1 header bytes", a short chunk was
    # taken and the next one awaited, and a wrong marker was only "expected a chunk".
    a, b = socket.socketpair()
    udp = udp_socket()
    try:
        b.settimeout(10)
        before = open_fds()
        _send_forged(a, _forged_header(_udp_entries(300)), [udp.fileno()] * 253)
        if isinstance(chunk, int):
            _send_forged(a, b"+", [udp.fileno()] * chunk)
        elif isinstance(chunk, bytes):
            _send_forged(a, chunk, [udp.fileno()] * 47)
        if then_close:
            a.shutdown(socket.SHUT_WR)  # the sender is gone before the chunk's marker
        with pytest.raises(HandoffError, match=match):
            recv_sockets(b)
        assert open_fds() == before
    finally:
        for s in (a, b, udp):
            s.close()


def test_deeply_nested_header_is_malformed_not_a_recursion_error() -> None:
    # json's decoder recurses once per level: 5,000 levels is 10 KB, far under the
    # size limit, and used to escape as a bare RecursionError.
    header = b"[" * 5000 + b"]" * 5000
    a, b = socket.socketpair()
    try:
        a.sendall(struct.pack("!4sI", b"RLB1", len(header)) + header)
        with pytest.raises(HandoffError, match="malformed handoff header"):
            recv_sockets(b)
    finally:
        a.close()
        b.close()


def test_a_file_that_is_not_a_socket_is_refused() -> None:
    r, w = os.pipe()
    a, b = _forged([_GOOD], [r])
    try:
        before = open_fds()
        with pytest.raises(HandoffError, match="'x' is not a socket"):
            recv_sockets(b)
        assert open_fds() == before
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_SEQPACKET])
def test_datagram_channels(kind: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    listener = reuseport_listener("127.0.0.1:0")
    try:
        send_sockets(a, [listener], names=["web"])
        got = recv_sockets(b)
        assert list(got) == ["web"]
        assert got["web"].getsockname() == listener.getsockname()
        got["web"].close()
    finally:
        for s in (a, b, listener):
            s.close()


def test_garbage_and_eof() -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(b"GARBAGE!")
        with pytest.raises(HandoffError, match="not a reuselb handoff message"):
            recv_sockets(b)
        a.close()
        with pytest.raises(HandoffError, match="channel closed"):
            recv_sockets(b)
    finally:
        a.close()
        b.close()


def test_a_closed_seqpacket_channel_is_named_closed_not_garbage() -> None:
    # Before: "not a reuselb handoff message (0 bytes)", as if the sender had sent
    # something; the stream path said "channel closed after 0 of 8 header bytes".
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        b.settimeout(10)  # a hang fails as TimeoutError, not as a stuck test
        a.send(b"")  # an empty message reads as the end does, but is not one
        with pytest.raises(HandoffError, match=r"not a reuselb handoff message \(0 bytes\)"):
            recv_sockets(b)
        a.close()
        with pytest.raises(HandoffError, match="channel closed after 0 of 8 header bytes"):
            recv_sockets(b)
    finally:
        a.close()
        b.close()


def test_a_seqpacket_handoff_queued_before_the_close_is_not_taken_for_the_end() -> None:
    # Before: an empty message, then a handoff, then the sender's close: the first
    # call read the empty message, saw POLLRDHUP and said "channel closed", though
    # the handoff was still queued (86 bytes) and the next call returned it.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener = reuseport_listener("127.0.0.1:0")
    got: dict[str, socket.socket] = {}
    try:
        b.settimeout(10)  # a hang fails as TimeoutError, not as a stuck test
        a.send(b"")
        send_sockets(a, [listener], names=["web"])
        a.close()
        with pytest.raises(HandoffError, match=r"not a reuselb handoff message \(0 bytes\)"):
            recv_sockets(b)
        got = recv_sockets(b)
        assert list(got) == ["web"]
        assert got["web"].getsockname() == listener.getsockname()
        # Now the end: nothing is queued any more.
        with pytest.raises(HandoffError, match="channel closed after 0 of 8 header bytes"):
            recv_sockets(b)
    finally:
        for sock in (a, b, listener, *got.values()):
            sock.close()


def test_bad_arguments() -> None:
    a, b = socket.socketpair()
    tcp = socket.socket()
    try:
        with pytest.raises(InvalidArgument, match="must send 1 to 65536"):
            send_sockets(a, [])
        with pytest.raises(
            InvalidArgument, match=r"invalid name 'x': is given twice \(names\[0\] and names\[2\]\)"
        ):
            send_sockets(a, [tcp, tcp, tcp], names=["x", "y", "x"])
        # 20,000 names with one repeat: the message names the repeat, not the list
        # (it was the whole list, 4 MB, without saying which name repeats).
        many = [f"n{i}" for i in range(20_000)] + ["n7"]
        with pytest.raises(InvalidArgument) as info:
            send_sockets(a, [tcp] * len(many), names=many)
        assert str(info.value) == "invalid name 'n7': is given twice (names[7] and names[20000])"
        with pytest.raises(
            InvalidArgument, match="invalid number of names 1: must be that of the sockets, 2"
        ):
            send_sockets(a, [tcp, tcp], names=["x"])
        # Which socket is bad, by position or by name.
        closed = socket.socket()
        closed.close()
        with pytest.raises(SocketClosed, match=r"^socks\[1\] is closed"):
            send_sockets(a, [tcp, closed])
        with pytest.raises(SocketClosed, match=r"^socket 'y' is closed"):
            send_sockets(a, [tcp, closed], names=["x", "y"])
        with pytest.raises(
            WrongSocketType, match=r"^socks\[1\]: expected a socket.socket, got int"
        ):
            send_sockets(a, [tcp, 3])  # type: ignore[list-item]
        with pytest.raises(WrongSocketType, match=r"^socket 'admin': expected a socket.socket"):
            inherit_sockets({"web": tcp, "admin": None})  # type: ignore[dict-item]
        with pytest.raises(SocketClosed, match=r"^socket 'admin' is closed"):
            inherit_sockets({"web": tcp, "admin": closed})
        with pytest.raises(InvalidArgument, match="invalid names 1: each name must be a str"):
            send_sockets(a, [tcp, tcp], names=[1, "1"])  # type: ignore[list-item]
        with pytest.raises(InvalidArgument, match="must be an AF_UNIX socket"):
            send_sockets(tcp, [tcp])
    finally:
        for s in (a, b, tcp):
            s.close()


def _unordered(kind: str, items: list[Any]) -> object:
    """*items* as an iterable that is not a sequence: its order is not theirs to keep."""
    if kind == "set":
        return set(items)
    if kind == "frozenset":
        return frozenset(items)
    if kind == "dict":
        return dict.fromkeys(items)
    if kind == "generator":
        return (x for x in items)
    assert kind == "iterator"
    return iter(items)


# (A dict's keys()/values()/items() keep insertion order: they are taken.)
_UNORDERED = ["set", "frozenset", "dict", "generator", "iterator"]


@pytest.mark.parametrize("kind", _UNORDERED)
def test_send_sockets_takes_only_sequences(kind: str, no_fd_leak: None) -> None:
    # Before: any iterable was taken; names={"web", "api"} were paired with the
    # sockets in set order, which changes with PYTHONHASHSEED: "web" arrived as the
    # api socket in about half the runs, with no error.
    a, b = socket.socketpair()
    try:
        with reuseport_listener("127.0.0.1:0") as web, reuseport_listener("127.0.0.1:0") as api:
            names = _unordered(kind, ["web", "api"])
            with pytest.raises(InvalidArgument) as info:
                send_sockets(a, [web, api], names=names)  # type: ignore[arg-type]
            assert str(info.value).startswith(f"invalid names {names!r}: must be a sequence")
            socks = _unordered(kind, [web, api])
            with pytest.raises(InvalidArgument) as info:
                send_sockets(a, socks, names=["web", "api"])  # type: ignore[arg-type]
            assert str(info.value).startswith(f"invalid socks {socks!r}: must be a sequence")
            if kind in ("set", "frozenset"):
                assert "not a set: a set's order is arbitrary" in str(info.value)
            b.setblocking(False)
            with pytest.raises(BlockingIOError):
                b.recv(1)  # refused before anything was sent
            assert web.fileno() != -1 and api.fileno() != -1
            # A tuple is a sequence: it pairs by position like a list; a dict's
            # keys() and values() keep insertion order and pair by position too.
            by_name = {"web": web, "api": api}
            for socks_ok, names_ok in (
                ((web, api), ("web", "api")),
                (by_name.values(), by_name.keys()),
            ):
                send_sockets(a, socks_ok, names=names_ok)
                b.setblocking(True)
                got = recv_sockets(b)
                try:
                    assert got["web"].getsockname() == web.getsockname()
                    assert got["api"].getsockname() == api.getsockname()
                finally:
                    for s in got.values():
                        s.close()
    finally:
        a.close()
        b.close()


def test_send_sockets_refuses_a_reuseport_group(no_fd_leak: None) -> None:
    # A group iterates over the members it holds, skipping taken ones: positions in
    # it are not its slots, so the caller passes group.members.
    a, b = socket.socketpair()
    try:
        with reuseport_group("127.0.0.1:0", 2) as group:
            with pytest.raises(InvalidArgument, match="pass group.members"):
                send_sockets(a, group)  # type: ignore[arg-type]
            send_sockets(a, group.members)
            got = recv_sockets(b)
            assert sorted(got) == ["0", "1"]
            for s in got.values():
                s.close()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("migrate", [True, False])
@pytest.mark.parametrize("kind", _UNORDERED)
def test_drain_close_takes_only_a_sequence_group(
    monkeypatch: pytest.MonkeyPatch, migrate: bool, kind: str, no_fd_leak: None
) -> None:
    # Before: group=set(members) was taken as "join order", and restore= got the
    # remaining members in set order: a CPU- or index-based program re-attached
    # through it steered to the wrong members (20 of 20 runs).
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: migrate)
    restored: list[object] = []
    with reuseport_group("127.0.0.1:0", 3) as group:
        members = list(group.members)
        bad = _unordered(kind, members)
        with pytest.raises(InvalidArgument) as info:
            drain_close(members[0], group=bad, restore=restored.append)  # type: ignore[arg-type]
        assert str(info.value).startswith(f"invalid group {bad!r}: must be a sequence")
        assert all(m.fileno() != -1 for m in members), "nothing was closed"
        assert _no_program(members[0])
        assert restored == []


def test_bad_argument_types_raise_the_librarys_errors() -> None:
    from reuselb import inherit_sockets

    a, b = socket.socketpair()
    tcp = reuseport_listener("127.0.0.1:0")
    try:
        # One socket where a list belongs is named, not a bare TypeError.
        with pytest.raises(InvalidArgument, match="invalid socks <socket.*not one"):
            send_sockets(a, tcp)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="invalid socks None: must be a sequence"):
            send_sockets(a, None)  # type: ignore[arg-type]
        # A str is iterable, but "ab" is not the names ["a", "b"].
        with pytest.raises(InvalidArgument, match="invalid names 'ab'"):
            send_sockets(a, [tcp, tcp], names="ab")
        with pytest.raises(InvalidArgument, match="invalid names 5: must be a sequence"):
            send_sockets(a, [tcp], names=5)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="invalid socks \\[<socket.*must be a mapping"):
            inherit_sockets([tcp])  # type: ignore[arg-type]
        for group in (tcp, 5):
            with pytest.raises(InvalidArgument, match=re.escape(f"invalid group {group!r:.20}")):
                drain_close(tcp, group=group)  # type: ignore[arg-type]
            assert tcp.fileno() != -1
        with pytest.raises(WrongSocketType, match="group member 1: "):
            drain_close(tcp, group=[tcp, "x"])  # type: ignore[list-item]
        assert tcp.fileno() != -1
        closed = socket.socket()
        closed.close()
        # Named by its position: every closed socket's repr reads alike.
        with pytest.raises(SocketClosed, match="group member 1 is closed"):
            drain_close(tcp, group=[tcp, closed])
        assert tcp.fileno() != -1
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)  # every refusal came before anything was sent
    finally:
        for s in (a, b, tcp):
            s.close()


def test_adopted_sockets_keep_the_senders_blocking_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from reuselb import inherited_sockets

    nonblocking = reuseport_listener("127.0.0.1:0", nonblocking=True)
    blocking = reuseport_listener("127.0.0.1:0")
    a, b = socket.socketpair()
    try:
        send_sockets(a, [nonblocking, blocking], names=["nb", "b"])
        received = recv_sockets(b)
        fds = [os.dup(nonblocking.fileno()), os.dup(blocking.fileno())]
        monkeypatch.setenv("REUSELB_INHERITED_FDS", f"nb={fds[0]},b={fds[1]}")
        inherited = inherited_sockets()
        for socks in (received, inherited):
            with socks["nb"], socks["b"]:
                # Python's view agrees with the fd: a non-blocking accept() with an
                # empty queue is expected, not a "blocking" call that returns at once.
                assert socks["nb"].gettimeout() == 0.0
                with pytest.raises(BlockingIOError):
                    socks["nb"].accept()
                assert socks["b"].gettimeout() is None
        # The flag is the sender's too (one file description): read, never changed.
        assert not os.get_blocking(nonblocking.fileno())
        assert os.get_blocking(blocking.fileno())
    finally:
        for s in (a, b, nonblocking, blocking):
            s.close()


def test_adoption_under_a_default_timeout_leaves_the_senders_flag_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: with socket.setdefaulttimeout() in force, socket(fileno=) applied the
    # default with ioctl(FIONBIO), setting O_NONBLOCK on the file description the
    # sender shares: its blocking listener's accept() raised BlockingIOError at once,
    # and the received socket claimed a 5 s timeout.
    from reuselb import inherited_sockets

    # Made before the default is set, which would make them non-blocking too.
    nonblocking = reuseport_listener("127.0.0.1:0", nonblocking=True)
    blocking = reuseport_listener("127.0.0.1:0")
    udp = reuseport_udp("127.0.0.1:0")  # not SOCK_STREAM: its type is read, not guessed
    senders = {"nb": nonblocking, "b": blocking, "udp": udp}
    a, b = socket.socketpair()
    received: dict[str, socket.socket] = {}
    inherited: dict[str, socket.socket] = {}
    default = socket.getdefaulttimeout()
    try:
        send_sockets(a, list(senders.values()), names=list(senders))
        fds = {name: os.dup(s.fileno()) for name, s in senders.items()}
        monkeypatch.setenv(
            "REUSELB_INHERITED_FDS", ",".join(f"{name}={fd}" for name, fd in fds.items())
        )
        socket.setdefaulttimeout(5.0)  # an application-wide default, e.g. for HTTP clients
        try:
            received = recv_sockets(b)
            inherited = inherited_sockets()
        finally:
            socket.setdefaulttimeout(default)
        # The sender's sockets: one file description with those received.
        flags = {n: os.get_blocking(s.fileno()) for n, s in senders.items()}
        assert flags == {"nb": False, "b": True, "udp": True}
        for socks in (received, inherited):
            assert {n: s.gettimeout() for n, s in socks.items()} == {
                "nb": 0.0,
                "b": None,
                "udp": None,
            }
            assert {n: s.type for n, s in socks.items()} == {
                "nb": socket.SOCK_STREAM,
                "b": socket.SOCK_STREAM,
                "udp": socket.SOCK_DGRAM,
            }
            assert socks["udp"].getsockname() == udp.getsockname()
    finally:
        for s in (a, b, *senders.values(), *received.values(), *inherited.values()):
            s.close()


_SYSTEMD_CHILD = """
import json, os, sys
from reuselb import listen_fds
socks = listen_fds()
print(json.dumps({
    "names": sorted(socks),
    "types": {n: int(s.type) for n, s in socks.items()},
    "timeouts": {n: s.gettimeout() for n, s in socks.items()},
    "inheritable": any(os.get_inheritable(s.fileno()) for s in socks.values()),
    "env_left": [k for k in os.environ if k.startswith("LISTEN_")],
}))
"""

_WRAPPER = """
import os, sys
# Act like systemd: fds 3 and 4, inheritable, LISTEN_PID = the exec'd process's pid.
os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4)
os.set_inheritable(3, True); os.set_inheritable(4, True)
env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES=sys.argv[4])
if hasattr(os, "pidfd_open"):  # systemd v258+: exec keeps the process, and its pidfd id
    pidfd = os.pidfd_open(os.getpid())
    env["LISTEN_PIDFDID"] = str(os.fstat(pidfd).st_ino)
    os.close(pidfd)
os.execve(sys.executable, [sys.executable, "-c", sys.argv[3]], env)
"""


@pytest.mark.parametrize(
    ("names", "keys"),
    [
        ("web:dns", ("web", "dns")),
        # One socket unit with two Listen lines: systemd repeats its name.
        ("web:web", ("web", "web.4")),
    ],
)
def test_listen_fds_adopts_systemd_sockets(names: str, keys: tuple[str, str]) -> None:
    tcp = reuseport_listener("127.0.0.1:0", nonblocking=True)  # NonBlocking=yes
    udp = udp_socket()
    udp.bind(("127.0.0.1", 0))
    try:
        result = _child_json(
            _WRAPPER,
            str(tcp.fileno()),
            str(udp.fileno()),
            _SYSTEMD_CHILD,
            names,
            pass_fds=(tcp.fileno(), udp.fileno()),
        )
    finally:
        tcp.close()
        udp.close()
    assert result["names"] == sorted(keys)
    assert result["types"] == {keys[0]: socket.SOCK_STREAM, keys[1]: socket.SOCK_DGRAM}
    assert result["timeouts"] == {keys[0]: 0.0, keys[1]: None}  # as systemd passed them
    assert result["inheritable"] is False
    assert result["env_left"] == []


def test_listen_fds_ignores_another_pids_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds() == {}
    assert "LISTEN_FDS" not in os.environ
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "many")
    with pytest.raises(HandoffError, match="malformed"):
        listen_fds()


_HEIR = """
import json, os
from reuselb import inherited_sockets
socks = inherited_sockets()
lst = socks["web"]
lst.settimeout(30)
conn, _ = lst.accept()  # queued in the parent, accepted after exec
print(json.dumps({
    "data": conn.recv(100).decode(),
    "inheritable": os.get_inheritable(lst.fileno()),
    "env_left": "REUSELB_INHERITED_FDS" in os.environ,
}))
conn.close()
lst.close()
"""


def test_exec_inheritance_for_chosen_sockets() -> None:
    from reuselb import inherit_sockets

    lst = reuseport_listener("127.0.0.1:0")
    other = reuseport_listener("127.0.0.1:0")  # not chosen: must not reach the child
    client = connect_tcp(lst.getsockname())
    client.sendall(b"before the upgrade")
    try:
        fds, env = inherit_sockets({"web": lst})
        assert not os.get_inheritable(lst.fileno())  # only that exec gets it
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                _HEIR
                + f"\nimport os\ntry:\n    os.fstat({other.fileno()})\n    print('LEAK')\nexcept OSError:\n    pass\n",
            ],
            pass_fds=fds,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        first, *rest = out.splitlines()
        assert json.loads(first) == {
            "data": "before the upgrade",
            "inheritable": False,
            "env_left": False,
        }
        assert "LEAK" not in rest
    finally:
        for s in (lst, other, client):
            s.close()


def test_inherit_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    from reuselb import inherit_sockets, inherited_sockets

    with socket.socket() as s, pytest.raises(InvalidArgument, match="invalid name 'a,b'"):
        inherit_sockets({"a,b": s})
    for bad in ("web=notanfd", "web=99999999999999999999", f"web={2**31}"):
        monkeypatch.setenv("REUSELB_INHERITED_FDS", bad)
        with pytest.raises(HandoffError, match="malformed"):
            inherited_sockets()
        assert "REUSELB_INHERITED_FDS" not in os.environ
    with socket.socket() as s1, socket.socket() as s2:
        fds = [os.dup(s1.fileno()), os.dup(s2.fileno())]
        monkeypatch.setenv("REUSELB_INHERITED_FDS", f"web={fds[0]},web={fds[1]}")
        with pytest.raises(HandoffError, match="names 'web' twice"):
            inherited_sockets()
        # The variable is read whole before any fd is touched: neither was adopted,
        # so both are still the caller's.
        for fd in fds:
            os.fstat(fd)
            os.close(fd)


def test_inherit_refuses_one_socket_under_two_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from reuselb import inherit_sockets, inherited_sockets

    with socket.socket() as s:
        with pytest.raises(
            InvalidArgument,
            match=rf"^invalid name 'alias': names fd {s.fileno()}, as 'web' does: one name",
        ):
            inherit_sockets({"web": s, "alias": s})
        # A repeated fd in the variable (written by hand, or by an older reuselb):
        # adopting it twice would give two socket objects one fd. Refused before
        # any fd is adopted, so the fd is left open, the caller's.
        fd = os.dup(s.fileno())
        monkeypatch.setenv("REUSELB_INHERITED_FDS", f"web={fd},alias={fd},bad=999999")
        with pytest.raises(HandoffError, match=rf"gives fd {fd} twice \('web' and 'alias'\)"):
            inherited_sockets()
        os.fstat(fd)
        os.close(fd)
        assert s.fileno() != -1


def test_more_sockets_than_one_message_carries(fd_limit: Callable[[int], None]) -> None:
    """600 sockets: more than SCM_MAX_FD (253), so three chunks on one channel."""
    fd_limit(max(open_fds()) + 2 * 600 + 64)  # the 600 sent and the 600 received
    a, b = socket.socketpair()
    socks = [udp_socket() for _ in range(600)]
    before = open_fds()
    try:
        send_sockets(a, socks, names=[f"s{i}" for i in range(600)])
        got = recv_sockets(b)
        assert list(got) == [f"s{i}" for i in range(600)]
        for i in (0, 252, 253, 505, 506, 599):  # chunk edges map to the right socket
            assert os.fstat(got[f"s{i}"].fileno()).st_ino == os.fstat(socks[i].fileno()).st_ino
        for s in got.values():
            s.close()
        assert open_fds() == before
    finally:
        for s in [a, b, *socks]:
            s.close()


#: <asm-generic/socket.h>: Linux 6.5+ installs a pidfd of the sender (SCM_PIDFD) in
#: every recvmsg of a channel with this option; CPython 3.11 does not export it.
_SO_PASSPIDFD = getattr(socket, "SO_PASSPIDFD", 76)
_PASS_OPTIONS = {"cred": socket.SO_PASSCRED, "pidfd": _SO_PASSPIDFD}


def _pass(channel: socket.socket, what: str) -> None:
    """Set SO_PASSCRED / SO_PASSPIDFD ("cred", "pidfd", "cred+pidfd") on *channel*."""
    for opt in what.split("+"):
        try:
            channel.setsockopt(socket.SOL_SOCKET, _PASS_OPTIONS[opt], 1)
        except OSError as exc:
            if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
                raise
            pytest.skip(f"this kernel has no SO_PASS{opt.upper()}")


@pytest.mark.linux
@pytest.mark.parametrize(
    "kind",
    [socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET],
    ids=["stream", "dgram", "seqpacket"],
)
@pytest.mark.parametrize("count", [3, 253, 600])
@pytest.mark.parametrize("passing", ["cred", "pidfd", "cred+pidfd"])
def test_a_channel_that_passes_credentials_or_pidfds(
    kind: int, count: int, passing: str, fd_limit: Callable[[int], None]
) -> None:
    # Before: with SO_PASSPIDFD the pidfd the kernel installs at each recvmsg leaked
    # (one per message), and with SO_PASSCRED the credentials took the control
    # buffer's room, so a full chunk (253 fds) always failed with MSG_CTRUNC.
    fd_limit(max(open_fds()) + 2 * count + 64)  # sent, received, a pidfd a message
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    socks = [udp_socket() for _ in range(count)]
    try:
        _pass(b, passing)
        before = open_fds()
        send_sockets(a, socks)
        got = recv_sockets(b)
        assert len(got) == count
        for i in (0, count // 2, count - 1):
            assert os.fstat(got[str(i)].fileno()).st_ino == os.fstat(socks[i].fileno()).st_ino
        for s in got.values():
            s.close()
        assert open_fds() == before
    finally:
        for s in [a, b, *socks]:
            s.close()


@pytest.mark.linux
@pytest.mark.parametrize("free", [0, 4])
@pytest.mark.parametrize("passing", ["", "pidfd"])
def test_recv_sockets_at_the_fd_limit_says_so(free: int, passing: str) -> None:
    # The kernel installs the fds it can, closes the rest and sets MSG_CTRUNC.
    # Before: "descriptors were lost in transit", nothing about the fd limit; with
    # SO_PASSPIDFD a bare OSError (EBADF: the pidfd field held -EMFILE, not an fd,
    # and was closed).
    a, b = socket.socketpair()
    socks = [udp_socket() for _ in range(10)]
    try:
        if passing:
            _pass(b, passing)
        send_sockets(a, socks)
        before = open_fds()
        with fds_left(free), pytest.raises(HandoffError) as info:
            recv_sockets(b)
        message = str(info.value)
        assert f"installed {free} descriptor" in message
        assert "fd limit (RLIMIT_NOFILE" in message
        assert open_fds() == before  # the ones installed were closed
    finally:
        for s in [a, b, *socks]:
            s.close()


@pytest.mark.linux
@pytest.mark.parametrize(
    "kind",
    [socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET],
    ids=["stream", "dgram", "seqpacket"],
)
@pytest.mark.parametrize("count", [10, 600])
def test_after_the_fd_limit_the_sender_can_send_again_on_the_same_channel(
    kind: int, count: int, fd_limit: Callable[[int], None]
) -> None:
    # The error says "raise the limit, and send again". Before, it was raised at the
    # truncated message, and the rest of that handoff (the header's other bytes on
    # a stream, the later chunks on any channel) stayed queued: the next call read
    # it as a handoff and failed ("not a reuselb handoff message"). Now the refused
    # handoff is read to its end first.
    fd_limit(max(open_fds()) + 2 * count + 64)
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    one = udp_socket()
    try:
        b.settimeout(10)  # a hang fails as TimeoutError, not as a stuck test
        before = open_fds()
        send_sockets(a, [one] * count)
        with fds_left(3), pytest.raises(HandoffError, match="fd limit .* send again"):
            recv_sockets(b)
        assert open_fds() == before  # what was installed is closed
        send_sockets(a, [one] * count)
        got = recv_sockets(b)
        try:
            assert list(got) == [str(i) for i in range(count)]
            inode = os.fstat(one.fileno()).st_ino
            assert all(os.fstat(s.fileno()).st_ino == inode for s in got.values())
        finally:
            for s in got.values():
                s.close()
        assert open_fds() == before
    finally:
        for s in (a, b, one):
            s.close()


def test_names_with_surrogates_are_refused() -> None:
    # JSON writes a lone surrogate as \udXXX and its decoder joins a high and a low
    # one into one character: "\ud83d\ude00" arrived as "\U0001f600", so a
    # handoff naming both was sent and then refused as a repeated name, and one
    # naming the first alone arrived under another name.
    a, b = socket.socketpair()
    one = udp_socket()
    try:
        for names in (["\ud83d\ude00", "\U0001f600"], ["\ud83d\ude00", "x"], ["a\udc80"]):
            with pytest.raises(InvalidArgument) as info:
                send_sockets(a, [one] * len(names), names=names)
            assert "surrogate" in str(info.value)
            assert repr(names[0]) in str(info.value)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)  # nothing was sent
        send_sockets(a, [one], names=["\U0001f600"])  # the character itself is text
        b.setblocking(True)
        got = recv_sockets(b)
        assert list(got) == ["\U0001f600"]
        got["\U0001f600"].close()
    finally:
        for s in (a, b, one):
            s.close()


def test_a_name_s_size_counts_json_escapes() -> None:
    # The documented rule: a printable ASCII character is one byte, \n and the
    # other short escapes two, any other control character six (\u0001).
    a, b = socket.socketpair()
    one = udp_socket()
    try:
        for name in ("\n" * 127, "\x01" * 42, "x" * 255, '"' * 127):
            send_sockets(a, [one], names=[name])
            got = recv_sockets(b)
            assert list(got) == [name]
            got[name].close()
        for name, size in (("\n" * 128, 256), ("\x01" * 43, 258), ("\u00e9" * 43, 258)):
            with pytest.raises(InvalidArgument, match=f"is {size} bytes as JSON"):
                send_sockets(a, [one], names=[name])
    finally:
        for s in (a, b, one):
            s.close()


def test_a_header_listing_no_sockets_is_refused() -> None:
    # send_sockets never sends one; recv_sockets returned {} and the caller's
    # lookup by name then failed with a bare KeyError.
    a, b = socket.socketpair()
    with a, b:
        header = json.dumps({"sockets": []}).encode()
        a.sendall(struct.pack("!4sI", b"RLB1", len(header)) + header)
        with pytest.raises(HandoffError, match=r"malformed handoff header: 'sockets' is \[\]"):
            recv_sockets(b)


@pytest.mark.parametrize(
    "kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET], ids=lambda k: socket.SocketKind(k).name
)
def test_a_listening_or_unconnected_channel_is_named(kind: int, tmp_path: Path) -> None:
    # The server's socket passed instead of the connection accept() returned: the
    # kernel's EINVAL (recvmsg) or ENOTCONN (sendmsg) named nothing.
    one = udp_socket()
    with one, socket.socket(socket.AF_UNIX, kind) as server:
        server.bind(str(tmp_path / "channel"))
        server.listen()
        with socket.socket(socket.AF_UNIX, kind) as loose:
            for channel, why in ((server, "is a listening socket"), (loose, "is not connected")):
                with pytest.raises(InvalidArgument, match=why) as info:
                    recv_sockets(channel)
                assert info.value.name == "channel"
                with pytest.raises(InvalidArgument, match=why):
                    send_sockets(channel, [one])
                assert channel.fileno() != -1  # the caller's: not closed


def test_an_unconnected_datagram_channel_receives_but_does_not_send(tmp_path: Path) -> None:
    one = udp_socket()
    with one, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(tmp_path / "channel"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            with pytest.raises(InvalidArgument, match="is not connected"):
                send_sockets(client, [one])
            client.connect(str(tmp_path / "channel"))
            send_sockets(client, [one], names=["u"])
            got = recv_sockets(server)  # bound, not connected: receives
            assert list(got) == ["u"]
            got["u"].close()


# Not in CPython's socket module: asm-generic/socket.h.
_SO_SNDBUFFORCE = 32


@pytest.mark.parametrize(
    "kind", [socket.SOCK_DGRAM, socket.SOCK_SEQPACKET], ids=lambda k: socket.SocketKind(k).name
)
def test_a_datagram_header_over_four_mebibytes_is_refused_whatever_the_buffer(
    kind: int,
) -> None:
    # One AF_UNIX message stops at ~4 MiB (its buffer is one kmalloc) whatever
    # SO_SNDBUF says: with the buffer raised, sendmsg failed with a bare ENOBUFS,
    # and the advice "raise SO_SNDBUF" could not help.
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    with a, b, reuseport_listener("127.0.0.1:0") as listener:
        try:
            a.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, 64 << 20)
        except PermissionError:
            pytest.skip("SO_SNDBUFFORCE needs CAP_NET_ADMIN")
        names = [f"{i:0255d}" for i in range(17_000)]  # ~5.4 MB of header
        before = open_fds()
        with pytest.raises(InvalidArgument, match="stops at about 4 MiB") as info:
            send_sockets(a, [listener] * len(names), names=names)
        assert "raise SO_SNDBUF" not in str(info.value)
        assert "its SO_SNDBUF" not in str(info.value)  # the buffer is not the limit here
        assert open_fds() == before
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)  # nothing was sent


@pytest.mark.linux
@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["stream", "dgram"])
def test_a_refused_handoff_on_a_pidfd_channel_leaks_nothing(kind: int) -> None:
    # The error paths close the pidfd too: it is not among the handoff's fds.
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    udp = udp_socket()
    try:
        _pass(b, "pidfd")
        header = json.dumps({"sockets": [dict(_GOOD, name="x")]}).encode()  # says TCP
        before = open_fds()
        a.sendmsg(
            [struct.pack("!4sI", b"RLB1", len(header)) + header],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", udp.fileno()))],
        )
        with pytest.raises(HandoffError, match="sender said"):
            recv_sockets(b)
        assert open_fds() == before
    finally:
        for s in (a, b, udp):
            s.close()


def _handoff_in_a_thread(
    socks: list[socket.socket], names: list[str] | None
) -> dict[str, socket.socket]:
    """send_sockets in a thread (a large header fills the channel), recv_sockets here."""
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            send_sockets(a, socks, names=names)
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        got = recv_sockets(b)
    finally:
        b.close()  # unblocks a sender stuck on a receiver that gave up
        sender.join(30)
        a.close()
    assert not errors, errors
    return got


@pytest.mark.parametrize(
    ("count", "name_size"),
    [
        (17_000, None),  # default names: the old 1 MiB limit held 16,557 of them
        (4_000, 255),  # names of the longest size (_MAX_NAME): 1.28 MB of header
    ],
)
def test_a_header_over_one_mebibyte_is_received(
    count: int, name_size: int | None, fd_limit: Callable[[int], None]
) -> None:
    # Before: send_sockets took them, and recv_sockets refused any header over
    # 1 MiB, so every such handoff failed although the docs promise 65,536.
    names = None if name_size is None else [f"{i:0{name_size}d}" for i in range(count)]
    fd_limit(max(open_fds()) + count + 64)  # (skips where the hard limit is lower)
    one = udp_socket()
    try:
        # One socket sent *count* times: the sender needs one fd, the receiver
        # gets one per SCM_RIGHTS entry.
        got = _handoff_in_a_thread([one] * count, names)
        try:
            assert len(got) == count
            assert list(got)[-1] == (str(count - 1) if names is None else names[-1])
            inode = os.fstat(one.fileno()).st_ino
            assert all(os.fstat(s.fileno()).st_ino == inode for s in got.values())
        finally:
            for s in got.values():
                s.close()
    finally:
        one.close()


def test_the_largest_handoff_fits_the_receivers_limit() -> None:
    # The documented maximum: 65,536 sockets whose names all have the longest
    # size, with family and type numbers wider than any the kernel has.
    names = [f"{i:0{_handoff._MAX_NAME}d}" for i in range(65536)]
    widest: dict[str, object] = {"family": 65535, "type": 65535, "listening": False}
    header = _handoff._header(names, [widest] * 65536)
    assert len(header) == _handoff._MAX_JSON
    assert json.loads(header)["sockets"][-1]["name"] == names[-1]
    # A name of the longest size per character class is still taken.
    for name in ("x" * 255, "\u00e9" * 42, "\U0001f600" * 21, '"' * 127):
        assert len(json.dumps(name)) - 2 <= _handoff._MAX_NAME


@pytest.mark.parametrize(
    "name",
    ["x" * 256, "\u00e9" * 43, "\U0001f600" * 22, '"' * 128],
    ids=["ascii", "latin", "astral", "escaped"],
)
def test_send_sockets_refuses_a_name_too_long_before_sending(name: str) -> None:
    a, b = socket.socketpair()
    try:
        with udp_socket() as one, pytest.raises(InvalidArgument) as info:
            send_sockets(a, [one, one], names=["ok", name])
        assert info.value.value == name
        assert f"invalid name {name!r}: is " in str(info.value)
        assert "a name may have at most 255" in str(info.value)
        with pytest.raises(BlockingIOError):
            b.recv(1, socket.MSG_DONTWAIT)  # nothing was sent
    finally:
        a.close()
        b.close()


def test_send_sockets_refuses_a_header_too_large_before_sending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Unreachable within the documented bounds; a limit made small shows that
    # nothing is sent when it is exceeded (the receiver would refuse it).
    monkeypatch.setattr(_handoff, "_MAX_JSON", 100)
    a, b = socket.socketpair()
    try:
        with udp_socket() as one, pytest.raises(InvalidArgument) as info:
            send_sockets(a, [one] * 3)
        assert "invalid socks '3 sockets': header too large (" in str(info.value)
        assert "bytes, limit 100)" in str(info.value)
        with pytest.raises(BlockingIOError):
            b.recv(1, socket.MSG_DONTWAIT)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
@pytest.mark.parametrize("excess", [1, None])
def test_recv_sockets_names_a_header_too_large(kind: int, excess: int | None) -> None:
    # Before: "not a reuselb handoff message", about a message that was one. Up
    # to an absurd length field (None: the largest), refused before it is read.
    length = 2**32 - 1 if excess is None else _handoff._MAX_JSON + excess
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    try:
        a.send(struct.pack("!4sI", b"RLB1", length) + b"{}")
        with pytest.raises(HandoffError) as info:
            recv_sockets(b)
        assert f"header too large ({length} bytes, limit {_handoff._MAX_JSON})" in str(info.value)
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- listen_fds input


def _pid_spellings() -> list[str]:
    """Spellings int() reads as this process's pid and systemd never writes."""
    pid = str(os.getpid())
    arabic = pid.translate({ord(d): chr(0x660 + int(d)) for d in "0123456789"})
    return [f"+{pid}", f" {pid}", f"{pid} ", f"{pid}\n", f"{pid[0]}_{pid[1:]}", arabic]


@pytest.mark.parametrize("index", range(6))
def test_listen_fds_refuses_a_pid_int_would_take(
    monkeypatch: pytest.MonkeyPatch, index: int
) -> None:
    value = _pid_spellings()[index]
    monkeypatch.setenv("LISTEN_PID", value)
    monkeypatch.setenv("LISTEN_FDS", "1")
    before = open_fds()
    with pytest.raises(HandoffError) as info:
        listen_fds()
    assert f"malformed LISTEN_PID={value!r}: expected a decimal number" in str(info.value)
    assert not [k for k in os.environ if k.startswith("LISTEN_")]
    assert open_fds() == before


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("1_0", "expected a decimal number"),
        (" 1", "expected a decimal number"),
        ("1 ", "expected a decimal number"),
        ("+1", "expected a decimal number"),
        ("\u0661", "expected a decimal number"),
        ("0x1", "expected a decimal number"),
        ("-1", "expected a decimal number"),
        ("", "expected a decimal number"),
        ("1" * 11, "expected a decimal number"),
        ("0", "expected 1 to 65536"),  # sd_listen_fds refuses 0 too
        ("65537", "expected 1 to 65536"),
    ],
)
def test_listen_fds_refuses_a_malformed_count(
    monkeypatch: pytest.MonkeyPatch, value: str, needle: str
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_PIDFDID", str(_own_pidfd_id()))
    monkeypatch.setenv("LISTEN_FDS", value)
    before = open_fds()
    with pytest.raises(HandoffError) as info:
        listen_fds()
    assert f"malformed LISTEN_FDS={value!r}: {needle}" in str(info.value)
    assert not [k for k in os.environ if k.startswith("LISTEN_")]
    assert open_fds() == before


def _own_pidfd_id() -> int:
    """This process's pidfd inode id, as systemd v258 writes it to LISTEN_PIDFDID."""
    if not hasattr(os, "pidfd_open"):
        pytest.skip("needs os.pidfd_open")
    try:
        pidfd = os.pidfd_open(os.getpid())
    except OSError as exc:
        pytest.skip(f"no pidfd here: {exc}")
    try:
        return os.fstat(pidfd).st_ino
    finally:
        os.close(pidfd)


def test_listen_fds_ignores_variables_whose_pidfd_id_names_another_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # LISTEN_PID matches, but LISTEN_PIDFDID says they were meant for another
    # process that had this pid (pid reuse): sd_listen_fds returns 0, before it
    # reads LISTEN_FDS. Were the variables taken, LISTEN_FDS would raise here.
    own = _own_pidfd_id()
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_PIDFDID", str(own + 12345))
    monkeypatch.setenv("LISTEN_FDS", "many")
    before = open_fds()
    assert listen_fds() == {}
    assert not [k for k in os.environ if k.startswith("LISTEN_")]
    assert open_fds() == before  # the pidfd is closed again
    # This process's own id: the variables are read (and LISTEN_FDS refused).
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_PIDFDID", str(own))
    monkeypatch.setenv("LISTEN_FDS", "many")
    with pytest.raises(HandoffError, match="malformed LISTEN_FDS='many'"):
        listen_fds()
    assert open_fds() == before
    # With another LISTEN_PID, LISTEN_PIDFDID is not read at all.
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_PIDFDID", "junk")
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds() == {}


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("junk", "expected a decimal number"),
        ("+7", "expected a decimal number"),
        (" 7", "expected a decimal number"),
        ("7_0", "expected a decimal number"),
        ("\u0667", "expected a decimal number"),
        ("", "expected a decimal number"),
        ("1" * 21, "expected a decimal number"),
        ("0", f"expected 1 to {2**64 - 1}"),
        (str(2**64), f"expected 1 to {2**64 - 1}"),
    ],
)
def test_listen_fds_refuses_a_malformed_pidfd_id(
    monkeypatch: pytest.MonkeyPatch, value: str, needle: str
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_PIDFDID", value)
    monkeypatch.setenv("LISTEN_FDS", "1")
    before = open_fds()
    with pytest.raises(HandoffError) as info:
        listen_fds()
    assert f"malformed LISTEN_PIDFDID={value!r}: {needle}" in str(info.value)
    assert not [k for k in os.environ if k.startswith("LISTEN_")]
    assert open_fds() == before


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, None])
def test_listen_fds_skips_the_pidfd_check_without_pidfds(
    monkeypatch: pytest.MonkeyPatch, code: int | None
) -> None:
    # Linux before 5.3 (ENOSYS), a seccomp filter (EPERM), or no os.pidfd_open:
    # nothing to compare with, so LISTEN_PID alone decides, as before v258.
    if code is None:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    else:

        def refuse(pid: int, flags: int = 0) -> int:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "pidfd_open", refuse, raising=False)
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_PIDFDID", "12345")
    monkeypatch.setenv("LISTEN_FDS", "many")
    with pytest.raises(HandoffError, match="malformed LISTEN_FDS='many'"):
        listen_fds()


def test_listen_fds_names_a_failed_pidfd_check(monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_fds(pid: int, flags: int = 0) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "pidfd_open", out_of_fds, raising=False)
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_PIDFDID", "12345")
    monkeypatch.setenv("LISTEN_FDS", "1")
    with pytest.raises(HandoffError, match=r"cannot check LISTEN_PIDFDID='12345'.*Too many"):
        listen_fds()
    assert not [k for k in os.environ if k.startswith("LISTEN_")]


@pytest.mark.parametrize("names", ["a.5:a:a", "a:a:a.4", "a:a.5:a"])
def test_listen_fds_refuses_a_repeat_that_would_take_another_fds_name(
    monkeypatch: pytest.MonkeyPatch, names: str
) -> None:
    # The repeat of "a" at fd 5 (or 4) would be named "a.5" ("a.4"), which a literal
    # name already is: one socket would overwrite the other and be dropped.
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "3")
    monkeypatch.setenv("LISTEN_FDNAMES", names)
    before = open_fds()
    with pytest.raises(HandoffError, match=r"would be named 'a\.[45]', which another fd"):
        listen_fds()
    assert open_fds() == before  # checked before any fd was adopted


@pytest.mark.parametrize(("names", "found"), [("a:b:c", 3), ("a", 1), ("", 0)])
def test_listen_fds_refuses_names_that_do_not_match_the_count(
    monkeypatch: pytest.MonkeyPatch, names: str, found: int
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", names)
    before = open_fds()
    with pytest.raises(HandoffError) as info:
        listen_fds()
    assert f"LISTEN_FDNAMES={names!r} has {found} name(s) for LISTEN_FDS='2'" in str(info.value)
    assert open_fds() == before


_COUNT_CHILD = """
import json, os
from reuselb import HandoffError, listen_fds
out = {}
try:
    os.fstat(4)
    out["fd4_open_before"] = True
except OSError:
    out["fd4_open_before"] = False
try:
    listen_fds()
    out["error"] = None
except HandoffError as exc:
    out["error"] = str(exc)
try:
    os.fstat(3)
    out["fd3_open_after"] = True
except OSError:
    out["fd3_open_after"] = False
out["env_left"] = [k for k in os.environ if k.startswith("LISTEN_")]
print(json.dumps(out))
"""

_ONE_FD_WRAPPER = """
import os, sys
# LISTEN_FDS promises fds 3 and 4; only fd 3 is there.
os.dup2(int(sys.argv[1]), 3)
os.set_inheritable(3, True)
try:
    os.close(4)
except OSError:
    pass
env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS="2")
os.execve(sys.executable, [sys.executable, "-c", sys.argv[2]], env)
"""


def test_listen_fds_names_an_fd_that_is_not_open() -> None:
    with reuseport_listener("127.0.0.1:0") as tcp:
        result = _child_json(
            _ONE_FD_WRAPPER, str(tcp.fileno()), _COUNT_CHILD, pass_fds=(tcp.fileno(),)
        )
    assert result["fd4_open_before"] is False
    assert result["error"] is not None, "an fd that is not open must raise HandoffError"
    assert "LISTEN_FDS='2' lists fd 4 ('fd4'), which is not open" in result["error"]
    assert result["fd3_open_after"] is True  # checked before any fd was adopted
    assert result["env_left"] == []


_LAYOUT_CHILD = """
import json, os, socket, sys
# Act like systemd: fds 3, 4, ... as argv[1] spells them ("s" a socket, "f" a
# file), inheritable, and LISTEN_FDS counting them all.
spec = sys.argv[1]
for i, kind in enumerate(spec):
    if kind == "s":
        s = socket.socket()
        fd = s.detach()
    else:
        fd = os.open(os.devnull, os.O_RDONLY)
    if fd != 3 + i:
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    os.set_inheritable(3 + i, True)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(spec)))
from reuselb import HandoffError, listen_fds
try:
    listen_fds()
    error = None
except HandoffError as exc:
    error = str(exc)
fds = {}
for i in range(len(spec)):
    try:
        fds[3 + i] = "inheritable" if os.get_inheritable(3 + i) else "cloexec"
    except OSError:
        fds[3 + i] = "closed"
print(json.dumps({"error": error, "fds": fds}))
"""


def _child_json(*args: str, pass_fds: tuple[int, ...] = ()) -> dict[str, Any]:
    """Run ``python -c *args*`` (a child script and its arguments) with *pass_fds*
    inherited, and return the JSON object it prints."""
    out = subprocess.run(
        [sys.executable, "-c", *args],
        pass_fds=pass_fds,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _listen_fds_with(spec: str) -> dict[str, Any]:
    """Run listen_fds() in a child whose fds 3, 4, ... are laid out as *spec* says."""
    result = _child_json(_LAYOUT_CHILD, spec)
    result["fds"] = {int(fd): state for fd, state in result["fds"].items()}
    return result


def test_listen_fds_refuses_a_file_without_touching_it() -> None:
    # Before: close-on-exec was set first and the fd refused after, so the
    # caller's file (inheritable, as passed) lost its flag.
    result = _listen_fds_with("f")
    assert result["fds"] == {3: "inheritable"}
    assert result["error"] is not None
    assert "LISTEN_FDS fd 3 ('fd3') is not a socket: a character device" in result["error"]


def test_inherited_sockets_refuses_a_file_without_touching_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from reuselb import inherited_sockets

    # A stray variable naming a pipe (or stdout): refused, and its close-on-exec
    # flag left alone (before: set, so every later child lost that fd).
    r, w = os.pipe()
    try:
        os.set_inheritable(w, True)
        monkeypatch.setenv("REUSELB_INHERITED_FDS", f"out={w}")
        with pytest.raises(HandoffError) as info:
            inherited_sockets()
        assert os.get_inheritable(w) is True
        assert not os.get_inheritable(r)
        assert f"inherited fd {w} ('out') is not a socket: a FIFO" in str(info.value)
    finally:
        os.close(r)
        os.close(w)
    monkeypatch.setenv("REUSELB_INHERITED_FDS", f"gone={w}")
    with pytest.raises(HandoffError, match=rf"inherited fd {w} \('gone'\) is not an open socket"):
        inherited_sockets()


@pytest.mark.parametrize("spec", ["sfs", "ssf", "fss"])
def test_listen_fds_checks_every_fd_before_touching_any(spec: str) -> None:
    # Before: the sockets before the file were adopted and closed (a socket
    # systemd passed, gone) and those after it left as they were; now a refusal
    # changes nothing, whichever fd it is.
    result = _listen_fds_with(spec)
    assert result["fds"] == {3: "inheritable", 4: "inheritable", 5: "inheritable"}
    bad = 3 + spec.index("f")
    assert f"LISTEN_FDS fd {bad} ('fd{bad}') is not a socket: a character device" in (
        result["error"] or ""
    )


def test_inherited_sockets_reads_the_whole_variable_before_touching_any_fd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from reuselb import inherited_sockets

    socks = [socket.socket() for _ in range(2)]
    fds = [os.dup(s.fileno()) for s in socks]
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        for fd in (*fds, devnull):
            os.set_inheritable(fd, True)  # as after a pass_fds exec
        for value, needle in [
            (f"a={fds[0]},b={fds[1]},d=notanumber", "malformed"),
            (f"a={fds[0]},bad={devnull},c={fds[1]}", f"inherited fd {devnull} ('bad')"),
        ]:
            monkeypatch.setenv("REUSELB_INHERITED_FDS", value)
            with pytest.raises(HandoffError, match=re.escape(needle)):
                inherited_sockets()
            # Before: 'a' adopted then closed, 'c' left inheritable.
            assert [os.get_inheritable(fd) for fd in (*fds, devnull)] == [True] * 3
    finally:
        for fd in (*fds, devnull):
            os.close(fd)
        for s in socks:
            s.close()


@pytest.mark.parametrize("failing", [0, 1, 2])
def test_a_failed_adoption_leaves_no_listed_fd_inheritable(
    monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    from reuselb import inherited_sockets

    # Every fd passes the checks, then adopting one fails (here: injected). The
    # sockets adopted before it are closed; the rest stay open, and none of them
    # leaks into a later child (before: those after it were left inheritable).
    socks = [socket.socket() for _ in range(3)]
    fds = [os.dup(s.fileno()) for s in socks]
    for fd in fds:
        os.set_inheritable(fd, True)
    real = _handoff._adopt
    calls = []

    def flaky(fd: int, holder: socket.socket) -> socket.socket:
        calls.append(fd)
        if len(calls) - 1 == failing:
            raise OSError(errno.ENOMEM, "injected")
        return real(fd, holder)

    monkeypatch.setattr(_handoff, "_adopt", flaky)
    monkeypatch.setenv("REUSELB_INHERITED_FDS", ",".join(f"s{i}={fd}" for i, fd in enumerate(fds)))
    try:
        with pytest.raises(HandoffError, match=rf"fd {fds[failing]} \('s{failing}'\).*injected"):
            inherited_sockets()
        for i, fd in enumerate(fds):
            if i < failing:  # adopted, then closed with the error
                with pytest.raises(OSError, match="Bad file descriptor"):
                    os.fstat(fd)
            else:
                assert os.get_inheritable(fd) is False
                os.close(fd)
    finally:
        for s in socks:
            s.close()


def _interrupt_after_init_with_fileno(monkeypatch: pytest.MonkeyPatch, at: int) -> list[int]:
    """Make the *at*-th ``socket.socket.__init__(fileno=fd)`` raise KeyboardInterrupt
    once it has taken the fd (a signal handler raising at the next bytecode).

    Returns the fds seen, in order.
    """
    real_init = socket.socket.__init__
    seen: list[int] = []

    def init(self: socket.socket, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        if kwargs.get("fileno") is not None:
            seen.append(kwargs["fileno"])
            if len(seen) == at:
                raise KeyboardInterrupt("a signal right after socket(fileno=fd)")

    monkeypatch.setattr(socket.socket, "__init__", init)
    return seen


def test_recv_sockets_interrupted_mid_adoption_closes_each_fd_once(
    monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    # Before: the interrupted fd was closed by recv_sockets' cleanup and again by
    # the socket object that had taken it, when collected: by then the number was
    # another file's (here a pipe's), closed behind its owner's back.
    a, b = socket.socketpair()
    socks = [udp_socket() for _ in range(2)]
    r, w = os.pipe()  # before: its numbers are not the received fds'
    try:
        send_sockets(a, socks)
        seen = _interrupt_after_init_with_fileno(monkeypatch, 2)
        interrupted = None
        try:
            recv_sockets(b)
        except KeyboardInterrupt as exc:
            interrupted = exc  # keeps the traceback, and an object it holds, alive
        monkeypatch.undo()
        assert interrupted is not None and len(seen) == 2
        for fd in seen:  # both received fds closed by the cleanup
            with pytest.raises(OSError, match="Bad file descriptor"):
                os.fstat(fd)
        # Another file takes the interrupted fd's number, as any open() might.
        os.dup2(r, seen[1])
        try:
            del interrupted
            gc.collect()
            assert os.fstat(seen[1]).st_ino == os.fstat(r).st_ino  # still the pipe's
        finally:
            os.close(seen[1])
    finally:
        os.close(r)
        os.close(w)
        for s in (a, b, *socks):
            s.close()


def test_inherited_sockets_interrupted_mid_adoption_leaves_that_fd_the_callers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from reuselb import inherited_sockets

    # Before: the socket object interrupted after taking the 2nd fd was dropped
    # still owning it and closed it when collected: an fd not adopted is the
    # caller's, and must stay open.
    socks = [socket.socket() for _ in range(3)]
    fds = [os.dup(s.fileno()) for s in socks]
    monkeypatch.setenv("REUSELB_INHERITED_FDS", ",".join(f"s{i}={fd}" for i, fd in enumerate(fds)))
    seen = _interrupt_after_init_with_fileno(monkeypatch, 2)
    try:
        interrupted = None
        try:
            inherited_sockets()
        except KeyboardInterrupt as exc:
            interrupted = exc
        monkeypatch.undo()
        assert interrupted is not None and seen == fds[:2]
        del interrupted
        gc.collect()
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fds[0])  # adopted, then closed with the error
        for fd in fds[1:]:
            assert stat.S_ISSOCK(os.fstat(fd).st_mode)  # still open, still the caller's
    finally:
        for fd in fds[1:]:
            with contextlib.suppress(OSError):  # closed already only if the test failed
                os.close(fd)
        for s in socks:
            s.close()


def test_inherited_sockets_twice_never_wraps_one_fd_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from reuselb import inherited_sockets

    # Before: the second call made a second socket object on the same fd; closing
    # both closed whatever file had taken the number in between.
    with socket.socket() as s:
        fd = os.dup(s.fileno())
        monkeypatch.setenv("REUSELB_INHERITED_FDS", f"web={fd}")
        first = inherited_sockets(unset_environment=False)["web"]
        try:
            with pytest.raises(HandoffError) as info:
                inherited_sockets(unset_environment=False)
            assert f"inherited fd {fd} ('web') is already adopted by an earlier call" in str(
                info.value
            )
            assert first.fileno() == fd and os.get_inheritable(fd) is False
            # Detached, the first object gives the fd up: it may be adopted again.
            assert first.detach() == fd
            again = inherited_sockets(unset_environment=False)["web"]
            assert again.fileno() == fd
            first = again
            # Closed while a makefile() still uses the fd: still refused, saying why.
            stream = first.makefile("rb")
            first.close()
            with pytest.raises(HandoffError, match="open makefile"):
                inherited_sockets(unset_environment=False)
            stream.close()
        finally:
            first.close()
        # Closed: the number is free, and the variable now names nothing open.
        with pytest.raises(HandoffError, match=rf"inherited fd {fd} \('web'\) is not an open"):
            inherited_sockets()


_ADOPT_TWICE_CHILD = """
import json, os, socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
fd = s.detach()
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", REUSELB_INHERITED_FDS="web=3")
from reuselb import HandoffError, inherited_sockets, listen_fds
first = listen_fds(unset_environment=False)["fd3"]
errors = []
for again in (lambda: listen_fds(unset_environment=False), inherited_sockets):
    try:
        again()
        errors.append(None)
    except HandoffError as exc:
        errors.append(str(exc))
print(json.dumps({"errors": errors, "first_open": first.fileno() == 3}))
"""


def test_listen_fds_twice_never_wraps_one_fd_twice() -> None:
    result = _child_json(_ADOPT_TWICE_CHILD)
    assert result["first_open"] is True
    again, inherited = result["errors"]
    assert again is not None and "LISTEN_FDS fd 3 ('fd3') is already adopted" in again
    assert inherited is not None and "inherited fd 3 ('web') is already adopted" in inherited


# --------------------------------------------------------------------------- drain_close input


def _no_program(member: socket.socket) -> bool:
    """True when the member's group has no steering program (detach has nothing to do)."""
    try:
        detach_steering(member)
    except SteeringError:
        return True
    return False


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("grace", "0.2", "must be a number of seconds"),
        ("grace", None, "must be a number of seconds"),
        ("grace", True, "must be a number of seconds"),
        ("grace", -1, "must be >= 0 seconds"),
        ("grace", math.nan, "must be >= 0 seconds"),
        ("grace", math.inf, "must be finite"),
        ("timeout", "10", "must be a number of seconds"),
        ("timeout", False, "must be a number of seconds"),
        ("timeout", 0, "must be > 0 seconds"),
        ("timeout", -0.5, "must be > 0 seconds"),
        ("timeout", math.nan, "must be > 0 seconds"),
        ("timeout", math.inf, "must be finite"),
        ("timeout", 10**400, "must be finite"),
    ],
)
def test_drain_close_checks_arguments_before_changing_anything(
    name: str, value: object, needle: str
) -> None:
    with reuseport_group("127.0.0.1:0", 2) as group:
        before = list(group._members)
        with pytest.raises(InvalidArgument) as info:
            drain_close(group[1], group=group, **{name: value})  # type: ignore[arg-type]
        assert f"invalid {name} {value!r}: {needle}" in str(info.value)
        assert group[1].fileno() != -1, "the caller's listener was closed"
        assert group._members == before
        assert _no_program(group[0])


@pytest.mark.parametrize("migrate", [True, False])
def test_drain_close_refuses_a_listener_outside_the_group(
    monkeypatch: pytest.MonkeyPatch, migrate: bool
) -> None:
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: migrate)
    with reuseport_group("127.0.0.1:0", 2) as group, reuseport_listener("127.0.0.1:0") as other:
        with pytest.raises(InvalidArgument, match="is not a member of group"):
            drain_close(other, group=group)
        assert other.fileno() != -1
        assert len(group) == 2 and all(m.fileno() != -1 for m in group)


@pytest.mark.parametrize("migrate", [True, False])
@pytest.mark.parametrize("kind", ["alone", "list"])
def test_drain_close_needs_another_open_member_on_both_paths(
    monkeypatch: pytest.MonkeyPatch, migrate: bool, kind: str
) -> None:
    # Before, on the migrate path: the listener was closed, its queue reset (no
    # member to migrate to) and the result said path="migrate", no error.
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: migrate)
    with reuseport_group("127.0.0.1:0", 1) as group:
        listener = group[0]
        target: ReuseportGroup | list[socket.socket] = group
        if kind == "list":
            target = [listener]
        before = list(group._members)
        with pytest.raises(InvalidArgument) as info:
            drain_close(listener, group=target)
        assert "has no open member besides listener to take its connections" in str(info.value)
        assert listener.fileno() != -1
        assert group._members == before
        assert _no_program(listener)


@pytest.mark.parametrize("migrate", [True, False])
@pytest.mark.parametrize(
    ("order", "again", "first"),
    [((0, 0), 1, 0), ((0, 1, 0), 2, 0), ((1, 0, 0), 2, 1), ((0, 1, 1), 2, 1)],
)
def test_drain_close_refuses_a_socket_listed_twice(
    monkeypatch: pytest.MonkeyPatch, migrate: bool, order: tuple[int, ...], again: int, first: int
) -> None:
    # Before: group=[a, b, a] was taken for a group of 3 (the repeat was passed
    # over as a stand-in for a taken member): the steer path attached a program
    # for 3 members, restore= got the closed listener back (SocketClosed in
    # steering_error) and the group was left with no program; [a, a] closed the
    # listener on the migrate path with no member to migrate to.
    from reuselb import attach_hash_steering

    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: migrate)
    restored: list[object] = []

    def restore(group: object) -> None:
        restored.append(group)
        attach_hash_steering(group)  # type: ignore[arg-type]

    with reuseport_group("127.0.0.1:0", 2) as group:
        listener = group[0]
        target = [group[i] for i in order]
        with pytest.raises(InvalidArgument) as info:
            drain_close(listener, group=target, restore=restore, grace=0, timeout=1)
        assert str(info.value).startswith(
            f"invalid group member {again} {target[again]!r}: is group member {first} "
            "listed again: a kernel reuseport group holds each socket once"
        )
        assert listener.fileno() != -1
        assert restored == []
        assert _no_program(listener)


@pytest.mark.parametrize("migrate", [True, False])
@pytest.mark.parametrize(("closed", "listener_at"), [(1, 0), (2, 0), (0, 2), (1, 2)])
def test_drain_close_refuses_a_group_member_closed_by_hand(
    monkeypatch: pytest.MonkeyPatch, migrate: bool, closed: int, listener_at: int
) -> None:
    # Before: on the migrate path the listener was closed and the group updated
    # from indexes the kernel no longer had (a member closed by hand left its
    # group, and the kernel moved the last member into its slot), so the group
    # and a restore= program were wrong; the steer path refused it with a
    # SocketClosed naming no member.
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: migrate)
    with reuseport_group("127.0.0.1:0", 3) as group:
        members = list(group)
        listener = members[listener_at]
        members[closed].close()
        before = list(group._members)
        with pytest.raises(SocketClosed) as info:
            drain_close(listener, group=group, grace=0, timeout=1)
        assert str(info.value).startswith(
            f"group member {closed} is closed: {members[closed]!r}; closed by hand, it "
            "left the kernel's reuseport group"
        )
        assert listener.fileno() != -1
        assert group._members == before
        assert _no_program(listener)


def test_detach_through_passes_over_a_member_in_no_group() -> None:
    # A member another thread shut down is in no group: detach_steering refuses
    # it (InvalidArgument), which must not escape drain_close's cleanup.
    with reuseport_group("127.0.0.1:0", 3) as group:
        steer_all_to(group, 0)
        group[1].shutdown(socket.SHUT_RD)
        assert _handoff._detach_through([group[1], group[2]]) is None
        assert _no_program(group[0])
        assert _handoff._detach_through([group[1]]) is not None


@pytest.mark.parametrize("migrate", [False, True])
@pytest.mark.parametrize("with_other", [False, True], ids=["dup only", "dup and a member"])
def test_drain_close_does_not_take_a_dup_of_the_listener_for_another_member(
    monkeypatch: pytest.MonkeyPatch, migrate: bool, with_other: bool
) -> None:
    # Before: group=[lst, lst.dup()] passed the "another open member" check (objects
    # compared, not sockets) and drain_close reported success, while the dup kept
    # the listener's socket, its queue and its place in the kernel group.
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: migrate)
    with reuseport_group("127.0.0.1:0", 2) as group:
        listener = group[0]
        with listener.dup() as twin:
            target = [listener, twin, group[1]] if with_other else [listener, twin]
            with pytest.raises(InvalidArgument) as info:
                drain_close(listener, group=target, grace=0, timeout=1)
            assert str(info.value).startswith(f"invalid group member 1 {twin!r}: ")
            assert "is the same socket as listener" in str(info.value)
            assert listener.fileno() != -1
            assert _no_program(listener)
            # The check itself compares sockets: a dup is the listener.
            assert not _handoff._has_another_member(listener, target[:2], target[:2], 0)


@pytest.mark.parametrize("migrate", [False, True])
@pytest.mark.parametrize("odd", ["holder", "other port", "udp"])
def test_drain_close_refuses_a_member_outside_the_listeners_group(
    monkeypatch: pytest.MonkeyPatch, migrate: bool, odd: str
) -> None:
    from reuselb import hold_port, reuseport_udp

    # Before: a hold_port() socket first in the list took the steering program
    # into a group of its own; SYNs kept reaching the listener until the timeout.
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: migrate)
    with reuseport_group("127.0.0.1:0", 2) as group:
        listener, rest = group[0], group[1]
        port = group.port
        if odd == "holder":
            outsider = hold_port(f"127.0.0.1:{port}")
            needle = "is not listening"
        elif odd == "other port":
            outsider = reuseport_listener("127.0.0.1:0")
            needle = f"is TCP on {socket_info(outsider).address} but listener is TCP on "
        else:
            outsider = reuseport_udp(f"127.0.0.1:{port}")
            needle = f"is UDP on 127.0.0.1:{port} but listener is TCP on 127.0.0.1:{port}"
        with outsider:
            with pytest.raises(InvalidArgument) as info:
                drain_close(listener, group=[outsider, listener, rest], grace=0.05, timeout=2)
            assert str(info.value).startswith(f"invalid group member 0 {outsider!r}: ")
            assert needle in str(info.value)
            assert listener.fileno() != -1
            assert _no_program(listener)


def test_drain_close_refuses_a_socket_that_is_not_listening() -> None:
    with udp_socket() as udp, reuseport_group("127.0.0.1:0", 2) as group:
        with pytest.raises(WrongSocketType, match="expected a listening TCP socket"):
            drain_close(udp, group=[group[0], udp])
        assert udp.fileno() != -1


def _accepts(member: socket.socket, port: int) -> bool:
    """Connect once; True if *member* (and not another) takes the connection."""
    with connect_tcp(("127.0.0.1", port), timeout=5):
        member.settimeout(5)
        try:
            conn, _ = member.accept()
        except TimeoutError:
            return False
        conn.close()
        return True


def test_drain_close_after_take_keeps_the_group_in_kernel_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)  # the steer path
    group = reuseport_group("127.0.0.1:0", 3)
    s0 = group.take(0)  # given away: still in the kernel's group, at index 0
    s1, s2 = group[1], group[2]
    try:
        steer_all_to([s0, s1, s2], 2)
        clients = [connect_tcp(("127.0.0.1", group.port), timeout=5) for _ in range(3)]
        result = drain_close(s2, group=group, grace=0.05)
        assert result.path == "steer"
        assert len(result.accepted) == 3
        for c in [*clients, *result.accepted]:
            c.close()
        assert group._members == [None, s1]  # s2 left from the end: nothing moved
        # The kernel agrees: index 0 is still the taken member, index 1 is s1.
        steer_all_to([s0, s1], 1)
        assert _accepts(s1, group.port)
        steer_all_to([s0, s1], 0)
        assert _accepts(s0, group.port)
        group.close()
        assert s1.fileno() == -1, "the group lost track of s1 and leaked it"
        assert s0.fileno() != -1, "a taken member belongs to the caller"
    finally:
        group.close()
        s0.close()


@pytest.mark.parametrize("migrate", [False, True])
@pytest.mark.parametrize("held", [True, False])
def test_drain_close_of_a_listener_held_elsewhere_keeps_its_slot(
    monkeypatch: pytest.MonkeyPatch, migrate: bool, held: bool
) -> None:
    # A copy of the listener held elsewhere (a worker it was handed to; here a
    # dup) keeps the socket listening in the kernel's group after drain_close closes
    # its fd. Before, the result said nothing of it and the ReuseportGroup dropped
    # the slot as if the socket had left: its indexes no longer matched the
    # kernel's, and steering by them picked the wrong members (the "drained"
    # socket got the connections meant for the group's member 1).
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: migrate)
    group = reuseport_group("127.0.0.1:0", 3)
    m0, m1, m2 = group
    copy = m1.dup() if held else None
    try:
        result = drain_close(m1, group=group, grace=0.01)
        assert m1.fileno() == -1
        assert result.still_listening is held
        assert group.members == (m0, m2)
        if held:
            assert copy is not None
            assert len(group) == 3  # slot 1 is kept, as a taken member's
            steer_all_to(group, 2)
            assert _accepts(m2, group.port)
            steer_all_to(group, 0)
            assert _accepts(m0, group.port)
            group.close()
            assert copy.fileno() != -1, "the copy is its holder's"
        else:
            assert len(group) == 2  # m2 moved into slot 1, as in the kernel
            steer_all_to(group, 1)
            assert _accepts(m2, group.port)
    finally:
        group.close()
        if copy is not None:
            copy.close()


@pytest.mark.parametrize("migrate", [False, True])
def test_drain_close_does_not_restore_a_list_group_whose_listener_is_held_elsewhere(
    monkeypatch: pytest.MonkeyPatch, migrate: bool
) -> None:
    # A list cannot name the slot of a socket that still listens after the drain
    # (held elsewhere): restore got the list as if the socket had left, n-1 members
    # in the kernel's order after a real leave, so its program's indexes were off by
    # one slot (the "drained" socket took half the connections, a live member none).
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: migrate)
    with reuseport_group("127.0.0.1:0", 3) as group:
        m0, m1, m2 = group
        calls: list[object] = []
        with m0.dup() as copy:
            result = drain_close(m0, group=[m0, m1, m2], grace=0.01, restore=calls.append)
            assert result.still_listening
            assert calls == []
            assert isinstance(result.steering_error, SteeringError)
            assert "still listens in its slot" in str(result.steering_error)
            # Nothing steers: the kernel's hash spreads over all three, the copy too.
            assert copy.fileno() != -1


def test_drain_close_of_a_taken_member_keeps_the_group_in_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)  # the steer path
    with reuseport_group("127.0.0.1:0", 4) as group:
        s0, s1 = group[0], group[1]
        t2, t3 = group.take(2), group.take(3)
        # A taken member is drained with its group: the last member (s3, taken too)
        # takes its slot in the kernel, and the group follows.
        drain_close(t2, group=group, grace=0.05)
        assert t2.fileno() == -1
        assert group._members == [s0, s1, None] and group._slot(t3) == 2
        steer_all_to(group, 2)
        assert _accepts(t3, group.port)
        # A held member drained while the last slot is a taken one: the taken
        # member moves into the freed slot, and can itself be drained from there.
        drain_close(s0, group=group, grace=0.05)
        assert group._members == [None, s1] and group._slot(t3) == 0
        steer_all_to(group, 0)
        assert _accepts(t3, group.port)
        steer_all_to(group, 1)
        assert _accepts(s1, group.port)
        drain_close(t3, group=group, grace=0.05)
        assert group._members == [s1] and group._taken == {}
        assert _accepts(s1, group.port)


def test_drain_close_needs_a_member_the_group_still_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)
    group = reuseport_group("127.0.0.1:0", 2)
    s0 = group.take(0)
    try:
        with pytest.raises(InvalidArgument, match="holds no member besides listener"):
            drain_close(group[1], group=group)
        assert group[1].fileno() != -1
        assert _no_program(s0)
    finally:
        group.close()
        s0.close()


def test_drain_close_listener_above_fd_1023(
    monkeypatch: pytest.MonkeyPatch, fd_limit: Callable[[int], None]
) -> None:
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)
    fd_limit(1500 + 64)  # fd 1500 below the limit, and room for a few more above it
    with reuseport_group("127.0.0.1:0", 2) as group:
        # select() refuses fds above 1023; a busy proxy has them.
        fd = group.take(1).detach()
        try:
            high = socket.socket(fileno=os.dup2(fd, 1500, inheritable=False))
        finally:
            os.close(fd)  # the member lives on as fd 1500 only
        members = [group[0], high]
        steer_all_to(members, 1)
        client = connect_tcp(("127.0.0.1", group.port), timeout=5)
        try:
            result = drain_close(high, group=members, grace=0.05)
            assert len(result.accepted) == 1
            result.accepted[0].close()
        finally:
            client.close()
        assert high.fileno() == -1


def _wait_queued(member: socket.socket, n: int) -> int:
    """The member's accept-queue length once it reaches *n* (or after 10 s)."""
    # connect() returns when the client has the SYN-ACK; the server side queues
    # the connection when it processes the client's ACK, a moment later.
    deadline = time.monotonic() + 10
    for _ in range(1_000_000):
        queued = socket_info(member).queued
        if queued == n or time.monotonic() > deadline:
            break
    return queued or 0


@contextmanager
def _queued_on_first(
    group: ReuseportGroup | list[socket.socket], n: int
) -> Iterator[list[socket.socket]]:
    """*n* clients whose connections wait in ``group[0]``'s accept queue.

    Steered there, then the program is detached (through any member: a group has
    one), so the drain under test starts from a plain group. Closed on exit.
    """
    steer_all_to(group, 0)
    clients = [connect_tcp(("127.0.0.1", group[0].getsockname()[1]), timeout=5) for _ in range(n)]
    try:
        assert _wait_queued(group[0], n) == n
        detach_steering(group[0])
        yield clients
    finally:
        for c in clients:
            c.close()


def _served(accepted: list[socket.socket], clients: list[socket.socket]) -> list[bytes]:
    """Answer "ok" on every accepted connection; what each client then reads."""
    for conn in accepted:
        conn.sendall(b"ok")
        conn.close()
    out = []
    for c in clients:
        c.settimeout(5)
        try:
            out.append(c.recv(2))
        except ConnectionResetError:
            out.append(b"reset")  # was still queued when the member closed
    return out


def test_drain_close_timeout_still_takes_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)  # the steer path
    with reuseport_group("127.0.0.1:0", 2) as group, _queued_on_first(group, 50) as clients:
        # The deadline passes before the accept loop runs once: only the sweep
        # after it can take the 50 connections (the old code reset them all).
        result = drain_close(group[0], group=group, timeout=1e-9)
        assert len(result.accepted) == 50
        assert result.timed_out is True
        assert _served(result.accepted, clients) == [b"ok"] * 50


def test_drain_close_keeps_what_it_took_when_accept_runs_out_of_fds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)  # the steer path
    with reuseport_group("127.0.0.1:0", 2) as group, _queued_on_first(group, 10) as clients:
        listener = group[0]
        # Room for 3 accepted sockets: the 4th accept() fails with EMFILE. The 3
        # taken are the caller's to serve (the old code closed them and raised).
        with fds_left(3):
            result = drain_close(listener, group=group, grace=0)
        assert len(result.accepted) == 3
        assert result.accept_error is not None
        assert result.accept_error.errno == errno.EMFILE
        assert listener.fileno() == -1
        assert sorted(_served(result.accepted, clients)) == [b"ok"] * 3 + [b"reset"] * 7


@pytest.mark.parametrize("size", [3, 2])
def test_drain_close_keeps_the_accepted_when_a_member_closes_meanwhile(
    monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    from reuselb import _steering

    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)  # the steer path
    group = reuseport_group("127.0.0.1:0", size)
    members = list(group)
    attach_away_from = _steering._attach_away_from

    def attach_then_lose_member_1(via: socket.socket, n: int, index: int, name: str) -> None:
        attach_away_from(via, n, index, name)
        members[1].close()  # what another thread stopping its worker does, mid-drain

    monkeypatch.setattr(_steering, "_attach_away_from", attach_then_lose_member_1)
    with group, _queued_on_first(members, 5) as clients:
        result = drain_close(members[0], group=group, grace=0.05)
        # Every queued connection is the caller's, whatever became of the detach.
        assert len(result.accepted) == 5
        assert _served(result.accepted, clients) == [b"ok"] * 5
        if size == 3:  # detached through member 2, the one still open
            assert result.steering_error is None
            assert _no_program(members[2])
        else:  # no member left to detach through: said, not raised
            assert isinstance(result.steering_error, SteeringError)
            assert "no other member of the group is open" in str(result.steering_error)


def _landings(members: list[socket.socket], port: int, n: int) -> list[tuple[int, int]]:
    """``(member index it reached, source port)`` for *n* new connections."""
    out = []
    for _ in range(n):
        with socket.socket() as c:
            c.bind(("127.0.0.1", 0))
            c.connect(("127.0.0.1", port))
            ready = select.select(members, [], [], 10)[0]
            assert len(ready) == 1
            ready[0].accept()[0].close()
            out.append((members.index(ready[0]), c.getsockname()[1]))
    return out


@pytest.mark.parametrize("kind", ["ReuseportGroup", "list"])
@pytest.mark.parametrize("migrate", [False, True])
def test_drain_close_restore_reattaches_the_callers_program(
    monkeypatch: pytest.MonkeyPatch, kind: str, migrate: bool
) -> None:
    from reuselb import attach_hash_steering, hash_steering_index

    # migrate=True only takes the migrate path's code: nothing is queued to move.
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: migrate)
    with reuseport_group("127.0.0.1:0", 3) as group:
        s0, s1, s2 = group
        attach_hash_steering(group)  # the caller's own program, for 3 members
        seen: list[list[socket.socket]] = []

        def restore(g: ReuseportGroup | Sequence[socket.socket]) -> None:
            seen.append(list(g))
            attach_hash_steering(g)

        drained = drain_close(
            s0, group=group if kind == "ReuseportGroup" else [s0, s1, s2], restore=restore
        )
        assert drained.steering_error is None
        # Called once, with the kernel's order after the close: s2 took slot 0.
        assert seen == [[s2, s1]]
        for m in (s1, s2):
            m.setblocking(False)
        for index, port in _landings([s2, s1], group.port, 24):
            assert index == hash_steering_index("127.0.0.1", port, 2)


def test_drain_close_detaches_its_program_when_restore_attaches_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A restore that attaches only when a condition holds (here: never). Before,
    # drain_close's program (made for 3 members, steering away from slot 1, which
    # s2 took at the close) stayed attached, and steering_error was None: s2 got
    # about a quarter of what s0 got. Now it is detached before restore runs.
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)
    with reuseport_group("127.0.0.1:0", 3) as group:
        s0, s1, s2 = group
        called: list[list[socket.socket]] = []
        result = drain_close(s1, group=group, grace=0.01, restore=lambda g: called.append(list(g)))
        assert result.path == "steer" and result.steering_error is None
        assert called == [[s0, s2]]
        assert _no_program(s0)
        for m in (s0, s2):
            m.setblocking(False)
        reached = {index for index, _ in _landings([s0, s2], group.port, 40)}
        assert reached == {0, 1}  # the kernel's hash: each gets some of 40


def test_two_drains_of_one_group_run_one_after_the_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two threads drain members 1 and 2 of one group at once. Before, both sized
    # the group on entry, so the second close was not recorded (the group kept a
    # closed member, and steer_all_to then raised SocketClosed), and the second
    # drain's program replaced the first's, whose listener went on getting new
    # connections until its timeout. Now the second waits for the first.
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)
    with reuseport_group("127.0.0.1:0", 3) as group:
        s0, s1, s2 = group
        starting = threading.Event()
        results: dict[str, DrainResult] = {}
        errors: list[BaseException] = []
        real_handshakes = _handoff._handshakes

        def handshakes(listener: socket.socket) -> Any:
            # The first drain, its program attached, before it drains: let the
            # second one start, and wait (bounded) for it, which waits for this
            # one to end (or, without the lock, runs to its end meanwhile).
            if listener is s1 and not starting.is_set():
                starting.set()
                # until it waits for this drain's lock (or, without one, ran through)
                until_in_or(second, "_one_drain_per_group", lambda: not second.is_alive())
            return real_handshakes(listener)

        monkeypatch.setattr(_handoff, "_handshakes", handshakes)

        def run(name: str, member: socket.socket) -> None:
            try:
                if name == "second":
                    assert starting.wait(10)
                results[name] = drain_close(member, group=group, grace=0.01, timeout=5)
            except BaseException as exc:
                errors.append(exc)

        second = threading.Thread(target=run, args=("second", s2), daemon=True)
        second.start()
        first = threading.Thread(target=run, args=("first", s1), daemon=True)
        first.start()
        first.join(20)
        second.join(20)
        assert errors == []
        assert not results["first"].timed_out and not results["second"].timed_out
        assert s1.fileno() == -1 and s2.fileno() == -1
        assert group.members == (s0,)
        steer_all_to(group, 0)  # the group is in step with the kernel's
        assert _handoff._DRAINS == {}


def test_a_drain_of_its_group_from_restore_is_refused_not_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A drain of the same group from within a drain in the same thread (restore, or
    # a signal handler) would wait for itself, or, re-entering, run alongside it and
    # break the group as two threads' drains did.
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)
    with reuseport_group("127.0.0.1:0", 3) as group:
        s0, s1, s2 = group

        def restore(g: object) -> None:
            drain_close(s2, group=group, grace=0.01)

        result = drain_close(s1, group=group, grace=0.01, restore=restore)
        assert isinstance(result.steering_error, InvalidArgument)
        assert "draining already" in str(result.steering_error)
        assert s1.fileno() == -1 and s2.fileno() != -1
        assert group.members == (s0, s2)
        assert _handoff._DRAINS == {}
        drain_close(s2, group=group, grace=0.01)  # afterwards: as usual
        assert list(group.members) == [s0]


def test_a_listener_an_earlier_drain_closed_meanwhile_is_named_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The second drain of one listener waits for the first, which closes it: the
    # second says so (SocketClosed), as for a listener closed before the call, rather
    # than "not a member of group".
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)
    with reuseport_group("127.0.0.1:0", 2) as group:
        s0, s1 = group
        starting = threading.Event()
        errors: list[BaseException] = []
        real_handshakes = _handoff._handshakes

        def handshakes(listener: socket.socket) -> Any:
            if not starting.is_set():
                starting.set()
                until_in_or(second, "_one_drain_per_group", lambda: not second.is_alive())
            return real_handshakes(listener)

        monkeypatch.setattr(_handoff, "_handshakes", handshakes)

        def run_second() -> None:
            assert starting.wait(10)
            try:
                drain_close(s1, group=group, grace=0.01)
            except BaseException as exc:
                errors.append(exc)

        second = threading.Thread(target=run_second, daemon=True)
        second.start()
        drain_close(s1, group=group, grace=0.01)
        second.join(20)
        assert [type(e) for e in errors] == [SocketClosed]
        assert group.members == (s0,)


def test_a_child_forked_during_a_drain_can_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    # A child forked (multiprocessing, a prefork worker) while another thread drained
    # inherited that group's drain lock held by a thread it does not have: its own
    # drain_close of the group then waited for ever.
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)
    with reuseport_group("127.0.0.1:0", 3) as group:
        s0, s1, s2 = group
        draining, done = threading.Event(), threading.Event()
        real_handshakes = _handoff._handshakes

        def handshakes(listener: socket.socket) -> Any:
            if listener is s1:
                draining.set()
                done.wait(10)  # held (bounded) until the child has drained
            return real_handshakes(listener)

        monkeypatch.setattr(_handoff, "_handshakes", handshakes)
        drainer = threading.Thread(
            target=lambda: drain_close(s1, group=group, grace=0.01, timeout=20), daemon=True
        )
        drainer.start()
        rd, wr = os.pipe()
        try:
            assert draining.wait(10)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: threads
                pid = os.fork()
            if pid == 0:  # child: drain its own member, report, exit whatever happens
                code = 1
                try:
                    signal.alarm(10)  # the child's own bound, if it hangs
                    result = drain_close(s2, group=[s0, s2], grace=0.01, timeout=5)
                    os.write(wr, result.path.encode())
                    code = 0
                finally:
                    os._exit(code)
            os.close(wr)
            wr = -1
            ready = select.select([rd], [], [], 30)[0]
            report = os.read(rd, 100) if ready else b"nothing in 30 s"
            _, status = os.waitpid(pid, 0)
            assert (report, os.waitstatus_to_exitcode(status)) == (b"steer", 0)
        finally:
            done.set()
            drainer.join(30)
            os.close(rd)
            if wr >= 0:
                os.close(wr)


def test_drain_close_puts_a_blocking_listener_s_mode_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # O_NONBLOCK belongs to the open file description, shared by every holder (a
    # worker that was handed the listener; here a dup). Before, the steer path left
    # it set, and the other holder's blocking accept() raised BlockingIOError.
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)
    with reuseport_group("127.0.0.1:0", 2) as group:
        listener, _ = group
        assert os.get_blocking(listener.fileno())
        with listener.dup() as copy:
            drain_close(listener, group=group, grace=0.01)
            assert listener.fileno() == -1
            assert os.get_blocking(copy.fileno())


def test_drain_close_restore_errors_are_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from reuselb import attach_hash_steering

    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)
    with reuseport_group("127.0.0.1:0", 3) as group:
        for bad in ("attach_hash_steering", 5):
            with pytest.raises(InvalidArgument, match=f"invalid restore {bad!r}: must be a call"):
                drain_close(group[0], group=group, restore=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="invalid restore .* needs the group"):
            drain_close(group[0], restore=attach_hash_steering)
        assert len(group) == 3 and all(m.fileno() != -1 for m in group)
        assert _no_program(group[0])

        with _queued_on_first(group, 3):
            failure = RuntimeError("the caller's program did not attach")

            def restore(g: Iterable[socket.socket]) -> None:
                raise failure

            result = drain_close(group[0], group=group, grace=0.05, restore=restore)
            assert result.steering_error is failure
            assert len(result.accepted) == 3  # not dropped by the caller's error
            for conn in result.accepted:
                conn.close()
            assert _no_program(group[0])  # drain_close's own program is not left behind


def _still_open(fds: set[int]) -> set[int]:
    """Those of *fds* open now (open_fds() lists its own directory fd, closed since)."""
    out = set()
    for fd in fds:
        try:
            os.fstat(fd)
        except OSError:
            continue
        out.add(fd)
    return out


def _server_sides(clients: list[socket.socket]) -> list[str]:
    """For each client, what became of its server side: "closed", "reset" or "open"."""
    out = []
    for c in clients:
        c.settimeout(5)  # a FIN over loopback arrives at once; 5 s only bounds a failure
        try:
            out.append("closed" if c.recv(1) == b"" else "data")
        except ConnectionResetError:
            out.append("reset")
        except TimeoutError:
            out.append("open")
    return out


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_drain_close_restore_interrupted_closes_the_accepted_and_detaches(
    monkeypatch: pytest.MonkeyPatch, interrupt: type[BaseException]
) -> None:
    # Before: the interrupt escaped the finally: the 3 accepted connections were
    # neither returned nor closed, and drain_close's program stayed attached.
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)  # the steer path
    with reuseport_group("127.0.0.1:0", 2) as group, _queued_on_first(group, 3) as clients:
        listener, other = group
        before = _still_open(open_fds())

        def restore(g: Iterable[socket.socket]) -> None:
            raise interrupt("Ctrl-C while re-attaching")

        try:
            drain_close(listener, group=group, grace=0.05, restore=restore)
        except interrupt:
            # Checked while the traceback (which keeps drain_close's frame and its
            # locals alive) exists: closed by drain_close, not by the collector.
            leaked = _still_open(open_fds() - before)
            served = _server_sides(clients)
        else:
            pytest.fail("the interrupt from restore was swallowed")
        assert leaked == set()
        assert served == ["closed"] * 3
        assert listener.fileno() == -1
        assert list(group) == [other]
        assert _no_program(other)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_drain_close_interrupted_in_its_detach_closes_the_accepted_and_detaches(
    monkeypatch: pytest.MonkeyPatch, interrupt: type[BaseException]
) -> None:
    # Before: without restore, an interrupt in the final detach left the 3 accepted
    # connections owned by nobody (open until collected) and the program attached.
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)  # the steer path
    real_detach = _handoff._detach_through
    calls = 0

    def interrupted_once(candidates: Iterable[socket.socket]) -> Exception | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise interrupt("a signal as the detach starts")
        return real_detach(candidates)

    monkeypatch.setattr(_handoff, "_detach_through", interrupted_once)
    with reuseport_group("127.0.0.1:0", 2) as group, _queued_on_first(group, 3) as clients:
        listener, other = group
        before = _still_open(open_fds())
        try:
            drain_close(listener, group=group, grace=0.05)
        except interrupt:
            leaked = _still_open(open_fds() - before)  # while the traceback lives
            served = _server_sides(clients)
        else:
            pytest.fail("the interrupt was swallowed")
        assert leaked == set()
        assert served == ["closed"] * 3
        assert listener.fileno() == -1
        assert list(group) == [other]
        assert _no_program(other)


def test_drain_close_interrupted_before_its_drain_leaves_no_program(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the accept queue's size was read after the program was attached and
    # before the try that detaches it: an interrupt there left the program attached
    # with the listener open, which then got no new connection.
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)  # the steer path

    def interrupted(listener: socket.socket) -> int:
        raise KeyboardInterrupt("a signal as the queue's size is read")

    monkeypatch.setattr(_handoff, "_queue_capacity", interrupted)
    with reuseport_group("127.0.0.1:0", 2) as group:
        listener, other = group
        with pytest.raises(KeyboardInterrupt):
            drain_close(listener, group=group, grace=0.05)
        assert listener.fileno() != -1
        assert list(group) == [listener, other]
        assert _no_program(other)


def test_drain_close_interrupted_right_after_accept_closes_that_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: a connection accept() had returned but drain_close had not yet
    # recorded was closed by no one (the ones recorded were), open until collected.
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)  # the steer path
    with reuseport_group("127.0.0.1:0", 2) as group, _queued_on_first(group, 3) as clients:
        listener, other = group
        before = _still_open(open_fds())
        real_setblocking = socket.socket.setblocking
        calls = 0

        def interrupted_at_the_second(self: socket.socket, flag: bool) -> None:
            nonlocal calls
            if flag:  # drain_close sets each accepted connection blocking
                calls += 1
                if calls == 2:
                    raise KeyboardInterrupt("a signal right after accept()")
            real_setblocking(self, flag)

        monkeypatch.setattr(socket.socket, "setblocking", interrupted_at_the_second)
        try:
            drain_close(listener, group=group, grace=0.05)
        except KeyboardInterrupt:
            leaked = _still_open(open_fds() - before)  # while the traceback lives
            served = _server_sides(clients)
        else:
            pytest.fail("the interrupt was swallowed")
        monkeypatch.undo()
        assert calls == 2
        assert leaked == set()
        # Two accepted and closed; the third still queued when the listener closed.
        assert served == ["closed", "closed", "reset"]
        assert listener.fileno() == -1
        assert _no_program(other)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_drain_close_interrupted_in_its_attach_detaches_and_leaves_the_listener(
    monkeypatch: pytest.MonkeyPatch, interrupt: type[BaseException]
) -> None:
    # Before: a signal arriving during setsockopt(SO_ATTACH_REUSEPORT_CBPF) is
    # handled as the call returns, inside _steering._attach, after the kernel
    # attached the program: it stayed attached, steering every new connection away
    # from a listener left open with its queue, which no one drained.
    from reuselb import _steering

    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)  # the steer path
    real_attach = _steering._attach

    def attached_then_interrupted(*args: Any) -> None:
        real_attach(*args)
        raise interrupt("a signal during the attach")

    with reuseport_group("127.0.0.1:0", 2) as group, _queued_on_first(group, 3):
        listener, other = group
        monkeypatch.setattr(_steering, "_attach", attached_then_interrupted)
        before = _still_open(open_fds())
        with pytest.raises(interrupt):
            drain_close(listener, group=group, grace=0.05)
        assert _still_open(open_fds() - before) == set()
        # As before the call: listener open in the group with its queue, no program.
        assert list(group) == [listener, other]
        assert socket_info(listener).queued == 3
        assert _no_program(other)


def test_drain_close_refused_steering_closes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from reuselb import _steering

    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: False)  # the steer path

    def refused(*args: Any) -> None:
        raise SteeringError("attaching the reuseport program failed: (refused)", errno.ENOMEM)

    with reuseport_group("127.0.0.1:0", 2) as group, _queued_on_first(group, 3):
        listener, other = group
        monkeypatch.setattr(_steering, "_attach", refused)
        with pytest.raises(SteeringError, match="refused"):
            drain_close(listener, group=group, grace=0.05)
        assert list(group) == [listener, other]
        assert socket_info(listener).queued == 3
        assert _no_program(other)


def _nested_code(code: types.CodeType) -> set[types.CodeType]:
    """*code* and the code of every function, comprehension and genexpr in it."""
    out = {code}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out |= _nested_code(const)
    return out


def _interrupted_at_line(k: int, with_restore: bool) -> tuple[str, list[str]]:
    """Drain with a KeyboardInterrupt raised at the *k*-th line event of drain_close.

    Line events of drain_close and of the functions defined in it count. Returns
    where it was raised (``""``: drain_close returned first) and what it left
    behind.
    """
    # drain_close checks its own arguments, then runs _drain_close (under the
    # group's drain lock, a context manager whose own code is not traced).
    codes = _nested_code(drain_close.__code__) | _nested_code(_handoff._drain_close.__code__)
    count = 0
    fired = ""

    def tracer(frame: types.FrameType, event: str, arg: object) -> Any:
        if frame.f_code not in codes:
            return None

        def local(frame: types.FrameType, event: str, arg: object) -> Any:
            nonlocal count, fired
            if event == "line":
                count += 1
                if count == k:
                    fired = f"{frame.f_code.co_name}:{frame.f_lineno}"
                    # Raising from the trace function also removes it.
                    raise KeyboardInterrupt(fired)
            return local

        return local

    with reuseport_group("127.0.0.1:0", 2) as group, _queued_on_first(group, 3):
        listener, other = group
        before = _still_open(open_fds())
        restored: list[object] = []
        restore = restored.append if with_restore else None
        previous = sys.gettrace()
        leaked: set[int] = set()
        try:
            sys.settrace(tracer)
            try:
                result = drain_close(listener, group=group, grace=0.01, restore=restore)
            finally:
                sys.settrace(previous)
        except KeyboardInterrupt:
            # While the traceback (which keeps drain_close's frames) lives.
            leaked = _still_open(open_fds() - before)
        else:
            for conn in result.accepted:
                conn.close()
        state = (listener.fileno() != -1, listener in group.members)
        # drain_close's program is detached before restore runs (this restore
        # attaches none): no program is left in any case.
        program = not _no_program(other)
    where = fired or "return"
    problems = []
    if leaked:
        problems.append(f"{where}: fds {sorted(leaked)} left open")
    if state not in ((True, True), (False, False)):
        problems.append(f"{where}: listener open, in the group: {state}")
    if program:
        problems.append(f"{where}: drain_close's program left attached")
    return fired, problems


@pytest.mark.parametrize("with_restore", [False, True])
@pytest.mark.parametrize("migrate", [False, True])
def test_drain_close_interrupted_at_any_line_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, migrate: bool, with_restore: bool
) -> None:
    # A KeyboardInterrupt (a signal handler raising) at every line drain_close (or
    # a function of its own) runs. Before, one in its cleanup (the listener's
    # close, the group's update, between restore and the detach, at the return)
    # left the accepted connections owned by nobody, the program attached and the
    # group listing the closed listener; so did one on the migrate path between
    # the close and the group's update, and one right after accept(). The listener
    # must end open in the group or closed and out of it.
    monkeypatch.setattr(_handoff, "tcp_migrate_req", lambda: migrate)
    problems: list[str] = []
    # A few hundred line events at most; the bound only stops a runaway loop.
    for k in range(1, 2000):
        # Each in a thread of its own: on CPython 3.11+ a trace function raising at
        # some lines of an except block (take()'s return after BlockingIOError)
        # leaves the handled exception set in sys.exc_info() of its thread for
        # good, the __context__ of every later exception there: later tests that
        # check __context__ failed when they ran after this one.
        box: list[tuple[str, list[str]]] = []
        worker = threading.Thread(
            target=lambda k=k, box=box: box.append(_interrupted_at_line(k, with_restore)),
            daemon=True,
        )
        worker.start()
        worker.join(60)
        assert box, f"line event {k}: no result in 60 s (an error in the thread is printed)"
        fired, found = box[0]
        problems += found
        if not fired:
            break
    else:
        pytest.fail("drain_close ran more line events than the bound")
    assert problems == []


_MIGRATE_CHILD = """
import json, socket
from reuselb import (
    InvalidArgument, connect_tcp, detach_steering, drain_close, reuseport_group,
    reuseport_listener, steer_all_to, tcp_migrate_req,
)
with open("/proc/sys/net/ipv4/tcp_migrate_req", "w") as f:
    f.write("1")  # this network namespace only
out = {"migrate": tcp_migrate_req()}
group = reuseport_group("127.0.0.1:0", 3)
m0, m1, m2 = group
steer_all_to(group, 0)
clients = [connect_tcp(("127.0.0.1", group.port), timeout=5) for _ in range(4)]
detach_steering(m0)
other = reuseport_listener("127.0.0.1:0")
try:
    drain_close(other, group=group)
except InvalidArgument as exc:
    out["outsider"] = str(exc)
out["outsider_open"] = other.fileno() != -1
other.close()
out["path"] = drain_close(m0, group=group).path
out["slots"] = [{m1: "m1", m2: "m2"}.get(m, "?") for m in group._members]
# The kernel agrees with the group: steering to index i reaches group[i].
reached = []
for i in range(len(group)):
    steer_all_to(group, i)
    with connect_tcp(("127.0.0.1", group.port), timeout=5):
        group[i].settimeout(5)
        group[i].accept()[0].close()
        reached.append(i)
out["reached"] = reached
detach_steering(group[0])
migrated = 0  # the queued connections moved to a remaining member
for member in group:
    member.settimeout(0.5)
    while migrated < 4:
        try:
            member.accept()[0].close()
        except TimeoutError:
            break
        migrated += 1
out["migrated"] = migrated
for c in clients:
    c.close()
group.close()
print(json.dumps(out))
"""


@pytest.mark.root
def test_drain_close_migrate_path_updates_the_group() -> None:
    # In a network namespace of its own, so turning tcp_migrate_req on cannot
    # change what other tests on this machine see.
    result = run_in_netns(_MIGRATE_CHILD)
    assert result["migrate"] is True
    assert "is not a member of group" in result["outsider"]
    assert result["outsider_open"] is True
    assert result["path"] == "migrate"
    assert result["slots"] == ["m2", "m1"]  # the last member took the closed one's slot
    assert result["reached"] == [0, 1]
    assert result["migrated"] == 4


def test_tcp_migrate_req_unknown_is_not_no(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No such setting (Linux < 5.14) is None; a setting that cannot be read is an
    # error, not "off" (drain_close would take the steer path on a guess).
    monkeypatch.setattr(_handoff, "_MIGRATE_SYSCTL", str(tmp_path / "missing"))
    assert tcp_migrate_req() is None
    monkeypatch.setattr(_handoff, "_MIGRATE_SYSCTL", str(tmp_path))  # a directory
    with pytest.raises(IsADirectoryError):
        tcp_migrate_req()
    (tmp_path / "on").write_text("1\n")
    monkeypatch.setattr(_handoff, "_MIGRATE_SYSCTL", str(tmp_path / "on"))
    assert tcp_migrate_req() is True


def test_steering_strict_must_be_a_bool() -> None:
    group = reuseport_group("127.0.0.1:0", 2)
    try:
        with pytest.raises(InvalidArgument, match="invalid strict 'no': must be a bool"):
            attach_cpu_steering(group, strict="no")  # type: ignore[arg-type]
    finally:
        group.close()


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_SEQPACKET])
def test_a_header_too_large_for_one_datagram_is_refused_naming_the_fix(kind: int) -> None:
    # Before: a bare OSError EMSGSIZE from sendmsg, though the docs promised an
    # InvalidArgument for any call that cannot arrive.
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    with a, b, reuseport_listener("127.0.0.1:0") as listener:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        before = open_fds()
        with pytest.raises(InvalidArgument, match="SOCK_STREAM channel or raise SO_SNDBUF"):
            send_sockets(a, [listener] * 200)
        assert open_fds() == before
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)  # nothing was sent


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_SEQPACKET])
def test_a_datagram_handoff_is_received_into_a_buffer_of_its_own_size(kind: int) -> None:
    import tracemalloc

    a, b = socket.socketpair(socket.AF_UNIX, kind)
    with a, b, reuseport_listener("127.0.0.1:0") as listener:
        send_sockets(a, [listener], names=["web"])
        tracemalloc.start()
        try:
            got = recv_sockets(b)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        with got["web"]:
            assert got["web"].getsockname() == listener.getsockname()
    # Before: recvmsg was handed the ~20 MiB limit and allocated all of it.
    assert peak < 1 << 20, peak
