"""Text samplers: one interface (:class:`Sampler`), two backends ("hf" now, "vllm" later)."""

from __future__ import annotations

from gigpo_rllib.sampling.base import Completion, Sampler, SamplingParams

SAMPLER_BACKENDS = ("hf", "vllm", "auto")

__all__ = ["Completion", "Sampler", "SamplingParams", "SAMPLER_BACKENDS", "make_sampler", "resolve_backend"]


def resolve_backend(backend: str) -> str:
    """Map a ``sampler_backend`` value to "hf" or "vllm". "auto" is the best implemented backend for the
    machine; until the vLLM backend lands that is always "hf", so "auto" never picks a backend that fails."""
    if backend not in SAMPLER_BACKENDS:
        raise ValueError(f"sampler_backend must be one of {list(SAMPLER_BACKENDS)}, got {backend!r}")
    return "hf" if backend == "auto" else backend


def make_sampler(backend: str, model_name_or_path: str, **kw) -> Sampler:
    """Build a sampler. ``backend`` in {"hf", "vllm", "auto"}; ``kw`` go to the backend (device, dtype)."""
    resolved = resolve_backend(backend)
    if resolved == "hf":
        from gigpo_rllib.sampling.hf import HFSampler

        return HFSampler(model_name_or_path, **kw)
    from gigpo_rllib.sampling.vllm import VLLMSampler

    return VLLMSampler(model_name_or_path, **kw)
