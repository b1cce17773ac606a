"""fdistill's own teachers: a ``train-teacher`` run (folder or checkpoint file) or its export."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fdistill.denoisers.registry import build_denoiser
from fdistill.runs import (
    CHECKPOINT,
    is_checkpoint_file,
    is_export,
    load_checkpoint,
    read_export,
)
from fdistill.teachers.registry import TeacherFormat, TeacherInfo, register_format


def _info(family: str, config: dict, details: dict) -> TeacherInfo:
    s = config["sampler"]
    return TeacherInfo(
        family=family,
        shape=tuple(config["shape"]),
        num_classes=int(config["num_classes"]),
        sigma_min=float(s["sigma_min"]),
        sigma_max=float(s["sigma_max"]),
        sigma_data=float(config["model"].get("sigma_data", 0.5)),
        details=details,
    )


def _run_kind(path: Path) -> str | None:
    p = path / CHECKPOINT if path.is_dir() else path
    if not is_checkpoint_file(p):
        return None
    try:
        return load_checkpoint(p, mmap=True)["config"].get("kind")
    except (ValueError, OSError):
        return None


def _is_run(path: Path) -> bool:
    return _run_kind(path) is not None


def load_run_teacher(path: Path, ema: bool = True) -> nn.Module:
    """The denoiser of a ``train-teacher`` run (EMA weights unless ``ema=False``)."""
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    if cfg.get("kind") != "teacher":
        raise ValueError(
            f"'{path}' is an fdistill {cfg.get('kind')} run, not a teacher: distil from the "
            "teacher run (or export) it was made from"
        )
    model = build_denoiser(cfg["model"])
    model.load_state_dict(ckpt["state"]["ema" if ema else "net"])
    params = sum(p.numel() for p in model.parameters())
    details = {
        "architecture": cfg["model"].get("type"),
        "model": cfg["model"],
        "step": int(ckpt["step"]),
        "weights": "EMA" if ema else "raw",
        "parameters": params,
        "data": cfg.get("data", {}).get("spec"),
    }
    model.info = _info("fdistill-run", cfg, details)
    model.info.details["options"] = cfg.get("options", {})
    return model


def load_export_teacher(path: Path) -> nn.Module:
    """The denoiser of ``fdistill export`` of a teacher run."""
    cfg, state = read_export(path)
    if cfg.get("kind") != "teacher":
        raise ValueError(
            f"'{path}' is an export of a {cfg.get('kind')}, not of a teacher; sample it with "
            "`fdistill sample --ckpt`"
        )
    model = build_denoiser(cfg["model"])
    model.load_state_dict(state)
    params = sum(p.numel() for p in model.parameters())
    model.info = _info(
        "fdistill-export", cfg, {"architecture": cfg["model"].get("type"), "parameters": params}
    )
    return model


register_format(
    TeacherFormat(
        name="fdistill-run",
        accepts="an fdistill train-teacher run folder or its checkpoint.pt",
        detect=_is_run,
        load=load_run_teacher,
    )
)
register_format(
    TeacherFormat(
        name="fdistill-export",
        accepts="an `fdistill export` folder (model.safetensors + config.json)",
        detect=is_export,
        load=load_export_teacher,
    )
)
