"""Where do SiPP and magnitude prune? Kept share of every conv / linear weight of the reference ResNet-20.

    PRUNEKIT_DATA=../shared/data python benchmarks/provable_layer_density.py [--target params=2]

Both one-shot (masked), ``sipp`` from its default sample set (the start of the benchmark's 2,048-example
prune set), global top-k on each score; prints the layer, its fan-in ``J`` (inputs per filter), the kept
share for each method and the mean SiPP sensitivity of the layer (about ``1 / J``: the scores are
relative contributions, which sum to about one over a filter's inputs).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn

import prunekit
from prunekit.data import BatchLoader, get_dataset, train_holdout_split
from prunekit.sensitivity import collect_sensitivities
from prunekit.surgery.masks import remove_masks_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="benchmarks/checkpoints/resnet20-cifar10.pt")
    ap.add_argument("--data-dir", default=os.environ.get("PRUNEKIT_DATA"))
    ap.add_argument("--target", default="params=2")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = prunekit.load(args.checkpoint).eval()
    train = get_dataset("cifar10-jpeg", "train", data_dir=args.data_dir, download=False)
    loader = BatchLoader(train_holdout_split(train, 2048, seed=0)[1], batch_size=128, shuffle=False, augment=False)
    kept = {}
    for method in ("sipp", "magnitude"):
        m = prunekit.prune(base, method, args.target, data=loader, mode="masked").model
        remove_masks_(m)
        kept[method] = {n: float((mod.weight != 0).float().mean()) for n, mod in m.named_modules()
                        if isinstance(mod, (nn.Conv2d, nn.Linear))}
    paths = list(kept["sipp"])
    x = torch.cat([b[0] for _, b in zip(range(2), loader)])[:192]
    tr = collect_sensitivities(base, [x], paths, weights=True, channels=False, batch_size=32)
    print(f"target {args.target}: kept share of each layer's weights")
    print("| layer | J (fan-in) | sipp kept | magnitude kept | mean SiPP sensitivity | 1/J |")
    print("|---|---|---|---|---|---|")
    for p in paths:
        w = base.get_submodule(p).weight
        j = w[0].numel()
        s = float(tr[p].weight_scores().mean())
        print(f"| {p} | {j} | {kept['sipp'][p]:.3f} | {kept['magnitude'][p]:.3f} | {s:.2e} | {1 / j:.2e} |")


if __name__ == "__main__":
    main()
