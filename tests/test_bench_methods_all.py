"""`methods: all` (the quick preset, `make run`) goes through the runner's set-up: a regression test for
the trajectory look-up, which iterated the string "all" instead of the expanded method list."""

from __future__ import annotations

from prunekit.bench.config import load_experiment
from prunekit.bench.runner import Runner
from prunekit.methods import get_method_info, list_methods


def _doc(**over):
    doc = {"name": "all", "model": "lenet_300_100", "model_kwargs": {"width": 0.1}, "dataset": "synthetic",
           "dataset_kwargs": {"in_channels": 1, "image_size": 8, "n": 64}, "methods": "all",
           "base": {"train": {"epochs": 1, "lr": 0.05, "batch_size": 32}},
           "targets": {"weight": ["params=2"], "channel": ["flops=2"], "lowrank": ["flops=2"]}, "seeds": [0]}
    return {**doc, **over}


def test_methods_all_expands_for_the_trajectory_check(tmp_path) -> None:
    runner = Runner(load_experiment(_doc()), tmp_path / "b", progress=False, log=lambda m: None)
    wants = any(get_method_info(n).needs_trajectory for n in list_methods())
    assert wants  # the Koopman methods are registered
    assert runner._needs_trajectory() is True
    koopman = [n for n in list_methods() if get_method_info(n).needs_trajectory]
    runner = Runner(load_experiment(_doc(exclude_methods=koopman)), tmp_path / "c", progress=False,
                    log=lambda m: None)
    assert runner._needs_trajectory() is False
