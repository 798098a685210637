"""Counting host synchronisations on CPU, where they cost nothing and so go unnoticed.

On a GPU, reading a value back to Python (``.item()``, ``bool(t)``, ``int(t)``, ``if t.any():``), or running an
op whose output size depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``),
waits for every queued kernel: a sync. The same calls run on CPU tensors go through the same operators, so a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` sees them all at the dispatcher: every scalar read is
``aten._local_scalar_dense`` whatever Python spelling produced it; data-dependent shapes are the ops in
:data:`DATA_DEPENDENT_OPS` (or indexing with a bool tensor). ``tolist``, ``numpy`` and ``cpu`` read memory
without an operator, so they are patched on ``torch.Tensor`` and counted too.

On CPU every tensor lives on the host, including those that a GPU run keeps in host memory on purpose (the
learner's host copies of the masks). Those are marked (:meth:`HostSyncCounter.mark_host`, by storage, so views and
slices count as marked) and the mark follows every op whose tensor inputs are all marked, and indexing of a
marked tensor (a host tensor can only be indexed by host indices): reading such a tensor is no sync and is not
counted.
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
DATA_DEPENDENT_OPS = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                      aten.unique_consecutive.default, aten.unique_dim.default, aten.repeat_interleave.Tensor}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class HostSyncCounter(TorchDispatchMode):
    """Counts host syncs while active and not :meth:`paused`; ``where`` keeps a short stack of each."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.where: list[str] = []
        self._paused = 0
        self._host_storages: set[int] = set()
        # Marked tensors are kept alive: a freed storage's address could be reused by a device tensor.
        self._host_tensors: list[torch.Tensor] = []

    def mark_host(self, tensor: torch.Tensor) -> None:
        """``tensor`` (and every view of its storage) lives in host memory in a GPU run too."""
        address = tensor.untyped_storage().data_ptr()
        if address:  # empty tensors have no storage to tell apart
            self._host_storages.add(address)
            self._host_tensors.append(tensor)

    def _on_host(self, tensors: list[torch.Tensor]) -> bool:
        return bool(tensors) and all(t.untyped_storage().data_ptr() in self._host_storages for t in tensors)

    def _record(self, what: str) -> None:
        if self._paused:
            return
        self.count += 1
        frames = [f for f in traceback.extract_stack()[:-3] if "torch/" not in f.filename]
        self.where.append(what + " at " + " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                                                      for f in frames[-4:][::-1]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        if self._on_host(inputs) or (func is aten.index.Tensor and self._on_host([args[0]])):
            out = func(*args, **kwargs)
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self.mark_host(leaf)
            return out
        if func is aten._local_scalar_dense.default or func in DATA_DEPENDENT_OPS:
            self._record(str(func))
        elif func in INDEX_OPS and any(isinstance(index, torch.Tensor) and index.dtype == torch.bool
                                       for index in (args[1] if len(args) > 1 else ()) if index is not None):
            self._record(f"{func} with a bool index")
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextlib.contextmanager
    def counting(self):
        """Active for the block, with ``Tensor.tolist``, ``numpy`` and ``cpu`` counted too."""
        patched = {}
        for name in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, name)
            patched[name] = original

            def counted(tensor, *args, _original=original, _name=name, **kwargs):
                if not self._on_host([tensor]):
                    self._record(f"Tensor.{_name}")
                with self.paused():
                    return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        try:
            with self:
                yield self
        finally:
            for name, original in patched.items():
                setattr(torch.Tensor, name, original)
