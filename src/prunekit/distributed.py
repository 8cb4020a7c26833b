"""Data-parallel runs on ``torch.distributed``: what prunekit does differently under ``torchrun``.

``torchrun --nproc-per-node N -m prunekit train ...`` starts N processes with ``RANK`` /
``WORLD_SIZE`` / ``MASTER_ADDR`` in their environment; :func:`init_from_env` joins them into one
process group (gloo on CPU, nccl on CUDA). Then

* every rank reads its own part of each global batch (:class:`~prunekit.data.BatchLoader` with
  ``rank`` / ``world_size``): one global order per epoch, global batch ``k`` is the examples
  ``k*B*N .. (k+1)*B*N`` of it and rank ``r`` takes the ``r``-th slice of ``B``, so ``N`` ranks at
  batch ``B`` see exactly what one process at batch ``N*B`` sees;
* the :class:`~prunekit.train.Trainer` wraps the model in ``DistributedDataParallel`` (gradients
  averaged over ranks), sums its epoch metrics over ranks, shows its progress bar and writes its
  checkpoints on rank 0 only;
* commands write their outputs on rank 0 only (:func:`is_main`).

BatchNorm statistics are each rank's own (as with plain DDP on CPU; ``SyncBatchNorm`` needs CUDA).
Without ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing here does anything.
"""

from __future__ import annotations

import atexit
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from prunekit.errors import ConfigError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a plain single-process run): the rank that writes outputs."""
    return rank() == 0


def active() -> bool:
    return world_size() > 1


def init_from_env(device: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment; False when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if dist.is_initialized():
        return True
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    use_cuda = (device or "").startswith("cuda") or (device in (None, "auto") and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"could not join the torchrun process group ({backend}): {e}") from None
    atexit.register(shutdown, wait=False)  # a process that exits with gloo's threads alive dies in std::terminate
    return True


def shutdown(wait: bool = True) -> None:
    """Leave the process group (a no-op outside torchrun or when already left).

    ``wait``: first wait at a barrier until every rank got here, so no rank tears the group down while
    another still talks to it; the exit hook :func:`init_from_env` registers leaves without waiting
    (after an error the other ranks may never reach a barrier).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait and world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_same(obj: Any, what: str) -> None:
    """Raise on every rank if ``obj`` (a JSON-like value) differs between ranks."""
    if not active():
        return
    objs: list[Any] = [None] * world_size()
    dist.all_gather_object(objs, obj)
    if any(o != objs[0] for o in objs):
        raise ConfigError(f"{what} differs between ranks; every rank must see the same data and seeds")


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` under torchrun, else unchanged."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    return DistributedDataParallel(model, device_ids=ids)


__all__ = ["active", "all_reduce_sum", "barrier", "broadcast_object", "check_same", "init_from_env", "is_main",
           "rank", "shutdown", "world_size", "wrap"]
