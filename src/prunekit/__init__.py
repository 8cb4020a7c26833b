"""prunekit: prune PyTorch networks with every method from the papers.

Quick start::

    import prunekit
    model = prunekit.create_model("resnet20")
    result = prunekit.prune(model, "l1", "flops=2")
    prunekit.save(result.model, "pruned.pt")

The public names below are imported lazily, so that ``import prunekit`` (and the CLI's
start-up) does not pay for torch and every method module until they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from prunekit._version import __version__
from prunekit.errors import PrunekitError, PruningError

_LAZY = {
    "PruneResult": "prunekit.api",
    "prune": "prunekit.api",
    "export": "prunekit.deploy",
    "load": "prunekit.io",
    "save": "prunekit.io",
    "Target": "prunekit.methods",
    "create_method": "prunekit.methods",
    "list_methods": "prunekit.methods",
    "create_model": "prunekit.models",
    "list_models": "prunekit.models",
    "PruningWarning": "prunekit.surgery",
    "analyze": "prunekit.surgery",
    "apply_plan": "prunekit.surgery",
    "apply_plan_": "prunekit.surgery",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from prunekit.api import PruneResult, prune  # noqa: F401
    from prunekit.deploy import export  # noqa: F401
    from prunekit.io import load, save  # noqa: F401
    from prunekit.methods import Target, create_method, list_methods  # noqa: F401
    from prunekit.models import create_model, list_models  # noqa: F401
    from prunekit.surgery import PruningWarning, analyze, apply_plan, apply_plan_  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", "PrunekitError", "PruningError", *sorted(_LAZY)]
