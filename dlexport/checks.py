"""Argument checks shared by every entry point: types, ranges and finiteness, each failure an ``InputError``.

Python's loose numbers are the trap here: ``True`` is an int, ``2.0`` is not a layer index, NaN compares false
to everything (a NaN threshold would silently mean "never exit"), so every check is explicit.
"""
from __future__ import annotations

import math
import numbers

from .errors import InputError, echo


def integer(value, name: str, lo: int | None = None, hi: int | None = None, fix: str = "") -> int:
    """An int (numpy ints too, never a bool or float) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {type(value).__name__} {echo(value)}{_fix(fix)}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InputError(f"{name} is {value}; it must be {_range(lo, hi)}{_fix(fix)}")
    return value


def number(value, name: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           fix: str = "") -> float:
    """A finite real number (no bool) within [lo, hi] (or (lo, hi] with ``lo_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {type(value).__name__} {echo(value)}{_fix(fix)}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} is {value}; it must be a finite number{_fix(fix)}")
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        interval = f"in ({lo}, {hi}]" if lo_open else _range(lo, hi)
        raise InputError(f"{name} is {value}; it must be {interval}{_fix(fix)}")
    return value


def text(value, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, got {type(value).__name__} {echo(value)}")
    if len(value) > limit:
        raise InputError(f"{name} is {len(value)} characters long; the limit is {limit}")
    return value


def layer_list(layers, n: int, name: str, *, limit: int | None = None) -> tuple[int, ...]:
    """Layer indices: ints in 0..n-1, strictly ascending (so also unique); linear time, short messages."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise InputError(f"{name} must be a list of layer indices, got {type(layers).__name__} {echo(layers)}")
    layers = tuple(layers)
    if limit is not None and len(layers) > limit:
        raise InputError(f"{name} lists {len(layers)} layers, more than the model has ({limit}); list each layer once")
    out, bad, previous = [], [], -1
    for i, v in enumerate(layers):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise InputError(f"{name}[{i}] is {type(v).__name__} {echo(v)}; layer indices are integers")
        v = int(v)
        if not 0 <= v < n:
            bad.append(v)
            continue
        if v == previous:
            raise InputError(f"{name} repeats layer(s) [{v}]; list each layer once")
        if v < previous:
            raise InputError(f"{name} is not in ascending order (layer {v} after {previous}); layers run bottom-up: "
                             "sort them")
        out.append(previous := v)
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (f", … ({len(bad)} in all)" if len(bad) > 8 else "")
        raise InputError(f"{name} names layer(s) [{shown}] out of range: this model has layers 0..{n - 1}")
    return tuple(out)


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    return f">= {lo}" if lo is not None else f"<= {hi}"


def _fix(fix: str) -> str:
    return f"; {fix}" if fix else ""
