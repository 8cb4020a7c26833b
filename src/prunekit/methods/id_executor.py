"""The activation executor of interpolative-decomposition pruning (:mod:`prunekit.methods.interpolative`).

It streams the prune set through the model and accumulates, for every *read point* of a channel group
(the input of one of its consumers), the TSQR ``R`` factor of the activations as that consumer reads
them. :class:`_FxRunner` runs the ``torch.fx`` graph node by node and caches restart values, so after a
group is pruned only the layers downstream of it are run again; :class:`_HookRunner` is the fallback for
models ``torch.fx`` cannot trace (full forward passes with hooks: the same factors, slower).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from prunekit.errors import PruningError
from prunekit.linalg import TSQR, small_ops

_BINARY_OPS = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift",
               "matmul"}
_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


# --------------------------------------------------------------------------------------------- records
@dataclass
class _ReadPoint:
    """Where the consumers of one group read its channels (one tensor)."""

    key: str
    group: str
    consumers: list[str]  # consumer layer paths reading this tensor
    positions: torch.Tensor  # (group size, E): positions of each channel along the channel axis (original numbering)
    channel_dim: int  # axis of the activation holding the positions (1: conv input, -1: linear input)
    index: int = 0  # execution position where it is captured (first consumer call)
    node: Any = None  # the torch.fx node read (fx runner) / capturing module path (hook runner)


@dataclass
class _GroupState:
    key: str
    size: int
    kept: torch.Tensor  # kept original channel indices, sorted
    read_points: list[_ReadPoint]
    layers: list[str]  # producers + depthwise + consumers (cost of the group)
    min_keep: int
    multiple_of: int
    first_consumer: int = 0  # execution position of the first consumer (activations change after it)
    first_change: int = 0  # execution position of the first layer whose tensors the group slices
    r_piv: torch.Tensor | None = None  # pivoted R of the stacked read points (cached)
    cache: dict[Any, Any] = field(default_factory=dict)  # values derived from r_piv (cleared with it)
    perm: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def _accumulate(acc: TSQR, act: torch.Tensor, rp: _ReadPoint, pos: torch.Tensor) -> None:
    """Add the rows of ``Z`` (examples x positions by the group's current channels) of one batch.

    ``pos`` is ``(C, E)``: the ``E`` entries of channel ``c`` along the channel axis (current
    numbering); the ``E`` entries become extra rows (``T (x) I_E`` is then the right correction).
    """
    x = act.detach()
    if x.dim() == 1:
        x = x.unsqueeze(0)
    c, e = pos.shape
    width = x.shape[rp.channel_dim]
    if e == 1 and c == width and bool((pos[:, 0] == torch.arange(c, device=pos.device)).all()):
        acc.update_channels(x, rp.channel_dim)  # every channel, in order: no gather copy
        return
    x = x.movedim(rp.channel_dim, -1)
    x = x.reshape(-1, x.shape[-1])
    if e == 1:
        acc.update(x.index_select(1, pos[:, 0].to(x.device)))
        return
    z = x.index_select(1, pos.reshape(-1).to(x.device)).reshape(-1, c, e)
    acc.update(z.transpose(1, 2).reshape(-1, c))


# --------------------------------------------------------------------------------------------- runners
class _Runner:
    """Runs the prune set through the working model and returns ``R`` factors of read points."""

    batches: list[torch.Tensor]

    def order(self, consumer: str) -> int | None:
        """Execution position of a layer called exactly once (None otherwise)."""
        raise NotImplementedError

    def position(self, path: str) -> int:
        """First execution position of a module (or ``get_attr`` of a tensor); 0 when unknown."""
        return 0

    def read_node(self, consumer: str) -> Any:
        raise NotImplementedError

    def setup(self, read_points: list[_ReadPoint], changes: list[int]) -> None:
        """Called once the read points and the groups' first changed positions are known (choose caches)."""

    def collect(self, needed: list[_ReadPoint], pos: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def changed(self, index: int) -> None:
        """The layer at execution position ``index`` changed: drop caches after it."""


class _FxRunner(_Runner):
    """Node-by-node execution of the ``torch.fx`` graph with cached restart points.

    A restart point ``p`` stores, per batch, every value computed before node ``p`` that a node at
    or after ``p`` uses (its *frontier*); the network can then be re-run from ``p`` alone.
    """

    def __init__(self, model: nn.Module, batches: list[torch.Tensor], cache_bytes: float, block: str):
        import torch.fx

        self.model = model
        self.batches = batches
        self.cache_bytes = cache_bytes
        self.block = block
        gm = torch.fx.symbolic_trace(model)
        self.nodes = list(gm.graph.nodes)
        self.pos_of = {n: i for i, n in enumerate(self.nodes)}
        last: dict[Any, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a] = max(last.get(a, -1), i)
        self.last_use = last
        self.free_at: list[list[Any]] = [[] for _ in self.nodes]
        for n, i in last.items():
            self.free_at[i].append(n)
        self.calls: dict[str, list[int]] = defaultdict(list)
        for i, n in enumerate(self.nodes):
            if n.op in ("call_module", "get_attr"):
                self.calls[str(n.target)].append(i)
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.restarts: list[int] = [0]
        self.cache: dict[int, list[tuple[Any, ...]]] = {}
        self.frontiers: dict[int, list[Any]] = {0: []}
        self.mutated: dict[int, list[bool]] = {0: []}
        self.valid: set[int] = {0}
        self.cache_planned_mb = 0.0
        self.capture: dict[int, list[_ReadPoint]] = defaultdict(list)
        self.bn_pairs = self._conv_bn_pairs()
        self.fused: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    def _conv_bn_pairs(self) -> dict[Any, Any]:
        """conv node -> the eval-mode BatchNorm node that is its only user (computed as one fused conv)."""
        pairs = {}
        for n in self.nodes:
            if n.op != "call_module" or len(n.users) != 1 or n.kwargs:
                continue
            conv = self.model.get_submodule(str(n.target))
            (b,) = n.users
            if not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed or b.op != "call_module":
                continue
            bn = self.model.get_submodule(str(b.target))
            if (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None
                    and len(b.args) == 1 and b.args[0] is n and not b.kwargs and type(conv).forward in _CONV_FORWARDS):
                pairs[n] = b
        return pairs

    def _fuse(self) -> None:
        """Folded weights of every conv -> BatchNorm pair, from the current (possibly sliced) modules."""
        from torch.nn.utils.fusion import fuse_conv_bn_weights

        self.fused = {}
        for n, b in self.bn_pairs.items():
            conv, bn = self.model.get_submodule(str(n.target)), self.model.get_submodule(str(b.target))
            if bn.training:
                continue
            w, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                           bn.weight, bn.bias)
            self.fused[n] = (w.detach(), bias.detach())
            self.fused[b] = None  # type: ignore[assignment]

    # -- structure ------------------------------------------------------------------------------
    def order(self, consumer: str) -> int | None:
        calls = self.calls.get(consumer, [])
        return calls[0] if len(calls) == 1 else None

    def position(self, path: str) -> int:
        calls = self.calls.get(path, [])
        return calls[0] if calls else 0

    def read_node(self, consumer: str) -> Any:
        node = self.nodes[self.calls[consumer][0]]
        return node.args[0] if node.args else None

    def _frontier(self, p: int) -> list[Any]:
        return [n for n in self.nodes[:p] if n.op != "get_attr" and self.last_use.get(n, -1) >= p]

    def setup(self, read_points: list[_ReadPoint], changes: list[int]) -> None:
        for rp in read_points:
            self.capture[rp.index].append(rp)
        changes = sorted({c for c in changes if c > 0})
        if not changes or self.cache_bytes <= 0:
            return
        # a step that prunes a group changes the model from its first layer on, so the useful restart
        # point of a group is at or before that position: the one with the smallest frontier since the
        # previous group's (e.g. a residual block's input, not the two tensors inside the block)
        per_sample = self._probe_sizes(self.batches[0][:2], changes[-1])
        candidates, prev = [], 0
        for c in changes:
            window = range(prev + 1, c + 1)
            best = min(window, key=lambda p: (per_sample[p], -p))
            candidates.append(best)
            prev = c
        total = sum(len(b) for b in self.batches)
        budget = self.cache_bytes
        chosen = []
        for p in sorted(set(candidates), reverse=True):  # deep restart points save the most work
            need = per_sample[p] * total
            if need <= budget:
                chosen.append(p)
                budget -= need
        self.restarts = sorted([0, *chosen])
        self.frontiers = {p: self._frontier(p) for p in self.restarts}
        self.frontiers[0] = []
        self.mutated = {p: [self._mutated_later(f, p) for f in self.frontiers[p]] for p in self.restarts}
        self.cache_planned_mb = (self.cache_bytes - budget) / 2**20

    def _mutated_later(self, node: Any, p: int) -> bool:
        """Whether a node at or after ``p`` might change ``node``'s value in place (then caches clone it)."""
        for u in node.users:
            if self.pos_of[u] < p:
                continue
            if u.op == "call_module" and getattr(self.model.get_submodule(str(u.target)), "inplace", False):
                return True
            if u.op == "call_method" and str(u.target).endswith("_"):
                return True
            if u.op == "call_function":
                name = getattr(u.target, "__name__", "")
                if name.endswith("_") or name.startswith("i") and name[1:] in _BINARY_OPS or u.kwargs.get("inplace"):
                    return True
        return False

    def _probe_sizes(self, x: torch.Tensor, last: int) -> list[float]:
        """Bytes per example of the frontier of every position up to ``last`` (one pass on ``x``)."""
        env: dict[Any, Any] = {}
        sizes: list[float] = []
        live: dict[Any, int] = {}  # node -> bytes of its value, while some later node needs it
        with torch.inference_mode():
            for i, n in enumerate(self.nodes[: last + 1]):
                sizes.append(sum(live.values()) / max(1, len(x)))
                if n.op == "output":
                    break
                env[n] = self._run_node(n, env, x)
                v = env[n]
                if n.op != "get_attr" and isinstance(v, torch.Tensor) and self.last_use.get(n, -1) > i:
                    live[n] = v.numel() * v.element_size()
                for dead in self.free_at[i]:
                    live.pop(dead, None)
        return sizes

    # -- execution -------------------------------------------------------------------------------
    def _run_node(self, n: Any, env: dict[Any, Any], x: torch.Tensor) -> Any:
        import torch.fx

        if n.op == "placeholder":
            if n is self.placeholders[0]:
                return x
            return n.args[0] if n.args else None
        if n.op == "get_attr":
            obj: Any = self.model
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj
        args = torch.fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
        if n.op == "call_module":
            if n in self.fused:
                wb = self.fused[n]
                if wb is None:  # the BatchNorm of a fused pair: already applied by its conv
                    return args[0]
                return self.model.get_submodule(str(n.target))._conv_forward(args[0], wb[0], wb[1])
            return self.model.get_submodule(str(n.target))(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "output":
            return args[0]
        raise PruningError(f"unsupported torch.fx node {n.op!r}")

    @staticmethod
    def _clone(v: Any, needed: bool = True) -> Any:
        return v.clone() if needed and isinstance(v, torch.Tensor) else v

    def changed(self, index: int) -> None:
        self.valid = {p for p in self.valid if p <= index}
        for p in [p for p in self.cache if p not in self.valid]:
            del self.cache[p]  # stale: free the memory now

    def collect(self, needed: list[_ReadPoint], pos: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not needed:
            return {}
        first = min(rp.index for rp in needed)
        stop = max(rp.index for rp in needed)
        start = max(p for p in self.valid if p <= first)
        refresh = [p for p in self.restarts if start < p <= stop]
        want = {rp.key for rp in needed}
        accs = {rp.key: TSQR(block=self.block) for rp in needed}
        self._fuse()
        stores: dict[int, list[tuple[Any, ...]]] = {p: [] for p in refresh}
        for p in refresh:  # recomputed below: never hold the old and the new copy at once
            self.cache.pop(p, None)
            self.valid.discard(p)
        with torch.inference_mode():
            for b, x in enumerate(self.batches):
                env: dict[Any, Any] = {}
                for n in self.nodes[:start]:
                    if n.op == "get_attr":
                        env[n] = self._run_node(n, env, x)
                if start > 0:
                    for n, v, mut in zip(self.frontiers[start], self.cache[start][b], self.mutated[start]):
                        env[n] = self._clone(v, mut)
                for i in range(start, stop + 1):
                    n = self.nodes[i]
                    if i in stores:
                        stores[i].append(tuple(self._clone(env[f], mut) for f, mut in zip(self.frontiers[i],
                                                                                            self.mutated[i])))
                    for rp in self.capture.get(i, ()):
                        if rp.key in want:
                            _accumulate(accs[rp.key], env[rp.node], rp, pos[rp.key])
                    if n.op == "output":
                        break
                    env[n] = self._run_node(n, env, x)
                    for dead in self.free_at[i]:
                        env.pop(dead, None)
                del env
        for p, vals in stores.items():
            self.cache[p] = vals
            self.valid.add(p)
        with small_ops(max((a.ncols or 0) for a in accs.values())):
            return {k: a.r() for k, a in accs.items()}


class _HookRunner(_Runner):
    """Fallback for models ``torch.fx`` cannot trace: full forward passes with pre-hooks."""

    def __init__(self, model: nn.Module, batches: list[torch.Tensor], consumers: list[str], block: str):
        self.model = model
        self.batches = batches
        self.block = block
        self.first_call: dict[str, int] = {}
        self.calls: dict[str, int] = defaultdict(int)
        self.same_input: dict[str, str] = {}
        inputs: dict[str, torch.Tensor] = {}
        handles = []
        counter = [0]

        def make(path: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                self.calls[path] += 1
                if path not in self.first_call:
                    self.first_call[path] = counter[0]
                    counter[0] += 1
                    inp = args[0] if args else None
                    for other, t in inputs.items():
                        if t is inp:
                            self.same_input[path] = self.same_input.get(other, other)
                            break
                    if isinstance(inp, torch.Tensor):
                        inputs[path] = inp
            return hook

        for path in consumers:
            handles.append(model.get_submodule(path).register_forward_pre_hook(make(path)))
        try:
            with torch.inference_mode():
                model(batches[0][:2])
        finally:
            for h in handles:
                h.remove()
        inputs.clear()

    def order(self, consumer: str) -> int | None:
        if self.calls.get(consumer, 0) != 1:
            return None
        return self.first_call[consumer] + 1

    def read_node(self, consumer: str) -> Any:
        return self.same_input.get(consumer, consumer)

    def collect(self, needed: list[_ReadPoint], pos: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not needed:
            return {}
        accs = {rp.key: TSQR(block=self.block) for rp in needed}
        by_layer: dict[str, list[_ReadPoint]] = defaultdict(list)
        for rp in needed:
            by_layer[str(rp.node)].append(rp)
        handles = []

        def make(rps: list[_ReadPoint]) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                for rp in rps:
                    _accumulate(accs[rp.key], args[0], rp, pos[rp.key])
            return hook

        for path, rps in by_layer.items():
            handles.append(self.model.get_submodule(path).register_forward_pre_hook(make(rps)))
        try:
            with torch.inference_mode():
                for x in self.batches:
                    self.model(x)
        finally:
            for h in handles:
                h.remove()
        with small_ops(max((a.ncols or 0) for a in accs.values())):
            return {k: a.r() for k, a in accs.items()}
