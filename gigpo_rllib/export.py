"""A trained policy as a plain Hugging Face model folder (``rllib export``), for serving or further fine-tuning.

The folder holds what ``transformers.AutoModelForCausalLM.from_pretrained`` and vLLM load as they are: the config,
the weights as safetensors (float32, as trained), the generation config and the tokenizer with its chat template.
Nothing in it refers to gigpo-rllib or Ray.

The weights come from the learner's RLModule in the checkpoint (``learner_group/learner/rl_module/default_policy``,
the copy the optimizer updated), restored on its own with RLlib's ``Checkpointable.from_checkpoint``: no Ray
cluster, no env runners, no algorithm. A model carrying LoRA adapters (a peft model) is merged into plain weights
first, so the folder needs no peft to load.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import shutil
from typing import Any

from gigpo_rllib.checkpoints import resolve_checkpoint
from gigpo_rllib.experiment import ExperimentError

__all__ = ["export_checkpoint", "load_policy_module", "save_hf_model"]


def policy_module_dir(checkpoint: str | pathlib.Path) -> pathlib.Path:
    """Where an algorithm checkpoint keeps the learner's RLModule (its weights and constructor arguments)."""
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

    return (pathlib.Path(checkpoint) / COMPONENT_LEARNER_GROUP / COMPONENT_LEARNER / COMPONENT_RL_MODULE
            / DEFAULT_MODULE_ID)


def load_policy_module(checkpoint: str | pathlib.Path):
    """The :class:`~gigpo_rllib.rl_module.LLMRLModule` of ``checkpoint`` (a checkpoint or a run directory, see
    :func:`~gigpo_rllib.checkpoints.resolve_checkpoint`) with its trained weights, built in this process. Raises
    :class:`ExperimentError` naming the problem when the checkpoint is missing, partial or damaged."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    checkpoint = resolve_checkpoint(checkpoint)
    module_dir = policy_module_dir(checkpoint)
    if not module_dir.is_dir():
        raise ExperimentError(f"cannot use checkpoint {str(checkpoint)!r}: it has no policy module "
                              f"({module_dir.relative_to(checkpoint)} is missing)")
    try:
        return RLModule.from_checkpoint(str(module_dir.resolve()))
    except (EOFError, pickle.UnpicklingError, FileNotFoundError, KeyError) as error:
        raise ExperimentError(f"cannot load the policy of checkpoint {str(checkpoint)!r}: {type(error).__name__}: "
                              f"{error}; a file of it is missing or cut short (an interrupted save?)") from error
    except ValueError as error:  # the base model cannot be found, or the saved weights do not fit it
        raise ExperimentError(f"cannot load the policy of checkpoint {str(checkpoint)!r}: {error}") from error


def save_hf_model(model: Any, tokenizer: Any, out: str | pathlib.Path, *, force: bool = False) -> pathlib.Path:
    """Write ``model`` (a transformers causal LM, or a peft model wrapping one: its adapters are merged) and
    ``tokenizer`` as a Hugging Face folder at ``out``. The folder appears complete or not at all (written beside
    it, then renamed). An existing non-empty ``out`` is refused unless ``force``, which replaces it. Returns
    ``out``."""
    out = pathlib.Path(out).expanduser()
    check_output_dir(out, force=force)
    if hasattr(model, "merge_and_unload"):
        # Merging rewrites the base weights in place: work on a copy so the caller's model keeps its adapters.
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _default_permissions(staging)
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _default_permissions(folder: pathlib.Path) -> None:
    """Give every file the permissions a plain file gets here (``0666 & ~umask``): transformers writes the weights
    through a private temporary file (mode 0600), which a server running as another user could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def check_output_dir(out: pathlib.Path, *, force: bool) -> None:
    """Raise :class:`ExperimentError` unless ``out`` may be written: absent, an empty directory, or ``force``."""
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"--out {str(out)!r} is a file; give a directory to write the model folder into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExperimentError(f"--out {str(out)!r} already exists and is not empty; choose another directory, or "
                              "pass --force to replace it")


def export_checkpoint(checkpoint: str | pathlib.Path, out: str | pathlib.Path, *, force: bool = False
                      ) -> pathlib.Path:
    """Export the policy of ``checkpoint`` (or of the newest complete checkpoint of a run directory) as a Hugging
    Face model folder at ``out``; see the module docstring. Returns ``out``. A missing, partial or damaged
    checkpoint, or an ``out`` that is not empty (without ``force``), raises :class:`ExperimentError`."""
    checkpoint = resolve_checkpoint(checkpoint)
    check_output_dir(pathlib.Path(out).expanduser(), force=force)  # before the minutes a large model takes to load
    module = load_policy_module(checkpoint)
    return save_hf_model(module.model, module.tokenizer, out, force=force)
