"""gigpo-rllib: GiGPO (Group-in-Group Policy Optimization, arXiv 2505.10978) for LLM agents on Ray RLlib.

Importing the package registers the ``"GiGPO"`` trainable with Ray Tune, so ``tune.Tuner("GiGPO", ...)`` works.
"""

from ray.tune.registry import register_trainable

from gigpo_rllib.algorithm import GiGPO
from gigpo_rllib.config import GiGPOConfig

__version__ = "0.1.0"
__all__ = ["GiGPO", "GiGPOConfig"]

register_trainable("GiGPO", GiGPO)
