"""Exceptions raised by prunekit.

Every error a user can cause derives from :class:`PrunekitError`; the CLI turns
these into a one-paragraph message and exit code 2 instead of a traceback.
"""

from __future__ import annotations


class PrunekitError(Exception):
    """Base class for errors caused by bad input or a missing resource."""


class UnknownNameError(PrunekitError, KeyError):
    """A registry lookup (model, dataset, method, preset) failed."""

    def __init__(self, kind: str, name: str, valid: list[str]):
        self.kind, self.name, self.valid = kind, name, list(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DatasetNotFoundError(PrunekitError):
    """A dataset is not on disk and could not be downloaded."""


class CheckpointError(PrunekitError):
    """A checkpoint is corrupt, foreign, or does not match its architecture."""


class PruningError(PrunekitError):
    """A pruning request cannot be carried out (impossible target, bad plan, ...)."""


class ConfigError(PrunekitError):
    """An experiment configuration is invalid."""
