"""The main job: digits end to end — an EDM teacher, a one-step f-distill student, a report.

``fdistill demo --out runs/demo`` trains (or reuses) a small class-conditional UNet teacher on
scikit-learn's 8x8 digits, distils it into a one-step generator, and writes ``report/``:

* ``comparison.png``: data | teacher (35-NFE Heun) | teacher's own one step (the student's
  starting point) | student (1 NFE), one column per class;
* ``metrics.json`` and ``report.md``: training times, sampling speed, and sample quality
  against the teacher's samples and the data in the shipped digit classifier's feature space
  (:func:`fdistill.metrics.evaluate_images`: cFID, k-NN precision/recall, class coverage).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from fdistill.config import DistillConfig, TeacherConfig, apply_preset, apply_teacher_preset
from fdistill.data import ImageDataset, load_dataset
from fdistill.evaluation import generate_samples
from fdistill.images import make_grid, save_image_grid
from fdistill.metrics import evaluate_images
from fdistill.models import load_run
from fdistill.options import legacy_values, resumable_paths
from fdistill.recipes import distill_run, train_teacher_run
from fdistill.runs import (
    CHECKPOINT,
    atomic_write_text,
    load_checkpoint,
    option_differences,
    read_config,
)
from fdistill.samplers import DEFAULT_TEACHER_NFE
from fdistill.sampling import generate, run_sampler, sample_run, sample_seeds


@dataclass
class DemoConfig:
    """Sizes of the demo (defaults: about 10 minutes on 2 CPU cores, one torch thread)."""

    divergence: str = "js"
    teacher_steps: int = 1500
    distill_steps: int = 200
    seed: int = 0
    retrain: bool = False
    threads: int | None = 1
    n_eval: int = 1000
    teacher_nfe: int = DEFAULT_TEACHER_NFE


def teacher_config(cfg: DemoConfig) -> TeacherConfig:
    t = apply_teacher_preset(TeacherConfig(grid_every=500), "digits")
    return replace(t, train=replace(t.train, steps=cfg.teacher_steps, seed=cfg.seed))


def distill_config(cfg: DemoConfig, teacher: Path) -> DistillConfig:
    d = DistillConfig(teacher=str(teacher), divergence=cfg.divergence, grid_every=100)
    d = apply_preset(d, "digits")
    return replace(d, train=replace(d.train, steps=cfg.distill_steps, seed=cfg.seed))


def cached_teacher(out: Path, tcfg: TeacherConfig) -> str:
    """``"reuse"``, ``"resume"`` (same options, fewer steps done) or ``"train"``."""
    if not (out / CHECKPOINT).is_file() or not (out / "config.json").is_file():
        return "train"
    saved = read_config(out).get("options", {})
    # differs beyond what a resume may change (length, logging, grids)?
    if option_differences(
        saved, asdict(tcfg), resumable_paths(TeacherConfig), legacy_values(TeacherConfig)
    ):
        return "train"
    return "reuse" if load_checkpoint(out)["step"] >= tcfg.train.steps else "resume"


REPORT_COLUMNS = (
    "cfid_vs_teacher", "cprecision_vs_teacher", "crecall_vs_teacher",
    "cfid_vs_data", "cprecision_vs_data", "crecall_vs_data",
    "class_coverage", "class_tv_uniform", "mean_confidence",
)  # fmt: skip


def sample_metrics(samples: dict[str, Tensor], teacher: Tensor, data: ImageDataset) -> dict:
    """:func:`~fdistill.metrics.evaluate_images` (digit-classifier features) of each sample set
    against the data and against an independent set of teacher samples — the distribution the
    student is asked to match."""
    out = {}
    for name, x in samples.items():
        x = x.clamp(-1, 1)
        row = {f"{k}_vs_teacher": v for k, v in _pr_fid(x, teacher).items()}
        vs_data = evaluate_images(x, data, inception=False)
        row |= {f"{k}_vs_data": vs_data.pop(k) for k in ("cfid", "cprecision", "crecall")}
        out[name] = row | vs_data
    return out


def _pr_fid(x: Tensor, ref: Tensor) -> dict:
    res = evaluate_images(x, ref.clamp(-1, 1), metrics=("fid", "pr"), inception=False)
    return {k: res[k] for k in ("cfid", "cprecision", "crecall")}


def _comparison_figure(panels: dict[str, Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), dpi=120)
    for ax, (title, images) in zip(axes, panels.items(), strict=True):
        ax.imshow(make_grid(images, nrow=10, padding=1, pad_value=128)[..., 0], cmap="gray")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _class_examples(images: Tensor, labels: Tensor, per_class: int, num_classes: int) -> Tensor:
    """``per_class`` rows, one column per class (first images of each class)."""
    cols = [images[labels == c][:per_class] for c in range(num_classes)]
    return torch.stack(cols, 1).reshape(-1, *images.shape[1:])


def run_demo(cfg: DemoConfig, out: str | Path) -> Path:
    """Teacher (cached), student, report; returns the report folder."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    t_dir, s_dir, r_dir = out / "teacher", out / f"student-{cfg.divergence}", out / "report"
    tcfg = teacher_config(cfg)
    state = "train" if cfg.retrain else cached_teacher(t_dir, tcfg)
    timings: dict[str, float] = {}
    if state == "reuse":
        print(f"reusing the teacher in {t_dir}")
    else:
        if state == "train" and t_dir.exists():
            shutil.rmtree(t_dir)
        print(f"[1/3] teacher: {cfg.teacher_steps} steps -> {t_dir}")
        res = train_teacher_run(tcfg, t_dir, resume=state == "resume")
        timings["teacher_train_s"] = res.seconds
    if s_dir.exists():
        shutil.rmtree(s_dir)
    print(f"[2/3] student ({cfg.divergence}): {cfg.distill_steps} steps -> {s_dir}")
    res = distill_run(distill_config(cfg, t_dir), s_dir)
    timings["distill_train_s"] = res.seconds

    print(f"[3/3] report: samples, timings and metrics -> {r_dir}")
    teacher, student = load_run(t_dir), load_run(s_dir)
    n = cfg.n_eval
    seed = cfg.seed + 1  # not the grids' seed 0
    x_teacher, t_teacher = generate_samples(teacher, n, seed, cfg.teacher_nfe)
    x_euler, _ = generate_samples(teacher, n, seed, 1)
    x_student, t_student = generate_samples(student, n, seed, None)
    timings |= {
        f"teacher_{cfg.teacher_nfe}nfe_sampling_s": t_teacher,
        "student_sampling_s": t_student,
        "sampling_speedup": t_teacher / t_student,
    }
    # Other seeds: the teacher row then shows the metrics' own sampling noise.
    reference, _ = sample_run(teacher, n, seed + 1, nfe=cfg.teacher_nfe)
    ds = load_dataset("digits")
    samples = {
        "student": x_student,
        "teacher_1nfe": x_euler,
        f"teacher_{cfg.teacher_nfe}nfe": x_teacher,
    }
    metrics = {
        "config": asdict(cfg),
        "teacher_step": teacher.step,
        "student_step": student.step,
        "timings": timings,
        "samples": sample_metrics(samples, reference, ds),
    }
    atomic_write_text(json.dumps(metrics, indent=2), r_dir / "metrics.json")

    grid_n = 100
    seeds, labels = sample_seeds(0, grid_n), torch.arange(grid_n) % 10
    nfe = cfg.teacher_nfe
    panels = {  # file stem: (title, images)
        "data": ("data", _class_examples(ds.images, ds.labels, grid_n // 10, 10)),
        "teacher": (
            f"teacher, {nfe} NFE",
            generate(run_sampler(teacher, nfe), teacher.shape, seeds, labels),
        ),
        "teacher_1nfe": (
            "teacher, 1 NFE (student init)",
            generate(run_sampler(teacher, 1), teacher.shape, seeds, labels),
        ),
        "student": (
            f"student ({cfg.divergence}), 1 NFE",
            generate(student.model, student.shape, seeds, labels),
        ),
    }
    for stem, (_, images) in panels.items():
        save_image_grid(images, r_dir / f"{stem}.png", nrow=10, padding=1)
    _comparison_figure(dict(panels.values()), r_dir / "comparison.png")
    atomic_write_text(report_markdown(metrics), r_dir / "report.md")
    return r_dir


def report_markdown(m: dict) -> str:
    """The report's Markdown: timings, then one row of metrics per sample set."""
    lines = ["# fdistill demo: 8x8 digits", "", "![comparison](comparison.png)", ""]
    lines += ["## Timings (seconds)", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in m["timings"].items()]
    lines += ["", "## Sample quality", ""]
    lines += ["Digit-classifier features, against the data and against 35-NFE teacher samples of"]
    lines += ["other seeds (so the teacher's own row shows the metrics' noise floor).", ""]
    lines.append("| samples | " + " | ".join(REPORT_COLUMNS) + " |")
    lines.append("|---|" + "---|" * len(REPORT_COLUMNS))
    for name, row in m["samples"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in REPORT_COLUMNS) + " |")
    return "\n".join(lines) + "\n"
