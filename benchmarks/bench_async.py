"""Overlapped sampling and learning: one iteration's time and env steps per second, sequential
(``max_off_policy_steps: 0``: rollout, then update) vs one-step off-policy (``1``: the next batch is sampled
during the update), side by side in one run.

The demo's setting (``configs/frozenlake_gigpo.yaml``, the tiny offline model) and, with ``--settings demo smollm2``,
the real-model one of ``bench_real_model.py`` (SmolLM2, LoRA, vLLM, 32 episodes); one remote env runner and the
learner (in the driver), each on one torch thread. Each setting builds its algorithm, trains ``--warmup``
iterations untimed, then ``--iterations`` timed ones; every figure is the median over the timed iterations.
``rollout s`` and ``update s`` are the iteration's own timers (with overlap the rollout is the one trained on,
sampled during the previous update); the target is an overlapped iteration of about max(rollout, update), where
the sequential one takes their sum. Validation is off.

``--learning`` compares what the two learn instead: the tasks of ``bench_learning.py`` (the 4x4 pool and the
corridor by default), GiGPO with one remote env runner, sequential vs one-step off-policy, trained for the same
env-step budget over ``--seeds`` seeds; the table gives the final success with its 95% interval (the target: the
one-step-off run's within the sequential run's interval), and ``learning.json`` / ``learning.png`` go to ``--out``.
A seeded run learns the same whatever the machine's load (the weights each batch is sampled with do not depend
on timing), so ``--workers`` runs can share the CPUs.

    python3 benchmarks/bench_async.py [--settings demo smollm2] [--iterations 5] [--warmup 1]
                                      [--config configs/frozenlake_gigpo.yaml] [--num-env-groups N --group-size M]
    python3 benchmarks/bench_async.py --learning [--tasks frozenlake corridor] [--seeds 5] [--workers 2] [--out DIR]
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


def demo_config(args: argparse.Namespace):
    """The demo's setting (``--config``), with ``--num-env-groups`` x ``--group-size`` episodes if given."""
    from gigpo_rllib.cli import load_experiment

    config, _ = load_experiment(args.config)
    if args.num_env_groups or args.group_size:
        manager = dict(config.train_env_manager)
        manager.update({key: value for key, value in (("num_env_groups", args.num_env_groups),
                                                      ("group_size", args.group_size)) if value})
        manager["num_groups_partition"] = [manager["num_env_groups"]]
        manager["max_env_num_per_worker"] = max(manager["max_env_num_per_worker"], manager["group_size"])
        episodes = manager["num_env_groups"] * manager["group_size"]
        config.training(train_env_manager=manager, rollout_batch_size=episodes,
                        minibatch_size=min(config.minibatch_size, episodes))
    return config


def smollm2_config(args: argparse.Namespace):
    """The real-model setting of ``bench_real_model.py``: SmolLM2 with LoRA and the vLLM sampler, 32 episodes."""
    from benchmarks.bench_real_model import DEFAULT_MODEL, training_config

    return training_config(DEFAULT_MODEL, "vllm", "lora")


SETTING_CONFIGS = {"demo": demo_config, "smollm2": smollm2_config}


def measure(config, off_policy_steps: int, iterations: int, warmup: int) -> dict[str, float]:
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


def compare_learning(argv: list[str]) -> None:
    import bench_learning

    parser = argparse.ArgumentParser(description="sequential vs one-step off-policy: what they learn")
    parser.add_argument("--learning", action="store_true")
    bench_learning.add_arguments(parser, ["frozenlake", "corridor"], ROOT / "benchmarks" / "results" / "async_learning")
    variants = {name: ({"max_off_policy_steps": steps}, 1) for name, steps in SETTINGS.items()}
    bench_learning.compare(variants, parser.parse_args(argv), "Sequential vs one-step off-policy (GiGPO)")


def main() -> None:
    if "--learning" in sys.argv[1:]:
        compare_learning(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "frozenlake_gigpo.yaml"), help="the demo setting")
    parser.add_argument("--settings", nargs="+", default=["demo"], choices=list(SETTING_CONFIGS),
                        help="demo: --config (the tiny model); smollm2: SmolLM2 + LoRA + vLLM, 32 episodes")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (the first overlapped one "
                        "samples two batches)")
    parser.add_argument("--num-env-groups", type=int, default=None, help="a smaller demo batch")
    parser.add_argument("--group-size", type=int, default=None)
    args = parser.parse_args()

    from gigpo_rllib.logging_utils import quiet_this_process, start_ray

    quiet_this_process()
    start_ray(quiet=True, num_cpus=3)
    import ray

    try:
        results = {(setting, name): measure(SETTING_CONFIGS[setting](args), steps, args.iterations, args.warmup)
                   for setting in args.settings for name, steps in SETTINGS.items()}
    finally:
        ray.shutdown()
    print(f"\n1 remote env runner + learner, 1 torch thread each; median of {args.iterations} iterations after "
          f"{args.warmup} warm-up (demo: {Path(args.config).name})\n")
    header = (f"{'setting':<8} | {'mode':<12} | {'iteration s':>11} | {'env steps/s':>11} | {'rollout s':>9} | "
              f"{'update s':>8} | {'sync s':>6} | {'overlap s':>9} | {'iteration / max(rollout, update)':>32}")
    print(header)
    print("-" * len(header))
    for (setting, name), row in results.items():
        ratio = row["iteration_s"] / max(row["rollout_s"], row["update_s"])
        print(f"{setting:<8} | {name:<12} | {row['iteration_s']:>11.2f} | {row['env_steps_per_s']:>11.1f} | "
              f"{row['rollout_s']:>9.2f} | {row['update_s']:>8.2f} | {row['sync_s']:>6.2f} | {row['overlap_s']:>9.2f} | "
              f"{ratio:>32.2f}")
    print()
    for setting in args.settings:
        speedup = results[setting, "sequential"]["iteration_s"] / results[setting, "one-step off"]["iteration_s"]
        print(f"{setting}: one-step off-policy iterations are {speedup:.2f}x as fast as sequential ones")


if __name__ == "__main__":
    main()
