"""Discriminator heads that estimate the density ratio ``log(p_t / q_t)`` from encoder features.

The features come from a denoiser's encoder (the frozen teacher's, as the official code does,
or the fake score's) through the :class:`~fdistill.denoisers.base.FeatureTaps` protocol: a list
of maps, one per selected tap. :class:`MultiScaleHead` puts one small head on each map and
averages their logits, as the official f-distill code does (CIFAR-10: the teacher's 32x32,
16x16 and 8x8 maps). Trained with the logistic loss (real = 1), the logit estimates ``log r``
at the noise level the features were computed at; the features already carry the noise
embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fdistill.denoisers.base import FeatureMap, FeatureTaps
from fdistill.denoisers.unet import group_count


def feature_taps_of(module: nn.Module) -> FeatureTaps:
    """The :class:`FeatureTaps` network behind ``module``: itself, or found through the ``.net``
    of wrappers such as preconditioning."""
    m = module
    while m is not None and not isinstance(m, FeatureTaps):
        m = getattr(m, "net", None)
    if m is None:
        raise ValueError(
            f"{type(module).__name__} offers no discriminator features: its network does not "
            "implement FeatureTaps"
        )
    return m


def _down(cin: int, cout: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding),
        nn.GroupNorm(group_count(cout), cout),
        nn.SiLU(),
    ]


def spatial_head(channels: int, resolution: int, hidden: int) -> nn.Sequential:
    """Logit from an ``[N, channels, R, R]`` map: the official head's design, sized by ``hidden``.

    Stride-2 4x4 convolutions (each with GroupNorm and SiLU) halve the map while it is larger
    than 4x4 (so a 32x32 map goes 32 -> 16 -> 8 -> 4, an 8x8 map 8 -> 4), then a convolution
    whose kernel covers the whole remaining map reduces it to 1x1 (GroupNorm, SiLU) and a 1x1
    convolution gives the logit. For maps of 8x8 and more this is the official head (which
    keeps ``hidden = channels``); maps of 4x4 or less go straight to the full-map convolution.
    """
    layers: list[nn.Module] = []
    c, r = channels, resolution
    while r > 4:
        layers += _down(c, hidden, 4, 2, 1)
        c, r = hidden, (r - 2) // 2 + 1
    layers += _down(c, hidden, r, 1, 0)
    layers.append(nn.Conv2d(hidden, 1, 1))
    return nn.Sequential(*layers)


def vector_head(channels: int, hidden: int) -> nn.Sequential:
    """Logit from ``[N, channels]`` vectors: a two-layer MLP."""
    return nn.Sequential(nn.SiLU(), nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))


class MultiScaleHead(nn.Module):
    """One head per feature map; the logit is the mean of the heads' logits.

    ``hidden``: the heads' width (``None``: each map's own channel count, the official design).
    ``maps`` are the :class:`FeatureMap` descriptions of the features, in the order the feature
    network returns them (``feature_taps_of(net).selected_feature_maps()``, or use
    :meth:`for_network`). Square maps get :func:`spatial_head`, vectors (resolution 0)
    :func:`vector_head`. ``forward(feats)`` takes the list of tensors and returns ``[N]``
    logits, computed in float32 whatever the features' dtype or an active autocast.
    """

    def __init__(self, maps: Sequence[FeatureMap], hidden: int | None = 64):
        super().__init__()
        self.maps = tuple(maps)
        if not self.maps:
            raise ValueError("MultiScaleHead needs at least one feature map")
        # hidden=None: each head keeps its map's width, as the official heads do
        self.heads = nn.ModuleList(
            spatial_head(m.channels, m.resolution, hidden or m.channels)
            if m.resolution
            else vector_head(m.channels, hidden or m.channels)
            for m in self.maps
        )

    @classmethod
    def for_network(cls, net: nn.Module, hidden: int | None = 64) -> MultiScaleHead:
        """A head for the maps ``net`` (a denoiser or raw network) currently selects."""
        return cls(feature_taps_of(net).selected_feature_maps(), hidden)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        if len(feats) != len(self.heads):
            raise ValueError(
                f"the discriminator head reads {len(self.heads)} feature maps "
                f"({', '.join(m.name for m in self.maps)}), got {len(feats)}"
            )
        with torch.autocast(feats[0].device.type, enabled=False):
            logits = [
                head(self._check(f, m).float()).reshape(-1)
                for head, f, m in zip(self.heads, feats, self.maps, strict=True)
            ]
        return logits[0] if len(logits) == 1 else torch.stack(logits).mean(0)

    @staticmethod
    def _check(f: Tensor, m: FeatureMap) -> Tensor:
        expect = (m.channels, m.resolution, m.resolution) if m.resolution else (m.channels,)
        if tuple(f.shape[1:]) != expect:
            raise ValueError(
                f"feature map {m.name} has shape {tuple(f.shape[1:])} per sample; the head was "
                f"built for {expect}"
            )
        return f


__all__ = ["MultiScaleHead", "feature_taps_of", "spatial_head", "vector_head"]
