import math

import pytest
import torch
import torch.nn as nn

from prunekit.errors import PrunekitError
from prunekit.train import TrainConfig, Trainer, lr_factor


def _toy_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def test_training_learns_and_is_repeatable():
    data = _toy_data()
    runs = []
    for _ in range(2):
        m = _model()
        hist = Trainer(m, TrainConfig(epochs=5, lr=0.1, seed=1), data, progress=False).fit()
        runs.append((hist, [p.detach().clone() for p in m.parameters()]))
    assert runs[0][0][-1]["train_top1"] > 0.9
    assert runs[0][0][-1]["train_loss"] < runs[0][0][0]["train_loss"]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("schedule", ["cosine", "step", "onecycle", "constant"])
def test_lr_schedules_shape(schedule):
    cfg = TrainConfig(epochs=10, schedule=schedule)
    f = [lr_factor(cfg, s, 1000, 100) for s in range(1000)]
    assert all(0 < v <= 1.0 + 1e-9 for v in f)
    if schedule == "constant":
        assert f[0] == f[-1] == 1.0
    else:
        assert f[-1] < 0.2
    if schedule == "step":
        assert math.isclose(f[600], 0.1) and math.isclose(f[900], 0.01)
    if schedule == "onecycle":
        assert max(f) == pytest.approx(1.0, abs=1e-2) and f[0] < 0.1


def test_fractional_epochs_and_callbacks():
    data = _toy_data()
    seen = {"batches": 0, "epochs": 0}

    class CB:
        def on_batch_end(self, trainer, loss):
            seen["batches"] += 1

        def on_epoch_end(self, trainer, record):
            seen["epochs"] += 1

    Trainer(_model(), TrainConfig(epochs=1.5), data, callbacks=[CB()], progress=False).fit()
    assert seen == {"batches": 12, "epochs": 2}


def test_resume_continues_where_it_stopped(tmp_path):
    data = _toy_data()
    full = _model()
    Trainer(full, TrainConfig(epochs=4, seed=3), data, progress=False).fit()

    class StopAfter2:
        def on_epoch_end(self, trainer, record):
            if trainer.epoch == 2:
                trainer.stop = True

    part = _model()
    Trainer(part, TrainConfig(epochs=4, seed=3), data, progress=False, checkpoint_dir=tmp_path,
            callbacks=[StopAfter2()]).fit()
    resumed = _model()
    t = Trainer(resumed, TrainConfig(epochs=4, seed=3), data, progress=False, checkpoint_dir=tmp_path, resume=True)
    assert t.epoch == 2
    t.fit()
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_bad_config_is_a_clear_error():
    with pytest.raises(PrunekitError, match="lr must be > 0"):
        Trainer(_model(), TrainConfig(lr=-1), _toy_data(), progress=False)
    with pytest.raises(PrunekitError, match="schedule must be one of"):
        Trainer(_model(), TrainConfig(schedule="linear"), _toy_data(), progress=False)


def test_diverging_training_is_reported():
    with pytest.raises(PrunekitError, match="diverged"):
        Trainer(_model(), TrainConfig(lr=1e30, momentum=0.0), _toy_data(), progress=False).fit()
