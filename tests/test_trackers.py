"""Experiment trackers (gigpo_rllib.trackers): Tune's logger callbacks driven by our loop, --wandb / --mlflow, and
(slow) offline W&B and file-store MLflow runs that hold exactly the metrics of progress.csv."""

import importlib.util
import json
import math
import pathlib
import struct

import numpy as np
import pytest
from ray.tune.logger import LoggerCallback

from gigpo_rllib import trackers
from gigpo_rllib.cli import _train_job, build_parser, config_from_dict, main
from gigpo_rllib.progress import TENSORBOARD_TAGS, RunLogs, iteration_metrics, read_csv
from gigpo_rllib.trackers import ARTIFACTS_DIR, LEARNING_CURVE, TrackerHooks, with_progress_columns
from tests.test_cli import TINY, write_yaml
from tests.test_run_logs import result as fake_result


def test_every_progress_column_is_tracked_under_its_tensorboard_tag():
    result = {**fake_result(1), "config": {"lr": 0.1}}
    tracked = with_progress_columns(result, iteration_metrics(result))
    assert "config" not in tracked  # the config is the run's config, not a metric
    assert tracked["timers"]["update_without_advantages_s"] == pytest.approx(0.5 - 0.01)  # derived column
    assert "update_without_advantages_s" not in result["timers"]  # the algorithm's result is left alone
    assert tracked["env_runners"] == result["env_runners"]


class RecordingLogger(LoggerCallback):
    """A user's Tune LoggerCallback: keeps what it is handed."""

    def __init__(self):
        self.events = []

    def setup(self, *args, **kwargs):
        self.events.append(("setup", kwargs["stop"]))

    def log_trial_start(self, trial):
        self.events.append(("start", trial.config))

    def log_trial_result(self, iteration, trial, result):
        self.events.append(("result", iteration, result))

    def log_trial_end(self, trial, failed=False):
        self.events.append(("end", failed))


def test_hooks_hand_tune_callbacks_the_config_results_and_the_learning_curve(tmp_path):
    logs = RunLogs(tmp_path)
    recorder = RecordingLogger()
    hooks = TrackerHooks([recorder], run_dir=tmp_path, params={"lr": 0.1, "stop": {"training_iteration": 2}})
    hooks.setup({"training_iteration": 2})
    hooks.start()
    for iteration in (1, 2):
        result = fake_result(iteration)
        logs.append(iteration_metrics(result))
        hooks.result(result, iteration_metrics(result), last=iteration == 2)
    hooks.end(failed=False)
    kinds = [event[0] for event in recorder.events]
    assert kinds == ["setup", "start", "result", "result", "end"]
    assert recorder.events[1][1] == {"lr": 0.1, "stop": {"training_iteration": 2}}
    (_, _, first), (_, _, last) = recorder.events[2:4]
    assert "learning_curve" not in first
    image = last["learning_curve"]  # the PNG as an RGBA array: Tune's W&B callback logs it as an image
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 4
    assert (tmp_path / ARTIFACTS_DIR / LEARNING_CURVE).is_file()  # the folder MLflow's callback uploads
    assert recorder.events[-1] == ("end", False)


@pytest.mark.parametrize("flag, extra", [("--wandb", "wandb"), ("--mlflow", "mlflow")])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch, flag, extra):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == extra else real_find_spec(name, *args))
    path = write_yaml(tmp_path, TINY)
    assert main(["train", "file", str(path), "--checkpoint-dir", str(tmp_path / "run"), flag, "x"]) == 2
    err = capsys.readouterr().err
    assert err == (f"rllib: error: {flag} needs the {extra} package, which is not installed: "
                   f"pip install 'gigpo-rllib[{extra}]'\n")
    assert not (tmp_path / "run").exists()


def test_tracker_flags_build_tunes_callbacks(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback

    path = write_yaml(tmp_path, TINY, name="tiny.yaml")
    args = build_parser().parse_args(["train", "file", str(path), "--checkpoint-dir", str(tmp_path / "run"),
                                      "--wandb", "my-project", "--mlflow", "file:///tmp/store"])
    wandb_logger, mlflow_logger = _train_job(args).callbacks
    assert isinstance(wandb_logger, WandbLoggerCallback) and wandb_logger.project == "my-project"
    assert wandb_logger.kwargs["dir"] == str((tmp_path / "run").resolve())
    assert isinstance(mlflow_logger, MLflowLoggerCallback)
    assert (mlflow_logger.tracking_uri, mlflow_logger.experiment_name) == ("file:///tmp/store", "tiny")
    assert mlflow_logger.should_save_artifact


# ----------------------------------------------------------------------------- reading the trackers' files back

_WANDB_BLOCK = 32768
_WANDB_FILE_HEADER = 7  # ":W&B", magic, version


def wandb_records(run_file: pathlib.Path) -> list:
    """The ``Record`` protos of an offline run's ``.wandb`` file: a LevelDB-style log (records split into chunks
    with a 7-byte header: CRC, length, type; 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, offset, pending, records = run_file.read_bytes(), _WANDB_FILE_HEADER, b"", []
    while offset + 7 <= len(data):
        if _WANDB_BLOCK - offset % _WANDB_BLOCK < 7:  # a block's tail too short for a header is padding
            offset += _WANDB_BLOCK - offset % _WANDB_BLOCK
            continue
        length, kind = struct.unpack_from("<HB", data, offset + 4)
        pending += data[offset + 7: offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _same(csv_value: float, logged) -> bool:
    if math.isnan(csv_value):
        return logged is None or (isinstance(logged, float) and math.isnan(logged))
    return logged == csv_value


@pytest.mark.slow
def test_offline_wandb_and_file_mlflow_hold_the_metrics_of_progress_csv(ray_session, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from gigpo_rllib.training import train

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store for those who ask
    # Offline for Tune's API-key check here, and (mode=) for W&B's logging actor, whose process started with the
    # shared Ray session's environment.
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir, store = tmp_path / "run", f"file://{tmp_path / 'mlruns'}"
    config, _ = config_from_dict({key: value for key, value in TINY.items() if key != "stop"})
    callbacks = [trackers.wandb_callback("gigpo-tests", run_dir=run_dir, mode="offline"),
                 trackers.mlflow_callback(store, experiment_name="tiny")]
    train(config, 2, checkpoint_dir=run_dir, checkpoint_at_end=False, callbacks=callbacks)
    rows = read_csv(run_dir / "progress.csv")
    assert [row["iteration"] for row in rows] == [1.0, 2.0]

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    history = {entry["_step"]: entry for entry in
               (_items(record.history.item) for record in records if record.WhichOneof("record_type") == "history")}
    for row in rows:
        logged = history[int(row["iteration"])]
        assert {column: logged.get(tag) for column, tag in TENSORBOARD_TAGS.items()
                if not _same(row[column], logged.get(tag))} == {}
    assert history[2]["learning_curve/_type"] == "image-file" and "learning_curve/_type" not in history[1]
    wandb_config = {}
    for record in records:  # the config given to wandb.init is in the run record; later updates in config records
        if record.WhichOneof("record_type") == "run":
            wandb_config.update(_items(record.run.config.update))
        elif record.WhichOneof("record_type") == "config":
            wandb_config.update(_items(record.config.update))
    assert wandb_config["lr"] == 0.001 and wandb_config["train_env_manager"]["group_size"] == 2
    assert wandb_config["stop"] == {"training_iteration": 2}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    for column, tag in TENSORBOARD_TAGS.items():
        logged = {metric.step: metric.value for metric in client.get_metric_history(run.info.run_id, tag)}
        assert all(_same(row[column], logged.get(int(row["iteration"]))) for row in rows), column
    assert run.data.params["lr"] == "0.001" and run.data.params["train_env_manager/group_size"] == "2"
    assert [artifact.path for artifact in client.list_artifacts(run.info.run_id)] == [LEARNING_CURVE]
