"""Does a pretrained model learn? SmolLM2-135M-Instruct on a pool of 4x4 FrozenLake maps, GiGPO vs GRPO.

Each estimator trains the same model from the same start, everything else equal (``adv_estimator`` is the only
difference), for at most ``--minutes`` of training (or ``--iterations``), one run per CPU (``--workers`` at a time):
the sampler (vLLM) and the learner share one process with one torch thread. The setting is the one the zero-shot
table of README "A real model on a CPU" describes: a pool of eight 4x4 maps (seeds 1-8, 8 turns, compact
instructions, the action constraint), 4 maps x 8 tries = 32 episodes per iteration, LoRA adapters (rank 16), and
dynamic sampling (groups whose tries all ended alike are replaced by new ones, up to ``--dynamic-rounds`` extra
rounds), because the untrained policy is peaked (~0.7 on Left) and most groups carry no signal.

Greedy success on the pool and on held-out maps (``--val-episodes`` each; held-out maps are fresh at every
validation) is measured before training (zero-shot), every ``--val-every`` iterations, and at the end. Writes
``real_learning.json`` (the settings, every iteration's training metrics, every validation) and
``real_learning.png`` (training success by env steps; greedy pool and held-out success) into ``--out``, and each
run's curve so far into ``--out``/partial/ after every iteration.

    python3 benchmarks/bench_real_learning.py [--minutes 55] [--estimators gigpo grpo] [--lr 5e-4]
                                              [--temperature 1.0] [--dynamic-rounds 2] [--out DIR]
    python3 benchmarks/bench_real_learning.py --model gigpo-tiny --iterations 2 --val-episodes 4  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POOL = [1, 2, 3, 4, 5, 6, 7, 8]
ESTIMATORS = ("gigpo", "grpo")


def training_config(args: argparse.Namespace, estimator: str):
    from gigpo_rllib import GiGPOConfig

    return (GiGPOConfig().environment("TextFrozenLake-v0", env_config={"max_steps": 8, "instructions_style": "compact"})
            .training(model_name_or_path=args.model, sampler_backend="vllm", adv_estimator=estimator,
                      lora={"r": 16, "alpha": 32}, lr=args.lr, temperature=args.temperature,
                      train_env_manager={"num_env_groups": 4, "group_size": 8, "seed_pool": POOL,
                                         "max_env_num_per_worker": 32},
                      rollout_batch_size=32, minibatch_size=args.minibatch_size, max_new_tokens=16,
                      action_constraint=True, history_length=0, sequence_length=512,
                      val_batch_size=args.val_episodes, val_interval=0, eval_greedy=True,
                      dynamic_sampling=args.dynamic_rounds > 0, dynamic_sampling_max_rounds=max(args.dynamic_rounds, 1),
                      # vLLM runs in float32 here: its recorded log-probs match the learner's to ~1e-4 (the
                      # real-model tests), so the learner's extra no-grad pass over the batch is not needed.
                      old_logprobs_source="sampler")
            .env_runners(num_env_runners=0).debugging(seed=args.seed))


def greedy_success(algo, iteration: int, env_steps: int) -> dict:
    results = algo.validate()
    return {"iteration": iteration, "env_steps": env_steps, "pool": float(results["pool"]["success_rate"]),
            "held_out": float(results["held_out"]["success_rate"])}


def train_run(args: argparse.Namespace, estimator: str) -> dict:
    """One run: zero-shot greedy success, training until the time or iteration budget, greedy success after."""
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    algo = training_config(args, estimator).build_algo()
    iterations, validations = [], []
    try:
        validations.append(greedy_success(algo, 0, 0))
        training_started = time.perf_counter()
        while (time.perf_counter() - training_started < args.minutes * 60
               and (args.iterations is None or len(iterations) < args.iterations)):
            result = algo.train()
            runners, policy = result["env_runners"], result["learners"]["default_policy"]
            env_steps = (iterations[-1]["env_steps"] if iterations else 0) + int(runners["num_env_steps"])
            iterations.append({"env_steps": env_steps, "success": float(runners["success_rate"]),
                               "groups_with_signal_fraction": float(runners["groups_with_signal_fraction"]),
                               "dynamic_sampling_rounds": float(runners["dynamic_sampling_rounds"]),
                               "token_entropy": float(policy["entropy"]),
                               "seconds": float(result["time_this_iter_s"])})
            print(f"{estimator} iteration {len(iterations)}: success {iterations[-1]['success']:.3f}, groups with "
                  f"signal {iterations[-1]['groups_with_signal_fraction']:.2f}, {iterations[-1]['seconds']:.0f} s",
                  flush=True)
            if args.partial_dir:  # an hour-long run that is stopped early still leaves its curve
                pathlib.Path(args.partial_dir, f"{estimator}.json").write_text(
                    json.dumps({"iterations": iterations, "validations": validations}))
            if args.val_every and len(iterations) % args.val_every == 0:
                validations.append(greedy_success(algo, len(iterations), env_steps))
        if not validations or validations[-1]["iteration"] != len(iterations):
            validations.append(greedy_success(algo, len(iterations), iterations[-1]["env_steps"] if iterations else 0))
    finally:
        algo.stop()
    return {"estimator": estimator, "iterations": iterations, "validations": validations,
            "wall_s": time.perf_counter() - started}


def plot(runs: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (train_axis, greedy_axis) = plt.subplots(1, 2, figsize=(11, 3.8))
    for run, colour in zip(runs, ("tab:blue", "tab:orange", "tab:green")):
        steps = [row["env_steps"] for row in run["iterations"]]
        train_axis.plot(steps, [row["success"] for row in run["iterations"]], color=colour, label=run["estimator"])
        val_steps = [row["env_steps"] for row in run["validations"]]
        greedy_axis.plot(val_steps, [row["pool"] for row in run["validations"]], "o-", color=colour,
                         label=f"{run['estimator']} pool")
        greedy_axis.plot(val_steps, [row["held_out"] for row in run["validations"]], "s--", color=colour,
                         label=f"{run['estimator']} held-out")
    for axis, name in ((train_axis, "training success (sampled)"), (greedy_axis, "greedy success")):
        axis.set_xlabel("env steps")
        axis.set_ylabel(name)
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    parser.add_argument("--minutes", type=float, default=55.0, help="training time per run (validations extra)")
    parser.add_argument("--iterations", type=int, default=None, help="at most this many iterations per run")
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate of the LoRA adapters")
    parser.add_argument("--temperature", type=float, default=1.0, help="training sampling temperature")
    parser.add_argument("--dynamic-rounds", type=int, default=2, help="dynamic sampling's extra rounds; 0: off")
    parser.add_argument("--minibatch-size", type=int, default=16,
                        help="step samples per optimizer step; at 64 one run held 17 GB of activations on this CPU")
    parser.add_argument("--val-episodes", type=int, default=32, help="greedy episodes on the pool and held out")
    parser.add_argument("--val-every", type=int, default=10, help="validate every this many iterations; 0: at the "
                                                                   "start and end only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (one CPU each)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real_learning"))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.partial_dir = str(out / "partial")
    pathlib.Path(args.partial_dir).mkdir(exist_ok=True)

    import ray

    os.environ["OMP_NUM_THREADS"] = "1"
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    remote_run = ray.remote(num_cpus=1)(train_run)
    started = time.perf_counter()
    try:
        runs = ray.get([remote_run.remote(args, estimator) for estimator in args.estimators])
    finally:
        ray.shutdown()
    print(f"\n{args.model}, 4x4 FrozenLake pool of {len(POOL)} maps; greedy success ({args.val_episodes} episodes "
          f"each), zero-shot -> after training")
    print(f"{'estimator':<9} | {'iterations':>10} | {'env steps':>9} | {'pool':>13} | {'held-out':>13} | "
          f"{'last-5 training success':>23} | {'wall s':>6}")
    print("-" * 98)
    for run in runs:
        first, last = run["validations"][0], run["validations"][-1]
        tail = run["iterations"][-5:]
        training = sum(row["success"] for row in tail) / len(tail) if tail else float("nan")
        print(f"{run['estimator']:<9} | {len(run['iterations']):>10} | {last['env_steps']:>9,} | "
              f"{first['pool']:.3f} -> {last['pool']:.3f} | {first['held_out']:.3f} -> {last['held_out']:.3f} | "
              f"{training:>23.3f} | {run['wall_s']:>6.0f}")
    settings = {name: value for name, value in vars(args).items() if name not in ("out", "workers", "partial_dir")}
    (out / "real_learning.json").write_text(json.dumps(
        {"settings": {**settings, "pool": POOL}, "runs": runs, "total_wall_s": time.perf_counter() - started},
        indent=1))
    try:
        plot(runs, out / "real_learning.png", f"{args.model} on a pool of {len(POOL)} 4x4 FrozenLake maps "
                                              f"(LoRA r 16, lr {args.lr:g})")
        print(f"\nwritten: {out / 'real_learning.json'}, {out / 'real_learning.png'}")
    except ImportError:
        print(f"\nwritten: {out / 'real_learning.json'} (no plot: matplotlib is not installed)")


if __name__ == "__main__":
    main()
