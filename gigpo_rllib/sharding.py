"""Sharded learners (``learner_sharding: fsdp``): FSDP2 over a Hugging Face decoder, and the gathers it needs.

Each decoder layer is one FSDP2 unit (its weights are all-gathered just before it runs and freed after), the whole
model the root unit (embeddings, final norm, LM head). Parameters, gradients and the optimizer state built over
them are ``DTensor`` shards: 1/N of each weight on each of N ranks. Whatever leaves the learner whole (sampler
weights, checkpoints) is gathered one tensor at a time, so no rank ever holds a second whole float32 copy.

Pure torch: no RLlib here.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of ``model`` (an HF causal LM, possibly wrapped by peft): the modules whose class the
    model names in ``_no_split_modules`` (e.g. ``Qwen2DecoderLayer``)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    block_names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in block_names]
    if not layers:
        raise ValueError(f"learner_sharding='fsdp' shards a model per decoder layer, but {type(base).__name__} names "
                         f"no decoder block class (_no_split_modules={sorted(block_names)})")
    return layers


def shard_model(model: torch.nn.Module, *, compute_dtype: torch.dtype, cpu_offload: bool) -> None:
    """Shard ``model`` in place over the default process group: each decoder layer, then the root. The shards stay
    float32 (the master weights); with a lower ``compute_dtype`` the gathered weights are cast to it for the forward
    and backward, and gradients are reduced in float32."""
    policies = {}
    if compute_dtype != torch.float32:
        policies["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        policies["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **policies)
    fully_shard(model, **policies)
    # The learner scores tokens with the decoder and the output layer apart, not through model.forward, whose hooks
    # gather the root's weights (embeddings, output layer) and reduce their gradients: that scoring runs as this
    # method, which has the same hooks.
    setattr(model, _AS_FORWARD, types.MethodType(lambda _model, function, *args: function(*args), model))
    register_fsdp_forward_method(model, _AS_FORWARD)


_AS_FORWARD = "call_as_sharded_forward"


def call_as_forward(model: torch.nn.Module, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, which uses ``model``'s weights; for a model sharded by :func:`shard_model`, run as the
    model's forward (its root weights gathered, their gradients reduced in the backward)."""
    as_forward = getattr(model, _AS_FORWARD, None)
    return as_forward(function, *args) if as_forward is not None else function(*args)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a ``DTensor`` shard is all-gathered (a collective: every rank must call it, in the same
    order); a plain tensor is returned as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (the tensor itself when it is not a ``DTensor``)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def copy_whole_into(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy the whole tensor ``whole`` into ``target``; a ``DTensor`` target takes its own part of it (cut on this
    rank: every rank holds ``whole``, nothing is sent)."""
    if isinstance(target, DTensor):
        whole = distribute_tensor(whole.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                  target.placements, src_data_rank=None).to_local()
        target = target.to_local()
    target.copy_(whole.to(device=target.device, dtype=target.dtype))


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every ``DTensor`` state (Adam's moments) gathered whole, one at a time: the
    layout of an unsharded optimizer over the same parameters, so it loads into any number of learners."""
    state = optimizer.state_dict()
    return {**state, "state": {index: {key: full_tensor(value) for key, value in values.items()}
                               for index, values in state["state"].items()}}


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After an unsharded state was loaded into ``optimizer`` over ``DTensor`` parameters: cut each whole per-parameter
    tensor (Adam's moments) to this rank's part, laid out like its parameter."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if not isinstance(parameter, DTensor):
                continue
            values = optimizer.state.get(parameter, {})
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == parameter.shape:
                    part = distribute_tensor(value.to(parameter.device), parameter.device_mesh, parameter.placements,
                                             src_data_rank=None)
                    # A fresh tensor, as the optimizer makes its state, not a view into the whole one: the fused
                    # step's vectorised loop then splits it as before the save, and a resumed run is bit-exact.
                    values[key] = DTensor.from_local(part.to_local().clone(), part.device_mesh, part.placements,
                                                     shape=part.shape, stride=part.stride(), run_check=False)
