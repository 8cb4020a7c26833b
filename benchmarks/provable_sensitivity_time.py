"""How long do SiPP's and PFP's sensitivities take, against one training epoch? (issue 14, "Speed")

In one process, on the reference ResNet-20 / CIFAR-10 (JPEG copy), with the same torch threads:

1. the sample set: the first ``|S|`` examples of the prune set the benchmark uses (2,048 examples held out
   of the training split, seed 0), ``|S| = ceil(3 ln(8 eta* eta / delta))`` with delta = 1e-16, rounded
   up to the methods' sensitivity batch (32), as ``sipp`` / ``pfp`` do by default;
2. the sensitivity pass alone (:func:`prunekit.sensitivity.collect_sensitivities`) over every conv /
   linear layer: per-weight scores (SiPP, timed ``--repeats`` times) and per-input-channel scores (PFP,
   ``--pfp-repeats`` times), medians reported; with ``--prune-calls`` also the whole ``prunekit.prune``
   call of ``sipp`` at ``params=4`` and ``pfp`` at ``flops=2`` (sensitivities + allocation + epsilon /
   multiplier search + surgery; the sensitivity cache off), once each;
3. training: ``--epoch-fraction`` of an epoch (default 0.25, i.e. 97 of 390 steps) of a copy of the same
   model with the benchmark's fine-tuning settings (SGD + Nesterov, batch 128, augmentation, channels-last),
   extrapolated linearly to one epoch (``--epoch-fraction 1`` times a whole epoch).

Prints every figure and the ratios sensitivity time / epoch time (acceptance: <= 0.05).

    PRUNEKIT_DATA=../shared/data python benchmarks/provable_sensitivity_time.py [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn as nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="benchmarks/checkpoints/resnet20-cifar10.pt")
    ap.add_argument("--data-dir", default=os.environ.get("PRUNEKIT_DATA"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: two spin-wait on a shared box)")
    ap.add_argument("--epoch-fraction", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pfp-repeats", type=int, default=1)
    ap.add_argument("--prune-calls", action="store_true")
    ap.add_argument("--delta", type=float, default=1e-16)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import prunekit
    from prunekit.data import BatchLoader, get_dataset, train_holdout_split
    from prunekit.sensitivity import collect_sensitivities, sample_size
    from prunekit.train import TrainConfig, Trainer

    base = prunekit.load(args.checkpoint).eval()
    train_ds = get_dataset("cifar10-jpeg", "train", data_dir=args.data_dir, download=False)
    prune_ds = train_holdout_split(train_ds, 2048, seed=0)[1]
    shape = tuple(int(s) for s in train_ds.info.input_size)
    sens_batch = 32
    n = sample_size(base, shape, args.delta)
    n_rounded = -(-n // sens_batch) * sens_batch
    loader = BatchLoader(prune_ds, batch_size=128, shuffle=False, augment=False, seed=0)
    xs = []
    for x, _ in loader:
        xs.append(x)
        if sum(len(t) for t in xs) >= n_rounded:
            break
    sample = torch.cat(xs)[:n_rounded]
    paths = [name for name, m in base.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def sens(weights: bool, channels: bool) -> float:
        t0 = time.perf_counter()
        collect_sensitivities(base, [sample], paths, weights=weights, channels=channels, batch_size=sens_batch)
        return time.perf_counter() - t0

    sens(True, False)  # warm-up (allocator, kernels), not counted
    sipp_s = [sens(True, False) for _ in range(args.repeats)]
    pfp_s = [sens(False, True) for _ in range(args.pfp_repeats)]

    def whole(method: str, target: str) -> float:
        r = prunekit.prune(copy.deepcopy(base), method, target, data=loader, input_shape=shape)
        return float(r.report.get("prune_seconds") or math.nan)

    os.environ["PRUNEKIT_SENSITIVITY_CACHE"] = "0"
    sipp_prune = whole("sipp", "params=4") if args.prune_calls else math.nan
    pfp_prune = whole("pfp", "flops=2") if args.prune_calls else math.nan

    model = copy.deepcopy(base).train()
    cfg = TrainConfig(epochs=args.epoch_fraction, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4,
                      schedule="cosine", channels_last=True, seed=0)
    tl = BatchLoader(train_ds, batch_size=128, shuffle=True, augment=True, seed=0, drop_last=True)
    trainer = Trainer(model, cfg, tl, progress=False, log_epochs=False)
    t0 = time.perf_counter()
    trainer.fit()
    train_s = time.perf_counter() - t0
    steps = trainer.total_steps
    epoch_s = train_s * trainer.steps_per_epoch / steps

    sipp_med, pfp_med = statistics.median(sipp_s), statistics.median(pfp_s)
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs visible",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "sample_set": {"formula": n, "used": n_rounded, "delta": args.delta, "sensitivity_batch": sens_batch},
        "layers": len(paths),
        "sipp_sensitivity_s": sipp_s, "pfp_sensitivity_s": pfp_s,
        "sipp_prune_call_s": sipp_prune, "pfp_prune_call_s": pfp_prune,
        "train_steps_timed": steps, "steps_per_epoch": trainer.steps_per_epoch, "train_s": train_s,
        "epoch_s_extrapolated": epoch_s,
        "ratio_sipp_sensitivity": sipp_med / epoch_s, "ratio_pfp_sensitivity": pfp_med / epoch_s,
        "ratio_sipp_prune_call": sipp_prune / epoch_s, "ratio_pfp_prune_call": pfp_prune / epoch_s,
    }
    print(f"sample set: |S| = {n} by the formula (delta {args.delta:g}), {n_rounded} used (batches of "
          f"{sens_batch}); {len(paths)} conv / linear layers; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"SiPP sensitivities: median {sipp_med:.2f} s  ({', '.join(f'{t:.2f}' for t in sipp_s)})")
    print(f"PFP  sensitivities: median {pfp_med:.2f} s  ({', '.join(f'{t:.2f}' for t in pfp_s)})")
    if args.prune_calls:
        print(f"whole prune call: sipp params=4 {sipp_prune:.2f} s, pfp flops=2 {pfp_prune:.2f} s")
    print(f"training: {steps} of {trainer.steps_per_epoch} steps in {train_s:.1f} s -> one epoch "
          f"{epoch_s:.1f} s (linear extrapolation x{trainer.steps_per_epoch / steps:.2f})")
    print(f"ratio to one epoch: SiPP sensitivities {out['ratio_sipp_sensitivity']:.4f}, "
          f"PFP sensitivities {out['ratio_pfp_sensitivity']:.4f}"
          + (f"; whole prune call: sipp {out['ratio_sipp_prune_call']:.4f}, pfp {out['ratio_pfp_prune_call']:.4f}"
             if args.prune_calls else "") + " (acceptance <= 0.05)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
