"""The image pipeline by its earlier module name: every name now lives in the layer that owns it.

Recipes (:mod:`fdistill.recipes`), configurations (:mod:`fdistill.config`), real-data sources
(:mod:`fdistill.sources`), sampling (:mod:`fdistill.sampling`) and loaded networks
(:mod:`fdistill.models`); this module re-exports them so code written against it keeps working.
"""

from fdistill.conditioning import Conditioning, Labels, Sampler, student_inputs
from fdistill.config import (
    ARCHS,
    PRESETS,
    SAMPLER_RHO,
    DistillConfig,
    TeacherConfig,
    apply_preset,
    default_model,
    validate_distill_config,
    validate_loop,
    validate_teacher_config,
)
from fdistill.models import LoadedRun, describe, export_run, load_run
from fdistill.recipes import RunResult, build_distill, distill_run, train_teacher_run
from fdistill.runs import state_digest
from fdistill.sampling import (
    generate,
    grid_labels,
    run_sampler,
    sample_run,
    sample_seeds,
    seeded_labels,
)
from fdistill.sources import check_teacher_data, distill_data, image_sampler


def latent_sampler(shape: tuple[int, ...], num_classes: int, device) -> Sampler:
    """``sample(n, gen)``: unit-normal latents and uniform class labels (None if unconditional);
    :func:`fdistill.conditioning.student_inputs` of the labels."""
    return student_inputs(shape, Labels(num_classes) if num_classes else Conditioning(), device)


__all__ = [
    "ARCHS",
    "PRESETS",
    "SAMPLER_RHO",
    "DistillConfig",
    "LoadedRun",
    "RunResult",
    "TeacherConfig",
    "apply_preset",
    "build_distill",
    "check_teacher_data",
    "default_model",
    "describe",
    "distill_data",
    "distill_run",
    "export_run",
    "generate",
    "grid_labels",
    "image_sampler",
    "latent_sampler",
    "load_run",
    "run_sampler",
    "sample_run",
    "sample_seeds",
    "seeded_labels",
    "state_digest",
    "train_teacher_run",
    "validate_distill_config",
    "validate_loop",
    "validate_teacher_config",
]
