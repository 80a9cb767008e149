"""The code in docs/policies/*.md runs: every ```python block of a page, in order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs" / "policies"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("page", ["custom.md", "index.md", "hashing.md", "round-robin.md"])
def test_policy_page_examples_run(page: str) -> None:
    text = (DOCS / page).read_text()
    blocks = BLOCK.findall(text)
    assert blocks, f"{page} has no python examples"
    namespace: dict[str, object] = {"__name__": f"docs_{page}"}
    for block in blocks:
        exec(compile(block, str(DOCS / page), "exec"), namespace)


def test_custom_policy_example_defines_a_working_policy() -> None:
    namespace: dict[str, object] = {"__name__": "docs_custom"}
    exec(BLOCK.findall((DOCS / "custom.md").read_text())[0], namespace)
    failover = namespace["Failover"]
    from reuselb import BalancePolicy

    assert isinstance(failover, type) and issubclass(failover, BalancePolicy)
    p = failover(["10.0.0.1:80", "10.0.0.2:80"])
    assert str(p.pick().address) == "10.0.0.1:80"
    assert str(p.copy().pick().address) == "10.0.0.1:80"
