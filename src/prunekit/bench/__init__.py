"""Benchmark runner: experiment files, resumable sharded sweeps, reports and plots.

>>> from prunekit.bench import load_experiment, Runner
>>> Runner(load_experiment("quick", ["seeds=[0,1]"]), "runs/quick").run()
"""

from prunekit.bench.config import Experiment, MethodSpec, TrainSpec, list_presets, load_experiment
from prunekit.bench.runner import Cell, Runner, RunSummary, plan_cells, run_experiment, shard_cells

__all__ = ["Cell", "Experiment", "MethodSpec", "RunSummary", "Runner", "TrainSpec", "list_presets",
           "load_experiment", "plan_cells", "run_experiment", "shard_cells"]
