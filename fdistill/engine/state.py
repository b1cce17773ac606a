"""What a checkpoint holds beyond weights: the EMA, every rank's RNG state, and the save /
restore of a run's stateful objects (``checkpoint.pt``, written atomically by rank 0)."""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fdistill.engine.processes import Dist, Generators, full_tensor, is_sharded
from fdistill.rng import BatchRandom
from fdistill.runs import CHECKPOINT, atomic_save


class EMA:
    """Exponential moving average of a module's parameters and buffers.

    The average is a whole module on every rank; under FSDP :meth:`update` gathers the shards
    of the trained module (every rank must call it).
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = float(decay)
        self.module = copy.deepcopy(module).requires_grad_(False).eval()
        self._pairs: tuple[nn.Module, list, list] | None = None

    def _pairing(self, module: nn.Module) -> tuple[list, list]:
        """``(groups, buffers)``: per (device, dtype) the average's parameters and the trained
        module's (Parameter objects, read at each update), and the buffer pairs. Walking the
        module tree costs more than the update itself at small sizes, so the pairing is kept
        while ``module`` is the same object (a DDP wrapper or a new module pairs again; FSDP
        shards, whose registered parameters FSDP swaps, pair at every update)."""
        if self._pairs is not None and self._pairs[0] is module:
            return self._pairs[1], self._pairs[2]
        mine, theirs = list(self.module.parameters()), list(module.parameters())
        if len(mine) != len(theirs):
            raise ValueError(f"EMA of {len(mine)} parameters updated from {len(theirs)}")
        by_kind: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
        for e, p in zip(mine, theirs, strict=True):
            group = by_kind.setdefault((e.device, e.dtype), ([], []))
            group[0].append(e)
            group[1].append(p)
        groups = [(device, dtype, es, ps) for (device, dtype), (es, ps) in by_kind.items()]
        buffers = list(zip(self.module.buffers(), module.buffers(), strict=True))
        if not any(is_sharded(p) for p in theirs):
            self._pairs = (module, groups, buffers)
        return groups, buffers

    @torch.no_grad()
    def update(
        self, module: nn.Module, step: int | None = None, skip: Tensor | None = None
    ) -> None:
        """Blend ``module`` in. With ``step`` (updates so far) the decay warms up as
        ``min(decay, (1 + step) / (10 + step))``, so a short run's average is not dominated
        by the initial weights. ``skip`` (a bool device scalar) leaves the average unchanged
        where it is true, without a host synchronisation."""
        decay = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        weight: float | Tensor = 1 - decay
        if skip is not None:
            weight = (~skip).float() * weight
        groups, buffers = self._pairing(module)
        # One fused call per dtype (the per-tensor lerp_ it runs gives the same bits).
        for device, dtype, es, ps in groups:
            ps = [full_tensor(p.detach()) for p in ps]
            if isinstance(weight, Tensor):
                torch._foreach_lerp_(es, ps, [weight.to(device, dtype)] * len(es))
            else:
                torch._foreach_lerp_(es, ps, weight)
        for e, b in buffers:
            e.copy_(b if skip is None else torch.where(skip, e, b))


def rng_state(gens: Generators) -> dict[str, Tensor]:
    state = {k: g.get_state() for k, g in gens.items()}
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(gens: Generators, state: dict[str, Tensor]) -> None:
    for k, g in gens.items():
        g.set_state(state[k])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def config_dict(cfg) -> dict:
    return asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else dict(cfg)


def _gather_rng(gens: Generators, world: int) -> list[dict[str, Tensor]]:
    mine = rng_state(gens)
    if world == 1:
        return [mine]
    out: list = [None] * world
    dist.all_gather_object(out, {k: v.cpu() for k, v in mine.items()})
    return out


def save_run(
    out: Path,
    step: int,
    config: dict,
    objects: dict[str, object],
    gens: Generators,
    ddp: Dist,
) -> None:
    """Write ``checkpoint.pt`` (state of every object, RNG of every rank, step, config).

    Every rank takes the state dicts (for FSDP shards that is a collective gather); rank 0
    writes the file.
    """
    rngs = _gather_rng(gens, ddp.world)
    states = {k: o.state_dict() for k, o in objects.items()}
    if not ddp.main:
        return
    state = {
        "step": step,
        "config": config,
        "world": ddp.world,
        "rng": rngs,
        "state": states,
    }
    atomic_save(state, out / CHECKPOINT)


def restore_run(ckpt: dict, objects: dict[str, object], gens: Generators, ddp: Dist) -> int:
    """Load a checkpoint written by :func:`save_run` into ``objects``; return its step."""
    for k, o in objects.items():
        o.load_state_dict(ckpt["state"][k])
    if ckpt.get("world", 1) == ddp.world:
        set_rng_state(gens, ckpt["rng"][ddp.rank])
        return int(ckpt["step"])
    # Rank-independent streams continue exactly; per-rank ones cannot be mapped to new ranks.
    for k, g in gens.items():
        if isinstance(g, BatchRandom):
            g.set_state(ckpt["rng"][0][k])
    if ddp.main:
        print(
            f"note: checkpoint was written by {ckpt.get('world')} processes, resuming with "
            f"{ddp.world}: per-rank random streams restart, the run is no longer bit-identical"
        )
    return int(ckpt["step"])


class ModuleState:
    """Adapter so the EMA's module is saved/restored like any other object."""

    def __init__(self, ema: EMA):
        self.ema = ema

    def state_dict(self):
        return self.ema.module.state_dict()

    def load_state_dict(self, sd):
        self.ema.module.load_state_dict(sd)
