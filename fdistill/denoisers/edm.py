"""EDM preconditioning, training loss and noise-level grid (Karras et al. 2022)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fdistill import rng
from fdistill.denoisers.base import Features, sigma_batch, sigma_view


class EDMPrecond(nn.Module):
    """Wrap a raw network ``net(x_in, c_noise, cond, return_features)`` into a denoiser.

    ``D(x, sigma) = c_skip * x + c_out * F(c_in * x, c_noise)`` with EDM's coefficients, so
    the network sees unit-variance inputs and targets at every noise level. With
    ``return_features=True`` the network's encoder features come back too, so a
    discriminator head can reuse the forward pass that produced ``x0``; with
    ``return_features="only"`` just the features, without running the decoder.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` for a tensor of noise levels."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(
        self,
        x: Tensor,
        sigma: float | Tensor,
        cond: Tensor | None = None,
        return_features: Features = False,
    ):
        s = sigma_view(sigma, x).to(torch.float32)
        c_skip, c_out, c_in, c_noise = self.coefficients(s)
        out = self.net(
            (c_in * x).to(x.dtype),
            c_noise.reshape(-1),
            cond,
            return_features=return_features,
        )
        if return_features == "only":
            return out
        f, feats = out if return_features else (out, None)
        x0 = (c_skip * x + c_out * f.to(torch.float32)).to(x.dtype)
        return (x0, feats) if return_features else x0


class EDMLoss:
    """Denoising score matching with EDM's log-normal noise levels and loss weighting.

    ``loss(denoiser, x0, cond)`` returns per-sample losses (mean over non-batch dims).
    ``generator`` is a ``torch.Generator`` or a :class:`fdistill.rng.BatchRandom`.
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def __call__(
        self,
        denoiser,
        x0: Tensor,
        cond: Tensor | None = None,
        generator: rng.RandomSource = None,
    ) -> Tensor:
        n = x0.shape[0]
        rnd = rng.randn((n,), generator, device=x0.device)
        sigma = (rnd * self.p_std + self.p_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        noise = rng.randn(x0.shape, generator, device=x0.device) * sigma_view(sigma, x0)
        d = denoiser(x0 + noise, sigma, cond)
        return weight * (d - x0).pow(2).reshape(n, -1).mean(1)


def karras_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """EDM's noise-level grid, descending from ``sigma_max`` to ``sigma_min`` (float64)."""
    if n < 2:
        raise ValueError(f"karras_sigmas needs n >= 2, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + i / (n - 1) * (b - a)) ** rho


__all__ = ["EDMLoss", "EDMPrecond", "karras_sigmas", "sigma_batch"]
