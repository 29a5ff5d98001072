"""Numbers from users: every float option and config field goes through `finite_float` / `is_finite_number`, so
that NaN and infinity (which pass comparisons such as `x >= 0` unnoticed) are refused where they are given."""

from __future__ import annotations

import argparse
import math
from numbers import Real


def is_finite_number(value) -> bool:
    """Whether `value` is an int or float (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def finite_float(text: str) -> float:
    """An argparse `type`: the float `text` spells, refused (argparse's one error line) when it is not a finite
    number."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a number such as 1.5")
    return value
