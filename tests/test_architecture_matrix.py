"""Every architecture family against every method (tests/architecture_matrix.py): each cell as README states it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.architecture_matrix import EXPECTED, FAMILIES, METHODS, OK, check_cell, expected_here, markdown

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def _one_thread():  # tiny models: threads only add overhead, and keep the 300 cells quick
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cell(family: str, method: str) -> None:
    outcome = check_cell(family, method)
    if outcome.status == "skipped":
        pytest.skip(outcome.message)
    expected = expected_here(family, method)
    wanted = "works" if expected == OK else f"is refused at injection with {expected.match!r}"
    assert outcome.matches(expected), (
        f"{method} on {family} {wanted}; got {outcome.status}: {outcome.message}"
    )


def test_readme_table_is_generated_from_the_expected_outcomes() -> None:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- architectures:start -->\n(.*?)\n<!-- architectures:end -->", text, re.S)
    assert found, "README.md lacks the <!-- architectures:start/end --> markers around the architecture table"
    assert found.group(1).strip() == markdown().strip(), (
        "regenerate: python -m tests.architecture_matrix --markdown"
    )


def test_every_refusal_names_its_reason_in_the_table() -> None:
    table = markdown()
    reasons = {reason for row in EXPECTED.values() for reason in row.values() if reason != OK}
    assert reasons and all(f". {reason.why}." in table for reason in reasons)
    assert table.count(" ✓ |") == sum(v == OK for row in EXPECTED.values() for v in row.values())
