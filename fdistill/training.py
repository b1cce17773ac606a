"""Training infrastructure shared by teacher training and distillation.

One process or many: under ``torchrun`` (``RANK`` set) every rank runs the same loop on its
share of the global batch and gradients are averaged across ranks before each optimiser step
(data parallelism over ``torch.distributed``; gloo on CPU, nccl on CUDA). Randomness comes
from explicit per-rank generators whose states go into every checkpoint, so a resumed run
continues bit for bit where the straight run would have been. With the rank-independent
streams of :func:`make_batch_randoms` (:class:`fdistill.rng.BatchRandom`) each rank draws
exactly its slice of the global batch, so N processes compute what one process would.

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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fdistill.rng import BatchRandom, RandomSource
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
    """All-reduce (mean) the gradients of ``params`` across ranks, in one flat buffer."""
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


# --------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a module's parameters and buffers."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = float(decay)
        self.module = copy.deepcopy(module).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, module: nn.Module, step: int | None = None) -> None:
        """Blend ``module`` in. With ``step`` (updates so far) the decay warms up as
        ``min(decay, (1 + step) / (10 + step))``, so a short run's average is not dominated
        by the initial weights."""
        decay = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.module.parameters(), module.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(self.module.buffers(), module.buffers(), strict=True):
            e.copy_(b)


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


def check_finite(step: int, stats: dict[str, float]) -> None:
    """Raise :class:`NonFiniteError` if any logged value (losses, gradient norms) is NaN/Inf."""
    bad = [k for k, v in stats.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(
            f"non-finite {', '.join(bad)} at step {step}: training stopped; the last good "
            "checkpoint is kept. Lower the learning rate, enable grad clipping, or check the data."
        )


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
    """Backward, average gradients over ranks, stop on NaN/Inf, clip, step.

    ``step`` is the 1-based number of the step being made (used in the NaN/Inf message).
    The gradient norm is computed once, after averaging (so every rank sees the same value and
    all stop together), logged as ``stats[norm_key]``, checked, and reused for clipping.
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(params, world)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    stats[norm_key] = float(norm)
    check_finite(step, stats)
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    opt.step()


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
    """Write ``checkpoint.pt`` (state of every object, RNG of every rank, step, config)."""
    rngs = _gather_rng(gens, ddp.world)
    if not ddp.main:
        return
    state = {
        "step": step,
        "config": config,
        "world": ddp.world,
        "rng": rngs,
        "state": {k: o.state_dict() for k, o in objects.items()},
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
    return {
        name: BatchRandom(seed * 1_000_003 + i, ddp.rank, ddp.world, ddp.device)
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
    """Settings every training loop shares: length, batch, optimiser, EMA, bookkeeping.

    ``steps`` is the total, so a resumed run ends where the straight run would. ``batch`` is
    the global batch, split evenly over processes. ``ema_warmup`` ramps the EMA decay up from
    0 (see :meth:`EMA.update`). ``bf16`` (autocast) and ``compile`` (``torch.compile``) act on
    CUDA only and are no-ops on a CPU.
    """

    steps: int = 2000
    batch: int = 256
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


# --------------------------------------------------------------------------- precision
def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast where supported (CUDA), otherwise a no-op context."""
    if bf16 and bf16_supported(device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_modules(modules: Iterable[nn.Module], device: torch.device, enabled: bool) -> None:
    """``torch.compile`` the modules in place (state-dict keys unchanged), on CUDA only."""
    if enabled and device.type == "cuda":
        for m in modules:
            m.compile()


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
                ("compile", ddp.device.type == "cuda"),
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
    b = per_rank_batch(cfg.batch, ddp.world)
    gens = gens if gens is not None else make_generators(cfg.seed, ddp)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = EMA(denoiser, cfg.ema_decay)
    objects = {"net": denoiser, "ema": _ModuleState(ema), "opt": opt}
    full_config = {"kind": "teacher", "train": config_dict(cfg), **(config or {})}
    run = _Run(out, cfg, objects, gens, ddp, full_config, "teacher")
    start = run.begin(resume)
    compile_modules([denoiser], ddp.device, cfg.compile)
    try:
        for step in range(start, cfg.steps):
            if cfg.lr_warmup > 0:
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup)
            x0, cond = sample_real(b, gens["data"])
            with autocast(ddp.device, cfg.bf16):
                loss = loss_fn(denoiser, x0, cond, generator=gens["noise"]).mean()
            stats = {"loss": float(loss.detach())}
            optimizer_step(
                opt, params, loss, stats, step=step + 1, grad_clip=cfg.grad_clip, world=ddp.world
            )
            done = step + 1
            ema.update(denoiser, done if cfg.ema_warmup else None)
            run.end_step(done, stats)
            if on_step is not None:
                on_step(done, ema)
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
    :func:`make_generators`). Returns the generator's EMA.
    """
    ddp = ddp or Dist()
    out = Path(out) if out is not None else None
    b = per_rank_batch(cfg.batch, ddp.world)
    gens = gens if gens is not None else make_generators(cfg.seed, ddp)
    gen_params = [p for p in model.generator.parameters() if p.requires_grad]
    critic_params = model.critic_parameters()
    opt_g = torch.optim.AdamW(
        gen_params, lr=cfg.lr_gen, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    opt_c = torch.optim.AdamW(
        critic_params, lr=cfg.lr_critic, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    ema = EMA(model.generator, cfg.ema_decay)
    objects = {
        "generator": model.generator,
        "fake_score": model.fake_score,
        "head": model.head,
        "weights": model.weights,
        "ema": _ModuleState(ema),
        "opt_g": opt_g,
        "opt_c": opt_c,
    }
    full_config = {"kind": "distill", "train": config_dict(cfg), **(config or {})}
    run = _Run(out, cfg, objects, gens, ddp, full_config, "distill")
    start = run.begin(resume)
    compile_modules([model.teacher, model.generator, model.fake_score], ddp.device, cfg.compile)
    clip, world = cfg.grad_clip, ddp.world
    try:
        for step in range(start, cfg.steps):
            for _ in range(cfg.critic_ratio):
                x_real, c_real = sample_real(b, gens["data"])
                z, c = sample_latents(b, gens["noise"])
                with autocast(ddp.device, cfg.bf16):
                    loss, cstats = model.critic_loss(z, c, x_real, c_real, gens["noise"])
                optimizer_step(
                    opt_c,
                    critic_params,
                    loss,
                    cstats,
                    step=step + 1,
                    grad_clip=clip,
                    world=world,
                    norm_key="grad_norm_critic",
                )
            z, c = sample_latents(b, gens["noise"])
            with autocast(ddp.device, cfg.bf16):
                loss, gstats = model.generator_loss(z, c, gens["noise"])
            optimizer_step(
                opt_g,
                gen_params,
                loss,
                gstats,
                step=step + 1,
                grad_clip=clip,
                world=world,
                norm_key="grad_norm_gen",
            )
            done = step + 1
            ema.update(model.generator, done if cfg.ema_warmup else None)
            run.end_step(done, cstats | gstats)
            if on_step is not None:
                on_step(done, ema)
    finally:
        run.close()
    return ema
