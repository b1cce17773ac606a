"""Stable Diffusion (v1.x / v2.x layout) as a text-conditioned latent teacher.

The pipeline's ``UNet2DConditionModel`` speaks ``D(x, sigma, cond) -> x0`` on VAE latents
(``x = x0 + sigma * eps``, same schedule conversion as every diffusers teacher, see
:mod:`fdistill.teachers.diffusers_base`); ``cond`` is the text encoder's hidden states
``[N, 77, D]`` and ``None`` means the empty prompt. The tokenizer, text encoder and VAE are
held beside the UNet, outside its ``state_dict``: a student or fake-score copy of the teacher
is the UNet (and the cached empty-prompt embedding) only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fdistill.denoisers.registry import register_model
from fdistill.teachers.diffusers_base import (
    DiffusersDenoiserBase,
    DiscreteSchedule,
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
from fdistill.userfiles import read_json, user_file

# CLIP's text encoder has 77 position embeddings (every Stable Diffusion v1/v2 checkpoint), so
# 77 is the prompt length when neither the tokenizer nor the encoder says otherwise.
CLIP_CONTEXT = 77
# transformers sets model_max_length to 1e30 when tokenizer_config.json omits it; any length
# above this is "unset", and the encoder's position embeddings give the real one.
_UNSET_LENGTH = 1 << 20


def _context_length(tokenizer_length, encoder_config) -> int:
    """The prompt length: the tokenizer's ``model_max_length`` when set, else the text
    encoder's ``max_position_embeddings``, else :data:`CLIP_CONTEXT`."""
    if isinstance(tokenizer_length, int | float) and 0 < tokenizer_length <= _UNSET_LENGTH:
        return int(tokenizer_length)
    n = getattr(encoder_config, "max_position_embeddings", None)
    if n is None and isinstance(encoder_config, dict):
        n = encoder_config.get("max_position_embeddings")
    return int(n) if isinstance(n, int) and 0 < n <= _UNSET_LENGTH else CLIP_CONTEXT


def require_transformers():
    """Import transformers, or raise the one-line error telling the user how to install it."""
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "loading a Stable Diffusion teacher needs transformers: pip install 'fdistill[t2i]'"
        ) from None
    return transformers


class SDComponents(NamedTuple):
    """The frozen parts of a Stable Diffusion pipeline besides its UNet (eval mode, no grad)."""

    tokenizer: Any
    text_encoder: nn.Module
    vae: nn.Module


def load_sd_components(path: str | Path) -> SDComponents:
    """Tokenizer, text encoder and VAE of a local Stable Diffusion pipeline folder."""
    diffusers = require_diffusers()
    transformers = require_transformers()
    root = Path(path)
    if root.name == "unet":
        root = root.parent
    missing = [d for d in ("tokenizer", "text_encoder", "vae") if not (root / d).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"'{root}' lacks {', '.join(m + '/' for m in missing)}: a Stable Diffusion pipeline "
            "folder has tokenizer/, text_encoder/ and vae/ beside unet/"
        )
    for part in ("tokenizer", "text_encoder", "vae"):  # configs: depth- and size-checked
        for name in ("tokenizer_config.json", "config.json"):
            if (root / part / name).is_file():
                read_json(root / part / name)
    with user_file(root / "tokenizer", "tokenizer:"):
        tok = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    with user_file(root / "text_encoder", "text encoder:"):
        enc = transformers.CLIPTextModel.from_pretrained(
            root / "text_encoder", local_files_only=True
        )
    with user_file(root / "vae", "VAE:"):
        vae = diffusers.AutoencoderKL.from_pretrained(
            root / "vae", local_files_only=True, low_cpu_mem_usage=False
        )
    tok.model_max_length = _context_length(tok.model_max_length, enc.config)
    for m in (enc, vae):
        m.requires_grad_(False).eval()
    return SDComponents(tok, enc, vae)


class StableDiffusionTeacher(DiffusersDenoiserBase):
    """A ``UNet2DConditionModel`` as ``D(x, sigma, cond) -> x0`` on latents ``[N, 4, H, W]``.

    ``cond``: text-encoder hidden states ``[N, L, D]`` (see :meth:`encode_prompts`; ``[1, L,
    D]`` broadcasts), ``None`` for the empty prompt, whose embedding is the ``null_cond``
    buffer. With ``components`` (tokenizer, text encoder, VAE) the teacher also encodes
    prompts and images; a copy rebuilt from ``.config`` has none and gets ``null_cond`` from
    ``load_state_dict``.
    """

    null_cond: Tensor

    def __init__(
        self,
        unet: nn.Module,
        schedule: DiscreteSchedule | Mapping,
        prediction_type: str = "epsilon",
        components: SDComponents | None = None,
        context: Sequence[int] | None = None,
    ) -> None:
        if not isinstance(schedule, DiscreteSchedule):
            schedule = DiscreteSchedule(schedule_config(schedule))
        cfg = unet.config
        if cfg.addition_embed_type is not None or cfg.class_embed_type is not None:
            raise ValueError(
                "this UNet2DConditionModel needs added or class conditioning (SDXL, upscaler); "
                "accepted: Stable Diffusion v1/v2-style UNets conditioned on text alone"
            )
        if cfg.in_channels != cfg.out_channels:
            raise ValueError(
                f"this UNet2DConditionModel takes {cfg.in_channels} channels and predicts "
                f"{cfg.out_channels} (inpainting?); accepted: equal in_channels and out_channels"
            )
        super().__init__(unet, schedule, prediction_type)
        if components is not None:
            length = int(components.tokenizer.model_max_length)
            context = (length, int(components.text_encoder.config.hidden_size))
        if context is None:
            raise ValueError("StableDiffusionTeacher needs components or context=(length, dim)")
        self.components = components
        self.register_buffer("null_cond", torch.zeros(1, *map(int, context)))
        self._null_ready = False
        self.register_load_state_dict_post_hook(_null_loaded)
        self.config = {
            "type": "sd-unet",
            "unet": plain_config(cfg),
            "schedule": dict(schedule.config),
            "prediction_type": prediction_type,
            "context": [int(c) for c in context],
        }
        if components is not None:
            self.null_cond.copy_(self.encode_prompts([""]).to(self.null_cond))
            self._null_ready = True

    # -- text and images
    def _components(self) -> SDComponents:
        if self.components is None:
            raise ValueError(
                "this Stable Diffusion denoiser was rebuilt without its tokenizer, text encoder "
                "and VAE; load the pipeline folder with load_teacher to encode prompts or images"
            )
        return self.components

    def _follow(self, module: nn.Module) -> nn.Module:
        """Move a component to the UNet's device (keeping its dtype) on first use there."""
        device = self.unet.device
        if next(module.parameters()).device != device:
            module.to(device)
        return module

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """CLIP token ids ``[N, L]``, padded to the tokenizer's max length and truncated."""
        tok = self._components().tokenizer
        if isinstance(prompts, str):
            raise ValueError("encode_prompts takes a list of prompts, not one string")
        return tok(
            list(prompts),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Text-encoder hidden states ``[N, L, D]`` for ``prompts`` (the UNet's ``cond``)."""
        enc = self._follow(self._components().text_encoder)
        ids = self.tokenize(prompts).to(self.unet.device)
        mask = None
        if getattr(enc.config, "use_attention_mask", False):
            mask = (ids != self._components().tokenizer.pad_token_id).long()
        out = enc(ids, attention_mask=mask)[0]
        return out.to(self.unet.dtype)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Latents of images in ``[-1, 1]`` ``[N, 3, 8H, 8W]``: the VAE posterior's mean times
        ``scaling_factor`` (minus ``shift_factor`` first, where the VAE has one)."""
        vae = self._follow(self._components().vae)
        vdtype = next(vae.parameters()).dtype
        mean = vae.encode(images.to(self.unet.device, vdtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((mean.float() - shift) * vae.config.scaling_factor).to(images.dtype)

    def encode_posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` of the VAE posterior of images in ``[-1, 1]``, in the latent units of
        :meth:`encode_images` (scaled by ``scaling_factor``): a posterior sample is
        ``mean + std * eps``, what the official code trains on."""
        vae = self._follow(self._components().vae)
        vdtype = next(vae.parameters()).dtype
        dist = vae.encode(images.to(self.unet.device, vdtype)).latent_dist
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        f = vae.config.scaling_factor
        mean = ((dist.mean.float() - shift) * f).to(images.dtype)
        return mean, (dist.std.float() * f).to(images.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images in about ``[-1, 1]`` (not clamped) from latents made by :meth:`encode_images`."""
        vae = self._follow(self._components().vae)
        vdtype = next(vae.parameters()).dtype
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.float() / vae.config.scaling_factor + shift
        return vae.decode(z.to(vae.device, vdtype)).sample.to(latents.dtype)

    # -- the denoiser
    def _prepare_cond(self, cond: Tensor | None, n: int) -> Tensor:
        if cond is None:
            if not self._null_ready:
                raise ValueError(
                    "cond=None needs the empty-prompt embedding: load this denoiser's "
                    "state_dict (null_cond) or pass text embeddings"
                )
            cond = self.null_cond
        ctx = tuple(self.null_cond.shape[1:])
        if cond.ndim != 3 or cond.shape[0] not in (1, n) or cond.shape[2] != ctx[1]:
            raise ValueError(
                f"cond of shape {tuple(cond.shape)} is not text embeddings [{n}, L, {ctx[1]}] "
                "(encode_prompts) or None for the empty prompt"
            )
        return cond.to(self.unet.dtype).expand(n, -1, -1)

    def _call_unet(self, x_in: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        return self.unet(x_in, t, encoder_hidden_states=cond, return_dict=False)[0]

    def guided(
        self, x: Tensor, sigma: float | Tensor, cond: Tensor | None, guidance_scale: float
    ) -> Tensor:
        """Classifier-free guidance ``D_u + w (D_c - D_u)`` in one batched forward pass."""
        n = x.shape[0]
        if isinstance(sigma, Tensor) and sigma.ndim > 0:
            sigma = sigma.reshape(-1).expand(n).repeat(2)
        c = self._prepare_cond(cond, n)
        d = self(torch.cat([x, x]), sigma, torch.cat([self._prepare_cond(None, n), c]))
        d_u, d_c = d[:n], d[n:]
        return d_u + guidance_scale * (d_c - d_u)


def _null_loaded(module: StableDiffusionTeacher, incompatible) -> None:
    if "null_cond" not in incompatible.missing_keys:
        module._null_ready = True


@register_model("sd-unet")
def _build_sd(config: dict) -> StableDiffusionTeacher:
    diffusers = require_diffusers()
    unet = diffusers.UNet2DConditionModel.from_config(dict(config["unet"]))
    return StableDiffusionTeacher(
        unet, config["schedule"], config["prediction_type"], context=config["context"]
    )


def load_sd_teacher(
    path: str | Path, prediction_type: str | None = None, components: bool = True
) -> StableDiffusionTeacher:
    """Load a local Stable Diffusion pipeline folder (or its ``unet/`` beside a scheduler).

    ``components=False`` skips the tokenizer, text encoder and VAE; the empty-prompt
    embedding then comes from ``null_cond`` in a state dict loaded later.
    """
    diffusers = require_diffusers()
    unet_dir, _, sched_cfg = resolve(Path(path))
    unet = pretrained_unet(diffusers.UNet2DConditionModel, unet_dir)
    parts = load_sd_components(unet_dir.parent) if components else None
    context = None
    if parts is None:
        tok_cfg = unet_dir.parent / "tokenizer" / "tokenizer_config.json"
        enc_cfg = unet_dir.parent / "text_encoder" / "config.json"
        length = _context_length(
            read_json(tok_cfg).get("model_max_length") if tok_cfg.is_file() else None,
            read_json(enc_cfg) if enc_cfg.is_file() else {},
        )
        context = (length, int(unet.config.cross_attention_dim))
    pred = prediction_type_of(sched_cfg, prediction_type)
    model = StableDiffusionTeacher(unet, sched_cfg, pred, components=parts, context=context)
    s = model.schedule
    c, h, w = image_shape(unet)
    model.info = TeacherInfo(
        family="diffusers",
        shape=(c, h, w),
        num_classes=0,
        sigma_min=s.sigma_min,
        sigma_max=s.sigma_max,
        schedule=s,
        # SD's scaling_factor makes latents about unit variance.
        sigma_data=1.0,
        details={**unet_details(unet, s, pred), "conditioning": "text"},
    )
    return model


__all__ = [
    "CLIP_CONTEXT",
    "SDComponents",
    "StableDiffusionTeacher",
    "load_sd_components",
    "load_sd_teacher",
    "require_transformers",
]
