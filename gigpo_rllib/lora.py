"""LoRA adapters on the policy (peft): train low-rank adapters only, hand the samplers merged weights.

With ``lora`` set, :func:`add_lora_adapters` wraps the Hugging Face model in a peft ``PeftModel``: every target
linear layer ``W`` gains ``B A`` (rank ``r``, scaled by ``alpha / r``, ``B`` initialised to 0 so training starts
from the pretrained policy) and only ``A`` and ``B`` require gradients. So the optimizer holds state for the
adapters only, and :func:`adapter_state_dict` is all a checkpoint needs (the frozen base comes from
``model_name_or_path``). Samplers never see adapters: :func:`merged_state_dict` gives them plain weights under the
base model's own names, ``W + (alpha / r) B A`` computed afresh from the unmodified base weights on every sync
(merging into the training weights and back would add a rounding error to the base on every update).

Pure torch and peft; no RLlib here.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

LORA_DEFAULTS: dict[str, Any] = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
"""The sub-keys of the ``lora`` config key and their defaults (a partial dict is merged into these)."""
LORA_EXTRA_HINT = "pip install 'gigpo-rllib[lora]' (or: pip install peft)"
_ADAPTER_NAME = "default"
_BASE_LAYER = ".base_layer"


def lora_settings_problem(settings: Any) -> str | None:
    """What is wrong with a ``lora`` config value (``None``, or a dict of :data:`LORA_DEFAULTS`' keys), or None."""
    if settings is None:
        return None
    if not isinstance(settings, dict):
        return f"lora must be null or a dict with keys {sorted(LORA_DEFAULTS)}, got {settings!r}"
    unknown = sorted(set(settings) - set(LORA_DEFAULTS))
    if unknown:
        return f"lora has unknown keys {unknown}; allowed keys: {sorted(LORA_DEFAULTS)}"
    rank, alpha, dropout, targets = (settings.get(key, default) for key, default in LORA_DEFAULTS.items())
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        return f"lora.r must be an integer >= 1, got {rank!r}"
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        return f"lora.alpha must be a number > 0, got {alpha!r}"
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        return f"lora.dropout must be a number in [0, 1), got {dropout!r}"
    if not (targets == "all-linear" or (isinstance(targets, list) and targets
                                        and all(isinstance(name, str) and name for name in targets))):
        return f"lora.target_modules must be \"all-linear\" or a non-empty list of module names, got {targets!r}"
    if importlib.util.find_spec("peft") is None:
        return f"lora needs the peft package, which is not installed: {LORA_EXTRA_HINT}"
    return None


def add_lora_adapters(model: torch.nn.Module, settings: dict[str, Any]) -> torch.nn.Module:
    """``model`` wrapped in a peft ``PeftModel`` with fresh LoRA adapters of ``settings`` (see module docstring);
    every base weight is frozen. Raises ``ValueError`` for bad settings."""
    problem = lora_settings_problem(settings)
    if problem:
        raise ValueError(problem)
    from peft import LoraConfig, get_peft_model

    settings = {**LORA_DEFAULTS, **settings}
    config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=float(settings["dropout"]),
                        target_modules=settings["target_modules"], bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config, adapter_name=_ADAPTER_NAME)
    except ValueError as error:  # e.g. a target module name the model does not have
        raise ValueError(f"lora.target_modules {settings['target_modules']!r} do not fit this model: {error}") from error


def is_lora_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (adapter) tensors of a LoRA model under the model's own state-dict names."""
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return {name: tensor for name, tensor in model.state_dict().items() if name in trainable}


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a plain copy of the base model needs to compute what the LoRA ``model`` computes: the base
    model's own names (``model.layers.0.self_attn.q_proj.weight``...), each adapted layer's weight ``W + ΔW``
    (new tensors), every other tensor as it is (no copy; tied weights keep sharing storage)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged = {name: tensor for name, tensor in base.state_dict().items() if ".lora_" not in name}
    for path, layer in base.named_modules():
        if isinstance(layer, LoraLayer) and _ADAPTER_NAME in layer.lora_A:
            name = f"{path}{_BASE_LAYER}.weight"
            merged[name] = merged[name] + layer.get_delta_weight(_ADAPTER_NAME).to(merged[name].dtype)
    return {name.replace(_BASE_LAYER + ".", "."): tensor for name, tensor in merged.items()}


def peft_adapter_files(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter of a LoRA ``model`` as peft saves it (tensor names without the adapter name, and the
    ``adapter_config.json`` contents): what vLLM's LoRA requests load."""
    from peft import get_peft_model_state_dict

    config = model.peft_config[_ADAPTER_NAME].to_dict()
    config = {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
    return get_peft_model_state_dict(model, adapter_name=_ADAPTER_NAME), config
