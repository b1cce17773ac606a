"""A small digit classifier: a cheap feature space ("classifier FID") and class coverage.

Inception-v3 features say little about 8x8 or 28x28 grayscale digits and cost a 299x299
forward pass per image. For the built-in ``digits`` and ``mnist`` sets a small CNN trained by
``scripts/train_classifier.py`` gives instead

* ``features(x)``: its penultimate layer, for a Frechet distance ("classifier FID", cFID) and
  k-NN precision / recall;
* ``forward(x)``: logits, for the histogram of predicted classes (mode coverage of a
  generator, the quantity mode-seeking divergences lose) and the mean confidence (how
  recognisable the samples are).

Weights are saved as safetensors with a JSON config beside them (``stem.safetensors`` +
``stem.json``); the ones our script produces ship in ``fdistill/assets``, loaded by name.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fdistill.data import ImageDataset, resize
from fdistill.metrics.fid import frechet_distance
from fdistill.metrics.toy import mode_coverage, tv_distance

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_CLASSIFIERS = ("digits", "mnist")
CONFIG_FORMAT = "fdistill-digit-classifier"
CONFIG_VERSION = 1
_TRAIN_HINT = "python scripts/train_classifier.py"


# ----------------------------------------------------------------------------- the network


class DigitClassifier(nn.Module):
    """CNN for small square images in [-1, 1]: ``features(x)`` [N, feature_dim], logits [N, K].

    Stages of two 3x3 convs + ReLU at widths ``width, 2 width, 4 width, 4 width, ...``, each
    but the last followed by 2x2 max pooling, until the map is at most 4x4 (8x8 -> 4;
    28x28 -> 14 -> 7 -> 4); then global average pooling, ``Linear -> ReLU`` (the features)
    and a linear classifier. Inputs of another resolution are resized to ``resolution``
    (box filter down, bilinear up) so the classifier can score generators at other sizes.
    """

    def __init__(
        self,
        resolution: int,
        channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        feature_dim: int = 128,
    ) -> None:
        super().__init__()
        if resolution < 4:
            raise ValueError(f"resolution must be >= 4, got {resolution}")
        self.resolution = int(resolution)
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.width = int(width)
        self.feature_dim = int(feature_dim)
        # Free-form record from the JSON config (data set, seed, val accuracy), if loaded.
        self.meta: dict[str, Any] = {}

        layers: list[nn.Module] = []
        res, c_in, stage = self.resolution, self.channels, 0
        while True:
            c_out = self.width * 2 ** min(stage, 2)
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.ReLU(),
            ]
            c_in, stage = c_out, stage + 1
            if res <= 4:
                break
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            res = math.ceil(res / 2)
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Linear(c_in, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def config(self) -> dict[str, int]:
        """Constructor arguments, as saved in the JSON beside the weights."""
        return {
            "resolution": self.resolution,
            "channels": self.channels,
            "num_classes": self.num_classes,
            "width": self.width,
            "feature_dim": self.feature_dim,
        }

    def _prepare(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"expected images [N, {self.channels}, H, W] in [-1, 1], got {tuple(x.shape)}"
            )
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = resize(x, self.resolution)
        return x.to(self.head.weight.dtype)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations [N, feature_dim] (non-negative, after ReLU)."""
        h = self.trunk(self._prepare(x)).mean(dim=(2, 3))
        return F.relu(self.embed(h))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits [N, num_classes]."""
        return self.head(self.features(x))


@torch.no_grad()
def _batched(clf: DigitClassifier, images: Tensor, batch_size: int, logits: bool) -> Tensor:
    clf.eval()
    device = clf.head.weight.device
    fn = clf.forward if logits else clf.features
    return torch.cat([fn(chunk.to(device)).float().cpu() for chunk in images.split(batch_size)])


def _images(data: Tensor | ImageDataset) -> Tensor:
    return data.images if isinstance(data, ImageDataset) else data


def classifier_features(
    clf: DigitClassifier, images: Tensor | ImageDataset, batch_size: int = 512
) -> Tensor:
    """``clf.features`` of an image set in eval mode, batched, as float32 CPU [N, F]."""
    return _batched(clf, _images(images), batch_size, logits=False)


def classifier_probs(
    clf: DigitClassifier, images: Tensor | ImageDataset, batch_size: int = 512
) -> Tensor:
    """Softmax class probabilities of an image set, float32 CPU [N, K]."""
    return _batched(clf, _images(images), batch_size, logits=True).softmax(dim=1)


# ----------------------------------------------------------------------------- metrics


def class_histogram(probs: Tensor, num_classes: int | None = None) -> Tensor:
    """Fraction of samples whose most probable class is k, float64 [K] (sums to 1).

    ``probs`` [N, K] are probabilities or logits (only the argmax matters).
    """
    probs = torch.as_tensor(probs)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"expected probabilities [N, K] with N >= 1, got {tuple(probs.shape)}")
    k = num_classes or probs.shape[1]
    counts = torch.bincount(probs.argmax(dim=1).cpu(), minlength=k)
    return counts.to(torch.float64) / probs.shape[0]


def _reference(hist: Tensor, reference: Tensor | Sequence[float] | None) -> Tensor:
    k = hist.shape[0]
    if reference is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    ref = torch.as_tensor(reference, dtype=torch.float64).cpu()
    if ref.shape != (k,):
        raise ValueError(f"reference must have shape [{k}], got {tuple(ref.shape)}")
    return ref / ref.sum()


def class_coverage(
    hist: Tensor, threshold: float = 0.5, reference: Tensor | Sequence[float] | None = None
) -> float:
    """Fraction of classes receiving at least ``threshold`` x their share of samples.

    The share is uniform (1/K) by default, else ``reference`` (e.g. the data's class
    frequencies). A class that gets only a trickle of samples counts as dropped.
    """
    h = torch.as_tensor(hist, dtype=torch.float64).cpu()
    return mode_coverage(h, _reference(h, reference), threshold)


def class_tv(hist: Tensor, reference: Tensor | Sequence[float] | None = None) -> float:
    """Total-variation distance of the class histogram to ``reference`` (uniform by default)."""
    h = torch.as_tensor(hist, dtype=torch.float64).cpu()
    return tv_distance(h, _reference(h, reference))


def mean_confidence(probs: Tensor) -> float:
    """Mean over samples of the largest class probability: how recognisable samples are."""
    probs = torch.as_tensor(probs)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"expected probabilities [N, K] with N >= 1, got {tuple(probs.shape)}")
    return probs.max(dim=1).values.double().mean().item()


def classifier_fid(
    clf: DigitClassifier,
    real: Tensor | ImageDataset,
    fake: Tensor | ImageDataset,
    batch_size: int = 512,
) -> float:
    """Frechet distance between the classifier features of two image sets (cFID)."""
    return frechet_distance(
        classifier_features(clf, real, batch_size), classifier_features(clf, fake, batch_size)
    )


# ----------------------------------------------------------------------------- training


def shift_images(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by its own random integer offset in [-max_shift, max_shift]^2.

    Pixels moved in are background (-1), as for a digit drawn slightly off centre.
    """
    if max_shift <= 0:
        return images
    n, c, h, w = images.shape
    s = max_shift
    padded = F.pad(images, (s, s, s, s), value=-1.0)
    dy = torch.randint(0, 2 * s + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * s + 1, (n,), generator=generator)
    rows = (torch.arange(h)[None] + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w)[None] + dx[:, None])[:, None, None, :]
    return padded[
        torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]


def _accuracy(model: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    pred = classifier_probs(model, images).argmax(dim=1)
    return (pred == labels.cpu()).double().mean().item()


def train_classifier(
    dataset: ImageDataset,
    *,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    val_fraction: float = 0.1,
    width: int = 16,
    feature_dim: int = 128,
    max_shift: int | None = None,
    noise_std: float = 0.05,
    device: str | torch.device = "cpu",
    log: Callable[[str], Any] | None = None,
    log_every: int = 250,
) -> tuple[DigitClassifier, float]:
    """Train a :class:`DigitClassifier` on a labelled data set; returns (model, val accuracy).

    A random ``val_fraction`` of the images (fixed by ``seed``) is held out and never trained
    on. Augmentation, so the classifier stays sensible on imperfect generated samples: random
    shifts of up to ``max_shift`` pixels (default ``max(1, resolution // 12)``: 1 at 8x8, 2
    at 28x28) and Gaussian pixel noise of a random std in [0, ``noise_std``]. AdamW with a
    linear warm-up and cosine decay. The model comes back in eval mode on the CPU.
    """
    if dataset.labels is None:
        raise ValueError(f"data set {dataset.name!r} has no labels; a classifier needs them")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    n = len(dataset)
    perm = torch.randperm(n, generator=g)
    n_val = int(round(n * val_fraction))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if len(train_idx) == 0:
        raise ValueError("no training images left after the validation split")
    x_train, y_train = dataset.images[train_idx], dataset.labels[train_idx]
    x_val, y_val = dataset.images[val_idx], dataset.labels[val_idx]
    if max_shift is None:
        max_shift = max(1, dataset.resolution // 12)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(
            dataset.resolution,
            dataset.channels,
            max(dataset.num_classes, int(dataset.labels.max()) + 1),
            width=width,
            feature_dim=feature_dim,
        )
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * t))

    order, pos = torch.randperm(len(x_train), generator=g), 0
    running = 0.0
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(x_train), generator=g), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        x = shift_images(x_train[idx], max_shift, g)
        if noise_std > 0:
            std = torch.rand(len(idx), 1, 1, 1, generator=g) * noise_std
            x = (x + std * torch.randn(x.shape, generator=g)).clamp(-1, 1)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = F.cross_entropy(model(x.to(device)), y_train[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None:
            running += loss.item()
            if (step + 1) % log_every == 0 or step + 1 == steps:
                log(f"step {step + 1}/{steps}  loss {running / ((step % log_every) + 1):.4f}")
                running = 0.0
    model.cpu().eval()
    return model, _accuracy(model, x_val, y_val)


# ----------------------------------------------------------------------------- save / load


def _stem(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def save_classifier(
    model: DigitClassifier, path_stem: str | os.PathLike, meta: dict[str, Any] | None = None
) -> Path:
    """Write ``stem.safetensors`` (fp32 weights) and ``stem.json`` (config + ``meta``).

    ``meta`` (e.g. data set, seed, validation accuracy) is stored in the JSON for the record.
    Returns the path of the ``.safetensors`` file.
    """
    from safetensors.torch import save

    stem = _stem(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    config = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, **model.config()}
    if meta:
        config["meta"] = meta
    st_path = stem.with_suffix(".safetensors")
    # Bytes written by Python keep the umask's permissions (save_file makes the file 0600).
    st_path.write_bytes(save(weights, metadata={"format": CONFIG_FORMAT}))
    stem.with_suffix(".json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return st_path


def shipped_classifier_path(name: str) -> Path:
    """Where the packaged weights for a built-in data set live (``.safetensors``)."""
    return ASSETS_DIR / f"{name}_classifier.safetensors"


def load_classifier(name_or_path: str | os.PathLike) -> DigitClassifier:
    """Load a classifier by built-in name (``'digits'``, ``'mnist'``) or by path, in eval mode.

    A path may name the ``.safetensors``, the ``.json`` or their common stem. Raises
    FileNotFoundError saying how to produce the weights when they are missing.
    """
    from safetensors.torch import load_file

    if isinstance(name_or_path, str) and name_or_path in SHIPPED_CLASSIFIERS:
        stem = _stem(shipped_classifier_path(name_or_path))
        missing_hint = (
            f"no trained classifier for {name_or_path!r} is installed (expected "
            f"'{stem}.safetensors' and '{stem}.json'); produce it from a source checkout with "
            f"`{_TRAIN_HINT} --datasets {name_or_path}`"
        )
    else:
        stem = _stem(name_or_path)
        missing_hint = (
            f"classifier weights not found: expected '{stem}.safetensors' and '{stem}.json' "
            f"(built-in names: {', '.join(SHIPPED_CLASSIFIERS)}); train one with `{_TRAIN_HINT}` "
            "or fdistill.metrics.classifier.train_classifier + save_classifier"
        )
    st_path, json_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not st_path.is_file() or not json_path.is_file():
        raise FileNotFoundError(missing_hint)
    config = json.loads(json_path.read_text())
    if config.get("format") != CONFIG_FORMAT:
        raise ValueError(
            f"'{json_path}' is not a {CONFIG_FORMAT} config (format={config.get('format')!r})"
        )
    keys = ("resolution", "channels", "num_classes", "width", "feature_dim")
    model = DigitClassifier(**{k: int(config[k]) for k in keys})
    model.load_state_dict(load_file(str(st_path)))
    model.meta = dict(config.get("meta") or {})
    return model.eval()


def label_frequencies(dataset: ImageDataset) -> np.ndarray | None:
    """Class frequencies [K] of a labelled data set (None if unlabelled)."""
    if dataset.labels is None:
        return None
    counts = torch.bincount(dataset.labels, minlength=dataset.num_classes).double()
    return (counts / counts.sum()).numpy()
