"""The sampler interface: batched text generation with recorded token log-probs."""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch


@dataclass
class SamplingParams:
    """How to sample one reply per prompt.

    Attributes:
        temperature: > 0; logits are divided by it (the recorded log-probs use the same temperature).
        top_p: nucleus mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; -1 (or 0) disables it.
        max_new_tokens: >= 1, the most tokens generated per reply (reply ends with finish_reason "length").
        greedy: decode greedily instead (temperature 0: always the most likely token, under the constraint when
            one is given); temperature, top_p and top_k are then ignored. For evaluation, not training.

    The recorded log-probs are those of ``softmax(logits / temperature)`` (restricted to the allowed replies
    when a constraint is given), *not* of the top-p/top-k truncated distribution: that is what the learner
    recomputes, so importance ratios start at exactly 1. Greedy replies record those of ``softmax(logits)``
    (temperature 1, under the constraint): well-defined, but nothing trains on them.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    greedy: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not (
            self.temperature > 0 and math.isfinite(self.temperature)
        ):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= 1, or -1/0 to disable it, got {self.top_k!r}")
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.greedy, bool):
            raise ValueError(f"greedy must be True or False, got {self.greedy!r}")

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the recorded log-probs (1 for greedy replies, see the class docstring)."""
        return 1.0 if self.greedy else float(self.temperature)


@dataclass
class Completion:
    """One generated reply.

    Attributes:
        token_ids: the reply's tokens, no padding; ends with the EOS token iff finish_reason == "stop".
        logprobs: one float per token of ``token_ids``: log p(token | prompt, earlier reply tokens) at the
            sampler's weights, temperature and constraint (computed by ``gigpo_rllib.logprobs``).
        finish_reason: "stop" (EOS generated) or "length" (max_new_tokens reached).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    extra: dict = field(default_factory=dict, repr=False)


class Sampler(abc.ABC):
    """Generates replies for a batch of tokenised prompts and records their log-probs."""

    @abc.abstractmethod
    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        allowed_responses: list[list[list[int]]] | None = None,
        seed: int | None = None,
    ) -> list[Completion]:
        """Sample one reply per prompt, all prompts in one batch.

        Args:
            prompt_ids: N prompts, each a non-empty list of token ids (chat template already applied).
            params: sampling settings.
            allowed_responses: optional, N lists of allowed complete replies (token-id lists, each ending
                with an EOS token); an empty list leaves that prompt unconstrained.
            seed: makes the draw reproducible when given.

        Returns:
            N :class:`Completion` objects in prompt order.
        """

    @abc.abstractmethod
    def load_weights(self, state_dict: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Update the weights in place (no re-spawn, no disk). Keys are the HF model's parameter names
        (``model.embed_tokens.weight``, ``lm_head.weight``...); see ``LLMRLModule.sampler_state_dict``."""

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        """The sampler's current weights under the HF model's names (for checks that a sync arrived)."""
        raise NotImplementedError(f"{type(self).__name__} cannot export its weights")

    def close(self) -> None:
        """Release resources. Idempotent."""


def check_prompts(prompt_ids: list[list[int]], allowed_responses: list[list[list[int]]] | None) -> None:
    """Validate ``generate`` inputs; raises ValueError naming the argument."""
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise ValueError(f"prompt_ids must be a non-empty list of token-id lists, got {type(prompt_ids).__name__}")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt_ids[{i}] is empty; every prompt needs at least one token")
    if allowed_responses is not None:
        if len(allowed_responses) != len(prompt_ids):
            raise ValueError(
                f"allowed_responses must have one entry per prompt ({len(prompt_ids)}), got {len(allowed_responses)}"
            )
        for i, replies in enumerate(allowed_responses):
            for r in replies:
                if len(r) == 0:
                    raise ValueError(f"allowed_responses[{i}] contains an empty reply")


def check_replies_end_with_eos(allowed_responses: list[list[list[int]]], eos_token_ids: list[int]) -> None:
    """Every allowed reply must end with an EOS token, or a constrained reply could never finish."""
    for i, replies in enumerate(allowed_responses):
        for reply in replies:
            if reply[-1] not in eos_token_ids:
                raise ValueError(f"allowed_responses[{i}] has a reply not ending with an EOS token {eos_token_ids}: "
                                 f"{list(reply)[-5:]}")
