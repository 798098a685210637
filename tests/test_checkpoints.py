"""Checkpoints written atomically, damaged ones recognised, run directories refused or resumed, and training
failures that still leave a checkpoint when the state is sound."""

import io
import json
import os
import pickle
import re

import pytest

from gigpo_rllib.checkpoints import (MANIFEST_NAME, RunDirError, checkpoint_problem, clear_leftovers,
                                     list_checkpoints, plan_run, save_checkpoint, staging_leftovers)
from gigpo_rllib.cli import main
from tests.test_cli import TINY, write_yaml


class FakeAlgo:
    """Writes a checkpoint-shaped directory, optionally failing half-way as a killed save would."""

    def __init__(self, iteration, fail_after_first_file=False):
        self.iteration, self.fail_after_first_file = iteration, fail_after_first_file

    def save_to_path(self, path):
        import pathlib

        path = pathlib.Path(path)
        (path / "learner_group").mkdir(parents=True)
        (path / "class_and_ctor_args.pkl").write_bytes(pickle.dumps({"iteration": self.iteration}))
        if self.fail_after_first_file:
            raise OSError("disk full")
        (path / "algorithm_state.pkl").write_bytes(pickle.dumps({"training_iteration": self.iteration}))
        (path / "learner_group" / "state.pkl").write_bytes(b"x" * 100)
        return str(path)


def test_save_is_atomic_and_complete(tmp_path):
    path = save_checkpoint(FakeAlgo(3), tmp_path)
    assert path == (tmp_path / "checkpoint_000003").resolve()
    assert checkpoint_problem(path) is None
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["iteration"] == 3 and manifest["files"]["learner_group/state.pkl"] == 100
    assert staging_leftovers(tmp_path) == []
    # Saving the same iteration again replaces it.
    assert save_checkpoint(FakeAlgo(3), tmp_path) == path and checkpoint_problem(path) is None


def test_an_interrupted_save_never_looks_like_a_checkpoint(tmp_path):
    save_checkpoint(FakeAlgo(1), tmp_path)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(FakeAlgo(2, fail_after_first_file=True), tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_000001"]
    (leftover,) = staging_leftovers(tmp_path)
    assert "staging directory" in checkpoint_problem(leftover)
    plan = plan_run(tmp_path, resume=True)
    assert plan.checkpoint.name == "checkpoint_000001" and plan.iteration == 1 and plan.leftovers == [leftover]
    clear_leftovers(plan)
    assert not leftover.exists()


@pytest.mark.parametrize("damage, problem", [
    (lambda p: (p / "learner_group" / "state.pkl").write_bytes(b"x" * 10),
     r"learner_group/state.pkl has 10 bytes instead of 100"),
    (lambda p: (p / "algorithm_state.pkl").unlink(), r"algorithm_state.pkl is missing"),
    (lambda p: (p / MANIFEST_NAME).write_text("{"), r"gigpo_checkpoint.json is unreadable"),
])
def test_damaged_checkpoints_are_described(tmp_path, damage, problem):
    path = save_checkpoint(FakeAlgo(2), tmp_path)
    damage(path)
    assert re.search(problem, checkpoint_problem(path))


def test_checkpoints_without_manifest_are_checked_by_structure(tmp_path):
    path = save_checkpoint(FakeAlgo(2), tmp_path)
    (path / MANIFEST_NAME).unlink()  # as algo.save_to_path alone writes it
    assert checkpoint_problem(path) is None
    (path / "algorithm_state.pkl").write_bytes(b"")
    assert "algorithm_state.pkl is empty" in checkpoint_problem(path)
    assert "lacks class_and_ctor_args.pkl" in checkpoint_problem(tmp_path)
    assert checkpoint_problem(tmp_path / "nothing") == "it does not exist"


def test_resume_passes_over_damaged_checkpoints(tmp_path):
    for iteration in (1, 2):
        save_checkpoint(FakeAlgo(iteration), tmp_path)
    (tmp_path / "checkpoint_000002" / "algorithm_state.pkl").unlink()
    plan = plan_run(tmp_path, resume=True)
    assert plan.checkpoint.name == "checkpoint_000001"
    assert [(p.name, problem) for p, problem in plan.skipped] == [("checkpoint_000002",
                                                                  "algorithm_state.pkl is missing")]
    assert plan_run(tmp_path / "new", resume=True).checkpoint is None  # --resume on nothing starts afresh


def test_a_directory_holding_a_run_needs_resume(tmp_path, capsys):
    (tmp_path / "progress.csv").write_text("iteration\n1\n")
    with pytest.raises(RunDirError, match=r"already holds a training run \(progress.csv\); pass --resume"):
        plan_run(tmp_path, resume=False)
    plan_run(tmp_path / "fresh", resume=False)
    experiment = write_yaml(tmp_path, TINY)
    assert main(["train", "file", str(experiment), "--checkpoint-dir", str(tmp_path)]) == 2  # before Ray starts
    err = capsys.readouterr().err
    assert err.startswith("rllib: error: ") and "--resume" in err and err.count("\n") == 1


def test_evaluate_says_what_is_wrong_with_a_checkpoint(tmp_path, capsys):
    path = save_checkpoint(FakeAlgo(2), tmp_path)
    (path / "learner_group" / "state.pkl").write_bytes(b"x")
    assert main(["evaluate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "has 1 bytes instead of 100" in err and "Traceback" not in err
    # A run directory whose only checkpoint is damaged.
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err
    # A truncated constructor file in a checkpoint without manifest: an error, never an EOFError traceback.
    (path / MANIFEST_NAME).unlink()
    (path / "class_and_ctor_args.pkl").write_bytes(pickle.dumps({"a": 1})[:5])
    assert main(["evaluate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "class_and_ctor_args.pkl cannot be read" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_validation_failure_after_the_update_saves_no_checkpoint_ahead_of_its_iteration(ray_session, tmp_path,
                                                                                         capsys, monkeypatch):
    # Iteration 2's update and weight sync are done when its validation rollout fails: a checkpoint now would hold
    # iteration 2's weights and seed counters labelled iteration 1, and --resume would apply that update again.
    from gigpo_rllib.env_runner import GiGPOEnvRunner

    sample = GiGPOEnvRunner.sample
    validations = []

    def sample_failing_the_second_validation(self, *, groups=None, group_size=None, **kwargs):
        if group_size == 1:
            validations.append(len(groups))
            if len(validations) == 2:
                return {"error": "Traceback: the validation env broke", "worker_index": self.worker_index}
        return sample(self, groups=groups, group_size=group_size, **kwargs)

    monkeypatch.setattr(GiGPOEnvRunner, "sample", sample_failing_the_second_validation)
    settings = {**TINY, "val_interval": 1, "stop": {"training_iteration": 3}}
    run_dir = tmp_path / "run"
    assert main(["train", "file", str(write_yaml(tmp_path, settings)), "--checkpoint-dir", str(run_dir)]) == 1
    assert "training failed in iteration 2" in capsys.readouterr().err
    groups_per_iteration = TINY["train_env_manager"]["num_env_groups"]
    for checkpoint in list_checkpoints(run_dir):
        state = pickle.loads((checkpoint / "algorithm_state.pkl").read_bytes())
        iteration = int(checkpoint.name.split("_")[1])
        assert state["seed_counters"]["train"] == iteration * groups_per_iteration, checkpoint.name


@pytest.mark.slow
def test_a_failed_run_exits_1_and_keeps_a_final_checkpoint(ray_session, tmp_path, capsys):
    from tests.failing_env import ENV_ID, FailingLake

    settings = {**TINY, "env": ENV_ID, "stop": {"training_iteration": 3}}
    FailingLake.resets_left = 4  # iteration 1 resets 2 groups x 2 envs; iteration 2 fails while sampling
    try:
        assert main(["train", "file", str(write_yaml(tmp_path, settings)), "--checkpoint-dir",
                     str(tmp_path / "run")]) == 1
    finally:
        FailingLake.resets_left = None
    err = capsys.readouterr().err
    assert "rllib: error: training failed in iteration 2: RuntimeError: 4 of 4 trajectories were lost" in err
    assert "the lake froze over" in err
    run_dir = tmp_path / "run"
    assert f"rllib: run directory: {run_dir}" in err and f"rllib: full traceback: {run_dir / 'error.txt'}" in err
    checkpoint = (run_dir / "checkpoint_000001").resolve()
    assert f"rllib: last checkpoint: {checkpoint}" in err and checkpoint_problem(checkpoint) is None
    assert "the lake froze over" in (run_dir / "error.txt").read_text()


def test_a_replacement_killed_between_its_renames_keeps_the_checkpoint(tmp_path, monkeypatch):
    first = save_checkpoint(FakeAlgo(2), tmp_path)
    rename = os.rename

    def killed_before_the_second_rename(source, target):
        if ".partial-" in str(source):
            raise KeyboardInterrupt  # the old checkpoint is already aside, the new one not yet in place
        rename(source, target)

    monkeypatch.setattr(os, "rename", killed_before_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeAlgo(2), tmp_path)
    monkeypatch.setattr(os, "rename", rename)
    assert list_checkpoints(tmp_path) == [] and len(staging_leftovers(tmp_path)) == 2

    plan = plan_run(tmp_path, resume=True)
    clear_leftovers(plan)
    assert plan.checkpoint == first and plan.iteration == 2
    assert checkpoint_problem(first) is None and staging_leftovers(tmp_path) == []


def test_a_resume_that_cannot_restore_keeps_every_progress_row(tmp_path, monkeypatch):
    from gigpo_rllib import training
    from gigpo_rllib.config import GiGPOConfig
    from gigpo_rllib.experiment import ExperimentError
    from gigpo_rllib.progress import CsvLog, read_csv

    save_checkpoint(FakeAlgo(1), tmp_path)
    progress = CsvLog(tmp_path / "progress.csv")
    for iteration in (1, 2, 3):
        progress.append({"iteration": iteration})

    class UnloadableAlgo:
        iteration = 0

        def restore_from_path(self, path):
            raise OSError("the checkpoint's learner state cannot be read")

        def stop(self):
            pass

    monkeypatch.setattr(training._Session, "_build", lambda session: UnloadableAlgo())
    with pytest.raises(ExperimentError, match="cannot resume from"):
        training.train(GiGPOConfig(), 5, checkpoint_dir=tmp_path, resume=True, out=io.StringIO())
    assert [row["iteration"] for row in read_csv(tmp_path / "progress.csv")] == [1.0, 2.0, 3.0]
