import pytest
import torch

import prunekit
from prunekit.errors import CheckpointError
from prunekit.models import create_model, get_model_info, list_models
from prunekit.surgery.masks import apply_masks_, get_masks


@pytest.mark.parametrize("name", list_models())
def test_save_load_roundtrip(name, tmp_path):
    info = get_model_info(name)
    torch.manual_seed(0)
    m = create_model(name, num_classes=10, in_channels=info.input_size[0], **info.tiny_kwargs).eval()
    path = prunekit.save(m, tmp_path / "m.pt", meta={"note": "x"})
    m2 = prunekit.load(path).eval()
    x = torch.randn(2, *info.input_size)
    assert torch.equal(m(x), m2(x))
    assert m2.prunekit_meta == {"note": "x"}
    assert m2.prunekit_config == m.prunekit_config


def test_masks_survive_save_load(tmp_path):
    m = create_model("lenet5").eval()
    mask = torch.rand_like(m.fc1.weight) > 0.5
    apply_masks_(m, {"fc1.weight": mask})
    m2 = prunekit.load(prunekit.save(m, tmp_path / "m.pt")).eval()
    assert torch.equal(get_masks(m2)["fc1.weight"], mask)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(m(x), m2(x))
    # training keeps pruned weights at zero
    m2.train()
    opt = torch.optim.SGD(m2.parameters(), lr=0.1)
    m2(x).sum().backward()
    opt.step()
    assert (m2.fc1.weight[~mask] == 0).all()


def test_changed_shapes_are_rebuilt(tmp_path):
    m = create_model("lenet_300_100").eval()
    m.fc1 = torch.nn.Linear(784, 50)
    m.fc2 = torch.nn.Linear(50, 100)
    m2 = prunekit.load(prunekit.save(m, tmp_path / "m.pt")).eval()
    assert m2.fc1.out_features == 50
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(m(x), m2(x))


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        prunekit.load(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        prunekit.load(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save(create_model("lenet5").state_dict(), foreign)
    with pytest.raises(CheckpointError, match="bare state_dict"):
        prunekit.load(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save(create_model("lenet5"), pickled)  # a pickled module: refused by weights_only loading
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        prunekit.load(pickled)


def test_save_requires_zoo_model(tmp_path):
    with pytest.raises(CheckpointError, match="create_model"):
        prunekit.save(torch.nn.Linear(2, 2), tmp_path / "x.pt")
