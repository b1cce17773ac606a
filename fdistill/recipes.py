"""Recipes: teacher -> conditioning + codec -> data -> method -> engine.

* :func:`train_teacher_run` — EDM denoising score matching on an image data set
  (:class:`fdistill.methods.Denoising`).
* :func:`distill_run` — f-distill from any teacher :func:`fdistill.teachers.load_teacher` reads,
  class-conditional, unconditional or text-to-image alike: the teacher's conditioning
  (:mod:`fdistill.conditioning`) and real-data source (:mod:`fdistill.sources`) are values, and
  the same method (:func:`build_distill`) runs on the same engine (:func:`fdistill.engine.train`).

Every option is validated before any work starts, and ``--resume`` is strict: every option that
changes what is trained must equal the saved run's (:func:`fdistill.runs.begin`). Every random
draw during training comes from :func:`fdistill.engine.make_batch_randoms`: rank ``r`` of ``N``
processes draws exactly its slice of what one process would draw.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from fdistill import runs
from fdistill.conditioning import Codec, Conditioning, Labels, codec_of, of_teacher, student_inputs
from fdistill.config import (
    DistillConfig,
    T2IConfig,
    TeacherConfig,
    default_model,
    grid_size,
    validate_distill_config,
    validate_t2i_config,
    validate_teacher_config,
    with_resumable,
)
from fdistill.critic import MultiScaleHead
from fdistill.data.captions import read_prompts
from fdistill.denoisers import EDMLoss
from fdistill.denoisers.base import FeatureTaps
from fdistill.denoisers.registry import build_denoiser, copy_denoiser, inference_config
from fdistill.divergences import get_divergence
from fdistill.engine import distributed, make_batch_randoms, train
from fdistill.generator import (
    OneStepGenerator,
    Student,
    default_student_sigmas,
    validate_student_sigmas,
)
from fdistill.methods import Denoising, FDistill, Inputs
from fdistill.methods.fdistill import ConstantLogit, DistributionMatchingOnly, resolved_levels
from fdistill.options import legacy_values, resumable_paths
from fdistill.samplers import sample_with_nfe
from fdistill.sampling import grid_writer
from fdistill.sources import RealSource, image_sampler, image_source, load_data, text_source
from fdistill.teachers import load_teacher


@dataclass
class RunResult:
    """What a training run returns: where it went, how long it took, the trained modules."""

    out: Path
    steps: int
    seconds: float
    model: nn.Module  # the teacher denoiser, or the FDistill method (generator, critic, ...)
    ema: nn.Module  # the EMA teacher, or the EMA generator


# --------------------------------------------------------------------------- teacher
def train_teacher_run(
    cfg: TeacherConfig, out: str | Path, resume: bool = False, start_fresh: bool = False
) -> RunResult:
    """Train an EDM teacher on ``cfg.data``; checkpoint, config, metrics and grids go to ``out``.

    ``resume`` continues the run in ``out`` (strict: the options must match the saved ones,
    except those whose metadata says ``resumable``); ``start_fresh`` lets a resume
    start a new run where none is saved.
    """
    out = Path(out)
    with distributed(cfg.device) as ddp, contextlib.ExitStack() as hold:
        validate_teacher_config(cfg, ddp.world)
        ds = load_data(
            cfg.data,
            cfg.resolution,
            cfg.max_images,
            cfg.value_range,
            None if cfg.conditional else 0,
        )
        num_classes = ds.num_classes if cfg.conditional else 0
        shape = (ds.channels, ds.resolution, ds.resolution)
        model_cfg = default_model(cfg.arch, shape, num_classes, **cfg.model)
        digest = runs.tensor_digest(ds.storage, ds.labels)
        options = runs.resume_options(asdict(cfg), data=digest)
        hold.enter_context(runs.claim(out, ddp.main))
        options = runs.begin(
            out, resume, start_fresh, options, ddp.main, resumable_paths(TeacherConfig)
        )
        cfg = with_resumable(cfg, options)
        sampler = {"sigma_min": cfg.sigma_min, "sigma_max": cfg.sigma_max, "rho": cfg.rho}
        run_config = {
            "model": model_cfg,
            "shape": list(shape),
            "num_classes": num_classes,
            "sampler": sampler,
            "data": {"spec": str(cfg.data), "name": ds.name, "size": len(ds)},
            "options": asdict(cfg),
            "resume_options": options,
        }
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        net = build_denoiser(model_cfg).to(ddp.device)
        torch.manual_seed(cfg.train.seed * 1_000_003 + ddp.rank)  # dropout masks per rank

        def render(m: nn.Module):
            return lambda z, c: sample_with_nfe(
                m, z, cfg.grid_nfe, c, sampler["sigma_min"], sampler["sigma_max"], sampler["rho"]
            )

        conditioning = Labels(num_classes) if num_classes else Conditioning()
        grids = grid_writer(
            out, cfg.grid_every, cfg.train.steps, ddp, shape, conditioning, Codec(), grid_size(cfg),
            render,
        )  # fmt: skip
        t0 = time.perf_counter()
        method = Denoising(net, EDMLoss(cfg.p_mean, cfg.p_std, model_cfg["sigma_data"]))
        ema = train(
            method,
            Inputs(real=image_sampler(ds, ddp.device, num_classes > 0)),
            cfg.train,
            out,
            config=run_config,
            ddp=ddp,
            resume=resume,
            gens=make_batch_randoms(cfg.train.seed, ddp),
            on_step=grids,
        )
        return RunResult(out, cfg.train.steps, time.perf_counter() - t0, net, ema.module)


# --------------------------------------------------------------------------- distillation
def feature_net(model: nn.Module) -> FeatureTaps:
    """``model`` as a network with discriminator feature taps, or one line saying it has none."""
    if not isinstance(model, FeatureTaps):
        name = type(model).__name__
        raise ValueError(f"the teacher's network ({name}) offers no discriminator features")
    return model


def r1_attention_processor():
    """An attention processor whose passes with gradients use PyTorch's math attention, the
    only kernel with a double backward (R1 differentiates the discriminator's gradient);
    passes without gradients keep the fused kernels."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class MathWhenGrad(AttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            if torch.is_grad_enabled():
                with sdpa_kernel(SDPBackend.MATH):
                    return super().__call__(*args, **kwargs)
            return super().__call__(*args, **kwargs)

    return MathWhenGrad()


def student_sigmas(cfg: DistillConfig, teacher: nn.Module) -> list[float]:
    """The student's noise levels: ``cfg.student_sigmas`` or the teacher's defaults
    (:func:`fdistill.generator.default_student_sigmas`; one step: the teacher's top sigma),
    checked against the teacher's range."""
    info, k = teacher.info, cfg.student_steps
    if cfg.student_sigmas is not None:
        sigmas = cfg.student_sigmas
    elif k == 1:
        sigmas = [info.sigma_max]
    else:
        sigmas = default_student_sigmas(k, teacher)
    return validate_student_sigmas(sigmas, k, info.sigma_min, info.sigma_max)


def build_student(cfg: DistillConfig, teacher: nn.Module) -> Student:
    """The student initialised from the teacher: one step (:class:`OneStepGenerator`, today's
    student bit for bit) or K steps at :func:`student_sigmas`."""
    sigmas = student_sigmas(cfg, teacher)
    if len(sigmas) == 1 and cfg.student_inputs == "backward":
        return OneStepGenerator(copy_denoiser(teacher), sigma_init=sigmas[0])
    return Student(copy_denoiser(teacher), sigmas, cfg.student_inputs)


def build_distill(cfg: DistillConfig, teacher: nn.Module, discriminator: bool = True) -> FDistill:
    """Frozen ``teacher`` (a loaded denoiser with ``.info``), student and fake score copied from
    it, and discriminator heads on the selected feature maps of the teacher or fake score.

    Without a ``discriminator`` (no real data) the distribution-matching loss alone
    (:class:`DistributionMatchingOnly`). For a Stable Diffusion teacher with the exact R1, the
    feature network's attention runs PyTorch's math kernel when gradients are on (the fused
    kernels have no double backward); ``cfg.grad_checkpointing`` (text-to-image) turns on
    diffusers' activation checkpointing in all three UNets.
    """
    info = teacher.info
    fake = copy_denoiser(teacher)
    for net in (teacher, fake):
        try:
            feature_net(net).set_feature_taps(cfg.disc_taps)
        except ValueError as e:
            raise ValueError(f"--disc-taps {','.join(cfg.disc_taps or [])}: {e}") from None
    source = teacher if cfg.loss.disc_features == "teacher" else fake
    maps = feature_net(source).selected_feature_maps()
    loss_cfg = replace(
        cfg.loss, sigma_data=info.sigma_data, sigma_min=info.sigma_min, sigma_max=info.sigma_max
    )
    params = {"alpha": cfg.alpha} if cfg.alpha is not None else {}
    parts = dict(
        teacher=teacher,
        generator=build_student(cfg, teacher),
        fake_score=fake,
        head=MultiScaleHead(maps, hidden=cfg.head_hidden),
        divergence=get_divergence(cfg.divergence, **params),
        cfg=loss_cfg,
    )
    parts["schedule"] = info.schedule  # a discrete-time teacher's: its noise levels and bins
    if not discriminator:
        model = DistributionMatchingOnly(**(parts | {"head": ConstantLogit()}))
    else:
        model = FDistill(**parts)
    text = isinstance(cfg, T2IConfig)
    exact_r1 = cfg.loss.r1_gamma > 0 and cfg.loss.r1 == "exact"  # a double backward
    if discriminator and exact_r1 and text:
        source.unet.set_attn_processor(r1_attention_processor())
    if text and cfg.grad_checkpointing:
        for net in (model.generator.denoiser, model.fake_score, model.teacher):
            net.unet.enable_gradient_checkpointing()
    return model


def _source(cfg: DistillConfig, teacher: nn.Module, prompts, device) -> RealSource:
    if isinstance(cfg, T2IConfig):
        return text_source(cfg, teacher, prompts, device)
    return image_source(cfg, teacher)


def distill_run(
    cfg: DistillConfig, out: str | Path, resume: bool = False, start_fresh: bool = False
) -> RunResult:
    """Distil the teacher ``cfg.teacher`` (any format :func:`load_teacher` reads) into a
    one-step student; writes a run to ``out``. A :class:`T2IConfig` (prompts, captioned data)
    distils a text-to-image pipeline the same way. ``resume`` is strict (see
    :func:`train_teacher_run`)."""
    out = Path(out)
    text = isinstance(cfg, T2IConfig)
    with distributed(cfg.device) as ddp, contextlib.ExitStack() as hold:
        (validate_t2i_config if text else validate_distill_config)(cfg, ddp.world)
        prompts = read_prompts(cfg.prompts) if text else None
        teacher = load_teacher(cfg.teacher, **({} if cfg.teacher_ema else {"ema": False}))
        conditioning = of_teacher(teacher, prompts)
        if cfg.loss.guidance != 1.0 and conditioning.kind == "none":
            raise ValueError("--guidance needs a class-conditional or text-conditioned teacher")
        # "auto" noise levels and ratio bins follow the teacher (recorded resolved, so a
        # resume compares what was trained)
        levels, binning = resolved_levels(cfg.loss, teacher.info.schedule is not None)
        cfg = replace(cfg, loss=replace(cfg.loss, noise_levels=levels, ratio_binning=binning))
        source = _source(cfg, teacher, prompts, ddp.device)
        if not source.discriminator:
            cfg = replace(cfg, loss=replace(cfg.loss, gan_weight=0.0, r1_gamma=0.0))
        options = runs.resume_options(asdict(cfg), **source.digests)
        hold.enter_context(runs.claim(out, ddp.main))
        options = runs.begin(
            out,
            resume,
            start_fresh,
            options,
            ddp.main,
            resumable_paths(type(cfg)),
            legacy_values(type(cfg)),
        )
        cfg = with_resumable(cfg, options)
        if ddp.main:
            for note in source.notes:
                print(f"note: {note}")
            if (
                cfg.loss.guidance != 1.0
                and conditioning.kind == "labels"
                and not teacher.config.get("label_dropout", 1)
            ):
                print(
                    "note: the teacher was trained without label dropout; its unconditional "
                    "prediction (used by --guidance) is untrained"
                )
        real = source.open(cfg, ddp)
        torch.manual_seed(cfg.train.seed)  # identical head initialisation on every rank
        model = build_distill(cfg, teacher, source.discriminator).to(ddp.device)
        torch.manual_seed(cfg.train.seed * 1_000_003 + ddp.rank)
        features = model.teacher if cfg.loss.disc_features == "teacher" else model.fake_score
        run_config = {
            "model": inference_config(teacher.config),
            "shape": list(source.shape),
            "num_classes": teacher.info.num_classes if conditioning.kind == "labels" else 0,
            "sigma_init": model.generator.sigma_init,
            "student": model.generator.config,
            "teacher": source.teacher,
            "data": source.data,
            **source.extra,
            "disc_taps": list(features.feature_taps) if source.discriminator else [],
            "options": asdict(cfg),
            "resume_options": options,
        }
        grids = grid_writer(
            out, cfg.grid_every, cfg.train.steps, ddp, source.shape, conditioning,
            codec_of(teacher), grid_size(cfg), lambda m: m,
        )  # fmt: skip
        t0 = time.perf_counter()
        ema = train(
            model,
            Inputs(real=real, latents=student_inputs(source.shape, conditioning, ddp.device)),
            cfg.train,
            out,
            config=run_config,
            ddp=ddp,
            resume=resume,
            on_step=grids,
            gens=make_batch_randoms(cfg.train.seed, ddp),
        )
        return RunResult(out, cfg.train.steps, time.perf_counter() - t0, model, ema.module)
