"""vLLM backend: the seam only. The implementation arrives in a later issue."""

from __future__ import annotations

_MESSAGE = "vLLM backend arrives in a later issue; use sampler_backend='hf'"


class VLLMSampler:
    """Placeholder for the vLLM sampler; constructing it raises ``NotImplementedError``."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(_MESSAGE)
