"""Weight sync from the learner to a sampler in another process: RLlib's generic path ("before") vs the packed one
("after", :mod:`gigpo_rllib.weight_sync`).

* before: the module's state as float32 numpy arrays, one per tensor, tied embeddings twice (what
  ``env_runner_group.sync_weights`` ships), put into Ray's object store, fetched by the runner and copied tensor by
  tensor into its sampler with a cast to the sampler's dtype.
* after: each distinct tensor once, in the sampler's dtype, in one buffer; one object; the runner copies views of
  it in place.

One remote actor holds an HF sampler, as an env runner does. Each figure is the median of ``--repeats`` syncs,
timed from the driver: pack + put + the runner's fetch and copy. Models: ``gigpo-tiny`` and ``gigpo-0.5b``
(Qwen2.5-0.5B's shape with random weights, built offline and cached on first use: ~2 GB, a minute or two).

    python3 benchmarks/bench_sync.py [--repeats 5] [--models gigpo-tiny gigpo-0.5b] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_runner_class():
    import ray

    @ray.remote(num_cpus=1)
    class SamplerHolder:
        """Stands in for an env runner: an HF sampler that receives weights."""

        def __init__(self, model: str, dtype: str):
            import torch

            torch.set_num_threads(1)
            from gigpo_rllib.sampling.hf import HFSampler

            self.sampler = HFSampler(model, dtype=dtype)

        def load_state(self, state: dict) -> None:
            from gigpo_rllib.rl_module import to_sampler_state_dict

            self.sampler.load_weights(to_sampler_state_dict(state))

        def load_packed(self, packed) -> None:
            from gigpo_rllib.weight_sync import unpack_weights

            self.sampler.load_weights(unpack_weights(packed))

    return SamplerHolder


def measure(model: str, dtype: str, repeats: int) -> dict[str, dict[str, float]]:
    import ray
    import torch

    from gigpo_rllib.rl_module import LLMRLModule, state_dict_to_numpy
    from gigpo_rllib.weight_sync import pack_weights

    learner = LLMRLModule(observation_space=None, action_space=None, model_config={"model": model})
    runner = make_runner_class().remote(model, dtype)
    ray.get(runner.__ray_ready__.remote())

    def before() -> int:
        state = state_dict_to_numpy(learner.state_dict())
        ray.get(runner.load_state.remote(ray.put(state)))
        return sum(array.nbytes for array in state.values()), len(state)

    def after() -> int:
        with torch.no_grad():
            packed = pack_weights(learner.model.state_dict(), dtype)
        ray.get(runner.load_packed.remote(ray.put(packed)))
        return packed.nbytes, len(packed.entries)

    results = {}
    for name, sync in (("before", before), ("after", after)):
        sync()  # warm-up
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            nbytes, tensors = sync()
            seconds.append(time.perf_counter() - started)
        results[name] = {"seconds": statistics.median(seconds), "bytes": nbytes, "tensors": tensors}
    ray.kill(runner)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["gigpo-tiny", "gigpo-0.5b"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="sampler weight dtypes")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray
    import torch

    torch.set_num_threads(1)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    print(f"one sync, learner (driver) -> one sampler actor, median of {args.repeats}; 1 torch thread\n")
    print(f"{'model':<11} | {'sampler':>8} | {'before MB':>9} | {'after MB':>8} | {'tensors':>13} | {'before s':>8} | "
          f"{'after s':>7} | {'speed-up':>8}")
    print("-" * 93)
    try:
        for model in args.models:
            for dtype in args.dtypes:
                result = measure(model, dtype, args.repeats)
                before, after = result["before"], result["after"]
                print(f"{model:<11} | {dtype:>8} | {before['bytes'] / 1e6:>9,.1f} | {after['bytes'] / 1e6:>8,.1f} | "
                      f"{before['tensors']:>5} -> {after['tensors']:>4} | {before['seconds']:>8.3f} | "
                      f"{after['seconds']:>7.3f} | {before['seconds'] / after['seconds']:>7.1f}x", flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
