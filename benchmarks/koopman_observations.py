"""Koopman pruning: the paper's two observations, and the recorder's memory and time, measured.

Two settings, the same protocol for kmp, kgp and global magnitude pruning (one global ranking of the
conv / linear weights, classifier kept, masks; then the same fine-tuning for every method):

* **converged**: the reference checkpoint trained one more epoch at a small constant learning rate while
  its trajectory is recorded (every step of that epoch); the three methods prune the final weights.
* **early**: a fresh initialisation (seed 0) trained ``--early-epochs`` epochs, the last one recorded; the
  three methods prune there, then training continues for the fine-tuning budget.

For each: mask overlap of kmp / kgp with magnitude (|kept by both| / |kept|), top-1 one-shot and after
fine-tuning. In the converged run also: recording time / training time of the epoch, peak memory of the
Gram-route DMD (tracemalloc: every numpy buffer it allocates) against the naive N x T float64 matrix, and
the mask overlap of the Gram route with a dense float64 SVD DMD of the same snapshots.

    python benchmarks/koopman_observations.py --model lenet5 --dataset fashion-mnist \\
        --checkpoint benchmarks/checkpoints/lenet5-fashion-mnist.pt --targets params=4 params=8 --out runs/koop-lenet5
    python benchmarks/koopman_observations.py --model resnet20 --dataset cifar10-jpeg \\
        --checkpoint benchmarks/checkpoints/resnet20-cifar10.pt --targets params=4 --out runs/koop-resnet20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

import prunekit
from prunekit import koopman
from prunekit.data import BatchLoader, get_dataset
from prunekit.metrics import count_params, evaluate
from prunekit.models import create_model_for_dataset
from prunekit.train import TrainConfig, Trainer, TrajectoryRecorder

METHODS = ("kmp", "kgp", "magnitude")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _train(model, loader, epochs, lr, schedule, callbacks=(), seed=0, channels_last=False):
    cfg = TrainConfig(epochs=epochs, lr=lr, schedule=schedule, seed=seed, channels_last=channels_last)
    t0 = time.perf_counter()
    Trainer(model, cfg, loader, callbacks=list(callbacks), progress=False, log_epochs=False).fit()
    model.to(memory_format=torch.contiguous_format)
    return time.perf_counter() - t0


def _kept(model) -> dict[str, np.ndarray]:
    return {k: m.cpu().numpy() for k, m in prunekit.surgery.masks.get_masks(model).items()}


def _overlap(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    both = sum(int((a[k] & b[k]).sum()) for k in a)
    return both / max(1, sum(int(b[k].sum()) for k in b))


def _dense_masks(model, traj, target, input_shape, rtol) -> dict[str, np.ndarray]:
    """kmp masks from a dense float64 exact DMD of the whole snapshot matrix (the seed's way, for reference)."""
    w = traj.dense().astype(np.float64)
    sol, phi = koopman.dmd_dense(w, rtol)
    j = sol.nearest_one()
    del w
    mode = np.abs(phi[:, j])
    del phi
    scores = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in traj.split(mode).items()}
    from prunekit.methods import WeightScorer

    class _Dense(WeightScorer):
        name = "kmp_dense"

        def score(self, m, ctx):
            return {k: scores[k] for k in self.prunable_params(m, ctx)}

    res = prunekit.prune(model, _Dense(), target, mode="masked", input_shape=input_shape)
    return _kept(res.model)


def _memory_and_overlap(model, traj, target, input_shape, rtol) -> dict:
    traj._cache.clear()
    tracemalloc.start()
    t0 = time.perf_counter()
    koopman.kmp_mode(traj, rtol)
    koopman.kgp_change(traj, rtol)
    dmd_s = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    naive = traj.n * traj.t * 8
    gram = prunekit.prune(model, "kmp", target, trajectory=traj, mode="masked", input_shape=input_shape, rtol=rtol)
    dense = _dense_masks(model, traj, target, input_shape, rtol)
    return {"dmd_seconds": round(dmd_s, 2), "dmd_peak_mb": round(peak / 2**20, 2),
            "snapshot_mb": round(traj.n * 4 / 2**20, 2),
            "naive_float64_mb": round(naive / 2**20, 1), "memory_ratio": round((peak + traj.n * 4) / naive, 4),
            "rank": koopman.solve(traj, rtol).rank,
            "gram_vs_dense_mask_overlap": round(_overlap(_kept(gram.model), dense), 5)}


def _compare(model, traj, targets, input_shape, test_loader, train_loader, ft_epochs, ft_lr, cl, base_top1):
    rows = []
    for target in targets:
        masks, res = {}, {}
        for m in METHODS:
            kw = {"trajectory": traj} if m != "magnitude" else {}
            r = prunekit.prune(model, m, target, mode="masked", input_shape=input_shape, **kw)
            masks[m] = _kept(r.model)
            one_shot = evaluate(r.model.eval(), test_loader)["top1"]
            ft_s = _train(r.model, train_loader, ft_epochs, ft_lr, "cosine", channels_last=cl) if ft_epochs else 0
            tuned = evaluate(r.model.eval(), test_loader)["top1"] if ft_epochs else None
            p = count_params(r.model)
            res[m] = {"method": m, "target": target, "compression": round(p["params"] / p["nonzero_params"], 3),
                      "top1_one_shot": one_shot, "top1_finetuned": tuned, "finetune_seconds": round(ft_s, 1)}
            _log(f"  {target} {m}: one-shot {one_shot:.4f} fine-tuned {tuned}")
        for m in METHODS:
            res[m]["overlap_with_magnitude"] = round(_overlap(masks[m], masks["magnitude"]), 4)
            res[m]["top1_base"] = base_top1
            rows.append(res[m])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data-dir", default=os.environ.get("PRUNEKIT_DATA", "../shared/data"))
    ap.add_argument("--targets", nargs="+", default=["params=4"])
    ap.add_argument("--record-lr", type=float, default=0.002, help="converged setting: lr of the recorded epoch")
    ap.add_argument("--early-epochs", type=int, default=2)
    ap.add_argument("--early-lr", type=float, default=0.05)
    ap.add_argument("--ft-epochs", type=float, default=1.0)
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--rtol", type=float, default=koopman.DEFAULT_RTOL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", nargs="+", default=["converged", "early"])
    ap.add_argument("--seed", type=int, default=0,
                    help="shuffling seed of the recorded epoch and the fine-tune (repeat the run with other seeds "
                         "to see the seed-to-seed spread)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_ds = get_dataset(args.dataset, "train", data_dir=args.data_dir, download=False)
    test_ds = get_dataset(args.dataset, "test", data_dir=args.data_dir, download=False)
    augment = train_ds.info.in_channels == 3
    cl = augment  # channels-last for the CIFAR convnets, as the reference training
    train_loader = BatchLoader(train_ds, batch_size=128, shuffle=True, augment=augment, seed=args.seed,
                               drop_last=True)
    test_loader = BatchLoader(test_ds, batch_size=1000)
    info = train_ds.info
    shape = (info.in_channels, info.image_size, info.image_size)
    results: dict = {"command": " ".join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
                     "threads": args.threads, "torch": torch.__version__, "seed": args.seed}
    if "converged" in args.settings:
        _log("converged: one recorded epoch from the checkpoint")
        model = prunekit.load(args.checkpoint)
        rec = TrajectoryRecorder(out / "converged.trajectory")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        train_s = _train(model, train_loader, 1, args.record_lr, "constant", [rec], seed=args.seed,
                         channels_last=cl)
        traj = rec.trajectory
        base_top1 = evaluate(model.eval(), test_loader)["top1"]
        conv = {"train_seconds": round(train_s, 1), "record_seconds": round(rec.seconds, 2),
                "record_overhead": round(rec.seconds / (train_s - rec.seconds), 4),
                "snapshots": traj.t, "parameters": traj.n, "top1_base": base_top1,
                "maxrss_mb_after_training": round(max(rss0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
                                                  / 1024, 1)}
        _log(f"  recorded {traj.t} snapshots of {traj.n} parameters; overhead {conv['record_overhead']:.2%}")
        conv.update(_memory_and_overlap(model, traj, args.targets[0], shape, args.rtol))
        _log(f"  memory/overlap: {conv}")
        conv["rows"] = _compare(model, traj, args.targets, shape, test_loader, train_loader, args.ft_epochs,
                                args.ft_lr, cl, base_top1)
        results["converged"] = conv
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if "early" in args.settings:
        _log(f"early: {args.early_epochs} epoch(s) from initialisation, the last one recorded")
        torch.manual_seed(0)
        model = create_model_for_dataset(args.model, info)
        rec = TrajectoryRecorder(out / "early.trajectory")
        train_s = _train(model, train_loader, args.early_epochs, args.early_lr, "constant", [rec], channels_last=cl)
        base_top1 = evaluate(model.eval(), test_loader)["top1"]
        early = {"epochs": args.early_epochs, "train_seconds": round(train_s, 1), "top1_base": base_top1,
                 "snapshots": rec.trajectory.t}
        early["rows"] = _compare(model, rec.trajectory, args.targets, shape, test_loader, train_loader,
                                 args.ft_epochs, args.ft_lr, cl, base_top1)
        results["early"] = early
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    _log(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
