"""``latency=X`` targets: parsing, the search over FLOPs targets (with a deterministic stand-in for the
timing, so the test does not depend on this machine's load), and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

import prunekit
from prunekit import api
from prunekit.budget import Target
from prunekit.errors import PruningError
from prunekit.models import create_model


def test_parse_latency_targets() -> None:
    t = Target.parse("latency=1.5")
    assert (t.kind, t.value, t.runtime) == ("latency", 1.5, None) and str(t) == "latency=1.5"
    t = Target.parse("latency@eager=2")
    assert (t.kind, t.value, t.runtime) == ("latency", 2.0, "eager") and str(t) == "latency@eager=2"
    assert Target.parse({"kind": "latency", "value": 3, "runtime": "onnxruntime"}).runtime == "onnxruntime"
    for bad, needle in (("latency@tpu=2", "unknown runtime 'tpu'"), ("flops@eager=2", "only latency targets"),
                        ("latency=0.8", "2x faster"), ("latency=1e999", "finite")):
        with pytest.raises(PruningError, match=needle):
            Target.parse(bad)


@pytest.mark.parametrize("exponent", [0.5, 0.8, 1.3])
def test_search_converges_on_a_monotone_response(exponent) -> None:
    goal = 2.0
    trials: list[dict[str, float]] = []
    r = goal
    for _ in range(api.LATENCY_TRIALS):
        s = r**exponent  # the measured speedup grows more slowly (or faster) than the FLOPs target
        trials.append({"flops_target": r, "flops_speedup": r, "latency_speedup": s})
        if abs(s / goal - 1) <= 0.05:
            break
        r = api._next_flops(trials, goal)
    assert abs(trials[-1]["latency_speedup"] / goal - 1) <= 0.05, trials


def test_search_steps_stay_bounded_under_noise() -> None:
    # an inverted pair (noise) must not send the search to an extreme target
    trials = [{"flops_target": 1.5, "flops_speedup": 1.5, "latency_speedup": 1.8},
              {"flops_target": 2.0, "flops_speedup": 2.0, "latency_speedup": 1.2}]
    r = api._next_flops(trials, 1.5)
    assert 1.5 <= r <= 2.0
    assert api._next_flops([{"flops_target": 1.5, "flops_speedup": 1.5, "latency_speedup": 0.3}], 2.0) == 3.0


def test_prune_meets_a_latency_target(monkeypatch) -> None:
    def fake(base, pruned, shape, runtime):  # deterministic: latency follows the real FLOPs ratio, sub-linearly
        from prunekit.metrics import count_flops

        return (count_flops(base, shape) / count_flops(pruned, shape)) ** 0.7

    monkeypatch.setattr(api, "_measured_speedup", fake)
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.5)
    res = prunekit.prune(model, "l1", "latency@eager=1.6", round_to=1)
    rep = res.report
    assert rep["target"] == "latency@eager=1.6" and abs(rep["achieved"] / 1.6 - 1) <= 0.05
    search = rep["latency_search"]
    assert search["runtime"] == "eager" and search["batch"] == api.LATENCY_BATCH
    assert len(search["trials"]) >= 2  # the first trial (flops=1.6) is too slow under the x**0.7 response
    assert math.isclose(rep["flops_speedup"] ** 0.7, rep["achieved"], rel_tol=0.02)
    assert res.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_latency_target_refusals() -> None:
    model = create_model("lenet5", width=0.5)
    with pytest.raises(PruningError, match="single weights"):
        prunekit.prune(model, "magnitude", "latency=2")
    with pytest.raises(PruningError, match="rounds=1"):
        prunekit.prune(model, "l1", "latency=2", rounds=2)
    with pytest.raises(PruningError, match="copy=True"):
        prunekit.prune(model, "l1", "latency=2", copy=False)
