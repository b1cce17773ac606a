"""EDM preconditioning (EDM, VP, VE), training loss and noise-level grid (Karras et al. 2022)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fdistill import rng
from fdistill.denoisers.base import (
    DelegateFeatures,
    Features,
    after_taps,
    sigma_batch,
    sigma_view,
)


class EDMPrecond(DelegateFeatures, nn.Module):
    """Wrap a raw network ``net(x_in, c_noise, cond, return_features)`` into a denoiser.

    ``D(x, sigma) = c_skip * x + c_out * F(c_in * x, c_noise)`` with EDM's coefficients, so
    the network sees unit-variance inputs and targets at every noise level. With
    ``return_features=True`` the network's encoder features come back too, so a
    discriminator head can reuse the forward pass that produced ``x0``; with
    ``return_features="only"`` just the features, without running the decoder. Feature taps
    (:class:`~fdistill.denoisers.base.FeatureTaps`) are those of ``net``.

    Other parametrisations (:class:`VPPrecond`, :class:`VEPrecond`) override only
    :meth:`coefficients`, so every preconditioning shares one forward pass.
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

    def extra_repr(self) -> str:
        return f"sigma_data={self.sigma_data}"

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
        with after_taps(return_features):
            x0 = (c_skip * x + c_out * f.to(torch.float32)).to(x.dtype)
        return (x0, feats) if return_features else x0


class VPPrecond(EDMPrecond):
    """Variance-preserving preconditioning (Song et al. 2021, as in EDM's Table 1).

    ``c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) t(sigma)``,
    where ``t(sigma)`` inverts the VP schedule
    ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``: the network sees the DDPM
    timestep it was trained with. ``sigma_data`` is not used by the coefficients; it is kept
    for losses and descriptions that ask for it.
    """

    def __init__(
        self,
        net: nn.Module,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        M: float = 1000,
        epsilon_t: float = 1e-5,
        sigma_data: float = 0.5,
    ):
        super().__init__(net, sigma_data)
        self.beta_d, self.beta_min = float(beta_d), float(beta_min)
        self.M, self.epsilon_t = M, float(epsilon_t)

    def sigma(self, t: float | Tensor) -> Tensor:
        """The VP schedule's noise level at time ``t`` in [epsilon_t, 1]."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: float | Tensor) -> Tensor:
        """The time ``t`` with ``sigma(t) = sigma`` (the positive root of the quadratic)."""
        sigma = torch.as_tensor(sigma)
        disc = self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()
        return (disc.sqrt() - self.beta_min) / self.beta_d

    @property
    def sigma_min(self) -> float:
        """``sigma(epsilon_t)``, in float64 (EDM's float32 value, 0.00098, loses digits)."""
        return float(self.sigma(torch.tensor(self.epsilon_t, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(torch.tensor(1.0, dtype=torch.float64)))

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise

    def extra_repr(self) -> str:
        return (
            f"beta_d={self.beta_d}, beta_min={self.beta_min}, M={self.M}, "
            f"epsilon_t={self.epsilon_t}"
        )


class VEPrecond(EDMPrecond):
    """Variance-exploding preconditioning (Song et al. 2021, as in EDM's Table 1).

    ``c_skip = 1, c_out = sigma, c_in = 1, c_noise = log(sigma / 2)``. ``sigma_min`` and
    ``sigma_max`` describe the range it was trained on; ``sigma_data`` is not used by the
    coefficients.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_min: float = 0.02,
        sigma_max: float = 100.0,
        sigma_data: float = 0.5,
    ):
        super().__init__(net, sigma_data)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise

    def extra_repr(self) -> str:
        return f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"


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


__all__ = ["EDMLoss", "EDMPrecond", "VEPrecond", "VPPrecond", "karras_sigmas", "sigma_batch"]
