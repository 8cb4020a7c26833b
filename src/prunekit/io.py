"""Saving and loading (pruned) models without pickled classes.

A checkpoint is a plain dictionary of tensors, numbers and strings that
``torch.load(..., weights_only=True)`` accepts:

``format``/``format_version``
    identify the file as a prunekit checkpoint;
``arch``
    the zoo name and constructor options (``model.prunekit_config``);
``modules``
    a spec (type + constructor arguments) of every layer whose shape or type is
    not what the constructor builds -- what pruning changed. Loading builds the
    architecture, then replays these specs, then loads the state dict strictly.
    Pruned models are thus "the original architecture plus recorded shapes";
``tensor_shapes``
    shapes of parameters / buffers that differ from the unpruned architecture
    (needed for free parameters such as a ViT's ``cls_token`` / ``pos_embed``);
``state_dict``
    the weights (masks baked in);
``masks``
    the boolean masks of masked (reversible) pruning, re-applied on load;
``meta``
    free-form JSON-like metadata (dataset, metrics, pruning report, ...).
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from prunekit._version import __version__
from prunekit.errors import CheckpointError, PrunekitError
from prunekit.specs import _SHAPE_ATTRS, _SPECS, conv_geometry, module_spec, register_module_spec  # noqa: F401  (re-exported)

FORMAT = "prunekit-checkpoint"
FORMAT_VERSION = 1

def _model_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    out = {}
    for path, m in model.named_modules():
        if path and (s := module_spec(m)) is not None:
            out[path] = s
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def _effective_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """State dict with parametrizations / prune masks folded in, plus the masks themselves."""
    from prunekit.surgery.masks import baked_state_and_masks  # local: surgery imports io

    return baked_state_and_masks(model)


def save(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (pruned or not) to ``path`` atomically; returns the path.

    The model must come from :func:`prunekit.create_model` (or :func:`load`), so that
    its architecture can be rebuilt without pickling its class.
    """
    model = _unwrap(model)
    cfg = getattr(model, "prunekit_config", None)
    if cfg is None:
        raise CheckpointError(
            "prunekit.save needs a model built by prunekit.create_model (it records the architecture in "
            "model.prunekit_config); for other models save model.state_dict() with torch.save"
        )
    state, masks = _effective_state_dict(model)
    base = _build_base(cfg)
    base_specs = _model_specs(base)
    changed = {p: s for p, s in _model_specs(model).items() if base_specs.get(p) != s}
    base_state = base.state_dict()
    reshaped = {k: list(v.shape) for k, v in state.items()
                if k in base_state and tuple(base_state[k].shape) != tuple(v.shape)}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "prunekit_version": __version__,
        "arch": cfg,
        "modules": changed,
        "tensor_shapes": reshaped,
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "masks": {k: v.detach().cpu() for k, v in masks.items()},
        "meta": meta or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path.parent, path.name, min_age_s=600)  # a killed save's leftovers (not a live writer's)
    with atomic_file(path) as f:
        torch.save(payload, f)
    return path


# --------------------------------------------------------------------------------------------- atomic files
TMP_SUFFIX = ".tmp"


def _tmp_prefix(name: str) -> str:
    return f".{name}."


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class atomic_file:  # noqa: N801 - used like open()
    """``with atomic_file(path) as f: f.write(...)``: write ``path`` as a whole or not at all.

    The data goes to a hidden temporary file beside ``path`` (``.NAME.<random>.tmp``), is flushed and
    fsynced, gets the usual permissions (``0666`` minus the umask, not mkstemp's ``0600``), and then
    replaces ``path`` with ``os.replace``; an exception removes the temporary file. A process killed
    mid-write leaves ``path`` as it was and at most a ``*.tmp`` file, which :func:`clean_stale_tmp`
    removes and every reader ignores.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "wb"):
        if mode not in ("wb", "w"):
            raise ValueError("atomic_file writes: mode 'w' or 'wb'")
        self.path, self.mode = Path(path), mode
        self.tmp: str | None = None

    def __enter__(self) -> Any:
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=_tmp_prefix(self.path.name),
                                        suffix=TMP_SUFFIX)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        except (AttributeError, OSError):  # pragma: no cover - not POSIX
            pass
        self.f = os.fdopen(fd, self.mode, **({"encoding": "utf-8", "newline": ""} if self.mode == "w" else {}))
        return self.f

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self.tmp is not None
        try:
            if exc_type is None:
                self.f.flush()
                os.fsync(self.f.fileno())
            self.f.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
                _fsync_dir(self.path.parent)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def writable_dir(out: str | os.PathLike, error: type[Exception] = PrunekitError) -> Path:
    """``--out``: a directory that can be created and written, checked before any work; else ``error`` (exit 2)
    naming the problem."""
    import tempfile

    path = Path(out)
    try:
        if path.exists() and not path.is_dir():
            raise error(f"--out {str(path)!r} is an existing file, not a directory; give a directory")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".prunekit-write-test-"):
            pass
    except PrunekitError:
        raise
    except (OSError, ValueError) as e:
        raise error(f"--out {str(path)!r} cannot be written: {getattr(e, 'strerror', None) or e}") from None
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :class:`atomic_file`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        f.write(text)
    return path


def clean_stale_tmp(directory: str | os.PathLike, name: str | None = None, min_age_s: float = 0.0) -> list[Path]:
    """Remove temporary files an interrupted :class:`atomic_file` left in ``directory`` (for the file
    ``name`` only, when given; only those older than ``min_age_s`` seconds); returns what was removed."""
    import time

    d = Path(directory)
    if not d.is_dir():
        return []
    pattern = f"{_tmp_prefix(name)}*{TMP_SUFFIX}" if name else f".*{TMP_SUFFIX}"
    removed = []
    now = time.time()
    for p in d.glob(pattern):
        try:
            if p.is_file() and now - p.stat().st_mtime >= min_age_s:
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_fingerprint(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (sorted names, dtypes, shapes and the tensors' bytes).

    Identifies a model by its *content*: the same weights give the same fingerprint wherever the file
    lives, and any changed weight, buffer or shape gives another one. Masked models are fingerprinted with
    their masks folded in, so a masked and a baked copy of one pruned model agree.
    """
    import hashlib

    try:
        state, _ = _effective_state_dict(_unwrap(model))
    except Exception:  # noqa: BLE001 - a model prunekit cannot bake: its plain state dict
        state = _unwrap(model).state_dict()
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{tuple(state[name].shape)}:{t.dtype};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_with_metrics(model: nn.Module, out: str | os.PathLike, metrics: dict[str, Any],
                      meta: dict[str, Any] | None = None, model_name: str = "model.pt",
                      metrics_name: str = "metrics.json") -> tuple[Path, Path]:
    """Write ``OUT/model.pt`` and ``OUT/metrics.json`` as a pair.

    Both are written to temporary files first (fsynced, usual permissions); then the checkpoint and the
    metrics are renamed into place. The metrics record the checkpoint's ``model_sha256`` (and the
    checkpoint's meta holds the metrics), so a reader can tell a matching pair from one a killed run left
    half-replaced (:func:`read_metrics` checks it). Leftover temporary files of an earlier killed run are
    removed first.
    """
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staged = {n: f"{_tmp_prefix(n)}pair{TMP_SUFFIX}" for n in (model_name, metrics_name)}
    for n in (model_name, metrics_name, *staged.values()):  # a killed earlier run's leftovers, nested ones too
        clean_stale_tmp(out, n)
    for n in staged.values():
        (out / n).unlink(missing_ok=True)
    meta = {**(meta or {}), "metrics": json.loads(json.dumps(metrics, default=str))}
    model_tmp = out / staged[model_name]
    save(model, model_tmp, meta=meta)
    try:
        metrics = {**metrics, "file_size": model_tmp.stat().st_size, "model_sha256": file_sha256(model_tmp),
                   "model_file": model_name}
        metrics_tmp = out / staged[metrics_name]
        atomic_write_text(metrics_tmp, json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(model_tmp, out / model_name)
        os.replace(metrics_tmp, out / metrics_name)
        _fsync_dir(out)
    finally:
        for n in staged.values():
            (out / n).unlink(missing_ok=True)
    return out / model_name, out / metrics_name


def read_metrics(out: str | os.PathLike, metrics_name: str = "metrics.json") -> dict[str, Any]:
    """``OUT/metrics.json``, checked against the checkpoint it describes (``model_sha256``).

    Raises :class:`~prunekit.errors.CheckpointError` when the file is missing or unreadable, or when the
    checkpoint beside it is not the one the metrics were computed for (a run killed between the two renames).
    """
    import json

    out = Path(out)
    path = out / metrics_name
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is missing or not valid JSON: {e}") from None
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{str(path)!r} does not hold a JSON object")
    sha = metrics.get("model_sha256")
    if sha:
        model_path = out / str(metrics.get("model_file", "model.pt"))
        if not model_path.is_file() or file_sha256(model_path) != sha:
            raise CheckpointError(f"{str(path)!r} describes another checkpoint than {str(model_path)!r} "
                                  f"(sha256 {sha[:12]} recorded): the run that wrote them was interrupted; "
                                  "rerun it")
    return metrics


def _build_base(cfg: dict[str, Any]) -> nn.Module:
    from prunekit.models import create_model

    return create_model(cfg["name"], num_classes=cfg["num_classes"], in_channels=cfg["in_channels"],
                        **cfg.get("kwargs", {}))


# a recorded layer may not ask for more than this many weights (a crafted checkpoint must not make loading
# allocate without bound): 2^28 floats = 1 GiB, far beyond any layer prunekit writes
MAX_LAYER_ELEMENTS = 2**28


def _check_spec_size(spec: dict[str, Any], path: str) -> None:
    args = spec.get("args", {})
    if not isinstance(args, dict):
        raise CheckpointError(f"checkpoint layer {path!r}: its recorded arguments are not a mapping")
    dims = []
    for k, v in args.items():
        vals = v if isinstance(v, (list, tuple)) else [v]
        for x in vals:
            if isinstance(x, int) and not isinstance(x, bool):
                if x < 0 or x > MAX_LAYER_ELEMENTS:
                    raise CheckpointError(f"checkpoint layer {path!r}: {k}={v!r} is out of range")
                if k in ("in_channels", "out_channels", "in_features", "out_features", "num_features",
                         "num_channels", "kernel_size", "normalized_shape"):
                    dims.append(max(1, x))
    if math.prod(dims) > MAX_LAYER_ELEMENTS * max(1, int(args.get("groups", 1) or 1)):
        raise CheckpointError(f"checkpoint layer {path!r} asks for a layer of {math.prod(dims):,} weights "
                              f"(limit {MAX_LAYER_ELEMENTS:,}): the file is corrupt or crafted")


def _build_module(spec: dict[str, Any], path: str) -> nn.Module:
    if not isinstance(spec, dict):
        raise CheckpointError(f"checkpoint layer {path!r}: its spec is not a mapping")
    _check_spec_size(spec, path)
    entry = _SPECS.get(spec.get("type", ""))
    if entry is None:
        raise CheckpointError(f"checkpoint layer {path!r} has type {spec.get('type')!r}, which this version "
                              f"of prunekit cannot rebuild (known: {', '.join(sorted(_SPECS))})")
    args = dict(spec.get("args", {}))
    for k in ("kernel_size", "stride", "dilation", "normalized_shape"):
        if isinstance(args.get(k), list):
            args[k] = tuple(args[k])
    if isinstance(args.get("padding"), list):
        args["padding"] = tuple(args["padding"])
    if spec["type"] == "LayerNorm" and not args.get("bias", True) and torch.__version__ < "2.1":
        args.pop("bias")
    try:
        return entry[0](**args)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint layer {path!r}: cannot build {spec['type']}({args}): {e}") from None


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a checkpoint file (``weights_only=True``) without building the model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():  # torch's notes on a refused pickle (protocol, weights_only) are not ours
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint (corrupt, truncated, or a pickled "
                              f"object that weights_only loading refuses): {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = ""
        if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            hint = (" It looks like a bare state_dict: build the model with prunekit.create_model(...) and call "
                    "model.load_state_dict(torch.load(path, weights_only=True)).")
        raise CheckpointError(f"{str(path)!r} is not a prunekit checkpoint.{hint}")
    version = payload.get("format_version", 0)
    if not _is_int(version) or version < 0:
        raise CheckpointError(f"{str(path)!r} has format_version {version!r:.40}, not a version number: the file is "
                              "damaged")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} was written by a newer prunekit (format "
                              f"{payload.get('format_version')}); upgrade prunekit to read it")
    return payload


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entries(payload: dict[str, Any], source: str) -> None:
    """Every entry of a checkpoint has the type :func:`save` writes, else a :class:`CheckpointError` naming it
    (a crafted or confused file must not reach the model code with a list where a mapping belongs)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{source}: {what} (the file is damaged or was not written by prunekit.save)")

    arch = payload["arch"]
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) \
            or not all(_is_int(arch.get(k)) and 0 < arch[k] <= 2**20 for k in ("num_classes", "in_channels")) \
            or not isinstance(arch.get("kwargs", {}), dict):
        raise bad(f"its architecture entry {arch!r:.200} is not a mapping of name, num_classes, in_channels and "
                  "kwargs")
    for key, kind in (("state_dict", "tensors"), ("masks", "boolean tensors")):
        entry = payload.get(key, {})
        if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) and (key != "masks" or v.dtype == torch.bool)
                for k, v in entry.items()):
            raise bad(f"its {key} entry is not a mapping of names to {kind}")
    modules = payload.get("modules", {})
    if not isinstance(modules, dict):
        raise bad("its modules entry is not a mapping")
    for path, spec in modules.items():
        if not isinstance(path, str) or not isinstance(spec, dict) or not isinstance(spec.get("type", ""), str) \
                or not isinstance(spec.get("args", {}), dict) or not isinstance(spec.get("attrs", {}), dict):
            raise bad(f"layer {path!r:.80}: its spec {spec!r:.200} is not a mapping of type, args and attrs")
        for a, v in spec.get("attrs", {}).items():
            if a not in _SHAPE_ATTRS or not _is_int(v) or not 0 <= v <= MAX_LAYER_ELEMENTS:
                raise bad(f"layer {path!r}: attribute {a!r}={v!r:.40} is not a size prunekit records")
    for key in ("tensor_shapes", "meta"):
        if not isinstance(payload.get(key, {}), dict):
            raise bad(f"its {key} entry is not a mapping")
    dataset = payload.get("meta", {}).get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise bad(f"the dataset it records, {dataset!r:.60}, is not a name")


def model_from_checkpoint(payload: dict[str, Any], source: str = "checkpoint") -> nn.Module:
    """Rebuild the model stored in a checkpoint dictionary (see :func:`read_checkpoint`)."""
    missing = [k for k in ("arch", "state_dict") if k not in payload]
    if missing:
        raise CheckpointError(f"{source}: the checkpoint has no {' or '.join(missing)} entry (truncated or not "
                              "written by prunekit.save)")
    _check_entries(payload, source)
    try:
        return _rebuild(payload, source)
    except PrunekitError:
        raise
    except (TypeError, ValueError, AttributeError, IndexError, KeyError, RuntimeError, OverflowError) as e:
        # whatever else a crafted file gets wrong (a path that names no layer, a mask of another shape ...)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{source}: cannot rebuild the model it records ({type(e).__name__}: {first}); the "
                              "file is damaged or was not written by prunekit.save") from None


def _rebuild(payload: dict[str, Any], source: str) -> nn.Module:
    import prunekit.surgery  # noqa: F401  (registers the specs of prunekit's own layers, e.g. low-rank chains)
    from prunekit.errors import UnknownNameError

    try:
        model = _build_base(payload["arch"])
    except (UnknownNameError, KeyError, TypeError, AttributeError, PrunekitError) as e:
        raise CheckpointError(f"{source}: cannot rebuild its architecture {payload.get('arch')!r}: {e}") from None
    # replay parents before children so that replaced containers get their children afterwards
    for path, spec in sorted(payload.get("modules", {}).items(), key=lambda kv: kv[0].count(".")):
        try:
            current = model.get_submodule(path)
        except AttributeError:
            current = None
        if "args" in spec or current is None:
            if current is None or module_spec(current) != spec:
                _set_submodule(model, path, _build_module(spec, path))
        for a, v in spec.get("attrs", {}).items():
            setattr(model.get_submodule(path), a, v)
    _resize_tensors(model, payload.get("tensor_shapes", {}))
    masks = payload.get("masks", {})
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{source}: weights do not match the recorded architecture: "
                              f"{str(e).splitlines()[0]}") from None
    if masks:
        from prunekit.surgery.masks import apply_masks_

        apply_masks_(model, masks)
    model.prunekit_meta = payload.get("meta", {})
    return model


def _resize_tensors(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Give parameters / buffers that pruning reshaped outside any recorded module (e.g. a ViT's
    ``cls_token``) their saved shape, so that the state dict loads."""
    for name, shape in shapes.items():
        if (not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and 0 <= d for d in shape)
                or math.prod(shape) > MAX_LAYER_ELEMENTS):
            raise CheckpointError(f"checkpoint tensor {name!r}: recorded shape {shape!r} is invalid or too large")
        mod_path, _, attr = name.rpartition(".")
        try:
            mod = model.get_submodule(mod_path) if mod_path else model
        except AttributeError:
            continue
        cur = mod._parameters.get(attr)
        if cur is not None:
            if tuple(cur.shape) != tuple(shape):
                mod._parameters[attr] = nn.Parameter(cur.new_empty(tuple(shape)), requires_grad=cur.requires_grad)
            continue
        buf = mod._buffers.get(attr)
        if buf is not None and tuple(buf.shape) != tuple(shape):
            mod._buffers[attr] = buf.new_empty(tuple(shape))


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters / buffers that hold a NaN or an infinity."""
    return [name for name, t in model.state_dict().items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def load(path: str | os.PathLike, *, require_finite: bool = False) -> nn.Module:
    """Load a model saved by :func:`save`; ``model.prunekit_meta`` holds its metadata.

    Weights holding NaN or infinity (a diverged training, a damaged file) give a warning naming them, or with
    ``require_finite`` a :class:`CheckpointError`: such a model predicts one class whatever its input."""
    model = model_from_checkpoint(read_checkpoint(path), source=repr(str(path)))
    bad = nonfinite_tensors(model)
    if bad:
        msg = (f"checkpoint {str(path)!r} has NaN or infinite values in {len(bad)} tensor(s) ({', '.join(bad[:4])}"
               f"{', ...' if len(bad) > 4 else ''}): its outputs are meaningless (a diverged training or a damaged "
               "file)")
        if require_finite:
            raise CheckpointError(msg + "; retrain it or use another checkpoint")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return model
