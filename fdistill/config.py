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
from dataclasses import dataclass, field

from fdistill.data.captions import PROMPT_FORMATS
from fdistill.divergences import NAMES, get_divergence
from fdistill.engine import LoopConfig, TeacherTrainConfig, TrainConfig
from fdistill.generator import STUDENT_INPUTS, validate_student_sigmas
from fdistill.methods import LossConfig
from fdistill.options import comma_list, option, resumable_paths, set_path
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
    cfg = cfg | overrides
    flags = {"model_channels": "channels", "hidden": "channels"}
    for key in ("model_channels", "hidden", "depth", "num_blocks"):
        if key in cfg:
            _check(isinstance(cfg[key], int) and cfg[key] >= 1, flags.get(key, key), cfg[key],
                   "an integer >= 1")  # fmt: skip
    if "channel_mult" in cfg:
        mult = cfg["channel_mult"]
        _check(bool(mult) and all(isinstance(m, int) and m >= 1 for m in mult), "channel_mult",
               mult, "integers >= 1")  # fmt: skip
    if "label_dropout" in cfg:
        p = cfg["label_dropout"]
        _check(_finite(p) and 0 <= p < 1, "label_dropout", p, "in [0, 1)")
    return cfg


def _data_options(default: str | None, what: str) -> dict:
    """The real-data options of a command, as field keyword arguments."""
    return {
        "data": option(
            default,
            help="digits, mnist, a folder (class subfolders), .npz or EDM .zip" + what,
        ),
        "resolution": option(None, help="resize images to this size"),
        "max_images": option(None, help="use the first N images"),
        "value_range": option(
            None,
            help="value range of float image arrays (mapped to [-1, 1]); uint8 needs none",
            flag="--range",
            parse=comma_list(float, 2, "LO,HI (e.g. 0,1 or -1,1)"),
            metavar="LO,HI",
        ),
    }


_TEACHER_DATA = _data_options("digits", "")
_DISTILL_DATA = _data_options(
    None,
    " (default: a teacher run's own data; for a text-to-image teacher a folder with "
    "captions.jsonl or a COCO captions_*.json beside its images)",
)


@dataclass
class TeacherConfig:
    """Everything a teacher run depends on (saved in its config)."""

    data: str = _TEACHER_DATA["data"]
    resolution: int | None = _TEACHER_DATA["resolution"]
    max_images: int | None = _TEACHER_DATA["max_images"]
    value_range: tuple[float, float] | None = _TEACHER_DATA["value_range"]
    arch: str = option("unet", help="denoiser network", choices=ARCHS)
    model: dict = option(
        help="network overrides (see default_model)", default_factory=dict, cli=False
    )
    conditional: bool = option(True, help="ignore the data set's labels", negate="--unconditional")
    p_mean: float = option(-1.2, help="EDM training noise: mean of log sigma")
    p_std: float = option(1.2, help="EDM training noise: std of log sigma")
    sigma_min: float = option(0.002, help="smallest sampling noise level")
    sigma_max: float = option(80.0, help="largest sampling noise level")
    rho: float = option(SAMPLER_RHO, help="Karras sampling grid exponent")
    grid_every: int = option(500, help="steps between sample grids (0: none)", resumable=True)
    grid_n: int | None = option(
        None, help="samples per grid (default 100; 16 for text)", resumable=True
    )
    grid_nfe: int = option(
        DEFAULT_TEACHER_NFE, help="Heun network evaluations of the grids", resumable=True
    )
    device: str | None = option(
        None, help="cpu or cuda (default: cuda when available)", resumable=True
    )
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)


@dataclass
class DistillConfig:
    """Everything a distillation run depends on (saved in its config).

    ``data`` is the real data of the discriminator (default: a teacher run's own training
    data; required for other teachers). ``disc_taps`` names the feature maps the discriminator
    heads read (default: every encoder resolution of the feature network; ``["mid"]`` is the
    single-bottleneck design).
    """

    teacher: str = option(
        "runs/teacher",
        help="an fdistill teacher run or export, an NVlabs EDM .pkl, or a diffusers folder",
    )
    data: str | None = _DISTILL_DATA["data"]
    resolution: int | None = _DISTILL_DATA["resolution"]
    max_images: int | None = _DISTILL_DATA["max_images"]
    value_range: tuple[float, float] | None = _DISTILL_DATA["value_range"]
    divergence: str = option("js", help="f-divergence", choices=NAMES)
    alpha: float | None = option(None, help="alpha for --divergence alpha")
    teacher_ema: bool = option(
        True, help="the teacher's raw (non-EMA) weights", negate="--raw-teacher"
    )
    disc_taps: tuple[str, ...] | None = option(
        None,
        help="feature maps the discriminator heads read, e.g. enc32,enc16,enc8 or mid "
        "(default: every encoder resolution; `fdistill inspect` lists a teacher's maps)",
        parse=comma_list(str, None, "names separated by commas"),
        metavar="T1,T2,...",
    )
    head_hidden: int | None = option(
        None,
        help="discriminator head width (default: each feature map's width, as the official heads)",
    )
    student_steps: int = option(
        1,
        help="network evaluations of the student (1: a one-step generator; K > 1 samples in K "
        "steps, re-noising with fresh noise in between)",
        legacy=1,
    )
    student_sigmas: tuple[float, ...] | None = option(
        None,
        help="the student's K noise levels, descending (default: the teacher's timesteps T-1, "
        "T-1-T/K, ... for a discrete-time teacher; the first K points of a K+1-point Karras "
        "grid for an EDM teacher)",
        parse=comma_list(float, None, "numbers separated by commas"),
        metavar="S1,...,SK",
        legacy=None,
    )
    student_inputs: str = option(
        "backward",
        help="training inputs of a K-step student: backward simulation from noise (DMD2) or "
        "real data noised to the drawn level (FastGen)",
        choices=STUDENT_INPUTS,
        legacy="backward",
    )
    grid_every: int = option(100, help="steps between sample grids (0: none)", resumable=True)
    grid_n: int | None = option(
        None, help="samples per grid (default 100; 16 for text)", resumable=True
    )
    device: str | None = option(
        None, help="cpu or cuda (default: cuda when available)", resumable=True
    )
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class T2IConfig(DistillConfig):
    """A text-to-image distillation: :class:`DistillConfig` plus the prompts, the latent cache
    folder (None: :func:`fdistill.data.captions.default_cache_dir`), activation checkpointing of
    the three UNets and the VAE encoding batch. ``data`` is the captioned set (None: no GAN
    term), ``resolution`` the image side (default: the pipeline's own)."""

    prompts: str | None = option(
        None,
        help="prompts: a text file (one a line), a .jsonl with 'caption'/'text', or a COCO "
        "captions_*.json; without --data no GAN term",
    )
    latent_cache: str | None = option(
        None, help="folder for the cached VAE latents of --data (default ~/.cache)"
    )
    grad_checkpointing: bool = option(
        False, help="activation checkpointing of the UNets (less memory, about 1/3 more compute)"
    )
    encode_batch: int = option(8, help="images per VAE encoding batch", resumable=True)
    real_latents: str = option(
        "sample",
        help="real latents of --data: a fresh sample of each image's VAE posterior per batch "
        "(the official code) or its mean",
        choices=("sample", "mean"),
        legacy="mean",
    )


def grid_size(cfg: TeacherConfig | DistillConfig) -> int:
    """Samples per training grid: ``cfg.grid_n``, else 16 for text (large images), else 100."""
    if cfg.grid_n is not None:
        return cfg.grid_n
    return 16 if isinstance(cfg, T2IConfig) else 100


PRESETS: dict[str, dict] = {
    # Paper Table 5 (AdamW weight decay 1e-2 everywhere, TrainConfig's default), and the official
    # code where the two disagree: R1 is off in every official f-distill config (Table 5: gamma
    # 1 / 0 / 1) and the SD run is 100k iterations, 10k generator updates (Table 5: 60k). The
    # discriminator scales are Table 5's input resolutions; the ratio bins (10, in sigma for EDM
    # teachers and in the timestep for SD: the default "auto"), the unweighted fake-score loss,
    # heads as wide as their features and real images at their own noise level are the
    # defaults, as in the official code (README: "Presets").
    "cifar10": dict(
        batch=2048,
        critic_ratio=5,
        gan_weight=1e-3,
        lr=1e-4,
        r1_gamma=0.0,
        guidance=1.0,
        steps=60_000,
        disc_taps=("enc32", "enc16", "enc8"),
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
        ratio_bins=10,
        ratio_ema=0.5,
        fake_weighting="none",
    ),
    "t2i": dict(
        batch=1024,
        critic_ratio=10,
        gan_weight=1e-3,
        lr=1e-5,
        r1_gamma=0.0,
        guidance=1.75,
        steps=10_000,
        disc_taps=("mid",),
        ratio_bins=10,
        ratio_ema=0.0,
        fake_weighting="none",
        bf16=True,
    ),
    # Small CPU settings for 8x8 digits: the default of `fdistill distill`.
    "digits": dict(
        batch=64,
        critic_ratio=5,
        gan_weight=1e-2,
        lr=2e-4,
        r1_gamma=0.0,
        guidance=1.0,
        steps=300,
        ema_decay=0.99,
        ema_warmup=True,
        ckpt_every=200,
        # the digits runs measured in the README (small heads, one noise level per pair)
        head_hidden=64,
        real_sigma="same",
    ),
}


# Where each preset key goes in the configuration tree ("lr": both optimisers).
_PRESET_PATHS = {
    "batch": ("train.batch",),
    "critic_ratio": ("train.critic_ratio",),
    "lr": ("train.lr_gen", "train.lr_critic"),
    "steps": ("train.steps",),
    "ema_decay": ("train.ema_decay",),
    "ema_warmup": ("train.ema_warmup",),
    "ckpt_every": ("train.ckpt_every",),
    "gan_weight": ("loss.gan_weight",),
    "r1_gamma": ("loss.r1_gamma",),
    "guidance": ("loss.guidance",),
    "ratio_binning": ("loss.ratio_binning",),
    "ratio_bins": ("loss.ratio_bins",),
    "ratio_ema": ("loss.ratio_ema",),
    "fake_weighting": ("loss.fake_weighting",),
    "disc_taps": ("disc_taps",),
    "head_hidden": ("head_hidden",),
    "real_sigma": ("loss.real_sigma",),
    "r1": ("loss.r1",),
    "bf16": ("train.bf16",),
}


def apply_preset(cfg: DistillConfig, name: str) -> DistillConfig:
    """``cfg`` with a :data:`PRESETS` entry laid over it (batch, ratio, GAN weight, LRs, R1,
    CFG, steps, and the official code's discriminator scales, ratio binning and fake-score
    loss; ``digits`` also the EMA and checkpoint cadence of short CPU runs)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    for key, value in PRESETS[name].items():
        for path in _PRESET_PATHS[key]:
            cfg = set_path(cfg, path.split("."), value)
    return cfg


TEACHER_PRESETS: dict[str, dict] = {
    # Small CPU settings for 8x8 digits: the default of `fdistill train-teacher`.
    "digits": {
        "train.steps": 2000,
        "train.batch": 64,
        "train.lr": 2e-3,
        "train.lr_warmup": 200,
        "train.ema_warmup": True,
        "train.ckpt_every": 500,
    },
}


def apply_teacher_preset(cfg: TeacherConfig, name: str) -> TeacherConfig:
    """``cfg`` with a :data:`TEACHER_PRESETS` entry laid over it."""
    if name not in TEACHER_PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(TEACHER_PRESETS)}")
    for path, value in TEACHER_PRESETS[name].items():
        cfg = set_path(cfg, path.split("."), value)
    return cfg


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
    if cfg.grid_n is not None:
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
    if cfg.head_hidden is not None:
        _check(cfg.head_hidden >= 1, "head_hidden", cfg.head_hidden, "an integer >= 1")
    lo, hi = loss.t_range
    _check(0 <= lo < hi, "t_range", loss.t_range, "T_MIN,T_MAX with 0 <= T_MIN < T_MAX")
    _check(
        isinstance(cfg.student_steps, int) and cfg.student_steps >= 1,
        "student_steps",
        cfg.student_steps,
        "an integer >= 1",
    )
    if cfg.student_sigmas is not None:
        validate_student_sigmas(cfg.student_sigmas, cfg.student_steps)
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
    """``cfg`` with the options ``--resume`` may change (``resumable`` in their metadata) taken
    from ``options`` (the merged options of a resumed run)."""
    for key in resumable_paths(type(cfg)):
        path = key.split(".")
        value = options
        for part in path:
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            cfg = set_path(cfg, path, tuple(value) if isinstance(value, list) else value)
    return cfg
