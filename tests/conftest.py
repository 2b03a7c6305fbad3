"""Fixtures shared by the test packages (helpers live in modules of tests/)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.reliability import write_figures


@pytest.fixture(scope="module")
def reliability_figures() -> Iterator[None]:
    """Every reliability test module uses it: the run's figures are written when the module ends."""
    yield
    write_figures()
