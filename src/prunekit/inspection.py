"""What pruning did to each layer: widths, ranks and sparsity, parameters, FLOPs and measured latency.

>>> report = inspect_model(pruned, (3, 32, 32), base=original)
>>> print(report.table())
>>> plot_layers(report, "layers.png")

A *layer* is every convolution and linear layer, a low-rank chain (``LowRankConv2d`` / ``LowRankLinear``,
counted as one layer with its ranks) and ``nn.MultiheadAttention``. Widths before pruning come from ``base``
(the unpruned model), else from ``original_widths`` (``{path: [out, in]}``, as a prune report records them),
else from the model's zoo architecture rebuilt from ``model.prunekit_config``.

FLOPs are multiply-adds for one example (:func:`prunekit.metrics.layer_macs`, the counter behind
:func:`prunekit.metrics.count_flops`); latency is eager PyTorch on the model's device, the median over
``repeats`` forward passes of the time between each layer's forward pre-hook and forward hook.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from prunekit.errors import PrunekitError

__all__ = ["Inspection", "LayerRow", "inspect_checkpoint", "inspect_model", "layer_modules", "plot_layers"]


# --------------------------------------------------------------------------------------------- layers
def _lowrank_types() -> tuple[type, ...]:
    from prunekit.surgery.lowrank import LowRankConv2d, LowRankLinear

    return (LowRankConv2d, LowRankLinear)


def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's layers in forward-definition order: conv / linear layers, low-rank chains (one entry each,
    their factors not listed apart) and multi-head attention (its output projection not listed apart)."""
    lowrank = _lowrank_types()
    out: dict[str, nn.Module] = {}
    wholes: list[str] = []
    for path, m in model.named_modules():
        if not path or any(path.startswith(w + ".") for w in wholes):
            continue
        if isinstance(m, (*lowrank, nn.MultiheadAttention)):
            out[path] = m
            wholes.append(path)
        elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            out[path] = m
    return out


def _widths(m: nn.Module) -> tuple[int, int]:
    """(out, in) units of a layer: channels, features, or the embedding width of attention."""
    if isinstance(m, nn.MultiheadAttention):
        return int(m.embed_dim), int(m.embed_dim)
    if hasattr(m, "out_channels"):
        return int(m.out_channels), int(m.in_channels)
    return int(m.out_features), int(m.in_features)


def _weights(m: nn.Module) -> list[torch.Tensor]:
    """The layer's effective weight tensors (masks and parametrizations applied)."""
    from prunekit.metrics import effective_parameters

    return [t for name, t in effective_parameters(m) if name.rpartition(".")[2].endswith("weight")]


def _live_out(m: nn.Module) -> int:
    """Output units with at least one non-zero weight (masked channel pruning zeroes whole rows)."""
    if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and not getattr(m, "transposed", False):
        w = _weights(m)[0]
        return int((w.reshape(w.shape[0], -1) != 0).any(dim=1).sum())
    return _widths(m)[0]


def _rank(m: nn.Module) -> dict[str, int] | None:
    if isinstance(m, _lowrank_types()):
        return {k: int(v) for k, v in (("r_in", m.r_in), ("r_out", m.r_out)) if v is not None}
    return None


def _owner(name: str, layers: Mapping[str, Any]) -> str | None:
    """The layer a (sub-)module path belongs to."""
    while name:
        if name in layers:
            return name
        name = name.rpartition(".")[0]
    return None


def _layer_flops(model: nn.Module, input_shape: tuple[int, ...], layers: Mapping[str, nn.Module]
                 ) -> dict[str, tuple[int, int]]:
    """(dense, effective) multiply-adds of every layer for one example."""
    from prunekit.metrics import layer_macs

    out = {p: (0, 0) for p in layers}
    for lm in layer_macs(model, input_shape):
        owner = _owner(lm.name, layers)
        if owner is not None:
            dense, eff = out[owner]
            out[owner] = (dense + lm.dense, eff + lm.dense - lm.zero_skipped)
    return out


def _layer_latency(model: nn.Module, input_shape: tuple[int, ...], layers: Mapping[str, nn.Module],
                   batch_size: int, repeats: int, warmup: int) -> tuple[dict[str, float], float]:
    """Median ms per layer (time from its pre-hook to its hook, summed over its calls in one forward) and the
    median ms of the whole forward pass, over ``repeats`` passes after ``warmup``."""
    from prunekit.metrics._common import eval_mode, example_input

    current: dict[str, float] = {}
    start: dict[str, float] = {}

    def pre(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            start[name] = time.perf_counter()
        return hook

    def post(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            current[name] = current.get(name, 0.0) + time.perf_counter() - start[name]
        return hook

    handles = []
    for name, m in layers.items():
        handles.append(m.register_forward_pre_hook(pre(name)))
        handles.append(m.register_forward_hook(post(name)))
    per_layer: dict[str, list[float]] = {name: [] for name in layers}
    totals: list[float] = []
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    try:
        with eval_mode(model), torch.inference_mode():
            x = example_input(model, input_shape, batch_size)
            x = torch.randn_like(x) if x.is_floating_point() else x
            for i in range(warmup + repeats):
                current.clear()
                sync()
                t0 = time.perf_counter()
                model(x)
                sync()
                total = time.perf_counter() - t0
                if i >= warmup:
                    totals.append(total)
                    for name in layers:
                        per_layer[name].append(current.get(name, 0.0))
    finally:
        for h in handles:
            h.remove()
    return ({n: statistics.median(v) * 1e3 for n, v in per_layer.items()}, statistics.median(totals) * 1e3)


# --------------------------------------------------------------------------------------------- results
@dataclass
class LayerRow:
    """One layer of an :class:`Inspection` (``*_before``: the unpruned model's; None where unknown)."""

    name: str
    type: str
    out_after: int
    in_after: int
    out_before: int | None = None
    in_before: int | None = None
    out_live: int | None = None  # output units with a non-zero weight (< out_after: masked channels)
    rank: dict[str, int] | None = None  # low-rank chains: r_in / r_out
    sparsity: float = 0.0  # share of zero weights
    params: int = 0
    nonzero_params: int = 0
    params_before: int | None = None
    flops: int = 0  # dense multiply-adds, one example
    effective_flops: int = 0  # multiply-adds that do not meet a zero weight
    flops_before: int | None = None
    latency_ms: float | None = None
    latency_before_ms: float | None = None
    removed: bool = False  # in the unpruned model but gone from this one


@dataclass
class Inspection:
    """Per-layer figures of a (pruned) model; :meth:`table` prints them, :func:`plot_layers` draws them."""

    layers: list[LayerRow]
    input_shape: tuple[int, ...]
    totals: dict[str, Any]
    widths_source: str | None  # where the widths before pruning come from
    latency: dict[str, Any] | None = None  # batch_size, repeats, warmup, threads, device
    info: dict[str, Any] = field(default_factory=dict)  # checkpoint, architecture, method, target ...

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps({
            "input_shape": list(self.input_shape), "widths_source": self.widths_source, "latency": self.latency,
            "info": self.info, "totals": self.totals, "layers": [asdict(r) for r in self.layers]}, default=str))

    def table(self) -> str:
        """The layers as a fixed-width text table with a totals line and a legend."""
        has_before = any(r.out_before is not None for r in self.layers)
        has_lat = self.latency is not None

        def arrow(before: Any, after: Any) -> str:
            return f"{after}" if before is None else f"{before}→{after}"

        def macs(v: int | None) -> str:
            return "-" if v is None else _si(v)

        rows = []
        for r in self.layers:
            rank = "-" if not r.rank else " ".join(f"{k[2:]} {v}" for k, v in r.rank.items())
            out = "removed" if r.removed else arrow(r.out_before, r.out_after)
            if r.out_live is not None and r.out_live < r.out_after:
                out += f" ({r.out_live} live)"
            row = [r.name, r.type, out, "" if r.removed else arrow(r.in_before, r.in_after), rank,
                   "" if r.removed else f"{100 * r.sparsity:.1f}%",
                   arrow(None if r.params_before is None else _si(r.params_before), _si(r.nonzero_params)),
                   arrow(macs(r.flops_before) if r.flops_before is not None else None, macs(r.effective_flops))]
            if has_lat:
                row.append(arrow(None if r.latency_before_ms is None else f"{r.latency_before_ms:.3f}",
                                 "-" if r.latency_ms is None else f"{r.latency_ms:.3f}"))
            rows.append(row)
        t = self.totals
        total = ["total", "", "", "", "", f"{100 * t.get('sparsity', 0.0):.1f}%",
                 arrow(None if t.get("params_before") is None else _si(t["params_before"]), _si(t["nonzero_params"])),
                 arrow(None if t.get("flops_before") is None else _si(t["flops_before"]),
                       _si(t["effective_flops"]))]
        if has_lat:
            total.append(arrow(None if t.get("latency_before_ms") is None else f"{t['latency_before_ms']:.3f}",
                               f"{t['latency_ms']:.3f}"))
        head = ["layer", "type", "out" + (" (before→after)" if has_before else ""), "in", "rank", "sparsity",
                "params (nonzero)", "MACs"]
        if has_lat:
            head.append(f"ms (batch {self.latency['batch_size']})")
        grid = [head, *rows, total]
        widths = [max(len(str(row[i])) for row in grid) for i in range(len(head))]
        numeric = set(range(2, len(head)))

        def fmt(row: list[Any]) -> str:
            return "  ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip()

        lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
        lines += ["  ".join("-" * w for w in widths), fmt(total)]
        notes = [f"input {'x'.join(map(str, self.input_shape))}; MACs: multiply-adds per example that meet a "
                 f"non-zero weight; widths before pruning: {self.widths_source or 'unknown'}"]
        other = t.get("other_flops")
        if other:
            notes.append(f"{_si(other)} MACs outside these layers (attention matmuls) are in the total")
        if has_lat:
            lat = self.latency
            notes.append(f"latency: eager PyTorch on {lat['device']}, batch {lat['batch_size']}, {lat['threads']} "
                         f"thread(s), median of {lat['repeats']} passes (after {lat['warmup']} warm-up); the total "
                         f"is the whole forward pass ({t['latency_ms'] - t['layer_latency_ms']:.3f} ms outside "
                         "these layers: norms, activations, pooling, hooks)")
        return "\n".join(lines + [""] + notes)


def _si(v: float) -> str:
    v = float(v)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{int(v)}"


# --------------------------------------------------------------------------------------------- inspect
def _arch_model(model: nn.Module) -> nn.Module | None:
    """The unpruned zoo architecture of ``model`` (random weights; shapes and FLOPs only), or None."""
    cfg = getattr(model, "prunekit_config", None)
    if not cfg:
        return None
    from prunekit.models import create_model

    return create_model(cfg["name"], num_classes=cfg["num_classes"], in_channels=cfg["in_channels"],
                        **cfg.get("kwargs", {}))


def inspect_model(model: nn.Module, input_shape: tuple[int, ...], base: nn.Module | None = None,
                  original_widths: Mapping[str, Any] | None = None, latency: bool = True, batch_size: int = 1,
                  repeats: int = 20, warmup: int = 3, threads: int | None = None) -> Inspection:
    """Per-layer widths, ranks, sparsity, parameters, FLOPs and (``latency``) eager latency of ``model``.

    ``base``: the unpruned model (widths, FLOPs, parameters and latency before pruning). Without it,
    ``original_widths`` (``{path: [out, in]}`` or ``{path: {"before": [out, in], ...}}``, a prune report's
    ``layers``) give the widths before, and the zoo architecture of ``model.prunekit_config`` the rest, when
    its widths agree with them; with neither, the zoo architecture alone.
    """
    from prunekit.metrics import count_flops, count_params, effective_flops

    shape = tuple(int(s) for s in input_shape)
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise PrunekitError(f"need batch_size >= 1, repeats >= 1, warmup >= 0; got {batch_size}, {repeats}, "
                            f"{warmup}")
    source = "base model" if base is not None else None
    recorded: dict[str, tuple[int, int]] = {}
    for path, v in (original_widths or {}).items():
        w = v.get("before") if isinstance(v, Mapping) else v
        if isinstance(w, (list, tuple)) and len(w) == 2:
            recorded[path] = (int(w[0]), int(w[1]))
    if base is None:
        arch = _arch_model(model)
        if arch is not None:
            arch.to(next(model.parameters()).device)
            arch_widths = {p: _widths(m) for p, m in layer_modules(arch).items()}
            if not recorded or all(arch_widths.get(p) == w for p, w in recorded.items()):
                base = arch
                source = "the checkpoint's prune report" if recorded else "the zoo architecture"
        if recorded and base is None:
            source = "the checkpoint's prune report"
    layers = layer_modules(model)
    base_layers = layer_modules(base) if base is not None else {}
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        flops = _layer_flops(model, shape, layers)
        base_flops = _layer_flops(base, shape, base_layers) if base is not None else {}
        lat = base_lat = None
        if latency:
            lat = _layer_latency(model, shape, layers, batch_size, repeats, warmup)
            if base is not None:
                base_lat = _layer_latency(base, shape, base_layers, batch_size, repeats, warmup)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
    rows: list[LayerRow] = []
    for path, m in layers.items():
        out_w, in_w = _widths(m)
        bm = base_layers.get(path)
        before = _widths(bm) if bm is not None else recorded.get(path)
        ws = _weights(m)
        n_w = sum(w.numel() for w in ws)
        p = count_params(m)
        rows.append(LayerRow(
            name=path, type=type(m).__name__.removeprefix("Parametrized"), out_after=out_w, in_after=in_w,
            out_before=None if before is None else before[0], in_before=None if before is None else before[1],
            out_live=_live_out(m), rank=_rank(m),
            sparsity=0.0 if not n_w else 1.0 - sum(int(torch.count_nonzero(w)) for w in ws) / n_w,
            params=p["params"], nonzero_params=p["nonzero_params"],
            params_before=None if bm is None else count_params(bm)["params"],
            flops=flops[path][0], effective_flops=flops[path][1],
            flops_before=None if bm is None else base_flops[path][0],
            latency_ms=None if lat is None else lat[0][path],
            latency_before_ms=None if base_lat is None or bm is None else base_lat[0][path]))
    for path, bm in base_layers.items():  # layers the pruning took away entirely
        if path not in layers and _owner(path, layers) is None:
            out_b, in_b = _widths(bm)
            rows.append(LayerRow(name=path, type=type(bm).__name__.removeprefix("Parametrized"), out_after=0,
                                 in_after=0, out_before=out_b, in_before=in_b, params_before=count_params(bm)["params"],
                                 flops_before=base_flops[path][0], removed=True,
                                 latency_before_ms=None if base_lat is None else base_lat[0][path]))
    whole = count_params(model)
    total_flops = count_flops(model, shape)
    weights = [w for m in layers.values() for w in _weights(m)]
    n_weights = sum(w.numel() for w in weights)
    totals: dict[str, Any] = {
        "params": whole["params"], "nonzero_params": whole["nonzero_params"],
        "flops": total_flops, "effective_flops": effective_flops(model, shape),
        "layer_flops": sum(r.flops for r in rows), "other_flops": total_flops - sum(r.flops for r in rows),
        "sparsity": 0.0 if not n_weights else 1.0 - sum(int(torch.count_nonzero(w)) for w in weights) / n_weights,
        "params_before": None if base is None else count_params(base)["params"],
        "flops_before": None if base is None else count_flops(base, shape),
    }
    lat_info = None
    if lat is not None:
        totals.update(latency_ms=lat[1], layer_latency_ms=sum(lat[0].values()),
                      latency_before_ms=None if base_lat is None else base_lat[1])
        lat_info = {"runtime": "eager", "batch_size": batch_size, "repeats": repeats, "warmup": warmup,
                    "threads": used_threads, "device": next(model.parameters()).device.type}
    info = {}
    cfg = getattr(model, "prunekit_config", None)
    if cfg:
        info["architecture"] = cfg.get("name")
    return Inspection(rows, shape, totals, source, lat_info, info)


def _checkpoint_input_shape(model: nn.Module, input_shape: Any, dataset: str | None) -> tuple[int, ...]:
    if input_shape:
        return tuple(int(s) for s in input_shape)
    meta = getattr(model, "prunekit_meta", {}) or {}
    name = dataset or meta.get("dataset")
    if name:
        from prunekit.data.datasets import dataset_info

        info = dataset_info(name)
        return (info.in_channels, info.image_size, info.image_size)
    from prunekit.surgery.graph import default_input_shape

    return default_input_shape(model)


def inspect_checkpoint(path: str | Path, base: str | Path | None = None, input_shape: Any = None,
                       dataset: str | None = None, **kwargs: Any) -> Inspection:
    """:func:`inspect_model` of a saved checkpoint (loaded with ``weights_only=True``); ``base``: the unpruned
    checkpoint. The input shape is ``input_shape``, else that of the dataset the checkpoint records, else its
    zoo model's. ``kwargs`` go to :func:`inspect_model`."""
    from prunekit.io import load

    model = load(path).eval()
    base_model = load(base).eval() if base is not None else None
    meta = getattr(model, "prunekit_meta", {}) or {}
    if base_model is not None:
        a = (getattr(model, "prunekit_config", {}) or {}).get("name")
        b = (getattr(base_model, "prunekit_config", {}) or {}).get("name")
        if a and b and a != b:
            raise PrunekitError(f"--base {base} holds a {b!r} model, but {path} a {a!r} one")
    recorded = meta.get("layers") or (meta.get("report") or {}).get("layers")
    shape = _checkpoint_input_shape(model, input_shape, dataset)
    result = inspect_model(model, shape, base=base_model, original_widths=recorded if base is None else None,
                           **kwargs)
    if base is not None:
        result.widths_source = f"--base {base}"
    report = meta.get("report") or {}
    result.info.update({"checkpoint": str(path), "dataset": meta.get("dataset"), "method": report.get("method"),
                        "target": report.get("target"), "mode": report.get("mode"),
                        "base_checkpoint": str(base) if base is not None else meta.get("base_checkpoint")})
    return result


# --------------------------------------------------------------------------------------------- chart
def plot_layers(insp: Inspection, path: str | Path, title: str | None = None) -> Path:
    """A PNG bar chart of the layers: output width (rank for low-rank chains) before and after pruning,
    multiply-adds before and after, and the measured latency when there is one. Needs matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    rows = insp.layers
    names = [r.name for r in rows]
    x = list(range(len(rows)))
    panels = [("output width (rank for low-rank)", "width"), ("multiply-adds per example", "macs")]
    if insp.latency is not None:
        panels.append((f"latency, ms (eager, batch {insp.latency['batch_size']})", "ms"))
    fig = Figure(figsize=(min(28.0, max(6.0, 0.38 * len(rows) + 2.0)), 2.6 * len(panels) + 1.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)
    bw = 0.4
    for ax, (label, key) in zip(axes[:, 0], panels):
        if key == "width":
            before = [r.out_before for r in rows]
            after = [(min(r.rank.values()) if r.rank else r.out_after) for r in rows]
        elif key == "macs":
            before = [r.flops_before for r in rows]
            after = [r.effective_flops for r in rows]
        else:
            before = [r.latency_before_ms for r in rows]
            after = [r.latency_ms or 0.0 for r in rows]
        if any(v is not None for v in before):
            ax.bar([i - bw / 2 for i in x], [v or 0 for v in before], bw, color="#b8c4d6", label="before")
            ax.bar([i + bw / 2 for i in x], after, bw, color="#2b5d9b", label="after")
        else:
            ax.bar(x, after, 0.6, color="#2b5d9b", label="after")
        if key == "width":
            for i, r in enumerate(rows):
                if r.rank:
                    ax.annotate("r", (i + bw / 2, after[i]), ha="center", va="bottom", fontsize=7)
        ax.set_ylabel(label, fontsize=8)
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False)
    axes[-1, 0].set_xticks(x)
    axes[-1, 0].set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    t = insp.totals
    head = title or " ".join(str(v) for v in (insp.info.get("architecture"), insp.info.get("method"),
                                              insp.info.get("target")) if v)
    sub = f"MACs {_si(t['effective_flops'])}"
    if t.get("flops_before"):
        sub += f" of {_si(t['flops_before'])} ({t['flops_before'] / max(1, t['effective_flops']):.2f}x fewer)"
    sub += f", non-zero params {_si(t['nonzero_params'])}"
    if t.get("params_before"):
        sub += f" of {_si(t['params_before'])}"
    fig.suptitle(f"{head}\n{sub}" if head else sub, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
