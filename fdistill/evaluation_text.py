"""Text-to-image evaluation by its earlier names: thin wrappers over the one entry,
:func:`fdistill.evaluation.evaluate`, which measures text-conditioned sources (a text-to-image
run, export or pipeline; a captioned image folder) by CLIP score and zero-shot FID, streamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from fdistill.conditioning import Text
from fdistill.evaluation import evaluate, format_table, open_source
from fdistill.evaluation_metrics import T2I_METRICS, parse_t2i_metrics


def evaluate_t2i(
    source: str | Path,
    *,
    captions: str | Path | None = None,
    ref: str | Path | None = None,
    metrics: str | Sequence[str] | None = None,
    clip: str | Path | None = None,
    inception: str | Path | nn.Module | None = None,
    n: int | None = None,
    seed: int = 0,
    nfe: int | None = None,
    guidance: float = 1.0,
    batch: int = 16,
    device: str = "cpu",
    protocol: str = "fdistill",
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """:func:`evaluate` of a text-to-image run, export or pipeline (one image per caption of
    ``captions``) or of a captioned image folder, under its earlier name: CLIP score and
    zero-shot FID; ``protocol="dmd2"`` the field's COCO protocol (:func:`evaluate_t2i_dmd2`)."""
    src = open_source(source, device)
    if src.conditioning != Text.kind:
        raise ValueError(f"--ckpt {source} is not a text-to-image run, export or pipeline")
    return evaluate(
        src,
        captions=captions,
        ref=ref,
        metrics=metrics,
        clip=clip,
        inception=inception,
        n=n,
        seed=seed,
        nfe=nfe,
        guidance=guidance,
        batch=batch,
        device=device,
        protocol=protocol,
        out_dir=out_dir,
    )


def evaluate_t2i_dmd2(source: str | Path, **kwargs: Any) -> dict[str, Any]:
    """DMD2's zero-shot COCO protocol (:mod:`fdistill.metrics.protocol`), :func:`evaluate_t2i`
    with ``protocol="dmd2"`` (same keywords): ``n`` captions (30k by default) drawn from
    ``captions`` with a fixed seed (the list is written to ``out_dir``), one image per caption,
    generated and reference images centre-cropped and Lanczos-resized to 256, FID with
    clean-fid's resize to 299 and the Inception weights, CLIP score with the prefix
    "A photo depicts "."""
    return evaluate_t2i(source, protocol="dmd2", **kwargs)


format_t2i_table = format_table
"""The earlier name of :func:`fdistill.evaluation.format_table` for text-to-image results."""

__all__ = [
    "T2I_METRICS",
    "evaluate_t2i",
    "evaluate_t2i_dmd2",
    "format_t2i_table",
    "parse_t2i_metrics",
]
