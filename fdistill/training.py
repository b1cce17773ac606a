"""Training infrastructure shared by teacher training and distillation.

One process or many: under ``torchrun`` (``RANK`` set) every rank runs the same loop on its
share of the global batch and gradients are averaged across ranks before each optimiser step
(data parallelism over ``torch.distributed``; gloo on CPU, nccl on CUDA). Randomness comes
from explicit per-rank generators whose states go into every checkpoint, so a resumed run
continues bit for bit where the straight run would have been.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

CHECKPOINT = "checkpoint.pt"


# --------------------------------------------------------------------------- processes
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> Dist:
    """Join the ``torchrun`` process group when ``RANK`` is set; otherwise one CPU/GPU process."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return Dist(0, 1, torch.device(want))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if want == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return Dist(rank, world, torch.device("cuda", local))
    return Dist(rank, world, torch.device(want))


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
    def update(self, module: nn.Module) -> None:
        for e, p in zip(self.module.parameters(), module.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - self.decay)
        for e, b in zip(self.module.buffers(), module.buffers(), strict=True):
            e.copy_(b)


# --------------------------------------------------------------------------- checkpoints
def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint) or a checkpoint file; clear error otherwise."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    if not p.is_file():
        raise FileNotFoundError(
            f"no checkpoint at '{path}': pass a run folder written by fdistill "
            f"(containing {CHECKPOINT}) or a checkpoint file"
        )
    return p


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    return torch.load(resolve_checkpoint(path), map_location=map_location, weights_only=True)


def rng_state(gens: dict[str, torch.Generator]) -> dict[str, Tensor]:
    state = {k: g.get_state() for k, g in gens.items()}
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(gens: dict[str, torch.Generator], state: dict[str, Tensor]) -> None:
    for k, g in gens.items():
        g.set_state(state[k])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- logging
class NonFiniteError(RuntimeError):
    """Raised when a loss or gradient turns NaN/Inf; the last good checkpoint stays intact."""


def check_finite(step: int, stats: dict[str, float], params: Iterable[nn.Parameter]) -> None:
    bad = [k for k, v in stats.items() if not math.isfinite(v)]
    if not bad:
        total = sum(float(p.grad.float().pow(2).sum()) for p in params if p.grad is not None)
        if not math.isfinite(total):
            bad = ["gradient norm"]
    if bad:
        raise NonFiniteError(
            f"non-finite {', '.join(bad)} at step {step}: training stopped; the last good "
            "checkpoint is kept. Lower the learning rate, enable grad clipping, or check the data."
        )


class RunLog:
    """JSONL metrics (+ TensorBoard when installed) and a progress bar, on the main rank only."""

    def __init__(self, out: Path | None, total: int, start: int, enabled: bool, desc: str):
        self.enabled = enabled and out is not None
        self.bar = None
        self.tb = None
        if not enabled:
            return
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
        self.t0 = time.perf_counter()

    def step(self, step: int, stats: dict[str, float], log: bool) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if log:
            short = {k: f"{v:.3g}" for k, v in stats.items() if k.startswith(("loss", "h_"))}
            self.bar.set_postfix(short, refresh=False)
            if self.enabled:
                rec = {"step": step, "time": time.perf_counter() - self.t0, **stats}
                self.jsonl.write(json.dumps(rec) + "\n")
                self.jsonl.flush()
                if self.tb is not None:
                    for k, v in stats.items():
                        self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def config_dict(cfg) -> dict:
    return asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else dict(cfg)


def clip_and_step(
    opt: torch.optim.Optimizer, params: list[nn.Parameter], grad_clip: float, world: int
) -> None:
    average_gradients(params, world)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


StepCallback = Callable[[int], None]


def _gather_rng(gens: dict[str, torch.Generator], world: int) -> list[dict[str, Tensor]]:
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
    gens: dict[str, torch.Generator],
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


def restore_run(
    ckpt: dict, objects: dict[str, object], gens: dict[str, torch.Generator], ddp: Dist
) -> int:
    """Load a checkpoint written by :func:`save_run` into ``objects``; return its step."""
    for k, o in objects.items():
        o.load_state_dict(ckpt["state"][k])
    if ckpt.get("world", 1) == ddp.world:
        set_rng_state(gens, ckpt["rng"][ddp.rank])
    elif ddp.main:
        print(
            f"note: checkpoint was written by {ckpt.get('world')} processes, resuming with "
            f"{ddp.world}: random streams restart, the run is no longer bit-identical"
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


class _ModuleState:
    """Adapter so the EMA's module is saved/restored like any other object."""

    def __init__(self, ema: EMA):
        self.ema = ema

    def state_dict(self):
        return self.ema.module.state_dict()

    def load_state_dict(self, sd):
        self.ema.module.load_state_dict(sd)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings (the method's own settings are in LossConfig)."""

    steps: int = 2000
    batch: int = 256
    critic_ratio: int = 5
    lr_gen: float = 1e-4
    lr_critic: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    grad_clip: float = 10.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 1000
    progress: bool = True


def per_rank_batch(batch: int, world: int) -> int:
    if batch % world:
        raise ValueError(f"global batch {batch} is not divisible by {world} processes")
    return batch // world


def train_distill(
    model,
    sample_real: Callable[[int, torch.Generator], tuple[Tensor, Tensor | None]],
    sample_latents: Callable[[int, torch.Generator], tuple[Tensor, Tensor | None]],
    cfg: TrainConfig,
    out: Path | None = None,
    *,
    config: dict | None = None,
    ddp: Dist | None = None,
    resume: bool = False,
    on_step: Callable[[int, EMA], None] | None = None,
) -> EMA:
    """Distil: ``critic_ratio`` critic updates, then one generator update, ``cfg.steps`` times.

    ``model`` is an :class:`fdistill.distill.FDistill`; ``sample_real(n, gen)`` and
    ``sample_latents(n, gen)`` return this rank's share of a batch with its labels.
    ``cfg.steps`` is the total, so a resumed run ends where the straight run would.
    Returns the generator's EMA.
    """
    ddp = ddp or Dist()
    out = Path(out) if out is not None else None
    b = per_rank_batch(cfg.batch, ddp.world)
    gens = make_generators(cfg.seed, ddp)
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
    start = 0
    if resume and out is not None and (out / CHECKPOINT).is_file():
        start = restore_run(load_checkpoint(out, ddp.device), objects, gens, ddp)
        if ddp.main:
            print(f"resumed from {out / CHECKPOINT} at step {start}")
    if out is not None and ddp.main:
        atomic_write_text(json.dumps(full_config, indent=2, default=str), out / "config.json")

    log = RunLog(out, cfg.steps, start, ddp.main and cfg.progress, "distill")
    try:
        for step in range(start, cfg.steps):
            stats: dict[str, float] = {}
            for _ in range(cfg.critic_ratio):
                x_real, c_real = sample_real(b, gens["data"])
                z, c = sample_latents(b, gens["noise"])
                loss, cstats = model.critic_loss(z, c, x_real, c_real, gens["noise"])
                opt_c.zero_grad(set_to_none=True)
                loss.backward()
                check_finite(step, cstats, critic_params)
                clip_and_step(opt_c, critic_params, cfg.grad_clip, ddp.world)
            stats |= cstats
            z, c = sample_latents(b, gens["noise"])
            loss, gstats = model.generator_loss(z, c, gens["noise"])
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            check_finite(step, gstats, gen_params)
            clip_and_step(opt_g, gen_params, cfg.grad_clip, ddp.world)
            ema.update(model.generator)
            stats |= gstats
            done = step + 1
            log.step(done, stats, done % cfg.log_every == 0 or done == cfg.steps)
            if out is not None and (done % cfg.ckpt_every == 0 or done == cfg.steps):
                save_run(out, done, full_config, objects, gens, ddp)
            if on_step is not None:
                on_step(done, ema)
    finally:
        log.close()
    return ema
