"""A compact DDPM++-style U-Net (after EDM's ``SongUNet``) for images.

It is a *raw* network: wrap it in :class:`~fdistill.denoisers.EDMPrecond` to get a denoiser.
Structure per resolution level: encoder residual blocks (with optional self-attention) and
a downsampling block, a middle pair of blocks at the lowest resolution, and a decoder that
mirrors the encoder with skip connections. Every residual block gets an adaptive
scale/shift from the noise (+ class) embedding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fdistill.denoisers.base import FeatureMap, Features, FeatureTaps, GradUntilTaps


def group_count(channels: int, max_groups: int = 32, min_per_group: int = 4) -> int:
    """Largest group count <= ``max_groups`` that divides ``channels`` with >= 4 channels each."""
    g = max(1, min(max_groups, channels // min_per_group))
    while channels % g:
        g -= 1
    return g


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels), channels, eps=1e-6)


def _small_init_(module: nn.Module, scale: float = 1e-5) -> nn.Module:
    """Shrink a layer's weights and zero its bias so a residual branch starts near zero."""
    with torch.no_grad():
        module.weight.mul_(scale)
        if module.bias is not None:
            module.bias.zero_()
    return module


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar noise label (DDPM++ / EDM default)."""

    def __init__(self, dim: int, max_positions: int = 10000):
        super().__init__()
        half = dim // 2
        # EDM's "endpoint" variant: frequencies run from 1 down to exactly 1/max_positions.
        freqs = (1.0 / max_positions) ** (torch.arange(half) / max(half - 1, 1))
        self.register_buffer("freqs", freqs)

    def forward(self, t: Tensor) -> Tensor:
        arg = t.float()[:, None] * self.freqs[None]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar noise label (NCSN++ style)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, t: Tensor) -> Tensor:
        arg = 2 * math.pi * t.float()[:, None] * self.freqs[None]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, as a residual branch."""

    def __init__(self, channels: int, channels_per_head: int = 64):
        super().__init__()
        self.heads = max(1, channels // channels_per_head)
        while channels % self.heads:
            self.heads -= 1
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _small_init_(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).unbind(1)
        a = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        return self.proj(a.transpose(-1, -2).reshape(n, c, h, w))


class ResBlock(nn.Module):
    """Residual block: GroupNorm-SiLU-conv twice, adaptive scale/shift, resampling, attention.

    ``resample`` is ``"down"`` (2x2 average pooling), ``"up"`` (nearest 2x) or ``None``; it is
    applied to both the residual branch and the skip path. Output is scaled by ``sqrt(1/2)``
    after every residual sum, as in DDPM++, so activations keep their scale with depth.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        emb_channels: int,
        resample: str | None = None,
        attention: bool = False,
        dropout: float = 0.0,
        channels_per_head: int = 64,
    ):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.norm0 = _norm(cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * cout)
        self.norm1 = _norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _small_init_(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if (cin != cout or resample) else None
        self.attn = Attention(cout, channels_per_head) if attention else None
        self.skip_scale = math.sqrt(0.5)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        s = self._resample(x)
        if self.skip is not None:
            s = self.skip(s)
        x = (h + s) * self.skip_scale
        if self.attn is not None:
            x = (self.attn(x) + x) * self.skip_scale
        return x


class UNet(FeatureTaps, nn.Module):
    """Raw network ``net(x, c_noise, cond=None, return_features=False)`` for images [N, C, H, W].

    Args:
        img_resolution: input height and width; must be divisible by ``2**(len(channel_mult)-1)``.
        in_channels, out_channels: image channels (``out_channels`` defaults to ``in_channels``).
        model_channels, channel_mult: level ``i`` has ``model_channels * channel_mult[i]`` channels.
        num_blocks: residual blocks per encoder level (the decoder has one more, as in DDPM++).
        attn_resolutions: resolutions whose blocks get self-attention.
        mid_attention: self-attention in the first middle block (as SongUNet does).
        dropout: dropout probability inside residual blocks.
        num_classes: 0 for unconditional. Otherwise ``cond`` is a LongTensor of class ids or a
            float [N, num_classes] (one-hot or soft) tensor; ``cond=None`` (or an all-zero row)
            is the null label, so one network gives both terms of classifier-free guidance.
        label_dropout: probability, in training mode, of replacing a sample's label by null.
        embedding: ``"positional"`` (DDPM++) or ``"fourier"`` (NCSN++) noise embedding.

    ``cond`` is ignored when ``num_classes == 0``. Discriminator features follow
    :class:`~fdistill.denoisers.base.FeatureTaps`: the taps are ``enc<R>`` for every encoder
    resolution ``R`` (the output of the last encoder block at that resolution, before the
    downsampling block; ``conv_in``'s output if a level has no blocks) and ``mid`` (the
    bottleneck after the middle blocks, the tensor the decoder starts from, of shape
    ``[N, feature_channels, feature_resolution, feature_resolution]``). The default selection
    is every ``enc*`` tap; ``set_feature_taps(["mid"])`` gives the single bottleneck map.
    ``return_features=True`` returns ``(out, feats)`` with ``feats`` the list of selected maps
    (shallow to deep) from the same forward pass; ``"only"`` returns ``feats`` and stops right
    after the deepest selected tap (no decoder; no lower levels for taps at high resolution).
    The final convolution is zero-initialised, so a fresh network outputs exactly zero and
    ``EDMPrecond`` starts as ``D(x, sigma) = c_skip * x``.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int | None = None,
        model_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_blocks: int = 1,
        attn_resolutions: Sequence[int] = (),
        mid_attention: bool = True,
        dropout: float = 0.0,
        num_classes: int = 0,
        label_dropout: float = 0.0,
        embedding: str = "positional",
        channel_mult_emb: int = 4,
        channels_per_head: int = 64,
    ):
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or img_resolution % 2 ** (levels - 1):
            raise ValueError(
                f"img_resolution {img_resolution} is not divisible by 2**{levels - 1} "
                f"(channel_mult={tuple(channel_mult)})"
            )
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.label_dropout = float(label_dropout)
        self.feature_channels = model_channels * channel_mult[-1]
        self.feature_resolution = img_resolution // 2 ** (levels - 1)

        emb_channels = model_channels * channel_mult_emb
        if embedding == "positional":
            self.map_noise = PositionalEmbedding(model_channels)
        elif embedding == "fourier":
            self.map_noise = FourierEmbedding(model_channels)
        else:
            raise ValueError(f"embedding must be 'positional' or 'fourier', got {embedding!r}")
        # Labels enter as (one-hot) vectors through a linear map, so the null label is the zero
        # vector and soft labels work too.
        self.map_label = nn.Linear(num_classes, model_channels) if num_classes else None
        self.map_layer0 = nn.Linear(model_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)

        block = dict(
            emb_channels=emb_channels, dropout=dropout, channels_per_head=channels_per_head
        )
        attn_res = set(attn_resolutions)

        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.enc = nn.ModuleList()
        skips = [model_channels]
        c = model_channels
        # _enc_taps[i] names the tap taken after step i of the encoder (0: conv_in, i: enc[i-1]).
        self._enc_taps: list[str | None] = [None]
        maps = []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc.append(ResBlock(c, c, resample="down", **block))
                skips.append(c)
                self._enc_taps.append(None)
            for _ in range(num_blocks):
                cout = model_channels * mult
                self.enc.append(ResBlock(c, cout, attention=res in attn_res, **block))
                c = cout
                skips.append(c)
                self._enc_taps.append(None)
            self._enc_taps[-1] = f"enc{res}"
            maps.append(FeatureMap(f"enc{res}", c, res))
        maps.append(FeatureMap("mid", c, img_resolution >> (levels - 1)))
        self._maps = tuple(maps)

        self.mid = nn.ModuleList(
            [ResBlock(c, c, attention=mid_attention, **block), ResBlock(c, c, **block)]
        )

        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level < levels - 1:
                self.dec.append(ResBlock(c, c, resample="up", **block))
            for _ in range(num_blocks + 1):
                cout = model_channels * mult
                self.dec.append(ResBlock(c + skips.pop(), cout, attention=res in attn_res, **block))
                c = cout
        assert not skips

        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def label_vector(self, cond: Tensor | None, n: int, device: torch.device) -> Tensor:
        """``cond`` as a float [N, num_classes] matrix; rows of zeros for the null label."""
        if cond is None:
            return torch.zeros(n, self.num_classes, device=device)
        if not cond.is_floating_point():
            return F.one_hot(cond.reshape(n).long(), self.num_classes).float()
        return cond.reshape(n, self.num_classes).float()

    def embed(self, c_noise: Tensor, cond: Tensor | None) -> Tensor:
        """The conditioning vector [N, emb_channels] fed to every residual block."""
        dtype = self.map_layer0.weight.dtype
        emb = self.map_noise(c_noise.reshape(-1)).to(dtype)
        if self.map_label is not None:
            y = self.label_vector(cond, emb.shape[0], emb.device).to(dtype)
            if self.training and self.label_dropout > 0:
                keep = torch.rand(y.shape[0], 1, device=y.device) >= self.label_dropout
                y = y * keep
            emb = emb + self.map_label(y * math.sqrt(self.num_classes))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def feature_maps(self) -> list[FeatureMap]:
        """Every tap: ``enc<R>`` per encoder resolution (high to low), then ``mid``."""
        return list(self._maps)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        cond: Tensor | None = None,
        return_features: Features = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]] | list[Tensor]:
        """``out`` [N, out_channels, H, W]; ``(out, feats)`` with the selected feature maps; or
        ``feats`` alone for ``return_features="only"`` (stops after the deepest selected tap).
        With ``"encoder_grad"`` the layers after the deepest tap run without a graph."""
        with GradUntilTaps(return_features) as grad:
            return self._forward(x, c_noise, cond, return_features, grad)

    def _forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        cond: Tensor | None,
        return_features: Features,
        grad: GradUntilTaps,
    ) -> Tensor | tuple[Tensor, list[Tensor]] | list[Tensor]:
        want = self.feature_taps if return_features else ()
        only = return_features == "only"
        got: dict[str, Tensor] = {}

        def tap(name: str, value: Tensor) -> bool:
            """Keep ``value`` if selected; True when ``"only"`` has everything it needs."""
            if name not in want:
                return False
            got[name] = value
            if name == want[-1]:
                grad.taps_done()
                return only
            return False

        emb = self.embed(c_noise.reshape(-1).expand(x.shape[0]), cond).to(x.dtype)
        h = self.conv_in(x)
        skips = [h]
        for i, blk in enumerate((None, *self.enc)):
            if blk is not None:
                h = blk(h, emb)
                skips.append(h)
            if tap(self._enc_taps[i], h):
                return [got[n] for n in want]
        for blk in self.mid:
            h = blk(h, emb)
        if tap("mid", h):
            return [got[n] for n in want]
        for blk in self.dec:
            if blk.resample != "up":
                h = torch.cat([h, skips.pop()], dim=1)
            h = blk(h, emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return (out, [got[n] for n in want]) if return_features else out


__all__ = ["UNet"]
