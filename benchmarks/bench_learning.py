"""Learning benchmark: GiGPO vs GRPO on a multi-turn task where step-level credit matters.

The env is the corridor of ``tests/learning_env.py`` (``P _ _ _ _ G``; Right moves on; 8 turns by default). Each estimator
trains the tiny offline model from the same initial weights for several seeds; the table gives the success
rate per iteration (mean over seeds) side by side, and the first iteration at which each reaches the target
success rate. A PNG of the curves is written when matplotlib is installed.

    python3 benchmarks/bench_learning.py [--iterations 15] [--seeds 3] [--target 0.8] [--length 6]
                                         [--max-steps 8] [--plot learning.png]

About 4 minutes on a 2-core CPU with the defaults.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ESTIMATORS = ("gigpo", "grpo")


def train_run(estimator: str, seed: int, iterations: int, length: int, max_steps: int) -> list[dict[str, float]]:
    from gigpo_rllib import GiGPOConfig
    from gigpo_rllib.progress import iteration_metrics

    config = (GiGPOConfig().environment("tests.learning_env:Corridor-v0",
                                        env_config={"length": length, "max_steps": max_steps})
              .training(train_env_manager={"num_env_groups": 4, "group_size": 8}, rollout_batch_size=32,
                        minibatch_size=64, lr=1e-3, max_new_tokens=8, action_constraint=True, history_length=0,
                        reward_normalization={"method": "mean_std"}, adv_estimator=estimator)
              .debugging(seed=seed))
    algo = config.build_algo()
    try:
        return [iteration_metrics(algo.train()) for _ in range(iterations)]
    finally:
        algo.stop()


def first_reaching(curve: list[float], target: float) -> str:
    return next((str(i + 1) for i, value in enumerate(curve) if value >= target), "never")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.8, help="success rate to reach")
    parser.add_argument("--length", type=int, default=6, help="corridor cells (the goal is length - 1 moves away)")
    parser.add_argument("--max-steps", type=int, default=8, help="turns per episode")
    parser.add_argument("--plot", default=None, help="PNG path for the curves (needs matplotlib)")
    args = parser.parse_args()

    import ray

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        runs = {(estimator, seed): train_run(estimator, seed, args.iterations, args.length, args.max_steps)
                for estimator in ESTIMATORS for seed in range(args.seeds)}
    finally:
        ray.shutdown()

    curves = {estimator: [statistics.fmean(runs[estimator, seed][i]["success_rate"] for seed in range(args.seeds))
                          for i in range(args.iterations)] for estimator in ESTIMATORS}
    print(f"\nsuccess rate on Corridor-v0 (length {args.length}, {args.max_steps} turns), mean of {args.seeds} seeds "
          "(32 trajectories per iteration)")
    print(" iter |  gigpo |  grpo")
    print("------+--------+-------")
    for i in range(args.iterations):
        print(f" {i + 1:4d} | {curves['gigpo'][i]:6.3f} | {curves['grpo'][i]:5.3f}")
    for estimator in ESTIMATORS:
        per_seed = [first_reaching([row["success_rate"] for row in runs[estimator, seed]], args.target)
                    for seed in range(args.seeds)]
        print(f"{estimator}: mean curve reaches {args.target} at iteration "
              f"{first_reaching(curves[estimator], args.target)}; per seed {per_seed}; "
              f"mean success over the last 5 iterations {statistics.fmean(curves[estimator][-5:]):.3f}")
    if args.plot:
        from gigpo_rllib.progress import plot_runs

        mean_rows = {estimator: [{**runs[estimator, 0][i], "success_rate": curves[estimator][i],
                                  "episode_return_mean": curves[estimator][i]} for i in range(args.iterations)]
                     for estimator in ESTIMATORS}
        print(f"plot written: {plot_runs(mean_rows, args.plot, title='GiGPO vs GRPO on Corridor-v0')}")


if __name__ == "__main__":
    main()
