"""``bench/gpu_check.sh --dry``: the prepared GPU check's wheels and plan, checked on any machine."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"

# The names a session downloads for the GPU machine (cp312, manylinux x86-64), as pip saves them.
WHEELS = [
    "msgspec-0.23.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
    "lmdb-3.0.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
    "zstandard-0.25.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    "kvikio_cu13-26.10.0-cp311-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "libkvikio_cu13-26.10.0-py3-none-manylinux_2_28_x86_64.whl",
    "rapids_logger-0.3.0-py3-none-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
]


def _dry(wheels: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TIERD_WHEELS": str(wheels)}
    return subprocess.run(["bash", str(SCRIPT), "--dry"], env=env, capture_output=True, text=True, timeout=30)


def _wheel_dir(tmp_path: Path, names: list[str]) -> Path:
    d = tmp_path / "whl"
    d.mkdir()
    for name in names:
        (d / name).touch()
    return d


def test_dry_run_prints_the_plan_within_the_time_limit(tmp_path: Path) -> None:
    done = _dry(_wheel_dir(tmp_path, WHEELS))
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("step ")]
    assert steps == ["wheels", "project", "machine", "tests", "bench"]
    out = done.stdout
    assert "--no-deps --no-build-isolation -e ." in out  # the project itself, without touching the image
    assert "tests/test_gpu.py tests/test_training.py" in out and "tierd bench gpu training" in out
    limits = [int(line.split()[2].rstrip("s")) for line in out.splitlines() if line.startswith("step ")]
    assert sum(limits) <= 8 * 60
    assert "wheels and plan are in order" in out


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda w: [n for n in w if not n.startswith("lmdb")], "missing wheel: lmdb"),
        (lambda w: [*w, "msgspec-0.22.0-cp312-cp312-manylinux_2_17_x86_64.whl"], "two versions of msgspec"),
        (lambda w: [n.replace("cp312-cp312", "cp311-cp311") if n.startswith("zstandard") else n for n in w],
         "is not for CPython 3.12"),
        (lambda w: [n.replace("x86_64", "aarch64") if n.startswith("msgspec") else n for n in w],
         "is not for x86-64 Linux"),
    ],
    ids=["missing", "two-versions", "wrong-python", "wrong-platform"],
)
def test_dry_run_refuses_wheels_that_would_not_install(tmp_path: Path, change, complaint: str) -> None:
    done = _dry(_wheel_dir(tmp_path, change(list(WHEELS))))
    assert done.returncode == 2
    assert complaint in done.stdout
