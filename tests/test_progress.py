import math

import pytest

from gigpo_rllib.cli import main
from gigpo_rllib.progress import COLUMNS, CsvLog, format_progress, iteration_metrics, plot_runs, read_csv

RESULT = {"training_iteration": 2, "time_this_iter_s": 1.5,
          "env_runners": {"episode_return_mean": 0.25, "success_rate": 0.5, "invalid_action_rate": 0.1,
                          "groups_with_signal_fraction": 0.75, "dynamic_sampling_rounds": 1.0},
          "timers": {"env_runner_sampling_timer": 0.7, "learner_update_timer": 0.6, "synch_weights": 0.01},
          "learners": {"__all_modules__": {"advantages_time_s": 0.1}, "default_policy": {"entropy": 1.2}}}


def test_row_splits_the_update_and_marks_missing_metrics():
    row = iteration_metrics(RESULT)
    assert row["update_s"] == pytest.approx(0.5) and row["advantages_s"] == 0.1
    assert math.isnan(row["policy_kl"]) and set(row) == set(COLUMNS)
    # How much of a batch can teach anything: what a run on a peaked pretrained policy is watched by.
    assert (row["groups_with_signal_fraction"], row["dynamic_sampling_rounds"]) == (0.75, 1.0)
    assert "advantages 100.0ms, update 0.50s" in format_progress(row)


def test_csv_round_trip_appends(tmp_path):
    log = CsvLog(tmp_path / "run" / "progress.csv")
    log.append(iteration_metrics(RESULT))
    CsvLog(log.path).append(iteration_metrics({**RESULT, "training_iteration": 3}))  # a resumed run appends
    rows = read_csv(log.path)
    assert [row["iteration"] for row in rows] == [2.0, 3.0]
    assert rows[0]["success_rate"] == 0.5


def test_plot_command_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    for name in ("gigpo", "grpo"):
        log = CsvLog(tmp_path / name / "progress.csv")
        for iteration in (1, 2, 3):
            log.append(iteration_metrics({**RESULT, "training_iteration": iteration}))
    out = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "gigpo"), str(tmp_path / "grpo"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 2
    assert "no progress.csv" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match="plotting needs matplotlib"):
        plot_runs({"run": [iteration_metrics(RESULT)]}, tmp_path / "x.png")
