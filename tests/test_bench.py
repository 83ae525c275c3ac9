"""``tierd bench``: the CLI runs real (tiny) suites and writes a well-formed report.

The figures themselves are not asserted (benchmarks prove speed, tests prove
behaviour); what is checked is that a user gets results.json with the machine
description, results.md with the targets and suite tables, and real PNGs.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TIERD_")}
    base["PYTHONPATH"] = str(ROOT)  # this checkout's tierd, and the bench/ beside it
    return subprocess.run([sys.executable, "-m", "tierd", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**base, **(env or {})})


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench-out")
    scratch = tmp_path_factory.mktemp("bench-scratch")
    res = _bench("policies", "scaling", "--smoke", "--out", str(out), "--dir", str(scratch))
    assert res.returncode == 0, res.stdout + res.stderr
    assert list(scratch.iterdir()) == [], "scratch files were left behind"
    return out, json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_results_json_describes_the_machine_and_every_suite(report: tuple[Path, dict[str, Any], str]) -> None:
    _, res, _ = report
    m = res["machine"]
    for key in ("cpu", "cores_logical", "ram_gib", "kernel", "python", "torch", "gpu", "git_commit", "date",
                "load_avg_start", "load_avg_end"):
        assert m[key] not in (None, ""), key
    assert {"device", "fstype", "mountpoint", "free_gib"} <= set(m["disk"])
    assert len(m["load_avg_start"]) == 3 and len(m["load_avg_end"]) == 3
    # scaling divides by memcpy and fio, so the limits ran first, in the same run.
    assert list(res["suites"]) == ["limits", "policies", "scaling"]
    assert res["limits"]["memcpy_1t_gbs"] > 0 and res["limits"]["memcpy_all_cores_gbs"] > 0
    for name, suite in res["suites"].items():
        assert "error" not in suite, name
        assert suite["headline"], name
    scaling = res["suites"]["scaling"]["results"]
    assert [r["size"] for r in scaling["size"]][0] == 4096
    assert scaling["count"][0]["objects"] == 1000 and scaling["count"][0]["traced_bytes_per_object"] > 0
    assert [r["clients"] for r in scaling["clients"]] == [1, 2]


def test_targets_say_met_or_missed(report: tuple[Path, dict[str, Any], str]) -> None:
    _, res, md = report
    targets = [t for t in res["targets"] if t["issue"] == 4]
    assert targets, "the policy suite carries issue 4's target"
    for t in targets:
        assert t["status"] in ("met", "missed") or t["target"].startswith("report"), t
        assert t["ratio"], t
        if t["status"] == "missed":
            assert t["note"], "a missed target says what limits it"
    assert "## Targets of issues 2-8" in md
    section = md.split("## Targets of issues 2-8", 1)[1].split("\n## ", 1)[0]
    assert section.count("\n| 4 |") == len(targets)


def test_results_md_has_a_table_and_plot_per_suite(report: tuple[Path, dict[str, Any], str]) -> None:
    out, res, md = report
    for heading in ("## Machine", "## Limits", "## Policies", "## Scaling"):
        assert heading in md, heading
    assert md.count("| measure | tierd | limit | peer | tierd / limit | tierd / peer | target | status |") == 3
    for name in ("policies", "scaling"):
        plots = res["suites"][name]["plots"]
        assert plots[0] == f"{name}.png"
        for plot in plots:
            assert f"![{name}]({plot})" in md
            width, height = _png_size(out / plot)
            assert width > 400 and height > 200
    assert res["suites"]["policies"]["plots"] == ["policies.png", "policies_sizes.png"]  # hit ratio by fast-tier size


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from tierd.cli import main

    rc = main(list(args))
    captured = capsys.readouterr()  # errors go to stderr
    return rc, " ".join((captured.out + captured.err).split())  # rich wraps long lines


def test_missing_bench_dir_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERD_BENCH_DIR", str(tmp_path / "nowhere"))
    rc, out = _cli(capsys, "bench", "policies", "--out", str(tmp_path / "out"))
    assert rc == 2
    assert "bench/ directory of a source checkout" in out and "TIERD_BENCH_DIR" in out
    assert not (tmp_path / "out").exists()


def test_unknown_suite_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _cli(capsys, "bench", "tier", "--out", str(tmp_path / "out"))
    assert rc == 2
    assert "unknown benchmark suite 'tier'" in out and "tiers" in out


def test_a_failing_suite_is_reported_not_hidden() -> None:
    from tierd.benchsuite import _import_suite, bench_dir

    suite = _import_suite(bench_dir())
    rows = suite.targets({"daemon": {"error": "DaemonUnavailable: tierd serve exited", "seconds": 1.0}})
    assert [(r["issue"], r["status"]) for r in rows] == [
        (3, "not run: the suite failed (DaemonUnavailable: tierd serve exited)")]


def test_the_package_and_bench_list_the_same_suites() -> None:
    from bench import suite
    from tierd import benchsuite

    assert benchsuite.SUITES == suite.SUITES  # tierd bench validates names before it can import bench/


def test_the_remote_suite_runs_on_a_server_a_cluster_and_a_failover(tmp_path: Path) -> None:
    import shutil

    if shutil.which("redis-benchmark") is None or shutil.which("redis-server") is None:
        pytest.skip("redis-server and redis-benchmark are not installed (apt-get install redis-server)")
    out = tmp_path / "out"
    res = _bench("remote", "--smoke", "--out", str(out), "--dir", str(tmp_path / "scratch"), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((out / "results.json").read_text())
    remote = report["suites"]["remote"]
    assert "error" not in remote and remote["plots"] == ["remote.png"]
    failover = remote["results"]["failover"]
    assert failover["healthy_failures"] == 0 and failover["wrong"] == 0 and failover["victim_failures"] > 0
    rows = [t for t in report["targets"] if t["issue"] == 19]
    assert len(rows) == 5 and all(t["status"] in ("met", "missed") for t in rows), rows
    assert "#### A primary killed" in (out / "results.md").read_text()
