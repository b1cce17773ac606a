"""Discriminator head that estimates the density ratio ``log(p_t / q_t)`` from features."""

from __future__ import annotations

from torch import Tensor, nn


def _groups(c: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


class DiscriminatorHead(nn.Module):
    """Logit from encoder features of a denoiser (``[N, C]`` vectors or ``[N, C, H, W]`` maps).

    Trained with the logistic loss (real = 1), its logit estimates ``log r`` at the noise
    level the features were computed at. The features already carry the noise embedding.
    """

    def __init__(self, feature_channels: int, spatial: bool, hidden: int = 128):
        super().__init__()
        if spatial:
            self.body = nn.Sequential(
                nn.Conv2d(feature_channels, hidden, 3, padding=1),
                nn.GroupNorm(_groups(hidden), hidden),
                nn.SiLU(),
                nn.Conv2d(hidden, hidden, 3, padding=1),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(hidden, 1),
            )
        else:
            self.body = nn.Sequential(
                nn.SiLU(),
                nn.Linear(feature_channels, hidden),
                nn.SiLU(),
                nn.Linear(hidden, 1),
            )

    def forward(self, features: Tensor) -> Tensor:
        return self.body(features.float()).reshape(-1)
