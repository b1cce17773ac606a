"""Image data sets: built-ins (``digits``, ``mnist``), image folders, ``.npz`` and EDM zips."""

from fdistill.data.dataset import ImageDataset
from fdistill.data.loading import (
    BUILTIN_DATASETS,
    IMAGE_EXTENSIONS,
    check_labels,
    decode_image,
    load_dataset,
    resize,
)
from fdistill.data.npz import npz_images_to_float

__all__ = [
    "BUILTIN_DATASETS",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "check_labels",
    "decode_image",
    "load_dataset",
    "npz_images_to_float",
    "resize",
]
