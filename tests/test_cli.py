"""The command line: doctor and demo run as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tierd


def _run(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERD_")}
    env |= {"XDG_CACHE_HOME": str(home), "TIERD_TIERS_HOST_SIZE": "256MiB"}
    return subprocess.run([sys.executable, "-m", "tierd", *args], capture_output=True, text=True, timeout=300, env=env)


def test_doctor_reports_a_table(tmp_path: Path) -> None:
    res = _run(["doctor"], tmp_path)
    assert res.returncode == 0, res.stderr
    for check in ("host tier", "O_DIRECT", "nvme space", "ulimit -l", "GPU", "GDS"):
        assert check in res.stdout


def test_demo_runs_beside_a_store_that_owns_the_default_directory(tmp_path: Path) -> None:
    # Like a daemon started with the default config: it holds ~/.cache/tierd.
    with tierd.open({"tiers": {"host": {"size": "64MiB"}, "nvme": {"path": str(tmp_path / "tierd"), "size": "256MiB"}}}):
        res = _run(["demo"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "where the objects went" in res.stdout and "yes" in res.stdout and "NO" not in res.stdout
    assert not any(p.name.startswith("tierd-demo-") for p in tmp_path.iterdir())  # scratch removed
