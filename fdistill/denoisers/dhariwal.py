"""ADM, the ImageNet-64 network of Dhariwal & Nichol (2021) as EDM configures it.

Written for fdistill from the architecture; parameter names equal those of EDM's
``DhariwalUNet`` so the ``model.*`` weights of an EDM pickle load with ``strict=True`` once the
``model.`` prefix is stripped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fdistill.denoisers.base import Features, after_taps
from fdistill.denoisers.edm_layers import (
    Conv2d,
    EDMUNetBase,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    class_rows,
    drop_labels,
    init_kwargs_of,
    noise_batch,
)


def check_levels(img_resolution: int, channel_mult: Sequence[int], name: str) -> None:
    """One-line ``ValueError`` unless every level halves the resolution exactly."""
    levels = len(channel_mult)
    if levels < 1 or img_resolution < 1 or img_resolution % (1 << (levels - 1)):
        raise ValueError(
            f"{name}: img_resolution {img_resolution} with {levels} levels (channel_mult "
            f"{list(channel_mult)}): need at least one level and a resolution divisible by "
            f"{1 << max(levels - 1, 0)}"
        )


class DhariwalUNet(EDMUNetBase):
    """ADM raw network ``net(x, noise_labels, cond=None, return_features=False,
    augment_labels=None)``: positional noise embedding (``noise_labels`` = EDM's ``c_noise``),
    adaptive group-norm scale/shift, multi-head attention (64 channels a head) at
    ``attn_resolutions``, class labels added to the embedding through a bias-free linear map.

    ``cond``: integer class ids ``[N]`` (one-hot), float rows ``[N, label_dim]`` (as they
    are) or ``None`` (zero rows: the null label); ignored when ``label_dim == 0``.
    Feature taps ``enc<R>`` for every resolution and ``mid`` (see :class:`EDMUNetBase`).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
    ):
        check_levels(img_resolution, channel_mult, "DhariwalUNet")
        super().__init__()
        self.init_kwargs = init_kwargs_of(locals())
        self.img_resolution, self.img_channels = img_resolution, in_channels
        self.out_channels, self.label_dim, self.augment_dim = out_channels, label_dim, augment_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(
            init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3)
        )
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        blk = dict(
            emb_channels=emb_channels,
            channels_per_head=64,
            dropout=dropout,
            init=init,
            init_zero=init_zero,
        )

        # Registration order is EDM's, so state_dict() lists keys as EDM does.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (
            Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        )
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(
                label_dim,
                emb_channels,
                bias=False,
                init_mode="kaiming_normal",
                init_weight=math.sqrt(label_dim),
            )
            if label_dim
            else None
        )

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **blk)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **blk)
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **blk)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **blk)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **blk)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **blk)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)
        self._init_taps()

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        cond: Tensor | None = None,
        return_features: Features = False,
        augment_labels: Tensor | None = None,
    ):
        """``F(x)`` [N, out_channels, H, W], or ``(F(x), feats)`` / ``feats`` (return_features)."""
        emb = self.map_noise(noise_batch(noise_labels, x))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        rows = class_rows(cond, self.label_dim, x.shape[0], emb.dtype, x.device)
        if rows is not None:
            emb = emb + self.map_label(drop_labels(rows, self.label_dropout, self.training))
        emb = F.silu(emb)

        run = self._unet(x, emb, return_features)
        if return_features == "only":
            return run
        h, _, feats = run
        with after_taps(return_features):
            out = self.out_conv(F.silu(self.out_norm(h)))
        return (out, feats) if return_features else out


__all__ = ["DhariwalUNet", "check_levels"]
