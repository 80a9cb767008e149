"""Consistent hash ring with virtual nodes, and a ketama-compatible mode.

Rules of this module: pure (no I/O). The sorted point list is rebuilt when
membership, weights or states change and published by one attribute store; an
unbounded pick is one hash and one ``bisect`` (C), without the lock. Equal points
are ordered by ``hash_id``, so the ring does not depend on insertion order.

Ketama mode (``ketama=True``, or ``"libketama"``) reproduces libketama's (last.fm)
continuum; ``ketama="libmemcached"`` reproduces libmemcached's weighted ketama
(``MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED``). Both:

* server string ``"<hash_id>-<i>"`` where ``hash_id`` is the node's name, else
  ``"host:port"`` (libmemcached drops ``":11211"`` for the default port: give such
  nodes ``name="host"`` to match it);
* ``D`` MD5 digests per server, ``i = 0 .. D-1``, each giving 4 points: the digest's
  four little-endian 32-bit words;
* a key's point is the first 4 bytes of MD5(key) read little-endian, and it maps
  to the first ring point ``>=`` it, wrapping to the first point.

They differ in ``D`` only (both round the share in single precision, ``float``).
libketama (:func:`libketama_digests`): ``floorf(pct * 40.0 * (float)servers)`` with
``float pct = (float)weight / (float)total_weight``: 160 points per server with
equal weights, except 156 (39 digests) for some server counts (61, 122, 237, 244,
474, 488 below 500), where ``pct`` rounds down. libmemcached
(:func:`libmemcached_digests`) rounds every step to ``float``, which drops more
shares by one digest: 39 digests (156 points) per server for 25 or more
equal-weight servers. The seed and secret options do not exist in ketama mode
(they would break compatibility).
"""

from __future__ import annotations

import hashlib
import math
import struct
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from fractions import Fraction
from hashlib import md5 as _md5
from typing import Any, Literal
from zlib import crc32 as _crc32

from .._errors import InvalidArgument
from ._base import HashPolicy, Key, Node, NodeLike, NodeState, _secret_error, node_list
from ._base import words as _words

__all__ = [
    "KETAMA_MODES",
    "MAX_POINTS",
    "MAX_VNODES",
    "RingHash",
    "ketama_points",
    "libketama_digests",
    "libmemcached_digests",
]

MAX_VNODES = 1000
"""The most points per weight unit (``vnodes``)."""

MAX_POINTS = 1 << 22
"""The most points a ring (``ketama=False``) may have: ``vnodes`` x the total
weight of the live nodes. A change that would exceed it raises InvalidArgument
and leaves the policy as it was. 2**22 (4,194,304) points take ~6 s to build
and ~200 MB (see :class:`RingHash`)."""

_ARC_SHIFT = 14
_ARCS = 1 << (32 - _ARC_SHIFT)


KETAMA_MODES = (True, "libketama", "libmemcached")
"""What ``RingHash(ketama=...)`` accepts besides False: whose continuum to build."""

_F32 = struct.Struct("<f")
_ULONG_MAX = (1 << 64) - 1
_UINT_MAX = (1 << 32) - 1


def _f32(x: float) -> float:
    """*x* rounded to the nearest IEEE single (C's ``(float)x``)."""
    return float(_F32.unpack(_F32.pack(x))[0])


def _check_counts(weight: int, total: int, servers: int) -> None:
    for name, value, low, high in (
        ("total", total, 1, _ULONG_MAX),
        ("weight", weight, 0, total),
        ("servers", servers, 1, _UINT_MAX),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidArgument(name, value, f"must be an int in {low}..{high}")


def libketama_digests(weight: int, total: int, servers: int) -> int:
    """MD5 digests (4 points each) libketama gives one server.

    libketama (``ketama.c``, ``ketama_create_continuum``) computes, in C::

        float pct = (float)slist[i].memory / (float)totalmemory;
        unsigned int ks = floorf( pct * 40.0 * (float)numservers );

    ``pct`` is rounded to single precision; ``40.0`` is a double, so the product
    is computed in double (exactly: a 24-bit ``pct`` times 40 times the server
    count fits in 53 bits); ``floorf`` takes a ``float``, so the product is rounded
    to single precision before the floor. Each step is emulated here (IEEE single
    and double, as on x86-64 and ARM64). The single-precision ``pct`` is why some
    equal-weight server counts get 39 digests, not 40: ``(float)(1.0 / 61)`` is
    below 1/61, and ``pct * 40.0 * 61`` rounds to the float just below 40.

    :param weight: the server's weight (libketama's ``memory``): an int in
        ``0..total``.
    :param total: the total weight of the servers (an ``unsigned long``): an int
        in ``1..2**64-1``.
    :param servers: the number of servers (an ``unsigned int``): an int in
        ``1..2**32-1``.
    :returns: the number of digests.
    :raises InvalidArgument: an argument is not an int in its range.
    """
    _check_counts(weight, total, servers)
    pct = _f32(_f32(weight) / _f32(total))
    return math.floor(_f32(pct * 40.0 * _f32(servers)))


def libmemcached_digests(weight: int, total: int, servers: int) -> int:
    """MD5 digests (4 points each) libmemcached's weighted ketama gives one server.

    libmemcached (``hosts.cc``, 1.0 and 1.1) computes, in C::

        float pct = (float)weight / (float)total_weight;
        pointer_per_server = (uint32_t)((floor((float)(pct * 160 / 4
                              * (float)live_servers + 0.0000000001))) * 4);

    with each ``float`` operation rounded to single precision (IEEE, as on x86-64
    with SSE and on ARM64) and the ``+ 1e-10`` in double. Each step is emulated
    here: one float operation computed in double and then rounded to single gives
    the correctly rounded single result, since a double holds more than twice a
    single's 24 bits.

    :param weight: the server's weight: an int in ``0..total``.
    :param total: the total weight of the live servers: an int in ``1..2**64-1``.
    :param servers: the number of live servers: an int in ``1..2**32-1``.
    :returns: the number of digests.
    :raises InvalidArgument: an argument is not an int in its range.
    """
    _check_counts(weight, total, servers)
    pct = _f32(_f32(weight) / _f32(total))
    x = _f32(pct * 160.0)
    x = _f32(x / 4.0)
    x = _f32(x * _f32(servers))
    return math.floor(_f32(x + 1e-10))


def ketama_points(
    nodes: Iterable[NodeLike], *, libmemcached: bool = False
) -> list[tuple[int, str, Node]]:
    """The ketama continuum of *nodes* as ``(point, hash_id, node)``, unsorted.

    :param nodes: the servers, what a policy constructor takes: :class:`Node`
        objects or addresses (each a ``Node`` of weight 1), in any iterable (read
        once, so a generator works too); each gets
        ``floorf((float)(weight / total) x 40.0 x N)`` MD5 digests of 4 points,
        with libketama's single-precision rounding (:func:`libketama_digests`).
        Servers that are down or draining are left out, as from the ring of
        ``RingHash(nodes, ketama=True)``: *total* and *N* count the up servers
        only, as in a client that ejected the others.
    :param libmemcached: count the digests in single precision, as libmemcached's
        weighted ketama does (:func:`libmemcached_digests`).
    :returns: the points; empty when no server is up or every up server's weight
        is 0 (no server has a share to place).
    :raises InvalidArgument: *libmemcached* is not a bool, or *nodes* is one
        address (a string, or a ``(host, port)`` or IPv6 4-tuple), a mapping or not
        iterable at all; the error names the value.
    :raises AddressError: an item of *nodes* is neither a :class:`Node` nor an
        address (``None``, ``1.5``, bytes, a ``[host, port]`` list) or is a
        malformed address, or *nodes* is a tuple that can only be one address and a
        malformed one.
    :raises DuplicateNode: two nodes share an address or a name, or one node's name
        is another node's address (listed twice, a node would get twice its points).
    """
    if not isinstance(libmemcached, bool):
        # a truthy "no" (or 1) silently switched to libmemcached's point counts,
        # as RingHash(ketama=...) refuses for the same reason
        raise InvalidArgument("libmemcached", libmemcached, "must be a bool")
    # One pass: the checks and the points read the same list (a generator was
    # consumed by the checks, and gave no points).
    # Checked as a whole (duplicates among down servers too), the up ones placed, as
    # RingHash(nodes, ketama=True) places them. (A weight-0 server still counts in
    # N, as in libketama's server list: see test_ketama_points_of_weightless_nodes.)
    return _ketama_points([n for n in node_list(nodes) if n.state is NodeState.UP], libmemcached)


def _ketama_points(servers: Sequence[Node], libmemcached: bool) -> list[tuple[int, str, Node]]:
    """:func:`ketama_points` of nodes that passed a policy's checks already.

    RingHash calls this on its live nodes at every rebuild: they were checked for
    duplicates when they were added, and are not parsed and compared again.
    """
    total = sum(n.weight for n in servers)
    out: list[tuple[int, str, Node]] = []
    if total == 0:
        return out
    for n in servers:
        if libmemcached:
            digests = libmemcached_digests(n.weight, total, len(servers))
        else:
            digests = libketama_digests(n.weight, total, len(servers))
        for i in range(digests):
            d = hashlib.md5(f"{n.hash_id}-{i}".encode()).digest()
            for j in range(4):
                out.append((int.from_bytes(d[4 * j : 4 * j + 4], "little"), n.hash_id, n))
    return out


class RingHash(HashPolicy):
    """A consistent hash ring: when a node leaves only its keys move (to the next
    points), about 1/N of them; balance depends on the number of points
    (160 per node gives ~10% spread at N=100). Not so in ketama mode, which, as
    libketama and libmemcached do, recomputes every server's point count from the
    total weight and the server count: only with equal weights do only the leaving
    server's keys move, and not even then at scattered server counts where single
    precision rounding gives every server 156 points instead of 160 (libketama 61
    and 122 of 2-200, libmemcached 19 counts of 2-200 including 25, 47, 50, 55,
    61, 71, 94 and 100): a change to or from such a count moves other servers'
    keys too (see :func:`libketama_digests`, :func:`libmemcached_digests`).

    Cost: a node has ``vnodes x weight`` points, so the ring grows with the
    absolute weights, not their ratios (weights 1000, 1000 build a ring 1000x the
    size of weights 1, 1, with the same shares). Every change rebuilds the whole
    ring: ~1.3-1.6 s per million points (CPython 3.11, a shared 2-core VM), and
    ~50 bytes per point while it is live (about twice that at the build's peak,
    plus the previous ring until the new one is published). 16,000 points (100
    nodes of weight 1) take ~15 ms; 10 nodes of weight 1000 (1.6 million) ~2 s and
    75 MB. Weights are not reduced by their common divisor: that would rescale
    every node when one leaves and move the others' keys. A membership whose ring
    would exceed :data:`MAX_POINTS` (2**22) points is refused. Ketama mode has
    about 160 points per server whatever the weights.

    :param nodes: initial nodes.
    :param vnodes: points per weight unit, ``1..MAX_VNODES`` (1000); ignored in
        ketama mode.
    :param ketama: ``True`` or ``"libketama"``: build libketama's continuum (MD5;
        see the module doc); ``"libmemcached"``: libmemcached's weighted ketama
        continuum. Both round the point counts in single precision as their C
        code does (:func:`libketama_digests`, :func:`libmemcached_digests`):
        equal-weight servers get 160 points each in libketama (156 for some
        counts: 61, 122, 237, 244, ...), 156 in libmemcached from 25 servers on.
        A weighted ketama server whose share rounds down to no digest has no points
        and gets no keys (as in libketama); with ``balance_factor`` it takes a key
        only when every server with points is at its bound.
    :param seed: reshuffles the mapping (see :class:`KeyHasher`).
    :param secret: keyed hash so chosen keys cannot aim at one node.
    :param balance_factor: bounded load, a finite real number ``>= 1`` (see
        :class:`HashPolicy`); the next candidates are the following ring points.
    :raises InvalidArgument: vnodes not an int in ``1..MAX_VNODES``, ketama not a
        bool, ``"libketama"`` or ``"libmemcached"``, seed/secret with ketama, seed,
        secret or balance_factor out of range (see :class:`KeyHasher`,
        :class:`HashPolicy`), *nodes* one address string, a mapping or not iterable
        at all, or ``vnodes`` x the total weight of the live nodes above
        :data:`MAX_POINTS` (raised by ``add``, ``set_weight`` and ``mark_up`` too,
        which then leave the policy as it was).
    :raises DuplicateNode: two nodes share an address or a name, or one node's name
        is another node's address.
    :raises AddressError: an address in *nodes* is malformed.
    """

    name = "ring"
    lock_free_pick = True

    def __init__(
        self,
        nodes: Iterable[NodeLike] = (),
        *,
        vnodes: int = 160,
        ketama: bool | Literal["libketama", "libmemcached"] = False,
        seed: int = 0,
        secret: bytes | None = None,
        balance_factor: float | Fraction | Decimal | None = None,
    ) -> None:
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or not 1 <= vnodes <= MAX_VNODES:
            raise InvalidArgument("vnodes", vnodes, f"must be an int in 1..{MAX_VNODES}")
        if not isinstance(ketama, bool) and not (
            isinstance(ketama, str) and ketama in KETAMA_MODES[1:]
        ):
            # a truthy "no" (or 1) would silently switch the hash to MD5
            raise InvalidArgument("ketama", ketama, 'must be a bool, "libketama" or "libmemcached"')
        if ketama is not False and seed:
            # The seed is the bad value (ketama's MD5 has none), not ketama.
            raise InvalidArgument("seed", seed, f"is not taken in ketama mode (ketama={ketama!r})")
        if ketama is not False and secret is not None:
            # named by type and length only: a secret is never formatted
            raise _secret_error(
                secret, f"is not taken in ketama mode (ketama={ketama!r})", InvalidArgument
            )
        self._vnodes = vnodes
        self._ketama_mode = ketama
        self._ketama = ketama is not False
        self._libmemcached = ketama == "libmemcached"
        self._crc_seed = seed if secret is None and not ketama else None
        self._ring: tuple[list[int], list[Node], tuple[array[int], list[Node | None]]] = (
            [],
            [],
            (array("H"), []),
        )
        # (points, owners, arcs, crc seed or None for ketama's MD5), or None when
        # picks must take the general path (keyed hash, bounded load, empty ring)
        self._fast: (
            tuple[list[int], list[Node], array[int], list[Node | None], int | None] | None
        ) = None
        #: hash_id -> weight of the live nodes of the last ring built (to name the
        #: node that grew when a change is refused for MAX_POINTS).
        self._weights: dict[str, int] = {}
        super().__init__(nodes, seed=seed, secret=secret, balance_factor=balance_factor)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "vnodes": self._vnodes, "ketama": self._ketama_mode}

    def _rebuild(self) -> None:
        live = list(self._live)
        if not live:
            self._ring = ([], [], (array("H"), []))
            self._weights = {}
            self._publish()
            return
        if not self._ketama:
            self._check_size(live)
        # Nodes in hash_id order; a point is sorted as the int ``point << bits | rank``
        # (rank: the node's place in that order), which orders equal points by
        # hash_id as the ring promises, and sorts ints, not tuples with a key (~5x faster).
        ranked = sorted(live, key=lambda n: n.hash_id)
        bits = len(ranked).bit_length()
        comb: list[int] = []
        if self._ketama:
            rank = {n.hash_id: r for r, n in enumerate(ranked)}
            pts = _ketama_points(live, self._libmemcached)
            comb = [p << bits | rank[hid] for p, hid, _ in pts]
        else:
            for r, n in enumerate(ranked):
                raw = self._hasher.node_bytes(n.hash_id, 4 * self._vnodes * n.weight)
                comb += [w << bits | r for w in _words(raw)]
        comb.sort()
        mask = (1 << bits) - 1
        points = [c >> bits for c in comb]
        owners = [ranked[c & mask] for c in comb]
        # Shortcut table: the ring cut into 2**18 arcs by the hash's top 18 bits. An
        # arc that holds no point maps all its hashes to the same owner (the next
        # point), so most picks (94% with 16,000 points) skip the bisect; arcs that
        # hold a point stay None and fall back to it.
        # Arc entries are small ints into ``arc_nodes`` (an array of 2-byte
        # indices is 4x smaller than a list of references: fewer cache misses, ~50 ns
        # per pick); the last index, ``len(live)``, means "holds a point: bisect".
        arc_nodes: list[Node | None] = [*ranked, None]
        split = len(ranked)
        arcs = array("H" if split < 0xFFFF else "I", [split]) * _ARCS
        shift = _ARC_SHIFT + bits
        prev = -1
        for c in comb:
            arc = c >> shift
            if arc > prev + 1:
                arcs[prev + 1 : arc] = array(arcs.typecode, [c & mask]) * (arc - prev - 1)
            prev = arc
        tail = _ARCS - prev - 1
        if tail and comb:
            arcs[prev + 1 :] = array(arcs.typecode, [comb[0] & mask]) * tail
        del comb
        fast = (arcs, arc_nodes)
        self._ring = (points, owners, fast)
        self._weights = {n.hash_id: n.weight for n in live}
        self._publish()

    def _check_size(self, live: list[Node]) -> None:
        """Refuse a membership whose ring would exceed :data:`MAX_POINTS` points."""
        total = self._vnodes * sum(n.weight for n in live)
        if total <= MAX_POINTS:
            return
        # Name the heaviest node that grew (added, raised or brought back); when
        # none did, or all did (the constructor, or the first node up since none
        # was live), that is the heaviest node of all. The first node that grew
        # named a weight-1 node when the other nodes' 1000s made the ring too big.
        grown = [n for n in live if self._weights.get(n.hash_id, 0) < n.weight] or live
        node = max(grown, key=lambda n: n.weight)
        which = " (the heaviest live node)" if len(grown) == len(live) > 1 else ""
        raise InvalidArgument(
            "weight",
            node.weight,
            f"node {node.address}{which}: the ring would have {total:,} points "
            f"({self._vnodes} vnodes x total weight {total // self._vnodes:,} of "
            f"{len(live)} live nodes), over MAX_POINTS ({MAX_POINTS:,}); lower the "
            "weights or vnodes",
        )

    def _publish(self) -> None:
        seed = self._crc_seed
        points, owners, (arcs, arc_nodes) = self._ring
        if points and (seed is not None or self._ketama) and self._balance_factor is None:
            self._fast = (points, owners, arcs, arc_nodes, seed)
        else:
            self._fast = None

    def _hash(self, data: bytes) -> int:
        if self._ketama:
            return int.from_bytes(hashlib.md5(data).digest()[:4], "little")
        return self._hasher.hash32(data)

    def pick(self, key: Key = None) -> Node:
        """The node for *key* (see :meth:`BalancePolicy.pick`).

        :param key: ``str`` (hashed as UTF-8) or bytes-like (any buffer, hashed as
            its bytes).
        :returns: a live node.
        :raises KeyRequired: no key.
        :raises InvalidKey: the key is not str or bytes-like, is a str with a
            lone surrogate, is a released memoryview or is a buffer that cannot be
            read (a closed ``mmap``).
        :raises NoNodeAvailable: no live node, or all over the load bound.
        """
        # Hot path: str key, CRC hashing, no bound: one published tuple, no lock.
        fast = self._fast
        if fast is not None and key.__class__ is str:
            points, owners, arcs, arc_nodes, seed = fast
            try:
                data = key.encode()  # type: ignore[union-attr,unused-ignore]
            except UnicodeEncodeError:
                return super().pick(key)  # which reports the key (InvalidKey)
            if seed is not None:
                h = _crc32(data, seed)
            else:  # ketama
                h = int.from_bytes(_md5(data).digest()[:4], "little")
            node = arc_nodes[arcs[h >> _ARC_SHIFT]]
            if node is not None:
                return node
            i = bisect_left(points, h)
            return owners[i] if i < len(owners) else owners[0]
        return super().pick(key)

    def _choose(self, key: bytes | None) -> Node:
        assert key is not None
        if self._balance_factor is not None:
            return self._choose_bounded(key)
        points, owners, (arcs, arc_nodes) = self._ring
        if not points:
            raise self._unavailable()
        h = self._hash(key)
        node = arc_nodes[arcs[h >> _ARC_SHIFT]]
        if node is not None:
            return node
        i = bisect_left(points, h)
        return owners[i] if i < len(owners) else owners[0]

    def _candidates(self, key: bytes) -> Iterator[Node]:
        points, owners, _ = self._ring
        if not points:
            raise self._unavailable()
        m = len(points)
        start = bisect_left(points, self._hash(key))
        for i in range(m):
            yield owners[(start + i) % m]
