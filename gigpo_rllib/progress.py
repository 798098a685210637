"""Training progress: one flat row of metrics per iteration, printed as a line, logged to CSV, and plotted.

``rllib train`` writes ``progress.csv`` next to its checkpoints; ``rllib plot RUN_DIR ...`` draws the curves of
one or several runs side by side (matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import csv
import math
import pathlib
from typing import Any, Mapping, Sequence

# (column, path into RLlib's result dict); the time split is derived below.
_RESULT_PATHS = {
    "iteration": ("training_iteration",),
    "episode_return_mean": ("env_runners", "episode_return_mean"),
    "success_rate": ("env_runners", "success_rate"),
    "invalid_action_rate": ("env_runners", "invalid_action_rate"),
    "episode_len_mean": ("env_runners", "episode_len_mean"),
    "prompt_truncations": ("env_runners", "prompt_truncations"),
    "time_s": ("time_this_iter_s",),
    "rollout_s": ("timers", "env_runner_sampling_timer"),
    "learner_update_s": ("timers", "learner_update_timer"),
    "advantages_s": ("learners", "advantages_time_s"),
    "sync_s": ("timers", "synch_weights"),
    "train_tokens_per_s": ("throughput", "train_tokens_per_s"),
    "policy_loss": ("learners", "default_policy", "policy_loss"),
    "policy_kl": ("learners", "default_policy", "policy_kl"),
    "clip_fraction": ("learners", "default_policy", "clip_fraction"),
    "entropy": ("learners", "default_policy", "entropy"),
    "grad_norm": ("learners", "default_policy", "grad_norm"),
    "anchor_singleton_fraction": ("learners", "anchor_singleton_fraction"),
    "validation_success_rate": ("validation", "success_rate"),
}
COLUMNS = tuple(_RESULT_PATHS) + ("update_s",)
PLOTTED = (("episode_return_mean", "episode return (mean)"), ("success_rate", "success rate"),
           ("invalid_action_rate", "invalid-action rate"), ("entropy", "token entropy"))


def _lookup(result: Mapping[str, Any], path: Sequence[str]) -> float:
    value: Any = result
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return math.nan
        value = value[key]
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def iteration_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The flat metrics row of one ``algo.train()`` result (NaN where a metric is missing). ``update_s`` is the
    learner update without the advantage computation, so rollout + advantages + update + sync add up."""
    row = {column: _lookup(result, path) for column, path in _RESULT_PATHS.items()}
    row["update_s"] = row["learner_update_s"] - row["advantages_s"]
    return row


def format_progress(row: Mapping[str, float]) -> str:
    """One progress line: return, success, invalid-action rate, and the iteration's time split."""
    iteration = int(row["iteration"]) if math.isfinite(row["iteration"]) else 0
    return (
        f"iter {iteration:4d} | return {row['episode_return_mean']:+.3f} | success {row['success_rate']:.3f} | "
        f"invalid {row['invalid_action_rate']:.3f} | time {row['time_s']:.1f}s (rollout {row['rollout_s']:.2f}s, "
        f"advantages {row['advantages_s'] * 1e3:.1f}ms, update {row['update_s']:.2f}s, "
        f"sync {row['sync_s'] * 1e3:.1f}ms)"
    )


class CsvLog:
    """Appends metrics rows to a CSV file (header written with the first row)."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._has_header = self.path.exists() and self.path.stat().st_size > 0

    def append(self, row: Mapping[str, float]) -> None:
        with self.path.open("a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS)
            if not self._has_header:
                writer.writeheader()
                self._has_header = True
            writer.writerow({column: row.get(column, math.nan) for column in COLUMNS})


def read_csv(path: str | pathlib.Path) -> list[dict[str, float]]:
    with pathlib.Path(path).open(newline="") as file:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, float]]], path: str | pathlib.Path, title: str = "") -> str:
    """Draw :data:`PLOTTED` metrics per iteration for each named run into one PNG. Returns the path.

    Raises:
        ImportError: with the install hint, when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'gigpo-rllib[plot]' (or pip install "
                          "matplotlib)") from error
    figure, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.5))
    for name, rows in runs.items():
        iterations = [row["iteration"] for row in rows]
        for axis, (column, _) in zip(axes, PLOTTED):
            axis.plot(iterations, [row[column] for row in rows], marker=".", label=name)
    for axis, (_, label) in zip(axes, PLOTTED):
        axis.set_xlabel("iteration")
        axis.set_title(label)
        axis.grid(alpha=0.3)
    axes[0].legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(pathlib.Path(path).resolve())
