"""Real data of a run, per codec: images (pixels) or a captioned set's cached VAE latents.

:func:`image_source` and :func:`text_source` turn a distillation config and its loaded teacher
into a :class:`RealSource`: the shape the student generates, the digests a strict resume
compares, what the run's config records, whether there is real data for a discriminator, and
(after the run folder was claimed) the sampler ``sample(n, gen) -> (x, cond)`` of real batches.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill import rng, runs
from fdistill.config import DistillConfig, T2IConfig
from fdistill.data import ImageDataset, load_dataset
from fdistill.data.captions import (
    CaptionedData,
    LatentCache,
    encode_latents,
    latent_cache_key,
    read_captioned,
)
from fdistill.engine import Dist
from fdistill.loader import ImageLoader
from fdistill.methods.base import Sampler


def image_sampler(
    ds: ImageDataset, device: torch.device, conditional: bool, *, workers: int = 0
) -> Callable[[int, rng.RandomSource], tuple[Tensor, Tensor | None]]:
    """``sample(n, gen)``: ``n`` images (with replacement) and their labels (or None).

    The images stay in host memory; each process gathers only its rows of every draw (in
    ``workers`` ``DataLoader`` processes, or itself by default) and the draws are those of
    ``rng.randint(len(ds), (n,), gen)`` (see :class:`fdistill.loader.ImageLoader`).
    """
    return ImageLoader(ds, device, conditional, workers=workers)


def load_data(
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
    unused = [
        flag
        for flag, value in (
            ("--resolution", cfg.resolution),
            ("--max-images", cfg.max_images),
            ("--range", cfg.value_range),
        )
        if value is not None
    ]
    if unused:
        raise ValueError(
            f"{', '.join(unused)} apply to --data; without it the teacher run's own data are "
            "used as it recorded them (pass --data to choose the real images)"
        )
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


def vae_factor(teacher: nn.Module) -> int:
    """How many image pixels one latent pixel spans (8 for Stable Diffusion)."""
    return 2 ** (len(teacher.components.vae.config.block_out_channels) - 1)


def latent_resolution(teacher: nn.Module, resolution: int | None) -> tuple[int, int]:
    """``(image side, latent side)`` for ``--resolution`` (None: the pipeline's own size)."""
    f = vae_factor(teacher)
    native = teacher.info.shape[1] * f
    res = native if resolution is None else resolution
    down = 2 ** (len(teacher.unet.config.block_out_channels) - 1)
    if res % (f * down):
        raise ValueError(
            f"--resolution must be a multiple of {f * down} for this pipeline (VAE factor {f}, "
            f"UNet downsampling {down}), got {res}; its own resolution is {native}"
        )
    return res, res // f


def set_latent_size(teacher: nn.Module, size: int) -> None:
    # The feature taps read their map sizes from sample_size: train at another resolution by
    # saying so in the config the student, fake score and exports are rebuilt from.
    if teacher.unet.config.sample_size != size:
        teacher.unet.register_to_config(sample_size=size)
        teacher.config["unet"]["sample_size"] = size


def captioned_sampler(
    latents: Tensor,
    data: CaptionedData,
    teacher: nn.Module,
    device: torch.device,
    std: Tensor | None = None,
) -> Sampler:
    """``sample(n, gen) -> (latents, caption embeddings)``: uniform (image, caption) pairs;
    with the posterior's ``std`` each latent is a fresh posterior sample ``mean + std * eps``
    (``eps`` from ``gen``, after the indices), as the official code trains; without it the
    posterior mean."""
    image_of = torch.tensor(data.image_of)

    def sample(n: int, gen: rng.RandomSource) -> tuple[Tensor, Tensor]:
        idx = rng.randint(len(data), (n,), gen).cpu()
        rows = image_of[idx]
        x = latents[rows].float()
        if std is not None:
            x = x + std[rows].float() * rng.randn(x.shape, gen, device="cpu")
        caps = teacher.encode_prompts([data.captions[i] for i in idx.tolist()])
        return x.to(device), caps

    return sample


def no_real(n: int, gen: rng.RandomSource) -> tuple[None, None]:
    return None, None


def text_digest(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def shared_latents(
    data: CaptionedData, teacher: nn.Module, res: int, cfg: T2IConfig, key: str, ddp: Dist
) -> LatentCache:
    """Rank 0 encodes (or finds) the latents; the other ranks then read its cache file."""
    kwargs = dict(batch=cfg.encode_batch, key=key)
    if ddp.world == 1:
        return encode_latents(
            data, teacher, res, cfg.latent_cache, progress=cfg.train.progress, **kwargs
        )
    import torch.distributed as dist

    if ddp.main:
        cache = encode_latents(
            data, teacher, res, cfg.latent_cache, progress=cfg.train.progress, **kwargs
        )
    dist.barrier()
    if not ddp.main:
        cache = encode_latents(data, teacher, res, cfg.latent_cache, progress=False, **kwargs)
    return cache


@dataclass
class RealSource:
    """A run's real data before and after the run folder is claimed.

    ``shape``: what the student generates (pixels or latents); ``digests``: what a strict resume
    compares by content; ``teacher`` / ``data`` / ``extra``: what the run's config records
    (``extra`` adds top-level keys, e.g. ``t2i``); ``discriminator``: whether there is real data
    for a density ratio; ``open(cfg, ddp)``: the sampler of real batches (``None``: no data),
    called once the run folder is claimed (so expensive work such as encoding latents never
    happens for a refused run).
    """

    shape: tuple[int, ...]
    digests: dict[str, str]
    teacher: dict
    data: dict | None
    discriminator: bool
    open: Callable[[DistillConfig, Dist], Callable]
    extra: dict = field(default_factory=dict)
    notes: Sequence[str] = ()


def image_source(cfg: DistillConfig, teacher: nn.Module) -> RealSource:
    """Images for the discriminator: ``cfg.data`` or the teacher run's own training data,
    checked against the teacher's shape and classes."""
    info = teacher.info
    num_classes = info.num_classes
    data = distill_data(cfg, teacher)
    ds = load_data(
        data["data"], data["resolution"], data["max_images"], data["value_range"], num_classes
    )
    check_teacher_data(teacher, ds, f"--data {data['data']}")
    digests = {
        "teacher": runs.state_digest(teacher),
        "data": runs.tensor_digest(ds.storage, ds.labels if num_classes else None),
    }
    record = {
        "path": str(Path(cfg.teacher).resolve()),
        "family": info.family,
        "digest": digests["teacher"],
        "step": info.details.get("step"),
        # the real data, so evaluation finds its reference after the teacher has moved
        "options": {k: data[k] for k in ("data", "resolution", "max_images", "value_range")},
    }
    return RealSource(
        shape=tuple(info.shape),
        digests=digests,
        teacher=record,
        data={"spec": str(data["data"]), "name": ds.name, "size": len(ds)},
        discriminator=True,
        open=lambda cfg, ddp: image_sampler(ds, ddp.device, num_classes > 0),
    )


def text_source(
    cfg: T2IConfig, teacher: nn.Module, prompts: Sequence[str], device: torch.device
) -> RealSource:
    """A captioned set's VAE latents for the discriminator (``cfg.data``; none: no
    discriminator), at ``cfg.resolution`` (default: the pipeline's own). Sets the teacher's
    latent size and moves it to ``device`` (the VAE digest and the encoding run there)."""
    info = teacher.info
    res, size = latent_resolution(teacher, cfg.resolution)
    set_latent_size(teacher, size)
    data = read_captioned(cfg.data, cfg.max_images) if cfg.data else None
    teacher.to(device)
    parts = teacher.components
    digests = {
        "teacher": runs.state_digest(teacher),
        "text_encoder": runs.state_digest(parts.text_encoder),
        "prompts": text_digest(prompts),
    }
    key = None
    if data is not None:
        key = latent_cache_key(data, res, runs.state_digest(parts.vae))
        digests["data"] = hashlib.sha256((key + text_digest(data.captions)).encode()).hexdigest()
    pipeline_dir = Path(cfg.teacher).resolve()
    if pipeline_dir.name == "unet":
        pipeline_dir = pipeline_dir.parent
    t2i = {
        "pipeline": str(pipeline_dir),
        "resolution": res,
        "prompts": str(Path(cfg.prompts).resolve()),
        "num_prompts": len(prompts),
        "discriminator": data is not None,
        "latent_cache": None,
    }

    def open_(cfg: T2IConfig, ddp: Dist):
        if data is None:
            return no_real
        cache = shared_latents(data, teacher, res, cfg, key, ddp)
        t2i["latent_cache"] = str(cache.path)
        std = cache.std if cfg.real_latents == "sample" else None
        return captioned_sampler(cache.latents, data, teacher, ddp.device, std)

    notes = []
    if data is None:
        notes.append(
            "no --data: training the distribution-matching loss alone (GAN weight 0, no "
            "discriminator); without a density ratio h is constant, so every --divergence "
            "reduces to reverse KL (DMD). Pass captioned images with --data for f-distill proper."
        )
    return RealSource(
        shape=(int(info.shape[0]), size, size),
        digests=digests,
        teacher={
            "path": str(pipeline_dir),
            "family": info.family,
            "digest": digests["teacher"],
            "step": None,
            "options": {"data": cfg.data, "resolution": res, "max_images": cfg.max_images},
        },
        data=(
            {"spec": str(cfg.data), "name": "captioned", "size": len(data)}
            if data is not None
            else None
        ),
        discriminator=data is not None,
        open=open_,
        extra={"t2i": t2i},
        notes=notes,
    )
