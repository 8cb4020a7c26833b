"""Pruning methods. Importing this package registers every built-in method.

One module per family; each method is a class registered with
:func:`~prunekit.methods.registry.register_method`.
"""

import importlib

from prunekit.methods.base import BudgetOptions, ChannelScorer, Method, PruneContext, Target, WeightScorer
from prunekit.methods.registry import (
    MethodInfo,
    create_method,
    get_method_info,
    list_methods,
    register_method,
    unregister_method,
)

# Family modules; a module that is not written yet is simply absent.
for _mod in ("baselines", "peers", "gradflow", "interpolative", "lowrank", "eigendamage", "sensitivity", "koopman"):
    try:
        importlib.import_module(f"prunekit.methods.{_mod}")
    except ModuleNotFoundError as _e:
        if _e.name != f"prunekit.methods.{_mod}":
            raise

__all__ = ["BudgetOptions", "ChannelScorer", "Method", "MethodInfo", "PruneContext", "Target", "WeightScorer",
           "create_method", "get_method_info", "list_methods", "register_method", "unregister_method"]
