"""Export (ONNX / TorchScript) and latency per runtime (prunekit.deploy, `prunekit export`).

Every zoo model, pruned by one method of each granularity (channel, weight, low rank), exports to
both formats and the file's outputs match eager PyTorch within 1e-4 (relative to the largest output where
that exceeds 1: the tiny random deep ResNets' outputs reach ~1e4).
"""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.cli import main
from prunekit.deploy import DeployError, deployable, export, measure_runtimes, speedups
from prunekit.models import create_model, get_model_info, list_models
from prunekit.surgery.lowrank import LowRankConv2d
from prunekit.surgery.plan import LowRankFactors

ort = pytest.importorskip("onnxruntime")

GRANULARITY_METHODS = {"channel": ("l1", "flops=1.5"), "weight": ("magnitude", "params=4"),
                       "lowrank": ("svd", "params=1.5")}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tiny(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    info = get_model_info(name)
    torch.manual_seed(0)
    return create_model(name, in_channels=info.input_size[0], **info.tiny_kwargs), tuple(info.input_size)


def _trained_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so that folding is tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def _run_file(path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    if fmt == "onnx":
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    ts = torch.jit.load(str(path))
    with torch.no_grad():
        return ts(x)


@pytest.mark.parametrize("granularity", sorted(GRANULARITY_METHODS))
@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_pruned_exports_and_matches_eager(name, granularity, tmp_path):
    method, target = GRANULARITY_METHODS[granularity]
    model, shape = _tiny(name)
    _trained_bn(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pruned = prunekit.prune(model, method, target).model.eval()
        except prunekit.PruningError as e:
            pytest.skip(f"{method} cannot prune tiny {name}: {str(e).splitlines()[0]}")
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))  # not the export's batch size
    with torch.no_grad():
        ref = pruned(x)
    for fmt in ("onnx", "torchscript"):
        rep = export(pruned, tmp_path / f"m.{fmt}", shape, format=fmt)
        assert rep["max_rel_diff"] <= 1e-4
        got = _run_file(rep["file"], fmt, x)
        assert got.shape == ref.shape
        # tiny random deep nets have huge outputs (ResNet-110: ~1e4): compare relative to max(1, |output|)
        scale = max(1.0, ref.abs().max().item())
        assert (got - ref).abs().max().item() <= 1e-4 * scale, (name, method, fmt)


def test_batchnorm_is_folded_and_outputs_unchanged():
    model, shape = _tiny("resnet20")
    _trained_bn(model)
    dep, info = deployable(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert info["bn_folded"] == n_bn > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in dep.modules())
    x = torch.randn(4, *shape)
    with torch.no_grad():
        assert torch.allclose(dep(x), model(x), atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the model itself is untouched


def test_masks_are_baked_into_the_export(tmp_path):
    model, shape = _tiny("lenet5")
    masked = prunekit.prune(model, "magnitude", "params=4", mode="masked").model
    dep, _ = deployable(masked)
    from torch.nn.utils import parametrize

    assert not any(parametrize.is_parametrized(m) for m in dep.modules())
    zeros = sum(int((p == 0).sum()) for n, p in dep.named_parameters() if n.endswith("weight"))
    assert zeros > 0.5 * sum(p.numel() for p in dep.parameters())
    assert export(masked, tmp_path / "m.onnx", shape)["max_abs_diff"] <= 1e-4


def _chain(r: int, c: int = 16) -> tuple[nn.Module, nn.Module]:
    conv = nn.Conv2d(c, c, 3, padding=1)
    g = torch.Generator().manual_seed(0)
    f = LowRankFactors(core=torch.randn(r, r, 3, 3, generator=g), pre=torch.randn(r, c, generator=g) * (16 / c),
                       post=torch.randn(c, r, generator=g), bias=torch.randn(c, generator=g))
    return nn.Sequential(LowRankConv2d.from_factors(conv, f), nn.ReLU()), conv


# by the shared cost model (block-aligned MACs + memory per element): a 64 -> 8 -> 8 -> 64 chain of a 3x3 conv is
# faster than the dense conv; any chain of a 16-channel conv is not (a partial block costs a whole one: measured in
# ONNX Runtime on ResNet-20, a 16 -> 8 -> 16 chain of a 3x3 conv on 32x32 took 2.6 ms against 1.6 ms dense)
@pytest.mark.parametrize("rank,channels,merged_auto", [(8, 64, False), (2, 16, True), (14, 16, True)])
def test_lowrank_chains_kept_where_cheaper_merged_elsewhere(rank, channels, merged_auto):
    model, _ = _chain(rank, channels)
    x = torch.randn(2, channels, 8, 8)
    with torch.no_grad():
        ref = model(x)
    for policy, expect in (("auto", merged_auto), ("always", True), ("never", False)):
        dep, info = deployable(model, merge_lowrank=policy)
        assert bool(info["lowrank_merged"]) == expect, policy
        assert isinstance(dep.get_submodule("0"), LowRankConv2d) != expect or not isinstance(dep, nn.Sequential)
        with torch.no_grad():
            assert torch.allclose(dep(x), ref, atol=1e-4)


def test_export_errors_are_clear(tmp_path, monkeypatch):
    model, shape = _tiny("lenet5")
    with pytest.raises(DeployError, match="unknown export format"):
        export(model, tmp_path / "m.x", shape, format="tflite")
    with pytest.raises(DeployError, match="merge_lowrank"):
        export(model, tmp_path / "m.onnx", shape, merge_lowrank="sometimes")
    # a tolerance nothing meets: an error, and no file left behind
    with pytest.raises(DeployError, match="differ from eager"):
        export(model, tmp_path / "strict.onnx", shape, atol=-1.0)
    assert not (tmp_path / "strict.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails: as if not installed
    with pytest.raises(DeployError, match=r"prunekit\[deploy\]"):
        export(model, tmp_path / "m.onnx", shape)
    lat = measure_runtimes({"m": model}, shape, runtimes=("eager", "onnxruntime"), batch_sizes=(1,), rounds=1,
                           repeats=1, warmup=0)
    assert "onnxruntime" in lat["skipped"] and "eager" in lat["runtimes"]


def test_measure_runtimes_and_headline_speedup():
    big, shape = _tiny("vgg11")
    small = prunekit.prune(big, "l1", "flops=2").model
    lat = measure_runtimes({"base": big, "pruned": small}, shape, runtimes=("eager", "onnxruntime", "torchscript"),
                           batch_sizes=(1, 8), rounds=2, repeats=3, warmup=1)
    assert set(lat["runtimes"]) == {"eager", "onnxruntime", "torchscript"} and not lat["skipped"]
    for res in lat["runtimes"].values():
        for who in ("base", "pruned"):
            assert set(res[who]) == {"1", "8"} and all(v > 0 for v in res[who].values())
    sp = speedups(lat)
    rts = lat["runtimes"]
    fb = min(rts, key=lambda r: rts[r]["base"]["8"])
    fp = min(rts, key=lambda r: rts[r]["pruned"]["8"])
    assert sp["latency_speedup"] == pytest.approx(rts[fb]["base"]["8"] / rts[fp]["pruned"]["8"])
    assert sp["latency_speedup_runtimes"] == {"base": fb, "pruned": fp, "batch": 8}
    for rt in rts:
        assert sp["per_runtime"][rt]["1"] == pytest.approx(rts[rt]["base"]["1"] / rts[rt]["pruned"]["1"])
    with pytest.raises(DeployError, match="unknown runtime"):
        measure_runtimes({"base": big}, shape, runtimes=("tensorrt",))


def test_cli_export_and_prune_report_runtimes(tmp_path, capsys):
    model, _ = _tiny("lenet5")
    ckpt = tmp_path / "model.pt"
    prunekit.save(model, ckpt, meta={"dataset": "fashion-mnist"})
    assert main(["export", str(ckpt), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["file"].endswith(".onnx") and rep["input_shape"] == [1, 28, 28] and rep["max_abs_diff"] <= 1e-4
    assert main(["export", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.ts")]) == 0
    assert "outputs match eager" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["export", str(ckpt), "--input-shape", "3,x"])
    assert e.value.code == 2
    assert "not a shape" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(ckpt), "--runtimes", "eager,tensorrt"])
    assert "unknown runtime" in capsys.readouterr().err


def test_cli_prune_latency_in_both_runtimes(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--dataset", "synthetic", "--quiet"]
    assert main(["train", "--model", "lenet5", "--epochs", "0.05", "--out", str(run), "--no-latency", *common]) == 0
    out = tmp_path / "p"
    rc = main(["prune", "--checkpoint", str(run / "model.pt"), "--method", "l1", "--target", "flops=2",
               "--out", str(out), "--latency-repeats", "1", "--prune-samples", "64", *common])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["latency"]["runtimes"]) == {"eager", "onnxruntime"}
    assert m["latency_speedup_runtimes"]["batch"] == 64
    assert m["latency_speedup"] > 0 and m["latency_speedup_onnxruntime"] > 0 and m["latency_speedup_eager"] > 0
    assert m["latency_ms"]["64"] == m["latency"]["runtimes"]["eager"]["pruned"]["64"]
    printed = capsys.readouterr().out
    assert "onnxruntime:" in printed and "latency_speedup: pruned in" in printed
    # eval times the deployed runtime too
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--json", *common]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert set(ev["latency_by_runtime"]["onnxruntime"]) == {"1", "64"}
