"""The image resizing of DMD2's zero-shot COCO protocol, with PIL only (no torchvision).

Two steps, applied alike to generated and reference images (DMD2 main/coco_eval/
coco_evaluator.py, ``compute_fid`` and ``compute_clip_score``):

1. :func:`center_crop_lanczos`: crop the largest centred square (the offsets of torchvision's
   ``center_crop``: ``int(round((side - crop) / 2))``) and resize it to ``size`` x ``size``
   (256) with PIL's Lanczos filter, as 8-bit pixels.
2. :func:`clean_resize`: clean-fid's "clean" mode before the Inception network
   (cleanfid/resize.py, ``make_resizer("PIL", False, "bicubic", (299, 299))``): each channel
   becomes a 32-bit float PIL image (mode ``"F"``), is resized bicubic to 299 x 299, clipped to
   [0, 255]; the three channels are stacked as float32. Nothing is quantised after the resize.

Images here are numpy ``uint8`` [H, W, 3] (as PIL holds them) or torch ``uint8`` [N, 3, H, W].
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from torch import Tensor

EVAL_RES = 256
"""DMD2's ``--eval_res``: the side of the centre crop after the Lanczos resize."""

CLEAN_FID_SIZE = 299
"""Side of clean-fid's resize, the Inception network's input."""


def center_crop_box(width: int, height: int, crop: int | None = None) -> tuple[int, int, int, int]:
    """PIL crop box ``(left, top, right, bottom)`` of the centred ``crop`` square (default the
    short side), with torchvision's ``center_crop`` offsets."""
    crop = min(width, height) if crop is None else int(crop)
    left = int(round((width - crop) / 2.0))
    top = int(round((height - crop) / 2.0))
    return left, top, left + crop, top + crop


def center_crop_lanczos(image: np.ndarray | PIL.Image.Image, size: int = EVAL_RES) -> np.ndarray:
    """Largest centred square, Lanczos-resized to ``size`` x ``size``: uint8 [size, size, 3]."""
    im = image if isinstance(image, PIL.Image.Image) else PIL.Image.fromarray(np.asarray(image))
    if im.mode != "RGB":  # clean-fid opens every file with .convert("RGB")
        im = im.convert("RGB")
    im = im.crop(center_crop_box(*im.size))
    if im.size != (size, size):
        im = im.resize((size, size), PIL.Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def clean_resize(image: np.ndarray, size: int = CLEAN_FID_SIZE) -> np.ndarray:
    """clean-fid's "clean" resize: per channel, float32 PIL image, bicubic to ``size``,
    clipped to [0, 255]. [H, W, C] (any real dtype, values in [0, 255]) -> float32
    [size, size, C]."""
    x = np.asarray(image)
    if x.ndim != 3:
        raise ValueError(f"expected an image [H, W, C], got shape {x.shape}")
    channels = []
    for c in range(x.shape[2]):
        im = PIL.Image.fromarray(np.ascontiguousarray(x[:, :, c], dtype=np.float32))
        im = im.resize((size, size), PIL.Image.Resampling.BICUBIC)
        channels.append(np.asarray(im, dtype=np.float32).clip(0, 255))
    return np.stack(channels, axis=2).astype(np.float32)


def _hwc(image: Tensor | np.ndarray) -> np.ndarray:
    """uint8 [3, H, W] tensor or [H, W, 3] array -> uint8 [H, W, 3] array."""
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise ValueError(f"expected uint8 [3, H, W], got {image.dtype} {tuple(image.shape)}")
        return image.permute(1, 2, 0).cpu().numpy()
    return np.asarray(image, dtype=np.uint8)


def eval_res_batch(images: Tensor | list, size: int = EVAL_RES) -> Tensor:
    """Step 1 on a batch: uint8 images ([N, 3, H, W], or a list of [3, H, W] of any sizes) ->
    uint8 [N, 3, size, size]."""
    out = [torch.from_numpy(center_crop_lanczos(_hwc(im), size).copy()) for im in images]
    if not out:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    return torch.stack(out).permute(0, 3, 1, 2).contiguous()


def clean_resize_batch(images: Tensor, size: int = CLEAN_FID_SIZE) -> Tensor:
    """Step 2 on a batch: uint8 [N, 3, H, W] -> float32 [N, 3, size, size] in [0, 255]."""
    out = [torch.from_numpy(clean_resize(_hwc(im), size)) for im in images]
    if not out:
        return torch.empty(0, 3, size, size)
    return torch.stack(out).permute(0, 3, 1, 2).contiguous()


__all__ = [
    "CLEAN_FID_SIZE",
    "EVAL_RES",
    "center_crop_box",
    "center_crop_lanczos",
    "clean_resize",
    "clean_resize_batch",
    "eval_res_batch",
]
