"""Relay benchmark: reuselb relays against the peers a user would pick, side by side.

    bash benchmarks/relay/setup.sh && python benchmarks/relay/run.py [--quick] [--rounds N]

Every relay forwards 127.0.0.1:A -> 127.0.0.1:B and runs pinned to CPU 1; the load
generators and backends run pinned to CPU 0. Loads:

1. bulk: iperf3 through the relay; Gbit/s and relay CPU seconds per GB moved;
2. keep-alive: wrk, 50 connections, to an nginx returning a 3-byte body; req/s and
   relay CPU seconds per 10k requests;
3. churn: the same with ``Connection: close``; connections/s.

Relay CPU is utime+stime of the relay process, its reaped children (cutime+cstime,
for socat's fork per connection) and its live descendants (nginx's worker), read
from /proc/PID/stat. Results go to stdout (a table with ratios), results.json and
docs/img/relay-*.svg.
"""

from __future__ import annotations

import argparse
import json
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TICK = os.sysconf("SC_CLK_TCK")
RELAY_CPU, LOAD_CPU = "1", "0"


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


def cpu_seconds(pid: int) -> float:
    """utime+stime+cutime+cstime of *pid* plus utime+stime of its live descendants."""
    total = 0.0
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
    todo, first = [pid], True
    while todo:
        p = todo.pop()
        f = stats.get(p)
        if f:
            # fields after the name: state ppid ... utime(11) stime(12) cutime(13) cstime(14)
            total += int(f[11]) + int(f[12])
            if first:
                total += int(f[13]) + int(f[14])
        first = False
        todo.extend(children.get(p, []))
    return total / TICK


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
        }[name]
        return [*py, mode, str(listen), str(target)]
    if name == "go io.Copy":
        return [str(HERE / "work" / "gorelay"), f"127.0.0.1:{listen}", f"127.0.0.1:{target}"]
    if name == "haproxy (mode tcp)":
        cfg = work / f"haproxy-{listen}.cfg"
        cfg.write_text(
            "global\n  nbthread 1\n  maxconn 4000\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
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
    "go io.Copy",
    "haproxy (mode tcp)",
    "nginx stream",
    "socat",
]


def iperf3_client(port: int, seconds: int) -> list[str]:
    """iperf3's client through the relay on *port*, on the load CPU, JSON output."""
    return [
        "taskset",
        "-c",
        LOAD_CPU,
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
        started(relay_cmd(name, listen, backend, work), RELAY_CPU, listen) as relay,
        started(["iperf3", "-s", "-p", str(backend)], LOAD_CPU, backend),
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
            return {"gbit_s": float("nan"), "cpu_s_per_gb": float("nan")}
    end = json.loads(out.stdout)["end"]["sum_received"]
    gbytes = end["bytes"] / 1e9
    return {
        "gbit_s": end["bits_per_second"] / 1e9,
        "cpu_s_per_gb": cpu / gbytes if gbytes else float("nan"),
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
    wrk = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c50", f"-d{seconds}s"]
    if close:
        wrk += ["-H", "Connection: close"]
    with (
        started(nginx, LOAD_CPU, backend),
        started(relay_cmd(name, listen, backend, work), RELAY_CPU, listen) as relay,
    ):
        c0 = cpu_seconds(relay.pid)
        out = subprocess.run(
            [*wrk, f"http://127.0.0.1:{listen}/"],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        ).stdout
        cpu = cpu_seconds(relay.pid) - c0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "cpu_s_per_10k": cpu / total * 1e4 if total else float("nan"),
        "errors": 1.0 if errors or non2xx else 0.0,
    }


def svg_bars(title: str, unit: str, values: dict[str, float], path: Path) -> None:
    """A horizontal bar chart as plain SVG (no plotting dependency)."""
    width, row, left = 760, 26, 290
    top = max(values.values()) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{40 + row * len(values)}" '
        'font-family="sans-serif" font-size="13">',
        f'<text x="10" y="20" font-weight="bold">{title}</text>',
    ]
    for i, (label, value) in enumerate(values.items()):
        y = 32 + i * row
        w = (width - left - 90) * value / top
        color = "#2b7bb9" if label.startswith("reuselb") else "#999999"
        parts += [
            f'<text x="10" y="{y + 15}">{label}</text>',
            f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="16" fill="{color}"/>',
            f'<text x="{left + w + 6:.1f}" y="{y + 15}">{value:,.2f} {unit}</text>',
        ]
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s per load instead of 4")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; the median is reported")
    parser.add_argument("--only", nargs="*", help="relay names to run (default: all)")
    args = parser.parse_args()
    seconds = 2 if args.quick else 4
    names = [n for n in RELAYS if not args.only or n in args.only]
    missing = [
        t for t in ("iperf3", "wrk", "nginx", "haproxy", "socat", "taskset") if not shutil.which(t)
    ]
    if missing or not (HERE / "work" / "gorelay").exists():
        print(
            f"missing {missing or 'work/gorelay'}: run benchmarks/relay/setup.sh", file=sys.stderr
        )
        return 2
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for rnd in range(args.rounds):
            for name in names:  # relays take turns within each round
                res = {**bulk(name, work, seconds)}
                ka = http(name, work, seconds, close=False)
                ch = http(name, work, seconds, close=True)
                res.update(
                    {
                        "keepalive_rps": ka["rps"],
                        "keepalive_cpu_s_per_10k": ka["cpu_s_per_10k"],
                        "churn_cps": ch["rps"],
                        "http_errors": ka["errors"] + ch["errors"],
                    }
                )
                for k, v in res.items():
                    samples[name].setdefault(k, []).append(v)
                print(
                    f"round {rnd + 1}: {name}: "
                    + ", ".join(f"{k}={v:.3g}" for k, v in res.items()),
                    flush=True,
                )
    med = {n: {k: statistics.median(v) for k, v in m.items()} for n, m in samples.items()}
    go = med.get("go io.Copy")
    base = med.get("python threads copy (baseline)")
    header = (
        "| relay | Gbit/s | CPU-s/GB | keep-alive req/s | CPU-s/10k req | churn conn/s "
        "| bulk vs Go | CPU/GB vs Go | keep-alive vs Go | churn vs Go | keep-alive vs plain Python |"
    )
    print("\n" + header + "\n|" + "---|" * 11)
    for n, m in med.items():

        def ratio(key: str, ref: dict[str, float] | None, m: dict[str, float] = m) -> str:
            return f"{m[key] / ref[key]:.2f}" if ref and ref[key] else "-"

        print(
            f"| {n} | {m['gbit_s']:.2f} | {m['cpu_s_per_gb']:.3f} | {m['keepalive_rps']:,.0f} | "
            f"{m['keepalive_cpu_s_per_10k']:.3f} | {m['churn_cps']:,.0f} | {ratio('gbit_s', go)} | "
            f"{ratio('cpu_s_per_gb', go)} | {ratio('keepalive_rps', go)} | {ratio('churn_cps', go)} | "
            f"{ratio('keepalive_rps', base)} |"
        )
    (HERE / "results.json").write_text(
        json.dumps({"seconds": seconds, "rounds": args.rounds, "median": med}, indent=2) + "\n"
    )
    img = ROOT / "docs" / "img"
    img.mkdir(exist_ok=True)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
