"""The one address parser every reuselb function uses.

Rules of this module:

* parsing is pure syntax: no DNS, no sockets. Names are resolved later by
  :func:`resolve_address`, which is where ``HostNotFound`` comes from;
* every accepted spelling parses to one canonical :class:`Address`, and
  ``parse_address(str(a)) == a`` for every ``Address`` this module returns;
* anything else raises :class:`~reuselb.AddressError` naming the value;
  no other exception escapes :func:`parse_address`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

from ._errors import AddressError, HostNotFound, shown

__all__ = ["Address", "AddressLike", "parse_address", "resolve_address"]

#: ``SockAddr`` as the socket module returns it: ``(host, port)`` or the IPv6 4-tuple.
SockAddr: TypeAlias = tuple[str, int] | tuple[str, int, int, int]

# ASCII digits only: str.isdigit() accepts e.g. Arabic-Indic digits, which int() then
# converts, so "١٢٣" would otherwise slip through as port 123.
_PORT_RE = re.compile(r"[0-9]+\Z")
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")
_V4ISH_RE = re.compile(r"[0-9.]+\Z")
# A label that is a number in inet_aton()'s forms: decimal, octal or 0x-hex. glibc's
# getaddrinfo reads some names made of such labels alone as an IPv4 address before
# any lookup ("0x7f.1" and "0x7f000001" bind 127.0.0.1): see _inet_aton_reads.
_ATON_LABEL_RE = re.compile(r"(?:[0-9]+|0[xX][0-9A-Fa-f]+)\Z")
# inet_aton's parts: "0x" and hex digits, "0" and octal digits, or decimal digits.
_ATON_PART_RE = re.compile(r"0[xX]([0-9A-Fa-f]+)\Z|0([0-7]*)\Z|([1-9][0-9]*)\Z")
# sockaddr_in6: sin6_scope_id is a u32 interface index, sin6_flowinfo carries a
# 20-bit flow label (the traffic class bits above it are not the caller's to set).
_SCOPE_ID_MAX = 2**32 - 1
_FLOWINFO_MAX = 2**20 - 1


def _host_family(host: str) -> socket.AddressFamily:
    if ":" in host:
        return socket.AF_INET6
    if host and _V4ISH_RE.match(host):
        return socket.AF_INET
    return socket.AF_UNSPEC


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed ``host:port``.

    Built by :func:`parse_address`, or by hand: ``Address(host, port)`` checks its
    fields the same way and stores the host in canonical form, so two spellings of
    one address compare equal (``Address("::FFFF:0:1", 80) == Address("::ffff:0:1", 80)``).

    :ivar host: ``""`` for all interfaces; an IPv4 literal; an IPv6 literal
        without brackets, compressed, lower-case and all in hex on every Python
        version (``::ffff:a00:1``, not ``::ffff:10.0.0.1``), a zone kept as
        ``%zone``; or a lower-case host name, with its trailing dot if it has one
        (``"svc.example."`` is absolute: it is resolved without the resolver's
        search list, and is not the same host as ``"svc.example"``).
    :ivar port: ``0`` to ``65535``; ``0`` asks the kernel for a free port.
    :raises AddressError: *host* is not a str, not an IP literal or a host name
        (labels that are all numbers are not a host name: inet_aton's ``"127.1"``
        or ``"0x7f.1"``, which getaddrinfo reads as IPv4, nor ``"0x7f.08"`` or
        ``"0x7f.1."``, which it does not), or *port* is not an int in ``0..65535``
        (a bool is refused).
    """

    host: str
    port: int

    def __post_init__(self) -> None:
        # Checked here and not only in parse_address: a hand-built Address goes
        # straight to bind(), and the socket module truncates the port to 16 bits
        # (port 99999 binds 34463) while a malformed host becomes a DNS lookup.
        value = (self.host, self.port)
        if not isinstance(self.host, str):
            raise AddressError(value, f"host must be a str, got {type(self.host).__name__}")
        port = _check_port(self.port, value)
        host = _canonical(self.host, value)
        # Frozen: the canonical forms go in through object.__setattr__.
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)

    @property
    def is_wildcard(self) -> bool:
        """True for "all interfaces" (``""``, ``0.0.0.0`` or ``::``)."""
        return self.host in ("", "0.0.0.0", "::")

    @property
    def family(self) -> socket.AddressFamily:
        """``AF_INET``/``AF_INET6`` for literals, ``AF_UNSPEC`` for names and ``""``."""
        return _host_family(self.host)

    @property
    def is_literal(self) -> bool:
        """True when no name resolution is needed."""
        return self.host == "" or self.family != socket.AF_UNSPEC

    def with_port(self, port: int) -> Address:
        """The same host with another port.

        :raises AddressError: *port* is not an int in ``0..65535`` (a bool is
            refused); the message names this address and the rejected port.
        """
        # Named "new port": the error's value is this address, whose own port is
        # valid, so the reason has to show the rejected one.
        return _make(self.host, _check_port(port, self, "new port"))

    def __str__(self) -> str:
        if self.host == "":
            return f"*:{self.port}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _make(host: str, port: int) -> Address:
    """An :class:`Address` from a host and port this module already checked.

    Skips ``__post_init__``: the parser has just produced the canonical host, and
    parsing it a second time would double the cost of every ``parse_address``
    (which balance policies call for every node).
    """
    addr = object.__new__(Address)
    object.__setattr__(addr, "host", host)
    object.__setattr__(addr, "port", port)
    return addr


#: What every reuselb function accepts as an address.
AddressLike: TypeAlias = Address | str | tuple[str, int] | tuple[str, int, int, int] | int


def parse_address(value: AddressLike, *, default_port: int | None = None) -> Address:
    """Parse any accepted spelling of an address into an :class:`Address`.

    Accepted: ``"host:port"``, ``"1.2.3.4:port"``, ``"[v6]:port"``,
    ``"[fe80::1%eth0]:port"``, ``":port"`` and ``"*:port"`` (all interfaces),
    ``(host, port)`` and the IPv6 ``(host, port, flowinfo, scope_id)`` tuples,
    a bare ``int`` port (all interfaces), or an :class:`Address` (returned as is).
    A string without a port is accepted only when *default_port* is given; an
    empty string is refused (all interfaces are spelt ``"*"``, ``"*:port"`` or
    ``":port"``, never by omission).

    In a 4-tuple a non-zero *scope_id* becomes the zone (``("fe80::1", 80, 0, 3)``
    is ``[fe80::1%3]:80``); a host that already has a ``%zone`` must not give a
    different one. *flowinfo* is checked and dropped: an :class:`Address` has no
    flow label.

    :param value: the address.
    :param default_port: port to use when a string names only a host, an int in
        ``0..65535``; checked whether or not it is used.
    :returns: the canonical :class:`Address`.
    :raises AddressError: the value is malformed (an IPv4 address spelled other
        than as four decimal octets, such as ``"127.1"`` or ``"0x7f.0.0.1"``,
        included), a port is out of ``0..65535``,
        an IPv6 literal lacks its brackets or has a numeric ``%zone`` above
        ``2**32-1``, or a 4-tuple's *scope_id* is out of
        ``0..2**32-1``, its *flowinfo* out of ``0..2**20-1``, or its *scope_id*
        differs from the host's ``%zone``; or *default_port* is not ``None`` nor an
        int in ``0..65535`` (a bool or a service name such as ``"http"`` is not),
        even where *value* has a port of its own (the message names
        *default_port*).
    """
    if default_port is not None:
        # Up front, not only where a host without a port needs it: a bad default
        # (from a config file, say) would otherwise pass until the one address that
        # lacks a port, far from where it was set.
        default_port = _check_port(default_port, value, "default_port")
    if isinstance(value, Address):
        return value
    if isinstance(value, bool):
        raise AddressError(value, "expected a port number, got a bool")
    if isinstance(value, int):
        return _make("", _check_port(value, value))
    if isinstance(value, str):
        return _parse_str(value, default_port)
    if isinstance(value, tuple):
        return _parse_tuple(value)
    raise AddressError(
        value,
        f"expected a 'host:port' string, a (host, port) tuple or an int port, "
        f"got {type(value).__name__}",
    )


def _check_port(port: object, value: object, name: str = "port") -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        got = f"{type(port).__name__} {shown(port)}" if name != "port" else type(port).__name__
        raise AddressError(value, f"{name} must be an int, got {got}")
    if not 0 <= port <= 65535:
        raise AddressError(value, f"{name} {shown(port)} out of range 0-65535")
    # int() turns an int subclass (an IntEnum) into the plain int every Address holds.
    return int(port)


def _parse_port_text(text: str, value: object) -> int:
    if not _PORT_RE.match(text):
        raise AddressError(value, f"port {text!r} is not a number")
    # Any count of digits is a number, as getaddrinfo's numeric service reads it:
    # "100000" was "not a number" where "99999" was out of range, and "000080" was
    # refused where "00080" was port 80. Past five significant digits it is out of
    # range whatever it is (and int() of thousands of digits would raise ValueError
    # in Python 3.11+).
    digits = text.lstrip("0") or "0"
    if len(digits) > 5:
        shown = digits if len(digits) <= 20 else f"{digits[:20]}... ({len(digits)} digits)"
        raise AddressError(value, f"port {shown} out of range 0-65535")
    return _check_port(int(digits), value)


def _parse_str(value: str, default_port: int | None) -> Address:
    if not value:
        # With a default port, "" parsed as all interfaces: an empty setting (an
        # unset environment variable, a blank config line) listened on every
        # interface without a word, where "[]" is refused. All interfaces are
        # spelt on purpose: "*:port", ":port", or "*" with a default port.
        raise AddressError(
            value, "empty address (all interfaces are '*:port', ':port' or '*' with a default port)"
        )
    text = value
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise AddressError(value, "'[' without matching ']'")
        host_text = text[1:close]
        rest = text[close + 1 :]
        if rest == "":
            port = _default(value, default_port)
        elif rest.startswith(":"):
            port = _parse_port_text(rest[1:], value)
        else:
            raise AddressError(value, f"unexpected {rest!r} after ']'")
        if not host_text:
            raise AddressError(value, "empty IPv6 literal '[]'")
        return _make(_canonical_v6(host_text, value), port)
    if text.count(":") > 1:
        raise AddressError(value, "an IPv6 literal with a port must be in brackets, e.g. [::1]:80")
    host_text, sep, port_text = text.rpartition(":")
    if not sep:
        host_text, port = text, _default(value, default_port)
    else:
        port = _parse_port_text(port_text, value)
    return _make(_canonical_host(host_text, value), port)


def _default(value: object, default_port: int | None) -> int:
    if default_port is None:
        raise AddressError(value, "no port given (expected 'host:port')")
    return default_port  # parse_address checked it


def _parse_tuple(value: tuple[object, ...]) -> Address:
    if len(value) not in (2, 4):
        raise AddressError(value, f"expected (host, port) or a 4-tuple, got {len(value)} items")
    host, port = value[0], value[1]
    if not isinstance(host, str):
        raise AddressError(value, f"host must be a str, got {type(host).__name__}")
    port = _check_port(port, value)
    if len(value) == 4:
        flowinfo, scope_id = value[2], value[3]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (flowinfo, scope_id)):
            raise AddressError(value, "flowinfo and scope_id must be ints")
        assert isinstance(flowinfo, int) and isinstance(scope_id, int)
        if ":" not in host:
            raise AddressError(value, "a 4-tuple address must have an IPv6 host")
        # The kernel's fields are a u32 interface index and a 20-bit flow label
        # (sockaddr_in6). Out of range, the scope id would become a zone no lookup
        # can resolve ("%-1") and fail later as HostNotFound; the flow label, which
        # an Address does not keep, would be dropped without a word.
        if not 0 <= scope_id <= _SCOPE_ID_MAX:
            raise AddressError(value, f"scope_id {shown(scope_id)} out of range 0-{_SCOPE_ID_MAX}")
        if not 0 <= flowinfo <= _FLOWINFO_MAX:
            raise AddressError(value, f"flowinfo {shown(flowinfo)} out of range 0-{_FLOWINFO_MAX}")
        if scope_id:
            _, pct, zone = host.partition("%")
            if not pct:
                host = f"{host}%{scope_id}"
            elif _numeric_zone(zone) != str(scope_id):
                # Two zones: which one the caller meant cannot be told without asking
                # the kernel (a name may or may not be that index), and parsing is
                # pure syntax. Keeping either silently could bind another interface.
                raise AddressError(
                    value,
                    f"the host's zone {zone!r} and scope_id {scope_id} differ; "
                    "give the zone once, in the host or as scope_id",
                )
    return _make(_canonical(host, value), port)


def _canonical(text: str, value: object) -> str:
    """The canonical form of any host spelling (a colon means an IPv6 literal)."""
    return _canonical_v6(text, value) if ":" in text else _canonical_host(text, value)


def _canonical_v6(text: str, value: object) -> str:
    addr, pct, zone = text.partition("%")
    if pct and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", zone):
        raise AddressError(value, f"invalid IPv6 zone {zone!r}")
    if pct and zone.isdigit() and int(zone) > _SCOPE_ID_MAX:
        # A numeric zone is the interface index itself (sin6_scope_id, a u32), as a
        # 4-tuple's scope_id is. Beyond it getaddrinfo takes the digits for an
        # interface name, finds none and answers "Name or service not known":
        # a HostNotFound for a literal that never goes to DNS.
        raise AddressError(value, f"zone {zone} out of range 0-{_SCOPE_ID_MAX}")
    try:
        ip = ipaddress.IPv6Address(addr)
    except ValueError as exc:
        raise AddressError(value, f"{addr!r} is not an IPv6 address ({exc})") from None
    text = _v6_text(ip)
    return f"{text}%{_numeric_zone(zone)}" if pct else text


def _numeric_zone(zone: str) -> str:
    """A numeric zone (an interface index) without leading zeros: ``%01`` and ``%1``
    name one interface, as a 4-tuple's scope_id 1 does, so they are one Address
    (two Nodes of a policy were one interface's twice). A name is kept as written."""
    # lstrip, not int(): a zone of thousands of digits (a 4-tuple's, compared with
    # its scope_id before the zone's length is checked) would raise ValueError there.
    return (zone.lstrip("0") or "0") if zone.isascii() and zone.isdigit() else zone


def _v6_text(ip: ipaddress.IPv6Address) -> str:
    """*ip* compressed (longest zero run as ``::``), lower-case and all in hex.

    ``ip.compressed`` is not the same on every Python: 3.13 writes an IPv4-mapped
    address with its IPv4 part dotted (``::ffff:10.0.0.1``, CPython gh-87799) where
    3.10-3.12 write hex (``::ffff:a00:1``). The host is in ``str(Address)`` and so in
    a node's ``hash_id``, which places the node in the hash policies, whose mapping
    must not depend on the Python version. The hex form is kept, so mappings made on
    3.10-3.12 stay as they were.
    """
    if ip.ipv4_mapped is None:
        # Every other form (IPv4-compatible ``::a00:1``, NAT64 ``64:ff9b::a00:1``,
        # ``::ffff:0:a00:1``) is written in hex by 3.10-3.13 alike.
        return ip.compressed
    # ::ffff:0:0/96: the five zero hextets are the longest zero run whatever the
    # IPv4 part, so the compressed form is always "::ffff:" and two hex hextets.
    low = int(ip) & 0xFFFFFFFF
    return f"::ffff:{low >> 16:x}:{low & 0xFFFF:x}"


def _canonical_host(text: str, value: object) -> str:
    if text in ("", "*"):
        return ""
    if _V4ISH_RE.match(text):
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError as exc:
            raise AddressError(value, f"{text!r} is not an IPv4 address ({exc})") from None
    # A trailing dot makes the name absolute: the resolver looks it up as it is,
    # without the search list of resolv.conf ("svc.example." never becomes
    # svc.example.corp.test). It is another name than the one without the dot, so
    # it stays in the host, and is left out only where the length and the labels
    # are checked (253 characters is the limit without it, RFC 1035 2.3.4).
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL_RE.match(label) for label in labels):
        raise AddressError(value, f"{text!r} is not a valid host name")
    if all(_ATON_LABEL_RE.match(label) for label in labels):
        # Digits and dots alone are decided above (ipaddress takes four decimal
        # octets and refuses the rest); these have a hex label. Some are inet_aton's hex spellings
        # of an address, which glibc's getaddrinfo reads before any lookup: taken as
        # a name, "0x7f.1:80" and "127.0.0.1:80" would be two Address values for
        # one endpoint (two nodes of one balance policy).
        if _inet_aton_reads(text):
            raise AddressError(
                value,
                f"{text!r} is not an IPv4 address (a number form of inet_aton, which "
                "getaddrinfo does not look up as a name; write the four decimal octets)",
            )
        # The others inet_aton refuses (a trailing dot, "08", more than four parts,
        # a part too large), so glibc 2.36 would look them up as names. They are
        # refused all the same: a string of numbers reads as an address to people
        # and to other parsers, and a slightly different one ("0x7f.1" for
        # "0x7f.1.") is one, so accepting these would only make the rule harder
        # to state.
        raise AddressError(
            value,
            f"{text!r} is not a valid host name (a host name whose labels are all "
            "numbers is not a name, and inet_aton does not read this one as an IPv4 "
            "address either)",
        )
    return text.lower()


def _inet_aton_reads(text: str) -> bool:
    """Whether glibc's ``inet_aton`` (and so ``getaddrinfo``) reads *text* as IPv4.

    The rules of glibc's ``__inet_aton_exact`` (resolv/inet_addr.c), which
    getaddrinfo calls on every host before a lookup, written out here so that
    parsing stays pure syntax (this module's rule): one to four parts split
    at dots, each a number as C's ``strtoul(..., 0)`` reads it (``0x`` hex, a
    leading ``0`` octal, else decimal) and nothing after it; every part but the
    last at most 255, the last filling the bytes left (``"127.1"``: 1 fills three
    bytes, at most 0xffffff). An empty part (a trailing dot) fails.
    """
    parts = text.split(".")
    if len(parts) > 4:
        return False
    values = []
    for part in parts:
        m = _ATON_PART_RE.match(part)
        if m is None:
            return False
        hexa, octal, decimal = m.groups()
        if hexa is not None:
            values.append(int(hexa, 16))
        elif octal is not None:
            values.append(int(octal, 8) if octal else 0)
        else:
            values.append(int(decimal))
    *head, last = values
    return all(v <= 0xFF for v in head) and last < 1 << (8 * (4 - len(head)))


def resolve_address(
    address: Address,
    socktype: socket.SocketKind,
    *,
    passive: bool,
    family: socket.AddressFamily = socket.AF_UNSPEC,
    value: object = None,
) -> list[tuple[socket.AddressFamily, SockAddr]]:
    """Turn an :class:`Address` into ``(family, sockaddr)`` candidates, in preference order.

    Literals never touch DNS. The wildcard ``""`` is ``0.0.0.0`` when *passive*
    (binding) and ``127.0.0.1`` otherwise, unless *family* asks for IPv6.

    :param value: what the caller wrote, for error messages (default: *address*).
    :raises HostNotFound: the name does not resolve, in any family.
    :raises AddressError: an IPv6 literal's zone names no interface of this host, or
        the name resolves, but not in *family* (it has IPv4 addresses only, say, and
        *family* is ``AF_INET6``).
    """
    host = address.host
    literal, pct, zone = host.partition("%")
    if pct and not zone.isdigit():
        # glibc's getaddrinfo answers a named zone with EAI_NONAME ("Name or service
        # not known") when no interface has that name, and also when the address is
        # not link-local ("::1%lo"; it looks names up for link-local scopes only),
        # which would read as a DNS failure of a literal that never goes to DNS.
        # The index is what the sockaddr carries either way: look the name up here,
        # name the zone if it is unknown, and hand getaddrinfo the number.
        try:
            host = f"{literal}%{socket.if_nametoindex(zone)}"
        except OSError:
            raise AddressError(
                str(address) if value is None else value,
                f"no interface named {zone!r} (the address's zone)",
            ) from None
    if host == "":
        if family == socket.AF_INET6:
            host = "::" if passive else "::1"
        else:
            host = "0.0.0.0" if passive else "127.0.0.1"
    numeric = _host_family(host) != socket.AF_UNSPEC
    flags = socket.AI_NUMERICHOST if numeric else 0
    if passive:
        flags |= socket.AI_PASSIVE
    try:
        infos = socket.getaddrinfo(host, address.port, family, socktype, 0, flags)
    except socket.gaierror as exc:
        if family != socket.AF_UNSPEC and not numeric and exc.errno in _NO_ADDRESS_CODES:
            reason = _other_family(host, address.port, family, socktype, flags)
            if reason is not None:
                raise AddressError(str(address) if value is None else value, reason) from None
        raise HostNotFound(host, exc.strerror or str(exc)) from None
    out = _ip_entries(infos)
    if not out:
        raise HostNotFound(host, "no IPv4 or IPv6 address")
    return out


def _ip_entries(infos: list[Any]) -> list[tuple[socket.AddressFamily, SockAddr]]:
    out: list[tuple[socket.AddressFamily, SockAddr]] = []
    for fam, _type, _proto, _canon, sockaddr in infos:
        # getaddrinfo may list AF_UNIX/AF_PACKET-free entries only on exotic
        # configurations; keep IP families and drop duplicates (one per socktype).
        entry = (socket.AddressFamily(fam), cast(SockAddr, sockaddr[:4]))
        if entry[0] in (socket.AF_INET, socket.AF_INET6) and entry not in out:
            out.append(entry)
    return out


# What glibc answers a lookup restricted to one family when the name has addresses
# of the other family only: EAI_NONAME from /etc/hosts ("localhost" with just
# 127.0.0.1 asked for AF_INET6), EAI_NODATA or EAI_ADDRFAMILY from DNS. The same
# codes mean "no such name" too, hence the second lookup to tell the two apart.
_NO_ADDRESS_CODES = frozenset(
    getattr(socket, name)
    for name in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY")
    if hasattr(socket, name)
)


def _other_family(
    host: str, port: int, family: socket.AddressFamily, socktype: socket.SocketKind, flags: int
) -> str | None:
    """Why *host*, not found in *family*, failed: it resolves in the other family only.

    None when the name does not resolve at all (or the second lookup failed too,
    e.g. a DNS timeout): HostNotFound is then the truth. Reporting a name that
    resolves as HostNotFound ("Name or service not known") sent the caller looking
    for a DNS fault.
    """
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socktype, 0, flags)
    except socket.gaierror:
        return None
    found = _ip_entries(infos)
    if not found or any(fam == family for fam, _ in found):
        # No IP address at all, or (the hosts file or DNS changed between the two
        # lookups) one in *family* after all: the first answer stands.
        return None
    wanted, other = ("IPv6", "IPv4") if family == socket.AF_INET6 else ("IPv4", "IPv6")
    addresses = ", ".join(dict.fromkeys(sockaddr[0] for _, sockaddr in found))
    return f"{host!r} has no {wanted} address, only {other} ({addresses})"
