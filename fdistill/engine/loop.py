"""The engine: one training loop for every method (teacher training, f-distill, DMD2, toys).

:func:`train` runs a :class:`fdistill.methods.base.Method`'s :class:`~fdistill.methods.base.Plan`
for ``cfg.steps`` steps: each step runs the plan's phases in order (each ``repeat`` times, one
optimiser update each), then updates the EMA, logs and checkpoints. Everything around the
updates is here once: processes (DDP or FSDP2), ``batch_gpu`` micro-batch accumulation, bf16
autocast, ``torch.compile``, the device-side NaN/Inf guard, logging, checkpoint cadence, strict
resume of every random stream, and the progress bar.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill.engine.config import LoopConfig
from fdistill.engine.processes import Dist, Generators, make_generators
from fdistill.engine.sharing import (
    Sharing,
    autocast,
    bf16_supported,
    compile_modules,
    compile_supported,
)
from fdistill.engine.state import EMA, ModuleState, config_dict, restore_run, save_run
from fdistill.engine.stats import (
    FiniteGuard,
    RunLog,
    Stat,
    apply_update,
    host_stats,
    make_adamw,
    merge_stats,
)
from fdistill.methods.base import Inputs, Method, Phase
from fdistill.rng import BatchRandom
from fdistill.runs import CHECKPOINT, load_checkpoint, trim_metrics, write_config


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
    loss that is a mean of per-sample terms, and for a loss normalised by statistics of its
    batch that names a ``prepare`` pass (the ratio normaliser: see ``whole_batch`` in
    :func:`train`). Not exact: dropout masks (the global torch RNG) and plain
    ``torch.Generator`` streams, which draw the micro-batches one after another.
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


# --------------------------------------------------------------------------- the loop
@contextlib.contextmanager
def installed(owner: nn.Module, modules: dict[str, nn.Module]):
    """Put ``modules`` in place of ``owner``'s attributes of the same names for the block."""
    saved = {name: getattr(owner, name) for name in modules}
    for name, m in modules.items():
        setattr(owner, name, m)
    try:
        yield
    finally:
        for name, m in saved.items():
            setattr(owner, name, m)


def _backward(
    loss: Tensor, stats: dict[str, Stat], scale: float, guard: FiniteGuard, poison: bool = True
) -> None:
    """``(scale * loss).backward()``; with ``poison``, NaN gradients if a statistic is NaN/Inf
    on this rank.

    The poisoned gradients reach every rank through the reduction, so all ranks see a
    non-finite gradient norm at the same update and stop together. One process needs no
    poison (the guard reads the statistics themselves), and ``loss * 1.0`` is ``loss``: then
    this is a plain backward pass, with the same gradients to the bit.
    """
    if not poison:
        (loss if scale == 1 else loss * scale).backward()
        return
    bad = guard.nonfinite(stats)[1].any()
    poison = torch.where(bad, torch.full_like(bad, float("nan"), dtype=loss.dtype), scale)
    (loss * poison).backward()


def compile_backend(cfg: LoopConfig, device: torch.device) -> str | None:
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


class _Bookkeeping:
    """What happens around the updates: resume, config.json, logging, checkpoints."""

    def __init__(self, out, cfg, objects, gens, ddp, config, desc):
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

    def end_step(self, done: int, guard: FiniteGuard, stats: Callable[[], dict[str, Stat]]) -> None:
        """Check for NaN/Inf and copy statistics to the host where due (logging and checkpoint
        steps, and the last), then log, and checkpoint every ``ckpt_every`` steps and at the end.
        ``stats()`` merges the step's statistics; it is called only where they are due."""
        cfg = self.cfg
        log = done % cfg.log_every == 0 or done == cfg.steps
        ckpt = self.out is not None and (done % cfg.ckpt_every == 0 or done == cfg.steps)
        host: dict[str, float] = {}
        if log or done % cfg.ckpt_every == 0:
            guard.check()
            host = host_stats(stats())
        self.log.step(done, host, log)
        if ckpt:
            save_run(self.out, done, self.config, self.objects, self.gens, self.ddp)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


class Engine:
    """A method set up to train: its trained modules (wrapped or sharded for the processes),
    optimisers, EMA, random streams and NaN/Inf guard. :meth:`update` is one optimiser update
    and :meth:`step` one engine step, exactly as :func:`train` makes them, so benchmarks time
    the real update (``benchmarks/real_size.py``); call them inside :meth:`running`."""

    def __init__(
        self,
        method: Method,
        inputs: Inputs,
        cfg: LoopConfig,
        *,
        ddp: Dist | None = None,
        gens: Generators | None = None,
    ):
        self.method, self.inputs, self.cfg = method, inputs, cfg
        self.ddp = ddp = ddp or Dist()
        self.n, self.k = micro_batches(cfg, ddp.world)
        self.gens = gens if gens is not None else make_generators(cfg.seed, ddp)
        self.plan = plan = method.plan(cfg)
        self.share = share = Sharing(ddp, cfg.fsdp, compile_backend(cfg, ddp.device))
        self.ema = EMA(getattr(method, plan.ema), cfg.ema_decay)
        originals = {name: getattr(method, name) for name in method.trained}
        self.trained = trained = {name: share.prepare(m) for name, m in originals.items()}
        with installed(method, trained):
            self.params = {
                o: method.parameters_of(spec.modules) for o, spec in plan.optimizers.items()
            }
        self.opts = {
            o: make_adamw(self.params[o], spec.lr, cfg.betas, cfg.weight_decay, ddp.device)
            for o, spec in plan.optimizers.items()
        }
        objects: dict[str, object] = {
            name: share.state(originals[name], trained[name]) for name in trained
        }
        objects |= method.state_objects() | {"ema": ModuleState(self.ema)}
        for o, spec in plan.optimizers.items():
            objects[o] = share.optimizer_state([trained[m] for m in spec.modules], self.opts[o])
        self.objects = objects
        self.guard, self.micro = FiniteGuard(ddp.device), MicroBatches(self.gens, self.k)
        # At tiny sizes the per-update Python work shows: nothing is done for DDP, bf16 or
        # several processes where there are none (see benchmarks/engine_overhead.py).
        self.ddp_kind, self.poison = share.kind == "ddp", ddp.world > 1
        self.amp = bf16_supported(ddp.device) and cfg.bf16
        self.null = contextlib.nullcontext()

    def compile(self) -> None:
        """``torch.compile`` what the plan allows (the frozen teacher, the trained networks
        that are differentiated once)."""
        plan, cfg = self.plan, self.cfg
        compile_modules(plan.compile_frozen, self.ddp.device, cfg.compile, cfg.compile_backend)
        for name in plan.eager:
            self.share.eager.add(id(self.trained[name]))
        self.share.compile([self.trained[x] for x in plan.compile if x not in plan.eager])

    def running(self) -> contextlib.AbstractContextManager:
        """The method's trained modules replaced by their wrappers / shards for the block."""
        return installed(self.method, self.trained)

    def phase(self, name: str) -> Phase:
        """The plan's phase called ``name``."""
        return next(p for p in self.plan.phases if p.name == name)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.ddp.device, True) if self.amp else self.null

    def _whole_batch(self, phase: Phase) -> contextlib.AbstractContextManager:
        """With micro-batches, a phase whose loss normalises over its batch (``prepare``) first
        runs every micro-batch without gradients to gather the per-sample statistics, then
        replays the same draws (every random stream rewound) with the loss normalised by the
        whole batch's statistics: accumulation then changes memory, not the result."""
        if self.k == 1 or phase.prepare is None:
            return self.null
        saved = {name: g.get_state() for name, g in self.gens.items()}
        torch_state = torch.get_rng_state()
        rows = []
        with torch.no_grad():
            for _ in self.micro:
                with self._autocast():
                    rows.append(phase.prepare(self.inputs, self.n, self.gens))
        for name, g in self.gens.items():
            g.set_state(saved[name])
        torch.set_rng_state(torch_state)
        return phase.fixed(torch.cat(rows))

    def _accumulate(self, phase: Phase) -> dict[str, Stat]:
        """Forward and backward over the micro-batches of one update; merged statistics."""
        names = self.plan.optimizers[phase.optimizer].modules
        trained, k, share = self.trained, self.k, self.share
        nets = [trained[x] for x in names]
        rest = [m for x, m in trained.items() if x not in names] if self.ddp_kind else []
        parts = []
        with self._whole_batch(phase):
            for m in self.micro:
                sync = share.no_sync([*rest, *(nets if m < k - 1 else [])])
                with sync if self.ddp_kind else self.null:
                    with self._autocast():
                        loss, st = phase.loss(self.inputs, self.n, self.gens)
                    parts.append(st)
                    _backward(loss, st, 1 / k, self.guard, self.poison)
        if self.ddp_kind:
            for name, net in zip(names, share.reduce(nets), strict=True):
                if net is not trained[name]:  # wrapped by DDP after its first update
                    trained[name] = net
                    setattr(self.method, name, net)
        return merge_stats(parts)

    def update(self, phase: Phase, step: int) -> dict[str, Stat]:
        """One optimiser update of ``phase`` (``step``: the 1-based step it belongs to)."""
        opt = self.opts[phase.optimizer]
        opt.zero_grad(set_to_none=True)
        st = self._accumulate(phase)
        apply_update(
            opt,
            self.params[phase.optimizer],
            st,
            step=step,
            grad_clip=self.cfg.grad_clip,
            guard=self.guard,
            norm_key=phase.norm_key,
        )
        return st

    def step(self, done: int) -> list[list[dict[str, Stat]]]:
        """Engine step ``done`` (1-based): learning-rate warm-up, every phase ``repeat`` times,
        the EMA; the statistics of every update, by phase."""
        for o, spec in self.plan.optimizers.items():
            if spec.warmup > 0:
                for group in self.opts[o].param_groups:
                    group["lr"] = spec.lr * min(1.0, done / spec.warmup)
        phase_parts = [[self.update(p, done) for _ in range(p.repeat)] for p in self.plan.phases]
        warm = done if self.cfg.ema_warmup else None
        self.ema.update(getattr(self.method, self.plan.ema), warm, skip=self.guard.tripped)
        return phase_parts


def step_stats(phases: list[list[dict[str, Stat]]]) -> dict[str, Stat]:
    """A step's statistics: for each phase the mean over its updates."""
    out: dict[str, Stat] = {}
    for parts in phases:
        out |= merge_stats(parts)
    return out


def train(
    method: Method,
    inputs: Inputs,
    cfg: LoopConfig,
    out: str | Path | None = None,
    *,
    config: dict | None = None,
    ddp: Dist | None = None,
    resume: bool = False,
    gens: Generators | None = None,
    on_step: Callable[[int, EMA], None] | None = None,
) -> EMA:
    """Run ``method`` for ``cfg.steps`` steps (the total: a resumed run ends where the straight
    run would); return the EMA of its plan's ``ema`` module.

    Batches come from ``inputs`` through the ``"data"`` and ``"noise"`` streams of ``gens``
    (default: per-rank :func:`fdistill.engine.make_generators`). With ``out`` the run folder gets
    ``config.json`` (``{"kind": method.kind, "train": cfg, **config}``), ``metrics.jsonl`` and
    ``checkpoint.pt`` (every trained module, the method's other state, the EMA, the optimisers,
    every rank's RNG states and the step). ``on_step(done, ema)`` runs after every step.
    Under DDP or FSDP the trained modules are replaced by their wrappers / shards for the length
    of the loop.
    """
    engine = Engine(method, inputs, cfg, ddp=ddp, gens=gens)
    out = Path(out) if out is not None else None
    full_config = {"kind": method.kind, "train": config_dict(cfg), **(config or {})}
    books = _Bookkeeping(
        out, cfg, engine.objects, engine.gens, engine.ddp, full_config, method.kind
    )
    start = books.begin(resume)
    engine.compile()
    try:
        with engine.running():
            for step in range(start, cfg.steps):
                done = step + 1
                parts = engine.step(done)
                books.end_step(done, engine.guard, lambda parts=parts: step_stats(parts))
                if on_step is not None:
                    on_step(done, engine.ema)
        engine.share.finish()
    finally:
        books.close()
    return engine.ema
