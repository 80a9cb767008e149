"""reuselb's exceptions survive pickle and copy (a worker process's error read by its parent)."""

from __future__ import annotations

import copy
import errno
import pickle
from collections.abc import Callable

import pytest

import reuselb._errors as E
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
