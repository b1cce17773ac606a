"""The ``diffusers`` teacher format: a local diffusers folder, loaded by its UNet's class.

``UNet2DModel`` folders load through :mod:`fdistill.teachers.diffusers_unet`,
``UNet2DConditionModel`` (Stable Diffusion) folders through
:mod:`fdistill.teachers.stable_diffusion`; this module sits above both.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fdistill.teachers.diffusers_base import detect, resolve
from fdistill.teachers.diffusers_unet import load_unet2d
from fdistill.teachers.registry import TeacherFormat, register_format
from fdistill.teachers.stable_diffusion import load_sd_teacher


def load(path: Path, **options) -> nn.Module:
    """Load a diffusers folder, dispatching on the UNet's class."""
    _, unet_cfg, _ = resolve(Path(path))
    cls = unet_cfg.get("_class_name")
    if cls == "UNet2DModel":
        return load_unet2d(path, **options)
    if cls == "UNet2DConditionModel":
        return load_sd_teacher(path, **options)
    raise ValueError(
        f"diffusers UNet class {cls!r} in '{path}' is not supported; "
        "accepted: UNet2DModel, UNet2DConditionModel"
    )


register_format(
    TeacherFormat(
        name="diffusers",
        accepts="a diffusers pipeline folder (model_index.json) or a UNet folder with a scheduler",
        detect=detect,
        load=load,
    )
)

__all__ = ["load"]
