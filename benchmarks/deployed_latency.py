"""Deployed latency of pruned ResNet-20s: eager PyTorch, TorchScript and ONNX Runtime (issue #17).

Prunes the reference ResNet-20 / CIFAR-10 checkpoint at one FLOPs target with several methods (no
fine-tuning), exports each to ONNX (BatchNorm folded, checked against eager), and times the base and every
pruned model alternately in each runtime (``prunekit.deploy.measure_runtimes``: per runtime and batch size,
``--rounds`` rounds, the best round kept). Top-1 without fine-tuning on a stratified test subset.

    python benchmarks/deployed_latency.py --data-dir ../shared/data --target flops=2 --out runs/deployed

Writes OUT/results.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import prunekit
from prunekit.budget import BudgetOptions
from prunekit.data import BatchLoader, get_dataset
from prunekit.data.datasets import train_holdout_split
from prunekit.deploy import export, measure_runtimes
from prunekit.methods import get_method_info
from prunekit.metrics import count_flops, count_params, evaluate

METHODS = ("l1", "tp_l1", "id_iter", "svd", "pca")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _variant(spec: str) -> tuple[str, str, dict]:
    """``"svd"`` -> ``("svd", "svd", {})``; ``"svd_out=svd:side=output"`` -> ``("svd_out", "svd", {"side": ...})``."""
    label, _, rest = spec.partition("=") if "=" in spec.split(":", 1)[0] else (spec.split(":", 1)[0], "", spec)
    method, _, options = (rest or label).partition(":")
    opts = {}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--methods {spec!r}: options are key=value, got {item!r}")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    return label, method, opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="benchmarks/checkpoints/resnet20-cifar10.pt")
    ap.add_argument("--dataset", default="cifar10-jpeg")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--target", default="flops=2")
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help="method names, or LABEL=METHOD:key=value,... for a variant with options (values read "
                         "as JSON where they parse), e.g. svd_out=svd:side=output")
    ap.add_argument("--prune-samples", type=int, default=1024)
    ap.add_argument("--eval-subset", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtimes", nargs="+", default=["eager", "torchscript", "onnxruntime"])
    ap.add_argument("--out", default="runs/deployed")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="target tolerance of every method (BudgetOptions.tolerance; default the engine's 0.05)")
    ap.add_argument("--exact-ranks", action="store_true",
                    help="low-rank methods with their default exact ranks (no aligned_ranks=True)")
    ap.add_argument("--latency-model", default=None, choices=["proxy", "measured", "onnxruntime", "off"],
                    help="latency_aware for every method (default: the engine's, 'proxy'); the global channel "
                         "ranking of l1 / tp-style scorers uses it, id_iter and the low-rank methods use the proxy "
                         "unless 'off'")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)

    base = prunekit.load(a.checkpoint).eval()
    shape = (3, 32, 32)
    train = get_dataset(a.dataset, "train", data_dir=a.data_dir)
    test = get_dataset(a.dataset, "test", data_dir=a.data_dir)
    prune_ds = train_holdout_split(train, a.prune_samples, seed=0)[1]
    test_ds = train_holdout_split(test, a.eval_subset, seed=0)[1] if a.eval_subset < len(test) else test
    prune_loader = BatchLoader(prune_ds, batch_size=128)
    test_loader = BatchLoader(test_ds, batch_size=500)

    models = {"base": base}
    rows: dict[str, dict] = {"base": {"top1": evaluate(base, test_loader)["top1"], "flops": count_flops(base, shape),
                                      "params": count_params(base)["params"]}}
    for spec in a.methods:
        label, method, opts = _variant(spec)
        m = label
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lowrank = get_method_info(method).granularity == "lowrank"
            kw = {"aligned_ranks": True} if lowrank and not a.exact_ranks else {}
            if a.latency_model is not None and not method.startswith("tp_"):
                kw["latency_aware"] = a.latency_model
            kw.update(opts)
            budget = BudgetOptions(tolerance=a.tolerance) if a.tolerance is not None else None
            res = prunekit.prune(base, method, a.target, data=prune_loader, budget=budget, **kw)
        pm = res.model.eval()
        models[m] = pm
        rows[m] = {"top1": evaluate(pm, test_loader)["top1"], "flops": count_flops(pm, shape),
                   "params": count_params(pm)["params"], "prune_seconds": time.perf_counter() - t0}
        rows[m]["flops_speedup"] = rows["base"]["flops"] / rows[m]["flops"]
        rows[m]["onnx_export"] = {k: v for k, v in export(pm, out / f"{m}.onnx", shape).items() if k != "file"}
        _log(f"{m}: top-1 {rows[m]['top1']:.4f}, FLOPs x{rows[m]['flops_speedup']:.2f}")

    _log("timing (alternately, every model in every runtime)")
    lat = measure_runtimes(models, shape, runtimes=a.runtimes, threads=a.threads, rounds=a.rounds,
                           repeats=10, time_budget_s=3.0)
    meta = {"date": time.strftime("%Y-%m-%d"), "threads": lat["threads"], "target": a.target,
            "tolerance": a.tolerance, "methods": list(a.methods),
            "latency_model": a.latency_model or "proxy",
            "torch": torch.__version__, "cpu_count": torch.get_num_threads(), "skipped": lat["skipped"]}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "latency": lat}, indent=2))

    rts = list(lat["runtimes"])
    print("\n| model | top-1 % | FLOPs x | " + " | ".join(f"{rt} b64 ms (x)" for rt in rts) + " | ORT b1 ms (x) |")
    print("|---" * (4 + len(rts)) + "|")
    for k, r in rows.items():
        cells = []
        for rt in rts:
            b, p = lat["runtimes"][rt]["base"]["64"], lat["runtimes"][rt][k]["64"]
            cells.append(f"{p:.1f} ({b / p:.2f}x)")
        ort = lat["runtimes"].get("onnxruntime")
        b1 = f"{ort[k]['1']:.2f} ({ort['base']['1'] / ort[k]['1']:.2f}x)" if ort else "-"
        print(f"| {k} | {100 * r['top1']:.2f} | {r.get('flops_speedup', 1.0):.2f} | " + " | ".join(cells)
              + f" | {b1} |")


if __name__ == "__main__":
    main()
