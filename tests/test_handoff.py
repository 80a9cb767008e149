"""send_sockets / recv_sockets over real Unix sockets; listen_fds in a real subprocess."""

from __future__ import annotations

import fcntl
import gc
import json
import os
import resource
import socket
import struct
import subprocess
import sys

import pytest

from reuselb import (
    HandoffError,
    InvalidArgument,
    connect_tcp,
    listen_fds,
    recv_sockets,
    reuseport_listener,
    send_sockets,
    udp_socket,
)
from tests.conftest import open_fds

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
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _RECEIVER, str(child.fileno())],
            pass_fds=[child.fileno()],
            stdout=subprocess.PIPE,
            text=True,
        )
        child.close()
        send_sockets(parent, [lst], names=["web"])
        lst.close()  # the old process lets go; the queue lives on in the new one
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert out.strip() == "queued before handoff"
    finally:
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


def test_bad_arguments() -> None:
    a, b = socket.socketpair()
    tcp = socket.socket()
    try:
        with pytest.raises(InvalidArgument, match="must send 1 to 65536"):
            send_sockets(a, [])
        with pytest.raises(InvalidArgument, match="one unique name"):
            send_sockets(a, [tcp, tcp], names=["x", "x"])
        with pytest.raises(InvalidArgument, match="invalid names 1: each name must be a str"):
            send_sockets(a, [tcp, tcp], names=[1, "1"])  # type: ignore[list-item]
        with pytest.raises(InvalidArgument, match="must be an AF_UNIX socket"):
            send_sockets(tcp, [tcp])
    finally:
        for s in (a, b, tcp):
            s.close()


_SYSTEMD_CHILD = """
import json, os, sys
from reuselb import listen_fds
socks = listen_fds()
print(json.dumps({
    "names": sorted(socks),
    "types": {n: int(s.type) for n, s in socks.items()},
    "inheritable": any(os.get_inheritable(s.fileno()) for s in socks.values()),
    "env_left": [k for k in os.environ if k.startswith("LISTEN_")],
}))
"""

_WRAPPER = """
import os, sys
# Act like systemd: fds 3 and 4, inheritable, LISTEN_PID = the exec'd process's pid.
os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4)
os.set_inheritable(3, True); os.set_inheritable(4, True)
env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="web:dns")
os.execve(sys.executable, [sys.executable, "-c", sys.argv[3]], env)
"""


def test_listen_fds_adopts_systemd_sockets() -> None:
    tcp = reuseport_listener("127.0.0.1:0")
    udp = udp_socket()
    udp.bind(("127.0.0.1", 0))
    try:
        out = subprocess.run(
            [sys.executable, "-c", _WRAPPER, str(tcp.fileno()), str(udp.fileno()), _SYSTEMD_CHILD],
            pass_fds=[tcp.fileno(), udp.fileno()],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    finally:
        tcp.close()
        udp.close()
    result = json.loads(out.stdout)
    assert result["names"] == ["dns", "web"]
    assert result["types"] == {"web": socket.SOCK_STREAM, "dns": socket.SOCK_DGRAM}
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
    monkeypatch.setenv("REUSELB_INHERITED_FDS", "web=notanfd")
    with pytest.raises(HandoffError, match="malformed"):
        inherited_sockets()
    assert "REUSELB_INHERITED_FDS" not in os.environ


def test_more_sockets_than_one_message_carries() -> None:
    """600 sockets: more than SCM_MAX_FD (253), so three chunks on one channel."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
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
