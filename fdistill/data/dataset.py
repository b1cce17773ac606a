"""An in-memory image data set in the library's convention: float32 [N, C, H, W] in [-1, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

# Slack for float round-off when checking the [-1, 1] range.
_RANGE_TOL = 1e-4


def check_finite_images(images: Tensor, source: str) -> None:
    """Raise a ``ValueError`` naming ``source`` and the first image with a NaN or Inf."""
    bad = (~torch.isfinite(images)).flatten(1).any(1)
    if bad.any():
        idx = bad.nonzero().flatten()
        raise ValueError(
            f"{source}: {len(idx)} image(s) contain NaN or Inf values (first at index "
            f"{int(idx[0])}); clean or drop them before training"
        )


class ImageDataset(Dataset):
    """Square images held in memory, with optional integer class labels.

    ``images`` is a float32 tensor [N, C, H, W] scaled to [-1, 1] (EDM's convention),
    ``labels`` a LongTensor [N] or None, ``num_classes`` 0 when unlabeled. Indexing gives
    ``(image, label)`` with label -1 for unlabeled data, so a ``DataLoader`` batches it as is.
    """

    def __init__(
        self,
        images: Tensor | np.ndarray,
        labels: Tensor | np.ndarray | Sequence[int] | None = None,
        *,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        name: str = "images",
    ):
        images = torch.as_tensor(images).float()
        if images.ndim != 4:
            raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
        n, c, h, w = images.shape
        if n == 0:
            raise ValueError(f"data set {name!r} has no images")
        if h != w:
            raise ValueError(f"images must be square, got {h}x{w} (height x width)")
        check_finite_images(images, f"data set {name!r}")
        lo, hi = images.min().item(), images.max().item()
        if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise ValueError(
                f"images must be scaled to [-1, 1], got values in [{lo:g}, {hi:g}]; "
                "map uint8 pixels with x / 127.5 - 1"
            )
        if lo < -1 or hi > 1:
            images = images.clamp(-1, 1)
        self.images = images.contiguous()
        self.name = name
        self.class_names = list(class_names) if class_names is not None else None

        if labels is None:
            if num_classes:
                raise ValueError(f"num_classes={num_classes} given without labels")
            self.labels, self.num_classes = None, 0
            return
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        labels = labels.long()
        if labels.ndim != 1 or len(labels) != n:
            raise ValueError(
                f"labels must have shape [{n}] (one per image), got {tuple(labels.shape)}"
            )
        if labels.min().item() < 0:
            raise ValueError(f"labels must be >= 0, got {labels.min().item()}")
        if num_classes is None:
            num_classes = len(self.class_names) if self.class_names else labels.max().item() + 1
        if labels.max().item() >= num_classes:
            raise ValueError(f"label {labels.max().item()} >= num_classes={num_classes}")
        self.labels, self.num_classes = labels, int(num_classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label = -1 if self.labels is None else int(self.labels[index])
        return self.images[index], label

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, channels={self.channels}, "
            f"resolution={self.resolution}, num_classes={self.num_classes})"
        )
