"""The image pipeline: train an EDM teacher, distil it into a one-step student, sample a run.

A *run folder* (:mod:`fdistill.runs`) holds ``checkpoint.pt`` (weights, EMA, optimisers, RNG
states, step and the full config) and ``config.json`` beside it; the config's ``model`` dict
rebuilds the network through :func:`fdistill.denoisers.registry.build_denoiser`, so a run
reloads itself without the command that made it, whatever family its teacher came from.

* :func:`train_teacher_run` — EDM denoising score matching on an image data set.
* :func:`distill_run` — f-distill from any teacher :func:`fdistill.teachers.load_teacher`
  reads: student ``G(z, c) = D_G(sigma_max z, sigma_max, c)`` and fake score copied from the
  teacher, a discriminator head on the teacher's (or fake score's) encoder maps.
* :func:`load_run` / :func:`sample_run` — runs, exports and raw teachers; per-sample seeds, so
  samples do not depend on the batch size.

Every option is validated before any work starts, and ``--resume`` is strict: every option
that changes what is trained must equal the saved run's (:func:`fdistill.runs.check_resume`).

Every random draw during training comes from :func:`fdistill.training.make_batch_randoms`:
rank ``r`` of ``N`` processes draws exactly its slice of what one process would draw.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill import rng, runs
from fdistill.critic import MultiScaleHead
from fdistill.data import ImageDataset, load_dataset
from fdistill.denoisers import EDMLoss
from fdistill.denoisers.base import FeatureTaps
from fdistill.denoisers.registry import build_denoiser, copy_denoiser, inference_config
from fdistill.distill import FDistill, LossConfig
from fdistill.divergences import get_divergence
from fdistill.fsutil import check_writable
from fdistill.generator import OneStepGenerator
from fdistill.images import save_image_grid
from fdistill.samplers import sample_with_nfe, seeded_randn
from fdistill.teachers import load_teacher
from fdistill.training import (
    EMA,
    Dist,
    LoopConfig,
    TeacherTrainConfig,
    TrainConfig,
    distributed,
    make_batch_randoms,
    train_distill,
    train_teacher,
)

ARCHS = ("unet", "mlp")
SAMPLER_RHO = 7.0


# --------------------------------------------------------------------------- models
def default_model(arch: str, shape: tuple[int, int, int], num_classes: int, **overrides) -> dict:
    """The ``model`` config of a denoiser for images of ``shape`` (C, H, W).

    Defaults suit 8x8 digits on a CPU; ``overrides`` replace any key (e.g. ``model_channels``).
    """
    c, h, w = shape
    if arch == "unet":
        cfg = {
            "type": "unet",
            "img_resolution": h,
            "in_channels": c,
            "model_channels": 16,
            "channel_mult": [1, 2],
            "num_blocks": 1,
            "attn_resolutions": [],
            "mid_attention": True,
            "dropout": 0.0,
            "num_classes": num_classes,
            "label_dropout": 0.1 if num_classes else 0.0,  # trains the null label for CFG
            "embedding": "positional",
        }
    elif arch == "mlp":
        cfg = {"type": "mlp", "dim": c * h * w, "hidden": 256, "depth": 3, "emb": 64}
        cfg["num_classes"] = num_classes
    else:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHS)}")
    cfg["sigma_data"] = 0.5
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown {arch} option(s) {sorted(unknown)}; valid: {sorted(cfg)}")
    return cfg | overrides


# --------------------------------------------------------------------------- data
def image_sampler(
    ds: ImageDataset, device: torch.device, conditional: bool, *, workers: int = 0
) -> Callable[[int, rng.RandomSource], tuple[Tensor, Tensor | None]]:
    """``sample(n, gen)``: ``n`` images (with replacement) and their labels (or None).

    The images stay in host memory; each process gathers only its rows of every draw (in
    ``workers`` ``DataLoader`` processes, or itself by default) and the draws are those of
    ``rng.randint(len(ds), (n,), gen)`` (see :class:`fdistill.loader.ImageLoader`).
    """
    from fdistill.loader import ImageLoader

    return ImageLoader(ds, device, conditional, workers=workers)


def latent_sampler(
    shape: tuple[int, ...], num_classes: int, device: torch.device
) -> Callable[[int, rng.RandomSource], tuple[Tensor, Tensor | None]]:
    """``sample(n, gen)``: unit-normal latents and uniform class labels (None if unconditional)."""

    def sample(n: int, gen: rng.RandomSource) -> tuple[Tensor, Tensor | None]:
        z = rng.randn((n, *shape), gen, device=device)
        c = rng.randint(num_classes, (n,), gen, device=device) if num_classes else None
        return z, c

    return sample


# --------------------------------------------------------------------------- sampling
# torch's CPU generator keeps only the low 32 bits of a seed, so seeds are built inside them.
_SEED_STRIDE = 1_000_003
_LABEL_SALT = 0x5EED5EED


def sample_seeds(seed: int, n: int) -> list[int]:
    """Per-sample seeds: sample ``i`` of ``--seed s`` uses ``(s * 1_000_003 + i) mod 2**32``,
    so different ``s`` give disjoint samples for up to a million samples each."""
    return [(seed * _SEED_STRIDE + i) % (1 << 32) for i in range(n)]


def seeded_labels(seeds: list[int], num_classes: int) -> Tensor:
    """A uniform class per sample, from that sample's own seed (independent of its latent)."""
    gens = (torch.Generator().manual_seed(s ^ _LABEL_SALT) for s in seeds)
    return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in gens])


@torch.no_grad()
def generate(
    fn: Callable[[Tensor, Tensor | None], Tensor],
    shape: tuple[int, ...],
    seeds: list[int],
    labels: Tensor | None = None,
    batch: int = 256,
    device: torch.device | str = "cpu",
    *,
    ddp: Dist | None = None,
) -> Tensor | None:
    """``fn(z, c)`` over latents drawn per seed, ``batch`` samples at a time; float [N, ...].

    With ``ddp`` of several processes (``torchrun``) every rank must call it: batch ``j`` runs
    on rank ``j % world``, the very batches one process would run, and rank 0 gathers them.
    Rank 0 gets all samples, the other ranks None.
    """
    rank, world = (ddp.rank, ddp.world) if ddp is not None else (0, 1)
    mine = _generate_batches(fn, shape, seeds, labels, batch, device, rank, world)
    if world > 1:
        mine = _gather_to_main(mine, world, rank)
        if mine is None:
            return None
    return torch.cat([mine[j] for j in range(len(mine))])


def _generate_batches(
    fn: Callable[[Tensor, Tensor | None], Tensor],
    shape: tuple[int, ...],
    seeds: list[int],
    labels: Tensor | None,
    batch: int,
    device: torch.device | str,
    rank: int = 0,
    world: int = 1,
) -> dict[int, Tensor]:
    """Batches ``rank, rank + world, ...`` of :func:`generate`, by batch number, on the CPU."""
    out = {}
    for j, i in enumerate(range(0, len(seeds), batch)):
        if j % world != rank:
            continue
        z = seeded_randn(seeds[i : i + batch], shape, device=device)
        c = labels[i : i + batch].to(device) if labels is not None else None
        out[j] = fn(z, c).float().cpu()
    return out


def _gather_to_main(parts: dict[int, Tensor], world: int, rank: int) -> dict[int, Tensor] | None:
    """Every rank's numbered batches, merged on rank 0 (None on the other ranks)."""
    import torch.distributed as dist

    gathered: list | None = [None] * world if rank == 0 else None
    dist.gather_object(parts, gathered, dst=0)
    if rank != 0:
        return None
    return {j: x for part in gathered for j, x in part.items()}


@dataclass
class LoadedRun:
    """A trained network rebuilt from a run: the teacher denoiser or the one-step student."""

    kind: str
    model: nn.Module
    config: dict
    step: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.config["shape"])

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])


def load_run(path: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> LoadedRun:
    """Rebuild a network to sample from: a run folder or checkpoint (teacher or student; EMA
    weights by default), an ``fdistill export`` folder, or any teacher
    :func:`fdistill.teachers.load_teacher` reads (an EDM pickle, a diffusers folder, ...)."""
    p = Path(path)
    from fdistill import t2i

    if t2i.is_unet_export(p):  # a text-to-image student in diffusers' UNet format
        return t2i.load_unet_export(p, device)
    if runs.is_export(p):
        cfg, state = runs.read_export(p)
        model = _network(cfg)
        model.load_state_dict(state)
        step = int(cfg.get("step", 0))
    elif runs.is_checkpoint_file(p / runs.CHECKPOINT if p.is_dir() else p):
        ckpt = runs.load_checkpoint(p)
        cfg, state = ckpt["config"], ckpt["state"]
        model = _network(cfg)
        key = {"teacher": ("ema", "net"), "distill": ("ema", "generator")}[cfg["kind"]]
        model.load_state_dict(state[key[0] if ema else key[1]])
        step = int(ckpt["step"])
    else:
        model = load_teacher(p)
        info = model.info
        cfg = {
            "kind": "teacher",
            "model": model.config,
            "shape": list(info.shape),
            "num_classes": info.num_classes,
            "sampler": {"sigma_min": info.sigma_min, "sigma_max": info.sigma_max, "rho": 7.0},
            "teacher": {"family": info.family, "path": str(p.resolve())},
        }
        step = 0
    model.requires_grad_(False).eval().to(device)
    return LoadedRun(cfg["kind"], model, cfg, step)


def _network(cfg: dict) -> nn.Module:
    """The network a run or export config describes (random weights)."""
    kind = cfg.get("kind")
    if kind == "teacher":
        return build_denoiser(cfg["model"])
    if kind == "distill":
        return OneStepGenerator(build_denoiser(cfg["model"]), sigma_init=cfg["sigma_init"])
    raise ValueError(f"not a teacher or distill run (kind {kind!r})")


def export_run(path: str | Path, out: str | Path, ema: bool = True) -> Path:
    """Write a run's network (the student generator, or a teacher denoiser) as safetensors with
    a ``config.json`` beside it; :func:`load_run` reads it back without the run or teacher."""
    run = load_run(path, ema=ema)
    if run.config.get("t2i"):
        from fdistill.t2i import export_unet

        return export_unet(run, out, ema)
    keep = ("kind", "model", "shape", "num_classes", "sigma_init", "sampler", "teacher", "data")
    config = {k: run.config[k] for k in keep if k in run.config}
    config |= {"step": run.step, "weights": "ema" if ema else "raw"}
    return runs.write_export(out, run.model, config)


def run_sampler(
    run: LoadedRun, nfe: int | None = None, guidance: float = 1.0
) -> Callable[[Tensor, Tensor | None], Tensor]:
    """``fn(z, c) -> images`` for a loaded run: Heun with ``nfe`` calls (teacher, default 35)
    or the student's single step."""
    if run.kind == "teacher":
        s = run.config["sampler"]
        nfe = 35 if nfe is None else nfe
        return lambda z, c: sample_with_nfe(
            run.model, z, nfe, c, s["sigma_min"], s["sigma_max"], s["rho"], guidance=guidance
        )
    if nfe not in (None, 1):
        raise ValueError(f"a one-step student samples with 1 NFE, got --nfe {nfe}")
    if guidance != 1.0:
        raise ValueError("guidance is distilled into the student; sample it without --guidance")
    return run.model


def sample_run(
    run: LoadedRun,
    n: int,
    seed: int = 0,
    *,
    nfe: int | None = None,
    class_label: int | None = None,
    guidance: float = 1.0,
    batch: int = 256,
    device: str | torch.device = "cpu",
    ddp: Dist | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """``n`` samples [n, C, H, W] in [-1, 1] (unclipped floats) and their labels.

    Sample ``i`` depends only on the checkpoint, ``seed`` and ``i``. Class-conditional runs
    use ``class_label`` for every sample, or a uniform label per sample from its seed.
    Under ``torchrun`` pass ``ddp`` (every rank calls it): the ranks share the batches and
    rank 0 gets the samples, equal to one process's; the other ranks get None for them.
    """
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if run.config.get("model", {}).get("type") == "sd-unet":
        raise ValueError(
            "a text-to-image model samples from prompts: pass --prompt TEXT or --prompts FILE "
            "(fdistill.t2i.sample_images)"
        )
    seeds = sample_seeds(seed, n)
    labels = None
    if run.num_classes:
        if class_label is None:
            labels = seeded_labels(seeds, run.num_classes)
        elif 0 <= class_label < run.num_classes:
            labels = torch.full((n,), class_label, dtype=torch.long)
        else:
            raise ValueError(f"--class must be in [0, {run.num_classes}), got {class_label}")
    elif class_label is not None:
        raise ValueError("--class given but the run is unconditional")
    fn = run_sampler(run, nfe, guidance)
    return generate(fn, run.shape, seeds, labels, batch, device, ddp=ddp), labels


def grid_labels(n: int, num_classes: int) -> Tensor | None:
    """Labels ``i % num_classes`` so that each column of a ``num_classes``-wide grid is a class."""
    return torch.arange(n) % num_classes if num_classes else None


def _grid_writer(
    out: Path | None,
    every: int,
    total: int,
    ddp: Dist,
    shape: tuple[int, ...],
    num_classes: int,
    n: int,
    render: Callable[[nn.Module], Callable[[Tensor, Tensor | None], Tensor]],
) -> Callable[[int, EMA], None]:
    """Training callback: a PNG grid of EMA samples (fixed seeds) every ``every`` steps."""
    seeds, labels = sample_seeds(0, n), grid_labels(n, num_classes)

    def on_step(done: int, ema: EMA) -> None:
        if out is None or not ddp.main or every <= 0 or (done % every and done != total):
            return
        images = generate(render(ema.module), shape, seeds, labels, device=ddp.device)
        path = out / "grids" / f"{done:07d}.png"
        save_image_grid(images, path, nrow=num_classes or None, padding=1)

    return on_step


# --------------------------------------------------------------------------- validation
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"{_flag(name)} must be {rule}, got {value!r}")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_loop(cfg: LoopConfig, world: int = 1) -> None:
    """Every numeric option of a training loop in its range, before any work starts."""
    for name in ("steps", "batch", "log_every", "ckpt_every"):
        v = getattr(cfg, name)
        _check(isinstance(v, int) and v >= 1, name, v, "an integer >= 1")
    _check(cfg.batch % world == 0, "batch", cfg.batch, f"divisible by the {world} processes")
    _check(
        _finite(cfg.ema_decay) and 0 <= cfg.ema_decay < 1, "ema_decay", cfg.ema_decay, "in [0, 1)"
    )
    _check(_finite(cfg.grad_clip) and cfg.grad_clip >= 0, "grad_clip", cfg.grad_clip, ">= 0")
    _check(
        _finite(cfg.weight_decay) and cfg.weight_decay >= 0,
        "weight_decay",
        cfg.weight_decay,
        ">= 0",
    )
    _check(all(_finite(b) and 0 <= b < 1 for b in cfg.betas), "betas", cfg.betas, "in [0, 1)")
    for name in ("lr", "lr_gen", "lr_critic"):
        if hasattr(cfg, name):
            v = getattr(cfg, name)
            _check(_finite(v) and v > 0, name, v, "a finite number > 0")
    if hasattr(cfg, "critic_ratio"):
        _check(cfg.critic_ratio >= 1, "critic_ratio", cfg.critic_ratio, "an integer >= 1")
    if hasattr(cfg, "lr_warmup"):
        _check(cfg.lr_warmup >= 0, "lr_warmup", cfg.lr_warmup, "an integer >= 0")
    per_rank = cfg.batch // world
    v = getattr(cfg, "batch_gpu", None)
    if v is not None:
        _check(isinstance(v, int) and v >= 1, "batch_gpu", v, "an integer >= 1")
        _check(per_rank % v == 0 or v >= per_rank, "batch_gpu", v,
               f"a divisor of the per-process batch {per_rank}")  # fmt: skip


def _validate_common(cfg) -> None:
    _check(cfg.grid_every >= 0, "grid_every", cfg.grid_every, "an integer >= 0 (0: no grids)")
    _check(cfg.grid_n >= 1, "grid_n", cfg.grid_n, "an integer >= 1")
    if cfg.max_images is not None:
        _check(cfg.max_images >= 1, "max_images", cfg.max_images, "an integer >= 1")
    if cfg.resolution is not None:
        _check(cfg.resolution >= 1, "resolution", cfg.resolution, "an integer >= 1")
    if cfg.value_range is not None:
        lo, hi = cfg.value_range
        _check(
            _finite(lo) and _finite(hi) and lo < hi, "range", cfg.value_range, "LO,HI with LO < HI"
        )


def validate_teacher_config(cfg: TeacherConfig, world: int = 1) -> None:
    """Refuse a teacher config whose options are out of range (one line naming the option)."""
    validate_loop(cfg.train, world)
    _validate_common(cfg)
    _check(cfg.arch in ARCHS, "arch", cfg.arch, f"one of {', '.join(ARCHS)}")
    _check(cfg.grid_nfe >= 1, "grid_nfe", cfg.grid_nfe, "an integer >= 1")
    _check(_finite(cfg.p_std) and cfg.p_std > 0, "p_std", cfg.p_std, "> 0")
    _check(_finite(cfg.p_mean), "p_mean", cfg.p_mean, "finite")
    _check(0 < cfg.sigma_min < cfg.sigma_max, "sigma_min", cfg.sigma_min, "in (0, --sigma-max)")
    _check(_finite(cfg.sigma_max), "sigma_max", cfg.sigma_max, "finite")
    _check(_finite(cfg.rho) and cfg.rho > 0, "rho", cfg.rho, "> 0")


def validate_distill_config(cfg: DistillConfig, world: int = 1) -> None:
    """Refuse a distillation config whose options are out of range (one line naming the option)."""
    validate_loop(cfg.train, world)
    _validate_common(cfg)
    loss = cfg.loss
    _check(_finite(loss.gan_weight) and loss.gan_weight >= 0, "gan_weight", loss.gan_weight, ">= 0")
    _check(_finite(loss.r1_gamma) and loss.r1_gamma >= 0, "r1_gamma", loss.r1_gamma, ">= 0")
    _check(_finite(loss.guidance) and loss.guidance >= 0, "guidance", loss.guidance, ">= 0")
    _check(_finite(loss.logit_clip) and loss.logit_clip > 0, "logit_clip", loss.logit_clip, "> 0")
    lo, hi = loss.r_clip
    _check(0 < lo <= 1 <= hi and _finite(hi), "r_clip", loss.r_clip, "LO,HI with 0 < LO <= 1 <= HI")
    _check(loss.ratio_bins >= 1, "ratio_bins", loss.ratio_bins, "an integer >= 1")
    _check(
        _finite(loss.ratio_ema) and 0 <= loss.ratio_ema < 1,
        "ratio_ema",
        loss.ratio_ema,
        "in [0, 1)",
    )
    _check(cfg.head_hidden >= 1, "head_hidden", cfg.head_hidden, "an integer >= 1")
    get_divergence(cfg.divergence, **({"alpha": cfg.alpha} if cfg.alpha is not None else {}))


# --------------------------------------------------------------------------- resume
def _resume_options(options: dict, **digests: str) -> dict:
    """What a resumed run must match: the options, with the teacher/data given by content."""
    return runs.as_json(options) | {k: v[:16] for k, v in digests.items()}


def _begin(out: Path, resume: bool, start_fresh: bool, options: dict, ddp: Dist) -> dict:
    """Check ``out`` (fresh, or a strict resume) and return the options the run will use."""
    if ddp.main:
        check_writable(out, "--out")
    saved = runs.prepare_out(out, resume, start_fresh)
    if saved is None:
        return options
    if "resume_options" not in saved:
        raise ValueError(
            f"--resume: {out} was written by an older fdistill that did not record its options "
            "for a strict resume; start a new run in another --out"
        )
    runs.check_resume(saved["resume_options"], options, out)
    return runs.merge_resumable(saved["resume_options"], options)


def state_digest(module: nn.Module) -> str:
    """A digest of a module's weights (names, dtypes, shapes, bytes)."""
    sd = module.state_dict()
    return runs.tensor_digest(*(sd[k] for k in sorted(sd))) + f"/{len(sd)}"


@dataclass
class RunResult:
    """What a training run returns: where it went, how long it took, the trained modules."""

    out: Path
    steps: int
    seconds: float
    model: nn.Module  # the teacher denoiser, or the FDistill bundle (generator, critic, ...)
    ema: nn.Module  # the EMA teacher, or the EMA generator


def _load_data(
    spec: str,
    resolution: int | None,
    max_images: int | None,
    value_range,
    num_classes: int | None,
) -> ImageDataset:
    """The data set, its labels checked against ``num_classes`` (0: unlabelled; None: any)."""
    return load_dataset(
        spec,
        resolution,
        max_images=max_images,
        labels=num_classes != 0,
        num_classes=num_classes or None,
        value_range=tuple(value_range) if value_range is not None else None,
    )


# --------------------------------------------------------------------------- teacher
@dataclass
class TeacherConfig:
    """Everything a teacher run depends on (saved in its config)."""

    data: str = "digits"
    resolution: int | None = None
    max_images: int | None = None
    value_range: tuple[float, float] | None = None
    arch: str = "unet"
    model: dict = field(default_factory=dict)
    conditional: bool = True
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    grid_every: int = 500
    grid_n: int = 100
    grid_nfe: int = 35
    device: str | None = None
    train: TeacherTrainConfig = field(
        default_factory=lambda: TeacherTrainConfig(
            steps=2000,
            batch=64,
            lr=2e-3,
            lr_warmup=200,
            ema_decay=0.999,
            ema_warmup=True,
            ckpt_every=500,
        )
    )


def train_teacher_run(
    cfg: TeacherConfig, out: str | Path, resume: bool = False, start_fresh: bool = False
) -> RunResult:
    """Train an EDM teacher on ``cfg.data``; checkpoint, config, metrics and grids go to ``out``.

    ``resume`` continues the run in ``out`` (strict: the options must match the saved ones,
    except those in :data:`fdistill.runs.RESUMABLE_OPTIONS`); ``start_fresh`` lets a resume
    start a new run where none is saved.
    """
    out = Path(out)
    with distributed(cfg.device) as ddp:
        validate_teacher_config(cfg, ddp.world)
        ds = _load_data(
            cfg.data,
            cfg.resolution,
            cfg.max_images,
            cfg.value_range,
            None if cfg.conditional else 0,
        )
        num_classes = ds.num_classes if cfg.conditional else 0
        shape = (ds.channels, ds.resolution, ds.resolution)
        model_cfg = default_model(cfg.arch, shape, num_classes, **cfg.model)
        options = _begin(
            out,
            resume,
            start_fresh,
            _resume_options(asdict(cfg), data=runs.tensor_digest(ds.storage, ds.labels)),
            ddp,
        )
        cfg = _with_resumable(cfg, options)
        run_config = {
            "model": model_cfg,
            "shape": list(shape),
            "num_classes": num_classes,
            "sampler": {"sigma_min": cfg.sigma_min, "sigma_max": cfg.sigma_max, "rho": cfg.rho},
            "data": {"spec": str(cfg.data), "name": ds.name, "size": len(ds)},
            "options": asdict(cfg),
            "resume_options": options,
        }
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        net = build_denoiser(model_cfg).to(ddp.device)
        torch.manual_seed(cfg.train.seed * 1_000_003 + ddp.rank)  # dropout masks per rank
        sampler = run_config["sampler"]

        def render(m: nn.Module):
            return lambda z, c: sample_with_nfe(
                m, z, cfg.grid_nfe, c, sampler["sigma_min"], sampler["sigma_max"], sampler["rho"]
            )

        grids = _grid_writer(
            out, cfg.grid_every, cfg.train.steps, ddp, shape, num_classes, cfg.grid_n, render
        )
        t0 = time.perf_counter()
        ema = train_teacher(
            net,
            image_sampler(ds, ddp.device, num_classes > 0),
            cfg.train,
            out,
            loss_fn=EDMLoss(cfg.p_mean, cfg.p_std, model_cfg["sigma_data"]),
            config=run_config,
            ddp=ddp,
            resume=resume,
            gens=make_batch_randoms(cfg.train.seed, ddp),
            on_step=grids,
        )
        return RunResult(out, cfg.train.steps, time.perf_counter() - t0, net, ema.module)


def _with_resumable(cfg, options: dict):
    """``cfg`` with the resumable options of ``options`` (what a resumed run uses)."""
    train = replace(
        cfg.train,
        **{
            k.split(".", 1)[1]: _get(options, k)
            for k in runs.RESUMABLE_OPTIONS
            if k.startswith("train.") and _has(options, k)
        },
    )
    top = {
        k: _get(options, k)
        for k in runs.RESUMABLE_OPTIONS
        if "." not in k and _has(options, k) and k in {f.name for f in fields(cfg)}
    }
    return replace(cfg, train=train, **top)


def _has(d: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def _get(d: dict, key: str):
    for part in key.split("."):
        d = d[part]
    return d


# --------------------------------------------------------------------------- distillation
PRESETS: dict[str, dict] = {
    # Paper Table 5 (AdamW weight decay 1e-2 everywhere, TrainConfig's default); the
    # discriminator scales (Table 5's input resolutions), ratio binning and the unweighted
    # fake-score loss follow the official code (paper-facts.md).
    "cifar10": dict(
        batch=2048,
        critic_ratio=5,
        gan_weight=1e-3,
        lr=1e-4,
        r1_gamma=1.0,
        guidance=1.0,
        steps=60_000,
        disc_taps=("enc32", "enc16", "enc8"),
        ratio_binning="linear-sigma",
        ratio_bins=10,
        ratio_ema=0.0,
        fake_weighting="none",
    ),
    "imagenet64": dict(
        batch=512,
        critic_ratio=5,
        gan_weight=3e-3,
        lr=2e-6,
        r1_gamma=0.0,
        guidance=1.0,
        steps=380_000,
        disc_taps=("enc8",),
        ratio_binning="linear-sigma",
        ratio_bins=10,
        ratio_ema=0.5,
        fake_weighting="none",
    ),
    "t2i": dict(
        batch=1024,
        critic_ratio=10,
        gan_weight=1e-3,
        lr=1e-5,
        r1_gamma=1.0,
        guidance=1.75,
        steps=60_000,
        disc_taps=("mid",),
        ratio_binning="linear-sigma",
        ratio_bins=10,
        ratio_ema=0.0,
        fake_weighting="none",
    ),
    # Small CPU settings for 8x8 digits (the defaults of DistillConfig).
    "digits": dict(
        batch=64,
        critic_ratio=5,
        gan_weight=1e-2,
        lr=2e-4,
        r1_gamma=0.0,
        guidance=1.0,
        steps=300,
    ),
}


@dataclass
class DistillConfig:
    """Everything a distillation run depends on (saved in its config).

    ``data`` is the real data of the discriminator (default: a teacher run's own training
    data; required for other teachers). ``disc_taps`` names the feature maps the discriminator
    heads read (default: every encoder resolution of the feature network; ``["mid"]`` is the
    single-bottleneck design).
    """

    teacher: str = "runs/teacher"
    data: str | None = None
    resolution: int | None = None
    max_images: int | None = None
    value_range: tuple[float, float] | None = None
    divergence: str = "js"
    alpha: float | None = None
    teacher_ema: bool = True
    disc_taps: tuple[str, ...] | None = None
    head_hidden: int = 64
    grid_every: int = 100
    grid_n: int = 100
    device: str | None = None
    # The official discriminator by default: 10 noise bins linear in sigma for the ratio
    # normalisation, the unweighted x0 error for the fake score (benchmarks/results).
    loss: LossConfig = field(
        default_factory=lambda: LossConfig(
            gan_weight=1e-2,
            disc_features="teacher",
            ratio_binning="linear-sigma",
            ratio_bins=10,
            fake_weighting="none",
        )
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=300,
            batch=64,
            critic_ratio=5,
            lr_gen=2e-4,
            lr_critic=2e-4,
            ema_decay=0.99,
            ema_warmup=True,
            ckpt_every=200,
        )
    )


def apply_preset(cfg: DistillConfig, name: str) -> DistillConfig:
    """``cfg`` with a :data:`PRESETS` entry's settings (batch, ratio, GAN weight, LRs, R1, CFG,
    steps, and the official code's discriminator scales, ratio binning and fake-score loss)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    p = PRESETS[name]
    train = replace(
        cfg.train,
        batch=p["batch"],
        critic_ratio=p["critic_ratio"],
        lr_gen=p["lr"],
        lr_critic=p["lr"],
        steps=p["steps"],
    )
    loss = replace(
        cfg.loss,
        gan_weight=p["gan_weight"],
        r1_gamma=p["r1_gamma"],
        guidance=p["guidance"],
        **{
            k: p[k]
            for k in ("ratio_binning", "ratio_bins", "ratio_ema", "fake_weighting")
            if k in p
        },
    )
    return replace(cfg, train=train, loss=loss, disc_taps=p.get("disc_taps", cfg.disc_taps))


def _feature_net(model: nn.Module) -> FeatureTaps:
    if not isinstance(model, FeatureTaps):
        name = type(model).__name__
        raise ValueError(f"the teacher's network ({name}) offers no discriminator features")
    return model


def build_distill(cfg: DistillConfig, teacher: nn.Module) -> FDistill:
    """Frozen ``teacher`` (a loaded denoiser with ``.info``), student and fake score copied from
    it, and discriminator heads on the selected feature maps of the teacher or fake score."""
    info = teacher.info
    fake = copy_denoiser(teacher)
    for net in (teacher, fake):
        try:
            _feature_net(net).set_feature_taps(cfg.disc_taps)
        except ValueError as e:
            raise ValueError(f"--disc-taps {','.join(cfg.disc_taps or [])}: {e}") from None
    source = teacher if cfg.loss.disc_features == "teacher" else fake
    maps = _feature_net(source).selected_feature_maps()
    loss_cfg = replace(
        cfg.loss, sigma_data=info.sigma_data, sigma_min=info.sigma_min, sigma_max=info.sigma_max
    )
    params = {"alpha": cfg.alpha} if cfg.alpha is not None else {}
    return FDistill(
        teacher=teacher,
        generator=OneStepGenerator(copy_denoiser(teacher), sigma_init=info.sigma_max),
        fake_score=fake,
        head=MultiScaleHead(maps, hidden=cfg.head_hidden),
        divergence=get_divergence(cfg.divergence, **params),
        cfg=loss_cfg,
    )


def distill_data(cfg: DistillConfig, teacher: nn.Module) -> dict:
    """``{spec, resolution, max_images, value_range}`` of the real data: ``cfg.data`` or, for a
    teacher run, the data it was trained on."""
    if cfg.data is not None:
        return {
            "data": cfg.data,
            "resolution": cfg.resolution,
            "max_images": cfg.max_images,
            "value_range": cfg.value_range,
        }
    opts = teacher.info.details.get("options", {})
    if "data" not in opts:
        raise ValueError(
            f"--data is needed: the teacher '{cfg.teacher}' ({teacher.info.family}) does not "
            "record its training data; pass the real images for the discriminator"
        )
    return {k: opts.get(k) for k in ("data", "resolution", "max_images", "value_range")}


def check_teacher_data(teacher: nn.Module, ds: ImageDataset, where: str) -> None:
    """One line naming both sides when the data does not fit the teacher."""
    info = teacher.info
    c, h, w = info.shape
    if (ds.channels, ds.resolution, ds.resolution) != (c, h, w):
        raise ValueError(
            f"{where}: images are {ds.channels}x{ds.resolution}x{ds.resolution} (CxHxW) but the "
            f"teacher expects {c}x{h}x{w}; pass --resolution {h} or data that fits"
        )
    if info.num_classes and ds.num_classes != info.num_classes:
        raise ValueError(
            f"{where}: {ds.num_classes} classes in the data but the teacher has "
            f"{info.num_classes}; class ids must mean the same to both"
        )


def distill_run(
    cfg: DistillConfig, out: str | Path, resume: bool = False, start_fresh: bool = False
) -> RunResult:
    """Distil the teacher ``cfg.teacher`` (any format :func:`load_teacher` reads) into a
    one-step student; writes a run to ``out``. ``resume`` is strict (see
    :func:`train_teacher_run`)."""
    out = Path(out)
    with distributed(cfg.device) as ddp:
        validate_distill_config(cfg, ddp.world)
        teacher = load_teacher(cfg.teacher, **({} if cfg.teacher_ema else {"ema": False}))
        info = teacher.info
        num_classes = info.num_classes
        if cfg.loss.guidance != 1.0 and not num_classes:
            raise ValueError("--guidance needs a class-conditional teacher")
        data = distill_data(cfg, teacher)
        ds = _load_data(
            data["data"],
            data["resolution"],
            data["max_images"],
            data["value_range"],
            num_classes,
        )
        check_teacher_data(teacher, ds, f"--data {data['data']}")
        digests = {
            "teacher": state_digest(teacher),
            "data": runs.tensor_digest(ds.storage, ds.labels if num_classes else None),
        }
        options = _begin(out, resume, start_fresh, _resume_options(asdict(cfg), **digests), ddp)
        cfg = _with_resumable(cfg, options)
        if ddp.main and cfg.loss.guidance != 1.0 and not teacher.config.get("label_dropout", 1):
            print(
                "note: the teacher was trained without label dropout; its unconditional "
                "prediction (used by --guidance) is untrained"
            )
        torch.manual_seed(cfg.train.seed)  # identical head initialisation on every rank
        model = build_distill(cfg, teacher).to(ddp.device)
        torch.manual_seed(cfg.train.seed * 1_000_003 + ddp.rank)
        shape = tuple(info.shape)
        teacher_info = {
            "path": str(Path(cfg.teacher).resolve()),
            "family": info.family,
            "digest": digests["teacher"],
            "step": info.details.get("step"),
            # the real data, so evaluation finds its reference after the teacher has moved
            "options": {k: data[k] for k in ("data", "resolution", "max_images", "value_range")},
        }
        run_config = {
            "model": inference_config(teacher.config),
            "shape": list(shape),
            "num_classes": num_classes,
            "sigma_init": info.sigma_max,
            "teacher": teacher_info,
            "data": {"spec": str(data["data"]), "name": ds.name, "size": len(ds)},
            "disc_taps": list(
                _feature_net(
                    model.teacher if cfg.loss.disc_features == "teacher" else model.fake_score
                ).feature_taps
            ),
            "options": asdict(cfg),
            "resume_options": options,
        }
        grids = _grid_writer(
            out, cfg.grid_every, cfg.train.steps, ddp, shape, num_classes, cfg.grid_n, lambda m: m
        )
        t0 = time.perf_counter()
        ema = train_distill(
            model,
            image_sampler(ds, ddp.device, num_classes > 0),
            latent_sampler(shape, num_classes, ddp.device),
            cfg.train,
            out,
            config=run_config,
            ddp=ddp,
            resume=resume,
            on_step=grids,
            gens=make_batch_randoms(cfg.train.seed, ddp),
        )
        return RunResult(out, cfg.train.steps, time.perf_counter() - t0, model, ema.module)


def describe(path: str | Path) -> dict:
    """What ``fdistill inspect`` prints: the family, shape, classes, sigma range and details
    of a teacher, or the kind, step and config of a run or export."""
    p = Path(path)
    from fdistill import t2i

    if (
        runs.is_export(p)
        or t2i.is_unet_export(p)
        or (p.exists() and runs.is_checkpoint_file(p / runs.CHECKPOINT if p.is_dir() else p))
    ):
        run = load_run(p)
        if run.kind == "distill" or runs.is_export(p) or t2i.is_unet_export(p):
            params = sum(t.numel() for t in run.model.parameters())
            return {
                "kind": run.kind,
                "step": run.step,
                "shape": list(run.shape),
                "num_classes": run.num_classes,
                "parameters": params,
                "model": run.config.get("model"),
                "teacher": run.config.get("teacher"),
            }
    teacher = load_teacher(p)
    info = teacher.info
    out = {
        "family": info.family,
        "shape": list(info.shape),
        "num_classes": info.num_classes,
        "sigma_min": info.sigma_min,
        "sigma_max": info.sigma_max,
        "sigma_data": info.sigma_data,
    }
    if isinstance(teacher, FeatureTaps):
        out["feature_maps"] = [
            f"{m.name} ({m.channels}x{m.resolution}x{m.resolution})"
            if m.resolution
            else f"{m.name} ({m.channels})"
            for m in teacher.feature_maps()
        ]
        out["default_disc_taps"] = list(teacher.default_feature_taps())
    return out | {k: v for k, v in info.details.items() if k != "options"}


__all__ = [
    "ARCHS",
    "PRESETS",
    "DistillConfig",
    "LoadedRun",
    "RunResult",
    "TeacherConfig",
    "apply_preset",
    "build_distill",
    "check_teacher_data",
    "default_model",
    "describe",
    "distill_run",
    "export_run",
    "generate",
    "image_sampler",
    "latent_sampler",
    "load_run",
    "run_sampler",
    "sample_run",
    "sample_seeds",
    "seeded_labels",
    "train_teacher_run",
    "validate_distill_config",
    "validate_teacher_config",
]
