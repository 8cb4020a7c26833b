"""Measured layer latencies for latency-aware channel allocation.

The allocator's default latency estimate is an analytic proxy
(:meth:`prunekit.surgery.graph.CostModel.latency`). It cannot know how fast this machine runs a given
convolution: on a small CPU, a 3x3 convolution with 8-16 channels on a 32x32 map runs at about half the
multiply-add rate of one with 64 channels on an 8x8 map, and a strided 1x1 shortcut is memory-bound.
With ``latency_aware="measured"`` the allocator instead times every conv / linear layer of the model
(followed by a batch norm and a ReLU where its output channels are normalised, and by an addition where
they are summed with other producers') at full width and with each channel group one rounding step
narrower, on this machine, at the batch size the model will run at; the time saved per removed channel
weighs that group's channels in the global ranking (as latency look-up tables do in latency-constrained
pruning, e.g. HALP).

Timings run in a short-lived worker process (``python -m prunekit.surgery.latency``) whose allocator
is kept warm, so that they do not depend on the caller's allocation history; they are kept in memory
and, unless disabled, in a JSON file per machine and torch version (``$PRUNEKIT_LATENCY_CACHE``: a
directory, or ``0`` to disable; default ``$XDG_CACHE_HOME/prunekit/latency``), so that repeated runs
on one machine allocate identically and do not time the same layer twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from prunekit.surgery.cost import TensorCost
    from prunekit.surgery.graph import ChannelGraph


RUNTIMES = ("eager", "onnxruntime")  # where a LatencyTable times layers


@dataclass(frozen=True)
class LayerSpec:
    """One conv / linear layer as timed: its type, channels, hyper-parameters and input size."""

    kind: str  # "conv1d" / "conv2d" / "conv3d" / "linear"
    in_features: int
    out_features: int
    in_shape: tuple[int, ...]  # conv: spatial size of the input; linear: leading dims (e.g. tokens)
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    norm_act: bool = False  # a batch norm + ReLU over the output
    add: bool = False  # an addition of another tensor of the output's shape (residual sums)

    def key(self, batch: int, threads: int) -> str:
        return (
            f"{self.kind}|{self.in_features}|{self.out_features}|{self.in_shape}|{self.kernel}|{self.stride}|"
            f"{self.padding}|{self.dilation}|{self.groups}|{int(self.norm_act)}{int(self.add)}|b{batch}|t{threads}"
        )


def _machine_fingerprint() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cap = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old torch
        cap = "?"
    text = f"{cpu}|{os.cpu_count()}|{cap}|torch {torch.__version__}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def default_cache_file() -> Path | None:
    """Where measured timings persist (None when ``$PRUNEKIT_LATENCY_CACHE`` is ``0``)."""
    env = os.environ.get("PRUNEKIT_LATENCY_CACHE")
    if env is not None and env.strip().lower() in ("0", "", "no", "false", "off"):
        return None
    if env:
        base = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "prunekit" / "latency"
    return base / f"{_machine_fingerprint()}.json"


class LatencyTable:
    """CPU wall time (ms, fastest run) of single layers, measured on demand and memoised.

    Args:
        batch_size: examples per timed forward pass (the batch the pruned model is meant to run at).
        threads: ``torch.set_num_threads`` during timing (None: the current setting).
        repeats / warmup: timed and untimed runs per layer; timing stops early once ``budget_s`` seconds
            of timed runs have accumulated (at least three are always timed).
        cache_file: a JSON file to read timings from and add them to; ``"default"``:
            :func:`default_cache_file`; None: memory only.
        runtime: ``"eager"`` (PyTorch) or ``"onnxruntime"``: each layer exported alone to ONNX (its batch norm
            folded into it, so only a bias is left) and run in an ONNX Runtime session with all graph
            optimisations, as :func:`prunekit.export` models are deployed. Timings are kept per runtime.
    """

    def __init__(
        self,
        batch_size: int = 64,
        threads: int | None = None,
        repeats: int = 25,
        warmup: int = 5,
        budget_s: float = 0.5,
        cache_file: str | os.PathLike | None = "default",
        runtime: str = "eager",
    ):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if runtime == "onnxruntime":
            _require_onnxruntime()
        self.runtime = runtime
        self._suffix = "" if runtime == "eager" else f"|onnxruntime {_require_onnxruntime().__version__}"
        if batch_size < 1 or repeats < 1 or warmup < 0:
            raise ValueError(f"need batch_size >= 1, repeats >= 1, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
        self.batch_size = int(batch_size)
        self.threads = threads
        self.repeats = int(repeats)
        self.warmup = int(warmup)
        self.budget_s = float(budget_s)
        self.cache_file = (
            default_cache_file() if cache_file == "default" else (Path(cache_file) if cache_file else None)
        )
        self._ms: dict[str, float] = {}
        self._dirty = False
        self.measured = 0  # layers timed by this table (not read from the cache)
        if self.cache_file is not None and self.cache_file.is_file():
            try:
                data = json.loads(self.cache_file.read_text())
                self._ms.update({str(k): float(v) for k, v in data.get("ms", {}).items()})
            except (OSError, ValueError, AttributeError):
                warnings.warn(f"prunekit: ignoring unreadable latency cache {self.cache_file}", stacklevel=2)

    def ms(self, spec: LayerSpec) -> float:
        """Time of ``spec`` in ms (measured now unless known)."""
        self.prefetch([spec])
        return self._ms[self._key(spec)]

    def _threads(self) -> int:
        return int(self.threads or torch.get_num_threads())

    def _key(self, spec: LayerSpec) -> str:
        return spec.key(self.batch_size, self._threads()) + self._suffix

    def prefetch(self, specs: list[LayerSpec]) -> None:
        """Time every spec not yet known, all in one worker process (see :func:`time_specs`)."""
        todo: dict[str, LayerSpec] = {}
        for spec in specs:
            todo.setdefault(self._key(spec), spec)
        todo = {k: s for k, s in todo.items() if k not in self._ms}
        if not todo:
            return
        args = (list(todo.values()), self.batch_size, self._threads(), self.repeats, self.warmup, self.budget_s)
        times = _time_in_worker(*args, runtime=self.runtime)
        if times is None:  # no worker (frozen interpreter, no fork...): time here
            times = time_specs(*args, runtime=self.runtime)
        for key, ms in zip(todo, times):
            self._ms[key] = float(ms)
        self._dirty = True
        self.measured += len(todo)

    def save(self) -> None:
        """Write new timings to the cache file (silently skipped where it cannot be written)."""
        if self.cache_file is None or not self._dirty:
            return
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            old: dict[str, float] = {}
            if self.cache_file.is_file():
                try:
                    old = json.loads(self.cache_file.read_text()).get("ms", {})
                except (OSError, ValueError, AttributeError):
                    old = {}
            tmp = self.cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"torch": torch.__version__, "ms": {**old, **self._ms}}, indent=0))
            tmp.replace(self.cache_file)
            self._dirty = False
        except OSError:
            pass


# --------------------------------------------------------------------------------------------- timing
# glibc returns large freed blocks to the system after every forward pass by default, so timings taken
# in a long-lived process depend on its allocation history (page faults on every call, or none). The
# worker process disables that (the variables only affect glibc; elsewhere they are ignored), so every
# layer is timed in the same, steady state.
_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}


def time_specs(
    specs: list[LayerSpec],
    batch: int,
    threads: int,
    repeats: int = 25,
    warmup: int = 5,
    budget_s: float = 0.5,
    passes: int = 2,
    runtime: str = "eager",
) -> list[float]:
    """Fastest timed run (ms) of each spec: ``passes`` passes over all specs (the second in reverse
    order, so that a slow spell of the machine does not hit the same specs twice), each with ``warmup``
    untimed and up to ``repeats`` timed runs per spec; a spec's timing in a pass stops early after
    ``budget_s`` seconds of timed runs (at least three are timed). ``runtime``: see :class:`LatencyTable`."""
    old = torch.get_num_threads()
    best = [math.inf] * len(specs)
    try:
        torch.set_num_threads(int(threads))
        for p in range(max(1, int(passes))):
            order = range(len(specs)) if p % 2 == 0 else reversed(range(len(specs)))
            for i in order:
                # built per use: only one layer's tensors (and ONNX Runtime session) live at a time
                fn, x = _build(specs[i], batch) if runtime == "eager" else _build_ort(specs[i], batch, threads)
                with torch.inference_mode():
                    for _ in range(warmup):
                        fn(x)
                    times: list[float] = []
                    while len(times) < repeats:
                        t0 = time.perf_counter()
                        fn(x)
                        times.append(time.perf_counter() - t0)
                        if len(times) >= 3 and sum(times) > budget_s:
                            break
                best[i] = min(best[i], min(times) * 1000.0)
    finally:
        torch.set_num_threads(old)
    return best


def _time_in_worker(
    specs: list[LayerSpec], batch: int, threads: int, repeats: int, warmup: int, budget_s: float,
    runtime: str = "eager",
) -> list[float] | None:
    payload = json.dumps({
        "specs": [dataclasses.asdict(s) for s in specs], "batch": batch, "threads": threads,
        "repeats": repeats, "warmup": warmup, "budget_s": budget_s, "runtime": runtime,
    })
    env = {**os.environ, **_WORKER_ENV, "OMP_NUM_THREADS": str(threads)}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "prunekit.surgery.latency"], input=payload, capture_output=True, text=True,
            env=env, timeout=3600,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        warnings.warn(f"prunekit: latency worker failed ({proc.stderr.strip()[-300:]}); timing in this process",
                      stacklevel=3)
        return None
    try:
        times = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return [float(t) for t in times] if isinstance(times, list) and len(times) == len(specs) else None


def _worker_main() -> None:
    job = json.loads(sys.stdin.read())
    specs = []
    for d in job["specs"]:
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        specs.append(LayerSpec(**d))
    times = time_specs(specs, job["batch"], job["threads"], job["repeats"], job["warmup"], job["budget_s"],
                       runtime=job.get("runtime", "eager"))
    print(json.dumps(times))


def _build(spec: LayerSpec, batch: int) -> tuple[Any, torch.Tensor]:
    """A function running the layer (and its norm + ReLU and residual addition) and a random input for it."""
    if spec.kind == "linear":
        layer: nn.Module = nn.Linear(spec.in_features, spec.out_features)
        x = torch.randn(batch, *spec.in_shape, spec.in_features)
        return layer.eval(), x
    conv_cls = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[spec.kind]
    layer = conv_cls(
        spec.in_features, spec.out_features, spec.kernel, stride=spec.stride, padding=spec.padding,
        dilation=spec.dilation, groups=spec.groups,
    ).eval()
    x = torch.randn(batch, spec.in_features, *spec.in_shape)
    if not (spec.norm_act or spec.add):
        return layer, x
    mean = torch.zeros(spec.out_features)
    var = torch.ones(spec.out_features)
    with torch.no_grad():
        other = layer(x) if spec.add else None

    def fn(inp: torch.Tensor) -> torch.Tensor:
        y = layer(inp)
        if spec.norm_act:
            y = F.batch_norm(y, mean, var, var, mean, False)
        if other is not None:
            y = y + other
        return F.relu(y) if spec.norm_act else y

    return fn, x


class _Deployed(nn.Module):
    """One layer as deployed: the conv / linear (batch norm folded into its bias), the residual addition of
    a second input, the ReLU."""

    def __init__(self, layer: nn.Module, spec: LayerSpec):
        super().__init__()
        self.layer = layer
        self.add = spec.add
        self.act = spec.norm_act

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        y = self.layer(x)
        if other is not None:
            y = y + other
        return F.relu(y) if self.act else y


def _require_onnxruntime() -> Any:
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        from prunekit.errors import PruningError

        raise PruningError(f"latency measured in ONNX Runtime needs onnx and onnxruntime ({e.name} is missing): "
                           "pip install 'prunekit[deploy]', or use latency_aware='measured' (eager PyTorch)"
                           ) from None
    return onnxruntime


def _build_ort(spec: LayerSpec, batch: int, threads: int) -> tuple[Any, Any]:
    """An ONNX Runtime session running the layer of ``spec`` (see :class:`_Deployed`) and its inputs."""
    import io

    ort = _require_onnxruntime()
    fn, x = _build(dataclasses.replace(spec, norm_act=False, add=False), batch)
    module = _Deployed(fn, spec).eval()
    inputs = (x, torch.randn(module.layer(x).shape)) if spec.add else (x,)
    names = ["x", "other"][: len(inputs)]
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, buf, input_names=names, output_names=["y"], dynamo=False)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(buf.getvalue(), sess_options=opts, providers=["CPUExecutionProvider"])
    feed = {n: t.numpy() for n, t in zip(names, inputs)}
    return (lambda _x: sess.run(None, feed)), x


# --------------------------------------------------------------------------------------------- model layers
@dataclass
class _Layer:
    module: nn.Module
    in_shape: tuple[int, ...]
    norm_act: bool
    add: bool


def model_layers(model: nn.Module, graph: ChannelGraph) -> dict[str, _Layer]:
    """Conv / linear modules by path, with their input sizes from one forward pass at batch 1."""
    from prunekit.metrics._common import eval_mode, example_input

    normed = {p for g in graph.groups.values() if g.norms for p in g.producers + g.depthwise}
    # a group with n producers sums n tensors (residual connections): n - 1 additions, one per producer after the first
    summed = {p for g in graph.groups.values() if g.kind == "channels" for p in g.producers[1:]}
    layers: dict[str, _Layer] = {}
    hooks = []
    for path, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):

            def hook(mod: nn.Module, inp: Any, out: Any, path: str = path) -> None:
                x = inp[0]
                shape = tuple(x.shape[2:]) if not isinstance(mod, nn.Linear) else tuple(x.shape[1:-1])
                layers.setdefault(path, _Layer(mod, tuple(int(s) for s in shape), path in normed, path in summed))

            hooks.append(m.register_forward_hook(hook))
    try:
        from prunekit.surgery.inputs import ExampleInputs, run_model

        spec = graph.input_shape
        x = spec.first(1) if isinstance(spec, ExampleInputs) else example_input(model, spec, 1)
        with eval_mode(model), torch.inference_mode():
            run_model(model, x)
    finally:
        for h in hooks:
            h.remove()
    return layers


def _spec(layer: _Layer, out: int, cin_per_group: int) -> LayerSpec:
    m = layer.module
    if isinstance(m, nn.Linear):
        return LayerSpec("linear", int(cin_per_group), int(out), layer.in_shape)
    kind = "conv1d" if isinstance(m, nn.Conv1d) else "conv3d" if isinstance(m, nn.Conv3d) else "conv2d"
    groups = int(m.groups)
    if groups > 1 and groups == m.in_channels == m.out_channels:  # depthwise: channels and groups move together
        groups, cin = int(out), int(out)
    else:
        cin = int(cin_per_group) * groups
    padding = m.padding if isinstance(m.padding, str) else tuple(m.padding)
    return LayerSpec(
        kind, cin, int(out), layer.in_shape, tuple(m.kernel_size), tuple(m.stride), tuple(padding),
        tuple(m.dilation), groups, layer.norm_act, layer.add,
    )


def layer_spec(layers: dict[str, _Layer], t: TensorCost, widths: dict[str, int]) -> LayerSpec | None:
    """The spec of the layer owning weight ``t`` (see :func:`model_layers`) under full group ``widths``;
    None for a layer the forward pass did not reach or an empty shape."""
    layer = layers.get(t.path.rpartition(".")[0])
    sizes = t.sizes(widths)
    if layer is None or len(sizes) < 2 or min(sizes[:2]) < 1:
        return None
    return _spec(layer, int(sizes[0]), int(sizes[1]))


def measured_channel_savings(
    model: nn.Module,
    graph: ChannelGraph,
    keys: list[str],
    steps: list[int],
    widths: dict[str, int],
    table: LatencyTable,
) -> list[float]:
    """Measured time (ms) saved per removed channel when group ``keys[i]`` loses ``steps[i]`` channels
    from ``widths`` (all other groups unchanged): the sum over the layers whose shape depends on the
    group of their timing before minus after, divided by the step. Layers the table cannot time keep
    no saving (the caller falls back to the proxy for groups without any)."""
    cost = graph.cost
    tensors: list[TensorCost] = cost.latency_tensors() if cost is not None else []
    layers = model_layers(model, graph)
    index = {k: i for i, k in enumerate(keys)}
    touching: list[list[TensorCost]] = [[] for _ in keys]
    for t in tensors:
        for k in {k for _, terms in t.dims.values() for k, _ in terms if k in index}:
            touching[index[k]].append(t)

    full = {id(t): layer_spec(layers, t, widths) for t in tensors}
    jobs: list[tuple[int, list[tuple[LayerSpec, LayerSpec]]]] = []  # (channels removed, (before, after) per layer)
    for i, (k, step) in enumerate(zip(keys, steps)):
        step = max(1, min(int(step), widths[k] - 1))
        reduced = {**widths, k: widths[k] - step}
        ps = []
        for t in touching[i] if widths[k] > 1 else []:
            a, b = full[id(t)], layer_spec(layers, t, reduced)
            if a is not None and b is not None:
                ps.append((a, b))
        jobs.append((step, ps))
    table.prefetch([sp for _, ps in jobs for pair in ps for sp in pair])
    out = [max(sum(table.ms(a) - table.ms(b) for a, b in ps), 0.0) / step if ps else 0.0 for step, ps in jobs]
    table.save()
    return out


if __name__ == "__main__":  # the timing worker (see _time_in_worker)
    _worker_main()
