"""``fdistill eval``: one evaluation for every source, in one result dict.

:func:`evaluate` opens what ``--ckpt`` names once (:func:`open_source`: a student or teacher run
of any conditioning, an export, a pipeline, a data set or a captioned image folder), takes what
to condition on from the source's conditioning (class labels drawn per seed as
:func:`fdistill.sampling.sample_run` draws them; the captions of a text-to-image model or of a
captioned folder; nothing), streams the images and their conditions (:func:`sample_stream`, the
generation alone timed by :class:`Timed`) into the metric accumulators the source and the given
files allow (:mod:`fdistill.evaluation_metrics`), and returns one schema (:data:`RESULT_KEYS`).

Class-label, unconditional and data sources get classifier FID, k-NN precision/recall, class
coverage and Inception FID against a reference data set (by default the one the run was trained
on) or saved statistics; text-conditioned sources get CLIP score and zero-shot FID, streamed.
``protocol="dmd2"`` is the field's zero-shot COCO protocol (:mod:`fdistill.metrics.protocol`).
:func:`evaluate_source` and :func:`fdistill.evaluation_text.evaluate_t2i` are the earlier entry
points, kept as wrappers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fdistill.conditioning import Conditioning, Labels, Text
from fdistill.data import BUILTIN_DATASETS, ImageDataset, load_dataset
from fdistill.data.captions import (
    CAPTIONS_JSONL,
    CaptionedData,
    load_image,
    read_captioned,
    read_prompts,
)
from fdistill.data.loading import decode_image
from fdistill.engine import Dist
from fdistill.evaluation_metrics import (
    ALL_METRICS,
    METRICS,
    T2I_METRICS,
    ClipScore,
    DMD2Meter,
    Meter,
    SampleSetMetrics,
    StreamedFID,
    default_classifier,
    fid_against_stats,
    load_reference,
    parse_metrics,
    parse_t2i_metrics,
    recorded_reference,
    reference_stats,
)
from fdistill.generator import Student
from fdistill.metrics.protocol import (
    CAPTION_SEED,
    DEFAULT_N,
    PROTOCOLS,
    draw_captions,
    write_drawn_captions,
)
from fdistill.models import LoadedRun, is_t2i, load_run, path_kind
from fdistill.samplers import DEFAULT_TEACHER_NFE
from fdistill.sampling import iter_images, sample_run, sample_seeds

DEFAULT_SAMPLES = 10_000
"""Samples drawn from a run when ``n`` is not given."""

RESULT_KEYS = (
    "source",
    "protocol",
    "protocol_settings",
    "n",
    "seed",
    "captions",
    "captions_drawn",
    "reference",
    "num_reference",
    "ref_stats",
    "classifier",
    "clip_model",
    "resolution",
    "generation",
    "metrics",
    "notes",
)
"""Top-level keys of every result (None where a key does not apply to the source)."""

_SOURCES = "a run folder, a checkpoint file, or a data set (digits, mnist, a folder, .npz, .zip)"


# --------------------------------------------------------------------------- sources
@dataclass
class Source:
    """What ``--ckpt`` names, opened once: a run (``run``: a student or teacher of any format),
    a data set (``data``) or a captioned image folder (``captioned``). ``kind`` is
    ``student``, ``teacher``, ``data`` or ``images`` (a captioned folder)."""

    spec: str
    kind: str
    run: LoadedRun | None = None
    data: ImageDataset | None = None
    captioned: CaptionedData | None = None

    @property
    def conditioning(self) -> str:
        """The kind of conditioning (:class:`fdistill.conditioning.Conditioning` ``.kind``)."""
        if self.captioned is not None or (self.run is not None and is_t2i(self.run)):
            return Text.kind
        if self.run is not None and self.run.num_classes:
            return Labels.kind
        return Conditioning.kind

    @property
    def step(self) -> int | None:
        """The run's training step (None for images)."""
        return self.run.step if self.run is not None else None

    def nfe(self, nfe: int | None) -> int | None:
        """Network evaluations per sample: Heun ``nfe`` (default 35) for a teacher, the
        student's steps, None for images."""
        if self.run is None:
            return None
        if self.kind == "teacher":
            return DEFAULT_TEACHER_NFE if nfe is None else nfe
        return self.run.model.steps if isinstance(self.run.model, Student) else 1


def open_source(spec: str | os.PathLike, device: str = "cpu") -> Source:
    """What ``--ckpt`` names, as :func:`fdistill.models.path_kind` tells them apart: a built-in
    data set name, an image folder with ``captions.jsonl`` (a captioned set, e.g. written by
    ``fdistill sample --prompts``), any other folder, ``.npz`` or ``.zip`` (a data set), else a
    run, export or teacher, whose loader says in one line why it is not one."""
    if isinstance(spec, str) and spec in BUILTIN_DATASETS:
        return Source(spec, "data", data=load_dataset(spec, labels=False))
    kind = path_kind(spec)
    if kind == "missing":
        raise FileNotFoundError(f"--ckpt: no such file or folder '{spec}'; pass {_SOURCES}")
    if kind == "data" and (Path(spec) / CAPTIONS_JSONL).is_file():
        return Source(str(spec), "images", captioned=read_captioned(spec))
    if kind == "data":  # samples: their labels are never measured
        return Source(str(spec), "data", data=load_dataset(Path(spec), labels=False))
    run = load_run(spec, device)
    return Source(str(spec), "teacher" if run.kind == "teacher" else "student", run=run)


def sample_stream(
    src: Source,
    n: int | None,
    seed: int = 0,
    *,
    prompts: Sequence[str] | None = None,
    nfe: int | None = None,
    guidance: float = 1.0,
    batch: int = 256,
    device: str | torch.device = "cpu",
    ddp: Dist | None = None,
) -> Iterator[tuple[Tensor, Any]]:
    """Images (floats, about [-1, 1]) with their conditions, batch by batch: a text-to-image
    X's ``n`` samples with the class labels
        drawn per seed (one batch: :func:`~fdistill.sampling.sample_run` gathers a ``torchrun``
        job's samples on rank 0, the other ranks get none), a captioned folder's first ``n`` images
        with their captions (at the first image's shorter side), a data set's first ``n`` images."""
    if src.run is not None and prompts is not None:
        done, seeds = 0, sample_seeds(seed, len(prompts))
        kw = dict(nfe=nfe, guidance=guidance, batch=batch, device=device)
        for images in iter_images(src.run, prompts, seeds, **kw):
            yield images, list(prompts[done : done + len(images)])
            done += len(images)
    elif src.run is not None:
        x, labels = sample_run(
            src.run, n, seed, nfe=nfe, guidance=guidance, batch=batch, device=device, ddp=ddp
        )
        if x is not None:
            yield x, labels
    elif src.captioned is not None:
        data = src.captioned
        pairs = list(zip(data.image_of, data.captions, strict=True))[:n]
        side = min(decode_image(data.root / data.files[pairs[0][0]]).shape[1:])
        for i in range(0, len(pairs), batch):
            files = [data.root / data.files[j] for j, _ in pairs[i : i + batch]]
            caps = [c for _, c in pairs[i : i + batch]]
            yield torch.stack([load_image(f, side) for f in files]), caps
    else:
        yield src.data.decode(src.data.storage[:n]), None


class Timed:
    """Iterate ``items`` and add up in ``seconds`` the time spent producing them (the
    generation alone, not what the consumer does with each item)."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.items, self.seconds = iter(items), 0.0

    def __iter__(self) -> Iterator[Any]:
        while True:
            t0 = time.perf_counter()
            try:
                item = next(self.items)
            except StopIteration:
                self.seconds += time.perf_counter() - t0
                return
            self.seconds += time.perf_counter() - t0
            yield item


def generate_samples(
    run: LoadedRun,
    n: int,
    seed: int,
    nfe: int | None,
    batch: int = 256,
    device: str = "cpu",
    ddp: Dist | None = None,
) -> tuple[Tensor | None, float]:
    """``n`` samples of a run (see :func:`fdistill.sampling.sample_run`) and the seconds the
    generation took (latents, labels and network calls; nothing else). Under ``torchrun``
    (``ddp``) the ranks share the work and rank 0 gets the samples, the others None."""
    src = Source("", "teacher" if run.kind == "teacher" else "student", run=run)
    stream = Timed(sample_stream(src, n, seed, nfe=nfe, batch=batch, device=device, ddp=ddp))
    x = next((x for x, _ in stream), None)
    return x, stream.seconds


# --------------------------------------------------------------------------- the entry
def _check_inputs(
    protocol: str,
    metrics: str | Sequence[str] | None,
    n: int | None,
    batch: int | None,
    ref_stats: str | os.PathLike | None,
    inception: Any,
    captions: str | os.PathLike | None,
) -> tuple[str, ...] | None:
    """The checks that need no source, each one line naming its flag; the metric names."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    names = parse_metrics(metrics, ALL_METRICS) if metrics is not None else None
    if n is not None and n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if batch is not None and batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if ref_stats is not None and not Path(ref_stats).is_file():
        raise FileNotFoundError(f"--ref-stats: no such file '{ref_stats}'")
    if isinstance(inception, str | os.PathLike) and not Path(inception).is_file():
        raise FileNotFoundError(f"--inception: no such file '{inception}'")
    if captions is not None and not Path(captions).exists():
        raise FileNotFoundError(f"--captions: no such file '{captions}'")
    return names


def _check_source(
    src: Source,
    names: tuple[str, ...] | None,
    nfe: int | None,
    guidance: float,
    protocol: str,
    captions: Any,
    clip: Any,
    ddp: Dist | None,
) -> None:
    """The inputs that do not apply to this source, each one line naming its flag."""
    text = src.conditioning == Text.kind
    if src.run is None and nfe is not None:
        raise ValueError("--nfe applies to runs; --ckpt names a data set")
    if src.run is None and guidance != 1.0:
        raise ValueError("--guidance applies to teacher runs; --ckpt names a data set")
    if protocol == "dmd2" and not (text and src.run is not None):
        raise ValueError(
            "--protocol dmd2 applies to a text-to-image run, export or pipeline (with --captions)"
        )
    if text and ddp is not None and ddp.world > 1:
        raise ValueError("text-to-image evaluation runs in one process; run it without torchrun")
    if text and src.run is not None and captions is None:
        raise ValueError(
            f"--ckpt {src.spec} is a text-to-image model: pass --captions FILE (one image per "
            "caption) with --clip DIR and/or --ref"
        )
    if not text:
        given = (
            ("--captions", captions),
            ("--clip", clip),
            ("--metrics clip", "clip" in (names or ())),
        )
        asked = [flag for flag, v in given if v not in (None, False)]
        if asked:
            raise ValueError(
                f"{asked[0]}: --ckpt {src.spec} is neither a text-to-image model nor a captioned "
                f"image folder ({CAPTIONS_JSONL})"
            )


def _prompts(
    src: Source,
    n: int | None,
    captions: str | os.PathLike | None,
    protocol: str,
    out_dir: str | os.PathLike | None,
    notes: list[str],
) -> tuple[list[str] | None, dict[str, Any] | None]:
    """What a text-to-image model is conditioned on: the first ``n`` captions of ``captions``,
    or under ``dmd2`` ``n`` (30k) drawn with the protocol's fixed seed and written to
    ``out_dir``; and the record of the draw."""
    if src.run is None or src.conditioning != Text.kind:
        return None, None
    drawn_record = None
    if protocol == "dmd2":
        drawn = draw_captions(captions, n or DEFAULT_N, CAPTION_SEED)
        path = write_drawn_captions(drawn, out_dir) if out_dir is not None else None
        prompts = list(drawn.captions)
        drawn_record = drawn.describe() | {"file": str(path) if path else None}
    else:
        prompts = read_prompts(captions)
    if n is not None and n > len(prompts):
        notes.append(f"only {len(prompts)} captions: evaluated {len(prompts)} images")
    return prompts[:n], drawn_record


def _meters(
    src: Source,
    names: tuple[str, ...] | None,
    *,
    ref: Any,
    ref_stats: Any,
    inception: Any,
    classifier: Any,
    clip: Any,
    protocol: str,
    batch: int,
    device: str,
    notes: list[str],
) -> list[Meter]:
    """The metric accumulators for the source's conditioning and the given files; everything
    they read is checked here, before any sampling."""
    if src.conditioning != Text.kind:
        metrics = METRICS if names is None else parse_metrics(names)
        return [
            SampleSetMetrics(
                metrics,
                ref=ref,
                run=src.run,
                ref_stats=ref_stats,
                inception=inception,
                classifier=classifier,
                batch=batch,
            )
        ]
    if protocol == "dmd2" and ref_stats is not None:
        raise ValueError("--ref-stats: the dmd2 protocol resizes the reference images; pass --ref")
    if inception is False and names is not None and "fid" in names:
        raise ValueError("--metrics fid needs an Inception detector, but --inception is none")
    has_ref = inception is not False and (ref is not None or ref_stats is not None)
    names = parse_t2i_metrics(names, clip is not None, has_ref)
    if classifier is not None:
        notes.append("--classifier unused: a text-conditioned source is measured by fid, clip")
    if protocol == "dmd2":
        return [
            DMD2Meter(names, clip=clip, inception=inception, ref=ref, batch=batch, device=device)
        ]
    meters: list[Meter] = [ClipScore(clip, device)] if "clip" in names else []
    if "fid" in names:
        meters.append(
            StreamedFID(inception, ref=ref, ref_stats=ref_stats, batch=batch, device=device)
        )
    return meters


def evaluate(
    source: str | os.PathLike | Source,
    *,
    metrics: str | Sequence[str] | None = None,
    n: int | None = None,
    seed: int = 0,
    nfe: int | None = None,
    ref: str | os.PathLike | None = None,
    ref_stats: str | os.PathLike | None = None,
    inception: str | os.PathLike | nn.Module | bool | None = None,
    classifier: str | os.PathLike | None = None,
    captions: str | os.PathLike | None = None,
    clip: str | os.PathLike | None = None,
    guidance: float = 1.0,
    protocol: str = "fdistill",
    batch: int | None = None,
    device: str = "cpu",
    ddp: Dist | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any] | None:
    """Evaluate any source (see the module docstring; ``source`` a path, a built-in data set
    name or an opened :class:`Source`); a JSON-ready dict with :data:`RESULT_KEYS`.

    ``metrics``: class-label, unconditional and data sources: any of ``fid``, ``pr``,
    ``classes`` (default all); text-conditioned ones: ``fid``, ``clip`` (default: those
    ``ref`` / ``ref_stats`` and ``clip`` allow). ``n``: images (default: all of a data set or
    of the captions, 10,000 from a run, 30k under ``dmd2``). ``nfe``: teacher Heun calls
    (default 35). ``ref``: reference data set or images (default: the run's training data).
    ``ref_stats``: EDM ``.npz`` (mu, sigma) for Inception FID. ``inception``: detector path or
    module, None to look for one, False to skip it. ``classifier``: ``digits``, ``mnist``, a
    path, ``"none"``, or None for the shipped one matching a built-in reference. ``captions``:
    the prompts of a text-to-image model (one image each). ``clip``: a local transformers CLIP
    folder. ``guidance``: a teacher's classifier-free guidance. ``protocol``: ``fdistill`` or
    ``dmd2`` (captions drawn with a fixed seed, the list written to ``out_dir``). ``batch``:
    default 16 for text-conditioned sources, else 256. Under ``torchrun`` pass ``ddp``: every
    rank generates its share, rank 0 measures and returns the dict, the other ranks None.
    """
    names = _check_inputs(protocol, metrics, n, batch, ref_stats, inception, captions)
    src = source if isinstance(source, Source) else open_source(source, device)
    _check_source(src, names, nfe, guidance, protocol, captions, clip, ddp)
    text = src.conditioning == Text.kind
    batch = batch or (16 if text else 256)
    notes: list[str] = []
    prompts, drawn = _prompts(src, n, captions, protocol, out_dir, notes)
    if src.captioned is not None and captions is not None:
        notes.append(f"--captions unused: the folder's {CAPTIONS_JSONL} captions each image")
    if src.data is not None and n is not None and n > len(src.data):
        notes.append(f"--ckpt has only {len(src.data)} images; evaluated all of them")
    meters = _meters(
        src,
        names,
        ref=ref,
        ref_stats=ref_stats,
        inception=inception,
        classifier=classifier,
        clip=clip,
        protocol=protocol,
        batch=batch,
        device=device,
        notes=notes,
    )
    if src.run is None and ddp is not None and not ddp.main:
        return None  # images, not samples: rank 0 measures them alone

    want = n if n is not None else (DEFAULT_SAMPLES if src.run is not None else None)
    kw = dict(prompts=prompts, nfe=nfe, guidance=guidance, batch=batch, device=device, ddp=ddp)
    stream = Timed(sample_stream(src, want, seed, **kw))
    count, size = 0, None
    for images, cond in stream:
        images = images.clamp(-1, 1)
        for meter in meters:
            meter.update(images, cond)
        count, size = count + len(images), images.shape[-1]
    if ddp is not None and not ddp.main:
        return None  # another rank of a torchrun job: rank 0 measures

    measured: dict[str, Any] = {"num_images": count} if text else {}
    for meter in meters:
        measured |= meter.compute()
    # The library's note names its argument; here the user sets a flag.
    notes = measured.pop("notes", []) + notes + [x for m in meters for x in m.notes]
    notes = [note.replace("inception=PATH", "--inception PATH") for note in notes]
    measured["notes"] = list(notes)  # where the class-label result always had them
    generation = None
    if src.run is not None:
        per_s = count / stream.seconds if stream.seconds > 0 else None
        generation = {"seconds": stream.seconds, "samples_per_s": per_s}
    text_captions = str(captions) if text else None
    if src.captioned is not None:
        text_captions = str(Path(src.spec) / CAPTIONS_JSONL)
    res = dict.fromkeys(RESULT_KEYS) | {
        "source": {"spec": src.spec, "kind": src.kind, "step": src.step, "nfe": src.nfe(nfe)},
        "protocol": protocol,
        "n": count,
        "seed": seed,
        "captions": text_captions,
        "captions_drawn": drawn,
        "reference": str(ref) if ref is not None else None,
        "ref_stats": str(ref_stats) if ref_stats is not None else None,
        "clip_model": str(clip) if clip is not None else None,
        "resolution": size,
        "generation": generation,
        "metrics": measured,
        "notes": notes,
    }
    for meter in meters:
        res |= meter.describe()
    return res


# --------------------------------------------------------------------------- earlier entries
def evaluate_source(
    ckpt: str | os.PathLike,
    *,
    metrics: Sequence[str] = METRICS,
    n: int = 10_000,
    seed: int = 0,
    nfe: int | None = None,
    ref: str | os.PathLike | None = None,
    ref_stats: str | os.PathLike | None = None,
    inception: str | os.PathLike | nn.Module | bool | None = None,
    classifier: str | os.PathLike | None = None,
    batch: int = 256,
    device: str = "cpu",
    ddp: Dist | None = None,
) -> dict[str, Any] | None:
    """:func:`evaluate` of a student run, a teacher run or a data set, under its earlier name
    and defaults (all image metrics, 10,000 samples)."""
    return evaluate(
        ckpt,
        metrics=metrics,
        n=n,
        seed=seed,
        nfe=nfe,
        ref=ref,
        ref_stats=ref_stats,
        inception=inception,
        classifier=classifier,
        batch=batch,
        device=device,
        ddp=ddp,
    )


# --------------------------------------------------------------------------- the table
TABLE_KEYS = (
    ("cfid", "classifier FID"),
    ("cprecision", "precision (classifier)"),
    ("crecall", "recall (classifier)"),
    ("fid", "Inception FID"),
    ("precision", "precision (Inception)"),
    ("recall", "recall (Inception)"),
    ("class_coverage", "class coverage"),
    ("class_tv_data", "class TV to data"),
    ("class_tv_uniform", "class TV to uniform"),
    ("mean_confidence", "mean confidence"),
)
"""Rows of the image metrics in :func:`format_table`: result key, label."""


def format_table(res: dict[str, Any]) -> str:
    """A short plain-text table of :func:`evaluate`'s result (what ``fdistill eval`` prints):
    the source, what was measured against what, the metrics, the throughput, the notes."""
    src, m = res["source"], res["metrics"]
    text = res.get("captions") is not None
    what = src["kind"] + (f" step {src['step']}" if src["step"] is not None else "")
    if src["kind"] == "teacher":
        what += f", Heun {src['nfe']} NFE"
    rows = [("source", f"{src['spec']} ({what})")]
    if text:
        rows.append(("protocol", res.get("protocol", "fdistill")))
        rows.append(("images", f"{res['n']} at {res['resolution']}px, seed {res['seed']}"))
        rows.append(("captions", res["captions"]))
        if "clip_score" in m:
            rows.append(("CLIP score", f"{m['clip_score']:.4f} (cosine, {res['clip_model']})"))
        if "fid" in m:
            against = f"{res['reference']} ({res['num_reference']} images)"
            if res.get("ref_stats"):
                against = f"Inception stats {res['ref_stats']}"
            rows.append(("zero-shot FID", f"{m['fid']:.3f} vs {against}"))
    else:
        ref = res["reference"] or "-"
        if res.get("num_reference"):
            ref += f" ({res['num_reference']} images)"
        if res["ref_stats"]:
            ref += f" (Inception stats: {res['ref_stats']})"
        rows.append(("samples", f"{res['n']}, seed {res['seed']}"))
        rows.append(("reference", ref))
        rows += [(label, f"{m[key]:.4f}") for key, label in TABLE_KEYS if key in m]
    gen = res["generation"]
    if gen is not None and gen["samples_per_s"]:
        if text:
            rows.append(("images/s", f"{gen['samples_per_s']:.2f} ({gen['seconds']:.1f} s)"))
        else:
            rows.append(("samples/s", f"{gen['samples_per_s']:.1f} ({gen['seconds']:.2f} s)"))
    width = max(len(k) for k, _ in rows)
    notes = res.get("notes", m.get("notes", []))
    return "\n".join([f"{k:<{width}}  {v}" for k, v in rows] + [f"note: {x}" for x in notes])


__all__ = [
    "DEFAULT_SAMPLES",
    "DEFAULT_TEACHER_NFE",
    "RESULT_KEYS",
    "T2I_METRICS",
    "TABLE_KEYS",
    "Source",
    "Timed",
    "default_classifier",
    "evaluate",
    "evaluate_source",
    "fid_against_stats",
    "format_table",
    "generate_samples",
    "load_reference",
    "open_source",
    "parse_metrics",
    "parse_t2i_metrics",
    "recorded_reference",
    "reference_stats",
    "sample_stream",
]
