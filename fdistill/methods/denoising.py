"""Teacher training as a method: one phase, denoising score matching (the EDM loss)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from fdistill.denoisers.edm import EDMLoss
from fdistill.methods.base import Inputs, Method, Optimizer, Phase, Plan, Streams


class Denoising(Method):
    """Train ``net`` (a denoiser ``D(x, sigma, cond)``) with ``loss_fn(net, x0, cond,
    generator=...)`` (per-sample losses; default :class:`~fdistill.denoisers.EDMLoss`) on real
    batches; one AdamW with ``cfg.lr`` ramped over ``cfg.lr_warmup`` steps; EMA of the net."""

    kind = "teacher"
    trained = ("net",)

    def __init__(self, net: nn.Module, loss_fn: Callable[..., Tensor] | None = None):
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn or EDMLoss()

    def plan(self, cfg) -> Plan:
        return Plan(
            optimizers={"opt": Optimizer(("net",), cfg.lr, cfg.lr_warmup)},
            phases=(Phase("denoise", "opt", self.denoise_phase),),
            ema="net",
            compile=("net",),
        )

    def denoise_phase(self, inputs: Inputs, n: int, streams: Streams):
        """The mean denoising loss of ``n`` real samples, noise from ``streams["noise"]``."""
        x0, cond = inputs.real(n, streams["data"])
        loss = self.loss_fn(self.net, x0, cond, generator=streams["noise"]).mean()
        return loss, {"loss": loss.detach()}
