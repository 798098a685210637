"""GiGPO vs GRPO on the same small FrozenLake setup: a side-by-side table per iteration, and a PNG plot.

    python3 examples/compare_gigpo_grpo.py [--iters 5] [--plot compare_gigpo_grpo.png]

Both runs use configs/frozenlake_gigpo.yaml with the same seed (so the same lakes in the same order); the only
difference is `adv_estimator`: `gigpo` (episode + anchor-state step advantages) vs `grpo` (the same pipeline
with the step advantage switched off). With the tiny model and a handful of iterations the curves are noisy:
this shows *how* to run the ablation, not a converged result (raise --iters for that).

Time on a 2-core CPU: about 7 s to build each algorithm plus 1-2 s per iteration, so well under a minute for
the default 5 iterations. ``benchmarks/bench_learning.py`` runs the same ablation on a task where the two differ.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

ESTIMATORS = ("gigpo", "grpo")


def run(estimator: str, iterations: int) -> list[dict[str, float]]:
    from gigpo_rllib.cli import load_experiment
    from gigpo_rllib.progress import format_progress, iteration_metrics

    config, _ = load_experiment(REPO / "configs" / "frozenlake_gigpo.yaml")
    config.training(adv_estimator=estimator)
    algo = config.build_algo()
    rows = []
    try:
        for _ in range(iterations):
            rows.append(iteration_metrics(algo.train()))
            print(f"[{estimator}] {format_progress(rows[-1])}", flush=True)
    finally:
        algo.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=5, help="training iterations per estimator (default 5)")
    parser.add_argument("--plot", default="compare_gigpo_grpo.png", help="where the PNG plot goes")
    args = parser.parse_args()

    import ray

    from gigpo_rllib.progress import plot_runs

    ray.init(include_dashboard=False)
    try:
        results = {estimator: run(estimator, args.iters) for estimator in ESTIMATORS}
    finally:
        ray.shutdown()

    print("\n iter | gigpo return | gigpo success | grpo return | grpo success")
    print("------+--------------+---------------+-------------+-------------")
    for g, r in zip(results["gigpo"], results["grpo"]):
        print(f" {int(g['iteration']):4d} | {g['episode_return_mean']:+12.3f} | {g['success_rate']:13.3f} | "
              f"{r['episode_return_mean']:+11.3f} | {r['success_rate']:12.3f}")
    try:
        path = plot_runs(results, args.plot, title="GiGPO vs GRPO, text FrozenLake, tiny model")
    except ImportError as error:
        print(f"\nno plot written: {error}")
        return
    print(f"\nplot written: {path}")


if __name__ == "__main__":
    main()
