"""The command line: doctor and demo run as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import tierd


def _run(args: list[str], home: Path, *, python: tuple[str, ...] = ("-m", "tierd"),
         **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERD_")}
    env |= {"XDG_CACHE_HOME": str(home), "XDG_RUNTIME_DIR": str(home), "TIERD_TIERS_HOST_SIZE": "256MiB", **extra}
    return subprocess.run([sys.executable, *python, *args], capture_output=True, text=True, timeout=300, env=env)


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


_WITHOUT_REDIS = "import sys; sys.modules['redis'] = None; from tierd.cli import main; sys.exit(main(sys.argv[1:]))"


def _run_without_redis(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a base install: importing redis-py fails as it does where it is not installed."""
    return _run(args, home, python=("-c", _WITHOUT_REDIS), **env)


def test_base_install_serves_and_checks_without_redis(tmp_path: Path) -> None:
    res = _run_without_redis(["doctor"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "remote tier" in res.stdout and "no tiers.remote.url" in res.stdout
    # A config that needs the missing extra: refused with the key and the install command, not a traceback.
    res = _run_without_redis(["serve"], tmp_path, TIERD_TIERS_REMOTE_URL="redis://127.0.0.1:1")
    assert res.returncode != 0
    assert "tiers.remote.url" in res.stderr and "pip install 'tierd[redis]'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    res = _run_without_redis(["doctor"], tmp_path, TIERD_TIERS_REMOTE_URL="redis://127.0.0.1:1")
    assert res.returncode == 1 and "pip install 'tierd[redis]'" in res.stdout


def test_doctor_pings_the_remote_tier(tmp_path: Path, redis_server: Any) -> None:
    ok = _run(["doctor"], tmp_path, TIERD_TIERS_REMOTE_URL=redis_server.url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "answers" in ok.stdout
    redis_server.stop()
    dead = _run(["doctor"], tmp_path, TIERD_TIERS_REMOTE_URL=redis_server.url)
    assert dead.returncode == 1 and "does not answer" in dead.stdout


def test_doctor_describes_a_cluster_and_warns_of_full_coverage(tmp_path: Path, redis_cluster: Any) -> None:
    env = {"TIERD_TIERS_REMOTE_URL": redis_cluster.seeds, "TIERD_TIERS_REMOTE_CLUSTER": "true"}
    ok = _run(["doctor"], tmp_path, **env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "cluster_state ok, 3 primaries" in ok.stdout
    client = redis_cluster.client()
    try:
        client.config_set("cluster-require-full-coverage", "yes", target_nodes=client.PRIMARIES)
        warned = _run(["doctor"], tmp_path, **env)
    finally:
        client.config_set("cluster-require-full-coverage", "no", target_nodes=client.PRIMARIES)
        client.close()
    assert "cluster-require-full-coverage yes" in warned.stdout, warned.stdout
    several = _run(["doctor"], tmp_path, TIERD_TIERS_REMOTE_URL=redis_cluster.seeds)
    assert several.returncode == 1 and "several seeds need cluster = true" in several.stdout
