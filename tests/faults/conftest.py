"""Figures of the fault tests (runs, objects checked, faults injected, lost, soak rates), summed at the end.

``pytest tests/faults`` prints them after the results; with ``TIERD_FAULTS_REPORT=PATH`` they are
also written there as JSON (what the reliability issue quotes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest

_FIGURES: dict[str, dict[str, Any]] = {}


@pytest.fixture
def fault_report() -> Callable[..., None]:
    """``fault_report(name, runs=1, objects=..., ...)``: counts (ints) add up across calls; other values replace."""

    def record(name: str, **figures: Any) -> None:
        row = _FIGURES.setdefault(name, {})
        for key, value in figures.items():
            counted = isinstance(value, int) and not isinstance(value, bool)
            row[key] = row.get(key, 0) + value if counted else value

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("tierd fault figures")
    for name, row in _FIGURES.items():
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{k}={v}" for k, v in row.items()))
    path = os.environ.get("TIERD_FAULTS_REPORT")
    if path:
        with open(path, "w") as fh:
            json.dump(_FIGURES, fh, indent=2)
