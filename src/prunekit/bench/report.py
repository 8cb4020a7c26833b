"""``report.md``: one table per target (methods x metrics, mean ± std over seeds), the Pareto front."""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunekit.bench.results import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED

#: (row key, column title, higher is better, format)
TABLE_COLUMNS: tuple[tuple[str, str, bool, str], ...] = (
    ("top1_pruned", "top-1 pruned %", True, "pct"),
    ("top1_finetuned", "top-1 fine-tuned %", True, "pct"),
    ("agreement_final", "agreement %", True, "pct"),
    ("flops_speedup", "FLOPs ×", True, "x"),
    ("latency_speedup_b1", "latency × b1", True, "x"),
    ("latency_speedup_b64", "latency × b64", True, "x"),
    ("ort_latency_speedup_b64", "ORT × b64", True, "x"),
    ("latency_speedup", "deployed ×", True, "x"),
    ("compression", "compression ×", True, "x"),
    ("prune_seconds", "prune s", False, "s"),
)
AGG_KEYS = tuple(k for k, *_ in TABLE_COLUMNS) + ("top1_final", "dense_flops_speedup", "params_nonzero",
                                                  "flops_effective", "agreement_pruned", "agreement_finetuned")


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def target_sort_key(target: str) -> tuple[str, float]:
    kind, _, value = target.partition("=")
    try:
        return kind, float(value)
    except ValueError:
        return kind, math.inf


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every metric, per (method label, target), for successful cells.

    Only rows that differ in their seed alone are averaged (same ``seed_group``: base model and resolved
    configuration); rows of one label and target under other settings (another fine-tuning budget, say)
    get a line of their own, labelled with their group."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == STATUS_OK:
            groups.setdefault((r.get("label") or r["method"], r["target"], str(r.get("seed_group") or "")),
                              []).append(r)
    shared = {(lb, t) for lb, t, _ in groups if sum(1 for g in groups if g[:2] == (lb, t)) > 1}
    out = []
    for (label, target, group), rs in groups.items():
        if (label, target) in shared:  # several configurations under one label: keep them apart
            label = f"{label} [{group[:6] or 'unbound'}]"
        agg: dict[str, Any] = {"label": label, "target": target, "method": rs[0]["method"],
                               "granularity": rs[0].get("granularity"), "n": len(rs),
                               "target_kind": rs[0].get("target_kind"), "target_value": rs[0].get("target_value")}
        for k in AGG_KEYS:
            vals = [x for x in (_num(r.get(k)) for r in rs) if x is not None]
            agg[k] = statistics.fmean(vals) if vals else None
            agg[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None)
        out.append(agg)
    out.sort(key=lambda a: (target_sort_key(a["target"]), a["label"]))
    return out


def pareto_front(points: Sequence[dict[str, Any]], x: str = "flops_speedup", y: str = "top1_final"
                 ) -> list[dict[str, Any]]:
    """The points no other point beats in both ``x`` and ``y`` (higher is better), sorted by ``x``."""
    pts = [p for p in points if _num(p.get(x)) is not None and _num(p.get(y)) is not None]
    front = []
    for p in pts:
        dominated = any(q is not p and q[x] >= p[x] and q[y] >= p[y] and (q[x] > p[x] or q[y] > p[y]) for q in pts)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (p[x], -p[y]))


def _fmt(v: float | None, std: float | None, kind: str, with_std: bool) -> str:
    if v is None:
        return "–"
    if kind == "pct":
        s = f"{100 * v:.2f}"
        sd = f"{100 * std:.2f}" if std is not None else None
    elif kind == "x":
        s = f"{v:.2f}"
        sd = f"{std:.2f}" if std is not None else None
    else:
        s = f"{v:.2f}" if v < 100 else f"{v:.0f}"
        sd = (f"{std:.2f}" if v < 100 else f"{std:.0f}") if std is not None else None
    return f"{s} ± {sd}" if with_std and sd is not None else s


def _table(aggs: list[dict[str, Any]]) -> list[str]:
    cols = [c for c in TABLE_COLUMNS if any(a.get(c[0]) is not None for a in aggs)]
    multi_seed = any(a["n"] > 1 for a in aggs)
    best: dict[str, float] = {}
    for key, _, higher, _ in cols:
        vals = [a[key] for a in aggs if a.get(key) is not None]
        if vals:
            best[key] = max(vals) if higher else min(vals)
    header = "| method | seeds | " + " | ".join(c[1] for c in cols) + " |"
    lines = [header, "|" + "---|" * (len(cols) + 2)]
    for a in sorted(aggs, key=lambda a: -(a.get("top1_final") or -1)):
        cells = []
        for key, _, _, kind in cols:
            text = _fmt(a.get(key), a.get(key + "_std"), kind, multi_seed)
            v = a.get(key)
            if len(aggs) > 1 and v is not None and key in best and math.isclose(v, best[key], rel_tol=1e-9,
                                                                                abs_tol=1e-12):
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {a['label']} | {a['n']} | " + " | ".join(cells) + " |")
    return lines


def _rank(label: str, cell: dict[tuple[str, str], dict[str, Any]], targets: Sequence[str]) -> tuple[int, float]:
    """Sort key of the summary: methods with every target first, then by mean final top-1."""
    vals = [cell[label, t].get("top1_final") or 0.0 for t in targets if (label, t) in cell]
    return -len(vals), -(statistics.fmean(vals) if vals else 0.0)


def summary_table(aggs: Sequence[dict[str, Any]]) -> list[str]:
    """One line per method, one column per target: final top-1 % (and the FLOPs / compression reached).

    Methods are grouped by granularity (their targets differ); the best top-1 of a column is in bold.
    """
    if not aggs:
        return []
    lines = ["## Summary", "", "Final top-1 % per method and target (after the shared fine-tune when there is one); "
             "in brackets the FLOPs speedup (channel / low-rank methods) or compression (weight methods) reached.",
             ""]
    by_gran: dict[str, list[dict[str, Any]]] = {}
    for a in aggs:
        by_gran.setdefault(str(a.get("granularity") or "?"), []).append(a)
    for gran in sorted(by_gran):
        group = by_gran[gran]
        targets = sorted({a["target"] for a in group}, key=target_sort_key)
        cell = {(a["label"], a["target"]): a for a in group}
        best = {t: max((a["top1_final"] for a in group if a["target"] == t and a.get("top1_final") is not None),
                       default=None) for t in targets}
        labels = sorted({a["label"] for a in group}, key=lambda m, c=cell, ts=targets: _rank(m, c, ts))
        lines += [f"| {gran} method | " + " | ".join(f"`{t}`" for t in targets) + " |",
                  "|---|" + "---|" * len(targets)]
        for m in labels:
            cells = []
            for t in targets:
                a = cell.get((m, t))
                if a is None or a.get("top1_final") is None:
                    cells.append("–")
                    continue
                reach = a.get("compression") if gran == "weight" else a.get("flops_speedup")
                text = f"{100 * a['top1_final']:.1f}" + (f" ({reach:.2f}x)" if reach is not None else "")
                if best[t] is not None and math.isclose(a["top1_final"], best[t], abs_tol=1e-12):
                    text = f"**{text}**"
                cells.append(text)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def render_report(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown report of a set of result rows."""
    ok = [r for r in rows if r.get("status") == STATUS_OK]
    failed = [r for r in rows if r.get("status") == STATUS_FAILED]
    skipped = [r for r in rows if r.get("status") == STATUS_SKIPPED]
    ref = ok[0] if ok else (rows[0] if rows else {})
    lines = [f"# Benchmark: {ref.get('experiment', '')}", ""]
    if ref:
        lines += [
            f"- model **{ref.get('model')}** on **{ref.get('dataset')}**; "
            f"cells: {len(ok)} ok, {len(failed)} failed, {len(skipped)} skipped",
            f"- fine-tuning budget (identical for every method): {ref.get('finetune_epochs')} epoch(s) at "
            f"lr {ref.get('finetune_lr')}",
            f"- machine: {ref.get('machine', ref.get('cpu', '?'))}; torch threads {ref.get('threads', '?')}; "
            f"device {ref.get('device', '?')}; prunekit {ref.get('prunekit_version', '?')}, "
            f"torch {ref.get('torch_version', '?')}",
        ]
    hashes = {r.get("config_hash") for r in rows if r.get("config_hash")}
    if len(hashes) > 1:
        lines.append(f"- **note**: these results come from {len(hashes)} different experiment configurations "
                     f"(config hashes {', '.join(sorted(hashes))}); compare rows with care")
    if ok:
        b = ok[0]
        lat = ", ".join(f"b{k[len('latency_b'):-len('_base_ms')]} {b[k]:.3f} ms" for k in sorted(b)
                        if k.startswith("latency_b") and k.endswith("_base_ms") and _num(b[k]) is not None)
        ort = ", ".join(f"b{k[len('ort_latency_b'):-len('_base_ms')]} {b[k]:.3f} ms" for k in sorted(b)
                        if k.startswith("ort_latency_b") and k.endswith("_base_ms") and _num(b[k]) is not None)
        lat = lat + (f"; ONNX Runtime {ort}" if ort else "")
        lines.append(f"- base model: top-1 {100 * b['top1_base']:.2f} %, "
                     f"top-5 {100 * (b.get('top5_base') or 0):.2f} %, "
                     f"{b.get('params_base', 0):,} parameters, {b.get('flops_base', 0):,} MACs"
                     + (f", CPU latency {lat}" if lat else ""))
    lines += [
        "",
        "FLOPs are multiply-adds (MACs) for one example; `FLOPs ×` = base / pruned with zero weights skipped "
        "(theoretical for unstructured methods); latency × = measured median CPU latency in eager PyTorch, "
        "base / pruned; ORT × = the same in ONNX Runtime; deployed × = the pruned model in its fastest runtime "
        "against the base model in its fastest (batch 64); "
        "compression = base parameters / non-zero parameters; agreement = share of test examples whose top-1 "
        "prediction equals the base model's (after fine-tuning when there is one). "
        "Mean ± std over seeds; best per column in bold.",
        "",
    ]
    aggs = aggregate(rows)
    lines += summary_table(aggs)
    for target in sorted({a["target"] for a in aggs}, key=target_sort_key):
        lines += [f"## Target `{target}`", ""]
        lines += _table([a for a in aggs if a["target"] == target])
        lines.append("")
    front = pareto_front(aggs)
    if front:
        lines += ["## Pareto front (top-1 vs FLOPs speedup)", "",
                  "Method/target pairs no other pair beats in both final top-1 and FLOPs speedup.", "",
                  "| FLOPs × | top-1 % | method | target |", "|---|---|---|---|"]
        lines += [f"| {p['flops_speedup']:.2f} | {100 * p['top1_final']:.2f} | {p['label']} | `{p['target']}` |"
                  for p in front]
        lines.append("")
    lines += prune_potential_section(ok)
    lines += _scoring_section(ok)
    timed: dict[str, list[dict[str, Any]]] = {}
    for r in ok + failed:
        timed.setdefault(r.get("label") or r["method"], []).append(r)
    if timed:
        lines += ["## Time per method", "", "Wall time of the cells (pruning, evaluation, fine-tuning, measurement).",
                  "", "| method | cells | total s | mean prune s | mean fine-tune s |", "|---|---|---|---|---|"]
        for m, rs in sorted(timed.items(), key=lambda kv: -sum(_num(r.get("duration_s")) or 0 for r in kv[1])):
            total = sum(_num(r.get("duration_s")) or 0 for r in rs)
            pr = [x for x in (_num(r.get("prune_seconds")) for r in rs) if x is not None]
            ft = [x for x in (_num(r.get("finetune_seconds")) for r in rs) if x is not None]
            lines.append(f"| {m} | {len(rs)} | {total:.1f} | {statistics.fmean(pr) if pr else 0:.2f} | "
                         f"{statistics.fmean(ft) if ft else 0:.2f} |")
        lines.append("")
    if failed:
        lines += ["## Failed cells", "", "| method | target | seed | error |", "|---|---|---|---|"]
        for r in sorted(failed, key=lambda r: (r.get("label") or r["method"], target_sort_key(r["target"]))):
            err = str(r.get("error") or "").replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {r.get('label') or r['method']} | `{r['target']}` | {r.get('seed')} | {err} |")
        lines.append("")
    if skipped:
        reasons: dict[str, str] = {}
        for r in skipped:
            reasons.setdefault(r.get("label") or r["method"], str(r.get("error") or ""))
        lines += ["## Skipped methods", ""]
        lines += [f"- **{m}**: {why}" for m, why in sorted(reasons.items())]
        lines.append("")
    return "\n".join(lines)


def _scoring_section(ok: Sequence[dict[str, Any]]) -> list[str]:
    """Prune-and-train cells and the scoring passes' peak memory (gradient-flow measures), when present."""
    rows = [r for r in ok if r.get("pt_from") is not None or _num(r.get("score_mem_mb")) is not None]
    if not rows:
        return []
    pt = rows[0].get("pt_from")
    lines = ["## Scoring memory" + (" and prune-and-train" if pt else ""), ""]
    if pt:
        ep = _num(rows[0].get("pt_epochs_per_round")) or 0.0
        how = (f"from **{pt}**, {rows[0].get('pt_rounds')} round(s) of {ep:g} epoch(s) each" if ep > 0 else
               f"from **{pt}**, {rows[0].get('pt_rounds')} round(s) without training before them: one-shot when 1")
        lines += [f"Prune-and-train cells ({how}; then the fine-tuning budget as the final "
                  "training): `top-1 pruned` is right after the last round, `top-1 fine-tuned` after the final "
                  "training, `prune s` includes the rounds' training"
                  + (" (agreement is with the base model, a different network when starting from init)"
                     if pt == "init" else "") + ".", ""]
    lines += ["Peak memory of the scoring passes (max over rounds): torch's own CPU allocations from "
              "`torch.profiler` (CUDA peak allocation on a GPU) and the increase of the process's sampled RSS "
              "(under-reports memory the allocator reuses); `-` = data-free or scores from the training steps.", "",
              "| method | target | filters kept | scoring s | score mem MiB | RSS increase MiB |",
              "|---|---|---|---|---|---|"]

    def f(v: Any, p: int = 1) -> str:
        x = _num(v)
        return "-" if x is None else f"{x:.{p}f}"

    for r in sorted(rows, key=lambda r: (target_sort_key(r["target"]), r.get("label") or r["method"])):
        kept = (f"{r['filters_kept']}/{r['filters_original']}" if r.get("filters_original") is not None else "-")
        lines.append(f"| {r.get('label') or r['method']} | `{r['target']}` | {kept} | {f(r.get('pt_score_seconds'))} | "
                     f"{f(r.get('score_mem_mb'))} | {f(r.get('score_rss_mem_mb'))} |")
    lines.append("")
    return lines


# --------------------------------------------------------------------------------------------- prune potential
#: torchprune's tolerance: a pruned network "keeps" the base accuracy when its top-1 is within this many
#: (fractional) points of the base model's, 0.005 = 0.5 percentage points
PRUNE_POTENTIAL_DELTA = 0.005


def prune_potential(rows: Sequence[dict[str, Any]], delta: float = PRUNE_POTENTIAL_DELTA,
                    key: str = "top1_final") -> list[dict[str, Any]]:
    """Prune potential per method: the largest fraction of the parameters removed, over the method's targets,
    whose top-1 (``key``) stays within ``delta`` of the base model's (torchprune's definition, with the
    targets of the sweep as the grid of prune ratios).

    The fraction removed is ``1 - params_nonzero / params_base`` (what is left counted as non-zero weights, so
    masked and physically removed models compare alike). Rows are successful cells; several seeds of one
    (method label, target) are averaged first (top-1, base top-1 and parameters). One entry per label, in the
    order of first appearance: ``potential`` (0.0 when no target qualifies), the ``target`` reaching it, its
    ``top1`` and ``top1_base``, ``ratios`` (every target's fraction removed and whether it qualified),
    ``at_grid_edge`` (the largest tested fraction qualified: the potential is only a lower bound) and
    ``none_within`` (no tested target qualified: the potential is below the smallest tested fraction).
    """
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        if r.get("status") != STATUS_OK:
            continue
        groups.setdefault(r.get("label") or r["method"], {}).setdefault(r["target"], []).append(r)
    out = []
    for label, by_target in groups.items():
        points = []
        for target, rs in by_target.items():
            def mean(k: str, rs: list[dict[str, Any]] = rs) -> float | None:
                vals = [x for x in (_num(r.get(k)) for r in rs) if x is not None]
                return statistics.fmean(vals) if vals else None

            top1, base, kept, total = mean(key), mean("top1_base"), mean("params_nonzero"), mean("params_base")
            if top1 is None or base is None or kept is None or not total:
                continue
            frac = 1.0 - kept / total
            points.append({"target": target, "fraction": frac, "top1": top1, "top1_base": base,
                           "within": top1 >= base - delta - 1e-12})
        if not points:
            continue
        points.sort(key=lambda q: q["fraction"])
        good = [q for q in points if q["within"]]
        best = max(good, key=lambda q: q["fraction"]) if good else None
        first = next(iter(by_target.values()))[0]
        out.append({
            "label": label, "method": first["method"], "granularity": first.get("granularity"), "delta": delta,
            "key": key, "potential": best["fraction"] if best else 0.0,
            "target": best["target"] if best else None, "top1": best["top1"] if best else None,
            "top1_base": (best or points[0])["top1_base"],
            "ratios": [(q["target"], q["fraction"], q["within"]) for q in points],
            "at_grid_edge": bool(best is not None and best is points[-1]), "none_within": best is None,
        })
    return out


def format_potential(p: dict[str, Any]) -> str:
    if p["none_within"]:
        return f"< {100 * p['ratios'][0][1]:.1f} % (none within)"
    return ("≥ " if p["at_grid_edge"] else "") + f"{100 * p['potential']:.1f} %"


def prune_potential_section(rows: Sequence[dict[str, Any]], delta: float = PRUNE_POTENTIAL_DELTA) -> list[str]:
    """The report's "Prune potential" table: per method, after fine-tuning and right after pruning."""
    final = prune_potential(rows, delta, "top1_final")
    if not final:
        return []
    pruned = {p["label"]: p for p in prune_potential(rows, delta, "top1_pruned")}
    lines = ["## Prune potential", "",
             f"Largest share of the parameters removed (over the targets of this sweep) whose top-1 stays within "
             f"{100 * delta:.1f} points of the base model's (torchprune's prune potential); `≥` = the largest "
             "target tested still qualifies, `<` = none does.", "",
             "| method | granularity | potential (fine-tuned) | at target | top-1 % | potential (pruned, no FT) |",
             "|---|---|---|---|---|---|"]
    for p in sorted(final, key=lambda p: (str(p.get("granularity")), -p["potential"], p["label"])):
        q = pruned.get(p["label"])
        top1 = f"{100 * p['top1']:.2f}" if p["top1"] is not None else "–"
        lines.append(f"| {p['label']} | {p.get('granularity') or '?'} | {format_potential(p)} | "
                     f"{'`' + p['target'] + '`' if p['target'] else '–'} | {top1} | "
                     f"{format_potential(q) if q else '–'} |")
    lines.append("")
    return lines


def write_report(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    """Write ``out/report.md`` atomically; returns its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    fd, tmp = tempfile.mkstemp(dir=out, prefix="report.md", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(render_report(rows) + "\n")
    os.replace(tmp, path)
    return path


__all__ = ["PRUNE_POTENTIAL_DELTA", "TABLE_COLUMNS", "aggregate", "format_potential", "pareto_front", "prune_potential",
           "prune_potential_section", "render_report", "target_sort_key", "write_report"]
