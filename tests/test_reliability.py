"""Bad input from a user gives exit code 2 and one message naming the value -- never a traceback.

Covers the command-line flags (checked at the parser), model options, and crafted or damaged
checkpoints (size limits, missing entries, random corruption and truncation, foreign pickles).
The fuzz tests use hypothesis with a modest example count so that the suite stays fast.
"""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunekit
from prunekit.cli import main
from prunekit.errors import CheckpointError, PrunekitError
from prunekit.models import create_model

TRAIN = ["train", "--model", "lenet_300_100", "--dataset", "synthetic", "--quiet", "--no-latency"]


@pytest.mark.parametrize("flag, value, needle", [
    ("--epochs", "nan", "--epochs"), ("--epochs", "inf", "--epochs"), ("--epochs", "-1", "out of range"),
    ("--epochs", "0", "out of range"), ("--momentum", "-0.5", "--momentum"), ("--momentum", "1", "[0, 1)"),
    ("--weight-decay", "nan", "--weight-decay"), ("--threads", "-2", "--threads"), ("--threads", "1.5", "integer"),
    ("--batch-size", "0", "--batch-size"), ("--lr", "abc", "not a number"), ("--seed", "nan", "--seed"),
    ("--model-kwargs", "{bad", "not valid JSON"), ("--model-kwargs", "[1, 2]", "not a JSON object"),
    ("--model-kwargs", '{"width": -1}', "width=-1"), ("--model-kwargs", '{"width": 1e6}', "width"),
    ("--model-kwargs", '{"nosuch": 1}', "nosuch"), ("--device", "cuda", "CUDA is not available"),
    ("--device", "banana", "not a device"), ("--label-smoothing", "2", "--label-smoothing"),
])
def test_train_flags_are_checked(tmp_path, capsys, flag, value, needle) -> None:
    if flag == "--device" and value == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = _main_exit([*TRAIN, "--out", str(tmp_path / "o"), flag, value])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o" / "model.pt").exists()


def _main_exit(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse exits 2 itself
        return int(e.code or 0)


@pytest.mark.parametrize("flag, value", [
    ("--finetune-epochs", "-1"), ("--finetune-epochs", "nan"), ("--epochs-per-round", "-1"), ("--floor", "1.5"),
    ("--rounds", "0"), ("--prune-samples", "-3"), ("--latency-repeats", "0"), ("--finetune-lr", "nan"),
])
def test_prune_flags_are_checked(tmp_path, capsys, flag, value) -> None:
    rc = _main_exit(["prune", "--checkpoint", str(tmp_path / "none.pt"), "--method", "l1", "--target", "flops=2",
                     "--out", str(tmp_path / "o"), flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and "Traceback" not in err


def test_argparse_errors_exit_2(tmp_path, capsys) -> None:
    assert _main_exit([*TRAIN, "--out", str(tmp_path / "o"), "--epochs", "nan"]) == 2
    assert "--epochs" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def good_payload(tmp_path_factory) -> tuple[bytes, dict]:
    path = tmp_path_factory.mktemp("ck") / "m.pt"
    prunekit.save(create_model("lenet_300_100", width=0.1), path)
    raw = path.read_bytes()
    return raw, torch.load(io.BytesIO(raw), weights_only=True)


def _write(tmp_path, obj, name="c.pt"):
    p = tmp_path / name
    torch.save(obj, p)
    return p


def test_crafted_layer_sizes_are_refused_before_allocating(tmp_path, good_payload) -> None:
    _, payload = good_payload
    bad = {**payload, "modules": {"fc1": {"type": "Linear", "args": {"in_features": 10**6, "out_features": 10**6,
                                                                      "bias": True}}}}
    with pytest.raises(CheckpointError, match="limit"):
        prunekit.load(_write(tmp_path, bad))
    bad = {**payload, "arch": {**payload["arch"], "kwargs": {"width": 10**6}}}
    with pytest.raises(CheckpointError, match="width"):
        prunekit.load(_write(tmp_path, bad))
    bad = {**payload, "tensor_shapes": {"fc1.weight": [10**6, 10**6]}}
    with pytest.raises(CheckpointError, match="too large"):
        prunekit.load(_write(tmp_path, bad))


@pytest.mark.parametrize("drop", ["state_dict", "arch"])
def test_missing_entries_are_named(tmp_path, good_payload, drop) -> None:
    _, payload = good_payload
    with pytest.raises(CheckpointError, match=f"no {drop}"):
        prunekit.load(_write(tmp_path, {k: v for k, v in payload.items() if k != drop}))


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_foreign_pickles_are_refused(tmp_path) -> None:
    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps({"format": "prunekit-checkpoint", "x": _Evil()}))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        prunekit.load(p)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_checkpoints_never_raise_anything_but_checkpoint_errors(tmp_path, good_payload, data) -> None:
    raw, _ = good_payload
    kind = data.draw(st.sampled_from(["truncate", "flip", "garbage"]))
    if kind == "truncate":
        blob = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        b = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] = data.draw(st.integers(0, 255))
        blob = bytes(b)
    else:
        blob = data.draw(st.binary(max_size=512))
    p = tmp_path / "fuzz.pt"
    p.write_bytes(blob)
    try:
        model = prunekit.load(p)
    except PrunekitError:
        return
    # a flipped byte inside a weight still loads: it must then be a working model of the recorded shape
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


_numbers = st.one_of(st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e309", "abc", "", "1.5", "-0"]),
                     st.floats(allow_nan=True, allow_infinity=True).map(str), st.text(max_size=6))


@settings(max_examples=80, deadline=None)
@given(flag=st.sampled_from(["--epochs", "--lr", "--momentum", "--weight-decay", "--threads", "--batch-size",
                             "--seed", "--warmup-epochs", "--label-smoothing", "--temperature", "--swa-start"]),
       value=_numbers)
def test_fuzzed_train_flags_never_give_a_traceback(flag, value) -> None:
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            # --out an existing file: any value the parser accepts then stops at the output check or runs a
            # valid tiny training; both are fine, a traceback is not
            rc = main([*TRAIN, "--out", "/nonexistent-dir-for-fuzz/\0bad", "--epochs", "0.01", flag, value])
        except SystemExit as e:
            rc = int(e.code or 0)
    assert rc in (0, 2), err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_resume_with_another_model_is_a_clear_error(tmp_path, capsys) -> None:
    from prunekit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", "lenet5", "--dataset", "synthetic", "--epochs", "1", "--out", str(out),
                 "--quiet"]) == 0
    capsys.readouterr()
    rc = main(["train", "--model", "lenet_300_100", "--dataset", "synthetic", "--epochs", "1", "--out", str(out),
               "--resume", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot resume" in err and "another model" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["0", "-8", "x"])
def test_round_to_below_one_is_refused(tmp_path, capsys, value) -> None:
    import prunekit
    from prunekit.cli import main
    from prunekit.models import create_model

    base = tmp_path / "base.pt"
    prunekit.save(create_model("lenet5", in_channels=3, image_size=32), base, meta={"dataset": "synthetic"})
    rc = main(["prune", "--checkpoint", str(base), "--method", "l1", "--target", "flops=2", "--round-to", value,
               "--out", str(tmp_path / "o"), "--quiet", "--no-latency"])
    assert rc == 2 and "--round-to" in capsys.readouterr().err
    assert not (tmp_path / "o" / "model.pt").exists()


# ------------------------------------------------------------------- the defects of issue 18, one by one
def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = _main_exit(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.fixture(scope="module")
def misfits(tmp_path_factory) -> dict[str, str]:
    """Checkpoints that do not fit the synthetic dataset (3 x 32 x 32, 10 classes), one that does, one with NaN."""
    d = tmp_path_factory.mktemp("misfit")
    out = {}
    for name, kw in {"gray28": {"in_channels": 1, "image_size": 28}, "c100": {"num_classes": 100},
                     "ok": {}}.items():
        kw = {"in_channels": 3, "image_size": 32, **kw}
        prunekit.save(create_model("lenet5", **kw), d / f"{name}.pt", meta={"dataset": "synthetic"})
        out[name] = str(d / f"{name}.pt")
    m = create_model("lenet5", in_channels=3, image_size=32)
    with torch.no_grad():
        m.fc1.weight[0, 0] = float("nan")
    prunekit.save(m, d / "nan.pt", meta={"dataset": "synthetic"})
    out["nan"] = str(d / "nan.pt")
    return out


@pytest.mark.parametrize("ck, needle", [("gray28", "does not take the images"), ("c100", "predicts 100 classes")])
@pytest.mark.parametrize("cmd", ["eval", "prune", "prune_train", "init_from"])
def test_a_checkpoint_on_a_dataset_it_does_not_fit_is_refused_before_any_work(tmp_path, capsys, misfits, ck,
                                                                            needle, cmd) -> None:
    out = str(tmp_path / "o")
    argv = {
        "eval": ["eval", "--checkpoint", misfits[ck], "--dataset", "synthetic", "--no-latency"],
        "prune": ["prune", "--checkpoint", misfits[ck], "--method", "l1", "--target", "flops=2", "--out", out,
                  "--no-latency"],
        "prune_train": ["prune", "--checkpoint", misfits[ck], "--method", "gf_l1", "--target", "ratio=0.5",
                        "--epochs-per-round", "1", "--out", out, "--no-latency"],
        "init_from": [*TRAIN, "--model", "lenet5", "--init-from", misfits[ck], "--out", out],
    }[cmd]
    rc, err = _run([*argv, "--quiet"], capsys)
    assert rc == 2 and needle in err and misfits[ck] in err, err
    assert "synthetic" in err and not (tmp_path / "o" / "model.pt").exists()


@pytest.mark.parametrize("cmd", ["eval", "prune", "export"])
def test_nan_weights_are_refused_by_the_cli_and_warned_by_load(tmp_path, capsys, misfits, cmd) -> None:
    argv = {"eval": ["eval", "--checkpoint", misfits["nan"], "--no-latency"],
            "prune": ["prune", "--checkpoint", misfits["nan"], "--method", "l1", "--target", "flops=2", "--out",
                      str(tmp_path / "o"), "--no-latency"],
            "export": ["export", misfits["nan"], "--out", str(tmp_path / "m.onnx")]}[cmd]
    rc, err = _run(argv, capsys)
    assert rc == 2 and "NaN or infinite" in err and "fc1.weight" in err
    assert not list(tmp_path.iterdir()) or not (tmp_path / "o" / "model.pt").exists()
    with pytest.warns(RuntimeWarning, match="fc1.weight"):
        prunekit.load(misfits["nan"])
    with pytest.raises(CheckpointError, match="NaN"):
        prunekit.load(misfits["nan"], require_finite=True)
    prunekit.load(misfits["ok"], require_finite=True)  # finite weights: no error


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("run") / "r"
    assert main([*TRAIN, "--model", "lenet5", "--epochs", "1", "--out", str(out)]) == 0
    return str(out)


@pytest.mark.parametrize("flags, needle", [
    (["--epochs", "2"], "--epochs: saved 1"), (["--lr", "0.05"], "--lr: saved 0.1"),
    (["--batch-size", "64"], "batches per epoch"), (["--schedule", "constant"], "--schedule"),
    (["--weight-decay", "0"], "--weight-decay"), (["--seed", "3"], "--seed"),
])
def test_resume_with_other_settings_is_refused_naming_each(tmp_path, capsys, trained_run, flags, needle) -> None:
    import shutil

    out = tmp_path / "r"
    shutil.copytree(trained_run, out)
    before = (out / "model.pt").read_bytes()
    rc, err = _run([*TRAIN, "--model", "lenet5", "--epochs", "1", "--out", str(out), "--resume", *flags], capsys)
    assert rc == 2 and "cannot resume" in err and needle in err, err
    assert (out / "model.pt").read_bytes() == before  # nothing written


def test_resume_with_the_same_settings_still_works(tmp_path, capsys, trained_run) -> None:
    import shutil

    out = tmp_path / "r"
    shutil.copytree(trained_run, out)
    rc, err = _run([*TRAIN, "--model", "lenet5", "--epochs", "1", "--out", str(out), "--resume"], capsys)
    assert rc == 0, err


def test_a_refused_training_state_does_not_quote_torchs_advice(tmp_path, capsys, trained_run) -> None:
    import shutil

    out = tmp_path / "r"
    shutil.copytree(trained_run, out)
    (out / "train_state" / "last.pt").write_bytes(pickle.dumps({"x": _Evil()}))
    rc, err = _run([*TRAIN, "--model", "lenet5", "--epochs", "1", "--out", str(out), "--resume"], capsys)
    assert rc == 2 and "cannot resume" in err and "not a prunekit training state" in err
    assert "weights_only" not in err and "this must never run" not in err
    torch.save({"model": {}, "optimizer": {}, "epoch": "x"}, out / "train_state" / "last.pt")
    rc, err = _run([*TRAIN, "--model", "lenet5", "--epochs", "1", "--out", str(out), "--resume"], capsys)
    assert rc == 2 and "cannot resume" in err


def test_a_run_with_zero_optimiser_steps_is_not_a_success(tmp_path, capsys) -> None:
    # synthetic has 512 training examples: batch 1024 with the last incomplete batch dropped gives no batch
    rc, err = _run([*TRAIN, "--model", "lenet5", "--batch-size", "1024", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "no optimisation step" in err and "batch size 1024" in err
    assert not (tmp_path / "o" / "model.pt").exists()
    from prunekit.train import TrainConfig, Trainer

    with pytest.raises(PrunekitError, match="no batch"):
        Trainer(create_model("lenet5", in_channels=3, image_size=32), TrainConfig(), [])


@pytest.mark.parametrize("field, value", [("weight_decay", float("nan")), ("momentum", float("nan")),
                                          ("lr", float("inf")), ("label_smoothing", 1.0), ("weight_decay", -1.0)])
def test_train_config_refuses_non_finite_values_instead_of_reporting_divergence(field, value) -> None:
    from prunekit.train import TrainConfig

    with pytest.raises(PrunekitError, match=field) as e:
        TrainConfig(**{field: value}).validate()
    assert "diverged" not in str(e.value)


def test_read_only_out_is_refused_before_any_work_for_train_and_prune(tmp_path, capsys, monkeypatch,
                                                                     misfits) -> None:
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)  # as root a chmod 555 folder stays writable
    for argv in ([*TRAIN, "--model", "lenet5"],
                 ["prune", "--checkpoint", misfits["ok"], "--method", "l1", "--target", "flops=2", "--quiet"]):
        rc, err = _run([*argv, "--out", str(tmp_path / "ro")], capsys)
        assert rc == 2 and "cannot be written" in err and "Permission denied" in err
        assert not (tmp_path / "ro" / "model.pt").exists()


# ------------------------------------------------------------------------------------ data at the door
def _write_idx(path, arr) -> None:
    import gzip
    import struct

    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.tobytes()))


def test_idx_labels_beyond_the_class_count_are_found_at_load(tmp_path) -> None:
    import numpy as np

    from prunekit.data import DatasetFormatError, get_dataset

    d = tmp_path / "fashion-mnist"
    d.mkdir()
    for prefix, n in (("train", 12), ("t10k", 4)):
        _write_idx(d / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 28, 28), np.uint8))
        _write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    assert len(get_dataset("fashion-mnist", "train", data_dir=tmp_path, download=False, cache=False)) == 12
    _write_idx(d / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 200], np.uint8))
    with pytest.raises(DatasetFormatError, match=r"2 label\(s\) outside 0\.\.9"):
        get_dataset("fashion-mnist", "train", data_dir=tmp_path, download=False, cache=False)


def test_an_empty_class_folder_is_an_error_not_a_class(tmp_path) -> None:
    from PIL import Image

    from prunekit.data import DatasetFormatError, get_dataset

    for split in ("train", "test"):
        for cls in ("ant", "bee"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (4, 4), (10, 20, 30)).save(tmp_path / split / cls / "0.png")
    assert get_dataset(f"folder:{tmp_path}", "train", cache=False).classes == ["ant", "bee"]
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(DatasetFormatError, match="cat holds no image files"):
        get_dataset(f"folder:{tmp_path}", "train", cache=False)
    (tmp_path / "train" / "cat").rmdir()
    (tmp_path / "test" / "cat").mkdir()  # an empty class folder in test only: a class of train, no test images
    with pytest.raises(DatasetFormatError, match="cat"):
        get_dataset(f"folder:{tmp_path}", "test", cache=False)


_X, _Y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))


@pytest.mark.parametrize("method", ["pfp", "taylor"])
@pytest.mark.parametrize("data, needle", [
    ([(torch.randn(8, 1, 28, 28), _Y[:8])], "shape"), ([(_X.to(torch.uint8), _Y)], "uint8"),
    ([_X], "not an \\(x, y\\) pair"), ([(_X, _Y.float())], "integer"), ([(_X, _Y + 100)], "expected 0..9"),
    ([(_X, _Y[:3])], "3 labels for 16"), ([(_X, _Y, _Y)], "tuple of 3"), ([(_X, -1 - _Y)], "expected 0..9"),
    ([(_X, torch.tensor(3))], "per example"),
])
def test_prune_batches_are_checked_where_they_enter(method, data, needle) -> None:
    from prunekit.data import DatasetFormatError

    with pytest.raises(DatasetFormatError, match=needle):
        prunekit.prune(create_model("lenet5", in_channels=3, image_size=32), method, "flops=2", data)


@pytest.mark.parametrize("method, target", [("l1", "flops=2"), ("magnitude", "params=2"), ("pfp", "flops=2")])
def test_a_model_with_zero_flops_is_a_pruning_error_not_a_zero_division(method, target) -> None:
    model = create_model("lenet5", in_channels=3, image_size=32)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with pytest.raises(PrunekitError, match="no non-zero|removed nothing|cannot"):
        prunekit.prune(model, method, target, [(_X, _Y)], input_shape=(3, 32, 32))


@pytest.mark.parametrize("where, needle", [("file", "is an existing file"), ("below", "cannot be written")])
@pytest.mark.parametrize("cmd", ["train", "prune"])
def test_out_an_existing_file_is_refused_before_any_work(tmp_path, capsys, misfits, cmd, where, needle) -> None:
    f = tmp_path / "a_file"
    f.write_text("x")
    out = str(f if where == "file" else f / "sub")
    argv = [*TRAIN, "--model", "lenet5"] if cmd == "train" else \
        ["prune", "--checkpoint", misfits["ok"], "--method", "l1", "--target", "flops=2", "--quiet"]
    rc, err = _run([*argv, "--out", out], capsys)
    assert rc == 2 and needle in err and f.read_text() == "x"


@pytest.mark.parametrize("flag, value", [("--threads", "-1"), ("--threads", "0"), ("--batch-size", "0"),
                                         ("--eval-batch-size", "nan"), ("--device", "cuda:99"), ("--device", "x")])
@pytest.mark.parametrize("cmd", ["eval", "prune"])
def test_runtime_flags_are_checked_for_eval_and_prune(tmp_path, capsys, misfits, cmd, flag, value) -> None:
    argv = ["eval", "--checkpoint", misfits["ok"], "--no-latency"] if cmd == "eval" else \
        ["prune", "--checkpoint", misfits["ok"], "--method", "l1", "--target", "flops=2", "--out",
         str(tmp_path / "o"), "--no-latency"]
    rc, err = _run([*argv, flag, value], capsys)
    assert rc == 2 and (flag in err or "device" in err), err


@pytest.mark.parametrize("out, needle", [("DIR", "is a directory"), ("CK", "is the checkpoint itself"),
                                         ("BELOW", "cannot be created"), ("/proc/m.ts", "export failed"),
                                         ("SHAPE", "does not take inputs of shape 1,28,28")])
def test_export_checks_out_and_input_shape_before_exporting(tmp_path, capsys, misfits, out, needle) -> None:
    argv = ["export", misfits["ok"], "--format", "torchscript"]
    if out == "SHAPE":
        argv += ["--input-shape", "1,28,28", "--out", str(tmp_path / "m.ts")]
    else:
        (tmp_path / "f").write_text("x")
        named = {"DIR": str(tmp_path), "CK": misfits["ok"], "BELOW": str(tmp_path / "f" / "m.ts")}
        argv += ["--out", named.get(out, out)]
    before = open(misfits["ok"], "rb").read()
    rc, err = _run(argv, capsys)
    assert rc == 2 and needle in err, err
    assert open(misfits["ok"], "rb").read() == before and not (tmp_path / "m.ts").exists()


@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_torch_prune_l1_over_several_rounds_reaches_the_target(rounds) -> None:
    # found by the CLI fuzz (tests/test_fuzz.py): round 2 met the masks of round 1 (a raw TypeError from
    # torch.nn.utils.prune), and its params target was taken against the dense count (1.41x for params=2)
    res = prunekit.prune(create_model("lenet5", in_channels=3, image_size=32), "torch_prune_l1", "params=2",
                         rounds=rounds, input_shape=(3, 32, 32))
    assert res.report["compression"] == pytest.approx(2.0, rel=0.01)
