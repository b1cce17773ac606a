"""``.npz`` image arrays: headers checked before loading, layouts, pixel scales, labels.

Part of :func:`fdistill.data.load_dataset`; also the label helpers every source shares.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch import Tensor

from fdistill.data.dataset import ImageDataset, check_finite_images
from fdistill.userfiles import UserFileError, check_allocation, declared_nbytes

# uint8 pixel -> u / 127.5 - 1, computed in float64 and rounded once to float32.
UINT8_TO_FLOAT = (np.arange(256) / 127.5 - 1).astype(np.float32)
UNCOND_HINT = "fix the labels, or train without them (--unconditional)"


def counted(values: np.ndarray, counts: np.ndarray, limit: int = 4) -> str:
    """``"500 (1 image), 7 (20 images)"``: the first ``limit`` labels with their counts."""
    parts = [f"{v} ({c} image{'s' if c != 1 else ''})" for v, c in zip(values, counts, strict=True)]
    more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


# ----------------------------------------------------------------------------- npz

# Out-of-range slack for value_range, as a fraction of its width (float round-off).
_RANGE_SLACK = 1e-5
_CHANNELS = "1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA)"


def _to_nchw(x: np.ndarray, source: str) -> np.ndarray:
    """[N, H, W] / [N, H, W, C] / [N, C, H, W] -> [N, C, H, W], choosing the square reading."""
    layouts = "[N, H, W], [N, H, W, C] or [N, C, H, W]"
    shape = x.shape
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim != 4:
        raise ValueError(f"{source}: 'images' has shape {x.shape}; expected {layouts}")
    elif x.shape[1] == x.shape[2] and 1 <= x.shape[3] <= 4:
        x = x.transpose(0, 3, 1, 2)  # NHWC, EDM's sample files; wins when both read square
    elif not (x.shape[2] == x.shape[3] and 1 <= x.shape[1] <= 4):
        if x.shape[1] == x.shape[2] and x.shape[1] > 0:  # square NHWC with a bad channel count
            raise ValueError(
                f"{source}: 'images' {x.shape} has {x.shape[3]} channels; expected {_CHANNELS}"
            )
        if x.shape[2] == x.shape[3] and x.shape[2] > 0:
            raise ValueError(
                f"{source}: 'images' {x.shape} has {x.shape[1]} channels; expected {_CHANNELS}"
            )
        raise ValueError(
            f"{source}: 'images' has shape {x.shape}, which is no layout of square images "
            f"({layouts}, C = 1..4); crop or pad the images to squares"
        )
    n, _, h, w = x.shape
    if h != w:
        raise ValueError(f"{source}: images are {w}x{h} (width x height); they must be square")
    if n == 0 or h == 0:
        raise ValueError(f"{source}: 'images' {shape} holds no pixels; the data set is empty")
    return x


def npz_images_to_float(
    images: np.ndarray,
    source: str = "images",
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Convert an ``images`` array from an ``.npz`` to float32 [N, C, H, W] in [-1, 1].

    Layout: [N, H, W] is grayscale; a 4-D array is [N, H, W, C] (EDM's sample files) or
    [N, C, H, W], whichever has square images (NHWC when both do), C = 1..4; alpha (channel 2
    of 2, 4 of 4) is dropped.

    Scale: ``value_range=(lo, hi)`` maps [lo, hi] to [-1, 1] for any integer or float array;
    values beyond it (by more than 1e-5 of its width) are an error. Without it, uint8 is
    0..255 and uint16 0..65535; other integer types and floats (is 1.0 white, or almost
    black?) are refused, since a wrong guess trains silently on wrong pixels.
    """
    x = _to_nchw(np.asarray(images), source)
    x = x[:, :1] if x.shape[1] == 2 else x[:, :3]
    numeric = np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    if not numeric:
        raise ValueError(
            f"{source}: unsupported images dtype {x.dtype}; save pixels as uint8 (0..255), or "
            "as numbers with value_range=(lo, hi) (--range LO,HI)"
        )
    if value_range is None:
        if x.dtype == np.uint8:
            return UINT8_TO_FLOAT[x]
        if x.dtype == np.uint16:
            return (x / 32767.5 - 1).astype(np.float32)
        lo, hi = x.min(), x.max()
        what = "float" if np.issubdtype(x.dtype, np.floating) else f"{x.dtype} integer"
        raise ValueError(
            f"{source}: {what} images (values in [{lo:g}, {hi:g}]) have no known pixel range "
            "([0, 1]? [-1, 1]? [0, 255]?); pass the range the values use, value_range=(lo, hi) "
            "(--range LO,HI), or save the pixels as uint8"
        )
    lo, hi = value_range
    if np.issubdtype(x.dtype, np.floating):
        check_finite_images(torch.from_numpy(np.ascontiguousarray(x, np.float32)), source)
    slack = _RANGE_SLACK * (hi - lo)
    outside = (x < lo - slack) | (x > hi + slack)
    if outside.any():
        per_image = outside.reshape(len(x), -1).sum(1)
        first = int(np.flatnonzero(per_image)[0])
        value = x[first][outside[first]].flat[0]
        raise ValueError(
            f"{source}: {int(per_image.sum())} values in {int((per_image > 0).sum())} images lie "
            f"outside value_range [{lo:g}, {hi:g}] (first: image {first}, value {value:g}; all "
            f"values span [{x.min():g}, {x.max():g}]); pass the range the data uses (--range)"
        )
    # (2x - (lo + hi)) / (hi - lo) in float64, rounded once: exact for [0, 1] and [-1, 1].
    y = (2 * x.astype(np.float64) - (lo + hi)) / (hi - lo)
    return np.clip(y, -1, 1).astype(np.float32)


def _npz_images(
    images: np.ndarray, source: str, value_range: tuple[float, float] | None
) -> Tensor | np.ndarray:
    """uint8 [N, C, H, W] pixels for 8-bit arrays (kept compact), else float32 in [-1, 1]."""
    x = np.asarray(images)
    if value_range is not None or x.dtype != np.uint8:
        return npz_images_to_float(x, source, value_range)
    x = _to_nchw(x, source)
    x = x[:, :1] if x.shape[1] == 2 else x[:, :3]
    return torch.from_numpy(np.ascontiguousarray(x))


def load_npz(
    path: Path,
    max_images: int | None,
    labels: bool,
    value_range: tuple[float, float] | None,
) -> ImageDataset:
    source = repr(str(path))
    check_npz_headers(path, ("images", "labels") if labels else ("images",))
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read {source} as an .npz file: {e}") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{source} holds a single array, not an .npz archive")
    with data:
        if "images" not in data.files:
            raise ValueError(
                f"{source} has no 'images' array (keys: {', '.join(data.files) or 'none'}); "
                "save the pixels under the key 'images'"
            )
        try:
            raw = data["images"]
            y = data["labels"] if labels and "labels" in data.files else None
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"cannot read the arrays of {source}: {e}") from e
    n = len(raw) if raw.ndim else 0
    if y is not None:
        y = integer_labels(np.asarray(y), source)
        if len(y) != n:
            raise ValueError(
                f"{source}: 'labels' has {len(y)} entries but 'images' has {n}; they must "
                "match one to one"
            )
        y = y[:max_images]
    images = _npz_images(raw[:max_images] if raw.ndim else raw, source, value_range)
    num_classes = int(y.max()) + 1 if y is not None and y.size else None
    return ImageDataset(images, y, num_classes=num_classes, name=path.stem)


def npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, header bytes)`` of an ``.npy`` stream, read without its data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:  # pragma: no cover - read_magic accepts only these
        raise ValueError(f"unsupported .npy format version {version}")
    return tuple(int(n) for n in shape), dtype, f.tell()


def check_npz_headers(path: Path, keys: Iterable[str]) -> None:
    """Check the arrays ``keys`` of an ``.npz`` before numpy allocates them: the size each
    header declares must be what the member holds and must fit in memory."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile):
        return  # np.load says what is wrong (a bare .npy, not a zip, ...)
    with zf:
        names = set(zf.namelist())
        for key in keys:
            member = f"{key}.npy"
            if member not in names:
                continue
            info = zf.getinfo(member)
            with zf.open(info) as f:
                shape, dtype, offset = npy_header(f)
            nbytes = declared_nbytes(shape, dtype.itemsize)
            where = f"{path} ({key!r})"
            if nbytes > info.file_size - offset:
                raise UserFileError(
                    where,
                    f"the header declares {shape} {dtype} ({nbytes:,} bytes) but the file holds "
                    f"{max(info.file_size - offset, 0):,} bytes of data; truncated or corrupt",
                )
            # 8-bit images are kept as they are; others become float32 copies.
            out = 0 if dtype == np.uint8 else declared_nbytes(shape, 4)
            check_allocation(nbytes + out, where, "the array")


def integer_labels(labels: np.ndarray, source: str) -> np.ndarray:
    """Labels as int64 [N]: integer arrays, or float arrays holding only whole numbers."""
    if labels.ndim != 1:
        raise ValueError(
            f"{source}: labels must be one integer class per image, got shape {labels.shape}"
        )
    if np.issubdtype(labels.dtype, np.floating):
        whole = np.isfinite(labels) & (labels == np.round(labels)) & (np.abs(labels) < 2**62)
        if not whole.all():
            i = int(np.flatnonzero(~whole)[0])
            raise ValueError(
                f"{source}: labels must be whole class numbers, but {int((~whole).sum())} are "
                f"not (first: index {i}, value {labels[i]:g}); {UNCOND_HINT}"
            )
        labels = labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{source}: labels must be integers, got dtype {labels.dtype}; {UNCOND_HINT}"
        )
    if labels.dtype == np.uint64 and labels.size and labels.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{source}: label {labels.max()} is too large; {UNCOND_HINT}")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        values, counts = np.unique(labels[labels < 0], return_counts=True)
        raise ValueError(
            f"{source}: labels must be classes 0..K-1, but found negative labels "
            f"{counted(values, counts)}; {UNCOND_HINT}"
        )
    return labels


__all__ = [
    "UINT8_TO_FLOAT",
    "UNCOND_HINT",
    "check_npz_headers",
    "counted",
    "integer_labels",
    "load_npz",
    "npy_header",
    "npz_images_to_float",
]
