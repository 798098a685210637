"""A CLI run killed with SIGKILL mid-iteration and mid-checkpoint resumes (`rllib train ... --resume`) to exactly
the metrics of an uninterrupted run of the same seed."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest

from gigpo_rllib.checkpoints import list_checkpoints, staging_leftovers
from gigpo_rllib.cli import main
from gigpo_rllib.progress import read_csv, read_tensorboard_scalars
from tests.conftest import ROOT
from tests.test_cli import TINY, write_yaml

ITERATIONS = 4
# Every column that does not measure time: these must match to the last bit.
COMPARED = ("iteration", "episode_return_mean", "success_rate", "invalid_action_rate", "episode_len_mean",
            "prompt_truncations", "policy_loss", "policy_kl", "clip_fraction", "entropy", "grad_norm",
            "anchor_singleton_fraction")
CLI_TIMEOUT_S = 300


def cli_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train_args(experiment, run_dir, *extra):
    return ["train", "file", str(experiment), "--checkpoint-dir", str(run_dir), "--stop-iters", str(ITERATIONS),
            "--checkpoint-freq", "1", *extra]


def run_cli(args):
    process = subprocess.run([sys.executable, "-m", "gigpo_rllib.cli", *args], cwd=ROOT, env=cli_env(),
                             capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
    return process.stdout


def run_cli_and_kill(freeze_at, marker, args):
    """Start the CLI frozen at ``freeze_at`` (see tests/cli_interrupts.py), SIGKILL it once it is there."""
    process = subprocess.Popen([sys.executable, "-m", "tests.cli_interrupts", freeze_at, str(marker), "--", *args],
                               cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + CLI_TIMEOUT_S
    try:
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(f"the CLI ended (status {process.returncode}) before reaching {freeze_at}:\n"
                            + process.stdout.read()[-3000:])
            assert time.monotonic() < deadline, f"the CLI did not reach {freeze_at}"
            time.sleep(0.05)
        process.kill()  # SIGKILL to the CLI process alone, as `kill -9` or the OOM killer would
        process.wait(timeout=30)
    finally:
        # Then the Ray processes it had started (its session), so none outlives the test.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.stdout.close()
    marker.unlink()


def comparable(rows):
    return [{column: row[column] for column in COMPARED} for row in rows]


def same_metrics(row, reference):
    return all(row[c] == reference[c] or (math.isnan(row[c]) and math.isnan(reference[c])) for c in COMPARED)


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_metrics(tmp_path):
    experiment = write_yaml(tmp_path, TINY)
    reference_dir, run_dir, marker = tmp_path / "reference", tmp_path / "interrupted", tmp_path / "frozen"
    run_cli(train_args(experiment, reference_dir))
    reference = read_csv(reference_dir / "progress.csv")
    assert [row["iteration"] for row in reference] == [1.0, 2.0, 3.0, 4.0]

    # 1. Killed while writing checkpoint 2: its staging directory is left, never a checkpoint_000002.
    run_cli_and_kill("checkpoint:2", marker, train_args(experiment, run_dir))
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint_000001"]
    (staging,) = staging_leftovers(run_dir)
    assert main(["evaluate", str(staging)]) == 2  # said clearly, before Ray starts

    # 2. Resumed from checkpoint 1 (row 2 is dropped and redone), then killed inside iteration 4.
    run_cli_and_kill("iteration:4", marker, train_args(experiment, run_dir, "--resume"))
    assert not staging.exists()
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint_000001", "checkpoint_000002",
                                                           "checkpoint_000003"]
    assert [row["iteration"] for row in read_csv(run_dir / "progress.csv")] == [1.0, 2.0, 3.0]

    # 3. Resumed from checkpoint 3 to the end.
    out = run_cli(train_args(experiment, run_dir, "--resume"))
    assert "resumed from" in out and "checkpoint_000003" in out

    rows = read_csv(run_dir / "progress.csv")
    assert [row["iteration"] for row in rows] == [1.0, 2.0, 3.0, 4.0]  # no duplicate rows
    for row, expected in zip(rows, reference):
        assert same_metrics(row, expected), (comparable([row]), comparable([expected]))
    # TensorBoard shows each iteration once (the resumed writers purge what the killed runs wrote after).
    returns = read_tensorboard_scalars(run_dir)["env_runners/episode_return_mean"]
    assert [step for step, _ in returns] == [1, 2, 3, 4]
    assert [value for _, value in returns] == pytest.approx([row["episode_return_mean"] for row in reference])


@pytest.mark.slow
def test_a_run_killed_in_an_overlapped_iteration_resumes_without_losing_or_repeating_a_batch(tmp_path):
    """With ``max_off_policy_steps: 1`` the batch sampled during an update lives in memory until the next
    iteration trains it. Killed after iteration 3's update (batch 4 sampled, not yet saved), the run resumes from
    checkpoint 2, which holds batch 3: the resumed run trains batches 3 and 4 once each, with the weights they
    were sampled by, and ends with the uninterrupted run's metrics."""
    experiment = write_yaml(tmp_path, {**TINY, "num_env_runners": 1, "max_off_policy_steps": 1})
    reference_dir, run_dir, marker = tmp_path / "reference", tmp_path / "interrupted", tmp_path / "frozen"
    run_cli(train_args(experiment, reference_dir))
    reference = read_csv(reference_dir / "progress.csv")

    run_cli_and_kill("iteration:3", marker, train_args(experiment, run_dir))
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint_000001", "checkpoint_000002"]
    out = run_cli(train_args(experiment, run_dir, "--resume"))
    assert "checkpoint_000002" in out

    rows = read_csv(run_dir / "progress.csv")
    assert [row["iteration"] for row in rows] == [1.0, 2.0, 3.0, 4.0]
    for row, expected in zip(rows, reference):
        assert same_metrics(row, expected), (comparable([row]), comparable([expected]))
