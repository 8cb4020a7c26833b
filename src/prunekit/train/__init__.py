"""Training: the trainer, its schedules and callbacks."""

from prunekit.train.trainer import (
    Callback,
    TrainConfig,
    Trainer,
    config_dict,
    lr_factor,
    seed_everything,
    train,
)
from prunekit.train.trajectory import Trajectory, TrajectoryError, TrajectoryRecorder, find_trajectory

__all__ = ["Trajectory", "TrajectoryError", "TrajectoryRecorder", "find_trajectory",
           "Callback", "Trainer", "TrainConfig", "config_dict", "lr_factor", "seed_everything", "train"]
