"""CLIP score with a local CLIP model: cosine similarity of image and caption embeddings.

The convention of the f-distill paper (and DMD2's COCO tables): the mean over image/caption
pairs of ``cos(E_img(image), E_txt(caption))``, reported as a plain cosine (0.292 for the JS
student of SD v1.5, measured with ViT-L/14), not the ``100 * max(cos, 0)`` of torchmetrics.

The model is a transformers CLIP folder (``CLIPModel.from_pretrained``: ``config.json``, the
weights, tokenizer files at the top or in ``tokenizer/`` and ``preprocessor_config.json``);
nothing is downloaded. Images are preprocessed as OpenAI's and transformers' PIL pipeline
does: quantised to 8 bits (what a saved PNG holds), the shortest side resized bicubic to the
model's size, centre-cropped, scaled to [0, 1] and normalised with the model's mean and std.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import Tensor, nn

from fdistill.images import to_uint8

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("CLIP score needs transformers: pip install 'fdistill[t2i]'") from None
    return transformers


def _size(value, default: int) -> tuple[int, int] | int:
    """``size`` / ``crop_size`` of a preprocessor config: an int, or a dict."""
    if value is None:
        return default
    if isinstance(value, int):
        return value
    if "shortest_edge" in value:
        return int(value["shortest_edge"])
    return int(value["height"]), int(value["width"])


class CLIPScorer(nn.Module):
    """A local CLIP model that embeds images ([-1, 1] floats) and captions, and scores pairs."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        super().__init__()
        transformers = _require_transformers()
        root = Path(path)
        if not (root / "config.json").is_file():
            raise FileNotFoundError(
                f"--clip: '{path}' is not a transformers CLIP folder (config.json, weights, "
                "tokenizer files); nothing is downloaded"
            )
        self.path = root
        self.model = transformers.CLIPModel.from_pretrained(root, local_files_only=True)
        self.model.requires_grad_(False).eval().to(device)
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        try:
            self.tokenizer = transformers.CLIPTokenizer.from_pretrained(
                tok_dir, local_files_only=True
            )
        except (OSError, ValueError, TypeError) as e:
            raise FileNotFoundError(f"--clip: no CLIP tokenizer files in '{tok_dir}' ({e})") from e
        pre = root / "preprocessor_config.json"
        cfg = json.loads(pre.read_text()) if pre.is_file() else {}
        image_size = int(self.model.config.vision_config.image_size)
        self.resize_to = _size(cfg.get("size"), image_size)
        self.crop_to = _size(cfg.get("crop_size"), image_size)
        if isinstance(self.crop_to, int):
            self.crop_to = (self.crop_to, self.crop_to)
        self.register_buffer("mean", torch.tensor(cfg.get("image_mean", OPENAI_CLIP_MEAN)))
        self.register_buffer("std", torch.tensor(cfg.get("image_std", OPENAI_CLIP_STD)))
        self.to(device)
        self.max_length = min(
            int(self.tokenizer.model_max_length),
            int(self.model.config.text_config.max_position_embeddings),
        )

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] images [N, 3, H, W] -> normalised pixel values [N, 3, h, w] (float32)."""
        pixels = to_uint8(images.detach().float().clamp(-1, 1))
        ch, cw = self.crop_to
        out = []
        for u8 in pixels:
            im = PIL.Image.fromarray(u8.permute(1, 2, 0).numpy())
            w, h = im.size
            if isinstance(self.resize_to, int):
                s = self.resize_to
                nw, nh = (s, max(1, int(s * h / w))) if w <= h else (max(1, int(s * w / h)), s)
            else:
                nh, nw = self.resize_to
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), PIL.Image.Resampling.BICUBIC)
            top, left = (nh - ch) // 2, (nw - cw) // 2
            im = im.crop((left, top, left + cw, top + ch))
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
        x = torch.stack(out).to(self.device)
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings [N, D] of [-1, 1] images."""
        pooled = self.model.vision_model(pixel_values=self.preprocess(images)).pooler_output
        return nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings [N, D] (captions truncated to the model's context)."""
        tok = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        out = self.model.text_model(
            input_ids=tok.input_ids.to(self.device),
            attention_mask=tok.attention_mask.to(self.device),
        )
        return nn.functional.normalize(
            self.model.text_projection(out.pooler_output).float(), dim=-1
        )

    def score(self, images: Tensor, texts: Sequence[str]) -> Tensor:
        """Per-pair cosine similarity [N] of ``images[i]`` and ``texts[i]``."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} captions")
        return (self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1)


def clip_score(
    images: Tensor, texts: Sequence[str], scorer: CLIPScorer | str | Path, batch: int = 64
) -> float:
    """Mean CLIP cosine similarity of image/caption pairs (the paper's CLIP score)."""
    if not isinstance(scorer, CLIPScorer):
        scorer = CLIPScorer(scorer)
    scores = [
        scorer.score(images[i : i + batch], texts[i : i + batch]).double().cpu()
        for i in range(0, len(images), batch)
    ]
    return float(torch.cat(scores).mean())


__all__ = ["CLIPScorer", "clip_score"]
