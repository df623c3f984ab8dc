"""Argument checks shared by every entry point (the engine, the VLM and image pipelines, the CLI), run before any
work starts, as diffusers' ``check_inputs`` does: each raises a typed error that names the argument, the value it
got and what would be valid. One rule per concept, so ``seed`` (say) is refused the same way everywhere."""
from __future__ import annotations

import math
from numbers import Real

from .errors import GenerationConfigError, InvalidInputError


def check_seed(seed, name: str = "seed") -> None:
    """None (fresh randomness) or an int (request b gets seed + b); bools and strings are refused."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise GenerationConfigError(f"{name}={seed!r}: must be an int (or None for fresh randomness)")


def check_number(value, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 error: type[InvalidInputError] = GenerationConfigError) -> None:
    """A finite real (an int with integer=True) within [low, high] (an open end with low_open / high_open)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if integer:
        ok = ok and float(value) == int(value) and not isinstance(value, float)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        span = f" in {lo or '(-inf'}, {hi or 'inf)'}" if low is not None or high is not None else ""
        kind = "an integer" if integer else "a finite number"
        raise error(f"{name}={value!r}: must be {kind}{span}")
