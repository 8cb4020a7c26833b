"""Layers the channel engine reads as plain ``nn.Linear``: Hugging Face's ``Conv1D`` (GPT-2), a linear layer
that stores its weight transposed, ``(in, out)``. Torch-Pruning cannot trace it (it does not know which weight
dimension holds the output channels); :func:`linearize_` swaps each for the equal ``nn.Linear`` so that the
model can be analysed and pruned. The swap computes the same function (``x @ W + b`` = ``x @ W.T.T + b``)."""

from __future__ import annotations

import torch
import torch.nn as nn


def _is_transposed_linear(m: nn.Module) -> bool:
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    return (
        type(m).__name__ == "Conv1D"
        and isinstance(getattr(m, "nf", None), int)
        and isinstance(w, torch.Tensor)
        and w.dim() == 2
        and w.shape[1] == m.nf
        and not list(m.children())
        and (b is None or tuple(b.shape) == (m.nf,))
    )


def transposed_linears(model: nn.Module) -> list[str]:
    """Paths of the transposed-weight linear layers (Hugging Face ``Conv1D``) in ``model``."""
    return [p for p, m in model.named_modules() if _is_transposed_linear(m)]


def linearize_(model: nn.Module) -> list[str]:
    """Replace every Hugging Face ``Conv1D`` of ``model`` (in place) by the equal ``nn.Linear``; returns their
    paths. Weight tying to other modules is not affected (``Conv1D`` weights are never tied)."""
    done = []
    for path in transposed_linears(model):
        m = model.get_submodule(path)
        w = m.weight.detach()
        lin = nn.Linear(w.shape[0], w.shape[1], bias=m.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.t())
            if m.bias is not None:
                lin.bias.copy_(m.bias.detach())
        lin.train(m.training)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, lin)
        done.append(path)
    return done


__all__ = ["linearize_", "transposed_linears"]
