"""Range checks for settings: argparse types for the ``walt`` commands, and checks for the constructors that YAML
configures, so an out-of-range value fails before any work with its name and its allowed range.

A command's option fails while parsing (``walt sample: error: argument --fps: must be > 0, got 0``); a
constructor raises ValueError (``label_dropout must be in [0, 1], got 3.0``), which ``walt fit`` shows before
the first step.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = [
    "check_int",
    "check_positive",
    "check_probability",
    "guidance_interval_problem",
    "int_at_least",
    "nonnegative_float",
    "positive_float",
]


def guidance_interval_problem(interval: list[float] | None, guidance: float) -> str | None:
    """What is wrong with a command's ``--guidance-interval LO HI`` next to its ``--guidance`` (None: nothing), for
    the parser to report before any work."""
    from walt.diffusion.guidance import check_interval

    if interval is None:
        return None
    try:
        check_interval(tuple(interval))
    except ValueError as err:
        return f"--guidance-interval: {err}"
    if guidance == 1.0:
        return "--guidance-interval without --guidance: guidance 1 (the default) does not guide anywhere"
    return None


def check_int(name: str, value: object, minimum: int) -> None:
    """Raises ValueError unless ``value`` is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_probability(name: str, value: object) -> None:
    """Raises ValueError unless ``value`` is a number in [0, 1]."""
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def check_positive(name: str, value: object) -> None:
    """Raises ValueError unless ``value`` is a finite number > 0."""
    if not _is_number(value) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def finite_float(text: str) -> float:
    """argparse type of walt's sampling settings: a finite number. ``float`` alone takes "nan" and "inf", which
    would reach the sampler and come out as black or garbage videos."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """An argparse ``type``: a finite number >= 0."""
    return _float_above(text, 0.0, inclusive=True)


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    return _float_above(text, 0.0, inclusive=False)


def _float_above(text: str, bound: float, inclusive: bool) -> float:
    relation = f"{'>=' if inclusive else '>'} {bound:g}"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {relation}, got {text!r}") from None
    if not (math.isfinite(value) and (value >= bound if inclusive else value > bound)):
        raise argparse.ArgumentTypeError(f"must be a finite number {relation}, got {text}")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
