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
