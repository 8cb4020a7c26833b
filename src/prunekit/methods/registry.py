"""Method registry: ``@register_method`` + ``list_methods`` + ``create_method``.

Registering a method is all it takes to get it into the CLI (`prunekit methods`,
`prunekit prune --method`), the benchmark runner, and the registry-generated tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from prunekit.errors import UnknownNameError

Granularity = Literal["weight", "channel", "lowrank"]
_GRANULARITIES = ("weight", "channel", "lowrank")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    cls: type
    granularity: Granularity
    needs_data: bool
    needs_labels: bool
    needs_grad: bool
    needs_second_order: bool
    needs_trajectory: bool
    family: str
    description: str
    requires: str | None = None  # optional package the method needs (e.g. "torch_pruning")
    paper: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cls")
        return d

    def available(self) -> bool:
        """Whether the optional package the method needs is importable."""
        if not self.requires:
            return True
        import importlib.util

        return importlib.util.find_spec(self.requires) is not None


_METHODS: dict[str, MethodInfo] = {}


def register_method(
    name: str,
    *,
    granularity: Granularity,
    needs_data: bool = False,
    needs_labels: bool | None = None,
    needs_grad: bool = False,
    needs_second_order: bool = False,
    needs_trajectory: bool = False,
    family: str = "baseline",
    description: str = "",
    requires: str | None = None,
    paper: str = "",
) -> Callable[[type], type]:
    """Class decorator registering a :class:`prunekit.methods.base.Method` subclass.

    ``needs_labels`` defaults to ``needs_grad`` (gradients of the loss need labels).
    Duplicate names raise ``ValueError``.
    """
    if granularity not in _GRANULARITIES:
        raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")

    def deco(cls: type) -> type:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered (by {_METHODS[name].cls.__qualname__})")
        doc = (cls.__doc__ or "").strip().splitlines()
        info = MethodInfo(
            name=name, cls=cls, granularity=granularity,
            needs_data=needs_data or needs_grad or needs_second_order,
            needs_labels=needs_grad if needs_labels is None else needs_labels,
            needs_grad=needs_grad, needs_second_order=needs_second_order, needs_trajectory=needs_trajectory,
            family=family, description=description or (doc[0] if doc else ""), requires=requires, paper=paper,
        )
        _METHODS[name] = info
        cls.name = name
        cls.info = info
        return cls

    return deco


def unregister_method(name: str) -> None:
    """Remove a method (for tests that register throw-away methods)."""
    _METHODS.pop(name, None)


def _load_builtin() -> None:
    import prunekit.methods  # noqa: F401  (importing the package registers every built-in method)


def list_methods(available_only: bool = False, **filters: Any) -> list[str]:
    """Names of registered methods whose metadata match ``filters``.

    >>> list_methods(granularity="channel", needs_data=False)
    """
    _load_builtin()
    valid = set(MethodInfo.__dataclass_fields__) - {"cls"}
    bad = set(filters) - valid
    if bad:
        raise ValueError(f"unknown filter(s) {sorted(bad)}; valid: {sorted(valid)}")
    out = []
    for n, info in _METHODS.items():
        if all(getattr(info, k) == v for k, v in filters.items()) and (not available_only or info.available()):
            out.append(n)
    return sorted(out)


def get_method_info(name: str) -> MethodInfo:
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownNameError("method", name, list(_METHODS)) from None


def create_method(name: str, **options: Any) -> Any:
    """Instantiate method ``name`` with its options (unknown options raise PruningError)."""
    return get_method_info(name).cls(**options)
