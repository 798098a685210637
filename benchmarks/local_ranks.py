"""Several processes on this machine as one ``torch.distributed`` group, for the checks and benchmarks that compare
learner layouts (``bench_sharding.py``, ``gpu_check.py``). Needs only torch.

Each run takes a free port of its own (a fixed one collides with another group on the machine: that rank's
rendezvous fails or joins the wrong group, and the run hangs), and a rank that dies fails the run at once, naming
it, instead of leaving the others and the caller waiting for it.
"""

from __future__ import annotations

import os
import queue
import socket
from collections.abc import Callable, Iterable
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(target: Callable[..., Any], world: int, *args: Any, backend: str = "gloo") -> list[Any]:
    """``target(rank, world, *args)`` in ``world`` spawned processes joined in one process group of ``backend``
    (none for one process); returns what each rank returned, by rank. ``target`` must be importable (a module-level
    function) and its result picklable. A rank that exits without returning raises :class:`RuntimeError`."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank_main, args=(target, rank, world, backend, port, results, args))
                 for rank in range(world)]
    for process in processes:
        process.start()
    returned = {}
    try:
        while len(returned) < world:
            try:
                rank, value = results.get(timeout=1.0)
                returned[rank] = value
            except queue.Empty:
                if any(process.exitcode not in (None, 0) for process in processes):
                    # The first rank to die often takes the others down with it (a broken connection), and may
                    # still be exiting when they are seen dead: wait a little so the message names it too.
                    for process in processes:
                        process.join(timeout=5.0)
                    dead = [f"{rank} (exit code {process.exitcode})" for rank, process in enumerate(processes)
                            if rank not in returned and process.exitcode not in (None, 0)]
                    raise RuntimeError(f"of {world} ranks, {', '.join(dead)} exited before returning (tracebacks "
                                       "are printed above)") from None
    finally:
        for process in processes:
            if process.is_alive() and len(returned) < world:
                process.terminate()
            process.join()
    return [returned[rank] for rank in range(world)]


def _rank_main(target, rank: int, world: int, backend: str, port: int, results, args: Iterable[Any]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        results.put((rank, target(rank, world, *args)))
    finally:
        if world > 1:
            dist.destroy_process_group()


def local_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of ``tensors`` held by this rank (its own part of a sharded ``DTensor``)."""
    from gigpo_rllib.sharding import local_tensor

    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)
