"""Pruning methods. Importing this package registers every built-in method.

One module per family; each method is a class registered with
:func:`~prunekit.methods.registry.register_method`.
"""

# Every family module, imported for its registrations (one module per family).
from prunekit.methods import (  # noqa: E402, F401
    baselines,
    eigendamage,
    gradflow,
    interpolative,
    koopman,
    lowrank,
    peers,
    provable,
)
from prunekit.methods.base import BudgetOptions, ChannelScorer, Method, PruneContext, Target, WeightScorer
from prunekit.methods.registry import (
    MethodInfo,
    create_method,
    get_method_info,
    list_methods,
    register_method,
    unregister_method,
)

__all__ = ["BudgetOptions", "ChannelScorer", "Method", "MethodInfo", "PruneContext", "Target", "WeightScorer",
           "create_method", "get_method_info", "list_methods", "register_method", "unregister_method"]
