"""gigpo-rllib: GiGPO (Group-in-Group Policy Optimization, arXiv 2505.10978) for LLM agents on Ray RLlib.

``from gigpo_rllib import GiGPOConfig, GiGPO, AnchorStateWrapper, LLMActionWrapper``. Importing the package
registers the ``"GiGPO"`` trainable with Ray Tune, so ``tune.Tuner("GiGPO", ...)`` works.

The math (``advantages``, ``losses``, ``logprobs``), the offline ``models`` and the ``weight_sync`` packing
import without Ray (``benchmarks/gpu_check.py`` runs on machines that have only torch and transformers), so the
exports are loaded on first use.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"
__all__ = ["AnchorStateWrapper", "GiGPO", "GiGPOConfig", "LLMActionWrapper"]

_EXPORTS = {"GiGPO": "gigpo_rllib.algorithm", "GiGPOConfig": "gigpo_rllib.config",
            "AnchorStateWrapper": "gigpo_rllib.wrappers", "LLMActionWrapper": "gigpo_rllib.wrappers"}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gigpo_rllib' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def _ray_installed() -> bool:
    try:
        return importlib.util.find_spec("ray") is not None
    except ImportError:
        return False


if _ray_installed():
    from ray.tune.registry import register_trainable

    register_trainable("GiGPO", __getattr__("GiGPO"))
