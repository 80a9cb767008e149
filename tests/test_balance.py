"""Balance policies, driven in memory (no sockets: the policies are pure)."""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reuselb import (
    BalancePolicy,
    DuplicateNode,
    InvalidArgument,
    InvalidKey,
    KeyRequired,
    LeaseReleased,
    LeastConn,
    MaglevHash,
    Node,
    NodeState,
    NoNodeAvailable,
    PowerOfTwo,
    RendezvousHash,
    RingHash,
    RoundRobin,
    UnknownNode,
    UnknownPolicy,
    diff,
    make_policy,
)
from reuselb.balance import POLICIES, KeyHasher, smooth_wrr_cycle

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)

# Small tables keep hypothesis examples cheap; Maglev needs a prime > 100 x nodes.
FACTORIES: dict[str, Callable[..., BalancePolicy]] = {
    "round-robin": RoundRobin,
    "least-conn": LeastConn,
    "p2c": lambda nodes: PowerOfTwo(nodes, seed=7),
    "maglev": lambda nodes: MaglevHash(nodes, table_size=1009),
    "ring": lambda nodes: RingHash(nodes, vnodes=40),
    "ketama": lambda nodes: RingHash(nodes, ketama=True),
    "rendezvous": lambda nodes: RendezvousHash(nodes, table_size=4096),
    "rendezvous-exact": lambda nodes: RendezvousHash(nodes, table_size=None),
    "maglev-bounded": lambda nodes: MaglevHash(nodes, table_size=1009, balance_factor=1.25),
}
HASHED = {"maglev", "ring", "ketama", "rendezvous", "rendezvous-exact", "maglev-bounded"}


def addr(i: int) -> str:
    return f"10.0.{i // 200}.{i % 200 + 1}:8080"


def keys(n: int, salt: str = "") -> list[str]:
    return [f"192.168.{i // 256 % 256}.{i % 256}:{1024 + i}{salt}" for i in range(n)]


node_specs = st.lists(
    st.tuples(st.integers(0, 4), st.sampled_from(list(NodeState))), min_size=1, max_size=8
)


def build(kind: str, specs: list[tuple[int, NodeState]]) -> BalancePolicy:
    nodes = [Node(addr(i), weight=w, state=s) for i, (w, s) in enumerate(specs)]
    return FACTORIES[kind](nodes)


# --------------------------------------------------------------------------- nodes, errors


def test_node_parses_address_and_is_immutable() -> None:
    n = Node(("10.0.0.1", 80), name="a", weight=2)
    assert str(n.address) == "10.0.0.1:80"
    assert n.hash_id == "a"
    assert Node("[::1]:80").hash_id == "[::1]:80"
    with pytest.raises(AttributeError):
        n.weight = 3
    assert n.replace(weight=5).weight == 5
    assert n == Node("10.0.0.1:80", name="a", weight=2)


@pytest.mark.parametrize("weight", [-1, 1.5, True, "2"])
def test_bad_weight(weight: object) -> None:
    with pytest.raises(InvalidArgument, match="weight"):
        Node("1.2.3.4:5", weight=weight)  # type: ignore[arg-type]
    p = RoundRobin(["1.2.3.4:5"])
    with pytest.raises(InvalidArgument):
        p.set_weight("1.2.3.4:5", weight)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_refs_by_node_address_spelling_and_name(name: str) -> None:
    p = make_policy(name, [Node("10.0.0.1:80", name="web1"), "[::1]:81"])
    assert len(p) == 2
    assert p.get("web1") == p.get(("10.0.0.1", 80)) == p.get(Node("10.0.0.1:80"))
    assert p.get(("::1", 81)).address == p.get("[0:0::1]:81").address
    assert "web1" in p and "10.0.0.9:80" not in p and "nonsense" not in p
    with pytest.raises(UnknownNode, match="10.0.0.9"):
        p.remove("10.0.0.9:80")
    with pytest.raises(UnknownNode):
        p.mark_down("nope")
    with pytest.raises(DuplicateNode):
        p.add("10.0.0.1:80")
    with pytest.raises(DuplicateNode):
        p.add("10.0.0.2:80", name="web1")
    p.drain("web1")
    assert p.get("web1").state is NodeState.DRAINING
    k = "k"
    assert p.pick(k).address == p.get("[::1]:81").address
    assert p.remove("web1").name == "web1"
    assert len(p) == 1


def test_unknown_policy_and_options() -> None:
    with pytest.raises(UnknownPolicy, match="'nope'"):
        make_policy("nope", [])
    assert type(make_policy("hash", ["1.2.3.4:5"])) is MaglevHash
    with pytest.raises(TypeError):
        make_policy("round-robin", [], table_size=3)


@pytest.mark.parametrize("kind", sorted(HASHED))
def test_hash_policies_need_a_valid_key(kind: str) -> None:
    p = build(kind, [(1, NodeState.UP)])
    with pytest.raises(KeyRequired, match="needs a key"):
        p.pick()
    with pytest.raises(KeyRequired):
        p.acquire(None)
    with pytest.raises(InvalidKey, match="int"):
        p.pick(42)  # type: ignore[arg-type]
    assert p.pick("é") == p.pick("é".encode()) == p.pick(bytearray("é".encode()))


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_no_node_available_reasons(kind: str) -> None:
    k = "key" if kind in HASHED else None
    p = build(kind, [])
    with pytest.raises(NoNodeAvailable, match="no nodes"):
        p.pick(k)
    p.add(addr(0))
    p.add(addr(1))
    for n in p.nodes:
        p.mark_down(n)
    with pytest.raises(NoNodeAvailable, match="all nodes are down"):
        p.acquire(k)
    for n in p.nodes:
        p.drain(n)
    with pytest.raises(NoNodeAvailable, match="all nodes are draining"):
        p.pick(k)
    for n in p.nodes:
        p.mark_up(n)
        p.set_weight(n, 0)
    with pytest.raises(NoNodeAvailable, match="weight 0") as info:
        p.pick(k)
    assert isinstance(info.value, LookupError)
    p.set_weight(addr(1), 1)
    assert p.pick(k).address == Node(addr(1)).address


def test_maglev_table_size_rules() -> None:
    with pytest.raises(InvalidArgument, match="prime"):
        MaglevHash(table_size=1000)
    with pytest.raises(InvalidArgument, match="100 x 11"):
        MaglevHash([addr(i) for i in range(11)], table_size=1009)
    p = MaglevHash([addr(i) for i in range(10)], table_size=1009)
    with pytest.raises(InvalidArgument, match="100 x 11"):
        p.add(addr(10))
    assert len(p) == 10 and addr(10) not in p  # the refused add was undone
    p.mark_down(addr(0))
    p.add(addr(10))
    with pytest.raises(InvalidArgument):
        p.mark_up(addr(0))
    assert p.get(addr(0)).state is NodeState.DOWN
    assert p.pick("k").address != p.get(addr(0)).address
    with pytest.raises(InvalidArgument, match="balance_factor"):
        MaglevHash(balance_factor=0.5)
    with pytest.raises(InvalidArgument, match="seed"):
        KeyHasher(seed=-1)
    with pytest.raises(InvalidArgument, match="secret"):
        KeyHasher(secret=b"")
    with pytest.raises(InvalidArgument, match="ketama"):
        RingHash(ketama=True, seed=3)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@SETTINGS
@given(specs=node_specs, data=st.data())
def test_picks_are_live_and_leases_return_to_zero(
    kind: str, specs: list[tuple[int, NodeState]], data: st.DataObject
) -> None:
    p = build(kind, specs)
    live = {n.address for n in p.nodes if n.live}
    ks = data.draw(st.lists(st.text(max_size=12), min_size=1, max_size=30))
    leases = []
    for k in ks:
        key = k if kind in HASHED else None
        if not live:
            with pytest.raises(NoNodeAvailable):
                p.acquire(key)
            continue
        assert p.pick(key).address in live
        lease = p.acquire(key)
        assert lease.node.address in live
        leases.append(lease)
    assert p.active() == len(leases)
    for lease in leases:
        lease.release()
    assert p.active() == 0
    assert all(p.active(n) == 0 for n in p.nodes)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@SETTINGS
@given(specs=node_specs, victim=st.integers(0, 7), state=st.sampled_from(["down", "drain", "w0"]))
def test_down_draining_and_zero_weight_get_no_new_picks(
    kind: str, specs: list[tuple[int, NodeState]], victim: int, state: str
) -> None:
    specs = [(max(w, 1), NodeState.UP) for w, _ in specs] + [(1, NodeState.UP)]
    p = build(kind, specs)
    target = p.nodes[victim % len(p)]
    held = p.acquire("x" if kind in HASHED else None)
    if state == "down":
        p.mark_down(target)
    elif state == "drain":
        p.drain(target)
    else:
        p.set_weight(target, 0)
    for k in keys(60):
        assert p.pick(k).address != target.address
    held.release()  # a lease taken before the change still releases
    assert p.active() == 0


@SETTINGS
@given(weights=st.lists(st.integers(0, 6), min_size=1, max_size=7))
def test_round_robin_exact_weights_over_a_cycle(weights: list[int]) -> None:
    p = RoundRobin([Node(addr(i), weight=w) for i, w in enumerate(weights)])
    live = [w for w in weights if w]
    if not live:
        with pytest.raises(NoNodeAvailable):
            p.pick()
        return
    g = math.gcd(*live)
    cycle = sum(live) // g
    counts = collections.Counter(p.pick().address for _ in range(3 * cycle))
    for i, w in enumerate(weights):
        assert counts[Node(addr(i)).address] == 3 * w // g


def test_round_robin_is_nginx_smooth_order() -> None:
    a, b, c = Node("10.0.0.1:80", weight=5), Node("10.0.0.2:80"), Node("10.0.0.3:80")
    # nginx's documented example for weights 5, 1, 1: a a b a c a a.
    assert smooth_wrr_cycle([a, b, c]) == [a, a, b, a, c, a, a]
    p = RoundRobin([a, b, c])
    assert [p.pick() for _ in range(14)] == [a, a, b, a, c, a, a] * 2


@SETTINGS
@given(weights=st.lists(st.integers(1, 4), min_size=1, max_size=6))
def test_least_conn_follows_weights_and_rotates_ties(weights: list[int]) -> None:
    p = LeastConn([Node(addr(i), weight=w) for i, w in enumerate(weights)])
    total = sum(weights)
    leases = [p.acquire() for _ in range(total * 3)]
    for i, w in enumerate(weights):
        assert p.active(addr(i)) == 3 * w
    for lease in leases:
        lease.release()
    # idle pool: ties broken round robin, not always the first node
    firsts = [p.pick().address for _ in range(len(weights))]
    assert len(set(firsts)) == len(weights)


def test_power_of_two_is_seedable_and_balances() -> None:
    nodes = [addr(i) for i in range(10)]
    a, b = PowerOfTwo(nodes, seed=3), PowerOfTwo(nodes, seed=3)
    assert [a.pick() for _ in range(50)] == [b.pick() for _ in range(50)]
    leases = [a.acquire() for _ in range(1000)]
    loads = [a.active(n) for n in nodes]
    assert max(loads) - min(loads) <= 3, loads  # two choices keep loads within a few
    for lease in leases:
        lease.release()
    assert a.active() == 0


@pytest.mark.parametrize("kind", ["ring", "ketama", "rendezvous", "rendezvous-exact"])
@SETTINGS
@given(n=st.integers(2, 8), victim=st.integers(0, 7), weights=st.data())
def test_removing_a_node_moves_only_its_keys(
    kind: str, n: int, victim: int, weights: st.DataObject
) -> None:
    ws = weights.draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    if kind == "ketama":
        # ketama sizes each server's share from the total weight, so with unequal
        # weights every server's point count changes; with equal ones it is 160.
        ws = [1] * n
    p = build(kind, [(w, NodeState.UP) for w in ws])
    gone = p.nodes[victim % n]
    before = {k: p.pick(k).address for k in keys(400)}
    p.remove(gone)
    for k, a in before.items():
        if a != gone.address:
            assert p.pick(k).address == a
        else:
            assert p.pick(k).address != a


def test_maglev_removal_moves_close_to_one_over_n() -> None:
    n = 20
    p = MaglevHash([addr(i) for i in range(n)], table_size=4099)
    d = p.preview(lambda q: q.remove(addr(n // 2)), keys(20000))
    ratio = d.share_moved * n
    print(f"maglev N={n} M=4099: {d.share_moved:.4f} of keys moved = {ratio:.2f}/N")
    assert 0.9 <= ratio <= 1.7
    assert len(p) == n  # preview applied the change to a copy only


def test_weighted_hash_policies_follow_weights() -> None:
    ws = [1, 2, 3, 4]
    total = sum(ws)
    for p in (
        MaglevHash([Node(addr(i), weight=w) for i, w in enumerate(ws)], table_size=4099),
        RendezvousHash([Node(addr(i), weight=w) for i, w in enumerate(ws)], table_size=8192),
        RendezvousHash([Node(addr(i), weight=w) for i, w in enumerate(ws)], table_size=None),
        RingHash([Node(addr(i), weight=w) for i, w in enumerate(ws)], vnodes=100),
    ):
        counts = collections.Counter(p.pick(k).address for k in keys(20000))
        for i, w in enumerate(ws):
            share = counts[Node(addr(i)).address] / 20000
            assert abs(share - w / total) < 0.25 * w / total, (type(p).__name__, i, share)


@pytest.mark.parametrize("kind", ["maglev", "ring", "rendezvous", "rendezvous-exact"])
def test_bounded_load_caps_every_node(kind: str) -> None:
    nodes = [addr(i) for i in range(5)]

    def make(balance_factor: float | None = None) -> BalancePolicy:
        f = balance_factor
        if kind == "maglev":
            return MaglevHash(nodes, table_size=1009, balance_factor=f)
        if kind == "ring":
            return RingHash(nodes, balance_factor=f)
        size = 4096 if kind == "rendezvous" else None
        return RendezvousHash(nodes, table_size=size, balance_factor=f)

    p = make(balance_factor=1.25)
    leases = [p.acquire("same key every time") for _ in range(100)]
    loads = [p.active(n) for n in nodes]
    assert sum(loads) == 100
    assert max(loads) <= math.ceil(1.25 * 100 / 5), loads
    first = make().pick("same key every time")
    assert p.active(first) == max(loads)  # the key's own node filled up first
    for lease in leases:
        lease.release()
    assert p.active() == 0


# --------------------------------------------------------------------------- leases


def test_lease_release_once_and_removed_node() -> None:
    p = LeastConn([addr(0), addr(1)])
    with p.acquire() as lease:
        assert p.active(lease.node) == 1
    assert lease.released and p.active() == 0
    with pytest.raises(LeaseReleased, match="already released"):
        lease.release()
    held = p.acquire()
    p.remove(held.node)
    assert p.active() == 0
    held.release()  # releases cleanly, does not touch a re-added node's count
    p.add(held.node.address)
    assert p.active() == 0 and p.active(held.node.address) == 0
    with pytest.raises(LeaseReleased):
        held.release()


@pytest.mark.parametrize("kind", ["least-conn", "p2c", "maglev-bounded", "round-robin"])
def test_eight_threads_exact_counts(kind: str) -> None:
    p = build(kind, [(w, NodeState.UP) for w in (1, 2, 3, 1)])
    per_thread = 1500
    start = threading.Barrier(8)
    acquired: list[collections.Counter[str]] = [collections.Counter() for _ in range(8)]
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            start.wait(timeout=30)
            held = []
            for i in range(per_thread):
                lease = p.acquire(f"k{t}-{i}")
                acquired[t][str(lease.node.address)] += 1
                held.append(lease)
                if len(held) == 4:
                    for h in held:
                        h.release()
                    held.clear()
            for h in held:
                h.release()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads)
    assert errors == []
    assert sum(sum(c.values()) for c in acquired) == 8 * per_thread
    assert p.active() == 0
    assert all(p.active(n) == 0 for n in p.nodes)


# --------------------------------------------------------------------------- hashing


def _spec_ketama(servers: list[str], key: str) -> str:
    """libketama's continuum and lookup, transcribed independently from its spec."""
    import struct

    continuum = []
    for s in servers:
        for i in range(40):  # equal weights: floor(1/n * 40 * n) = 40 digests
            digest = hashlib.md5(f"{s}-{i}".encode()).digest()
            continuum += [(v, s) for v in struct.unpack("<4I", digest)]
    continuum.sort()
    h = struct.unpack("<I", hashlib.md5(key.encode()).digest()[:4])[0]
    lo, hi = 0, len(continuum)
    while lo < hi:  # first point >= h, wrapping to the first
        mid = (lo + hi) // 2
        if continuum[mid][0] < h:
            lo = mid + 1
        else:
            hi = mid
    return continuum[lo % len(continuum)][1]


def test_ketama_matches_the_spec() -> None:
    servers = ["10.0.1.1:11211", "10.0.1.2:11211", "10.0.1.3:11211", "10.0.1.4:11211"]
    p = RingHash(servers, ketama=True)
    assert len(p._ring[0]) == 160 * 4
    for k in keys(500):
        assert str(p.pick(k).address) == _spec_ketama(servers, k)
    # a named node hashes its name (libmemcached's "host" for the default port)
    named = RingHash([Node(s, name=s.split(":")[0]) for s in servers], ketama=True)
    assert [str(named.pick(k)) for k in keys(200)] == [
        _spec_ketama([s.split(":")[0] for s in servers], k) for k in keys(200)
    ]


def test_seed_and_secret_reshuffle_deterministically() -> None:
    nodes = [addr(i) for i in range(8)]
    ks = keys(300)

    def mapping(**kw: object) -> list[str]:
        p = RendezvousHash(nodes, table_size=4096, **kw)  # type: ignore[arg-type]
        return [str(p.pick(k)) for k in ks]

    assert mapping() == mapping()
    assert mapping(seed=1) == mapping(seed=1) != mapping()
    assert mapping(secret=b"s3cret") == mapping(secret=b"s3cret") != mapping(secret=b"other")
    assert KeyHasher().hash32(b"abc") == 0x352441C2  # CRC-32 of "abc"


CHILD = """
import json, sys
from reuselb import MaglevHash, RendezvousHash, RingHash
nodes = [f"10.0.0.{i}:80" for i in range(1, 13)]
keys = [f"192.168.{i % 256}.{i // 256}:{1024 + i}" for i in range(300)]
out = {}
for name, p in (
    ("maglev", MaglevHash(nodes, table_size=2003)),
    ("maglev-secret", MaglevHash(nodes, table_size=2003, secret=b"k", seed=5)),
    ("ring", RingHash(nodes)),
    ("ketama", RingHash(nodes, ketama=True)),
    ("rendezvous", RendezvousHash(nodes, table_size=4096)),
    ("rendezvous-exact", RendezvousHash(list(reversed(nodes)), table_size=None)),
):
    out[name] = [str(p.pick(k)) for k in keys]
json.dump(out, sys.stdout)
"""


def test_same_mapping_in_three_processes_with_different_hash_seeds() -> None:
    results = []
    for hashseed in ("0", "1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        proc = subprocess.run(
            [sys.executable, "-c", CHILD],
            env=env,
            capture_output=True,
            check=False,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(proc.stdout))
    assert results[0] == results[1] == results[2]
    assert set(results[0]) == {
        "maglev",
        "maglev-secret",
        "ring",
        "ketama",
        "rendezvous",
        "rendezvous-exact",
    }
    assert len(set(results[0]["maglev"])) > 6  # a real spread, not one node


# --------------------------------------------------------------------------- diff


def test_diff_reports_moves_and_loads() -> None:
    old = RendezvousHash([addr(i) for i in range(10)], table_size=4096)
    new = old.copy()
    new.remove(addr(3))
    ks = keys(5000)
    d = diff(old, new, ks)
    assert d.keys == 5000
    assert d.moved == d.before[Node(addr(3)).address]  # HRW: only its keys move
    assert sum(d.after.values()) == 5000 and len(d.after) == 9
    assert d.min_load <= 5000 / 9 <= d.max_load
    assert d.max_over_mean == pytest.approx(d.max_load * 9 / 5000)
    rr = RoundRobin([addr(0), addr(1)])
    first = rr.pick()
    diff(rr, rr, range(0))  # type: ignore[arg-type]
    assert rr.pick() != first  # diff did not advance the live counter


@pytest.mark.parametrize("kind", sorted(HASHED - {"maglev-bounded"}))
@pytest.mark.parametrize("secret", [None, b"k"])
def test_fast_and_general_paths_agree(kind: str, secret: bytes | None) -> None:
    """str keys take a lock-free fast path; bytes keys and acquire() the general one."""
    nodes = [Node(addr(i), weight=1 + i % 2) for i in range(7)]
    if kind == "ketama":
        if secret:
            return
        p: BalancePolicy = RingHash(nodes, ketama=True)
    else:
        size = {"maglev": 1009, "rendezvous": 4096}.get(kind)
        opts: dict[str, object] = {"seed": 9}
        if secret:
            opts["secret"] = secret
        if kind == "maglev":
            p = MaglevHash(nodes, table_size=1009, **opts)  # type: ignore[arg-type]
        elif kind == "ring":
            p = RingHash(nodes, **opts)  # type: ignore[arg-type]
        else:
            p = RendezvousHash(nodes, table_size=size, **opts)  # type: ignore[arg-type]
    spread = set()
    for k in keys(300, salt="é"):
        node = p.pick(k)
        spread.add(node.address)
        assert p.pick(k.encode()) == node
        with p.acquire(k) as lease:
            assert lease.node == node
    assert len(spread) >= 5


@SETTINGS
@given(weights=st.lists(st.integers(1, 4), min_size=2, max_size=6), seed=st.integers(0, 2**16))
def test_power_of_two_follows_weights(weights: list[int], seed: int) -> None:
    p = PowerOfTwo([Node(addr(i), weight=w) for i, w in enumerate(weights)], seed=seed)
    total = sum(weights)
    leases = [p.acquire() for _ in range(total * 20)]
    for i, w in enumerate(weights):
        # each node ends near 20 x weight: the less loaded (per weight) of two wins
        assert abs(p.active(addr(i)) - 20 * w) <= 20, (weights, i, p.active(addr(i)))
    for lease in leases:
        lease.release()
    assert p.active() == 0


# --------------------------------------------------------------------------- rendezvous table


def test_rendezvous_table_size_must_be_a_power_of_two() -> None:
    for bad in (1000, 5000, 65537, True, 2.0):
        with pytest.raises(InvalidArgument):
            RendezvousHash([addr(0)], table_size=bad)  # type: ignore[arg-type]
    assert RendezvousHash([addr(0)]).table_size == 1 << 19


def _rendezvous_rule(p: RendezvousHash, group: int, bucket: int) -> int:
    """Owner index of a bucket by the preference rule itself, one node at a time."""
    pools = p._pools
    assert pools is not None
    nodes = p._table[1]
    m, groups = pools.m, pools.groups
    offsets = [p._offsets[n.hash_id] for n in nodes]
    for lev in range(pools.top + 1):
        e = pools.top - lev
        best: tuple[int, int] | None = None
        for j, n in enumerate(nodes):
            d = (bucket - offsets[j][lev * groups + group]) % m
            if pools.node_bits(group, e, n.weight) >> d & 1 and (best is None or (d, j) < best):
                best = (d, j)
        if best is not None:
            return best[1]
    raise AssertionError("no level filled the bucket")


@pytest.mark.parametrize(
    ("size", "weights"),
    [
        (4096, [1, 2, 3, 1, 5, 1, 1]),  # coarse levels, dense passes only
        (1 << 18, [1, 1]),  # few arrivals: point-by-point levels first
        (1 << 18, [1] * 40),  # groups, dense passes, then the bucket-by-bucket tail
        (1 << 14, [7, 1, 300]),
    ],
)
def test_rendezvous_table_follows_its_preference_rule(size: int, weights: list[int]) -> None:
    """The bulk construction (bitmaps, sparse levels, tail) equals the per-bucket rule."""
    from reuselb.balance._rendezvous import _table_pos

    p = RendezvousHash([Node(addr(i), weight=w) for i, w in enumerate(weights)], table_size=size)
    owners = p._table[0]
    pools = p._pools
    assert pools is not None
    rng = __import__("random").Random(size + len(weights))
    for _ in range(120):
        g, b = rng.randrange(pools.groups), rng.randrange(pools.m)
        assert owners[g * pools.m + _table_pos(pools.m, b)] == _rendezvous_rule(p, g, b)


def test_rendezvous_default_table_moves_only_the_removed_nodes_keys() -> None:
    nodes = [Node(addr(i), weight=1 + i % 3) for i in range(24)]
    p = RendezvousHash(nodes)
    ks = keys(6000)
    before = {k: p.pick(k).address for k in ks}
    owners = p._table[0]
    for victim in (nodes[0], nodes[11], nodes[23]):
        q = RendezvousHash([n for n in nodes if n != victim])
        moved = 0
        for k, a in before.items():
            b = q.pick(k).address
            if a != victim.address:
                assert b == a
            else:
                assert b != a
                moved += 1
        assert moved > 0
    # every bucket, not only the sampled keys: the owner tables agree off the victim
    q = RendezvousHash([n for n in nodes if n != nodes[11]])
    old_nodes, new_nodes = p._table[1], q._table[1]
    gone = old_nodes.index(nodes[11])
    changed = [
        i
        for i, (a, b) in enumerate(zip(owners, q._table[0], strict=True))
        if old_nodes[a] != new_nodes[b]
    ]
    assert all(owners[i] == gone for i in changed)
    assert len(changed) == sum(1 for a in owners if a == gone)


def test_rendezvous_default_table_follows_weights_closely() -> None:
    ws = [1, 2, 3, 4] * 5
    p = RendezvousHash([Node(addr(i), weight=w) for i, w in enumerate(ws)])
    owners, nodes = p._table
    counts = collections.Counter(owners)
    total = sum(ws)
    by_weight: dict[int, list[float]] = collections.defaultdict(list)
    for j, n in enumerate(nodes):
        # buckets per weight unit, relative to the ideal (~10,500 buckets each)
        ratio = counts[j] / len(owners) * total / n.weight
        assert abs(ratio - 1) < 0.05, (n, ratio)
        by_weight[n.weight].append(ratio)
    for w, ratios in by_weight.items():
        # no systematic tilt toward light or heavy nodes
        assert abs(sum(ratios) / len(ratios) - 1) < 0.015, (w, ratios)


def test_rendezvous_table_past_256_nodes() -> None:
    nodes = [addr(i) for i in range(300)]
    p = RendezvousHash(nodes, table_size=1 << 16)
    owners = p._table[0]
    assert len(set(owners)) == 300
    ks = keys(2000)
    assert {str(p.pick(k)) for k in ks} <= set(map(str, p.nodes))
    q = RendezvousHash(nodes[:150] + nodes[151:], table_size=1 << 16)
    for k in ks:
        a, b = p.pick(k), q.pick(k)
        assert a == b or str(a.address) == str(Node(nodes[150]).address)
