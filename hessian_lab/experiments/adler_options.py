"""ADLER's keyword arguments as a configuration sets them, checked before any run starts.

``adler_options`` in a sweep file or ``--adler-option KEY=VALUE`` on the command line are parsed
from JSON/TOML (:func:`parse_option_value`) and checked by :func:`check_adler_options`, whose
messages name the valid choices. Kept apart from ``optimizers.py`` so that the configuration can
check them without importing the optimizers (which import the configuration).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ADLER_OPTIONS", "AdlerOption", "check_adler_options", "parse_option_value"]


def parse_option_value(text: str) -> Any:
    """A command-line ``KEY=VALUE`` value: JSON where it parses (numbers, true, null), else text."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _number(low: float | None, low_open: bool, high: float | None = None) -> Callable:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("a number")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError("a finite number")
        if low is not None and (value <= low if low_open else value < low):
            raise ValueError("a number " + ("> " if low_open else ">= ") + f"{low:g}")
        if high is not None and value > high:
            raise ValueError(f"a number <= {high:g}")
        return value

    return check


def _positive_int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("a positive integer or null (never)")
    return value


def _choice(*choices: str) -> Callable:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _names(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
        raise ValueError('a non-empty list of parameter names, e.g. ["head.weight"]')
    return value


@dataclass(frozen=True)
class AdlerOption:
    """One keyword argument of :class:`hessian_lab.optim.ADLER` settable from a configuration.

    Attributes:
        check: Converts a parsed value (JSON) to the argument, or raises ``ValueError`` whose
            message says what was expected ("a number > 0").
        help: What it does.
    """

    check: Callable[[Any], Any]
    help: str


#: ADLER's extra keyword arguments accepted in ``adler_options`` / ``--adler-option KEY=VALUE``
#: (``curvature``, ``beta`` and ``eps`` have their own fields; ``beta_schedule`` is a callable
#: and only available from Python). Checked against ADLER's signature by the tests.
ADLER_OPTIONS: dict[str, AdlerOption] = {
    "trust_region": AdlerOption(_number(0.0, True), "bound the step length ‖Δθ‖ (off: null)"),
    "max_lr": AdlerOption(_number(0.0, True), "cap the applied rate η̂ (off: null)"),
    "curvature_fraction": AdlerOption(
        _number(0.0, True, 1.0), "estimate GᵀCG on this fraction of the batch, in (0, 1]"
    ),
    "max_consecutive_skips": AdlerOption(
        _positive_int_or_none, "raise after this many skipped steps in a row (null: never)"
    ),
    "averaging": AdlerOption(_choice("log", "arithmetic"), "average of η_k: log or arithmetic"),
    "jvp_method": AdlerOption(
        _choice("auto", "forward", "double_backward"), "how u = J G is computed"
    ),
    "allow_train_mode": AdlerOption(_boolean, "accept BatchNorm/Dropout in train mode"),
    "params": AdlerOption(_names, "names of the parameters to train (others stay fixed)"),
}

#: ADLER arguments that are fields of the configuration, not adler_options.
_OWN_FIELDS = {"curvature": "--curvature", "beta": "--beta", "eps": "--eps", "lr": "--lr"}


def check_adler_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate and normalize ``adler_options`` (values as parsed from JSON/TOML).

    ``null`` (None) switches an off-by-default option off explicitly and is dropped, so that
    ``{"trust_region": null}`` and ``{}`` are the same run.

    Returns:
        The options with numbers as floats where ADLER takes floats.

    Raises:
        ValueError: An unknown key (the message lists the valid ones) or a bad value (the
            message says what is expected).
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in _OWN_FIELDS:
            raise ValueError(
                f"adler option {key!r} is a setting of its own: use {_OWN_FIELDS[key]} "
                f"({key} = ... in a sweep file), not --adler-option"
            )
        if key not in ADLER_OPTIONS:
            raise ValueError(
                f"unknown adler option {key!r}; valid options are: "
                + ", ".join(f"{k} ({v.help})" for k, v in ADLER_OPTIONS.items())
            )
        if value is None and key not in ("max_consecutive_skips",):
            continue
        try:
            out[key] = ADLER_OPTIONS[key].check(value)
        except ValueError as err:
            raise ValueError(
                f"adler option {key} must be {err}, got {value!r} "
                f"(e.g. --adler-option {key}=...; {ADLER_OPTIONS[key].help})"
            ) from None
    return out
