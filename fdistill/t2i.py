"""Text-to-image f-distill by its earlier module name.

Text-to-image is not a second pipeline: a Stable Diffusion teacher brings text conditioning and
a VAE codec (:mod:`fdistill.conditioning`), its real data are a captioned set's cached latents
(:mod:`fdistill.sources`, :mod:`fdistill.data.captions`), and :func:`fdistill.recipes.distill_run`
trains it like any teacher. This module re-exports the text-specific names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fdistill.conditioning import Text, student_inputs
from fdistill.config import T2IConfig, validate_t2i_config
from fdistill.data.captions import (
    CAPTIONS_JSONL,
    PROMPT_FIELDS,
    CaptionedData,
    LatentCache,
    default_cache_dir,
    encode_latents,
    latent_cache_key,
    load_image,
    read_captioned,
    read_prompts,
)
from fdistill.evaluation_text import (
    T2I_METRICS,
    evaluate_t2i,
    format_t2i_table,
    parse_t2i_metrics,
)
from fdistill.methods.fdistill import ConstantLogit, DistributionMatchingOnly
from fdistill.models import (
    EXPORT_FORMAT,
    EXPORT_META,
    export_unet,
    is_t2i,
    is_text_teacher,
    is_unet_export,
    load_unet_export,
    with_pipeline,
)
from fdistill.recipes import build_distill as build_t2i_distill
from fdistill.recipes import distill_run as distill_t2i_run
from fdistill.recipes import r1_attention_processor
from fdistill.sampling import iter_images, sample_images, sample_to_files, save_png
from fdistill.sources import captioned_sampler, latent_resolution, vae_factor


def prompt_sampler(
    prompts: Sequence[str], teacher: nn.Module, shape: tuple[int, ...], device: torch.device
):
    """``sample(n, gen) -> (z, text embeddings)``: the student's inputs for ``prompts``
    (:func:`fdistill.conditioning.student_inputs` with :class:`~fdistill.conditioning.Text`)."""
    return student_inputs(shape, Text(prompts, teacher.encode_prompts), device)


__all__ = [
    "CAPTIONS_JSONL",
    "EXPORT_FORMAT",
    "EXPORT_META",
    "PROMPT_FIELDS",
    "T2I_METRICS",
    "CaptionedData",
    "ConstantLogit",
    "DistributionMatchingOnly",
    "LatentCache",
    "T2IConfig",
    "build_t2i_distill",
    "captioned_sampler",
    "default_cache_dir",
    "distill_t2i_run",
    "encode_latents",
    "evaluate_t2i",
    "export_unet",
    "format_t2i_table",
    "is_t2i",
    "is_text_teacher",
    "is_unet_export",
    "iter_images",
    "latent_cache_key",
    "latent_resolution",
    "load_image",
    "load_unet_export",
    "parse_t2i_metrics",
    "prompt_sampler",
    "r1_attention_processor",
    "read_captioned",
    "read_prompts",
    "sample_images",
    "sample_to_files",
    "save_png",
    "validate_t2i_config",
    "vae_factor",
    "with_pipeline",
]
