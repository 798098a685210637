"""Advantage computation: vectorised torch vs the per-sample Python loop the public references use.

Synthetic batches shaped like the paper's ALFWorld setting (16 groups x 8 trajectories x 50 steps) and ROLL's
default scale (128 x 8 x 50), in shuffled order, with about 65% of the step samples sharing their state with
another trajectory of their group. Prints the median time of each implementation and their ratio, measured
side by side in one run.

    python benchmarks/bench_advantages.py [--repeats 30] [--loop-repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gigpo_rllib.advantages import anchor_group_stats, compute_gigpo_advantages  # noqa: E402
from tests.loop_reference import loop_gigpo  # noqa: E402

SCALES = {"ALFWorld (paper)": (16, 8, 50), "ROLL default": (128, 8, 50)}
SHARED_STATE_PROBABILITY = 0.69  # gives ~65% of samples in an anchor group of two or more


def synthetic_batch(num_groups: int, group_size: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Step samples where, at each step, a trajectory lands on one of two states shared by its group with
    probability 0.69 and on a state of its own otherwise. Returns shuffled (rewards, traj, step, group, anchor)."""
    generator = torch.Generator().manual_seed(seed)
    num_traj = num_groups * group_size
    traj = torch.arange(num_traj).repeat_interleave(steps)
    step = torch.arange(steps).repeat(num_traj)
    group = traj // group_size
    shared = torch.rand(traj.shape, generator=generator) < SHARED_STATE_PROBABILITY
    shared_state = (group * steps + step) * 2 + torch.randint(0, 2, traj.shape, generator=generator)
    own_state = (1 << 40) + traj * steps + step
    anchor = torch.where(shared, shared_state, own_state)
    rewards = (torch.rand(traj.shape, generator=generator) < 0.05).double() - 0.01
    order = torch.randperm(traj.shape[0], generator=generator)
    return tuple(x[order] for x in (rewards, traj, step, group, anchor))


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="timed runs of the vectorised version")
    parser.add_argument("--loop-repeats", type=int, default=3, help="timed runs of the Python-loop version")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    header = f"{'setting':<18} {'samples':>8} {'shared':>7} {'vectorised ms':>14} {'loop ms':>10} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for name, shape in SCALES.items():
        inputs = synthetic_batch(*shape)
        device_inputs = tuple(x.to(args.device) for x in inputs)
        lists = [x.tolist() for x in inputs]

        def vectorised():
            out = compute_gigpo_advantages(*device_inputs, method="mean_std")
            if out.advantages.is_cuda:
                torch.cuda.synchronize()

        vec = median_seconds(vectorised, args.repeats)
        loop = median_seconds(lambda: loop_gigpo(*lists, method="mean_std"), args.loop_repeats)
        groups = compute_gigpo_advantages(*inputs).anchor_group_ids
        sizes = torch.bincount(groups)
        shared = float((sizes[groups] > 1).double().mean())
        stats = anchor_group_stats(groups)
        print(f"{name:<18} {inputs[0].numel():>8} {shared:>6.0%} {vec * 1e3:>14.2f} {loop * 1e3:>10.1f} "
              f"{loop / vec:>8.0f}x   ({stats.num_groups} anchor groups, {stats.singleton_fraction:.0%} singletons)")


if __name__ == "__main__":
    main()
