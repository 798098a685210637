"""Environment throughput: steps per second of each env family, and Sokoban room generation time.

For each family two stacks are timed with a seeded random policy, resets included: the bare text env
(integer or move-text actions) and the full LLM stack ``envs.make_llm_env`` (reply parsing + anchor ids),
fed replies of the form ``<answer>Up</answer>``. Every figure is the median over ``--repeats`` runs.

The collector's own cost per env step, generation left out: the rollout's ``StepCollector`` plays FrozenLake
waves of ``--collector-envs`` envs (8 turns each) with a stub sampler that answers every prompt at once with a
random allowed reply, so what is timed is building the prompts (chat template + tokeniser), decoding the replies
and calling the envs, with ``env_step_timeout_s`` off and on (on: each env call runs on a worker thread).

    python benchmarks/bench_envs.py [--steps 2000] [--repeats 5] [--generations 500] [--collector-envs 64]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import envs  # noqa: E402
from envs.sokoban import generate_room  # noqa: E402

TEXTARENA_MOVES = {
    "TowerOfHanoi": ["[A B]", "[A C]", "[B C]", "[B A]", "[C A]", "[C B]"],
    "TicTacToe": [f"[{cell}]" for cell in range(9)],
    "2048": ["[up]", "[down]", "[left]", "[right]"],
}
FAMILIES = ["FrozenLake", "Sokoban", *TEXTARENA_MOVES]


def _actions(tag: str, env) -> list:
    words = env.get_wrapper_attr("action_words")
    return list(words) if words is not None else TEXTARENA_MOVES[tag]


def steps_per_second(make_env: Callable, tag: str, steps: int, as_reply: bool, seed: int = 0) -> float:
    """Random-policy steps per second, resetting (with a new seed) whenever an episode ends."""
    env = make_env(tag)
    rng = random.Random(seed)
    actions = _actions(tag, env)
    env.reset(seed=seed)
    start = time.perf_counter()
    for step in range(steps):
        index = rng.randrange(len(actions))
        if as_reply:
            action = f"<answer>{actions[index]}</answer>"
        else:
            action = index if env.get_wrapper_attr("action_words") is not None else actions[index]
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset(seed=seed + step + 1)
    return steps / (time.perf_counter() - start)


def generation_ms(count: int, seed: int) -> float:
    """Median milliseconds to generate one default (6x6, 1 box) Sokoban room."""
    rng = random.Random(seed)
    timings = []
    for _ in range(count):
        start = time.perf_counter()
        generate_room(6, 6, 1, rng)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings) * 1e3


class StubSampler:
    """Answers every prompt with a random allowed reply of its row (or ``<answer>Up</answer>``), log-probs 0."""

    def __init__(self, tokenizer, seed: int):
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.fallback = tokenizer("<answer>Up</answer>", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def generate(self, prompt_ids, params, allowed_responses=None, seed=None):
        from gigpo_rllib.sampling.base import Completion

        replies = [self.rng.choice(allowed) if allowed else self.fallback
                   for allowed in (allowed_responses or [None] * len(prompt_ids))]
        return [Completion(token_ids=list(reply), logprobs=[0.0] * len(reply), finish_reason="stop")
                for reply in replies]


def collector_steps_per_second(tokenizer, envs_per_wave: int, timeout_s: float | None, seed: int) -> float:
    """Env steps per second of one ``StepCollector.collect`` with the stub sampler (groups of 4 FrozenLake envs)."""
    from gigpo_rllib.rollout import GroupSpec, RolloutSettings, StepCollector
    from gigpo_rllib.sampling.base import SamplingParams

    settings = RolloutSettings(sampling=SamplingParams(max_new_tokens=16), sequence_length=2048, history_length=2,
                               max_envs=envs_per_wave, action_constraint=True, step_timeout_s=timeout_s)
    collector = StepCollector(StubSampler(tokenizer, seed), lambda tag: envs.make_llm_env(tag, max_steps=8), settings)
    groups = [GroupSpec(group_id=i, tag="FrozenLake", tag_id=0, seed=seed * 1000 + i) for i in range(envs_per_wave // 4)]
    collector.collect(groups, group_size=4, sample_seed=seed)  # warm-up: envs made, allowed replies tokenised
    start = time.perf_counter()
    out = collector.collect(groups, group_size=4, sample_seed=seed + 1)
    return len(out["rewards"]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (the median is printed)")
    parser.add_argument("--generations", type=int, default=500, help="Sokoban rooms per generation run")
    parser.add_argument("--collector-envs", type=int, default=64, help="envs per wave in the collector runs")
    args = parser.parse_args()

    rows = []
    for tag in FAMILIES:
        bare = [steps_per_second(envs.make_env_from_tag, tag, args.steps, False, seed) for seed in range(args.repeats)]
        llm = [steps_per_second(envs.make_llm_env, tag, args.steps, True, seed) for seed in range(args.repeats)]
        rows.append((tag, statistics.median(bare), statistics.median(llm)))

    print(f"{'env family':<14} | {'bare env steps/s':>16} | {'LLM stack steps/s':>17}")
    print(f"{'-' * 14}-+-{'-' * 16}-+-{'-' * 17}")
    for tag, bare, llm in rows:
        print(f"{tag:<14} | {bare:>16,.0f} | {llm:>17,.0f}")
    generation = statistics.median(generation_ms(args.generations, seed) for seed in range(args.repeats))
    print(f"\nSokoban 6x6, 1 box: room generation median {generation:.3f} ms "
          f"(median of {args.repeats} runs x {args.generations} rooms)")

    from gigpo_rllib.models import load_tokenizer

    tokenizer = load_tokenizer("gigpo-tiny")
    print(f"\n{'collector, stub sampler':<24} | {'steps/s':>8}")
    print(f"{'-' * 24}-+-{'-' * 8}")
    for label, timeout_s in (("env_step_timeout_s off", None), ("env_step_timeout_s 30", 30.0)):
        rate = statistics.median(collector_steps_per_second(tokenizer, args.collector_envs, timeout_s, seed)
                                 for seed in range(args.repeats))
        print(f"{label:<24} | {rate:>8,.0f}")


if __name__ == "__main__":
    main()
