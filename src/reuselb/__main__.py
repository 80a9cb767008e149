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


#: The scenario each of the demo's options is for (``all`` runs both, and takes all).
_OPTION_SCENARIO = {
    "workers": "reuseport",
    "requests": "reuseport",
    "port": "reuseport",
    "clients": "proxy",
}


def _typed_order(argv: Sequence[str], options: list[str]) -> list[str]:
    """*options* (names without ``--``) in the order the user typed them in *argv*,
    as argparse read them: ``--name``, ``--name=value`` or an unambiguous prefix of
    the name (argparse has refused an ambiguous one already)."""
    first: dict[str, int] = {}
    for i, token in enumerate(argv):
        if token == "--":  # what follows is positional
            break
        name = token.split("=", 1)[0]
        if not name.startswith("--") or len(name) < 3:
            continue
        for option in options:
            if f"--{option}".startswith(name):
                first.setdefault(option, i)
    return sorted(options, key=lambda o: first.get(o, len(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reuselb", description="The reuselb demo (not library API)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demonstration scenarios on loopback")
    # Defaults of None: an option given explicitly is told from one left out, so
    # one given for a scenario that does not run is refused (`demo proxy --port
    # 18080` ran the proxy on a free port, the option silently ignored).
    demo.add_argument("--workers", type=_positive, help="reuseport scenario: worker processes (3)")
    demo.add_argument(
        "--requests", type=_positive, help="reuseport scenario: client connections (20)"
    )
    demo.add_argument("--port", type=_port, help="reuseport scenario: port (default: a free one)")
    demo.add_argument("--clients", type=_positive, help="proxy scenario: clients (10)")
    demo.add_argument(
        "scenario",
        nargs="?",
        choices=("all", "reuseport", "proxy"),
        default="all",
        help="which scenario (default: all)",
    )
    typed = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(typed)
    wrong = [
        option
        for option, scenario in _OPTION_SCENARIO.items()
        if getattr(args, option) is not None and args.scenario not in ("all", scenario)
    ]
    if wrong:
        # All of them, in the order typed: naming only the first in this table's
        # order sent the user back to fix one option at a time. (They all belong to
        # the one scenario that does not run: there are two.)
        names = [f"--{o}" for o in _typed_order(typed, wrong)]
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        verb = "is" if len(names) == 1 else "are"
        scenario = _OPTION_SCENARIO[wrong[0]]
        demo.error(f"{listed} {verb} for the {scenario} scenario, not {args.scenario}")
    workers = 3 if args.workers is None else args.workers
    requests = 20 if args.requests is None else args.requests
    port = 0 if args.port is None else args.port
    clients = 10 if args.clients is None else args.clients

    from ._demo import DemoError, proxy_scenario, reuseport_scenario

    try:
        if args.scenario in ("all", "reuseport"):
            reuseport_scenario(workers, requests, port)
        if args.scenario in ("all", "proxy"):
            print()
            proxy_scenario(clients)
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
