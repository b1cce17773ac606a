"""The student: one denoiser run at K noise levels (K = 1 is the one-step generator).

A K-step student with levels ``sigmas[0] > ... > sigmas[K-1]`` samples as DMD2 and FastGen do
(EDM convention ``x = x0 + sigma * eps``)::

    x0 = D(sigmas[0] * z, sigmas[0], c)
    for k in 1 .. K-1:  x0 = D(x0 + sigmas[k] * eps_k, sigmas[k], c)    # eps_k fresh, independent

so the network runs exactly K times. Every ``eps_k`` is a new draw: re-using or correlating the
re-noising draws is a known source of artefacts (DMD2 issue 9).

Training inputs (:meth:`Student.training_sample`), one step index ``k`` per batch:

* ``"backward"`` (DMD2's backward simulation): ``k`` student steps from fresh noise under
  ``torch.no_grad`` (each x0 re-noised to the next level with fresh noise), then one step with
  gradients at ``sigmas[k]``. The k no-grad steps cost forward passes only.
* ``"forward"`` (FastGen): real data noised to ``sigmas[k]`` with fresh noise, then one step
  with gradients. At ``k = 0`` the input is pure noise ``sigmas[0] * z`` in both modes (as
  DMD2 does at t = 999), so both modes agree with the sampler's first step.

The caller re-noises the returned x0 at its own levels (distribution matching, fake score,
discriminator), exactly as for a one-step student. With K = 1 a training draw is
``D(sigmas[0] * z, sigmas[0], c)`` and consumes no random numbers: bit for bit today's
:class:`OneStepGenerator`, which is kept as the K = 1 case with its old state-dict keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fdistill import rng
from fdistill.rng import BatchRandom
from fdistill.samplers import SeededGenerator, sigma_grid

STUDENT_INPUTS = ("backward", "forward")

#: Where inference draws its re-noising noise: per-sample generators (row i from seed i), a
#: ``torch.Generator``, a :class:`~fdistill.rng.BatchRandom`, or ``fn(x) -> noise like x``.
NoiseSource = SeededGenerator | torch.Generator | BatchRandom | Callable[[Tensor], Tensor]

# Relative slack when checking sigmas against the teacher's range: levels that went through
# float32, JSON or a printed value must still count as the teacher's own sigma_max.
_RANGE_RTOL = 1e-5


class StudentDraw(NamedTuple):
    """A training draw: the student's x0 (with a graph), its step index and noise level."""

    x0: Tensor
    step: int
    sigma: float


# --------------------------------------------------------------------------- noise levels


def _fmt(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def validate_student_sigmas(
    sigmas: Sequence[float],
    steps: int | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> list[float]:
    """``sigmas`` as floats, or a one-line ``ValueError``.

    Checks: at least one level and ``steps >= 1``; as many levels as ``steps`` (when given);
    every level positive and finite; strictly descending; inside the teacher's
    ``[sigma_min, sigma_max]`` (when given, with a relative slack of 1e-5 for rounding).
    """
    if steps is not None and int(steps) < 1:
        raise ValueError(f"student steps (--student-steps) must be >= 1, got {steps}")
    values = [float(s) for s in sigmas]
    if not values:
        raise ValueError("student sigmas (--student-sigmas) are empty: give one level per step")
    if steps is not None and len(values) != int(steps):
        raise ValueError(
            f"{len(values)} student sigmas (--student-sigmas {_fmt(values)}) for {steps} "
            "student steps (--student-steps): give one level per step"
        )
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"student sigmas must be positive and finite, got {_fmt(values)}")
    if any(b >= a for a, b in zip(values[:-1], values[1:], strict=False)):
        raise ValueError(f"student sigmas must be strictly descending, got {_fmt(values)}")
    lo = -math.inf if sigma_min is None else float(sigma_min) * (1 - _RANGE_RTOL)
    hi = math.inf if sigma_max is None else float(sigma_max) * (1 + _RANGE_RTOL)
    outside = [s for s in values if not lo <= s <= hi]
    if outside:
        span = f"[{sigma_min if sigma_min is not None else 0:g}, "
        span += f"{sigma_max if sigma_max is not None else math.inf:g}]"
        raise ValueError(
            f"student sigma {outside[0]:g} is outside the teacher's noise range {span}"
        )
    return values


def default_student_timesteps(steps: int, num_timesteps: int) -> list[int]:
    """DMD2's timesteps of a K-step student on a T-step discrete schedule: ``T-1 - floor(k*T/K)``
    for ``k = 0 .. K-1`` (T = 1000: K = 4 gives 999, 749, 499, 249; K = 2 gives 999, 499)."""
    if steps < 1:
        raise ValueError(f"student steps (--student-steps) must be >= 1, got {steps}")
    if steps > num_timesteps:
        raise ValueError(
            f"{steps} student steps on a schedule of {num_timesteps} timesteps: at most one "
            "step per timestep"
        )
    return [num_timesteps - 1 - (k * num_timesteps) // steps for k in range(steps)]


def _field(source: Any, name: str) -> Any:
    if source is None:
        return None
    if isinstance(source, Mapping):
        return source.get(name)
    return getattr(source, name, None)


def default_student_sigmas(
    steps: int,
    teacher: Any = None,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    schedule_sigmas: Sequence[float] | Tensor | None = None,
    rho: float = 7.0,
) -> list[float]:
    """The default K noise levels of a student of ``teacher``, descending from its top sigma.

    ``teacher`` may be a loaded teacher (a module with ``.info`` and, for a discrete-time
    teacher, ``.schedule``), a ``TeacherInfo``, or a mapping with the keyword names below;
    keywords override what it holds.

    * Discrete-time teachers (diffusers, Stable Diffusion; ``teacher.schedule.sigmas`` or
      ``schedule_sigmas``: the ascending float64 table ``sigma_t``, t = 0 .. T-1): the sigmas of
      the timesteps ``T-1, T-1-T/K, ...`` of :func:`default_student_timesteps` — the levels
      DMD2's released SDXL students use (999, 749, 499, 249), so a diffusers scheduler set to
      those timesteps reproduces the student.
    * EDM teachers (``sigma_min``, ``sigma_max``): the first K points of the Karras grid
      (``rho``, default 7) of K + 1 points from ``sigma_max`` to ``sigma_min``, i.e. the levels
      at which the teacher's own K-step Euler sampler evaluates its network. The first level is
      ``sigma_max`` (K = 1 is the usual one-step student); the grid's last point is dropped
      because a step at ``sigma_min`` barely changes a sample and the last x0 is the output.
      Levels for K = 4, EDM (0.002 .. 80): 80, 17.5, 2.5, 0.17.
    """
    if int(steps) < 1:
        raise ValueError(f"student steps (--student-steps) must be >= 1, got {steps}")
    steps = int(steps)
    info = _field(teacher, "info") or teacher
    if schedule_sigmas is None:
        schedule_sigmas = _field(_field(teacher, "schedule"), "sigmas")
    if schedule_sigmas is None:
        schedule_sigmas = _field(teacher, "schedule_sigmas")
    if schedule_sigmas is not None:
        table = torch.as_tensor(schedule_sigmas, dtype=torch.float64).reshape(-1)
        ts = default_student_timesteps(steps, len(table))
        return [float(table[t]) for t in ts]
    sigma_min = _field(info, "sigma_min") if sigma_min is None else sigma_min
    sigma_max = _field(info, "sigma_max") if sigma_max is None else sigma_max
    if sigma_max is None or (steps > 1 and sigma_min is None):
        raise ValueError(
            "default student sigmas need the teacher's sigma_min and sigma_max (or its "
            "discrete schedule); pass --student-sigmas"
        )
    if steps == 1:
        return [float(sigma_max)]
    grid = sigma_grid(steps + 1, float(sigma_min), float(sigma_max), rho)
    return [float(s) for s in grid[:steps]]


# --------------------------------------------------------------------------- noise draws


def _fresh_noise(noise: NoiseSource | None, x: Tensor) -> Tensor:
    """A standard-normal draw shaped like ``x`` from an inference noise source."""
    if noise is None:
        raise ValueError(
            "a student of more than one step re-noises between steps: pass a noise source "
            "(per-sample SeededGenerator, torch.Generator or fn(x) -> noise)"
        )
    if hasattr(noise, "randn_like"):
        eps = noise.randn_like(x)
    elif isinstance(noise, BatchRandom):
        eps = rng.randn(x.shape, noise, dtype=x.dtype, device=x.device)
    elif isinstance(noise, torch.Generator):
        eps = torch.randn(x.shape, generator=noise, dtype=x.dtype, device=noise.device)
    elif callable(noise):
        eps = noise(x)
    else:
        raise TypeError(f"not a noise source: {type(noise).__name__}")
    if eps.shape != x.shape:
        raise ValueError(f"noise of shape {tuple(eps.shape)} for samples {tuple(x.shape)}")
    return eps.to(device=x.device, dtype=x.dtype)


def draw_step(steps: int, generator: rng.RandomSource = None) -> int:
    """A uniform step index in ``[0, steps)``, the same on every rank of a :class:`BatchRandom`.

    A :class:`BatchRandom` draws it as one number of shape ``(1,)`` straight from its
    underlying generator (seeded alike on every rank, and rewound alike for every micro-batch),
    not as a global batch; a plain ``torch.Generator`` draws it likewise (the same on every
    rank only if the generators are seeded alike); ``None`` uses the global RNG.
    ``steps = 1`` returns 0 and draws nothing.
    """
    if steps <= 1:
        return 0
    g = generator.generator if isinstance(generator, BatchRandom) else generator
    device = g.device if g is not None else "cpu"
    return int(torch.randint(int(steps), (1,), generator=g, device=device).item())


# --------------------------------------------------------------------------- the student


class Student(nn.Module):
    """A denoiser ``D(x, sigma, c) -> x0`` run at K descending noise levels ``sigmas``.

    ``sigmas[0]`` is the teacher's top level (the one-step student's ``sigma_init``). The
    levels and the training-input mode are plain attributes, not buffers: the state dict is
    the denoiser's alone (``denoiser.*``), and :attr:`config` records the rest.
    """

    def __init__(
        self, denoiser: nn.Module, sigmas: Sequence[float], inputs: str = "backward"
    ) -> None:
        super().__init__()
        if inputs not in STUDENT_INPUTS:
            raise ValueError(
                f"student inputs (--student-inputs) must be one of "
                f"{', '.join(STUDENT_INPUTS)}, got {inputs!r}"
            )
        self.denoiser = denoiser
        self.sigmas = tuple(validate_student_sigmas(sigmas))
        self.inputs = inputs

    # -- description
    @property
    def steps(self) -> int:
        """K: network evaluations per sample."""
        return len(self.sigmas)

    @property
    def sigma_init(self) -> float:
        """The first (highest) level, ``sigmas[0]``."""
        return self.sigmas[0]

    @property
    def needs_real_data(self) -> bool:
        """Whether :meth:`training_sample` needs ``x_real`` (forward inputs, K > 1)."""
        return self.inputs == "forward" and self.steps > 1

    @property
    def config(self) -> dict:
        """``{"steps", "sigmas", "inputs"}``: what a run or export records to rebuild it."""
        return {"steps": self.steps, "sigmas": list(self.sigmas), "inputs": self.inputs}

    @staticmethod
    def from_config(denoiser: nn.Module, config: Mapping) -> Student:
        """Rebuild from :attr:`config`, or from an old run's ``{"sigma_init": s}`` (K = 1)."""
        if config.get("sigmas") is not None:
            sigmas = validate_student_sigmas(config["sigmas"], config.get("steps"))
        elif config.get("sigma_init") is not None:
            sigmas = [float(config["sigma_init"])]
        else:
            raise ValueError("student config has neither 'sigmas' nor 'sigma_init'")
        return Student(denoiser, sigmas, config.get("inputs", "backward"))

    def extra_repr(self) -> str:
        return f"steps={self.steps}, sigmas=({_fmt(self.sigmas)}), inputs={self.inputs}"

    # -- one step
    def step(self, x: Tensor, k: int, cond: Tensor | None = None) -> Tensor:
        """``D(x, sigmas[k], cond)``: one network evaluation at level ``k``."""
        return self.denoiser(x, self.sigmas[k], cond)

    # -- inference
    def sample(
        self, z: Tensor, cond: Tensor | None = None, noise: NoiseSource | None = None
    ) -> Tensor:
        """K-step sample from unit-normal ``z``: exactly K network calls.

        Re-noising draws come from ``noise``, one fresh draw per step after the first. With a
        :class:`~fdistill.samplers.SeededGenerator` (continue the one that drew ``z``) sample
        ``i`` depends only on its seed, not on the batch. K = 1 needs no ``noise`` and is
        ``D(sigmas[0] * z, sigmas[0], cond)``; K > 1 without one is a ``ValueError`` (silently
        drawing from the global RNG would make samples depend on the batch).
        """
        if self.steps > 1 and noise is None:
            _fresh_noise(None, z)  # raises the one-line error
        s0 = self.sigmas[0]
        x0 = self.denoiser(z * s0, s0, cond)
        for k in range(1, self.steps):
            x0 = self.step(x0 + self.sigmas[k] * _fresh_noise(noise, x0), k, cond)
        return x0

    # -- training
    def training_sample(
        self,
        z: Tensor,
        cond: Tensor | None = None,
        generator: rng.RandomSource = None,
        *,
        x_real: Tensor | None = None,
        step: int | None = None,
    ) -> StudentDraw:
        """One training draw: ``k`` = :func:`draw_step` (or ``step``), the input at
        ``sigmas[k]`` (backward simulation or noised ``x_real``), one step with gradients.

        Random numbers, in order: the step index (only when K > 1 and ``step`` is None), then
        one ``rng.randn`` of ``z``'s shape per re-noising (backward: ``k`` of them; forward:
        one when ``k >= 1``). Under :class:`BatchRandom` every draw is the global batch's, so
        ``k`` and each rank's rows equal those of one process. In forward mode ``cond`` must be
        ``x_real``'s conditioning. K = 1 draws nothing and is ``D(sigmas[0] * z, sigmas[0], c)``.
        """
        if self.needs_real_data and x_real is None:
            raise ValueError("forward student inputs need the real batch: pass x_real")
        if x_real is not None and x_real.shape != z.shape:
            raise ValueError(f"x_real of shape {tuple(x_real.shape)} for z {tuple(z.shape)}")
        k = draw_step(self.steps, generator) if step is None else int(step)
        if not 0 <= k < self.steps:
            raise ValueError(f"student step {k} is not in [0, {self.steps})")
        s0 = self.sigmas[0]
        if k == 0:
            return StudentDraw(self.denoiser(z * s0, s0, cond), 0, s0)

        def renoise(x0: Tensor, j: int) -> Tensor:
            eps = rng.randn(x0.shape, generator, dtype=x0.dtype, device=x0.device)
            return x0 + self.sigmas[j] * eps

        with torch.no_grad():
            if self.inputs == "forward":
                x = renoise(x_real, k)
            else:
                x0 = self.denoiser(z * s0, s0, cond)
                for j in range(1, k):
                    x0 = self.step(renoise(x0, j), j, cond)
                x = renoise(x0, k)
        return StudentDraw(self.step(x.detach(), k, cond), k, self.sigmas[k])

    def forward(
        self,
        z: Tensor,
        cond: Tensor | None = None,
        noise: NoiseSource | rng.RandomSource = None,
        *,
        train: bool = False,
        x_real: Tensor | None = None,
        step: int | None = None,
    ) -> Tensor | StudentDraw:
        """``train=False``: :meth:`sample` (a Tensor). ``train=True``: :meth:`training_sample`
        with ``noise`` as its random source (a :class:`StudentDraw`).

        Both go through ``forward`` so a DDP/FSDP-wrapped student works: call the wrapper,
        ``G(z, c, gen, train=True)``, never ``G.module.training_sample``.
        """
        if train:
            return self.training_sample(z, cond, noise, x_real=x_real, step=step)
        if x_real is not None or step is not None:
            raise ValueError("x_real and step are training options: pass train=True")
        return self.sample(z, cond, noise)


class OneStepGenerator(Student):
    """``G(z, c) = D(sigma_init * z, sigma_init, c)``: a denoiser applied once to pure noise.

    The K = 1 :class:`Student`, with its historical signature. Initialising ``D`` from the
    teacher makes the student start as the teacher's one-step (Euler) sampler, the usual
    starting point of distribution-matching distillation.
    """

    def __init__(self, denoiser: nn.Module, sigma_init: float = 80.0):
        super().__init__(denoiser, [float(sigma_init)])


__all__ = [
    "STUDENT_INPUTS",
    "NoiseSource",
    "OneStepGenerator",
    "Student",
    "StudentDraw",
    "default_student_sigmas",
    "default_student_timesteps",
    "draw_step",
    "validate_student_sigmas",
]
