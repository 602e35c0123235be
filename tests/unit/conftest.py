"""Unit tests run many sinks and fake backends in one process: none sees another's upkeep calls."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.requestvars import clear_background_calls


@pytest.fixture(autouse=True)
def no_background_calls_from_earlier_tests() -> Iterator[None]:
    clear_background_calls()
    yield
    clear_background_calls()
