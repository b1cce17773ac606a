"""Denoisers: the common interface, EDM preconditioning and our own networks."""

from fdistill.denoisers.base import Denoiser, score_from_denoiser, sigma_batch, sigma_view
from fdistill.denoisers.edm import EDMLoss, EDMPrecond, karras_sigmas
from fdistill.denoisers.mlp import MLP

__all__ = [
    "MLP",
    "Denoiser",
    "EDMLoss",
    "EDMPrecond",
    "karras_sigmas",
    "score_from_denoiser",
    "sigma_batch",
    "sigma_view",
]
