"""A training method as data: the modules it trains, its optimisers, its phases, its EMA target.

The engine (:func:`fdistill.engine.train`) knows nothing of teachers, students or
discriminators: it reads a method's :class:`Plan` and runs it. One *step* of the engine runs
every phase in order, each ``repeat`` times; one run of a phase is one optimiser update whose
loss the method computes from a batch it draws itself (``Inputs`` + the random streams).

* f-distill (:class:`fdistill.methods.fdistill.FDistill`): the critic phase (fake score and
  discriminator, ``critic_ratio`` updates), then the generator phase; EMA of the generator.
* DMD2 (:func:`fdistill.methods.dmd2.dmd2`): f-distill with reverse KL and the discriminator on
  the fake score's features.
* Teacher training (:class:`fdistill.methods.denoising.Denoising`): one phase, the EDM loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from fdistill.rng import RandomSource

Sampler = Callable[[int, RandomSource], tuple[Any, Any]]
"""``sample(n, gen) -> (x, cond)``: this rank's ``n`` rows of a batch and their conditioning."""

Stat = float | Tensor
Streams = Mapping[str, RandomSource]
LossFn = Callable[["Inputs", int, Streams], tuple[Tensor, dict[str, Stat]]]


@dataclass
class Inputs:
    """Where a method's batches come from: ``real`` data (images or latents and their
    conditioning) and the student's ``latents`` (unit noise and the conditioning to generate
    for). Either may be ``None`` when no phase of the method reads it."""

    real: Sampler | None = None
    latents: Sampler | None = None


@dataclass(frozen=True)
class Optimizer:
    """An AdamW over the parameters of ``modules`` (attribute names of the method) with
    learning rate ``lr``, ramped linearly over the first ``warmup`` steps."""

    modules: tuple[str, ...]
    lr: float
    warmup: int = 0


@dataclass(frozen=True)
class Phase:
    """One optimiser update, ``repeat`` times per engine step: ``loss(inputs, n, streams)``
    returns the mean loss of ``n`` samples and its statistics; the gradient norm is logged as
    ``norm_key``.

    A loss that normalises over its batch (f-distill's ratio normaliser) names ``prepare``
    (``prepare(inputs, n, streams)``: per-sample statistics ``[n, ...]`` of the same draws, no
    gradients) and ``fixed`` (``fixed(rows)``: a context in which the loss normalises by the
    rows of the whole batch): the engine then accumulates micro-batches exactly.
    """

    name: str
    optimizer: str
    loss: LossFn
    repeat: int = 1
    norm_key: str = "grad_norm"
    prepare: Callable[[Inputs, int, Streams], Tensor] | None = None
    fixed: Callable[[Tensor], AbstractContextManager] | None = None


@dataclass(frozen=True)
class Plan:
    """What the engine runs. ``ema``: the trained module whose average is kept (and sampled).
    ``compile``: trained modules ``torch.compile`` may compile; ``eager``: trained modules it must
    not (they are differentiated twice, e.g. by R1); ``compile_frozen``: frozen networks to
    compile too (the teacher)."""

    optimizers: dict[str, Optimizer]
    phases: tuple[Phase, ...]
    ema: str
    compile: tuple[str, ...] = ()
    eager: tuple[str, ...] = ()
    compile_frozen: tuple[nn.Module, ...] = field(default=())


class Method(nn.Module):
    """Base of every training method: a module holding its networks as attributes.

    ``kind`` names the run (``config.json``'s ``kind``); :attr:`trained` lists the attributes
    the engine trains (and may wrap in DDP / shard with FSDP for the length of a run, so losses
    must read them through ``self`` at call time); :meth:`state_objects` adds what else a
    checkpoint must hold (e.g. the ratio normaliser's running statistics).
    """

    kind: str = "method"
    trained: tuple[str, ...] = ()

    def plan(self, cfg: Any) -> Plan:
        """The optimisers and phases for the loop settings ``cfg``."""
        raise NotImplementedError

    def state_objects(self) -> dict[str, Any]:
        """Stateful objects beyond the trained modules, EMA and optimisers (by checkpoint key)."""
        return {}

    def parameters_of(self, names: tuple[str, ...]) -> list[nn.Parameter]:
        """The trainable parameters of the modules ``names``, in order."""
        return [p for n in names for p in getattr(self, n).parameters() if p.requires_grad]
