"""gigpo-rllib: GiGPO (Group-in-Group Policy Optimization, arXiv 2505.10978) for LLM agents on Ray RLlib."""

__version__ = "0.1.0"
