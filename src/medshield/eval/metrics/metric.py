"""The one type of a metric with its interval (:class:`Metric`) and how it prints
(:func:`format_metric`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from medshield.errors import InputError

Interval = Literal["bootstrap", "student-t", "mover"]
"""How a metric's 95% interval was made (see docs/concepts.md, "Confidence intervals"): a
percentile bootstrap over items (:func:`bootstrap_ci`, every metric of a run), a Student-t
interval over seeds (the noise study's means,
:func:`medshield.commands.studies.noise.mean_t_ci`), or a MOVER interval combining two bootstrap
intervals (the defense study's balanced error,
:func:`medshield.commands.studies.defense.analysis.balanced_error`)."""


@dataclass(frozen=True)
class Metric:
    """A point estimate with its 95% confidence interval: the one metric type, in memory, in
    ``results.json`` (:meth:`to_dict`, :meth:`from_dict`) and as text (:meth:`format`).

    Attributes:
        value: the metric on all rows (nan when undefined, e.g. AUC with a class absent).
        ci_low: lower end of the confidence interval (nan when undefined).
        ci_high: upper end of the confidence interval (nan when undefined).
        n: number of rows (or seeds) it was computed from; None when a dict did not say.
        interval: how the interval was made (not written to ``results.json``).
    """

    value: float
    ci_low: float
    ci_high: float
    n: int | None
    interval: Interval = "bootstrap"

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready dict; nan becomes None so the output is strict JSON."""
        return {
            "value": _json_float(self.value),
            "ci_low": _json_float(self.ci_low),
            "ci_high": _json_float(self.ci_high),
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], interval: Interval = "bootstrap") -> Metric:
        """A metric dict as :meth:`to_dict` writes it, or one that names its value instead
        (``{"accuracy": v, "ci_low": l, "ci_high": h}``); a None number becomes nan.

        Raises:
            InputError: the dict holds no value, or its value or bounds are not numbers.
        """
        if "value" in data:
            value = data["value"]
        else:
            named = [k for k in data if k not in ("ci_low", "ci_high", "n")]
            if len(named) != 1 or "ci_low" not in data or "ci_high" not in data:
                raise InputError(f"not a metric: {dict(data)!r} has no single value and interval")
            value = data[named[0]]
        n = data.get("n")
        return cls(
            _nan_float(value),
            _nan_float(data.get("ci_low")),
            _nan_float(data.get("ci_high")),
            None if n is None else int(n),
            interval,
        )

    @property
    def defined(self) -> bool:
        """Whether there is a value: finite, from at least one row."""
        return math.isfinite(self.value) and self.n != 0

    def format(self, digits: int = 3, signed: bool = False) -> str:
        """``value [low, high]`` to ``digits`` decimals (with a sign when ``signed``); the value
        alone when the interval is undefined (one seed); ``-`` when the value is."""
        if not self.defined:
            return "-"
        spec = f"{'+' if signed else ''}.{digits}f"
        if not (math.isfinite(self.ci_low) and math.isfinite(self.ci_high)):
            return format(self.value, spec)
        return f"{self.value:{spec}} [{self.ci_low:{spec}}, {self.ci_high:{spec}}]"


def format_metric(data: Any, digits: int = 3, missing: str = "-") -> str:
    """A metric dict of ``results.json`` as text (:meth:`Metric.format`); ``missing`` when
    ``data`` is not a metric dict or its value is undefined."""
    if not isinstance(data, Mapping):
        return missing
    try:
        metric = Metric.from_dict(data)
    except (InputError, TypeError, ValueError):
        return missing
    return metric.format(digits) if metric.defined else missing


def _nan_float(x: Any) -> float:
    """A number of a metric dict as a float (None is nan).

    Raises:
        InputError: ``x`` is not a number.
    """
    if x is None:
        return math.nan
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise InputError(f"not a metric: {x!r} is not a number")
    return float(x)


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)
