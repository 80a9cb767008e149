"""Relay benchmark: reuselb relays against the peers a user would pick, side by side.

    pip install -e '.[bench]' && bash benchmarks/relay/setup.sh
    python benchmarks/relay/run.py [--quick] [--rounds N]
    python benchmarks/relay/run.py --only NAME [NAME ...] [--out DIR] [--rounds N]
    python benchmarks/relay/run.py --loads keepalive [churn] [bulk] ...

Every relay forwards 127.0.0.1:A -> 127.0.0.1:B and runs pinned to CPU 1; the load
generators and backends run pinned to CPU 0 (``--unpinned``: everything may run on
every CPU, as on a host where the relay shares the CPUs with its neighbours). Loads:

1. bulk: iperf3 through the relay; Gbit/s and relay CPU seconds per GB moved;
2. keep-alive: wrk, 50 connections, to an nginx returning a 3-byte body; req/s and
   relay CPU seconds per 10k requests;
3. churn: the same with ``Connection: close``; connections/s.

Relay CPU is utime+stime of the relay process, its reaped children (cutime+cstime,
for socat's fork per connection) and its live descendants (nginx's worker), read
from /proc/PID/stat. wrk's socket errors (connect+read+write+timeout) and non-2xx
responses are counted per load and round; the table and results.json give the largest
count of any round (a median would hide errors in a minority of rounds), and a row
with any is marked, as wrk's req/s counts failed responses too. A bulk round whose
two iperf3 attempts both failed is counted and marked the same way and left out of
the bulk medians (the medians are of the rounds that measured something).

Keep-alive diagnostics, per round and as medians in a second table: how busy the load
CPU and the relay's CPU were (/proc/stat), how often the relay's threads went to sleep
(voluntary context switches, /proc/PID/task/TID/status, relay and live descendants)
and how often nginx's processes switched (voluntary and involuntary), per 10k
requests. They show what bounds that load (docs/performance.md, "What bounds
keep-alive").

Results go to stdout (a table with ratios to the Go relay and to the plain Python copy
relay), results.json and relay-*.svg charts. A full run (no ``--only``, every load,
pinned) writes benchmarks/relay/results.json and docs/img/relay-*.svg, the figures
docs/performance.md cites; any other run (``--only``, ``--loads``, ``--unpinned``)
writes to benchmarks/relay/work/partial/ (git-ignored) so that it never replaces
them. ``--out DIR`` writes DIR/results.json and DIR/relay-*.svg instead, for either.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TICK = os.sysconf("SC_CLK_TCK")
# Which CPUs (taskset lists) the relay and the load generators and backends run on;
# --unpinned sets both to every CPU.
CPUS = {"relay": "1", "load": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _proc_tree(pid: int) -> tuple[list[int], dict[int, list[str]]]:
    """*pid* and its live descendants, and every process's /proc/PID/stat fields after
    the name (state ppid ... utime(11) stime(12) cutime(13) cstime(14))."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            tree.append(p)
        todo.extend(children.get(p, []))
    return tree, stats


def cpu_seconds(pid: int) -> float:
    """utime+stime+cutime+cstime of *pid* plus utime+stime of its live descendants."""
    tree, stats = _proc_tree(pid)
    total = 0
    for p in tree:
        f = stats[p]
        total += int(f[11]) + int(f[12])
        if p == pid:
            total += int(f[13]) + int(f[14])
    return total / TICK


def switches(pid: int, kinds: tuple[str, ...] = ("voluntary",)) -> int:
    """Context switches (``voluntary``: the thread went to sleep; ``nonvoluntary``:
    preempted) of every thread of *pid* and its live descendants, from
    /proc/PID/task/TID/status."""
    total = 0
    for p in _proc_tree(pid)[0]:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                status = Path(f"/proc/{p}/task/{tid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                name, _, value = line.partition("_ctxt_switches:")
                if value and name in kinds:
                    total += int(value)
    return total


def cpu_list(spec: str) -> set[int]:
    """The CPUs of a taskset list such as "1", "0-1" or "0,2-3"."""
    cpus: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def cpu_busy(spec: str) -> tuple[int, int]:
    """(busy, total) ticks of the CPUs *spec* (a taskset list) so far, from /proc/stat
    (idle and iowait are not busy)."""
    busy = total = 0
    want = cpu_list(spec)
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in want:
            ticks = [int(x) for x in fields[:8]]
            busy += sum(ticks) - ticks[3] - ticks[4]
            total += sum(ticks)
            want.discard(int(name[3:]))
    if want:
        raise RuntimeError(f"no cpu{min(want)} in /proc/stat")
    return busy, total


@contextmanager
def started(
    cmd: list[str], cpu: str, port: int | None = None, **kw: object
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        ["taskset", "-c", cpu, *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        **kw,
    )  # type: ignore[call-overload]
    try:
        if port is not None:
            wait_port(port)
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def relay_cmd(name: str, listen: int, target: int, work: Path) -> list[str]:
    py = [sys.executable, str(HERE / "relays.py")]
    if name.startswith(("reuselb", "python")):
        mode = {
            "reuselb threads+pipe_splice": "threads-splice",
            "reuselb asyncio+async_pipe_splice": "asyncio-splice",
            "reuselb asyncio+start_pipe_splice": "asyncio-start",
            "reuselb uvloop+start_pipe_splice": "uvloop-start",
            "python threads copy (baseline)": "threads-copy",
            "python epoll floor (no checks)": "epoll-floor",
        }[name]
        return [*py, mode, str(listen), str(target)]
    if name == "go io.Copy":
        return [str(HERE / "work" / "gorelay"), f"127.0.0.1:{listen}", f"127.0.0.1:{target}"]
    if name in ("haproxy (mode tcp)", "haproxy (mode tcp, splice)"):
        cfg = work / f"haproxy-{listen}.cfg"
        # HAProxy copies through user space (recvfrom/sendto) unless told to splice,
        # while Go's io.Copy and reuselb splice(2): the second row lets it splice both
        # ways. "option splice-auto" is not enough here: with HAProxy 2.6.12 its
        # heuristics never spliced iperf3's stream on loopback (0 splice calls against
        # ~290k recvfrom in 3 s, perf syscall counters), so the row forces splicing.
        # Both rows are kept: the plain one is HAProxy's default.
        splice = "  option splice-request\n  option splice-response\n" if "splice" in name else ""
        cfg.write_text(
            "global\n  nbthread 1\n  maxconn 4000\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
            f"{splice}"
            f"listen relay\n  bind 127.0.0.1:{listen}\n  server b 127.0.0.1:{target}\n"
        )
        return ["haproxy", "-f", str(cfg), "-db"]
    if name == "nginx stream":
        cfg = work / f"nginx-stream-{listen}.conf"
        cfg.write_text(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
            f"worker_processes 1; pid {work}/ns-{listen}.pid; error_log {work}/ns-{listen}.err;\n"
            "events { worker_connections 20000; }\n"
            f"stream {{ server {{ listen 127.0.0.1:{listen} reuseport; proxy_pass 127.0.0.1:{target}; }} }}\n"
        )
        return ["nginx", "-e", f"{work}/ns-{listen}.err", "-c", str(cfg), "-g", "daemon off;"]
    if name == "socat":
        return [
            "socat",
            f"TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
            f"TCP:127.0.0.1:{target},nodelay",
        ]
    raise KeyError(name)


RELAYS = [
    "reuselb threads+pipe_splice",
    "reuselb asyncio+async_pipe_splice",
    "reuselb asyncio+start_pipe_splice",
    "reuselb uvloop+start_pipe_splice",
    "python threads copy (baseline)",
    "python epoll floor (no checks)",
    "go io.Copy",
    "haproxy (mode tcp)",
    "haproxy (mode tcp, splice)",
    "nginx stream",
    "socat",
]


def iperf3_client(port: int, seconds: int) -> list[str]:
    """iperf3's client through the relay on *port*, on the load CPU, JSON output."""
    return [
        "taskset",
        "-c",
        CPUS["load"],
        "iperf3",
        "-c",
        "127.0.0.1",
        "-p",
        str(port),
        "-t",
        str(seconds),
        "-J",
    ]


def bulk(name: str, work: Path, seconds: int) -> dict[str, float]:
    backend, listen = free_port(), free_port()
    # The relay starts first: its readiness probe must not reach iperf3, whose server
    # runs one test at a time and would answer the real client "busy".
    with (
        started(relay_cmd(name, listen, backend, work), CPUS["relay"], listen) as relay,
        started(["iperf3", "-s", "-p", str(backend)], CPUS["load"], backend),
    ):
        for _attempt in range(2):
            c0 = cpu_seconds(relay.pid)
            out = subprocess.run(
                iperf3_client(listen, seconds),
                capture_output=True,
                text=True,
                timeout=seconds + 60,
            )
            cpu = cpu_seconds(relay.pid) - c0
            if "sum_received" in json.loads(out.stdout or "{}").get("end", {}):
                break
        else:
            # Counted as a failed round (bulk_failed) and left out of the medians.
            return {"gbit_s": float("nan"), "cpu_s_per_gb": float("nan"), "bulk_failed": 1.0}
    end = json.loads(out.stdout)["end"]["sum_received"]
    gbytes = end["bytes"] / 1e9
    return {
        "gbit_s": end["bits_per_second"] / 1e9,
        "cpu_s_per_gb": cpu / gbytes if gbytes else float("nan"),
        "bulk_failed": 0.0,
    }


def http(name: str, work: Path, seconds: int, close: bool) -> dict[str, float]:
    backend, listen = free_port(), free_port()
    cfg = work / f"nginx-http-{backend}.conf"
    cfg.write_text(
        f"worker_processes 1; pid {work}/h-{backend}.pid; error_log {work}/h-{backend}.err;\n"
        "events { worker_connections 20000; }\n"
        "http { access_log off; keepalive_requests 10000000;\n"
        f'  server {{ listen 127.0.0.1:{backend}; location / {{ return 200 "ok\\n"; }} }} }}\n'
    )
    nginx = ["nginx", "-e", f"{work}/h-{backend}.err", "-c", str(cfg), "-g", "daemon off;"]
    wrk = ["taskset", "-c", CPUS["load"], "wrk", "-t1", "-c50", f"-d{seconds}s"]
    if close:
        wrk += ["-H", "Connection: close"]
    with (
        started(nginx, CPUS["load"], backend) as ngx,
        started(relay_cmd(name, listen, backend, work), CPUS["relay"], listen) as relay,
    ):
        c0 = cpu_seconds(relay.pid)
        sleeps0, ngx0 = switches(relay.pid), switches(ngx.pid, ("voluntary", "nonvoluntary"))
        load0, relay0 = cpu_busy(CPUS["load"]), cpu_busy(CPUS["relay"])
        out = subprocess.run(
            [*wrk, f"http://127.0.0.1:{listen}/"],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        ).stdout
        load1, relay1 = cpu_busy(CPUS["load"]), cpu_busy(CPUS["relay"])
        sleeps = switches(relay.pid) - sleeps0
        ngx_switches = switches(ngx.pid, ("voluntary", "nonvoluntary")) - ngx0
        cpu = cpu_seconds(relay.pid) - c0
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    requests = re.search(r"(\d+) requests in", out)
    if not rps or not requests:
        raise RuntimeError(f"{name}: no figures in wrk's output: {out!r}")
    total = float(requests.group(1))
    socket_errors, non2xx = wrk_errors(out)
    per_10k = 1e4 / total if total else float("nan")
    return {
        "rps": float(rps.group(1)),
        "cpu_s_per_10k": cpu * per_10k,
        # Why the keep-alive figures of all fast relays are close (see
        # docs/performance.md): the load CPU (wrk and nginx) is saturated, and a
        # relay's effect shows as how often it sleeps and nginx switches.
        "load_cpu_busy": (load1[0] - load0[0]) / max(1, load1[1] - load0[1]),
        "relay_cpu_busy": (relay1[0] - relay0[0]) / max(1, relay1[1] - relay0[1]),
        "relay_sleeps_per_10k": sleeps * per_10k,
        "backend_switches_per_10k": ngx_switches * per_10k,
        "socket_errors": float(socket_errors),
        "non2xx": float(non2xx),
    }


def wrk_errors(out: str) -> tuple[int, int]:
    """(socket errors, non-2xx/3xx responses) from wrk's report; wrk prints neither line
    when the count is zero."""
    sock = 0
    if "Socket errors:" in out:
        m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        if not m:  # a format this parser does not know: fail rather than report 0
            raise RuntimeError(f"unparsed wrk error line in {out!r}")
        sock = sum(int(x) for x in m.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return sock, int(non2xx.group(1)) if non2xx else 0


def svg_bars(title: str, unit: str, values: dict[str, float], path: Path) -> None:
    """A horizontal bar chart as plain SVG (no plotting dependency)."""
    width, row, left = 760, 26, 290
    # a failed load is NaN: an empty bar labelled "nan", not allowed to set the scale
    top = max((v for v in values.values() if not math.isnan(v)), default=0.0) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{40 + row * len(values)}" '
        'font-family="sans-serif" font-size="13">',
        f'<text x="10" y="20" font-weight="bold">{title}</text>',
    ]
    for i, (label, value) in enumerate(values.items()):
        y = 32 + i * row
        w = 0.0 if math.isnan(value) else (width - left - 90) * value / top
        color = "#2b7bb9" if label.startswith("reuselb") else "#999999"
        parts += [
            f'<text x="10" y="{y + 15}">{label}</text>',
            f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="16" fill="{color}"/>',
            f'<text x="{left + w + 6:.1f}" y="{y + 15}">{value:,.2f} {unit}</text>',
        ]
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


METRICS = ("gbit_s", "cpu_s_per_gb", "keepalive_rps", "keepalive_cpu_s_per_10k", "churn_cps")
LOADS = ("bulk", "keepalive", "churn")
# What http() measures besides wrk's errors; DIAGNOSTICS are reported for keep-alive.
DIAGNOSTICS = (
    "load_cpu_busy",
    "relay_cpu_busy",
    "relay_sleeps_per_10k",
    "backend_switches_per_10k",
)
HTTP_FIGURES = ("rps", "cpu_s_per_10k", *DIAGNOSTICS)
ERRORS = ("keepalive_socket_errors", "keepalive_non2xx", "churn_socket_errors", "churn_non2xx")
GO, PLAIN = "go io.Copy", "python threads copy (baseline)"


def median_measured(values: list[float]) -> float:
    """The median of the rounds that measured something; NaN if none did.

    A failed round is NaN (a bulk load whose two iperf3 attempts both failed), and
    ``statistics.median`` does not skip NaN: it sorts as if it were any number, so
    the result would depend on which round failed. Failed rounds are counted
    instead (see :func:`errors_cell`).
    """
    measured = [v for v in values if not math.isnan(v)]
    return statistics.median(measured) if measured else float("nan")


def errors_cell(e: dict[str, float], rounds: int) -> str:
    """ "0", or each load's largest socket-error and non-2xx counts of any round, and
    the rounds whose bulk load failed (left out of the medians)."""
    parts = []
    if e["rounds_with_errors"]:
        parts.append(
            f"keep-alive {e['keepalive_socket_errors']:,.0f}/{e['keepalive_non2xx']:,.0f}, "
            f"churn {e['churn_socket_errors']:,.0f}/{e['churn_non2xx']:,.0f} "
            f"({e['rounds_with_errors']:.0f} of {rounds} rounds)"
        )
    if e["bulk_failed_rounds"]:
        parts.append(f"bulk failed in {e['bulk_failed_rounds']:.0f} of {rounds} rounds")
    return "; ".join(parts) or "0"


def has_errors(e: dict[str, float]) -> bool:
    """wrk reported errors in some round, or some round's bulk load failed."""
    return bool(e["rounds_with_errors"] or e["bulk_failed_rounds"])


def table(
    med: dict[str, dict[str, float]], errors: dict[str, dict[str, float]], rounds: int
) -> str:
    """The markdown table docs/performance.md shows: medians, ratios, error counts."""
    go, base = med.get(GO), med.get(PLAIN)
    lines = [
        "| relay | Gbit/s | CPU-s/GB | keep-alive req/s | CPU-s/10k req | churn conn/s "
        "| bulk vs Go | CPU/GB vs Go | keep-alive vs Go | churn vs Go "
        "| bulk vs plain Python | CPU/GB vs plain Python | keep-alive vs plain Python "
        "| churn vs plain Python | errors: wrk's, max of a round (socket/non-2xx); failed bulk rounds |",
        "|" + "---|" * 15,
    ]
    for n, m in med.items():

        def ratio(key: str, ref: dict[str, float] | None, m: dict[str, float] = m) -> str:
            return f"{m[key] / ref[key]:.2f}" if ref and ref[key] else "-"

        mark = " (errors)" if has_errors(errors[n]) else ""
        lines.append(
            f"| {n}{mark} | {m['gbit_s']:.2f} | {m['cpu_s_per_gb']:.3f} | {m['keepalive_rps']:,.0f} | "
            f"{m['keepalive_cpu_s_per_10k']:.3f} | {m['churn_cps']:,.0f} | "
            + " | ".join(
                ratio(k, ref)
                for ref in (go, base)
                for k in ("gbit_s", "cpu_s_per_gb", "keepalive_rps", "churn_cps")
            )
            + f" | {errors_cell(errors[n], rounds)} |"
        )
    if any(has_errors(e) for e in errors.values()):
        lines.append(
            "\n(errors): wrk reported socket errors or non-2xx responses in at least one "
            "round (its req/s counts those responses too), or a round's bulk load failed "
            "(iperf3 gave no result twice; the bulk medians are of the other rounds)."
        )
    return "\n".join(lines)


def diagnostics_table(diag: dict[str, dict[str, float]]) -> str:
    """Keep-alive medians that show what bounds the load: how busy the load CPU
    (wrk and nginx) and the relay's CPU were, how often the relay went to sleep
    (voluntary context switches of its threads) and how often nginx switched."""
    lines = [
        "| relay (keep-alive) | load CPU busy | relay CPU busy | relay sleeps per 10k req "
        "| nginx switches per 10k req |",
        "|---|---:|---:|---:|---:|",
    ]
    for n, d in diag.items():
        lines.append(
            f"| {n} | {d['load_cpu_busy']:.1%} | {d['relay_cpu_busy']:.1%} "
            f"| {d['relay_sleeps_per_10k']:,.0f} | {d['backend_switches_per_10k']:,.0f} |"
        )
    return "\n".join(lines)


def _nan_to_none(value: Any) -> Any:
    """*value* with every NaN (a load not run, or one that failed) as None: JSON has
    no NaN, and strict parsers (``jq``, JavaScript's ``JSON.parse``) reject Python's
    bare ``NaN``; null is what they read as "no figure"."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s per load instead of 4")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; the median is reported")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=RELAYS,
        metavar="NAME",
        help="run only these relays (quote each name); one of: " + "; ".join(RELAYS),
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="write results.json and relay-*.svg here (default: benchmarks/relay/ and "
        "docs/img/ for a full run, benchmarks/relay/work/partial/ for any other: "
        "--only, --loads or --unpinned)",
    )
    parser.add_argument(
        "--loads",
        nargs="+",
        choices=LOADS,
        default=list(LOADS),
        help="run only these loads (default: all three); the others' figures are NaN "
        "(null in results.json)",
    )
    parser.add_argument(
        "--unpinned",
        action="store_true",
        help="run relays, load generators and backends on every CPU (taskset -c 0-N) "
        "instead of the relay on CPU 1 and the rest on CPU 0",
    )
    args = parser.parse_args()
    if args.unpinned:
        CPUS["relay"] = CPUS["load"] = f"0-{(os.cpu_count() or 1) - 1}"
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    seconds = 2 if args.quick else 4
    names = [n for n in RELAYS if args.only is None or n in args.only]
    if args.out is not None:
        json_path, img = args.out / "results.json", args.out
    elif args.only is None and set(args.loads) == set(LOADS) and not args.unpinned:
        json_path, img = HERE / "results.json", ROOT / "docs" / "img"
    else:
        # Never replace the full run's figures, which the docs cite, with a subset
        # (of relays or loads) or with another configuration (unpinned).
        img = HERE / "work" / "partial"
        json_path = img / "results.json"
    missing = [
        t for t in ("iperf3", "wrk", "nginx", "haproxy", "socat", "taskset") if not shutil.which(t)
    ]
    if missing or not (HERE / "work" / "gorelay").exists():
        print(
            f"missing {missing or 'work/gorelay'}: run benchmarks/relay/setup.sh", file=sys.stderr
        )
        return 2
    # relays.py runs under this interpreter with its output discarded: without these a
    # Python relay would only show as "nothing listens on PORT" after 20 s. relays.py
    # imports reuselb for every Python relay, uvloop for the uvloop one only.
    needed = ["reuselb"] if any(n.startswith(("reuselb", "python")) for n in names) else []
    needed += ["uvloop"] if any("uvloop" in n for n in names) else []
    absent = [m for m in needed if importlib.util.find_spec(m) is None]
    if absent:
        print(
            f"missing Python modules {absent}: pip install -e '.[bench]' (from the repository root)",
            file=sys.stderr,
        )
        return 2
    load_start = os.getloadavg()
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for rnd in range(args.rounds):
            for name in names:  # relays take turns within each round
                nan = float("nan")
                res = (
                    bulk(name, work, seconds)
                    if "bulk" in args.loads
                    else {"gbit_s": nan, "cpu_s_per_gb": nan, "bulk_failed": 0.0}
                )
                skipped = dict.fromkeys(HTTP_FIGURES, nan) | {"socket_errors": 0.0, "non2xx": 0.0}
                ka = (
                    http(name, work, seconds, close=False) if "keepalive" in args.loads else skipped
                )
                ch = http(name, work, seconds, close=True) if "churn" in args.loads else skipped
                res.update(
                    {
                        "keepalive_rps": ka["rps"],
                        "keepalive_cpu_s_per_10k": ka["cpu_s_per_10k"],
                        "churn_cps": ch["rps"],
                        "keepalive_socket_errors": ka["socket_errors"],
                        "keepalive_non2xx": ka["non2xx"],
                        "churn_socket_errors": ch["socket_errors"],
                        "churn_non2xx": ch["non2xx"],
                        **{f"keepalive_{k}": ka[k] for k in DIAGNOSTICS},
                    }
                )
                for k, v in res.items():
                    samples[name].setdefault(k, []).append(v)
                print(
                    f"round {rnd + 1}: {name}: "
                    + ", ".join(f"{k}={v:.3g}" for k, v in res.items()),
                    flush=True,
                )
    med = {n: {k: median_measured(m[k]) for k in METRICS} for n, m in samples.items()}
    diag = {
        n: {k: median_measured(m[f"keepalive_{k}"]) for k in DIAGNOSTICS}
        for n, m in samples.items()
    }
    errors = {
        n: {
            **{k: max(m[k]) for k in ERRORS},
            "rounds_with_errors": float(
                sum(any(m[k][r] for k in ERRORS) for r in range(args.rounds))
            ),
            "bulk_failed_rounds": sum(m["bulk_failed"]),
        }
        for n, m in samples.items()
    }
    print("\n" + table(med, errors, args.rounds))
    print("\n" + diagnostics_table(diag))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps(
            _nan_to_none(
                {
                    "seconds": seconds,
                    "rounds": args.rounds,
                    "relay_cpus": CPUS["relay"],
                    "load_cpus": CPUS["load"],
                    "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg(),
                    "median": med,
                    "keepalive_diagnostics_median": diag,
                    "wrk_errors_max_of_rounds": errors,
                    "per_round": samples,
                }
            ),
            indent=2,
            allow_nan=False,
        )
        + "\n"
    )
    img.mkdir(parents=True, exist_ok=True)
    svg_bars(
        "Bulk throughput (iperf3), Gbit/s",
        "Gbit/s",
        {n: m["gbit_s"] for n, m in med.items()},
        img / "relay-bulk.svg",
    )
    svg_bars(
        "Relay CPU per GB moved (lower is better)",
        "s",
        {n: m["cpu_s_per_gb"] for n, m in med.items()},
        img / "relay-cpu.svg",
    )
    svg_bars(
        "Keep-alive requests/s (wrk, 50 connections)",
        "req/s",
        {n: m["keepalive_rps"] for n, m in med.items()},
        img / "relay-keepalive.svg",
    )
    svg_bars(
        "Connection churn (Connection: close), conn/s",
        "conn/s",
        {n: m["churn_cps"] for n, m in med.items()},
        img / "relay-churn.svg",
    )
    print(f"wrote {json_path} and {img}/relay-*.svg", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
