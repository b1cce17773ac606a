"""Training methods as data (:class:`Method`): f-distill, DMD2, teacher training."""

from fdistill.methods.base import Inputs, Method, Optimizer, Phase, Plan
from fdistill.methods.denoising import Denoising
from fdistill.methods.dmd2 import dmd2
from fdistill.methods.fdistill import FDistill, LossConfig

__all__ = [
    "Denoising",
    "FDistill",
    "Inputs",
    "LossConfig",
    "Method",
    "Optimizer",
    "Phase",
    "Plan",
    "dmd2",
]
