"""The README's two set-up commands are the ones CI and users run."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines()]


def test_readme_starts_with_two_setup_commands() -> None:
    cmds = _setup_commands()
    assert len(cmds) == 2
    assert all(c.startswith("pip install torch==2.13.0") for c in cmds)
    assert (ROOT / "README.md").read_text().index("```bash") < 20


def test_ci_runs_both_readme_commands_as_written() -> None:
    import subprocess

    main_cmd, test_cmd = _setup_commands()
    res = subprocess.run([str(ROOT / ".ci" / "run"), "--plan"], capture_output=True, text=True, timeout=30, check=True)
    plan = dict(line.split(": ", 1) for line in res.stdout.splitlines())
    # The base install is the first line without its trailing `tierd serve` (the smoke step runs that).
    assert main_cmd == plan["base install"] + " && tierd serve"
    assert plan["test"] == test_cmd
    assert plan["smoke"] == "python .ci/smoke.py" and (ROOT / ".ci" / "smoke.py").is_file()


def _requires(example: Path) -> list[str]:
    """Modules an example needs beyond tierd's test install: its ``# requires: a, b`` line (after
    its docstring, before its imports)."""
    for line in example.read_text().splitlines():
        if line.startswith("# requires:"):
            return [m.strip() for m in line.removeprefix("# requires:").split(",") if m.strip()]
    return []


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.stem)
def test_examples_run(example: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    for module in _requires(example):
        # The serving engines install apart (.ci/engines); .ci/run's third step runs these.
        pytest.importorskip(module)
    res = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)})
    assert res.returncode == 0, f"{example.name} failed:\n{res.stderr}"


def test_import_tierd_loads_no_serving_engine() -> None:
    import subprocess
    import sys

    code = ("import sys, tierd, tierd.integrations; "
            "print(sorted(m for m in ('transformers', 'lmcache', 'sglang', 'triton') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert res.stdout.strip() == "[]"
