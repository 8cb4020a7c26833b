"""Gradient-flow importance measures (Lubana & Dick, "A Gradient Flow Framework for Analyzing Network Pruning",
ICLR 2021), as filter (channel) scores.

Every measure scores filter ``i`` of a coupled channel group from ``theta_i``, the rows of the group's producer
weights (conv / linear output channels; a coupled residual group concatenates the rows of all its producers, so a
group-wide sum is a row sum), and from statistics of the loss gradient ``g`` averaged over ``imp_samples`` training
samples with BatchNorm in eval mode and logits divided by ``temperature``:

=========================  ==========================================================================
``gf_magnitude``           ``||theta_i||_2``
``gf_l1``                  ``||theta_i||_1``
``gf_bn``                  ``|gamma_i|`` of the BatchNorm(s) after the group's producers
``gf_loss``                ``sum_j |theta_ij g_ij|``
``gf_biased_loss``         ``sum_j |theta_ij g_ij| |theta_ij|`` (``use_init``: ``|theta_ij - theta0_ij|``)
``gf_tfo``                 ``|sum_j theta_ij g_ij|``
``gf_fisher``              ``sum_j theta_ij^2 E_batch[g_ij^2]``
``gf_nvidia``              ``gamma_i^2 E[g_gamma_i^2] + beta_i^2 E[g_beta_i^2]``
``gf_grasp``               ``sum_j theta_ij (Hg)_ij`` (signed; lowest removed; class-balanced data, T=200)
``gf_grad_preserve``       ``|sum_j theta_ij (Hg)_ij|`` (T=1)
``gf_biased_loss_tracked`` ``gf_biased_loss`` on each minibatch, EMA over the last ``track_batches``
=========================  ==========================================================================

Options shared by the family (every method's ``defaults``):

* ``track_batches`` / ``alpha``: score each of ``track_batches`` minibatches separately and keep the exponential
  moving average ``ema <- alpha * s_batch + (1 - alpha) * ema`` (first batch: ``ema = s``). In a one-shot prune
  the minibatches are the first ``track_batches`` of the prune set; in :func:`prunekit.prune_train.prune_and_train`
  they are the last ``track_batches`` training minibatches of each round (the seed's tracking).
* ``use_l2``: multiply the element-wise measure by ``|theta|`` before the row reduction (bias towards small
  magnitude; on by default for ``gf_biased_loss*``, which are ``gf_loss`` with this bias); ``use_init``: multiply
  by ``|theta - theta0|`` instead (it replaces the ``|theta|`` bias; towards small distance from the initial
  weights ``ctx.initial_state``, a state dict of the model's shapes -- a clear error if absent).
* ``normalize``: per-group score normalisation (``None``, ``"l2"``, ``"max"``, ``"mean"``) before the global
  ranking; default off, as in the seed (raw cross-layer ranking is scale-sensitive).
* ``keep_stem``: never prune the group fed by the first convolution (the seed never pruned the stem); the
  classifier's outputs are never a prunable group.
* ``min_width``: per-layer floor fraction, every group keeps ``floor(min_width * width) + 1`` channels of its
  original width (the allocator's ``BudgetOptions.floor``, 0.05; ``check`` sets the context's floor when the
  option is not the default).
* ``n_rounds``, ``prune_percent``, ``thresholds``, ``warmup_epochs``, ``preserve_moment``: defaults of the
  prune-and-train schedule, read by :func:`prunekit.prune_train.prune_and_train` where its own arguments are not
  given (a single scoring call ignores them).
* ``prune_percent`` in a one-shot prune (``prunekit.prune(model, "gf_loss", "ratio=0.5", data,
  prune_percent=0.5)``, ``prunekit prune --option prune_percent=0.5``): the seed's target, the fraction of *all*
  scored filters removed by one global ranking (per-layer floor ``min_width``); the engine's own ``ratio=F``
  removes F of every layer instead, and ``flops=X`` / ``params=X`` search a cost.
* ``norm_fallback`` (``gf_bn``, ``gf_nvidia``): a channel group without BatchNorm (LeNet, VGG without BN) is
  scored on its producer's own parameters -- the weights in place of ``gamma`` (``gf_bn`` then equals ``gf_l1``)
  and the bias in place of ``beta`` (``gf_nvidia``: ``sum_j theta_ij^2 E[g_ij^2] + b_i^2 E[g_b_i^2]``). Off by
  default: such a group is an error.

Scores of a coupled group are computed on the concatenated producer rows: additive measures are the sum over the
producers, ``gf_magnitude`` is the norm of the whole row and ``gf_tfo`` / ``gf_grad_preserve`` the absolute value
of the whole sum (the first-order change of removing the channel from every producer at once). Depthwise
convolutions never contribute: they follow the pointwise producer that feeds them (MobileNet), and the
BatchNorm after a depthwise convolution is likewise left out of ``gf_bn`` / ``gf_nvidia``.

Gradients are computed for all parameters of interest in one backward pass per batch; the Hessian-gradient
product ``Hg`` by double backward: ``g = grad(L)`` over the class-balanced set, then for every batch
``grad(grad(L_b, create_graph=True) . stop_grad(g))``. The peak memory of that pair is measured
(:class:`PeakMemory`: on CPU the peak of torch's own allocations from the profiler, plus the sampled RSS) and
reported in the plan's ``meta["grasp_memory"]``; every data-driven measure reports its scoring pass in
``meta["score_memory"]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import resource
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from prunekit.errors import PruningError
from prunekit.methods.base import ChannelScorer, PruneContext
from prunekit.methods.registry import register_method
from prunekit.surgery.inputs import as_example_inputs, cat_inputs
from prunekit.surgery.plan import Plan

PAPER = "Lubana & Dick, A Gradient Flow Framework for Analyzing Network Pruning, ICLR 2021"
NORMALIZATIONS = (None, "l2", "max", "mean")

#: options every gradient-flow method accepts (see the module docstring)
COMMON_DEFAULTS: dict[str, Any] = {
    "imp_samples": 2560,
    "temperature": 5.0,
    "grasp_T": 200.0,
    "track_batches": 0,
    "alpha": 0.8,
    "use_l2": False,
    "use_init": False,
    "normalize": None,
    "keep_stem": True,
    "min_width": 0.05,
    "norm_fallback": False,
    # prune-and-train schedule (prunekit.prune_train)
    "n_rounds": 1,
    "prune_percent": None,
    "thresholds": None,
    "warmup_epochs": 0,
    "preserve_moment": False,
}

Stats = dict[str, dict[str, torch.Tensor]]  # statistic name ("grad", "grad_sq", "hg") -> parameter path -> tensor


# --------------------------------------------------------------------------------------------- helpers
def is_depthwise(module: nn.Module) -> bool:
    """Whether ``module`` is a depthwise convolution (one filter per input channel)."""
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and module.groups == module.in_channels)


def entry_path(entry: Any) -> str:
    """Module path of a channel-graph entry: a string, a ``(path, ...)`` tuple or an object with ``.path``."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, tuple):
        return str(entry[0])
    return str(entry.path)


def group_rows(group: Any, path: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a tensor shaped like parameter ``path``) with one row per channel of ``group``: ``(size, n)``.

    Uses the group's member table (channel order, transposed convs) when it has one.
    """
    for mb in getattr(group, "members", ()) or ():
        if mb.tensor == path and mb.role in ("producer", "norm", "depthwise"):
            return t.movedim(mb.dim, 0)[mb.index.reshape(-1).to(t.device)].reshape(group.size, -1)
    if t.shape[0] != group.size:
        raise PruningError(f"parameter {path!r} has {t.shape[0]} rows but channel group {group.key!r} has "
                           f"{group.size} channels")
    return t.reshape(group.size, -1)


def first_conv_path(model: nn.Module) -> str | None:
    """Path of the model's stem: its first weight layer in registration order when that is a convolution (the
    zoo's CNNs, a ViT's patch embedding); None when the model begins with a linear layer or an embedding (an
    MLP, a language model, a generator's projection before its transposed convolutions)."""
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return path
        if isinstance(m, (nn.Linear, nn.Embedding)):
            return None
    return None


def _norm_sources(model: nn.Module) -> dict[str, str]:
    """BatchNorm path -> the conv / linear registered just before it (the layer it normalises)."""
    out, last = {}, None
    for path, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            last = path
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and last is not None:
            out[path] = last
    return out


def class_balanced_batches(
    data: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    per_class: int,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """Draw ``per_class`` examples of every class from ``data`` (one pass at most).

    Returns the examples grouped by class (class 0 first) in batches of ``batch_size`` (default: the size of the
    loader's first batch) and the number of examples found per class (short where the data ran out). ``x`` may
    hold several / keyword inputs (a tuple, a dict); dense labels (one per position, as for a segmentation or a
    language model) class an example by its most frequent label and are kept as they are.
    """
    if per_class < 1:
        raise PruningError(f"class-balanced sampling needs at least one example per class, got {per_class}")
    xs: list[list[Any]] = [[] for _ in range(num_classes)]
    ys: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
    counts = [0] * num_classes
    for x, y in data:
        if not isinstance(x, torch.Tensor):
            x = as_example_inputs(x)
        if batch_size is None:
            batch_size = len(x)
        y = y.long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise PruningError(f"labels must lie in [0, {num_classes}) for class-balanced sampling, got "
                               f"[{int(y.min())}, {int(y.max())}]")
        cls = y.reshape(-1) if y.dim() <= 1 else y.reshape(len(y), -1).mode(1).values
        for c in torch.unique(cls).tolist():
            need = per_class - counts[c]
            if need > 0:
                idx = (cls == c).nonzero().flatten()[:need]
                xs[c].append(x[idx.to(x.device)])
                ys[c].append(y[idx.to(y.device)])
                counts[c] += len(idx)
        if min(counts) >= per_class:
            break
    if sum(counts) == 0:
        raise PruningError("no examples found for class-balanced sampling: the data is empty")
    X = cat_inputs([t for chunks in xs for t in chunks]).to(device)
    Y = torch.cat([t for chunks in ys for t in chunks]).to(device)
    bs = max(1, batch_size or len(X))
    return [(X[i: i + bs], Y[i: i + bs]) for i in range(0, len(X), bs)], counts


# libkineto (torch's profiler back end) writes a line such as
#   USDT:2026-01-01 12:00:00 123:123 SyncActivityProfilerHandler.cpp:52] profiler_start
# straight to the C++ std::cerr at every profiler start and stop: message type USDT (5), at or above the
# default threshold. It reads its threshold once, from $KINETO_LOG_LEVEL, when the first profiler of the process
# starts; a level above every message type (6) silences it at the source. Where the user set KINETO_LOG_LEVEL,
# their choice stands and nothing is filtered.
_KINETO_LEVEL_ENV = "KINETO_LOG_LEVEL"
_KINETO_QUIET_LEVEL = "6"
_kineto_level_ours = False
_KINETO_CHATTER = re.compile(rb"^(?:USDT|STAGE):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d .*\] ")


def _quiet_kineto() -> bool:
    """Raise libkineto's log threshold above its start / stop chatter unless the user chose one; True when
    prunekit owns the level (then the chatter may also be filtered out of stderr)."""
    global _kineto_level_ours
    if _kineto_level_ours:
        return True
    if _KINETO_LEVEL_ENV in os.environ:
        return False
    os.environ[_KINETO_LEVEL_ENV] = _KINETO_QUIET_LEVEL
    _kineto_level_ours = True
    return True


@contextlib.contextmanager
def _kineto_chatter_filtered(active: bool = True) -> Iterator[None]:
    """Around a profiler start / stop: file descriptor 2 goes to a temporary file, and on exit everything written
    there except libkineto's own ``USDT:`` / ``STAGE:`` lines is written back to stderr, in order.

    The backstop for a process whose profiler was first started (so its log threshold fixed) before prunekit
    could raise it. Output of other threads in that window is delayed, not lost."""
    if not active:
        yield
        return
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (e.g. a closed or replaced stderr)
        yield
        return
    tmp = tempfile.TemporaryFile()
    try:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            tmp.seek(0)
            kept = b"".join(line for line in tmp.read().splitlines(keepends=True) if not _KINETO_CHATTER.match(line))
            view = memoryview(kept)
            while view:
                view = view[os.write(2, view):]
    finally:
        os.close(saved)
        tmp.close()


class PeakMemory:
    """Peak memory used inside a ``with`` block.

    ``result`` holds:

    * on CUDA: ``source="cuda_max_memory_allocated"``, ``peak_bytes`` (the device's peak allocation) and
      ``increase_bytes`` (that peak minus what was allocated on entry);
    * on CPU: ``source="torch_profiler"``, ``increase_bytes`` = the peak of the bytes held by torch CPU tensors
      allocated inside the block (running sum of the allocation / free events that
      ``torch.profiler.profile(profile_memory=True)`` records; tensors that existed before, such as the model's
      weights, are not counted), plus the process resident set size sampled every ``interval`` seconds from
      ``/proc/self/statm``: ``rss_peak_bytes`` and ``rss_increase_bytes`` (the peak over the RSS on entry; it
      under-reports when the allocator reuses pages freed earlier, which is why the profiler figure is the
      primary one). ``peak_bytes`` is ``rss_peak_bytes`` (whole process). Where the profiler cannot run (e.g.
      one is already active), ``source="rss_sampled"`` and ``increase_bytes`` is the RSS increase; without
      ``/proc``, ``source="getrusage_maxrss"`` (the process-lifetime peak).

    tracemalloc is not used: it does not see torch's allocator.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002, profiler: bool = True):
        self.device, self.interval, self.use_profiler = torch.device(device), interval, profiler
        self.result: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0
        self._prof: Any = None

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = self._rss()
            if rss is not None:
                self._peak = max(self._peak, rss)
            time.sleep(self.interval)

    def _start_profiler(self) -> None:
        if not self.use_profiler:
            return
        try:
            from torch.profiler import ProfilerActivity, profile

            quiet = _quiet_kineto()
            prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with _kineto_chatter_filtered(quiet):
                prof.__enter__()
            self._prof = prof
        except Exception:  # noqa: BLE001 - e.g. a profiler is already running: fall back to the RSS
            self._prof = None

    def _profiler_peak(self) -> int | None:
        prof, self._prof = self._prof, None
        if prof is None:
            return None
        try:
            with _kineto_chatter_filtered(_quiet_kineto()):
                prof.__exit__(None, None, None)
            events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                      and e.device_type() == torch.autograd.DeviceType.CPU]
        except Exception:  # noqa: BLE001 - profiler internals differ between torch versions
            return None
        total = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            total += int(e.nbytes())
            peak = max(peak, total)
        return peak

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._rss()
        if self._base is not None:
            self._peak = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start_profiler()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result = {"source": "cuda_max_memory_allocated", "peak_bytes": int(peak),
                           "increase_bytes": int(peak - self._base)}
            return
        torch_peak = self._profiler_peak()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss() or 0)
            rss = {"rss_peak_bytes": int(self._peak), "rss_increase_bytes": int(self._peak - (self._base or 0))}
            if torch_peak is not None:
                self.result = {"source": "torch_profiler", "increase_bytes": int(torch_peak),
                               "peak_bytes": rss["rss_peak_bytes"], **rss}
            else:
                self.result = {"source": "rss_sampled", "increase_bytes": rss["rss_increase_bytes"],
                               "peak_bytes": rss["rss_peak_bytes"], **rss}
            return
        scale = 1 if sys.platform == "darwin" else 1024
        self.result = {"source": "getrusage_maxrss",
                       "peak_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)}
        if torch_peak is not None:
            self.result.update(source="torch_profiler", increase_bytes=int(torch_peak))


def schedule_ratios(prune_percent: float, n_rounds: int, thresholds: Sequence[float] | None = None) -> list[float]:
    """Fraction of the *remaining* filters pruned in each round (:func:`prunekit.schedule.round_fractions`).

    Default: ``r_k = p / (k p + n (1 - p))`` for k = 1..n, so that ``prod (1 - r_k) = 1 - p``. ``thresholds`` are
    manual cumulative fractions of the original filters removed after each round (e.g. ``[0.1, 0.5, 0.8]``; values
    above 1 are read as percentages, as in the seed's ``--thresholds='[10, 50, 80]'``); they override
    ``prune_percent`` and ``n_rounds``.
    """
    from prunekit.schedule import round_fractions

    if thresholds is not None:
        cum = [float(t) for t in thresholds]
        if any(t > 1 for t in cum):
            cum = [t / 100.0 for t in cum]
        if not cum:
            raise PruningError("thresholds must list at least one cumulative fraction")
        return round_fractions(cum[-1], len(cum), thresholds=cum)
    p = float(prune_percent)
    if p > 1:
        p /= 100.0
    if not 0 <= p < 1:
        raise PruningError(f"prune_percent must be a fraction in [0, 1) (or a percentage < 100), got {prune_percent}")
    return round_fractions(p, int(n_rounds), "gradflow")


# --------------------------------------------------------------------------------------------- the family
class GradFlowScorer(ChannelScorer):
    """Base of the gradient-flow family: element-wise measure x optional bias -> row reduction -> per filter.

    Subclasses set ``needs`` (statistics: ``"grad"``, ``"grad_sq"``, ``"hg"``), ``on_norms`` (the measure is
    defined on BatchNorm parameters ``norm_params``), ``reduce`` and implement :meth:`elementwise`.
    """

    defaults = dict(COMMON_DEFAULTS)
    needs: frozenset[str] = frozenset()
    on_norms = False
    norm_params: tuple[str, ...] = ("weight",)
    reduce = "sum"  # "sum", "abs_sum" (|sum_j|), "sqrt_sum" (sqrt(sum_j))

    def __init__(self, **options: Any):
        super().__init__(**options)
        if self.normalize not in NORMALIZATIONS:
            raise PruningError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if not 0 < float(self.alpha) <= 1:
            raise PruningError(f"alpha must be in (0, 1], got {self.alpha}")
        if int(self.imp_samples) < 1 or float(self.temperature) <= 0 or float(self.grasp_T) <= 0:
            raise PruningError("imp_samples must be >= 1 and temperature, grasp_T > 0")
        if int(self.track_batches) < 0:
            raise PruningError(f"track_batches must be >= 0, got {self.track_batches}")
        if not 0 <= float(self.min_width) < 1:
            raise PruningError(f"min_width must be a fraction in [0, 1), got {self.min_width}")
        self.meta: dict[str, Any] = {}

    # -- the measure -------------------------------------------------------------------------------
    def elementwise(self, theta: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Element-wise importance of parameter ``theta`` (``stats``: this parameter's statistics)."""
        raise NotImplementedError

    @property
    def temperature_used(self) -> float:
        return float(self.grasp_T if "hg" in self.needs else self.temperature)

    # -- validation --------------------------------------------------------------------------------
    def check(self, ctx: PruneContext) -> None:
        super().check(ctx)
        if self.use_init and ctx.initial_state is None:
            raise PruningError(f"method {self.name!r} with use_init=True needs the initial weights: pass "
                               "PruneContext(initial_state=state_dict) (Trainer(keep_initial_weights=True)"
                               ".initial_state, or prune_and_train, which keeps them)")
        if float(self.min_width) != COMMON_DEFAULTS["min_width"]:  # a non-default floor overrides the context's
            ctx.budget = dataclasses.replace(ctx.budget, floor=float(self.min_width))  # (a copy: the caller's
            # BudgetOptions stay as given)

    # -- which parameters score a group ------------------------------------------------------------
    def group_terms(self, model: nn.Module, group: Any) -> list[str]:
        """Parameter paths whose rows make up the group's ``theta_i`` (depthwise convs follow their producer)."""
        if self.on_norms:
            norms = [entry_path(n) for n in getattr(group, "norms", ()) or ()]
            if not norms and self.norm_fallback:
                return self._norm_fallback_terms(model, group)
            if not norms:
                raise PruningError(f"method {self.name!r} scores BatchNorm parameters, but channel group "
                                   f"{group.key!r} has no BatchNorm (option norm_fallback=True scores the "
                                   "producer's own parameters instead)")
            sources = _norm_sources(model)
            own = [n for n in norms if n not in sources or not is_depthwise(model.get_submodule(sources[n]))]
            paths = []
            for n in own or norms:
                m = model.get_submodule(n)
                for p in self.norm_params:
                    if getattr(m, p, None) is None:
                        raise PruningError(f"method {self.name!r} needs affine BatchNorm; {n!r} has no {p}")
                    paths.append(f"{n}.{p}")
            return paths
        dw = {entry_path(d) for d in getattr(group, "depthwise", ()) or ()}
        producers = [entry_path(p) for p in group.producers]
        prods = [p for p in producers if p not in dw and not is_depthwise(model.get_submodule(p))]
        return [f"{p}.weight" for p in (prods or producers)]

    def _norm_fallback_terms(self, model: nn.Module, group: Any) -> list[str]:
        """``norm_fallback``: a group without BatchNorm is scored on its producers' own parameters -- the weights
        stand for ``gamma`` and, where ``norm_params`` has ``bias``, the producer's bias for ``beta``."""
        dw = {entry_path(d) for d in getattr(group, "depthwise", ()) or ()}
        producers = [entry_path(p) for p in group.producers]
        prods = [p for p in producers if p not in dw and not is_depthwise(model.get_submodule(p))] or producers
        paths = []
        for p in prods:
            m = model.get_submodule(p)
            paths.append(f"{p}.weight")
            if "bias" in self.norm_params and getattr(m, "bias", None) is not None:
                paths.append(f"{p}.bias")
        return paths

    def scored_groups(self, model: nn.Module, ctx: PruneContext) -> list[Any]:
        groups = ctx.groups()
        if self.keep_stem:
            stem = first_conv_path(model)
            rest = [g for g in groups if stem not in {entry_path(p) for p in g.producers}]
            if groups and not rest:
                raise PruningError(f"method {self.name!r}: the only prunable channels are those of the stem "
                                   f"{stem!r}, which keep_stem=True keeps (pass keep_stem=False to prune them)")
            groups = rest
        return groups

    # -- statistics --------------------------------------------------------------------------------
    def _loss(self, model: nn.Module, ctx: PruneContext, x: torch.Tensor, y: torch.Tensor, T: float) -> torch.Tensor:
        return ctx.loss(ctx.logits(model, x) / T, y)

    def batch_stats(self, model: nn.Module, ctx: PruneContext, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    paths: Sequence[str]) -> Stats:
        """First-order statistics of the parameters ``paths`` over ``batches`` (sample-weighted means)."""
        params = dict(model.named_parameters())
        plist = [params[p] for p in paths]
        want_g, want_sq = "grad" in self.needs, "grad_sq" in self.needs
        acc_g = [torch.zeros_like(p) for p in plist] if want_g else []
        acc_sq = [torch.zeros_like(p) for p in plist] if want_sq else []
        n_total = 0
        with _GradMode(model, plist):
            for x, y in batches:
                loss = self._loss(model, ctx, x, y, self.temperature)
                grads = torch.autograd.grad(loss, plist, allow_unused=True)
                n = len(x)
                n_total += n
                for i, g in enumerate(grads):
                    if g is None:
                        continue
                    if want_g:
                        acc_g[i].add_(g, alpha=n)
                    if want_sq:
                        acc_sq[i].add_(g.square(), alpha=n)
        if n_total == 0:
            raise PruningError(f"method {self.name!r} got no data to estimate gradients from")
        out: Stats = {}
        if want_g:
            out["grad"] = {p: a / n_total for p, a in zip(paths, acc_g)}
        if want_sq:
            out["grad_sq"] = {p: a / n_total for p, a in zip(paths, acc_sq)}
        self.meta["samples"] = n_total
        return out

    def hessian_grad(self, model: nn.Module, ctx: PruneContext,
                     batches: Sequence[tuple[torch.Tensor, torch.Tensor]], paths: Sequence[str]) -> Stats:
        """``Hg`` restricted to ``paths``: H and g of the loss over ``batches`` (all parameters), double backward."""
        params = dict(model.named_parameters())
        with _GradMode(model, [params[p] for p in paths]), _double_backward_attention():
            return self._hessian_grad(model, ctx, batches, paths)

    def _hessian_grad(self, model: nn.Module, ctx: PruneContext,
                      batches: Sequence[tuple[torch.Tensor, torch.Tensor]], paths: Sequence[str]) -> Stats:
        T = float(self.grasp_T)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        allp = [p for _, p in named]
        index = {n: i for i, (n, _) in enumerate(named)}
        n_total = sum(len(x) for x, _ in batches)
        if n_total == 0:
            raise PruningError(f"method {self.name!r} got no data for the Hessian-gradient product")
        g = [torch.zeros_like(p) for p in allp]
        for x, y in batches:
            for acc, gi in zip(g, torch.autograd.grad(self._loss(model, ctx, x, y, T), allp, allow_unused=True)):
                if gi is not None:
                    acc.add_(gi, alpha=len(x) / n_total)
        target = [allp[index[p]] for p in paths]
        hg = [torch.zeros_like(p) for p in target]
        for x, y in batches:
            grads = torch.autograd.grad(self._loss(model, ctx, x, y, T), allp, create_graph=True, allow_unused=True)
            z = sum((gi * gc).sum() for gi, gc in zip(grads, g) if gi is not None)
            if not isinstance(z, torch.Tensor) or not z.requires_grad:
                continue  # loss independent of parameters, or piecewise-linear to second order: Hg = 0
            for acc, h in zip(hg, torch.autograd.grad(z, target, allow_unused=True)):
                if h is not None:
                    acc.add_(h.detach(), alpha=len(x) / n_total)
        self.meta["samples"] = n_total
        return {"hg": dict(zip(paths, hg)), "grad": {p: g[index[p]] for p in paths}}

    def collect_stats(self, model: nn.Module, ctx: PruneContext, paths: Sequence[str],
                      batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Stats:
        """Statistics the measure needs; ``batches=None``: ``imp_samples`` of the prune set (class-balanced for
        Hessian measures)."""
        if not self.needs:
            return {}
        stats: Stats = {}
        if "hg" in self.needs:
            if batches is None:
                batches = self._balanced(model, ctx)
            with PeakMemory(ctx.device) as mem:
                stats.update(self.hessian_grad(model, ctx, batches, paths))
            self.meta["grasp_memory"] = self.meta["score_memory"] = mem.result
        if self.needs & {"grad", "grad_sq"}:
            data = ctx.batches(int(self.imp_samples)) if batches is None else batches
            with PeakMemory(ctx.device) as mem:
                stats.update(self.batch_stats(model, ctx, data, paths))
            self.meta["score_memory"] = mem.result
        return stats

    def _balanced(self, model: nn.Module, ctx: PruneContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
        classes = ctx.num_classes
        if classes is None:  # the logit width, from one example (eval mode: BN statistics untouched)
            x, _ = next(iter(ctx.batches(1)))
            with _GradMode(model, []), torch.no_grad():
                classes = int(ctx.logits(model, x).shape[1])
        per_class = max(1, int(self.imp_samples) // classes)
        batches, counts = class_balanced_batches(ctx.data, classes, per_class, device=ctx.device)
        self.meta["class_balanced"] = {"classes": classes, "per_class": per_class, "found": counts}
        return batches

    # -- scores ------------------------------------------------------------------------------------
    def _bias(self, path: str, theta: torch.Tensor, ctx: PruneContext) -> torch.Tensor | None:
        if self.use_init:
            init = ctx.initial_state
            if init is None:
                raise PruningError(f"method {self.name!r}: use_init needs the initial weights "
                                   "(PruneContext.initial_state)")
            if path not in init:
                raise PruningError(f"initial weights have no entry {path!r}")
            t0 = init[path].to(theta.device, theta.dtype)
            if t0.shape != theta.shape:
                raise PruningError(f"initial weights of {path!r} have shape {tuple(t0.shape)}, the model's "
                                   f"{tuple(theta.shape)}: prune the initial weights alongside the model "
                                   "(prune_and_train does)")
            return (theta - t0).abs()
        if self.use_l2:
            return theta.abs()
        return None

    def scores_from_stats(self, model: nn.Module, ctx: PruneContext, groups: Sequence[Any],
                          stats: Stats) -> dict[str, torch.Tensor]:
        """Per-group scores from precomputed statistics (no normalisation)."""
        params = dict(model.named_parameters())
        out = {}
        with torch.no_grad():
            for group in groups:
                cols = []
                for path in self.group_terms(model, group):
                    theta = params[path].detach()
                    e = self.elementwise(theta, {k: v[path] for k, v in stats.items() if path in v})
                    b = self._bias(path, theta, ctx)
                    if b is not None:
                        e = e * b
                    cols.append(group_rows(group, path, e))
                rows = torch.cat(cols, 1)
                s = rows.sum(1)
                if self.reduce == "abs_sum":
                    s = s.abs()
                elif self.reduce == "sqrt_sum":
                    s = s.clamp_min(0).sqrt()
                out[group.key] = s
        return out

    def _normalized(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.normalize is None:
            return scores
        out = {}
        for k, s in scores.items():
            d = {"l2": s.norm(), "max": s.abs().max(), "mean": s.abs().mean()}[self.normalize]
            out[k] = s / d if d > 0 else s
        return out

    def minibatch_scores(self, model: nn.Module, ctx: PruneContext, x: torch.Tensor | None = None,
                         y: torch.Tensor | None = None, groups: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        """Scores from one minibatch ``(x, y)`` (BN in eval mode): the unit the EMA tracking averages."""
        groups = self.scored_groups(model, ctx) if groups is None else groups
        paths = sorted({p for g in groups for p in self.group_terms(model, g)})
        batches = [(x, y)] if self.needs else None
        if self.needs and x is None:
            raise PruningError(f"method {self.name!r} needs a minibatch to score")
        stats = self.collect_stats(model, ctx, paths, batches)
        return self.scores_from_stats(model, ctx, groups, stats)

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        groups = self.scored_groups(model, ctx)
        paths = sorted({p for g in groups for p in self.group_terms(model, g)})
        if int(self.track_batches) > 0 and self.needs:
            ema: dict[str, torch.Tensor] | None = None
            n = 0
            for x, y in ctx.batches():
                if n >= int(self.track_batches):
                    break
                s = self.minibatch_scores(model, ctx, x, y, groups)
                ema = s if ema is None else {k: self.alpha * s[k] + (1 - self.alpha) * ema[k] for k in s}
                n += 1
            if ema is None:
                raise PruningError(f"method {self.name!r} got no data to track importance over")
            self.meta["tracked_batches"] = n
            return self._normalized(ema)
        stats = self.collect_stats(model, ctx, paths)
        return self._normalized(self.scores_from_stats(model, ctx, groups, stats))

    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        self.meta = {}
        if self.prune_percent is not None:
            plan = self._global_fraction_plan(model, ctx)
        else:
            try:
                plan = super().plan(model, ctx)
            except PruningError as e:
                stem = first_conv_path(model) if self.keep_stem else None
                if stem is None or "cannot be reached" not in str(e):
                    raise
                raise PruningError(f"{e}; method {self.name!r} also keeps the channels of the stem {stem!r} and of "
                                   f"every layer coupled to it (keep_stem=True, as the seed does): pass "
                                   f"keep_stem=False to prune them too") from None
        plan.meta.update({"gradflow": dict(self.meta), "temperature": self.temperature_used})
        if "grasp_memory" in self.meta:
            plan.meta["grasp_memory"] = self.meta["grasp_memory"]
        return plan


    def _global_fraction_plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        """One-shot pruning to the seed's target: remove the fraction ``prune_percent`` of all scored filters,
        chosen by one global ranking of the raw (or ``normalize``-d) scores, every group keeping
        ``floor(min_width * original width) + 1`` channels. The context's target is ignored (the engine's
        ``ratio=F`` removes F of *every* layer; this is the global count). Channels already masked (masked mode)
        count as removed."""
        from prunekit.surgery.allocate import allocate_filter_count, resolve_round_to

        p = float(self.prune_percent)
        if p > 1:
            p /= 100.0
        if not 0 <= p < 1:
            raise PruningError(f"prune_percent must be a fraction in [0, 1) (or a percentage < 100), got "
                               f"{self.prune_percent}")
        scores = self.checked_scores(model, ctx, torch.float64)
        if not scores:
            raise PruningError(f"method {self.name!r} scored no channel group: the model has nothing prunable")
        original = dict(ctx.original_sizes)
        removed = dict(ctx.removed_channels or {})
        masked = 0
        for k, idx in removed.items():
            if k in scores and len(idx):
                scores[k] = scores[k].clone()
                scores[k][torch.as_tensor(idx, dtype=torch.long)] = -torch.inf
                masked += len(idx)
        n0 = sum(int(original.get(k, len(s))) for k, s in scores.items())
        target_keep = int(round(n0 * (1 - p)))
        floor = float(ctx.budget.floor if ctx.budget is not None else self.min_width)
        round_to = ctx.budget.round_to if ctx.budget is not None else None
        multiples = None
        if round_to is not None:  # an explicit channel multiple: counts in it (the seed's count is exact)
            multiples = {k: resolve_round_to(int(original.get(k, len(s))), round_to) for k, s in scores.items()}
        keep, kept = allocate_filter_count(scores, original, target_keep, floor, multiples)
        if kept != target_keep and multiples is None:
            warnings.warn(f"prunekit: {self.name} keeps {kept} of {n0} filters instead of {target_keep}: the "
                          f"per-layer floor ({floor}) leaves nothing more to remove", stacklevel=2)
        info = {"global_filter_fraction": p, "filters_original": n0, "filters_kept": kept,
                "filters_target": target_keep, "already_masked": masked,
                "round_to": None if round_to is None else str(round_to)}
        self.meta["global_fraction"] = info
        ctx.allocation = {**info, "widths": {k: len(v) for k, v in keep.items()}}
        return Plan(method=self.name, channels=keep, meta={"scores": {k: v.tolist() for k, v in scores.items()}})


def _double_backward_attention() -> Any:
    """Scaled-dot-product attention restricted to the math kernel (the fused CPU / flash kernels have no double
    backward); a no-op on torch versions without ``torch.nn.attention``."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


class _GradMode:
    """Eval mode (BN running statistics) and ``requires_grad`` on the scored parameters, restored on exit."""

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]):
        self.model, self.params = model, list(params)

    def __enter__(self) -> _GradMode:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.flags = [p.requires_grad for p in self.params]
        self.model.eval()
        for p in self.params:
            p.requires_grad_(True)
        self.grad_enabled = torch.is_grad_enabled()
        torch.set_grad_enabled(True)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.set_grad_enabled(self.grad_enabled)
        for p, f in zip(self.params, self.flags):
            p.requires_grad_(f)
        for m, training in self.modes:
            m.training = training


def _register(name: str, *, grad: bool = False, second: bool = False, **defaults: Any):
    def deco(cls: type) -> type:
        cls.defaults = {**COMMON_DEFAULTS, **defaults}
        return register_method(name, granularity="channel", needs_data=grad, needs_grad=grad,
                               needs_second_order=second, family="gradflow", paper=PAPER)(cls)

    return deco


# --------------------------------------------------------------------------------------------- data-free
@_register("gf_magnitude")
class GFMagnitude(GradFlowScorer):
    """L2 norm of each filter, ||theta_i||_2 (the seed's mag_based)."""

    reduce = "sqrt_sum"

    def elementwise(self, theta: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return theta.square()


@_register("gf_l1")
class GFL1(GradFlowScorer):
    """L1 norm of each filter, ||theta_i||_1 (Li et al. 2017)."""

    def elementwise(self, theta: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return theta.abs()


@_register("gf_bn")
class GFBatchNorm(GradFlowScorer):
    """|gamma_i| of the BatchNorm after each filter (network slimming)."""

    on_norms = True

    def elementwise(self, theta: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return theta.abs()


# --------------------------------------------------------------------------------------------- first order
@_register("gf_loss", grad=True)
class GFLoss(GradFlowScorer):
    """Loss preservation, sum_j |theta_ij g_ij| (the seed's loss_based)."""

    needs = frozenset({"grad"})

    def elementwise(self, theta: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return (theta * stats["grad"]).abs()


@_register("gf_biased_loss", grad=True, use_l2=True)
class GFBiasedLoss(GFLoss):
    """Loss preservation biased to small magnitude, sum_j |theta_ij^2 g_ij| (use_init: |theta - theta0||theta g|).

    This is ``gf_loss`` with ``use_l2=True`` by default (``use_l2=False`` without ``use_init`` gives ``gf_loss``).
    """


@_register("gf_biased_loss_tracked", grad=True, use_l2=True, track_batches=20, preserve_moment=True)
class GFBiasedLossTracked(GFLoss):
    """gf_biased_loss per minibatch, EMA (alpha) over the last track_batches minibatches.

    Defaults are the seed's best settings for it: ``use_l2=True``, ``track_batches=20``, ``preserve_moment=True``.
    """


@_register("gf_tfo", grad=True)
class GFTaylorFO(GradFlowScorer):
    """First-order Taylor expansion of the loss change, |sum_j theta_ij g_ij| (Molchanov et al. 2017)."""

    needs = frozenset({"grad"})
    reduce = "abs_sum"

    def elementwise(self, theta: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return theta * stats["grad"]


@_register("gf_fisher", grad=True)
class GFFisher(GradFlowScorer):
    """Fisher pruning, sum_j theta_ij^2 E_batch[g_ij^2] (Theis et al. 2018)."""

    needs = frozenset({"grad_sq"})

    def elementwise(self, theta: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return theta.square() * stats["grad_sq"]


@_register("gf_nvidia", grad=True)
class GFNvidia(GradFlowScorer):
    """Squared Taylor on BatchNorm, gamma_i^2 E[g_gamma^2] + beta_i^2 E[g_beta^2] (Molchanov et al. 2019)."""

    needs = frozenset({"grad_sq"})
    on_norms = True
    norm_params = ("weight", "bias")

    def elementwise(self, theta: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return theta.square() * stats["grad_sq"]


# --------------------------------------------------------------------------------------------- second order
@_register("gf_grasp", grad=True, second=True)
class GFGraSP(GradFlowScorer):
    """GraSP on filters: sum_j theta_ij (Hg)_ij, signed, lowest removed (class-balanced data, grasp_T=200)."""

    needs = frozenset({"hg"})

    def elementwise(self, theta: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return theta * stats["hg"]


@_register("gf_grad_preserve", grad=True, second=True, grasp_T=1.0)
class GFGradPreserve(GradFlowScorer):
    """Gradient-norm preservation: |sum_j theta_ij (Hg)_ij| with T = 1."""

    needs = frozenset({"hg"})
    reduce = "abs_sum"

    def elementwise(self, theta: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return theta * stats["hg"]


__all__ = ["COMMON_DEFAULTS", "GradFlowScorer", "PeakMemory", "class_balanced_batches", "entry_path",
           "first_conv_path", "group_rows", "is_depthwise", "schedule_ratios"]
