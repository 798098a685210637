"""A short seeded run whose metrics were recorded before sampling and learning could overlap, so a test can check
that ``max_off_policy_steps: 0`` still runs the sequential iteration, metric for metric.

    PYTHONPATH=<a checkout of the code to record> python3 tests/recorded_runs.py tests/data/sequential_run_metrics.json

The recording came from the commit before ``max_off_policy_steps`` existed, run the way the test suite runs it (one
remote env runner, Ray with four logical CPUs, the machine's default thread counts).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any

RECORDED_METRICS = pathlib.Path(__file__).parent / "data" / "sequential_run_metrics.json"
ITERATIONS = 3
# What the samples and the update did; wall-clock figures differ from run to run and are left out.
RECORDED_SECTIONS = ("env_runners", "learners")


def recorded_run_config():
    from gigpo_rllib import GiGPOConfig

    return (GiGPOConfig().environment("TextFrozenLake-v0", env_config={"max_steps": 3})
            .training(train_env_manager={"num_env_groups": 2, "group_size": 2}, rollout_batch_size=4,
                      minibatch_size=4, max_new_tokens=8, action_constraint=True, lr=1e-3, history_length=1)
            .env_runners(num_env_runners=1).debugging(seed=5))


def flat_metrics(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of ``result``'s :data:`RECORDED_SECTIONS` under ``a/b/c`` paths, without the wall-clock ones."""
    metrics = {}
    for key, value in result.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if not prefix and key not in RECORDED_SECTIONS:
            continue
        if isinstance(value, dict):
            metrics.update(flat_metrics(value, path))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not (
                "time" in path or "throughput" in path or path.endswith("_s")):
            metrics[path] = float(value)
    return metrics


def run_metrics(config, iterations: int = ITERATIONS) -> list[dict[str, float]]:
    algo = config.build_algo()
    try:
        return [flat_metrics(algo.train()) for _ in range(iterations)]
    finally:
        algo.stop()


if __name__ == "__main__":
    import ray

    root = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or os.getcwd()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": root}})
    try:
        rows = run_metrics(recorded_run_config())
    finally:
        ray.shutdown()
    pathlib.Path(sys.argv[1]).write_text(json.dumps(rows, indent=1, sort_keys=True))
