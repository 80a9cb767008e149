"""Where a relay's CPU per GB goes: user time (the relay's own code) against system
time (the kernel: splice, TCP on loopback), under iperf3's bulk load.

Run (from the repository root, after benchmarks/relay/setup.sh)::

    python benchmarks/relay/cpu_split.py                 # 5 rounds, pinned as run.py
    python benchmarks/relay/cpu_split.py --rounds 3 --unpinned

Each round runs every relay once, in turn, with run.py's bulk load (the relay on
CPU 1, iperf3 on CPU 0; ``--unpinned``: every CPU) and reads the relay process's
utime and stime (``/proc/PID/stat``, its live threads and children included) before
and after. Medians per relay: Gbit/s, user and system CPU-s per GB, the user share,
and the total against the Go relay's in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run

DEFAULT = [
    "go io.Copy",
    "reuselb asyncio+async_pipe_splice",
    "reuselb asyncio+start_pipe_splice",
    "reuselb uvloop+start_pipe_splice",
    "reuselb threads+pipe_splice",
]


def user_system(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of *pid*, its reaped children and live descendants."""
    tree, stats = run._proc_tree(pid)
    user = system = 0
    for p in tree:
        f = stats[p]
        user += int(f[11])
        system += int(f[12])
        if p == pid:
            user += int(f[13])
            system += int(f[14])
    return user / run.TICK, system / run.TICK


def one(name: str, work: Path, seconds: int) -> tuple[float, float, float]:
    """(Gbit/s, user s/GB, system s/GB) of one iperf3 run through relay *name*."""
    backend, listen = run.free_port(), run.free_port()
    with (
        run.started(run.relay_cmd(name, listen, backend, work), run.CPUS["relay"], listen) as relay,
        run.started(["iperf3", "-s", "-p", str(backend)], run.CPUS["load"], backend),
    ):
        u0, s0 = user_system(relay.pid)
        out = subprocess.run(
            run.iperf3_client(listen, seconds),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
        u1, s1 = user_system(relay.pid)
    end = json.loads(out.stdout)["end"]["sum_received"]
    gbytes = end["bytes"] / 1e9
    return end["bits_per_second"] / 1e9, (u1 - u0) / gbytes, (s1 - s0) / gbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=4, help="iperf3 -t per run")
    ap.add_argument("--unpinned", action="store_true", help="relay and load on every CPU")
    ap.add_argument("--only", nargs="+", choices=list(run.RELAYS), default=DEFAULT)
    args = ap.parse_args(argv)
    for name in ("rounds", "seconds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, not {getattr(args, name)}")
    if args.unpinned:
        # every CPU, as run.py --unpinned (runs R-T) does
        run.CPUS["relay"] = run.CPUS["load"] = f"0-{(os.cpu_count() or 1) - 1}"
    if "go io.Copy" not in args.only:
        ap.error("--only must include 'go io.Copy' (the ratios are to it)")
    got: dict[str, list[tuple[float, float, float]]] = {n: [] for n in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in args.only:
                got[name].append(one(name, Path(tmp), args.seconds))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    go_total = [u + s for _, u, s in got["go io.Copy"]]
    print(
        f"\n{args.rounds} rounds, {'unpinned' if args.unpinned else 'pinned'}, medians; "
        "total vs Go is the median of the per-round ratios\n"
    )
    print("| relay | Gbit/s | user CPU-s/GB | system CPU-s/GB | user share | total vs Go |")
    print("|---|---:|---:|---:|---:|---:|")
    med = statistics.median
    for name, rows in got.items():
        gbit = med(g for g, _, _ in rows)
        user = med(u for _, u, _ in rows)
        system = med(s for _, _, s in rows)
        share = med(u / (u + s) for _, u, s in rows)
        vs_go = med((u + s) / t for (_, u, s), t in zip(rows, go_total, strict=True))
        print(f"| {name} | {gbit:.2f} | {user:.3f} | {system:.3f} | {share:.1%} | {vs_go:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
