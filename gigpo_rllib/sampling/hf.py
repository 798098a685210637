"""Hugging Face ``generate`` backend (CPU or a single GPU)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch

from gigpo_rllib.action_trie import ReplyTrie, pad_allowed_responses, restrict_logits
from gigpo_rllib.logprobs import forward_token_logprobs
from gigpo_rllib.models import load_model_and_tokenizer
from gigpo_rllib.sampling.base import (Completion, Sampler, SamplingParams, check_prompts,
                                       check_replies_end_with_eos)


def _to_tensor(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    with warnings.catch_warnings():  # arrays from Ray's object store are read-only; we only read them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(value))


class _AllowedRepliesProcessor:
    """Logits processor: at each step keep only the trie continuations of the allowed replies
    (:mod:`gigpo_rllib.action_trie`), for all rows at once.

    Rows that are unconstrained, or have no continuation left (they already emitted EOS and are being
    padded by ``generate``), are left untouched. ``generate`` calls it once per step, in order: it follows each
    row's trie with the tokens generated since its last call.
    """

    def __init__(self, allowed: torch.Tensor, prompt_len: int):
        self.trie = ReplyTrie.build(allowed)  # allowed: (B, K, L)
        self.nodes = self.trie.roots
        self.position = prompt_len  # the first input column the trie has not followed yet

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.nodes = self.trie.follow(self.nodes, input_ids[:, self.position:])
        self.position = input_ids.shape[1]
        return restrict_logits(scores, self.trie.candidates(self.nodes))


class HFSampler(Sampler):
    """Sampler on ``transformers``' ``model.generate``.

    All prompts of a call go through one left-padded ``generate`` call; afterwards one forward pass over
    prompt + reply computes the recorded log-probs with ``gigpo_rllib.logprobs.forward_token_logprobs``,
    the same function the learner uses.

    Args:
        model_name_or_path: ``"gigpo-tiny"``, a local HF directory or a hub id.
        device: torch device string.
        dtype: "float32" | "bfloat16" | "float16".
    """

    def __init__(self, model_name_or_path: str, *, device: str = "cpu", dtype: str = "float32"):
        from transformers import GenerationConfig

        self.model, self.tokenizer = load_model_and_tokenizer(model_name_or_path, dtype=dtype, device=device)
        self.device = torch.device(device)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos_ids)
        self.pad_token_id = self.tokenizer.pad_token_id
        # generate() fills every setting left unset with the checkpoint's generation_config.json: a repetition
        # penalty or n-gram ban there would change what is sampled while the recorded log-probs (and the learner)
        # ignore it. Sampling follows our SamplingParams only.
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id)
        self._closed = False

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        allowed_responses: list[list[list[int]]] | None = None,
        seed: int | None = None,
    ) -> list[Completion]:
        """See :meth:`Sampler.generate`. Each allowed reply must end with one of ``self.eos_token_ids``."""
        from transformers import GenerationConfig, LogitsProcessorList

        if self._closed:
            raise RuntimeError("HFSampler.generate called after close()")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        check_prompts(prompt_ids, allowed_responses)
        n = len(prompt_ids)
        p_len = max(len(p) for p in prompt_ids)
        ids = torch.full((n, p_len), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((n, p_len), dtype=torch.long)
        for i, p in enumerate(prompt_ids):  # left padding
            ids[i, p_len - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            attn[i, p_len - len(p) :] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)

        allowed = None
        processors = LogitsProcessorList()
        if allowed_responses is not None and any(len(r) for r in allowed_responses):
            check_replies_end_with_eos(allowed_responses, self.eos_token_ids)
            allowed = pad_allowed_responses(allowed_responses, self.device)
            processors.append(_AllowedRepliesProcessor(allowed, p_len))

        # Sampling settings only when sampling: generate() warns about (and ignores) them in greedy mode.
        sampling = {} if params.greedy else dict(temperature=float(params.temperature), top_p=float(params.top_p),
                                                 top_k=params.top_k if params.top_k > 0 else 0)
        gen_config = GenerationConfig(
            do_sample=not params.greedy,
            **sampling,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            repetition_penalty=1.0,
            num_return_sequences=1,
        )
        gen_kwargs = dict(
            input_ids=ids, attention_mask=attn, generation_config=gen_config, logits_processor=processors
        )
        if seed is None:  # draw from (and advance) the global RNG
            out = self.model.generate(**gen_kwargs)
        else:  # a private, seeded stream; the caller's RNG state is left untouched
            with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
                torch.manual_seed(seed)
                out = self.model.generate(**gen_kwargs)
        gen = out[:, p_len:]  # (N, T)

        # Reply length: up to and including the first EOS; everything after it is padding.
        is_eos = torch.isin(gen, torch.as_tensor(self.eos_token_ids, device=gen.device))
        t_idx = torch.arange(gen.shape[1], device=gen.device)
        first_eos = torch.where(is_eos, t_idx, gen.shape[1]).min(-1).values
        stopped = first_eos < gen.shape[1]
        lengths = torch.where(stopped, first_eos + 1, torch.full_like(first_eos, gen.shape[1]))
        resp_valid = t_idx.unsqueeze(0) < lengths.unsqueeze(-1)  # (N, T)

        full_ids = torch.cat([ids, gen.masked_fill(~resp_valid, self.pad_token_id)], dim=1)
        full_attn = torch.cat([attn, resp_valid.to(torch.long)], dim=1)
        resp_mask = torch.cat([torch.zeros_like(attn, dtype=torch.bool), resp_valid], dim=1)
        logprobs, _ = forward_token_logprobs(
            self.model,
            full_ids,
            full_attn,
            resp_mask,
            temperature=params.logprob_temperature,
            allowed_responses=allowed,
        )
        logprobs = logprobs[:, p_len:].cpu()
        gen_cpu = gen.cpu()
        results = []
        for i in range(n):
            k = int(lengths[i])
            results.append(
                Completion(
                    token_ids=gen_cpu[i, :k].tolist(),
                    logprobs=logprobs[i, :k].tolist(),
                    finish_reason="stop" if bool(stopped[i]) else "length",
                )
            )
        return results

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Copy ``state_dict`` into the model in place. Keys are the HF model's own names; a tied
        ``lm_head.weight`` may be omitted. Raises ValueError on unknown or missing keys, or shape mismatch."""
        if not isinstance(state_dict, Mapping) or not state_dict:
            raise ValueError("state_dict must be a non-empty mapping of parameter name -> tensor/array")
        own = self.model.state_dict(keep_vars=True)
        unknown = sorted(set(state_dict) - set(own))
        if unknown:
            hint = " (strip the RL module's 'model.' prefix first)" if all(k.startswith("model.") for k in unknown) else ""
            raise ValueError(f"state_dict has keys the sampler's model lacks{hint}: {unknown[:5]}")
        # Parameters reachable under several names (tied embeddings) count as present if any name is given.
        by_storage: dict[int, list[str]] = {}
        for name, t in own.items():
            by_storage.setdefault(id(t), []).append(name)
        missing = [names[0] for names in by_storage.values() if not any(nm in state_dict for nm in names)]
        if missing:
            raise ValueError(f"state_dict is missing keys of the sampler's model: {missing[:5]}")
        for name, value in state_dict.items():
            target = own[name]
            src = _to_tensor(value)
            if tuple(src.shape) != tuple(target.shape):
                raise ValueError(f"state_dict[{name!r}] has shape {tuple(src.shape)}, expected {tuple(target.shape)}")
            target.data.copy_(src.to(device=target.device, dtype=target.dtype))

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        return self.model.state_dict()

    def close(self) -> None:
        """Drop the model. Idempotent."""
        if not self._closed:
            self._closed = True
            self.model = None
