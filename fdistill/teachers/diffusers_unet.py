"""Hugging Face diffusers ``UNet2DModel`` teachers (DDPM / DDIM pipelines) as EDM denoisers.

The schedule conversion, feature taps and folder reading every diffusers family shares live in
:mod:`fdistill.teachers.diffusers_base`; text-conditioned UNets in
:mod:`fdistill.teachers.stable_diffusion`; the folder format that dispatches between them in
:mod:`fdistill.teachers.diffusers_folder`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from fdistill.denoisers.registry import register_model
from fdistill.teachers.diffusers_base import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    DiffusersDenoiserBase,
    DiscreteSchedule,
    alphas_cumprod_from_config,
    detect,
    image_shape,
    plain_config,
    prediction_type_of,
    pretrained_unet,
    require_diffusers,
    resolve,
    schedule_config,
    unet_details,
)
from fdistill.teachers.registry import TeacherInfo


class DiffusersUNetDenoiser(DiffusersDenoiserBase):
    """A diffusers ``UNet2DModel`` (DDPM/DDIM pipelines) as ``D(x, sigma, cond) -> x0``.

    ``cond``: integer class ids ``[N]`` (or one-hot rows ``[N, K]``, read by argmax) for a
    class-conditional UNet; ignored by an unconditional one. diffusers' class embeddings have
    no null label, so a class-conditional UNet refuses ``cond=None``.
    """

    def __init__(
        self,
        unet: nn.Module,
        schedule: DiscreteSchedule | Mapping,
        prediction_type: str = "epsilon",
    ) -> None:
        if not isinstance(schedule, DiscreteSchedule):
            schedule = DiscreteSchedule(schedule_config(schedule))
        super().__init__(unet, schedule, prediction_type)
        self.config = {
            "type": "diffusers-unet2d",
            "unet": plain_config(unet.config),
            "schedule": dict(schedule.config),
            "prediction_type": prediction_type,
        }

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.num_class_embeds or 0)

    def _prepare_cond(self, cond: Tensor | None, n: int) -> Tensor | None:
        if getattr(self.unet, "class_embedding", None) is None:
            return None
        if cond is None:
            raise ValueError(
                "this diffusers UNet2DModel is class-conditional and has no null label: "
                "pass integer class ids [N] (or one-hot rows) as cond"
            )
        if cond.ndim == 2:
            cond = cond.argmax(1)
        if cond.ndim != 1 or cond.shape[0] != n:
            raise ValueError(
                f"cond of shape {tuple(cond.shape)} is not class ids [{n}] or one-hot rows [{n}, K]"
            )
        if self.unet.config.class_embed_type in (None, "embedding"):
            cond = cond.long()
        return cond.to(self.unet.device)

    def _call_unet(self, x_in: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        return self.unet(x_in, t, class_labels=cond, return_dict=False)[0]


@register_model("diffusers-unet2d")
def _build_unet2d(config: dict) -> DiffusersUNetDenoiser:
    diffusers = require_diffusers()
    unet = diffusers.UNet2DModel.from_config(dict(config["unet"]))
    return DiffusersUNetDenoiser(unet, config["schedule"], config["prediction_type"])


def _attach_info(model: DiffusersUNetDenoiser) -> DiffusersUNetDenoiser:
    s = model.schedule
    model.info = TeacherInfo(
        family="diffusers",
        shape=image_shape(model.unet),
        num_classes=model.num_classes,
        sigma_min=s.sigma_min,
        sigma_max=s.sigma_max,
        sigma_data=0.5,
        details=unet_details(model.unet, s, model.prediction_type),
        schedule=s,
    )
    return model


def load_unet2d(path: str | Path, prediction_type: str | None = None) -> DiffusersUNetDenoiser:
    """Load a diffusers folder holding a ``UNet2DModel`` (local files only)."""
    diffusers = require_diffusers()
    unet_dir, unet_cfg, sched_cfg = resolve(Path(path))
    unet = pretrained_unet(diffusers.UNet2DModel, unet_dir)
    schedule = DiscreteSchedule(schedule_config(sched_cfg))
    model = DiffusersUNetDenoiser(unet, schedule, prediction_type_of(sched_cfg, prediction_type))
    return _attach_info(model)


__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "DiffusersDenoiserBase",
    "DiffusersUNetDenoiser",
    "DiscreteSchedule",
    "alphas_cumprod_from_config",
    "detect",
    "image_shape",
    "load_unet2d",
    "plain_config",
    "prediction_type_of",
    "pretrained_unet",
    "require_diffusers",
    "resolve",
    "schedule_config",
    "unet_details",
]
