"""Deployment: export a (pruned) model to ONNX or TorchScript, and measure it where it runs.

Exporting first builds an inference copy of the model (:func:`deployable`; the model itself is
never changed):

* masks are baked into the weights (masked pruning becomes plain zeros);
* BatchNorm layers that directly follow a conv / linear layer are folded into it (found by
  ``torch.fx`` tracing; a model fx cannot trace is exported unfolded -- ONNX Runtime folds them
  itself, TorchScript freezing usually does too -- and the report says so);
* low-rank chains (:class:`~prunekit.surgery.lowrank.LowRankConv2d` / ``LowRankLinear``) are kept,
  or merged back into one dense layer where the chain is not faster (``merge_lowrank="auto"``: by the
  shared cost model's layer latency, :func:`~prunekit.surgery.cost.chain_latency` against
  :func:`~prunekit.surgery.cost.dense_latency` -- SIMD-block-aligned multiply-adds plus memory-bound
  work per activation element, the same model svd / pca / lrank choose their ranks with; a 16 -> 8 -> 16
  chain of a 3x3 conv on a 32x32 map is slower than the dense conv in ONNX Runtime).

The exported file has a dynamic batch dimension, and its outputs are checked against eager PyTorch
on a random batch (``max_abs_diff`` in the report; above ``atol`` is an error).

:func:`measure_runtimes` times several models in several runtimes ("eager", "torchscript",
"onnxruntime"), the models alternately in one process, and reports per-runtime medians; the
runtimes that are not installed are skipped with the reason recorded.

onnx / onnxruntime are optional (``pip install 'prunekit[deploy]'``) and imported lazily.
"""

from __future__ import annotations

import copy
import io
import os
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from prunekit.errors import PrunekitError
from prunekit.metrics._common import InputShape, example_input
from prunekit.surgery.cost import (
    LayerLatency,
    LayerShape,
    chain_latency,
    dense_latency,
    proxy_layer_latency,
    two_sided_chain_latency,
)
from prunekit.surgery.lowrank import LowRankConv2d, LowRankLinear
from prunekit.surgery.masks import remove_masks_

FORMATS = ("onnx", "torchscript")
RUNTIMES = ("eager", "torchscript", "onnxruntime")
LOWRANK_KEEP_RATIO = 1.0  # merge a chain back unless the cost model says it is faster than the dense layer
ONNX_OPSET = 17


class DeployError(PrunekitError, ValueError):
    """The model cannot be exported or measured as asked."""


# --------------------------------------------------------------------------------------------- inference copy
def _lowrank_shape(m: nn.Module) -> LayerShape:
    if isinstance(m, LowRankConv2d):
        kh, kw = m.kernel_size
        return LayerShape(m.in_channels, m.out_channels, kh * kw, m.stride[0] * m.stride[1])
    return LayerShape(m.in_features, m.out_features)


def _lowrank_ratio(m: nn.Module, latency: LayerLatency | None = None) -> float:
    """Latency of a low-rank chain over that of the dense layer it replaces, by the shared cost model's layer
    latency (default: the CPU proxy, :func:`~prunekit.surgery.cost.proxy_layer_latency`)."""
    lat = latency or proxy_layer_latency()
    shape = _lowrank_shape(m)
    if "pre" in m._modules and "post" in m._modules:  # pre -> core -> post: both projections
        chain = two_sided_chain_latency(shape, int(m.r_in), int(m.r_out), lat)
    elif "pre" in m._modules:
        chain = chain_latency(shape, int(m.r_in), lat, pre=True)
    else:
        chain = chain_latency(shape, int(m.r_out), lat)
    return chain / max(dense_latency(shape, lat), 1e-12)


def _merged(m: nn.Module) -> nn.Module:
    """One dense layer equivalent to the chain ``m``."""
    w = m.dense_weight().detach()
    last = m.post if "post" in m._modules else m.core
    bias = last.bias
    if isinstance(m, LowRankConv2d):
        layer: nn.Module = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                     m.dilation, bias=bias is not None, padding_mode=m.padding_mode)
    else:
        layer = nn.Linear(m.in_features, m.out_features, bias=bias is not None)
    layer = layer.to(w.device, w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(bias.detach())
    return layer


def _merge_lowrank_(model: nn.Module, policy: str) -> list[str]:
    merged = []
    for path, m in list(model.named_modules()):
        if not isinstance(m, (LowRankConv2d, LowRankLinear)):
            continue
        if policy == "always" or (policy == "auto" and _lowrank_ratio(m) >= LOWRANK_KEEP_RATIO):
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, name, _merged(m))
            merged.append(path)
    return merged


def _fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int, str | None]:
    """``model`` with every conv/linear -> BatchNorm pair folded (fx); (model, count, why-not)."""
    import torch.fx as fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 -- any tracing failure means "export unfolded"
        return model, 0, f"torch.fx cannot trace the model ({type(e).__name__}); exported without folding"
    mods = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods.get(node.target), (nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        prev = node.args[0] if node.args else None
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer, bn = mods[prev.target], mods[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        if isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            fused = fuse_conv_bn_eval(layer, bn)
        elif isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            fused = fuse_linear_bn_eval(layer, bn)
        else:
            continue
        parent_path, _, name = prev.target.rpartition(".")
        setattr(gm.get_submodule(parent_path) if parent_path else gm, name, fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, folded, None


def deployable(model: nn.Module, fold_bn: bool = True, merge_lowrank: str = "auto") -> tuple[nn.Module, dict]:
    """An inference copy of ``model`` (eval mode, masks baked, BN folded, low-rank chains decided).

    Returns ``(copy, info)``; ``info`` has ``bn_folded`` (count), ``lowrank_merged`` (paths) and
    ``notes`` (why something was not done).
    """
    if not isinstance(model, nn.Module):
        raise DeployError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if merge_lowrank not in ("auto", "always", "never"):
        raise DeployError(f"merge_lowrank must be 'auto', 'always' or 'never', got {merge_lowrank!r}")
    m = remove_masks_(copy.deepcopy(model)).eval()
    info: dict[str, Any] = {"bn_folded": 0, "lowrank_merged": _merge_lowrank_(m, merge_lowrank), "notes": []}
    m.eval()  # the merged layers too
    if fold_bn:
        m, info["bn_folded"], why = _fold_batchnorm(m)
        if why:
            info["notes"].append(why)
    return m.eval(), info


# --------------------------------------------------------------------------------------------- export
def _onnx_modules():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise DeployError(f"ONNX export and ONNX Runtime latency need onnx and onnxruntime ({e.name} is "
                          "missing): pip install 'prunekit[deploy]'") from None
    return onnxruntime


def _example(model: nn.Module, input_shape: InputShape, batch_size: int) -> torch.Tensor:
    x = example_input(model, input_shape, batch_size)
    if isinstance(input_shape, torch.Tensor):
        return x
    g = torch.Generator().manual_seed(0)
    return torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device) if x.is_floating_point() else x


def _to_onnx_bytes(model: nn.Module, x: torch.Tensor, opset: int) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    return buf.getvalue()


def _to_torchscript(model: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,), check_trace=False)
        return torch.jit.freeze(traced.eval())


def _ort_session(data: bytes | str, threads: int | None):
    ort = _onnx_modules()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def _first_output(y: Any) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, (tuple, list)) and y and isinstance(y[0], torch.Tensor):
        return y[0]
    if hasattr(y, "logits"):
        return y.logits
    raise DeployError(f"export supports models returning a tensor (or a tuple of them), got {type(y).__name__}")


def export(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: InputShape,
    format: str = "onnx",
    fold_bn: bool = True,
    merge_lowrank: str = "auto",
    check_batch: int = 2,
    atol: float = 1e-4,
    opset: int = ONNX_OPSET,
) -> dict[str, Any]:
    """Export ``model`` for deployment and check the file against eager PyTorch.

    Args:
        path: the file to write (parent folders are created; written atomically).
        input_shape: the shape of ONE example, e.g. ``(3, 32, 32)`` (or a ready-made input batch).
        format: ``"onnx"`` (dynamic batch dimension, opset ``opset``) or ``"torchscript"``
            (traced and frozen; load with ``torch.jit.load``).
        fold_bn, merge_lowrank: see :func:`deployable`.
        check_batch: batch size of the random batch the file's outputs are compared on.
        atol: largest allowed difference between the file and eager PyTorch, relative to the largest output
            when that exceeds 1 (float32 rounding grows with the outputs' scale).

    Returns a report: ``file``, ``format``, ``bytes``, ``max_abs_diff``, ``max_rel_diff`` (over
    ``max(1, largest output)``), ``bn_folded``,
    ``lowrank_merged``, ``notes``. Raises :class:`DeployError` if the outputs differ by more than
    ``atol`` (the file is not kept) or a dependency is missing.
    """
    if format not in FORMATS:
        raise DeployError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    dep, info = deployable(model, fold_bn=fold_bn, merge_lowrank=merge_lowrank)
    x = _example(dep, input_shape, check_batch)
    with torch.no_grad():
        ref = _first_output(copy.deepcopy(model).eval()(x.to(next(model.parameters()).device))).float().cpu()
    dep = dep.cpu()
    x = x.cpu()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        if format == "onnx":
            data = _to_onnx_bytes(dep, x, opset)
            got = torch.from_numpy(_ort_session(data, threads=1).run(None, {"input": x.numpy()})[0])
            tmp.write_bytes(data)
        else:
            ts = _to_torchscript(dep, x)
            with torch.no_grad():
                got = _first_output(ts(x)).float()
            torch.jit.save(ts, str(tmp))
    except DeployError:
        raise
    except Exception as e:  # noqa: BLE001 -- name the failing step, not a deep exporter traceback
        tmp.unlink(missing_ok=True)
        raise DeployError(f"{format} export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                          ) from e
    diff = float((got.float() - ref).abs().max()) if got.shape == ref.shape else float("inf")
    scale = max(1.0, float(ref.abs().max()))
    if not diff <= atol * scale:
        tmp.unlink(missing_ok=True)
        raise DeployError(f"the exported {format} model's outputs differ from eager PyTorch by {diff:.3g} "
                          f"(allowed {atol:g} x max(1, largest output {scale:.3g})); the file was not written")
    os.replace(tmp, out)
    return {"file": str(out), "format": format, "bytes": out.stat().st_size, "max_abs_diff": diff,
            "max_rel_diff": diff / scale, "output_scale": scale, "check_batch": check_batch, **info}


# --------------------------------------------------------------------------------------------- latency
def _runner(name: str, model: nn.Module, x1: torch.Tensor, threads: int | None):
    """A callable running ``model`` in runtime ``name`` on a batch like ``x`` (built once per batch size)."""
    if name == "eager":
        def run(x: torch.Tensor) -> None:
            with torch.inference_mode():
                model(x)
        return run
    dep, _ = deployable(model)
    dep = dep.cpu()
    if name == "torchscript":
        ts = _to_torchscript(dep, x1.cpu())

        def run_ts(x: torch.Tensor) -> None:
            with torch.inference_mode():
                ts(x)
        return run_ts
    sess = _ort_session(_to_onnx_bytes(dep, x1.cpu(), ONNX_OPSET), threads)

    def run_ort(x: torch.Tensor) -> None:
        sess.run(None, {"input": x.cpu().numpy()})
    return run_ort


def _available(runtime: str) -> str | None:
    if runtime == "onnxruntime":
        try:
            _onnx_modules()
        except DeployError as e:
            return str(e)
    return None


def _time(run: Any, x: torch.Tensor, warmup: int, repeats: int, budget_s: float) -> float:
    for _ in range(warmup):
        run(x)
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
        if sum(times) > budget_s:
            break
    return statistics.median(times) * 1000.0


def measure_runtimes(
    models: dict[str, nn.Module],
    input_shape: InputShape,
    runtimes: Sequence[str] = ("eager", "onnxruntime"),
    batch_sizes: Iterable[int] = (1, 64),
    threads: int | None = None,
    rounds: int = 3,
    warmup: int = 3,
    repeats: int = 10,
    time_budget_s: float = 3.0,
) -> dict[str, Any]:
    """Latency (ms, CPU) of several models in several runtimes, measured alternately.

    For every runtime and batch size, each round times every model once (``repeats`` runs, the
    median); the best round is kept, so a burst of load on a shared machine hits all models alike.

    Returns ``{"threads": n, "runtimes": {rt: {model: {"1": ms, "64": ms}}}, "skipped": {rt: why}}``.
    """
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        raise DeployError(f"unknown runtime(s) {bad}; choose from {', '.join(RUNTIMES)}")
    sizes = [int(b) for b in batch_sizes]
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "runtimes": {}, "skipped": {}}
    try:
        cpu = {k: remove_masks_(copy.deepcopy(m)).cpu().eval() for k, m in models.items()}
        for rt in runtimes:
            why = _available(rt)
            if why:
                out["skipped"][rt] = why
                continue
            res: dict[str, dict[str, float]] = {k: {} for k in cpu}
            try:
                runners = {k: _runner(rt, m, _example(m, input_shape, 1), threads) for k, m in cpu.items()}
            except Exception as e:  # noqa: BLE001 -- a model this runtime cannot take: skip the runtime
                out["skipped"][rt] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                continue
            for bs in sizes:
                xs = {k: _example(m, input_shape, bs) for k, m in cpu.items()}
                for _ in range(max(1, rounds)):
                    for k in cpu:
                        t = _time(runners[k], xs[k], warmup, repeats, time_budget_s)
                        res[k][str(bs)] = min(res[k].get(str(bs), float("inf")), t)
            out["runtimes"][rt] = res
    finally:
        torch.set_num_threads(old)
    return out


def speedups(latency: dict[str, Any], base: str = "base", pruned: str = "pruned") -> dict[str, Any]:
    """Speed-ups of ``pruned`` over ``base`` from :func:`measure_runtimes`' result.

    Per runtime and batch size, ``base_ms / pruned_ms``; the headline ``latency_speedup`` (batch 64,
    or the largest measured) compares the pruned model in its fastest runtime with the base model
    in *its* fastest runtime, and names both.
    """
    rts = latency.get("runtimes", {})
    per: dict[str, dict[str, float]] = {}
    for rt, res in rts.items():
        per[rt] = {bs: res[base][bs] / res[pruned][bs] for bs in res[base] if res[pruned].get(bs)}
    out: dict[str, Any] = {"per_runtime": per}
    if not rts:
        return out
    sizes = sorted({int(b) for res in rts.values() for b in res[base]})
    for bs, key in ((str(max(sizes)), "latency_speedup"), (str(min(sizes)), "latency_speedup_b1")):
        fb = min(rts, key=lambda r: rts[r][base].get(bs, float("inf")))
        fp = min(rts, key=lambda r: rts[r][pruned].get(bs, float("inf")))
        out[key] = rts[fb][base][bs] / rts[fp][pruned][bs]
        out[key + "_runtimes"] = {"base": fb, "pruned": fp, "batch": int(bs)}
    return out


__all__ = ["DeployError", "FORMATS", "RUNTIMES", "deployable", "export", "measure_runtimes", "speedups"]
