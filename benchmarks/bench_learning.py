"""Learning benchmark: GiGPO vs GRPO (``adv_estimator: grpo``), everything else equal, on three tasks.

* ``frozenlake``: the CPU demo's task, a pool of eight 4x4 FrozenLake maps (``configs/frozenlake_gigpo.yaml``),
  with an entropy bonus that starts wide and decays (0.05 to 0.005 over 20k env steps) over a longer budget.
* ``long``: a long-horizon task where states recur within a group: a pool of eight 8x8 FrozenLake maps (seeds
  0-7, 10% holes), 30 turns per episode, reward 1 at the goal only. A random walk reaches the goal in about 12%
  of episodes (0-57% by map) and revisits cells often, so many steps share an anchor state.
* ``corridor``: the corridor of ``tests/learning_env.py`` (``P _ _ _ _ G``, 8 turns): Right moves on, so
  credit must go to the steps that moved right.

For each task and estimator, ``--seeds`` training runs (the training seed drives sampling and the pool's order;
the model's initial weights and the pool are the same) train the tiny offline model for the same env-step
budget. Each run trains in one Ray task with its sampler and learner in one process (one CPU), ``--workers`` runs
at a time. Reported per task and estimator: the final success rate (mean over the last 5 iterations, then over
seeds, with a 95% t-interval), the env steps to first reach 50% and 80% success (mean over the seeds that did,
and how many did), the area under the success curve (mean success over the budget), the wall time per run, and
whether anchor-state groups form: the mean samples per anchor group and the share of one-sample groups (mean
over iterations and seeds).
Writes ``learning.json`` (every run's curve, each pool map's curve, and every number of the table) and
``learning.png`` (mean curves with 95% bands) into ``--out``.

    python3 benchmarks/bench_learning.py [--tasks frozenlake long corridor] [--seeds 5] [--first-seed 0] [--workers 2]
                                         [--out DIR]
    python3 benchmarks/bench_learning.py --quick    # smoke: one seed, a few iterations per task

The full run (3 tasks x 2 estimators x 5 seeds) took 54 minutes on a 2-core CPU (README "Results").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# What is compared: each variant's name -> (the training keys it sets, its number of remote env runners).
ESTIMATORS = {"gigpo": ({"adv_estimator": "gigpo"}, 0), "grpo": ({"adv_estimator": "grpo"}, 0)}
# Student's t quantile for a two-sided 95% interval, by degrees of freedom.
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
FINAL_WINDOW = 5


def task_config(task: str, training: dict, env_runners: int, seed: int):
    """The GiGPOConfig of one run (the task's, with ``training`` keys set and ``env_runners`` remote env runners of one
    CPU), and its env-step budget."""
    from gigpo_rllib.cli import load_experiment

    if task == "frozenlake":
        config = load_experiment(ROOT / "configs" / "frozenlake_gigpo.yaml")[0]
        # The demo's fixed 0.03 bonus leaves some seeds on 7 of 8 maps for good (a collapsed move on the last map);
        # a wide bonus first, then sharpening, got 5 of 6 tuning seeds above 0.95.
        config.training(entropy_loss_coef=[[0, 0.05], [20_000, 0.005]])
        budget = 45_000
    elif task == "long":
        config = load_experiment(ROOT / "configs" / "frozenlake_gigpo.yaml")[0]
        config.environment(env_config={"size": 8, "p": 0.9, "max_steps": 30, "instructions_style": "compact"})
        # Episodes are ~4x longer than on 4x4 maps: the lr decays over ~4x the env steps.
        config.training(train_env_manager={"seed_pool": list(range(8))}, lr=[[0, 0.003], [32_000, 0.0003]])
        budget = 60_000
    elif task == "corridor":
        config = load_experiment(ROOT / "configs" / "frozenlake_gigpo.yaml")[0]
        config.environment("tests.learning_env:Corridor-v0")
        config.env_config = {"length": 6, "max_steps": 8}  # replaced, not merged: the corridor has no compact style
        config.training(train_env_manager={"seed_pool": None}, system_prompt=None)
        budget = 15_000
    else:
        raise ValueError(f"unknown task {task!r}; tasks: frozenlake, long, corridor")
    config.training(val_interval=0, **training).debugging(seed=seed)
    config.env_runners(num_env_runners=env_runners, num_cpus_per_env_runner=1)
    return config, budget


def train_run(task: str, variant: str, settings: tuple[dict, int], seed: int, budget_scale: float,
              max_iterations: int | None) -> dict:
    """One training run of ``variant`` (its ``settings``: training keys, remote env runners) until the env-step
    budget: its curve (env steps, success rate) and wall time."""
    import torch

    torch.set_num_threads(1)
    config, budget = task_config(task, *settings, seed)
    budget = int(budget * budget_scale)
    started = time.perf_counter()
    algo = config.build_algo()
    steps, success, group_size, singletons, per_seed = [], [], [], [], []
    try:
        while (not steps or steps[-1] < budget) and (max_iterations is None or len(steps) < max_iterations):
            result = algo.train()
            runners, learners = result["env_runners"], result["learners"]["__all_modules__"]
            steps.append((steps[-1] if steps else 0) + int(runners["num_env_steps"]))
            success.append(float(runners["success_rate"]))
            group_size.append(float(learners["anchor_mean_group_size"]))
            singletons.append(float(learners["anchor_singleton_fraction"]))
            per_seed.append(runners.get("pool_seed_success", {}))
    finally:
        algo.stop()
    return {"task": task, "variant": variant, "seed": seed, "env_steps": steps, "success": success,
            "pool_seed_success": pool_curves(per_seed), "anchor_mean_group_size": group_size,
            "anchor_singleton_fraction": singletons, "wall_s": time.perf_counter() - started, "budget": budget}


def pool_curves(per_iteration: list[dict[str, float]]) -> dict[str, list[float | None]]:
    """Each pool map's success per iteration, None where the iteration did not draw it (RLlib reports NaN there):
    it shows which map a run leaves unsolved."""
    seeds = sorted({seed for iteration in per_iteration for seed in iteration}, key=lambda seed: (len(seed), seed))
    curves = {}
    for seed in seeds:
        values = [float(iteration.get(seed, math.nan)) for iteration in per_iteration]
        curves[seed] = [None if math.isnan(value) else value for value in values]
    return curves


def first_reaching(run: dict, threshold: float) -> int | None:
    return next((step for step, value in zip(run["env_steps"], run["success"]) if value >= threshold), None)


def area_under_curve(run: dict) -> float:
    """Mean success over the budget: the trapezoid area under success(env steps), divided by the steps covered."""
    steps, values = [0] + run["env_steps"], [run["success"][0]] + run["success"]
    area = sum((steps[i + 1] - steps[i]) * (values[i + 1] + values[i]) / 2 for i in range(len(steps) - 1))
    return area / steps[-1]


def mean_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width 0 for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, T_95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def summarize(runs: list[dict]) -> dict:
    finals = [statistics.fmean(run["success"][-FINAL_WINDOW:]) for run in runs]
    mean, half = mean_interval(finals)
    summary = {"final_success_mean": mean, "final_success_ci95": half, "final_success_per_seed": finals,
               "auc_mean": statistics.fmean(area_under_curve(run) for run in runs),
               "wall_s_mean": statistics.fmean(run["wall_s"] for run in runs), "seeds": len(runs),
               # Whether step groups form at all: samples per anchor group, and the share of groups of one sample.
               "anchor_mean_group_size": statistics.fmean(statistics.fmean(run["anchor_mean_group_size"])
                                                          for run in runs),
               "anchor_singleton_fraction": statistics.fmean(statistics.fmean(run["anchor_singleton_fraction"])
                                                             for run in runs)}
    for threshold in (0.5, 0.8):
        reached = [step for step in (first_reaching(run, threshold) for run in runs) if step is not None]
        summary[f"steps_to_{int(threshold * 100)}"] = statistics.fmean(reached) if reached else None
        summary[f"reached_{int(threshold * 100)}"] = len(reached)
    return summary


def plot(runs: list[dict], tasks: list[str], variants: list[str], title: str, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for variant, colour in zip(variants, ("tab:blue", "tab:orange", "tab:green")):
            group = [run for run in runs if run["task"] == task and run["variant"] == variant]
            if not group:
                continue
            grid = np.linspace(0, min(run["env_steps"][-1] for run in group), 60)
            curves = np.array([np.interp(grid, run["env_steps"], run["success"]) for run in group])
            mean = curves.mean(0)
            half = (T_95.get(len(group) - 1, 1.96) * curves.std(0, ddof=1) / math.sqrt(len(group))
                    if len(group) > 1 else np.zeros_like(mean))
            axis.plot(grid, mean, color=colour, label=f"{variant} ({len(group)} seeds)")
            axis.fill_between(grid, np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1), color=colour, alpha=0.2)
        axis.set_title(task)
        axis.set_xlabel("env steps")
        axis.set_ylabel("success rate")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right")
    figure.suptitle(f"{title}: mean success with 95% interval")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def print_table(summaries: dict) -> None:
    print(f"\n{'task':<11}| {'variant':<13}| {'final success (95% CI)':>22} | {'steps to 50%':>14} | "
          f"{'steps to 80%':>14} | {'AUC':>5} | {'wall s':>6} | {'anchor group':>12} | {'singletons':>10}")
    print("-" * 130)
    for (task, variant), summary in summaries.items():
        def steps(threshold: int) -> str:
            value = summary[f"steps_to_{threshold}"]
            reached = f"({summary[f'reached_{threshold}']}/{summary['seeds']})"
            return f"{value:>7,.0f} {reached}" if value is not None else f"{'never':>7} {reached}"

        final = f"{summary['final_success_mean']:.3f} ± {summary['final_success_ci95']:.3f}"
        print(f"{task:<11}| {variant:<13}| {final:>22} | {steps(50):>14} | {steps(80):>14} | "
              f"{summary['auc_mean']:>5.3f} | {summary['wall_s_mean']:>6.0f} | "
              f"{summary['anchor_mean_group_size']:>12.1f} | {summary['anchor_singleton_fraction']:>10.2f}")


def add_arguments(parser: argparse.ArgumentParser, tasks: list[str], out: pathlib.Path) -> None:
    """The options of a learning comparison (this script's, and ``bench_async.py --learning``'s)."""
    parser.add_argument("--tasks", nargs="+", default=tasks, choices=["frozenlake", "long", "corridor"])
    parser.add_argument("--seeds", type=int, default=5, help="training seeds per task and variant")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the training seeds are first-seed .. first-seed + seeds - 1 (e.g. 10 for seeds that "
                             "no setting was tuned on)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time")
    parser.add_argument("--out", default=str(out))
    parser.add_argument("--quick", action="store_true", help="smoke mode: one seed, 2 iterations per run")


def compare(variants: dict[str, tuple[dict, int]], args: argparse.Namespace, title: str) -> dict:
    """Train every task x variant x seed (``--workers`` runs at a time, each with one CPU for the learner and one
    per remote env runner), print the table, write ``learning.json`` and ``learning.png`` into ``--out``; returns
    the summaries by ``(task, variant)``."""
    seeds = 1 if args.quick else args.seeds
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cpus_per_run = 1 + max(env_runners for _, env_runners in variants.values())
    ray.init(num_cpus=args.workers * cpus_per_run, include_dashboard=False, log_to_driver=False,
             configure_logging=False,
             # The benchmarks folder too: train_run travels by reference when another script imports this one.
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}",
                                       "OMP_NUM_THREADS": "1"}})
    remote_run = ray.remote(num_cpus=1)(train_run)
    started = time.perf_counter()
    queued = [(task, name, settings, seed, 1.0, 2 if args.quick else None)
              for task in args.tasks for seed in range(args.first_seed, args.first_seed + seeds)
              for name, settings in variants.items()]
    try:
        # Submitted --workers at a time: Ray frees a task's CPU while it waits on its env runners, so CPU
        # reservations alone would start more runs at once.
        pending, runs = [], []
        while queued or pending:
            while queued and len(pending) < args.workers:
                pending.append(remote_run.remote(*queued.pop(0)))
            done, pending = ray.wait(pending, num_returns=1)
            run = ray.get(done[0])
            runs.append(run)
            print(f"[{time.perf_counter() - started:6.0f}s] {run['task']:<10} {run['variant']:<12} seed {run['seed']}: "
                  f"final success {statistics.fmean(run['success'][-FINAL_WINDOW:]):.3f} after "
                  f"{run['env_steps'][-1]:,} env steps ({run['wall_s']:.0f} s)", flush=True)
    finally:
        ray.shutdown()
    summaries = {(task, name): summarize([run for run in runs if run["task"] == task and run["variant"] == name])
                 for task in args.tasks for name in variants}
    print_table(summaries)
    (out / "learning.json").write_text(json.dumps(
        {"variants": {name: {"training": training, "num_env_runners": env_runners}
                      for name, (training, env_runners) in variants.items()},
         "runs": sorted(runs, key=lambda run: (run["task"], run["variant"], run["seed"])),
         "summary": {f"{task}/{name}": summary for (task, name), summary in summaries.items()},
         "total_wall_s": time.perf_counter() - started}, indent=1))
    try:
        plot(runs, args.tasks, list(variants), title, out / "learning.png")
        print(f"\nwritten: {out / 'learning.json'}, {out / 'learning.png'}")
    except ImportError:
        print(f"\nwritten: {out / 'learning.json'} (no plot: matplotlib is not installed)")
    return summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser, ["frozenlake", "long", "corridor"], ROOT / "benchmarks" / "results" / "learning")
    compare(ESTIMATORS, parser.parse_args(), "GiGPO vs GRPO")


if __name__ == "__main__":
    main()
