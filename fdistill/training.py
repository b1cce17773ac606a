"""The training loops by their earlier names, now thin calls into the engine.

:func:`train_teacher` and :func:`train_distill` build a method
(:class:`fdistill.methods.Denoising`, or the :class:`fdistill.methods.FDistill` passed in) and
run it through :func:`fdistill.engine.train`, the one loop. The engine's names (configs,
processes, EMA, statistics) are re-exported here so code written against this module works.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from fdistill.engine import *  # noqa: F403 - the engine's names, by their earlier module
from fdistill.engine import EMA, Dist, Generators, TeacherTrainConfig, TrainConfig, train
from fdistill.engine import __all__ as ENGINE_NAMES
from fdistill.methods import Denoising, FDistill, Inputs
from fdistill.methods.base import Sampler


def train_teacher(
    denoiser: nn.Module,
    sample_real: Sampler,
    cfg: TeacherTrainConfig,
    out: Path | None = None,
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    config: dict | None = None,
    ddp: Dist | None = None,
    resume: bool = False,
    gens: Generators | None = None,
    on_step: Callable[[int, EMA], None] | None = None,
) -> EMA:
    """Train a diffusion teacher by denoising score matching (:class:`Denoising` through the
    engine) on batches ``sample_real(n, gens["data"])``; returns the EMA."""
    return train(
        Denoising(denoiser, loss_fn),
        Inputs(real=sample_real),
        cfg,
        out,
        config=config,
        ddp=ddp,
        resume=resume,
        gens=gens,
        on_step=on_step,
    )


def train_distill(
    model: FDistill,
    sample_real: Sampler,
    sample_latents: Sampler,
    cfg: TrainConfig,
    out: Path | None = None,
    *,
    config: dict | None = None,
    ddp: Dist | None = None,
    resume: bool = False,
    on_step: Callable[[int, EMA], None] | None = None,
    gens: Generators | None = None,
) -> EMA:
    """Distil: ``critic_ratio`` critic updates, then one generator update, ``cfg.steps`` times
    (``model``'s plan through the engine); returns the generator's EMA."""
    return train(
        model,
        Inputs(real=sample_real, latents=sample_latents),
        cfg,
        out,
        config=config,
        ddp=ddp,
        resume=resume,
        gens=gens,
        on_step=on_step,
    )


__all__ = [*ENGINE_NAMES, "train_distill", "train_teacher"]
