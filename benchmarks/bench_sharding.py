"""Per-learner memory and update time of DDP vs FSDP learners (``learner_sharding``), on CPU with gloo.

For 1 learner and for 2 learners of each kind, every learner process loads the model (``gigpo-0.5b`` shapes by
default: Qwen2.5-0.5B's), wraps it as the learner does (DDP, or :func:`gigpo_rllib.sharding.shard_model`), and
runs ``--steps`` updates of ``--rows`` rows of ``--tokens`` tokens: the learner's scoring
(:func:`forward_token_logprobs` under the root's hooks), a policy-gradient loss, backward and a fused Adam step.
The table gives rank 0's bytes of parameters, gradients and Adam state (its own shard when sharded) and the median
update time after the first (warm-up) update.

    python3 benchmarks/bench_sharding.py [--model gigpo-0.5b] [--rows 2] [--tokens 64] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.local_ranks import local_bytes, run_ranks  # noqa: E402


def _learner(rank: int, world: int, sharding: str, args) -> dict | None:
    """Rank 0's bytes and median update time (other ranks return None)."""
    import torch

    from gigpo_rllib.logprobs import forward_token_logprobs
    from gigpo_rllib.models import load_model_and_tokenizer
    from gigpo_rllib.sharding import call_as_forward, shard_model

    model, _ = load_model_and_tokenizer(args.model, dtype="float32", device="cpu")
    model.train()
    if world > 1 and sharding == "fsdp":
        shard_model(model, compute_dtype=torch.float32, cpu_offload=False)
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    scored = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-6, fused=True)
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, scored.config.vocab_size, (args.rows, args.tokens), generator=generator)
    mask = torch.ones_like(ids)
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, args.tokens // 2:] = True
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            logprobs, _ = _ddp_score(model, forward_token_logprobs, ids, mask, response)
        else:
            logprobs, _ = call_as_forward(model, lambda *a: forward_token_logprobs(scored, *a), ids, mask, response)
        (-(logprobs * response).sum() / response.sum()).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    if rank != 0:
        return None
    return {"parameters": local_bytes(params), "gradients": local_bytes(p.grad for p in params),
            "optimizer": local_bytes(state), "update_s": statistics.median(times[1:])}


def _ddp_score(model, score, ids, mask, response):
    """Scoring through DDP's forward, so that its gradient hooks are armed (DDP wraps ``forward`` only)."""
    inner = model.module
    original = inner.forward
    inner.forward = lambda *a, **k: score(inner, ids, mask, response)
    try:
        return model()
    finally:
        inner.forward = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gigpo-0.5b")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for learners, sharding in [(1, "ddp"), (2, "ddp"), (2, "fsdp")]:
        result = run_ranks(_learner, learners, sharding, args)[0]
        rows.append((learners, sharding if learners > 1 else "-", result))
    gib = 1 << 30
    print(f"model {args.model}, {args.rows} rows x {args.tokens} tokens, median of {args.steps} updates, rank 0:")
    print("| learners | sharding | parameters GiB | gradients GiB | Adam state GiB | total GiB | vs 1 learner | update s |")
    print("|---|---|---|---|---|---|---|---|")
    single = sum(rows[0][2][k] for k in ("parameters", "gradients", "optimizer"))
    for learners, sharding, r in rows:
        total = r["parameters"] + r["gradients"] + r["optimizer"]
        print(f"| {learners} | {sharding} | {r['parameters'] / gib:.2f} | {r['gradients'] / gib:.2f} | "
              f"{r['optimizer'] / gib:.2f} | {total / gib:.2f} | {total / single:.2f} | {r['update_s']:.2f} |")


if __name__ == "__main__":
    main()
