"""Koopman pruning: DMD numerics against numpy, the bounded-memory Gram route against the dense one, the
trajectory recorder, the kmp / kgp / kmp_channel methods, early pruning, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit import koopman
from prunekit.cli import main
from prunekit.early import early_pruning_callbacks
from prunekit.errors import PruningError
from prunekit.train import TrainConfig, Trainer
from prunekit.train.trajectory import DATA, META, Trajectory, TrajectoryError, TrajectoryRecorder, find_trajectory


# ------------------------------------------------------------------------------------------- helpers
def _linear_system(n: int = 6, seed: int = 0) -> np.ndarray:
    """A real n x n matrix with known eigenvalues (a complex pair included)."""
    rng = np.random.default_rng(seed)
    d = np.zeros((n, n))
    d[0, 0], d[1, 1], d[2, 2], d[5, 5] = 0.99, 0.95, 0.9, 0.8
    d[3:5, 3:5] = [[0.85, 0.1], [-0.1, 0.85]]
    p = rng.standard_normal((n, n))
    return p @ d @ np.linalg.inv(p)


def _run(a: np.ndarray, steps: int, noise: float = 0.0, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = np.zeros((a.shape[0], steps))
    w[:, 0] = rng.standard_normal(a.shape[0])
    for t in range(1, steps):
        w[:, t] = a @ w[:, t - 1] + noise * rng.standard_normal(a.shape[0])
    return w


def _write_trajectory(path, w: np.ndarray, names_shapes) -> Trajectory:
    """A trajectory folder holding the N x T matrix ``w`` (as the recorder writes it)."""
    path.mkdir(parents=True, exist_ok=True)
    w.T.astype(np.float32).tofile(path / DATA)
    (path / META).write_text(json.dumps({"version": 1, "params": [[n, list(s)] for n, s in names_shapes],
                                         "snapshots": w.shape[1]}))
    return Trajectory.load(path)


def _sorted(z: np.ndarray) -> np.ndarray:
    return np.sort_complex(np.round(z, 12))


def _align(ref: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``v`` scaled by the complex factor that best matches ``ref`` (modes are defined up to scale)."""
    return v * (np.vdot(v, ref) / np.vdot(v, v))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _data(n_batches: int = 6, bs: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * bs, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, :, :4].mean((1, 2, 3)) > 0).long()
    return [(x[i * bs:(i + 1) * bs], y[i * bs:(i + 1) * bs]) for i in range(n_batches)]


def _train_tiny(tmp_path, epochs: int = 2, window=None, epoch=None, callbacks=()):
    torch.manual_seed(0)
    model = _Tiny()
    rec = TrajectoryRecorder(tmp_path / "trajectory", window=window, epoch=epoch)
    cfg = TrainConfig(epochs=epochs, lr=0.05, schedule="constant", seed=0)
    Trainer(model, cfg, _data(), callbacks=[rec, *callbacks], progress=False, log_epochs=False).fit()
    return model, rec


# ------------------------------------------------------------------------------------------- DMD numerics
@pytest.mark.parametrize("route", ["dense", "gram"])
def test_dmd_recovers_eigenvalues_of_linear_dynamics(route):
    a = _linear_system()
    w = _run(a, 40)
    sol = koopman.dmd_dense(w)[0] if route == "dense" else koopman.dmd_gram(w.T @ w)
    assert sol.rank == 6
    assert np.abs(_sorted(sol.eigenvalues) - _sorted(np.linalg.eigvals(a))).max() < 1e-6


def test_dmd_with_noise_stays_close():
    a = _linear_system()
    w = _run(a, 200, noise=1e-5)
    for sol in (koopman.dmd_dense(w, rtol=1e-3)[0], koopman.dmd_gram(w.T @ w, rtol=1e-3)):
        lam = sol.eigenvalues
        # every true eigenvalue has a DMD eigenvalue nearby; the leading one (0.99) very close
        for mu in np.linalg.eigvals(a):
            assert np.abs(lam - mu).min() < 5e-3
        assert np.abs(lam - 0.99).min() < 1e-3


def test_gram_route_streamed_from_disk_equals_dense_dmd(tmp_path):
    a = _linear_system()
    w = _run(a, 30) + 0.5  # an offset: a mode with eigenvalue 1, like a converging trajectory
    w = np.concatenate([w, 2 * w[:3] - w[3:6]])  # N = 9 > rank: a genuinely tall matrix
    traj = _write_trajectory(tmp_path / "t", w.astype(np.float32).astype(np.float64), [("p", (9,))])
    w32 = traj.dense().astype(np.float64)
    dense, phi = koopman.dmd_dense(w32)
    np.testing.assert_allclose(koopman.gram(traj, max_bytes=64), w32.T @ w32, rtol=1e-12)  # 1-column blocks
    mode, lam = koopman.kmp_mode(traj)
    j = dense.nearest_one()
    assert abs(lam - dense.eigenvalues[j]) < 1e-8
    np.testing.assert_allclose(_align(phi[:, j], mode), phi[:, j], atol=1e-7 * np.abs(phi[:, j]).max())
    # the predicted change: all modes, amplitudes of the last snapshot (no scale ambiguity)
    change_dense = phi @ ((dense.eigenvalues - 1) * dense.amplitudes)
    np.testing.assert_allclose(koopman.kgp_change(traj), change_dense, atol=1e-6 * np.abs(change_dense).max())


def test_kgp_change_is_the_next_step_of_linear_dynamics():
    a = _linear_system()
    w = _run(a, 40)
    sol, phi = koopman.dmd_dense(w)
    change = phi @ ((sol.eigenvalues - 1) * sol.amplitudes)
    np.testing.assert_allclose(change.real, (a - np.eye(6)) @ w[:, -1], atol=1e-8)
    assert np.abs(change.imag).max() < 1e-8


def test_kmp_mode_is_the_limit_point():
    """x_t = x* + A^t (x_0 - x*) with a contracting A: the mode of the eigenvalue 1 is proportional to x*."""
    rng = np.random.default_rng(3)
    a = _linear_system() * 0.9
    x_star = rng.standard_normal(10)  # 10 parameters, 7 modes (6 decaying + the constant)
    w = x_star[:, None] + rng.standard_normal((10, 6)) @ _run(a, 60)
    sol, phi = koopman.dmd_dense(w)
    j = sol.nearest_one()
    assert abs(sol.eigenvalues[j] - 1) < 1e-8
    np.testing.assert_allclose(_align(x_star, phi[:, j]).real, x_star, atol=1e-6)


def test_too_few_snapshots_is_a_clear_error():
    with pytest.raises(prunekit.PrunekitError, match="at least 3 snapshots"):
        koopman.dmd_gram(np.eye(2))


# ------------------------------------------------------------------------------------------- recorder
def test_recorder_writes_the_last_epoch_and_matches_the_model(tmp_path):
    model, rec = _train_tiny(tmp_path)
    traj = Trajectory.load(tmp_path / "trajectory")
    assert traj.t == 6 and traj.meta["start_step"] == 7 and traj.meta["end_step"] == 12  # 6 steps per epoch
    assert "bn.weight" not in traj.names and set(traj.names) == {"conv.weight", "conv.bias", "conv2.weight",
                                                                 "conv2.bias", "fc.weight", "fc.bias"}
    assert traj.last_snapshot_gap(model) == 0.0
    last = traj.split(traj.snapshot(-1))
    assert torch.equal(torch.from_numpy(last["fc.weight"]), model.fc.weight.detach())
    assert (tmp_path / "trajectory" / DATA).stat().st_size == traj.t * traj.n * 4  # float32 on disk
    assert not list(tmp_path.glob("*.partial"))
    assert find_trajectory(tmp_path / "model.pt") == tmp_path / "trajectory"


def test_recorder_window_and_epoch(tmp_path):
    _, rec = _train_tiny(tmp_path, epochs=3, window=4, epoch=2)
    assert rec.trajectory.t == 4 and rec.trajectory.meta["end_step"] == 12 and rec.trajectory.meta["epoch"] == 2
    with pytest.raises(TrajectoryError, match="at least 3"):
        TrajectoryRecorder(tmp_path / "x", window=2)


def test_damaged_or_foreign_trajectory_is_refused(tmp_path):
    model, _ = _train_tiny(tmp_path)
    traj_dir = tmp_path / "trajectory"
    with pytest.raises(TrajectoryError, match="another model"):
        Trajectory.load(traj_dir).check_model(nn.Sequential(nn.Linear(3, 2)))
    with open(traj_dir / DATA, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(TrajectoryError, match="incomplete or damaged"):
        Trajectory.load(traj_dir)
    with pytest.raises(TrajectoryError, match="--record-trajectory"):
        Trajectory.load(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------- methods
def test_kmp_without_trajectory_says_how_to_record_one():
    with pytest.raises(PruningError, match="--record-trajectory"):
        prunekit.prune(_Tiny(), "kmp", "params=2", input_shape=(1, 8, 8))


@pytest.mark.parametrize("method", ["kmp", "kgp"])
def test_weight_methods_meet_the_target_and_score_the_dmd(tmp_path, method):
    model, rec = _train_tiny(tmp_path)
    res = prunekit.prune(model, method, "params=2", trajectory=rec.trajectory, input_shape=(1, 8, 8))
    assert abs(res.report["compression"] / 2 - 1) < 0.05
    # the masks are the shared allocator's top scores of |phi| (kmp) / |predicted change| (kgp)
    traj = rec.trajectory
    vec = koopman.kmp_mode(traj)[0] if method == "kmp" else koopman.kgp_change(traj)
    score = np.abs(traj.split(vec)["conv2.weight"]).ravel()
    kept = res.model.conv2.weight.detach().numpy().ravel() != 0
    assert kept.any() and (~kept).any()
    assert score[kept].min() >= score[~kept].max() - 1e-12 * score.max()


def test_kmp_equals_magnitude_on_a_converged_trajectory(tmp_path):
    """Parameters converging linearly to w*: kmp's masks are magnitude pruning's masks of w*."""
    torch.manual_seed(0)
    model = _Tiny()
    params = {k: v.detach().numpy().ravel() for k, v in prunekit.train.trajectory.trajectory_parameters(model).items()}
    w_star = np.concatenate(list(params.values())).astype(np.float64)
    rng = np.random.default_rng(0)
    steps = 25
    decay = 0.8 ** np.arange(steps)
    drift = rng.standard_normal((w_star.size, 3)) @ np.stack([decay, 0.7 ** np.arange(steps), 0.6 ** np.arange(steps)])
    w = w_star[:, None] + 0.05 * drift
    traj = _write_trajectory(tmp_path / "t", w, [(k, tuple(v.shape)) for k, v in
                                                prunekit.train.trajectory.trajectory_parameters(model).items()])
    with torch.no_grad():  # the model at the limit point
        for k, v in traj.split(w_star.astype(np.float32)).items():
            mod, _, name = k.rpartition(".")
            getattr(model.get_submodule(mod), name).copy_(torch.from_numpy(v))
    with pytest.warns(UserWarning, match="last snapshot"):
        kmp = prunekit.prune(model, "kmp", "params=3", trajectory=traj, input_shape=(1, 8, 8), mode="masked")
    mag = prunekit.prune(model, "magnitude", "params=3", input_shape=(1, 8, 8), mode="masked")
    for k in kmp.plan.masks:
        assert torch.equal(kmp.plan.masks[k], mag.plan.masks[k]), k


def test_kmp_channel_masked_and_physical_agree(tmp_path):
    model, rec = _train_tiny(tmp_path)
    x = torch.randn(5, 1, 8, 8)
    masked = prunekit.prune(model, "kmp_channel", "flops=1.5", trajectory=rec.trajectory, input_shape=(1, 8, 8),
                            mode="masked", round_to=1).model.eval()
    phys = prunekit.prune(model, "kmp_channel", "flops=1.5", trajectory=rec.trajectory, input_shape=(1, 8, 8),
                          round_to=1)
    assert phys.model.conv.out_channels < 8
    with torch.no_grad():
        torch.testing.assert_close(phys.model.eval()(x), masked(x), atol=1e-5, rtol=1e-5)


def test_trajectory_of_another_model_is_refused(tmp_path):
    _, rec = _train_tiny(tmp_path)
    other = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 4))
    with pytest.raises(PruningError, match="another model"):
        prunekit.prune(other, "kmp", "params=2", trajectory=rec.trajectory, input_shape=(1, 8, 8))


# ------------------------------------------------------------------------------------------- early pruning
@pytest.mark.parametrize("method,target", [("kmp", "params=3"), ("kmp_channel", "flops=1.5")])
def test_prune_at_epoch_then_training_continues(tmp_path, method, target):
    torch.manual_seed(0)
    model = _Tiny()
    cbs = early_pruning_callbacks(method, target, epoch=1, trajectory_dir=tmp_path / "traj", input_shape=(1, 8, 8),
                                  round_to=1)
    cfg = TrainConfig(epochs=3, lr=0.05, schedule="constant", seed=0)
    hist = Trainer(model, cfg, _data(), callbacks=cbs, progress=False, log_epochs=False).fit()
    pr = cbs[-1]
    assert pr.result is not None and "pruned" in hist[0] and "pruned" not in hist[1]
    assert cbs[0].trajectory.meta["end_step"] == 6  # recorded over epoch 1
    params = prunekit.metrics.count_params(model)
    if method == "kmp":  # masks kept through two more epochs of training
        assert abs(params["params"] / params["nonzero_params"] / 3 - 1) < 0.05
        assert (model.conv2.weight == 0).sum() > 0
    else:  # made physical when training ended
        assert model.conv.out_channels < 8 or model.conv2.out_channels < 8
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)


# ------------------------------------------------------------------------------------------- command line
def test_cli_record_prune_and_early_prune(tmp_path, shared_data, capsys):
    common = ["--dataset", "fashion-mnist", "--data-dir", shared_data, "--quiet"]
    run = tmp_path / "run"
    assert main(["train", "--model", "lenet5", "--epochs", "0.05", "--lr", "0.05", "--out", str(run),
                 "--record-trajectory", "--trajectory-window", "8", *common]) == 0
    meta = json.loads((run / "metrics.json").read_text())
    assert meta["trajectory"]["snapshots"] == 8
    out = tmp_path / "p"
    assert main(["prune", "--checkpoint", str(run / "model.pt"), "--method", "kmp", "--target", "params=4",
                 "--out", str(out), "--no-latency", "--prune-samples", "64", *common]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert abs(m["compression"] / 4 - 1) < 0.05
    # a checkpoint without a trajectory: exit 2 and say how to record one
    bare = tmp_path / "bare"
    assert main(["train", "--model", "lenet5", "--epochs", "0.02", "--out", str(bare), *common]) == 0
    capsys.readouterr()
    assert main(["prune", "--checkpoint", str(bare / "model.pt"), "--method", "kgp", "--target", "params=2",
                 "--out", str(tmp_path / "q"), "--no-latency", *common]) == 2
    assert "--record-trajectory" in capsys.readouterr().err
    # --trajectory PATH takes another run's recording only if it is the same model
    assert main(["prune", "--checkpoint", str(bare / "model.pt"), "--method", "kgp", "--target", "params=2",
                 "--trajectory", str(run / "trajectory"), "--out", str(tmp_path / "q2"), "--no-latency",
                 "--prune-samples", "64", *common]) == 0
    early = tmp_path / "early"
    assert main(["train", "--model", "lenet5", "--epochs", "2", "--out", str(early), "--prune-at-epoch", "1",
                 "--prune-method", "kmp", "--prune-target", "params=2", "--trajectory-window", "5",
                 "--dataset", "fashion-mnist", "--data-dir", shared_data, "--quiet",
                 "--model-kwargs", "{}", "--batch-size", "2048"]) == 0
    em = json.loads((early / "metrics.json").read_text())
    assert em["pruned_at_epoch"]["epoch"] == 1 and abs(em["pruned_at_epoch"]["compression"] / 2 - 1) < 0.05
    assert abs(em["params"] / em["nonzero_params"] / 2 - 1) < 0.05  # the masks survived the second epoch
    assert main(["train", "--model", "lenet5", "--epochs", "1", "--out", str(tmp_path / "bad"),
                 "--prune-at-epoch", "3", "--prune-method", "kmp", "--prune-target", "params=2", *common]) == 2


# ------------------------------------------------------------------------------------------- benchmark
def _bench_doc(**over) -> dict:
    doc = {
        "name": "koop", "model": "lenet_300_100", "model_kwargs": {"width": 0.1}, "dataset": "synthetic",
        "dataset_kwargs": {"in_channels": 1, "image_size": 8, "n": 256},
        "base": {"train": {"epochs": 2, "lr": 0.05, "batch_size": 32}},
        "methods": ["kmp", "kgp", "magnitude", "kmp_channel"],
        "targets": {"weight": ["params=2"], "channel": ["flops=1.5"]},
        "seeds": [0], "finetune": {"epochs": 0.5, "lr": 0.01}, "prune": {"prune_set": 32, "round_to": 1},
        "measure": {"latency": False},
    }
    doc.update(over)
    return doc


def test_bench_records_the_base_trajectory_and_runs_koopman_cells(tmp_path):
    """A base trained by the benchmark for 2 epochs records its last epoch; every Koopman cell prunes it
    (early pruning: pruned after epoch 2, then training continues for the fine-tuning budget)."""
    from prunekit.bench import Runner, load_experiment
    from prunekit.bench import results as R

    out = tmp_path / "b"
    Runner(load_experiment(_bench_doc()), out, progress=False, log=lambda m: None).run()
    rows = {r["method"]: r for r in R.load_rows(out)}
    assert {m: r["status"] for m, r in rows.items()} == {m: "ok" for m in ("kmp", "kgp", "magnitude", "kmp_channel")}
    assert abs(rows["kmp"]["compression"] / 2 - 1) < 0.05 and rows["kmp"]["top1_finetuned"] is not None
    assert list((out / "base").glob("*.trajectory/trajectory.json"))
    # a checkpoint without a trajectory: Koopman cells are skipped with the way to get one, the rest run
    ckpt = next((out / "base").glob("*.pt"))
    bare = tmp_path / "bare.pt"
    bare.write_bytes(ckpt.read_bytes())
    doc = _bench_doc(base={"checkpoint": str(bare)}, methods=["kmp", "magnitude"])
    Runner(load_experiment(doc), tmp_path / "c", progress=False, log=lambda m: None).run()
    rows = {r["method"]: r for r in R.load_rows(tmp_path / "c")}
    assert rows["magnitude"]["status"] == "ok" and rows["kmp"]["status"] == "skipped"
    assert "--record-trajectory" in rows["kmp"]["error"]
    # ... and base.trajectory points at one
    traj = next((out / "base").glob("*.trajectory"))
    doc = _bench_doc(base={"checkpoint": str(bare), "trajectory": str(traj)}, methods=["kmp"])
    Runner(load_experiment(doc), tmp_path / "d", progress=False, log=lambda m: None).run()
    assert R.load_rows(tmp_path / "d")[0]["status"] == "ok"


def test_prune_and_train_records_a_trajectory_every_round():
    from prunekit.prune_train import prune_and_train

    torch.manual_seed(0)
    model, hist = prune_and_train(_Tiny(), "kmp_channel", 0.25, 2, _data(), epochs_per_round=1, final_epochs=1,
                                  lr=0.05, input_shape=(1, 8, 8))
    assert hist["channels"]["final"] < hist["channels"]["original"] and len(hist["rounds"]) == 2
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    with pytest.raises(PruningError, match="epochs_per_round > 0"):
        prune_and_train(_Tiny(), "kmp_channel", 0.25, 1, _data(), epochs_per_round=0, input_shape=(1, 8, 8))
