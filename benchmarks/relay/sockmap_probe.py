"""Probe: would an in-kernel SOCKMAP redirect beat splice(2) for the bulk load?

    sudo python benchmarks/relay/sockmap_probe.py [--rounds N] [--seconds S]

Not a reuselb feature and not a relay to use: a measurement behind the "CPU per GB"
row of docs/performance.md. A SOCKMAP relay moves bytes without waking the process
(an sk_skb verdict program redirects each received skb to the peer socket's egress),
so the relay process's own CPU is near zero; the work moves to softirq and kworker
context, which /proc/PID/stat does not charge to it. This probe therefore reports the
whole machine's CPU per GB next to the relay process's, for the Go io.Copy relay,
reuselb's asyncio relay and the SOCKMAP relay, iperf3 through each (same pinning as
run.py: relay on CPU 1, iperf3 on CPU 0), alternating in every round.

The machine-wide figure (/proc/stat: all CPUs, everything but idle and iowait)
counts every other process on the machine too, and divided by the GB moved that
background weighs most on the slowest relay. So before each test the probe measures
the machine's busy time over an idle window of the same length (relay and iperf3
server started, no traffic) and subtracts it, scaled to the test's own duration;
the ``idle CPU-s`` column shows what was subtracted, and the raw figure is printed
too. Both are estimates: with a steady background the raw figure is an upper bound
(it holds the test's work plus what ran beside it) and the net one a lower bound (a
background that competes for the CPUs the test keeps busy runs less during the test
than in the idle window, so more is subtracted than ran). A large idle figure means
the round says little.

Needs root (CAP_BPF and CAP_NET_ADMIN) and the Go relay (benchmarks/relay/setup.sh).

Known gaps that keep the SOCKMAP relay a probe (each seen on Linux 6.18):

- bytes queued on a socket before it joins the map are not redirected until more
  bytes arrive, so they are copied once by hand (racy against new arrivals);
- no event says "everything received on a has been sent on b", so a FIN is forwarded
  only after polling TCP_INFO byte counters until the two agree;
- "sent" minus "received" bytes at the end of a test shows how much the kernel
  queued in between (see the ``queued MB`` column).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from run import (
    CPUS,
    HERE,
    cpu_seconds,
    free_port,
    iperf3_client,
    relay_cmd,
    started,
)

_SYS_BPF = 321  # x86_64
_BPF_MAP_CREATE, _BPF_MAP_UPDATE_ELEM, _BPF_PROG_LOAD, _BPF_PROG_ATTACH = 0, 2, 5, 8
_MAP_SOCKHASH = 18
_PROG_SK_SKB = 14
_ATTACH_SK_SKB_VERDICT = 38  # Linux 5.13+: a verdict without a stream parser
_HELPER_GET_SOCKET_COOKIE = 46
_HELPER_SK_REDIRECT_HASH = 72
_SO_COOKIE = 57
_SIOCOUTQ = 0x5411
_TCPI_BYTES_ACKED, _TCPI_BYTES_RECEIVED = 120, 128  # offsets in struct tcp_info

_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
    fd = int(_libc.syscall(_SYS_BPF, cmd, buf, 128))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return fd


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _verdict_program(map_fd: int) -> bytes:
    """``return bpf_sk_redirect_hash(skb, map, &cookie(skb->sk), 0)``: to the peer's egress."""
    return b"".join(
        [
            _insn(0xBF, 6, 1),  # r6 = skb
            _insn(0x85, imm=_HELPER_GET_SOCKET_COOKIE),  # r0 = cookie of the receiving socket
            _insn(0x7B, 10, 0, -8),  # *(u64 *)(fp - 8) = r0
            _insn(0xBF, 1, 6),  # r1 = skb
            _insn(0x18, 2, 1, 0, map_fd),  # r2 = the map (ld_imm64, pseudo map fd) ...
            _insn(0),  # ... upper half
            _insn(0xBF, 3, 10),  # r3 = fp
            _insn(0x07, 3, 0, 0, -8),  # r3 = fp - 8 (the key)
            _insn(0xB7, 4),  # r4 = 0: the peer's egress, not its ingress
            _insn(0x85, imm=_HELPER_SK_REDIRECT_HASH),
            _insn(0x95),  # exit
        ]
    )


class SockmapRelay:
    """One SOCKHASH keyed by socket cookie: ``map[cookie(a)] = b`` and the reverse."""

    def __init__(self) -> None:
        self.map_fd = _bpf(_BPF_MAP_CREATE, struct.pack("<IIIII", _MAP_SOCKHASH, 8, 8, 65536, 0))
        prog = ctypes.create_string_buffer(_verdict_program(self.map_fd))
        lic = ctypes.create_string_buffer(b"GPL")
        log = ctypes.create_string_buffer(1 << 16)
        attr = struct.pack(
            "<IIQQIIQII16sII",
            _PROG_SK_SKB,
            (len(prog) - 1) // 8,  # the buffer adds a NUL after the 8-byte insns
            ctypes.addressof(prog),
            ctypes.addressof(lic),
            1,
            len(log),
            ctypes.addressof(log),
            0,
            0,
            b"probe",
            0,
            _ATTACH_SK_SKB_VERDICT,
        )
        try:
            self.prog_fd = _bpf(_BPF_PROG_LOAD, attr)
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror}\n{log.value.decode()}") from None
        _bpf(
            _BPF_PROG_ATTACH,
            struct.pack("<IIII", self.map_fd, self.prog_fd, _ATTACH_SK_SKB_VERDICT, 0),
        )

    def _put(self, key: int, sock: socket.socket) -> None:
        k = ctypes.create_string_buffer(struct.pack("<Q", key))
        v = ctypes.create_string_buffer(struct.pack("<Q", sock.fileno()))
        _bpf(
            _BPF_MAP_UPDATE_ELEM,
            struct.pack("<IIQQQ", self.map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0),
        )

    def serve(self, client: socket.socket, target: tuple[str, int]) -> None:
        with client:
            try:
                backend = socket.create_connection(target)
            except OSError:
                return
            with backend:
                self._relay(client, backend)

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        base = {s: (_info(s, _TCPI_BYTES_RECEIVED), _sent(s)) for s in (a, b)}
        for s, o in ((a, b), (b, a)):
            self._put(_cookie(s), o)
        for s, o in ((a, b), (b, a)):  # bytes that came before the socket joined the map
            with contextlib.suppress(BlockingIOError):
                o.sendall(s.recv(1 << 16, socket.MSG_DONTWAIT))
        poller = select.poll()
        for s in (a, b):
            poller.register(s, select.POLLRDHUP)
        ends = {a.fileno(): (a, b), b.fileno(): (b, a)}
        while ends:
            for fd, _ev in poller.poll():
                if fd not in ends:
                    continue
                s, o = ends.pop(fd)
                poller.unregister(fd)
                got = _info(s, _TCPI_BYTES_RECEIVED) - base[s][0]
                deadline = time.monotonic() + 5
                while _sent(o) - base[o][1] < got and time.monotonic() < deadline:
                    time.sleep(0.001)  # no event for "the kernel has passed it on"
                with contextlib.suppress(OSError):  # the peer may be gone already
                    o.shutdown(socket.SHUT_WR)


def _cookie(s: socket.socket) -> int:
    return int(struct.unpack("<Q", s.getsockopt(socket.SOL_SOCKET, _SO_COOKIE, 8))[0])


def _info(s: socket.socket, offset: int) -> int:
    raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return int(struct.unpack_from("<Q", raw, offset)[0])


def _sent(s: socket.socket) -> int:
    """Bytes handed to *s* for sending: acknowledged plus still queued."""
    outq = struct.unpack("<i", fcntl.ioctl(s.fileno(), _SIOCOUTQ, b"\0" * 4))[0]
    return _info(s, _TCPI_BYTES_ACKED) + int(outq)


def run_relay(listen: int, target: int) -> None:
    relay = SockmapRelay()
    with socket.create_server(("127.0.0.1", listen), backlog=128) as ls:
        while True:
            c, _ = ls.accept()
            threading.Thread(
                target=relay.serve, args=(c, ("127.0.0.1", target)), daemon=True
            ).start()


def _machine_busy() -> float:
    """CPU seconds spent on the whole machine (all CPUs, everything but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def bulk(name: str, cmd: list[str], listen: int, target: int, seconds: int) -> dict[str, float]:
    with (
        started(cmd, CPUS["relay"], listen) as relay,
        started(["iperf3", "-s", "-p", str(target)], CPUS["load"], target),
    ):
        # The baseline: what the rest of the machine (other tenants, the idle relay
        # and server) keeps busy when nothing is relayed, over as long as the test.
        b0, t0 = _machine_busy(), time.monotonic()
        time.sleep(seconds)
        idle_rate = (_machine_busy() - b0) / (time.monotonic() - t0)
        p0, m0, t0 = cpu_seconds(relay.pid), _machine_busy(), time.monotonic()
        out = subprocess.run(
            iperf3_client(listen, seconds),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        ).stdout
        p1, m1, t1 = cpu_seconds(relay.pid), _machine_busy(), time.monotonic()
    end = json.loads(out)["end"]
    gb = end["sum_received"]["bytes"] / 1e9
    idle = idle_rate * (t1 - t0)
    return {
        "gbit": end["sum_received"]["bits_per_second"] / 1e9,
        "relay_cpu_gb": (p1 - p0) / gb,
        "machine_cpu_gb": (m1 - m0 - idle) / gb,
        "raw_machine_cpu_gb": (m1 - m0) / gb,
        "idle_cpu_s": idle,
        "queued_mb": (end["sum_sent"]["bytes"] - end["sum_received"]["bytes"]) / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument(
        "--relay", nargs=2, type=int, metavar=("LISTEN", "TARGET"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    for name in ("rounds", "seconds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, not {getattr(args, name)}")
    if args.relay:
        run_relay(*args.relay)
        return
    names = ["go io.Copy", "reuselb asyncio+start_pipe_splice", "sockmap (probe)"]
    rows: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            listen, target = free_port(), free_port()
            if name.startswith("sockmap"):
                cmd = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--relay",
                    str(listen),
                    str(target),
                ]
            else:
                cmd = relay_cmd(name, listen, target, HERE / "work")
            rows[name].append(bulk(name, cmd, listen, target, args.seconds))
            print(name, {k: round(v, 3) for k, v in rows[name][-1].items()}, flush=True)
    go = {k: statistics.median(r[k] for r in rows["go io.Copy"]) for k in rows["go io.Copy"][0]}
    print(f"\nmedian of {args.rounds} rounds, iperf3 -t {args.seconds}")
    print(
        "| relay | Gbit/s | relay CPU-s/GB | machine CPU-s/GB, net of idle | idle CPU-s "
        "| machine CPU-s/GB, raw | queued MB at end "
        "| x Go: Gbit/s, relay CPU, machine CPU (net) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in names:
        m = {k: statistics.median(r[k] for r in rows[name]) for k in go}
        print(
            f"| {name} | {m['gbit']:.2f} | {m['relay_cpu_gb']:.3f} | {m['machine_cpu_gb']:.3f} | "
            f"{m['idle_cpu_s']:.2f} | {m['raw_machine_cpu_gb']:.3f} | {m['queued_mb']:.1f} | "
            f"{m['gbit'] / go['gbit']:.2f} / {m['relay_cpu_gb'] / go['relay_cpu_gb']:.2f}"
            f" / {m['machine_cpu_gb'] / go['machine_cpu_gb']:.2f} |"
        )


if __name__ == "__main__":
    main()
