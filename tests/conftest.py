from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def small_config(path: Path, *, host: str = "64MiB", nvme: str = "256MiB", **extra: Any) -> dict[str, Any]:
    """A config with small tiers under ``path``; ``extra`` merges into the top level."""
    cfg: dict[str, Any] = {
        "tiers": {
            "host": {"size": host},
            "nvme": {"path": str(path), "size": nvme, "slab_size": "64MiB", "chunk_size": "1MiB"},
        }
    }
    for key, value in extra.items():
        cfg[key] = value
    return cfg


@pytest.fixture
def nvme_dir(tmp_path: Path) -> Path:
    d = tmp_path / "nvme"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def _no_user_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's TIERD_* variables must not change what the tests see.
    import os

    for var in list(os.environ):
        if var.startswith("TIERD_"):
            monkeypatch.delenv(var)
