"""Cost of one learner update: the full-vocabulary forward ("before") vs scoring response positions only ("after").

An update here is what the learner does per minibatch: ``forward_token_logprobs`` on right-padded
``[prompt, reply, pad]`` rows, the clipped-PPO loss, backward, and an Adam step. Two shapes:

* ``demo``: ``gigpo-tiny`` (vocabulary ~1.2k) on 32 rows of FrozenLake-sized prompts (~300 tokens) with 8-token
  replies, the shapes of the CPU demo before its prompts were shortened.
* ``vocab150k``: the same two-layer body with a 151,936-row output layer (Qwen2.5's vocabulary), 8 rows.

Each (shape, mode) runs in a fresh process, so its peak resident memory (``ru_maxrss``) is its own; the table
gives the median update time over ``--repeats`` updates after one warm-up, the peak memory above the process's
memory right after loading the model, and the ratios side by side.

A second table gives the padding of real minibatches: FrozenLake prompts with 0-3 turns of history (the
rollout's own prompt builder, as ``bench_rollout.py`` makes them) plus 8-token replies, shuffled into minibatches
as the learner does, padded to the widest row of the whole batch ("before") or trimmed to each minibatch's widest
row ("after", what the learner does now).

    python3 benchmarks/bench_update.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: (vocabulary rows or None for the tokenizer's, rows, prompt tokens, reply tokens)
    "demo": (None, 32, 300, 8),
    "vocab150k": (151_936, 8, 300, 8),
}
MODES = {"before": False, "after": True}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(shape: str, response_only: bool, repeats: int, threads: int) -> dict[str, float]:
    """Time ``repeats`` updates of one shape in this process; returns seconds and memory."""
    import tempfile

    import torch

    from gigpo_rllib.losses import gigpo_policy_loss
    from gigpo_rllib.logprobs import forward_token_logprobs
    from gigpo_rllib.models import (OFFLINE_MODELS, TINY_MODEL_NAME, build_offline_model, load_model_and_tokenizer,
                                    prepare_for_training)

    torch.set_num_threads(threads)
    vocab, rows, prompt_tokens, reply_tokens = SHAPES[shape]
    spec = OFFLINE_MODELS[TINY_MODEL_NAME]
    if vocab is not None:
        from dataclasses import replace

        spec = replace(spec, vocab_size=vocab)
    with tempfile.TemporaryDirectory() as directory:
        model, _ = load_model_and_tokenizer(str(build_offline_model(Path(directory) / "model", spec)))
    model = prepare_for_training(model, gradient_checkpointing=False)  # as the learner's module prepares its own
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(prompt_tokens // 2, prompt_tokens + 1, (rows,), generator=generator)
    width = prompt_tokens + reply_tokens
    ids = torch.randint(3, 1000, (rows, width), generator=generator)
    attention = torch.zeros(rows, width, dtype=torch.long)
    response = torch.zeros(rows, width, dtype=torch.bool)
    for row, length in enumerate(lengths.tolist()):
        attention[row, :length + reply_tokens] = 1
        response[row, length:length + reply_tokens] = True
    advantages = torch.randn(rows, generator=generator)
    with torch.no_grad():
        old, _ = forward_token_logprobs(model, ids, attention, response)
    loaded = _peak_rss_mib()

    def update() -> float:
        started = time.perf_counter()
        logprobs, entropy = forward_token_logprobs(model, ids, attention, response, response_only=response_only)
        loss, _ = gigpo_policy_loss(logprobs, old, advantages, response, pg_clip=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    update()  # warm-up: allocator, kernels
    seconds = statistics.median(update() for _ in range(repeats))
    return {"seconds": seconds, "peak_mib": _peak_rss_mib() - loaded}


def padding_fractions(rows: int = 512, minibatch: int = 64, reply_tokens: int = 8, seed: int = 0
                      ) -> tuple[float, float, float]:
    """Padding of shuffled minibatches: as wide as the batch's widest row, trimmed to their own widest row, and
    trimmed after ``length_bucketing``."""
    import torch

    from benchmarks.bench_rollout import frozenlake_prompts
    from gigpo_rllib.preparation import bucket_by_length
    from gigpo_rllib.models import load_tokenizer

    lengths = torch.tensor([len(prompt) + reply_tokens for prompt in frozenlake_prompts(load_tokenizer("gigpo-tiny"),
                                                                                         rows, seed=seed)])
    lengths = lengths[torch.randperm(rows, generator=torch.Generator().manual_seed(seed))]
    real = float(lengths.sum())

    def trimmed(order: torch.Tensor) -> float:
        return 1 - real / sum(len(chunk) * int(chunk.max()) for chunk in lengths[order].split(minibatch))

    return 1 - real / (rows * int(lengths.max())), trimmed(torch.arange(rows)), trimmed(bucket_by_length(lengths,
                                                                                                         minibatch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed updates per figure (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        shape, mode = args.worker
        print(json.dumps(run_one(shape, MODES[mode], args.repeats, args.threads)))
        return

    print(f"one update (forward, loss, backward, Adam), {args.threads} torch thread(s), median of {args.repeats}; "
          "memory: peak RSS above the loaded model\n")
    print(f"{'shape':<10} | {'rows x tokens':>13} | {'vocab':>7} | {'before s':>8} | {'after s':>7} | {'speed-up':>8} | "
          f"{'before MiB':>10} | {'after MiB':>9}")
    print("-" * 92)
    for shape, (vocab, rows, prompt_tokens, reply_tokens) in SHAPES.items():
        results = {}
        for mode in MODES:
            command = [sys.executable, __file__, "--worker", shape, mode, "--repeats", str(args.repeats),
                       "--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(output.strip().splitlines()[-1])
        before, after = results["before"], results["after"]
        print(f"{shape:<10} | {f'{rows} x {prompt_tokens + reply_tokens}':>13} | {vocab or '~1.2k':>7} | "
              f"{before['seconds']:>8.3f} | {after['seconds']:>7.3f} | {before['seconds'] / after['seconds']:>7.1f}x | "
              f"{before['peak_mib']:>10,.0f} | {after['peak_mib']:>9,.0f}", flush=True)
    batch_wide, trimmed, bucketed = padding_fractions()
    print("\npadding of 512 FrozenLake rows (0-3 history turns) in shuffled minibatches of 64:")
    print(f"  every row as wide as the batch's widest        {batch_wide:6.1%}")
    print(f"  each minibatch cut to its widest row           {trimmed:6.1%}")
    print(f"  cut, after length_bucketing                    {bucketed:6.1%}")


if __name__ == "__main__":
    main()
