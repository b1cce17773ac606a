"""The one interface every network, adapter and exact teacher speaks.

A *denoiser* is any callable ``denoiser(x, sigma, cond=None) -> x0_hat`` in the EDM
convention ``x = x0 + sigma * eps``: it returns its estimate of ``E[x0 | x]``.
``sigma`` is a Python float or a tensor that broadcasts to the batch (shape ``[]``,
``[N]`` or ``[N, 1, ...]``).

Networks that feed a discriminator head also take ``return_features``: ``False`` (just
``x0``), ``True`` (``(x0, feats)`` from the same forward pass), ``"only"`` (``feats``
alone: the network stops at the deepest map it was asked for and skips the rest) or
``"encoder_grad"`` (``(x0, feats)`` where autograd records the pass only up to the deepest
selected map: the rest runs without a graph and ``x0`` comes back detached). The last is the
generator update's: it needs gradients through the features (the GAN term) but uses ``x0``
detached, so one pass replaces a features pass plus a no-grad pass, and no activations of the
part after the taps are kept. ``feats`` is a list of tensors, one per selected *tap* (see
:class:`FeatureTaps`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: float | Tensor, cond: Tensor | None = None) -> Tensor: ...


Features = bool | Literal["only", "encoder_grad"]
FEATURE_MODES: tuple[Features, ...] = (False, True, "only", "encoder_grad")


class GradUntilTaps:
    """Grad mode of one forward pass: with ``return_features="encoder_grad"`` autograd stops
    recording once :meth:`taps_done` is called (after the deepest selected tap); the caller's
    grad mode comes back on exit. Other modes leave grad mode alone."""

    def __init__(self, return_features: Features):
        if return_features not in FEATURE_MODES:
            raise ValueError(
                f"return_features must be one of {FEATURE_MODES}, got {return_features!r}"
            )
        self.cut = return_features == "encoder_grad"
        self.previous = True

    def __enter__(self) -> GradUntilTaps:
        self.previous = torch.is_grad_enabled()
        return self

    def taps_done(self) -> None:
        if self.cut:
            torch.set_grad_enabled(False)

    def __exit__(self, *exc) -> None:
        torch.set_grad_enabled(self.previous)


def after_taps(return_features: Features) -> contextlib.AbstractContextManager:
    """Context for the layers a network runs after its taps (output convolutions,
    preconditioning): no graph with ``"encoder_grad"``, the caller's grad mode otherwise."""
    return torch.no_grad() if return_features == "encoder_grad" else contextlib.nullcontext()


@dataclass(frozen=True)
class FeatureMap:
    """One map a network can hand to a discriminator head.

    ``name`` is the tap's name: ``"enc<R>"`` for the encoder's output at resolution ``R`` (after
    the last block at that resolution, before downsampling), ``"mid"`` for the bottleneck after
    the middle blocks, ``"hidden"`` for a flat vector. ``resolution`` is 0 for ``[N, C]``
    vectors, else the side of the square ``[N, C, R, R]`` map.
    """

    name: str
    channels: int
    resolution: int


class FeatureTaps:
    """Mixin: which encoder maps a network returns for ``return_features``.

    A network lists every tap it offers in :meth:`feature_maps` (forward order, shallow to
    deep) and honours ``self.feature_taps`` in its forward pass: ``feats`` holds the selected
    maps in that order, and with ``return_features="only"`` it stops after the deepest one.
    The selection is a runtime choice (the discriminator's), not part of the weights.
    """

    def feature_maps(self) -> list[FeatureMap]:
        raise NotImplementedError

    def default_feature_taps(self) -> tuple[str, ...]:
        """Every encoder resolution (``enc*``), or all maps when there is no encoder tap."""
        maps = self.feature_maps()
        enc = tuple(m.name for m in maps if m.name.startswith("enc"))
        return enc or tuple(m.name for m in maps)

    @property
    def feature_taps(self) -> tuple[str, ...]:
        taps = getattr(self, "_feature_taps", None)
        return taps if taps is not None else self.default_feature_taps()

    def set_feature_taps(self, names: Sequence[str] | None) -> None:
        """Select taps by name (``None``: the default). Unknown names raise ``ValueError``."""
        if names is None:
            self._feature_taps = None
            return
        names = tuple(names)
        valid = [m.name for m in self.feature_maps()]
        bad = [n for n in names if n not in valid]
        if bad or not names or len(set(names)) != len(names):
            raise ValueError(
                f"feature taps {list(names)} are not distinct names of this network's maps; "
                f"valid: {', '.join(valid)}"
            )
        self._feature_taps = tuple(sorted(names, key=valid.index))

    def selected_feature_maps(self) -> list[FeatureMap]:
        """The :class:`FeatureMap` of each selected tap, in the order ``feats`` holds them."""
        by_name = {m.name: m for m in self.feature_maps()}
        return [by_name[n] for n in self.feature_taps]


class DelegateFeatures(FeatureTaps):
    """:class:`FeatureTaps` of a wrapper (preconditioning, adapters): asks ``self.net``."""

    def feature_maps(self) -> list[FeatureMap]:
        net = getattr(self, "net", None)
        if not isinstance(net, FeatureTaps):
            raise ValueError(f"{type(net).__name__} offers no discriminator features")
        return net.feature_maps()

    def default_feature_taps(self) -> tuple[str, ...]:
        return self.net.default_feature_taps()

    @property
    def feature_taps(self) -> tuple[str, ...]:
        return self.net.feature_taps

    def set_feature_taps(self, names: Sequence[str] | None) -> None:
        self.net.set_feature_taps(names)


def sigma_batch(sigma: float | Tensor, x: Tensor) -> Tensor:
    """Return ``sigma`` as a float tensor of shape ``[N]`` for the batch ``x`` of size N."""
    n = x.shape[0]
    s = torch.as_tensor(sigma, dtype=x.dtype if x.is_floating_point() else torch.float32)
    s = s.to(x.device)
    if s.ndim == 0:
        return s.expand(n)
    if s.shape[0] not in (1, n) or any(d != 1 for d in s.shape[1:]):
        raise ValueError(
            f"sigma of shape {tuple(s.shape)} does not broadcast to a batch of {n}: "
            "pass a float, a tensor of shape [N], or [N, 1, ...]"
        )
    return s.reshape(-1).expand(n)


def sigma_view(sigma: float | Tensor, x: Tensor) -> Tensor:
    """Return ``sigma`` shaped ``[N, 1, ..., 1]`` so it broadcasts against ``x``."""
    return sigma_batch(sigma, x).reshape(-1, *([1] * (x.ndim - 1)))


def score_from_denoiser(x: Tensor, x0: Tensor, sigma: float | Tensor) -> Tensor:
    """Tweedie: ``grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2``."""
    return (x0 - x) / sigma_view(sigma, x) ** 2
