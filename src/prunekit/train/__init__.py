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

__all__ = ["Callback", "Trainer", "TrainConfig", "config_dict", "lr_factor", "seed_everything", "train"]
