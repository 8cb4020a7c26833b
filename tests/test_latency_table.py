"""Measured layer latencies (prunekit.surgery.latency) and the "measured" latency-aware allocation."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.errors import PruningError
from prunekit.methods.base import BudgetOptions
from prunekit.models import create_model, get_model_info
from prunekit.surgery.allocate import latency_mode
from prunekit.surgery.graph import analyze
from prunekit.surgery.latency import (
    LatencyTable,
    LayerSpec,
    _spec,
    _time_in_worker,
    default_cache_file,
    measured_channel_savings,
    model_layers,
    time_specs,
)


class _Branchy(nn.Module):
    """A strided conv, a depthwise conv, a residual sum and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = h + self.pw(self.dw(h))
        return self.fc(self.pool(h).flatten(1))


def test_specs_follow_the_layers_and_reduced_widths() -> None:
    model = _Branchy().eval()
    g = analyze(model, (3, 16, 16))
    layers = model_layers(model, g)
    assert layers["stem"].in_shape == (16, 16) and layers["dw"].in_shape == (8, 8) and layers["fc"].in_shape == ()
    stem = _spec(layers["stem"], 8, 3)
    assert (stem.kind, stem.in_features, stem.out_features) == ("conv2d", 3, 8)
    assert (stem.stride, stem.padding) == ((2, 2), (1, 1))
    assert stem.norm_act  # its output channels are batch-normalised
    dw = _spec(layers["dw"], 8, 1)  # depthwise: channels and groups shrink together
    assert (dw.in_features, dw.out_features, dw.groups) == (8, 8, 8)
    # the residual sum of the stem's group and pw: the second producer carries the addition
    key = g.group_of("stem").key
    assert set(g.groups[key].producers) == {"stem", "pw"}
    assert layers[g.groups[key].producers[1]].add and not layers[g.groups[key].producers[0]].add
    fc = _spec(layers["fc"], 10, 12)
    assert (fc.kind, fc.in_features, fc.out_features) == ("linear", 12, 10)


def test_time_specs_in_process_and_in_the_worker_agree_in_kind() -> None:
    specs = [
        LayerSpec("conv2d", 8, 8, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), 1, True, True),
        LayerSpec("conv2d", 8, 8, (8, 8), (3, 3), (1, 1), "same", (1, 1), 8),
        LayerSpec("linear", 16, 4, (5,)),
    ]
    here = time_specs(specs, batch=2, threads=1, repeats=3, warmup=1)
    there = _time_in_worker(specs, 2, 1, 3, 1, 0.5)
    assert there is not None, "the timing worker (python -m prunekit.surgery.latency) failed"
    assert len(here) == len(there) == 3 and all(t > 0 for t in here + there)


def test_table_caches_timings_per_machine(tmp_path, monkeypatch) -> None:
    path = tmp_path / "lat.json"
    spec = LayerSpec("conv2d", 4, 4, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1))
    t1 = LatencyTable(batch_size=2, threads=1, repeats=3, cache_file=path)
    ms = t1.ms(spec)
    assert ms > 0 and t1.measured == 1
    t1.save()
    data = json.loads(path.read_text())
    assert list(data["ms"].values()) == [ms]
    t2 = LatencyTable(batch_size=2, threads=1, repeats=3, cache_file=path)
    assert t2.ms(spec) == ms and t2.measured == 0  # read back, not timed again
    # another batch size is another entry
    assert LatencyTable(batch_size=3, threads=1, repeats=3, cache_file=path).ms(spec) > 0
    monkeypatch.setenv("PRUNEKIT_LATENCY_CACHE", "0")
    assert default_cache_file() is None
    monkeypatch.setenv("PRUNEKIT_LATENCY_CACHE", str(tmp_path / "d"))
    f = default_cache_file()
    assert f is not None and f.parent == tmp_path / "d" and f.suffix == ".json"
    # an unreadable cache is ignored with a warning, never an error
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable latency cache"):
        LatencyTable(cache_file=bad)


def test_measured_savings_see_where_the_time_goes() -> None:
    """Two groups of 32 channels: one on a 32x32 map, one on a 2x2 map. A channel of the first costs
    about 256 times more arithmetic and memory traffic; the measurement must see that."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Conv2d(32, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 1), nn.ReLU(),
        nn.Flatten(), nn.Linear(128, 10),
    ).eval()
    g = analyze(model, (3, 32, 32))
    big, small = g.group_of("0").key, g.group_of("5").key
    table = LatencyTable(batch_size=16, threads=1, repeats=5, cache_file=None)
    saved = measured_channel_savings(model, g, [big, small], [16, 16], g.widths(), table)
    assert len(saved) == 2 and all(s >= 0 for s in saved)
    assert saved[0] > 4 * saved[1], saved
    assert table.measured > 0


def test_measured_allocation_meets_target_and_reports() -> None:
    info = get_model_info("resnet20")
    torch.manual_seed(0)
    model = create_model("resnet20", **info.tiny_kwargs).eval()
    res = prunekit.prune(model, "l1", "flops=2", latency_aware="measured")
    assert abs(res.report["flops_speedup"] / 2 - 1) <= 0.05
    assert res.report["latency_aware"] == "measured"
    assert res.report["latency_table"]["cache"].startswith(os.environ["PRUNEKIT_LATENCY_CACHE"])
    x = torch.randn(2, *info.input_size)
    assert res.model(x).shape == (2, 10)
    # the same request again: timings come from the cache, the allocation is identical
    again = prunekit.prune(model, "l1", "flops=2", latency_aware="measured")
    assert again.report["latency_table"]["layers_timed"] == 0
    assert again.report["layers"] == res.report["layers"]
    off = prunekit.prune(model, "l1", "flops=2", budget=BudgetOptions(latency_aware=False))
    assert off.report["latency_aware"] == "off"


def test_latency_mode_values() -> None:
    assert [latency_mode(v) for v in (True, None, "proxy", False, "off", "measured")] == [
        "proxy", "proxy", "proxy", "off", "off", "measured"]
    assert [latency_mode(v) for v in ("measured@eager", "onnxruntime", "measured@onnxruntime", "ORT")] == [
        "measured", "onnxruntime", "onnxruntime", "onnxruntime"]
    model = create_model("lenet5")
    with pytest.raises(PruningError, match="latency_aware must be one of"):
        prunekit.prune(model, "l1", "flops=2", latency_aware="fastest")


def test_cli_latency_model_flag() -> None:
    from prunekit.cli import _register_extra_commands, build_parser

    _register_extra_commands()
    parser = build_parser()
    base = ["prune", "--checkpoint", "c.pt", "--method", "l1", "--out", "o"]
    from prunekit.cli_prune import _latency_model

    assert _latency_model(parser.parse_args(base)) == "proxy"
    assert _latency_model(parser.parse_args([*base, "--latency-model", "measured"])) == "measured"
    assert _latency_model(parser.parse_args([*base, "--latency-model", "onnxruntime"])) == "onnxruntime"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--latency-model", "fastest"])


def test_bench_passes_the_latency_model_to_the_engine(tmp_path) -> None:
    from prunekit.bench.config import load_experiment
    from prunekit.bench.runner import Runner, plan_cells
    from prunekit.errors import ConfigError

    doc = {
        "name": "lat", "model": "lenet5", "dataset": "synthetic", "methods": ["l1"],
        "base": {"train": {"epochs": 1}}, "targets": {"channel": ["flops=2"]},
        "prune": {"latency_aware": "measured"},
    }
    exp = load_experiment(doc)
    assert exp.prune.latency_aware == "measured"
    runner = Runner(exp, tmp_path, progress=False, log=lambda m: None)
    kw = runner._engine_kwargs(prunekit.prune, plan_cells(exp)[0], torch.device("cpu"))
    assert kw["latency_aware"] == "measured"
    # not set: the engine's default applies
    plain = Runner(load_experiment({**doc, "prune": {}}), tmp_path / "b", progress=False, log=lambda m: None)
    assert "latency_aware" not in plain._engine_kwargs(prunekit.prune, plan_cells(exp)[0], torch.device("cpu"))
    with pytest.raises(ConfigError, match="latency_aware"):
        load_experiment({**doc, "prune": {"latency_aware": "fastest"}})


@pytest.mark.parametrize("name", sorted(prunekit.list_models()))
def test_measured_allocation_on_every_zoo_model(name: str, recwarn) -> None:
    """Depthwise convs (MobileNets), flatten -> linear (VGG, LeNet), attention (ViT): every layer can be
    timed or falls back to the proxy, and the target is met."""
    info = get_model_info(name)
    torch.manual_seed(0)
    model = create_model(name, in_channels=info.input_size[0], **info.tiny_kwargs).eval()
    res = prunekit.prune(model, "l1", "flops=2", latency_aware="measured")
    assert abs(res.report["flops_speedup"] / 2 - 1) <= 0.05
    assert res.model(torch.randn(2, *info.input_size)).shape[0] == 2
    assert "latency_table" in res.report  # the measured path ran
    assert not [w for w in recwarn if "latency worker failed" in str(w.message)]


# --------------------------------------------------------------------------------------------- ONNX Runtime
def test_onnxruntime_table_times_the_deployed_layer_and_keeps_its_own_entries(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    path = tmp_path / "lat.json"
    conv = LayerSpec("conv2d", 8, 16, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), 1, True, True)  # conv + add + ReLU
    specs = [conv, LayerSpec("conv2d", 16, 16, (8, 8), (3, 3), (1, 1), "same", (1, 1), 16),
             LayerSpec("linear", 16, 4, (5,))]
    ort = LatencyTable(batch_size=2, threads=1, repeats=3, cache_file=path, runtime="onnxruntime")
    times = [ort.ms(s) for s in specs]
    assert all(t > 0 for t in times) and ort.measured == 3
    ort.save()
    eager = LatencyTable(batch_size=2, threads=1, repeats=3, cache_file=path)
    assert eager.ms(conv) > 0 and eager.measured == 1  # an eager timing is another entry, not the ORT one
    eager.save()
    keys = list(json.loads(path.read_text())["ms"])
    assert sum("onnxruntime" in k for k in keys) == 3 and len(keys) == 4
    again = LatencyTable(batch_size=2, threads=1, repeats=3, cache_file=path, runtime="onnxruntime")
    assert again.ms(conv) == times[0] and again.measured == 0
    there = _time_in_worker(specs, 2, 1, 3, 1, 0.5, runtime="onnxruntime")
    assert there is not None and len(there) == 3 and all(t > 0 for t in there)
    with pytest.raises(ValueError, match="runtime must be one of"):
        LatencyTable(runtime="tensorrt")


def test_onnxruntime_measured_allocation_meets_target_and_reports() -> None:
    pytest.importorskip("onnxruntime")
    info = get_model_info("resnet20")
    torch.manual_seed(0)
    model = create_model("resnet20", **info.tiny_kwargs).eval()
    res = prunekit.prune(model, "l1", "flops=2", latency_aware="measured@onnxruntime")
    assert abs(res.report["flops_speedup"] / 2 - 1) <= 0.05
    assert res.report["latency_aware"] == "onnxruntime"
    assert res.report["latency_table"]["runtime"] == "onnxruntime"
    assert res.model(torch.randn(2, *info.input_size)).shape == (2, 10)


def test_onnxruntime_missing_is_a_clear_error(monkeypatch) -> None:
    import builtins

    real = builtins.__import__

    def no_ort(name, *a, **k):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(PruningError, match=r"prunekit\[deploy\]"):
        LatencyTable(runtime="onnxruntime")
