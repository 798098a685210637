"""The main demo: train the tiny offline policy with GiGPO on text FrozenLake, on a CPU, in a few minutes.

Each iteration rolls out 8 random 4×4 lakes × 4 attempts (32 trajectories), computes the two-level GiGPO
advantages on the learner, updates the policy and syncs the weights back to the sampler. One progress line per
iteration shows return, success rate and the time split (rollout / advantages / update / weight sync); a summary
follows, then a checkpoint path you can pass to ``examples/evaluate.py`` or ``rllib evaluate``.

    python3 examples/train_frozenlake.py [--iterations 20] [--config configs/frozenlake_gigpo.yaml]
                                         [--num-env-runners 1] [--checkpoint-dir DIR] [--verbose]

Nothing is downloaded: the policy is ``gigpo-tiny``, built offline on first use.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from gigpo_rllib.cli import default_checkpoint_dir, load_experiment, train  # noqa: E402
from gigpo_rllib.logging_utils import quiet_this_process, start_ray  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "frozenlake_gigpo.yaml"), help="YAML experiment")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations (default: the YAML's stop)")
    parser.add_argument("--num-env-runners", type=int, default=None, help="sampling actors (0: sample in the driver)")
    parser.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default ~/gigpo_results/...)")
    parser.add_argument("--verbose", action="store_true", help="also show Ray's and RLlib's start-up notes")
    args = parser.parse_args()

    if not args.verbose:
        quiet_this_process()  # before the config is validated: RLlib logs a start-up note then
    config, stop_iters = load_experiment(args.config)
    if args.num_env_runners is not None:
        config.env_runners(num_env_runners=args.num_env_runners)
    start_ray(quiet=not args.verbose)
    try:
        train(config, args.iterations or stop_iters, quiet=not args.verbose,
              checkpoint_dir=args.checkpoint_dir or default_checkpoint_dir("frozenlake_gigpo"))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
