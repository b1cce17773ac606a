"""evaluate_images: documented keys, JSON output, and values against independent features.

The Inception detector is a tiny TorchScript stand-in with the NVIDIA calling convention
(uint8 [N, 3, H, W] in, [N, 2048] out): its features are the raw pixels of channel 0,
zero-padded, so the expected FID and precision/recall follow from an independent uint8
quantisation in numpy.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from fdistill.data import ImageDataset, load_dataset
from fdistill.metrics import inception as inception_mod
from fdistill.metrics.classifier import classifier_fid, load_classifier
from fdistill.metrics.evaluate import evaluate_images
from fdistill.metrics.fid import frechet_distance
from fdistill.metrics.inception import InceptionFeatures
from fdistill.metrics.knn import knn_precision_recall

CLASS_KEYS = {
    "class_hist",
    "class_coverage",
    "class_tv_uniform",
    "class_tv_data",
    "mean_confidence",
    "mean_confidence_real",
}
ALL_KEYS = {"num_fake", "num_real", "notes", "cfid", "fid", "cprecision", "crecall"}
ALL_KEYS |= {"precision", "recall"} | CLASS_KEYS


class PixelDetector(nn.Module):
    """NVIDIA convention: uint8 RGB at native size in, pixels of channel 0 out, zero-padded."""

    def __init__(self, num_features: int = 2048) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(
        self,
        img: Tensor,
        return_features: bool = False,
        use_fp16: bool = False,
        no_output_bias: bool = False,
    ) -> Tensor:
        if img.dtype != torch.uint8 or img.shape[1] != 3:
            raise RuntimeError("test detector wants uint8 [N, 3, H, W]")
        flat = img[:, 0].to(torch.float32).flatten(1)
        return torch.cat(
            [flat, torch.zeros(img.shape[0], self.num_features - flat.shape[1])], dim=1
        )


def _script_save(module: nn.Module, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory):
    """The real file's feature count (2048), as evaluate_images expects from a path."""
    path = tmp_path_factory.mktemp("det") / "inception-2015-12-05.pt"
    _script_save(PixelDetector(), path)
    return path


@pytest.fixture(scope="module")
def small_detector(tmp_path_factory) -> InceptionFeatures:
    """64 features, passed as a module: cheaper Frechet distances."""
    path = tmp_path_factory.mktemp("det") / "small.pt"
    _script_save(PixelDetector(64), path)
    return InceptionFeatures(path, num_features=64)


@pytest.fixture(scope="module")
def data():
    """Real: a labelled half of digits; fake: the other half without the digit 3."""
    digits = load_dataset("digits")
    perm = torch.randperm(len(digits), generator=torch.Generator().manual_seed(1))
    a, b = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    b = b[digits.labels[b] != 3]
    real = ImageDataset(digits.images[a], digits.labels[a], num_classes=10)
    return real, digits.images[b], digits.labels[b]


def pixel_features(images: Tensor) -> np.ndarray:
    """What an EDM pipeline feeds the detector: uint8 pixels, round half up."""
    x = images.numpy().astype(np.float64)
    return np.clip(np.floor((x + 1.0) * 127.5 + 0.5), 0, 255).reshape(len(x), -1)


def test_all_metrics_keys_and_values(data, detector_path):
    real, fake, fake_labels = data
    # Every other image: a Frechet distance on 2048 features costs ~N^3.
    real = ImageDataset(real.images[::2], real.labels[::2], num_classes=10)
    fake, fake_labels = fake[::2], fake_labels[::2]
    out = evaluate_images(fake, real, classifier="digits", inception=detector_path, k=3)
    assert set(out) == ALL_KEYS
    assert json.loads(json.dumps(out)) == out  # plain JSON values
    assert out["notes"] == [] and out["num_fake"] == len(fake) and out["num_real"] == len(real)

    fr, ff = pixel_features(real.images), pixel_features(fake)
    assert out["fid"] == pytest.approx(frechet_distance(fr, ff), rel=1e-6)
    pr = knn_precision_recall(torch.from_numpy(fr), torch.from_numpy(ff), k=3)
    assert out["precision"] == pytest.approx(pr["precision"])
    assert out["recall"] == pytest.approx(pr["recall"])

    clf = load_classifier("digits")
    assert out["cfid"] == pytest.approx(classifier_fid(clf, real, fake), rel=1e-6)
    assert 0 <= out["cprecision"] <= 1 and 0 <= out["crecall"] <= 1

    # Class metrics against the true labels of the fake set (the classifier is ~99% right).
    true_hist = np.bincount(fake_labels.numpy(), minlength=10) / len(fake_labels)
    assert np.abs(np.array(out["class_hist"]) - true_hist).sum() / 2 < 0.03
    assert out["class_coverage"] == pytest.approx(0.9)
    real_freq = np.bincount(real.labels.numpy(), minlength=10) / len(real)
    assert out["class_tv_data"] == pytest.approx(np.abs(true_hist - real_freq).sum() / 2, abs=0.03)
    assert out["class_tv_uniform"] == pytest.approx(np.abs(true_hist - 0.1).sum() / 2, abs=0.03)
    assert 0.9 < out["mean_confidence"] <= 1 and 0.9 < out["mean_confidence_real"] <= 1


def test_missing_class_lowers_recall_not_precision(data):
    real, fake, _ = data
    digits = load_dataset("digits")
    in_real = torch.zeros(len(digits), dtype=torch.bool)
    perm = torch.randperm(len(digits), generator=torch.Generator().manual_seed(1))
    in_real[perm[: len(perm) // 2]] = True
    full_fake = digits.images[~in_real]
    full = evaluate_images(full_fake, real, metrics=("pr",), inception=False)
    part = evaluate_images(fake, real, metrics=("pr",), inception=False)
    assert part["crecall"] < full["crecall"] - 0.05
    assert part["cprecision"] > full["cprecision"] - 0.05


def test_no_inception_found_is_a_note(data, monkeypatch):
    real, fake, _ = data
    monkeypatch.delenv(inception_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(inception_mod, "_packaged_inception", lambda: None)
    out = evaluate_images(fake, real.images, metrics=("fid", "classes"))
    assert set(out) == {"num_fake", "num_real", "notes", "cfid"} | CLASS_KEYS
    assert len(out["notes"]) == 1 and "Inception" in out["notes"][0]
    # Without labels the data's class frequencies are the classifier's predictions on it.
    assert out["class_tv_data"] < out["class_tv_uniform"] + 0.05


def test_metric_selection_and_errors(data, small_detector, tmp_path):
    real, fake, _ = data
    out = evaluate_images(fake, real, metrics=("fid",), classifier=None, inception=small_detector)
    assert set(out) == {"num_fake", "num_real", "notes", "fid"}
    ref = frechet_distance(pixel_features(real.images), pixel_features(fake))
    assert out["fid"] == pytest.approx(ref, rel=1e-6)
    assert "classifier" in out["notes"][0]
    out = evaluate_images(fake, real, metrics=("classes",), classifier=load_classifier("digits"))
    assert set(out) == {"num_fake", "num_real", "notes"} | CLASS_KEYS
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate_images(fake, real, metrics=("is",))
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate_images(fake[:, :, :4, :4], real, metrics=("classes",))
    with pytest.raises(FileNotFoundError, match="--inception PATH"):
        evaluate_images(fake, real, metrics=("fid",), inception=tmp_path / "none.pt")
