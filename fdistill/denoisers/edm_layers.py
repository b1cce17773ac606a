"""Layers of EDM's networks (Karras et al. 2022), written for fdistill from the architecture.

Parameter and buffer names follow EDM's ``training/networks.py`` so that the state dicts of
EDM's pickles load as they are: ``Linear``/``Conv2d`` hold ``weight``/``bias`` in PyTorch's
layout, a resampling ``Conv2d`` holds its 2-D ``resample_filter`` buffer, a ``UNetBlock`` holds
``norm0, conv0, affine, norm1, conv1, skip, norm2, qkv, proj``. Initialisation follows EDM too,
so these networks can also be trained from scratch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fdistill.denoisers.base import FeatureMap, Features, FeatureTaps, GradUntilTaps

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> Tensor:
    """A random tensor of ``shape`` with EDM's named initialisation (unit ``init_weight``)."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"init_mode {mode!r} is not one of {', '.join(INIT_MODES)}")


class Linear(nn.Module):
    """Fully connected layer; ``init_weight``/``init_bias`` scale EDM's initialisation."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), b)


def resample_kernel(taps: Sequence[float]) -> Tensor:
    """The separable 2-D filter ``outer(f, f) / sum(f)^2`` as a ``[1, 1, k, k]`` tensor."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square()).reshape(1, 1, len(f), len(f))


class Conv2d(nn.Module):
    """Convolution with optional 2x up- or downsampling by a FIR ``resample_filter``.

    ``kernel=0`` makes a pure resampler (no weight, no bias). Upsampling is a stride-2
    transposed depthwise convolution with the filter times 4 (gain 1), then the convolution;
    downsampling a stride-2 depthwise convolution with the filter, then the convolution.
    ``fused_resample`` swaps the order where that is cheaper (convolve at low resolution), as
    EDM does for NCSN++'s residual input path; it pads differently, so it is part of the model.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        if up and down:
            raise ValueError("Conv2d: up and down cannot both be set")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(
            mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel**2
        )
        self.weight = (
            nn.Parameter(
                weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight
            )
            if kernel
            else None
        )
        self.bias = (
            nn.Parameter(weight_init([out_channels], **fans) * init_bias)
            if kernel and bias
            else None
        )
        taps = [float(t) for t in resample_filter]
        self.register_buffer("resample_filter", resample_kernel(taps) if up or down else None)
        # [1, 1] is a box filter: down = 2x2 average pooling, up = nearest neighbour. Same
        # numbers (to rounding) as the depthwise convolutions, much faster.
        self._box = len(taps) == 2 and taps[0] == taps[1]

    def _up(self, x: Tensor, padding: int) -> Tensor:
        if self._box and padding == 0:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        f = (self.resample_filter.to(x.dtype) * 4).tile([x.shape[1], 1, 1, 1])
        return F.conv_transpose2d(x, f, groups=x.shape[1], stride=2, padding=padding)

    def _down(self, x: Tensor, padding: int) -> Tensor:
        if self._box and padding == 0:
            return F.avg_pool2d(x, 2)
        f = self.resample_filter.to(x.dtype).tile([x.shape[1], 1, 1, 1])
        return F.conv2d(x, f, groups=x.shape[1], stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.up or self.down else 0
        if self.fused_resample and self.up and w is not None:
            x = self._up(x, max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = self._down(x, 0)
        else:
            if self.up:
                x = self._up(x, f_pad)
            if self.down:
                x = self._down(x, f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with EDM's group rule ``min(num_groups, C // min_per_group)``."""

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        min_channels_per_group: int = 4,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        return F.group_norm(x, self.num_groups, w, b, self.eps)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Single-head attention over ``[B, C, L]`` maps, softmax in float32 (as EDM).

    Plain einsum + softmax rather than a fused kernel: it stays twice differentiable (an R1
    penalty differentiates a gradient through the encoder) and rounds as EDM does.
    """
    scale = 1 / math.sqrt(k.shape[1])
    w = torch.einsum("bcq,bck->bqk", q.to(torch.float32), (k * scale).to(torch.float32))
    w = w.softmax(dim=2).to(q.dtype)
    return torch.einsum("bqk,bck->bcq", w, v)


class UNetBlock(nn.Module):
    """EDM's residual block: GroupNorm-SiLU-conv, noise embedding, GroupNorm-SiLU-dropout-conv,
    skip connection, optional self-attention; both sums are scaled by ``skip_scale``.

    ``adaptive_scale`` (ADM) applies the embedding as ``norm1(x) * (1 + scale) + shift``;
    otherwise (DDPM++/NCSN++) it is added before ``norm1``. The skip path is a 1x1 convolution
    when channels change or (``resample_proj``) when resampling, else a pure resampler.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: Mapping | None = None,
        init_zero: Mapping | None = None,
        init_attn: Mapping | None = None,
    ):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero if init_zero is not None else {"init_weight": 0})
        self.in_channels, self.out_channels = in_channels, out_channels
        # As EDM: fewer than channels_per_head channels means no attention at all.
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = (
                num_heads if num_heads is not None else out_channels // channels_per_head
            )
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        rs = dict(resample_filter=resample_filter)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, **rs, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, **rs, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **dict(init_attn or init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale
        if self.num_heads:
            n, c, h, w = x.shape
            # EDM's qkv channel layout: (head, channel, q/k/v).
            qkv = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1)
            q, k, v = qkv.unbind(2)
            a = attention(q, k, v).reshape(n, c, h, w)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding ``[cos(x f), sin(x f)]``, ``f = (1/max_positions)^(i/(C/2 - e))``
    with ``e = 1`` when ``endpoint`` (frequencies reach ``1/max_positions``), else 0."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = (
            num_channels,
            max_positions,
            endpoint,
        )

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (freqs / (half - (1 if self.endpoint else 0)))
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos(2 pi x f), sin(2 pi x f)]``, ``f ~ N(0, scale^2)``
    (a buffer, saved with the weights)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def class_rows(
    cond: Tensor | None, label_dim: int, n: int, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """Class conditioning as float rows ``[n, label_dim]``: integer ids become one-hot rows,
    float rows pass as they are, ``None`` is the null label (zero rows). ``None`` when the
    network is unconditional (``label_dim == 0``), whatever ``cond`` is."""
    if label_dim == 0:
        return None
    if cond is None:
        return torch.zeros(n, label_dim, dtype=dtype, device=device)
    cond = torch.as_tensor(cond, device=device)
    if not cond.is_floating_point():
        if cond.shape != (n,):
            raise ValueError(
                f"class ids of shape {tuple(cond.shape)} do not match a batch of {n}: "
                f"pass ids of shape [{n}] or rows of shape [{n}, {label_dim}]"
            )
        # Checked where it costs no device sync (CPU, eager); a CUDA one_hot asserts itself.
        checkable = cond.device.type == "cpu" and not torch.compiler.is_compiling()
        if n and checkable and (int(cond.min()) < 0 or int(cond.max()) >= label_dim):
            raise ValueError(
                f"class ids must lie in [0, {label_dim - 1}], got {int(cond.min())}.."
                f"{int(cond.max())}"
            )
        return F.one_hot(cond.long(), label_dim).to(dtype)
    if cond.shape != (n, label_dim):
        raise ValueError(
            f"label rows of shape {tuple(cond.shape)} do not match: pass rows of shape "
            f"[{n}, {label_dim}] or integer class ids of shape [{n}]"
        )
    return cond.to(dtype)


def drop_labels(rows: Tensor, p: float, training: bool) -> Tensor:
    """Zero whole label rows with probability ``p`` while training (classifier-free guidance)."""
    if not training or not p:
        return rows
    keep = torch.rand([rows.shape[0], 1], device=rows.device) >= p
    return rows * keep.to(rows.dtype)


def init_kwargs_of(args: dict) -> dict:
    """A constructor's arguments (its ``locals()`` on entry) as JSON-able ``init_kwargs``:
    sequences become lists, ``self`` and ``__class__`` are dropped."""
    skip = ("self", "__class__")
    return {
        k: list(v) if isinstance(v, (list, tuple)) else v for k, v in args.items() if k not in skip
    }


class EDMUNetBase(FeatureTaps, nn.Module):
    """What SongUNet and DhariwalUNet share: encoder/decoder ``ModuleDict``s named as EDM
    names them (``"<R>x<R>_<what>"``), their forward loops, and the discriminator taps.

    Taps: ``enc<R>`` is ``x`` after the last encoder entry at resolution ``R`` (the last block
    there, before the next level's downsampling block); ``mid`` is ``x`` after the decoder's
    two leading blocks at the lowest resolution (``<R>x<R>_in0``, ``_in1``), the bottleneck.
    """

    enc: nn.ModuleDict
    dec: nn.ModuleDict

    def _init_taps(self) -> None:
        taps: dict[str, str] = {}
        self._tap_maps: list[FeatureMap] = []
        for key in self.enc:
            if "aux_down" not in key:  # aux_down moves only the auxiliary image path
                taps["enc" + key.split("x")[0]] = key
        for name, key in taps.items():
            res = int(name[3:])
            self._tap_maps.append(FeatureMap(name, self.enc[key].out_channels, res))
        self._enc_tap_keys = {key: name for name, key in taps.items()}
        res = min(m.resolution for m in self._tap_maps)
        self._mid_key = f"{res}x{res}_in1"
        self._tap_maps.append(FeatureMap("mid", self.dec[self._mid_key].out_channels, res))

    def feature_maps(self) -> list[FeatureMap]:
        return list(self._tap_maps)

    def _unet(
        self, x: Tensor, emb: Tensor, return_features: Features
    ) -> tuple[Tensor, Tensor | None, list[Tensor]] | list[Tensor]:
        """Run encoder and decoder: ``(x, aux, feats)``, or ``feats`` for ``"only"`` (stops
        right after the deepest selected tap). ``aux`` is the output of the decoder's
        ``aux_*`` head (SongUNet), ``None`` where there is none. With ``"encoder_grad"`` the
        rest after the deepest tap runs without a graph."""
        with GradUntilTaps(return_features) as grad:
            return self._unet_pass(x, emb, return_features, grad)

    def _unet_pass(
        self, x: Tensor, emb: Tensor, return_features: Features, grad: GradUntilTaps
    ) -> tuple[Tensor, Tensor | None, list[Tensor]] | list[Tensor]:
        want = set(self.feature_taps) if return_features else set()
        only = return_features == "only"
        feats: list[Tensor] = []

        def tap(name: str, value: Tensor) -> bool:
            """Keep ``value`` if selected; True when ``"only"`` has everything it needs."""
            if name in want:
                feats.append(value)
                want.discard(name)
                if not want:
                    grad.taps_done()
            return only and not want

        skips: list[Tensor] = []
        aux = x
        for key, block in self.enc.items():
            if "aux_down" in key:
                aux = block(aux)
            elif "aux_skip" in key:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in key:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
            if key in self._enc_tap_keys and tap(self._enc_tap_keys[key], x):
                return feats

        aux, tmp = None, None
        for key, block in self.dec.items():
            if "aux_up" in key:
                aux = block(aux)
            elif "aux_norm" in key:
                tmp = block(x)
            elif "aux_conv" in key:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
            if key == self._mid_key and tap("mid", x):
                return feats
        return x, aux, feats


def noise_batch(noise_labels: Tensor | float, x: Tensor) -> Tensor:
    """``noise_labels`` as a vector of length N (a single value is repeated), float32 or wider:
    the embedding runs in float32 as in EDM, in float64 for a float64 network."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    c = torch.as_tensor(noise_labels, device=x.device).to(dtype).reshape(-1)
    if c.numel() == 1:
        return c.expand(x.shape[0])
    if c.numel() != x.shape[0]:
        raise ValueError(
            f"noise_labels has {c.numel()} values for a batch of {x.shape[0]}: pass one per "
            "sample or a single value"
        )
    return c


__all__ = [
    "Conv2d",
    "EDMUNetBase",
    "FourierEmbedding",
    "GroupNorm",
    "Linear",
    "PositionalEmbedding",
    "UNetBlock",
    "attention",
    "class_rows",
    "drop_labels",
    "noise_batch",
    "resample_kernel",
    "weight_init",
]
