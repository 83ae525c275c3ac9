"""The files in deploy/ are real: the example config loads, the unit file verifies."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tierd.config import load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_example_config_loads(tmp_path: Path) -> None:
    # The path and size are the service's; here they point at a temporary directory.
    env = {"TIERD_TIERS_NVME_PATH": str(tmp_path), "TIERD_TIERS_NVME_SIZE": "1GiB", "TIERD_TIERS_HOST_SIZE": "64MiB"}
    cfg = load_config(DEPLOY / "tierd.toml", env=env)
    assert cfg.daemon.socket == "/run/tierd/tierd.sock"
    assert cfg.namespace("ckpt").durable and cfg.namespace("kv").shared


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_file_verifies() -> None:
    res = subprocess.run(["systemd-analyze", "verify", str(DEPLOY / "tierd.service")], capture_output=True, text=True)
    # The unit names /usr/local/bin/tierd, which a test machine may lack; nothing else may be wrong.
    problems = [line for line in res.stderr.splitlines() if line and "/usr/local/bin/tierd" not in line]
    assert not problems, res.stderr
    text = (DEPLOY / "tierd.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "RuntimeDirectory=tierd"):
        assert line in text
