"""The balance-policy interface: :class:`Node`, :class:`Lease`, :class:`BalancePolicy`.

Rules of this package (h11 style: a pure core, tested in memory):

* policies are pure: no I/O, no sockets, no threads, no clocks of their own.
  ``Node.address`` is parsed with :func:`reuselb.parse_address`, which never
  resolves DNS; a policy only decides *which* node, the caller connects;
* a node is named by the :class:`Node`, by its address (any spelling
  ``parse_address`` accepts) or by its name, everywhere;
* a policy never returns ``None`` and never loops forever: when nothing can take
  a new pick it raises :class:`~reuselb.NoNodeAvailable` with the reason;
* hashing never uses the built-in ``hash()`` (salted per process): see
  :class:`KeyHasher` for the exact, stable hash;
* one ``threading.Lock`` per policy guards membership, states, weights and lease
  counts. Membership changes rebuild the policy's lookup structure under the
  lock and publish it by a single attribute store (one tuple holding everything
  a pick needs), and a lock-free pick (round robin, unbounded hash policies) reads
  that attribute once: it sees the membership before or after a change, never the
  live set of one and the table of the other. Bounded-load picks read lease
  counts, so they take the lock.
"""

from __future__ import annotations

import abc
import enum
import hashlib
import math
import mmap
import numbers
import operator
import re
import sys
import threading
import zlib
from array import array
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, ClassVar, NoReturn, SupportsIndex, TypeAlias, TypeVar

from .._address import Address, AddressLike, parse_address
from .._errors import (
    DuplicateNode,
    InvalidArgument,
    InvalidKey,
    KeyRequired,
    LeaseReleased,
    NoNodeAvailable,
    UnknownNode,
)

__all__ = [
    "BalanceDiff",
    "BalancePolicy",
    "MAX_TABLE_SIZE",
    "MAX_WEIGHT",
    "HashPolicy",
    "Key",
    "KeyHasher",
    "Lease",
    "Node",
    "NodeLike",
    "NodeRef",
    "NodeState",
    "diff",
]

Key: TypeAlias = "str | bytes | bytearray | memoryview | None"
"""What ``pick``/``acquire`` accept as a key: text is hashed as its UTF-8 bytes.

Any other buffer (an ``array.array``, an ``mmap``) is taken too, as its bytes.
"""

MAX_WEIGHT = 1000
"""The largest node weight. Weights are relative, so 1000 steps are plenty; the
bound keeps every rebuild bounded: a ring builds ``vnodes x weight`` points per
node (1000 x 160 = 160,000, ~0.5 s) and a round-robin cycle ``sum(weights)``
entries, so an unbounded weight (``10**30``) would hang or overflow instead."""

MAX_TABLE_SIZE = 2**24
"""The largest ``table_size`` of the table policies (Maglev, tabulated rendezvous).
Builds grow with the table, whatever the weights: for 100 nodes of weight 1 here,
Maglev takes ~0.03 s at 65,537 entries and ~0.7 s at 1,048,573 (a little more than
linear: its searches for free entries add up to about ``M ln M`` steps); rendezvous
~0.04 s at 2**19 and ~0.5 s at 2**22. Without a bound a typo
(``table_size=10**12``) would run for hours, and Maglev's primality check alone for
minutes, before anything is reported."""


# Unicode category Cc: C0 controls, DEL and C1 controls.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class NodeState(enum.Enum):
    """Health of a node as the policy sees it."""

    #: takes new picks.
    UP = "up"
    #: takes no new picks (failed health check); leases on it still release.
    DOWN = "down"
    #: takes no new picks; existing leases finish normally (graceful removal).
    DRAINING = "draining"


class Node:
    """One backend: an address, an optional name, a weight and a state.

    Immutable: assigning or deleting an attribute, or running ``__init__`` again on
    a built node, raises :class:`AttributeError`. A policy replaces its
    :class:`Node` when the weight or state changes, so a ``Node`` you hold is a
    snapshot (and the node a policy returns is the one it stores, safe to share).

    :param address: any spelling :func:`reuselb.parse_address` accepts (no DNS).
    :param name: optional unique name; also the node's hash identity (see
        :attr:`hash_id`), so a renamed address keeps its keys.
    :param weight: int in ``0..MAX_WEIGHT`` (1000); ``0`` takes no new traffic.
    :param state: :class:`NodeState`.
    :raises AddressError: the address is malformed.
    :raises InvalidArgument: the weight is not an int in ``0..MAX_WEIGHT``, the name
        is not a non-empty str, contains a control character (Unicode category Cc)
        or has no UTF-8 form, or the state is not a :class:`NodeState`.
    """

    __slots__ = ("address", "name", "state", "weight")

    address: Address
    name: str | None
    weight: int
    state: NodeState

    def __init__(
        self,
        address: AddressLike,
        *,
        name: str | None = None,
        weight: int = 1,
        state: NodeState = NodeState.UP,
    ) -> None:
        # An empty slot reads as AttributeError, so a set address means this node
        # was built already: n.__init__(...) again would rewrite it in place, and a
        # policy storing it would then hold a node at another address under the old
        # address's entry. (hasattr swallows the AttributeError in C: ~110 ns, where
        # a Python try/except around the read costs ~260 ns.)
        if hasattr(self, "address"):
            raise AttributeError(
                f"Node is immutable; cannot run __init__ again on the built node at {self.address}"
            )
        _set_address(self, parse_address(address))
        if name is not None:
            if not isinstance(name, str) or not name:
                raise InvalidArgument("name", name, "must be a non-empty str or None")
            try:
                # Hash policies hash the name as UTF-8 (a node's hash_id): a lone
                # surrogate would fail there, in add() or a later set_weight().
                name.encode()
            except UnicodeEncodeError as exc:
                raise InvalidArgument(
                    "name", name, f"has no UTF-8 form (a lone surrogate at index {exc.start})"
                ) from None
            bad = _CONTROL.search(name)
            if bad is not None:
                # A control character garbles logs, and a leading NUL would let a
                # name spell the labels of the rendezvous table's own hash streams.
                raise InvalidArgument(
                    "name",
                    name,
                    f"contains the control character U+{ord(bad.group()):04X} "
                    f"at index {bad.start()}",
                )
        _set_name(self, name)
        _set_weight(self, check_weight(weight))
        if not isinstance(state, NodeState):
            raise InvalidArgument("state", state, "must be a NodeState")
        _set_state(self, state)

    def __setattr__(self, attr: str, value: object) -> None:
        raise AttributeError(f"Node is immutable; cannot set {attr!r}")

    def __delattr__(self, attr: str) -> None:
        # Without this, ``del node.weight`` emptied the slot of a node a policy
        # shares (get(), nodes, lease.node all return its stored object), and the
        # policy's next rebuild (set_weight of another node, copy()) then failed
        # with AttributeError on it.
        raise AttributeError(f"Node is immutable; cannot delete {attr!r}")

    # Immutable, so a copy is the node itself; pickling (multiprocessing, caches)
    # rebuilds it through the constructor, which __setattr__ would otherwise refuse.
    def __copy__(self) -> Node:
        return self

    def __deepcopy__(self, memo: object) -> Node:
        return self

    def __reduce__(self) -> tuple[Callable[..., Node], tuple[object, ...]]:
        return _restore_node, (self.address, self.name, self.weight, self.state)

    @property
    def hash_id(self) -> str:
        """The string hash policies hash for this node: the name, else ``str(address)``."""
        return self.name if self.name is not None else str(self.address)

    @property
    def live(self) -> bool:
        """True when the node may take new picks (up and weight > 0)."""
        return self.state is NodeState.UP and self.weight > 0

    def replace(self, *, weight: int | None = None, state: NodeState | None = None) -> Node:
        """A copy with another weight and/or state.

        :raises InvalidArgument: bad weight or state (as for :class:`Node`).
        """
        return Node(
            self.address,
            name=self.name,
            weight=self.weight if weight is None else weight,
            state=self.state if state is None else state,
        )

    def _tuple(self) -> tuple[Address, str | None, int, NodeState]:
        return (self.address, self.name, self.weight, self.state)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Node):
            return NotImplemented
        return self._tuple() == other._tuple()

    def __hash__(self) -> int:
        return hash(self._tuple())

    def __repr__(self) -> str:
        extra = f", name={self.name!r}" if self.name is not None else ""
        return f"Node({str(self.address)!r}{extra}, weight={self.weight}, state={self.state.value})"

    def __str__(self) -> str:
        return self.hash_id


# The slots' own setters, for Node.__init__ (Node.__setattr__ refuses every
# assignment). Calling a slot descriptor's __set__ costs about half of
# object.__setattr__(node, name, value) (~30 vs ~65 ns on CPython 3.11), which pays
# for __init__'s check that the node is not built yet.
_set_address, _set_name, _set_weight, _set_state = (
    vars(Node)[slot].__set__ for slot in ("address", "name", "weight", "state")
)


def _restore_node(address: Address, name: str | None, weight: int, state: NodeState) -> Node:
    return Node(address, name=name, weight=weight, state=state)


NodeLike: TypeAlias = "Node | AddressLike"
"""What the constructors and ``add`` accept as a node."""

NodeRef: TypeAlias = "Node | AddressLike"
"""How a node already in a policy is named: the Node, its address or its name."""


def _duplicate(ref: str, detail: str) -> DuplicateNode:
    """A DuplicateNode for *ref* whose message says what it clashes with."""
    exc = DuplicateNode(ref)
    exc.args = (f"duplicate node {ref!r}: {detail}",)
    return exc


def words(data: bytes) -> array[int]:
    """*data* as little-endian 32-bit words, whatever the host's byte order."""
    a = array("I")
    if a.itemsize != 4:  # pragma: no cover (no such CPython platform today)
        a = array("L")
    a.frombytes(data)
    if sys.byteorder == "big":  # pragma: no cover
        a.byteswap()
    return a


def node_list(nodes: Iterable[NodeLike]) -> list[Node]:
    """*nodes* read once into a list of :class:`Node` (a generator gives its items once).

    Takes what a policy constructor takes, with the same checks and errors, in the
    same order: each item a :class:`Node` or an address (built into a ``Node`` of
    weight 1), no two of them one node.

    :raises InvalidArgument: *nodes* is one address (a string, or a ``(host, port)``
        or IPv6 4-tuple), a mapping or not iterable at all; the error names the
        value.
    :raises AddressError: an item is neither a :class:`Node` nor an address
        (``None``, ``1.5``, ``b"10.0.0.1:80"``, a ``[host, port]`` list) or is a
        malformed address, or *nodes* is a tuple that can only be one address and a
        malformed one.
    :raises DuplicateNode: two nodes share an address or a name, or one node's name
        is another node's address.
    """
    out: list[Node] = []
    addresses: set[Address] = set()
    names: dict[str, Address] = {}
    name_addrs: dict[Address, set[str]] = {}
    for item in _node_items(nodes):
        node = item if isinstance(item, Node) else Node(item)
        # The constructors' own check (BalancePolicy._add_locked): a node listed
        # twice got twice its share of the ring's points or the cycle's turns.
        spelled = _check_new_node(node, addresses, names, name_addrs)
        addresses.add(node.address)
        if node.name is not None:
            names[node.name] = node.address
            if spelled is not None:
                name_addrs.setdefault(spelled, set()).add(node.name)
        out.append(node)
    return out


def _check_new_node(
    node: Node,
    addresses: Container[Address],
    names: Mapping[str, Address],
    name_addrs: Mapping[Address, set[str]],
) -> Address | None:
    """Refuse *node* if it clashes with the nodes already taken, as a policy does.

    :param addresses: the taken nodes' addresses.
    :param names: the taken nodes' names, each with its node's address.
    :param name_addrs: for each address that a taken node's name spells (other than
        its own node's), those names.
    :returns: the address *node*'s name spells, when it is not *node*'s own (to be
        recorded in *name_addrs*), else None.
    :raises DuplicateNode: the address is taken or spelled by a taken name, the
        name is taken, or the name spells a taken address.
    """
    if node.address in addresses:
        raise _duplicate(str(node.address), "a node with this address exists")
    spelling = name_addrs.get(node.address)
    if spelling:
        # another node's name spells this address: say which name, since it may
        # be spelled otherwise ("[0:0::1]:80" for [::1]:80)
        named = ", ".join(f"{n!r} (the node at {names[n]})" for n in sorted(spelling))
        raise _duplicate(
            str(node.address),
            f"the address is spelled by another node's name: {named}; names are "
            "looked up before addresses, so that name would hide this node",
        )
    name = node.name
    if name is None:
        return None
    if name in names:
        raise _duplicate(name, f"the node at {names[name]} has this name")
    # Names are looked up before addresses, so a name that spells another node's
    # address would hide that node from get/remove/mark_down.
    try:
        name_addr = parse_address(name)
    except ValueError:
        return None  # not an address: no clash possible
    if name_addr == node.address:
        return None  # names its own node: harmless
    if name_addr in addresses:
        raise _duplicate(
            name,
            f"the name spells the address of the node at {name_addr}; names are "
            "looked up before addresses, so it would hide that node",
        )
    return name_addr


def check_weight(weight: object) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
        raise InvalidArgument("weight", weight, f"must be an int in 0..{MAX_WEIGHT}")
    return weight


def key_bytes(key: object) -> bytes:
    """Encode a key the documented way: ``str`` as UTF-8, bytes-like as is.

    Bytes-like is any buffer (``bytes``, ``bytearray``, ``memoryview``, an
    ``array.array``, an ``mmap``, ...), read as its bytes in C order, as
    :meth:`KeyHasher.hash32` reads it.

    :raises InvalidKey: not str or bytes-like, a str with a lone surrogate, a
        released memoryview, or a buffer that cannot be read (a closed ``mmap``).
    """
    if isinstance(key, str):
        try:
            return key.encode()
        except UnicodeEncodeError as exc:
            raise InvalidKey(
                key,
                f"a str key must encode as UTF-8, but the character at index {exc.start} "
                "is a lone surrogate",
            ) from exc
    if isinstance(key, bytes):
        return key
    if isinstance(key, bytearray):
        return bytes(key)
    if isinstance(key, memoryview):
        try:
            return bytes(key)
        except ValueError:
            # bytes() of a released view raises a bare ValueError ("operation
            # forbidden on released memoryview object"): name the key instead.
            raise InvalidKey(key, "the memoryview was released") from None
    # Any other buffer, as KeyHasher.hash32 (zlib.crc32, blake2b's update) takes it:
    # an array('B') was refused here while hash32 hashed it. Last, so str and bytes
    # keys pay nothing for it.
    reason: str | None = None
    try:
        view = memoryview(key)  # type: ignore[arg-type]
    except TypeError:
        # not a buffer: InvalidKey's own "expected str or a bytes-like object, got ..."
        pass
    except (ValueError, BufferError) as exc:
        # A closed mmap ("mmap closed or invalid"), an exporter that refuses.
        reason = f"its buffer cannot be read ({exc})"
    else:
        # Released at once: while a view is held, an array cannot grow (BufferError).
        with view:
            return view.tobytes()
    # Raised outside the except clause, so an InvalidKey has no context (memoryview's
    # TypeError would only repeat it).
    raise InvalidKey(key, reason)


# --------------------------------------------------------------------------- hashing


def _describe_secret(secret: object) -> str:
    """*secret*'s type and, when ``len()`` gives it, its length: never its content.

    What error messages show instead of ``repr(secret)``, which put the secret itself
    into the message (and so into logs and tracebacks): a str read from the
    environment was printed in full.
    """
    what = type(secret).__name__
    try:
        if isinstance(secret, Sized):
            what += f", length {len(secret)}"
    except Exception:
        # len() itself raises for some Sized values: ValueError for a released
        # memoryview or a __len__ returning -1, OverflowError for one returning
        # 2**100, TypeError for a 0-d numpy array. Describing a bad secret must not
        # replace the InvalidArgument being built with that error.
        pass
    return what


_InvalidT = TypeVar("_InvalidT", bound=InvalidArgument)


def _secret_error(secret: object, reason: str, cls: type[_InvalidT]) -> _InvalidT:
    """A *cls* (an InvalidArgument) for the ``secret`` argument *secret*, whose
    message names only its type and length (:func:`_describe_secret`).

    ``exc.value`` still holds what was passed; the exception is built with a stand-in
    value, so the secret is never formatted at all.
    """
    exc = cls("secret", None, "")
    exc.value = secret
    exc.args = (f"invalid secret ({_describe_secret(secret)}; not shown): {reason}",)
    return exc


def _bad_secret(secret: object) -> InvalidArgument:
    """The InvalidArgument for a bad *secret*, naming only its type and length."""
    hint = "; encode a str first (secret.encode())" if isinstance(secret, str) else ""
    return _secret_error(secret, f"must be 1 to 64 bytes (a bytes object){hint}", InvalidArgument)


class KeyHasher:
    """The stable key hash every hash policy uses (part of the API's stability promise).

    ``hasher.hash32(key)`` is the key's 32-bit hash (an int in ``0..2**32-1``), the
    one a policy's pick starts from:

    * without *secret*: ``zlib.crc32(key, seed)`` (CRC-32/ISO-HDLC, the
      zlib/PNG/Ethernet CRC, started from *seed* instead of 0). Fast (~60 ns), the
      same on every host and Python version. A seed reshuffles the mapping but CRC
      is linear: someone who can send chosen keys can still make them collide.
    * with *secret* (bytes, up to 64): BLAKE2b keyed with *secret*, 4-byte digest,
      16-byte little-endian *seed* as the salt, read as a little-endian int. Keys
      cannot be aimed at one node without the secret; costs ~4x the CRC.

    ``hash32`` takes a key as the policies do (:data:`Key` without None) and hashes
    its bytes: a ``str`` as its UTF-8 encoding, a bytes-like object (any buffer,
    such as ``bytes``, ``bytearray`` or a ``memoryview``) as its bytes, so
    ``hasher.hash32("k") == hasher.hash32(b"k")``. A key with no bytes (an int, None, a
    str with a lone surrogate, a released memoryview) raises
    :class:`~reuselb.InvalidKey` naming it.

    :meth:`node_bytes` and :meth:`node_int` hash a node's identity
    (:attr:`Node.hash_id`) when a policy builds its table, ring or scores.

    Immutable, as :class:`Node` is: assigning or deleting an attribute, or running
    ``__init__`` again on a built hasher, raises :class:`AttributeError`. It
    pickles as its seed and secret (the secret is in the pickle: keep such a
    pickle as secret as the key itself) and unpickles as a hasher that hashes
    alike.

    :param seed: int in ``0..2**32-1``.
    :param secret: optional BLAKE2b key (1 to 64 bytes).
    :raises InvalidArgument: seed out of range or secret not 1-64 bytes; for the
        secret the message names only its type and length, never its content.
    """

    __slots__ = ("hash32", "secret", "seed")

    seed: int
    secret: bytes | None
    hash32: Callable[[str | bytes | bytearray | memoryview], int]

    def __init__(self, seed: int = 0, secret: bytes | None = None) -> None:
        # A policy's hasher is public (policy.hasher): hash32 keeps the seed and
        # secret it was built with, but copy(), preview() and diff() rebuild from
        # .seed and .secret, so ``policy.hasher.seed = 12345`` was accepted, the
        # live picks stayed as they were and every copy picked another mapping.
        # Nothing is assigned after this, so __init__ is refused on a built hasher
        # too (an empty slot reads as AttributeError: a set seed means built).
        if hasattr(self, "seed"):
            raise AttributeError(
                "KeyHasher is immutable; cannot run __init__ again on a built hasher"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 0xFFFFFFFF:
            raise InvalidArgument("seed", seed, "must be an int in 0..2**32-1")
        if secret is not None and (not isinstance(secret, bytes) or not 1 <= len(secret) <= 64):
            raise _bad_secret(secret)
        # The policies pass bytes (key_bytes() ran first), so bytes go straight to
        # the hash; only what the hash refuses is converted as a policy's key would
        # be, in the except clause, so a bytes key pays nothing for it (a try
        # costs nothing on CPython 3.11+ until it raises). crc32 and blake2b raise
        # TypeError for a str or a non-buffer, ValueError for a released memoryview
        # and BufferError for a non-contiguous one, which key_bytes() copies.
        if secret is None:
            crc32 = zlib.crc32

            def _crc(data: str | bytes | bytearray | memoryview) -> int:
                try:
                    return crc32(data, seed)  # type: ignore[arg-type]
                except (TypeError, ValueError, BufferError):
                    pass  # (converted outside the except clause: an InvalidKey has no context)
                return crc32(key_bytes(data), seed)

            hash32 = _crc
        else:
            # Keying BLAKE2b costs more than hashing a short key: key it once
            # and copy the keyed state per call (~1.5x faster).
            keyed = hashlib.blake2b(digest_size=4, key=secret, salt=seed.to_bytes(16, "little"))
            copy = keyed.copy
            from_bytes = int.from_bytes

            def _keyed(data: str | bytes | bytearray | memoryview) -> int:
                h = copy()
                try:
                    h.update(data)  # type: ignore[arg-type]
                    return from_bytes(h.digest(), "little")
                except (TypeError, ValueError, BufferError):
                    pass  # (update() raised before hashing anything: h is as copied)
                h.update(key_bytes(data))
                return from_bytes(h.digest(), "little")

            hash32 = _keyed
        # seed last: __init__'s check above reads it as "built"
        _set_hash32(self, hash32)
        _set_secret(self, secret)
        _set_seed(self, seed)

    def __setattr__(self, attr: str, value: object) -> None:
        raise AttributeError(f"KeyHasher is immutable; cannot set {attr!r}")

    def __delattr__(self, attr: str) -> None:
        raise AttributeError(f"KeyHasher is immutable; cannot delete {attr!r}")

    # Immutable, so a copy is the hasher itself (copy's default for a slotted
    # object sets each slot through __setattr__, which refuses).
    def __copy__(self) -> KeyHasher:
        return self

    def __deepcopy__(self, memo: object) -> KeyHasher:
        return self

    # pickle's default for a slotted object stores the slots, hash32 among them: a
    # closure local to __init__, so pickle.dumps(KeyHasher(5, b"x")) failed with
    # "Can't pickle local object ..._keyed". A hasher is its seed and secret: rebuild
    # it through the constructor, which makes hash32 again.
    def __reduce__(self) -> tuple[type[KeyHasher], tuple[int, bytes | None]]:
        return KeyHasher, (self.seed, self.secret)

    def node_bytes(self, text: str, nbytes: int) -> bytes:
        """*nbytes* pseudo-random bytes for a node identity (build time, not per pick).

        SHAKE-128 of ``secret || seed (4 bytes LE) || text (UTF-8)``.

        :param text: a node's identity (:attr:`Node.hash_id`): a str with a UTF-8 form.
        :param nbytes: how many bytes, an int in ``0..sys.maxsize``.
        :raises InvalidArgument: *text* is not a str or has no UTF-8 form (a lone
            surrogate), or *nbytes* is not an int in ``0..sys.maxsize``; the error
            names the value.
        """
        if (
            isinstance(nbytes, bool)
            or not isinstance(nbytes, int)
            or not 0 <= nbytes <= sys.maxsize
        ):
            # hashlib's own errors named neither the argument nor the value: a
            # negative count raised SystemError ("Negative size passed to
            # PyBytes_FromStringAndSize"), one above sys.maxsize OverflowError.
            raise InvalidArgument("nbytes", nbytes, "must be an int in 0..sys.maxsize")
        if not isinstance(text, str):
            raise InvalidArgument("text", text, f"must be a str, not {type(text).__name__}")
        try:
            data = text.encode()
        except UnicodeEncodeError as exc:
            raise InvalidArgument(
                "text", text, f"has no UTF-8 form (a lone surrogate at index {exc.start})"
            ) from None
        prefix = (self.secret or b"") + self.seed.to_bytes(4, "little")
        return hashlib.shake_128(prefix + data).digest(nbytes)

    def node_int(self, text: str, nbytes: int = 8) -> int:
        """A little-endian int from :meth:`node_bytes`.

        :raises InvalidArgument: as :meth:`node_bytes`.
        """
        return int.from_bytes(self.node_bytes(text, nbytes), "little")


# The slots' own setters, for KeyHasher.__init__ (its __setattr__ refuses them all).
_set_hash32, _set_secret, _set_seed = (
    vars(KeyHasher)[slot].__set__ for slot in ("hash32", "secret", "seed")
)


# --------------------------------------------------------------------------- leases


class _Slot:
    """A node's mutable record inside one policy (lease count, current snapshot)."""

    __slots__ = ("active", "attached", "live", "name_addr", "node")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.active = 0
        self.attached = True
        #: ``node.live`` as of the last ``_changed`` (a plain attribute: acquire and
        #: release read it on every lease, where the property cost ~0.15 us each).
        self.live = node.live
        #: the other address the node's name spells, if any (see ``_add_locked``).
        self.name_addr: Address | None = None


class Lease:
    """A pick that counts as an active connection until released.

    Use as a context manager, or call :meth:`release` exactly once. A lease on a
    node that was removed meanwhile still releases cleanly. A lease is a handle:
    ``copy.copy``/``copy.deepcopy`` return the lease itself, and pickling one
    raises ``TypeError`` (it counts in one policy, in one process).

    :ivar node: the node picked, as it was when picked (live); a later drain,
        mark_down or set_weight does not change it.
    """

    __slots__ = ("_policy", "_released", "_slot", "node")

    def __init__(self, policy: BalancePolicy, slot: _Slot) -> None:
        self._policy = policy
        self._slot = slot
        self._released = False
        self.node = slot.node

    @property
    def released(self) -> bool:
        """True once :meth:`release` ran."""
        return self._released

    def release(self) -> None:
        """Give the connection back.

        :raises LeaseReleased: called a second time.
        """
        self._policy._release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._released:
            self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "active"
        return f"<Lease {self.node} {state}>"

    # A Lease is a handle on one count in one policy: a copy would be a second
    # handle that releases the same count again (the count went negative).

    def __copy__(self) -> Lease:
        """The lease itself: a lease is a handle, copying it gives no second lease."""
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Lease:
        """The lease itself (see :meth:`__copy__`); its policy is not copied either."""
        return self

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        """:raises TypeError: always: a lease cannot be pickled."""
        raise TypeError(
            f"cannot pickle {self!r}: a Lease is a handle on one policy's lease count in "
            "this process; release it where it was acquired and acquire anew elsewhere"
        )

    def __reduce__(self) -> NoReturn:
        """:raises TypeError: always (see :meth:`__reduce_ex__`)."""
        self.__reduce_ex__(0)


def _one_address(nodes: tuple[object, ...]) -> bool:
    """True when *nodes* can only be one address, not a collection of nodes.

    So it is when its first item is a host without a port (``"10.0.0.1"``,
    ``"::1"``, ``"[::1]"``: parse_address refuses each as a node) and its second is
    a port (an int, or digits in a str) or anything else that no node address is:
    not a str, tuple, :class:`Node` or :class:`Address`. ``("10.0.0.1:80", 81)``
    (an address and the node on all interfaces at port 81) and
    ``("10.0.0.1", "10.0.0.2:80")`` (a collection with a bad first node, which
    fails on it) are not.
    """
    if len(nodes) < 2 or not isinstance(nodes[0], str):
        return False
    host, second = nodes[0], nodes[1]
    # parse_address's syntax: a port follows "]" in brackets, or the one ":"
    # outside them; more than one ":" without brackets is an IPv6 literal alone.
    if host.startswith("["):
        if not host.endswith("]"):
            return False
    elif host.count(":") == 1:
        return False
    if isinstance(second, str):
        return second.isascii() and second.isdigit()
    return not isinstance(second, (tuple, Node, Address))


def _node_items(nodes: Iterable[NodeLike]) -> Iterator[NodeLike]:
    """An iterator over *nodes*, a policy's node argument, after its checks.

    :raises InvalidArgument: *nodes* is one address (a string, bytes-like text, or a
        ``(host, port)`` or IPv6 4-tuple), a mapping or not iterable at all.
    :raises AddressError: *nodes* is a tuple that can only be one address and a
        malformed one.
    """
    if isinstance(nodes, (str, bytes, bytearray, memoryview, mmap.mmap)):
        # iterating it would try each character as an address ("invalid
        # address '1'"), which hides the real mistake; a bytearray, memoryview or
        # mmap of text iterates as ints, each taken for a port ("*:80"): nodes on
        # every interface, or a DuplicateNode naming none of what was passed
        raise InvalidArgument(
            "nodes",
            nodes,
            "must be an iterable of nodes or addresses, not one string or bytes-like object",
        )
    if isinstance(nodes, Mapping):
        # iterating a mapping gives its keys: {address: weight} (uhashring's
        # HashRing takes one) built every node at weight 1 without a word
        raise InvalidArgument(
            "nodes",
            nodes,
            "must be an iterable of nodes or addresses, not a mapping (only its keys "
            "would be read, and weights in its values lost): pass "
            "[Node(address, weight=w) for address, w in mapping.items()]",
        )
    if isinstance(nodes, tuple) and _one_address(nodes):
        # ("10.0.0.1", 80) iterated is the address "10.0.0.1" (no port) and the
        # port 80: it failed as "invalid address '10.0.0.1': no port given",
        # and so did a bad one, ("10.0.0.1", 99999) or ("::1", 80, 0, -1), whose
        # real fault (the port, the scope id) went unsaid. Such a tuple iterated
        # always fails on its first item (a bare host is no node address), so
        # this changes only which error is raised: parse_address's own for a bad
        # address, or the one saying it is one address.
        one = parse_address(nodes)
        raise InvalidArgument(
            "nodes",
            nodes,
            f"must be an iterable of nodes or addresses, not one address ({one}): "
            f"pass [{nodes!r}] for a policy of that one node",
        )
    try:
        return iter(nodes)
    except TypeError:
        # One int port or a None, say, where a list was meant.
        raise InvalidArgument("nodes", nodes, "must be an iterable of nodes or addresses") from None


# --------------------------------------------------------------------------- policy


class BalancePolicy(abc.ABC):
    """The interface every policy implements; subclass it to write your own.

    A subclass sets :attr:`name` and implements :meth:`_choose`; it may override
    :meth:`_rebuild` to precompute a lookup structure. ``_choose`` runs under the
    policy lock unless the subclass sets ``lock_free_pick = True`` (then it must
    only read structures that ``_rebuild`` publishes by one attribute store).

    :param nodes: initial nodes (``Node`` objects or addresses).
    :raises DuplicateNode: two nodes share an address or a name, or one node's name
        is another node's address.
    :raises AddressError: an item of *nodes* is neither a ``Node`` nor an address
        (``None``, bytes, a ``[host, port]`` list) or is a malformed address, or
        *nodes* is a tuple that can only be one address and a malformed one
        (``("10.0.0.1", 99999)``: the error is parse_address's for the tuple).
    :raises InvalidArgument: *nodes* is one address (a string, or a ``(host, port)``
        or IPv6 4-tuple), a mapping (its keys would be read and its values dropped)
        or not iterable at all, or a policy option is out of range.
    """

    #: the name ``make_policy`` knows this policy by.
    name: ClassVar[str] = "custom"
    #: True for hash policies: ``pick``/``acquire`` raise KeyRequired without a key.
    needs_key: ClassVar[bool] = False
    #: True when ``_choose`` may run without the lock.
    lock_free_pick: ClassVar[bool] = False

    def __init__(self, nodes: Iterable[NodeLike] = ()) -> None:
        items = _node_items(nodes)
        self._lock = threading.Lock()
        #: pick() runs without the lock (lock_free_pick; hash policies narrow it).
        self._pick_unlocked = self.lock_free_pick
        self._slots: dict[Address, _Slot] = {}
        self._names: dict[str, Address] = {}
        #: the addresses that node names parse as (other than their own node's),
        #: so a node cannot be added at an address that a name already stands for.
        self._name_addrs: dict[Address, set[str]] = {}
        self._total_active = 0
        #: leases open on live nodes (up, weight > 0): the bounded-load average.
        #: Leases still open on draining, down or weight-0 nodes are in
        #: ``_total_active`` but not here. Kept by acquire/release, recounted by
        #: ``_changed`` (every state, weight or membership change).
        self._live_active = 0
        #: total weight of the live nodes.
        self._total_weight = 0
        #: why nothing can be picked, as of the last change that left no live node:
        #: published by ``_changed`` before the rebuild publishes the empty lookup
        #: structure, so :meth:`_unavailable` never reads the slots (which a change
        #: mutates before it rebuilds) from a lock-free pick.
        self._down_reason = "no nodes"
        #: live nodes (up, weight > 0) in insertion order; rebuilt on every change.
        self._live: tuple[Node, ...] = ()
        for n in items:
            self._add_locked(n if isinstance(n, Node) else Node(n))
        with self._lock:
            self._changed()

    # ----------------------------------------------------------------- subclass API

    def _rebuild(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Recompute lookup structures from :attr:`_live` (called under the lock).

        Policies that scan :attr:`_live` on every pick (least-conn) need no structure
        and keep this default.
        """

    @abc.abstractmethod
    def _choose(self, key: bytes | None) -> Node:
        """Return a live node for *key* (bytes or None); raise ``NoNodeAvailable``."""

    def _options(self) -> dict[str, Any]:
        """Constructor keyword arguments, so :meth:`copy` can clone the policy."""
        return {}

    def _unavailable(self) -> NoNodeAvailable:
        """The NoNodeAvailable to raise when :attr:`_live` is empty, with its reason.

        Safe without the lock: the reason is the one :meth:`_changed` published for
        the last membership with no live node, so a lock-free pick that read an
        empty lookup structure reports why that membership had none, even when a
        ``mark_up`` or ``add`` is halfway through (node changed, table not yet
        rebuilt).
        """
        return NoNodeAvailable(self.name, self._down_reason)

    def _reason_now(self) -> str:
        """Why no node is live in the current slots (under the lock)."""
        slots = list(self._slots.values())
        if not slots:
            return "no nodes"
        if all(s.node.state is NodeState.DOWN for s in slots):
            return "all nodes are down"
        if all(s.node.state is NodeState.DRAINING for s in slots):
            return "all nodes are draining"
        if all(s.node.weight == 0 for s in slots):
            return "all nodes have weight 0"
        return "no node is up with a weight > 0"

    def active_of(self, ref: NodeRef) -> int:
        """Active leases on a node (no lock: for use inside ``_choose``).

        :param ref: the node: the :class:`Node`, its address or its name, as for
            :meth:`active`.
        :raises UnknownNode: no such node (the error names *ref*).
        """
        # Resolved as every other method resolves a node: this read node.address
        # alone, so a name or an address string raised a bare AttributeError, and
        # a Node the policy does not have counted 0 leases instead of being refused.
        return self._find(ref).active

    # ----------------------------------------------------------------- picking

    def pick(self, key: Key = None) -> Node:
        """Choose a node for one request without counting it.

        :param key: ``str`` (hashed as UTF-8) or bytes-like (``bytes``,
            ``bytearray``, ``memoryview`` or any other buffer, hashed as its bytes);
            hash policies need it, the others ignore it.
        :returns: a live node (up, weight > 0).
        :raises NoNodeAvailable: no node can take it (the reason says why).
        :raises KeyRequired: a hash policy was given no key.
        :raises InvalidKey: the key is not str or bytes-like, is a str with a lone
            surrogate (no UTF-8 form), is a released memoryview or is a buffer that
            cannot be read (a closed ``mmap``).
        """
        k = self._key(key)
        if self._pick_unlocked:
            return self._choose(k)
        with self._lock:
            return self._choose(k)

    def acquire(self, key: Key = None) -> Lease:
        """Choose a node and count an active lease on it until released.

        :param key: as for :meth:`pick`.
        :returns: a :class:`Lease` (a context manager) with ``.node``.
        :raises NoNodeAvailable: no node can take it.
        :raises KeyRequired: a hash policy was given no key.
        :raises InvalidKey: the key is not str or bytes-like, is a str with a lone
            surrogate (no UTF-8 form), is a released memoryview or is a buffer that
            cannot be read (a closed ``mmap``).
        """
        k = self._key(key)
        with self._lock:
            node = self._choose(k)
            slot = self._slots[node.address]
            slot.active += 1
            self._total_active += 1
            if slot.live:
                self._live_active += 1
            # The Lease reads slot.node: built under the lock, it is the node just
            # picked (live), not what a drain/mark_down/set_weight racing in right
            # after the lock is released would have made of it.
            return Lease(self, slot)

    def _release(self, lease: Lease) -> None:
        with self._lock:
            if lease._released:
                raise LeaseReleased(lease.node)
            lease._released = True
            slot = lease._slot
            slot.active -= 1
            if slot.attached:
                self._total_active -= 1
                if slot.live:
                    self._live_active -= 1

    def _key(self, key: object) -> bytes | None:
        if key is None:
            if self.needs_key:
                raise KeyRequired(self.name)
            return None
        return key_bytes(key)

    # ----------------------------------------------------------------- membership

    def add(self, address: NodeLike, *, weight: int | None = None, name: str | None = None) -> Node:
        """Add a node.

        :param address: a :class:`Node` or an address.
        :param weight: overrides the Node's weight; ``None`` (the default) keeps the
            Node's own weight, or 1 for an address.
        :param name: overrides the Node's name; ``None`` keeps the Node's own name.
        :returns: the node as stored.
        :raises AddressError: the address is malformed.
        :raises DuplicateNode: the address or name is taken, the name is another
            node's address, or the address is another node's name.
        :raises InvalidArgument: bad weight or name, or the policy refused the new
            membership (:class:`MaglevHash`: ``table_size`` must stay greater than
            100 x the live nodes; :class:`RingHash`: at most ``MAX_POINTS``
            points); the policy is then left as it was.
        """
        if isinstance(address, Node):
            node = address
            if weight is not None or name is not None:
                node = Node(
                    node.address,
                    name=node.name if name is None else name,
                    weight=node.weight if weight is None else weight,
                    state=node.state,
                )
        else:
            node = Node(address, name=name, weight=1 if weight is None else weight)
        with self._lock:
            self._add_locked(node)
            try:
                self._changed()
            except BaseException:
                # the rebuild refused the new membership (e.g. a Maglev table too
                # small): undo, so the policy stays as it was
                self._detach(self._slots[node.address])
                self._changed()
                raise
        return node

    def _add_locked(self, node: Node) -> None:
        name = node.name
        name_addr = _check_new_node(node, self._slots, self._names, self._name_addrs)
        slot = self._slots[node.address] = _Slot(node)
        if name is not None:
            self._names[name] = node.address
            if name_addr is not None:
                slot.name_addr = name_addr
                self._name_addrs.setdefault(name_addr, set()).add(name)

    def remove(self, ref: NodeRef) -> Node:
        """Remove a node; its open leases still release cleanly.

        If the rebuild fails (a ``MemoryError``, or a ``KeyboardInterrupt`` during a
        long ring rebuild), the node is put back, with its name and open leases, and
        the policy is left as it was; the exception propagates.

        :returns: the removed node.
        :raises UnknownNode: no such node.
        """
        with self._lock:
            slot = self._find(ref)
            order = list(self._slots)
            self._detach(slot)
            try:
                self._changed()
            except BaseException:
                # Undo, as add() and _set() do: otherwise the node was gone from the
                # records but still in the lookup structure the failed rebuild did
                # not replace, so pick() returned it and acquire() raised KeyError.
                self._reattach(slot, order)
                self._changed()
                raise
        return slot.node

    def _detach(self, slot: _Slot) -> None:
        del self._slots[slot.node.address]
        name = slot.node.name
        if name is not None:
            del self._names[name]
            spelled = slot.name_addr
            if spelled is not None:
                names = self._name_addrs[spelled]
                names.discard(name)
                if not names:
                    del self._name_addrs[spelled]
        slot.attached = False
        self._total_active -= slot.active

    def _reattach(self, slot: _Slot, order: list[Address]) -> None:
        """Undo :meth:`_detach`: *slot* back at its place in *order* (the keys of
        ``_slots`` before), so round robin's cycle and :attr:`nodes` keep their order.
        """
        addr = slot.node.address
        slots = self._slots
        slots[addr] = slot
        # Move the nodes that came after it back behind it (a dict keeps insertion
        # order); each is popped and stored again, so the others stay in place.
        for later in order[order.index(addr) + 1 :]:
            slots[later] = slots.pop(later)
        name = slot.node.name
        if name is not None:
            self._names[name] = addr
            if slot.name_addr is not None:
                self._name_addrs.setdefault(slot.name_addr, set()).add(name)
        slot.attached = True
        self._total_active += slot.active

    def _set(
        self, ref: NodeRef, *, weight: int | None = None, state: NodeState | None = None
    ) -> Node:
        with self._lock:
            slot = self._find(ref)
            old = slot.node
            slot.node = old.replace(weight=weight, state=state)
            try:
                self._changed()
            except BaseException:
                slot.node = old  # rebuild refused the change: keep the old state
                self._changed()
                raise
            return slot.node

    def set_weight(self, ref: NodeRef, weight: int) -> Node:
        """Change a node's weight (``0``: no new traffic).

        :raises UnknownNode: no such node.
        :raises InvalidArgument: the weight is not an int in ``0..MAX_WEIGHT``, or
            the policy refused the change (:class:`MaglevHash`: ``table_size`` must
            stay greater than 100 x the live nodes; :class:`RingHash`: at most
            ``MAX_POINTS`` points); the node then keeps its weight.
        """
        return self._set(ref, weight=check_weight(weight))

    def mark_down(self, ref: NodeRef) -> Node:
        """No new picks for this node (failed health check).

        :raises UnknownNode: no such node.
        """
        return self._set(ref, state=NodeState.DOWN)

    def mark_up(self, ref: NodeRef) -> Node:
        """The node takes new picks again.

        :raises UnknownNode: no such node.
        :raises InvalidArgument: the policy refused the change (:class:`MaglevHash`:
            ``table_size`` must stay greater than 100 x the live nodes;
            :class:`RingHash`: at most ``MAX_POINTS`` points); the node then keeps
            its state.
        """
        return self._set(ref, state=NodeState.UP)

    def drain(self, ref: NodeRef) -> Node:
        """No new picks; existing leases stay until released.

        :raises UnknownNode: no such node.
        """
        return self._set(ref, state=NodeState.DRAINING)

    def get(self, ref: NodeRef) -> Node:
        """The current snapshot of a node.

        :raises UnknownNode: no such node.
        """
        with self._lock:
            return self._find(ref).node

    def active(self, ref: NodeRef | None = None) -> int:
        """Active leases on one node, or on all nodes when *ref* is None.

        :raises UnknownNode: no such node.
        """
        with self._lock:
            if ref is None:
                return self._total_active
            return self._find(ref).active

    @property
    def nodes(self) -> tuple[Node, ...]:
        """All nodes (any state), in insertion order."""
        with self._lock:
            return tuple(s.node for s in self._slots.values())

    @property
    def live_nodes(self) -> tuple[Node, ...]:
        """Nodes that may take new picks (up, weight > 0)."""
        return self._live

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, ref: object) -> bool:
        try:
            with self._lock:
                self._find(ref)  # type: ignore[arg-type]
        except (UnknownNode, ValueError):
            return False
        return True

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def _find(self, ref: NodeRef) -> _Slot:
        if isinstance(ref, Node):
            addr = ref.address
        elif isinstance(ref, str) and ref in self._names:
            addr = self._names[ref]
        else:
            try:
                addr = parse_address(ref)
            except ValueError:
                raise UnknownNode(ref) from None
        slot = self._slots.get(addr)
        if slot is None:
            raise UnknownNode(ref)
        return slot

    def _changed(self) -> None:
        live = []
        live_active = 0
        for s in self._slots.values():
            s.live = is_live = s.node.live
            if is_live:
                live.append(s.node)
                live_active += s.active
        self._live = tuple(live)
        self._live_active = live_active
        self._total_weight = sum(n.weight for n in live)
        # The reason goes out before the rebuild publishes the empty structure, so a
        # pick that finds it empty reads this reason or a later one, never a reason
        # computed from slots that a later change is still rebuilding.
        previous = self._down_reason
        if not live:
            self._down_reason = self._reason_now()
        try:
            self._rebuild()
        except BaseException:
            self._down_reason = previous  # the change is being undone
            raise

    # ----------------------------------------------------------------- copies, preview

    def copy(self) -> BalancePolicy:
        """A new policy of the same class, options and nodes, with no leases.

        Nothing is shared with this policy: the copy has its own lock, node records
        and lookup structure, and changes to either leave the other as it is. It
        starts afresh: no open leases (leases count in the policy that made them),
        round robin at the start of its cycle, :class:`PowerOfTwo` with a new
        generator from its ``seed`` option.
        """
        return type(self)(self.nodes, **self._options())

    # A policy owns a lock and per-node lease records: a shallow copy would share
    # them (a change to the "copy" corrupted the original), and pickle/deepcopy
    # choked on the lock ("cannot pickle '_thread.lock' object").

    def __copy__(self) -> BalancePolicy:
        """An independent :meth:`copy`: same class, options and nodes, no leases."""
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> BalancePolicy:
        """An independent :meth:`copy` (no leases), as for :meth:`__copy__`."""
        return self.copy()

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        """:raises TypeError: always: a policy cannot be pickled."""
        cls = type(self).__name__
        raise TypeError(
            f"cannot pickle {cls} policy {self!r}: it holds a lock and the lease counts "
            f"of this process; use policy.copy() for a copy here, or build one in the "
            f"other process from policy.nodes and the same options ({cls}(nodes, ...) "
            "or make_policy)"
        )

    def __reduce__(self) -> NoReturn:
        """:raises TypeError: always (see :meth:`__reduce_ex__`)."""
        self.__reduce_ex__(0)

    def preview(
        self, change: Callable[[BalancePolicy], object], keys: Iterable[Key]
    ) -> BalanceDiff:
        """What *change* would do, without applying it.

        ``change`` is called on a copy (e.g. ``lambda p: p.remove("10.0.0.3:80")``).
        Both sides are copies of one snapshot of this policy (its nodes and open
        lease counts, read together), so a change another thread makes meanwhile
        is not counted as moved by *change*. They carry the lease counts (see
        :func:`diff`), so with bounded load (``balance_factor``) ``before`` is what
        :meth:`pick` answers now and ``after`` what it would answer once the change
        is made, leases still open.

        :param change: callable applied to a copy of this policy.
        :param keys: sample keys (for hash policies; others pick once per key): an
            iterable of keys, not one key (see :func:`diff`).
        :returns: :class:`BalanceDiff` of this policy versus the changed copy.
        :raises InvalidArgument: *change* is not callable, or *keys* is one key (as
            :func:`diff` tells it) or not iterable (the error names the value).
        :raises NoNodeAvailable: this policy or the changed copy has no live node
            (also with no keys).
        :raises KeyRequired: a hash policy and a ``None`` key.
        :raises InvalidKey: a key that is not str or bytes-like, has no UTF-8
            form, is a released memoryview or is a buffer that cannot be read (a
            closed ``mmap``).
        :raises Exception: whatever *change* raises (for example ``UnknownNode``),
            unchanged; this policy is not touched either way.
        """
        if not callable(change):
            raise InvalidArgument(
                "change", change, "must be a callable that changes the policy copy it is given"
            )
        sample = _sample(keys)
        # One snapshot for both sides: two copies taken one after the other (each
        # a full rebuild, up to seconds for a big ring) counted a change another
        # thread made in between as moved by *change*.
        before = self._copy_with_leases()
        after = before._copy_with_leases()
        change(after)
        return _compare(before, after, sample)

    def _copy_with_leases(self) -> BalancePolicy:
        """:meth:`copy`, with this policy's open lease counts on the same nodes.

        Only the counts: there is no :class:`Lease` to release in the copy. Picks
        that read counts (bounded load, least-conn) then answer as this policy's do.
        The nodes and the counts are read under one hold of the lock, so they are
        of one moment; the copy is built after the lock is released.
        """
        with self._lock:
            nodes = tuple(s.node for s in self._slots.values())
            counts = [(a, s.active) for a, s in self._slots.items() if s.active]
        clone = type(self)(nodes, **self._options())
        if counts:
            with clone._lock:
                for addr, n in counts:
                    slot = clone._slots.get(addr)
                    if slot is not None:
                        slot.active += n
                        clone._total_active += n
                        if slot.live:
                            clone._live_active += n
        return clone

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self._slots)} nodes, {len(self._live)} live>"


def _exact_factor(factor: object) -> tuple[int, int, float | Fraction | Decimal]:
    """*factor* (a finite real number >= 1) as an exact fraction ``(num, den, kept)``.

    A float (numpy's float64 is one) is read as the shortest decimal that reads back
    as it, which is what the caller wrote (``1.1`` -> 11/10, where ``Fraction(1.1)``
    is 1.1000...0888). An int, a ``Fraction`` (any :class:`numbers.Rational`), a
    ``Decimal`` or an int-like object (``__index__``: numpy's integers) is taken
    exactly; another real type (:class:`numbers.Real`: numpy's float32) as
    ``float(factor)``. *kept* is *factor* itself if its type is exactly int, float,
    ``Fraction`` or ``Decimal`` (immutable), else the int, ``Fraction`` or float it
    was read as. A ``Decimal`` above ``10**400`` bounds nothing any lease count
    could reach and is read as ``10**400``: its exact value would be an int of
    ~exponent digits (``Decimal("1e20000000")`` took 17 s).

    :raises InvalidArgument: *factor* is a bool, not a real number (a str, a
        complex), NaN, infinite or below 1; the message names it.
    """

    def bad(reason: str) -> InvalidArgument:
        return InvalidArgument("balance_factor", factor, reason)

    kinds = "a real number (int, float, Fraction or Decimal)"
    if isinstance(factor, bool):
        raise bad(f"must be {kinds} >= 1, not a bool")
    exact: Fraction
    kept: float | Fraction | Decimal
    if isinstance(factor, int):  # first: the common case, and 10**400 has no float
        exact = Fraction(factor)
        kept = factor if type(factor) is int else int(factor)
    elif isinstance(factor, Decimal):
        if not factor.is_finite():  # (comparing a signalling NaN would raise)
            raise bad("must be finite")
        # Compared before Fraction(): Decimal("1e-20000000") is short, its exact
        # value is not.
        if factor < 1:
            raise bad("must be >= 1")
        exact = Fraction(factor) if factor.adjusted() <= 400 else Fraction(10**400)
        kept = factor if type(factor) is Decimal else Decimal(factor)
    elif isinstance(factor, float):
        exact = _exact_float(factor, bad)
        kept = factor if type(factor) is float else float(factor)
    elif hasattr(type(factor), "__index__"):  # numpy's integers, and any int-like
        try:
            as_int = operator.index(factor)  # type: ignore[arg-type]
        except (TypeError, ValueError, ArithmeticError):  # (its __index__ refused)
            raise bad(f"must be {kinds} >= 1") from None
        exact = Fraction(as_int)
        kept = as_int
    # The ABCs are registered, not inherited (a third-party rational, numpy's
    # float32): nothing promises their numerator or float() work, so a failure
    # there is this bad factor, not an error of ours.
    elif isinstance(factor, numbers.Rational):
        try:
            num, den = operator.index(factor.numerator), operator.index(factor.denominator)
            exact = Fraction(num, den)
        except (TypeError, ValueError, ArithmeticError):
            raise bad(f"must be {kinds} >= 1") from None
        kept = factor if type(factor) is Fraction else exact
    elif isinstance(factor, numbers.Real):
        try:
            as_float = float(factor)
        except (TypeError, ValueError, ArithmeticError):
            raise bad(f"must be {kinds} >= 1") from None
        exact = _exact_float(as_float, bad)
        kept = as_float
    else:
        raise bad(f"must be {kinds} >= 1, not {type(factor).__name__}")
    if exact < 1:
        raise bad("must be >= 1")
    return exact.numerator, exact.denominator, kept


def _exact_float(factor: float, bad: Callable[[str], InvalidArgument]) -> Fraction:
    """A finite *factor* as the decimal it prints as (see :func:`_exact_factor`)."""
    if not math.isfinite(factor):
        raise bad("must be finite")
    # float.__repr__, not repr(): a float subclass may print itself otherwise
    # (numpy 2's float64 is "np.float64(1.25)").
    return Fraction(float.__repr__(factor))


class HashPolicy(BalancePolicy):
    """Shared parts of the key-hash policies: :class:`KeyHasher`, bounded load.

    With ``balance_factor=c`` (``>= 1``), a node that the new lease would put above
    ``ceil(c x average)`` is passed over and the key goes to the policy's next
    candidate (Mirrokni, Thorup and Zadimoghaddam's consistent hashing with bounded
    loads; HAProxy's ``hash-balance-factor``). Exactly: a node of weight ``w`` holding
    ``a`` leases is passed over when ``a >= ceil(c * (A + 1) * w / W)``, where ``A``
    counts the leases open on live nodes (up, weight > 0) and ``W`` is the live
    nodes' total weight; leases still open on draining, down or weight-0 nodes count
    in neither, so they do not loosen the live nodes' bound. It needs leases: plain
    ``pick`` sees the current counts too, but does not add to them. Bounded picks
    read the counts, so they run under the lock. The bound is computed in exact
    integer arithmetic, so scaling all weights by the same number never changes it:
    a float factor is read as the decimal it prints as (``1.1`` is 11/10), an int,
    ``Fraction``, ``Decimal`` or int-like (``__index__``: numpy's integers) exactly,
    and another :class:`numbers.Real` (numpy's float32) as ``float(c)``. A live node
    that the policy's candidate order never reaches (a ketama server with no points,
    a Maglev node with no table entry) still takes the key when every other node is
    at its bound.

    :param nodes: initial nodes (``Node`` objects or addresses).
    :param seed: the :class:`KeyHasher` seed, an int in ``0..2**32-1``.
    :param secret: the :class:`KeyHasher` secret (1 to 64 bytes), or None.
    :param balance_factor: bounded load: a finite real number ``>= 1`` (an int,
        float, ``Fraction``, ``Decimal`` or any real number, as above), or None.
    :raises InvalidArgument: seed or secret is out of range; balance_factor is a
        bool, not a real number (a str, a complex), NaN, infinite or below 1; or
        *nodes* is one address (a string or a tuple), a mapping or not iterable at
        all.
    :raises DuplicateNode: two nodes share an address or a name, or one node's name
        is another node's address.
    :raises AddressError: an address in *nodes* is malformed, or *nodes* is a tuple
        that can only be one address and a malformed one.
    """

    needs_key = True

    def __init__(
        self,
        nodes: Iterable[NodeLike] = (),
        *,
        seed: int = 0,
        secret: bytes | None = None,
        balance_factor: float | Fraction | Decimal | None = None,
    ) -> None:
        self._hasher = KeyHasher(seed, secret)
        self._balance_factor = balance_factor
        self._bound = (1, 1)
        if balance_factor is not None:
            num, den, kept = _exact_factor(balance_factor)
            self._bound = (num, den)
            # What the property, copy() and preview() read back: the caller's value
            # when it cannot change, else the number it was read as (a numpy 0-d
            # array is int-like and can be changed in place under the bound in use).
            self._balance_factor = kept
        super().__init__(nodes)
        # Bounded picks read lease counts and the live set: only under the lock.
        self._pick_unlocked = self.lock_free_pick and balance_factor is None

    @property
    def hasher(self) -> KeyHasher:
        """The :class:`KeyHasher` in use: the 32-bit hash a pick starts from (a
        :class:`RingHash` in ketama mode hashes keys with MD5 and does not use it)."""
        return self._hasher

    @property
    def balance_factor(self) -> float | Fraction | Decimal | None:
        """The bounded-load factor as given, or None."""
        return self._balance_factor

    def _options(self) -> dict[str, Any]:
        return {
            "seed": self._hasher.seed,
            "secret": self._hasher.secret,
            "balance_factor": self._balance_factor,
        }

    @abc.abstractmethod
    def _candidates(self, key: bytes) -> Iterator[Node]:
        """Live nodes in this key's order of preference (may repeat)."""

    def _choose_bounded(self, key: bytes) -> Node:
        if not self._live:
            raise self._unavailable()
        # A node may hold fewer than ceil(c * (A + 1) * w / W) leases; for an int
        # count, a < ceil(x) exactly when a < x, so compare
        # a * den * W < num * (A + 1) * w in ints. (With floats, 1.0 * 58 * 7 / 14
        # came to 29.000000000000004 and its ceil let a node take a 30th lease.)
        # A counts the leases on live nodes only, as W weighs live nodes only:
        # leases still open on a draining node must not raise the live nodes' bound
        # (59 of them let one live node of two take all 60 leases of a hot key).
        num, den = self._bound
        limit = num * (self._live_active + 1)
        scale = den * self._total_weight
        slots = self._slots
        live = self._live
        tried: set[Address] = set()
        for node in self._candidates(key):
            addr = node.address
            if slots[addr].active * scale < limit * node.weight:
                return node
            tried.add(addr)
            if len(tried) == len(live):
                break
        else:
            # The candidates ran out before every live node came up: some live node
            # has no place in the lookup structure (ketama gives a light server no
            # points). It may still take the key rather than refusing it while idle.
            for node in sorted(live, key=lambda n: n.hash_id):
                if node.address not in tried and slots[node.address].active * scale < (
                    limit * node.weight
                ):
                    return node
        raise NoNodeAvailable(self.name, "all nodes are over the load bound")


# --------------------------------------------------------------------------- diff


@dataclass(frozen=True)
class BalanceDiff:
    """What a membership change does to a sample of keys.

    :ivar keys: number of sample keys.
    :ivar moved: keys whose node changed.
    :ivar share_moved: ``moved / keys`` (0.0 with no keys).
    :ivar before: keys per node address before the change.
    :ivar after: keys per node address after the change.
    """

    keys: int
    moved: int
    share_moved: float
    before: dict[Address, int]
    after: dict[Address, int]

    @property
    def min_load(self) -> int:
        """Fewest keys on a live node after the change."""
        return min(self.after.values(), default=0)

    @property
    def max_load(self) -> int:
        """Most keys on a node after the change."""
        return max(self.after.values(), default=0)

    @property
    def max_over_mean(self) -> float:
        """``max_load / mean``, 1.0 is perfect balance."""
        if not self.after:
            return 0.0
        return self.max_load * len(self.after) / self.keys if self.keys else 0.0


def diff(old: BalancePolicy, new: BalancePolicy, keys: Iterable[Key]) -> BalanceDiff:
    """Share of *keys* that map to another node in *new* than in *old*, and loads.

    Neither policy is changed: both are copied first, so round-robin counters
    and leases stay as they are. The copies carry each policy's open lease counts,
    so a bounded-load hash policy's side maps the keys as its
    :meth:`~BalancePolicy.pick` does now. A copy's own pick state starts afresh
    (see :meth:`~BalancePolicy.copy`): round robin at the start of its cycle,
    :class:`LeastConn`'s tie-break at its first node (ties among equally loaded
    nodes go in node order, not where the policy's rotation stands) and
    :class:`PowerOfTwo`'s generator from its seed, so for those policies a side is
    what a fresh policy with these nodes and lease counts would pick, not the
    policy's own next picks. Only hash policies give a meaningful ``moved``.

    :param old: the policy as it is.
    :param new: the policy after the change.
    :param keys: sample keys: an iterable of keys, not one key. One key is a
        ``str``, ``bytes``, ``bytearray``, ``memoryview``, ``array.array`` or
        ``mmap``, or a ctypes object: a scalar (``c_int(7)``), a structure, a
        union, a pointer or an array of scalars (a ``c_char`` array,
        ``create_string_buffer()``, a ``c_double`` array); iterating one would
        sample its characters, bytes or numbers as keys. Any other iterable is
        sampled item by item: a list, a generator, a numpy array of any dtype
        (each numpy scalar is a bytes-like key, ``np.uint64(1001)`` its 8 bytes),
        a ctypes array of ``c_char_p``, ``c_wchar_p`` or ``py_object`` (whole
        keys) or of arrays or structures (its rows, each a buffer key).
    :returns: :class:`BalanceDiff`.
    :raises InvalidArgument: *old* or *new* is not a :class:`BalancePolicy`, or
        *keys* is one key (as above) or not iterable (the error names the value).
    :raises NoNodeAvailable: either policy has no live node (also with no keys).
    :raises KeyRequired: a key is None and the policies hash keys.
    :raises InvalidKey: a key is not str or bytes-like, has no UTF-8 form, is a
        released memoryview or is a buffer that cannot be read (a closed ``mmap``).
    """
    for name, policy in (("old", old), ("new", new)):
        if not isinstance(policy, BalancePolicy):
            raise InvalidArgument(name, policy, "must be a BalancePolicy")
    sample = _sample(keys)
    return _compare(old._copy_with_leases(), new._copy_with_leases(), sample)


def _one_key(keys: object) -> bool:
    """True when *keys* is one key that would iterate as its characters, bytes or numbers."""
    if isinstance(keys, (str, bytes, bytearray, memoryview, array, mmap.mmap)):
        return True
    # key_bytes takes any buffer as one key, so a ctypes c_char array (or
    # create_string_buffer) of b"user42" picks as b"user42" does, but it iterates as
    # six one-byte keys and diff() sampled those without a word. Not every buffer is
    # one key, though: a numpy array of any dtype iterates as numpy scalars, each a
    # buffer that pick() takes as one key (np.uint64(1001) as its 8 bytes), so a
    # numpy array of ids is a sample of keys; a buffer's format cannot tell the two
    # apart. So name the types: besides those above, only ctypes objects are one key.
    # No ctypes object exists unless ctypes was imported, so skip the import (and the
    # checks) otherwise.
    ctypes = sys.modules.get("ctypes")
    if ctypes is None:
        return False
    # A scalar, structure or union does not iterate at all, and a pointer iterates
    # without a bound (p[0], p[1], ... read past the pointee until they fault): each
    # is one key to pick(), which hashes its bytes.
    if isinstance(keys, (ctypes._SimpleCData, ctypes.Structure, ctypes.Union, ctypes._Pointer)):
        return True
    if isinstance(keys, ctypes.Array):
        # An array of scalars iterates as one-byte bytes (c_char), one-character
        # strs (c_wchar) or numbers: one key. An array of c_char_p, c_wchar_p or
        # py_object iterates as whole bytes or str keys (or the objects it holds),
        # an array of arrays or structures by its rows (each a buffer key): samples,
        # as before.
        item = keys._type_
        return issubclass(item, ctypes._SimpleCData) and item._type_ not in ("z", "Z", "O")
    return False


def _sample(keys: object) -> list[Key]:
    """*keys* as a list, refusing one key (a str would be sampled per character).

    :raises InvalidArgument: *keys* is one key (a str, a bytes-like builtin, an
        ``array.array``, an ``mmap`` or a ctypes object, see :func:`diff`) or not
        iterable.
    """
    # An array.array and an mmap are keys too (key_bytes reads any buffer), and
    # both iterate: an mmap by its bytes, each a one-byte key (sampled without a
    # word), an array by its ints (InvalidKey naming an int, not the array).
    if _one_key(keys):
        raise InvalidArgument(
            "keys", keys, "must be an iterable of keys, not one key (wrap it in a list)"
        )
    try:
        items = iter(keys)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidArgument("keys", keys, "must be an iterable of keys") from None
    return list(items)


def _compare(a: BalancePolicy, b: BalancePolicy, sample: Sequence[Key]) -> BalanceDiff:
    """Map *sample* with *a* and with *b* (copies: picks may advance their state)."""
    # checked up front, so no keys (or keys that fail later) still report it
    for policy in (a, b):
        if not policy.live_nodes:
            raise policy._unavailable()
    before: dict[Address, int] = {n.address: 0 for n in a.live_nodes}
    after: dict[Address, int] = {n.address: 0 for n in b.live_nodes}
    moved = 0
    for k in sample:
        x = a.pick(k).address
        y = b.pick(k).address
        before[x] += 1
        after[y] += 1
        moved += x != y
    n = len(sample)
    return BalanceDiff(n, moved, moved / n if n else 0.0, before, after)


class TableHashPolicy(HashPolicy):
    """A hash policy whose unbounded picks are one lookup in a published table.

    Subclasses publish ``self._fast = (table, seed)`` (or None when the fast path
    does not apply: bounded load, a secret, no live node) with one attribute store
    after each rebuild; :meth:`pick` then hashes a str key with CRC-32 and indexes
    the table without taking the lock.
    """

    _fast: tuple[list[Node], int] | None = None

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
        fast = self._fast
        if fast is not None and key.__class__ is str:
            table, seed = fast
            try:
                return table[zlib.crc32(key.encode(), seed) % len(table)]  # type: ignore[union-attr,unused-ignore]
            except UnicodeEncodeError:
                return super().pick(key)  # which reports the key (InvalidKey)
        return super().pick(key)
