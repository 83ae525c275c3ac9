"""Optional dependencies: imported where they are used, with an error that says how to install them.

The base install (``pip install -e .``) runs the daemon, the embedded store
and the CLI; redis-py (the remote tier), kvikio (GPUDirect Storage) and
matplotlib (plots) come with extras. Nothing at ``import tierd`` needs them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tierd.errors import ConfigError

__all__ = ["require"]

# module -> (the distribution pip installs, the tierd extra that brings it)
_EXTRAS = {
    "redis": ("redis", "redis"),
    "kvikio": ("kvikio-cu13", "gds"),
    "matplotlib": ("matplotlib", "bench"),
}


def require(module: str, *, needed_by: str, error: type[Exception] = ConfigError) -> ModuleType:
    """Import ``module``, or raise ``error`` naming what needs it (a config key, a flag) and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        dist, extra = _EXTRAS.get(module.partition(".")[0], (module, None))
        how = f"pip install 'tierd[{extra}]'" if extra else f"pip install {dist}"
        raise error(f"{needed_by} needs {dist}, which is not installed ({exc}); install it with: {how}") from exc
