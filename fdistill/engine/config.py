"""The engine's settings: what every training loop shares, and the optimiser settings of the
two kinds of run (distillation, teacher training). One default per knob; presets
(:data:`fdistill.config.PRESETS`) are overlays."""

from __future__ import annotations

from dataclasses import dataclass

from fdistill.options import comma_list, option


@dataclass
class LoopConfig:
    """Settings every training loop shares: length, batch, optimiser, EMA, bookkeeping, speed.

    ``steps`` is the total, so a resumed run ends where the straight run would. ``batch`` is
    the global batch, split evenly over processes; ``batch_gpu`` (``None``: all of it) is the
    micro-batch a process runs at once, gradients accumulating over ``batch / (processes *
    batch_gpu)`` micro-batches per update (see :class:`fdistill.engine.MicroBatches` for what is
    exact). ``ema_warmup`` ramps the EMA decay up from 0 (see :meth:`fdistill.engine.EMA.update`).
    """

    steps: int = option(
        2000, help="TOTAL steps; a resumed run ends where a straight one does", resumable=True
    )
    batch: int = option(256, help="global batch, split over torchrun processes")
    batch_gpu: int | None = option(
        None,
        help="per-process micro-batch: gradients accumulate to the global --batch",
        resumable=True,
    )
    betas: tuple[float, float] = option(
        (0.9, 0.999),
        help="AdamW betas",
        parse=comma_list(float, 2, "two numbers B1,B2"),
        metavar="B1,B2",
    )
    grad_clip: float = option(10.0, help="gradient-norm clip (0: off)")
    ema_decay: float = option(0.999, help="EMA decay of the averaged network")
    ema_warmup: bool = option(False, help="ramp the EMA decay up from 0 (short runs)")
    seed: int = option(0, help="seed of every random stream")
    log_every: int = option(10, help="steps between metrics.jsonl records", resumable=True)
    ckpt_every: int = option(1000, help="steps between checkpoints", resumable=True)
    progress: bool = option(True, help="no progress bar", negate="--no-progress", resumable=True)
    bf16: bool = option(False, help="bfloat16 autocast of the networks")
    compile: bool = option(False, help="torch.compile the networks", resumable=True)
    compile_backend: str = option(
        "inductor", help="torch.compile backend (aot_eager or eager to debug)", resumable=True
    )
    fsdp: bool = option(False, help="shard the trained networks with FSDP2 under torchrun")


@dataclass
class TrainConfig(LoopConfig):
    """Distillation: ``critic_ratio`` critic updates per generator update, two AdamW (paper
    Table 5, CIFAR-10: ratio 5, learning rate 1e-4, weight decay 1e-2)."""

    critic_ratio: int = option(5, help="critic updates per generator update")
    lr_gen: float = option(1e-4, help="generator learning rate")
    lr_critic: float = option(1e-4, help="fake score and discriminator learning rate")
    weight_decay: float = option(1e-2, help="AdamW weight decay")


@dataclass
class TeacherTrainConfig(LoopConfig):
    """Teacher (EDM) training: one optimiser; ``lr_warmup`` steps of linear learning-rate ramp;
    no weight decay (EDM's Adam)."""

    lr: float = option(1e-3, help="learning rate")
    lr_warmup: int = option(0, help="steps of linear learning-rate warm-up")
    weight_decay: float = option(0.0, help="AdamW weight decay")
