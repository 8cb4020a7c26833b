"""Latency-aware shapes (issue #17, part 3): rank and width choices from the shared cost model.

Deterministic: the cost model is the analytic proxy at a fixed block size, or a stand-in layer latency
table; nothing here is timed.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import prunekit
from prunekit.methods.lowrank import _bisect_threshold, _c_step, _Layer
from prunekit.models import create_model
from prunekit.surgery.allocate import runtime_breakpoint, runtime_multiple, runtime_step
from prunekit.surgery.cost import (
    LayerShape,
    aligned_rank,
    chain_latency,
    cpu_block,
    dense_latency,
    proxy_layer_latency,
)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _table(slow: set[tuple[int, int, int]]):
    """A stand-in layer latency table: multiply-adds, except the listed (cin, cout, taps) layers cost 100x."""

    def cost(cin: int, cout: int, taps: int, positions: float) -> float:
        return positions * cin * cout * taps * (100.0 if (cin, cout, taps) in slow else 1.0)

    return cost


def test_rank_rounds_up_to_the_multiple_and_chains_only_where_faster():
    lat = proxy_layer_latency(block=16)
    wide = LayerShape(64, 64, 9)
    assert aligned_rank(wide, 5, lat, 8, max_rank=57) == 8
    assert aligned_rank(wide, 9, lat, 8, max_rank=57) == 16
    assert aligned_rank(wide, 50, lat, 8, max_rank=52) == 48  # the largest multiple within the cap
    assert aligned_rank(wide, 5, lat, 8, max_rank=7) is None  # no multiple within the cap
    # a 16-channel 3x3 conv: the chain's core still computes a whole block of outputs, plus a 1x1 post
    narrow = LayerShape(16, 16, 9)
    assert chain_latency(narrow, 8, lat) > dense_latency(narrow, lat)
    assert aligned_rank(narrow, 3, lat, 8, max_rank=16) is None


def test_a_stand_in_table_decides_where_to_factorise():
    # the table says a 32 -> 16 3x3 core (layer "a") is very slow: "a" is not factorised at rank 16, "b" is
    lat = _table({(32, 16, 9)})
    a = _Layer("a", out=64, cols=32 * 9, uses=1.0, has_bias=True, nonzero=64 * 32 * 9,
               shape=LayerShape(32, 64, 9), latency=lat, multiple=8)
    b = _Layer("b", out=64, cols=64 * 9, uses=1.0, has_bias=True, nonzero=64 * 64 * 9,
               shape=LayerShape(64, 64, 9), latency=lat, multiple=8)
    assert a.aligned(13) is None and b.aligned(13) == 16 and a.aligned(5) == 8
    assert 16 not in a.rank_options() and all(r % 8 == 0 for r in a.rank_options() + b.rank_options())
    a.spectrum = torch.linspace(1.0, 0.01, 32, dtype=torch.float64)
    b.spectrum = torch.linspace(1.0, 0.01, 64, dtype=torch.float64)
    base = float(a.dense + b.dense)
    _, ranks = _bisect_threshold([a, b], "flops", base, base * 0.8, "svd")
    assert all(r is None or r % 8 == 0 for r in ranks.values())
    assert ranks["a"] != 16 and _Layer.cost(a, ranks["a"], "flops") + b.cost(ranks["b"], "flops") <= base * 0.8
    sig = {"a": a.spectrum.sqrt(), "b": b.spectrum.sqrt()}
    c = _c_step([a, b], sig, mu=1.0, lam=1e-3, kind="flops")  # lrank's C step picks among the same ranks
    assert c["a"] in a.rank_options() + [32] and c["b"] in b.rank_options() + [64]


def test_unreachable_with_fast_chains_falls_back_to_plain_ranks():
    # every chain is slower than its layer, so the latency model allows none; the target needs some
    lat = _table({(64, r, 9) for r in range(1, 64)})
    layer = _Layer("a", out=64, cols=64 * 9, uses=1.0, has_bias=False, nonzero=64 * 64 * 9,
                   shape=LayerShape(64, 64, 9), latency=lat, multiple=8,
                   spectrum=torch.linspace(1.0, 0.01, 64, dtype=torch.float64))
    base = 64.0 * 64 * 9
    with pytest.warns(Warning, match="latency model"):
        _, ranks = _bisect_threshold([layer], "flops", base, base / 2, "svd")
    assert ranks["a"] is not None and layer.cost(ranks["a"], "flops") <= base / 2


def test_runtime_steps_and_breakpoints():
    assert runtime_step(16) == 4 and runtime_step(8) == 2
    assert [runtime_breakpoint(n, 16) for n in (64, 60, 33, 32, 17, 16, 12, 8)] == [48, 48, 32, 16, 16, 8, 8, 4]
    # id_iter's multiples: exact below one block, a quarter block up to four blocks, whole blocks from there
    assert [runtime_multiple(n, 16) for n in (8, 15, 16, 32, 63, 64, 128)] == [1, 1, 4, 4, 4, 16, 16]
    assert [runtime_multiple(n, 8) for n in (7, 8, 31, 32)] == [1, 2, 2, 8]


def test_svd_ranks_are_multiples_and_narrow_layers_stay_dense():
    torch.manual_seed(0)
    model = create_model("resnet20")
    out = prunekit.prune(model, "svd", "flops=1.5", input_shape=(3, 32, 32), aligned_ranks=True, side="output")
    mult = out.plan.meta["rank_multiple"]
    assert mult >= 4 and out.plan.meta["input_side"] == []
    for path, (r, _) in out.plan.meta["ranks"].items():
        assert r % mult == 0, path
        assert not path.startswith("layer1.")  # 16-channel convs: no output-side chain is faster than the conv
    res = prunekit.prune(model, "svd", "flops=1.5", input_shape=(3, 32, 32), aligned_ranks=True)
    layer1 = [p for p in res.plan.meta["ranks"] if p.startswith("layer1.")]
    # side="auto": a rank below one block is cheap as the core's input, so stage 1 is factored on the input side
    assert layer1 and set(layer1) <= set(res.plan.meta["input_side"])
    assert all(r % mult == 0 for r, _ in res.plan.meta["ranks"].values())
    for kw in ({"aligned_ranks": True, "latency_aware": "off"}, {}):  # off, and the default: exact ranks
        off = prunekit.prune(model, "svd", "flops=1.5", input_shape=(3, 32, 32), **kw)
        assert any(p.startswith("layer1.") for p in off.plan.meta["ranks"])


def test_id_iter_widths_are_runtime_multiples_when_latency_aware():
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.5).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 3, 32, 32, generator=g), torch.arange(32) % 10) for _ in range(2)]
    res = prunekit.prune(model, "id_iter", "flops=1.5", data=data, samples=64, calibrate=0)
    block = cpu_block()
    full = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    convs = {n: m.out_channels for n, m in res.model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    wide = {n: c for n, c in convs.items() if full[n] >= block}  # groups below one block keep exact widths
    assert wide and all(c % runtime_multiple(full[n]) == 0 for n, c in wide.items()), convs
    assert any(c < full[n] for n, c in wide.items())


def test_id_iter_flops_fallback_weighs_steps_that_save_no_time():
    """A step the latency proxy sees saving time is scored by that time; one it does not (a width the runtime pads
    back) by its FLOPs times ``flops_fallback``; without a latency-aware search, by its FLOPs."""
    from types import SimpleNamespace

    from prunekit.errors import PruningError
    from prunekit.methods.interpolative import _IDState

    def state(fallback: float, aware: bool = True) -> SimpleNamespace:
        lat = {16: 10.0, 12: 10.0, 8: 6.0}  # 16 -> 12 is padded back: no time saved
        return SimpleNamespace(latency_aware=aware, method=SimpleNamespace(flops_fallback=fallback),
                               latency=lambda w: lat[w["a"]], cost=lambda kind, w: float(w["a"] * 100))

    for fallback in (1.0, 0.25, 0.0):
        st = state(fallback)
        assert _IDState.saved(st, "flops", {"a": 16}, "a", 8) == 4.0  # time saved
        assert _IDState.saved(st, "flops", {"a": 16}, "a", 12) == fallback * 400.0  # FLOPs only, weighted
    assert _IDState.saved(state(0.25, aware=False), "flops", {"a": 16}, "a", 12) == 400.0
    with pytest.raises(PruningError, match="flops_fallback"):
        prunekit.prune(create_model("resnet20", width=0.25), "id_iter", "flops=1.5", input_shape=(3, 32, 32),
                       data=[(torch.randn(8, 3, 32, 32), torch.arange(8) % 10)], flops_fallback=1.5)
