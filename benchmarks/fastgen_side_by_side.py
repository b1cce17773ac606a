"""NVIDIA FastGen's CIFAR-10 f-distill updates next to ours, on this CPU, in one process.

What it reproduces (FastGen at commit 34f30e8, Apache-2.0, imported at run time from
``--fastgen``, never copied): the experiment ``fastgen/configs/experiments/EDM/
config_f_distill_cifar10.py`` (``FdistillModel`` over ``DMD2Model``; EDM DDPM++ ``SongUNet``,
class-conditional, ``EDM_CIFAR10_Config``; ``Discriminator_EDM_CIFAR10_Config``: heads on the
teacher's 32x32, 16x16 and 8x8 encoder features, 256 channels wide; KL divergence; ratio
normalisation over 10 bins; GAN weight 1e-3; R1 off (``gan_r1_reg_weight = 0``); AdamW 1e-4;
``GradClipCallback(grad_norm=10, model_key="net")``), built with FastGen's own ``instantiate``
as ``train.py`` does, and for the teacher step ``config_sft_edm_cifar10.py`` (``SFTModel``:
the same network, dropout 0.13, log-normal noise levels, Adam 2e-5, the same clip callback).

Each timed FastGen update is one call of ``fastgen.trainer.Trainer.train_step`` (a real
``Trainer``; its loop, data loader and checkpointing are not run), i.e. ``model.autocast()``
(off: fp32), ``single_train_step`` (``_prepare_training_data``, ``_setup_grad_requirements``,
``_generate_noise_and_time`` and the phase's step), ``total_loss.backward()``, the callbacks'
``on_optimizer_step_begin`` (grad clip), ``optimizers_schedulers_step`` (optimisers + LR
schedulers) and ``optimizers_zero_grad``:

* teacher step: ``SFTModel.single_train_step`` (x0 denoising loss of the network itself);
* critic update: iteration 1 of ``FdistillModel`` (not a multiple of ``student_update_freq``
  5): ``_fake_score_discriminator_update_step``, AdamW of the fake score and of the
  discriminator;
* generator update: iteration 5: ``FdistillModel._student_update_step``, AdamW of the student.

Ours, in the same process and interleaved with them: ``benchmarks/real_size.py``'s
``PresetBench`` for the ``cifar10`` preset (teacher step = EDM loss + AdamW of the teacher
itself; critic and generator updates = :meth:`fdistill.engine.Engine.update` of the preset's
:class:`fdistill.methods.FDistill`, R1 off as the preset has it). Both sides start from the same
teacher weights: ours (EDM's init + N(0, 0.02^2), after the warm-up teacher step) are written
to a temporary ``.pth`` in FastGen's layout (``net.*`` -> ``model.*``; FastGen's extra
``model.logvar_linear`` keeps its init) and given to FastGen as ``pretrained_model_path``, so
its own loader copies them into teacher, student and fake score (and the SFT network); the
script checks every shared tensor is equal.

Bypassed, and why:

* ``train.py`` / ``fastgen.utils.scripts.setup`` (writes the config under FASTGEN_OUTPUT,
  sets up CUDA and distributed): the config is built by the experiment's ``create_config()``
  and changed in place: ``model.device = "cpu"``, ``pretrained_model_path`` (our weights),
  ``trainer.batch_size_global = None`` with ``grad_accum_rounds = 1`` (one micro-batch of
  ``--batch`` per update, as ours), ``use_ema = False`` (the EMA copies are only read by the
  EMA callbacks after the step; ours is also outside ``Engine.update``), callbacks reduced to
  ``grad_clip`` (wandb, GPU stats, profiler, parameter count and EMA callbacks need a GPU, a
  W&B run or act outside the update), and for SFT ``trainer.augment_pipe = None`` (EDM's
  augmentation runs in ``Trainer.preprocess_data``, data plumbing; our teacher step has none).
* The data loader (needs the CIFAR-10 zip): each update gets a batch as FastGen's
  ``ImageLoader`` gives it, passed through ``Trainer.preprocess_data``: ``real`` uniform in
  [-1, 1] of shape [B, 3, 32, 32], ``condition`` one-hot [B, 10] float, ``neg_condition`` zeros.
* ``torchvision``: FastGen's config package imports it at module level (wandb callback, data
  sets) but nothing on the timed path uses it, and it must not be installed here (its wheel
  pins another torch). Where it is missing, a meta-path stub provides empty ``torchvision``
  modules whose attributes are placeholder classes that raise when called.
* FastGen's log (loguru) goes to stderr at WARNING.

Environment (a clean venv, no system site-packages; the packages FastGen's import path for
this method needs, found by trying, at FastGen's pins where requirements.txt has them):

    python -m venv /tmp/fgvenv
    /tmp/fgvenv/bin/pip install torch==2.13.0    # the CPU build
    /tmp/fgvenv/bin/pip install "numpy<2.0.0" omegaconf attrs loguru wandb ftfy einops \
        imageio hydra-core pandas psutil webdataset boto3 av scipy "diffusers==0.35.1" \
        "transformers==4.49.0"
    /tmp/fgvenv/bin/pip install --no-deps timm   # its requirements would pull torchvision

Versions this gave (2026-12): torch 2.13.0+cpu, numpy 1.26.4, omegaconf 2.3.1, hydra-core
1.3.8, attrs 26.1.0, loguru 0.7.3, wandb 0.31.0, ftfy 6.3.1, einops 0.8.2, imageio 2.38.2,
pandas 3.0.6, psutil 7.2.2, webdataset 1.0.2, boto3 1.44.8, av 18.1.0, scipy 1.17.1,
diffusers 0.35.1, transformers 4.49.0, timm 1.0.31. Most are imported only because
``fastgen/configs`` imports every network, data set and callback module. fdistill needs
nothing more there: this script puts its checkout on ``sys.path`` when it is not installed.

    /tmp/fgvenv/bin/python benchmarks/fastgen_side_by_side.py --fastgen /tmp/fastgen --reps 3
    /tmp/fgvenv/bin/python benchmarks/fastgen_side_by_side.py --quick --reps 1   # smoke test

One torch thread, fp32, batch 2 by default. Rounds interleave the six updates (ours and
FastGen's teacher step, critic update, generator update) after one warm-up round; CPU time
(``time.process_time``) and wall time are medians over the rounds. Then the transient peak
memory of each update (what it allocates on top of the resident state, PyTorch profiler:
``step_cost.peak_bytes``), from a state without gradients; ``--no-mem`` skips it.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import platform
import resource
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if importlib.util.find_spec("fdistill") is None:  # not installed: the checkout this file is in
    sys.path.insert(1, str(HERE.parent))

from real_size import (  # noqa: E402
    PresetBench,
    num_params,
    teacher_config,
    timed_both,
    write_report,
)
from step_cost import peak_bytes, state_bytes  # noqa: E402

MIB = 2**20
SIDES = ("ours", "FastGen")
KINDS = ("teacher", "critic", "generator")
CLOCKS = {"cpu": "CPU time", "wall": "wall"}
PASSES = (("ours", "forward"), ("ours", "features"))
"""Our single passes (no gradients), timed in the same rounds to show an update's floor."""
QUICK_CHANNELS = 16  # --quick: model_channels (features 32 wide: channel_mult 2, 2, 2)


# --------------------------------------------------------------------------- FastGen import
class _StubClass(type):
    """A placeholder torchvision class: any attribute is another placeholder; calling raises."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubClass(name, (), {"__module__": cls.__module__})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision is a stub here: {cls.__module__}.{cls.__name__} called")


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubClass(name, (), {"__module__": self.__name__})


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``torchvision`` and its submodules as empty :class:`_StubModule` packages."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


def import_fastgen(path: Path, log_level: str = "WARNING") -> str:
    """Put the FastGen checkout at ``path`` on ``sys.path`` and import it; returns how
    torchvision was provided. FastGen's loguru log goes to stderr at ``log_level``."""
    if not (path / "fastgen" / "methods" / "distribution_matching" / "f_distill.py").is_file():
        raise SystemExit(f"--fastgen {path}: no fastgen/methods/distribution_matching/f_distill.py")
    sys.path.insert(0, str(path))
    tv = "installed"
    if importlib.util.find_spec("torchvision") is None:
        sys.meta_path.insert(0, _TorchvisionStub())
        tv = "stub"
    import fastgen.utils.logging_utils  # noqa: F401  (sets its own stdout handler on import)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=log_level)
    return tv


# --------------------------------------------------------------------------- FastGen side
def to_fastgen_state(teacher: nn.Module) -> dict[str, torch.Tensor]:
    """Our EDM teacher's state dict in FastGen's ``EDMPrecond`` layout (``net.*`` ->
    ``model.*``, as in EDM's own pickles)."""
    out = {}
    for k, v in teacher.state_dict().items():
        if not k.startswith("net."):
            raise ValueError(f"unexpected key {k!r} in our teacher's state dict")
        out["model." + k[len("net.") :]] = v.detach().clone()
    return out


def _cpu_config(cfg: Any, weights: Path, batch: int, quick: bool) -> Any:
    """FastGen config ``cfg`` changed in place for one CPU process (module docstring)."""
    from omegaconf import DictConfig

    m, tr = cfg.model, cfg.trainer
    m.device = "cpu"
    m.pretrained_model_path = str(weights)
    m.use_ema = False
    tr.batch_size_global, tr.grad_accum_rounds = None, 1
    tr.ddp = tr.fsdp = False
    tr.callbacks = DictConfig({"grad_clip": tr.callbacks["grad_clip"]})
    cfg.dataloader_train.batch_size = batch
    if m.precision != "float32" or m.precision_amp not in (None, m.precision):
        raise RuntimeError(f"FastGen config is not fp32: {m.precision}, amp {m.precision_amp}")
    if quick:
        m.net.model_channels = QUICK_CHANNELS
    return cfg


def _instantiate(cfg: Any) -> tuple[nn.Module, Any]:
    """Model and trainer as ``train.py`` and ``Trainer.run`` set them up (single process)."""
    from fastgen.trainer import Trainer
    from fastgen.utils import instantiate

    cfg.model_class.config = cfg.model
    model = instantiate(cfg.model_class)
    cfg.model_class.config = None
    trainer = Trainer(cfg)
    model.on_train_begin(is_fsdp=False)
    model.init_optimizers()
    return model, trainer


class FastGenBench:
    """FastGen's f-distill model and SFT model from its CIFAR-10 experiment configs, their
    trainers, and one call of ``Trainer.train_step`` per update."""

    def __init__(self, weights: Path, batch: int, quick: bool = False, seed: int = 0):
        from fastgen.configs.experiments.EDM import (
            config_f_distill_cifar10,
            config_sft_edm_cifar10,
        )

        # f-distill first: the SFT config sets dropout 0.13 on the shared EDM_CIFAR10_Config
        # that later configs would copy.
        self.cfg = _cpu_config(config_f_distill_cifar10.create_config(), weights, batch, quick)
        self.sft_cfg = _cpu_config(config_sft_edm_cifar10.create_config(), weights, batch, quick)
        self.sft_cfg.trainer.augment_pipe = None
        m = self.cfg.model
        if m.net.dropout != 0.0:
            raise RuntimeError(f"f-distill network dropout {m.net.dropout}, expected 0")
        if m.gan_r1_reg_weight != 0.0:
            raise RuntimeError(f"FastGen's config has R1 on: {m.gan_r1_reg_weight}")
        if quick:
            m.discriminator.in_channels = 2 * QUICK_CHANNELS
        self.model, self.trainer = _instantiate(self.cfg)
        self.sft, self.sft_trainer = _instantiate(self.sft_cfg)
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed + 3)
        self.x_real = torch.rand(batch, *m.input_shape, generator=self.gen) * 2 - 1
        self.label_dim = int(m.net.label_dim)
        self.freq = int(m.student_update_freq)

    def data(self, trainer: Any, model: nn.Module) -> dict[str, Any]:
        """A batch as FastGen's ``ImageLoader`` yields it, through ``preprocess_data``."""
        labels = torch.randint(self.label_dim, (self.batch,), generator=self.gen)
        raw = {
            "real": self.x_real,
            "condition": F.one_hot(labels, self.label_dim).float(),
            "neg_condition": torch.zeros(self.batch, self.label_dim),
        }
        return trainer.preprocess_data(model, raw)

    def _step(self, trainer: Any, model: nn.Module, iteration: int) -> None:
        trainer.train_step(model, model, self.data(trainer, model), iteration, 0)

    def teacher_step(self) -> None:
        """``SFTModel``: one denoising step of the network itself."""
        self._step(self.sft_trainer, self.sft, 1)

    def critic_update(self) -> None:
        """Iteration 1: ``_fake_score_discriminator_update_step`` + fake score / disc AdamW."""
        self._step(self.trainer, self.model, 1)

    def generator_update(self) -> None:
        """Iteration ``student_update_freq``: ``_student_update_step`` + student AdamW."""
        self._step(self.trainer, self.model, self.freq)

    def params(self) -> dict[str, int]:
        """Parameter counts of teacher, student, fake score and discriminator heads."""
        m = self.model
        return {
            "teacher": num_params(m.teacher),
            "generator": num_params(m.net),
            "fake score": num_params(m.fake_score),
            "heads": num_params(m.discriminator),
        }

    def resident(self) -> dict[str, int]:
        """Weights + Adam moments held during each kind of update."""
        m, trained = self.model, (self.model.net, self.model.fake_score, self.model.discriminator)
        return {
            "teacher": state_bytes(self.sft.net, trained=(self.sft.net,)),
            "distill": state_bytes(m.teacher, *trained, trained=trained),
        }

    def zero_grad(self) -> None:
        """No gradients resident (FastGen's step already zeroes the ones it used)."""
        for model in (self.model, self.sft):
            model.zero_grad(set_to_none=True)

    def check_weights(self, ours: dict[str, torch.Tensor]) -> int:
        """Raise unless FastGen's teacher, student, fake score and SFT network hold ``ours``;
        the number of tensors compared per network."""
        nets = {
            "teacher": self.model.teacher,
            "net": self.model.net,
            "fake_score": self.model.fake_score,
            "sft net": self.sft.net,
        }
        for name, net in nets.items():
            sd = net.state_dict()
            bad = [k for k, v in ours.items() if k not in sd or not torch.equal(sd[k], v)]
            if bad:
                raise RuntimeError(
                    f"FastGen {name}: {len(bad)} tensors differ from ours: {bad[:3]}"
                )
        return len(ours)


# --------------------------------------------------------------------------- our side
def our_side(batch: int, quick: bool) -> PresetBench:
    """``real_size.PresetBench`` for the cifar10 preset (``--quick``: narrow network), after
    its warm-up teacher step and with the distillation model built, as ``real_size.measure``
    does."""
    config = teacher_config("cifar10", model_channels=QUICK_CHANNELS) if quick else None
    bench = PresetBench("cifar10", batch, config)
    if bench.cfg.loss.r1_gamma != 0:
        raise RuntimeError(f"the cifar10 preset has R1 on: {bench.cfg.loss.r1_gamma}")
    bench.teacher_step()  # warm-up first: the teacher's AdamW state then counts as resident
    bench.build_model()
    return bench


def our_params(bench: PresetBench) -> dict[str, int]:
    """Parameter counts of our teacher, generator, fake score and heads."""
    m = bench.model
    return {
        "teacher": num_params(m.teacher),
        "generator": num_params(m.generator),
        "fake score": num_params(m.fake_score),
        "heads": num_params(m.head),
    }


def our_zero_grad(bench: PresetBench) -> None:
    """No gradients resident on our side."""
    bench.drop_grads()


# --------------------------------------------------------------------------- measurement
@dataclass
class Result:
    """Medians (seconds) per ``(side, kind)``, transient peaks, parameter counts."""

    batch: int
    critic_ratio: dict[str, int]
    reps: int = 0
    wall: dict[tuple[str, str], float] = field(default_factory=dict)
    cpu: dict[tuple[str, str], float] = field(default_factory=dict)
    mem: dict[tuple[str, str], int] = field(default_factory=dict)
    resident: dict[str, dict[str, int]] = field(default_factory=dict)
    params: dict[str, dict[str, int]] = field(default_factory=dict)
    head_width: dict[str, str] = field(default_factory=dict)
    max_rss: int = 0


def measure(
    bench: PresetBench,
    fg: FastGenBench,
    reps: int,
    mem: bool = True,
    report: Callable[[str], None] = lambda s: None,
) -> Result:
    """``reps`` timed rounds after one warm-up round; each round runs, per kind, our update
    then FastGen's. Then each update once under the profiler (``mem``)."""
    res = Result(
        batch=bench.batch,
        critic_ratio={"ours": bench.cfg.train.critic_ratio, "FastGen": fg.freq - 1},
    )
    res.params = {"ours": our_params(bench), "FastGen": fg.params()}
    widths = {
        "ours": sorted({m.channels for m in bench.model.head.maps}),
        "FastGen": [fg.model.discriminator.in_channels],
    }
    res.head_width = {s: ", ".join(map(str, w)) for s, w in widths.items()}
    run = {
        ("ours", "teacher"): bench.teacher_step,
        ("ours", "critic"): bench.critic_update,
        ("ours", "generator"): bench.generator_update,
        ("FastGen", "teacher"): fg.teacher_step,
        ("FastGen", "critic"): fg.critic_update,
        ("FastGen", "generator"): fg.generator_update,
        ("ours", "forward"): bench.forward_pass,
        ("ours", "features"): bench.feature_pass,
    }
    order = [*((side, kind) for kind in KINDS for side in SIDES), *PASSES]
    walls: dict[tuple[str, str], list[float]] = {k: [] for k in order}
    cpus: dict[tuple[str, str], list[float]] = {k: [] for k in order}
    for r in range(reps + 1):
        last = {}
        for key in order:
            last[key] = timed_both(run[key])
            if r:
                walls[key].append(last[key][0])
                cpus[key].append(last[key][1])
        report(
            f"round {r}{' (warm-up)' if r == 0 else ''}: "
            + ", ".join(f"{s} {k} {c:.2f} s cpu / {w:.2f} s" for (s, k), (w, c) in last.items())
        )
    res.reps = reps
    res.wall = {k: statistics.median(v) for k, v in walls.items() if v}
    res.cpu = {k: statistics.median(v) for k, v in cpus.items() if v}
    res.resident = {"ours": bench.resident(), "FastGen": fg.resident()}
    if mem:
        for key in order[: len(order) - len(PASSES)]:
            our_zero_grad(bench)
            fg.zero_grad()
            res.mem[key] = peak_bytes(run[key], torch.device("cpu"))
            report(f"{key[0]} {key[1]} transient peak {res.mem[key] / MIB:,.0f} MiB")
    res.max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return res


# --------------------------------------------------------------------------- output
def _s(v: float | None) -> str:
    return f"{v * 1e3:,.0f} ms" if v else "-"


def _x(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _mib(v: int | None) -> str:
    return f"{v / MIB:,.0f} MiB" if v else "-"


def per_update(t: dict[tuple[str, str], float], side: str, k: int) -> float | None:
    """Seconds per distillation update: ``(k critic + 1 generator) / (k + 1)``."""
    c, g = t.get((side, "critic")), t.get((side, "generator"))
    return (k * c + g) / (k + 1) if c and g else None


def tables(r: Result) -> str:
    """The parameter, time and memory tables (Markdown)."""
    out = [
        "| side | teacher network | generator | fake score | discriminator heads | head width |",
        "|---|---|---|---|---|---|",
    ]
    for side in SIDES:
        p = r.params[side]
        out.append(
            f"| {side} | {p['teacher']:,} | {p['generator']:,} | {p['fake score']:,} | "
            f"{p['heads']:,} | {r.head_width[side]} |"
        )
    out += [
        "",
        "| side | clock | batch | timed rounds | teacher step | critic update | "
        "generator update | distill update (k critic + 1 generator) | distill / teacher | "
        "critic / teacher | generator / teacher | FastGen / ours (critic, generator) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for clock in CLOCKS:
        t = r.wall if clock == "wall" else r.cpu
        for side in SIDES:
            k = r.critic_ratio[side]
            tt, per = t.get((side, "teacher")), per_update(t, side, k)
            crit, gen = t.get((side, "critic")), t.get((side, "generator"))
            vs = "-"
            if side == "FastGen":
                vs = (
                    f"{_x(crit, t.get(('ours', 'critic')))}, "
                    f"{_x(gen, t.get(('ours', 'generator')))}"
                )
            out.append(
                f"| {side} | {CLOCKS[clock]} | {r.batch} | {r.reps} | {_s(tt)} | {_s(crit)} | "
                f"{_s(gen)} | {_s(per)} (k={k}) | **{_x(per, tt)}** | {_x(crit, tt)} | "
                f"{_x(gen, tt)} | {vs} |"
            )
    if r.mem:
        out += [
            "",
            "| side | transient: teacher step | critic update | generator update | "
            "generator / teacher | resident: teacher training | distillation |",
            "|---|---|---|---|---|---|---|",
        ]
        for side in SIDES:
            m, res = r.mem, r.resident[side]
            tm, gm = m.get((side, "teacher")), m.get((side, "generator"))
            out.append(
                f"| {side} | {_mib(tm)} | {_mib(m.get((side, 'critic')))} | {_mib(gm)} | "
                f"{_x(gm, tm)} | {_mib(res['teacher'])} | {_mib(res['distill'])} |"
            )
    t, f, e = (r.cpu.get(k) for k in (("ours", "teacher"), *PASSES))
    crit = r.cpu.get(("ours", "critic"))
    if t and f and e and crit:
        out.append(
            f"\nOurs, the passes an update is made of (CPU time, no gradients, batch {r.batch}): "
            f"a forward of the network {_s(f)}, up to the deepest discriminator tap {_s(e)}. A "
            "critic update is a fake-score training step (a teacher step's work) plus a student "
            f"sample (one forward) and two feature passes (real and fake): floor (T + F + 2E) / "
            f"T = {(t + f + 2 * e) / t:.2f}x, measured {crit / t:.2f}x."
        )
    out.append(f"\nProcess peak RSS (both sides resident): {_mib(r.max_rss)}.")
    return "\n".join(out)


NOTES = """\
- Teacher step. Ours: one update of the engine running teacher training (`Denoising`: EDM loss,
  log-normal sigma, lambda(sigma)-weighted, + fused AdamW of the teacher network, grad clip,
  dropout 0.13), as `train-teacher` runs it. FastGen: `SFTModel` of
  `config_sft_edm_cifar10` (log-normal sigma, unweighted x0 MSE, Adam lr 2e-5, dropout 0.13,
  grad clip 10), without its augmentation pipe.
- Critic update. Both: fake-score denoising loss on a detached one-step sample, teacher
  encoder features of the noised fake and (at their own sigma) real batch without gradients,
  the heads with gradients, R1 off. FastGen steps two AdamW (fake score, discriminator) without
  grad clipping (its clip callback clips `net` only); ours one fused AdamW with clip 10.
- Generator update. FastGen runs the teacher once with gradients through its input for both
  x0 and the features, the full network (decoder included) holding its activations although
  only the features' path is differentiated; the fake score runs under no_grad. Ours runs the
  teacher once, keeping a graph only up to its deepest tap (`encoder_grad`). FastGen's GAN
  loss is softplus over each head's logit ([N, 3]) and its ratio uses their mean; ours averages
  the three heads' logits first. FastGen's optimiser: AdamW `fused=False`; ours fused.
- Per-update times are medians of CPU time (`time.process_time`, one torch thread: the work
  itself) and wall time (includes waits for a core on a shared machine). Distill update =
  (k critic + 1 generator) / (k + 1) at each side's own ratio: ours k = 5 (the preset's
  critic_ratio), FastGen k = 4 (student_update_freq 5: iterations 1-4 critic, 5 student).
- Not timed on either side: the EMA of the generator (FastGen: three EMA callbacks after the
  step, their copies not built here; resident memory leaves them out) and gradient
  accumulation (FastGen's experiment: 256 per GPU up to a global 2048; here one micro-batch
  of --batch per update on both sides)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fastgen", type=Path, default=Path("/tmp/fastgen"), help="FastGen checkout")
    p.add_argument("--reps", type=int, default=3, help="timed rounds after the warm-up round")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="narrow networks (smoke test)")
    p.add_argument("--no-mem", action="store_true", help="skip the profiler's peak memory")
    p.add_argument("--out", default=None, help="also write the report (Markdown) here")
    args = p.parse_args(argv)
    for name in ("reps", "batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be an integer >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.monotonic()

    def report(line: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {line}", file=sys.stderr, flush=True)

    tv = import_fastgen(args.fastgen.resolve())
    bench = our_side(args.batch, args.quick)
    report(f"ours built: teacher {num_params(bench.teacher):,} parameters, batch {args.batch}")
    ours = to_fastgen_state(bench.teacher)
    with tempfile.TemporaryDirectory(prefix="fastgen_side_by_side_") as tmp:
        weights = Path(tmp) / "teacher.pth"
        torch.save(ours, weights)
        fg = FastGenBench(weights, args.batch, args.quick)
    n = fg.check_weights(ours)
    del ours
    report(f"FastGen built from our teacher's weights ({n} tensors equal in all four networks)")
    res = measure(bench, fg, args.reps, mem=not args.no_mem, report=report)

    cpu = platform.processor() or platform.machine()
    head = (
        f"torch {torch.__version__}, CPU ({cpu}), {args.threads} thread(s), fp32, batch "
        f"{args.batch}{', --quick (narrow networks)' if args.quick else ''}; FastGen from "
        f"{args.fastgen} (torchvision: {tv})"
    )
    body = tables(res)
    print(f"\n{head}\n\n{body}\n", flush=True)
    if args.out:
        title = "FastGen's CIFAR-10 f-distill updates next to ours on this CPU"
        elapsed = time.monotonic() - t0
        script = "fastgen_side_by_side.py"
        write_report(args.out, title, script, argv, head, NOTES, body, elapsed)


if __name__ == "__main__":
    main()
