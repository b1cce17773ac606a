"""An in-memory image data set in the library's convention: float32 [N, C, H, W] in [-1, 1].

8-bit sources stay 8-bit in memory (a quarter of float32) and are decoded per batch with
:func:`uint8_to_float`, the same numbers a float copy would hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

# Slack for float round-off when checking the [-1, 1] range.
_RANGE_TOL = 1e-4
# uint8 pixel u -> u / 127.5 - 1, computed in float64 and rounded once to float32 (float32
# arithmetic rounds twice and misses this table for half of the 256 values).
UINT8_TO_FLOAT = torch.from_numpy((np.arange(256) / 127.5 - 1).astype(np.float32))
_TABLES: dict[torch.device, Tensor] = {}  # UINT8_TO_FLOAT on each device that decoded


def uint8_to_float(pixels: Tensor) -> Tensor:
    """8-bit pixels (any shape, any device) -> float32 in [-1, 1], by table lookup."""
    if pixels.device.type == "cpu":  # numpy's take is ~4x torch's index_select here
        return torch.from_numpy(np.take(UINT8_TO_FLOAT.numpy(), pixels.numpy()))
    table = _TABLES.get(pixels.device)
    if table is None:
        table = _TABLES[pixels.device] = UINT8_TO_FLOAT.to(pixels.device)
    return table.index_select(0, pixels.reshape(-1).int()).view(pixels.shape)


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

    ``images`` may also be given as a uint8 tensor or array of 8-bit pixels (0..255): they are
    kept as they are (``storage``, a quarter of the memory) and ``images`` decodes them, a new
    float32 tensor on every access; :meth:`take` decodes only the rows asked for.
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
        images = torch.as_tensor(images)
        pixels = images.dtype == torch.uint8
        if not pixels:
            images = images.float()
        if images.ndim != 4:
            raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
        n, c, h, w = images.shape
        if n == 0:
            raise ValueError(f"data set {name!r} has no images")
        if h != w:
            raise ValueError(f"images must be square, got {h}x{w} (height x width)")
        if not pixels:
            check_finite_images(images, f"data set {name!r}")
            lo, hi = images.min().item(), images.max().item()
            if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:
                raise ValueError(
                    f"images must be scaled to [-1, 1], got values in [{lo:g}, {hi:g}]; "
                    "map uint8 pixels with x / 127.5 - 1, or pass them as uint8"
                )
            if lo < -1 or hi > 1:
                images = images.clamp(-1, 1)
        self.storage = images.contiguous()
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
    def images(self) -> Tensor:
        """All images, float32 [N, C, H, W] in [-1, 1] (decoded anew when stored as 8-bit)."""
        return self.decode(self.storage)

    @property
    def pixels(self) -> Tensor | None:
        """The 8-bit pixels uint8 [N, C, H, W] when the images are stored so, else None."""
        return self.storage if self.storage.dtype == torch.uint8 else None

    @staticmethod
    def decode(rows: Tensor) -> Tensor:
        """Rows of ``storage`` (on any device) as float32 in [-1, 1]."""
        return uint8_to_float(rows) if rows.dtype == torch.uint8 else rows

    def take(self, index: Tensor) -> tuple[Tensor, Tensor | None]:
        """Images (float32) and labels (or None) of the rows ``index`` (a LongTensor)."""
        labels = self.labels[index] if self.labels is not None else None
        return self.decode(self.storage.index_select(0, index)), labels

    @property
    def channels(self) -> int:
        return self.storage.shape[1]

    @property
    def resolution(self) -> int:
        return self.storage.shape[-1]

    def __len__(self) -> int:
        return self.storage.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label = -1 if self.labels is None else int(self.labels[index])
        return self.decode(self.storage[index]), label

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, channels={self.channels}, "
            f"resolution={self.resolution}, num_classes={self.num_classes})"
        )
