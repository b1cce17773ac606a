"""Trained networks from disk: what a path holds, loading it to sample, and exporting it.

:func:`path_kind` is the one function that says what a path is (a run folder or checkpoint, an
``fdistill export`` folder, a text-to-image UNet export, or a teacher of a known format).
:func:`load_run` rebuilds the network of any of them; :func:`export_run` writes a run's network
in a form that loads without the run (safetensors + ``config.json``, or for a text-to-image
student a diffusers ``UNet2DConditionModel`` folder); :func:`describe` is ``fdistill inspect``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fdistill import runs
from fdistill.denoisers.base import FeatureTaps
from fdistill.denoisers.registry import build_denoiser
from fdistill.generator import OneStepGenerator, Student
from fdistill.teachers import detect_format, load_teacher
from fdistill.userfiles import read_json, user_file

EXPORT_META = "fdistill_t2i.json"
EXPORT_FORMAT = "fdistill-t2i-unet"
PATH_KINDS = ("run", "export", "unet-export", "teacher", "data", "unknown", "missing")
DATA_SUFFIXES = (".npz", ".zip")


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


def is_unet_export(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / EXPORT_META).is_file() and (p / "config.json").is_file()


def path_kind(path: str | Path) -> str:
    """What ``path`` holds, read from headers and names only: ``"run"`` (a run folder or its
    checkpoint file), ``"export"`` (an ``fdistill export`` folder), ``"unet-export"`` (a
    text-to-image student exported as a diffusers UNet), ``"teacher"`` (a format
    :func:`fdistill.teachers.load_teacher` detects: EDM pickle, diffusers folder, ...),
    ``"data"`` (an image folder, ``.npz`` or ``.zip``), ``"unknown"`` or ``"missing"``."""
    p = Path(path)
    if not p.exists():
        return "missing"
    if is_unet_export(p):
        return "unet-export"
    if runs.is_export(p):
        return "export"
    if runs.is_checkpoint_file(p / runs.CHECKPOINT if p.is_dir() else p):
        return "run"
    try:
        detect_format(p)
        return "teacher"
    except ValueError:
        pass
    if p.is_dir() or p.suffix.lower() in DATA_SUFFIXES:
        return "data"
    return "unknown"


def load_run(path: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> LoadedRun:
    """Rebuild a network to sample from: a run folder or checkpoint (teacher or student; EMA
    weights by default), an ``fdistill export`` folder, or any teacher
    :func:`fdistill.teachers.load_teacher` reads (an EDM pickle, a diffusers folder, ...)."""
    p = Path(path)
    kind = path_kind(p)
    if kind == "unet-export":  # a text-to-image student in diffusers' UNet format
        return load_unet_export(p, device)
    if kind == "export":
        cfg, state = runs.read_export(p)
        with user_file(p, "export:"):
            model = _network(cfg)
            model.load_state_dict(state)
            step = int(cfg.get("step", 0))
    elif kind == "run":
        ckpt = runs.load_checkpoint(p)
        with user_file(p, "checkpoint:"):
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
        return student_of(build_denoiser(cfg["model"]), cfg)
    raise ValueError(f"not a teacher or distill run (kind {kind!r})")


def student_of(denoiser: nn.Module, cfg: dict) -> Student:
    """The student a run or export config describes around ``denoiser``: its ``student``
    record (K levels), or an older run's ``sigma_init`` (one step, :class:`OneStepGenerator`)."""
    spec = cfg.get("student") or {"sigmas": [cfg["sigma_init"]]}
    student = Student.from_config(denoiser, spec)
    if student.steps == 1 and student.inputs == "backward":
        return OneStepGenerator(denoiser, sigma_init=student.sigma_init)
    return student


def export_run(path: str | Path, out: str | Path, ema: bool = True) -> Path:
    """Write a run's network (the student generator, or a teacher denoiser) as safetensors with
    a ``config.json`` beside it; :func:`load_run` reads it back without the run or teacher."""
    run = load_run(path, ema=ema)
    if run.config.get("t2i"):
        return export_unet(run, out, ema)
    keep = ("kind", "model", "shape", "num_classes", "sigma_init", "student", "sampler")
    keep += ("teacher", "data")
    config = {k: run.config[k] for k in keep if k in run.config}
    config |= {"step": run.step, "weights": "ema" if ema else "raw"}
    return runs.write_export(out, run.model, config)


def is_t2i(run: LoadedRun) -> bool:
    """Whether a loaded run, export or teacher is a text-to-image (Stable Diffusion) model."""
    return run.config.get("model", {}).get("type") == "sd-unet"


def is_text_teacher(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers folder with a text-conditioned ``UNet2DConditionModel``
    (read from its config, nothing loaded)."""
    from fdistill.teachers.diffusers_unet import resolve

    try:
        _, unet_cfg, _ = resolve(Path(path))
    except (ValueError, OSError):
        return False
    return unet_cfg.get("_class_name") == "UNet2DConditionModel"


def export_unet(run: LoadedRun, out: str | Path, ema: bool = True) -> Path:
    """Write a text-to-image student's UNet with diffusers' ``save_pretrained`` (a
    ``UNet2DConditionModel`` folder) plus ``fdistill_t2i.json``: what :func:`load_run` needs to
    sample it (the one-step sigma and timestep, the pipeline folder)."""
    if run.kind != "distill" or not is_t2i(run):
        raise ValueError("export of a text-to-image run needs a distillation run of one")
    out = Path(out)
    if (out / "config.json").exists():
        raise ValueError(f"{out} already holds an export; choose another --out")
    den = run.model.denoiser
    den.unet.save_pretrained(out, safe_serialization=True)
    sigma = float(run.model.sigma_init)
    meta = {
        "format": EXPORT_FORMAT,
        "kind": "distill",
        "model": run.config["model"],
        "shape": list(run.shape),
        "num_classes": 0,
        "sigma_init": sigma,
        "student": run.model.config,
        # the UNet timesteps of the student's levels: a diffusers scheduler set to these
        # (LCMScheduler, timesteps=...) runs the same K steps
        "timesteps": [float(t) for t in den.schedule.timestep(torch.tensor(run.model.sigmas))],
        "timestep": float(den.schedule.timestep(torch.tensor([sigma]))[0]),
        "prediction_type": den.prediction_type,
        "t2i": run.config.get("t2i", {}),
        "teacher": run.config.get("teacher"),
        "step": run.step,
        "weights": "ema" if ema else "raw",
    }
    runs.atomic_write_text(json.dumps(meta, indent=2) + "\n", out / EXPORT_META)
    return out


def load_unet_export(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """A student written by :func:`export_unet`, as :func:`load_run` returns."""
    from fdistill.teachers.diffusers_unet import pretrained_unet, require_diffusers
    from fdistill.teachers.stable_diffusion import StableDiffusionTeacher

    p = Path(path)
    meta = read_json(p / EXPORT_META)
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{p / EXPORT_META} is not an fdistill text-to-image export")
    cfg = meta["model"]
    unet = pretrained_unet(require_diffusers().UNet2DConditionModel, p)
    den = StableDiffusionTeacher(
        unet, cfg["schedule"], cfg["prediction_type"], context=cfg["context"]
    )
    model = student_of(den, meta)
    model.requires_grad_(False).eval().to(device)
    return LoadedRun("distill", model, meta, int(meta.get("step", 0)))


def with_pipeline(run: LoadedRun, pipeline: str | Path | None = None) -> nn.Module:
    """The run's Stable Diffusion denoiser, with the tokenizer, text encoder and VAE of the
    pipeline folder the run records (or ``pipeline``) attached on first use."""
    from fdistill.teachers.stable_diffusion import load_sd_components

    if not is_t2i(run):
        raise ValueError("--prompt/--prompts need a text-to-image run, export or pipeline")
    den = run.model.denoiser if run.kind == "distill" else run.model
    if den.components is None or pipeline is not None:
        path = pipeline or run.config.get("t2i", {}).get("pipeline") or ""
        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"the Stable Diffusion pipeline '{path}' recorded by this run is not found; "
                "its tokenizer, text encoder and VAE are needed to sample"
            )
        den.components = load_sd_components(path)
    return den


def describe(path: str | Path) -> dict:
    """What ``fdistill inspect`` prints: the family, shape, classes, sigma range and details
    of a teacher, or the kind, step and config of a run or export."""
    p = Path(path)
    kind = path_kind(p)
    if kind in ("run", "export", "unet-export"):
        run = load_run(p)
        if run.kind == "distill" or kind != "run":
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
