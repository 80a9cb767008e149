"""``python -m reuselb``: the demo (not library API)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from ._errors import ReuselbError


def _number(text: str) -> int:
    """*text* as a decimal int, or an error naming *text* (argparse names the option).

    A ValueError from ``int()`` would reach the user as "invalid _port value",
    naming this module's helper, not the bad value. ASCII digits only: ``int()``
    would also take "1_0", " 5" and digits of other scripts.
    """
    if not re.fullmatch(r"-?[0-9]{1,20}", text):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def _positive(text: str) -> int:
    value = _number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _number(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} out of range 0-65535")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reuselb", description="The reuselb demo (not library API)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demonstration scenarios on loopback")
    demo.add_argument("--workers", type=_positive, default=3, help="worker processes (3)")
    demo.add_argument("--requests", type=_positive, default=20, help="client connections (20)")
    demo.add_argument("--port", type=_port, default=0, help="port (default: a free one)")
    demo.add_argument("--clients", type=_positive, default=10, help="proxy clients (10)")
    demo.add_argument(
        "scenario",
        nargs="?",
        choices=("all", "reuseport", "proxy"),
        default="all",
        help="which scenario (default: all)",
    )
    args = parser.parse_args(argv)

    from ._demo import DemoError, proxy_scenario, reuseport_scenario

    try:
        if args.scenario in ("all", "reuseport"):
            reuseport_scenario(args.workers, args.requests, args.port)
        if args.scenario in ("all", "proxy"):
            print()
            proxy_scenario(args.clients)
    except (ReuselbError, DemoError) as exc:
        print(f"reuselb demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C. The scenarios stopped their workers in their `finally` (the workers
        # ignore SIGINT, which the terminal sends to the whole process group): exit
        # with the status a shell gives a process killed by SIGINT (128 + 2), no
        # traceback.
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`). The scenarios already stopped their
        # workers in their `finally`; point stdout at /dev/null so the interpreter's
        # final flush does not raise again, and exit like a SIGPIPE'd tool would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except OSError as exc:
        # Out of a resource the scenarios do not name themselves (EMFILE making the
        # demo's own sockets, ENOBUFS): one line, not a traceback. After
        # BrokenPipeError, which is an OSError too.
        print(f"reuselb demo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
