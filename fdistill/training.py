"""Training infrastructure shared by teacher training and distillation.

One process or many: under ``torchrun`` (``RANK`` set) every rank runs the same loop on its
share of the global batch. The trained networks are replicated with PyTorch's
``DistributedDataParallel`` (gradients all-reduced in buckets while the backward pass is still
running; gloo on CPU, nccl on CUDA) or, with ``LoopConfig.fsdp``, sharded with FSDP2
(``torch.distributed.fsdp.fully_shard``). Randomness comes from explicit per-rank generators
whose states go into every checkpoint, so a resumed run continues bit for bit where the
straight run would have been. With the rank-independent streams of :func:`make_batch_randoms`
(:class:`fdistill.rng.BatchRandom`) each rank draws exactly its slice of the global batch, so
N processes compute what one process would; with ``LoopConfig.batch_gpu`` a rank splits its
share into micro-batches whose gradients accumulate, and each micro-batch draws exactly its
rows too (see :class:`MicroBatches`), so accumulation changes memory, not the result.

Speed: the networks can run under bfloat16 autocast (``bf16``; losses, density ratios and
weights stay in float32 in :mod:`fdistill.loss`) and be compiled (``compile``). The loops
never wait for the device inside an update: their statistics stay 0-dim device tensors (a
model's losses may return floats or tensors; tensors, and :data:`BINS` sums, are the
sync-free kind), the NaN/Inf watch (:class:`FiniteGuard`) skips bad optimiser steps on the
device, and values reach the host only at logging and checkpoint steps.

Two loops share this machinery: :func:`train_teacher` (EDM denoising score matching) and
:func:`train_distill` (f-distill critic and generator updates).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fdistill.rng import BatchRandom, RandomSource

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a build without torch.distributed: nothing is ever sharded
    DTensor = ()
from fdistill.runs import (
    CHECKPOINT,
    atomic_save,
    load_checkpoint,
    trim_metrics,
    write_config,
)


# --------------------------------------------------------------------------- processes
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


def init_distributed(device: str | None = None) -> Dist:
    """Join the ``torchrun`` process group when ``RANK`` is set; otherwise one CPU/GPU process."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
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


def _full(t: Tensor) -> Tensor:
    """A whole tensor: gathers an FSDP shard (collective: every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


# --------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a module's parameters and buffers.

    The average is a whole module on every rank; under FSDP :meth:`update` gathers the shards
    of the trained module (every rank must call it).
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = float(decay)
        self.module = copy.deepcopy(module).requires_grad_(False).eval()

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
        cast: dict[torch.dtype, float | Tensor] = {}
        for e, p in zip(self.module.parameters(), module.parameters(), strict=True):
            w = weight
            if isinstance(weight, Tensor):
                w = cast.setdefault(e.dtype, weight.to(e.device, e.dtype))
            e.lerp_(_full(p.detach()), w)
        for e, b in zip(self.module.buffers(), module.buffers(), strict=True):
            e.copy_(b if skip is None else torch.where(skip, e, b))


# --------------------------------------------------------------------------- checkpoints
Generators = dict[str, torch.Generator | BatchRandom]


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


# --------------------------------------------------------------------------- logging
class NonFiniteError(RuntimeError):
    """Raised when a loss or gradient turns NaN/Inf; the last good checkpoint stays intact."""


def _nonfinite_message(step: int, bad: Sequence[str]) -> str:
    return (
        f"non-finite {', '.join(bad)} at step {step}: training stopped; the last good "
        "checkpoint is kept. Lower the learning rate, enable grad clipping, or check the data."
    )


def check_finite(step: int, stats: dict[str, float]) -> None:
    """Raise :class:`NonFiniteError` if any logged value (losses, gradient norms) is NaN/Inf."""
    bad = [k for k, v in stats.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(_nonfinite_message(step, bad))


Stat = float | Tensor
BINS = "/bins"
"""Suffix of a binned statistic: a ``[2, num_bins]`` tensor of per-bin sums and counts, which
micro-batches add up and :func:`host_stats` turns into ``<name>/bin<k>`` means (bins with
samples only)."""


def _stat_tensor(v: Stat, device: torch.device) -> Tensor:
    if isinstance(v, Tensor):
        return v.detach().float().reshape(()).to(device)
    return torch.full((), float(v), device=device)  # a fill, not a host-to-device copy


def host_stats(stats: dict[str, Stat]) -> dict[str, float]:
    """Statistics as Python floats, with one device-to-host copy for all tensor values."""
    keys = [k for k, v in stats.items() if isinstance(v, Tensor)]
    host: dict[str, Stat] = {k: float(v) for k, v in stats.items() if not isinstance(v, Tensor)}
    if keys:
        device = stats[keys[0]].device
        flat = [stats[k].detach().float().reshape(-1).to(device) for k in keys]
        values = torch.cat(flat).tolist()
        pos = 0
        for k, f in zip(keys, flat, strict=True):
            host[k] = values[pos] if not k.endswith(BINS) else values[pos : pos + f.numel()]
            pos += f.numel()
    out: dict[str, float] = {}
    for k in stats:
        if not k.endswith(BINS):
            out[k] = host[k]
            continue
        v = host[k]
        nb = len(v) // 2
        name = k[: -len(BINS)]
        out |= {f"{name}/bin{i}": v[i] / v[nb + i] for i in range(nb) if v[nb + i] > 0}
    return out


def merge_stats(parts: Sequence[dict[str, Stat]]) -> dict[str, Stat]:
    """Statistics of a whole batch from those of its equal-sized micro-batches: the mean,
    except ``*_min`` / ``*_max`` (the minimum / maximum) and binned sums and counts
    (:data:`BINS`: the sum). Tensors stay on the device."""
    if len(parts) == 1:
        return dict(parts[0])
    out: dict[str, Stat] = {}
    for k in parts[0]:
        vals = [p[k] for p in parts if k in p]
        if k.endswith(BINS):
            out[k] = torch.stack([v.detach().float() for v in vals]).sum(0)
            continue
        if all(not isinstance(v, Tensor) for v in vals):
            fn = min if k.endswith("_min") else max if k.endswith("_max") else None
            out[k] = fn(vals) if fn else sum(vals) / len(vals)
            continue
        device = next(v.device for v in vals if isinstance(v, Tensor))
        t = torch.stack([_stat_tensor(v, device) for v in vals])
        out[k] = t.amin() if k.endswith("_min") else t.amax() if k.endswith("_max") else t.mean()
    return out


class FiniteGuard:
    """NaN/Inf watch over every update without a host synchronisation per update.

    Each update hands its statistics (losses, gradient norm: 0-dim tensors or floats) to
    :meth:`observe`, which returns ``found_inf``: a float device scalar, 1 when this update or
    any earlier one was non-finite. A fused AdamW reads it and skips its step *on the device*
    (parameters, moments and step count stay as they were; see :func:`apply_update`), and the
    EMA skips too, so from the first bad update on nothing moves: the networks stay as they were
    after the last good update. :meth:`check` copies the flags to the host once and raises
    :class:`NonFiniteError` naming the first bad step and its non-finite statistics; the loops
    call it at every logging step and before every checkpoint, so a checkpoint is never written
    after a bad update, and a NaN at step ``s`` stops the run at the next logging step with
    "non-finite ... at step s" (the steps in between are computed but change nothing).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.tripped = torch.zeros((), dtype=torch.bool, device=self.device)
        self._pending: list[tuple[int, tuple[str, ...], Tensor]] = []

    def nonfinite(self, stats: dict[str, Stat]) -> tuple[tuple[str, ...], Tensor]:
        """``(keys, flags)``: the statistics' names and their non-finite flags (a bool device
        vector), tensor values first. Float values are checked on the host (they are there
        already) and enter as constants, so nothing is copied to the device."""
        tkeys = [k for k, v in stats.items() if isinstance(v, Tensor)]
        fkeys = [k for k, v in stats.items() if not isinstance(v, Tensor)]
        flags = []
        if tkeys:  # a binned statistic is one value here: the sum of its entries
            vals = [stats[k].detach().float().sum().to(self.device) for k in tkeys]
            flags.append(~torch.isfinite(torch.stack(vals)))
        if fkeys:
            host = [not math.isfinite(stats[k]) for k in fkeys]
            if any(host):
                flags.append(torch.stack([torch.full((), b, device=self.device) for b in host]))
            else:
                flags.append(torch.zeros(len(fkeys), dtype=torch.bool, device=self.device))
        if not flags:
            return (), torch.zeros(0, dtype=torch.bool, device=self.device)
        return (*tkeys, *fkeys), torch.cat(flags)

    def observe(self, step: int, stats: dict[str, Stat]) -> Tensor:
        """Record one update's statistics; return ``found_inf`` (see the class docstring)."""
        keys, bad = self.nonfinite(stats)
        self._pending.append((step, keys, bad))
        self.tripped = self.tripped | bad.any()
        return self.tripped.float()

    def check(self) -> None:
        """Raise :class:`NonFiniteError` for the first non-finite update since the last check."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        flags = torch.cat([b for _, _, b in pending]).tolist()
        pos = 0
        for step, keys, _ in pending:
            bad = [k for k, f in zip(keys, flags[pos : pos + len(keys)], strict=True) if f]
            pos += len(keys)
            if bad:
                raise NonFiniteError(_nonfinite_message(step, bad))


class RunLog:
    """JSONL metrics (+ TensorBoard when installed) and a progress bar, on the main rank only.

    ``enabled`` is False on the other ranks; ``progress=False`` drops only the bar. Every
    logged record carries the wall time and the speed since the previous record (``it_s``).
    """

    def __init__(
        self,
        out: Path | None,
        total: int,
        start: int,
        enabled: bool,
        desc: str,
        progress: bool = True,
    ):
        self.bar = self.jsonl = self.tb = None
        self.t0 = self.t_last = time.perf_counter()
        self.step_last = start
        if not enabled:
            return
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(out / "metrics.jsonl", "a")  # noqa: SIM115
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def step(self, step: int, stats: dict[str, float], log: bool) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if log:
                short = {k: f"{v:.3g}" for k, v in stats.items() if k.startswith(("loss", "h_"))}
                self.bar.set_postfix(short, refresh=False)
        if log and self.jsonl is not None:
            now = time.perf_counter()
            speed = (step - self.step_last) / max(now - self.t_last, 1e-9)
            self.t_last, self.step_last = now, step
            rec = {"step": step, "time": now - self.t0, "it_s": speed, **stats}
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()
            if self.tb is not None:
                for k, v in stats.items():
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def config_dict(cfg) -> dict:
    return asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else dict(cfg)


def _skips_on_device(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt.step`` honours ``opt.found_inf`` (fused Adam/AdamW, as GradScaler uses)."""
    return bool(opt.defaults.get("fused")) and isinstance(opt, torch.optim.Adam | torch.optim.AdamW)


def make_adamw(
    params: list[nn.Parameter],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    device: torch.device,
) -> torch.optim.AdamW:
    """AdamW, fused (one kernel, and able to skip a step on the device) on CPU and CUDA."""
    fused = torch.device(device).type in ("cpu", "cuda") and all(
        p.is_floating_point() for p in params
    )
    return torch.optim.AdamW(
        params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None
    )


def grad_norm(params: Iterable[nn.Parameter]) -> Tensor:
    """Total 2-norm of the gradients (a 0-dim tensor; FSDP shards are reduced to the whole)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return _full(norm)


def apply_update(
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    stats: dict[str, Stat],
    *,
    step: int,
    grad_clip: float,
    guard: FiniteGuard | None = None,
    norm_key: str = "grad_norm",
) -> None:
    """Gradient norm, NaN/Inf watch, clipping and the optimiser step, gradients already there.

    The norm (computed once, after the gradients were averaged over ranks, so every rank sees
    the same value) goes into ``stats[norm_key]`` and is reused for clipping. With a ``guard``
    nothing waits for the device: an optimiser that can skip on the device
    (:func:`make_adamw`) is handed ``found_inf``; any other checks on the host before its step.
    Without one the check is immediate (:func:`check_finite`), as in :func:`optimizer_step`.
    """
    norm = grad_norm(params)
    if guard is None:
        stats[norm_key] = float(norm)
        check_finite(step, host_stats(stats))
        found_inf = None
    else:
        stats[norm_key] = norm
        found_inf = guard.observe(step, stats)
        if not _skips_on_device(opt):
            guard.check()
            found_inf = None
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    if found_inf is None:
        opt.step()
        return
    opt.found_inf = found_inf  # GradScaler's protocol: fused Adam(W) skips where it is 1
    try:
        opt.step()
    finally:
        del opt.found_inf


def optimizer_step(
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    loss: Tensor,
    stats: dict[str, float],
    *,
    step: int,
    grad_clip: float,
    world: int,
    norm_key: str = "grad_norm",
) -> None:
    """Backward, average gradients over ranks, stop on NaN/Inf, clip, step (one call, synced).

    ``step`` is the 1-based number of the step being made (used in the NaN/Inf message). For
    code outside the training loops (benchmarks); the loops use :func:`apply_update`.
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(params, world)
    apply_update(opt, params, stats, step=step, grad_clip=grad_clip, norm_key=norm_key)


StepCallback = Callable[[int], None]


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


class _ModuleState:
    """Adapter so the EMA's module is saved/restored like any other object."""

    def __init__(self, ema: EMA):
        self.ema = ema

    def state_dict(self):
        return self.ema.module.state_dict()

    def load_state_dict(self, sd):
        self.ema.module.load_state_dict(sd)


# --------------------------------------------------------------------------- configs
@dataclass
class LoopConfig:
    """Settings every training loop shares: length, batch, optimiser, EMA, bookkeeping, speed.

    ``steps`` is the total, so a resumed run ends where the straight run would. ``batch`` is
    the global batch, split evenly over processes; ``batch_gpu`` (``None``: all of it) is the
    micro-batch a process runs at once, gradients accumulating over ``batch / (processes *
    batch_gpu)`` micro-batches per update (see :class:`MicroBatches` for what is exact).
    ``ema_warmup`` ramps the EMA decay up from 0 (see :meth:`EMA.update`). ``bf16``: bfloat16
    autocast of the networks (CPU and CUDA). ``compile``: ``torch.compile`` the networks with
    ``compile_backend`` (``"inductor"``; ``"aot_eager"`` or ``"eager"`` to debug). ``fsdp``:
    shard the trained networks over processes with FSDP2 instead of replicating them with DDP.
    """

    steps: int = 2000
    batch: int = 256
    batch_gpu: int | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    grad_clip: float = 10.0
    ema_decay: float = 0.999
    ema_warmup: bool = False
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 1000
    progress: bool = True
    bf16: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    fsdp: bool = False


@dataclass
class TrainConfig(LoopConfig):
    """Distillation: ``critic_ratio`` critic updates per generator update, two AdamW."""

    critic_ratio: int = 5
    lr_gen: float = 1e-4
    lr_critic: float = 1e-4


@dataclass
class TeacherTrainConfig(LoopConfig):
    """Teacher (EDM) training: one optimiser; ``lr_warmup`` steps of linear learning-rate ramp."""

    lr: float = 1e-3
    lr_warmup: int = 0
    weight_decay: float = 0.0


def per_rank_batch(batch: int, world: int) -> int:
    if batch % world:
        raise ValueError(f"global batch {batch} is not divisible by {world} processes")
    return batch // world


def micro_batches(cfg: LoopConfig, world: int) -> tuple[int, int]:
    """``(micro-batch size, micro-batches per update)`` of one process."""
    per = per_rank_batch(cfg.batch, world)
    size = min(cfg.batch_gpu or per, per)
    if size < 1 or per % size:
        raise ValueError(
            f"--batch-gpu {cfg.batch_gpu} must divide the per-process batch {per} "
            f"(--batch {cfg.batch} over {world} processes)"
        )
    return size, per // size


class MicroBatches:
    """Micro-batch ``m`` of ``k`` draws exactly rows ``m*n .. (m+1)*n`` of this rank's batch.

    Iterating yields ``0 .. k-1``. Before each micro-batch the :class:`BatchRandom` streams in
    ``gens`` are rewound to where the update began and act as rank ``rank*k + m`` of
    ``world*k``: every draw of the update (data, latents, noise levels, noise) is the same
    number it would be without accumulation, and the streams end where they would. So the
    accumulated gradient is that of the whole batch, up to float summation order, for every
    loss that is a mean of per-sample terms. Not exact: per-batch statistics inside a loss
    (the ratio normaliser's bin means and the ``h`` batch mean are taken per micro-batch, over
    all ranks), dropout masks (the global torch RNG) and plain ``torch.Generator`` streams,
    which draw the micro-batches one after another.
    """

    def __init__(self, gens: Generators, k: int):
        self.k = k
        self.streams = (
            {n: g for n, g in gens.items() if isinstance(g, BatchRandom)} if k > 1 else {}
        )

    def __iter__(self) -> Iterator[int]:
        if not self.streams:
            yield from range(self.k)
            return
        start = {n: g.get_state() for n, g in self.streams.items()}
        place = {n: (g.rank, g.world) for n, g in self.streams.items()}
        try:
            for m in range(self.k):
                for n, g in self.streams.items():
                    g.set_state(start[n])
                    g.rank, g.world = place[n][0] * self.k + m, place[n][1] * self.k
                yield m
        finally:
            for n, g in self.streams.items():
                g.rank, g.world = place[n]


# --------------------------------------------------------------------------- precision
def bf16_supported(device: torch.device) -> bool:
    """bfloat16 autocast runs on CPUs and on CUDA GPUs that support it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast of matrix products and convolutions where supported, else a no-op.

    Elementwise work (EDM preconditioning, noise, losses) stays float32 under autocast; the
    density ratio, ``h`` and the loss reductions cast to float32 explicitly (:mod:`fdistill.loss`).
    """
    device = torch.device(device)
    if bf16 and bf16_supported(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_supported(device: torch.device) -> bool:
    """``torch.compile`` of the networks runs on CPUs (needs a C++ compiler) and CUDA."""
    return torch.device(device).type in ("cpu", "cuda")


RECOMPILE_LIMIT = 64
"""Graphs dynamo may keep per compiled function (its default, 8, is too few for distillation)."""


def compile_modules(
    modules: Iterable[nn.Module],
    device: torch.device,
    enabled: bool,
    backend: str = "inductor",
) -> None:
    """``torch.compile`` the modules in place (state-dict keys unchanged).

    Only the networks are compiled, not the Python logic of a training step. Every distinct
    way a network is called (grad or no-grad, ``return_features``, frozen weights) compiles
    once, on first use; later steps reuse the graphs. Networks of one class share dynamo's
    per-function cache (teacher, student and fake score are all ``EDMPrecond``: about a dozen
    graphs in a distillation), so its recompile limit is raised to :data:`RECOMPILE_LIMIT`;
    past the limit dynamo would silently run the network eagerly.
    """
    if enabled and compile_supported(device):
        import torch._dynamo

        conf = torch._dynamo.config
        conf.recompile_limit = max(conf.recompile_limit, RECOMPILE_LIMIT)
        for m in modules:
            m.compile(backend=backend)


# --------------------------------------------------------------------------- sharing
def _block_modules(module: nn.Module) -> list[nn.Module]:
    """The entries of every ``ModuleList``/``ModuleDict`` (a network's blocks), deepest first."""
    found = []
    for m in module.modules():
        if isinstance(m, nn.ModuleList | nn.ModuleDict):
            found += [c for c in m.children() if any(True for _ in c.parameters())]
    return found[::-1]


class _Sharing:
    """How trained networks are shared over processes: as they are, DDP, or FSDP2 shards.

    * DDP (``world > 1``): a module's first update runs unwrapped and :meth:`reduce` averages
      its gradients in one flat all-reduce; parameters that got no gradient on any rank (EDM's
      ``map_augment`` when no augmentation labels are passed) are then told to DDP to ignore,
      and the module is wrapped in ``DistributedDataParallel``, which from then on all-reduces
      gradient buckets while the backward pass runs (``find_unused_parameters`` cannot be
      used: the critic calls the fake score twice per backward). A module called in an update
      that does not train it (the critic under ``frozen()`` in the generator update, the
      generator under ``no_grad`` in the critic update) runs inside :meth:`no_sync`, so DDP
      expects no gradients from it; so does every micro-batch but the last, so gradients
      accumulate locally and are reduced once.
    * FSDP (``fsdp`` and ``world > 1``): :meth:`prepare` shards a *copy* with ``fully_shard``
      (each block of the network, then the whole), gradients are reduce-scattered after every
      micro-batch (accumulating shards, not whole gradients), the optimiser holds shards.
      The caller's module keeps whole weights (and the EMA is whole); :meth:`finish` copies the
      trained weights back. Checkpoints hold whole state dicts (every rank gathers); the
      optimiser's name its parameters by path, so an FSDP run resumes with FSDP (at any number
      of processes). The frozen teacher is not sharded: weights only, no gradients or moments.
    """

    def __init__(self, ddp: Dist, fsdp: bool, compile_backend: str | None = None):
        self.ddp = ddp
        self.kind = "none" if ddp.world == 1 else "fsdp" if fsdp else "ddp"
        self.compile_backend = compile_backend
        self.pairs: list[tuple[nn.Module, nn.Module]] = []
        self.eager: set[int] = set()  # ids of modules never to compile

    def compile(self, modules: Iterable[nn.Module]) -> None:
        """Compile trained networks: now, or (DDP) when :meth:`reduce` wraps them, so dynamo
        sees the DDP wrapper and splits the graph at gradient buckets (``optimize_ddp``):
        a network compiled inside DDP would hand DDP all its gradients at once, at the end of
        its backward pass, and nothing would overlap."""
        if self.compile_backend is not None and self.kind != "ddp":
            compile_modules(modules, self.ddp.device, True, self.compile_backend)

    def prepare(self, module: nn.Module) -> nn.Module:
        """The module the loop calls and trains in place of ``module`` (DDP: see :meth:`reduce`)."""
        if self.kind != "fsdp":
            return module
        from torch.distributed.fsdp import fully_shard

        shard = copy.deepcopy(module)
        for block in _block_modules(shard):
            fully_shard(block)
        fully_shard(shard)
        self.pairs.append((module, shard))
        return shard

    def reduce(self, modules: Sequence[nn.Module]) -> list[nn.Module]:
        """After the backward passes of an update that trains ``modules``: average the
        gradients DDP has not (a module's first update) and return the modules to call from
        now on (DDP wrappers where one was just made)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self.kind != "ddp":
            return list(modules)
        out = []
        for m in modules:
            if isinstance(m, DDP):
                out.append(m)
                continue
            named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
            used = torch.tensor(
                [float(p.grad is not None) for _, p in named], device=self.ddp.device
            )
            dist.all_reduce(used, op=dist.ReduceOp.MAX)
            used_list = used.tolist()
            for (_, p), u in zip(named, used_list, strict=True):
                if u and p.grad is None:
                    p.grad = torch.zeros_like(p)
            average_gradients(
                [p for (_, p), u in zip(named, used_list, strict=True) if u], self.ddp.world
            )
            unused = [n for (n, _), u in zip(named, used_list, strict=True) if not u]
            DDP._set_params_and_buffers_to_ignore_for_model(m, unused)
            dev = self.ddp.device
            wrapped = DDP(
                m,
                device_ids=[dev.index] if dev.type == "cuda" else None,
                broadcast_buffers=False,  # buffers are constants: no collective per forward
            )
            if self.compile_backend is not None and id(m) not in self.eager:
                compile_modules([wrapped], dev, True, self.compile_backend)
            out.append(wrapped)
        return out

    @contextlib.contextmanager
    def no_sync(self, modules: Iterable[nn.Module]):
        """No gradient reduction for ``modules`` (DDP wrappers) in the forward and backward
        passes inside."""
        from torch.nn.parallel import DistributedDataParallel

        with contextlib.ExitStack() as stack:
            for m in modules:
                if isinstance(m, DistributedDataParallel):
                    stack.enter_context(m.no_sync())
            yield

    def state(self, original: nn.Module, trained: nn.Module) -> object:
        """What a checkpoint saves and restores for a trained module."""
        return _FullModelState(trained) if self.kind == "fsdp" else original

    def optimizer_state(self, trained: Sequence[nn.Module], opt: torch.optim.Optimizer) -> object:
        if self.kind != "fsdp":
            return opt
        return _FullOptimState(nn.ModuleList(trained), opt)

    def finish(self) -> None:
        """Copy the trained shards back into the callers' whole modules (collective)."""
        with torch.no_grad():
            for original, shard in self.pairs:
                for a, b in zip(original.parameters(), shard.parameters(), strict=True):
                    a.copy_(_full(b))
                for a, b in zip(original.buffers(), shard.buffers(), strict=True):
                    a.copy_(_full(b))


class _FullModelState:
    """Checkpoint adapter of an FSDP-sharded module: whole (rank 0, CPU) state dicts."""

    def __init__(self, module: nn.Module):
        self.module = module

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kw)

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module, options=self._options(cpu_offload=True))

    def load_state_dict(self, sd):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.module, sd, options=self._options())


class _FullOptimState(_FullModelState):
    """Checkpoint adapter of an optimiser over FSDP shards (parameters named by their path)."""

    def __init__(self, module: nn.Module, opt: torch.optim.Optimizer):
        super().__init__(module)
        self.opt = opt

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(
            self.module, self.opt, options=self._options(cpu_offload=True)
        )

    def load_state_dict(self, sd):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.opt, sd, options=self._options())


@contextlib.contextmanager
def _installed(model: nn.Module, modules: dict[str, nn.Module]):
    """Put ``modules`` in place of ``model``'s attributes of the same names for the block."""
    saved = {name: getattr(model, name) for name in modules}
    for name, m in modules.items():
        setattr(model, name, m)
    try:
        yield
    finally:
        for name, m in saved.items():
            setattr(model, name, m)


def _backward(loss: Tensor, stats: dict[str, Stat], scale: float, guard: FiniteGuard) -> None:
    """``(scale * loss).backward()``, with NaN gradients if a statistic is NaN/Inf on this rank.

    The poisoned gradients reach every rank through the reduction, so all ranks see a
    non-finite gradient norm at the same update and stop together.
    """
    bad = guard.nonfinite(stats)[1].any()
    poison = torch.where(bad, torch.full_like(bad, float("nan"), dtype=loss.dtype), scale)
    (loss * poison).backward()


def _backend(cfg: LoopConfig, device: torch.device) -> str | None:
    """The ``torch.compile`` backend of the trained networks, ``None`` when not compiling."""
    if not (cfg.compile and compile_supported(device)):
        return None
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if cfg.compile_backend not in known:
        raise ValueError(
            f"--compile-backend {cfg.compile_backend!r} is not a torch.compile backend; "
            f"use inductor (default), aot_eager or eager (all: {', '.join(known)})"
        )
    return cfg.compile_backend


def _sync_due(cfg: LoopConfig, done: int) -> bool:
    """Steps whose statistics reach the host: logging and checkpoint steps, and the last."""
    return done % cfg.log_every == 0 or done % cfg.ckpt_every == 0 or done == cfg.steps


def _end_step(run: _Run, guard: FiniteGuard, done: int, stats: dict[str, Stat]) -> None:
    """Check for NaN/Inf and copy statistics to the host where due, then log / checkpoint."""
    if _sync_due(run.cfg, done):
        guard.check()
        stats = host_stats(stats)
    run.end_step(done, stats)


# --------------------------------------------------------------------------- loops
class _Run:
    """What every loop does around its updates: resume, config.json, logging, checkpoints."""

    def __init__(
        self,
        out: Path | None,
        cfg: LoopConfig,
        objects: dict[str, object],
        gens: Generators,
        ddp: Dist,
        config: dict,
        desc: str,
    ):
        self.out, self.cfg, self.objects, self.gens = out, cfg, objects, gens
        self.ddp, self.config, self.desc = ddp, config, desc
        self.log: RunLog | None = None

    def begin(self, resume: bool) -> int:
        """Restore the checkpoint when resuming, write config.json, open the log; first step."""
        start, out, ddp = 0, self.out, self.ddp
        if resume and out is not None and (out / CHECKPOINT).is_file():
            start = restore_run(load_checkpoint(out), self.objects, self.gens, ddp)
            if ddp.main:
                print(f"resumed from {out / CHECKPOINT} at step {start}")
        if out is not None and ddp.main:
            trim_metrics(out, start)  # steps logged after the checkpoint are logged again
            write_config(out, self.config)
        if ddp.main:
            for flag, ok in (
                ("bf16", bf16_supported(ddp.device)),
                ("compile", compile_supported(ddp.device)),
            ):
                if getattr(self.cfg, flag) and not ok:
                    print(f"note: --{flag} is not supported on {ddp.device}; running without it")
        self.log = RunLog(out, self.cfg.steps, start, ddp.main, self.desc, self.cfg.progress)
        return start

    def end_step(self, done: int, stats: dict[str, float]) -> None:
        """Log, and write the checkpoint when due (every ``ckpt_every`` steps and at the end)."""
        cfg = self.cfg
        self.log.step(done, stats, done % cfg.log_every == 0 or done == cfg.steps)
        if self.out is not None and (done % cfg.ckpt_every == 0 or done == cfg.steps):
            save_run(self.out, done, self.config, self.objects, self.gens, self.ddp)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


Sampler = Callable[[int, RandomSource], tuple[Tensor, Tensor | None]]


def train_teacher(
    denoiser: nn.Module,
    sample_real: Sampler,
    cfg: TeacherTrainConfig,
    out: Path | None = None,
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    config: dict | None = None,
    ddp: Dist | None = None,
    resume: bool = False,
    gens: Generators | None = None,
    on_step: Callable[[int, EMA], None] | None = None,
) -> EMA:
    """Train a diffusion teacher by denoising score matching, ``cfg.steps`` AdamW updates.

    ``denoiser(x, sigma, cond)`` is trained with ``loss_fn(denoiser, x0, cond, generator=...)``
    (per-sample losses; default :class:`~fdistill.denoisers.EDMLoss`) on batches
    ``sample_real(n, gens["data"])``; noise comes from ``gens["noise"]`` (default: per-rank
    :func:`make_generators`). Checkpoints hold the network, its EMA, the optimiser, every
    rank's RNG states, the step and ``config``. Returns the EMA.
    """
    from fdistill.denoisers.edm import EDMLoss

    ddp = ddp or Dist()
    out = Path(out) if out is not None else None
    loss_fn = loss_fn or EDMLoss()
    n, k = micro_batches(cfg, ddp.world)
    gens = gens if gens is not None else make_generators(cfg.seed, ddp)
    share = _Sharing(ddp, cfg.fsdp, _backend(cfg, ddp.device))
    ema = EMA(denoiser, cfg.ema_decay)
    net = share.prepare(denoiser)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_adamw(params, cfg.lr, cfg.betas, cfg.weight_decay, ddp.device)
    objects = {
        "net": share.state(denoiser, net),
        "ema": _ModuleState(ema),
        "opt": share.optimizer_state([net], opt),
    }
    full_config = {"kind": "teacher", "train": config_dict(cfg), **(config or {})}
    run = _Run(out, cfg, objects, gens, ddp, full_config, "teacher")
    start = run.begin(resume)
    share.compile([net])
    guard, micro = FiniteGuard(ddp.device), MicroBatches(gens, k)
    try:
        for step in range(start, cfg.steps):
            done = step + 1
            if cfg.lr_warmup > 0:
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * min(1.0, done / cfg.lr_warmup)
            opt.zero_grad(set_to_none=True)
            parts = []
            for m in micro:
                x0, cond = sample_real(n, gens["data"])
                with share.no_sync([net] if m < k - 1 else []):
                    with autocast(ddp.device, cfg.bf16):
                        loss = loss_fn(net, x0, cond, generator=gens["noise"]).mean()
                    parts.append({"loss": loss.detach()})
                    _backward(loss, parts[-1], 1 / k, guard)
            (net,) = share.reduce([net])
            stats = merge_stats(parts)
            apply_update(opt, params, stats, step=done, grad_clip=cfg.grad_clip, guard=guard)
            ema.update(net, done if cfg.ema_warmup else None, skip=guard.tripped)
            _end_step(run, guard, done, stats)
            if on_step is not None:
                on_step(done, ema)
        share.finish()
    finally:
        run.close()
    return ema


def train_distill(
    model,
    sample_real: Sampler,
    sample_latents: Sampler,
    cfg: TrainConfig,
    out: Path | None = None,
    *,
    config: dict | None = None,
    ddp: Dist | None = None,
    resume: bool = False,
    on_step: Callable[[int, EMA], None] | None = None,
    gens: Generators | None = None,
) -> EMA:
    """Distil: ``critic_ratio`` critic updates, then one generator update, ``cfg.steps`` times.

    ``model`` is an :class:`fdistill.distill.FDistill`; ``sample_real(n, gen)`` and
    ``sample_latents(n, gen)`` return this rank's share of a batch with its labels.
    ``cfg.steps`` is the total, so a resumed run ends where the straight run would.
    ``gens`` are the ``"data"`` and ``"noise"`` streams (default: per-rank
    :func:`make_generators`). Under DDP or FSDP the model's generator, fake score and head are
    replaced by their wrappers / shards for the length of the loop. Returns the generator's EMA.
    """
    ddp = ddp or Dist()
    out = Path(out) if out is not None else None
    n, k = micro_batches(cfg, ddp.world)
    gens = gens if gens is not None else make_generators(cfg.seed, ddp)
    share = _Sharing(ddp, cfg.fsdp, _backend(cfg, ddp.device))
    ema = EMA(model.generator, cfg.ema_decay)
    originals = {name: getattr(model, name) for name in ("generator", "fake_score", "head")}
    trained = {name: share.prepare(m) for name, m in originals.items()}
    gen_names, critic_names = ("generator",), ("fake_score", "head")
    with _installed(model, trained):
        gen_params = [p for p in model.generator.parameters() if p.requires_grad]
        critic_params = model.critic_parameters()
    opt_g = make_adamw(gen_params, cfg.lr_gen, cfg.betas, cfg.weight_decay, ddp.device)
    opt_c = make_adamw(critic_params, cfg.lr_critic, cfg.betas, cfg.weight_decay, ddp.device)
    objects = {
        "generator": share.state(originals["generator"], trained["generator"]),
        "fake_score": share.state(originals["fake_score"], trained["fake_score"]),
        "head": share.state(originals["head"], trained["head"]),
        "weights": model.weights,
        "ema": _ModuleState(ema),
        "opt_g": share.optimizer_state([trained[x] for x in gen_names], opt_g),
        "opt_c": share.optimizer_state([trained[x] for x in critic_names], opt_c),
    }
    full_config = {"kind": "distill", "train": config_dict(cfg), **(config or {})}
    run = _Run(out, cfg, objects, gens, ddp, full_config, "distill")
    start = run.begin(resume)
    # R1 differentiates the discriminator's feature network twice, which compiled graphs
    # (aot_autograd) do not support: that network stays eager when R1 is on.
    loss_cfg = getattr(model, "cfg", None)
    r1_net = "teacher" if getattr(loss_cfg, "disc_features", "teacher") == "teacher" else "fake"
    eager = r1_net if getattr(loss_cfg, "r1_gamma", 0) > 0 else None
    if eager != "teacher":
        compile_modules([model.teacher], ddp.device, cfg.compile, cfg.compile_backend)
    if eager == "fake":
        share.eager.add(id(trained["fake_score"]))
    share.compile([trained["generator"], *([] if eager == "fake" else [trained["fake_score"]])])
    guard, micro = FiniteGuard(ddp.device), MicroBatches(gens, k)
    clip, dev = cfg.grad_clip, ddp.device

    def accumulate(loss_of: Callable[[], tuple[Tensor, dict]], names, others) -> dict[str, Stat]:
        """Forward and backward over the micro-batches of one update (training the networks
        ``names``, calling ``others`` too); merged statistics."""
        parts = []
        nets, rest = [trained[x] for x in names], [trained[x] for x in others]
        for m in micro:
            with share.no_sync([*rest, *(nets if m < k - 1 else [])]):
                with autocast(dev, cfg.bf16):
                    loss, st = loss_of()
                parts.append(st)
                _backward(loss, st, 1 / k, guard)
        for name, net in zip(names, share.reduce(nets), strict=True):
            if net is not trained[name]:  # wrapped by DDP after its first update
                trained[name] = net
                setattr(model, name, net)
        return merge_stats(parts)

    def critic_loss():
        x_real, c_real = sample_real(n, gens["data"])
        z, c = sample_latents(n, gens["noise"])
        return model.critic_loss(z, c, x_real, c_real, gens["noise"])

    def generator_loss():
        z, c = sample_latents(n, gens["noise"])
        return model.generator_loss(z, c, gens["noise"])

    try:
        with _installed(model, trained):
            for step in range(start, cfg.steps):
                done = step + 1
                cparts = []
                for _ in range(cfg.critic_ratio):
                    opt_c.zero_grad(set_to_none=True)
                    cstats = accumulate(critic_loss, critic_names, gen_names)
                    apply_update(
                        opt_c,
                        critic_params,
                        cstats,
                        step=done,
                        grad_clip=clip,
                        guard=guard,
                        norm_key="grad_norm_critic",
                    )
                    cparts.append(cstats)
                cstats = merge_stats(cparts)  # logged: the mean over this step's critic updates
                opt_g.zero_grad(set_to_none=True)
                gstats = accumulate(generator_loss, gen_names, critic_names)
                apply_update(
                    opt_g,
                    gen_params,
                    gstats,
                    step=done,
                    grad_clip=clip,
                    guard=guard,
                    norm_key="grad_norm_gen",
                )
                ema.update(model.generator, done if cfg.ema_warmup else None, skip=guard.tripped)
                _end_step(run, guard, done, cstats | gstats)
                if on_step is not None:
                    on_step(done, ema)
        share.finish()
    finally:
        run.close()
    return ema
