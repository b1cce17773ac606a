"""The image pipeline: train an EDM teacher, distil it into a one-step student, sample a run.

A *run folder* holds ``checkpoint.pt`` (weights, EMA, optimisers, RNG states, step and the
full config) and ``config.json`` beside it; the config's ``model`` dict rebuilds the network
through :func:`build_denoiser`, so a run reloads itself without the command that made it.

* :func:`train_teacher_run` — EDM denoising score matching on an image data set.
* :func:`distill_run` — f-distill from a teacher run: student ``G(z, c) = D_G(sigma_max z,
  sigma_max, c)`` and fake score initialised from the teacher, a discriminator head on
  teacher or fake-score bottleneck features.
* :func:`load_run` / :func:`sample_run` — per-sample seeds, so samples do not depend on the
  batch size.

Every random draw during training comes from :func:`fdistill.training.make_batch_randoms`:
rank ``r`` of ``N`` processes draws exactly its slice of what one process would draw.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill import rng
from fdistill.critic import DiscriminatorHead
from fdistill.data import ImageDataset, load_dataset
from fdistill.denoisers import MLP, EDMLoss, EDMPrecond, UNet
from fdistill.distill import FDistill, LossConfig
from fdistill.divergences import get_divergence
from fdistill.generator import OneStepGenerator
from fdistill.images import save_image_grid
from fdistill.samplers import sample_with_nfe, seeded_randn
from fdistill.training import (
    CHECKPOINT,
    EMA,
    Dist,
    TeacherTrainConfig,
    TrainConfig,
    distributed,
    load_checkpoint,
    make_batch_randoms,
    train_distill,
    train_teacher,
)

ARCHS = ("unet", "mlp")


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


def build_denoiser(model_cfg: Mapping) -> EDMPrecond:
    """Rebuild a denoiser from its ``model`` config dict (``type`` is ``unet`` or ``mlp``)."""
    cfg = dict(model_cfg)
    kind = cfg.pop("type", None)
    sigma_data = cfg.pop("sigma_data", 0.5)
    nets = {"unet": UNet, "mlp": MLP}
    if kind not in nets:
        raise ValueError(f"model type must be one of {', '.join(ARCHS)}, got {kind!r}")
    try:
        net = nets[kind](**cfg)
    except TypeError as e:
        raise ValueError(f"bad {kind} model config {cfg}: {e}") from e
    return EDMPrecond(net, sigma_data=sigma_data)


def feature_spec(denoiser: EDMPrecond) -> tuple[int, bool]:
    """``(channels, spatial)`` of the features ``denoiser(..., return_features=True)`` gives."""
    net = denoiser.net
    if isinstance(net, UNet):
        return net.feature_channels, True
    if isinstance(net, MLP):
        return net.hidden, False
    raise ValueError(f"no discriminator features known for {type(net).__name__}")


def _inference_copy_config(model_cfg: Mapping) -> dict:
    """A teacher's model config with training-time stochasticity (dropouts) switched off."""
    return {k: (0.0 if k in ("dropout", "label_dropout") else v) for k, v in model_cfg.items()}


# --------------------------------------------------------------------------- data
def image_sampler(
    ds: ImageDataset, device: torch.device, conditional: bool
) -> Callable[[int, rng.RandomSource], tuple[Tensor, Tensor | None]]:
    """``sample(n, gen)``: ``n`` images (with replacement) and their labels (or None)."""
    images = ds.images.to(device)
    labels = ds.labels.to(device) if conditional else None

    def sample(n: int, gen: rng.RandomSource) -> tuple[Tensor, Tensor | None]:
        idx = rng.randint(len(images), (n,), gen, device=device)
        return images[idx], (labels[idx] if labels is not None else None)

    return sample


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
) -> Tensor:
    """``fn(z, c)`` over latents drawn per seed, ``batch`` samples at a time; float [N, ...]."""
    out = []
    for i in range(0, len(seeds), batch):
        z = seeded_randn(seeds[i : i + batch], shape, device=device)
        c = labels[i : i + batch].to(device) if labels is not None else None
        out.append(fn(z, c).float().cpu())
    return torch.cat(out)


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
    """Rebuild a run's network (EMA weights by default) from a run folder or checkpoint file."""
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    kind = cfg.get("kind")
    state = ckpt["state"]
    if kind == "teacher":
        model: nn.Module = build_denoiser(cfg["model"])
        model.load_state_dict(state["ema" if ema else "net"])
    elif kind == "distill":
        model = OneStepGenerator(build_denoiser(cfg["model"]), sigma_init=cfg["sigma_init"])
        model.load_state_dict(state["ema" if ema else "generator"])
    else:
        raise ValueError(f"{path}: not a teacher or distill run (kind {kind!r})")
    model.requires_grad_(False).eval().to(device)
    return LoadedRun(kind, model, cfg, int(ckpt["step"]))


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
) -> tuple[Tensor, Tensor | None]:
    """``n`` samples [n, C, H, W] in [-1, 1] (unclipped floats) and their labels.

    Sample ``i`` depends only on the checkpoint, ``seed`` and ``i``. Class-conditional runs
    use ``class_label`` for every sample, or a uniform label per sample from its seed.
    """
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
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
    return generate(fn, run.shape, seeds, labels, batch, device), labels


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


def _check_out(out: Path, resume: bool) -> dict | None:
    """The saved config of a run to resume; refuse to overwrite a run without ``--resume``."""
    if not (out / CHECKPOINT).is_file():
        return None
    if not resume:
        raise ValueError(
            f"{out} already holds a run ({CHECKPOINT}); pass --resume to continue it "
            "or choose another --out"
        )
    return json.loads((out / "config.json").read_text())


def _check_same(what: str, saved, now, out: Path) -> None:
    now = json.loads(json.dumps(now))  # as saved: tuples become lists
    if saved != now:
        raise ValueError(
            f"--resume: the run in {out} was made with {what} {saved}, this command asks for "
            f"{now}; repeat the original options"
        )


@dataclass
class RunResult:
    """What a training run returns: where it went, how long it took, the trained modules."""

    out: Path
    steps: int
    seconds: float
    model: nn.Module  # the teacher denoiser, or the FDistill bundle (generator, critic, ...)
    ema: nn.Module  # the EMA teacher, or the EMA generator


# --------------------------------------------------------------------------- teacher
@dataclass
class TeacherConfig:
    """Everything a teacher run depends on (saved in its config)."""

    data: str = "digits"
    resolution: int | None = None
    max_images: int | None = None
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


def train_teacher_run(cfg: TeacherConfig, out: str | Path, resume: bool = False) -> RunResult:
    """Train an EDM teacher on ``cfg.data``; checkpoint, config, metrics and grids go to ``out``."""
    out = Path(out)
    with distributed(cfg.device) as ddp:
        ds = load_dataset(cfg.data, cfg.resolution, max_images=cfg.max_images)
        num_classes = ds.num_classes if cfg.conditional else 0
        shape = (ds.channels, ds.resolution, ds.resolution)
        model_cfg = default_model(cfg.arch, shape, num_classes, **cfg.model)
        saved = _check_out(out, resume)
        if saved is not None:
            _check_same("model", saved["model"], model_cfg, out)
        run_config = {
            "model": model_cfg,
            "shape": list(shape),
            "num_classes": num_classes,
            "sampler": {"sigma_min": cfg.sigma_min, "sigma_max": cfg.sigma_max, "rho": cfg.rho},
            "data": {"spec": str(cfg.data), "name": ds.name, "size": len(ds)},
            "options": asdict(cfg),
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


# --------------------------------------------------------------------------- distillation
PRESETS: dict[str, dict] = {
    # Paper Table 5 (AdamW weight decay 1e-2 everywhere, TrainConfig's default).
    "cifar10": dict(
        batch=2048,
        critic_ratio=5,
        gan_weight=1e-3,
        lr=1e-4,
        r1_gamma=1.0,
        guidance=1.0,
        steps=60_000,
    ),
    "imagenet64": dict(
        batch=512,
        critic_ratio=5,
        gan_weight=3e-3,
        lr=2e-6,
        r1_gamma=0.0,
        guidance=1.0,
        steps=380_000,
    ),
    "t2i": dict(
        batch=1024,
        critic_ratio=10,
        gan_weight=1e-3,
        lr=1e-5,
        r1_gamma=1.0,
        guidance=1.75,
        steps=60_000,
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
    """Everything a distillation run depends on (saved in its config)."""

    teacher: str = "runs/teacher"
    divergence: str = "js"
    alpha: float | None = None
    teacher_ema: bool = True
    head_hidden: int = 64
    grid_every: int = 100
    grid_n: int = 100
    device: str | None = None
    loss: LossConfig = field(
        default_factory=lambda: LossConfig(gan_weight=1e-2, disc_features="teacher")
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
    """``cfg`` with a :data:`PRESETS` entry's batch, ratio, GAN weight, LRs, R1, CFG and steps."""
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
    loss = replace(cfg.loss, gan_weight=p["gan_weight"], r1_gamma=p["r1_gamma"])
    return replace(cfg, train=train, loss=replace(loss, guidance=p["guidance"]))


def build_distill(cfg: DistillConfig, teacher_ckpt: dict) -> FDistill:
    """Teacher (frozen), student and fake score initialised from it, and a discriminator head."""
    tcfg = teacher_ckpt["config"]
    teacher = build_denoiser(tcfg["model"])
    teacher.load_state_dict(teacher_ckpt["state"]["ema" if cfg.teacher_ema else "net"])
    student_cfg = _inference_copy_config(tcfg["model"])

    def from_teacher() -> EDMPrecond:
        d = build_denoiser(student_cfg)
        d.load_state_dict(teacher.state_dict())
        return d

    channels, spatial = feature_spec(teacher)
    loss_cfg = replace(cfg.loss, sigma_data=teacher.sigma_data)
    params = {"alpha": cfg.alpha} if cfg.alpha is not None else {}
    return FDistill(
        teacher=teacher,
        generator=OneStepGenerator(from_teacher(), sigma_init=cfg.loss.sigma_max),
        fake_score=from_teacher(),
        head=DiscriminatorHead(channels, spatial=spatial, hidden=cfg.head_hidden),
        divergence=get_divergence(cfg.divergence, **params),
        cfg=loss_cfg,
    )


def distill_run(cfg: DistillConfig, out: str | Path, resume: bool = False) -> RunResult:
    """Distil the teacher run ``cfg.teacher`` into a one-step student; writes a run to ``out``."""
    out = Path(out)
    teacher_ckpt = load_checkpoint(cfg.teacher)
    tcfg = teacher_ckpt["config"]
    if tcfg.get("kind") != "teacher":
        raise ValueError(
            f"--teacher {cfg.teacher} is not a teacher run (kind {tcfg.get('kind')!r})"
        )
    num_classes = int(tcfg["num_classes"])
    if cfg.loss.guidance != 1.0 and not num_classes:
        raise ValueError("--guidance needs a class-conditional teacher")
    with distributed(cfg.device) as ddp:
        data = tcfg["options"]
        teacher_info = {
            "path": str(Path(cfg.teacher).resolve()),
            "step": teacher_ckpt["step"],
            # the training data, so evaluation finds it after the teacher run has moved
            "options": {k: data[k] for k in ("data", "resolution", "max_images")},
        }
        saved = _check_out(out, resume)
        if saved is not None:
            _check_same("teacher step", saved["teacher"]["step"], teacher_info["step"], out)
        if ddp.main and cfg.loss.guidance != 1.0 and not tcfg["model"].get("label_dropout"):
            print(
                "note: the teacher was trained without label dropout; its unconditional "
                "prediction (used by --guidance) is untrained"
            )
        torch.manual_seed(cfg.train.seed)  # identical head initialisation on every rank
        model = build_distill(cfg, teacher_ckpt).to(ddp.device)
        torch.manual_seed(cfg.train.seed * 1_000_003 + ddp.rank)
        shape = tuple(tcfg["shape"])
        run_config = {
            "model": _inference_copy_config(tcfg["model"]),
            "shape": list(shape),
            "num_classes": num_classes,
            "sigma_init": cfg.loss.sigma_max,
            "teacher": teacher_info,
            "options": asdict(cfg),
        }
        ds = load_dataset(data["data"], data["resolution"], max_images=data["max_images"])
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


__all__ = [
    "ARCHS",
    "PRESETS",
    "DistillConfig",
    "LoadedRun",
    "RunResult",
    "TeacherConfig",
    "apply_preset",
    "build_denoiser",
    "build_distill",
    "default_model",
    "distill_run",
    "feature_spec",
    "generate",
    "image_sampler",
    "latent_sampler",
    "load_run",
    "run_sampler",
    "sample_run",
    "sample_seeds",
    "seeded_labels",
    "train_teacher_run",
]
