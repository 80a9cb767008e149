"""Hash policies: tabulated RendezvousHash weight changes."""

from __future__ import annotations

import hashlib
import itertools
import math

import pytest

from reuselb.balance import Node, RendezvousHash, _rendezvous


def addr(i: int) -> str:
    return f"10.0.{i // 200}.{i % 200 + 1}:80"


def keys(n: int) -> list[str]:
    return [f"session-{i}" for i in range(n)]


# --------------------------------------------------------------------------- rendezvous weights

# 19 nodes of mixed weights next to the node whose weight changes (10.0.0.1:80).
OTHERS = [1, 2, 3, 5, 8, 1, 4, 10, 2, 7, 1, 3, 6, 9, 2, 1, 5, 4, 12]
CHANGED = "10.0.0.1:80"


def _weighted(w: int, size: int | None = _rendezvous.DEFAULT_BUCKETS) -> RendezvousHash:
    nodes = [Node(addr(i + 1), weight=x) for i, x in enumerate(OTHERS)]
    return RendezvousHash([*nodes, Node(CHANGED, weight=w)], table_size=size)


def _moves(w0: int, w1: int, size: int) -> tuple[int, int, int, float]:
    """Buckets moved to / away from the changed node / between others, and HRW's share."""
    p = _weighted(w0, size)
    before, nodes = p._table
    p.set_weight(CHANGED, w1)
    after, nodes_after = p._table
    assert [n.hash_id for n in nodes_after] == [n.hash_id for n in nodes]
    y = next(j for j, n in enumerate(nodes) if str(n.address) == CHANGED)
    to = away = other = 0
    for a, b in zip(before, after, strict=True):
        if a != b:
            if b == y:
                to += 1
            elif a == y:
                away += 1
            else:
                other += 1
    rest = sum(OTHERS)
    # exact weighted HRW: the node's share goes from w0 / W0 to w1 / W1, and only
    # keys of the changed node's share move (a higher weight only raises its scores)
    share = abs(w1 / (rest + w1) - w0 / (rest + w0))
    return to, away, other, share


WEIGHT_STEPS = [(1, 2), (3, 4), (7, 8), (99, 100), (100, 101), (999, 1000), (4, 3), (16, 15)]


@pytest.mark.parametrize(("w0", "w1"), WEIGHT_STEPS)
def test_rendezvous_weight_change_moves_keys_to_or_from_that_node_only(w0: int, w1: int) -> None:
    """Raising a weight moves keys only to the node, lowering it only away, and about
    as many as exact HRW moves (the share change). The arrivals of a weight-w node used
    to follow the binary digits of w, so 7 -> 8 replaced all of them: 13.6x HRW's
    moves, half of them away from the node whose weight went up. (100 -> 101 only sets
    bit 0, which the old construction handled: it is here as a control.)"""
    size = _rendezvous.DEFAULT_BUCKETS
    to, away, other, share = _moves(w0, w1, size)
    expected = share * size
    print(f"{w0} -> {w1}: to {to}, away {away}, other {other}, HRW {expected:.0f}")
    assert other == 0
    if w1 > w0:
        assert away == 0 and to > 0
    else:
        assert to == 0 and away > 0
    moved = to + away
    # the new table's noise on a ~1/W share is a few percent; 1.3x plus 4 sd of
    # sampling slack (the old construction moved 2.9x to 27x)
    assert moved <= 1.3 * expected + 4 * math.sqrt(expected), (moved, expected)
    assert moved >= 0.7 * expected - 4 * math.sqrt(expected), (moved, expected)


@pytest.mark.parametrize(("w0", "w1"), [(1, 2), (3, 4), (999, 1000), (4, 3)])
def test_rendezvous_weight_change_moves_picked_keys_like_hrw(w0: int, w1: int) -> None:
    """The same through pick(), 50,000 keys, next to exact HRW (table_size=None)."""
    ks = keys(50_000)
    counts = []
    for size in (_rendezvous.DEFAULT_BUCKETS, None):
        p = _weighted(w0, size)
        before = [str(p.pick(k)) for k in ks]
        p.set_weight(CHANGED, w1)
        after = [str(p.pick(k)) for k in ks]
        moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
        if w1 > w0:
            assert all(b == CHANGED for _, b in moved), size
        else:
            assert all(a == CHANGED for a, _ in moved), size
        counts.append(len(moved))
    table, exact = counts
    rest = sum(OTHERS)
    expected = abs(w1 / (rest + w1) - w0 / (rest + w0)) * len(ks)
    print(f"{w0} -> {w1}: tabulated {table}, exact {exact}, expected {expected:.0f}")
    for moved in counts:
        assert moved <= 1.5 * expected + 4 * math.sqrt(expected) + 4, (counts, expected)


@pytest.mark.parametrize(
    "paths",
    [
        {},  # as built: point-by-point levels, dense passes, then the tail
        {"_SPARSE_MAX": 0, "_TAIL_MAX": 0},  # dense passes only
        {"_SPARSE_MAX": 1 << 40, "_TAIL_MAX": 0},  # every sparse-able level point by point
        {"_SPARSE_MAX": 0, "_TAIL_MAX": 1 << 40},  # one dense level, then bucket by bucket
    ],
    ids=["default", "dense", "sparse", "tail"],
)
def test_rendezvous_weight_steps_are_monotone_in_every_resolution_path(
    monkeypatch: pytest.MonkeyPatch, paths: dict[str, int]
) -> None:
    """Every way a level is resolved sees nested arrivals: w -> w + 1 only adds buckets
    to the node, whichever path (bitmaps, points, bucket by bucket) resolves them, and
    the paths build the same table."""
    size = 1 << 14
    tables = {}
    for name, value in paths.items():
        monkeypatch.setattr(_rendezvous, name, value)
    for w in (1, 2, 3, 4, 7, 8, 12, 15, 16, 63, 64, 999, 1000):
        tables[w] = _weighted(w, size)._table
    monkeypatch.undo()
    for w, table in tables.items():
        assert table == _weighted(w, size)._table, w  # the paths agree
    ws = sorted(tables)
    for lo, hi in itertools.pairwise(ws):
        (a, nodes), (b, _) = tables[lo], tables[hi]
        y = next(j for j, n in enumerate(nodes) if str(n.address) == CHANGED)
        changed = [(x, z) for x, z in zip(a, b, strict=True) if x != z]
        assert changed and all(z == y for _, z in changed), (lo, hi)


def _rotate(a: int, c: int, m: int) -> int:
    c %= m
    return ((a << c) | (a >> (m - c))) & ((1 << m) - 1) if c else a


def _bitmap(positions: list[int], m: int) -> int:
    buf = bytearray(m // 8)
    for x in positions:
        buf[x >> 3] |= 1 << (x & 7)
    return int.from_bytes(buf, "little")


@pytest.mark.parametrize("size", [4096, 1 << 19])
def test_rendezvous_weight_units_are_nested(size: int) -> None:
    """The arrivals of a weight-w node are units 0 .. w-1, unit i at rotation
    ``rot[g][48] + sum(rot[g][j + 1] for each set bit j of i)`` of the level's pool:
    weight w + 1 is weight w plus one unit, at every level, as bits and as positions."""
    p = RendezvousHash([addr(0)], table_size=size)
    pools = p._pools
    assert pools is not None
    m = pools.m
    if size == 4096:
        steps = [*range(1, 130), 255, 511, 999]
        refs = {1, 2, 3, 5, 8, 100, 1000}
    else:
        steps = [1, 2, 3, 4, 7, 99, 100, 999]
        refs = {1, 2, 3, 5, 8}
    for g in range(min(pools.groups, 2)):
        rot = pools.rot[g]
        for e, _ in pools.levels:
            unit = pools.bits(g, e)
            for w in steps:
                lo, hi = pools.node_bits(g, e, w), pools.node_bits(g, e, w + 1)
                nested = lo & ~hi == 0  # w + 1 adds arrivals only
                assert nested, (g, e, w)
            for w in sorted(refs):
                ref = 0
                for i in range(w):
                    c = rot[48] + sum(rot[j + 1] for j in range(i.bit_length()) if i >> j & 1)
                    ref |= _rotate(unit, c, m)
                bits = pools.node_bits(g, e, w)
                same = bits == ref
                assert same, (g, e, w)
                if e >= _rendezvous._E_SPARSE or e > pools.top:
                    same = _bitmap(pools.node_positions(g, e, w), m) == bits
                    assert same, (g, e, w)


def _table_digest(p: RendezvousHash) -> str:
    owners, nodes = p._table
    h = hashlib.sha256("\n".join(n.hash_id for n in nodes).encode())
    h.update(b"".join(int(j).to_bytes(2, "little") for j in owners))
    return h.hexdigest()


# Computed with the code before the nested weight units (commit 65dddc7:
# ``git archive 65dddc7 src | tar -x -C /tmp/old`` and this digest under
# ``PYTHONPATH=/tmp/old/src``). Weight-1 nodes have one unit at rotation rot[g][48],
# as before, so tables of weight-1 nodes must not change.
WEIGHT_ONE_DIGESTS = [
    (30, 1 << 19, 0, "36bf69b3d9586675b70a8cea5283a41857f0e0d98019c33199a8ab04d48ce411"),
    (300, 1 << 16, 0, "97611d1d41d635b5259e7befc6d170b31358a5fdb45da4aba2b242ad383783c6"),
    (2, 1 << 18, 7, "34430e6ed005b6550a407ff8fbd27d0abd39c2619cd2bcdf651e1fcf5497aca8"),
    (7, 4096, 0, "e9d4c0afe20b806946ae20021cb15d89b45ccaf23d8f7b1caa8cb821f089db7e"),
]


@pytest.mark.parametrize(("n", "size", "seed", "digest"), WEIGHT_ONE_DIGESTS)
def test_rendezvous_weight_one_tables_did_not_change(
    n: int, size: int, seed: int, digest: str
) -> None:
    p = RendezvousHash([addr(i) for i in range(n)], table_size=size, seed=seed)
    assert _table_digest(p) == digest
