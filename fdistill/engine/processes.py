"""Processes: one, or many under ``torchrun``, and the random streams each rank draws from.

Under ``torchrun`` (``RANK`` set) every rank runs the same loop on its share of the global
batch. With the rank-independent streams of :func:`make_batch_randoms`
(:class:`fdistill.rng.BatchRandom`) each rank draws exactly its slice of the global batch, so N
processes compute what one process would.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fdistill.rng import BatchRandom

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a build without torch.distributed: nothing is ever sharded
    DTensor = ()

Generators = dict[str, torch.Generator | BatchRandom]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_device(device: str | None) -> str:
    """``device`` (default: cuda when available, else cpu) as a name torch accepts and this
    machine has; one line otherwise."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(want).type
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {want!r}") from None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {want!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {want}: this machine has no CUDA device; use --device cpu")
    return want


def init_distributed(device: str | None = None) -> Dist:
    """Join the ``torchrun`` process group when ``RANK`` is set; otherwise one CPU/GPU process."""
    want = check_device(device)
    if "RANK" not in os.environ:
        return Dist(0, 1, torch.device(want))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want == "cuda" else "gloo")
        atexit.register(_destroy_process_group)
    rank, world = dist.get_rank(), dist.get_world_size()
    if want == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return Dist(rank, world, torch.device("cuda", local))
    return Dist(rank, world, torch.device(want))


@contextlib.contextmanager
def distributed(device: str | None = None):
    """:func:`init_distributed` for the length of a run.

    On a normal exit every rank waits for the others, so files rank 0 writes last (the final
    checkpoint) exist once any rank returns. The process group outlives the run (it is torn
    down at process exit): several runs in one process — teacher, then distillation — share it,
    since creating a gloo group again in the same process can hang.
    """
    ddp = init_distributed(device)
    yield ddp
    if ddp.world > 1:
        dist.barrier()


def average_gradients(params: Iterable[nn.Parameter], world: int) -> None:
    """All-reduce (mean) the gradients of ``params`` across ranks, in one flat buffer.

    For code that runs its own backward outside the training loops (:func:`optimizer_step`);
    the loops use ``DistributedDataParallel``, which overlaps the reduction with the backward.
    """
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is an FSDP shard (a DTensor)."""
    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """A whole tensor: gathers an FSDP shard (collective: every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def make_generators(seed: int, ddp: Dist) -> dict[str, torch.Generator]:
    """Per-rank generators for data sampling and for noise, seeded from ``seed`` and the rank."""
    gens = {}
    for i, name in enumerate(("data", "noise")):
        g = torch.Generator(device=ddp.device)
        g.manual_seed(seed * 1_000_003 + ddp.rank * 101 + i)
        gens[name] = g
    return gens


def make_batch_randoms(seed: int, ddp: Dist) -> dict[str, BatchRandom]:
    """Data and noise streams seeded alike on every rank; each rank keeps its rows of the
    global batch, so the run does not depend on the number of processes (see :mod:`fdistill.rng`).
    """
    # Data indices are drawn on the CPU (the loader gathers host-side rows with them, and CPU
    # and GPU runs then read the same batches); noise is drawn where the networks run.
    devices = {"data": torch.device("cpu"), "noise": ddp.device}
    return {
        name: BatchRandom(seed * 1_000_003 + i, ddp.rank, ddp.world, devices[name])
        for i, name in enumerate(("data", "noise"))
    }
