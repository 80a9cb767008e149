"""parse_address: accepted spellings, canonical form, round trip, errors."""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import itertools
import json
import re
import shutil
import socket
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reuselb import Address, AddressError, HostNotFound, connect_tcp, parse_address
from reuselb._address import resolve_address


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:80", Address("127.0.0.1", 80)),
        ("localhost:8080", Address("localhost", 8080)),
        ("Example.COM.:1", Address("example.com.", 1)),
        ("[::1]:443", Address("::1", 443)),
        ("[0:0::0001]:443", Address("::1", 443)),
        ("[FE80::1%eth0]:9", Address("fe80::1%eth0", 9)),
        (":8000", Address("", 8000)),
        ("*:8000", Address("", 8000)),
        ("0.0.0.0:0", Address("0.0.0.0", 0)),
        ("[::]:65535", Address("::", 65535)),
        (("127.0.0.1", 0), Address("127.0.0.1", 0)),
        (("::1", 5), Address("::1", 5)),
        (("fe80::1", 5, 0, 3), Address("fe80::1%3", 5)),
        (("", 7), Address("", 7)),
        (8080, Address("", 8080)),
    ],
)
def test_accepted_spellings(value: object, expected: Address) -> None:
    assert parse_address(value) == expected  # type: ignore[arg-type]


def test_address_passes_through_and_formats() -> None:
    a = Address("::1", 1)
    assert parse_address(a) is a
    assert str(a) == "[::1]:1"
    assert str(Address("", 2)) == "*:2"
    assert a.family == socket.AF_INET6
    assert Address("10.0.0.1", 1).family == socket.AF_INET
    assert Address("db", 1).family == socket.AF_UNSPEC
    assert Address("", 1).is_wildcard and Address("::", 1).is_wildcard
    assert Address("h", 1).with_port(2) == Address("h", 2)


def test_default_port() -> None:
    assert parse_address("db.local", default_port=6379) == Address("db.local", 6379)
    assert parse_address("[::1]", default_port=1) == Address("::1", 1)
    with pytest.raises(AddressError, match="no port given"):
        parse_address("db.local")


@pytest.mark.parametrize(
    ("default_port", "reason"),
    [
        (-5, "default_port -5 out of range 0-65535"),
        (99999, "default_port 99999 out of range 0-65535"),
        ("http", "default_port must be an int, got str 'http'"),
        (True, "default_port must be an int, got bool True"),
        (80.0, "default_port must be an int, got float 80.0"),
    ],
)
@pytest.mark.parametrize(
    "value",
    ["127.0.0.1:80", "db.local", 8080, ("::1", 80), Address("h", 1)],
    ids=["with-port", "host-only", "int", "tuple", "Address"],
)
def test_a_bad_default_port_is_refused_even_when_unused(
    value: object, default_port: object, reason: str
) -> None:
    # Before: accepted, and ignored, wherever the address had a port of its own, so
    # a bad default (from a config file) passed until the one address without one.
    with pytest.raises(AddressError) as info:
        parse_address(value, default_port=default_port)  # type: ignore[arg-type]
    assert info.value.reason == reason
    assert info.value.value == value


def test_a_default_port_is_kept_as_a_plain_int() -> None:
    import enum

    class Port(enum.IntEnum):
        REDIS = 6379

    parsed = parse_address("db.local", default_port=Port.REDIS)
    assert parsed == Address("db.local", 6379)
    assert type(parsed.port) is int
    assert parse_address("db.local:1", default_port=0).port == 1  # 0 and 65535 are ports
    assert parse_address("db.local", default_port=65535).port == 65535


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("127.0.0.1:70000", "port 70000 out of range"),
        ("127.0.0.1:-1", "port '-1' is not a number"),
        ("127.0.0.1:http", "port 'http' is not a number"),
        ("127.0.0.1:١٢٣", "is not a number"),
        ("::1:80", "must be in brackets"),
        ("[::1:80", "without matching"),
        ("[::1]80", "unexpected '80'"),
        ("[]:80", "empty IPv6"),
        ("[1.2.3.4]:80", "not an IPv6 address"),
        ("[fe80::1%e th]:80", "invalid IPv6 zone"),
        ("300.1.1.1:80", "not an IPv4 address"),
        ("bad host:80", "not a valid host name"),
        ("-lead.example:80", "not a valid host name"),
        # inet_aton's hex forms: glibc's getaddrinfo reads them as 127.0.0.1.
        ("0x7f.1:80", "'0x7f.1' is not an IPv4 address"),
        ("0x7f000001:80", "'0x7f000001' is not an IPv4 address"),
        ("0X7F.0.0.1:80", "'0X7F.0.0.1' is not an IPv4 address"),
        # With a trailing dot inet_aton refuses it and glibc would look it up as a
        # name; it is refused as one of numbers only.
        ("0x7f.0.0.1.:80", "'0x7f.0.0.1.' is not a valid host name"),
        ("127.1:80", "'127.1' is not an IPv4 address"),
        (("0x7f.1", 80), "'0x7f.1' is not an IPv4 address"),
        (("127.0.0.1", "80"), "port must be an int"),
        (("127.0.0.1", True), "port must be an int"),
        (("127.0.0.1",), "got 1 items"),
        ((1, 80), "host must be a str"),
        (("1.2.3.4", 1, 0, 0), "must have an IPv6 host"),
        (True, "got a bool"),
        (-5, "port -5 out of range"),
        (3.5, "got float"),
        (None, "got NoneType"),
    ],
)
def test_rejected_with_named_value(value: object, needle: str) -> None:
    with pytest.raises(AddressError, match=None) as info:
        parse_address(value)  # type: ignore[arg-type]
    assert needle in str(info.value)
    assert repr(value) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("host", ["0x7f.1", "0x7f000001", "0x7f.0.0.1", "1.0x1"])
def test_a_hex_ipv4_spelling_is_not_a_host_name(host: str) -> None:
    # Taken as a name, it reached getaddrinfo, which reads it as an IPv4 address
    # (inet_aton): "0x7f.1:80" bound 127.0.0.1, a second Address for 127.0.0.1:80.
    assert socket.getaddrinfo(host, 80, socket.AF_INET, 0, 0, socket.AI_NUMERICHOST)
    with pytest.raises(AddressError, match=f"{host!r} is not an IPv4 address"):
        Address(host, 80)


@pytest.mark.parametrize(
    "host", ["0x7f.1.", "0x7f.0.0.1.", "0x7f.08", "0x1.2.3.4.5", "0xffffffffff"]
)
def test_numbers_that_are_no_ipv4_address_are_refused_as_a_name(host: str) -> None:
    # inet_aton refuses them (a trailing dot, "08", five parts, more than 32 bits), so
    # glibc's getaddrinfo would look them up as names: the error must not say it reads
    # them as an address. They are refused all the same, as a name of numbers only.
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo(host, 80, socket.AF_INET, 0, 0, socket.AI_NUMERICHOST)
    with pytest.raises(AddressError) as info:
        Address(host, 80)
    message = str(info.value)
    assert f"{host!r} is not a valid host name" in message
    assert "labels are all numbers" in message
    assert "is not an IPv4 address" not in message


def test_the_ipv4_message_is_given_exactly_to_what_inet_aton_reads() -> None:
    # Parsing does not call the C library; its copy of inet_aton's rules is checked
    # against the real one on numbers of every base, size and count of parts.
    parts = ["0", "07", "08", "0377", "0400", "1", "255", "256", "65535", "65536"]
    parts += ["16777215", "16777216", "4294967295", "4294967296", "0x0", "0xff"]
    parts += ["0x100", "0XFFFF", "0x10000", "0xffffff", "0x1000000", "0xffffffff"]
    parts += ["0x100000000", "0x0000000000007f", "0x" + "f" * 20]
    hosts = [".".join(p) for n in (1, 2) for p in itertools.product(parts, repeat=n)]
    for i in range(len(parts) ** 2):
        hosts.append(".".join(parts[(i * k * 7 + k) % len(parts)] for k in range(1, 4)))
        hosts.append(".".join(parts[(i * k * 11 + k) % len(parts)] for k in range(1, 6)))
    hosts += [f"{h}." for h in hosts[:: len(parts)]]
    checked = read = 0
    for host in hosts:
        if re.fullmatch(r"[0-9.]+", host):
            continue  # digits only: ipaddress decides, tested above
        try:
            socket.inet_aton(host)
            reads = True
        except OSError:
            reads = False
        with pytest.raises(AddressError) as info:
            Address(host, 80)
        said = f"{host!r} is not an IPv4 address (a number form of inet_aton" in str(info.value)
        assert said == reads, (host, str(info.value))
        checked += 1
        read += reads
    assert checked > 500 and 100 < read < checked - 100  # both kinds, many of each


@pytest.mark.parametrize("host", ["0x.example", "0x", "0xg1.1", "a.0x7f", "x0x7f.1", "1a.0x1"])
def test_a_name_with_a_label_that_is_no_number_stays_a_name(host: str) -> None:
    assert Address(host, 1).family == socket.AF_UNSPEC


def test_resolve_literals_without_dns() -> None:
    assert resolve_address(Address("", 5), socket.SOCK_STREAM, passive=True) == [
        (socket.AF_INET, ("0.0.0.0", 5))
    ]
    assert resolve_address(Address("", 5), socket.SOCK_STREAM, passive=False) == [
        (socket.AF_INET, ("127.0.0.1", 5))
    ]
    [(fam, sa)] = resolve_address(Address("::1", 5), socket.SOCK_STREAM, passive=False)
    assert fam == socket.AF_INET6 and sa[:2] == ("::1", 5)


def _fake_resolver(
    monkeypatch: pytest.MonkeyPatch, names: dict[str, list[str]], error: int = socket.EAI_NONAME
) -> list[int]:
    """getaddrinfo answering *names* (name -> IPs) from memory, never from DNS.

    A name without an address in the family asked for, or not listed, fails with
    *error*. A numeric lookup (AI_NUMERICHOST: a literal, which never goes to DNS)
    gets the real answer. Returns the families asked for, one per name lookup.
    """
    real = socket.getaddrinfo
    asked: list[int] = []

    def fake(host: Any, port: Any, family: int = 0, socktype: int = 0, *rest: int) -> Any:
        if len(rest) > 1 and rest[1] & socket.AI_NUMERICHOST:  # (proto, flags)
            return real(host, port, family, socktype, *rest)
        asked.append(family)
        infos = [
            (fam, socktype, 0, "", (ip, port) if fam == socket.AF_INET else (ip, port, 0, 0))
            for ip in names.get(host, [])
            for fam in [socket.AF_INET6 if ":" in ip else socket.AF_INET]
            if family in (socket.AF_UNSPEC, fam)
        ]
        if not infos:
            raise socket.gaierror(error, "Name or service not known")
        return infos

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return asked


def test_unknown_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # A name no resolver knows, answered from memory: a real lookup of even a
    # reserved name (.invalid, RFC 6761) leaves the host, and without a reachable
    # DNS server glibc answers EAI_AGAIN after its timeouts.
    _fake_resolver(monkeypatch, {})
    with pytest.raises(HostNotFound, match=r"unknown host .no-such-host\.invalid.") as info:
        resolve_address(Address("no-such-host.invalid", 1), socket.SOCK_STREAM, passive=False)
    assert isinstance(info.value, OSError)


def test_a_trailing_dot_is_kept_and_an_absolute_name_is_another_host() -> None:
    # "svc.example." is absolute: the resolver must not apply resolv.conf's search
    # list to it. Stripped, it reached svc.example.corp.test under "search corp.test".
    a = parse_address("Svc.Example.:80")
    assert a == Address("svc.example.", 80) == parse_address(("svc.example.", 80))
    assert a.host == "svc.example." and str(a) == "svc.example.:80"
    assert parse_address(str(a)) == a
    assert a != parse_address("svc.example:80")
    assert a.family == socket.AF_UNSPEC and not a.is_literal
    assert a.with_port(81) == parse_address("svc.example.:81")
    # The limit of 253 characters is the name's without its dot.
    longest = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert Address(longest + ".", 1).host == longest + "."
    with pytest.raises(AddressError, match="not a valid host name"):
        Address("a" + longest + ".", 1)
    for bad in (".", "a..", "svc..example."):
        with pytest.raises(AddressError, match=f"{bad!r} is not"):
            Address(bad, 1)


def test_an_absolute_name_goes_to_getaddrinfo_with_its_dot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []
    real = socket.getaddrinfo

    def fake(host: Any, port: Any, family: int = 0, socktype: int = 0, *rest: int) -> Any:
        asked.append(host)
        if host != "svc.example.":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real("127.0.0.1", port, family, socktype, *rest)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        got = resolve_address(
            parse_address(f"svc.example.:{port}"), socket.SOCK_STREAM, passive=False
        )
        assert got == [(socket.AF_INET, ("127.0.0.1", port))]
        with connect_tcp(f"svc.example.:{port}", timeout=5) as conn:
            assert conn.getpeername() == ("127.0.0.1", port)
        with pytest.raises(HostNotFound, match="unknown host 'svc.example'"):
            connect_tcp(f"svc.example:{port}", timeout=5)
    assert asked == ["svc.example.", "svc.example.", "svc.example"]


_SEARCH_LIST_CHILD = r"""
import json, socket, struct, threading
import reuselb

def serve(sock):
    # Answers svc.example.corp.test with 127.0.0.1 (A), anything else NXDOMAIN.
    while True:
        data, peer = sock.recvfrom(512)
        i, labels = 12, []
        while data[i]:
            labels.append(data[i + 1 : i + 1 + data[i]].decode())
            i += 1 + data[i]
        qtype = struct.unpack("!H", data[i + 1 : i + 3])[0]
        name = ".".join(labels).lower()
        queried.append(name)
        answer = b""
        if name == "svc.example.corp.test" and qtype == 1:
            answer = bytes([0xC0, 12]) + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([127, 0, 0, 1])
        rcode = 0x8180 if name == "svc.example.corp.test" else 0x8183
        head = struct.pack("!HHHHHH", data[0] << 8 | data[1], rcode, 1, 1 if answer else 0, 0, 0)
        sock.sendto(head + data[12 : i + 5] + answer, peer)

queried = []
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.bind(("127.0.0.1", 53))
threading.Thread(target=serve, args=(dns,), daemon=True).start()
server = socket.create_server(("127.0.0.1", 0))
port = server.getsockname()[1]
out = {}
for host in ("svc.example", "svc.example."):
    try:
        with reuselb.connect_tcp(f"{host}:{port}", timeout=5) as conn:
            out[host] = conn.getpeername()[0]
    except reuselb.HostNotFound as exc:
        out[host] = type(exc).__name__
out["queried"] = sorted(set(queried))
print(json.dumps(out))
"""


@pytest.mark.root
def test_an_absolute_name_is_not_resolved_with_the_search_list(tmp_path: Path) -> None:
    # End to end, with glibc's real resolver: a network namespace (its own
    # loopback, for a DNS server on port 53) and a mount namespace in which
    # /etc/resolv.conf is bind-mounted over (a private mount: the host's is
    # untouched). "svc.example" has fewer than ndots dots, so the search list
    # applies; "svc.example." must be asked for as it is, and found nowhere.
    if not (shutil.which("unshare") and shutil.which("ip") and shutil.which("mount")):
        pytest.skip("needs unshare(1), ip(8) and mount(8)")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        "nameserver 127.0.0.1\nsearch corp.test\noptions ndots:5 timeout:1 attempts:1\n"
    )
    shell = 'ip link set lo up && mount --bind "$2" /etc/resolv.conf && exec "$0" -c "$1"'
    args = (_SEARCH_LIST_CHILD, str(resolv))
    out = subprocess.run(
        [*("unshare", "--net", "--mount", "sh", "-c", shell), sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if out.returncode != 0 and "unshare failed" in out.stderr:
        pytest.skip(f"no new namespaces here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["svc.example"] == "127.0.0.1"  # the search list: the setup works
    assert got["svc.example."] == "HostNotFound"
    assert "svc.example" in got["queried"]


@pytest.fixture
def ipv4_only_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "localhost" is 127.0.0.1 only, as in an /etc/hosts without "::1 localhost".

    Always from memory (other names unknown, literals real): with the usual
    "hosts: files dns", glibc asks DNS for an AF_INET6 lookup of a name the hosts
    file lists for IPv4 only, so a real lookup needs a DNS server and fails offline
    (EAI_AGAIN, "Temporary failure in name resolution"). The fake answers as glibc
    does when the server does not know the name either: EAI_NONAME.
    """
    _fake_resolver(monkeypatch, {"localhost": ["127.0.0.1"]})


@pytest.mark.usefixtures("ipv4_only_localhost")
def test_a_name_of_the_other_family_only_is_not_an_unknown_host() -> None:
    # Before: HostNotFound "unknown host 'localhost': Name or service not known",
    # as if the name did not resolve at all, for a name that resolves (to IPv4).
    with pytest.raises(AddressError) as info:
        resolve_address(
            Address("localhost", 80),
            socket.SOCK_STREAM,
            passive=True,
            family=socket.AF_INET6,
            value="localhost:80",
        )
    assert not isinstance(info.value, HostNotFound)
    assert str(info.value) == (
        "invalid address 'localhost:80': 'localhost' has no IPv6 address, only IPv4 (127.0.0.1)"
    )
    assert resolve_address(
        Address("localhost", 80), socket.SOCK_STREAM, passive=True, family=socket.AF_INET
    ) == [(socket.AF_INET, ("127.0.0.1", 80))]


def test_an_ipv6_only_name_asked_for_ipv4_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_resolver(monkeypatch, {"v6.test": ["2001:db8::1", "2001:db8::2"]})
    with pytest.raises(AddressError) as info:
        resolve_address(
            Address("v6.test", 1), socket.SOCK_DGRAM, passive=False, family=socket.AF_INET
        )
    assert "'v6.test' has no IPv4 address, only IPv6 (2001:db8::1, 2001:db8::2)" in str(info.value)
    assert "'v6.test:1'" in str(info.value)  # no value given: the Address names itself


@pytest.mark.parametrize(
    ("error", "lookups"),
    # A name unknown in every family: looked up again without the family, still
    # HostNotFound. A DNS failure (EAI_AGAIN) says nothing about families: no
    # second lookup, the first answer stands.
    [(socket.EAI_NONAME, 2), (socket.EAI_AGAIN, 1)],
)
def test_a_name_that_does_not_resolve_stays_host_not_found(
    monkeypatch: pytest.MonkeyPatch, error: int, lookups: int
) -> None:
    asked = _fake_resolver(monkeypatch, {}, error)
    with pytest.raises(HostNotFound, match="unknown host 'nowhere.test'"):
        resolve_address(
            Address("nowhere.test", 1), socket.SOCK_STREAM, passive=True, family=socket.AF_INET6
        )
    assert asked == [socket.AF_INET6, socket.AF_UNSPEC][:lookups]


_hosts = st.one_of(
    st.just(""),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{1,8}){0,3}\.?", fullmatch=True),
)


@given(host=_hosts, port=st.integers(0, 65535))
def test_round_trip(host: str, port: int) -> None:
    a = parse_address((host, port))
    assert parse_address(str(a)) == a
    assert a.port == port


@given(st.text(alphabet=string.printable + "[]%:*\u0661", max_size=40))
def test_arbitrary_text_only_raises_address_error(text: str) -> None:
    try:
        a = parse_address(text)
    except AddressError:
        return
    assert parse_address(str(a)) == a


@given(st.tuples(st.text(max_size=20), st.one_of(st.integers(), st.text(max_size=3))))
def test_arbitrary_tuples_only_raise_address_error(value: tuple[str, object]) -> None:
    try:
        a = parse_address(value)  # type: ignore[arg-type]
    except AddressError:
        return
    assert parse_address(str(a)) == a


# --------------------------------------------------------------------------- hand-built


@pytest.mark.parametrize(
    ("host", "port", "needle"),
    [
        ("127.0.0.1", 99999, "port 99999 out of range 0-65535"),  # would bind 34463
        ("127.0.0.1", 65536, "port 65536 out of range"),
        ("127.0.0.1", -5, "port -5 out of range"),
        ("h", True, "port must be an int, got bool"),
        ("h", 80.0, "port must be an int, got float"),
        ("h", "80", "port must be an int, got str"),
        (b"h", 80, "host must be a str, got bytes"),
        (None, 80, "host must be a str, got NoneType"),
        ("not a host!", 80, "'not a host!' is not a valid host name"),
        ("999.1.1.1", 1, "'999.1.1.1' is not an IPv4 address"),
        ("[::1]", 1, "'[::1]' is not an IPv6 address"),
        ("1:2", 1, "'1:2' is not an IPv6 address"),
        ("fe80::1%e th", 1, "invalid IPv6 zone 'e th'"),
    ],
)
def test_hand_built_address_is_checked(host: object, port: object, needle: str) -> None:
    with pytest.raises(AddressError) as info:
        Address(host, port)  # type: ignore[arg-type]
    assert needle in str(info.value)
    assert repr((host, port)) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_hand_built_address_is_canonical() -> None:
    class Port(enum.IntEnum):
        HTTP = 80

    assert Address("Example.COM.", 1) == parse_address("example.com.:1")
    assert Address("::FFFF:0:1", 2) == parse_address("[::ffff:0:1]:2")
    assert Address("FE80::1%eth0", 3).host == "fe80::1%eth0"
    assert Address("*", 4) == Address("", 4)
    http = Address("h", Port.HTTP)
    assert type(http.port) is int and http == Address("h", 80)
    a = Address("::1", 5)
    assert parse_address(str(a)) == a
    with pytest.raises(AddressError, match="port 70000 out of range"):
        dataclasses.replace(a, port=70000)
    with pytest.raises(AddressError, match="port 70000 out of range"):
        a.with_port(70000)


@pytest.mark.parametrize(
    ("port", "reason"),
    [
        ("8080", "new port must be an int, got str '8080'"),
        (8080.0, "new port must be an int, got float 8080.0"),
        (None, "new port must be an int, got NoneType None"),
        (True, "new port must be an int, got bool True"),
        (70000, "new port 70000 out of range 0-65535"),
        (-1, "new port -1 out of range 0-65535"),
    ],
)
def test_with_port_names_the_rejected_port(port: object, reason: str) -> None:
    # Before: "invalid address Address(host='127.0.0.1', port=80): port must be an
    # int, got str", which named the address's valid port 80 and not the bad one.
    a = parse_address("127.0.0.1:80")
    with pytest.raises(AddressError) as info:
        a.with_port(port)  # type: ignore[arg-type]
    assert str(info.value) == f"invalid address {a!r}: {reason}"
    assert info.value.value == a
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[::ffff:10.0.0.1]:80", "[::ffff:a00:1]:80"),
        ("[::FFFF:a00:1]:80", "[::ffff:a00:1]:80"),
        (("::ffff:10.0.0.1", 80), "[::ffff:a00:1]:80"),
        (("::ffff:10.0.0.1", 80, 0, 3), "[::ffff:a00:1%3]:80"),
        ("[::ffff:10.0.0.1%eth0]:80", "[::ffff:a00:1%eth0]:80"),
        (Address("0:0:0:0:0:ffff:127.0.0.1", 80), "[::ffff:7f00:1]:80"),
        ("[::ffff:0.0.0.0]:1", "[::ffff:0:0]:1"),
        ("[::ffff:0.0.1.0]:1", "[::ffff:0:100]:1"),
        ("[::ffff:255.255.255.255]:1", "[::ffff:ffff:ffff]:1"),
        # Not IPv4-mapped: written in hex by every Python already.
        ("[::10.0.0.1]:80", "[::a00:1]:80"),
        ("[::ffff:0:10.0.0.1]:80", "[::ffff:0:a00:1]:80"),
        ("[64:ff9b::10.0.0.1]:80", "[64:ff9b::a00:1]:80"),
    ],
)
def test_an_ipv4_mapped_address_is_written_in_hex_on_every_python(
    value: Any, expected: str
) -> None:
    # Python 3.13's ipaddress writes ::ffff:10.0.0.1 dotted (CPython gh-87799),
    # 3.10-3.12 in hex; str(Address) is a node's hash_id, so it must not follow.
    addr = parse_address(value)
    assert str(addr) == expected
    assert parse_address(str(addr)) == addr


@given(st.integers(0, 2**32 - 1))
def test_every_ipv4_mapped_address_is_hex_and_round_trips(v4: int) -> None:
    ip = ipaddress.IPv6Address((0xFFFF << 32) | v4)
    addr = Address(f"::ffff:{ipaddress.IPv4Address(v4)}", 1)
    assert "." not in addr.host
    assert ipaddress.IPv6Address(addr.host) == ip
    assert parse_address(str(addr)) == addr
    if sys.version_info < (3, 13):
        # What 3.10-3.12 wrote, so that the mappings made there stay.
        assert addr.host == ip.compressed


# --------------------------------------------------------------------------- 4-tuples


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        # Before: "[::1%-1]:0" and "[::1%1099511627776]:0", then HostNotFound at bind.
        (("::1", 0, 0, -1), "scope_id -1 out of range 0-4294967295"),
        (("::1", 0, 0, 2**32), "scope_id 4294967296 out of range"),
        (("::1", 0, 0, 2**40), "scope_id 1099511627776 out of range"),
        # Before: any flowinfo was accepted and silently dropped.
        (("::1", 0, -7, 0), "flowinfo -7 out of range 0-1048575"),
        (("::1", 0, 2**20, 0), "flowinfo 1048576 out of range"),
        # Before: the scope_id was ignored when the host had a zone.
        (("fe80::1%4", 0, 0, 3), "zone '4' and scope_id 3 differ"),
        (("fe80::1%eth0", 0, 0, 3), "zone 'eth0' and scope_id 3 differ"),
    ],
)
def test_four_tuple_scope_id_and_flowinfo_are_checked(value: object, needle: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_address(value)  # type: ignore[arg-type]
    assert needle in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (("::1", 5, 2**20 - 1, 2**32 - 1), Address("::1%4294967295", 5)),
        (("fe80::1%3", 5, 0, 3), Address("fe80::1%3", 5)),  # the same zone twice
        (("fe80::1%eth0", 5, 0, 0), Address("fe80::1%eth0", 5)),  # 0: no scope given
        (("fe80::1", 5, 7, 0), Address("fe80::1", 5)),
    ],
)
def test_four_tuple_limits_accepted(value: object, expected: Address) -> None:
    a = parse_address(value)  # type: ignore[arg-type]
    assert a == expected
    assert parse_address(str(a)) == a


@pytest.mark.parametrize(
    "value",
    [
        "[fe80::1%4294967296]:80",
        "[::1%99999999999]:0",
        ("fe80::1%4294967296", 80),
        ("fe80::1%4294967296", 80, 0, 0),
    ],
)
def test_a_numeric_zone_beyond_a_u32_is_refused_when_parsed(value: object) -> None:
    # Before: it parsed, and failed only at bind or connect, as HostNotFound
    # ("Name or service not known"), though a literal never goes to DNS.
    with pytest.raises(AddressError) as info:
        parse_address(value)  # type: ignore[arg-type]
    assert "out of range 0-4294967295" in str(info.value)
    assert repr(value) in str(info.value)
    zone = str(value[0] if isinstance(value, tuple) else value).split("%")[1].split("]")[0]
    assert f"zone {zone} " in str(info.value)
    with pytest.raises(AddressError, match="zone 4294967296 out of range"):
        Address("fe80::1%4294967296", 80)


def test_the_largest_numeric_zone_is_accepted() -> None:
    a = parse_address("[fe80::1%4294967295]:80")
    assert a == parse_address(("fe80::1", 80, 0, 2**32 - 1))
    assert parse_address(str(a)) == a


@pytest.mark.parametrize(
    "value",
    ["[::1%01]:80", "[::1%0001]:80", ("::1%01", 80), ("::1%01", 80, 0, 1), ("::1", 80, 0, 1)],
    ids=repr,
)
def test_a_numeric_zone_with_leading_zeros_is_that_index(value: object) -> None:
    # Before: "%01" stayed as written, a second Address for interface 1 ("%1"): a
    # policy took both as two nodes, and the 4-tuple ("::1%01", 80, 0, 1) was refused
    # as "the host's zone '01' and scope_id 1 differ". A zone that is a name is
    # kept as written.
    a = parse_address(value)  # type: ignore[arg-type]
    assert a == parse_address("[::1%1]:80") and str(a) == "[::1%1]:80"
    assert Address("::1%001", 80) == a
    assert str(parse_address("[fe80::1%lo]:80")) == "[fe80::1%lo]:80"


@pytest.mark.parametrize("default_port", [None, 8080])
def test_an_empty_string_is_refused_not_all_interfaces(default_port: int | None) -> None:
    # Before: with a default port, "" was all interfaces (*:8080): an empty setting
    # listened everywhere, where "[]" is refused. "*" is the way to say it.
    with pytest.raises(AddressError) as info:
        parse_address("", default_port=default_port)
    assert str(info.value) == (
        "invalid address '': empty address (all interfaces are '*:port', ':port' or '*' "
        "with a default port)"
    )
    assert str(parse_address("*", default_port=8080)) == "*:8080"


def test_a_4_tuple_zone_of_thousands_of_digits_is_an_address_error() -> None:
    # Its zone is compared with the scope_id before its length is checked: int() of
    # it (leading zeros dropped) raised ValueError past Python's 4300-digit limit.
    with pytest.raises(AddressError, match="and scope_id 1 differ"):
        parse_address(("::1%" + "1" * 5000, 80, 0, 1))
    with pytest.raises(AddressError, match="invalid IPv6 zone"):
        parse_address("[::1%" + "0" * 5000 + "1]:80")


@pytest.mark.parametrize(
    ("text", "port"), [("000080", 80), ("0000000000000443", 443), ("0", 0), ("000", 0)]
)
def test_a_port_with_any_number_of_leading_zeros_is_that_port(text: str, port: int) -> None:
    # Before: up to five digits only, so "00080" was port 80 and "000080" "not a
    # number" (getaddrinfo's numeric service reads both as 80).
    assert parse_address(f"127.0.0.1:{text}").port == port


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("100000", "100000"),
        ("0100000", "100000"),
        ("8080000", "8080000"),
        ("9" * 30, "9" * 20 + "... (30 digits)"),
        ("1" * 5000, "1" * 20 + "... (5000 digits)"),
    ],
)
def test_a_port_of_six_digits_or_more_is_out_of_range_not_a_non_number(
    text: str, shown: str
) -> None:
    # Before: "port '100000' is not a number" (where 99999 was out of range), and
    # thousands of digits would have met int()'s digit limit (ValueError).
    with pytest.raises(AddressError) as info:
        parse_address(f"127.0.0.1:{text}")
    assert str(info.value).endswith(f": port {shown} out of range 0-65535")
    assert info.value.value == f"127.0.0.1:{text}"
