"""`prunekit prune` prune-and-train (from a random init or a checkpoint), one-shot global filter fraction
(``prune_percent``) and the gradient-flow ``norm_fallback`` option. Tiny models on synthetic data (fast)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.errors import PruningError
from prunekit.methods import create_method
from prunekit.methods.base import PruneContext, Target
from prunekit.models import create_model
from prunekit.surgery.graph import analyze

COMMON = ["--dataset", "synthetic", "--batch-size", "64", "--quiet", "--device", "cpu", "--threads", "1"]


def _scored_filters(model: nn.Module, shape=(3, 32, 32)) -> int:
    """Channels of the prunable groups a gradient-flow method scores (stem's group excluded)."""
    graph = analyze(model, shape, warn=False)
    ctx = PruneContext(target=Target.parse("ratio=0.5"), input_shape=shape, graph=graph)
    return sum(len(s) for s in create_method("gf_l1").score(model, ctx).values())


def test_cli_prune_train_from_random_init(tmp_path, capsys) -> None:
    from prunekit.cli import main

    out = tmp_path / "pt"
    rc = main(["prune", "--model", "resnet20", "--model-kwargs", '{"width": 0.25}', "--method", "gf_loss",
               "--target", "ratio=0.5", "--rounds", "2", "--epochs-per-round", "0.25", "--final-epochs", "0.25",
               "--option", "imp_samples=64", "--no-latency", "--out", str(out), *COMMON])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    n0 = _scored_filters(create_model("resnet20", width=0.25))
    assert m["mode"] == "prune_train" and m["start"] == "random_init" and m["rounds"] == 2
    assert m["filters_original"] == n0 and m["filters_kept"] == round(n0 * 0.5)
    assert m["weight_decay"] == 1e-4 and m["lr"] == 0.1 and m["final_epochs"] == 0.25
    assert m["flops_speedup"] > 1.3 and m["compression"] > 1.3 and m["base_top1"] is None
    assert "top1" in m and m["score_seconds"] >= 0 and m["peak_memory_mb"] > 0
    model = prunekit.load(out / "model.pt").eval()
    assert _scored_filters(model) == round(n0 * 0.5)
    assert len(model.prunekit_meta["prune_train"]["rounds"]) == 2
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cli_prune_train_with_prune_percent_option(tmp_path, capsys) -> None:
    """The README form: the fraction given as --option prune_percent=P instead of --target."""
    from prunekit.cli import main

    out = tmp_path / "pt"
    rc = main(["prune", "--model", "lenet5", "--method", "gf_fisher", "--option", "prune_percent=0.5",
               "--option", "imp_samples=64", "--rounds", "2", "--epochs-per-round", "0.25", "--final-epochs", "0.25",
               "--no-latency", "--out", str(out), *COMMON])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "prune_train" and m["rounds"] == 2
    assert m["filters_kept"] == round(m["filters_original"] * 0.5)


def _save_base(tmp_path) -> None:
    """A quarter-width ResNet-20 (seed 0) saved as ``tmp_path / "base.pt"`` for the synthetic dataset."""
    torch.manual_seed(0)
    prunekit.save(create_model("resnet20", width=0.25), tmp_path / "base.pt", meta={"dataset": "synthetic"})


def test_cli_prune_train_from_checkpoint_grasp(tmp_path, capsys) -> None:
    from prunekit.cli import main

    _save_base(tmp_path)
    out = tmp_path / "ck"
    rc = main(["prune", "--checkpoint", str(tmp_path / "base.pt"), "--method", "gf_grasp", "--target", "ratio=0.3",
               "--rounds", "1", "--epochs-per-round", "0", "--final-epochs", "0.1", "--eval-rounds",
               "--option", "imp_samples=40", "--latency-repeats", "1", "--out", str(out), *COMMON])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["start"] == "checkpoint" and m["agreement"] is not None and m["base_top1"] is not None
    assert len(m["top1_after_rounds"]) == 1 and m["peak_memory_mb"] > 0
    assert "latency_speedup" in m or "latency_ms" in m


def test_cli_prune_errors(tmp_path, capsys) -> None:
    from prunekit.cli import main

    base = ["prune", "--method", "gf_l1", "--out", str(tmp_path / "x"), *COMMON]
    assert main([*base, "--target", "ratio=0.5"]) == 2  # one-shot without a checkpoint
    assert "--checkpoint" in capsys.readouterr().err
    assert main([*base]) == 2  # no target
    assert "--target is required" in capsys.readouterr().err
    assert main([*base, "--target", "flops=2", "--model", "lenet5", "--epochs-per-round", "1"]) == 2
    assert "ratio" in capsys.readouterr().err
    assert main([*base, "--target", "ratio=0.5", "--epochs-per-round", "1"]) == 2
    assert "--model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ one-shot global fraction
def _data(n: int = 2, bs: int = 16, classes: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, classes, (bs,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("method", ["gf_l1", "gf_loss"])
def test_one_shot_prune_percent_is_a_global_filter_fraction(method: str) -> None:
    from prunekit.prune_train import allocate_global_count

    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25).eval()
    data = _data()
    n0 = _scored_filters(model)
    graph = analyze(model, (3, 32, 32), warn=False)
    ctx = PruneContext(target=Target.parse("ratio=0.5"), input_shape=(3, 32, 32), data=data, graph=graph)
    scores = create_method(method, imp_samples=32).score(model, ctx)
    floors = {k: math.floor(0.05 * graph.groups[k].size) + 1 for k in scores}
    expect = allocate_global_count(scores, n0 - round(n0 * 0.4), floors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = prunekit.prune(model, method, "ratio=0.6", data, prune_percent=0.6, imp_samples=32, verify=False)
    assert _scored_filters(res.model) == round(n0 * 0.4)
    assert res.report["allocation"]["filters_kept"] == round(n0 * 0.4)
    widths = {k: g.size for k, g in analyze(res.model, (3, 32, 32), warn=False).groups.items()}
    for k, idx in expect.items():  # exactly the globally lowest raw scores went, not a uniform share per layer
        assert widths[k] == len(idx)
    sizes = [widths[k] / graph.groups[k].size for k in scores]
    assert max(sizes) - min(sizes) > 0.05  # the layers are pruned unevenly
    # a percentage works too, and without prune_percent ratio=F is the engine's uniform per-layer share
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pct = prunekit.prune(model, method, "ratio=0.6", data, prune_percent=60, imp_samples=32, verify=False)
        uni = prunekit.prune(model, method, "ratio=0.6", data, imp_samples=32, verify=False)
    assert _scored_filters(pct.model) == round(n0 * 0.4)
    uw = {k: g.size for k, g in analyze(uni.model, (3, 32, 32), warn=False).groups.items()}
    spread = [uw[k] / graph.groups[k].size for k in scores]
    assert max(spread) - min(spread) < max(sizes) - min(sizes)
    with pytest.raises(PruningError, match="prune_percent"):
        prunekit.prune(model, "gf_l1", "ratio=0.5", data, prune_percent=1.5 * 100)


def test_cli_one_shot_prune_percent_without_target(tmp_path, capsys) -> None:
    from prunekit.cli import main

    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25)
    prunekit.save(model, tmp_path / "base.pt", meta={"dataset": "synthetic"})
    out = tmp_path / "os"
    rc = main(["prune", "--checkpoint", str(tmp_path / "base.pt"), "--method", "gf_magnitude",
               "--option", "prune_percent=0.5", "--no-latency", "--prune-samples", "64", "--out", str(out),
               *COMMON])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["target"] == "ratio=0.5"
    n0 = _scored_filters(model)
    assert _scored_filters(prunekit.load(out / "model.pt")) == round(n0 * 0.5)


# ------------------------------------------------------------------------------------ norm_fallback
def test_norm_fallback_on_layers_without_batchnorm() -> None:
    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=3, image_size=32).eval()
    x, y = _data(1, 8)[0]
    graph = analyze(model, (3, 32, 32), warn=False)
    ctx = PruneContext(target=Target.parse("ratio=0.5"), input_shape=(3, 32, 32), data=[(x, y)], graph=graph)
    with pytest.raises(PruningError, match="norm_fallback"):
        create_method("gf_bn").score(model, ctx)
    bn = create_method("gf_bn", norm_fallback=True).score(model, ctx)
    l1 = create_method("gf_l1").score(model, ctx)
    assert set(bn) == set(l1) and all(torch.allclose(bn[k], l1[k]) for k in bn)
    nv = create_method("gf_nvidia", norm_fallback=True, imp_samples=8, temperature=5.0).score(model, ctx)
    model.zero_grad()
    nn.functional.cross_entropy(model(x) / 5.0, y).backward()
    w, b = model.conv2.weight, model.conv2.bias
    expect = (w.detach() ** 2 * w.grad**2).flatten(1).sum(1) + b.detach() ** 2 * b.grad**2
    torch.testing.assert_close(nv["conv2"], expect, rtol=1e-4, atol=1e-12)


def test_cli_cascade_pfp_rounds_with_retraining(tmp_path, capsys) -> None:
    """``prunekit prune --rounds N --finetune-epochs E``: the prune -> retrain cascade from the CLI (PFP)."""
    from prunekit.cli import main

    _save_base(tmp_path)
    out = tmp_path / "cascade"
    rc = main(["prune", "--checkpoint", str(tmp_path / "base.pt"), "--method", "pfp", "--target", "flops=2",
               "--rounds", "2", "--finetune-epochs", "0.25", "--option", "samples=16", "--no-latency",
               "--out", str(out), *COMMON])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["rounds"] == 2 and m["finetune_epochs_total"] == 0.5 and m["finetune_seconds"] > 0
    first, last = m["round_achieved"]
    assert abs(first / math.sqrt(2) - 1) <= 0.05 and abs(last / 2 - 1) <= 0.05
    assert abs(m["flops_speedup"] / 2 - 1) <= 0.05


def test_global_count_in_runtime_multiples_keeps_the_best_channels() -> None:
    """round_to="runtime" (or any explicit round_to): each group's count of the global count is rounded to its
    multiple, the best-scored channels kept, the total within half a multiple per group of the target."""
    from prunekit.surgery.allocate import allocate_filter_count, resolve_round_to, runtime_multiple

    assert [resolve_round_to(n, "runtime") for n in (8, 16, 32, 64)] == [runtime_multiple(n) for n in (8, 16, 32, 64)]
    with pytest.raises(PruningError, match="runtime"):
        resolve_round_to(16, "fast")
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(64, generator=g), "b": torch.rand(32, generator=g) * 0.5, "c": torch.rand(8, generator=g)}
    sizes = {k: len(v) for k, v in scores.items()}
    mult = {k: resolve_round_to(n, "runtime") for k, n in sizes.items()}
    keep, kept = allocate_filter_count(scores, sizes, 52, 0.05, mult)
    counts = {k: len(keep[k]) if k in keep else sizes[k] for k in scores}
    assert all(c % mult[k] == 0 or c == sizes[k] for k, c in counts.items())
    assert kept == sum(counts.values()) and abs(kept - 52) <= sum(m / 2 for m in mult.values())
    for k, idx in keep.items():  # the best-scored channels of each group
        best = torch.argsort(scores[k], descending=True)[:len(idx)].sort().values
        assert torch.equal(idx, best)
    exact, n = allocate_filter_count(scores, sizes, 52, 0.05)
    assert n == 52


def test_one_shot_prune_percent_with_round_to_runtime() -> None:
    from prunekit.surgery.allocate import runtime_multiple

    torch.manual_seed(0)
    model = create_model("resnet20", width=1.0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = prunekit.prune(model, "gf_l1", "ratio=0.5", input_shape=(3, 32, 32), prune_percent=0.4,
                             round_to="runtime", verify=False)
    alloc = res.report["allocation"]
    assert alloc["round_to"] == "runtime"
    graph = analyze(model, (3, 32, 32), warn=False)
    for k, g in analyze(res.model, (3, 32, 32), warn=False).groups.items():
        full = graph.groups[k].size if k in graph.groups else g.size
        m = runtime_multiple(full)
        assert g.size % m == 0 or g.size == full, (k, g.size, full)
    assert abs(alloc["filters_kept"] - alloc["filters_target"]) <= 8 * len(graph.groups)
