"""Stop criteria of a training run, in Ray Tune's dialect: ``{result key: threshold}``, stop when any is reached.

Keys name any entry of the result dict, nested entries as ``"a/b"`` paths (``"env_runners/success_rate"``); a
criterion is reached when the result's value is ``>=`` the threshold, as ``tune.RunConfig(stop={...})`` does.

A misspelt key must not train forever, so every key is checked against the first result that can hold it:
the first result of the run, or for ``validation/...`` keys the first result with validation metrics (they
appear every ``val_interval`` iterations). A key missing there raises :class:`StopKeyError`, which names the key
and the closest keys the result does have.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

TRAINING_ITERATION = "training_iteration"
VALIDATION_SECTION = "validation"


class StopKeyError(ValueError):
    """A stop key that the results do not have."""


def result_value(result: Mapping[str, Any], key: str) -> Any:
    """The value at ``key`` (``"a/b"`` walks nested dicts); a literal top-level ``"a/b"`` key also counts.
    Raises ``KeyError`` when the result has no such entry."""
    if key in result:
        return result[key]
    value: Any = result
    for part in key.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def result_keys(result: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every leaf of the result as an ``"a/b"`` path (what a stop key may name)."""
    keys = []
    for name, value in result.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping):
            keys.extend(result_keys(value, f"{path}/"))
        else:
            keys.append(path)
    return keys


def close_matches(key: str, keys: list[str]) -> list[str]:
    """Keys that look like ``key``: similar spelling, or the same last component under another section."""
    last = key.rsplit("/", 1)[-1]
    same_leaf = [candidate for candidate in keys if candidate.rsplit("/", 1)[-1] == last and candidate != key]
    similar = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    return list(dict.fromkeys(same_leaf + similar))[:4]


@dataclass
class StopCriteria:
    """``thresholds``: result key -> value; training stops at the first result where any value is reached."""

    thresholds: dict[str, float]
    _unchecked: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self._unchecked = set(self.thresholds)

    @property
    def max_iterations(self) -> int | None:
        value = self.thresholds.get(TRAINING_ITERATION)
        return None if value is None else int(math.ceil(value))

    def check_keys(self, result: Mapping[str, Any]) -> None:
        """Raise :class:`StopKeyError` for a key that ``result`` should hold but does not (see module docstring).
        Keys found once are not checked again."""
        for key in sorted(self._unchecked):
            if key.split("/", 1)[0] == VALIDATION_SECTION and VALIDATION_SECTION not in result:
                continue  # validation metrics come only every val_interval iterations
            try:
                value = result_value(result, key)
            except KeyError:
                raise StopKeyError(self._missing_key_message(key, result)) from None
            if not _is_number(value):
                raise StopKeyError(f"stop key {key!r} is not a number in the results (got {value!r}); stop "
                                   "criteria compare numbers")
            self._unchecked.discard(key)

    def reached(self, result: Mapping[str, Any]) -> list[str]:
        """The criteria ``result`` meets, each as ``"key=value >= threshold"`` (empty: keep training)."""
        met = []
        for key, threshold in self.thresholds.items():
            try:
                value = result_value(result, key)
            except KeyError:
                continue
            if _is_number(value) and value >= threshold:
                met.append(f"{key}={value:g} >= {threshold:g}")
        return met

    @staticmethod
    def _missing_key_message(key: str, result: Mapping[str, Any]) -> str:
        matches = close_matches(key, result_keys(result))
        hint = f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""
        return (f"stop key {key!r} is not in the training results{hint} (nested keys are written 'a/b', e.g. "
                "'env_runners/episode_return_mean')")


def parse_stop(stop: Any, *, source: str) -> dict[str, float]:
    """Validate a stop mapping from YAML or JSON: string keys, numeric thresholds, ``training_iteration`` an
    integer >= 1. Raises ``ValueError`` naming the bad entry and ``source``."""
    if not isinstance(stop, Mapping):
        raise ValueError(f"{source}: 'stop' must be a mapping of result keys to thresholds, like "
                         f"{{training_iteration: 10, env_runners/success_rate: 0.9}}, got {stop!r}")
    thresholds = {}
    for key, value in stop.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{source}: stop keys must be result keys such as 'training_iteration', got {key!r}")
        if not _is_number(value):
            raise ValueError(f"{source}: stop.{key} must be a number (training stops once the result value is "
                             f">= it), got {value!r}")
        thresholds[key] = value
    iterations = thresholds.get(TRAINING_ITERATION)
    if iterations is not None and (not isinstance(iterations, int) or iterations < 1):
        raise ValueError(f"{source}: stop.training_iteration must be an integer >= 1, got {iterations!r}")
    return thresholds


def _is_number(value: Any) -> bool:
    # numbers.Real also takes numpy scalars, which metrics often are; a bool is not a threshold.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
