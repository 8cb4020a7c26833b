"""``latency=X`` targets on the reference ResNet-20: does the measured speedup land on the target?

For each method and target, ``prunekit.prune(model, method, "latency@RUNTIME=X")`` searches FLOPs
targets until the pruned model, timed against the base at batch 64 in RUNTIME (alternately, best of
rounds), is X times faster; then the chosen model is timed once more, against the base, in a fresh
measurement (the figure reported: the search's own last timing could be a lucky one).

    python benchmarks/latency_targets.py --methods l1 id_iter --targets 1.5 2 --runtime onnxruntime \\
        --data-dir ../shared/data --out runs/latency-targets
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import prunekit
from prunekit.data import BatchLoader, get_dataset
from prunekit.data.datasets import train_holdout_split
from prunekit.deploy import measure_runtimes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="benchmarks/checkpoints/resnet20-cifar10.pt")
    ap.add_argument("--dataset", default="cifar10-jpeg")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--methods", nargs="+", default=["l1", "id_iter"])
    ap.add_argument("--targets", nargs="+", type=float, default=[1.5, 2.0])
    ap.add_argument("--runtime", default="onnxruntime", choices=("eager", "torchscript", "onnxruntime"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prune-samples", type=int, default=1024)
    ap.add_argument("--out", default="runs/latency-targets")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    base = prunekit.load(args.checkpoint).eval()
    train = get_dataset(args.dataset, "train", data_dir=args.data_dir)
    _, prune_ds = train_holdout_split(train, args.prune_samples, seed=0)
    data = BatchLoader(prune_ds, batch_size=256, shuffle=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods:
        for x in args.targets:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = prunekit.prune(base, method, f"latency@{args.runtime}={x:g}", data)
            seconds = time.perf_counter() - t0
            lat = measure_runtimes({"base": base, "pruned": res.model}, (3, 32, 32), runtimes=[args.runtime],
                                   batch_sizes=[64], threads=args.threads, rounds=5)
            rt = lat["runtimes"][args.runtime]
            check = rt["base"]["64"] / rt["pruned"]["64"]
            row = {"method": method, "target": x, "runtime": args.runtime, "search_speedup": res.report["achieved"],
                   "check_speedup": check, "within_10pct": abs(check / x - 1) <= 0.10,
                   "flops_speedup": res.report["flops_speedup"], "trials": res.report["latency_search"]["trials"],
                   "seconds": seconds, "threads": args.threads}
            rows.append(row)
            print(f"{method} latency@{args.runtime}={x:g}: search {row['search_speedup']:.2f}x, re-measured "
                  f"{check:.2f}x (FLOPs {row['flops_speedup']:.2f}x, {len(row['trials'])} trials, {seconds:.0f} s)",
                  flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n| method | target | runtime | measured (search) | re-measured | within 10 % | FLOPs × | trials |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | latency={r['target']:g} | {r['runtime']} | {r['search_speedup']:.2f}x | "
              f"{r['check_speedup']:.2f}x | {'yes' if r['within_10pct'] else 'no'} | {r['flops_speedup']:.2f}x | "
              f"{len(r['trials'])} |")


if __name__ == "__main__":
    main()
