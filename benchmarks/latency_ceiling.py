"""How fast can a 2x-fewer-FLOPs ResNet-20 run on this CPU? (the ceiling behind the latency figures)

Every width assignment the default channel multiples allow (each prunable group of the reference
ResNet-20 at its full width or one multiple narrower: 2^12 configurations) is costed with the measured
layer table of ``prunekit.surgery.latency`` (each conv timed with its batch norm, ReLU and residual
addition at batch 64). Among those within 5 % of 2x fewer FLOPs, the fastest are listed, next to the
widths the engine's l1 allocation chooses; then the fastest configuration (filters kept by L1 norm),
the engine's choice and the dense model are timed alternately with ``measure_latency``.

    python benchmarks/latency_ceiling.py [--checkpoint benchmarks/checkpoints/resnet20-cifar10.pt]

Importance is ignored in the search: it bounds what any allocation can reach at this target here.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import sys

import torch

import prunekit
from prunekit.metrics import count_flops, measure_latency
from prunekit.surgery import Plan, apply_plan
from prunekit.surgery.allocate import resolve_round_to
from prunekit.surgery.graph import analyze
from prunekit.surgery.latency import LatencyTable, layer_spec, model_layers


def main() -> None:
    # time the whole models with glibc's allocator kept warm (see BENCHMARKS.md, "allocator page faults")
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="benchmarks/checkpoints/resnet20-cifar10.pt")
    ap.add_argument("--target", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3, help="alternating latency rounds (fastest median kept)")
    args = ap.parse_args()

    base = prunekit.load(args.checkpoint).eval()
    shape = (3, 32, 32)
    g = analyze(base, shape)
    cost = g.cost
    keys = [grp.key for grp in g.prunable_groups()]
    choices = []
    for k in keys:
        size = g.groups[k].size
        m = resolve_round_to(size, None)
        choices.append([size - m, size] if 1 < m < size else [size])
    layers = model_layers(base, g)
    tensors = cost.latency_tensors()
    table = LatencyTable(batch_size=64, cache_file=None)  # measured afresh, all in one worker run

    def specs(w):
        return [s for s in (layer_spec(layers, t, w) for t in tensors) if s is not None]

    configs = [dict(zip(keys, c)) for c in itertools.product(*choices)]
    full = {k: g.groups[k].size for k in g.groups}
    f0 = cost.flops(full)
    keep = [w for w in configs if abs(f0 / cost.flops({**full, **w}) / args.target - 1) <= 0.05]
    table.prefetch([s for w in [full, *keep] for s in specs({**full, **w})])

    def est(w):
        return sum(table.ms(s) for s in specs({**full, **w}))

    l0 = est(full)
    ranked = sorted(keep, key=est)
    engine = prunekit.prune(copy.deepcopy(base), "l1", f"flops={args.target:g}")
    engine_w = {k: len(v) for k, v in engine.plan.channels.items()}
    print(f"{len(configs)} configurations, {len(keep)} within 5 % of {args.target:g}x fewer FLOPs; "
          f"dense estimate {l0:.2f} ms (sum of layer timings)")
    print("estimated speedup  FLOPs speedup  widths (" + ", ".join(keys) + ")")
    for w in ranked[:5]:
        print(f"{l0 / est(w):17.3f}  {f0 / cost.flops({**full, **w}):13.3f}  {[w[k] for k in keys]}")
    ew = {k: engine_w.get(k, full[k]) for k in keys}
    print(f"engine l1 (proxy): {l0 / est(ew):.3f} est.  {f0 / cost.flops({**full, **ew}):.3f}  {[ew[k] for k in keys]}")

    # the fastest configuration, keeping each group's filters of largest L1 norm (summed over producers)
    from prunekit.methods.baselines import l1_scores

    best = ranked[0]
    channels = {}
    for k in keys:
        if best[k] < full[k]:
            s = l1_scores(base, g.groups[k])
            channels[k] = torch.sort(torch.topk(s, best[k]).indices).values
    fastest = apply_plan(base, Plan(channels=channels), g, "physical", shape).eval()
    models = {"dense": base, "fastest": fastest, "engine l1": engine.model.eval()}
    times = {k: math.inf for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            times[k] = min(times[k], measure_latency(m, shape, batch_sizes=(64,))["64"])
    for k, m in models.items():
        fs = count_flops(base, shape) / count_flops(m, shape)
        ls = times["dense"] / times[k]
        print(f"{k:10s} b64 {times[k]:6.2f} ms  latency speedup {ls:.3f}  FLOPs speedup {fs:.3f}  ratio {ls / fs:.3f}")


if __name__ == "__main__":
    main()
