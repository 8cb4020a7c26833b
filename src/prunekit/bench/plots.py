"""Plots (matplotlib, Agg backend) and TensorBoard scalars of benchmark results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunekit.bench.report import aggregate, pareto_front, target_sort_key

#: file name, x key, y key, x label, y label, log-scale x
PLOTS: tuple[tuple[str, str, str, str, str, bool], ...] = (
    ("accuracy_vs_flops.png", "flops_speedup", "top1_final", "FLOPs speedup (×, zeros skipped)", "top-1 accuracy",
     False),
    ("accuracy_vs_compression.png", "compression", "top1_final", "compression (× fewer non-zero parameters)",
     "top-1 accuracy", True),
    ("accuracy_vs_latency.png", "latency_speedup_b64", "top1_final", "measured CPU latency speedup (×, batch 64)",
     "top-1 accuracy", False),
    ("agreement_vs_compression.png", "compression", "agreement_final", "compression (× fewer non-zero parameters)",
     "agreement with the base model", True),
    ("accuracy_pruned_vs_flops.png", "flops_speedup", "top1_pruned", "FLOPs speedup (×, zeros skipped)",
     "top-1 accuracy right after pruning (no fine-tuning)", False),
)


def _style(i: int) -> dict[str, Any]:
    import matplotlib

    colors = matplotlib.colormaps["tab20"].colors + matplotlib.colormaps["tab20b"].colors
    markers = "osD^v<>pP*hX"
    return {"color": colors[i % len(colors)], "marker": markers[i % len(markers)]}


def write_plots(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Write the PNG plots of :data:`PLOTS` to ``out/plots/``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    aggs = aggregate(rows)
    base = next((r.get("top1_base") for r in rows if r.get("top1_base") is not None), None)
    labels = sorted({a["label"] for a in aggs})
    plot_dir = Path(out) / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, xk, yk, xlabel, ylabel, logx in PLOTS:
        fig, ax = plt.subplots(figsize=(11 if len(labels) > 8 else 8.5, 5.5), dpi=110)
        any_points = False
        for i, label in enumerate(labels):
            # in target order: each line follows one method as its target grows
            pts = sorted((a for a in aggs if a["label"] == label and a.get(xk) is not None and a.get(yk) is not None),
                         key=lambda a: (target_sort_key(a["target"]), a[xk]))
            if not pts:
                continue
            any_points = True
            ax.errorbar([p[xk] for p in pts], [p[yk] for p in pts], yerr=[p.get(yk + "_std") or 0.0 for p in pts],
                        label=label, linewidth=1.2, markersize=5, capsize=2, **_style(i))
        if yk.startswith("top1") and base is not None:
            ax.axhline(base, color="black", linestyle="--", linewidth=0.8, label="base model")
        if xk == "flops_speedup" and yk == "top1_final":
            front = pareto_front(aggs, xk, yk)
            if len(front) > 1:
                ax.plot([p[xk] for p in front], [p[yk] for p in front], color="grey", linewidth=3, alpha=0.3,
                        zorder=0, label="Pareto front")
        if not any_points:
            ax.text(0.5, 0.5, "no successful cells with this metric", ha="center", va="center",
                    transform=ax.transAxes)
        if logx and any_points:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ref = next(iter(rows), {})
        ax.set_title(f"{ref.get('model', '')} / {ref.get('dataset', '')}: {ylabel} vs {xlabel.split(' (')[0]}",
                     fontsize=10)
        ax.grid(True, alpha=0.3)
        if any_points:  # outside the axes: with dozens of methods a legend inside hides the data
            ax.legend(fontsize=7, ncol=2 if len(labels) > 20 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      borderaxespad=0.0)
        fig.tight_layout()
        path = plot_dir / fname
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def write_tensorboard(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """TensorBoard scalars (``out/tb``), one series per method and metric, step = target x 100.

    Silently does nothing when tensorboard is not installed.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        return []
    aggs = aggregate(rows)
    if not aggs:
        return []
    tb_dir = Path(out) / "tb"
    writer = SummaryWriter(str(tb_dir))
    try:
        for a in sorted(aggs, key=lambda a: target_sort_key(a["target"])):
            step = int(round(100 * float(a.get("target_value") or 0)))
            for key in ("top1_pruned", "top1_finetuned", "agreement_final", "flops_speedup", "compression",
                        "latency_speedup_b1", "latency_speedup_b64", "prune_seconds"):
                if a.get(key) is not None:
                    writer.add_scalar(f"{a['target_kind']}/{key}/{a['label']}", a[key], step)
    finally:
        writer.close()
    return [tb_dir]


__all__ = ["PLOTS", "write_plots", "write_tensorboard"]
