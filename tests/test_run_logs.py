"""The per-run logs (gigpo_rllib.progress): metric lookup, progress.csv on resume, TensorBoard event files."""

import csv
import math

import pytest

from gigpo_rllib.progress import (TENSORBOARD_TAGS, CsvLog, RunLogs, iteration_metrics, read_csv,
                                  read_tensorboard_scalars)


def result(iteration, episode_return=0.5, old_logprobs_s=None):
    learner_wide = {"advantages_time_s": 0.01, "anchor_singleton_fraction": 0.3}
    if old_logprobs_s is not None:
        learner_wide["old_logprobs_time_s"] = old_logprobs_s
    learners = {"default_policy": {"policy_loss": -0.1 * iteration, "entropy": 1.0}, "__all_modules__": learner_wide}
    return {"training_iteration": iteration, "time_this_iter_s": 1.0,
            "env_runners": {"episode_return_mean": episode_return, "success_rate": 0.25},
            "timers": {"env_runner_sampling_timer": 0.4, "learner_update_timer": 0.5, "synch_weights": 0.01},
            "learners": learners}


def test_learner_wide_metrics_and_the_time_split():
    # RLlib's convention puts learner-wide values under learners/__all_modules__/.
    row = iteration_metrics(result(1))
    assert (row["advantages_s"], row["anchor_singleton_fraction"]) == (0.01, 0.3)
    assert math.isclose(row["update_s"], 0.5 - 0.01)
    # With learner-side old log-probs their pass is split out of the update too.
    assert math.isclose(iteration_metrics(result(1, old_logprobs_s=0.1))["update_s"], 0.5 - 0.01 - 0.1)


def test_tensorboard_events_hold_the_csv_metrics(tmp_path):
    logs = RunLogs(tmp_path)
    for iteration in (1, 2):
        logs.append(iteration_metrics(result(iteration, episode_return=0.25 * iteration)))
    logs.close()
    scalars = read_tensorboard_scalars(tmp_path)
    assert scalars["env_runners/episode_return_mean"] == [(1, 0.25), (2, 0.5)]
    assert [value for _, value in scalars["learners/default_policy/policy_loss"]] == pytest.approx([-0.1, -0.2])
    csv_columns = set(read_csv(tmp_path / "progress.csv")[0]) - {"iteration"}
    assert csv_columns == set(TENSORBOARD_TAGS)  # the same metrics in both logs
    # Missing metrics (NaN in the CSV) are simply not written as scalars.
    assert "validation/success_rate" not in scalars


def test_a_resumed_run_drops_later_rows_and_purges_them_in_tensorboard(tmp_path):
    logs = RunLogs(tmp_path)
    for iteration in (1, 2, 3):
        logs.append(iteration_metrics(result(iteration, episode_return=0.1)))
    logs.close()
    resumed = RunLogs(tmp_path, resume_after=1)  # the checkpoint was iteration 1
    assert resumed.dropped_rows == 2
    assert [row["iteration"] for row in read_csv(tmp_path / "progress.csv")] == [1.0]
    resumed.append(iteration_metrics(result(2, episode_return=0.9)))
    resumed.close()
    assert [row["iteration"] for row in read_csv(tmp_path / "progress.csv")] == [1.0, 2.0]
    returns = read_tensorboard_scalars(tmp_path)["env_runners/episode_return_mean"]
    assert [step for step, _ in returns] == [1, 2] and returns[1][1] == 0.8999999761581421  # float32 in events


def test_no_files_before_the_first_row(tmp_path):
    run_dir = tmp_path / "run"
    RunLogs(run_dir).close()
    assert not run_dir.exists()


def test_csv_written_by_another_version_keeps_its_columns(tmp_path):
    path = tmp_path / "progress.csv"
    path.write_text("iteration,episode_return_mean\n1,0.5\n")
    CsvLog(path).append(iteration_metrics(result(2)))
    with path.open() as file:
        rows = list(csv.reader(file))
    assert rows == [["iteration", "episode_return_mean"], ["1", "0.5"], ["2.0", "0.5"]]


def test_a_record_cut_short_by_a_kill_is_ignored(tmp_path):
    logs = RunLogs(tmp_path)
    logs.append(iteration_metrics(result(1)))
    logs.close()
    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    event_file.write_bytes(event_file.read_bytes()[:-7])  # into the last record: the last tag written
    scalars = read_tensorboard_scalars(tmp_path)
    assert scalars["env_runners/episode_return_mean"] == [(1, 0.5)]
    assert "timers/update_without_advantages_s" not in scalars
