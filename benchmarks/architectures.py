"""prunekit against Torch-Pruning on the architecture suite of ``tests/test_architectures.py`` at flops=2.

For every suite model: ``prunekit.prune(model, "l1", "flops=2", example_inputs=...)`` (speedup, whether the
output structure survives and the masked model equals the physical one, or the refusal), and Torch-Pruning's
``MagnitudePruner`` (L1 magnitude, the same output layers ignored), whose uniform pruning ratio is bisected to
land on 2x; both FLOP counts by :func:`prunekit.metrics.count_flops` on the same example inputs. Prints a
markdown table.

    PYTHONPATH=src python benchmarks/architectures.py [--models a,b] [--out table.md]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import test_architectures as suite  # noqa: E402

import prunekit  # noqa: E402
from prunekit.errors import PruningError  # noqa: E402
from prunekit.metrics import count_flops  # noqa: E402
from prunekit.surgery import analyze, apply_plan  # noqa: E402
from prunekit.surgery.convert import linearize_  # noqa: E402
from prunekit.surgery.inputs import ExampleInputs, flatten_outputs, max_output_difference  # noqa: E402

TARGET = 2.0


def _short(msg: str, n: int = 110) -> str:
    msg = " ".join(str(msg).split()).replace("|", "/")
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def _shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in flatten_outputs(out)]


def run_prunekit(name: str) -> dict[str, Any]:
    model, ex = suite.build(name)
    with torch.no_grad():
        ref = ex(model)
    linearize_(model)  # as prune does (Hugging Face Conv1D -> nn.Linear), for the masked comparison
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = prunekit.prune(model, "l1", f"flops={TARGET}", example_inputs=ex)
    except PruningError as e:
        msg = str(e)
        if "likely cause: " in msg:  # the layers named are the useful part of a trace failure
            msg = "trace failed; unknown layers " + msg.split("likely cause: ", 1)[1]
        return {"speedup": None, "ok": False, "why": _short(msg), "s": time.perf_counter() - t0}
    with torch.no_grad():
        out = ex(res.model)
    ok = _shapes(out) == _shapes(ref) and type(out) is type(ref)
    diff = None
    if res.plan.channels:
        masked = apply_plan(model, res.plan, None, "masked", ex)
        with torch.no_grad():
            diff = max_output_difference(ex(masked), out)
    ln = res.graph is not None and any(g.ln_coupled for k, g in res.graph.groups.items() if k in res.plan.channels)
    exact = diff is None or diff < 1e-5
    why = ""
    if not exact:
        why = "Layer/GroupNorm-coupled: masked != physical by design" if ln else f"masked diff {diff:.1e}"
    if ok and abs(res.report["flops_speedup"] / TARGET - 1) > 0.05:
        why = (why + "; " if why else "") + "target missed"
    return {"speedup": res.report["flops_speedup"], "ok": ok and (exact or ln), "why": why,
            "s": time.perf_counter() - t0}


def _tp_inputs(ex: ExampleInputs) -> Any:
    if ex.kwargs:
        return dict(ex.kwargs)
    return ex.args[0] if len(ex.args) == 1 else tuple(ex.args)


def _tp_prune(model: torch.nn.Module, ex: ExampleInputs, ratio: float, ignored: list[torch.nn.Module]) -> Any:
    import torch_pruning as tp

    m = copy.deepcopy(model)
    num_heads = {}  # as Torch-Pruning's Hugging Face examples: q / k / v projections -> heads of their module
    for mod in m.modules():
        h = getattr(mod, "num_attention_heads", getattr(mod, "num_heads", None))
        if isinstance(h, int) and not isinstance(mod, torch.nn.MultiheadAttention):
            for child in mod.children():
                if isinstance(child, torch.nn.Linear) and child.out_features % h == 0 and child.out_features > h:
                    num_heads[child] = h
    pruner = tp.pruner.MagnitudePruner(m, _tp_inputs(ex), importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=[dict(m.named_modules())[p]
                                                                            for p in ignored],
                                       num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
                                       head_pruning_ratio=ratio, output_transform=lambda out: flatten_outputs(out))
    pruner.step()
    for mod in m.modules():  # the head counts Torch-Pruning chose, written back as its examples do
        for child in mod.children():
            if child in num_heads and child in pruner.num_heads:
                for a in ("num_attention_heads", "num_heads"):
                    if isinstance(getattr(mod, a, None), int):
                        setattr(mod, a, pruner.num_heads[child])
    return m


def run_torch_pruning(name: str) -> dict[str, Any]:
    model, ex = suite.build(name)
    t0 = time.perf_counter()
    try:
        base = count_flops(model, ex)
        with torch.no_grad():
            ref = ex(model)
        try:
            outputs = analyze(model, ex, warn=False, costs=False).output_layers
        except PruningError:
            outputs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1:]
        best: tuple[float, float] | None = None
        lo, hi = 0.0, 0.95
        for _ in range(7):  # bisect the uniform ratio towards 2x
            mid = (lo + hi) / 2
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = _tp_prune(model, ex, mid, outputs)
            with torch.no_grad():
                out = ex(m)
            if _shapes(out) != _shapes(ref):
                return {"speedup": None, "why": "output shape changed", "s": time.perf_counter() - t0}
            sp = base / max(1, count_flops(m, ex))
            if best is None or abs(sp / TARGET - 1) < abs(best[1] / TARGET - 1):
                best = (mid, sp)
            if sp < TARGET:
                lo = mid
            else:
                hi = mid
        assert best is not None
        why = "" if abs(best[1] / TARGET - 1) <= 0.05 else f"closest 2x at ratio {best[0]:.2f}"
        return {"speedup": best[1], "why": why, "s": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - report whatever Torch-Pruning raises
        return {"speedup": None, "why": _short(f"{type(e).__name__}: {e}"), "s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="", help="comma-separated suite names (default: all)")
    ap.add_argument("--out", default="", help="also write the table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = [n for n in args.models.split(",") if n] or list(suite.SUITE)
    lines = ["| model | prunekit speedup | ok | prunekit refusal / note | TP speedup | TP error / note |",
             "|---|---|---|---|---|---|"]
    for name in names:
        pk, tpr = run_prunekit(name), run_torch_pruning(name)
        pks = f"{pk['speedup']:.2f}x" if pk["speedup"] else "refused"
        tps = f"{tpr['speedup']:.2f}x" if tpr["speedup"] else "failed"
        lines.append(f"| {name} | {pks} | {'yes' if pk['ok'] else 'no'} | {pk['why']} | {tps} | {tpr['why']} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
