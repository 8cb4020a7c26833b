"""Targets are relative to the model as given, its zeros counted as removed: pruning a pruned model
prunes further (issue #18: re-pruning a sparse or masked model used to do nothing and report success)."""

from __future__ import annotations

import json

import pytest
import torch

import prunekit
from prunekit.errors import PruningError
from prunekit.metrics import count_params
from prunekit.models import create_model


def _lenet():
    torch.manual_seed(0)
    return create_model("lenet5")


def test_a_sparse_model_pruned_again_loses_half_its_nonzeros() -> None:
    first = prunekit.prune(_lenet(), "magnitude", "params=4")
    nz = count_params(first.model)["nonzero_params"]
    second = prunekit.prune(first.model, "magnitude", "params=2")
    assert abs(count_params(second.model)["nonzero_params"] / nz - 0.5) < 0.01
    assert abs(second.report["compression"] / 2 - 1) < 0.01 and abs(second.report["achieved"] / 2 - 1) < 0.01


def test_a_masked_channel_model_pruned_again_loses_half_its_flops() -> None:
    first = prunekit.prune(_lenet(), "l1", "flops=2", mode="masked", round_to=1)
    physical = prunekit.prune(_lenet(), "l1", "flops=2", round_to=1)  # the same plan, channels removed
    second = prunekit.prune(first.model, "l1", "flops=2", round_to=1)
    # half the cost of the masked model as it really runs (its masked channels removed), not a no-op
    assert abs(second.report["flops"] / physical.report["flops"] - 0.5) < 0.05
    assert abs(second.report["flops_speedup"] / 2 - 1) < 0.05


def test_a_missed_channel_target_on_a_masked_model_is_a_warning() -> None:
    torch.manual_seed(0)
    tiny = create_model("lenet5", width=0.5)  # 3 / 8 channels: the floors stop the second prune early
    first = prunekit.prune(tiny, "l1", "flops=2", mode="masked", round_to=1)
    with pytest.warns(UserWarning, match="flops=2 reached as"):
        prunekit.prune(first.model, "l1", "flops=2", round_to=1)


def test_the_cli_prunes_a_sparse_checkpoint_further(tmp_path, capsys) -> None:
    from prunekit.cli import main

    torch.manual_seed(0)
    sparse = prunekit.prune(create_model("lenet5", in_channels=3, image_size=32), "magnitude", "params=4").model
    ckpt = tmp_path / "sparse.pt"
    prunekit.save(sparse, ckpt, meta={"dataset": "synthetic"})
    out = tmp_path / "again"
    rc = main(["prune", "--checkpoint", str(ckpt), "--method", "magnitude", "--target", "params=2", "--out",
               str(out), "--no-latency", "--quiet", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert abs(m["compression"] / 2 - 1) < 0.01
    assert abs(m["nonzero_params"] / count_params(sparse)["nonzero_params"] - 0.5) < 0.01


def test_a_prune_that_removes_nothing_is_an_error() -> None:
    model = _lenet()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # every weight already zero: nothing left to remove
    with pytest.raises(PruningError, match="removed nothing|cannot be reached|no non-zero"):
        prunekit.prune(model, "magnitude", "params=2")
