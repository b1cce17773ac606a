"""Turn [-1, 1] image tensors into pixels: uint8 conversion, grids, PNG and ``.npz`` files.

Conversions round like EDM's ``generate.py``: ``(x * 127.5 + 128).clip(0, 255)`` truncated to
uint8, so a uint8 image loaded as ``u / 127.5 - 1`` converts back to exactly ``u``. Files are
written atomically (a temporary file in the same folder, then ``os.replace``), so a reader
never sees half a file and an interrupted run leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import PIL.Image
import torch
from torch import Tensor

# Smallest cell size, in pixels, that save_image_grid's default scale reaches.
_MIN_CELL = 32


def to_uint8(images: Tensor | np.ndarray) -> Tensor:
    """Map images [N, C, H, W] in [-1, 1] to uint8 pixels (uint8 input is returned as is)."""
    x = torch.as_tensor(images).detach().cpu()
    if x.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def make_grid(
    images: Tensor | np.ndarray, nrow: int | None = None, padding: int = 0, pad_value: int = 0
) -> np.ndarray:
    """Tile images [N, C, H, W] ([-1, 1] floats or uint8) into one uint8 image [H', W', C].

    ``nrow`` images per row (default ``ceil(sqrt(N))``), filled row by row; empty cells and
    ``padding`` pixels (between and around cells) get ``pad_value``. The result is HWC, the
    layout PIL and matplotlib take.
    """
    x = to_uint8(images).numpy()
    n, c, h, w = x.shape
    if n == 0:
        raise ValueError("cannot make a grid of zero images")
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    ncol, rows = min(nrow, n), math.ceil(n / nrow)
    grid = np.full(
        (rows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8
    )
    for i in range(n):
        top = padding + (i // nrow) * (h + padding)
        left = padding + (i % nrow) * (w + padding)
        grid[top : top + h, left : left + w] = x[i].transpose(1, 2, 0)
    return grid


def save_image_grid(
    images: Tensor | np.ndarray,
    path: str | os.PathLike,
    nrow: int | None = None,
    scale: int | None = None,
    padding: int = 0,
) -> Path:
    """Write a grid of images [N, C, H, W] in [-1, 1] as a PNG (grayscale or RGB).

    The grid is upscaled by the integer ``scale`` with nearest neighbour so tiny images stay
    crisp; the default picks the smallest scale making cells at least 32 px (8x8 digits: 4).
    """
    grid = make_grid(images, nrow=nrow, padding=padding)
    if scale is None:
        h = torch.as_tensor(images).shape[-2]
        scale = max(1, math.ceil(_MIN_CELL / h))
    if scale < 1 or int(scale) != scale:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    grid = grid.repeat(int(scale), axis=0).repeat(int(scale), axis=1)
    img = PIL.Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    return _atomic_write(path, lambda f: img.save(f, format="PNG"))


def save_npz(
    path: str | os.PathLike,
    images: Tensor | np.ndarray,
    labels: Tensor | np.ndarray | None = None,
) -> Path:
    """Save images [N, C, H, W] ([-1, 1] or uint8) to ``.npz`` as EDM stores samples.

    ``images`` is written as uint8 [N, H, W, C] (0..255), ``labels`` (if given) as int64 [N];
    ``fdistill.data.load_dataset`` reads the file back.
    """
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
    arrays = {"images": pixels}
    if labels is not None:
        lab = torch.as_tensor(labels).detach().cpu().long().numpy()
        if lab.shape != (len(pixels),):
            raise ValueError(f"labels must have shape [{len(pixels)}], got {lab.shape}")
        arrays["labels"] = lab
    return _atomic_write(path, lambda f: np.savez(f, **arrays))


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Write a file through ``write(file)`` into a temporary sibling, then rename it over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
