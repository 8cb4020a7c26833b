"""Parameter trajectories recorded during training (the input of the Koopman methods).

:class:`TrajectoryRecorder` is a :class:`~prunekit.train.Trainer` callback: after every optimisation
step of its window it appends the flattened prunable parameters -- weights and biases of every conv /
linear layer, normalisation layers excluded as in the Koopman seed -- to a float32 file on disk. Nothing
of size ``N x T`` (parameters x snapshots) is ever held in memory: the recorder keeps one snapshot, and
:class:`Trajectory` reads the file back in column blocks (a few MB at a time) for the streaming DMD of
:mod:`prunekit.koopman`.

On disk a trajectory is a folder::

    trajectory/
        trajectory.json     # parameter paths and shapes, snapshot count, window, steps, format version
        snapshots.f32       # T x N float32, row t = the parameters after step start_step + t

``prunekit train --record-trajectory`` writes it beside ``model.pt`` (``OUT/trajectory``);
:func:`find_trajectory` looks for it next to a checkpoint.

>>> rec = TrajectoryRecorder("runs/x/trajectory")          # default window: the last epoch
>>> Trainer(model, cfg, loader, callbacks=[rec]).fit()
>>> traj = Trajectory.load("runs/x/trajectory")
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from prunekit import distributed
from prunekit.errors import PrunekitError

__all__ = ["Trajectory", "TrajectoryError", "TrajectoryRecorder", "find_trajectory", "trajectory_parameters"]

FORMAT_VERSION = 1
META = "trajectory.json"
DATA = "snapshots.f32"
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


class TrajectoryError(PrunekitError):
    """A trajectory is missing, unreadable, or does not belong to the model."""


def trajectory_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The recorded parameters: ``{path: tensor}`` for the weight and bias of every conv / linear layer.

    For a masked layer the effective (masked) weight is recorded, under the plain path ``layer.weight``.
    """
    out: dict[str, torch.Tensor] = {}
    for path, m in model.named_modules():
        if not isinstance(m, _LAYERS):
            continue
        prefix = f"{path}." if path else ""
        for name in ("weight", "bias"):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor):
                out[prefix + name] = t
    return out


# ------------------------------------------------------------------------------------------- the store
class Trajectory:
    """A recorded trajectory on disk: ``T`` snapshots of ``N`` parameters, read block by block."""

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any]):
        self.path = Path(path)
        self.meta = meta
        self.names: list[str] = [p[0] for p in meta["params"]]
        self.shapes: list[tuple[int, ...]] = [tuple(p[1]) for p in meta["params"]]
        self.sizes = [int(np.prod(s)) if s else 1 for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.t = int(meta["snapshots"])
        self._cache: dict[Any, Any] = {}  # DMD results by their options (prunekit.koopman)

    def __repr__(self) -> str:
        return f"Trajectory({str(self.path)!r}, snapshots={self.t}, parameters={self.n})"

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trajectory:
        p = Path(path)
        if p.is_file() and p.name == META:
            p = p.parent
        meta_file, data_file = p / META, p / DATA
        if not meta_file.is_file() or not data_file.is_file():
            raise TrajectoryError(
                f"no trajectory at {p} (expected {META} and {DATA}); record one with "
                "`prunekit train ... --record-trajectory` (or prunekit.train.TrajectoryRecorder)")
        try:
            meta = json.loads(meta_file.read_text())
            if int(meta.get("version", -1)) != FORMAT_VERSION:
                raise ValueError(f"format version {meta.get('version')!r}, this prunekit reads {FORMAT_VERSION}")
            params = [(str(n), [int(d) for d in s]) for n, s in meta["params"]]
            t = int(meta["snapshots"])
        except (ValueError, KeyError, TypeError) as e:
            raise TrajectoryError(f"{meta_file} is not a prunekit trajectory description: {e}") from None
        meta["params"] = params
        traj = cls(p, meta)
        expected = traj.n * t * 4
        if data_file.stat().st_size != expected:
            raise TrajectoryError(
                f"{data_file} holds {data_file.stat().st_size} bytes but {t} snapshots of {traj.n} float32 "
                f"parameters need {expected}: the recording is incomplete or damaged; record it again")
        return traj

    # -- reading -------------------------------------------------------------------------------------
    def snapshot(self, index: int) -> np.ndarray:
        """One snapshot (``N`` float32); negative indices count from the end."""
        i = index % self.t
        with open(self.path / DATA, "rb") as f:
            f.seek(i * self.n * 4)
            return np.frombuffer(f.read(self.n * 4), dtype=np.float32).copy()

    def blocks(self, max_bytes: int = 4 << 20) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(a, b, block)`` with ``block`` the ``T x (b - a)`` float32 columns ``a:b`` of the snapshot matrix."""
        width = max(1, min(self.n, max_bytes // (4 * max(1, self.t))))
        with open(self.path / DATA, "rb") as f:
            for a in range(0, self.n, width):
                b = min(self.n, a + width)
                block = np.empty((self.t, b - a), dtype=np.float32)
                for t in range(self.t):
                    f.seek((t * self.n + a) * 4)
                    block[t] = np.frombuffer(f.read((b - a) * 4), dtype=np.float32)
                yield a, b, block

    def dense(self) -> np.ndarray:
        """The whole ``N x T`` snapshot matrix (float32) -- for tests and small models only."""
        data = np.fromfile(self.path / DATA, dtype=np.float32)
        return data.reshape(self.t, self.n).T.copy()

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """A length-``N`` vector cut into the recorded parameters' shapes."""
        return {n: flat[self.offsets[i]: self.offsets[i + 1]].reshape(s)
                for i, (n, s) in enumerate(zip(self.names, self.shapes))}

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose conv / linear parameters are not the recorded ones (names and shapes)."""
        params = trajectory_parameters(model)
        rec = dict(zip(self.names, self.shapes))
        now = {k: tuple(v.shape) for k, v in params.items()}
        if rec != now:
            missing = sorted(set(rec) - set(now))[:3]
            extra = sorted(set(now) - set(rec))[:3]
            differ = [k for k in rec if k in now and rec[k] != now[k]][:3]
            raise TrajectoryError(
                f"the trajectory at {self.path} was recorded on another model: "
                + "; ".join(x for x in (f"recorded but not in the model: {missing}" if missing else "",
                                        f"in the model but not recorded: {extra}" if extra else "",
                                        f"other shapes: {[(k, rec[k], now[k]) for k in differ]}" if differ else "")
                            if x)
                + ". Koopman methods need the trajectory of the model they prune, before any physical pruning")

    def last_snapshot_gap(self, model: nn.Module) -> float:
        """Largest ``|parameter - last snapshot|`` relative to the largest parameter (0: the model is the last
        recorded state)."""
        last = self.split(self.snapshot(-1))
        num = den = 0.0
        for k, v in trajectory_parameters(model).items():
            w = v.detach().float().cpu().numpy()
            num = max(num, float(np.abs(w - last[k]).max()) if w.size else 0.0)
            den = max(den, float(np.abs(w).max()) if w.size else 0.0)
        return num / max(den, 1e-30)


def find_trajectory(checkpoint: str | os.PathLike) -> Path | None:
    """The trajectory recorded with a checkpoint: ``<stem>.trajectory/`` or ``trajectory/`` beside it."""
    p = Path(checkpoint)
    for cand in (p.with_name(p.stem + ".trajectory"), p.parent / "trajectory"):
        if (cand / META).is_file():
            return cand
    return None


# ------------------------------------------------------------------------------------------- recording
class TrajectoryRecorder:
    """Trainer callback: record the conv / linear parameters after every step of a window.

    Args:
        path: the trajectory folder to write (replaced atomically when recording ends).
        window: number of steps (snapshots) to record; ``None``: one epoch.
        epoch: the epoch (1-based) whose last ``window`` steps are recorded; ``None``: the last epoch of
            training. With ``epoch=k`` the recording ends with the k-th epoch (early pruning).

    Snapshots are float32; memory is one snapshot. Under ``torchrun`` every rank records (the parameters
    are equal on all ranks, so every rank can compute the same plan); only rank 0 keeps its file at ``path``.
    """

    def __init__(self, path: str | os.PathLike, window: int | None = None, epoch: int | None = None):
        if window is not None and window < 3:
            raise TrajectoryError(f"trajectory window must be at least 3 snapshots (DMD needs 3), got {window}")
        if epoch is not None and epoch < 1:
            raise TrajectoryError(f"trajectory epoch must be >= 1, got {epoch}")
        self.path = Path(path)
        self.window, self.epoch = window, epoch
        self.start = self.stop = 0
        self.count = 0
        self.trajectory: Trajectory | None = None
        self.seconds = 0.0  # time spent recording (flatten + write)
        self._file: Any = None
        self._params: dict[str, torch.Tensor] = {}
        self._tmp: Path | None = None

    def _target(self) -> Path:
        r = distributed.rank()
        return self.path if r == 0 else self.path.with_name(f"{self.path.name}.rank{r}")

    def on_train_begin(self, trainer: Any) -> None:
        spe = trainer.steps_per_epoch
        end = trainer.total_steps if self.epoch is None else min(trainer.total_steps, self.epoch * spe)
        length = spe if self.window is None else self.window
        self.start, self.stop = max(0, end - length), end  # record after steps start+1 .. stop
        if self.stop - self.start < 3:
            raise TrajectoryError(
                f"the recording window has {self.stop - self.start} step(s); DMD needs at least 3 snapshots "
                "(train longer, or use a larger batch count / --trajectory-window)")
        self._params = trajectory_parameters(trainer.model)
        target = self._target()
        self._tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)
        self.count = 0

    def on_batch_end(self, trainer: Any, loss: float) -> None:
        if not self.start < trainer.step <= self.stop or self._tmp is None:
            return
        import time

        t0 = time.perf_counter()
        if self._file is None:
            self._file = open(self._tmp / DATA, "wb")
        params = trajectory_parameters(trainer.model) if self._structure_changed(trainer.model) else self._params
        with torch.no_grad():  # each tensor's buffer written as it is (a copy only if not contiguous float32 CPU)
            for p in params.values():
                t = p.detach()
                if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                    t = t.float().cpu().contiguous()
                self._file.write(memoryview(t.numpy()).cast("B"))
        self.count += 1
        self.seconds += time.perf_counter() - t0
        if trainer.step == self.stop:
            self._finish(trainer)

    def _structure_changed(self, model: nn.Module) -> bool:
        # masking (parametrize) replaces the attribute; re-read the tensors then (same names and shapes)
        for k, t in self._params.items():
            mod, _, name = k.rpartition(".")
            if getattr(model.get_submodule(mod) if mod else model, name) is not t:
                self._params = trajectory_parameters(model)
                return True
        return False

    def _finish(self, trainer: Any) -> None:
        if self._file is None or self._tmp is None:
            return
        self._file.close()
        self._file = None
        shapes = [[k, list(v.shape)] for k, v in self._params.items()]
        meta = {"version": FORMAT_VERSION, "params": shapes, "snapshots": self.count,
                "start_step": self.start + 1, "end_step": self.stop, "epoch": -(-self.stop // trainer.steps_per_epoch),
                "steps_per_epoch": trainer.steps_per_epoch, "dtype": "float32",
                "record_seconds": round(self.seconds, 3)}
        (self._tmp / META).write_text(json.dumps(meta, indent=1))
        target = self._target()
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(self._tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        self._tmp = None
        self.trajectory = Trajectory.load(target)

    def on_train_end(self, trainer: Any) -> None:
        if self._tmp is not None and self._file is not None:  # training stopped inside the window
            if self.count >= 3:
                self._finish(trainer)
            else:
                self._file.close()
                self._file = None
                shutil.rmtree(self._tmp, ignore_errors=True)
        if distributed.rank() != 0 and self.trajectory is not None:
            shutil.rmtree(self.trajectory.path, ignore_errors=True)
