"""The engine: one training loop (:func:`train`) and what it runs on (processes, sharing,
precision, statistics, checkpoint state)."""

from fdistill.engine.config import LoopConfig, TeacherTrainConfig, TrainConfig
from fdistill.engine.loop import (
    MicroBatches,
    micro_batches,
    per_rank_batch,
    train,
)
from fdistill.engine.processes import (
    Dist,
    Generators,
    average_gradients,
    check_device,
    distributed,
    init_distributed,
    make_batch_randoms,
    make_generators,
)
from fdistill.engine.sharing import autocast, bf16_supported, compile_modules, compile_supported
from fdistill.engine.state import EMA, restore_run, rng_state, save_run, set_rng_state
from fdistill.engine.stats import (
    BINS,
    FiniteGuard,
    NonFiniteError,
    RunLog,
    apply_update,
    check_finite,
    grad_norm,
    host_stats,
    make_adamw,
    merge_stats,
    optimizer_step,
)

__all__ = [
    "BINS",
    "EMA",
    "Dist",
    "FiniteGuard",
    "Generators",
    "LoopConfig",
    "MicroBatches",
    "NonFiniteError",
    "RunLog",
    "TeacherTrainConfig",
    "TrainConfig",
    "apply_update",
    "autocast",
    "average_gradients",
    "bf16_supported",
    "check_device",
    "check_finite",
    "compile_modules",
    "compile_supported",
    "distributed",
    "grad_norm",
    "host_stats",
    "init_distributed",
    "make_adamw",
    "make_batch_randoms",
    "make_generators",
    "merge_stats",
    "micro_batches",
    "optimizer_step",
    "per_rank_batch",
    "restore_run",
    "rng_state",
    "save_run",
    "set_rng_state",
    "train",
]
