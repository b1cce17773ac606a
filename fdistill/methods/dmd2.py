"""DMD2 as a small factory over f-distill: reverse KL (``h = 1``, so the density ratio does not
weight the distribution-matching gradient) and the discriminator head on the fake score's
encoder features, trained with the fake score (Yin et al., 2024)."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from fdistill.critic import MultiScaleHead, feature_taps_of
from fdistill.divergences import get_divergence
from fdistill.methods.fdistill import FDistill, LossConfig


def dmd2(
    teacher: nn.Module,
    generator: nn.Module,
    fake_score: nn.Module,
    cfg: LossConfig,
    head_hidden: int = 64,
) -> FDistill:
    """The DMD2 method: f-distill with ``rkl`` and ``disc_features="fake"``; the head is built
    for the fake score's selected feature taps."""
    head = MultiScaleHead(feature_taps_of(fake_score).selected_feature_maps(), hidden=head_hidden)
    return FDistill(
        teacher,
        generator,
        fake_score,
        head,
        get_divergence("rkl"),
        replace(cfg, disc_features="fake"),
    )
