"""The documentation stays true to the code."""

from __future__ import annotations

from pathlib import Path

import reuselb
import reuselb.balance

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_public_name_is_in_the_api_reference() -> None:
    text = (DOCS / "api.md").read_text()
    missing = [
        n
        for n in reuselb.__all__
        if n != "__version__" and f"reuselb.{n}\n" not in text and f"### {n}\n" not in text
    ]
    assert not missing, f"add to docs/api.md: {missing}"


def test_every_public_balance_name_is_in_the_api_reference() -> None:
    # api.md says that names not listed are private; reuselb.balance exported
    # ketama_points, MAX_POINTS, POLICIES, ... without an entry
    text = (DOCS / "api.md").read_text()
    missing = [
        n
        for n in reuselb.balance.__all__
        if f"::: reuselb.{n}\n" not in text
        and f"::: reuselb.balance.{n}\n" not in text
        and f"### {n}\n" not in text
    ]
    assert not missing, f"add to docs/api.md: {missing}"


def test_every_public_function_documents_what_it_raises() -> None:
    undocumented = []
    for module in (reuselb, reuselb.balance):
        for name in module.__all__:
            obj = getattr(module, name)
            qualified = f"{module.__name__}.{name}"
            if callable(obj) and not isinstance(obj, type) and ":raises" not in (obj.__doc__ or ""):
                undocumented.append(qualified)
    assert not undocumented, undocumented
