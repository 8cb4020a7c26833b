"""FLOP counts in multiply-adds (MACs) for one example, dense and skipping zero weights."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.utils.flop_counter
from torch.utils.flop_counter import FlopCounterMode

from prunekit.metrics._common import (
    InputShape,
    MetricsError,
    batch_size_of,
    check_model,
    eval_mode,
    example_input,
)


@dataclass
class LayerMacs:
    """Weight multiply-adds of one call of a conv / linear / multi-head-attention layer (whole batch)."""

    name: str
    module: nn.Module
    dense: int  # multiply-adds if every weight were non-zero
    zero_skipped: int  # multiply-adds that involve a zero weight


def _uses_per_weight(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int | None:
    """How many multiply-adds each weight entry takes part in during this call (None: not a layer
    this module knows how to count)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        spatial = len(module.kernel_size)
        # a weight entry meets every output position of its channel (transposed: every input position)
        ref = inp if module.transposed else out
        positions = math.prod(ref.shape[-spatial:])
        lead = ref.numel() // max(1, positions * ref.shape[-spatial - 1])  # batch size (1 if unbatched)
        return int(positions * lead)
    if isinstance(module, nn.Linear):
        return int(out.numel() // max(1, out.shape[-1]))
    return None


def _weight_cost(parts: list[tuple[torch.Tensor | None, int]]) -> tuple[int, int]:
    """(dense, zero-skipped) multiply-adds of weights each used ``uses`` times."""
    dense = zeros = 0
    for w, uses in parts:
        if isinstance(w, torch.Tensor):
            dense += w.numel() * uses
            zeros += (w.numel() - int(torch.count_nonzero(w))) * uses
    return dense, zeros


def _mha_cost(
    module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[int, int]:
    """Projection multiply-adds of ``nn.MultiheadAttention`` (the attention matmuls are not weights)."""
    names = ("query", "key", "value")
    q, k, v = (args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))
    e = module.embed_dim
    nq = q.numel() // e
    nk = k.numel() // module.kdim
    nv = v.numel() // module.vdim
    w_in = module.in_proj_weight
    if w_in is not None:
        parts = [(w_in[:e], nq), (w_in[e : 2 * e], nk), (w_in[2 * e :], nv)]
    else:
        parts = [(module.q_proj_weight, nq), (module.k_proj_weight, nk), (module.v_proj_weight, nv)]
    parts.append((module.out_proj.weight, nq))
    return _weight_cost(parts)


def _attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs (2 per multiply-add) of ``softmax(q @ k^T) @ v`` for shapes ``(..., L, E)``, ``(..., S, E)``,
    ``(..., S, Ev)``; batch / head dimensions are those of the query (grouped KV heads broadcast)."""
    *lead, length, e = query_shape
    s, ev = key_shape[-2], value_shape[-1]
    return 2 * math.prod(lead) * length * s * (e + ev)


def _mv_flops(a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of a matrix-vector product (``nn.Linear`` on a 1-D input)."""
    return 2 * a_shape[0] * a_shape[1]


def _extra_formulas() -> dict[Any, Any]:
    """Formulas for ops the installed ``FlopCounterMode`` does not know: the fused CPU attention
    kernels (so attention matmuls count on every device) and ``mv``."""
    known = torch.utils.flop_counter.flop_registry
    extra: dict[Any, Any] = {}
    wanted = {
        "_scaled_dot_product_flash_attention_for_cpu": _attention_flops,
        "_scaled_dot_product_fused_attention_overrideable": _attention_flops,
        "mv": _mv_flops,
    }
    for op_name, formula in wanted.items():
        op = getattr(torch.ops.aten, op_name, None)
        if op is not None and op not in known:
            extra[op] = formula
    return extra


@contextmanager
def _no_fused_attention() -> Iterator[None]:
    """Turn off the fused ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` inference fast
    path, whose single kernel the counter cannot see into; the regular path is counted op by op."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    old = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(old)


def _run_counted(
    model: nn.Module, input_shape: InputShape, track_layers: bool
) -> tuple[int, int, list[LayerMacs]]:
    """Run one forward pass under ``FlopCounterMode``; return (total FLOPs, batch size, layers)."""
    check_model(model)
    from prunekit.surgery.inputs import ExampleInputs, run_model

    if isinstance(input_shape, ExampleInputs):  # several / keyword inputs (see prunekit.surgery.inputs)
        x: Any = input_shape.to(next((p.device for p in model.parameters()), torch.device("cpu")))
    else:
        x = example_input(model, input_shape)
    layers: list[LayerMacs] = []
    handles = []
    if track_layers:
        names = {id(m): n for n, m in model.named_modules()}

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            if isinstance(module, nn.MultiheadAttention):
                dense, zeros = _mha_cost(module, args, kwargs)
            else:
                inp = args[0] if args else kwargs.get("input")
                if not isinstance(inp, torch.Tensor) or not isinstance(out, torch.Tensor):
                    return
                uses = _uses_per_weight(module, inp, out)
                if uses is None:
                    return
                dense, zeros = _weight_cost([(getattr(module, "weight", None), uses)])
            layers.append(LayerMacs(names.get(id(module), ""), module, dense, zeros))

        for m in model.modules():
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)):
                handles.append(m.register_forward_hook(hook, with_kwargs=True))
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    try:
        with eval_mode(model), torch.no_grad(), _no_fused_attention(), counter:
            run_model(model, x)  # any output structure: only the operations are counted
    except MetricsError:
        raise
    except Exception as e:  # a shape mismatch is the usual cause
        if isinstance(x, ExampleInputs):
            shape: Any = repr(x)
        else:
            shape = tuple(x.shape[1:]) if not isinstance(input_shape, torch.Tensor) else tuple(x.shape)
        raise MetricsError(
            f"forward pass for FLOP counting failed with input shape {shape}: {type(e).__name__}: {e}"
        ) from e
    finally:
        for h in handles:
            h.remove()
    batch = x.batch_size if isinstance(x, ExampleInputs) else batch_size_of(x)
    return int(counter.get_total_flops()), batch, layers


def count_flops(model: nn.Module, input_shape: InputShape = (3, 32, 32)) -> int:
    """Dense multiply-adds of ``model`` for ONE example of shape ``input_shape`` (e.g. ``(C, H, W)``).

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (its FLOPs / 2) on a zero input in
    eval mode without gradients: convolutions, linear layers and matrix products (``mm``,
    ``bmm``, scaled-dot-product attention, including the fused CPU kernel); element-wise ops,
    norms and pooling are free. The fused ``nn.MultiheadAttention`` inference fast path is
    switched off while counting so that its matmuls are seen. ``input_shape`` may also be an
    example batch tensor or :class:`prunekit.surgery.inputs.ExampleInputs` (several positional /
    keyword inputs); the count is then per example. Outputs may have any structure.
    """
    total, batch, _ = _run_counted(model, input_shape, track_layers=False)
    return total // 2 // batch


def layer_macs(model: nn.Module, input_shape: InputShape = (3, 32, 32)) -> list[LayerMacs]:
    """Per-call weight multiply-adds of every conv / linear / multi-head-attention layer for one forward
    pass on ``input_shape`` (``dense`` and ``zero_skipped``; summed over the batch)."""
    return _run_counted(model, input_shape, track_layers=True)[2]


def effective_flops(model: nn.Module, input_shape: InputShape = (3, 32, 32)) -> int:
    """Multiply-adds of ``model`` for ONE example when multiplications by zero weights are skipped.

    Each conv / linear layer (and each ``nn.MultiheadAttention`` projection) costs its dense
    multiply-adds times its fraction of non-zero weights; for a convolution this is, per output
    channel, the non-zero weights of that channel times the output positions. Everything else
    (attention score matmuls, weights used through the functional API) counts dense, as in
    :func:`count_flops`. Pruning masks and parametrizations are honoured (the effective weight
    is inspected).
    """
    total, batch, layers = _run_counted(model, input_shape, track_layers=True)
    skipped = sum(layer.zero_skipped for layer in layers)
    return max(0, total // 2 - skipped) // batch
