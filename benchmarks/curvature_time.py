"""EigenDamage / OBD / OBS: the cost of the curvature pass against one training epoch, in one process.

On the reference ResNet-20 / CIFAR-10 (or any checkpoint): the K-FAC factors of every conv / linear
layer over the default prune set of each method (``eigendamage``: channel mode, 1024 examples;
``eigendamage_improved``: the same plus the EKFAC eigenvalues from per-example gradients; ``obd`` /
``obs``: patch mode, 1024 examples), timed and with their peak memory (torch CPU allocations made inside
the pass, from the profiler, and the process RSS), then ``--epoch-batches`` batches of ordinary
training (SGD, batch 128, augmentation on), extrapolated linearly to one epoch of the training split.
Both are timed alternately ``--repeats`` times and the medians compared, so a burst of load on a shared
machine hits both alike.

    python benchmarks/curvature_time.py --checkpoint benchmarks/checkpoints/resnet20-cifar10.pt \\
        --dataset cifar10-jpeg --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import prunekit
from prunekit import curvature
from prunekit.data import BatchLoader, get_dataset
from prunekit.methods.gradflow import PeakMemory


def _layers(model: torch.nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def _prune_batches(ds, samples: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, seen = [], 0
    for x, y in BatchLoader(ds, batch_size=batch, shuffle=True, augment=False, seed=0):
        out.append((x, y))
        seen += len(x)
        if seen >= samples:
            break
    return out


def _pass(model, batches, mode: str, ekfac: bool) -> dict[str, float]:
    paths = _layers(model)
    with PeakMemory("cpu") as mem:
        t0 = time.perf_counter()
        kf = curvature.kfac_factors(model, batches, paths, mode=mode, fisher="true")
        t_kfac = time.perf_counter() - t0
        t_ek = 0.0
        if ekfac:
            bases = {}
            for p, f in kf.items():
                _, qa = curvature.eigh(f.A[0])
                _, qg = curvature.eigh(f.G)
                bases[p] = (qa, qg)
            t1 = time.perf_counter()
            curvature.ekfac_eigenvalues(model, batches, bases, fisher="true", num_batches=1)
            t_ek = time.perf_counter() - t1
    r = mem.result
    return {"kfac_s": t_kfac, "ekfac_s": t_ek, "total_s": t_kfac + t_ek,
            "peak_alloc_mb": (r.get("increase_bytes") or 0) / 2**20, "rss_peak_mb": (r.get("peak_bytes") or 0) / 2**20}


def _train_batches(model, ds, n: int) -> float:
    loader = BatchLoader(ds, batch_size=128, shuffle=True, augment=True, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    model.train()
    warm = 2  # the first batches (allocator, thread pool warm-up) are not timed
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i == warm:
            t0 = time.perf_counter()
        if i >= n + warm:
            break
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dataset", default="cifar10-jpeg")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=128, help="batch size of the curvature passes")
    ap.add_argument("--epoch-batches", type=int, default=40, help="training batches timed (extrapolated)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    base = prunekit.load(args.checkpoint)
    train = get_dataset(args.dataset, "train", data_dir=args.data_dir)
    batches = _prune_batches(train, args.samples, args.batch_size)
    per_epoch = -(-len(train) // 128)
    runs: dict[str, list[dict[str, float]]] = {"eigendamage": [], "eigendamage_improved": [], "obd": []}
    epochs: list[float] = []
    for _ in range(args.repeats):
        runs["eigendamage"].append(_pass(base, batches, "channel", ekfac=False))
        runs["eigendamage_improved"].append(_pass(base, batches, "channel", ekfac=True))
        runs["obd"].append(_pass(base, batches, "patch", ekfac=False))
        work = prunekit.load(args.checkpoint)
        epochs.append(_train_batches(work, train, args.epoch_batches) * per_epoch / args.epoch_batches)
    epoch_s = statistics.median(epochs)
    out = {"threads": torch.get_num_threads(), "samples": args.samples, "epoch_s": epoch_s,
           "epoch_batches_timed": args.epoch_batches, "batches_per_epoch": per_epoch, "passes": {}}
    print(f"one training epoch (extrapolated from {args.epoch_batches} of {per_epoch} batches): {epoch_s:.1f} s; "
          f"{torch.get_num_threads()} threads")
    print("| method (pass) | curvature pass s | of one epoch | peak alloc MB | RSS peak MB |")
    print("|---|---|---|---|---|")
    for name, rs in runs.items():
        t = statistics.median(r["total_s"] for r in rs)
        mem = max(r["peak_alloc_mb"] for r in rs)
        rss = max(r["rss_peak_mb"] for r in rs)
        out["passes"][name] = {"seconds": t, "ratio": t / epoch_s, "peak_alloc_mb": mem, "rss_peak_mb": rss,
                               "runs": rs}
        print(f"| {name} | {t:.1f} | {t / epoch_s:.3f} | {mem:.0f} | {rss:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
