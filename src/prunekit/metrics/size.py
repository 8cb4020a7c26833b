"""Model size: parameter counts (dense and non-zero) and on-disk file size."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from prunekit.metrics._common import MetricsError, check_model


def effective_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's parameters as a deployed model would hold them, each once.

    A ``torch.nn.utils.prune`` pair ``name_orig`` + ``name_mask`` is reported as the masked tensor
    ``name``; a parametrized tensor (``torch.nn.utils.parametrize``) is reported as its computed
    value, and the parametrization's own tensors (``original``, learnable masks, ...) are skipped.
    Shared parameters appear once. Names are dotted module paths.
    """
    check_model(model)
    seen: set[int] = set()
    out: list[tuple[str, torch.Tensor]] = []
    with torch.no_grad():
        for mod_name, mod in model.named_modules(remove_duplicate=False):
            prefix = f"{mod_name}." if mod_name else ""
            if parametrize.is_parametrized(mod):
                for name, plist in mod.parametrizations.items():
                    fresh = [p for p in plist.parameters() if id(p) not in seen]
                    seen.update(id(p) for p in plist.parameters())
                    if fresh:  # skip a second visit of a shared module
                        out.append((prefix + name, getattr(mod, name).detach()))
            for name, p in mod.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if name.endswith("_orig"):
                    mask = mod._buffers.get(name[: -len("_orig")] + "_mask")
                    if mask is not None:
                        out.append((prefix + name[: -len("_orig")], p.detach() * mask))
                        continue
                out.append((prefix + name, p.detach()))
    return out


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts of ``model``.

    Returns:
        ``{"params": dense number of parameter entries, "nonzero_params": entries that are not
        zero}``. Pruning masks and parametrizations are seen through: a pruned weight is counted
        once, as its effective (masked) value, not as original plus mask.
    """
    params = nonzero = 0
    for _, t in effective_parameters(model):
        params += t.numel()
        nonzero += int(torch.count_nonzero(t))
    return {"params": int(params), "nonzero_params": int(nonzero)}


def file_size(path: str | os.PathLike[str]) -> int:
    """Size of a file in bytes; for a directory, the total size of the files below it."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    raise MetricsError(f"cannot measure the size of {str(p)!r}: no such file or directory")
