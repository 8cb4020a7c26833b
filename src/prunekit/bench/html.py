"""``report.html``: the benchmark in one self-contained page (plots inline, tables sortable).

Readable with dozens of methods: one panel per granularity (weight / channel / low rank), in each the
few best methods in colour and labelled at their points, every other method a thin grey line, the
Pareto front shaded; top-1 against the FLOPs speedup (or compression for weight methods) and against
the *measured* deployed latency speedup, and agreement with the base model. Below, per granularity, a
sortable table of every method x target, and per-layer width charts (before / after) of the best
method of each channel / low-rank panel at its largest target.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunekit.bench.report import aggregate, pareto_front, target_sort_key

BEST = 5  # methods labelled per panel
GRANULARITIES = (("channel", "Channel pruning"), ("lowrank", "Low-rank compression"),
                 ("weight", "Unstructured (weight) pruning"))
COLUMNS = (("label", "method", ""), ("target", "target", ""), ("top1_pruned", "top-1 pruned %", "pct"),
           ("top1_final", "top-1 final %", "pct"), ("agreement_final", "agreement %", "pct"),
           ("flops_speedup", "FLOPs ×", "x"), ("latency_speedup", "deployed ×", "x"),
           ("ort_latency_speedup_b64", "ORT × b64", "x"), ("compression", "compression ×", "x"),
           ("prune_seconds", "prune s", "s"))

_CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}
.panels{display:flex;flex-wrap:wrap;gap:12px}.panels img{width:640px;border:1px solid #eee}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{padding:3px 8px;border-bottom:1px solid #eee;
text-align:right}th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}td:first-child,th:first-child{text-align:left}
.best{font-weight:bold}.note{color:#555;font-size:13px}"""

_JS = """document.querySelectorAll('table.sortable').forEach(t=>{t.querySelectorAll('th').forEach((th,i)=>{
th.addEventListener('click',()=>{const rows=[...t.tBodies[0].rows];const asc=th.dataset.asc!=='1';
rows.sort((a,b)=>{const x=a.cells[i].dataset.v,y=b.cells[i].dataset.v;const nx=parseFloat(x),ny=parseFloat(y);
const c=(isNaN(nx)||isNaN(ny))?String(x).localeCompare(String(y)):nx-ny;return asc?c:-c});
rows.forEach(r=>t.tBodies[0].appendChild(r));th.dataset.asc=asc?'1':'0';})})});"""


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _best_labels(aggs: Sequence[dict[str, Any]], k: int = BEST) -> list[str]:
    """The ``k`` labels with the highest mean final top-1 over their targets."""
    by: dict[str, list[float]] = {}
    for a in aggs:
        if a.get("top1_final") is not None:
            by.setdefault(a["label"], []).append(a["top1_final"])
    return sorted(by, key=lambda lb: -sum(by[lb]) / len(by[lb]))[:k]


def _panel(aggs: list[dict[str, Any]], x: str, y: str, xlabel: str, ylabel: str, base: float | None,
           title: str) -> str | None:
    from matplotlib.figure import Figure

    pts = [a for a in aggs if a.get(x) is not None and a.get(y) is not None]
    if not pts:
        return None
    best = _best_labels(pts)
    fig = Figure(figsize=(7.2, 4.6))
    ax = fig.subplots()
    colors = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
    ends: list[tuple[float, float, str, str]] = []
    for label in sorted({a["label"] for a in pts}, key=lambda lb: lb in best):
        line = sorted((a for a in pts if a["label"] == label), key=lambda a: target_sort_key(a["target"]))
        xs, ys = [a[x] for a in line], [a[y] for a in line]
        if label in best:
            c = colors[best.index(label) % len(colors)]
            ax.plot(xs, ys, "-o", color=c, linewidth=2, markersize=5, zorder=3)
            ends.append((xs[-1], ys[-1], label, c))
        else:
            ax.plot(xs, ys, "-", color="#bbbbbb", linewidth=0.8, zorder=1)
    # the axis follows the best methods (the grey lines of collapsed methods may leave it at the bottom)
    ys_best = [a[y] for a in pts if a["label"] in best] + ([base] if base is not None and y.startswith("top1") else [])
    lo, hi = min(ys_best), max(ys_best)
    pad = max(0.01, 0.15 * (hi - lo))
    ax.set_ylim(lo - 2 * pad, hi + pad)
    xs_all = [a[x] for a in pts]
    x0, x1 = min(xs_all), max(xs_all)
    ax.set_xlim(x0 - 0.03 * (x1 - x0 or 1), x1 + 0.45 * (x1 - x0 or 1))
    gap = 0.075 * (hi + pad - (lo - 2 * pad))  # labels stacked on the right, one line apart, joined to their end
    order = sorted(ends, key=lambda e: -e[1])
    placed: list[float] = []
    for _, ey, _, _ in order:
        placed.append(min(ey, placed[-1] - gap) if placed else ey)
    bottom = lo - 2 * pad + gap / 2
    if placed and placed[-1] < bottom:  # keep the stack inside the axes
        placed = [t + bottom - placed[-1] for t in placed]
    for (ex, ey, label, c), ty in zip(order, placed):
        ax.annotate(label, (ex, ey), xytext=(x1 + 0.08 * (x1 - x0 or 1), ty), fontsize=10, color=c,
                    fontweight="bold", va="center", zorder=4,
                    arrowprops={"arrowstyle": "-", "color": c, "linewidth": 0.8})
    front = pareto_front(pts, x, y)
    if len(front) > 1:
        ax.plot([p[x] for p in front], [p[y] for p in front], color="black", linewidth=6, alpha=0.12, zorder=0)
    if base is not None and y.startswith("top1"):
        ax.axhline(base, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _fmt(v: Any, kind: str) -> tuple[str, str]:
    if v is None:
        return "–", ""
    if kind == "pct":
        return f"{100 * v:.1f}", f"{v:.6f}"
    if kind == "x":
        return f"{v:.2f}", f"{v:.6f}"
    if kind == "s":
        return f"{v:.1f}", f"{v:.6f}"
    return html.escape(str(v)), html.escape(str(v))


def _table(aggs: list[dict[str, Any]]) -> str:
    best = {k: max((a[k] for a in aggs if a.get(k) is not None), default=None) for k, _, f in COLUMNS if f in
            ("pct", "x")}
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t, _ in COLUMNS)
    body = []
    for a in aggs:
        cells = []
        for k, _, kind in COLUMNS:
            shown, value = _fmt(a.get(k), kind)
            cls = ' class="best"' if best.get(k) is not None and a.get(k) == best[k] else ""
            cells.append(f'<td data-v="{value}"{cls}>{shown}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _width_chart(row: dict[str, Any]) -> str | None:
    from matplotlib.figure import Figure

    layers = row.get("layers") or {}
    names = [p for p, v in layers.items() if v.get("before") and v.get("after")]
    if not names:
        return None
    fig = Figure(figsize=(max(6.0, 0.32 * len(names) + 2), 3.6))
    ax = fig.subplots()
    idx = range(len(names))
    ax.bar([i - 0.2 for i in idx], [layers[p]["before"][0] for p in names], width=0.4, color="#cccccc",
           label="before")
    ax.bar([i + 0.2 for i in idx], [layers[p]["after"][0] for p in names], width=0.4, color="#1f77b4",
           label="after")
    ax.set_xticks(list(idx))
    ax.set_xticklabels(names, rotation=70, fontsize=7, ha="right")
    ax.set_ylabel("output channels")
    ax.set_title(f"{row.get('label') or row['method']} at {row['target']}: width per layer", fontsize=11)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def render_html(rows: Sequence[dict[str, Any]]) -> str:
    aggs = aggregate(rows)
    ref = next(iter(rows), {})
    base = next((r.get("top1_base") for r in rows if r.get("top1_base") is not None), None)
    ok = [r for r in rows if r.get("status") == "ok"]
    title = f"prunekit benchmark: {ref.get('experiment', '')} — {ref.get('model', '')} / {ref.get('dataset', '')}"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="note">{len(ok)} of {len(rows)} cells ok; base top-1 '
             f'{"–" if base is None else f"{100 * base:.2f} %"}; fine-tune budget identical for every method '
             f'({html.escape(str(ref.get("finetune_epochs", "?")))} epoch(s)). Coloured: the {BEST} methods with '
             "the best mean final top-1 in the panel (labelled); grey: every other method; shaded: the Pareto "
             "front; dashed: the base model. Click a column title to sort.</p>"]
    for gran, name in GRANULARITIES:
        ga = [a for a in aggs if a.get("granularity") == gran]
        if not ga:
            continue
        xk, xl = ("compression", "compression (× fewer non-zero parameters)") if gran == "weight" else \
            ("flops_speedup", "FLOPs speedup (×)")
        panels = [_panel(ga, xk, "top1_final", xl, "top-1 (final)", base, f"{name}: top-1 vs {xl.split(' (')[0]}"),
                  _panel(ga, "latency_speedup", "top1_final", "measured deployed latency speedup (×, batch 64)",
                         "top-1 (final)", base, f"{name}: top-1 vs measured speedup"),
                  _panel(ga, xk, "agreement_final", xl, "agreement with the base model", None,
                         f"{name}: agreement")]
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append('<div class="panels">' + "".join(f'<img alt="{html.escape(name)} plot" src="{p}">'
                                                      for p in panels if p) + "</div>")
        parts.append(_table(sorted(ga, key=lambda a: (target_sort_key(a["target"]), -(a.get("top1_final") or 0)))))
        if gran != "weight":
            best = _best_labels(ga, 1)
            cand = [r for r in ok if (r.get("label") or r["method"]) in best and r.get("layers")]
            if cand:
                chart = _width_chart(max(cand, key=lambda r: target_sort_key(r["target"])))
                if chart:
                    parts.append(f'<div class="panels"><img alt="widths" style="width:auto;max-width:100%" '
                                 f'src="{chart}"></div>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}<script>{_JS}</script></body></html>")


def write_html(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    """Write ``out/report.html`` (self-contained) and return its path."""
    from prunekit.io import atomic_write_text

    path = Path(out) / "report.html"
    atomic_write_text(path, render_html(rows))
    return path


__all__ = ["render_html", "write_html"]
