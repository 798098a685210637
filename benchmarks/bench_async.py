"""Overlapped sampling and learning: one iteration's time and env steps per second, sequential
(``max_off_policy_steps: 0``: rollout, then update) vs one-step off-policy (``1``: the next batch is sampled
during the update), side by side in one run.

The demo's setting (``configs/frozenlake_gigpo.yaml``, the tiny offline model), one remote env runner and the
learner (in the driver), each on one torch thread. Each setting builds its algorithm, trains ``--warmup``
iterations untimed, then ``--iterations`` timed ones; every figure is the median over the timed iterations.
``rollout s`` and ``update s`` are the iteration's own timers (with overlap the rollout is the one trained on,
sampled during the previous update); the target is an overlapped iteration of about max(rollout, update), where
the sequential one takes their sum. Validation is off. No learning is compared here: the two runs are short.

    python3 benchmarks/bench_async.py [--iterations 5] [--warmup 1] [--config configs/frozenlake_gigpo.yaml]
                                      [--num-env-groups N --group-size M]   (a smaller batch)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {"sequential": 0, "one-step off": 1}


def measure(config_path: str, off_policy_steps: int, iterations: int, warmup: int, groups: int | None,
            group_size: int | None) -> dict[str, float]:
    from gigpo_rllib.cli import load_experiment

    config, _ = load_experiment(config_path)
    if groups or group_size:
        manager = dict(config.train_env_manager)
        manager.update({key: value for key, value in (("num_env_groups", groups), ("group_size", group_size))
                        if value})
        manager["num_groups_partition"] = [manager["num_env_groups"]]
        manager["max_env_num_per_worker"] = max(manager["max_env_num_per_worker"], manager["group_size"])
        config.training(train_env_manager=manager,
                        rollout_batch_size=manager["num_env_groups"] * manager["group_size"],
                        minibatch_size=min(config.minibatch_size, manager["num_env_groups"] * manager["group_size"]))
    config.training(max_off_policy_steps=off_policy_steps, val_interval=0)
    config.env_runners(num_env_runners=1, num_cpus_per_env_runner=1).resources(num_cpus_for_main_process=1)
    config.learners(num_learners=0)
    algo = config.build_algo()
    rows = []
    try:
        for iteration in range(warmup + iterations):
            started = time.perf_counter()
            result = algo.train()
            seconds = time.perf_counter() - started
            if iteration < warmup:
                continue
            timers = result["timers"]
            rows.append({"iteration_s": seconds, "env_steps_per_s": result["env_runners"]["num_env_steps"] / seconds,
                         "rollout_s": timers["env_runner_sampling_timer"], "update_s": timers["learner_update_timer"],
                         "sync_s": timers["synch_weights"], "overlap_s": timers.get("overlap_s", 0.0)})
    finally:
        algo.stop()
    return {name: statistics.median(row[name] for row in rows) for name in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "frozenlake_gigpo.yaml"))
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (the first overlapped one "
                        "samples two batches)")
    parser.add_argument("--num-env-groups", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=None)
    args = parser.parse_args()

    from gigpo_rllib.logging_utils import quiet_this_process, start_ray

    quiet_this_process()
    start_ray(quiet=True, num_cpus=3)
    import ray

    try:
        results = {name: measure(args.config, steps, args.iterations, args.warmup, args.num_env_groups,
                                 args.group_size) for name, steps in SETTINGS.items()}
    finally:
        ray.shutdown()
    print(f"\n{Path(args.config).name}, 1 remote env runner + learner, 1 torch thread each; median of "
          f"{args.iterations} iterations after {args.warmup} warm-up\n")
    header = (f"{'setting':<13} | {'iteration s':>11} | {'env steps/s':>11} | {'rollout s':>9} | {'update s':>8} | "
              f"{'sync s':>6} | {'overlap s':>9} | {'iteration / max(rollout, update)':>32}")
    print(header)
    print("-" * len(header))
    for name, row in results.items():
        ratio = row["iteration_s"] / max(row["rollout_s"], row["update_s"])
        print(f"{name:<13} | {row['iteration_s']:>11.2f} | {row['env_steps_per_s']:>11.1f} | {row['rollout_s']:>9.2f}"
              f" | {row['update_s']:>8.2f} | {row['sync_s']:>6.2f} | {row['overlap_s']:>9.2f} | {ratio:>32.2f}")
    speedup = results["sequential"]["iteration_s"] / results["one-step off"]["iteration_s"]
    print(f"\none-step off-policy iterations are {speedup:.2f}x as fast as sequential ones")


if __name__ == "__main__":
    main()
