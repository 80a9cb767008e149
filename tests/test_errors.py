"""reuselb's exceptions survive pickle and copy (a worker process's error read by its parent)."""

from __future__ import annotations

import copy
import errno
import pickle
from collections.abc import Callable

import pytest

import reuselb._errors as E
from reuselb import parse_address as reuselb_parse
from reuselb.balance._factory import make_policy

SAMPLES: dict[str, list[E.ReuselbError]] = {
    "InvalidArgument": [E.InvalidArgument("backlog", -1, "must be >= 1")],
    "AddressError": [E.AddressError("10.0.0.1", "no port given")],
    "HostNotFound": [E.HostNotFound("nowhere.invalid", "Name or service not known")],
    "ReuseportUnsupported": [E.ReuseportUnsupported("not Linux")],
    "AddressInUse": [
        E.AddressInUse("127.0.0.1:8080"),
        E.AddressInUse("127.0.0.1:0", ephemeral=True),
        E.AddressInUse("127.0.0.1:8080", "Address already in use"),
    ],
    "WrongSocketType": [E.WrongSocketType("listener", "SOCK_STREAM", "SOCK_DGRAM")],
    "SocketClosed": [E.SocketClosed("<socket fd=-1>", "listener", "closed before use")],
    "GroupMemberError": [
        E.GroupMemberError(2, 4, "127.0.0.1:8080", OSError(errno.EMFILE, "Too many open files")),
        E.GroupMemberError(0, 1, "127.0.0.1:8080", ValueError("bad")),
    ],
    "NoNodeAvailable": [E.NoNodeAvailable("round-robin", "all nodes are down")],
    "UnknownNode": [E.UnknownNode("10.0.0.9:80")],
    "DuplicateNode": [E.DuplicateNode("10.0.0.1:80")],
    "LeaseReleased": [E.LeaseReleased("10.0.0.1:80")],
    "UnknownPolicy": [E.UnknownPolicy("fastest", ("round-robin", "maglev"))],
    "KeyRequired": [E.KeyRequired("maglev")],
    "InvalidKey": [E.InvalidKey(5), E.InvalidKey("\udc80", "a lone surrogate")],
    "HandoffError": [E.HandoffError("channel closed after 0 of 8 header bytes")],
    "SteeringError": [E.SteeringError("no program attached", errno.ENOENT), E.SteeringError("x")],
}

ROUND_TRIPS: dict[str, Callable[[E.ReuselbError], object]] = {
    "pickle": lambda e: pickle.loads(pickle.dumps(e)),
    "copy": copy.copy,
    "deepcopy": copy.deepcopy,
}


def test_every_exception_class_has_a_sample() -> None:
    assert set(SAMPLES) == set(E.__all__) - {"ReuselbError"}


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
@pytest.mark.parametrize(
    "exc", [e for group in SAMPLES.values() for e in group], ids=lambda e: type(e).__name__
)
def test_an_exception_survives_a_round_trip(exc: E.ReuselbError, how: str) -> None:
    back = ROUND_TRIPS[how](exc)
    assert type(back) is type(exc)
    assert isinstance(back, E.ReuselbError)
    assert str(back) == str(exc)
    assert back.args == exc.args
    assert back.__dict__ == exc.__dict__
    if isinstance(exc, OSError):
        assert isinstance(back, OSError)
        assert (back.errno, back.strerror) == (exc.errno, exc.strerror)


def test_a_policy_error_from_a_worker_reads_the_same_in_the_parent() -> None:
    # What multiprocessing and concurrent.futures do with a worker's exception.
    policy = make_policy("round-robin", [])
    with pytest.raises(E.NoNodeAvailable) as info:
        policy.pick()
    back = pickle.loads(pickle.dumps(info.value))
    assert isinstance(back, E.NoNodeAvailable)
    assert str(back) == str(info.value)
    assert (back.policy, back.reason) == (info.value.policy, info.value.reason)


def test_a_subclass_defined_elsewhere_survives_pickle() -> None:
    with pytest.raises(E.InvalidArgument) as info:
        make_policy("round-robin", [], no_such_option=1)
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is type(info.value)
    assert str(back) == str(info.value)


# An int past CPython's str() limit (sys.get_int_max_str_digits(), 4,300 digits by
# default since 3.11): repr() of it, or of a tuple holding it, raises ValueError.
_HUGE = 10**5000


def _huge_cases() -> list[tuple[str, Callable[[], object], type[Exception], str]]:
    import reuselb
    from reuselb import balance

    nodes = ["127.0.0.1:1", "127.0.0.1:2"]
    return [
        ("address int", lambda: reuselb.parse_address(_HUGE), E.AddressError, "port <int"),
        ("address port", lambda: reuselb.parse_address(("h", _HUGE)), E.AddressError, "('h', <int"),
        (
            "scope_id",
            lambda: reuselb.parse_address(("::1", 1, 0, _HUGE)),
            E.AddressError,
            "scope_id <int",
        ),
        (
            "backlog",
            lambda: reuselb.reuseport_listener(("127.0.0.1", 0), backlog=_HUGE),
            E.InvalidArgument,
            "invalid backlog <int",
        ),
        (
            "weight",
            lambda: balance.RoundRobin(nodes).add("127.0.0.1:3", weight=_HUGE),
            E.InvalidArgument,
            "invalid weight <int",
        ),
        (
            "key",
            lambda: balance.MaglevHash(nodes).pick(_HUGE),  # type: ignore[arg-type]
            E.InvalidKey,
            "invalid key <int",
        ),
        ("node", lambda: balance.RoundRobin(nodes).remove(_HUGE), E.UnknownNode, "node <int"),
        (
            "policy",
            lambda: make_policy(_HUGE, nodes),  # type: ignore[arg-type]
            E.UnknownPolicy,
            "policy <int",
        ),
    ]


@pytest.mark.parametrize("case", _huge_cases(), ids=lambda c: c[0])
def test_an_int_too_long_to_print_is_named_by_its_size(
    case: tuple[str, Callable[[], object], type[Exception], str],
) -> None:
    # It raised ValueError("Exceeds the limit (4300 digits) ...") from building the
    # message, instead of the error that names the value.
    _, call, kind, shown = case
    with pytest.raises(kind) as info:
        call()
    assert shown in str(info.value)
    assert "of about 5,001 digits>" in str(info.value)


def test_a_group_error_with_an_unprintable_count_still_reads() -> None:
    exc = E.GroupMemberError(3, _HUGE, "127.0.0.1:80", OSError(errno.EMFILE, "Too many"))
    assert "member 3 of <int of about 5,001 digits> failed" in str(exc)
    assert exc.count == _HUGE and exc.errno == errno.EMFILE


def test_a_value_whose_repr_raises_is_named_by_its_type() -> None:
    class Opaque:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    exc = E.InvalidArgument("x", Opaque(), "must be an int")
    assert str(exc) == "invalid x <Opaque whose repr() raised RuntimeError>: must be an int"
    assert E.shown(-_HUGE) == "<negative int of about 5,001 digits>"
    assert E.shown((_HUGE,)) == "(<int of about 5,001 digits>,)"
    assert E.shown(12) == "12"
    # A tuple nested past the recursion limit: repr() raises RecursionError, and the
    # message still reads (one level expanded, never recursively).
    deep: object = ("::1", 1)
    for _ in range(5000):
        deep = (deep,)
    assert E.shown(deep) == "(<tuple whose repr() raised RecursionError>,)"
    with pytest.raises(E.AddressError, match="tuple whose repr"):
        reuselb_parse(deep)  # type: ignore[arg-type]
