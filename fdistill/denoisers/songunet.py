"""DDPM++ and NCSN++ (Song et al. 2021) as EDM configures them, and EDM's published presets.

Written for fdistill from the architecture; parameter names equal those of EDM's ``SongUNet``
so the ``model.*`` weights of an EDM pickle load with ``strict=True`` once the ``model.``
prefix is stripped. :func:`build_edm_network` turns the ``init_kwargs`` of an EDM
preconditioning wrapper (what an EDM pickle records) into our network;
:func:`edm_preset_kwargs` gives those kwargs for EDM's published CIFAR-10 and ImageNet-64
networks.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fdistill.denoisers.base import Features
from fdistill.denoisers.dhariwal import DhariwalUNet, check_levels
from fdistill.denoisers.edm_layers import (
    Conv2d,
    EDMUNetBase,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    class_rows,
    drop_labels,
    init_kwargs_of,
    noise_batch,
)

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


def _choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"SongUNet: {name} {value!r} is not one of {', '.join(valid)}")


class SongUNet(EDMUNetBase):
    """DDPM++ / NCSN++ raw network ``net(x, noise_labels, cond=None, return_features=False,
    augment_labels=None)`` (``noise_labels`` = the preconditioning's ``c_noise``).

    DDPM++: ``embedding_type="positional"``, ``channel_mult_noise=1``, standard encoder and
    decoder, ``resample_filter=[1, 1]``. NCSN++: ``"fourier"``, ``2``, ``encoder_type=
    "residual"``, ``[1, 3, 3, 1]``. Blocks sum with ``sqrt(1/2)`` scaling, one attention head,
    group norm eps 1e-6; class rows enter the embedding scaled by ``sqrt(label_dim)``.

    ``cond``: integer class ids ``[N]`` (one-hot), float rows ``[N, label_dim]`` (as they
    are) or ``None`` (zero rows: the null label); ignored when ``label_dim == 0``.
    Feature taps ``enc<R>`` for every resolution and ``mid``, the output of the decoder's two
    leading blocks at the lowest resolution (see :class:`EDMUNetBase`).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ):
        _choice("embedding_type", embedding_type, EMBEDDING_TYPES)
        _choice("encoder_type", encoder_type, ENCODER_TYPES)
        _choice("decoder_type", decoder_type, DECODER_TYPES)
        check_levels(img_resolution, channel_mult, "SongUNet")
        super().__init__()
        self.init_kwargs = init_kwargs_of(locals())
        self.img_resolution, self.img_channels = img_resolution, in_channels
        self.out_channels, self.label_dim, self.augment_dim = out_channels, label_dim, augment_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        blk = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
        )

        # Registration order is EDM's, so state_dict() lists keys as EDM does.
        self.map_noise = (
            PositionalEmbedding(noise_channels, endpoint=True)
            if embedding_type == "positional"
            else FourierEmbedding(noise_channels)
        )
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = (
            Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        )
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **blk)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, 0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux,
                        cout,
                        3,
                        down=True,
                        resample_filter=resample_filter,
                        fused_resample=True,
                        **init,
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **blk)
        skips = [b.out_channels for key, b in self.enc.items() if "aux" not in key]

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
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **blk)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, 0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)
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
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [sin, cos]
        rows = class_rows(cond, self.label_dim, x.shape[0], emb.dtype, x.device)
        if rows is not None:
            rows = drop_labels(rows, self.label_dropout, self.training)
            emb = emb + self.map_label(rows * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        run = self._unet(x, emb, return_features)
        if return_features == "only":
            return run
        _, out, feats = run
        return (out, feats) if return_features else out


# EDM's published networks, as EDM's preconditioning wrapper records its ``init_kwargs``
# (``model_type`` and ``img_channels``; the wrapper passes the rest to the network).
_DDPMPP = dict(
    model_type="SongUNet",
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    model_channels=128,
    channel_mult=[2, 2, 2],
    num_blocks=4,
    attn_resolutions=[16],
)
EDM_PRESETS: dict[str, dict] = {
    # Class-conditional CIFAR-10, DDPM++ (VP/EDM), FID 1.79: 55.73M parameters.
    "cifar10": dict(
        _DDPMPP,
        img_resolution=32,
        img_channels=3,
        label_dim=10,
        augment_dim=9,
        dropout=0.13,
    ),
    # Class-conditional CIFAR-10, NCSN++ (VE): the same but for embedding and input path.
    "cifar10-ncsnpp": dict(
        _DDPMPP,
        embedding_type="fourier",
        encoder_type="residual",
        channel_mult_noise=2,
        resample_filter=[1, 3, 3, 1],
        img_resolution=32,
        img_channels=3,
        label_dim=10,
        augment_dim=9,
        dropout=0.13,
    ),
    # Class-conditional ImageNet-64, ADM, FID 1.36: 295.90M parameters.
    "imagenet64": dict(
        model_type="DhariwalUNet",
        model_channels=192,
        channel_mult=[1, 2, 3, 4],
        channel_mult_emb=4,
        num_blocks=3,
        attn_resolutions=[32, 16, 8],
        img_resolution=64,
        img_channels=3,
        label_dim=1000,
        augment_dim=0,
        dropout=0.1,
    ),
}

NETWORKS: dict[str, type[EDMUNetBase]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}
# Keys of EDM's preconditioning wrappers (EDM, VP, VE, iDDPM) that are not network arguments.
_WRAPPER_KEYS = (
    "model_type",
    "img_channels",
    "use_fp16",
    "sigma_min",
    "sigma_max",
    "sigma_data",
    "beta_d",
    "beta_min",
    "M",
    "epsilon_t",
    "C_1",
    "C_2",
)


def edm_preset_kwargs(name: str) -> dict:
    """EDM's published network as wrapper ``init_kwargs`` (``"cifar10"``, ``"cifar10-ncsnpp"``,
    ``"imagenet64"``); build it with :func:`build_edm_network`."""
    if name not in EDM_PRESETS:
        raise ValueError(f"unknown EDM preset {name!r}; known: {', '.join(EDM_PRESETS)}")
    return copy.deepcopy(EDM_PRESETS[name])


def build_edm_network(init_kwargs: Mapping, out_channels: int | None = None) -> EDMUNetBase:
    """Our network for the ``init_kwargs`` of an EDM preconditioning wrapper (as an EDM
    pickle records them: ``model_type``, ``img_resolution``, ``img_channels``, ``label_dim``,
    then the network's own arguments). Wrapper-only keys (``use_fp16``, ``sigma_*``, VP/iDDPM
    constants) are dropped. ``out_channels`` defaults to ``img_channels``; EDM's iDDPM wrapper
    uses twice that (the network also predicts variances)."""
    kw = dict(init_kwargs)
    kind = kw.get("model_type")
    if kind not in NETWORKS:
        raise ValueError(f"EDM model_type {kind!r} is not one of {', '.join(NETWORKS)}")
    cls = NETWORKS[kind]
    if "img_channels" not in kw or "img_resolution" not in kw:
        raise ValueError("EDM init_kwargs need img_resolution and img_channels")
    channels = int(kw["img_channels"])
    net_kw = {k: v for k, v in kw.items() if k not in _WRAPPER_KEYS}
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    bad = sorted(set(net_kw) - accepted)
    if bad:
        raise ValueError(
            f"EDM init_kwargs for {kind} has unknown keys {bad}; accepted: {sorted(accepted)}"
        )
    net_kw.update(in_channels=channels, out_channels=out_channels or channels)
    return cls(**net_kw)


__all__ = ["EDM_PRESETS", "SongUNet", "build_edm_network", "edm_preset_kwargs"]
