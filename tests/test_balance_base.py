"""The balance-policy base layer: bounded load, NoNodeAvailable reasons, leases,
make_policy, diff/preview, duplicate names (no sockets: the policies are pure)."""

from __future__ import annotations

import copy
import ctypes
import mmap
import pickle
import random
import re
import sys
import threading
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reuselb import (
    Address,
    AddressError,
    AddressLike,
    DuplicateNode,
    InvalidArgument,
    Lease,
    LeaseReleased,
    NoNodeAvailable,
    ReuselbError,
    UnknownNode,
)
from reuselb.balance import (
    POLICIES,
    BalanceDiff,
    BalancePolicy,
    HashPolicy,
    LeastConn,
    MaglevHash,
    Node,
    NodeLike,
    NodeState,
    RendezvousHash,
    RingHash,
    RoundRobin,
    diff,
    ketama_points,
    make_policy,
    smooth_wrr_cycle,
)

NODES = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]

BOUNDED: dict[str, Callable[..., HashPolicy]] = {
    "maglev": lambda nodes, **kw: MaglevHash(nodes, table_size=1009, **kw),
    "ring": lambda nodes, **kw: RingHash(nodes, vnodes=20, **kw),
    "ketama": lambda nodes, **kw: RingHash(nodes, ketama=True, **kw),
    "rendezvous": lambda nodes, **kw: RendezvousHash(nodes, table_size=1024, **kw),
    "rendezvous-exact": lambda nodes, **kw: RendezvousHash(nodes, table_size=None, **kw),
}


def _ceil(x: Fraction) -> int:
    return -(-x.numerator // x.denominator)


# --------------------------------------------------------------------------- bounded load


@pytest.mark.parametrize("kind", sorted(BOUNDED))
@pytest.mark.parametrize("how", ["drain", "mark_down", "weight0"])
def test_leases_on_a_node_that_takes_no_picks_do_not_loosen_the_bound(kind: str, how: str) -> None:
    p = BOUNDED[kind](NODES, balance_factor=1.25)
    busy = NODES[0]
    # 59 leases on the first node (the only live one), then it stops taking picks
    p.mark_down(NODES[1])
    p.mark_down(NODES[2])
    old = [p.acquire("warm") for _ in range(59)]
    assert p.active(busy) == 59
    p.mark_up(NODES[1])
    p.mark_up(NODES[2])
    if how == "drain":
        p.drain(busy)
    elif how == "mark_down":
        p.mark_down(busy)
    else:
        p.set_weight(busy, 0)
    hot = [p.acquire("one hot key") for _ in range(60)]
    live = p.live_nodes
    assert len(live) == 2
    counts = [p.active(n) for n in live]
    assert sum(counts) == 60
    # no live node above ceil(1.25 x the live nodes' average): 38, not 60
    assert max(counts) <= _ceil(Fraction(125, 100) * 60 / 2), counts
    for lease in old + hot:
        lease.release()
    assert p.active() == 0


@pytest.mark.parametrize("kind", sorted(BOUNDED))
def test_bound_counts_only_leases_on_live_nodes_through_random_changes(kind: str) -> None:
    r = random.Random(kind)
    nodes = [Node(f"10.0.0.{i}:80", weight=r.randrange(1, 4)) for i in range(1, 6)]
    factor = Fraction(5, 4)
    p = BOUNDED[kind](nodes, balance_factor=1.25)
    leases = []
    for _ in range(1500):
        op = r.random()
        if op < 0.6:
            live = p.live_nodes
            a_live = sum(p.active(n) for n in live)
            w_live = sum(n.weight for n in live)
            try:
                lease = p.acquire(r.choice(["hot", "hot", f"k{r.randrange(20)}"]))
            except NoNodeAvailable:
                assert not live
                continue
            node = lease.node
            before = p.active(node) - 1
            # the pick was allowed: before < ceil(c x (A_live + 1) x w / W)
            assert before < factor * (a_live + 1) * node.weight / w_live
            leases.append(lease)
        elif op < 0.85 and leases:
            leases.pop(r.randrange(len(leases))).release()
        else:
            n = r.choice(nodes)
            change = r.randrange(5)
            if n not in p:
                p.add(n)
            elif change == 0:
                p.drain(n)
            elif change == 1:
                p.mark_down(n)
            elif change == 2:
                p.mark_up(n)
            elif change == 3:
                p.set_weight(n, r.randrange(0, 4))
            else:
                p.remove(n)
    # the running count of leases on live nodes matches a recount
    assert p._live_active == sum(p.active(n) for n in p.live_nodes)
    for lease in leases:
        lease.release()
    assert p.active() == 0 and p._live_active == 0


# --------------------------------------------------------------------------- reasons

RACED: dict[str, Callable[[list[str]], BalancePolicy]] = {
    "round-robin": RoundRobin,
    "least-conn": LeastConn,
    "maglev": lambda nodes: MaglevHash(nodes, table_size=1009),
    "maglev-bounded": lambda nodes: MaglevHash(nodes, table_size=1009, balance_factor=1.25),
    "ring": lambda nodes: RingHash(nodes, vnodes=10),
    "rendezvous": lambda nodes: RendezvousHash(nodes, table_size=1024),
    "rendezvous-exact": lambda nodes: RendezvousHash(nodes, table_size=None),
}

A, B = "10.0.0.1:80", "10.0.0.2:80"

# (set up, flip to a state with a live node, flip back, the only true reason)
FLIPS: dict[str, tuple[Callable[[BalancePolicy], object], ...]] = {
    "down/up": (
        lambda p: (p.mark_down(A), p.mark_down(B)),
        lambda p: p.mark_up(A),
        lambda p: p.mark_down(A),
    ),
    "weight 0/1": (
        lambda p: (p.set_weight(A, 0), p.set_weight(B, 0)),
        lambda p: p.set_weight(A, 1),
        lambda p: p.set_weight(A, 0),
    ),
    "draining/up": (
        lambda p: (p.drain(A), p.drain(B)),
        lambda p: p.mark_up(A),
        lambda p: p.drain(A),
    ),
    "add/remove": (
        lambda p: (p.remove(A), p.remove(B)),
        lambda p: p.add(A),
        lambda p: p.remove(A),
    ),
}
TRUE_REASON = {
    "down/up": "all nodes are down",
    "weight 0/1": "all nodes have weight 0",
    "draining/up": "all nodes are draining",
    "add/remove": "no nodes",
}


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every microsecond, so picks land inside changes."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@pytest.mark.usefixtures("fast_switching")
@pytest.mark.parametrize("flip", sorted(FLIPS))
@pytest.mark.parametrize("kind", sorted(RACED))
def test_no_node_reason_was_true_when_a_pick_races_a_change(kind: str, flip: str) -> None:
    p = RACED[kind]([A, B])
    setup, on, off = FLIPS[flip]
    setup(p)
    reasons: set[str] = set()
    picked = [0]
    stop = threading.Event()
    errors: list[BaseException] = []

    def picker() -> None:
        try:
            for _ in range(2_000_000):  # bounded: stop is set long before this
                if stop.is_set():
                    return
                try:
                    p.pick("k")
                    picked[0] += 1
                except NoNodeAvailable as exc:
                    reasons.add(exc.reason)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=picker)
    t.start()
    try:
        for _ in range(800):
            on(p)
            off(p)
    finally:
        stop.set()
        t.join(timeout=60)
    assert not t.is_alive()
    assert not errors, errors
    # the only states were "nothing live, for the one true reason" and "A live"
    assert reasons <= {TRUE_REASON[flip]}, reasons
    assert p.active() == 0


# --------------------------------------------------------------------------- make_policy


@pytest.mark.parametrize(
    ("name", "options", "bad", "takes"),
    [
        ("round-robin", {"balance_factor": 1.25}, "balance_factor", "no options"),
        ("least-conn", {"table_size": 1009}, "table_size", "no options"),
        ("p2c", {"seed": 1, "vnodes": 3}, "vnodes", "only seed"),
        ("maglev", {"name": "x"}, "name", "only table_size, seed, secret, balance_factor"),
        ("hash", {"nodes_": []}, "nodes_", "only table_size"),
    ],
)
def test_make_policy_names_an_option_the_policy_does_not_take(
    name: str, options: dict[str, object], bad: str, takes: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        make_policy(name, ["10.0.0.1:80"], **options)
    exc = info.value
    assert isinstance(exc, ReuselbError)
    assert isinstance(exc, TypeError)  # what the class itself raised before
    assert exc.name == bad
    assert f"invalid {bad} " in str(exc)
    assert f"not an option of {name!r}" in str(exc)
    assert takes in str(exc)


@pytest.mark.parametrize(
    ("name", "takes"),
    [("round-robin", "no options"), ("least-conn", "no options"), ("p2c", "only seed")],
)
def test_make_policy_never_shows_a_secret_the_policy_does_not_take(name: str, takes: str) -> None:
    # a config switched from "maglev" to a policy without a key, the key still set:
    # the message was "invalid secret b'TOPSECRET-from-env': not an option of ..."
    secret = b"TOPSECRET-from-env"
    with pytest.raises(InvalidArgument) as info:
        make_policy(name, ["10.0.0.1:80"], secret=secret)
    exc = info.value
    for text in (str(exc), repr(exc), *map(str, exc.args)):
        assert "TOPSECRET" not in text, text
    assert str(exc) == (
        f"invalid secret (bytes, length 18; not shown): not an option of {name!r} "
        f"({type(make_policy(name)).__name__}), which takes {takes}"
    )
    assert isinstance(exc, TypeError)  # still what the class itself raised
    assert exc.name == "secret" and exc.value is secret


def test_make_policy_takes_every_option_of_the_policy_and_nodes_by_keyword() -> None:
    p = make_policy("maglev", ["10.0.0.1:80"], table_size=1009, seed=3, balance_factor=1.5)
    assert isinstance(p, MaglevHash) and p.table_size == 1009 and p.balance_factor == 1.5
    q = make_policy("p2c", nodes=["10.0.0.1:80", "10.0.0.2:80"], seed=4)
    assert len(q) == 2
    assert len(make_policy("ring")) == 0
    with pytest.raises(InvalidArgument, match="given twice"):
        make_policy("ring", ["10.0.0.1:80"], nodes=["10.0.0.2:80"])


def test_make_policy_passes_any_option_to_a_policy_that_takes_kwargs() -> None:
    class Open(RoundRobin):
        name = "open-test"

        def __init__(self, nodes: object = (), **extra: object) -> None:
            self.extra = extra
            super().__init__(nodes)  # type: ignore[arg-type]

    POLICIES["open-test"] = Open
    try:
        p = make_policy("open-test", ["10.0.0.1:80"], name="x", anything=1)
    finally:
        del POLICIES["open-test"]
    assert isinstance(p, Open) and p.extra == {"name": "x", "anything": 1}


# --------------------------------------------------------------------------- leases


@pytest.mark.parametrize("how", ["copy", "deepcopy", "deepcopy in a list"])
def test_copying_a_lease_gives_the_same_lease_not_a_second_release(how: str) -> None:
    p = RoundRobin(["10.0.0.1:80"])
    lease = p.acquire()
    if how == "copy":
        twin = copy.copy(lease)
    elif how == "deepcopy":
        twin = copy.deepcopy(lease)
    else:
        twin = copy.deepcopy([lease])[0]
    assert twin is lease
    twin.release()
    with pytest.raises(LeaseReleased):
        lease.release()
    assert p.active() == 0
    assert p.active("10.0.0.1:80") == 0


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickling_a_lease_raises_a_clear_type_error(protocol: int) -> None:
    p = MaglevHash(["10.0.0.1:80"], table_size=1009)
    with (
        p.acquire("k") as lease,
        pytest.raises(TypeError, match=r"cannot pickle <Lease 10\.0\.0\.1:80 active>"),
    ):
        pickle.dumps(lease, protocol)
    assert p.active() == 0


# --------------------------------------------------------------------------- policy copies

COPY_CASES: dict[str, Callable[[list[str]], BalancePolicy]] = {
    "round-robin": RoundRobin,
    "least-conn": LeastConn,
    "p2c": lambda n: make_policy("p2c", n, seed=7),
    "maglev-bounded": lambda n: MaglevHash(n, table_size=1009, balance_factor=1.25),
    "ring": lambda n: RingHash(n, vnodes=10),
    "rendezvous": lambda n: RendezvousHash(n, table_size=1024, seed=3),
}


@pytest.mark.parametrize("kind", list(COPY_CASES))
@pytest.mark.parametrize("how", ["copy", "deepcopy", "deepcopy in a list"])
def test_copying_a_policy_gives_an_independent_policy_without_leases(kind: str, how: str) -> None:
    p = COPY_CASES[kind](NODES)
    held = [p.acquire("k1") for _ in range(3)]
    if how == "copy":
        q = copy.copy(p)
    elif how == "deepcopy":
        q = copy.deepcopy(p)
    else:
        q = copy.deepcopy([p])[0]
    assert type(q) is type(p) and q is not p
    assert q.nodes == p.nodes and q.active() == 0  # leases stay with the original
    if isinstance(p, HashPolicy):
        assert isinstance(q, HashPolicy)
        assert q.hasher.seed == p.hasher.seed and q.balance_factor == p.balance_factor
    # a change to the copy leaves the original as it was (it corrupted it: the two
    # shared their node records, and the original's next acquire raised KeyError)
    for n in NODES[1:]:
        q.remove(n)
    assert len(q) == 1 and len(p) == 3 and p.active() == 3
    for i in range(20):
        p.acquire(f"key-{i}").release()
    for lease in held:
        lease.release()
    assert p.active() == 0 and q.active() == 0


@pytest.mark.parametrize("kind", list(COPY_CASES))
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickling_a_policy_raises_a_type_error_naming_it(kind: str, protocol: int) -> None:
    p = COPY_CASES[kind](NODES)
    cls = type(p).__name__
    with pytest.raises(TypeError, match=rf"cannot pickle {cls} policy .*policy\.copy\(\)"):
        pickle.dumps(p, protocol)


# --------------------------------------------------------------------------- failed rebuilds

REBUILT: dict[str, Callable[..., BalancePolicy]] = {
    **COPY_CASES,
    "maglev": lambda n: MaglevHash(n, table_size=1009),
    "ketama": lambda n: RingHash(n, ketama=True),
    "rendezvous-exact": lambda n: RendezvousHash(n, table_size=None),
}


@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt])
@pytest.mark.parametrize("kind", sorted(REBUILT))
def test_remove_whose_rebuild_fails_leaves_the_policy_as_it_was(
    kind: str, error: type[BaseException]
) -> None:
    # the node in the middle has a name that spells another address, so its
    # name, the address its name stands for and its place in the order come back
    nodes = [
        Node("10.0.0.1:80"),
        Node("10.0.0.2:80", name="10.0.0.9:80", weight=2),
        Node("10.0.0.3:80"),
    ]
    p = REBUILT[kind](nodes)
    keys = [f"k{i}" for i in range(40)]
    victim = nodes[1]

    def acquire_on(address: Address) -> Lease:
        for i in range(500):  # bounded; every policy here reaches each node
            lease = p.acquire(f"find-{i}") if p.needs_key else p.acquire()
            if lease.node.address == address:
                return lease
            lease.release()
        raise AssertionError(f"no lease on {address}")

    held_node = nodes[0].address
    held = acquire_on(held_node)
    lease = acquire_on(victim.address)
    before = (p.nodes, p.live_nodes, p.active(), p.active(victim), p.active(held_node))
    mapping = [p.pick(k).address for k in keys] if p.needs_key else None
    rebuild = p._rebuild
    calls = [0]

    def fails_once() -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise error  # as a MemoryError or a Ctrl-C in the middle of a ring rebuild
        rebuild()

    p._rebuild = fails_once  # type: ignore[method-assign]
    with pytest.raises(error):
        p.remove("10.0.0.9:80")  # by its name
    p._rebuild = rebuild  # type: ignore[method-assign]
    # it was gone from the records but still in the lookup table: pick() returned
    # it, acquire() raised KeyError
    assert (p.nodes, p.live_nodes, p.active(), p.active(victim), p.active(held_node)) == before
    assert p.get("10.0.0.9:80") == victim
    with pytest.raises(DuplicateNode, match="spelled by another node's name"):
        p.add("10.0.0.9:80")
    if mapping is not None:
        assert [p.pick(k).address for k in keys] == mapping
    for k in keys:
        (p.acquire(k) if p.needs_key else p.acquire()).release()
    lease.release()
    held.release()
    assert p.active() == 0
    assert p.remove(victim) == victim and len(p) == 2
    p.add("10.0.0.9:80")  # the name went with its node


# --------------------------------------------------------------------------- diff, preview


@pytest.mark.parametrize("keys", [[], ["k1", "k2"]])
def test_diff_and_preview_raise_when_a_side_has_no_live_node_even_without_keys(
    keys: list[str],
) -> None:
    empty = MaglevHash([], table_size=1009)
    one = MaglevHash(["10.0.0.1:80"], table_size=1009)
    with pytest.raises(NoNodeAvailable, match="no nodes"):
        diff(empty, empty, keys)
    with pytest.raises(NoNodeAvailable, match="no nodes"):
        diff(one, empty, keys)
    with pytest.raises(NoNodeAvailable, match="no nodes"):
        diff(empty, one, keys)
    with pytest.raises(NoNodeAvailable, match="all nodes are down"):
        one.preview(lambda p: p.mark_down("10.0.0.1:80"), keys)
    with pytest.raises(NoNodeAvailable, match="all nodes are draining"):
        RoundRobin(["10.0.0.1:80"]).preview(lambda p: p.drain("10.0.0.1:80"), keys)
    assert one.active() == 0 and one.live_nodes  # not touched
    d = one.preview(lambda p: p.add("10.0.0.2:80"), keys)
    assert d.keys == len(keys)


BOUNDED_KINDS: dict[str, Callable[[list[str]], HashPolicy]] = {
    "maglev": lambda n: MaglevHash(n, table_size=1009, balance_factor=1.25),
    "ring": lambda n: RingHash(n, vnodes=20, balance_factor=1.25),
    "rendezvous": lambda n: RendezvousHash(n, table_size=1024, balance_factor=1.25),
    "rendezvous-exact": lambda n: RendezvousHash(n, table_size=None, balance_factor=1.25),
}


@pytest.mark.parametrize("kind", list(BOUNDED_KINDS))
@given(hot=st.lists(st.integers(0, 4), min_size=1, max_size=80), drained=st.integers(0, 4))
@settings(max_examples=15, deadline=None)
def test_preview_and_diff_of_a_bounded_policy_map_keys_as_pick_does(
    kind: str, hot: list[int], drained: int
) -> None:
    nodes = [f"10.0.0.{i}:80" for i in range(1, 6)]
    p = BOUNDED_KINDS[kind](nodes)
    held = [p.acquire(f"hot-{h}") for h in hot]  # open leases on a few hot keys
    keys = [f"hot-{i}" for i in range(5)] + [f"cold-{i}" for i in range(20)]
    now = [p.pick(k).address for k in keys]

    def loads(picked: list[Address]) -> dict[Address, int]:
        return {a: n for a, n in Counter(picked).items() if n}

    # the copies carry the open lease counts: preview and diff saw a lease-free
    # policy, so a bounded policy's preview differed from its own pick()
    d = p.preview(lambda q: None, keys)
    assert {a: n for a, n in d.before.items() if n} == loads(now) and d.moved == 0
    assert {a: n for a, n in diff(p, p, keys).after.items() if n} == loads(now)
    d = p.preview(lambda q: q.drain(nodes[drained]), keys)
    assert p.active() == len(hot)  # not touched
    p.drain(nodes[drained])
    later = [p.pick(k).address for k in keys]
    assert {a: n for a, n in d.after.items() if n} == loads(later)
    assert d.moved == sum(x != y for x, y in zip(now, later, strict=True))
    for lease in held:
        lease.release()


@pytest.mark.parametrize("kind", ["ring", "maglev", "rendezvous", "round-robin"])
def test_preview_takes_both_sides_from_one_snapshot(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    factories: dict[str, Callable[[list[str]], BalancePolicy]] = {
        "ring": lambda n: RingHash(n, vnodes=20),
        "maglev": lambda n: MaglevHash(n, table_size=1009),
        "rendezvous": lambda n: RendezvousHash(n, table_size=1024),
        "round-robin": RoundRobin,
    }
    nodes = [f"10.0.0.{i}:80" for i in range(1, 6)]
    p = factories[kind](nodes)
    keys = [f"user-{i}" for i in range(300)]
    fresh = p.copy()  # round robin's copies start their cycle afresh
    now = Counter(fresh.pick(k).address for k in keys)
    options = p._options
    changed: list[str] = []

    def options_then_a_change_from_another_thread() -> dict[str, object]:
        # Each copy is built with _options(). Before the fix preview() built the
        # two sides one after the other, each from its own read of the nodes, so
        # a health check that marked a node down in between (while a big ring was
        # being copied, up to seconds) was counted as moved by the change.
        if not changed:
            p.mark_down(nodes[2])
            changed.append(nodes[2])
        return options()

    monkeypatch.setattr(p, "_options", options_then_a_change_from_another_thread)
    d = p.preview(lambda q: None, keys)
    assert changed  # the change did land inside preview()
    assert d.moved == 0 and d.before == d.after
    # both sides are the policy as it was when preview() was called
    assert {a: n for a, n in d.before.items() if n} == now


def test_diff_of_least_conn_starts_the_tie_break_afresh_as_documented() -> None:
    p = LeastConn(NODES)
    assert p.pick().address == Node(NODES[0]).address  # the tie-break moves on
    d = diff(p, p, ["k"])
    # each side is a copy whose tie-break starts at the first node again, not p's
    # next pick; the docstring said each side "maps the keys as its pick() does now"
    assert {str(a): n for a, n in d.before.items() if n} == {NODES[0]: 1}
    assert p.pick().address == Node(NODES[1]).address
    doc = " ".join((diff.__doc__ or "").split())
    assert "tie-break at its first node" in doc and "not the policy's own next picks" in doc
    assert "LeastConn`) each side maps the keys as its" not in doc


@pytest.mark.parametrize(
    "keys", ["user42", b"user42", bytearray(b"k"), memoryview(b"k"), None, 5, 1.5]
)
def test_diff_and_preview_refuse_keys_that_are_not_a_sample_of_keys(keys: object) -> None:
    p = MaglevHash(NODES, table_size=1009)
    # one str was sampled per character (diff(p, p, "user42").keys was 6); None or
    # 5 gave a bare TypeError
    with pytest.raises(InvalidArgument, match=r"invalid keys .*must be an iterable of keys") as e:
        diff(p, p, keys)  # type: ignore[arg-type]
    assert e.value.name == "keys" and e.value.value is keys
    with pytest.raises(InvalidArgument, match=r"invalid keys .*must be an iterable of keys") as e:
        p.preview(lambda q: q.remove(NODES[0]), keys)  # type: ignore[arg-type]
    assert e.value.name == "keys" and e.value.value is keys
    assert len(p) == 3


def test_diff_and_preview_refuse_one_array_or_mmap_key() -> None:
    p = MaglevHash(NODES, table_size=1009)

    def via_diff(keys: Any) -> BalanceDiff:
        return diff(p, p, keys)

    def via_preview(keys: Any) -> BalanceDiff:
        return p.preview(lambda q: None, keys)

    m = mmap.mmap(-1, 3)
    m.write(b"abc")
    try:
        for key in (array("B", b"abc"), m):
            assert p.pick(key) in p.live_nodes  # type: ignore[arg-type]  # one key
            # taken as an iterable of keys: the mmap was sampled byte by byte
            # (diff(...).keys was 3), the array failed as InvalidKey naming the int 97
            for call in (via_diff, via_preview):
                with pytest.raises(
                    InvalidArgument, match=r"invalid keys .*not one key \(wrap it in a list\)"
                ) as e:
                    call(key)
                assert e.value.name == "keys" and e.value.value is key
                assert call([key]).keys == 1
    finally:
        m.close()


class _Pair(ctypes.Structure):
    _fields_ = (("a", ctypes.c_int), ("b", ctypes.c_int))


def test_diff_and_preview_refuse_one_ctypes_buffer_key() -> None:
    # pick() takes any buffer as one key, so these pick as b"user42" (or "ab") does;
    # diff() and preview() iterated them instead, sampling a c_char array's bytes
    # as six one-byte keys (BalanceDiff(keys=6)) and a c_wchar array's characters.
    p = MaglevHash(NODES, table_size=1009)
    one_keys: list[Any] = [
        (ctypes.c_char * 6).from_buffer_copy(b"user42"),
        ctypes.create_string_buffer(b"user42"),
        (ctypes.c_ubyte * 3)(1, 2, 3),
        ctypes.create_unicode_buffer("ab"),
        ctypes.c_int(7),  # 0-d: one scalar, not iterable at all
        # formats the old buffer-format rule missed ('g', 'P'): sampled item by
        # item, they failed as InvalidKey naming a float or an int, not the array
        (ctypes.c_longdouble * 2)(1.0, 2.0),
        (ctypes.c_void_p * 2)(1, 2),
        (ctypes.c_double * 2)(1.0, 2.0),
        ctypes.c_char_p(b"user42"),  # a scalar holding a pointer
        ctypes.pointer(ctypes.c_int(7)),  # iterates without a bound
        _Pair(1, 2),  # a structure: one key, not iterable
    ]
    assert p.pick(one_keys[0]) is p.pick(b"user42")
    for key in one_keys:
        assert p.pick(key) in p.live_nodes
        calls: tuple[Callable[[Any], BalanceDiff], ...] = (
            lambda k: diff(p, p, k),
            lambda k: p.preview(lambda q: None, k),
        )
        for call in calls:
            with pytest.raises(
                InvalidArgument, match=r"invalid keys .*not one key \(wrap it in a list\)"
            ) as e:
                call(key)
            assert e.value.name == "keys" and e.value.value is key
            assert call([key]).keys == 1
    # a 2-D buffer iterates by its rows, each one key: sampled as before, and so
    # is an array of structures
    rows = ((ctypes.c_char * 2) * 3)()
    assert diff(p, p, rows).keys == 3
    assert diff(p, p, (_Pair * 4)()).keys == 4


class _NumericArray:
    """Stands in for a 1-D numpy array of uint64 (without numpy; the real thing is
    tested below).

    It exports a buffer of format 'Q' (from Python 3.12 on, where a class can:
    PEP 688's __buffer__) and iterates as 8-byte little-endian keys, as a numpy
    array iterates as numpy scalars, each a buffer pick() hashes as its bytes.
    """

    def __init__(self, *values: int) -> None:
        self._values = array("Q", values)

    def __buffer__(self, flags: int) -> memoryview:
        return memoryview(self._values)

    def __iter__(self) -> Iterator[bytes]:
        return (v.to_bytes(8, "little") for v in self._values)


def test_diff_and_preview_sample_an_array_of_numbers() -> None:
    # diff() and preview() refused any 1-D buffer of numbers as "one key" (from
    # 173a97b), so a numpy array of ids (uint64, float64, bool, ...) that they
    # sampled before, each numpy scalar a key, was refused. Only the named types and
    # ctypes objects are one key now; any other iterable is sampled.
    p = MaglevHash(NODES, table_size=1009)
    ids = _NumericArray(1001, 1002, 1003)
    if sys.version_info >= (3, 12):
        with memoryview(ids) as view:  # the buffer the old rule read
            assert (view.ndim, view.format) == (1, "Q")
    d = diff(p, MaglevHash(NODES[:2], table_size=1009), ids)
    assert d.keys == 3
    assert +Counter(d.before) == Counter(p.pick(k).address for k in ids)
    assert p.preview(lambda q: q.remove(NODES[0]), ids).keys == 3


def test_diff_and_preview_take_a_buffer_that_is_a_collection_of_keys() -> None:
    # A buffer is not one key as such: a ctypes array of char pointers exports a
    # buffer (of pointers) and iterates as its bytes keys, as a numpy "S" array does.
    p = MaglevHash(NODES, table_size=1009)
    keys = (ctypes.c_char_p * 3)(b"a", b"b", b"c")
    assert memoryview(keys).nbytes > 0 and list(keys) == [b"a", b"b", b"c"]
    assert diff(p, MaglevHash(NODES[:2], table_size=1009), keys).keys == 3
    assert p.preview(lambda q: q.remove(NODES[0]), keys).keys == 3
    # so does an array of Python objects (the keys themselves): the bytes pick()
    # would read from it as one key are object addresses, different in every run
    objs: Any = (ctypes.py_object * 3)()  # (typeshed types py_object items oddly)
    objs[:] = ["user1", "user2", b"user3"]
    assert diff(p, MaglevHash(NODES[:2], table_size=1009), objs).keys == 3
    assert p.preview(lambda q: q.remove(NODES[0]), objs).keys == 3


def test_diff_and_preview_sample_numpy_arrays_of_any_dtype() -> None:
    # numpy is a test dependency for this: on Python 3.10/3.11 no pure-Python class
    # can export a numeric buffer (PEP 688 is 3.12+), and a rule that read buffer
    # formats refused numpy arrays of numbers as "one key" (never released).
    import numpy as np

    p = MaglevHash(NODES, table_size=1009)
    q = MaglevHash(NODES[:2], table_size=1009)
    for ids in (
        np.array([1001, 1002, 1003], dtype=np.uint64),
        np.array([1.5, 2.5, 3.5]),
        np.array([True, False, True]),
        np.array([7, 8, 9], dtype=np.uint8),
        np.array([b"a", b"b", b"c"]),
    ):
        d = diff(p, q, ids)
        assert d.keys == 3, ids.dtype
        assert +Counter(d.before) == Counter(p.pick(k).address for k in ids)
        assert p.preview(lambda r: r.remove(NODES[0]), ids).keys == 3
    assert p.pick(np.uint64(1001)) is p.pick((1001).to_bytes(8, sys.byteorder))


def test_diff_and_preview_refuse_what_is_not_a_policy_or_a_change() -> None:
    p = MaglevHash(NODES, table_size=1009)
    for args, name, bad in (((p, 5), "new", 5), ((None, p), "old", None), ((p, "x"), "new", "x")):
        # diff(p, 5, keys) gave AttributeError: 'int' object has no attribute 'copy'
        with pytest.raises(InvalidArgument, match=r"must be a BalancePolicy") as e:
            diff(args[0], args[1], ["k"])  # type: ignore[arg-type]
        assert e.value.name == name and e.value.value is bad
    with pytest.raises(InvalidArgument, match=r"invalid change 5: must be a callable") as e:
        p.preview(5, ["k"])  # type: ignore[arg-type]
    assert e.value.name == "change"
    assert diff(p, p, iter(["a", "b"])).keys == 2  # any iterable, once


# --------------------------------------------------------------------------- duplicates


def test_duplicate_address_names_the_other_nodes_name_that_spells_it() -> None:
    # the name spells [::1]:80 another way, so the address alone would not tell
    # the caller which node is in the way
    named = Node("10.0.0.2:80", name="[0:0::1]:80")
    p = RoundRobin([named])
    with pytest.raises(DuplicateNode) as info:
        p.add("[::1]:80")
    msg = str(info.value)
    assert info.value.ref == "[::1]:80"
    assert "'[0:0::1]:80'" in msg and "10.0.0.2:80" in msg, msg
    with pytest.raises(DuplicateNode, match=r"'\[0:0::1\]:80' \(the node at 10\.0\.0\.2:80\)"):
        RoundRobin([named, "[::1]:80"])
    assert len(p) == 1


def test_duplicate_name_and_address_messages_say_what_they_clash_with() -> None:
    p = RoundRobin([Node("10.0.0.1:80", name="a"), "[::1]:80"])
    with pytest.raises(DuplicateNode, match=r"'a': the node at 10\.0\.0\.1:80 has this name"):
        p.add(Node("10.0.0.2:80", name="a"))
    with pytest.raises(DuplicateNode, match=r"spells the address of the node at \[::1\]:80"):
        p.add(Node("10.0.0.3:80", name="[0::1]:80"))
    with pytest.raises(DuplicateNode, match=r"'10\.0\.0\.1:80': a node with this address exists"):
        p.add("10.0.0.1:80")
    assert len(p) == 2


# --------------------------------------------------------------------------- smooth_wrr_cycle


def _forced(weight: object) -> Node:
    """A Node whose weight was forced past its check."""
    node = Node("10.0.0.9:80")
    object.__setattr__(node, "weight", weight)
    return node


@pytest.mark.parametrize(
    ("nodes", "param", "value"),
    [
        ("10.0.0.1:80", "nodes", "10.0.0.1:80"),
        (5, "nodes", 5),
        ([Node("10.0.0.1:80"), _forced(-3)], "weight", -3),
        ([_forced(2.5)], "weight", 2.5),
        ([_forced(True)], "weight", True),
        ([_forced(10**6)], "weight", 10**6),
    ],
)
def test_smooth_wrr_cycle_refuses_bad_nodes_and_weights_naming_them(
    nodes: object, param: str, value: object
) -> None:
    with pytest.raises(InvalidArgument) as info:
        smooth_wrr_cycle(nodes)  # type: ignore[arg-type]
    assert info.value.name == param
    assert info.value.value == value and type(info.value.value) is type(value)
    assert repr(value) in str(info.value)


def test_smooth_wrr_cycle_still_takes_any_iterable_of_nodes() -> None:
    a, b, z = Node("10.0.0.1:80", weight=2), Node("10.0.0.2:80"), Node("10.0.0.3:80", weight=0)
    assert smooth_wrr_cycle(iter([a, z, b])) == [a, b, a]
    assert smooth_wrr_cycle(()) == smooth_wrr_cycle([z]) == []


def test_smooth_wrr_cycle_and_ketama_points_take_addresses_as_policies_do() -> None:
    # Both refused anything but Node objects ("invalid nodes '10.0.0.2:80': must be
    # Node objects, not str"), where every policy takes addresses as nodes.
    a = Node("10.0.0.1:80", name="a", weight=2)
    addresses: list[AddressLike] = ["10.0.0.2:80", ("10.0.0.3", 80), Node("[::1]:80").address, 8080]
    given: list[NodeLike] = [a, *addresses]
    built = [a, *(Node(x) for x in addresses)]
    cycle = smooth_wrr_cycle(iter(given))
    assert cycle == smooth_wrr_cycle(built) and len(cycle) == 6
    assert all(isinstance(n, Node) for n in cycle)
    rr = RoundRobin(given)
    assert [rr.pick() for _ in cycle] == cycle
    points = ketama_points(x for x in given)
    assert points == ketama_points(built) and len(points) > 0
    assert {n for _, _, n in points} == set(built)


@pytest.mark.parametrize(
    "bad",
    [
        "10.0.0.1:80",
        b"10.0.0.1:80",
        None,
        5,
        {"10.0.0.1:80": 3},
        ("10.0.0.1", 80),
        ("10.0.0.1", 99999),
        ("::1", 80, 0, -1),
        {Node("10.0.0.1:80"): 3},  # was taken as its keys, the weights dropped
        [None],
        [1.5],
        [b"10.0.0.1:80"],
        [object()],
        [["10.0.0.1", 80]],
        ["10.0.0.1"],
        [Node("10.0.0.1:80"), ("10.0.0.2", "80")],
    ],
    ids=repr,
)
@pytest.mark.parametrize("func", [smooth_wrr_cycle, ketama_points], ids=lambda f: f.__name__)
def test_smooth_wrr_cycle_and_ketama_points_refuse_nodes_as_policies_do(
    func: Callable[[object], object], bad: object
) -> None:
    with pytest.raises((InvalidArgument, AddressError)) as want:
        RoundRobin(bad)  # type: ignore[arg-type]
    with pytest.raises(type(want.value)) as got:
        func(bad)
    assert str(got.value) == str(want.value)
    assert got.value.value is want.value.value  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "dup",
    [
        ["10.0.0.1:80", "10.0.0.1:80"],
        [Node("10.0.0.1:80"), Node("10.0.0.1:80")],
        [Node("10.0.0.1:80", weight=2), "10.0.0.2:80", ("10.0.0.1", 80)],
        ["[::1]:80", "[0:0::1]:80"],
        [Node("10.0.0.1:80", name="a"), Node("10.0.0.2:80", name="a")],
        ["10.0.0.1:80", Node("10.0.0.2:80", name="10.0.0.1:80")],
        [Node("10.0.0.2:80", name="[0:0::1]:80"), "[::1]:80"],
    ],
    ids=repr,
)
@pytest.mark.parametrize("func", [smooth_wrr_cycle, ketama_points], ids=lambda f: f.__name__)
def test_smooth_wrr_cycle_and_ketama_points_refuse_duplicates_as_policies_do(
    func: Callable[[Iterable[NodeLike]], list[Any]], dup: list[NodeLike]
) -> None:
    # They took them: ketama_points(["10.0.0.1:80"] * 2) gave 320 points and
    # smooth_wrr_cycle listed the node twice, twice its share, where every policy
    # constructor raises DuplicateNode.
    with pytest.raises(DuplicateNode) as want:
        RoundRobin(dup)
    with pytest.raises(DuplicateNode) as got:
        func(iter(dup))
    assert str(got.value) == str(want.value)
    assert got.value.ref == want.value.ref


def test_smooth_wrr_cycle_and_ketama_points_take_a_node_naming_its_own_address() -> None:
    # A name that spells its own node's address is no clash for a policy either.
    own = [Node("10.0.0.1:80", name="10.0.0.1:80"), Node("10.0.0.2:80", name="b")]
    assert smooth_wrr_cycle(own) == own == list(RoundRobin(own).nodes)
    assert len(ketama_points(own)) == 320


@pytest.mark.parametrize("state", [NodeState.DOWN, NodeState.DRAINING])
def test_smooth_wrr_cycle_and_ketama_points_leave_out_nodes_the_policies_leave_out(
    state: NodeState,
) -> None:
    # They kept down and draining nodes: smooth_wrr_cycle gave a b c where
    # RoundRobin(nodes).schedule is a c, and ketama_points placed b's 160 points and
    # counted it in every other server's share, where RingHash(nodes, ketama=True)
    # has a and c alone, 160 points each.
    nodes = [
        Node("10.0.0.1:80", name="a", weight=2),
        Node("10.0.0.2:80", name="b", state=state),
        Node("10.0.0.3:80", name="c"),
    ]
    assert smooth_wrr_cycle(nodes) == list(RoundRobin(nodes).schedule)
    assert {n.name for n in smooth_wrr_cycle(nodes)} == {"a", "c"}
    live = [n for n in nodes if n.name != "b"]
    for mode in (False, True):
        points = ketama_points(nodes, libmemcached=mode)
        assert points == ketama_points(live, libmemcached=mode)
        assert {n.name for _, _, n in points} == {"a", "c"}
    ring = RingHash(nodes, ketama=True)
    assert sorted(p for p, _, _ in ketama_points(nodes)) == list(ring._ring[0])
    # a down node is still one of the nodes checked for duplicates
    with pytest.raises(DuplicateNode):
        ketama_points([*nodes, Node("10.0.0.2:80", state=state)])
    with pytest.raises(DuplicateNode):
        smooth_wrr_cycle([*nodes, Node("10.0.0.2:80", state=state)])


def test_active_of_names_a_node_as_every_other_method_does() -> None:
    # active_of read node.address alone: a name or an address string raised a bare
    # AttributeError ('str' object has no attribute 'address'), and a Node the
    # policy does not have counted 0 leases.
    class Busiest(BalancePolicy):
        """Picks the live node holding the most leases, named by name or address."""

        name = "busiest"

        def _choose(self, key: bytes | None) -> Node:
            live = self.live_nodes
            if not live:
                raise self._unavailable()
            return max(live, key=lambda n: self.active_of(n.name or str(n.address)))

    a = Node("10.0.0.1:80", name="a")
    p = Busiest([a, "10.0.0.2:80"])
    held = [p.acquire(), p.acquire()]
    assert [lease.node for lease in held] == [a, a]
    for ref in (a, "a", "10.0.0.1:80", ("10.0.0.1", 80), a.address):
        assert p.active_of(ref) == 2
    assert p.active_of("10.0.0.2:80") == 0
    for unknown in (Node("10.9.9.9:1"), "b", "10.9.9.9:1", ("10.9.9.9", 1), "not an address"):
        with pytest.raises(UnknownNode) as info:
            p.active_of(unknown)
        assert info.value.ref is unknown and repr(unknown) in str(info.value)
    for lease in held:
        lease.release()


def test_node_copies_are_the_node_and_pickles_round_trip() -> None:
    node = Node("[::1]:80", name="a", weight=3, state=NodeState.DRAINING)
    assert copy.copy(node) is node
    assert copy.deepcopy({"n": node})["n"] is node
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(node, protocol))
        assert back == node
        assert (back.name, back.weight, back.state) == ("a", 3, NodeState.DRAINING)


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("\x00rendezvous:rot:0:0", "U+0000 at index 0"),
        ("a\nb", "U+000A at index 1"),
        ("x\x7f", "U+007F at index 1"),
        ("x\x85", "U+0085 at index 1"),
    ],
)
def test_node_name_with_a_control_character_is_refused_naming_it(name: str, where: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(where)) as info:
        Node("127.0.0.1:80", name=name)
    assert repr(name) in str(info.value)


def test_node_name_may_hold_other_unicode() -> None:
    assert Node("127.0.0.1:80", name="caf\u00e9\u00a0\u200d").name == "caf\u00e9\u00a0\u200d"


@pytest.mark.parametrize("attr", ["address", "name", "weight", "state"])
def test_deleting_a_node_attribute_is_refused_and_leaves_the_policy_working(attr: str) -> None:
    # del emptied the slot of the node the policy stores (get() returns it), and the
    # next rebuild (set_weight of another node, copy()) raised AttributeError on it
    p = RoundRobin(["10.0.0.1:80", "10.0.0.2:80"])
    node = p.get("10.0.0.1:80")
    with pytest.raises(AttributeError, match=rf"Node is immutable; cannot delete {attr!r}"):
        delattr(node, attr)
    assert node == Node("10.0.0.1:80")
    p.set_weight("10.0.0.2:80", 3)
    assert p.copy().nodes == p.nodes == (node, Node("10.0.0.2:80", weight=3))


@pytest.mark.parametrize("kind", ["round-robin", "maglev"])
def test_running_init_again_on_a_built_node_is_refused(kind: str) -> None:
    # n.__init__(...) rewrote the policy's stored node in place: the policy then
    # listed and returned a node at an address it never added
    p = make_policy(kind, ["10.0.0.1:80", "10.0.0.2:80"])
    node = p.get("10.0.0.1:80")
    with pytest.raises(
        AttributeError, match=r"Node is immutable; cannot run __init__ again .* 10\.0\.0\.1:80"
    ):
        node.__init__("10.9.9.9:1", weight=7)  # type: ignore[misc]
    assert node == Node("10.0.0.1:80") and p.get("10.0.0.1:80") is node
    assert p.nodes == (node, Node("10.0.0.2:80"))
    # a fresh Node, a replace() and an unpickled copy are built once, as before
    assert Node("10.9.9.9:1", weight=7).replace(weight=2).weight == 2
    assert pickle.loads(pickle.dumps(node)) == node
