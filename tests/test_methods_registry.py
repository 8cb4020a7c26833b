"""Tests generated from the method registry: every method x zoo models.

For each registered method (plus two throw-away methods defined here, so that the channel and
weight paths are exercised whatever the registry holds) and each tiny zoo model: pruning runs,
meets its target within 5 %, keeps the output shape, the pruned model trains one SGD step, and
``save`` -> ``load`` gives identical outputs.

The default run covers every method on one model per architecture family that matters for the
engine (MLP + flatten, residual, ViT) and the test methods on every zoo model; ``-m slow`` runs
every method on every zoo model.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.errors import PruningError
from prunekit.methods import ChannelScorer, WeightScorer, get_method_info, list_methods, register_method
from prunekit.methods.registry import _METHODS, unregister_method
from prunekit.models import create_model, get_model_info, list_models


class _ChannelL1(ChannelScorer):
    """Registry-test channel method: L1 norm of each channel's producer rows."""

    def score(self, model, ctx):
        return {g.key: ctx.producer_rows(model, g).abs().mean(1) for g in ctx.groups()}


class _WeightMagnitude(WeightScorer):
    """Registry-test weight method: |w|."""

    def score(self, model, ctx):
        return {p: w.detach().abs() for p, w in self.prunable_params(model, ctx).items()}


LOCAL = {
    "_registry_channel_l1": (_ChannelL1, "channel"),
    "_registry_weight_magnitude": (_WeightMagnitude, "weight"),
}
REGISTERED = [m for m in list_methods() if m not in LOCAL]
ALL_MODELS = list_models()
FAMILY_MODELS = ["lenet_300_100", "resnet20", "vit_tiny"]
CHANNEL_TARGETS = (2.0, 1.5, 1.25)  # the first one the tiny model (with its floors) can reach
TOLERANCE = 0.05


@pytest.fixture(autouse=True, scope="module")
def _local_methods_and_one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, (cls, gran) in LOCAL.items():
        if name not in _METHODS:
            register_method(name, granularity=gran, family="test")(cls)
    yield
    for name in LOCAL:
        unregister_method(name)
    torch.set_num_threads(old)


def _data(shape: tuple[int, ...], classes: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, *shape, generator=g), torch.arange(16) % classes) for _ in range(2)]


def _trajectory(model: nn.Module, shape: tuple[int, ...], where) -> Any:
    """A short recorded trajectory of ``model`` (4 SGD steps on random data) for the Koopman methods."""
    from prunekit.train import TrainConfig, Trainer, TrajectoryRecorder

    rec = TrajectoryRecorder(where / "trajectory")
    cfg = TrainConfig(epochs=1, lr=0.01, schedule="constant", seed=0)
    batches = [(torch.randn(8, *shape), torch.arange(8) % 10) for _ in range(4)]
    trainer = Trainer(model, cfg, batches, callbacks=[rec], progress=False, log_epochs=False)
    trainer.fit()
    model.eval()
    return rec.trajectory


def _prune(method: str, model: nn.Module, shape: tuple[int, ...], tmp_path=None) -> tuple[prunekit.PruneResult, str]:
    info = get_method_info(method)
    data = _data(shape) if info.needs_data else None
    kw = {"trajectory": _trajectory(model, shape, tmp_path)} if info.needs_trajectory else {}
    if info.granularity == "weight":
        return prunekit.prune(model, method, "params=4", data, **kw), "params=4"
    kind = "flops" if info.granularity == "channel" else "params"
    last: Exception | None = None
    for value in CHANNEL_TARGETS:
        target = f"{kind}={value}"
        try:
            return prunekit.prune(model, method, target, data, **kw), target
        except PruningError as e:
            if not re.search(r"cannot (be )?reach", str(e)):
                raise
            last = e
    pytest.skip(f"{method} cannot reach even {kind}={CHANNEL_TARGETS[-1]} on this tiny model: {last}")


# Known, open limitations (tracked in the issues): these pairs are run, and reported as
# xfail instead of failing when they miss. Everything else must pass.
KNOWN_LIMITATIONS = {
    ("tp_hessian", "lenet5"): "Torch-Pruning's own pruner steps over a 2x FLOPs target on LeNet-5's 6/16-channel convs",
    ("tp_lamp", "lenet5"): "Torch-Pruning's own pruner steps over a 2x FLOPs target on LeNet-5's 6/16-channel convs",
}


def check(method: str, name: str, tmp_path) -> None:
    reason = KNOWN_LIMITATIONS.get((method, name))
    if reason is None:
        _check(method, name, tmp_path)
        return
    try:
        _check(method, name, tmp_path)
    except (AssertionError, RuntimeError, PruningError) as e:
        pytest.xfail(f"{reason}: {str(e).splitlines()[0]}")


def _check(method: str, name: str, tmp_path) -> None:
    info = get_method_info(method)
    if not info.available():
        pytest.skip(f"needs the optional package {info.requires}")
    minfo = get_model_info(name)
    torch.manual_seed(0)
    model = create_model(name, in_channels=minfo.input_size[0], **minfo.tiny_kwargs)
    shape = minfo.input_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res, target = _prune(method, model, shape, tmp_path)
        except PruningError as e:
            if "BatchNorm" in str(e) and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
                pytest.skip(f"{method} scores BatchNorm parameters; {name} has none")
            raise
    rep = res.report
    value = float(target.split("=")[1])
    achieved = rep["flops_speedup"] if target.startswith("flops") else rep["compression"]
    assert abs(achieved / value - 1) <= TOLERANCE, f"{method} on {name}: {target} reached as {achieved:.3f}"
    pruned = res.model
    x = torch.randn(4, *shape)
    pruned.eval()
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (4, 10)
    prunekit.save(pruned, tmp_path / "m.pt")
    loaded = prunekit.load(tmp_path / "m.pt").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    pruned.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.01, momentum=0.9)
    loss = nn.functional.cross_entropy(pruned(x), torch.arange(4))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("method", list(LOCAL))
def test_test_methods_on_every_model(method: str, name: str, tmp_path) -> None:
    check(method, name, tmp_path)


@pytest.mark.parametrize("name", FAMILY_MODELS)
@pytest.mark.parametrize("method", REGISTERED)
def test_registered_methods(method: str, name: str, tmp_path) -> None:
    check(method, name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in ALL_MODELS if m not in FAMILY_MODELS])
@pytest.mark.parametrize("method", REGISTERED)
def test_registered_methods_on_every_model(method: str, name: str, tmp_path) -> None:
    check(method, name, tmp_path)
