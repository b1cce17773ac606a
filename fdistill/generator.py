"""The one-step student generator."""

from __future__ import annotations

from torch import Tensor, nn


class OneStepGenerator(nn.Module):
    """``G(z, c) = D(sigma_init * z, sigma_init, c)``: a denoiser applied once to pure noise.

    Initialising ``D`` from the teacher makes the student start as the teacher's one-step
    (Euler) sampler, the usual starting point of distribution-matching distillation.
    """

    def __init__(self, denoiser: nn.Module, sigma_init: float = 80.0):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_init = float(sigma_init)

    def forward(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.denoiser(z * self.sigma_init, self.sigma_init, cond)
