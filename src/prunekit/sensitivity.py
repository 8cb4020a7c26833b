"""Empirical sensitivities of SiPP and PFP (METHODS.md §5), vectorised, from forward passes only.

For a conv / linear layer with weight ``W`` split into ``W+ = max(W, 0)`` and ``W- = min(W, 0)`` and an
input point ``a >= 0`` unfolded into patches (``a_jp``: input feature ``j`` -- a channel and kernel tap --
at output position ``p``), the bias-free pre-activations are ``z+ = W+ * a`` and ``z- = W- * a``. The
relative contribution of edge ``(f, j)`` at patch ``p`` is

    g_fjp(a) = w_fj a_jp / z^{sign(w_fj)}_fp(a),    0 where |z| <= eps,

a number in ``[0, 1]``. Inputs that can be negative are split into the two points ``a+`` and ``-a-``
(``a = a+ + a-``), each non-negative, so the two products ``z+`` / ``z-`` keep their signs.

* SiPP (per weight): ``s_fj = max over points of the mean over patches of g_fjp``. The mean over
  patches is ``w_fj / P * sum_p a_jp / z_fp``: one batched matrix product of the unfolded input with
  ``1 / z`` per point (the shape of a per-example weight gradient), no loop over filters or patches.
* PFP (per input channel): ``s_c = max over points, patches, taps of c and filters of g_fjp``. That is a
  max-product contraction (no BLAS kernel). It is bounded first with one tap per channel,
  ``max_f (max_k |w_fck|) / |z_fp| * max_k a_ckp`` (broadcast products over blocks of filters x points x
  patches, reduced with ``amax``: a ninth of the work for 3x3 kernels), and the exact term is computed only
  at the (point, channel, patch) triples whose bound beats a value already reached (1-20 % of them on
  ResNet-20), with the same float operations as the dense form: the result is bitwise the same.

Layer inputs are caught by forward hooks while the model runs in eval mode over the sample set,
streamed in batches, so only the running maxima are kept. Conv2d (any stride, dilation, padding mode and
``groups``) and Linear (every leading position of a ``(..., features)`` input is a point, as in
torchprune) are supported; other layers raise :class:`~prunekit.errors.PruningError`.

The sample-set size follows torchprune's experiment code (``experiment/util/data.py``, which builds the
set the trackers of ``method/base_sens/base_sens_tracker.py`` run on): with ``eta_l`` the output size of
layer ``l`` (``C*H*W`` for a conv, the output features of a linear layer), ``eta = sum_l eta_l`` and
``eta* = max_l eta_l``, the failure probability ``delta`` is shared by the ``eta`` neurons, so
``|S| = ceil(3 ln(8 eta* / (delta / eta)))``; see :func:`sample_size`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.errors import PruningError
from prunekit.surgery.inputs import ExampleInputs, example_for, run_model

EPS = float(torch.finfo(torch.float32).eps)  # |z| <= EPS: the edge's contribution counts as 0
DEFAULT_DELTA = 1e-16
SUPPORTED = (nn.Conv2d, nn.Linear)


# --------------------------------------------------------------------------------------------- sample set
def layer_output_sizes(model: nn.Module, input_shape: tuple[int, ...], paths: Iterable[str] | None = None
                       ) -> dict[str, int]:
    """``eta_l`` of each conv / linear layer (or of ``paths``): ``C*H*W`` of a conv's output for one
    example, the output features of a linear layer."""
    wanted = set(paths) if paths is not None else None
    sizes: dict[str, int] = {}

    def hook(path: str) -> Any:
        def fn(m: nn.Module, args: Any, out: torch.Tensor) -> None:
            n = int(out.shape[-1]) if isinstance(m, nn.Linear) else int(out[0].numel())
            sizes[path] = max(sizes.get(path, 0), n)
        return fn

    mods = [(p, m) for p, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
            and (wanted is None or p in wanted)]
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    # one example: the model's own inputs where given (several / keyword / integer inputs), else zeros
    x = example_for(model, input_shape) if isinstance(input_shape, ExampleInputs) else \
        torch.zeros((1, *input_shape), device=dev)
    with _eval(model), _hooked([m.register_forward_hook(hook(p)) for p, m in mods]), torch.no_grad():
        run_model(model, x)
    return sizes


def sample_size(model: nn.Module, input_shape: tuple[int, ...], delta: float = DEFAULT_DELTA,
                paths: Iterable[str] | None = None, c: float = 3.0) -> int:
    """The size of the sample set S: ``ceil(c ln(8 eta* eta / delta))`` (torchprune's form, see the
    module docstring), ``eta`` / ``eta*`` the total / largest output size over the layers."""
    if not 0 < delta < 1:
        raise PruningError(f"delta must be in (0, 1), got {delta}")
    sizes = layer_output_sizes(model, input_shape, paths)
    if not sizes:
        raise PruningError("the model has no conv / linear layer to compute sensitivities for")
    eta, eta_star = sum(sizes.values()), max(sizes.values())
    return int(math.ceil(c * math.log(8.0 * eta_star / (delta / eta))))


# --------------------------------------------------------------------------------------------- one layer
def split_points(a: torch.Tensor) -> torch.Tensor:
    """``a`` if it is non-negative, else the points ``[a+; -a-]`` stacked along dim 0."""
    if bool((a >= 0).all()):
        return a
    return torch.cat((a.clamp(min=0), (-a).clamp(min=0)))


def _same_padding(m: nn.Conv2d) -> list[int]:
    pads: list[int] = []
    for k, d in zip(reversed(m.kernel_size), reversed(m.dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads


def _padded(a: torch.Tensor, m: nn.Conv2d) -> torch.Tensor:
    """The conv's input with the conv's own padding applied (so that unfolding needs none)."""
    if isinstance(m.padding, str):
        pads = [0, 0, 0, 0] if m.padding == "valid" else _same_padding(m)
    else:
        ph, pw = m.padding
        pads = [pw, pw, ph, ph]
    if not any(pads):
        return a
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    return F.pad(a, pads, mode=mode)


class LayerSensitivity:
    """Running SiPP (per weight) and / or PFP (per input channel) maxima of one Conv2d / Linear layer.

    ``update(a)`` takes one batch of the layer's inputs; ``weight_scores()`` / ``channel_scores()`` give
    the sensitivities over everything seen. ``chunk`` bounds the elements of PFP's broadcast product.
    """

    def __init__(self, module: nn.Module, path: str = "", weights: bool = True, channels: bool = True,
                 eps: float = EPS, chunk: int = 1 << 20):
        if not isinstance(module, SUPPORTED):
            raise PruningError(f"sensitivities are defined for Conv2d and Linear layers; {path or 'the layer'!r} "
                               f"is a {type(module).__name__}")
        self.module, self.path, self.eps, self.chunk = module, path, float(eps), int(chunk)
        self.want_weights, self.want_channels = weights, channels
        self.groups = module.groups if isinstance(module, nn.Conv2d) else 1
        self.taps = math.prod(module.kernel_size) if isinstance(module, nn.Conv2d) else 1
        self.num_points = 0
        self.num_patches: int | None = None
        self._max_plus: torch.Tensor | None = None  # (F, Jg): max over points of sum_p a_jp / z+_fp
        self._max_minus: torch.Tensor | None = None  # (F, Jg): max over points of -sum_p a_jp / z-_fp
        self._max_in: torch.Tensor | None = None  # (C_in,): PFP maxima

    # -- shapes ---------------------------------------------------------------------------------------
    def _unfold(self, a: torch.Tensor) -> torch.Tensor:
        """``(N, G, Jg, P)`` patches of the (split) input points."""
        m = self.module
        if isinstance(m, nn.Linear):
            a = a.reshape(-1, a.shape[-1])
            return a.view(a.shape[0], 1, a.shape[1], 1)
        if a.dim() == 3:
            a = a.unsqueeze(0)
        u = F.unfold(_padded(a, m), m.kernel_size, dilation=m.dilation, stride=m.stride)
        return u.view(u.shape[0], self.groups, -1, u.shape[-1])

    def _split_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.module.weight.detach()
        w = w.reshape(self.groups, w.shape[0] // self.groups, -1)  # (G, Fg, Jg)
        return w.clamp(min=0), w.clamp(max=0)

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        """``1 / z`` where ``|z| > eps``, else 0 (the edge's sensitivity is 0 there, not inf)."""
        ok = z.abs() > self.eps
        return torch.where(ok, 1.0 / torch.where(ok, z, torch.ones_like(z)), torch.zeros_like(z))

    # -- statistics -----------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, a: torch.Tensor) -> None:
        """Add one batch of layer inputs ``a`` (the tensor the layer is called with)."""
        wp, wm = self._split_weight()
        u = self._unfold(split_points(a.detach().to(wp.dtype)))
        rp = self._inverse(torch.matmul(wp, u))  # (N, G, Fg, P)
        rm = self._inverse(torch.matmul(wm, u))
        self.num_points += u.shape[0]
        self.num_patches = int(u.shape[-1])
        if self.want_weights:
            self._update_weights(u, rp, rm)
        if self.want_channels:
            self._update_channels(u, wp, wm, rp, rm)

    def _update_weights(self, u: torch.Tensor, rp: torch.Tensor, rm: torch.Tensor) -> None:
        n = u.shape[0]
        tp = torch.matmul(rp, u.transpose(-1, -2)).reshape(n, -1, u.shape[2]).amax(0)  # (F, Jg)
        tm = (-torch.matmul(rm, u.transpose(-1, -2))).reshape(n, -1, u.shape[2]).amax(0)
        self._max_plus = tp if self._max_plus is None else torch.maximum(self._max_plus, tp)
        self._max_minus = tm if self._max_minus is None else torch.maximum(self._max_minus, tm)

    def _update_channels(self, u: torch.Tensor, wp: torch.Tensor, wm: torch.Tensor, rp: torch.Tensor,
                         rm: torch.Tensor) -> None:
        sides = [(wp.abs(), rp.abs()), (wm.abs(), rm.abs())]  # |w| (G, Fg, Jg), |1 / z| (N, G, Fg, P)
        if self.taps == 1:  # one tap per channel: the bound below would be the exact term itself
            s = (_max_over_filters(sides, self.chunk) * u).amax((0, 3)).reshape(-1)
        else:
            s = self._bounded_channels(u, sides)
        self._max_in = s if self._max_in is None else torch.maximum(self._max_in, s)

    def _bounded_channels(self, u: torch.Tensor, sides: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """PFP's per-channel maxima of one batch, exactly, without every (filter, tap, patch) product.

        ``max_{f,k} |w_fck| a_ckp / |z_fp| <= max_f (max_k |w_fck|) / |z_fp| * max_k a_ckp`` (rounding is
        monotone, so this holds for the float values too): that bound costs one tap per channel; only the
        (point, channel, patch) triples whose bound exceeds a value already reached are computed exactly,
        with the same products in the same order as the dense form, so the result is bitwise the same."""
        n, g, jg, p = u.shape
        k = self.taps
        cg = jg // k
        fg = sides[0][0].shape[1]
        wide = [(w.reshape(g, fg, cg, k).amax(-1), r) for w, r in sides]
        ub = _max_over_filters(wide, self.chunk) * u.reshape(n, g, cg, k, p).amax(3)  # (N, G, Cg, P)
        ub = ub.permute(1, 2, 0, 3).reshape(g * cg, n * p)  # one row per channel
        best = torch.zeros(g * cg, dtype=u.dtype, device=u.device)
        if self._max_in is not None:
            best = self._max_in.clone()
        # a good value to beat first: the exact terms at each channel's few largest bounds
        top = ub.topk(min(4, n * p), dim=1).indices
        rows = torch.arange(g * cg, device=u.device).repeat_interleave(top.shape[1])
        best = torch.maximum(best, self._exact(u, sides, rows, top.reshape(-1)).view(g * cg, -1).amax(1))
        rows, pos = torch.nonzero(ub > best.unsqueeze(1), as_tuple=True)
        if len(rows):
            best.scatter_reduce_(0, rows, self._exact(u, sides, rows, pos), reduce="amax")
        return best

    def _exact(self, u: torch.Tensor, sides: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor,
               pos: torch.Tensor) -> torch.Tensor:
        """``max_{f,k} |w_fck| a_ckp / |z_fp|`` for the channels ``rows`` (``g * Cg + c``) at the points x
        patches ``pos`` (``n * P + p``), gathered from flat tables."""
        n, g, jg, p = u.shape
        k = self.taps
        cg = jg // k
        fg = sides[0][0].shape[1]
        # (G * Cg, K, Fg) weight tables, one per sign
        tables = [w.reshape(g, fg, cg, k).permute(0, 2, 3, 1).reshape(g * cg, k, fg) for w, _ in sides]
        out = torch.empty(len(rows), dtype=u.dtype, device=u.device)
        step = max(1, self.chunk // (fg * k))
        taps = torch.arange(k, device=u.device) * p
        filters = torch.arange(fg, device=u.device) * p
        for i in range(0, len(rows), step):
            r_, q_ = rows[i:i + step], pos[i:i + step]
            gi = torch.div(r_, cg, rounding_mode="floor")
            ni, pi = torch.div(q_, p, rounding_mode="floor"), q_ % p
            at_r = ((ni * g + gi) * fg * p + pi).unsqueeze(1) + filters  # flat index of r[n, g, f, p]
            acc: torch.Tensor | None = None
            for table, (_, r) in zip(tables, sides):
                t = table.index_select(0, r_).mul_(torch.take(r, at_r).unsqueeze(1)).amax(-1)  # (T, K)
                acc = t if acc is None else torch.maximum(acc, t)
            assert acc is not None
            at_u = ((ni * g * jg + r_ * k) * p + pi).unsqueeze(1) + taps  # u[n, g, c * K + k, p]
            out[i:i + step] = acc.mul_(torch.take(u, at_u)).amax(1)
        return out

    def _check_seen(self) -> None:
        if self.num_points == 0:
            raise PruningError(f"layer {self.path!r} was never called on the sample set: no sensitivity")

    def weight_scores(self) -> torch.Tensor:
        """SiPP sensitivities, shaped like the weight."""
        self._check_seen()
        if self._max_plus is None or self._max_minus is None:
            raise PruningError("this tracker was created with weights=False")
        wp, wm = self._split_weight()
        w = self.module.weight
        s = (wp.reshape(w.shape[0], -1) * self._max_plus - wm.reshape(w.shape[0], -1) * self._max_minus)
        return (s / float(self.num_patches)).reshape(w.shape)

    def channel_scores(self) -> torch.Tensor:
        """PFP sensitivities, one per input channel (input feature of a linear layer)."""
        self._check_seen()
        if self._max_in is None:
            raise PruningError("this tracker was created with channels=False")
        return self._max_in.clone()


def _max_over_filters(sides: list[tuple[torch.Tensor, torch.Tensor]], chunk: int) -> torch.Tensor:
    """``max over sides and filters f of |w_fx| |r_fp|``: ``(N, G, X, P)`` from ``(G, Fg, X)`` weights and
    ``(N, G, Fg, P)`` reciprocals, without a loop over filters or patches.

    Filters outermost, ``q[f, n, G, x, p]``, so the max over filters reduces the outermost dimension; blocks
    of filters x points x patches of about ``chunk`` elements (bounded memory, in cache)."""
    g, fg, x = sides[0][0].shape
    n, p = sides[0][1].shape[0], sides[0][1].shape[-1]
    fc = fg if fg * g * x <= chunk else max(1, chunk // (g * x))
    block = min(p, max(1, chunk // (fc * g * x)))
    step = max(1, chunk // (fc * g * x * p)) if block == p else 1
    perm = [(w.permute(1, 0, 2).reshape(fg, 1, g, x, 1), r.permute(2, 0, 1, 3).unsqueeze(3)) for w, r in sides]
    w0 = sides[0][0]
    out = torch.zeros(n, g, x, p, dtype=w0.dtype, device=w0.device)
    buf = torch.empty(fc * step * g * x * block, dtype=w0.dtype, device=w0.device)
    for i in range(0, n, step):
        for j in range(0, p, block):
            acc = out[i:i + step, ..., j:j + block]
            for k in range(0, fg, fc):
                for w6, r6 in perm:
                    rs = r6[k:k + fc, i:i + step, ..., j:j + block]
                    shape = (rs.shape[0], rs.shape[1], g, x, rs.shape[-1])
                    q = torch.mul(w6[k:k + fc], rs, out=buf[:math.prod(shape)].view(shape)).amax(0)
                    torch.maximum(acc, q, out=acc)
    return out


# --------------------------------------------------------------------------------------------- a model
@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, t in modes:
            m.training = t


@contextlib.contextmanager
def _hooked(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def collect_sensitivities(
    model: nn.Module,
    batches: Iterable[Any],
    paths: Iterable[str],
    weights: bool = True,
    channels: bool = True,
    batch_size: int = 32,
    eps: float = EPS,
) -> dict[str, LayerSensitivity]:
    """Sensitivities of the layers ``paths`` over the examples of ``batches`` (``x`` or ``(x, y)``
    items; only ``x`` is used), run in eval mode in chunks of ``batch_size`` examples."""
    if batch_size < 1:
        raise PruningError(f"batch_size must be >= 1, got {batch_size}")
    trackers: dict[str, LayerSensitivity] = {}
    for p in dict.fromkeys(paths):
        try:
            module = model.get_submodule(p)
        except AttributeError:
            raise PruningError(f"the model has no layer {p!r}") from None
        trackers[p] = LayerSensitivity(module, p, weights, channels, eps)

    def hook(t: LayerSensitivity) -> Any:
        return lambda m, args, out: t.update(args[0])

    handles = [trackers[p].module.register_forward_hook(hook(trackers[p])) for p in trackers]
    with _eval(model), _hooked(handles), torch.no_grad():
        for item in batches:
            x = item[0] if isinstance(item, (tuple, list)) and not isinstance(item, ExampleInputs) else item
            for i in range(0, len(x), batch_size):
                run_model(model, x[i:i + batch_size])
    return trackers


__all__ = ["DEFAULT_DELTA", "EPS", "LayerSensitivity", "collect_sensitivities", "layer_output_sizes",
           "sample_size", "split_points"]
