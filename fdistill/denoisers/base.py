"""The one interface every network, adapter and exact teacher speaks.

A *denoiser* is any callable ``denoiser(x, sigma, cond=None) -> x0_hat`` in the EDM
convention ``x = x0 + sigma * eps``: it returns its estimate of ``E[x0 | x]``.
``sigma`` is a Python float or a tensor that broadcasts to the batch (shape ``[]``,
``[N]`` or ``[N, 1, ...]``).

Networks that feed a discriminator head also take ``return_features``: ``False`` (just
``x0``), ``True`` (``(x0, feats)`` from the same forward pass) or ``"only"`` (``feats``
alone: the network stops where the features are taken and skips its decoder).
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: float | Tensor, cond: Tensor | None = None) -> Tensor: ...


Features = bool | Literal["only"]


def sigma_batch(sigma: float | Tensor, x: Tensor) -> Tensor:
    """Return ``sigma`` as a float tensor of shape ``[N]`` for the batch ``x`` of size N."""
    n = x.shape[0]
    s = torch.as_tensor(sigma, dtype=x.dtype if x.is_floating_point() else torch.float32)
    s = s.to(x.device)
    if s.ndim == 0:
        return s.expand(n)
    if s.shape[0] not in (1, n) or any(d != 1 for d in s.shape[1:]):
        raise ValueError(
            f"sigma of shape {tuple(s.shape)} does not broadcast to a batch of {n}: "
            "pass a float, a tensor of shape [N], or [N, 1, ...]"
        )
    return s.reshape(-1).expand(n)


def sigma_view(sigma: float | Tensor, x: Tensor) -> Tensor:
    """Return ``sigma`` shaped ``[N, 1, ..., 1]`` so it broadcasts against ``x``."""
    return sigma_batch(sigma, x).reshape(-1, *([1] * (x.ndim - 1)))


def score_from_denoiser(x: Tensor, x0: Tensor, sigma: float | Tensor) -> Tensor:
    """Tweedie: ``grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2``."""
    return (x0 - x) / sigma_view(sigma, x) ** 2
