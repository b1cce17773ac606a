"""Building blocks of DMD2's zero-shot COCO protocol (``eval --protocol dmd2``).

What DMD2 reports for SD v1.5 (main/test_folder_sd.py, main/coco_eval/coco_evaluator.py):

* 30k COCO 2014 captions (DMD2 ships a fixed list, captions_coco14_test); here
  :func:`draw_captions` draws ``n`` (30k by default) from a COCO captions json or a text file
  with a fixed, documented seed, and :func:`write_drawn_captions` writes the list beside the
  results;
* generated images quantised as DMD2 does (:func:`dmd2_quantize`, ``((x + 1) * 127.5)``
  truncated), then, like the reference images, centre-cropped and Lanczos-resized to 256
  (:func:`fdistill.metrics.resize.eval_res_batch`);
* FID with clean-fid's resize to 299 (:func:`fdistill.metrics.resize.clean_resize_batch`) and
  the standard Inception weights, fed the float image without a second resize
  (:func:`clean_inception_features`);
* CLIP score on the 256 images with the prefix "A photo depicts " (DMD2 uses open_clip
  ViT-g-14 laion2b_s12b_b42k; here a local transformers CLIP folder).

:class:`DMD2Metrics` streams batches through all of it and returns the numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import Tensor, nn

from fdistill.metrics.clip import DMD2_PREFIX, CLIPScorer
from fdistill.metrics.fid import StatsAccumulator, frechet_distance_from_stats
from fdistill.metrics.resize import CLEAN_FID_SIZE, EVAL_RES, clean_resize_batch, eval_res_batch

PROTOCOLS = ("fdistill", "dmd2")
"""``fdistill``: today's evaluation (native resolution, the detector's own resize, no prefix);
``dmd2``: this module."""

DEFAULT_N = 30_000
"""Number of captions and images of the zero-shot COCO protocol."""

CAPTION_SEED = 0
"""Seed of :func:`draw_captions` (numpy ``default_rng``): fixed, so every run scores the same
captions."""

DRAWN_CAPTIONS = "captions_drawn.jsonl"
"""File name of the drawn caption list written beside the results."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------- captions
@dataclass(frozen=True)
class CaptionPool:
    """All captions of a file, with the COCO ``image_id`` of each (``None`` for text files)."""

    source: str
    captions: list[str]
    image_ids: list[Any]


@dataclass(frozen=True)
class DrawnCaptions:
    """The captions an evaluation uses, in order, and how they were drawn."""

    source: str
    seed: int
    method: str
    captions: list[str]
    image_ids: list[Any] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """What the results JSON records about the captions."""
        return {"source": self.source, "seed": self.seed, "method": self.method, "n": len(self)}

    def __len__(self) -> int:
        return len(self.captions)


def read_caption_pool(path: str | Path) -> CaptionPool:
    """Captions of a COCO captions json (``{"annotations": [{"image_id", "caption"}, ...]}``),
    a JSONL (``caption`` per line, optional ``image_id``) or a text file (one per line, blank
    lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"--captions: no such file '{path}'; pass a COCO captions json "
            "(annotations/captions_val2014.json) or a text file with one caption a line"
        )
    text = p.read_text(encoding="utf-8")
    caps: list[str] = []
    ids: list[Any] = []
    if p.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise ValueError(f"{p} is not a COCO captions file (no 'annotations' list)")
        for i, a in enumerate(data["annotations"]):
            if not isinstance(a, dict) or not isinstance(a.get("caption"), str):
                raise ValueError(f"{p}: annotation {i} has no 'caption' string")
            caps.append(a["caption"].strip())
            ids.append(a.get("image_id"))
    elif p.suffix.lower() == ".jsonl":
        for i, line in enumerate(text.split("\n"), 1):
            if line.strip():
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("caption"), str):
                    raise ValueError(f"{p} line {i} has no 'caption' string")
                caps.append(rec["caption"].strip())
                ids.append(rec.get("image_id"))
    else:
        caps = [s.strip() for s in text.split("\n") if s.strip()]
        ids = [None] * len(caps)
    if not caps:
        raise ValueError(f"{p} holds no captions")
    return CaptionPool(str(p), caps, ids)


def draw_captions(
    source: str | Path | CaptionPool,
    n: int = DEFAULT_N,
    seed: int = CAPTION_SEED,
    one_per_image: bool = True,
) -> DrawnCaptions:
    """``n`` captions drawn reproducibly from ``source``.

    With COCO image ids and ``one_per_image`` (the zero-shot protocol: one caption for each of
    ``n`` distinct images): ``rng = numpy.random.default_rng(seed)``; the images in order of
    first appearance, ``rng.choice(len(images), n, replace=False)`` of them, then for each
    ``rng.integers(its number of captions)`` picks its caption. Otherwise ``rng.choice`` draws
    ``n`` distinct captions. A source with at most ``n`` candidates is used whole, in file
    order (a fixed 30k list such as DMD2's stays as it is).
    """
    pool = source if isinstance(source, CaptionPool) else read_caption_pool(source)
    if n < 1:
        raise ValueError(f"the number of captions must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    if one_per_image and all(i is not None for i in pool.image_ids):
        by_image: dict[Any, list[int]] = {}
        for k, i in enumerate(pool.image_ids):
            by_image.setdefault(i, []).append(k)
        images = list(by_image)
        if n >= len(images):
            chosen, how = images, "every image, first caption"
            picks = [by_image[i][0] for i in chosen]
        else:
            order = rng.choice(len(images), size=n, replace=False)
            chosen = [images[j] for j in order]
            picks = [by_image[i][int(rng.integers(len(by_image[i])))] for i in chosen]
            how = "one caption per image, numpy default_rng(seed): choice then integers"
    elif n >= len(pool.captions):
        picks, how = list(range(len(pool.captions))), "every caption, file order"
    else:
        picks = [int(k) for k in rng.choice(len(pool.captions), size=n, replace=False)]
        how = "numpy default_rng(seed).choice without replacement"
    return DrawnCaptions(
        pool.source,
        seed,
        how,
        [pool.captions[k] for k in picks],
        [pool.image_ids[k] for k in picks],
    )


def write_drawn_captions(drawn: DrawnCaptions, folder: str | Path) -> Path:
    """Write the drawn list as ``folder/captions_drawn.jsonl`` (one ``{"index", "caption",
    "image_id"}`` a line, readable by ``--prompts``); returns the path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    path = out / DRAWN_CAPTIONS
    ids = drawn.image_ids or [None] * len(drawn)
    lines = [
        json.dumps({"index": k, "caption": c, "image_id": i}, ensure_ascii=False)
        for k, (c, i) in enumerate(zip(drawn.captions, ids, strict=True))
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- images
def dmd2_quantize(images: Tensor) -> Tensor:
    """[-1, 1] floats [N, 3, H, W] -> uint8 as DMD2 saves its samples:
    ``((x + 1) * 127.5).clamp(0, 255)`` truncated (fdistill's own rounds to nearest)."""
    return ((images.detach().float().cpu() + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)


def load_image_uint8(path: str | Path) -> Tensor:
    """An image file as uint8 [3, H, W] at its own size (RGB, as clean-fid opens files)."""
    with PIL.Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a reference folder (e.g. COCO val2014), sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--ref: '{folder}' is not a folder of reference images")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--ref: no images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'")
    return files


def _module_device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def clean_inception_features(inception: nn.Module, images: Tensor, batch: int = 64) -> Tensor:
    """Inception features [N, F] (float32, CPU) of float [N, 3, 299, 299] images in [0, 255]
    (clean-fid's resize output), with no second resize.

    ``inception``: a :class:`fdistill.metrics.inception.InceptionFeatures` (its ``detector``
    and ``convention``): the NVIDIA file's network body (``detector.layers``) on
    ``(x - 128) / 128``, as clean-fid calls it, or the plain file on the same input. Any other
    module is called on the [0, 255] float images as they are.
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, CLEAN_FID_SIZE, CLEAN_FID_SIZE):
        raise ValueError(f"expected float [N, 3, 299, 299], got {tuple(images.shape)}")
    detector = getattr(inception, "detector", None)
    convention = getattr(inception, "convention", None)
    net = inception if detector is None else detector
    device = _module_device(net)
    out = []
    for chunk in images.split(batch):
        x = chunk.to(device=device, dtype=torch.float32)
        if detector is None:
            f = inception(x)
        elif convention == "plain":
            f = detector((x - 128.0) / 128.0)
        else:
            layers = getattr(detector, "layers", None)
            if layers is not None:
                f = layers((x - 128.0) / 128.0)
            else:  # at 299 its own resize is the identity up to rounding
                f = detector(x, return_features=True)
        out.append(f.reshape(len(chunk), -1).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


# --------------------------------------------------------------------------- the metrics
class DMD2Metrics:
    """Streaming FID and CLIP score under DMD2's protocol.

    ``inception``: the Inception features module (``None``: no FID); ``scorer``: a
    :class:`CLIPScorer` (``None``: no CLIP score). Feed generated batches with
    :meth:`update` (with their captions) and reference images with :meth:`update_reference`
    (any sizes), then :meth:`compute`.
    """

    def __init__(
        self,
        inception: nn.Module | None = None,
        scorer: CLIPScorer | None = None,
        *,
        eval_res: int = EVAL_RES,
        prefix: str = DMD2_PREFIX,
        num_features: int | None = None,
    ) -> None:
        self.inception, self.scorer = inception, scorer
        self.eval_res, self.prefix = eval_res, prefix
        feats = num_features or getattr(inception, "num_features", 2048)
        self.acc = StatsAccumulator(feats) if inception is not None else None
        self.ref = StatsAccumulator(feats) if inception is not None else None
        self.cosines: list[Tensor] = []
        self.count = 0

    def prepare(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        """Generated [-1, 1] floats (quantised as DMD2 does) or uint8 images -> uint8 at
        ``eval_res`` (centre crop, Lanczos)."""
        if isinstance(images, Tensor) and images.dtype != torch.uint8:
            images = dmd2_quantize(images)
        return eval_res_batch(images, self.eval_res)

    def _features(self, u8: Tensor) -> Tensor:
        return clean_inception_features(self.inception, clean_resize_batch(u8))

    def update(self, images: Tensor | Sequence[Tensor], captions: Sequence[str]) -> None:
        """Add generated images (``[-1, 1]`` floats or uint8) and their captions."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        u8 = self.prepare(images)
        if self.scorer is not None:
            self.cosines.append(self.scorer.score(u8, list(captions), self.prefix).double().cpu())
        if self.acc is not None:
            self.acc.update(self._features(u8).numpy())
        self.count += len(u8)

    def update_reference(self, images: Tensor | Sequence[Tensor]) -> None:
        """Add reference images (uint8, a batch or a list of [3, H, W] of any sizes)."""
        if self.ref is None:
            raise ValueError("no Inception network: FID is off")
        self.ref.update(self._features(self.prepare(images)).numpy())

    def update_reference_files(self, files: Iterable[str | Path], batch: int = 64) -> int:
        """Add reference image files, ``batch`` at a time; returns how many."""
        chunk: list[Tensor] = []
        total = 0
        for f in files:
            chunk.append(load_image_uint8(f))
            if len(chunk) == batch:
                self.update_reference(chunk)
                total, chunk = total + len(chunk), []
        if chunk:
            self.update_reference(chunk)
            total += len(chunk)
        return total

    def compute(self) -> dict[str, Any]:
        """``num_images``, and ``clip_score`` / ``clip_score_std`` and ``fid`` (with
        ``num_reference``) for the metrics that are on."""
        out: dict[str, Any] = {"num_images": self.count}
        if self.cosines:
            c = torch.cat(self.cosines)
            out |= {"clip_score": float(c.mean()), "clip_score_std": float(c.std(correction=0))}
        if self.acc is not None and self.ref is not None and self.ref.count:
            out["fid"] = frechet_distance_from_stats(*self.acc.compute(), *self.ref.compute())
            out["num_reference"] = self.ref.count
        return out

    def describe(self) -> dict[str, Any]:
        """The protocol's settings, for the results JSON."""
        return {
            "protocol": "dmd2",
            "eval_res": self.eval_res,
            "resize": "centre crop, PIL Lanczos",
            "fid_resize": "clean-fid clean (PIL bicubic, float32 per channel, 299)",
            "quantize": "((x + 1) * 127.5) truncated",
            "clip_prefix": self.prefix,
        }


__all__ = [
    "CAPTION_SEED",
    "DEFAULT_N",
    "DRAWN_CAPTIONS",
    "PROTOCOLS",
    "CaptionPool",
    "DMD2Metrics",
    "DrawnCaptions",
    "clean_inception_features",
    "dmd2_quantize",
    "draw_captions",
    "list_images",
    "load_image_uint8",
    "read_caption_pool",
    "write_drawn_captions",
]
