"""The SiPP / PFP tables of BENCHMARKS.md from a `prunekit bench cifar10-resnet20-provable` run.

    python benchmarks/provable_table.py runs/provable

Prints (markdown): one row per cell (top-1 before / after the shared fine-tune, non-zero parameters,
effective FLOPs, the achieved compression or FLOPs speedup against the target, measured CPU latency
speedups), whether every budget is met within 5 %, and the prune potential per method (the report's
:func:`prunekit.bench.report.prune_potential`, 0.5 points) beside torchprune's published figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.bench.report import format_potential, prune_potential, target_sort_key
from prunekit.bench.results import load_rows

ORDER = ["sipp", "sipp_rand", "magnitude", "torch_prune_l1", "pfp", "pfp_rand", "pfp_top", "l1", "tp_l1"]
# torchprune's published prune potential on ResNet-20 / CIFAR-10 (share of parameters prunable at
# commensurate accuracy, their repository's results figure): weight thresholding ~ magnitude, filter
# thresholding ~ L1 filter norms
PUBLISHED = {"sipp": "84.9 % (SiPP)", "magnitude": "84.9 % (weight thresholding)", "pfp": "44.9 % (PFP)",
             "l1": "52.1 % (filter thresholding)"}
TOLERANCE = 0.05


def _pct(v: object) -> str:
    return f"{100 * float(v):.2f}" if isinstance(v, (int, float)) else "–"


def _x(v: object) -> str:
    return f"{float(v):.2f}" if isinstance(v, (int, float)) else "–"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--loose", type=float, default=0.05,
                    help="a second, looser tolerance for an extra column (not torchprune's definition)")
    args = ap.parse_args()
    rows = load_rows(args.out)
    ok = [r for r in rows if r.get("status") == "ok"]
    bad = [r for r in rows if r.get("status") != "ok"]
    rank = {m: i for i, m in enumerate(ORDER)}
    ok.sort(key=lambda r: (rank.get(r["method"], 99), target_sort_key(r["target"])))
    if ok:
        b = ok[0]
        print(f"base: top-1 {_pct(b['top1_base'])} %, {b['params_base']:,} parameters, {b['flops_base']:,} MACs; "
              f"fine-tune {b.get('finetune_epochs')} epoch(s) at lr {b.get('finetune_lr')}\n")
    print("| method | target | top-1 pruned % | top-1 fine-tuned % | params (non-zero) | FLOPs (MACs, eff.) | "
          "achieved | budget ±5 % | latency × b1 | latency × b64 | prune s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    misses = []
    for r in ok:
        kind, value = r["target_kind"], float(r["target_value"])
        got = r["compression"] if kind == "params" else r["flops_speedup"]
        met = abs(got / value - 1) <= TOLERANCE
        if not met:
            misses.append(f"{r['method']} {r['target']} -> {got:.3f}x")
        print(f"| {r['method']} | `{r['target']}` | {_pct(r.get('top1_pruned'))} | {_pct(r.get('top1_finetuned'))} | "
              f"{r['params_nonzero']:,} | {r['flops_effective'] / 1e6:.2f} M | {got:.3f}x | "
              f"{'yes' if met else '**no**'} | {_x(r.get('latency_speedup_b1'))} | "
              f"{_x(r.get('latency_speedup_b64'))} | "
              f"{float(r.get('prune_seconds') or 0):.1f} |")
    print(f"\n{len(ok)} cells ok, {len(bad)} not ok"
          + (": " + "; ".join(f"{r['method']} {r['target']}: {r.get('error')}" for r in bad) if bad else ""))
    print("budgets within 5 %: " + ("all met" if not misses else "missed: " + ", ".join(misses)))
    loose = f"{100 * args.loose:g}"
    print(f"\n| method | prune potential, fine-tuned (ours, 0.5 points) | at | one-shot, no fine-tune (0.5 points) | "
          f"fine-tuned, within {loose} points | torchprune (0.5 points, their retraining) |")
    print("|---|---|---|---|---|---|")
    pruned = {p["label"]: p for p in prune_potential(ok, key="top1_pruned")}
    wide = {p["label"]: p for p in prune_potential(ok, delta=args.loose)}
    for p in sorted(prune_potential(ok), key=lambda p: rank.get(p["method"], 99)):
        q, w = pruned.get(p["label"]), wide.get(p["label"])
        at_w = f" (`{w['target']}`)" if w and w["target"] else ""
        print(f"| {p['label']} | {format_potential(p)} | {('`' + p['target'] + '`') if p['target'] else '–'} | "
              f"{format_potential(q) if q else '–'} | {format_potential(w) + at_w if w else '–'} | "
              f"{PUBLISHED.get(p['method'], '–')} |")


if __name__ == "__main__":
    main()
