"""Kronecker-factored curvature (K-FAC / EKFAC) of conv and linear layers, shared by every
second-order method (``obd``, ``obs``, ``eigendamage``, ``eigendamage_improved``).

For a layer ``y = W a (+ b)`` the Fisher of its weight is approximated by ``A (x) G`` with

* ``A``: second moment of the layer's *inputs* ``a`` (a constant entry appended when the layer
  has a bias, so that ``[W, b]`` is one matrix);
* ``G``: second moment of the gradients ``g = dl_n / dy`` of each example's loss w.r.t. the
  layer's *outputs*.

Conv layers have two modes:

* ``mode="channel"`` (EigenDamage's default): ``A`` is ``C_in x C_in`` (per conv group); every
  output position *and every kernel tap* is a sample, and the bias input is the constant
  ``1/(kh*kw)`` per tap, so that the ``kh*kw`` taps together add ``b`` once. The weight seen by
  this factor is one ``(out, C_in (+1))`` matrix per tap.
* ``mode="patch"``: ``A`` is ``(C_in*kh*kw) x (C_in*kh*kw)`` over the patches ``F.unfold``
  extracts, bias input 1 (the KFC factor of Grosse & Martens).

**Scale.** ``A = E_{n, s, t}[a a^T]`` is averaged over examples, positions (and taps), and
``G = 1/N sum_n sum_s g_ns g_ns^T``, i.e. ``S * E_{n, s}[g g^T]`` with ``S`` positions per
example (the gradient of the *mean* loss times the batch size, times the positions). The product
``A (x) G = S * E[a a^T] (x) E[g g^T]`` is the KFC approximation of the Fisher of *one* example,
the same on every layer. This matters because the eigen-based methods rank the eigen-directions
of *all* layers against one global threshold: the saliency ``W*^2 lambda_G lambda_A`` of a
direction is a loss change only if every layer's factors carry the same absolute scale; a
per-layer factor (say a missing ``S``) would decide which layers get pruned. (The seed splits the
same product as ``A / S`` and ``G * S``; only the damping, added to each factor, sees the split.)

Statistics stream over a loader (memory: the factors, plus one batch of activations); the model
is put in eval mode for the pass, so BatchNorm running statistics are untouched, and every
module flag, ``requires_grad`` flag and hook is restored afterwards, also on error. Gradients
are taken with :func:`torch.autograd.grad`: no ``.grad`` is left on the parameters.

Also here: pi-corrected damping (:func:`damp`), a safe eigendecomposition (:func:`eigh`) and the
EKFAC eigenvalue correction from per-example gradients (:func:`ekfac_eigenvalues`, ``torch.func``).

This module sits below :mod:`prunekit.methods` and must not import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.errors import PruningError
from prunekit.surgery.inputs import ExampleInputs, primary_output, run_model

MODES = ("channel", "patch")
FISHERS = ("true", "empirical")
AVERAGES = ("sum", "ema")
EIG_FLOOR = 1e-10

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------- factors
@dataclass
class KFACFactors:
    """K-FAC factors of one layer (float64).

    ``A``: ``(groups, d, d)`` with ``d = C_in/groups (+1)`` (channel mode / linear) or
    ``C_in/groups * kh*kw (+1)`` (patch mode); ``G``: ``(out, out)``. ``taps``: kernel taps the
    ``A`` of channel mode is shared by (1 otherwise); ``in_positions`` / ``out_positions``: input /
    output positions per example (``H*W``, or tokens for a linear on sequences); ``examples``: N.
    """

    A: torch.Tensor
    G: torch.Tensor
    mode: str
    taps: int
    bias: bool
    in_positions: int
    out_positions: int
    examples: int


def _check_layer(module: nn.Module, path: str) -> None:
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        raise PruningError(f"curvature: layer {path!r} is a {type(module).__name__}; K-FAC factors are "
                           "defined for Conv2d and Linear layers only")


def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    if not isinstance(module.padding, str):
        return int(module.padding[0]), int(module.padding[1])
    if module.padding == "valid":
        return 0, 0
    pads = []
    for k, d in zip(module.kernel_size, module.dilation):
        if (d * (k - 1)) % 2:
            raise PruningError("curvature: padding='same' with an even effective kernel (asymmetric padding) "
                               "is not supported")
        pads.append(d * (k - 1) // 2)
    return pads[0], pads[1]


def conv_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``F.unfold`` patches ``(B, C_in*kh*kw, L)`` of a conv input (channel-major, then taps)."""
    ph, pw = _conv_padding(module)
    if module.padding_mode != "zeros" and (ph or pw):
        x = F.pad(x, (pw, pw, ph, ph), mode=module.padding_mode)
        ph = pw = 0
    return F.unfold(x, module.kernel_size, module.dilation, (ph, pw), module.stride)


def _tap_counts(size: int, out: int, k: int, d: int, s: int, pad: int) -> torch.Tensor:
    """How many (tap, output position) pairs of a conv read each input position along one axis."""
    n = torch.zeros(size, dtype=torch.float64)
    for i in range(k):
        pos = torch.arange(out) * s + i * d - pad
        pos = pos[(pos >= 0) & (pos < size)]
        n.index_add_(0, pos, torch.ones(len(pos), dtype=torch.float64))
    return n


def channel_gram(module: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The channel-mode K-FAC input sum ``rows^T rows`` of a conv (``rows = input_rows(module, x)``) without
    building the patches: every patch row is the input at one position, and position ``p`` appears in
    ``n(p) = n_h(h) n_w(w)`` rows (the taps and output positions reading it), so the sum is the Gram
    matrix of ``x * sqrt(n)`` -- ``kh*kw`` times less work and memory than ``F.unfold``. Returns the
    ``(groups, d, d)`` sum and the row count ``B * L * kh*kw``."""
    ph, pw = _conv_padding(module)
    if module.padding_mode != "zeros" and (ph or pw):
        x = F.pad(x, (pw, pw, ph, ph), mode=module.padding_mode)
        ph = pw = 0
    b, c, h, w = x.shape
    (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    n = _tap_counts(h, ho, kh, dh, sh, ph)[:, None] * _tap_counts(w, wo, kw, dw, sw, pw)[None, :]
    groups = module.groups
    xw = x * n.sqrt().to(x.dtype)
    rows = xw.reshape(b, groups, c // groups, h * w).permute(1, 0, 3, 2).reshape(groups, b * h * w, c // groups)
    cov = (rows.transpose(1, 2) @ rows).double()
    count = b * ho * wo * kh * kw
    if module.bias is not None:  # the bias column: 1/taps in every row
        const = 1.0 / (kh * kw)
        col = (x.double() * n.to(x.device)).sum((0, 2, 3)).reshape(groups, c // groups) * const
        corner = torch.full((groups, 1, 1), const * const * count, dtype=torch.float64, device=x.device)
        cov = torch.cat([torch.cat([cov, col[:, :, None]], 2), torch.cat([col[:, None, :], corner], 2)], 1)
    return cov, count


def input_rows(module: nn.Module, x: torch.Tensor, mode: str = "channel") -> torch.Tensor:
    """K-FAC input samples ``(groups, rows, d)`` of a layer (see :class:`KFACFactors` for ``d``).

    The bias column is appended when the layer has a bias: ``1/(kh*kw)`` in channel mode, else 1.
    """
    if isinstance(module, nn.Linear):
        rows, const = x.reshape(-1, x.shape[-1]).unsqueeze(0), 1.0
    elif isinstance(module, nn.Conv2d):
        cols = conv_patches(module, x)  # (B, C*T, L)
        b, _, length = cols.shape
        groups, taps = module.groups, module.kernel_size[0] * module.kernel_size[1]
        cols = cols.reshape(b, groups, -1, taps, length)  # (B, g, C/g, T, L)
        if mode == "channel":
            rows = cols.permute(1, 0, 4, 3, 2).reshape(groups, -1, cols.shape[2])
            const = 1.0 / taps
        else:
            rows = cols.flatten(2, 3).permute(1, 0, 3, 2).reshape(groups, b * length, -1)
            const = 1.0
    else:
        raise PruningError(f"curvature needs Conv2d or Linear layers, got {type(module).__name__}")
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_full((*rows.shape[:2], 1), const)], 2)
    return rows


def output_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output-gradient samples ``(rows, out)``: one per example and output position."""
    if isinstance(module, nn.Linear):
        return g.reshape(-1, g.shape[-1])
    return g.movedim(1, -1).reshape(-1, g.shape[1])


def _positions(module: nn.Module, t: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return int(t[0].numel() // t.shape[-1]) if t.dim() > 1 else 1
    return int(t.shape[2] * t.shape[3])


class _Stats:
    """Per-layer accumulator: running sums of the current batch, folded into a sum or an EMA."""

    def __init__(self, average: str, decay: float) -> None:
        self.average, self.decay = average, decay
        self.a = self.g = None  # totals (sum) or moving averages (ema)
        self.a_rows = self.n = 0
        self.batch_a: torch.Tensor | None = None
        self.batch_a_rows = 0
        self.batch_g: torch.Tensor | None = None
        self.in_pos = self.out_pos = 0
        self.seen = False

    def add_input(self, rows: torch.Tensor) -> None:
        self.add_input_sum((rows.transpose(1, 2) @ rows).double(), rows.shape[1])

    def add_input_sum(self, cov: torch.Tensor, rows: int) -> None:
        self.batch_a = cov if self.batch_a is None else self.batch_a + cov
        self.batch_a_rows += rows

    def add_grad(self, rows: torch.Tensor) -> None:
        cov = (rows.T @ rows).double()
        self.batch_g = cov if self.batch_g is None else self.batch_g + cov

    def end_batch(self, n: int) -> None:
        if self.batch_a is None or self.batch_g is None:
            self.batch_a = self.batch_g = None
            return
        if self.average == "sum":
            self.a = self.batch_a if self.a is None else self.a + self.batch_a
            self.g = self.batch_g if self.g is None else self.g + self.batch_g
            self.a_rows += self.batch_a_rows
            self.n += n
        else:  # exponential moving average of the per-batch factors
            fa, fg = self.batch_a / self.batch_a_rows, self.batch_g / n
            d = self.decay
            self.a = fa if self.a is None else d * self.a + (1 - d) * fa
            self.g = fg if self.g is None else d * self.g + (1 - d) * fg
            self.n += n
        self.batch_a = self.batch_g = None
        self.batch_a_rows = 0
        self.seen = True

    def factors(self, module: nn.Module, path: str, mode: str) -> KFACFactors:
        if not self.seen:
            raise PruningError(f"curvature: layer {path!r} was not reached by the forward / backward pass "
                               "(unused, or the loss does not depend on it)")
        a, g = (self.a / self.a_rows, self.g / self.n) if self.average == "sum" else (self.a, self.g)
        taps = 1
        if isinstance(module, nn.Conv2d) and mode == "channel":
            taps = module.kernel_size[0] * module.kernel_size[1]
        return KFACFactors(a, g, mode, taps, module.bias is not None, self.in_pos, self.out_pos, self.n)


@contextlib.contextmanager
def scoring_mode(model: nn.Module, grad_params: Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """Eval mode (and ``requires_grad`` on ``grad_params``) for the duration; everything restored after."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in grad_params]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def statistics_mode(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Eval mode (BatchNorm statistics frozen) and ``requires_grad`` on every float parameter for the
    duration, so that gradients w.r.t. layer outputs exist; every flag is restored afterwards."""
    return scoring_mode(model, [p for p in model.parameters() if p.is_floating_point()])


def sampled_labels(logits: torch.Tensor, gen: torch.Generator | None, y: torch.Tensor) -> torch.Tensor:
    """Labels drawn from the model's softmax (true Fisher) when ``gen`` is given, else ``y``: one per example
    for ``(N, C)`` logits, one per position for dense ``(N, C, d1, ...)`` outputs (classes on dim 1, as
    ``F.cross_entropy`` reads them)."""
    if gen is None:
        return y
    z = logits.detach().float()
    if z.dim() == 1:
        z = z.unsqueeze(0)
    flat = z.movedim(1, -1).reshape(-1, z.shape[1])  # one row of class scores per example / position
    draw = torch.multinomial(F.softmax(flat, -1), 1, generator=gen).squeeze(1)
    return draw.view(z.shape[0], *z.shape[2:]).to(logits.device)


def _check_options(mode: str, fisher: str, average: str, decay: float) -> None:
    if mode not in MODES:
        raise PruningError(f"curvature: mode={mode!r} must be one of {MODES}")
    if fisher not in FISHERS:
        raise PruningError(f"curvature: fisher={fisher!r} must be 'true' or 'empirical'")
    if average not in AVERAGES:
        raise PruningError(f"curvature: average={average!r} must be 'sum' or 'ema'")
    if not 0 <= decay < 1:
        raise PruningError(f"curvature: decay={decay} must be in [0, 1)")


def _generator(fisher: str, seed: int, device: torch.device | str) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(int(seed)) if fisher == "true" else None


def kfac_factors(model: nn.Module, batches: Batches, paths: list[str], loss: LossFn | None = None,
                 mode: str = "channel", fisher: str = "true", seed: int = 0, average: str = "sum",
                 decay: float = 0.9, reduce: bool = False) -> dict[str, KFACFactors]:
    """K-FAC factors of the layers at ``paths`` over the batches of a loader (one pass).

    ``loss(logits, y)`` is the mean loss of a batch (default: cross-entropy); ``fisher="true"``
    draws ``y`` from the model's softmax (generator seeded with ``seed``), ``"empirical"`` uses the
    loader's labels. ``average="sum"`` weighs every sample alike; ``"ema"`` folds the per-batch
    factors into an exponential moving average with weight ``decay`` on the past.

    ``reduce=True`` (under ``torchrun``, with ``batches`` holding each rank's slice of the prune set): the
    factor sums are added up over the ranks before they are normalised (``average="sum"`` only; an EMA
    depends on the order of the batches). With ``fisher="true"`` each rank draws its own labels.
    """
    _check_options(mode, fisher, average, decay)
    if reduce and average != "sum":
        raise PruningError("curvature: factors reduced over ranks need average='sum'")
    loss = loss or F.cross_entropy
    modules = {p: model.get_submodule(p) for p in paths}
    for p, m in modules.items():
        _check_layer(m, p)
    stats = {p: _Stats(average, decay) for p in paths}
    captured: list[tuple[str, torch.Tensor]] = []

    def make_hook(path: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            x = args[0].detach()
            with torch.no_grad():
                if mode == "channel" and isinstance(module, nn.Conv2d):
                    stats[path].add_input_sum(*channel_gram(module, x.float()))
                else:
                    stats[path].add_input(input_rows(module, x.float(), mode))
            stats[path].in_pos, stats[path].out_pos = _positions(module, x), _positions(module, out)
            captured.append((path, out))
            return out.clone()  # keeps the captured output safe from in-place ops downstream

        return hook

    handles = []
    gen = None
    try:
        with statistics_mode(model), torch.enable_grad():
            for p, m in modules.items():
                handles.append(m.register_forward_hook(make_hook(p)))
            for x, y in batches:
                captured.clear()
                logits = primary_output(run_model(model, x))
                if gen is None and fisher == "true":
                    gen = _generator(fisher, seed, logits.device)
                total = loss(logits, sampled_labels(logits, gen, y)) * len(x)
                grads = torch.autograd.grad(total, [t for _, t in captured], allow_unused=True)
                with torch.no_grad():
                    for (path, _), g in zip(captured, grads):
                        if g is not None:
                            stats[path].add_grad(output_rows(modules[path], g.float()))
                for s in stats.values():
                    s.end_batch(len(x))
            captured.clear()
    finally:
        for h in handles:
            h.remove()
    if reduce:
        _reduce_stats(stats)
    if all(s.n == 0 for s in stats.values()) and paths:
        raise PruningError("curvature: the prune set is empty (no examples reached the layers)")
    return {p: s.factors(modules[p], p, mode) for p, s in stats.items()}


def _reduce_stats(stats: dict[str, _Stats]) -> None:
    """Sum every layer's factor totals and counts over the ranks (no-op in one process)."""
    from prunekit import distributed

    if not distributed.active():
        return
    import torch.distributed as dist

    for s in stats.values():
        if s.a is None or s.g is None:
            raise PruningError("curvature: a rank saw no examples of a layer; give every rank a part of the "
                               "prune set (at least one example per rank in every batch)")
        dist.all_reduce(s.a)
        dist.all_reduce(s.g)
        s.a_rows, s.n = (int(round(v)) for v in distributed.all_reduce_sum([float(s.a_rows), float(s.n)]))


# --------------------------------------------------------------------------------------------- algebra
def pi_damping(a: torch.Tensor, g: torch.Tensor, lam: float) -> tuple[float, float]:
    """The damping ``(sqrt(lam * pi), sqrt(lam / pi))`` added to ``A`` and ``G``, with
    ``pi = sqrt((tr A / dim A) / (tr G / dim G))`` (Martens & Grosse's factored Tikhonov)."""
    ta = float(a.diagonal(dim1=-2, dim2=-1).mean())
    tg = float(g.diagonal(dim1=-2, dim2=-1).mean())
    pi = (ta / tg) ** 0.5 if ta > 0 and tg > 0 else 1.0
    return (lam * pi) ** 0.5, (lam / pi) ** 0.5


def damp(f: KFACFactors, lam: float) -> KFACFactors:
    """``f`` with pi-corrected damping ``lam`` added (a new object; ``lam=0``: unchanged)."""
    if lam <= 0:
        return f
    da, dg = pi_damping(f.A, f.G, lam)
    eye_a = torch.eye(f.A.shape[-1], dtype=f.A.dtype, device=f.A.device)
    eye_g = torch.eye(f.G.shape[-1], dtype=f.G.dtype, device=f.G.device)
    return KFACFactors(f.A + da * eye_a, f.G + dg * eye_g, f.mode, f.taps, f.bias, f.in_positions,
                       f.out_positions, f.examples)


def eigh(m: torch.Tensor, tries: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix (float64): eigenvalues (descending) below
    1e-10 set to 0, eigenvectors as columns. When ``torch.linalg.eigh`` fails to converge, a
    growing jitter ``eps * mean(diag) * I`` is added and the decomposition retried."""
    m = 0.5 * (m.double() + m.double().transpose(-1, -2))
    scale = float(m.diagonal(dim1=-2, dim2=-1).abs().mean()) or 1.0
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    jitter = 0.0
    for i in range(tries):
        try:
            vals, vecs = torch.linalg.eigh(m + jitter * eye)
            break
        except RuntimeError as e:  # torch.linalg.LinAlgError derives from RuntimeError
            if i == tries - 1:
                raise PruningError(f"curvature: eigendecomposition failed even with jitter {jitter:.3g}: {e}") from e
            jitter = scale * 10.0 ** (-10 + 2 * i)
    vals, vecs = vals.flip(-1), vecs.flip(-1)
    vals = torch.where(vals < EIG_FLOOR, torch.zeros_like(vals), vals)
    return vals, vecs


# --------------------------------------------------------------------------------------------- EKFAC
def weight_taps(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                mode: str = "channel", gradient: bool = False) -> torch.Tensor:
    """A layer's weight (or a gradient of it) as ``(out, d, taps)`` in the basis of its ``A`` factor.

    Channel mode: ``[W[:, :, tap], b]`` per tap (``d = C_in (+1)``); patch mode and linear:
    ``[W.flatten(1), b]`` with one tap. For a *gradient* (``gradient=True``) the bias column of
    channel mode is ``grad_b / taps``: each tap's copy of ``b`` sees the input ``1/taps``. Works on
    a leading batch dimension too
    (``weight`` ``(n, out, ...)``, ``bias`` ``(n, out)``). Conv groups must be 1.
    """
    batched = weight.dim() == (module.weight.dim() + 1)
    w = weight if batched else weight.unsqueeze(0)
    b = None if bias is None else (bias if batched else bias.unsqueeze(0))
    if isinstance(module, nn.Conv2d) and getattr(module, "groups", 1) != 1:
        raise PruningError("curvature: the eigenbasis of a grouped convolution is not supported")
    taps = module.kernel_size[0] * module.kernel_size[1] if isinstance(module, nn.Conv2d) and mode == "channel" else 1
    w = w.reshape(w.shape[0], w.shape[1], w.shape[2], -1) if taps > 1 else w.reshape(w.shape[0], w.shape[1], -1, 1)
    if b is not None:
        col = (b / taps if gradient else b)[:, :, None, None].expand(-1, -1, 1, taps)
        w = torch.cat([w, col.to(w.dtype)], 2)
    return w if batched else w[0]


def rotate(wt: torch.Tensor, q_g: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """``Q_G^T W Q_A`` per tap of an ``(..., out, d, taps)`` tensor."""
    return torch.einsum("oi,...odt,dj->...ijt", q_g, wt, q_a)


def _add_rotated_squares(sums: dict[str, torch.Tensor], modules: dict[str, nn.Module],
                         bases: dict[str, tuple[torch.Tensor, torch.Tensor]], grads: dict[str, torch.Tensor],
                         mode: str) -> None:
    """Add ``sum_n (Q_G^T grad_W l_n Q_A)^2`` of a chunk of per-example gradients to ``sums``."""
    with torch.no_grad():
        for p, m in modules.items():
            q_a, q_g = bases[p]
            gb = grads.get(f"{p}.bias")
            wt = weight_taps(m, grads[f"{p}.weight"].double(), None if gb is None else gb.double(), mode,
                             gradient=True)
            sq = rotate(wt, q_g.double(), q_a.double()).pow(2).sum(0)
            sums[p] = sq if p not in sums else sums[p] + sq


def ekfac_eigenvalues(model: nn.Module, batches: Batches, bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      loss: LossFn | None = None, mode: str = "channel", fisher: str = "true", seed: int = 0,
                      num_batches: int = 1, chunk: int = 32) -> dict[str, torch.Tensor]:
    """EKFAC eigenvalues ``S = mean_n (Q_G^T grad_W l_n Q_A)^2`` (floored at 1e-15) of each layer.

    ``bases``: path -> ``(Q_A, Q_G)``. Per-example gradients of the layers' weights and biases come
    from ``torch.func`` (``vmap`` over ``grad`` of a ``functional_call``), one batch at a time, over
    the first ``num_batches`` batches, ``chunk`` examples at a time (memory: ``chunk`` copies of the
    layers' weights). Result per path:
    ``(out, d, taps)`` (see :func:`weight_taps`).
    """
    from torch.func import functional_call, grad, vmap
    from torch.utils._pytree import tree_map

    _check_options(mode, fisher, "sum", 0.0)
    loss = loss or F.cross_entropy
    modules = {p: model.get_submodule(p) for p in bases}
    names = []
    for p, m in modules.items():
        _check_layer(m, p)
        names.append(f"{p}.weight")
        if m.bias is not None:
            names.append(f"{p}.bias")
    sums: dict[str, torch.Tensor] = {}
    n = 0
    gen = None
    with statistics_mode(model):
        params = dict(model.named_parameters())
        missing = [k for k in names if k not in params]
        if missing:
            raise PruningError(f"curvature: EKFAC needs plain weights; {missing[0]!r} is not a parameter "
                               "(masked or parametrized layers are not supported)")
        fixed = {k: v.detach() for k, v in params.items() if k not in names}
        fixed.update(dict(model.named_buffers()))
        own = {k: params[k].detach() for k in names}

        def one(p: dict[str, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any],
                y: torch.Tensor) -> torch.Tensor:  # one example: every input tensor gets its batch dim back
            args, kwargs = tree_map(lambda t: t.unsqueeze(0), (args, kwargs))
            out = functional_call(model, {**fixed, **p}, args, kwargs)
            return loss(primary_output(out), y.unsqueeze(0))

        per_example = vmap(grad(one), in_dims=(None, 0, 0, 0))
        for i, (x, y) in enumerate(batches):
            if i >= num_batches:
                break
            with torch.no_grad():
                logits = primary_output(run_model(model, x))
            if gen is None and fisher == "true":
                gen = _generator(fisher, seed, logits.device)
            y = sampled_labels(logits, gen, y)
            step = max(1, int(chunk))
            for start in range(0, len(x), step):
                xs, ys = x[start:start + step], y[start:start + step]
                try:
                    inputs = (xs.args, xs.kwargs) if isinstance(xs, ExampleInputs) else ((xs,), {})
                    grads = per_example(own, *inputs, ys)
                except RuntimeError as e:
                    raise PruningError(f"curvature: per-example gradients (torch.func.vmap) failed on this "
                                       f"model: {str(e).splitlines()[0]}") from e
                _add_rotated_squares(sums, modules, bases, grads, mode)
            n += len(x)
    if n == 0:
        raise PruningError("curvature: the prune set is empty (EKFAC saw no examples)")
    return {p: (s / n).clamp_min(1e-15) for p, s in sums.items()}


__all__ = ["KFACFactors", "channel_gram", "conv_patches", "damp", "eigh", "ekfac_eigenvalues", "input_rows",
           "kfac_factors",
           "output_rows", "pi_damping", "rotate", "sampled_labels", "statistics_mode", "weight_taps"]
