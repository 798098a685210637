"""Advantage computation: vectorised torch vs the per-sample Python loop the public references use.

Synthetic batches, all in shuffled sample order, with anchors that recur within episode groups:

* fixed length, shaped like the paper's ALFWorld setting (16 groups x 8 trajectories x 50 steps) and ROLL's
  default scale (128 x 8 x 50), with about 65% of the step samples sharing their state with another
  trajectory of their group;
* long and ragged: 1,024 trajectories (128 groups x 8) whose lengths are drawn uniformly from 1..50 steps
  (26,316 samples), and the same generator grown to exactly 51,200 samples.

Prints the median time of each implementation, the vectorised time scaled to 51,200 samples, and their ratio,
measured side by side in one run.

    python benchmarks/bench_advantages.py [--repeats 30] [--loop-repeats 3] [--threads 1] [--device cpu]
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

GROUP_SIZE = 8
MAX_STEPS = 50
REFERENCE_SAMPLES = 51_200  # the batch size the per-51,200 column is scaled to
SHARED_STATE_PROBABILITY = 0.69  # gives ~65% of samples in an anchor group of two or more


def trajectory_lengths(num_traj: int, seed: int = 0) -> torch.Tensor:
    """``(num_traj,)`` lengths drawn uniformly from ``1..MAX_STEPS``."""
    return torch.randint(1, MAX_STEPS + 1, (num_traj,), generator=torch.Generator().manual_seed(seed))


def lengths_for_samples(num_samples: int, seed: int = 0) -> torch.Tensor:
    """Uniform ``1..MAX_STEPS`` lengths whose sum is exactly ``num_samples`` (the last one is cut short)."""
    lengths = trajectory_lengths(2 * num_samples // MAX_STEPS + 1, seed)  # mean 25.5: enough to overshoot
    keep = int((lengths.cumsum(0) < num_samples).sum()) + 1
    lengths = lengths[:keep].clone()
    lengths[-1] -= int(lengths.sum()) - num_samples
    return lengths


SCALES = {
    "ALFWorld (paper)": lambda: torch.full((16 * GROUP_SIZE,), MAX_STEPS),
    "ROLL default": lambda: torch.full((128 * GROUP_SIZE,), MAX_STEPS),
    "long, 1,024 traj": lambda: trajectory_lengths(128 * GROUP_SIZE),
    "long, 51,200": lambda: lengths_for_samples(REFERENCE_SAMPLES),
}


def synthetic_batch(lengths: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Step samples of trajectories with the given ``(T,)`` lengths, in groups of ``GROUP_SIZE``. At each step a
    trajectory lands on one of two states shared by its group with probability 0.69 and on a state of its own
    otherwise. Returns shuffled ``(N,)`` tensors (rewards, traj, step, group, anchor)."""
    generator = torch.Generator().manual_seed(seed)
    traj = torch.arange(lengths.shape[0]).repeat_interleave(lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    step = torch.arange(traj.shape[0]) - starts[traj]
    group = traj // GROUP_SIZE
    shared = torch.rand(traj.shape, generator=generator) < SHARED_STATE_PROBABILITY
    shared_state = (group * MAX_STEPS + step) * 2 + torch.randint(0, 2, traj.shape, generator=generator)
    own_state = (1 << 40) + traj * MAX_STEPS + step
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
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (timings are per thread count)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    header = (f"{'setting':<18} {'samples':>8} {'shared':>7} {'vectorised ms':>14} {'ms/51,200':>10} "
              f"{'loop ms':>10} {'speed-up':>9}")
    print(header)
    print("-" * len(header))
    for name, lengths in SCALES.items():
        inputs = synthetic_batch(lengths())
        device_inputs = tuple(x.to(args.device) for x in inputs)
        lists = [x.tolist() for x in inputs]

        def vectorised():
            out = compute_gigpo_advantages(*device_inputs, method="mean_std")
            if out.advantages.is_cuda:
                torch.cuda.synchronize()

        vec = median_seconds(vectorised, args.repeats)
        loop = median_seconds(lambda: loop_gigpo(*lists, method="mean_std"), args.loop_repeats)
        samples = inputs[0].numel()
        groups = compute_gigpo_advantages(*inputs).anchor_group_ids
        sizes = torch.bincount(groups)
        shared = float((sizes[groups] > 1).double().mean())
        stats = anchor_group_stats(groups)
        print(f"{name:<18} {samples:>8} {shared:>6.0%} {vec * 1e3:>14.2f} {vec * 1e3 * REFERENCE_SAMPLES / samples:>10.2f} "
              f"{loop * 1e3:>10.1f} {loop / vec:>8.0f}x   ({stats.num_groups} anchor groups, "
              f"{stats.singleton_fraction:.0%} singletons)")


if __name__ == "__main__":
    main()
