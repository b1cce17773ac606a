"""CLIP score with a local CLIP model: cosine similarity of image and caption embeddings.

The score of DMD2's COCO tables, which the f-distill paper's table follows (0.292 for its JS
student of SD v1.5): the mean over image/caption pairs of ``cos(E_img(image), E_txt(caption))``,
a plain cosine, not the ``100 * max(cos, 0)`` of torchmetrics. DMD2's code scores with open_clip
ViT-g-14 (laion2b_s12b_b42k) and the prefix "A photo depicts "; which model the f-distill paper
used is not stated in its code. Pass the model as a transformers folder.

The model is a transformers CLIP folder (``CLIPModel.from_pretrained``: ``config.json``, the
weights, tokenizer files at the top or in ``tokenizer/`` and ``preprocessor_config.json``);
nothing is downloaded. Images are preprocessed as OpenAI's and transformers' PIL pipeline
does: quantised to 8 bits (what a saved PNG holds), the shortest side resized bicubic to the
model's size, centre-cropped, scaled to [0, 1] and normalised with the model's mean and std.

``prefix`` (e.g. :data:`DMD2_PREFIX`, ``"A photo depicts "``, as DMD2's COCO evaluation after
CLIPScore, Hessel et al. 2021) is spliced in at the token level exactly as DMD2 does it: the
caption is tokenised (truncated to the context), the prefix's tokens go right after the start
token, the sequence is cut back to the context and, when that cut a token, the last one becomes
the end token. For captions that fit this equals tokenising ``prefix + caption``.
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
DMD2_PREFIX = "A photo depicts "
"""Text prefix of DMD2's CLIP score (main/coco_eval/coco_evaluator.py, compute_clip_score)."""


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
        """[-1, 1] float images or uint8 pixels [N, 3, H, W] -> normalised pixel values
        [N, 3, h, w] (float32). uint8 input (e.g. images already resized by an evaluation
        protocol) is used as it is."""
        if images.dtype == torch.uint8:
            pixels = images.detach().cpu()
        else:
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
        """Unit-norm image embeddings [N, D] of [-1, 1] images (or uint8 pixels)."""
        pooled = self.model.vision_model(pixel_values=self.preprocess(images)).pooler_output
        return nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def tokenize(self, texts: Sequence[str], prefix: str = "") -> tuple[Tensor, Tensor]:
        """Token ids and attention mask [N, L] (``L`` the model's context), with ``prefix``
        spliced in after the start token as DMD2 does (see the module docstring)."""
        tok = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = tok.input_ids, tok.attention_mask
        if not prefix:
            return ids, mask
        extra = self.tokenizer(prefix, add_special_tokens=False).input_ids
        if not extra:
            return ids, mask
        n, length = ids.shape
        pre = torch.tensor(extra, dtype=ids.dtype).expand(n, -1)
        ids = torch.cat([ids[:, :1], pre, ids[:, 1:]], dim=1)[:, :length].clone()
        mask = torch.cat([mask[:, :1], torch.ones_like(pre), mask[:, 1:]], dim=1)[:, :length]
        mask = mask.clone()
        cut = mask[:, -1] > 0  # the sequence ran past the context: end it with the end token
        ids[cut, -1] = int(self.tokenizer.eos_token_id)
        return ids, mask

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str], prefix: str = "") -> Tensor:
        """Unit-norm text embeddings [N, D] of ``prefix`` + each caption (truncated to the
        model's context)."""
        ids, mask = self.tokenize(texts, prefix)
        out = self.model.text_model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
        )
        return nn.functional.normalize(
            self.model.text_projection(out.pooler_output).float(), dim=-1
        )

    def score(self, images: Tensor, texts: Sequence[str], prefix: str = "") -> Tensor:
        """Per-pair cosine similarity [N] of ``images[i]`` and ``prefix + texts[i]``."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} captions")
        return (self.image_embeddings(images) * self.text_embeddings(texts, prefix)).sum(-1)


def clip_score(
    images: Tensor,
    texts: Sequence[str],
    scorer: CLIPScorer | str | Path,
    batch: int = 64,
    prefix: str = "",
) -> float:
    """Mean CLIP cosine similarity of image/caption pairs (the paper's CLIP score); ``prefix``
    is put before every caption (:data:`DMD2_PREFIX` for DMD2's protocol)."""
    if not isinstance(scorer, CLIPScorer):
        scorer = CLIPScorer(scorer)
    scores = [
        scorer.score(images[i : i + batch], texts[i : i + batch], prefix).double().cpu()
        for i in range(0, len(images), batch)
    ]
    return float(torch.cat(scores).mean())


__all__ = ["DMD2_PREFIX", "CLIPScorer", "clip_score"]
