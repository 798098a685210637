"""Experiment trackers for ``rllib train`` and :func:`~gigpo_rllib.training.train`: Weights & Biases, MLflow, or
any other Ray Tune callback, through Tune's own logger callbacks.

Our training loop is not Tune's, so :class:`TrackerHooks` calls the hooks Tune would call (``setup``,
``on_trial_start``, ``on_trial_result``, ``on_trial_complete`` / ``on_trial_error``, ``on_experiment_end``),
with :class:`RunTrial` standing in for Tune's trial: the callbacks then log as they do under ``tune.Tuner``.
What they receive:

* the config: the run's ``params.json`` (every config key and ``stop``; W&B's run config, MLflow's params);
* each iteration's result, as ``algo.train()`` returned it, minus ``config``, plus every derived
  ``progress.csv`` column under its TensorBoard tag (``timers/update_without_advantages_s``): every metric is
  logged under its result path (``env_runners/episode_return_mean``), as in TensorBoard;
* the learning curve: on the last result of a run that stops normally, ``learning_curve`` holds the PNG
  ``rllib plot`` draws, as an image array (W&B logs it as an image); the PNG itself is the only file of the
  trial's folder ``RUN_DIR/artifacts``, which MLflow uploads as the run's artifacts (``save_artifact=True``).

Each start of a run (a resume too) is one tracker run, named after the run directory and grouped by it in W&B.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import pathlib
import uuid
from typing import Any, Mapping, Sequence

from gigpo_rllib.experiment import ExperimentError
from gigpo_rllib.progress import TENSORBOARD_TAGS, plot_runs, read_csv

ARTIFACTS_DIR = "artifacts"
LEARNING_CURVE = "learning_curve.png"
LEARNING_CURVE_KEY = "learning_curve"
WANDB_UPLOAD_TIMEOUT_S = 300
_EXTRAS = {"wandb": ("--wandb", "wandb"), "mlflow": ("--mlflow", "mlflow")}


def require_extra(module: str) -> None:
    """One-line :class:`ExperimentError` naming the extra to install when ``module`` (wandb, mlflow) is missing."""
    flag, extra = _EXTRAS[module]
    if importlib.util.find_spec(module) is None:
        raise ExperimentError(f"{flag} needs the {module} package, which is not installed: "
                              f"pip install 'gigpo-rllib[{extra}]'")


def wandb_callback(project: str, *, run_dir: str | pathlib.Path, quiet: bool = True,
                   upload_timeout: int = WANDB_UPLOAD_TIMEOUT_S, **init_kwargs):
    """Tune's ``WandbLoggerCallback`` for ``project``; W&B's own files (``wandb/``, offline runs included) go into
    the run directory. ``quiet``: W&B prints only what matters (no run summary table). ``upload_timeout``: how
    long the end of a run waits for W&B to finish (Tune's default, 30 minutes, is how long a run would hang if
    W&B's logging actor were lost). ``init_kwargs`` go to ``wandb.init`` (``mode="offline"``, ``entity=...``);
    ``WANDB_MODE`` and W&B's other environment variables apply as usual."""
    require_extra("wandb")
    import wandb
    from ray.air.integrations.wandb import WandbLoggerCallback

    defaults = {"dir": str(pathlib.Path(run_dir).resolve())}
    if quiet:
        defaults["settings"] = wandb.Settings(quiet=True)
    return WandbLoggerCallback(project=project, upload_timeout=upload_timeout, **{**defaults, **init_kwargs})


def mlflow_callback(tracking_uri: str, *, experiment_name: str):
    """Tune's ``MLflowLoggerCallback`` logging to ``tracking_uri`` (a server, or ``file:///path`` for a local
    store) under ``experiment_name`` (created when missing), uploading the learning curve as an artifact."""
    require_extra("mlflow")
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(tracking_uri=tracking_uri, experiment_name=experiment_name, save_artifact=True)


class RunTrial:
    """What Tune's logger callbacks read of a trial: its id, name (``str``), config, folder (``local_path``: W&B's
    working directory, the folder MLflow uploads) and experiment (W&B's default group)."""

    def __init__(self, run_dir: pathlib.Path, config: Mapping[str, Any]):
        self.trial_id = uuid.uuid4().hex[:8]  # W&B's run id: unique per start, as Tune's trial ids are
        self.trial_name = run_dir.name
        self.experiment_dir_name = run_dir.name
        self.config = dict(config)
        self.local_path = str(run_dir.resolve() / ARTIFACTS_DIR)
        self.checkpoint = None  # checkpoints are not uploaded: a real model's are gigabytes

    def __str__(self) -> str:
        return self.trial_name


class TrackerHooks:
    """Drives Tune callbacks through one call of :func:`~gigpo_rllib.training.train` (see module docstring)."""

    def __init__(self, callbacks: Sequence[Any], *, run_dir: pathlib.Path, params: Mapping[str, Any]):
        self.callbacks = list(callbacks)
        self.run_dir = run_dir
        self.trial = RunTrial(run_dir, params)
        self.started = False

    def setup(self, stop: Mapping[str, float]) -> None:
        """Tune's ``setup`` (before the algorithm is built, so a tracker that cannot start, such as an MLflow
        store that cannot be reached, fails the run at once)."""
        for callback in self.callbacks:
            try:
                callback.setup(stop=dict(stop), num_samples=1, total_num_samples=1)
            except Exception as error:  # noqa: BLE001 - a tracker that cannot start is a setup mistake
                raise ExperimentError(f"{type(callback).__name__} could not start: {type(error).__name__}: "
                                      f"{error}") from error

    def start(self) -> None:
        if not self.callbacks:
            return
        pathlib.Path(self.trial.local_path).mkdir(parents=True, exist_ok=True)
        self._each("on_trial_start", iteration=0, trials=[self.trial], trial=self.trial)
        self.started = True

    def result(self, result: Mapping[str, Any], row: Mapping[str, float], *, last: bool) -> None:
        """Hand one iteration's result to the callbacks; ``last``: the run stops after it (the learning curve
        goes with it)."""
        if not self.started:
            return
        tracked = with_progress_columns(result, row)
        if last:
            tracked[LEARNING_CURVE_KEY] = self._learning_curve()
        iteration = int(result.get("training_iteration", 0))
        self._each("on_trial_result", iteration=iteration, trials=[self.trial], trial=self.trial, result=tracked)

    def end(self, *, failed: bool) -> None:
        """End the trial and the experiment in every callback (W&B's waits for its upload); one callback's error
        does not keep the others from finishing: the errors are raised together afterwards."""
        if not self.started:
            return
        self.started = False
        hook = "on_trial_error" if failed else "on_trial_complete"
        errors = []
        for callback in self.callbacks:
            try:
                getattr(callback, hook)(iteration=0, trials=[self.trial], trial=self.trial)
                callback.on_experiment_end(trials=[self.trial])
            except Exception as error:  # noqa: BLE001 - collected, raised below
                errors.append(f"{type(callback).__name__}: {type(error).__name__}: {error}")
        if errors:
            raise RuntimeError("; ".join(errors))

    def _each(self, hook: str, **kwargs) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(**kwargs)

    def _learning_curve(self):
        """Draw the run's ``progress.csv`` (earlier sessions of a resumed run included) into the trial's folder;
        returns it as an RGBA ``uint8`` array, the form Tune's W&B callback logs as an image."""
        import matplotlib.image
        import numpy as np

        path = pathlib.Path(self.trial.local_path) / LEARNING_CURVE
        plot_runs({self.run_dir.name: read_csv(self.run_dir / "progress.csv")}, path,
                  title=f"{self.run_dir.name}: learning curve")
        return np.round(matplotlib.image.imread(path) * 255).astype(np.uint8)


def with_progress_columns(result: Mapping[str, Any], row: Mapping[str, float]) -> dict[str, Any]:
    """``result`` without Tune's ``config`` entry (the config is logged once, as the run's config), plus every
    ``progress.csv`` column the result lacks (the derived ones), under its TensorBoard tag."""
    tracked = {key: value for key, value in result.items() if key != "config"}
    for column, tag in TENSORBOARD_TAGS.items():
        value = row.get(column, math.nan)
        if math.isnan(value):
            continue
        *parents, leaf = tag.split("/")
        node = tracked
        for parent in parents:
            node[parent] = copy.copy(node.get(parent)) if isinstance(node.get(parent), Mapping) else {}
            node = node[parent]
        node.setdefault(leaf, value)
    return tracked
