"""Baseline criteria every comparison needs (METHODS.md §0) and the §2 channel baselines.

Unstructured (granularity ``weight``; one score per weight, the shared allocator makes masks):

* ``random``: uniform random scores (option ``seed``);
* ``magnitude`` / ``magnitude_layerwise``: ``|w|`` -- ShrinkBench's global and layer-wise GMP;
* ``grad_x_weight`` / ``grad_x_weight_layerwise``: ``|w * dL/dw|`` with the gradient of the
  mean loss over the prune set.

Channel (granularity ``channel``; one score per channel of each coupled group, higher = keep):

* ``random_channel``; ``l1`` (``||W_c||_1 / (in*kh*kw)`` summed over the group's producers);
  ``l2`` (L2 norm of the group's filter rows); ``bn_scale`` (``|gamma|`` summed over the group's
  norm layers, l1 where a group has none);
* ``activation``: mean ``|activation|`` of each channel where the group's consumers read it;
* ``taylor``: sample mean of ``sum_hw |a * dl/da| / (H*W)`` over the producers' output maps;
* ``obd`` / ``obs``: K-FAC saliencies ``(w_c^T A w_c) * G_cc`` and ``(w_c^T A w_c) / (G^-1)_cc``.

Every data-driven score runs the model in eval mode (BN uses its running statistics) and
restores each module's ``training`` flag, each parameter's ``requires_grad`` and removes
every hook afterwards, also on error. Gradients are taken with :func:`torch.autograd.grad`,
so no ``.grad`` is left on the parameters.

Per-sample conventions: ``l_n`` is the loss of example ``n`` (``ctx.loss`` times the batch
size, so that custom losses such as temperature scaling are respected); ``N`` is the
number of prune-set examples seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from prunekit import curvature
from prunekit.curvature import scoring_mode
from prunekit.errors import PruningError
from prunekit.methods.base import ChannelScorer, PruneContext, WeightScorer
from prunekit.methods.registry import register_method
from prunekit.surgery.inputs import run_model
from prunekit.surgery.plan import Plan

_CHANNEL_LAST = (nn.Linear, nn.LayerNorm, nn.Embedding, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


# ---------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _hooks() -> Iterator[list[Any]]:
    """A list to append hook handles to; every handle is removed on exit."""
    handles: list[Any] = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def _path(entry: Any) -> str:
    """Module path of a graph entry: a string, a ``(path, ...)`` tuple or an object with ``.path``."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, (tuple, list)):
        return str(entry[0])
    for attr in ("path", "name"):
        if isinstance(getattr(entry, attr, None), str):
            return getattr(entry, attr)
    raise PruningError(f"cannot read a module path from channel-graph entry {entry!r}")


def _paths(group: Any, field: str) -> list[str]:
    return [_path(e) for e in (getattr(group, field, None) or ())]


def _per_channel(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``(B, C, S)`` view of a module output: channel-last for linear / layer norm, else channel-first."""
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if isinstance(module, _CHANNEL_LAST):
        return t.reshape(t.shape[0], -1, t.shape[-1]).transpose(1, 2)
    return t.reshape(t.shape[0], t.shape[1], -1)


def _sum_loss(model: nn.Module, ctx: PruneContext, x: torch.Tensor, y: torch.Tensor,
              sample_labels: torch.Generator | None = None) -> torch.Tensor:
    """``sum_n l_n`` over the batch; labels drawn from the model's softmax when a generator is given."""
    logits = run_model(model, x)
    n = len(x) if isinstance(x, torch.Tensor) else x.batch_size
    if sample_labels is not None:
        probs = F.softmax(logits.detach().float().reshape(n, -1), -1)
        y = torch.multinomial(probs, 1, generator=sample_labels).squeeze(1).to(x.device)
    return ctx.loss(logits, y) * n


def _need_samples(n: int, method: str) -> None:
    if n == 0:
        raise PruningError(f"method {method!r} saw no examples: the prune set is empty")


def _channel_index(group: Any, path: str, role: str, width: int) -> torch.Tensor:
    """``(size, per)`` positions, along ``path``'s channel axis, of each channel of ``group``.

    Read from the group's member table (see :class:`prunekit.surgery.graph.Member`) when it has
    one; otherwise channels are taken in order, ``width // size`` consecutive positions each (a
    flatten -> linear consumer reads ``H*W`` features per channel). ``role`` is the member role:
    ``producer`` (output rows), ``norm`` or ``consumer`` (input features); ``width`` is the number
    of positions the layer has along that axis.
    """
    for mb in getattr(group, "members", None) or ():
        if mb.role == role and mb.tensor.rpartition(".")[0] == path:
            return mb.index
    if width % group.size or (role != "consumer" and width != group.size):
        raise PruningError(f"{role} {path!r} has {width} channels along its channel axis, which cannot be "
                           f"mapped to the {group.size} channels of group {group.key!r}")
    return torch.arange(width).view(group.size, width // group.size)


def _gather(t: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Select ``index`` (``(size, per)``) along ``dim``; that axis becomes ``(size, per)``."""
    out = t.index_select(dim, index.reshape(-1).to(t.device))
    return out.unflatten(dim, tuple(index.shape))


def _producers(model: nn.Module, group: Any, method: str) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """``(path, module, (size, per) output-row index)`` of each producer layer of ``group``."""
    paths = _paths(group, "producers")
    if not paths:
        raise PruningError(f"method {method!r} cannot score group {group.key!r}: it has no producer layer")
    out = []
    for p in paths:
        module = model.get_submodule(p)
        axis = _producer_axis(group, p, module)
        out.append((p, module, _channel_index(group, p, "producer", module.weight.shape[axis])))
    return out


def _producer_axis(group: Any, path: str, module: nn.Module) -> int:
    """The weight axis of producer ``path`` holding the group's channels (the graph's member table;
    without one: dim 1 for a transposed conv, else 0)."""
    for mb in getattr(group, "members", None) or ():
        if mb.tensor == f"{path}.weight" and mb.role in ("producer", "depthwise"):
            return int(mb.dim)
    return 1 if getattr(module, "transposed", False) else 0


def producer_rows(model: nn.Module, group: Any, method: str = "?") -> list[torch.Tensor]:
    """Weights of each producer as ``(size, n)``: the rows (all of them, for a head) of each channel."""
    rows = []
    for path, module, index in _producers(model, group, method):
        # along the graph's channel axis (dim 1 of a transposed conv or an embedding), as ChannelGroup.rows
        w = module.weight.detach().movedim(_producer_axis(group, path, module), 0)
        rows.append(_gather(w.reshape(w.shape[0], -1), index, 0).flatten(1))
    return rows


def _sorted_groups(ctx: PruneContext) -> list[Any]:
    return sorted(ctx.groups(), key=lambda g: str(g.key))


def l1_scores(model: nn.Module, group: Any, method: str = "l1") -> torch.Tensor:
    """``sum_producers ||W_c||_1 / (in * kh * kw)``: the mean ``|w|`` of each channel's producer rows."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for rows in producer_rows(model, group, method):
        total += rows.abs().double().mean(1).cpu()
    return total


def _leaf(model: nn.Module, path: str, tensor: torch.Tensor) -> torch.Tensor:
    """The trainable leaf behind a weight: the parametrization's ``original`` for a masked weight."""
    mod_path, _, name = path.rpartition(".")
    module = model.get_submodule(mod_path) if mod_path else model
    if parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    return tensor


# -------------------------------------------------------------------------------------------- weight methods
class _LayerwiseMixin:
    """Forces ``scope="layerwise"``: the same fraction of every layer is removed."""

    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        local = dataclasses.replace(ctx, budget=dataclasses.replace(ctx.budget, scope="layerwise"))
        return super().plan(model, local)  # type: ignore[misc]


@register_method("random", granularity="weight", family="baseline",
                 description="Uniform random weight scores (seeded); the floor every method must beat.")
class RandomWeights(WeightScorer):
    """Random unstructured pruning."""

    defaults = {"seed": 0}

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(int(self.seed))
        params = self.prunable_params(model, ctx)
        return {k: torch.rand(params[k].shape, generator=gen) for k in sorted(params)}


@register_method("magnitude", granularity="weight", family="baseline",
                 description="|w| (GMP); global ranking unless budget scope is layerwise.")
class Magnitude(WeightScorer):
    """Magnitude pruning, ShrinkBench's global GMP."""

    defaults: dict[str, Any] = {}

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        return {k: p.detach().abs() for k, p in self.prunable_params(model, ctx).items()}


@register_method("magnitude_layerwise", granularity="weight", family="baseline",
                 description="|w| ranked within each layer (ShrinkBench's layer-wise GMP).")
class MagnitudeLayerwise(_LayerwiseMixin, Magnitude):
    """Magnitude pruning with the same sparsity in every layer."""


@register_method("grad_x_weight", granularity="weight", needs_grad=True, family="baseline",
                 description="|w * dL/dw| with the loss gradient over the prune set; global ranking.")
class GradXWeight(WeightScorer):
    """First-order Taylor saliency of each weight, ``|w * g|``.

    ``g`` is the gradient of the mean loss over (at most ``samples`` examples of) the prune
    set, accumulated batch by batch (the Torch-Pruning / ShrinkBench convention). For a masked
    weight ``w`` is the masked weight, so removed weights score 0.
    """

    defaults = {"samples": 1024}

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        params = self.prunable_params(model, ctx)
        names = list(params)
        plist = [_leaf(model, k, params[k]) for k in names]  # masked weights: grads w.r.t. the original
        acc = [torch.zeros_like(p, dtype=torch.float32) for p in plist]
        n = 0
        with scoring_mode(model, plist), torch.enable_grad():
            for x, y in ctx.batches(self.samples):
                grads = torch.autograd.grad(_sum_loss(model, ctx, x, y), plist, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a += g.float()
                n += len(x) if isinstance(x, torch.Tensor) else x.batch_size
        _need_samples(n, self.name)
        return {k: (params[k].detach().float() * a / n).abs() for k, a in zip(names, acc)}


@register_method("grad_x_weight_layerwise", granularity="weight", needs_grad=True, family="baseline",
                 description="|w * dL/dw| ranked within each layer.")
class GradXWeightLayerwise(_LayerwiseMixin, GradXWeight):
    """``grad_x_weight`` with the same sparsity in every layer."""


# ------------------------------------------------------------------------------------------- channel methods
@register_method("random_channel", granularity="channel", family="baseline",
                 description="Uniform random channel scores (seeded).")
class RandomChannels(ChannelScorer):
    """Random channel pruning."""

    defaults = {"seed": 0}

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(int(self.seed))
        return {g.key: torch.rand(g.size, generator=gen) for g in _sorted_groups(ctx)}


@register_method("l1", granularity="channel", family="baseline",
                 description="Filter L1 norm / (in*kh*kw), summed over a coupled group's producers.")
class L1(ChannelScorer):
    """Mean absolute filter weight (Li et al. 2017 as in the EigenDamage baselines)."""

    defaults: dict[str, Any] = {}

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        return {g.key: l1_scores(model, g, self.name) for g in ctx.groups()}


@register_method("l2", granularity="channel", family="baseline",
                 description="L2 norm of each channel's filter rows over all producers of its group.")
class L2(ChannelScorer):
    """Filter L2 norm; for a coupled group, the norm of the concatenated producer rows."""

    defaults: dict[str, Any] = {}

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        out = {}
        for g in ctx.groups():
            sq = torch.zeros(g.size, dtype=torch.float64)
            for rows in producer_rows(model, g, self.name):
                sq += rows.double().pow(2).sum(1).cpu()
            out[g.key] = sq.sqrt()
        return out


@register_method("bn_scale", granularity="channel", family="baseline",
                 description="|gamma| of the group's BatchNorm(s), summed; l1 for groups without one.")
class BNScale(ChannelScorer):
    """Network-slimming style score: the absolute scale of the normalisation after each channel.

    Every affine norm layer the channel graph lists for the group (BatchNorm, or LayerNorm /
    GroupNorm over the group's channels) contributes ``|gamma_c|``. A group without an affine
    norm is scored with :func:`l1_scores` and a warning: the two scales are not comparable in a
    global ranking, so prefer ``scope="layerwise"`` or ``normalize`` for such models.
    """

    defaults: dict[str, Any] = {}

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        out, fallback = {}, []
        for g in ctx.groups():
            gammas = []
            for path in _paths(g, "norms"):
                w = getattr(model.get_submodule(path), "weight", None)
                if isinstance(w, torch.Tensor):
                    index = _channel_index(g, path, "norm", w.shape[0])
                    gammas.append(_gather(w.detach().abs().double(), index, 0).sum(1).cpu())
            if gammas:
                out[g.key] = torch.stack(gammas).sum(0)
            else:
                fallback.append(str(g.key))
                out[g.key] = l1_scores(model, g, self.name)
        if fallback:
            warnings.warn(f"bn_scale: {len(fallback)} channel group(s) have no affine BatchNorm and are "
                          f"scored with l1 instead ({', '.join(fallback)}); l1 and |gamma| have different "
                          "scales, so consider scope='layerwise' or a per-layer normalisation", stacklevel=2)
        return out


@register_method("activation", granularity="channel", needs_data=True, needs_labels=False, family="baseline",
                 description="Mean |activation| of each channel where its consumers read it (no labels).")
class Activation(ChannelScorer):
    """Mean absolute activation of each channel on the prune set.

    Forward pre-hooks on the group's consumer layers average ``|input|`` over examples and
    positions per channel (a flatten -> linear consumer's ``C*E`` features are read as ``C``
    channels of ``E`` positions each); the group's score is the mean over its consumers. A
    group without consumers is measured at its norm outputs, or its producer outputs.
    """

    defaults = {"samples": 1024}

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        groups = ctx.groups()
        sums = {g.key: torch.zeros(g.size, dtype=torch.float64) for g in groups}
        n_sites = {g.key: 0 for g in groups}
        with scoring_mode(model), _hooks() as handles, torch.no_grad():
            for g in groups:
                consumers = _paths(g, "consumers")
                role = "consumer" if consumers else "norm" if _paths(g, "norms") else "producer"
                sites = consumers or _paths(g, "norms") or _paths(g, "producers")
                n_sites[g.key] = len(sites)
                for path in sites:
                    mod = model.get_submodule(path)
                    if consumers:
                        handles.append(mod.register_forward_pre_hook(self._reader(g, sums, path)))
                    else:
                        handles.append(mod.register_forward_hook(self._writer(g, sums, path, role)))
            n = 0
            for x, _ in ctx.batches(self.samples, shard=True):  # under torchrun: sums over the ranks' slices
                run_model(model, x)
                n += len(x)
        sums, n = ctx.reduce_sums(sums, n)
        _need_samples(n, self.name)
        return {k: v / (n * max(n_sites[k], 1)) for k, v in sums.items()}

    @staticmethod
    def _reader(group: Any, sums: dict[Any, torch.Tensor], path: str) -> Callable[..., None]:
        """Pre-hook adding ``sum_n mean_positions |x_n,c|`` of a consumer's input."""

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = _per_channel(args[0].detach(), module)  # (B, features, positions)
            index = _channel_index(group, path, "consumer", x.shape[1])
            sums[group.key] += _gather(x, index).abs().mean((2, 3)).sum(0).double().cpu()

        return hook

    @staticmethod
    def _writer(group: Any, sums: dict[Any, torch.Tensor], path: str, role: str) -> Callable[..., None]:
        """Forward hook adding ``sum_n mean_positions |y_n,c|`` of a module's output."""

        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            y = _per_channel(out.detach(), module)
            index = _channel_index(group, path, role, y.shape[1])
            sums[group.key] += _gather(y, index).abs().mean((2, 3)).sum(0).double().cpu()

        return hook


def _capture_outputs(store: list[tuple[Any, nn.Module, torch.Tensor]],
                     key: Any) -> Callable[..., torch.Tensor]:
    """Forward hook recording a module's output and handing a clone downstream.

    The clone keeps the recorded tensor safe from in-place ops that follow (``ReLU(inplace=True)``),
    so gradients w.r.t. it are those of the module's own output.
    """

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        store.append((key, module, out))
        return out.clone()

    return hook


@register_method("taylor", granularity="channel", needs_grad=True, family="baseline",
                 description="First-order Taylor (Molchanov): sample mean of sum_hw |a * dL/da| / (H*W).")
class Taylor(ChannelScorer):
    """First-order Taylor estimate of the loss change when a channel's output map is zeroed.

    ``score_c = 1/N sum_n sum_hw |a_nc,hw * dl_n/da_nc,hw| / (H*W)`` with ``a`` the output map of
    each of the group's producer layers (``at="producer"``, as in the EigenDamage baselines) or
    of its norm layers (``at="norm"``; producers where a group has no norm), summed over them
    (and over the rows of a channel that has several, e.g. an attention head's q, k, v rows).
    """

    defaults = {"samples": 1024, "at": "producer"}

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        if self.at not in ("producer", "norm"):
            raise PruningError(f"taylor: option at={self.at!r} must be 'producer' or 'norm'")
        groups = ctx.groups()
        sums = {g.key: torch.zeros(g.size, dtype=torch.float64) for g in groups}
        captured: list[tuple[Any, nn.Module, torch.Tensor]] = []
        n = 0
        with scoring_mode(model, model.parameters()), _hooks() as handles, torch.enable_grad():
            for g in groups:
                role = "norm" if self.at == "norm" and _paths(g, "norms") else "producer"
                sites = _paths(g, role + "s")
                if not sites:
                    raise PruningError(f"taylor cannot score group {g.key!r}: it has no producer layer")
                for path in sites:
                    hook = _capture_outputs(captured, (g, path, role))
                    handles.append(model.get_submodule(path).register_forward_hook(hook))
            for x, y in ctx.batches(self.samples, shard=True):  # under torchrun: sums over the ranks' slices
                captured.clear()
                loss = _sum_loss(model, ctx, x, y)
                grads = torch.autograd.grad(loss, [t for _, _, t in captured], allow_unused=True)
                for ((g, path, role), module, a), grad in zip(captured, grads):
                    if grad is None:
                        continue
                    per = (_per_channel(a.detach(), module) * _per_channel(grad, module)).abs().mean(2)
                    index = _channel_index(g, path, role, per.shape[1])
                    sums[g.key] += _gather(per, index).sum((0, 2)).double().cpu()
                n += len(x) if isinstance(x, torch.Tensor) else x.batch_size
            captured.clear()
        sums, n = ctx.reduce_sums(sums, n)
        _need_samples(n, self.name)
        return {k: v / n for k, v in sums.items()}


# ----------------------------------------------------------------------------------------- K-FAC (obd / obs)
def _weight_rows(module: nn.Module) -> torch.Tensor:
    """``(groups, out/groups, d)`` rows ``[W_c, b_c]`` in the basis of the patch-mode ``A`` factor."""
    w = module.weight.detach()
    groups = getattr(module, "groups", 1)
    rows = w.reshape(w.shape[0], -1)
    if module.bias is not None:
        rows = torch.cat([rows, module.bias.detach().reshape(-1, 1)], 1)
    return rows.reshape(groups, w.shape[0] // groups, rows.shape[1])


def kfac_factors(model: nn.Module, ctx: PruneContext, paths: list[str], samples: int | None,
                 fisher: str = "true", seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Patch-mode K-FAC factors ``(A, G)`` of the layers at ``paths`` from :mod:`prunekit.curvature`.

    ``A`` is ``(groups, d, d)`` with ``d = in/groups * kh * kw (+1 for a bias)``; ``G`` is ``(out, out)``.
    """
    factors = curvature.kfac_factors(model, ctx.batches(samples, shard=True), paths, loss=ctx.loss, mode="patch",
                                     fisher=fisher, seed=seed, reduce=True)
    return {p: (f.A, f.G) for p, f in factors.items()}


def damped_inverse(g_factor: torch.Tensor, damping: float) -> torch.Tensor:
    """``(G + damping * mean(diag G) * I)^-1`` (Cholesky)."""
    scale = g_factor.diagonal().mean()
    scale = scale if scale > 0 else g_factor.new_tensor(1.0)
    eye = torch.eye(len(g_factor), dtype=g_factor.dtype, device=g_factor.device)
    damped = g_factor + float(damping) * scale * eye
    try:
        return torch.cholesky_inverse(torch.linalg.cholesky(damped))
    except RuntimeError as e:
        raise PruningError(f"obs: the damped K-FAC output factor is not positive definite (damping={damping}); "
                           "raise the damping") from e


def obs_update(rows: torch.Tensor, g_inv: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Rows ``[W, b]`` (``(out, d)``) after the OBS correction for removing the rows ``removed``.

    Under the K-FAC quadratic ``1/2 tr(G dW A dW^T)``, the change that zeroes the rows ``R`` at the
    least loss increase is ``dW = -(G^-1)[:, R] ((G^-1)[R, R])^-1 W[R]`` -- the factor ``A`` cancels,
    and for one row it is the seed's ``-G^-1 e_c W_c / (G^-1)_cc``. The removed rows come out 0.
    """
    if removed.numel() == 0:
        return rows.clone()
    r = removed.to(rows.device)
    g_inv = g_inv.to(rows.dtype)
    coef = torch.linalg.solve(g_inv[r][:, r], rows[r])  # ((G^-1)_RR)^-1 W_R
    new = rows - g_inv[:, r] @ coef
    new[r] = 0
    return new


class _KFACSaliency(ChannelScorer):
    """Shared scoring of obd / obs: per producer row ``r``, ``(w_r^T A w_r) * output_factor(G)_r``.

    A channel's score is the sum over its rows (one per producer; an attention head has several).
    """

    defaults: dict[str, Any] = {"samples": 1024, "fisher": "true", "seed": 0}

    def output_factor(self, g_factor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        groups = ctx.groups()
        producers = {g.key: _producers(model, g, self.name) for g in groups}
        paths = sorted({p for prods in producers.values() for p, _, _ in prods})
        factors = kfac_factors(model, ctx, paths, self.samples, self.fisher, self.seed)
        self.__dict__["_factors"] = factors  # for the OBS weight update of the plan
        out = {}
        for g in groups:
            total = torch.zeros(g.size, dtype=torch.float64)
            for path, module, index in producers[g.key]:
                a, gf = factors[path]
                w = _weight_rows(module).double().to(a.device)
                quad = torch.einsum("god,gde,goe->go", w, a, w).reshape(-1)
                total += _gather(quad * self.output_factor(gf), index, 0).sum(1).cpu()
            out[g.key] = total
        return out


@register_method("obd", granularity="channel", needs_grad=True, needs_second_order=True, needs_labels=False,
                 family="baseline", description="K-FAC Optimal Brain Damage: (w_c^T A w_c) * G_cc.")
class OBD(_KFACSaliency):
    """Optimal Brain Damage on output channels with K-FAC factors (EigenDamage's baseline).

    Options: ``samples`` (prune-set examples), ``fisher`` ("true": labels sampled from the model,
    or "empirical"), ``seed`` (label sampling). Factors from :mod:`prunekit.curvature` (patch mode).
    """

    option_help = {"samples": "prune-set examples the K-FAC factors are computed on"}

    def output_factor(self, g_factor: torch.Tensor) -> torch.Tensor:
        return g_factor.diagonal()


@register_method("obs", granularity="channel", needs_grad=True, needs_second_order=True, needs_labels=False,
                 family="baseline",
                 description="K-FAC Optimal Brain Surgeon: (w_c^T A w_c) / (G^-1)_cc, with the OBS weight update "
                             "of the kept rows.")
class OBS(_KFACSaliency):
    """Optimal Brain Surgeon on output channels with K-FAC factors.

    ``G^-1`` is the inverse of ``G + damping * mean(diag G) * I``. With ``update`` (default) the
    plan also carries the OBS compensation of each producer's kept rows (:func:`obs_update`, for
    all rows a producer loses at once) in :attr:`Plan.weights`, in the post-removal shapes.
    Grouped (depthwise) producers get no update: their rows do not share one input factor.
    """

    defaults = {**_KFACSaliency.defaults, "damping": 1e-3, "update": True}
    option_help = {"update": "apply the OBS weight correction to the kept rows of each producer"}

    def output_factor(self, g_factor: torch.Tensor) -> torch.Tensor:
        return 1.0 / damped_inverse(g_factor, float(self.damping)).diagonal()

    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        plan = super().plan(model, ctx)
        if self.update:
            plan.weights.update(self.updated_weights(model, ctx, plan.channels))
            plan.meta["obs_update"] = sorted(plan.weights)
        return plan

    def updated_weights(self, model: nn.Module, ctx: PruneContext,
                        channels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Post-removal weights (and biases) of every producer that loses rows, OBS-corrected."""
        factors = self.__dict__.get("_factors") or {}
        kept_dims = ctx.graph.kept_dims(channels) if hasattr(ctx.graph, "kept_dims") else {}
        groups = {g.key: g for g in ctx.groups()}
        out: dict[str, torch.Tensor] = {}
        for key, keep in channels.items():
            g = groups.get(key)
            removed_ch = _complement_of(keep, g.size) if g is not None else None
            if removed_ch is None or removed_ch.numel() == 0:
                continue
            for path, module, index in _producers(model, g, self.name):
                if getattr(module, "groups", 1) != 1 or path not in factors:
                    continue
                removed = index[removed_ch].reshape(-1)
                rows = _weight_rows(module)[0].double()
                new = obs_update(rows, damped_inverse(factors[path][1], float(self.damping)), removed)
                w = module.weight
                nw = new[:, : w[0].numel()].reshape(w.shape).to(w.dtype)
                out[f"{path}.weight"] = _post_removal(nw, kept_dims.get(f"{path}.weight"), index, keep)
                if module.bias is not None:
                    nb = new[:, -1].to(module.bias.dtype)
                    out[f"{path}.bias"] = _post_removal(nb, kept_dims.get(f"{path}.bias"), index, keep)
        return out


def _complement_of(keep: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[torch.as_tensor(keep, dtype=torch.long)] = False
    return mask.nonzero().flatten()


def _post_removal(t: torch.Tensor, dims: dict[int, torch.Tensor] | None, index: torch.Tensor,
                  keep: torch.Tensor) -> torch.Tensor:
    """``t`` sliced to the shape it has once the plan's channels are removed."""
    if dims is None:  # no graph tables: only the producer's own rows go
        dims = {0: index[torch.as_tensor(keep, dtype=torch.long)].reshape(-1).sort().values}
    for d in sorted(dims):
        t = t.index_select(d, dims[d].to(t.device))
    return t.detach().clone()


__all__ = [
    "RandomWeights", "Magnitude", "MagnitudeLayerwise", "GradXWeight", "GradXWeightLayerwise",
    "RandomChannels", "L1", "L2", "BNScale", "Activation", "Taylor", "OBD", "OBS",
    "damped_inverse", "kfac_factors", "l1_scores", "obs_update", "scoring_mode",
]
