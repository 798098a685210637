"""Weights from the learner to the samplers in one buffer: each weight once, in the sampler's dtype.

RLlib's generic sync ships the module's state dict as float32 numpy arrays, one per tensor, tied embeddings twice
(for a 1.5B model: 339 tensors, 7.1 GB). :func:`pack_weights` instead copies each distinct tensor once, cast to
the sampler's dtype, into one contiguous byte buffer (bfloat16 travels as raw 16-bit words: numpy has no
bfloat16), so a sync is one device-to-host copy, one object in Ray's object store and, on the runner,
:func:`unpack_weights` views into that buffer that the sampler copies in place. Integer tensors (buffers such as
position ids) travel apart, unchanged: bfloat16 holds integers exactly only up to 256.

A sharded learner's weights (``DTensor`` shards, see :mod:`gigpo_rllib.sharding`) are gathered one tensor at a
time straight into the buffer, on every rank (the gather is a collective), while only the rank that keeps the
buffer allocates it.

Pure torch and numpy: no Ray here (the algorithm puts the packed weights into the object store once per iteration).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gigpo_rllib.sharding import full_tensor, local_tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PackedWeights:
    """A model's weights as one byte buffer.

    Attributes:
        buffer: ``(nbytes,)`` uint8, the tensors back to back in ``dtype``.
        dtype: the tensors' dtype name (a key of :data:`DTYPES`).
        entries: ``(name, shape, element offset)`` of each distinct tensor, in buffer order.
        aliases: names that share storage with an entry (tied weights): ``alias -> entry name``.
        exact: the non-floating tensors (integer or bool buffers), as numpy arrays of their own dtype.
        adapter_config: None for a model's weights; for a LoRA adapter alone (``lora_sync: adapter``), peft's
            ``adapter_config.json`` contents: the tensors are then the adapter's, under peft's names, for a sampler
            to apply to its base weights.
    """

    buffer: np.ndarray
    dtype: str
    entries: tuple[tuple[str, tuple[int, ...], int], ...]
    aliases: Mapping[str, str]
    exact: Mapping[str, np.ndarray]
    adapter_config: Mapping[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)


def distinct_tensors(named_tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(name -> tensor, alias -> name)``: each tensor of ``named_tensors`` once (detached), and the names that share
    storage with an earlier one (tied embeddings)."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tensors, aliases = {}, {}
    for name, tensor in named_tensors.items():
        local = local_tensor(tensor)
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = tensor.detach()
    return tensors, aliases


def synced_bytes(tensors: Mapping[str, torch.Tensor], dtype: str) -> int:
    """Bytes of the floating tensors of ``tensors`` in ``dtype``: what one sync writes into a sampler."""
    return sum(tensor.numel() for tensor in tensors.values() if tensor.is_floating_point()) * DTYPES[dtype].itemsize


def pack_weights(named_tensors: Mapping[str, torch.Tensor], dtype: str, *, keep: bool = True,
                 adapter_config: Mapping[str, Any] | None = None) -> PackedWeights | None:
    """Pack ``named_tensors`` (a state dict, on any device) into one buffer of ``dtype``; tensors that share
    storage (tied embeddings) are packed once and recorded as aliases, and non-floating tensors are kept apart in
    their own dtype (``exact``). ``DTensor`` shards are gathered whole one at a time; ranks that only take part in
    those gathers pass ``keep=False`` (nothing is allocated, None is returned). ``adapter_config`` marks the
    tensors as a LoRA adapter (see :class:`PackedWeights`)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tensors, aliases = distinct_tensors(named_tensors)
    exact = {name: tensor.cpu().numpy() for name, tensor in tensors.items() if not tensor.is_floating_point()}
    entries, offset = [], 0
    for name, tensor in tensors.items():
        if name not in exact:
            entries.append((name, tuple(tensor.shape), offset))
            offset += tensor.numel()
    # Each tensor is cast while it is copied into one preallocated buffer on its device (one pass, no per-tensor
    # temporaries), then the buffer goes to the host in one copy (none on CPU), not tensor by tensor.
    device = tensors[entries[0][0]].device if entries else torch.device("cpu")
    flat = torch.empty(offset if keep else 0, dtype=DTYPES[dtype], device=device)
    for name, _, start in entries:
        whole = full_tensor(tensors[name])
        if keep:
            flat[start:start + whole.numel()].copy_(whole.reshape(-1))
    if not keep:
        return None
    buffer = flat.cpu().view(torch.uint8).numpy()
    return PackedWeights(buffer=buffer, dtype=dtype, entries=tuple(entries), aliases=aliases, exact=exact,
                         adapter_config=None if adapter_config is None else dict(adapter_config))


def unpack_weights(packed: PackedWeights) -> dict[str, torch.Tensor]:
    """Name -> tensor views into ``packed.buffer`` (no copy), one per distinct tensor (aliases left out: a
    sampler fills tied weights from their entry), plus the ``exact`` tensors in their own dtype."""
    with warnings.catch_warnings():  # buffers from Ray's object store are read-only; samplers only read them
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(packed.buffer).view(DTYPES[packed.dtype])
        exact = {name: torch.from_numpy(array) for name, array in packed.exact.items()}
    return {**{name: flat[offset:offset + int(np.prod(shape, dtype=np.int64))].view(shape)
               for name, shape, offset in packed.entries}, **exact}
