"""Model zoo tests, generated from the registry: every registered model is checked."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn

from prunekit.errors import PrunekitError, UnknownNameError
from prunekit.models import create_model, get_model_info, list_models, register_model

ALL_MODELS = list_models()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tiny(name: str, num_classes: int = 10) -> tuple[nn.Module, torch.Tensor]:
    info = get_model_info(name)
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, in_channels=info.input_size[0], **info.tiny_kwargs)
    x = torch.randn(2, *info.input_size)
    return model, x


def test_zoo_contents() -> None:
    expected = {
        "lenet_300_100", "lenet5", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "vgg11", "vgg13", "vgg16", "vgg19", "mobilenet_v1", "mobilenet_v2", "vit_tiny",
    }  # fmt: skip
    assert expected <= set(ALL_MODELS)
    assert set(list_models("vgg")) == {"vgg11", "vgg13", "vgg16", "vgg19"}
    assert set(list_models("mobilenet")) == {"mobilenet_v1", "mobilenet_v2"}


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("num_classes", [10, 7])
def test_forward_backward(name: str, num_classes: int) -> None:
    model, x = _tiny(name, num_classes)
    model.train()
    out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_fx_traceable(name: str) -> None:
    model, x = _tiny(name)
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_prunekit_config_recorded(name: str) -> None:
    info = get_model_info(name)
    model = create_model(name, num_classes=7, in_channels=info.input_size[0], **info.tiny_kwargs)
    assert model.prunekit_config == {
        "name": name,
        "num_classes": 7,
        "in_channels": info.input_size[0],
        "kwargs": dict(info.tiny_kwargs),
    }
    rebuilt = create_model(
        name,
        num_classes=model.prunekit_config["num_classes"],
        in_channels=model.prunekit_config["in_channels"],
        **model.prunekit_config["kwargs"],
    )
    rebuilt.load_state_dict(model.state_dict())


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as exc:
        create_model("resnet-does-not-exist")
    msg = str(exc.value)
    assert "resnet-does-not-exist" in msg
    for name in ("resnet20", "vgg16", "mobilenet_v2", "vit_tiny"):
        assert name in msg
    assert set(exc.value.valid) == set(ALL_MODELS)
    assert isinstance(exc.value, KeyError)


def test_duplicate_registration_raises() -> None:
    factory = get_model_info("resnet20").factory
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet20", family="resnet")(lambda num_classes=10, in_channels=3: nn.Identity())
    assert get_model_info("resnet20").factory is factory


def test_bad_option_raises_config_error() -> None:
    from prunekit.errors import ConfigError

    with pytest.raises(ConfigError, match="vgg11"):
        create_model("vgg11", no_such_option=1)
    for bad in ({"width": -1}, {"width": float("nan")}, {"width": 1e6}, {"num_classes": 0}, {"width": True}):
        with pytest.raises(ConfigError, match="must be"):
            create_model("lenet5", **bad)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("resnet20", {}, 0.27e6),
        ("resnet56", {}, 0.85e6),
    ],
)
def test_resnet_param_counts(name: str, kwargs: dict, expected: float) -> None:
    n = _n_params(create_model(name, num_classes=10, **kwargs))
    assert abs(n - expected) / expected < 0.02, n


def test_wide_resnet32_param_count() -> None:
    # EigenDamage (Wang et al. 2019) lists the 4x-wide ResNet-32 on CIFAR-100 at 7.4M parameters.
    n = _n_params(create_model("resnet32", num_classes=100, width=4))
    assert abs(n - 7.4e6) / 7.4e6 < 0.05, n


def test_full_vgg16() -> None:
    model = create_model("vgg16", num_classes=10)
    assert abs(_n_params(model) - 14.72e6) / 14.72e6 < 0.01
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    relus = [m for m in model.features if isinstance(m, nn.ReLU)]
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == 13 and len(pools) == 5
    assert len({id(r) for r in relus}) == 13  # one ReLU instance per convolution
    assert isinstance(model.classifier[-1], nn.Linear) and model.classifier[-1].in_features == 512
    model.eval()
    with torch.no_grad():
        assert model.features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 1, 1)


@pytest.mark.parametrize(("name", "n_conv"), [("vgg11", 8), ("vgg13", 10), ("vgg19", 16)])
def test_vgg_depths(name: str, n_conv: int) -> None:
    model = create_model(name, width=0.125)
    assert sum(isinstance(m, nn.Conv2d) for m in model.features) == n_conv


def test_vgg_mlp_classifier_and_image_size() -> None:
    model = create_model("vgg11", num_classes=5, width=0.25, classifier="mlp")
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128, 128), (128, 5)]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    model = create_model("vgg11", num_classes=5, width=0.25, image_size=64)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    with pytest.raises(PrunekitError):  # user errors, not tracebacks
        create_model("vgg11", classifier="nope")
    with pytest.raises(PrunekitError):
        create_model("vgg11", image_size=28)


def test_mobilenet_layouts() -> None:
    v1 = create_model("mobilenet_v1", num_classes=10)
    assert len(v1.layers) == 13
    assert [b.conv_pw.out_channels for b in v1.layers] == [64, 128, 128, 256, 256] + [512] * 6 + [1024, 1024]
    assert [b.conv_dw.stride[0] for b in v1.layers].count(2) == 4
    assert v1.conv1.stride == (1, 1) and v1.conv1.out_channels == 32
    v2 = create_model("mobilenet_v2", num_classes=10)
    assert len(v2.layers) == 17
    assert v2.conv2.out_channels == 1280 and v2.fc.in_features == 1280
    assert sum(b.use_residual for b in v2.layers) == 10
    assert [b.conv2.stride[0] for b in v2.layers].count(2) == 3
    v2.eval()
    with torch.no_grad():
        feat = v2.layers(v2.relu1(v2.bn1(v2.conv1(torch.randn(1, 3, 32, 32)))))
    assert feat.shape[-2:] == (4, 4)
    assert isinstance(create_model("mobilenet_v2", dropout=0.2).dropout, nn.Dropout)


def test_vit_attention_uses_its_attributes() -> None:
    from prunekit.models.vit import Attention

    model = create_model("vit_tiny", num_classes=10)
    attn = model.blocks[0].attn
    assert isinstance(attn, Attention)
    assert (attn.num_heads, attn.head_dim) == (3, 64)
    assert attn.qkv.out_features == 3 * 192 and attn.proj.in_features == 192
    mlp = model.blocks[0].mlp
    assert isinstance(mlp.act, nn.GELU) and mlp.fc1.in_features == mlp.fc2.out_features == 192

    # Keep only head 0: shrink qkv/proj and the attribute, the forward must follow.
    torch.manual_seed(0)
    attn = Attention(dim=16, num_heads=2)
    x = torch.randn(2, 5, 16)
    keep = torch.arange(8)
    rows = torch.cat([keep, keep + 16, keep + 32])
    small = Attention(dim=16, num_heads=2)
    small.qkv = nn.Linear(16, 24)
    small.qkv.weight.data, small.qkv.bias.data = attn.qkv.weight.data[rows], attn.qkv.bias.data[rows]
    small.proj = nn.Linear(8, 16)
    small.proj.weight.data, small.proj.bias.data = attn.proj.weight.data[:, keep], attn.proj.bias.data
    small.num_heads = 1
    with torch.no_grad():
        # Zeroing head 1 in the original gives the same function as dropping it.
        attn.proj.weight.data[:, 8:] = 0
        torch.testing.assert_close(small(x), attn(x))
