"""prunekit: prune PyTorch networks with every method from the papers.

Quick start::

    import prunekit
    model = prunekit.create_model("resnet20")
    result = prunekit.prune(model, "l1", "flops=2")
    prunekit.save(result.model, "pruned.pt")
"""

from prunekit._version import __version__
from prunekit.errors import PrunekitError, PruningError
from prunekit.io import load, save
from prunekit.models import create_model, list_models
from prunekit.methods import Target, create_method, list_methods
from prunekit.surgery import PruningWarning, analyze, apply_plan, apply_plan_
from prunekit.api import PruneResult, prune

__all__ = [
    "__version__",
    "PrunekitError",
    "PruneResult",
    "PruningError",
    "PruningWarning",
    "Target",
    "analyze",
    "apply_plan",
    "apply_plan_",
    "create_method",
    "create_model",
    "list_methods",
    "list_models",
    "load",
    "prune",
    "save",
]
