"""Checked argument types for the command line: bad values stop at the parser with exit code 2.

``--epochs nan``, ``--momentum -1`` or ``--model-kwargs '{bad'`` give one line naming the flag, the value
and what is allowed (argparse prints ``prunekit CMD: error: argument --FLAG: ...``), before any work.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from prunekit.errors import PrunekitError


def number(kind: str = "float", low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], float | int]:
    """An argparse type: a finite number (``kind`` "float" or "int") within the bounds."""
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    allowed = f"{'an integer' if kind == 'int' else 'a finite number'}" + (
        f" in {lo or '(-inf'}, {hi or 'inf)'}" if (low is not None or high is not None) else "")

    def parse(text: str) -> float | int:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected {allowed}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; expected {allowed}")
        if kind == "int":
            if v != int(v):
                raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected {allowed}")
            v = int(v)
        bad_low = low is not None and (v <= low if low_open else v < low)
        bad_high = high is not None and (v >= high if high_open else v > high)
        if bad_low or bad_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {allowed}")
        return v

    parse.__name__ = kind  # argparse names the type in its messages
    return parse


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object (``'{"width": 0.5}'``)."""
    try:
        v = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e}); expected an object such as "
                                         "'{\"width\": 0.5}'") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; expected e.g. '{{\"width\": 0.5}}'")
    return v


POSITIVE = number("float", 0, low_open=True)
NON_NEGATIVE = number("float", 0)
FRACTION = number("float", 0, 1, high_open=True)  # [0, 1)
POSITIVE_INT = number("int", 1, 2**24)  # batch sizes, sample counts, rounds, repeats
NON_NEGATIVE_INT = number("int", 0, 2**24)
THREADS = number("int", 1, 4096)
SEED = number("int", 0, 2**32 - 1)  # numpy's seed range

__all__ = ["FRACTION", "NON_NEGATIVE", "NON_NEGATIVE_INT", "POSITIVE", "POSITIVE_INT", "SEED", "THREADS",
           "json_object", "number"]


def runtimes(text: str) -> tuple[str, ...]:
    """``--runtimes eager,onnxruntime``: a comma list of known runtimes (no repeats)."""
    names = tuple(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))
    known = ("eager", "onnxruntime", "torchscript")
    bad = [n for n in names if n not in known]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown runtime(s) {', '.join(bad) or repr(text)}: give a comma list of {', '.join(known)}")
    return names


RUNTIMES = runtimes


def shape(text: str) -> tuple[int, ...]:
    """``--input-shape 3,32,32``: positive ints separated by commas."""
    try:
        dims = tuple(int(t) for t in str(text).split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: give positive ints such as 3,32,32")
    return dims


SHAPE = shape


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["samples=512", "use_init=true"]`` -> ``{"samples": 512, "use_init": True}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PrunekitError(f"--option expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = _parse_value(value)
    return out
