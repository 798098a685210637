"""A prepared GPU check that needs only torch and transformers (no Ray, no vLLM, no downloads).

1. **Advantages**: ``compute_gigpo_advantages`` on the GPU equals the CPU result on a shuffled batch of 1,024
   trajectories of up to 50 steps, for every normalisation method and grouping (max |difference|).
2. **Learner update** of models of Qwen2.5-0.5B's and 1.5B's shapes with random weights, built in memory and
   prepared for training as the learner's module prepares its own (``prepare_for_training``): float32 master
   weights and AdamW state, forward passes under bfloat16 autocast, the clipped-PPO loss on response positions
   only. Median time and peak GPU memory per update, with and without gradient checkpointing, and the
   full-vocabulary forward for comparison (the README's memory table); and decoder-layer calls per update, twice
   the layer count when checkpointing recomputes.
3. **LoRA update** of the first model (peft adapters of rank 16 on every linear layer, as ``lora`` trains them):
   time and peak memory per update, trainable parameters, and whether the merged weights the samplers get
   (``merged_state_dict``) reproduce the adapted model's log-probs after the adapters have moved (float32).
4. **Log-prob agreement** between what a sampler records (bfloat16 weights, left-padded rows, eval mode) and what
   the learner computes (float32 master weights under bfloat16 autocast, right-padded rows): mean and max
   |difference| over response tokens; and the same pair in float32, which should agree to ~1e-6 (TF32 off).
5. **Sharded learner** (``learner_sharding: fsdp``) of the first model, on a machine with 2 or more GPUs: two
   processes (NCCL) shard it as the learners do (:func:`~gigpo_rllib.sharding.shard_model`) and take one float32
   clipped-PPO update with AdamW, each on half of the rows; the weights after it, gathered, are compared with one
   GPU's update on all the rows (max |difference| beside the largest weight change), with each rank's peak GPU
   memory and bytes of parameters, gradients and AdamW state against the single GPU's. With fewer GPUs it is
   skipped, saying why; ``--device cpu`` runs it on two CPU processes (gloo).

    python3 benchmarks/gpu_check.py [--out gpu_check.json] [--models gigpo-0.5b gigpo-1.5b] [--rows 16]
                                    [--prompt 768] [--response 256] [--repeats 3]
    python3 benchmarks/gpu_check.py --device cpu --models gigpo-tiny --rows 4 --prompt 48 --response 8  # smoke

Prints one line per check and writes every number to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.local_ranks import local_bytes, run_ranks  # noqa: E402
from gigpo_rllib.advantages import EPISODE_GROUPINGS, NORMALIZATION_METHODS, compute_gigpo_advantages  # noqa: E402
from gigpo_rllib.logprobs import forward_token_logprobs  # noqa: E402
from gigpo_rllib.lora import add_lora_adapters, merged_state_dict  # noqa: E402
from gigpo_rllib.losses import gigpo_policy_loss  # noqa: E402
from gigpo_rllib.models import (_without_dropout, build_tokenizer, offline_model_config,  # noqa: E402
                                prepare_for_training)
from gigpo_rllib.sharding import call_as_forward, full_tensor, shard_model  # noqa: E402


def advantage_batch(trajectories: int = 1024, max_steps: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    """A shuffled batch of ``trajectories`` (groups of 8) of 1..``max_steps`` steps with recurring anchors."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_steps + 1, (trajectories,), generator=g)
    traj = torch.repeat_interleave(torch.arange(trajectories), lengths)
    steps = torch.cat([torch.arange(int(n)) for n in lengths])
    groups = traj // 8
    anchors = groups * 1000 + torch.randint(0, 12, traj.shape, generator=g)  # ~12 states per group: they recur
    order = torch.randperm(traj.numel(), generator=g)
    return {"rewards": torch.randn(traj.numel(), generator=g)[order], "traj_ids": traj[order],
            "step_ids": steps[order], "group_ids": groups[order], "anchor_ids": anchors[order],
            "tag_ids": (groups % 3)[order]}


def check_advantages(device: torch.device) -> dict[str, float]:
    batch = advantage_batch()
    worst = 0.0
    for method in NORMALIZATION_METHODS:
        for grouping in EPISODE_GROUPINGS:
            results = []
            for where in ("cpu", device):
                inputs = {name: value.to(where) for name, value in batch.items()}
                out = compute_gigpo_advantages(inputs["rewards"], inputs["traj_ids"], inputs["step_ids"],
                                               inputs["group_ids"], inputs["anchor_ids"], method=method,
                                               grouping=grouping, tag_ids=inputs["tag_ids"])
                results.append(out.advantages.cpu())
            worst = max(worst, float((results[0] - results[1]).abs().max()))
    return {"samples": int(batch["rewards"].numel()), "max_abs_difference": worst}


def make_model(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2ForCausalLM

    config = _without_dropout(offline_model_config(name, build_tokenizer()))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    return model


def token_batch(rows: int, prompt: int, response: int, vocab: int, device: torch.device, right_padded: bool,
                seed: int = 0):
    """Rows of [prompt, response] of varying prompt length, padded right (learner) or left (sampler)."""
    g = torch.Generator().manual_seed(seed)
    width = prompt + response
    ids = torch.randint(3, vocab, (rows, width), generator=g)
    lengths = torch.randint(prompt // 2, prompt + 1, (rows,), generator=g) + response
    attention = torch.zeros(rows, width, dtype=torch.long)
    responses = torch.zeros(rows, width, dtype=torch.bool)
    for row, length in enumerate(lengths.tolist()):
        start = 0 if right_padded else width - length
        attention[row, start:start + length] = 1
        responses[row, start + length - response:start + length] = True
    return ids.to(device), attention.to(device), responses.to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_update(model, optimizer, batch, device: torch.device, response_only: bool) -> float:
    """Seconds of one clipped-PPO update of ``model`` on ``batch`` (ids, attention, responses, old log-probs,
    advantages) under bfloat16 autocast."""
    ids, attention, responses, old, advantages = batch
    synchronize(device)
    started = time.perf_counter()
    logprobs, _ = forward_token_logprobs(model, ids, attention, responses, autocast_dtype=torch.bfloat16,
                                         response_only=response_only)
    loss, _ = gigpo_policy_loss(logprobs, old, advantages, responses, pg_clip=0.2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    synchronize(device)
    return time.perf_counter() - started


def update_batch(model, device: torch.device, rows: int, prompt: int, response: int):
    ids, attention, responses = token_batch(rows, prompt, response, model.config.vocab_size, device, True)
    with torch.no_grad():
        old, _ = forward_token_logprobs(model, ids, attention, responses, autocast_dtype=torch.bfloat16)
    return ids, attention, responses, old, torch.randn(rows, device=device)


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def check_update(name: str, device: torch.device, rows: int, prompt: int, response: int, repeats: int
                 ) -> dict[str, dict[str, float]]:
    """Median seconds, peak memory and decoder-layer calls of one bfloat16-autocast update, three ways."""
    results = {}
    for label, checkpointing, response_only in (("response logits", False, True),
                                                ("response logits + checkpointing", True, True),
                                                ("full-vocabulary logits", False, False)):
        release(device)
        try:
            model = prepare_for_training(make_model(name, device, torch.float32),
                                         gradient_checkpointing=checkpointing)
            # Pre-hooks count recomputed layers too (a checkpointed recompute stops before forward hooks would run).
            layer_calls = []
            for layer in model.model.layers:
                layer.register_forward_pre_hook(lambda *args: layer_calls.append(1))
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
            batch = update_batch(model, device, rows, prompt, response)
            layer_calls.clear()
            timed_update(model, optimizer, batch, device, response_only)  # warm-up: kernels, allocator, AdamW state
            calls = len(layer_calls)
            seconds = statistics.median(timed_update(model, optimizer, batch, device, response_only)
                                        for _ in range(repeats))
            results[label] = {"seconds": seconds, "peak_gib": peak_gib(device), "decoder_layer_calls": calls,
                              "decoder_layers": len(model.model.layers)}
        except torch.OutOfMemoryError:
            results[label] = {"seconds": float("nan"), "peak_gib": float("inf")}
        model = optimizer = batch = None
    release(device)
    return results


def check_lora(name: str, device: torch.device, rows: int, prompt: int, response: int, repeats: int
               ) -> dict[str, float]:
    """Median seconds and peak memory of a LoRA update (rank 16, every linear layer); then, with the adapters
    moved, max |log-prob difference| between the adapted model and a plain model holding the merged weights."""
    release(device)
    model = add_lora_adapters(prepare_for_training(make_model(name, device, torch.float32),
                                                   gradient_checkpointing=False), {"r": 16, "alpha": 32})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)  # large enough that B A is far from 0 after a few steps
    batch = update_batch(model, device, rows, prompt, response)
    timed_update(model, optimizer, batch, device, True)
    seconds = statistics.median(timed_update(model, optimizer, batch, device, True) for _ in range(repeats))
    result = {"seconds": seconds, "peak_gib": peak_gib(device),
              "trainable_parameters": sum(p.numel() for p in trainable),
              "parameters": sum(p.numel() for p in model.parameters())}
    ids, attention, responses = batch[:3]
    plain = make_model(name, device, torch.float32).eval()
    model.eval()
    with torch.no_grad():
        adapted, _ = forward_token_logprobs(model, ids, attention, responses)
        base, _ = forward_token_logprobs(plain, ids, attention, responses)
        plain.load_state_dict(merged_state_dict(model))
        merged, _ = forward_token_logprobs(plain, ids, attention, responses)
    # How far the adapters moved the policy, beside how far the merged weights are from the adapted model.
    result["adapters_max_abs_change"] = float((adapted - base)[responses].abs().max())
    result["merged_max_abs_difference"] = float((adapted - merged)[responses].abs().max())
    del model, plain, optimizer, batch
    release(device)
    return result


def logprob_gap(name: str, device: torch.device, rows: int, prompt: int, response: int, compute: torch.dtype
                ) -> dict[str, float]:
    """Sampler (weights in ``compute``, left padding, eval) vs learner (float32 weights under autocast, right
    padding) on the same rows."""
    learner_model = prepare_for_training(make_model(name, device, torch.float32), gradient_checkpointing=False)
    sampler_model = make_model(name, device, torch.float32).to(compute).eval()
    sampler_model.load_state_dict(learner_model.state_dict())
    right = token_batch(rows, prompt, response, learner_model.config.vocab_size, device, True)
    left = token_batch(rows, prompt, response, learner_model.config.vocab_size, device, False)
    # The same tokens in both layouts: copy each right-padded row's real tokens into the left-padded layout.
    ids_left = left[0].clone()
    for row in range(rows):
        length = int(right[1][row].sum())
        ids_left[row, -length:] = right[0][row, :length]
    with torch.no_grad():
        learner, _ = forward_token_logprobs(learner_model, *right, autocast_dtype=compute)
        sampler, _ = forward_token_logprobs(sampler_model, ids_left, left[1], left[2])
    learner_values, sampler_values = learner[right[2]], sampler[left[2]]
    difference = (learner_values - sampler_values).abs()
    return {"mean_abs": float(difference.mean()), "max_abs": float(difference.max())}


SHARDED_RANKS = 2


def check_sharded_update(name: str, device: torch.device, rows: int, prompt: int, response: int) -> dict:
    """One update of ``name`` sharded over two processes (FSDP2, as ``learner_sharding: fsdp``) against one device's
    update of the same rows: see the module docstring (5)."""
    if device.type == "cuda" and torch.cuda.device_count() < SHARDED_RANKS:
        return {"skipped": f"needs {SHARDED_RANKS} GPUs, this machine has {torch.cuda.device_count()}"}
    if rows % SHARDED_RANKS:
        raise ValueError(f"the sharded update splits --rows over {SHARDED_RANKS} ranks: got {rows} rows")
    release(device)  # this process's cached blocks on the first GPU would be missing from rank 0's
    ranks = run_ranks(sharded_update_rank, SHARDED_RANKS, name, device.type, rows, prompt, response,
                      backend="nccl" if device.type == "cuda" else "gloo")
    return {**ranks[0].pop("single"), "ranks": ranks}


def sharded_update_rank(rank: int, world: int, name: str, device_type: str, rows: int, prompt: int, response: int
                        ) -> dict:
    """One rank of :func:`check_sharded_update`: rank 0 first takes the single-device update (the reference), then
    every rank its sharded one; the weights are gathered one tensor at a time and compared on rank 0."""
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 on both sides: they differ by reduction order only
    batch = sharded_check_batch(name, device, rows, prompt, response)
    single = None
    if rank == 0:
        release(device)
        model = prepare_for_training(make_model(name, device, torch.float32), gradient_checkpointing=False)
        initial = {key: value.detach().cpu().clone() for key, value in model.named_parameters()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        one_update(model, optimizer, batch)
        single = {"peak_gib": peak_gib(device), "held_gib": held_gib(model, optimizer)}
        updated = {key: value.detach().cpu() for key, value in model.named_parameters()}
        del model, optimizer
    release(device)
    model = prepare_for_training(make_model(name, device, torch.float32), gradient_checkpointing=False)
    shard_model(model, compute_dtype=torch.float32, cpu_offload=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    half = rows // world
    one_update(model, optimizer, tuple(column[rank * half:(rank + 1) * half] for column in batch))
    result = {"peak_gib": peak_gib(device), "held_gib": held_gib(model, optimizer)}
    difference = change = 0.0
    for key, parameter in model.named_parameters():
        whole = full_tensor(parameter.detach()).cpu()  # a collective: every rank gathers, rank 0 compares
        if rank == 0:
            difference = max(difference, float((whole - updated[key]).abs().max()))
            change = max(change, float((updated[key] - initial[key]).abs().max()))
    if rank == 0:
        result["single"] = {**{f"single_{key}": value for key, value in single.items()},
                            "max_abs_difference": difference, "max_abs_change": change}
    return result


def sharded_check_batch(name: str, device: torch.device, rows: int, prompt: int, response: int):
    """Right-padded rows with ``response`` tokens each (so each rank's token mean is a mean over as many tokens, and
    their average the whole batch's) and one advantage per row."""
    vocab = offline_model_config(name, build_tokenizer()).vocab_size
    ids, attention, responses = token_batch(rows, prompt, response, vocab, device, True)
    advantages = torch.randn(rows, generator=torch.Generator().manual_seed(1)).to(device)
    return ids, attention, responses, advantages


def one_update(model, optimizer, batch) -> None:
    """One float32 clipped-PPO step on ``batch`` from the current weights (old log-probs = current: ratio 1), with
    the global gradient norm clipped to 1 (over every shard when sharded)."""
    ids, attention, responses, advantages = batch
    logprobs, _ = call_as_forward(model, lambda *rows: forward_token_logprobs(model, *rows), ids, attention, responses)
    loss, _ = gigpo_policy_loss(logprobs, logprobs.detach(), advantages, responses, pg_clip=0.2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    optimizer.step()


def held_gib(model, optimizer) -> float:
    """GiB of this rank's parameters, gradients and optimizer state (its own shards when sharded)."""
    parameters = list(model.parameters())
    state = [value for values in optimizer.state.values() for value in values.values()
             if isinstance(value, torch.Tensor) and value.dim() > 0]
    return local_bytes([*parameters, *(p.grad for p in parameters if p.grad is not None), *state]) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=["gigpo-0.5b", "gigpo-1.5b"],
                        help="offline shapes of gigpo_rllib.models.OFFLINE_MODELS; the update check runs for each, "
                             "the LoRA and log-prob checks for the first")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=768, help="longest prompt, tokens")
    parser.add_argument("--response", type=int, default=256, help="response tokens per row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --device cpu for a smoke test")
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 agreement below must not be TF32's
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "models": args.models, "rows": args.rows, "prompt": args.prompt, "response": args.response}
    print(f"torch {report['torch']} on {report['device']}; models {', '.join(args.models)}; {args.rows} rows of up to "
          f"{args.prompt} + {args.response} tokens", flush=True)

    report["advantages"] = check_advantages(device)
    print(f"advantages: {device.type} vs cpu max |difference| {report['advantages']['max_abs_difference']:.2e} over "
          f"{report['advantages']['samples']} samples", flush=True)
    report["update"] = {}
    for name in args.models:
        report["update"][name] = check_update(name, device, args.rows, args.prompt, args.response, args.repeats)
        for label, values in report["update"][name].items():
            calls = (f", {values['decoder_layer_calls']} decoder-layer calls for {values['decoder_layers']} layers"
                     if "decoder_layer_calls" in values else "")
            print(f"update {name} ({label}): {values['seconds']:.3f} s, peak {values['peak_gib']:.2f} GiB{calls}",
                  flush=True)
    first = args.models[0]
    report["lora"] = check_lora(first, device, args.rows, args.prompt, args.response, args.repeats)
    lora = report["lora"]
    print(f"lora update {first} (r 16, all linear): {lora['seconds']:.3f} s, peak {lora['peak_gib']:.2f} GiB, "
          f"{lora['trainable_parameters']:,} of {lora['parameters']:,} parameters train; adapters moved log-probs by up "
          f"to {lora['adapters_max_abs_change']:.2e}, merged weights differ from them by up to "
          f"{lora['merged_max_abs_difference']:.2e}", flush=True)
    report["logprob_gap"] = {dtype: logprob_gap(first, device, args.rows, args.prompt, args.response,
                                                getattr(torch, dtype))
                             for dtype in ("bfloat16", "float32")}
    for dtype, values in report["logprob_gap"].items():
        print(f"sampler vs learner log-probs ({dtype}): mean |difference| {values['mean_abs']:.2e}, max "
              f"{values['max_abs']:.2e}", flush=True)
    report["sharded_update"] = check_sharded_update(first, device, args.rows, args.prompt, args.response)
    sharded = report["sharded_update"]
    if "skipped" in sharded:
        print(f"sharded update {first}: skipped ({sharded['skipped']})", flush=True)
    else:
        per_rank = ", ".join(f"rank {rank} peak {values['peak_gib']:.2f} GiB, holds {values['held_gib']:.3f} GiB"
                             for rank, values in enumerate(sharded["ranks"]))
        print(f"sharded update {first} (FSDP, {len(sharded['ranks'])} ranks, float32): {per_rank}; one device: peak "
              f"{sharded['single_peak_gib']:.2f} GiB, holds {sharded['single_held_gib']:.3f} GiB; weights after "
              f"the update differ from one device's by up to {sharded['max_abs_difference']:.2e} (the update moved "
              f"them by up to {sharded['max_abs_change']:.2e})", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
