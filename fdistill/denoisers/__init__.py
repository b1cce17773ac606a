"""Denoisers: the common interface, EDM preconditioning and our own networks."""

from fdistill.denoisers.base import Denoiser, score_from_denoiser, sigma_batch, sigma_view
from fdistill.denoisers.edm import EDMLoss, EDMPrecond, VEPrecond, VPPrecond, karras_sigmas
from fdistill.denoisers.mlp import MLP
from fdistill.denoisers.unet import UNet

__all__ = [
    "MLP",
    "UNet",
    "Denoiser",
    "EDMLoss",
    "EDMPrecond",
    "VEPrecond",
    "VPPrecond",
    "karras_sigmas",
    "score_from_denoiser",
    "sigma_batch",
    "sigma_view",
]
