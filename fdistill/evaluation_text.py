"""Evaluation of text-to-image models: CLIP score and zero-shot FID from captions.

The images come from a text-to-image run, export or pipeline (one image per caption, per-sample
seeds) or from a captioned folder (e.g. written by ``fdistill sample --prompts``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fdistill import runs
from fdistill.data.captions import CAPTIONS_JSONL, load_image, read_captioned, read_prompts
from fdistill.data.loading import IMAGE_EXTENSIONS, decode_image
from fdistill.evaluation import parse_metrics
from fdistill.metrics.fid import StatsAccumulator, frechet_distance_from_stats
from fdistill.metrics.inception import InceptionFeatures, find_inception
from fdistill.metrics.protocol import (
    CAPTION_SEED,
    DEFAULT_N,
    PROTOCOLS,
    DMD2Metrics,
    draw_captions,
    write_drawn_captions,
)
from fdistill.models import is_t2i, load_run
from fdistill.samplers import DEFAULT_TEACHER_NFE
from fdistill.sampling import iter_images, sample_seeds

T2I_METRICS = ("fid", "clip")


def _image_files(folder: Path) -> list[str]:
    files = [
        q.relative_to(folder).as_posix()
        for q in folder.rglob("*")
        if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return sorted(f for f in files if not any(s.startswith(".") for s in f.split("/")))


def _reference_images(ref: str | Path) -> tuple[Path, list[str]]:
    p = Path(ref)
    try:
        data = read_captioned(p)
        return data.root, list(data.files)
    except (ValueError, FileNotFoundError):
        pass
    if not p.is_dir():
        raise FileNotFoundError(f"--ref: '{ref}' is not a folder of images or a captioned set")
    files = _image_files(p)
    if not files:
        raise ValueError(f"--ref: no images in '{ref}'")
    return p, files


def parse_t2i_metrics(text: str | Sequence[str] | None, clip: bool, ref: bool) -> tuple[str, ...]:
    """``--metrics`` of a text-to-image evaluation (default: those the given files allow)."""
    if text is None:
        names = [m for m, ok in (("fid", ref), ("clip", clip)) if ok]
        if not names:
            raise ValueError("nothing to measure: pass --clip DIR (CLIP score) and/or --ref (FID)")
        return tuple(names)
    names = parse_metrics(text, T2I_METRICS)
    if "clip" in names and not clip:
        raise ValueError("--metrics clip needs --clip DIR (a local transformers CLIP folder)")
    if "fid" in names and not ref:
        raise ValueError("--metrics fid needs --ref (the captioned set's images)")
    return names


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
    """CLIP score and zero-shot FID of a text-to-image model or of captioned images.

    ``protocol``: ``"fdistill"`` (below: the first ``n`` captions, images at their native
    size, the detector's own resize, no prompt prefix) or ``"dmd2"`` (the field's zero-shot
    COCO protocol, :func:`evaluate_t2i_dmd2`; ``out_dir`` gets the drawn caption list).

    ``source``: a t2i run, export or pipeline folder (one image per caption of ``captions``,
    the first ``n``, seeds of ``seed``), or a folder with ``captions.jsonl`` (e.g. written by
    ``fdistill sample --prompts``). CLIP score: mean cosine similarity of CLIP image and text
    embeddings (``clip``: a local transformers CLIP folder). FID: Inception features of the
    images against those of ``ref``'s images at the same resolution (streamed, so 30k images
    never sit in memory at once); ``inception``: the detector file (None: the one
    :func:`fdistill.metrics.inception.find_inception` finds) or a features module with
    ``num_features``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    names = parse_t2i_metrics(metrics, clip is not None, ref is not None)
    if n is not None and n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if protocol == "dmd2":
        return evaluate_t2i_dmd2(
            source,
            captions=captions,
            ref=ref,
            metrics=names,
            clip=clip,
            inception=inception,
            n=n,
            seed=seed,
            nfe=nfe,
            guidance=guidance,
            batch=batch,
            device=device,
            out_dir=out_dir,
        )
    src = Path(source)
    notes: list[str] = []
    run = None
    if (src / CAPTIONS_JSONL).is_file() and not (src / runs.CHECKPOINT).is_file():
        data = read_captioned(src)
        pairs = list(zip(data.image_of, data.captions, strict=True))[:n]
        kind, step, caps = "images", None, [c for _, c in pairs]

        side = min(decode_image(data.root / data.files[pairs[0][0]]).shape[1:])

        def batches() -> Iterator[Tensor]:
            for i in range(0, len(pairs), batch):
                files = [data.root / data.files[j] for j, _ in pairs[i : i + batch]]
                yield torch.stack([load_image(f, side) for f in files])
    else:
        if captions is None:
            raise ValueError("--captions is needed: the prompts to generate one image each from")
        run = load_run(src, device)
        if not is_t2i(run):
            raise ValueError(f"--ckpt {source} is not a text-to-image run, export or pipeline")
        caps = read_prompts(captions)
        if n is not None and n > len(caps):
            notes.append(f"only {len(caps)} captions: evaluated {len(caps)} images")
        caps = caps[:n]
        kind, step = ("student" if run.kind == "distill" else "teacher"), run.step
        seeds = sample_seeds(seed, len(caps))

        def batches() -> Iterator[Tensor]:
            yield from iter_images(
                run, caps, seeds, nfe=nfe, guidance=guidance, batch=batch, device=device
            )

    scorer = detector = acc = None
    if "clip" in names:
        from fdistill.metrics.clip import CLIPScorer

        scorer = CLIPScorer(clip, device=device)
    if "fid" in names:
        detector = _detector_for(inception, device)
        acc = StatsAccumulator(detector.num_features)
    cosines: list[Tensor] = []
    done, size, seconds, t0 = 0, None, 0.0, time.perf_counter()
    for images in batches():
        seconds += time.perf_counter() - t0
        images = images.clamp(-1, 1)
        size = images.shape[-1]
        if scorer is not None:
            cosines.append(scorer.score(images, caps[done : done + len(images)]).cpu())
        if acc is not None:
            acc.update(detector(images).cpu().numpy())
        done += len(images)
        t0 = time.perf_counter()
    result: dict[str, Any] = {"num_images": done}
    if cosines:
        c = torch.cat(cosines).double()
        result |= {"clip_score": float(c.mean()), "clip_score_std": float(c.std(correction=0))}
    num_ref = None
    if acc is not None:
        root, files = _reference_images(ref)
        ref_acc = StatsAccumulator(detector.num_features)
        for i in range(0, len(files), batch):
            imgs = torch.stack([load_image(root / f, size) for f in files[i : i + batch]])
            ref_acc.update(detector(imgs).cpu().numpy())
        num_ref = len(files)
        result["fid"] = frechet_distance_from_stats(*acc.compute(), *ref_acc.compute())
    generation = None
    if run is not None:
        generation = {"seconds": seconds, "samples_per_s": done / seconds if seconds > 0 else None}
    return {
        "source": {
            "spec": str(source),
            "kind": kind,
            "step": step,
            "nfe": (nfe or DEFAULT_TEACHER_NFE)
            if kind == "teacher"
            else (1 if run is not None else None),
        },
        "protocol": "fdistill",
        "n": done,
        "seed": seed,
        "captions": str(captions) if captions is not None else str(src / CAPTIONS_JSONL),
        "reference": str(ref) if ref is not None else None,
        "num_reference": num_ref,
        "clip_model": str(clip) if clip is not None else None,
        "resolution": size,
        "generation": generation,
        "metrics": result,
        "notes": notes,
    }


def _detector_for(inception: str | Path | nn.Module | None, device: str) -> nn.Module:
    if isinstance(inception, nn.Module):
        return inception
    try:
        return InceptionFeatures(find_inception(inception)).to(device)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--inception: {e}") from e


def evaluate_t2i_dmd2(
    source: str | Path,
    *,
    captions: str | Path | None,
    ref: str | Path | None,
    metrics: Sequence[str],
    clip: str | Path | None,
    inception: str | Path | nn.Module | None,
    n: int | None,
    seed: int,
    nfe: int | None,
    guidance: float,
    batch: int,
    device: str,
    out_dir: str | Path | None,
) -> dict[str, Any]:
    """DMD2's zero-shot COCO protocol (:mod:`fdistill.metrics.protocol`): ``n`` captions (30k by
    default) drawn from ``captions`` with a fixed seed (the list is written to ``out_dir``),
    one image per caption from ``source`` (a text-to-image run, export or pipeline), generated
    and reference images centre-cropped and Lanczos-resized to 256, FID with clean-fid's
    resize to 299 and the Inception weights, CLIP score with the prefix "A photo depicts "."""
    if captions is None:
        raise ValueError("--captions is needed: a COCO captions json or a text file to draw from")
    run = load_run(source, device)
    if not is_t2i(run):
        raise ValueError(f"--ckpt {source} is not a text-to-image run, export or pipeline")
    drawn = draw_captions(captions, n or DEFAULT_N, CAPTION_SEED)
    notes = []
    if n is not None and len(drawn) < n:
        notes.append(f"only {len(drawn)} captions: evaluated {len(drawn)} images")
    drawn_path = write_drawn_captions(drawn, out_dir) if out_dir is not None else None
    scorer = None
    if "clip" in metrics:
        from fdistill.metrics.clip import CLIPScorer

        scorer = CLIPScorer(clip, device=device)
    detector = _detector_for(inception, device) if "fid" in metrics else None
    m = DMD2Metrics(detector, scorer)
    caps, seeds = list(drawn.captions), sample_seeds(seed, len(drawn))
    done, seconds, t0 = 0, 0.0, time.perf_counter()
    kw = dict(nfe=nfe, guidance=guidance, batch=batch, device=device)
    for images in iter_images(run, caps, seeds, **kw):
        seconds += time.perf_counter() - t0
        m.update(images, caps[done : done + len(images)])
        done += len(images)
        t0 = time.perf_counter()
    num_ref = None
    if detector is not None:
        root, files = _reference_images(ref)
        num_ref = m.update_reference_files([root / f for f in files], batch)
    kind = "student" if run.kind == "distill" else "teacher"
    student_steps = run.model.steps if run.kind == "distill" else None
    return {
        "protocol": "dmd2",
        "protocol_settings": m.describe() | {"caption_seed": CAPTION_SEED},
        "source": {
            "spec": str(source),
            "kind": kind,
            "step": run.step,
            "nfe": (nfe or DEFAULT_TEACHER_NFE) if kind == "teacher" else student_steps,
        },
        "n": done,
        "seed": seed,
        "captions": str(captions),
        "captions_drawn": drawn.describe() | {"file": str(drawn_path) if drawn_path else None},
        "reference": str(ref) if ref is not None else None,
        "num_reference": num_ref,
        "clip_model": str(clip) if clip is not None else None,
        "resolution": m.eval_res,
        "generation": {
            "seconds": seconds,
            "samples_per_s": done / seconds if seconds > 0 else None,
        },
        "metrics": m.compute(),
        "notes": notes,
    }


def format_t2i_table(res: dict[str, Any]) -> str:
    """A short plain-text table of :func:`evaluate_t2i`'s result."""
    src, m = res["source"], res["metrics"]
    rows = [
        (
            "source",
            f"{src['spec']} ({src['kind']}"
            + (f" step {src['step']})" if src["step"] is not None else ")"),
        ),
        ("protocol", res.get("protocol", "fdistill")),
        ("images", f"{res['n']} at {res['resolution']}px, seed {res['seed']}"),
        ("captions", res["captions"]),
    ]
    if "clip_score" in m:
        rows.append(("CLIP score", f"{m['clip_score']:.4f} (cosine, {res['clip_model']})"))
    if "fid" in m:
        rows.append(
            (
                "zero-shot FID",
                f"{m['fid']:.3f} vs {res['reference']} ({res['num_reference']} images)",
            )
        )
    gen = res["generation"]
    if gen is not None and gen["samples_per_s"]:
        rows.append(("images/s", f"{gen['samples_per_s']:.2f} ({gen['seconds']:.1f} s)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"{k:<{width}}  {v}" for k, v in rows] + [f"note: {x}" for x in res["notes"]])
