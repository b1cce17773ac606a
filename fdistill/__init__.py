"""fdistill: one-step diffusion distillation by f-divergence distribution matching."""

__version__ = "0.1.0"
