"""Interpolative-decomposition (ID) channel pruning: **id** (one-shot) and **id_iter** (automatic widths).

Chee, Renz, Damle & De Sa, "Model Preserving Compression for Neural Networks", NeurIPS 2022.

For a coupled channel group let ``Z`` be its activations exactly as the consumer layers read
them (rows = samples x spatial positions, columns = channels: after BatchNorm, activation and
pooling, after the depthwise convolutions of the group). A column-pivoted QR ``Z P = Q R`` picks
the ``k`` channels ``S`` to keep and ``T = [I | R11^-1 R12] P^T`` with ``Z ~= Z[:, S] T``. The
producers keep rows ``S`` (weights, biases, norm parameters and statistics, depthwise filters)
and every consumer absorbs ``T``: ``W <- W T^T`` along its input-channel axis (per kernel tap;
``T (x) I_HW`` for a flatten -> linear consumer). No labels, no fine-tuning.

How the pieces map to the code:

* ``R`` is accumulated by streaming TSQR over batches of the prune set
  (:class:`prunekit.linalg.TSQR`); memory ``O(C^2)`` per read point.
* Coupled groups (ResNet / MobileNet-V2 residual streams) have several *read points* (the
  inputs of their consumers). Their ``R`` factors are stacked before the pivoted QR, so ``S`` is
  chosen for all of them at once; each read point then gets its own least-squares ``T`` for the
  kept channels (``per_read_point=True``; the shared ``T`` of the stacked QR with ``False``).
* Depthwise convolutions belong to the group (their filters follow the kept channels); ``Z`` is
  read after them, at the input of the next full convolution, so MobileNets need nothing special.
* Not handled (left unpruned, listed in ``plan.meta["skipped"]``): groups normalised by a
  LayerNorm / GroupNorm over the channels (removing channels changes the statistics of the kept
  ones), attention-head groups, and groups read by a layer that is not a plain conv / linear
  called once (grouped convs, shared modules).
* The model passed in is never edited: a working copy is pruned physically step by step (rows /
  columns / norm entries sliced along the graph's member tables, consumers rewritten with
  ``W T^T``); the returned plan holds the kept channels (original numbering) and the final
  consumer weights in their post-removal shape, so applying it to the original model gives the
  working copy.

**id_iter** recomputes activations only downstream of the layers it changed (after every round of
greedy steps, see :class:`IterativeInterpolativeDecomposition`). The model is traced
with ``torch.fx`` and run node by node; for every group, the values needed to restart the network
at (or just before) its first layer are cached for the whole prune set (deepest first, within
``cache_mb``), so a step re-runs the network from the nearest cache before the pruned group's
first producer, and read points up to its first consumer keep their ``R`` (restricted to the kept
columns). Conv -> BatchNorm pairs run as one folded convolution during these passes. Models
``torch.fx`` cannot trace fall back to full forward passes with hooks (same result, slower).

Options shared by both methods:

* ``samples`` (5000): prune-set size, taken from ``ctx.data`` (the training split);
  ``batch_size`` (500) of the passes;
* ``cache_mb`` (4096): upper bound on the restart caches (ResNet-20, 5000 CIFAR images: ~2.6 GB);
* ``tsqr_block`` (``"gram"``): how TSQR reduces a block (see :class:`prunekit.linalg.TSQR`; ``"qr"``
  is Householder, slower on activations, same ``R`` to rounding);
* ``per_read_point`` (True): least-squares ``T`` per read point of a coupled group;
* ``group_error`` (``"sum"``): error proxy of a coupled group (see :meth:`_IDState.error`);
* ``target_kind``: ``"flops"`` / ``"params"``, the cost a ``ratio=`` target reduces (default flops).
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from prunekit.errors import PruningError
from prunekit.linalg import (
    id_error,
    id_from_pivoted,
    interpolation_matrix,
    pivoted_qr,
    qr_r,
    release_workspace,
    small_ops,
)
from prunekit.methods.base import Method, PruneContext, Target
from prunekit.methods.id_executor import _FxRunner, _GroupState, _HookRunner, _ReadPoint, _Runner
from prunekit.methods.options import OptionType
from prunekit.methods.registry import register_method
from prunekit.surgery.allocate import latency_mode, resolve_round_to, runtime_breakpoint, runtime_multiple
from prunekit.surgery.inputs import cat_inputs, primary_output
from prunekit.surgery.plan import Plan

_PAPER = "Chee et al., Model Preserving Compression for Neural Networks, NeurIPS 2022"


# --------------------------------------------------------------------------------------------- the state
class _IDState:
    """A working copy of the model being pruned by ID, with cached ``R`` factors per read point.

    Each :meth:`prune` folds ``T`` into the consumers and then physically removes the group's
    dropped channels from the copy (``present`` tracks which original positions every sliced
    tensor dimension still holds), so later passes run on the smaller network.
    """

    def __init__(self, model: nn.Module, ctx: PruneContext, method: Method):
        from prunekit.surgery.graph import analyze

        t0 = time.perf_counter()
        self.method = method
        self.ctx = ctx
        self.graph = ctx.graph
        if self.graph is None:
            self.graph = analyze(model, ctx.input_shape, ignored=ctx.budget.ignored, warn=False)
            ctx.graph = self.graph
        # a latency-aware search keeps widths at the runtime's multiples and scores steps by the latency they save
        self.latency_aware = bool(getattr(method, "searches_widths", False)) and (
            latency_mode(ctx.budget.latency_aware) != "off")
        self.conv_groups = {g.key for g in self.graph.groups.values() if _conv_produced(model, g)}
        self.model = _working_copy(model)
        self.model.eval()
        self.batches = _prune_batches(ctx, int(method.samples), int(method.batch_size), method.name)
        self.skipped: dict[str, str] = {}
        self.changed_layers: set[str] = set()
        self.timings: dict[str, float] = defaultdict(float)
        self.r: dict[str, torch.Tensor] = {}  # read point key -> R over the group's current kept channels
        self.present: dict[tuple[str, int], torch.Tensor] = {}  # (tensor, dim) -> original positions still there
        self.runner = self._make_runner()
        self.groups = self._build_groups()
        self.read_points = [rp for g in self.groups.values() for rp in g.read_points]
        self.runner.setup(self.read_points, [g.first_change for g in self.groups.values()])
        self._tensor_cost = {t.path: t for t in self.graph.cost.tensors}
        self.timings["setup"] += time.perf_counter() - t0

    # -- construction ---------------------------------------------------------------------------
    def _make_runner(self) -> _Runner:
        cache = float(self.method.cache_mb) * 2**20
        block = str(self.method.tsqr_block)
        if block not in ("gram", "qr"):
            raise PruningError(f"method {self.method.name!r}: tsqr_block must be 'gram' or 'qr', not {block!r}")
        try:
            return _FxRunner(self.model, self.batches, cache, block)
        except Exception as e:  # noqa: BLE001 - any tracing failure: fall back to hooks
            self.skipped["<trace>"] = f"torch.fx could not trace the model ({type(e).__name__}); using full passes"
            consumers = sorted({c for g in self.graph.groups.values() for c in g.consumers})
            return _HookRunner(self.model, self.batches, consumers, block)

    def aligned(self, key: str) -> bool:
        """Whether group ``key``'s widths follow the runtime's channel blocks: a latency-aware search, and the
        group written by convolutions (whose blocked kernels pad channels; a linear layer's GEMM does not)."""
        return self.latency_aware and key in self.conv_groups

    def _multiple(self, g: Any) -> int:
        """Kept counts are multiples of this: the group's GroupNorm groups and the shared allocator's
        channel multiple: an explicit ``round_to`` (:func:`~prunekit.surgery.allocate.resolve_round_to`),
        else, when the search is latency-aware, the runtime's channel multiple for the group's width
        (:func:`~prunekit.surgery.allocate.runtime_multiple`)."""
        m = max(1, int(g.multiple_of))
        b = self.ctx.budget
        if b.round_to is not None:
            rt = resolve_round_to(g.size, b.round_to)
        else:  # tiny groups and linear layers (no blocked-channel kernels): widths as they come
            rt = runtime_multiple(g.size) if self.aligned(g.key) else 1
        if rt > 1:
            m = m * rt // math.gcd(m, rt)
        return m

    def _build_groups(self) -> dict[str, _GroupState]:
        budget = self.ctx.budget
        groups: dict[str, _GroupState] = {}
        for g in self.graph.groups.values():
            if not g.prunable:
                continue
            why = self._unsupported(g)
            if why:
                self.skipped[g.key] = why
                continue
            rps: dict[Any, _ReadPoint] = {}
            for c in g.consumers:
                idx = int(self.runner.order(c) or 0)
                node = self.runner.read_node(c)
                member = next(mb for mb in g.members if mb.tensor == f"{c}.weight" and mb.role == "consumer")
                layer = self.model.get_submodule(c)
                chan_dim = -1 if isinstance(layer, nn.Linear) else 1
                rp = rps.get(node)
                if rp is None:
                    rps[node] = _ReadPoint(f"{g.key}@{c}", g.key, [c], member.index, chan_dim, idx, node)
                else:
                    rp.consumers.append(c)
                    rp.index = min(rp.index, idx)
            floor_keep = int(math.floor(budget.floor * g.size)) + 1 if budget.floor > 0 else 1
            cap_keep = int(math.ceil((1.0 - budget.cap) * g.size))
            state = _GroupState(
                key=g.key, size=g.size, kept=torch.arange(g.size), read_points=list(rps.values()),
                layers=g.layers(), min_keep=max(1, g.min_keep, floor_keep, cap_keep), multiple_of=self._multiple(g),
            )
            state.first_consumer = min(rp.index for rp in state.read_points)
            paths = g.producers + g.depthwise + g.norms + g.consumers + g.params
            state.first_change = min(self.runner.position(p) for p in paths)
            groups[g.key] = state
        if not groups:
            raise PruningError(f"method {self.method.name!r} found no channel group it can prune in this model "
                               f"(skipped: {self.skipped or 'none prunable'})")
        return dict(sorted(groups.items(), key=lambda kv: kv[1].first_consumer))

    def _unsupported(self, g: Any) -> str:
        if g.kind != "channels":
            return "attention-head group (ID prunes channels)"
        if g.ln_coupled:
            return "normalised by a LayerNorm / GroupNorm over its channels"
        if not g.consumers:
            return "no layer reads its channels"
        for c in g.consumers:
            layer = self.model.get_submodule(c)
            if not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) or getattr(layer, "groups", 1) != 1:
                return f"consumer {c!r} is not a plain conv / linear layer"
            if isinstance(layer, nn.modules.conv._ConvNd) and layer.transposed:
                return f"consumer {c!r} is a transposed convolution"
            if not any(mb.tensor == f"{c}.weight" and mb.role == "consumer" and mb.dim == 1 for mb in g.members):
                return f"consumer {c!r} reads the channels in a layout ID cannot follow"
            if self.runner.order(c) is None:
                return f"consumer {c!r} is called more than once (or never) in the forward pass"
        return ""

    # -- current numbering ------------------------------------------------------------------------
    def _present(self, tensor: str, dim: int) -> torch.Tensor:
        key = (tensor, dim)
        if key not in self.present:
            self.present[key] = torch.arange(self.graph.layer_shapes[tensor][dim])
        return self.present[key]

    def _current(self, tensor: str, dim: int, original: torch.Tensor) -> torch.Tensor:
        """Current indices along ``dim`` of ``tensor`` of the given original positions (all present)."""
        return torch.searchsorted(self._present(tensor, dim), original)

    def _positions(self, rp: _ReadPoint) -> torch.Tensor:
        """``(C, E)`` current positions of the group's kept channels on the read point's channel axis."""
        orig = rp.positions[self.groups[rp.group].kept]
        return self._current(f"{rp.consumers[0]}.weight", 1, orig.reshape(-1)).reshape(orig.shape)

    # -- R factors --------------------------------------------------------------------------------
    def refresh(self, groups: list[str] | None = None) -> None:
        """Compute the missing ``R`` factors (of ``groups``, default all)."""
        keys = list(self.groups) if groups is None else groups
        needed = [rp for k in keys for rp in self.groups[k].read_points if rp.key not in self.r]
        if not needed:
            return
        t0 = time.perf_counter()
        pos = {rp.key: self._positions(rp) for rp in needed}
        self.r.update(self.runner.collect(needed, pos))
        self.timings["activations"] += time.perf_counter() - t0

    def pivoted(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Pivoted QR of the stacked ``R`` factors of a group's read points (cached)."""
        g = self.groups[key]
        if g.r_piv is None:
            self.refresh([key])
            t0 = time.perf_counter()
            rs = [self.r[rp.key] for rp in g.read_points]
            with small_ops(len(g.kept)):
                stacked = rs[0] if len(rs) == 1 else qr_r(torch.cat(rs))
                g.r_piv, g.perm = pivoted_qr(stacked)
            self.timings["pivoted_qr"] += time.perf_counter() - t0
        assert g.r_piv is not None and g.perm is not None
        return g.r_piv, g.perm

    def error(self, key: str, k: int) -> float:
        """Error proxy of keeping ``k`` channels of group ``key``.

        One read point: the paper's ``|R[k, k] / R[0, 0]|``, i.e. the largest residual column norm after
        projecting out the ``k`` pivots, over the largest column norm. Several read points (coupled
        groups) with ``group_error="sum"``: the same ratio at each read point for the pivots chosen on the
        stacked factors (its own least-squares residual), summed over read points -- every consumer
        suffers its own error; ``"stacked"``: the ratio of the stacked factor.
        """
        g = self.groups[key]
        r_piv, perm = self.pivoted(key)
        if len(g.read_points) == 1 or self.method.group_error == "stacked":
            return id_error(r_piv, k)
        cache_key = ("error", k)
        if cache_key not in g.cache:
            with small_ops(len(g.kept)):
                g.cache[cache_key] = self._point_errors(g, perm[:k])
        return g.cache[cache_key]

    def _point_errors(self, g: _GroupState, keep: torch.Tensor) -> float:
        """Sum over read points of (largest least-squares residual column) / (largest column), kept = ``keep``."""
        total = 0.0
        for rp in g.read_points:
            r = self.r[rp.key]
            top = float(r.norm(dim=0).max())
            if top == 0.0:
                continue
            q = torch.linalg.qr(r[:, keep], mode="reduced")[0]
            resid = r - q @ (q.T @ r)
            total += float(resid.norm(dim=0).max()) / top
        return total

    def output_error(self, key: str, k: int) -> float:
        """Relative squared error at the consumers' outputs of keeping the first ``k`` pivots of group ``key``.

        Per consumer ``W`` (taps ``W_t``, ``M = sum_t W_t^T W_t`` over its columns of the group) and read
        point ``Z`` (``R^T R = Z^T Z``), with ``D = Z - Z[:, S] T`` (``T`` its own least squares):
        ``tr(D M D^T) / tr(Z M Z^T)``, i.e. the consumer output's error energy over its energy with the
        cross-tap terms left out; summed over the group's consumers (a residual stream read by several
        layers perturbs each of them).
        """
        g = self.groups[key]
        if k >= len(g.kept):
            return 0.0
        cache_key = ("output", k)
        if cache_key not in g.cache:
            _, perm = self.pivoted(key)
            keep = perm[:k]
            total = 0.0
            with small_ops(len(g.kept)):
                for rp in g.read_points:
                    r = self.r[rp.key]
                    resid = r - r[:, keep] @ interpolation_matrix(r, keep)
                    for c in rp.consumers:
                        m = self._consumer_gram(c, rp)
                        energy = float(((r @ m) * r).sum())
                        if energy > 0.0:
                            total += float(((resid @ m) * resid).sum()) / energy
            g.cache[cache_key] = total
        return g.cache[cache_key]

    def output_gain(self, key: str, k: int, xs: list[torch.Tensor], ref: list[torch.Tensor]) -> float | None:
        """Measured change of the model's outputs on ``xs`` (``ref``: the current outputs) when group ``key``
        keeps its first ``k`` pivots, over :meth:`output_error` (None when that is 0). The change is the mean
        KL divergence of the softmax from the reference one for 2-D outputs (logits: only what moves the
        predicted distribution counts, not a shift of every logit), else the relative squared error.

        The decomposition is simulated, not applied: every consumer's input has the group's channels
        replaced by their reconstruction ``Z[:, S] T`` -- exactly what the consumers compute once ``T``
        is folded in and the other channels are gone.
        """
        proxy = self.output_error(key, k)
        if proxy <= 0.0:
            return None
        g = self.groups[key]
        _, perm = self.pivoted(key)
        keep = perm[:k]
        handles = []

        def make(rp: _ReadPoint, recon: torch.Tensor, pos: torch.Tensor) -> Callable[..., Any]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                x = args[0].movedim(rp.channel_dim, -1)
                cols = pos.reshape(-1).to(x.device)
                z = x[..., cols].reshape(*x.shape[:-1], *pos.shape)  # (..., C, E)
                z = torch.einsum("...ce,cd->...de", z, recon.to(x.dtype))
                out = x.clone()
                out[..., cols] = z.reshape(*x.shape[:-1], -1)
                return (out.movedim(-1, rp.channel_dim), *args[1:])
            return hook

        with small_ops(len(g.kept)):
            for rp in g.read_points:
                r = self.r[rp.key]
                t = interpolation_matrix(r, keep)  # (k, C): Z ~= Z[:, keep] t
                recon = torch.zeros(r.shape[1], r.shape[1], dtype=torch.float64)
                recon[keep] = t
                for c in rp.consumers:
                    mod = self.model.get_submodule(c)
                    handles.append(mod.register_forward_pre_hook(make(rp, recon, self._positions(rp))))
        try:
            err = num = 0.0
            with torch.inference_mode():
                for x, y in zip(xs, ref):
                    out = primary_output(self.model(x))
                    if out.dim() == 2:  # logits: KL(softmax(ref) || softmax(out)) per example
                        lp, lq = torch.log_softmax(y.double(), 1), torch.log_softmax(out.double(), 1)
                        err += float((lp.exp() * (lp - lq)).sum())
                        num += float(len(y))
                    else:
                        err += float((out - y).pow(2).sum())
                        num += float(y.pow(2).sum())
        finally:
            for h in handles:
                h.remove()
        return err / max(num, 1e-30) / proxy

    def _consumer_gram(self, consumer: str, rp: _ReadPoint) -> torch.Tensor:
        """``sum_t W_t^T W_t`` (``C x C``, float64) over the taps ``t`` of a consumer's columns of the group
        (kernel taps of a conv, the ``E`` positions of a flatten -> linear)."""
        pos = self._positions(rp)  # (C, E)
        c, e = pos.shape
        wm = self.model.get_submodule(consumer).weight.detach().movedim(1, -1)
        cur = wm[..., pos.reshape(-1)].reshape(-1, c, e).double()
        return torch.einsum("rce,rde->cd", cur, cur)

    # -- costs ------------------------------------------------------------------------------------
    def widths(self) -> dict[str, int]:
        return {k: int(len(g.kept)) for k, g in self.groups.items()}

    def cost(self, kind: str, widths: dict[str, int] | None = None) -> float:
        w = self.widths() if widths is None else widths
        return float(self.graph.cost.flops(w) if kind == "flops" else self.graph.cost.params(w))

    def group_cost(self, key: str, kind: str, widths: dict[str, int] | None = None) -> float:
        """Cost (multiply-adds or parameters) of the layers a group touches, now or at ``widths``."""
        w = self.graph.widths()
        w.update(self.widths() if widths is None else widths)
        total = 0.0
        for layer in self.groups[key].layers:
            t = self._tensor_cost.get(f"{layer}.weight")
            if t is None:
                continue
            n = t.numel(w)
            total += t.macs_per_entry * n if kind == "flops" else n
        return total

    def latency(self, widths: dict[str, int] | None = None) -> float:
        """The shared cost model's CPU latency proxy (:meth:`~prunekit.surgery.cost.CostModel.latency`) of
        the model at ``widths`` (block-aligned multiply-adds plus memory-bound work per activation element)."""
        return float(self.graph.cost.latency(self.widths() if widths is None else widths))

    def saved(self, kind: str, widths: dict[str, int], key: str, k: int) -> float:
        """What taking group ``key`` from ``widths[key]`` to ``k`` channels saves: the latency proxy's drop when
        the search is latency-aware and it drops, else the target kind's cost. (Scoring a step the runtime pads
        back to the same blocks by latency alone -- never worth it -- cost 6 points of ResNet-20 top-1 at
        flops=2 for 3 % more speed in ONNX Runtime: the FLOPs fallback keeps such fine steps possible.)"""
        trial = {**widths, key: k}
        flops = self.cost(kind, widths) - self.cost(kind, trial)
        if self.latency_aware:
            lat = self.latency(widths) - self.latency(trial)
            if lat > 0:
                return lat
            return float(getattr(self.method, "flops_fallback", 1.0)) * flops
        return flops

    def width_options(self, key: str, k: int) -> int:
        """``k`` rounded down to the group's multiple (``0`` when below its minimum)."""
        g = self.groups[key]
        k = (k // g.multiple_of) * g.multiple_of
        return k if k >= g.min_keep else 0

    # -- pruning ------------------------------------------------------------------------------------
    def prune(self, key: str, k: int) -> float:
        """Keep ``k`` channels of group ``key`` by ID and fold ``T`` into its consumers; returns the error proxy."""
        g = self.groups[key]
        n = len(g.kept)
        if k >= n:
            return 0.0
        self.refresh([key])
        r_piv, perm = self.pivoted(key)
        with small_ops(n):
            return self._prune(key, k, r_piv, perm)

    def _prune(self, key: str, k: int, r_piv: torch.Tensor, perm: torch.Tensor) -> float:
        g = self.groups[key]
        n = len(g.kept)
        t0 = time.perf_counter()
        dec = id_from_pivoted(r_piv, perm, k)
        err, keep_local, t_shared = dec.error, dec.keep, dec.T
        rs = {rp.key: self.r[rp.key] for rp in g.read_points}
        per_point = bool(self.method.per_read_point) and len(g.read_points) > 1
        for rp in g.read_points:
            t = interpolation_matrix(rs[rp.key], keep_local) if per_point else t_shared
            for c in rp.consumers:
                self._fold(c, rp, keep_local, t)
        removed = torch.ones(n, dtype=torch.bool)
        removed[keep_local] = False
        self._shrink(key, g.kept[removed])
        # read points up to the first consumer keep their data: restrict R to the kept columns
        for rp in self.read_points:
            if rp.index > g.first_consumer:
                self.r.pop(rp.key, None)
                self.groups[rp.group].r_piv = None
                self.groups[rp.group].cache.clear()
            elif rp.group == key:
                self.r[rp.key] = _upper(qr_r(rs[rp.key][:, keep_local]))
        g.kept = g.kept[keep_local]
        g.r_piv = g.perm = None
        for other in self.groups.values():  # consumer weights changed: output errors are stale
            other.cache.clear()
        self.runner.changed(g.first_change)
        g.history.append({"width": k, "error": err})
        self.timings["decompose"] += time.perf_counter() - t0
        return err

    def _fold(self, consumer: str, rp: _ReadPoint, keep_local: torch.Tensor, t: torch.Tensor) -> None:
        """``W <- W T^T`` on the consumer's columns of the group (kept columns get the result)."""
        layer = self.model.get_submodule(consumer)
        pos = self._positions(rp)  # (C, E) current columns of the group's channels
        new_pos = pos[keep_local]  # (k, E)
        with torch.no_grad():
            wm = layer.weight.data.movedim(1, -1)  # (..., in), a view: written in place
            cur = wm[..., pos.reshape(-1)].reshape(*wm.shape[:-1], *pos.shape)  # (..., C, E)
            folded = torch.einsum("...ce,jc->...je", cur.double(), t.to(cur.device))
            wm[..., new_pos.reshape(-1)] = folded.reshape(*wm.shape[:-1], -1).to(wm.dtype)
        self.changed_layers.add(consumer)

    def _shrink(self, key: str, removed: torch.Tensor) -> None:
        """Physically remove original channels ``removed`` of group ``key`` from the working copy."""
        touched: dict[str, nn.Module] = {}
        for mb in self.graph.groups[key].members:
            present = self._present(mb.tensor, mb.dim)
            drop = mb.index[removed].reshape(-1)
            keep_mask = ~torch.isin(present, drop)
            self.present[(mb.tensor, mb.dim)] = present[keep_mask]
            mod_path, _, name = mb.tensor.rpartition(".")
            mod = self.model.get_submodule(mod_path) if mod_path else self.model
            old = getattr(mod, name)
            new = old.detach().index_select(mb.dim, keep_mask.nonzero().flatten().to(old.device)).clone()
            if name in mod._parameters:
                mod._parameters[name] = nn.Parameter(new, requires_grad=False)
            else:
                mod._buffers[name] = new
            touched[mod_path] = mod
        for mod in touched.values():
            _fix_attributes(mod)

    # -- result -------------------------------------------------------------------------------------
    def plan(self, extra_meta: dict[str, Any]) -> Plan:
        channels = {k: g.kept.clone() for k, g in self.groups.items() if len(g.kept) < g.size}
        kept_dims = self.graph.kept_dims(channels) if channels else {}
        weights: dict[str, torch.Tensor] = {}
        for c in sorted(self.changed_layers):
            path = f"{c}.weight"
            w = self.model.get_submodule(c).weight.detach()
            full = self.graph.layer_shapes[path]
            dims = kept_dims.get(path, {})
            expected = tuple(len(dims[d]) if d in dims else s for d, s in enumerate(full))
            if tuple(w.shape) != expected:
                raise PruningError(f"internal error in {self.method.name!r}: {path!r} has shape {tuple(w.shape)}, "
                                   f"the plan implies {expected}")
            weights[path] = w.clone()
        meta = {
            "widths": {k: [g.size, int(len(g.kept))] for k, g in self.groups.items()},
            "errors": {k: [h["error"] for h in g.history] for k, g in self.groups.items() if g.history},
            "skipped": dict(self.skipped),
            "samples": int(sum(len(b) for b in self.batches)),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "runner": type(self.runner).__name__.strip("_"),
            "cache_mb": round(float(getattr(self.runner, "cache_planned_mb", 0.0)), 1),
            **extra_meta,
        }
        release_workspace()
        return Plan(method=self.method.name, channels=channels, weights=weights, meta=meta)


def _upper(r: torch.Tensor) -> torch.Tensor:
    """Square (zero-padded) upper-triangular factor with a non-negative diagonal."""
    c = r.shape[1]
    if r.shape[0] < c:
        r = torch.cat([r, r.new_zeros(c - r.shape[0], c)])
    d = torch.sign(torch.diagonal(r))
    return r * torch.where(d == 0, torch.ones_like(d), d).unsqueeze(1)


def _fix_attributes(mod: nn.Module) -> None:
    """Make a sliced module's size attributes agree with its tensors."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        w = mod.weight
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
        out_dim, in_dim = (1, 0) if mod.transposed else (0, 1)
        if depthwise:
            n = int(w.shape[0] if not mod.transposed else w.shape[0])
            mod.in_channels = mod.out_channels = mod.groups = n
        else:
            mod.out_channels = int(w.shape[out_dim]) * (mod.groups if mod.transposed else 1)
            mod.in_channels = int(w.shape[in_dim]) * (1 if mod.transposed else mod.groups)
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = int(mod.weight.shape[0]), int(mod.weight.shape[1])
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        ref = mod.running_mean if mod.running_mean is not None else mod.weight
        mod.num_features = int(ref.shape[0])
    elif isinstance(mod, nn.GroupNorm):
        mod.num_channels = int(mod.weight.shape[0])
    elif isinstance(mod, nn.PReLU):
        mod.num_parameters = int(mod.weight.shape[0])


# --------------------------------------------------------------------------------------------- helpers
def _working_copy(model: nn.Module) -> nn.Module:
    from prunekit.surgery.graph import _has_masks
    from prunekit.surgery.masks import remove_masks_

    work = copy.deepcopy(model)
    if _has_masks(work):
        remove_masks_(work)
    for p in work.parameters():
        p.requires_grad_(False)
    return work


def _prune_batches(ctx: PruneContext, samples: int, batch_size: int, method: str) -> list[torch.Tensor]:
    """The prune set's inputs (at most ``samples``), re-batched to ``batch_size`` (kept in memory: the
    passes must see the same examples, augmentation or not)."""
    xs = [x for x, _ in ctx.batches(samples)]
    if not xs:
        raise PruningError(f"method {method!r} saw no examples: the prune set is empty")
    x = cat_inputs(xs)  # tensors, or batches of several / keyword inputs
    return list(x.split(max(1, batch_size)))


def measured_costs(model: nn.Module, input_shape: Any) -> dict[str, float]:
    """The model's cost as :func:`prunekit.prune` measures progress towards a target: effective
    multiply-adds (zero weights skipped) and non-zero parameters. Goals are set against these;
    predictions of the pruned model are dense counts, so a goal met by the prediction is met."""
    from prunekit.metrics import count_params, effective_flops

    shape = input_shape if isinstance(input_shape, tuple) else tuple(input_shape)  # ExampleInputs kept whole
    return {"flops": float(effective_flops(model, shape)),
            "params": float(count_params(model)["nonzero_params"])}


def cost_goal(target: Target, base: dict[str, float], target_kind: str | None, method: str,
              default_kind: str = "flops") -> tuple[str, float]:
    """``(cost kind, cost to reach)`` of a flops / params / ratio target, from the costs ``base`` now (a
    ``ratio=F`` target keeps ``1 - F`` of ``target_kind``, else of ``default_kind``)."""
    if target.kind in ("flops", "params"):
        if target_kind not in (None, target.kind):
            raise PruningError(f"method {method!r}: target_kind={target_kind!r} contradicts the target {target}")
        return target.kind, base[target.kind] / target.value
    kind = target_kind or default_kind
    if kind not in ("flops", "params"):
        raise PruningError(f"method {method!r}: target_kind must be 'flops' or 'params', not {kind!r}")
    return kind, base[kind] * (1.0 - target.value)


def _dense_goal(st: _IDState, model: nn.Module, ctx: PruneContext, target_kind: str | None,
                method: str) -> tuple[str, float]:
    """The goal in the dense counts the cost model predicts: the measured (non-zero) goal scaled by
    dense / measured now (zero entries, e.g. untrained BatchNorm biases, go with their channels)."""
    measured = measured_costs(model, ctx.input_shape)
    kind, goal = cost_goal(ctx.target, measured, target_kind, method)
    return kind, goal * st.cost(kind) / max(measured[kind], 1.0)


class _IDBase(Method):
    defaults: dict[str, Any] = {"samples": 5000, "batch_size": 500, "cache_mb": 4096, "per_read_point": True,
                                "target_kind": None, "tsqr_block": "gram", "group_error": "sum"}

    def _state(self, model: nn.Module, ctx: PruneContext) -> _IDState:
        self.check(ctx)
        return _IDState(model, ctx, self)


@register_method("id", granularity="channel", needs_data=True, needs_labels=False, family="interpolative",
                 paper=_PAPER, description="Interpolative decomposition, one shot: every group to the same keep "
                 "fraction, consumers absorb the interpolation matrix (no labels, no fine-tuning).")
class InterpolativeDecomposition(_IDBase):
    """One-shot ID: every prunable group keeps ``floor(k * width)`` channels.

    Options: ``k`` keep fraction (default None: ``1 - ratio`` for a ``ratio=`` target, and for a
    ``flops=`` / ``params=`` target the largest uniform fraction meeting it, after which the
    relatively most pruned groups get channels back while the target still holds); ``samples``
    (prune-set size, 5000); ``batch_size``; ``cache_mb`` (activation cache); ``per_read_point``.

    Groups are decomposed in execution order, each on the activations of the model whose earlier
    groups are already pruned (so later corrections see the real, perturbed inputs).
    """

    defaults = {**_IDBase.defaults, "k": None}

    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        t0 = time.perf_counter()
        st = self._state(model, ctx)
        widths = self._target_widths(st, ctx, model)
        for key, g in st.groups.items():
            w = widths[key]
            if w < len(g.kept):
                st.prune(key, w)
        return st.plan({"k": self._k_used, "time_s": round(time.perf_counter() - t0, 3)})

    def _target_widths(self, st: _IDState, ctx: PruneContext, model: nn.Module) -> dict[str, int]:
        if self.k is not None:
            if not 0 < float(self.k) <= 1:
                raise PruningError(f"method 'id': k must be in (0, 1], got {self.k}")
            self._k_used = float(self.k)
            return self._uniform(st, float(self.k))
        target = ctx.target
        if target.kind == "ratio" and self.target_kind is None:
            self._k_used = 1.0 - target.value
            return self._uniform(st, 1.0 - target.value, target.per_layer)
        kind, goal = _dense_goal(st, model, ctx, self.target_kind, self.name)
        lowest = st.cost(kind, self._uniform(st, 0.0))
        if lowest > goal:
            raise PruningError(f"method 'id' cannot reach {target}: with every prunable group at its minimum width "
                               f"the model still has {lowest:.4g} {kind} (goal {goal:.4g})")
        self._k_used, widths = self._fit(st, kind, goal, {})
        tol = float(ctx.budget.tolerance) * goal
        if goal - st.cost(kind, widths) > tol:
            # a small group's single channel can be worth more than the tolerance (LeNet-5's first conv): try
            # giving one group one more channel and fitting the others around it; keep the closest fit
            best = widths
            for key in sorted(st.groups, key=lambda key: widths[key] / st.groups[key].size):
                g = st.groups[key]
                if widths[key] + g.multiple_of > g.size:
                    continue
                fixed = {key: widths[key] + g.multiple_of}
                if st.cost(kind, {**self._uniform(st, 0.0), **fixed}) > goal:
                    continue
                _, trial = self._fit(st, kind, goal, fixed)
                if st.cost(kind, trial) > st.cost(kind, best):
                    best = trial
                if goal - st.cost(kind, best) <= tol:
                    break
            widths = best
        return widths

    @staticmethod
    def _uniform(st: _IDState, q: float, per_layer: dict[str, float] | None = None,
                 fixed: dict[str, int] | None = None) -> dict[str, int]:
        """``floor(q * width)`` for every group (``per_layer``: fraction removed per group; ``fixed`` widths)."""
        out = {}
        for key, g in st.groups.items():
            if fixed and key in fixed:
                out[key] = fixed[key]
                continue
            frac = 1.0 - per_layer[key] if per_layer and key in per_layer else q
            out[key] = min(g.size, max(st.width_options(key, int(math.floor(frac * g.size + 1e-9))), g.min_keep))
        return out

    def _fit(self, st: _IDState, kind: str, goal: float, fixed: dict[str, int]) -> tuple[float, dict[str, int]]:
        """The largest uniform keep fraction meeting ``goal`` (``fixed`` groups aside), then channels given
        back, always to the relatively most pruned group that still fits (``floor(q * n)`` undershoots most
        where channels are few)."""
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if st.cost(kind, self._uniform(st, mid, fixed=fixed)) <= goal:
                lo = mid
            else:
                hi = mid
        widths = self._uniform(st, lo, fixed=fixed)
        while True:
            for key in sorted(st.groups, key=lambda key: widths[key] / st.groups[key].size):
                g = st.groups[key]
                if key in fixed:
                    continue
                trial = dict(widths)
                trial[key] = min(g.size, widths[key] + g.multiple_of)
                if trial[key] > widths[key] and st.cost(kind, trial) <= goal:
                    widths = trial
                    break
            else:
                break
        return lo, widths


@register_method("id_iter", granularity="channel", needs_data=True, needs_labels=False, family="interpolative",
                 paper=_PAPER, description="Iterative interpolative decomposition: greedily shrinks the group whose "
                 "ID costs the least consumer-output error per FLOP saved, re-measuring activations between rounds "
                 "(automatic per-layer widths).")
class IterativeInterpolativeDecomposition(_IDBase):
    """Greedy ID (the paper's ``iditer``) with automatic per-layer widths.

    A greedy step proposes, for every group at width ``n``, ``k = floor(k * n)`` channels and takes
    the proposal of the lowest score. With ``criterion="output"`` (default) the score is the
    increase of the group's relative error at its consumers' outputs (:meth:`_IDState.output_error`:
    error energy over output energy, summed over consumers, so a residual stream read by several
    layers counts each of them) divided by the cost the step saves, times the group's *gain*: at the
    start of every round each group's error is calibrated against the change it causes at the model's
    outputs (mean KL divergence of the predictions for a classifier) -- a probe decomposition to
    ``floor(probe * width)`` channels is simulated on the first ``calibrate`` prune examples
    (:meth:`_IDState.output_gain`), and gain = measured change / consumer-output error. This is what makes
    a residual stream (errors carried to the output by the skips) and an inner conv comparable. With
    ``criterion="paper"`` the score is the seed's ``|R[k, k] / R[0, 0]| / (cost of the group's layers)``
    (no calibration).

    The activations are re-measured between *rounds*, not after every step: a round runs the greedy on
    the error curves of the current activations (every width's error comes from the same pivoted QR)
    until the cost drops to ``now * (goal / now) ** (1 / rounds left)``, then prunes the chosen widths
    group by group in execution order, each on the activations of the model pruned so far (as
    ``id`` does). ``remeasure=None`` re-measures after every step (the seed's loop; far slower).

    Options: ``k`` (per-step keep fraction, 0.95), ``remeasure`` (4: rounds), ``criterion``, ``calibrate``
    (256 examples; 0: gains of 1), ``probe`` (0.75), ``samples`` (5000),
    ``batch_size``, ``cache_mb``, ``per_read_point``, ``target_kind`` (``"flops"`` / ``"params"`` for a
    ``ratio=`` target; the cost the score divides by is the target's kind). The last step keeps as many
    channels as still meet the target; when the chosen group's step would undershoot the target by more
    than ``BudgetOptions.tolerance`` (tiny layers: one channel of a 6-channel conv), the best-scoring
    single-group step (of any size) that lands within the tolerance is taken instead, or else the best
    step that does not reach the target yet (see :meth:`_choose`).
    """

    defaults = {**_IDBase.defaults, "k": 0.95, "criterion": "output", "remeasure": 4, "calibrate": 256,
                "probe": 0.75, "flops_fallback": 1.0}
    option_types = {"flops_fallback": OptionType(
        "float", low=0, high=1,
        help="latency-aware search: weight of the FLOPs a step saves where the latency proxy sees no time saved "
             "(1: as much as time; lower: faster in the runtime, less accurate -- ResNet-20 flops=2, 0.25: ORT "
             "0.78 of the FLOPs speedup at 59 % top-1, against 0.74 at 68 %)")}
    searches_widths = True  # its width search is latency-aware (runtime steps, steps scored by latency saved)

    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        t0 = time.perf_counter()
        if not 0 < float(self.k) < 1:
            raise PruningError(f"method 'id_iter': k must be in (0, 1), got {self.k}")
        if self.criterion not in ("output", "paper"):
            raise PruningError(f"method 'id_iter': criterion must be 'output' or 'paper', not {self.criterion!r}")
        if self.remeasure is not None and int(self.remeasure) < 1:
            raise PruningError(f"method 'id_iter': remeasure must be >= 1 or None, got {self.remeasure}")
        st = self._state(model, ctx)
        kind, goal = _dense_goal(st, model, ctx, self.target_kind, self.name)
        tol = float(ctx.budget.tolerance) * goal
        steps: list[tuple[str, int, float]] = []
        done = 0
        while st.cost(kind) > goal:
            st.refresh()
            now = st.cost(kind)
            left = 1 if self.remeasure is None else max(1, int(self.remeasure) - done)
            round_goal = max(goal, now * (goal / now) ** (1.0 / left))
            widths = st.widths()
            gains = self._calibrate(st) if self.criterion == "output" else {}
            while st.cost(kind, widths) > round_goal:
                key, k = self._step(st, widths, gains, kind, goal, tol, ctx)
                widths[key] = k
                if self.remeasure is None:
                    break
            for key in st.groups:  # execution order: each on the activations of the model pruned so far
                if widths[key] < len(st.groups[key].kept):
                    steps.append((key, widths[key], st.prune(key, widths[key])))
            done += 1
        return st.plan({"k": float(self.k), "rounds": done, "criterion": self.criterion,
                        "steps": [list(s) for s in steps], "goal": {kind: goal},
                        "time_s": round(time.perf_counter() - t0, 3)})

    def _step(self, st: _IDState, widths: dict[str, int], gains: dict[str, float], kind: str, goal: float, tol: float,
              ctx: PruneContext) -> tuple[str, int]:
        """The next greedy step from ``widths`` (the round's widths so far)."""
        cands = []  # (score, key, width)
        for key in st.groups:
            n = widths[key]
            ks = {st.width_options(key, int(math.floor(float(self.k) * n)))}
            if st.aligned(key):  # also the next width where the runtime's kernels save time
                ks.add(st.width_options(key, runtime_breakpoint(n)))
            for k in ks:
                if 0 < k < n:
                    cands.append((self._score(st, widths, gains, key, k, kind), key, k))
        if not cands:
            raise PruningError(f"method 'id_iter' cannot reach {ctx.target}: every group is at its minimum "
                               f"width and the model still has {st.cost(kind, widths):.4g} {kind} (goal {goal:.4g})")
        return self._choose(st, widths, gains, cands, kind, goal, tol)

    def _score(self, st: _IDState, widths: dict[str, int], gains: dict[str, float], key: str, k: int,
               kind: str) -> float:
        """Error added per unit of cost saved by taking group ``key`` from ``widths[key]`` to ``k`` channels
        (lower is pruned first)."""
        if self.criterion == "paper":
            return st.error(key, k) / max(st.group_cost(key, kind, widths), 1e-12)
        saved = st.saved(kind, widths, key, k)
        added = st.output_error(key, k) - st.output_error(key, widths[key])
        return max(added, 0.0) * gains.get(key, 1.0) / max(saved, 1e-12)

    def _calibrate(self, st: _IDState) -> dict[str, float]:
        """Per group, how much of its consumer-output error reaches the model's outputs: the measured output
        change of a probe decomposition to ``floor(probe * width)`` channels on the first ``calibrate`` prune
        examples, over its :meth:`_IDState.output_error`. Groups where that is 0 get the median, and no gain
        goes below a quarter of the median (a probe removing only dead channels says little about the rest)."""
        n = int(self.calibrate or 0)
        if n <= 0:
            return {}
        xs = cat_inputs(st.batches)[:n].split(max(1, int(self.batch_size)))
        with torch.inference_mode():
            ref = [primary_output(st.model(x)) for x in xs]
        gains: dict[str, float] = {}
        for key, g in st.groups.items():
            width = len(g.kept)
            k = st.width_options(key, min(width - g.multiple_of, int(math.floor(float(self.probe) * width))))
            if 0 < k < width:
                gain = st.output_gain(key, k, list(xs), ref)
                if gain is not None:
                    gains[key] = gain
        if gains:
            mid = sorted(gains.values())[len(gains) // 2]
            gains = {key: max(gains.get(key, mid), 0.25 * mid) for key in st.groups}
        return gains

    @staticmethod
    def _landing(st: _IDState, widths: dict[str, int], key: str, lowest: int, kind: str, goal: float) -> int | None:
        """Largest width in ``[lowest, widths[key])`` that meets the goal when only group ``key`` changes
        (None: none)."""
        g = st.groups[key]
        trial = dict(widths)
        trial[key] = lowest
        if st.cost(kind, trial) > goal:
            return None
        lo, hi = lowest, widths[key] - 1  # cost decreases with the width: bisect on multiples
        lo_m, hi_m = lo // g.multiple_of, hi // g.multiple_of
        while lo_m < hi_m:
            mid = (lo_m + hi_m + 1) // 2
            trial[key] = mid * g.multiple_of
            if st.cost(kind, trial) <= goal:
                lo_m = mid
            else:
                hi_m = mid - 1
        return max(lowest, lo_m * g.multiple_of)

    def _choose(self, st: _IDState, widths: dict[str, int], gains: dict[str, float],
                cands: list[tuple[float, str, int]], kind: str, goal: float, tol: float) -> tuple[str, int]:
        """The step to take: the best-scoring one, except near the goal. A step that reaches the goal keeps as
        many channels as still meet it. If that lands more than the tolerance below the goal (a big channel
        of a tiny model), the best-scoring single-group step of any size landing within the tolerance is
        taken instead; failing that, the best step that does not reach the goal yet (smaller steps follow);
        failing that, the overshooting one."""
        cands = sorted(cands)
        _, key, k = cands[0]
        w = self._landing(st, widths, key, k, kind, goal)
        if w is None:
            return key, k
        if goal - st.cost(kind, {**widths, key: w}) <= tol:
            return key, w
        landing = []
        for _, other, _ in cands:
            w_other = self._landing(st, widths, other, st.groups[other].min_keep, kind, goal)
            if w_other is not None and goal - st.cost(kind, {**widths, other: w_other}) <= tol:
                landing.append((self._score(st, widths, gains, other, w_other, kind), other, w_other))
        if landing:
            _, other, w_other = min(landing)
            return other, w_other
        for _, other, k_other in cands[1:]:
            if st.cost(kind, {**widths, other: k_other}) > goal:
                return other, k_other
        return key, w


def _conv_produced(model: nn.Module, g: Any) -> bool:
    """Whether every producer of channel group ``g`` is a convolution."""
    paths = [p if isinstance(p, str) else p[0] if isinstance(p, tuple) else p.path for p in g.producers]
    mods = dict(model.named_modules())
    return bool(paths) and all(isinstance(mods.get(str(p)), nn.modules.conv._ConvNd) for p in paths)


__all__ = ["InterpolativeDecomposition", "IterativeInterpolativeDecomposition"]
