"""Data-parallel training under torchrun (gloo, CPU): sharded batches and identical weights.

2 ranks at batch b must train exactly like 1 process at batch 2b: the loader gives each rank its
half of every global batch and DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from prunekit.data import BatchLoader, get_dataset
from prunekit.errors import ConfigError
from prunekit.models import create_model


def _free_port() -> str:
    """A port nobody listens on now (a fixed one collides with a run still closing, or another suite)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _ds(n: int = 100):
    return get_dataset("synthetic", "train", in_channels=1, image_size=8, n=n)


@pytest.mark.parametrize("n, world, drop_last", [(100, 2, True), (100, 2, False), (101, 3, False), (96, 4, False)])
def test_sharded_loaders_together_yield_the_global_batches(n, world, drop_last) -> None:
    ds = _ds(n)
    full = BatchLoader(ds, batch_size=8 * world, shuffle=True, augment="cifar", seed=3, drop_last=drop_last)
    shards = [BatchLoader(ds, batch_size=8, shuffle=True, augment="cifar", seed=3, drop_last=drop_last,
                          rank=r, world_size=world) for r in range(world)]
    assert all(len(s) == len(shards[0]) for s in shards)
    expect = list(full)
    got = list(zip(*shards))
    assert len(got) == len(expect) or (len(got) == len(expect) - 1 and n % (8 * world) < world)
    for (x, y), parts in zip(expect, got):
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_bad_shards_are_refused() -> None:
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ConfigError, match="rank"):
            BatchLoader(_ds(), batch_size=4, rank=rank, world_size=world)


_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from prunekit import distributed
    from prunekit.data import BatchLoader, get_dataset
    from prunekit.models import create_model
    from prunekit.train import TrainConfig, Trainer

    batch, out = int(sys.argv[1]), sys.argv[2]
    distributed.init_from_env("cpu")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = create_model("lenet_300_100", width=0.1, in_channels=1, image_size=8)
    ds = get_dataset("synthetic", "train", in_channels=1, image_size=8, n=128)
    loader = BatchLoader(ds, batch_size=batch, shuffle=True, seed=1, drop_last=True)
    cfg = TrainConfig(epochs=2, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine")
    hist = Trainer(model, cfg, loader, progress=False, log_epochs=False).fit()
    if distributed.is_main():
        torch.save(model.state_dict(), out + ".pt")
        json.dump({"world": distributed.world_size(), "history": hist}, open(out + ".json", "w"))
    distributed.shutdown()
""")


def test_two_ranks_train_like_one_process_at_twice_the_batch(tmp_path) -> None:
    script = tmp_path / "train_ddp.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    one = subprocess.run([sys.executable, str(script), "16", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", _free_port(), str(script), "8", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    info = json.loads((tmp_path / "two.json").read_text())
    assert info["world"] == 2
    a = torch.load(tmp_path / "one.pt", weights_only=True)
    b = torch.load(tmp_path / "two.pt", weights_only=True)
    torch.manual_seed(0)
    init = create_model("lenet_300_100", width=0.1, in_channels=1, image_size=8).state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3  # training really moved the weights
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, diff
    h1 = json.loads((tmp_path / "one.json").read_text())["history"]
    # the epoch loss is summed over ranks: the same figure as the single process
    assert abs(h1[-1]["train_loss"] - info["history"][-1]["train_loss"]) < 1e-5


def test_torchrun_prune_with_fine_tuning_writes_once(tmp_path) -> None:
    import prunekit

    base = tmp_path / "base.pt"
    torch.manual_seed(0)
    prunekit.save(create_model("lenet5", width=0.5, in_channels=3, image_size=32), base,
                  meta={"dataset": "synthetic"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        _free_port(), "-m", "prunekit", "prune", "--checkpoint", str(base), "--method", "l1",
                        "--target", "flops=2", "--finetune-epochs", "0.25", "--prune-samples", "64",
                        "--batch-size", "32", "--no-latency", "--quiet", "--device", "cpu", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and abs(m["flops_speedup"] / 2 - 1) <= 0.05
    assert r.stdout.count("wrote ") == 1  # rank 0 alone writes and reports
    assert prunekit.load(out / "model.pt")(torch.randn(2, 3, 32, 32)).shape == (2, 10)


_TSQR_SCRIPT = textwrap.dedent("""
    import sys, torch
    from prunekit import distributed
    from prunekit.linalg import TSQR

    distributed.init_from_env("cpu")
    torch.manual_seed(0)
    z = torch.randn(300, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    mine = z[distributed.rank()::distributed.world_size()]  # every rank its own rows
    out = {}
    for block in ("qr", "gram"):
        acc = TSQR(block=block)
        for chunk in mine.split(37):
            acc.update(chunk)
        out[block] = acc.all_reduce_().r()
        out[block + "_rows"] = torch.tensor(acc.rows)
    torch.save(out, sys.argv[1] + f".{distributed.rank()}.pt")
    distributed.shutdown()
""")


def test_tsqr_r_over_two_ranks_equals_the_single_process_r(tmp_path) -> None:
    from prunekit.linalg import tsqr_r

    script = tmp_path / "tsqr_ddp.py"
    script.write_text(_TSQR_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        _free_port(), str(script), str(tmp_path / "r")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.manual_seed(0)
    z = torch.randn(300, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    ref = tsqr_r([z])  # one process, all rows (non-negative diagonal: R is unique)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"r.{rank}.pt", weights_only=True)
        for block in ("qr", "gram"):
            assert int(got[block + "_rows"]) == 300
            assert torch.allclose(got[block], ref, rtol=1e-8, atol=1e-8 * float(ref.abs().max())), block


_PLAN_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import prunekit
    from prunekit import distributed
    from prunekit.models import create_model

    distributed.init_from_env("cpu")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]
    out = {}
    for method, opts in (("l1", {}), ("activation", {}), ("taylor", {}), ("obd", {"fisher": "empirical"}),
                         ("id_iter", {"samples": 64, "calibrate": 16})):
        torch.manual_seed(0)
        model = create_model("resnet20", width=0.25)
        res = prunekit.prune(model, method, "flops=2", data, **opts)
        out[method] = {k: v.tolist() for k, v in res.plan.channels.items()}
    if distributed.is_main():
        json.dump({"world": distributed.world_size(), "plans": out}, open(sys.argv[1], "w"))
    distributed.shutdown()
""")


def test_plans_under_two_ranks_equal_the_single_process_plans(tmp_path) -> None:
    # activation / taylor / obd sum their statistics over the ranks' halves of every batch; l1 needs no data;
    # id_iter runs on the whole prune set on every rank: every plan must equal the one-process plan
    script = tmp_path / "plans_ddp.py"
    script.write_text(_PLAN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.json")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          _free_port(), str(script), str(tmp_path / "two.json")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one.json").read_text())
    b = json.loads((tmp_path / "two.json").read_text())
    assert a["world"] == 1 and b["world"] == 2
    for method in ("l1", "activation", "taylor", "obd", "id_iter"):
        assert a["plans"][method], method  # something was pruned
        assert a["plans"][method] == b["plans"][method], method


def test_sharded_prune_batches_cover_the_prune_set_once(monkeypatch) -> None:
    from prunekit import distributed
    from prunekit.budget import PruneContext, Target

    x = torch.arange(10.0).reshape(10, 1)
    data = [(x[:4], torch.zeros(4)), (x[4:8], torch.zeros(4)), (x[8:], torch.zeros(2))]
    ctx = PruneContext(target=Target("ratio", 0.5), input_shape=(1,), data=data)
    seen = []
    for r in range(3):  # three ranks, batches of 4 / 4 / 2 and a 7-example cap
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        seen += [v for b, _ in ctx.batches(7, shard=True) for v in b.flatten().tolist()]
    assert sorted(seen) == list(range(7))
