"""Rebuild any denoiser from its JSON config: the one place that maps a config to a network.

Every denoiser fdistill trains, loads or exports carries ``.config``, a JSON-able dict whose
``type`` names a builder registered here; ``build_denoiser(config)`` makes the same network
(random weights; load a state dict into it). A teacher family registers its builder in its
own file (``@register_model("edm")``), so runs, exports and students rebuild themselves
without knowing the family.
"""

from __future__ import annotations

import importlib
import pkgutil
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


def _load_families() -> None:
    """Import every module of :mod:`fdistill.teachers` so their builders are registered."""
    import fdistill.teachers as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")


def build_denoiser(config: Mapping) -> nn.Module:
    """A fresh denoiser for ``config`` (random weights), with ``.config`` set to a copy of it."""
    kind = config.get("type")
    if kind not in _BUILDERS:
        _load_families()
    if kind not in _BUILDERS:
        raise ValueError(
            f"unknown model type {kind!r} in the config; known: {', '.join(sorted(_BUILDERS))}"
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


__all__ = ["build_denoiser", "copy_denoiser", "inference_config", "register_model"]
