"""Training progress: one flat row of metrics per iteration, printed as a line, logged to CSV and TensorBoard,
and plotted.

``rllib train`` writes ``progress.csv`` and TensorBoard event files (the same metrics, tagged by their place in
RLlib's result dict, e.g. ``env_runners/episode_return_mean``) into the run directory, next to its
checkpoints; ``tensorboard --logdir RUN_DIR`` shows them and ``rllib plot RUN_DIR ...`` draws the curves of one or
several runs side by side (matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
import struct
import time
from typing import Any, Mapping, Sequence

# (column, path into RLlib's result dict); the time split is derived below. The path also names the metric in
# TensorBoard.
_RESULT_PATHS = {
    "iteration": ("training_iteration",),
    "episode_return_mean": ("env_runners", "episode_return_mean"),
    "success_rate": ("env_runners", "success_rate"),
    "invalid_action_rate": ("env_runners", "invalid_action_rate"),
    "episode_len_mean": ("env_runners", "episode_len_mean"),
    "prompt_truncations": ("env_runners", "prompt_truncations"),
    "groups_with_signal_fraction": ("env_runners", "groups_with_signal_fraction"),
    "dynamic_sampling_rounds": ("env_runners", "dynamic_sampling_rounds"),
    "time_s": ("time_this_iter_s",),
    "rollout_s": ("timers", "env_runner_sampling_timer"),
    "learner_update_s": ("timers", "learner_update_timer"),
    "advantages_s": ("learners", "__all_modules__", "advantages_time_s"),
    "old_logprobs_s": ("learners", "__all_modules__", "old_logprobs_time_s"),
    "sync_s": ("timers", "synch_weights"),
    "train_tokens_per_s": ("throughput", "train_tokens_per_s"),
    "policy_loss": ("learners", "default_policy", "policy_loss"),
    "policy_kl": ("learners", "default_policy", "policy_kl"),
    "clip_fraction": ("learners", "default_policy", "clip_fraction"),
    "entropy": ("learners", "default_policy", "entropy"),
    "grad_norm": ("learners", "default_policy", "grad_norm"),
    "logprob_gap_max": ("learners", "default_policy", "logprob_gap_max"),
    "skipped_updates": ("learners", "__all_modules__", "skipped_updates"),
    "anchor_singleton_fraction": ("learners", "__all_modules__", "anchor_singleton_fraction"),
    "anchor_mean_group_size": ("learners", "__all_modules__", "anchor_mean_group_size"),
    "stalled_group_fraction": ("learners", "__all_modules__", "stalled_group_fraction"),
    "weight_sync_bytes": ("learners", "__all_modules__", "weight_sync_bytes"),
    "validation_success_rate": ("validation", "success_rate"),
    "validation_pool_success_rate": ("validation", "pool", "success_rate"),
    "validation_held_out_success_rate": ("validation", "held_out", "success_rate"),
    "evaluation_success_rate": ("evaluation", "env_runners", "success_rate"),
}
COLUMNS = tuple(_RESULT_PATHS) + ("update_s",)
# TensorBoard tag of each metric: its result path; update_s (derived) sits with the other timers.
TENSORBOARD_TAGS = {**{column: "/".join(path) for column, path in _RESULT_PATHS.items() if column != "iteration"},
                    "update_s": "timers/update_without_advantages_s"}
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
    learner update without the advantages and the old log-probs' pass, so rollout + advantages + old log-probs +
    update + sync add up."""
    row = {column: _lookup(result, path) for column, path in _RESULT_PATHS.items()}
    row["update_s"] = row["learner_update_s"] - row["advantages_s"] - _zero_if_missing(row["old_logprobs_s"])
    return row


def _zero_if_missing(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def format_progress(row: Mapping[str, float]) -> str:
    """One progress line: return, success, invalid-action rate, and the iteration's time split."""
    iteration = int(row["iteration"]) if math.isfinite(row["iteration"]) else 0
    return (
        f"iter {iteration:4d} | return {row['episode_return_mean']:+.3f} | success {row['success_rate']:.3f} | "
        f"invalid {row['invalid_action_rate']:.3f} | time {row['time_s']:.1f}s (rollout {row['rollout_s']:.2f}s, "
        f"advantages {row['advantages_s'] * 1e3:.1f}ms, "
        + (f"old log-probs {row['old_logprobs_s']:.2f}s, " if not math.isnan(row["old_logprobs_s"]) else "")
        + f"update {row['update_s']:.2f}s, sync {row['sync_s'] * 1e3:.1f}ms)"
        + (f" | truncated prompts {int(row['prompt_truncations'])}" if row["prompt_truncations"] > 0 else "")
        + (f" | skipped updates {int(row['skipped_updates'])}" if row["skipped_updates"] > 0 else "")
    )


class CsvLog:
    """Appends metrics rows to a CSV file (header written with the first row; the directory is made then too)."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)

    def _header(self) -> list[str] | None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        with self.path.open(newline="") as file:
            return next(csv.reader(file), None)

    def append(self, row: Mapping[str, float]) -> None:
        # A file written by another version keeps its own columns, so appended rows stay aligned with its header.
        header = self._header()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header or COLUMNS, extrasaction="ignore")
            if header is None:
                writer.writeheader()
            writer.writerow({column: row.get(column, math.nan) for column in writer.fieldnames})

    def drop_rows_after(self, iteration: int) -> int:
        """Keep only the rows of iterations <= ``iteration`` (a resumed run repeats the later ones); the file is
        replaced atomically. Returns the number of rows dropped."""
        header = self._header()
        if header is None:
            return 0
        with self.path.open(newline="") as file:
            rows = list(csv.DictReader(file))
        kept = [row for row in rows if _row_iteration(row) <= iteration]
        if len(kept) == len(rows):
            return 0
        staging = self.path.with_name(f".{self.path.name}.tmp")
        with staging.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(staging, self.path)
        return len(rows) - len(kept)


def _row_iteration(row: Mapping[str, str]) -> float:
    try:
        return float(row.get("iteration", "nan"))
    except ValueError:
        return math.nan


def read_csv(path: str | pathlib.Path) -> list[dict[str, float]]:
    with pathlib.Path(path).open(newline="") as file:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]


class TensorBoardLog:
    """Writes each metrics row as TensorBoard scalars (tags: :data:`TENSORBOARD_TAGS`, step: the iteration) to
    event files in ``log_dir``, with tensorboardX (what Ray Tune's own TensorBoard logger uses; it needs neither
    TensorFlow nor the tensorboard package). The writer is opened with the first row, so a run that never
    finishes an iteration leaves no empty event file.

    ``purge_step``: when resuming after iteration N, pass N + 1; TensorBoard then hides the steps >= N + 1 that
    the interrupted run had written, so the curves show no doubled points.
    """

    def __init__(self, log_dir: str | pathlib.Path, *, purge_step: int | None = None):
        self.log_dir = pathlib.Path(log_dir)
        self.purge_step = purge_step
        self._writer = None

    def append(self, row: Mapping[str, float]) -> None:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            # The file name holds the start second and the host; the suffix keeps two writers started in one
            # second (a quick resume) from writing the same file.
            self._writer = SummaryWriter(logdir=str(self.log_dir), purge_step=self.purge_step,
                                         filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        step = int(row["iteration"])
        for column, tag in TENSORBOARD_TAGS.items():
            value = row.get(column, math.nan)
            if not math.isnan(value):
                self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()  # a killed run keeps every finished iteration

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class RunLogs:
    """The per-iteration logs of one run directory: ``progress.csv`` and TensorBoard event files.

    ``resume_after``: the iteration of the checkpoint a resumed run restarts from; rows of later iterations
    (written before the interruption, and about to be repeated) are dropped from the CSV and purged in
    TensorBoard.
    """

    CSV_NAME = "progress.csv"

    def __init__(self, run_dir: str | pathlib.Path, *, resume_after: int | None = None):
        self.run_dir = pathlib.Path(run_dir)
        self.csv = CsvLog(self.run_dir / self.CSV_NAME)
        self.dropped_rows = self.csv.drop_rows_after(resume_after) if resume_after is not None else 0
        self.tensorboard = TensorBoardLog(self.run_dir, purge_step=None if resume_after is None else resume_after + 1)

    def append(self, row: Mapping[str, float]) -> None:
        self.csv.append(row)
        self.tensorboard.append(row)

    def close(self) -> None:
        self.tensorboard.close()


def read_tensorboard_scalars(log_dir: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}``: the scalars TensorBoard shows for the event files of ``log_dir`` (read
    without installing TensorBoard). Files are read in name order (their names start with the creation time);
    a purge marker (a ``SessionLog.START`` event at step N, written by a resumed run) drops the earlier points
    at steps >= N, as TensorBoard does. Event files are TFRecord files of ``Event`` protos."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(pathlib.Path(log_dir).glob("events.out.tfevents.*")):
        for record in _tfrecords(path.read_bytes()):
            event = Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == SessionLog.START and event.step > 0:
                scalars = {tag: [(step, value) for step, value in points if step < event.step]
                           for tag, points in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _tfrecords(data: bytes):
    # Each record: uint64 length, uint32 CRC of the length, the payload, uint32 CRC of the payload.
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        payload = data[offset + 12: offset + 12 + length]
        if len(payload) < length:
            return  # a record cut short by a kill
        yield payload
        offset += 12 + length + 4


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
        raise ImportError("plotting needs matplotlib, a dependency of gigpo-rllib: reinstall it (or pip install "
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
