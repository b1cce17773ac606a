"""Rebuild any denoiser from its JSON config: the one place that maps a config to a network.

Every denoiser fdistill trains, loads or exports carries ``.config``, a JSON-able dict whose
``type`` names a builder registered here; ``build_denoiser(config)`` makes the same network
(random weights; load a state dict into it). The networks that live in this package
(``unet``, ``mlp`` and EDM's ``SongUNet``/``DhariwalUNet`` behind EDM, VP or VE
preconditioning: type ``edm``) are built here. A teacher family whose networks come from
another library (diffusers) registers its builder in its own file of
:mod:`fdistill.teachers` (``@register_model("sd-unet")``), which happens when
``fdistill.teachers`` is imported; this module never imports the teachers (imports run
downward only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

Builder = Callable[[dict], nn.Module]
_BUILDERS: dict[str, Builder] = {}
_DROPOUT_KEYS = ("dropout", "label_dropout")


def register_model(type_name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``builder(config) -> denoiser`` for configs whose ``type`` is ``type_name``."""

    def deco(fn: Builder) -> Builder:
        _BUILDERS[type_name] = fn
        return fn

    return deco


def registered_types() -> list[str]:
    """The model types :func:`build_denoiser` can build now (sorted)."""
    return sorted(_BUILDERS)


def build_denoiser(config: Mapping) -> nn.Module:
    """A fresh denoiser for ``config`` (random weights), with ``.config`` set to a copy of it."""
    kind = config.get("type")
    if kind not in _BUILDERS:
        raise ValueError(
            f"unknown model type {kind!r} in the config; known: {', '.join(sorted(_BUILDERS))} "
            "(the types of teacher families, e.g. diffusers' 'diffusers-unet2d' and 'sd-unet', "
            "are known once fdistill.teachers is imported)"
        )
    model = _BUILDERS[kind](dict(config))
    model.config = dict(config)
    return model


def inference_config(config: Mapping) -> dict:
    """``config`` with every dropout (at any depth) set to 0: students and fake scores are
    deterministic copies of a teacher that may have trained with dropout."""

    def walk(v):
        if isinstance(v, Mapping):
            return {k: (0.0 if k in _DROPOUT_KEYS else walk(x)) for k, x in v.items()}
        return v

    return walk(config)


def copy_denoiser(denoiser: nn.Module, inference: bool = True) -> nn.Module:
    """A new denoiser of the same architecture and weights (dropouts off by default)."""
    cfg = inference_config(denoiser.config) if inference else dict(denoiser.config)
    new = build_denoiser(cfg)
    new.load_state_dict(denoiser.state_dict())
    return new


@register_model("unet")
@register_model("mlp")
def _build_own(config: dict) -> nn.Module:
    """fdistill's own networks (``fdistill train-teacher``) behind EDM preconditioning."""
    from fdistill.denoisers.edm import EDMPrecond
    from fdistill.denoisers.mlp import MLP
    from fdistill.denoisers.unet import UNet

    cfg = dict(config)
    kind = cfg.pop("type")
    sigma_data = cfg.pop("sigma_data", 0.5)
    try:
        net = {"unet": UNet, "mlp": MLP}[kind](**cfg)
    except TypeError as e:
        raise ValueError(f"bad {kind} model config {cfg}: {e}") from None
    return EDMPrecond(net, sigma_data=sigma_data)


EDM_PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond")
"""EDM's preconditioning wrappers that type ``edm`` configs can name."""


@register_model("edm")
def build_edm(config: dict) -> nn.Module:
    """``{"type": "edm", "precond": ..., "precond_kwargs": {...}, "network": ...,
    "network_kwargs": {...}}`` -> the preconditioned EDM network (random weights)."""
    from fdistill.denoisers.edm import EDMPrecond, VEPrecond, VPPrecond
    from fdistill.denoisers.songunet import NETWORKS

    precond = config.get("precond", "EDMPrecond")
    wrappers = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond}
    if precond not in wrappers:
        raise ValueError(
            f"EDM preconditioning '{precond}' is not supported; supported: {', '.join(wrappers)}"
        )
    name = config.get("network", "")
    if name not in NETWORKS:
        raise ValueError(
            f"EDM network class '{name}' is not supported; supported: {', '.join(NETWORKS)}"
        )
    cls = NETWORKS[name]
    try:
        net = cls(**config.get("network_kwargs", {}))
        return wrappers[precond](net, **config.get("precond_kwargs", {}))
    except TypeError as e:
        raise ValueError(f"bad edm model config for {cls.__name__}/{precond}: {e}") from None


__all__ = [
    "EDM_PRECONDS",
    "build_denoiser",
    "build_edm",
    "copy_denoiser",
    "inference_config",
    "register_model",
    "registered_types",
]
