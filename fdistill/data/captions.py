"""Prompts and captioned images for text-to-image runs, and their VAE latent cache.

* prompts: a text file (one prompt a line), a JSONL with a ``caption`` or ``text`` field, or a
  COCO ``captions_*.json``;
* captioned images: a folder with ``captions.jsonl`` of ``{"file", "caption"}``, or a COCO
  ``captions_*.json`` with its image folder;
* latents: the images encoded once with the pipeline's VAE and cached on disk under a key made
  of the VAE's weights, the resolution and the file list.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fdistill import runs
from fdistill.data.loading import decode_image
from fdistill.userfiles import read_json, user_file

CAPTIONS_JSONL = "captions.jsonl"


PROMPT_FIELDS = ("caption", "text")


PROMPT_FORMATS = (
    "a text file (one prompt a line), a .jsonl with a 'caption' or 'text' field, or a COCO "
    "captions_*.json"
)


DATA_FORMATS = (
    f"a folder with {CAPTIONS_JSONL} ({{'file', 'caption'}} per line) or a COCO "
    "captions_*.json beside its image folder"
)


def _caption_of(record: Any, where: str) -> str:
    if isinstance(record, dict):
        for key in PROMPT_FIELDS:
            if isinstance(record.get(key), str):
                return record[key]
    raise ValueError(f"{where}: expected a JSON object with a 'caption' or 'text' string")


def _coco(path: Path) -> dict:
    d = read_json(path)
    if not isinstance(d, dict) or not isinstance(d.get("annotations"), list):
        raise ValueError(f"{path}: expected a COCO captions file with an 'annotations' list")
    return d


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file (one a line, blank lines skipped), a JSONL (``caption`` or
    ``text`` field; also a captioned set's ``captions.jsonl``) or a COCO ``captions_*.json``;
    any failure is one line naming the file."""
    with user_file(path, "prompts:"):
        return _read_prompts(path)


def _read_prompts(path: str | Path) -> list[str]:
    p = Path(path)
    if p.is_dir() and (p / CAPTIONS_JSONL).is_file():
        p = p / CAPTIONS_JSONL
    if not p.is_file():
        raise FileNotFoundError(f"--prompts: no such file '{path}'; pass {PROMPT_FORMATS}")
    if p.suffix.lower() == ".json":
        d = _coco(p)
        prompts = [_caption_of(a, f"{p}: annotation {i}") for i, a in enumerate(d["annotations"])]
    else:
        try:
            # lines end at "\n" only: a prompt may hold any other character (U+2028, ...)
            lines = [line.rstrip("\r") for line in p.read_text(encoding="utf-8").split("\n")]
        except UnicodeDecodeError as e:
            raise ValueError(f"{p} is not UTF-8 text ({e})") from None
        first = next((s.strip() for s in lines if s.strip()), "")
        if p.suffix.lower() == ".jsonl" or first.startswith("{"):
            prompts = []
            for i, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p} line {i} is not JSON ({e.msg})") from None
                prompts.append(_caption_of(rec, f"{p} line {i}"))
        else:
            prompts = [s.strip() for s in lines if s.strip()]
    if not prompts:
        raise ValueError(f"{p} holds no prompts; pass {PROMPT_FORMATS}")
    return prompts


@dataclass(frozen=True)
class CaptionedData:
    """Images with captions: ``files`` (unique, relative to ``root``) and, per caption, the
    index of its image in ``files`` (COCO has about five captions per image)."""

    source: str
    root: Path
    files: tuple[str, ...]
    image_of: tuple[int, ...]
    captions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.captions)


def _from_jsonl(folder: Path) -> list[tuple[str, str]]:
    path = folder / CAPTIONS_JSONL
    pairs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i} is not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
            raise ValueError(f"{path} line {i}: expected {{'file': ..., 'caption': ...}}")
        if not (folder / rec["file"]).is_file():
            raise FileNotFoundError(f"{path} line {i}: no image '{folder / rec['file']}'")
        pairs.append((rec["file"], _caption_of(rec, f"{path} line {i}")))
    return pairs


def _coco_images(path: Path, d: dict) -> tuple[Path, list[tuple[str, str]]]:
    names = {img.get("id"): img.get("file_name") for img in d.get("images", [])}
    pairs = []
    for i, a in enumerate(d["annotations"]):
        name = names.get(a.get("image_id"))
        if not isinstance(name, str):
            raise ValueError(
                f"{path}: annotation {i} names image_id {a.get('image_id')!r}, "
                "which is not in 'images'"
            )
        pairs.append((name, _caption_of(a, f"{path}: annotation {i}")))
    if not pairs:
        raise ValueError(f"{path} holds no captions")
    split = path.stem.removeprefix("captions_")
    here, up = path.parent, path.parent.parent
    for root in (here / split, up / split, here, up):
        if (root / pairs[0][0]).is_file():
            return root, pairs
    raise FileNotFoundError(
        f"{path}: image folder not found; put the images in '{split}/' beside the JSON or "
        "beside its folder (COCO's layout: annotations/ and train2017/ side by side)"
    )


def read_captioned(spec: str | Path, max_images: int | None = None) -> CaptionedData:
    """Captioned images from ``spec`` (see the module docstring); ``max_images`` keeps the first
    N images (sorted by name) with all their captions; any failure is one line naming it."""
    with user_file(spec, "captioned data:"):
        return _read_captioned(spec, max_images)


def _read_captioned(spec: str | Path, max_images: int | None) -> CaptionedData:
    p = Path(spec)
    if p.is_dir() and (p / CAPTIONS_JSONL).is_file():
        root, pairs = p, _from_jsonl(p)
    else:
        if p.is_dir():
            found = sorted([*p.glob("captions_*.json"), *p.glob("annotations/captions_*.json")])
            if len(found) != 1:
                what = "several" if found else "no"
                raise ValueError(
                    f"--data {spec}: {what} captions_*.json found; pass {DATA_FORMATS}"
                )
            p = found[0]
        if not p.is_file() or p.suffix.lower() != ".json":
            raise FileNotFoundError(f"--data: '{spec}' is not {DATA_FORMATS}")
        root, pairs = _coco_images(p, _coco(p))
    files = sorted({f for f, _ in pairs})
    if max_images is not None:
        files = files[:max_images]
    index = {f: i for i, f in enumerate(files)}
    kept = [(index[f], c) for f, c in pairs if f in index]
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"--data {spec}: image '{root / missing[0]}' does not exist")
    return CaptionedData(
        str(spec), root, tuple(files), tuple(i for i, _ in kept), tuple(c for _, c in kept)
    )


def load_image(path: str | Path, resolution: int) -> Tensor:
    """One image as float ``[3, R, R]`` in [-1, 1]: centre crop to a square, bicubic resize
    (antialiased), grey replicated to RGB."""
    x = torch.from_numpy(decode_image(path))
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    h, w = x.shape[1:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[:, top : top + s, left : left + s]
    if s != resolution:
        x = F.interpolate(
            x[None], (resolution, resolution), mode="bicubic", antialias=True, align_corners=False
        )[0]
    return x.clamp(-1, 1).contiguous()


class LatentCache(NamedTuple):
    """Latents of a captioned set's images: the VAE posterior's mean and standard deviation
    (float16, ``[len(files), 4, r, r]`` each, CPU); a posterior sample is ``latents + std *
    eps``."""

    latents: Tensor
    path: Path
    key: str
    reused: bool
    std: Tensor | None = None


def default_cache_dir() -> Path:
    """Where latents are cached by default: ``$FDISTILL_CACHE/latents``, else
    ``fdistill/latents`` under ``$XDG_CACHE_HOME`` or ``~/.cache``."""

    base = os.environ.get("FDISTILL_CACHE")
    if base:
        return Path(base) / "latents"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "fdistill" / "latents"


def latent_cache_key(data: CaptionedData, resolution: int, vae_digest: str) -> str:
    """What the cached latents depend on: the VAE's weights, the resolution and the image files
    (names, sizes, modification times)."""
    files = []
    for f in data.files:
        st = (data.root / f).stat()
        files.append([f, st.st_size, st.st_mtime_ns])
    # v2: the cache holds the posterior's std beside its mean
    blob = json.dumps({"v": 2, "vae": vae_digest, "resolution": resolution, "files": files})
    return hashlib.sha256(blob.encode()).hexdigest()


def encode_latents(
    data: CaptionedData,
    teacher: nn.Module,
    resolution: int,
    cache_dir: str | Path | None = None,
    *,
    batch: int = 8,
    progress: bool = True,
    key: str | None = None,
) -> LatentCache:
    """The latents of ``data``'s images at ``resolution``, from the cache or encoded once with
    ``teacher``'s VAE (the posterior's mean and std times ``scaling_factor``) and saved there
    atomically."""
    vae = teacher.components.vae
    key = key or latent_cache_key(data, resolution, runs.state_digest(vae))
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"latents-{key[:32]}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if saved.get("key") == key:
                return LatentCache(saved["latents"], path, key, True, saved["std"])
        except Exception:  # noqa: BLE001 - our own cache, unreadable: encode it again
            pass
    from tqdm.auto import tqdm

    out = []
    chunks = range(0, len(data.files), batch)
    bar = tqdm(chunks, desc=f"encoding {len(data.files)} images", disable=not progress)
    for i in bar:
        imgs = torch.stack(
            [load_image(data.root / f, resolution) for f in data.files[i : i + batch]]
        )
        out.append(torch.stack(teacher.encode_posterior(imgs)).float().cpu().half())
    latents, std = torch.cat(out, 1)
    folder.mkdir(parents=True, exist_ok=True)
    runs.atomic_save(
        {
            "key": key,
            "resolution": resolution,
            "files": list(data.files),
            "latents": latents,
            "std": std,
        },
        path,
    )
    return LatentCache(latents, path, key, False, std)
