"""Text samplers: one interface (:class:`Sampler`), two backends: Hugging Face ``generate`` ("hf") and an
in-process vLLM engine ("vllm")."""

from __future__ import annotations

from gigpo_rllib.sampling.base import Completion, Sampler, SamplingParams

SAMPLER_BACKENDS = ("hf", "vllm", "auto")

__all__ = ["Completion", "Sampler", "SamplingParams", "SAMPLER_BACKENDS", "make_sampler", "resolve_backend"]


def resolve_backend(backend: str, device: str = "cpu") -> str:
    """Map a ``sampler_backend`` value to "hf" or "vllm". "auto" picks vLLM when it is importable and the
    sampler runs on a GPU (where it is many times faster than ``generate``), else HF."""
    from gigpo_rllib.sampling.vllm import vllm_available

    if backend not in SAMPLER_BACKENDS:
        raise ValueError(f"sampler_backend must be one of {list(SAMPLER_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "vllm" if device.startswith("cuda") and vllm_available() else "hf"
    return backend


def make_sampler(backend: str, model_name_or_path: str, *, device: str = "cpu", dtype: str = "float32",
                 max_model_len: int | None = None, seed: int = 0, engine_kwargs: dict | None = None,
                 lora_rank: int | None = None) -> Sampler:
    """Build the sampler of ``backend`` ("hf", "vllm" or "auto") on ``device`` with weights in ``dtype``.
    ``max_model_len``, ``seed``, ``engine_kwargs`` (``vllm.LLM`` arguments) and ``lora_rank`` (serve LoRA adapters
    of up to this rank: ``VLLMSampler.load_adapter``) apply to the vLLM engine only."""
    if resolve_backend(backend, device) == "hf":
        from gigpo_rllib.sampling.hf import HFSampler

        if lora_rank is not None:
            raise ValueError(f"lora_rank={lora_rank} needs the vLLM sampler (LoRA requests); the HF sampler loads "
                             "merged weights only")

        return HFSampler(model_name_or_path, device=device, dtype=dtype)
    from gigpo_rllib.sampling.vllm import VLLMSampler

    return VLLMSampler(model_name_or_path, device=device, dtype=dtype, max_model_len=max_model_len, seed=seed,
                       engine_kwargs=engine_kwargs, lora_rank=lora_rank)
