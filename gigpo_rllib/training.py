"""The training loop behind ``rllib train``: build (or resume) the algorithm, train until a stop criterion is met,
log every iteration, checkpoint, and fail in a way that tells the user where everything is.

:func:`train` is the reusable entry point (the examples call it); the CLI adds argument handling around it.
"""

from __future__ import annotations

import math
import pathlib
import statistics
import sys
import time
import traceback
from typing import Any, Mapping, Sequence

from gigpo_rllib.checkpoints import (clear_leftovers, config_from_checkpoint, plan_run,
                                     save_checkpoint, write_error_file)
from gigpo_rllib.experiment import DEFAULT_STOP_ITERS, ExperimentError, build_stop
from gigpo_rllib.logging_utils import filtered_native_stderr
from gigpo_rllib.progress import RunLogs, format_progress, iteration_metrics
from gigpo_rllib.run_records import (check_resume_config, forget_run_records, read_params, run_params,
                                     write_run_records)
from gigpo_rllib.stopping import TRAINING_ITERATION, StopCriteria, StopKeyError
from gigpo_rllib.trackers import TrackerHooks

TIME_SPLIT = ("rollout_s", "advantages_s", "update_s", "sync_s")
# Settings compared with a checkpoint's when resuming, to point out what the user changed in between.
RESUME_COMPARED_KEYS = ("env", "env_config", "lr", "minibatch_size", "seed", "num_env_runners", "num_learners")


class TrainingFailed(RuntimeError):
    """Training stopped on an error (exit status 1) or an interrupt (130); :meth:`report` says what happened and
    where the run's logs and last checkpoint are."""

    def __init__(self, message: str, *, run_dir: pathlib.Path, checkpoint: pathlib.Path | None,
                 error_file: pathlib.Path | None = None, interrupted: bool = False):
        super().__init__(message)
        self.run_dir, self.checkpoint, self.error_file, self.interrupted = run_dir, checkpoint, error_file, interrupted

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 1

    def report(self) -> str:
        lines = [f"rllib: error: {self}",
                 f"rllib: run directory: {self.run_dir} (progress.csv and TensorBoard events)"]
        if self.error_file is not None:
            lines.append(f"rllib: full traceback: {self.error_file}")
        if self.checkpoint is not None:
            lines.append(f"rllib: last checkpoint: {self.checkpoint} (continue with the same command plus --resume)")
        else:
            lines.append("rllib: no checkpoint was saved")
        return "\n".join(lines)


def as_stop_criteria(stop: int | Mapping[str, Any] | StopCriteria | None) -> StopCriteria:
    """``int`` -> that many iterations; a mapping -> Tune-style criteria; ``None`` -> the default."""
    if isinstance(stop, StopCriteria):
        return stop
    if stop is None:
        return StopCriteria({TRAINING_ITERATION: DEFAULT_STOP_ITERS})
    if isinstance(stop, int) and not isinstance(stop, bool):
        return build_stop({TRAINING_ITERATION: stop}, source="stop")
    return build_stop(stop, source="stop")


def train(config, stop: int | Mapping[str, Any] | StopCriteria | None = None, *,
          checkpoint_dir: str | pathlib.Path, checkpoint_every: int = 0, checkpoint_at_end: bool = True,
          resume: bool = False, allow_config_change: bool = False, quiet: bool = True, out=None,
          command: Sequence[str] | None = None, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train until a stop criterion is met, printing one progress line per iteration.

    Args:
        config: a validated :class:`~gigpo_rllib.config.GiGPOConfig`.
        stop: iterations (int) or Tune-style criteria ``{"training_iteration": 20, "env_runners/success_rate":
            0.9}``: training stops when any result value reaches its threshold.
        checkpoint_dir: the run directory: ``progress.csv``, TensorBoard event files, ``checkpoint_<n>``.
        checkpoint_every: also checkpoint every this many iterations (0: never periodically).
        checkpoint_at_end: checkpoint when training ends (also after a failure that left the state sound).
        resume: continue the run in ``checkpoint_dir`` from its last complete checkpoint (iteration counter,
            weights, optimizer and seed counters restored; later progress rows dropped). Without it a directory
            that already holds a run is an error.
        allow_config_change: resume even when ``config`` differs from the run's ``params.json`` (the changed
            keys are recorded in ``run_info.json``); without it such a resume raises
            :class:`~gigpo_rllib.run_records.ConfigChanged` listing them. ``stop`` may always change.
        quiet: drop Ray's known-harmless native log line while the actors are built.
        command: the command line recorded in ``run_info.json`` (default ``sys.argv``).
        callbacks: Ray Tune callbacks, such as ``ray.air.integrations.wandb.WandbLoggerCallback`` and
            ``ray.air.integrations.mlflow.MLflowLoggerCallback``: they get the run's config, every iteration's result
            and, at the end, the learning curve, as under ``tune.Tuner`` (see :mod:`gigpo_rllib.trackers`).

    Returns:
        A summary dict: ``iterations`` (trained in this call), ``time_s``, ``final``/``best`` return and success,
        ``mean_iteration_times``, ``checkpoint`` (the last path), ``progress_csv``, ``run_dir``, ``stopped_by``.

    Raises:
        ExperimentError: a bad stop key, a run directory that does not fit ``resume``, or a resume whose config
            differs from ``params.json`` (see ``allow_config_change``).
        TrainingFailed: training failed or was interrupted (the message says where the logs and checkpoint are).
    """
    out = out or sys.stdout
    criteria = as_stop_criteria(stop)
    start = prepare_run(config, criteria, checkpoint_dir=checkpoint_dir, resume=resume,
                        allow_config_change=allow_config_change, command=command)
    session = _Session(config, criteria, start, checkpoint_every=checkpoint_every,
                       checkpoint_at_end=checkpoint_at_end, quiet=quiet, out=out, callbacks=callbacks)
    return session.run()


def prepare_run(config, stop: StopCriteria, *, checkpoint_dir: str | pathlib.Path, resume: bool,
                allow_config_change: bool = False, command: Sequence[str] | None = None) -> "RunStart":
    """Everything about the run directory that can fail before Ray starts: :func:`plan_run` (a run already there
    without ``resume``), and a resume's config against the run's ``params.json``
    (:func:`~gigpo_rllib.run_records.check_resume_config`). Nothing is written yet."""
    return RunStart(config, stop, plan_run(checkpoint_dir, resume=resume), allow_change=allow_config_change,
                    command=sys.argv if command is None else command)


class RunStart:
    """How a call of :func:`train` starts: its :class:`~gigpo_rllib.checkpoints.RunPlan` and the records it
    writes (``params.json``, ``run_info.json``; see :mod:`gigpo_rllib.run_records`)."""

    def __init__(self, config, stop: StopCriteria, plan, *, allow_change: bool, command: Sequence[str]):
        self.plan, self.run_dir, self.command = plan, pathlib.Path(plan.run_dir), list(command)
        self.params = run_params(config, stop.thresholds)
        # A run restarting from iteration 0 (no checkpoint to resume from) is a fresh start: new records.
        self.resumed_from = plan.iteration if plan.checkpoint is not None else None
        self.params_were_recorded = self.resumed_from is None or read_params(self.run_dir) is not None
        self.changes = (check_resume_config(self.run_dir, self.params, allow_change=allow_change)
                        if self.resumed_from is not None else {})

    def write_records(self) -> None:
        write_run_records(self.run_dir, self.params, command=self.command, resumed_from=self.resumed_from,
                          changes=self.changes)


class _Session:
    """One call of :func:`train`: the algorithm, its logs, and what happened so far."""

    def __init__(self, config, criteria: StopCriteria, start: RunStart, *, checkpoint_every: int,
                 checkpoint_at_end: bool, quiet: bool, out, callbacks: Sequence[Any]):
        self.config, self.criteria, self.start, self.plan = config, criteria, start, start.plan
        self.run_dir = start.run_dir
        self.trackers = TrackerHooks(callbacks, run_dir=self.run_dir, params=start.params)
        self.checkpoint_every, self.checkpoint_at_end, self.quiet, self.out = (checkpoint_every, checkpoint_at_end,
                                                                                quiet, out)
        self.rows: list[dict[str, float]] = []
        self.checkpoint: pathlib.Path | None = start.plan.checkpoint
        self.checkpointed_iteration = start.plan.iteration if start.plan.checkpoint else None
        self.stopped_by: list[str] = []
        self.algo = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # ------------------------------------------------------------------------------------------- the run

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        self._announce_plan()
        clear_leftovers(self.plan)
        self.start.write_records()
        self.trackers.setup(self.criteria.thresholds)
        self.algo = self._build()
        logs, failed = None, True
        try:
            self._restore()
            # Only now that the checkpoint has loaded: a resume that fails keeps every progress row it had.
            logs = RunLogs(self.run_dir, resume_after=self.plan.iteration if self.plan.resume else None)
            self.say(f"built GiGPO in {time.perf_counter() - started:.1f}s (env {self.config.env_tags}, "
                     f"{self.config.rollout_batch_size} trajectories per iteration, {self.config.num_env_runners} "
                     f"env runner(s)); {self._stop_text()}; run directory {self.run_dir} (progress.csv, "
                     "TensorBoard events, checkpoints)")
            with filtered_native_stderr(active=self.quiet):  # W&B's logging actor gets the core worker's note too
                self.trackers.start()
            self._train_loop(logs)
            failed = False
        except StopKeyError as error:
            self._forget_empty_run_dir()
            raise ExperimentError(str(error)) from None
        except ExperimentError:
            raise
        except BaseException as error:  # noqa: BLE001 - reported with the run's whereabouts, then re-raised
            raise self._failure(error) from error
        finally:
            if logs is not None:
                logs.close()
            self._end_trackers(failed=failed)
            self.algo.stop()
        summary = _summary(self.rows, time.perf_counter() - started, self.checkpoint, logs.csv.path)
        summary.update(run_dir=str(self.run_dir), stopped_by=self.stopped_by)
        self._print_summary(summary)
        return summary

    def _announce_plan(self) -> None:
        for checkpoint, problem in self.plan.skipped:
            self.say(f"warning: skipping damaged checkpoint {checkpoint}: {problem}")
        if self.plan.resume and self.plan.checkpoint is None:
            self.say(f"--resume: no complete checkpoint in {self.run_dir}; starting from iteration 0")
        if self.start.changes:
            changed = "; ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in self.start.changes.items())
            self.say(f"warning: resuming with a config that differs from params.json (recorded in run_info.json): "
                     f"{changed}")

    def _build(self):
        # Actor creation is where Ray's C++ core worker prints its harmless note (see logging_utils).
        try:
            with filtered_native_stderr(active=self.quiet):
                return self.config.build_algo()
        except BaseException as error:  # noqa: BLE001
            raise self._failure(error, phase="building the algorithm") from error

    def _restore(self) -> None:
        if self.plan.checkpoint is None:
            return
        if not self.start.params_were_recorded:  # a run from before params.json: compare with the checkpoint's config
            self._note_changed_settings()
        try:
            self.algo.restore_from_path(str(self.plan.checkpoint.resolve()))
        except Exception as error:  # noqa: BLE001 - a checkpoint that passed the size checks but does not load
            raise ExperimentError(f"cannot resume from {self.plan.checkpoint}: {type(error).__name__}: {error}. Delete "
                                  "that directory to resume from the checkpoint before it.") from error
        self.say(f"resumed from {self.plan.checkpoint} (iteration {self.algo.iteration})")

    def _train_loop(self, logs: RunLogs) -> None:
        limit = self.criteria.max_iterations
        if limit is not None and self.algo.iteration >= limit:
            self.stopped_by = [f"{TRAINING_ITERATION}={self.algo.iteration} >= {limit}"]
            self.say(f"already at iteration {self.algo.iteration}: nothing to train")
            return
        while not self.stopped_by:
            result = self.algo.train()
            self.criteria.check_keys(result)
            row = iteration_metrics(result)
            logs.append(row)
            self.rows.append(row)
            self.say(format_progress(row))
            self.stopped_by = self.criteria.reached(result)
            self.trackers.result(result, row, last=bool(self.stopped_by))
            if self.checkpoint_every and self.algo.iteration % self.checkpoint_every == 0 and not self.stopped_by:
                self._save()
        self.say(f"stopping: {', '.join(self.stopped_by)}")
        if self.checkpoint_at_end:
            self._save()

    def _end_trackers(self, *, failed: bool) -> None:
        try:
            self.trackers.end(failed=failed)
        except Exception as error:  # noqa: BLE001 - the run's own outcome (and any error of it) matters more
            self.say(f"warning: an experiment tracker failed to finish: {type(error).__name__}: {error}")

    def _save(self) -> None:
        if self.checkpointed_iteration == self.algo.iteration:
            return
        self.checkpoint = save_checkpoint(self.algo, self.run_dir)
        self.checkpointed_iteration = self.algo.iteration
        self.say(f"checkpoint saved: {self.checkpoint}")

    # ------------------------------------------------------------------------------------------ failures

    def _failure(self, error: BaseException, phase: str | None = None) -> TrainingFailed:
        """Save a final checkpoint if the algorithm's state is that of its iteration (``checkpoint_is_consistent``),
        write error.txt, and describe the failure."""
        interrupted = isinstance(error, KeyboardInterrupt)
        iteration = self.algo.iteration + 1 if self.algo is not None else 1
        phase = phase or f"iteration {iteration}"
        if self.algo is not None and self.checkpoint_at_end and self.algo.checkpoint_is_consistent:
            self._save_after_failure()
        error_file = write_error_file(self.run_dir, "".join(traceback.format_exception(error)))
        what = "interrupted" if interrupted else "failed"
        message = f"training {what} while {phase}" if phase.startswith("building") else f"training {what} in {phase}"
        if not interrupted:
            message += f": {type(error).__name__}: {error}"
        return TrainingFailed(message, run_dir=self.run_dir, checkpoint=self.checkpoint, error_file=error_file,
                              interrupted=interrupted)

    def _save_after_failure(self) -> None:
        if self.algo.iteration == 0:
            return
        try:
            self._save()
        except Exception as save_error:  # noqa: BLE001 - the original failure matters more
            self.say(f"warning: the final checkpoint could not be saved: {type(save_error).__name__}: {save_error}")

    def _forget_empty_run_dir(self) -> None:
        # A bad stop key stops a fresh run before anything is written: leave no empty run directory behind.
        if not self.plan.resume and self.run_dir.is_dir():
            forget_run_records(self.run_dir)
            if not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()

    # ----------------------------------------------------------------------------------------- reporting

    def _stop_text(self) -> str:
        criteria = " or ".join(f"{key} >= {value:g}" for key, value in self.criteria.thresholds.items())
        start = f"from iteration {self.algo.iteration} " if self.algo.iteration else ""
        return f"training {start}until {criteria}"

    def _note_changed_settings(self) -> None:
        from gigpo_rllib.config import GIGPO_KEYS

        try:
            saved = config_from_checkpoint(self.plan.checkpoint).to_dict()
        except Exception:  # noqa: BLE001 - only a courtesy note; the restore itself reports real problems
            return
        current = self.config.to_dict()
        keys = [key.name for key in GIGPO_KEYS] + list(RESUME_COMPARED_KEYS)
        changed = [f"{key} {saved.get(key)!r} -> {current.get(key)!r}" for key in keys
                   if saved.get(key) != current.get(key)]
        if changed:
            self.say(f"note: resuming with settings that differ from the checkpoint's: {'; '.join(changed)}")

    def _print_summary(self, summary: dict[str, Any]) -> None:
        self.say(f"done: {summary['iterations']} iteration(s) in {summary['time_s']:.1f}s | final return "
                 f"{summary['final_return']:+.3f}, success {summary['final_success_rate']:.3f} | best return "
                 f"{summary['best_return']:+.3f}, success {summary['best_success_rate']:.3f} | checkpoint "
                 f"{summary['checkpoint']}")
        if self.rows:
            mean = summary["mean_iteration_times"]
            self.say(f"mean time per iteration: rollout {mean['rollout_s']:.2f}s | advantages "
                     f"{mean['advantages_s'] * 1e3:.1f}ms | update {mean['update_s']:.2f}s | weight sync "
                     f"{mean['sync_s'] * 1e3:.1f}ms")


def _summary(rows: list[dict[str, float]], seconds: float, checkpoint, csv_path) -> dict[str, Any]:
    last = rows[-1] if rows else {}
    return {
        "iterations": len(rows),
        "time_s": seconds,
        "final_return": last.get("episode_return_mean", math.nan),
        "final_success_rate": last.get("success_rate", math.nan),
        "best_return": max((row["episode_return_mean"] for row in rows), default=math.nan),
        "best_success_rate": max((row["success_rate"] for row in rows), default=math.nan),
        "mean_iteration_times": {key: statistics.fmean(row[key] for row in rows)
                                 for key in TIME_SPLIT} if rows else {},
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "progress_csv": str(csv_path),
    }


