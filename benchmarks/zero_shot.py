"""Zero-shot greedy success of a pretrained model on the bundled envs, with and without the action constraint.

Each row builds GiGPO around the untrained model (no update is made) and runs ``--episodes`` greedy validation
episodes (one per held-out env seed; FrozenLake also on the pool of eight maps the learning runs train on):

    python3 benchmarks/zero_shot.py [--model smollm2-135m-instruct] [--episodes 32] [--sampler vllm]
                                    [--tasks FrozenLake Sokoban TicTacToe TowerOfHanoi]

An env without a fixed action set (TicTacToe: moves are free text) is played unconstrained in both columns. Torch
runs on ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FROZEN_LAKE_POOL = [1, 2, 3, 4, 5, 6, 7, 8]
# env tag -> (env_config, max_new_tokens for free-form replies)
TASKS = {
    "FrozenLake": ({"max_steps": 8, "instructions_style": "compact"}, 24),
    "Sokoban": ({"dim_room": [6, 6], "num_boxes": 1, "max_steps": 10, "instructions_style": "compact"}, 24),
    "TicTacToe": ({"opponent": "random", "max_steps": 5}, 24),
    "TowerOfHanoi": ({"max_steps": 10}, 24),
}


def zero_shot(model: str, sampler: str, tag: str, constrained: bool, episodes: int) -> dict[str, float]:
    """``{"held out": success, "pool": success}`` (pool for FrozenLake only) of greedy episodes."""
    from gigpo_rllib import GiGPOConfig

    env_config, max_new_tokens = TASKS[tag]
    pool = FROZEN_LAKE_POOL if tag == "FrozenLake" else None
    config = (GiGPOConfig().environment(tag, env_config=env_config)
              .training(model_name_or_path=model, sampler_backend=sampler, action_constraint=constrained,
                        max_new_tokens=max_new_tokens, sequence_length=1024, history_length=0,
                        val_batch_size=episodes, eval_greedy=True,
                        train_env_manager={"num_env_groups": 8, "group_size": 4, "seed_pool": pool,
                                           "max_env_num_per_worker": 32}, rollout_batch_size=32)
              .env_runners(num_env_runners=0).debugging(seed=0))
    algo = config.build_algo()
    try:
        results = algo.validate()
    finally:
        algo.stop()
    if pool is None:
        return {"held out": results["success_rate"]}
    return {"held out": results["held_out"]["success_rate"], "pool": results["pool"]["success_rate"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--episodes", type=int, default=32, help="greedy episodes per row (and per FrozenLake set)")
    parser.add_argument("--sampler", default="vllm", choices=["hf", "vllm"])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import ray
    import torch

    torch.set_num_threads(args.threads)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}})
    rows = []
    try:
        for tag in args.tasks:
            for constrained in (True, False):
                for subset, success in zero_shot(args.model, args.sampler, tag, constrained, args.episodes).items():
                    rows.append((tag, subset, "on" if constrained else "off", success))
                    print(f"{tag} {subset} constraint {rows[-1][2]}: {success:.3f}", flush=True)
    finally:
        ray.shutdown()
    print(f"\nzero-shot greedy success, {args.model}, {args.episodes} episodes per row ({args.sampler} sampler)")
    print(f"{'env':<13} | {'seeds':<8} | {'constraint':>10} | {'success':>7}")
    print("-" * 48)
    for tag, subset, constraint, success in rows:
        print(f"{tag:<13} | {subset:<8} | {constraint:>10} | {success:>7.3f}")


if __name__ == "__main__":
    main()
