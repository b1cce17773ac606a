"""The run configurations: what a teacher or distillation run depends on, saved in its config.

One dataclass per command (:class:`TeacherConfig`, :class:`DistillConfig`, and
:class:`T2IConfig` for a text-to-image teacher) holding the engine's loop settings
(:class:`fdistill.engine.LoopConfig`) and the method's loss settings
(:class:`fdistill.methods.LossConfig`), one default per knob; presets
(:data:`PRESETS`) are overlays. Every option is validated here before any work starts, with one
line naming the option; :func:`with_resumable` applies the options ``--resume`` may change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from fdistill import runs
from fdistill.data.captions import PROMPT_FORMATS
from fdistill.divergences import get_divergence
from fdistill.engine import LoopConfig, TeacherTrainConfig, TrainConfig
from fdistill.methods import LossConfig
from fdistill.samplers import DEFAULT_TEACHER_NFE

ARCHS = ("unet", "mlp")


SAMPLER_RHO = 7.0


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
    grid_nfe: int = DEFAULT_TEACHER_NFE
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


@dataclass
class T2IConfig(DistillConfig):
    """A text-to-image distillation: :class:`DistillConfig` plus the prompts, the latent cache
    folder (None: :func:`default_cache_dir`), activation checkpointing of the three UNets and
    the VAE encoding batch. ``data`` is the captioned set (None: no GAN term), ``resolution``
    the image side (default: the pipeline's own)."""

    prompts: str | None = None
    latent_cache: str | None = None
    grad_checkpointing: bool = False
    encode_batch: int = 8
    grid_n: int = 16


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


def validate_t2i_config(cfg: T2IConfig, world: int = 1) -> None:
    """:func:`validate_distill_config` plus the text-to-image options (one line each)."""
    validate_distill_config(cfg, world)
    if not cfg.prompts:
        raise ValueError(f"--prompts is needed for a text-to-image teacher: {PROMPT_FORMATS}")
    if cfg.value_range is not None:
        raise ValueError("--range does not apply to a text-to-image run (images are read as files)")
    if not cfg.teacher_ema:
        raise ValueError(
            "--raw-teacher applies to fdistill teacher runs, not to a diffusers pipeline"
        )
    if not isinstance(cfg.encode_batch, int) or cfg.encode_batch < 1:
        raise ValueError(f"encode_batch must be an integer >= 1, got {cfg.encode_batch!r}")


def with_resumable(cfg, options: dict):
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
