"""prunekit: prune PyTorch networks with every method from the papers.

Quick start::

    import prunekit
    model = prunekit.create_model("resnet20")
    result = prunekit.prune(model, "l1", "flops=2")
    prunekit.save(result.model, "pruned.pt")
"""

from prunekit._version import __version__
from prunekit.errors import PrunekitError
from prunekit.io import load, save
from prunekit.models import create_model, list_models

__all__ = ["__version__", "PrunekitError", "create_model", "list_models", "load", "save"]
