"""Exact teachers: distributions whose noised scores and denoisers are known in closed form.

A :class:`GaussianMixture` is a denoiser (``teacher(x, sigma) -> E[x0 | x]``) with no
training error, so a distilled student can be compared with the very distribution it was
asked to match, and every score-based quantity in the library can be tested exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fdistill.denoisers.base import sigma_batch

_F64 = torch.float64


class GaussianMixture(torch.nn.Module):
    """A mixture of K full-covariance Gaussians in D dimensions, exact at every noise level.

    Noising with ``x = x0 + sigma * eps`` turns component ``k`` into
    ``N(mu_k, C_k + sigma^2 I)``. With the eigendecomposition ``C_k = U_k diag(lam_k) U_k^T``
    that covariance is ``U_k diag(lam_k + sigma^2) U_k^T``, so densities, scores and
    posterior means for a different sigma on every row cost ``O(N K D^2)`` with no
    factorisation per sigma. Everything is computed in float64 and returned in x's dtype.
    """

    means: Tensor
    covs: Tensor
    weights: Tensor

    def __init__(self, means: Tensor, covs: Tensor, weights: Tensor | None = None) -> None:
        """``means [K, D]``, ``covs [K, D, D]`` symmetric positive definite, ``weights [K]``
        positive (normalised here; uniform when omitted)."""
        super().__init__()
        means = torch.as_tensor(means).detach().to(_F64)
        covs = torch.as_tensor(covs).detach().to(_F64)
        if means.ndim != 2 or means.shape[0] == 0 or means.shape[1] == 0:
            raise ValueError(
                f"means must have shape [K, D] with K, D >= 1, got {tuple(means.shape)}"
            )
        k, d = means.shape
        if covs.shape != (k, d, d):
            raise ValueError(
                f"covs must have shape [K, D, D] = {(k, d, d)}, got {tuple(covs.shape)}"
            )
        if weights is None:
            weights = torch.ones(k, dtype=_F64)
        weights = torch.as_tensor(weights).detach().to(_F64)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape [K] = {(k,)}, got {tuple(weights.shape)}")
        for name, t in (("means", means), ("covs", covs), ("weights", weights)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} must be finite")
        if not (weights > 0).all():
            raise ValueError("weights must be strictly positive")
        scale = covs.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
        if not torch.allclose(covs / scale, covs.transpose(-2, -1) / scale, atol=1e-10, rtol=0):
            raise ValueError("covs must be symmetric")
        covs = 0.5 * (covs + covs.transpose(-2, -1))
        chol, info = torch.linalg.cholesky_ex(covs)
        eigvals, eigvecs = torch.linalg.eigh(covs)
        if (info != 0).any() or not (eigvals > 0).all():
            bad = sorted(
                set(torch.nonzero(info).flatten().tolist())
                | set(torch.nonzero((eigvals <= 0).any(-1)).flatten().tolist())
            )
            raise ValueError(f"covs must be positive definite; components {bad} are not")

        self.register_buffer("means", means)
        self.register_buffer("covs", covs)
        self.register_buffer("weights", weights / weights.sum())
        # Derived from the above; recomputed on construction, so kept out of the state dict.
        self.register_buffer("_chol", chol, persistent=False)
        self.register_buffer("_eigvals", eigvals, persistent=False)
        self.register_buffer("_eigvecs", eigvecs, persistent=False)

    @classmethod
    def isotropic(
        cls, means: Tensor, std: float | Tensor, weights: Tensor | None = None
    ) -> GaussianMixture:
        """Components ``N(mu_k, std_k^2 I)``; ``std`` is one float or one value per component."""
        means = torch.as_tensor(means, dtype=_F64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(means.shape)}")
        k, d = means.shape
        std = torch.as_tensor(std, dtype=_F64)
        if std.ndim == 0:
            std = std.expand(k)
        if std.shape != (k,):
            raise ValueError(
                f"std must be a float or have shape [K] = {(k,)}, got {tuple(std.shape)}"
            )
        covs = std.reshape(k, 1, 1) ** 2 * torch.eye(d, dtype=_F64)
        return cls(means, covs, weights)

    @classmethod
    def ring(
        cls,
        n_modes: int = 8,
        radius: float = 2.0,
        std: float = 0.1,
        weights: Tensor | None = None,
    ) -> GaussianMixture:
        """``n_modes`` isotropic 2-D modes equally spaced on a circle, the first at angle 0."""
        if n_modes < 1:
            raise ValueError(f"n_modes must be >= 1, got {n_modes}")
        angles = 2 * math.pi * torch.arange(n_modes, dtype=_F64) / n_modes
        means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
        return cls.isotropic(means, std, weights)

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        """Mixture mean ``sum_k w_k mu_k`` (float64)."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Mixture covariance ``sum_k w_k (C_k + mu_k mu_k^T) - m m^T`` (float64)."""
        m = self.mean()
        second = self.covs + self.means[:, :, None] * self.means[:, None, :]
        return torch.einsum("k,kde->de", self.weights, second) - torch.outer(m, m)

    def _prepare(self, x: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [N, {self.dim}], got {tuple(x.shape)}")
        x64 = x.to(_F64)
        return x64, sigma_batch(sigma, x64) ** 2

    def _components(self, x64: Tensor, s2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component terms: ``log w_k + log N(x; mu_k, C_k + s^2 I)`` [N, K], the
        coordinates ``y = U_k^T (x - mu_k)`` [N, K, D], and ``lam_k + s^2`` [N, K, D]."""
        means, lam, u = self.means.to(_F64), self._eigvals.to(_F64), self._eigvecs.to(_F64)
        y = torch.einsum("nkd,kde->nke", x64[:, None, :] - means[None], u)
        lam_s = lam[None] + s2[:, None, None]
        maha = (y * y / lam_s).sum(-1)
        logdet = torch.log(lam_s).sum(-1)
        log_norm = -0.5 * (maha + logdet + self.dim * math.log(2 * math.pi))
        return torch.log(self.weights.to(_F64)) + log_norm, y, lam_s

    @staticmethod
    def _out_dtype(x: Tensor) -> torch.dtype:
        return x.dtype if x.is_floating_point() else torch.get_default_dtype()

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """Exact ``log p_sigma(x)`` of the mixture convolved with ``N(0, sigma^2 I)``, shape [N]."""
        x64, s2 = self._prepare(x, sigma)
        logp, _, _ = self._components(x64, s2)
        return torch.logsumexp(logp, dim=1).to(self._out_dtype(x))

    def responsibilities(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """Posterior component probabilities ``P(k | x)`` under ``p_sigma``, shape [N, K]."""
        x64, s2 = self._prepare(x, sigma)
        logp, _, _ = self._components(x64, s2)
        return torch.softmax(logp, dim=1).to(self._out_dtype(x))

    def assign(self, x: Tensor) -> Tensor:
        """The most probable component of each clean sample (argmax responsibility at sigma 0)."""
        x64, s2 = self._prepare(x, 0.0)
        logp, _, _ = self._components(x64, s2)
        return logp.argmax(dim=1)

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Exact ``grad_x log p_sigma(x)`` in closed form, shape [N, D]."""
        x64, s2 = self._prepare(x, sigma)
        logp, y, lam_s = self._components(x64, s2)
        r = torch.softmax(logp, dim=1)
        # Component score is -(C_k + s^2 I)^{-1} (x - mu_k) = -U_k (y / (lam_k + s^2)).
        z = r[:, :, None] * y / lam_s
        return (-torch.einsum("nke,kde->nd", z, self._eigvecs.to(_F64))).to(self._out_dtype(x))

    def denoise(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Exact ``E[x0 | x0 + sigma * eps = x]``, shape [N, D]; returns x itself at sigma 0."""
        x64, s2 = self._prepare(x, sigma)
        logp, y, lam_s = self._components(x64, s2)
        r = torch.softmax(logp, dim=1)
        # Component posterior mean mu_k + C_k (C_k + s^2 I)^{-1} (x - mu_k), in eigen-coordinates.
        z = r[:, :, None] * (self._eigvals.to(_F64)[None] / lam_s) * y
        x0 = r @ self.means.to(_F64) + torch.einsum("nke,kde->nd", z, self._eigvecs.to(_F64))
        x0 = torch.where(s2[:, None] == 0, x64, x0)
        return x0.to(self._out_dtype(x))

    def forward(self, x: Tensor, sigma: float | Tensor, cond: Tensor | None = None) -> Tensor:
        """Denoiser interface: the exact posterior mean; ``cond`` is ignored."""
        return self.denoise(x, sigma)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        return_components: bool = False,
        dtype: torch.dtype | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Draw ``n`` samples ``[n, D]`` (default dtype unless ``dtype``), optionally with the
        index of the component each came from."""
        device = self.means.device
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=_F64, device=device)
        x = self.means[comp] + torch.einsum("nde,ne->nd", self._chol.to(_F64)[comp], eps)
        x = x.to(dtype or torch.get_default_dtype())
        return (x, comp) if return_components else x
