"""f-divergences and their f-distill weightings ``h(r) = r^2 f''(r)``.

``D_f(p || q) = E_q[f(p / q)]`` with ``f`` convex and ``f(1) = 0``. The f-distill gradient
weights the score difference of each sample by ``h(r)`` of its density ratio ``r = p / q``
(Xu, Nie & Vahdat 2025). Weightings are computed from ``logr = log r`` so that float32 stays
finite: the ratio itself is never formed where it could overflow.

Range: every built-in ``h`` is finite in float32 for ``logr`` in [-50, 50] except
``pearson`` (``2 r^2`` = ``2 exp(2 logr)``) and ``alpha`` with ``alpha > 1.77``
(``exp(alpha logr)``), whose true values exceed float32's range there. The training loss
never sees such values: it clamps the discriminator's log-ratio to ``[-logit_clip, logit_clip]``
(default 10) and the ratio to ``r_clip`` (default [0.1, 20]) before calling ``h``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Divergence:
    """An f-divergence: ``f(r)`` (on ratios) and its weighting ``h(logr) = r^2 f''(r)``."""

    name: str
    f: Callable[[Tensor], Tensor]
    h: Callable[[Tensor], Tensor]
    params: dict = field(default_factory=dict)

    @classmethod
    def from_f(cls, f: Callable[[Tensor], Tensor], name: str = "custom") -> Divergence:
        """Build a divergence from a user ``f`` (a torch function of ``r``).

        ``h`` comes from double autograd of ``f`` in float64. Checked on ``r`` in [1e-3, 1e3]:
        ``f(1) = 0``, ``f`` convex, and ``f''`` not zero everywhere (an affine ``f`` has
        ``h = 0``: every sample would get zero weight and training would silently not move);
        violations raise ``ValueError``.
        """
        _check_generator(f, name)

        def h(logr: Tensor) -> Tensor:
            r = logr.detach().to(torch.float64).exp()
            return (r**2 * _second_derivative(f, r)).to(logr.dtype)

        return cls(name=name, f=f, h=h)


def _second_derivative(f: Callable[[Tensor], Tensor], r: Tensor) -> Tensor:
    """``f''(r)`` by double autograd; exactly 0 where ``f`` (or ``f'``) does not depend on ``r``."""
    with torch.enable_grad():
        r = r.detach().requires_grad_(True)
        y = f(r)
        if not y.requires_grad:  # f ignores r: a constant
            return torch.zeros_like(r)
        (d1,) = torch.autograd.grad(
            y.sum(), r, create_graph=True, allow_unused=True, materialize_grads=True
        )
        if not d1.requires_grad:  # f' ignores r: f is affine
            return torch.zeros_like(r)
        (d2,) = torch.autograd.grad(d1.sum(), r, allow_unused=True, materialize_grads=True)
    return d2


def _check_generator(f: Callable[[Tensor], Tensor], name: str) -> None:
    one = torch.ones(1, dtype=torch.float64)
    y = f(one)
    if not isinstance(y, Tensor) or y.shape != one.shape:
        raise ValueError(
            f"f-divergence '{name}': f must map a tensor r to a tensor of the same shape "
            f"(elementwise), got {type(y).__name__} {tuple(getattr(y, 'shape', ()))}"
        )
    f1 = float(y)
    if not math.isfinite(f1) or abs(f1) > 1e-8:
        raise ValueError(f"f-divergence '{name}': f(1) must be 0, got {f1:.3g}")
    grid = torch.logspace(-3, 3, 121, dtype=torch.float64)
    d2 = _second_derivative(f, grid)
    if not torch.isfinite(d2).all():
        raise ValueError(f"f-divergence '{name}': f'' is not finite on r in [1e-3, 1e3]")
    if (grid**2 * d2).abs().max() <= _ZERO_H:
        raise ValueError(
            f"f-divergence '{name}': f''(r) is 0 for every r checked in [1e-3, 1e3] (f is "
            "affine or piecewise linear), so h = r^2 f''(r) = 0 and training would get no "
            "gradient; pass a strictly convex f such as r * log(r)"
        )
    bad = d2 < -1e-9 * d2.abs().max().clamp_min(1.0)
    if bad.any():
        r_bad = float(grid[bad][0])
        raise ValueError(f"f-divergence '{name}': f must be convex, but f''({r_bad:.3g}) < 0")


# Largest |h| on the check grid still read as "no curvature" (float64 round-off of affine f).
_ZERO_H = 1e-12

_LOG2 = math.log(2.0)


def _xlogx(r: Tensor) -> Tensor:
    return torch.special.xlogy(r, r)


_BUILTIN: dict[str, tuple[Callable, Callable, str]] = {
    "rkl": (lambda r: -torch.log(r), lambda lr: torch.ones_like(lr), "reverse KL (DMD)"),
    "srkl": (
        lambda r: (r + 1) * torch.log(0.5 + 0.5 / r),
        lambda lr: torch.sigmoid(-lr),
        "softened reverse KL",
    ),
    "js": (
        lambda r: _xlogx(r) - (r + 1) * torch.log((r + 1) / 2),
        torch.sigmoid,
        "Jensen-Shannon",
    ),
    "hellinger": (
        lambda r: 1 - torch.sqrt(r),
        lambda lr: 0.25 * torch.exp(0.5 * lr),
        "squared Hellinger",
    ),
    "fkl": (_xlogx, torch.exp, "forward KL"),
    "jeffreys": (
        lambda r: (r - 1) * torch.log(r),
        lambda lr: torch.exp(lr) + 1,
        "Jeffreys",
    ),
    "pearson": (lambda r: (r - 1) ** 2, lambda lr: torch.exp(2 * lr + _LOG2), "Pearson chi^2"),
    "neyman": (lambda r: (1 - r) ** 2 / r, lambda lr: torch.exp(_LOG2 - lr), "Neyman chi^2"),
}

NAMES: tuple[str, ...] = (*_BUILTIN, "alpha")


def get_divergence(name: str, **params: float) -> Divergence:
    """Return the built-in divergence ``name`` (one of :data:`NAMES`).

    ``alpha`` takes ``alpha=`` (any real except 0 and 1): ``f = (r^a - a r - (1-a)) / (a(a-1))``,
    ``h = r^a``.
    """
    key = name.lower().strip()
    if key == "alpha":
        if set(params) != {"alpha"}:
            raise ValueError("divergence 'alpha' takes exactly one parameter: alpha=<float>")
        a = float(params["alpha"])
        if not math.isfinite(a) or a in (0.0, 1.0):
            raise ValueError(f"alpha must be finite and not 0 or 1 (those are the KLs), got {a}")

        def f_alpha(r: Tensor) -> Tensor:
            return (r**a - a * r - (1 - a)) / (a * (a - 1))

        return Divergence("alpha", f_alpha, lambda lr: torch.exp(a * lr), {"alpha": a})
    if key not in _BUILTIN:
        raise ValueError(f"unknown divergence '{name}'; valid names: {', '.join(NAMES)}")
    if params:
        raise ValueError(f"divergence '{key}' takes no parameters, got {sorted(params)}")
    f, h, _ = _BUILTIN[key]
    return Divergence(key, f, h)


def describe() -> dict[str, str]:
    """Short human-readable description of each built-in name (for CLI help)."""
    return {k: v[2] for k, v in _BUILTIN.items()} | {"alpha": "alpha-divergence (alpha=...)"}
