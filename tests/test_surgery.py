"""The pruning engine: coupled channel groups, masked vs physical application, low rank, save/load."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.errors import PruningError
from prunekit.metrics import count_flops, count_params
from prunekit.models import create_model, get_model_info, list_models
from prunekit.surgery import (
    LowRankConv2d,
    LowRankFactors,
    LowRankLinear,
    Plan,
    PruningWarning,
    analyze,
    apply_plan,
    apply_plan_,
    get_masks,
)

ALL_MODELS = list_models()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest (and least disturbed by other jobs) on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    info = get_model_info(name)
    torch.manual_seed(seed)
    model = create_model(name, in_channels=info.input_size[0], **info.tiny_kwargs)
    with torch.no_grad():  # non-trivial norm statistics / affine parameters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
            elif isinstance(m, nn.LayerNorm):
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    return model.eval(), info.input_size


def random_keep(graph, seed: int = 0, frac: float = 0.5, skip_ln: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for key, g in graph.groups.items():
        if not g.prunable or (skip_ln and g.ln_coupled):
            continue
        k = max(1, int(g.size * frac))
        keep[key] = torch.randperm(g.size, generator=gen)[:k].sort().values
    return keep


# --------------------------------------------------------------------------------------------- groups
def test_resnet_groups_follow_the_residual_streams() -> None:
    model, shape = tiny("resnet20")
    g = analyze(model, shape)
    stream1 = g.groups["conv1"]
    assert stream1.producers == ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    assert set(stream1.consumers) == {
        "layer1.0.conv1",
        "layer1.1.conv1",
        "layer1.2.conv1",
        "layer2.0.conv1",
        "layer2.0.shortcut.0",
    }
    assert "bn1" in stream1.norms and len(stream1.norms) == 4
    assert g.groups["layer2.0.conv2"].producers[:2] == ["layer2.0.conv2", "layer2.0.shortcut.0"]
    assert "fc" in g.groups["layer3.0.conv2"].consumers
    inner = g.groups["layer1.0.conv1"]
    assert inner.producers == ["layer1.0.conv1"] and inner.consumers == ["layer1.0.conv2"]
    assert not g.groups["fc"].prunable and "fc" in g.skipped  # the classifier
    assert g.group_of("layer1.1.conv2") is stream1


def test_flatten_linear_expansion_and_depthwise() -> None:
    model, shape = tiny("lenet5")
    g = analyze(model, shape)
    assert g.groups["conv2"].expansion["fc1"] == 25  # 5x5 map flattened into fc1
    model, shape = tiny("mobilenet_v2")
    g = analyze(model, shape)
    grp = g.groups["layers.1.conv1"]  # expand conv -> BN -> depthwise -> BN -> projection
    assert grp.depthwise == ["layers.1.conv2"] and grp.consumers == ["layers.1.conv3"]
    assert grp.norms == ["layers.1.bn1", "layers.1.bn2"]


def test_vit_groups() -> None:
    model, shape = tiny("vit_tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruningWarning)  # attention internals are skipped silently
        g = analyze(model, shape)
    stream = g.groups["patch_embed"]
    assert set(stream.params) == {"cls_token", "pos_embed"} and stream.ln_coupled
    assert g.groups["blocks.0.mlp.fc1"].consumers == ["blocks.0.mlp.fc2"]
    assert "blocks.0.attn.qkv" in g.skipped and "blocks.0.attn" not in g.groups
    g = analyze(model, shape, heads=True)
    heads = g.groups["blocks.1.attn"]
    assert heads.kind == "heads" and heads.size == 2 and heads.expansion["blocks.1.attn.proj"] == 16


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_zoo_model_has_prunable_groups(name: str) -> None:
    model, shape = tiny(name)
    g = analyze(model, shape)
    assert g.prunable_groups()
    assert g.output_layers  # the classifier was found
    full = g.predict()
    assert full["flops"] == count_flops(model, shape) and full["params"] == count_params(model)["params"]


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        y = nn.functional.adaptive_avg_pool2d(torch.relu(self.c(y)), 4)
        return self.fc(y.flatten(1))


def test_concat_groups_masked_equals_physical() -> None:
    torch.manual_seed(0)
    model = Concat().eval()
    g = analyze(model, (3, 8, 8))
    assert g.groups["a"].consumers == ["c"] and g.groups["b"].consumers == ["c"]
    assert g.groups["c"].expansion["fc"] == 16
    keep = {"a": torch.tensor([0, 2, 5]), "b": torch.tensor([1, 3]), "c": torch.tensor([0, 1, 4, 7])}
    x = torch.randn(3, 3, 8, 8)
    phys = apply_plan(model, Plan(channels=keep), g, "physical")
    masked = apply_plan(model, Plan(channels=keep), g, "masked")
    assert phys.c.in_channels == 5 and phys.bn.num_features == 5 and phys.fc.in_features == 64
    assert torch.allclose(phys(x), masked(x), atol=1e-5)
    assert g.predict(keep)["flops"] == count_flops(phys, (3, 8, 8))


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.g = nn.ConvTranspose2d(8, 8, 3, padding=1, groups=2)  # grouped transposed: still unsupported
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.g(torch.relu(self.a(x))).mean((2, 3)))


def test_unsupported_layer_is_skipped_with_a_warning_naming_it() -> None:
    with pytest.warns(PruningWarning, match="grouped convolution 'g'"):
        g = analyze(Grouped(), (3, 8, 8))
    assert not g.groups["a"].prunable and "a" in g.skipped
    assert not g.groups["g"].prunable
    with pytest.raises(PruningError, match="cannot be pruned"):
        apply_plan(Grouped(), Plan(channels={"a": torch.tensor([0, 1])}), g)


# ----------------------------------------------------------------------------------------- masked == physical
@pytest.mark.parametrize("name", ALL_MODELS)
def test_masked_equals_physical(name: str) -> None:
    model, shape = tiny(name)
    g = analyze(model, shape, heads=True)
    keep = random_keep(g, seed=1)
    assert keep
    plan = Plan(channels=keep)
    x = torch.randn(3, *shape)
    phys = apply_plan(model, plan, g, "physical").eval()
    masked = apply_plan(model, plan, g, "masked").eval()
    with torch.no_grad():
        diff = (phys(x) - masked(x)).abs().max().item()
    assert diff < 1e-5
    assert g.predict(keep)["flops"] == count_flops(phys, shape)
    assert g.predict(keep)["params"] == count_params(phys)["params"]
    assert count_params(masked)["params"] == count_params(model)["params"]  # masked keeps every shape


def test_layernorm_coupled_group_prunes_physically() -> None:
    model, shape = tiny("vit_tiny")
    g = analyze(model, shape)
    keep = {"patch_embed": torch.arange(0, 32, 2)}
    phys = apply_plan(model, Plan(channels=keep), g)
    assert phys.cls_token.shape[-1] == 16 and phys.blocks[0].norm1.normalized_shape == (16,)
    assert phys(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_save_load_after_physical_pruning(name: str, tmp_path) -> None:
    model, shape = tiny(name)
    g = analyze(model, shape, heads=True)
    keep = random_keep(g, seed=2, frac=0.6, skip_ln=False)
    pruned = apply_plan(model, Plan(channels=keep), g)
    prunekit.save(pruned, tmp_path / "m.pt")
    loaded = prunekit.load(tmp_path / "m.pt").eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(pruned.eval()(x), loaded(x))
    if name == "vit_tiny":
        assert loaded.blocks[0].attn.num_heads == 1
    if name == "mobilenet_v2":
        dw = loaded.layers[1].conv2
        assert dw.groups == dw.in_channels == dw.out_channels < 24


def test_masked_then_physical_keeps_the_function() -> None:
    model, shape = tiny("resnet20")
    g = analyze(model, shape)
    keep = random_keep(g, seed=3)
    masked = apply_plan(model, Plan(channels=keep), g, "masked")
    weight_mask = {"layer3.0.conv1.weight": torch.rand(16, 8, 3, 3) > 0.5}
    apply_plan_(masked, Plan(masks=weight_mask), mode="masked")
    x = torch.randn(2, *shape)
    ref = masked(x)
    phys = apply_plan(masked, Plan(channels=keep), None, "physical", shape)
    assert torch.allclose(ref, phys(x), atol=1e-5)
    assert "layer3.0.conv1.weight" in get_masks(phys)  # the weight mask survives, sliced


# --------------------------------------------------------------------------------------------- plan pieces
def test_plan_weight_replacement_physical_and_masked() -> None:
    model, shape = tiny("lenet5")
    g = analyze(model, shape)
    keep = {"conv2": torch.tensor([0, 3, 5, 6])}
    new_fc1 = torch.randn(60, 4 * 25)
    new_bias = torch.randn(60)
    plan = Plan(channels=keep, weights={"fc1.weight": new_fc1, "fc1.bias": new_bias})
    phys = apply_plan(model, plan, g)
    assert torch.equal(phys.fc1.weight, new_fc1) and torch.equal(phys.fc1.bias, new_bias)
    masked = apply_plan(model, plan, g, "masked")
    x = torch.randn(3, *shape)
    assert torch.allclose(phys(x), masked(x), atol=1e-5)
    bad = Plan(channels=keep, weights={"fc1.weight": torch.randn(60, 200)})
    with pytest.raises(PruningError, match=r"fc1.weight.*\(60, 100\)"):
        apply_plan(model, bad, g)
    with pytest.raises(PruningError, match="no module .fc9."):
        apply_plan(model, Plan(weights={"fc9.weight": new_fc1}), g)


def test_lowrank_physical_masked_and_checkpoint(tmp_path) -> None:
    model, shape = tiny("resnet20")
    torch.manual_seed(1)
    conv = model.layer2.get_submodule("1").conv1  # 8 -> 8, 3x3
    conv_f = LowRankFactors(core=torch.randn(3, 2, 3, 3), pre=torch.randn(2, 8), post=torch.randn(8, 3))
    lin_f = LowRankFactors(core=torch.randn(4, 16), post=torch.randn(10, 4), bias=torch.randn(10))
    plan = Plan(lowrank={"layer2.1.conv1": conv_f, "fc": lin_f})
    phys = apply_plan(model, plan)
    assert isinstance(phys.layer2[1].conv1, LowRankConv2d) and isinstance(phys.fc, LowRankLinear)
    assert torch.allclose(phys.layer2[1].conv1.dense_weight(), conv_f.dense_weight(), atol=1e-6)
    assert phys.layer2[1].conv1.stride == conv.stride
    masked = apply_plan(model, plan, mode="masked")
    x = torch.randn(2, *shape)
    assert torch.allclose(phys(x), masked(x), atol=1e-4)
    prunekit.save(phys, tmp_path / "lr.pt")
    loaded = prunekit.load(tmp_path / "lr.pt").eval()
    assert torch.equal(loaded(x), phys(x))
    assert count_params(phys)["params"] < count_params(model)["params"]
    with pytest.raises(PruningError, match="core"):
        apply_plan(
            model, Plan(lowrank={"fc": LowRankFactors(core=torch.randn(4, 15), post=torch.randn(10, 4))})
        )


def test_masks_are_baked_physically_and_kept_masked() -> None:
    model, shape = tiny("lenet_300_100")
    m = torch.rand(30, 784) > 0.7
    phys = apply_plan(model, Plan(masks={"fc1.weight": m}))
    assert not get_masks(phys) and int((phys.fc1.weight != 0).sum()) == int(m.sum())
    masked = apply_plan(model, Plan(masks={"fc1.weight": m}), mode="masked")
    assert torch.equal(get_masks(masked)["fc1.weight"], m)
    x = torch.randn(2, *shape)
    assert torch.allclose(phys(x), masked(x))


def test_plan_errors() -> None:
    model, shape = tiny("resnet20")
    g = analyze(model, shape)
    with pytest.raises(PruningError, match="keeps no channel of group 'layer1.0.conv1'"):
        apply_plan(model, Plan(channels={"layer1.0.conv1": torch.tensor([], dtype=torch.long)}), g)
    with pytest.raises(PruningError, match="does not have"):
        apply_plan(model, Plan(channels={"nope": torch.tensor([0])}), g)
    with pytest.raises(PruningError, match="classifier"):
        apply_plan(model, Plan(channels={"fc": torch.tensor([0, 1])}), g)
    with pytest.raises(PruningError, match="outside"):
        apply_plan(model, Plan(channels={"layer1.0.conv1": torch.tensor([0, 9])}), g)
    with pytest.raises(PruningError, match="mode"):
        apply_plan(model, Plan(), g, mode="soft")


def test_apply_rebuilds_a_stale_graph() -> None:
    model, shape = tiny("resnet20")
    g = analyze(model, shape)
    first = {"layer1.0.conv1": torch.tensor([0, 1, 2])}
    apply_plan_(model, Plan(channels=first), g)
    # the same graph object no longer matches the model; apply re-analyses
    apply_plan_(model, Plan(channels={"layer1.0.conv1": torch.tensor([0, 2])}), g)
    assert model.layer1[0].conv1.out_channels == 2
    assert model(torch.randn(1, *shape)).shape == (1, 10)
