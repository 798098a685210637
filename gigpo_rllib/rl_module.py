"""``LLMRLModule``: a Hugging Face causal LM as an RLlib (new API stack) ``TorchRLModule``.

The module only scores tokens: ``forward_train`` returns per-token log-probs and entropies of the
responses in a padded token batch. Text generation goes through ``gigpo_rllib.sampling`` instead, so
``forward_inference`` / ``forward_exploration`` raise ``NotImplementedError``.

Batch format for ``forward_train`` (all tensors on the module's device, one row per step sample):

- ``"input_ids"``: (B, S) int64, prompt tokens then response tokens; padding on either side (use
  right padding: ``[prompt, response, pad...]``). Position ids are derived from the attention mask, so
  the layout does not change the result.
- ``"attention_mask"``: (B, S), 1 on real tokens (prompt + response), 0 on padding.
- ``"response_mask"``: (B, S) bool, True on the response tokens (one contiguous run per row, never at
  position 0). The loss is taken over these positions.
- ``"allowed_responses"`` (optional): (B, K, L) int64, -1 padded: each row's allowed complete replies (see
  ``gigpo_rllib.logprobs``). A row of all -1 is unconstrained.
- ``"host_attention_mask"``, ``"host_response_mask"`` (optional, in host memory): copies of the two masks that
  the learner's prepared batches carry, so the response positions are found without reading the device; such a
  batch's constraint was checked once when it was prepared, and is not checked again.

Output: ``{"token_logprobs": (B, S) float32, "token_entropy": (B, S) float32}``, 0 off the response.

``model_config`` keys: ``"model"`` (name or path, default ``"gigpo-tiny"``), ``"compute_dtype"``
(``"float32"`` or ``"bfloat16"``), ``"temperature"`` (1.0, must equal the sampler's), ``"gradient_checkpointing"``
(False) and ``"lora"`` (None, or LoRA settings: see :mod:`gigpo_rllib.lora`; then only the adapters train, the
module's state is the adapters alone, and its inference-only state and ``sampler_state_dict`` are the merged weights
under the base model's names, which is what the samplers load). :class:`~gigpo_rllib.config.GiGPOConfig` fills them from its own keys. The
observation/action spaces are unused placeholders (e.g. ``Box(0, 1, (1,))`` and ``Discrete(1)``).

Mixed precision: the weights (and so the optimizer state) are always float32; with ``compute_dtype="bfloat16"``
every forward pass runs under ``torch.autocast`` in bfloat16. Pure bfloat16 weights would lose small updates
(at lr 1e-6 almost every weight stays unchanged: the update is below bfloat16's resolution).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ray.rllib.core.rl_module.torch import TorchRLModule

from gigpo_rllib.logprobs import forward_token_logprobs
from gigpo_rllib.lora import (add_lora_adapters, adapter_state_dict, is_lora_model, merged_state_dict,
                              peft_adapter_files)
from gigpo_rllib.models import TINY_MODEL_NAME, load_model_and_tokenizer, prepare_for_training
from gigpo_rllib.sharding import call_as_forward, copy_whole_into, full_tensor

MODEL_ATTR = "model"
MODULE_PREFIX = MODEL_ATTR + "."

TOKEN_LOGPROBS = "token_logprobs"
TOKEN_ENTROPY = "token_entropy"
HOST_MASKS = ("host_attention_mask", "host_response_mask")

_DEFAULTS = {"model": TINY_MODEL_NAME, "compute_dtype": "float32", "temperature": 1.0, "gradient_checkpointing": False,
             "lora": None}
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def state_dict_to_numpy(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """CPU numpy copies of a torch state dict; bfloat16 tensors become float32 (numpy has no bfloat16, and every
    ``set_state``/``load_weights`` casts back to the model's own dtype). Sharded tensors are gathered whole, one at
    a time (a collective: every rank of a sharded model must call this)."""
    arrays = {}
    for name, tensor in state_dict.items():
        whole = full_tensor(tensor.detach())
        arrays[name] = (whole.float() if whole.dtype == torch.bfloat16 else whole).cpu().numpy()
    return arrays


def to_sampler_state_dict(module_state: Mapping[str, Any]) -> dict[str, Any]:
    """The module's state (``get_state()``: keys ``"model.<hf name>"``, numpy arrays) -> the sampler's
    ``load_weights`` input (keys ``"<hf name>"``). Non-``model.`` keys are dropped; values are not copied."""
    return {k[len(MODULE_PREFIX) :]: v for k, v in module_state.items() if k.startswith(MODULE_PREFIX)}


class LLMRLModule(TorchRLModule):
    """A causal LM scored token by token for policy-gradient training (see module docstring)."""

    def setup(self) -> None:
        cfg = dict(_DEFAULTS)
        user = self.model_config or {}
        if dataclasses.is_dataclass(user) and not isinstance(user, type):
            user = dataclasses.asdict(user)
        if not isinstance(user, Mapping):
            raise ValueError(f"model_config must be a dict with keys {sorted(_DEFAULTS)}, got {type(user).__name__}")
        cfg.update(user)
        if cfg["compute_dtype"] not in COMPUTE_DTYPES:
            raise ValueError(f"model_config['compute_dtype'] must be one of {sorted(COMPUTE_DTYPES)}, got "
                             f"{cfg['compute_dtype']!r} (float16 training needs loss scaling; use bfloat16)")
        self.compute_dtype = COMPUTE_DTYPES[cfg["compute_dtype"]]
        temperature = cfg["temperature"]
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"model_config['temperature'] must be a number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.model_name = cfg["model"]
        model, tokenizer = load_model_and_tokenizer(cfg["model"], dtype="float32", device="cpu")
        # Explicitly, not only through RLlib's forward_train (which calls train()): every pass with gradients over
        # this model, whoever runs it, must recompute activations when checkpointing is on.
        model = prepare_for_training(model, gradient_checkpointing=cfg["gradient_checkpointing"])
        if cfg["lora"] is not None:
            model = add_lora_adapters(model, cfg["lora"])
        self.model = model
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        # Tokenizer is not a torch module; keep it out of the state dict.
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        """The model's tokenizer (padding side left to callers)."""
        return self._tokenizer

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, torch.Tensor]:
        """Token log-probs/entropies of the responses; see the module docstring for the batch keys."""
        for key in ("input_ids", "attention_mask", "response_mask"):
            if key not in batch:
                raise ValueError(f"LLMRLModule batch is missing {key!r}; it has {sorted(batch)}")
        device = next(self.model.parameters()).device
        input_ids = torch.as_tensor(batch["input_ids"], device=device).long()
        attention_mask = torch.as_tensor(batch["attention_mask"], device=device).long()
        response_mask = torch.as_tensor(batch["response_mask"], device=device).bool()
        allowed = batch.get("allowed_responses")
        if allowed is not None:
            allowed = torch.as_tensor(allowed, device=device).long()
        prepared = HOST_MASKS[1] in batch
        score = functools.partial(
            forward_token_logprobs,
            self.model,
            temperature=self.temperature,
            allowed_responses=allowed,
            autocast_dtype=self.compute_dtype,
            host_masks=(batch[HOST_MASKS[0]], batch[HOST_MASKS[1]]) if prepared else None,
            check_constraint=not prepared,
        )
        logprobs, entropy = call_as_forward(self.model, score, input_ids, attention_mask, response_mask)
        return {TOKEN_LOGPROBS: logprobs, TOKEN_ENTROPY: entropy}

    def no_sync(self):
        """RLlib's update enters DDP's ``no_sync`` of every module when there are several learners (around the
        gradient post-processing); a sharded module is not wrapped in DDP, and its gradients are already reduced in
        the backward, so there is nothing to hold back."""
        return contextlib.nullcontext()

    def _forward_inference(self, batch: dict[str, Any], **kwargs):
        raise NotImplementedError(
            "LLMRLModule does not generate actions; text generation goes through gigpo_rllib.sampling "
            "(make_sampler) in the env runner. Use forward_train to score tokens."
        )

    def _forward_exploration(self, batch: dict[str, Any], **kwargs):
        raise NotImplementedError(
            "LLMRLModule does not generate actions; text generation goes through gigpo_rllib.sampling "
            "(make_sampler) in the env runner. Use forward_train to score tokens."
        )

    def get_state(self, components=None, *, not_components=None, inference_only: bool = False, **kwargs):
        """The weights as numpy arrays (see :func:`state_dict_to_numpy` for bfloat16): the whole model (inference
        needs all of it). With LoRA, the trainable adapters alone (the frozen base is rebuilt from the model name),
        or with ``inference_only`` (what RLlib hands env runners) the merged weights under the base model's
        names."""
        if not is_lora_model(self.model):
            return state_dict_to_numpy(self.state_dict())
        weights = merged_state_dict(self.model) if inference_only else adapter_state_dict(self.model)
        return state_dict_to_numpy({MODULE_PREFIX + name: tensor for name, tensor in weights.items()})

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Load a (numpy or torch) state dict in place; it may hold a part of the weights (a LoRA module's state is
        its adapters). Tied parameters may appear under one name or both; unknown keys and shape mismatches raise
        ValueError instead of being skipped silently. A sharded model takes the whole tensors and keeps its parts."""
        own = self.state_dict(keep_vars=True)
        unknown = sorted(set(state) - set(own))
        if unknown:
            lora = " (a LoRA module takes its adapters, not merged weights)" if is_lora_model(self.model) else ""
            raise ValueError(f"LLMRLModule.set_state got keys the module lacks{lora}: {unknown[:5]}")
        with torch.no_grad():
            for name, value in state.items():
                target = own[name]
                src = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
                if tuple(src.shape) != tuple(target.shape):
                    raise ValueError(
                        f"LLMRLModule.set_state: {name!r} has shape {tuple(src.shape)}, expected {tuple(target.shape)}"
                    )
                copy_whole_into(target.data, src)

    def sampler_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a sampler loads: the HF model's own state dict (keys without the ``"model."`` prefix; with
        LoRA the merged weights under the base model's names). Across processes use :func:`to_sampler_state_dict`
        of the inference-only state."""
        weights = merged_state_dict(self.model) if is_lora_model(self.model) else self.model.state_dict()
        return {name: tensor.detach() for name, tensor in weights.items()}

    def sampler_adapter(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, adapter config)``: the LoRA adapters alone as peft saves them, for a sampler that applies them
        to its own base weights (``lora_sync: adapter``). Raises ``ValueError`` without LoRA."""
        if not is_lora_model(self.model):
            raise ValueError("sampler_adapter needs a LoRA module (model_config['lora'] set); this one trains every "
                             "weight: use sampler_state_dict")
        tensors, config = peft_adapter_files(self.model)
        return {name: tensor.detach() for name, tensor in tensors.items()}, config
