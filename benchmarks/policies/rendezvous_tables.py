"""Tabulated RendezvousHash at several table sizes: balance against build time.

Run (from the repository root)::

    python benchmarks/policies/rendezvous_tables.py                 # 2**19..2**21
    python benchmarks/policies/rendezvous_tables.py --bits 19 20 21 22 --key-sets 100

For each table size: the build time (best of ``--builds``), how far the nodes'
bucket shares are from 1/N (standard deviation and largest, as a fraction of the
mean), max/mean keys per node on bench_policies.py's 200,000 keys, and the mean,
standard error and worst max/mean over ``--key-sets`` further key sets (seeds 1..),
beside MaglevHash and a uniformly random node per key on the same sets (the
sampling noise of perfect balance). The nodes and keys are bench_policies.py's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_policies import loads, make_keys

from reuselb import MaglevHash, RendezvousHash


def spread(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return f"{mean:.4f} | {se:.4f} | {max(values):.4f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--bits", type=int, nargs="+", default=[19, 20, 21], help="log2 table sizes")
    ap.add_argument("--builds", type=int, default=3, help="builds timed per size (best kept)")
    ap.add_argument("--key-sets", type=int, default=30, help="further key sets (seeds 1..)")
    args = ap.parse_args(argv)
    # RendezvousHash takes powers of two from 2**10 to MAX_TABLE_SIZE (2**24).
    bad = [b for b in args.bits if not 10 <= b <= 24]
    if bad:
        ap.error(f"--bits must be 10..24, not {bad}")
    # a standard error needs at least 2 key sets
    for name, low in {"nodes": 1, "keys": 1, "builds": 1, "key_sets": 2}.items():
        if getattr(args, name) < low:
            ap.error(
                f"--{name.replace('_', '-')} must be at least {low}, not {getattr(args, name)}"
            )
    nodes = [f"10.1.{i // 250}.{i % 250 + 1}:11211" for i in range(args.nodes)]
    keys = make_keys(args.keys)
    sets = [make_keys(args.keys, seed) for seed in range(1, args.key_sets + 1)]
    print(f"python {sys.version.split()[0]}, {args.nodes} nodes, {args.keys} keys", flush=True)
    print(
        "\n| table | build ms | bucket share sd | largest share | max/mean, bench keys "
        f"| mean of {args.key_sets} sets | s.e. | worst |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for bits in args.bits:
        size = 1 << bits
        best = float("inf")
        for _ in range(args.builds):
            t0 = time.perf_counter()
            policy = RendezvousHash(nodes, table_size=size)
            best = min(best, (time.perf_counter() - t0) * 1000)
        # Bucket shares come from the table itself (an internal, read only here):
        # counting picks of sample keys would add the keys' own noise.
        table, members = policy._table
        owners = Counter(str(members[i]) for i in table)
        shares = [owners[n] / (size / len(nodes)) for n in nodes]
        sd = statistics.pstdev(shares)
        bench = loads([str(policy.pick(k)) for k in keys], nodes)[0]
        per_set = [loads([str(policy.pick(k)) for k in ks], nodes)[0] for ks in sets]
        print(
            f"| 2^{bits} | {best:.0f} | {sd:.2%} | {max(shares):.4f} | {bench:.4f} "
            f"| {spread(per_set)} |",
            flush=True,
        )
    maglev = MaglevHash(nodes)
    mag = loads([str(maglev.pick(k)) for k in keys], nodes)[0]
    mag_sets = [loads([str(maglev.pick(k)) for k in ks], nodes)[0] for ks in sets]
    print(f"| MaglevHash (65537) | - | - | - | {mag:.4f} | {spread(mag_sets)} |")
    ref = []
    for seed, ks in enumerate(sets, 1):
        rng = random.Random(seed)
        ref.append(loads([rng.choice(nodes) for _ in ks], nodes)[0])
    print(f"| uniform random node per key | - | - | - | - | {spread(ref)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
