"""Results table on 8x8 digits: the teacher at several NFEs against one-step f-distill students.

One command trains (or reuses, from ``--work``) the demo's digits teacher
(:func:`fdistill.demo.teacher_config`), evaluates it with deterministic Heun at
``--nfes`` (default 1, 2, 4, 8, 18, 35; every NFE >= 1 is exact, see
:func:`fdistill.samplers.steps_for_nfe`), distils one-step students for every divergence x seed
x GAN term on/off (``gan_weight`` default vs 0, ``--gan``) with a fixed budget
(``--distill-steps``), and writes into ``--out-dir``:

* ``digits_table.md``: mean ± std over seeds of classifier FID against the data and against
  the 35-NFE teacher's own samples (the distillation target), k-NN precision / recall and class
  metrics in the shipped digit classifier's feature space, samples/s and the speed-up over the
  35-NFE teacher (Inception FID against the data's statistics too with ``--inception PATH``);
* ``digits_fid_vs_nfe.png``: teacher FID against NFE, students as points at NFE 1;
* ``digits_students.png``: samples of every divergence (seed 0, GAN on), one column per class.

The discriminator follows the official code by default: one head per encoder map of the
frozen teacher (``--disc-taps`` empty = every ``enc*`` map), 10 ratio bins linear in sigma,
the unweighted fake-score loss. The design of the earlier table (commit 5343770: a single head
on the teacher's bottleneck, 8 log-sigma bins, EDM-weighted fake-score loss) is
``--disc-taps mid --ratio-binning log-sigma --ratio-bins 8 --fake-weighting edm``. The table
also reports what each student's ``metrics.jsonl`` says about its discriminator over the second
half of training: the logit gap (overall and per ratio bin), the discriminator loss and the
spread of the weights ``h_cv`` (std / mean of ``h`` in a batch; 0 means every divergence trains
like reverse KL).

Teacher rows use the seeds as *sampling* seeds, so their spread is the metrics' own noise.
Samples/s are measured side by side in the main process after all jobs (interleaved rounds,
median), so that parallel jobs do not skew the speed-ups; the generation alone is timed.

    python benchmarks/results_table.py            # full table: about 25 min on 2 CPU cores
    python benchmarks/results_table.py --quick --jobs 1 --work /tmp/bench-quick   # ~1 min

Everything trained is cached in ``--work`` (default ``runs/bench-digits``): a rerun with the
same settings only re-evaluates. ``--quick`` writes into its own ``--work``
(``runs/bench-digits-quick``) and ``WORK/results`` unless told otherwise, never over the
committed results. Per-seed numbers, timings and the command go to ``WORK/results.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import shutil
import statistics
import sys
import time
import zlib
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fdistill.config import apply_preset
from fdistill.data import load_dataset
from fdistill.demo import DemoConfig, cached_teacher, distill_config, teacher_config
from fdistill.divergences import NAMES
from fdistill.evaluation import fid_against_stats, generate_samples
from fdistill.methods.fdistill import resolved_levels
from fdistill.metrics import (
    InceptionFeatures,
    evaluate_images,
    feature_stats,
    mean_std,
    save_stats,
)
from fdistill.pipeline import (
    DistillConfig,
    distill_run,
    generate,
    load_run,
    run_sampler,
    sample_run,
    sample_seeds,
    train_teacher_run,
)
from fdistill.runs import CHECKPOINT, atomic_write_text, load_checkpoint
from fdistill.samplers import steps_for_nfe

DIVERGENCES = ("rkl", "srkl", "js", "hellinger", "fkl", "jeffreys")
TEACHER_NFES = (1, 2, 4, 8, 18, 35)
REF_NFE = 35  # the teacher the speed-ups and "cFID vs teacher" refer to
EVAL_SEED0 = 1000  # sampling seed of seed s is EVAL_SEED0 + s (disjoint from the grids' 0)
TEACHER_REF_SEED = 500  # the 35-NFE teacher samples students are compared with
QUICK = {"divergences": "rkl,js", "seeds": "0", "distill_steps": 20, "teacher_steps": 100}
QUICK |= {"n": 200, "time_n": 200, "work": "runs/bench-digits-quick"}

# Columns: key, header, decimals.
COLUMNS = (
    ("cfid", "cFID data ↓", 2),
    ("cfid_teacher", "cFID teacher ↓", 2),
    ("cprecision", "precision", 3),
    ("crecall", "recall", 3),
    ("class_coverage", "class cov.", 2),
    ("class_tv_data", "class TV ↓", 3),
)
# From the students' metrics.jsonl (second half of training).
LOG_COLUMNS = (
    ("log_disc_gap", "disc gap", 2),
    ("log_loss_disc", "disc loss", 3),
    ("log_h_cv", "h_cv", 3),
)


# ----------------------------------------------------------------------------- jobs
def _valid_nfe(nfe: int) -> int:
    """The nearest NFE the Heun sampler makes exactly (every NFE >= 1 today)."""
    nfe = max(1, int(nfe))
    steps_for_nfe(nfe)
    return nfe


def _student_dir(work: Path, div: str, gan: bool, seed: int) -> Path:
    return work / "students" / f"{div}-{'gan' if gan else 'nogan'}-s{seed}"


def _student_config(teacher: Path, div: str, gan: bool, seed: int, a: dict) -> DistillConfig:
    d = distill_config(
        DemoConfig(divergence=div, distill_steps=a["distill_steps"], seed=seed), teacher
    )
    loss = replace(
        d.loss,
        gan_weight=a["gan_weight"] if gan else 0.0,
        ratio_binning=a["ratio_binning"],
        ratio_bins=a["ratio_bins"],
        fake_weighting=a["fake_weighting"],
    )
    taps = tuple(a["disc_taps"]) or None
    return replace(
        d, grid_every=0, disc_taps=taps, loss=loss, train=replace(d.train, progress=False)
    )


def log_stats(run: Path, start_frac: float = 0.5) -> dict[str, float]:
    """Means over the logged steps after ``start_frac`` of training of a student's
    ``metrics.jsonl``: ``log_<key>`` for the discriminator's loss and logit gap (overall and
    ``disc_gap/bin<k>`` per ratio bin) and the weights' spread ``h_*``."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in recs)
    recs = [r for r in recs if r["step"] > start_frac * last]
    keys = {k for r in recs for k in r if k.startswith(("disc_gap", "h_", "loss_disc"))}
    out = {}
    for k in sorted(keys):
        vals = [r[k] for r in recs if k in r]
        out[f"log_{k}"] = sum(vals) / len(vals)
    return out


def _cached_student(out: Path, cfg: DistillConfig, teacher_step: int) -> bool:
    """Whether ``out`` holds a finished student of exactly this config and teacher."""
    if not (out / CHECKPOINT).is_file() or not (out / "config.json").is_file():
        return False
    saved = json.loads((out / "config.json").read_text())

    def opts(o: dict) -> dict:
        return o | {"train": {k: v for k, v in o["train"].items() if k != "progress"}}

    # runs record "auto" noise levels and ratio bins resolved for their teacher (EDM here)
    levels, binning = resolved_levels(cfg.loss, discrete=False)
    cfg = replace(cfg, loss=replace(cfg.loss, noise_levels=levels, ratio_binning=binning))
    want = json.loads(json.dumps(asdict(cfg), default=str))
    return (
        (out / "timing.json").is_file()
        and opts(saved["options"]) == opts(want)
        and saved["teacher"]["step"] == teacher_step
        and load_checkpoint(out)["step"] == cfg.train.steps
    )


def evaluate_samples(x: Tensor, job: dict) -> dict[str, float]:
    """Digit-classifier metrics of samples against the data and the 35-NFE teacher samples;
    Inception FID against the data's saved statistics when the job carries them."""
    x = x.clamp(-1, 1)
    res = evaluate_images(x, load_dataset("digits"), classifier="digits", inception=False)
    ref = torch.load(job["teacher_ref"], weights_only=True)
    res["cfid_teacher"] = evaluate_images(x, ref, metrics=("fid",), inception=False)["cfid"]
    if job.get("inception"):
        res["fid"] = fid_against_stats(x, job["inception_stats"], job["inception"])["fid"]
    return {k: v for k, v in res.items() if isinstance(v, float | int)}


def run_job(job: dict) -> dict:
    """One table row of one seed: distil (or reuse) a student, or sample the teacher at an NFE;
    then the metrics. Runs in a worker process with one torch thread."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    row = {k: job[k] for k in ("kind", "name", "nfe", "gan", "seed")}
    if job["kind"] == "student":
        out = Path(job["dir"])
        cfg = _student_config(Path(job["teacher"]), job["name"], job["gan"], job["seed"], job)
        row["reused"] = _cached_student(out, cfg, job["teacher_step"])
        if row["reused"]:
            row["train_s"] = json.loads((out / "timing.json").read_text())["train_s"]
        else:
            if out.exists():
                shutil.rmtree(out)
            row["train_s"] = distill_run(cfg, out).seconds
            atomic_write_text(json.dumps({"train_s": row["train_s"]}), out / "timing.json")
        run, nfe = load_run(out), None
        row |= log_stats(out)
    else:
        run, nfe = load_run(job["teacher"]), job["nfe"]
    x, seconds = generate_samples(run, job["n"], EVAL_SEED0 + job["seed"], nfe, batch=256)
    row["job_samples_per_s"] = job["n"] / seconds
    row |= evaluate_samples(x, job)
    row["job_s"] = time.perf_counter() - t0
    what = (
        f"{row['name']} {'GAN' if row['gan'] else 'no GAN'}"
        if row["kind"] == "student"
        else f"teacher {nfe} NFE"
    )
    print(f"  {what} seed {row['seed']}: cFID {row['cfid']:.2f}, {row['job_s']:.0f} s", flush=True)
    return row


# ----------------------------------------------------------------------------- timing
def measure_throughput(paths: dict[str, tuple[str, int | None]], n: int, rounds: int = 3) -> dict:
    """Samples/s of each ``name: (run path, nfe)``, generation only, in interleaved rounds
    (median), in this process, so that every model meets the same machine load."""
    runs = {k: (load_run(p), nfe) for k, (p, nfe) in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, (run, nfe) in runs.items():
            times[k].append(generate_samples(run, n, 0, nfe, batch=256)[1])
    return {k: n / statistics.median(t) for k, t in times.items()}


# ----------------------------------------------------------------------------- report
def aggregate(rows: list[dict], keys: list[str]) -> dict[tuple, dict[str, tuple[float, float]]]:
    """Mean ± std over seeds per (kind, name, nfe, gan)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["name"], r["nfe"], r["gan"]), []).append(r)
    return {
        g: {k: mean_std([r[k] for r in rs if k in r]) for k in keys if k in rs[0]}
        for g, rs in groups.items()
    }


def markdown(summary: dict, speed: dict, a: dict, wall_s: float, command: str) -> str:
    """The table file: command, wall time, settings, one row per teacher NFE / student kind."""
    cols = list(COLUMNS) + ([("fid", "Inception FID ↓", 2)] if a["inception"] else [])
    cols += list(LOG_COLUMNS)
    head = ["model", "NFE", "GAN", *[c[1] for c in cols], "samples/s", "speed-up"]
    lines = [
        "# Results on 8x8 digits: teacher vs one-step f-distill students",
        "",
        f"Regenerate: `{command}`  ",
        f"Wall time {wall_s:.0f} s ({a['jobs']} parallel single-thread jobs on {a['cpus']} CPUs; "
        f"{a['reused']}). Distillation: {a['train_s']:.0f} s per student on average.",
        "",
        f"Teacher: the demo's UNet, {a['teacher_step']} steps, Heun sampling. Students: "
        f"{a['distill_steps']} generator steps each (demo settings: batch 64, critic ratio 5), "
        f"GAN weight {a['gan_weight']:g} or 0. Discriminator: heads on the teacher's "
        f"{a['taps_text']} map(s), {a['ratio_bins']} {a['ratio_binning']} ratio bins, fake-score "
        f"loss weighting '{a['fake_weighting']}'. Metrics on {a['n']} samples against the "
        f"{a['num_data']} digits, in the shipped digit classifier's feature space; "
        f"'cFID teacher' is against {a['n']} samples of the {REF_NFE}-NFE teacher (other seeds). "
        f"Mean ± std over seeds {a['seeds']} (teacher: over sampling seeds). Samples/s: "
        f"generation of {a['time_n']} samples, one thread, median of 3 interleaved rounds; "
        f"speed-up against the {REF_NFE}-NFE teacher. 'disc gap' (mean logit real − fake, "
        f"nats), 'disc loss' (2 ln 2 = 1.386 at chance) and 'h_cv' (std / mean of the weights "
        f"h in a batch) are the students' own logs, averaged over the second half of training.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for (kind, name, nfe, gan), s in summary.items():
        label = "teacher (Heun)" if kind == "teacher" else name
        cells = [label, str(nfe), "—" if kind == "teacher" else ("on" if gan else "off")]
        cells += [f"{s[k][0]:.{d}f} ± {s[k][1]:.{d}f}" if k in s else "—" for k, _, d in cols]
        sps = speed[_speed_key(kind, name, nfe, gan)]
        cells += [
            f"{sps:.0f}",
            f"{sps / speed[_speed_key('teacher', 'teacher', REF_NFE, False)]:.1f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *bin_table(summary, a)]
    return "\n".join(lines) + "\n"


def bin_table(summary: dict, a: dict) -> list[str]:
    """Per ratio bin: its noise range, the share of training noise levels in it, and each
    student's mean logit gap there (from its logs)."""
    from fdistill.denoisers.edm import karras_sigmas
    from fdistill.loss import SigmaBins

    lo, hi = 0.002, 80.0
    bins = SigmaBins(lo, hi, a["ratio_bins"], a["ratio_binning"])
    grid = karras_sigmas(1000, lo, hi, 7.0)[1:-1].float()  # FDistill.sample_sigma's grid
    share = torch.bincount(bins(grid), minlength=bins.num_bins).double() / len(grid)
    edges = [lo, *[float(e) for e in bins.edges], hi]
    if a["ratio_binning"] == "log-sigma":
        edges = [lo, *[float(torch.exp(torch.tensor(e))) for e in bins.edges], hi]
    nb = bins.num_bins
    lines = [
        f"Mean logit gap per ratio bin (nats, students' logs, second half of training; "
        f"{a['ratio_binning']}, {nb} bins over σ ∈ [{lo:g}, {hi:g}]; 'share' is the fraction of "
        f"training noise levels that fall in the bin):",
        "",
        "| student | GAN | " + " | ".join(f"bin {k}" for k in range(nb)) + " |",
        "|---|---|" + "---:|" * nb,
        "| σ range | | "
        + " | ".join(f"{edges[k]:.3g}–{edges[k + 1]:.3g}" for k in range(nb))
        + " |",
        "| share | | " + " | ".join(f"{float(v):.0%}" for v in share) + " |",
    ]
    for (kind, name, _, gan), s in summary.items():
        if kind != "student":
            continue
        cells = [
            f"{s[f'log_disc_gap/bin{k}'][0]:.2f}" if f"log_disc_gap/bin{k}" in s else "—"
            for k in range(nb)
        ]
        lines.append(f"| {name} | {'on' if gan else 'off'} | " + " | ".join(cells) + " |")
    return lines


def paired_table(rows: list[dict], base: str = "rkl") -> list[str]:
    """Each student's cFID minus that of the ``base`` divergence with the same seed and GAN
    setting (the same data and noise streams), mean ± std over seeds: differences smaller than
    the seed-to-seed spread show up here when they keep their sign."""
    students = [r for r in rows if r["kind"] == "student"]
    ref = {(r["gan"], r["seed"]): r["cfid"] for r in students if r["name"] == base}
    groups: dict[tuple, list[tuple[int, float]]] = {}
    for r in students:
        if r["name"] != base and (r["gan"], r["seed"]) in ref:
            d = r["cfid"] - ref[(r["gan"], r["seed"])]
            groups.setdefault((r["name"], r["gan"]), []).append((r["seed"], d))
    if not groups:
        return []
    lines = [
        f"cFID against the data minus {base}'s, paired by seed (same data and noise draws); "
        "the per-seed differences in brackets:",
        "",
        "| student | GAN | Δ cFID | per seed |",
        "|---|---|---:|---|",
    ]
    for (name, gan), ds in groups.items():
        ds.sort()
        m, e = mean_std([d for _, d in ds])
        per = ", ".join(f"{d:+.2f}" for _, d in ds)
        lines.append(f"| {name} | {'on' if gan else 'off'} | {m:+.2f} ± {e:.2f} | [{per}] |")
    return lines


def _speed_key(kind: str, name: str, nfe: int, gan: bool) -> str:
    return f"teacher-{nfe}" if kind == "teacher" else f"{name}-{'gan' if gan else 'nogan'}"


def fid_figure(summary: dict, divergences: list[str], path: Path, inception: bool) -> None:
    """Teacher FID against NFE (log-log, error bars over sampling seeds) and the students at
    NFE 1 (error bars over training seeds; filled markers: GAN on, hollow: off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("cfid", "classifier FID vs data")] + (
        [("fid", "Inception FID vs data")] if inception else []
    )
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(6.2 * len(metrics), 4.4), dpi=120, squeeze=False
    )
    colors = plt.get_cmap("tab10")
    for ax, (key, title) in zip(axes[0], metrics, strict=True):
        t = sorted((g[2], s[key]) for g, s in summary.items() if g[0] == "teacher")
        ax.errorbar(
            [n for n, _ in t],
            [m for _, (m, _) in t],
            yerr=[e for _, (_, e) in t],
            color="k",
            marker="o",
            label="teacher (Heun)",
            capsize=3,
        )
        for i, div in enumerate(divergences):
            for gan in (True, False):
                s = summary.get(("student", div, 1, gan))
                if s is None:
                    continue
                # Spread the points around NFE 1: divergences side by side, GAN off right of on.
                x = 1.03 ** (2 * i + (not gan) - len(divergences) + 0.5)
                ax.errorbar(
                    [x],
                    [s[key][0]],
                    yerr=[s[key][1]],
                    color=colors(i),
                    marker="o" if gan else "s",
                    mfc=colors(i) if gan else "white",
                    capsize=3,
                    ls="none",
                    label=f"{div} ({'GAN' if gan else 'no GAN'})",
                )
        ref = dict(t).get(REF_NFE)
        if ref is not None:
            ax.axhline(ref[0], color="k", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted({n for n, _ in t}))
        ax.set_xticklabels([str(n) for n in sorted({n for n, _ in t})])
        ax.set_xlabel("NFE (denoiser calls per sample)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3, which="both")
        ax.set_title(f"{title}: students at NFE 1 (filled: GAN on, hollow: off)", fontsize=9)
    axes[0][-1].legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def samples_figure(blocks: dict[str, Tensor], path: Path) -> None:
    """One titled block of images per entry, 10 per row (one column per class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fdistill.images import make_grid

    fig, axes = plt.subplots(
        len(blocks), 1, figsize=(5.4, 1.0 * len(blocks) + 0.1), dpi=130, squeeze=False
    )
    for ax, (title, images) in zip(axes[:, 0], blocks.items(), strict=True):
        ax.imshow(
            make_grid(images, nrow=10, padding=1, pad_value=128)[..., 0],
            cmap="gray",
            vmin=0,
            vmax=255,
        )
        ax.set_ylabel(title, fontsize=8, rotation=0, ha="right", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` replaces the sizes the user did not give."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--divergences", default=",".join(DIVERGENCES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--nfes", default=",".join(map(str, TEACHER_NFES)), help="teacher NFEs")
    p.add_argument("--distill-steps", type=int, default=DemoConfig.distill_steps)
    p.add_argument("--teacher-steps", type=int, default=DemoConfig.teacher_steps)
    p.add_argument(
        "--gan-weight",
        type=float,
        default=apply_preset(DistillConfig(), "digits").loss.gan_weight,
        help="GAN-on weight",
    )
    p.add_argument("--gan", default="on,off", help="GAN term settings to train: on, off or both")
    p.add_argument(
        "--disc-taps",
        default="",
        help="teacher feature maps of the discriminator heads (empty: every encoder map; "
        "'mid': the bottleneck, the first table's design)",
    )
    p.add_argument("--ratio-binning", default="linear-sigma", choices=("linear-sigma", "log-sigma"))
    p.add_argument("--ratio-bins", type=int, default=10)
    p.add_argument("--fake-weighting", default="none", choices=("none", "edm"))
    p.add_argument("--n", type=int, default=2000, help="samples per evaluation")
    p.add_argument("--time-n", type=int, default=1000, help="samples per throughput measurement")
    p.add_argument("--jobs", type=int, default=2, help="parallel single-thread processes")
    p.add_argument("--inception", help="Inception TorchScript file: adds an Inception FID column")
    p.add_argument("--work", default="runs/bench-digits", help="teacher, students and caches")
    p.add_argument(
        "--out-dir",
        default="benchmarks/results",
        help="table and figures (--quick: WORK/results unless given)",
    )
    p.add_argument("--retrain", action="store_true", help="retrain the teacher (and students)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 divergences, 1 seed, 20 steps, small n, its own --work",
    )
    args = p.parse_args(argv)
    given = apply_quick(args, argv, QUICK)
    if args.quick and "out_dir" not in given:  # never over the committed results
        args.out_dir = str(Path(args.work) / "results")
    return args


def apply_quick(args: argparse.Namespace, argv: list[str] | None, quick: dict) -> set[str]:
    """With ``--quick``, set the ``quick`` sizes on ``args`` except the options given
    explicitly; return the names of those given (``dest`` form)."""
    given = {
        a.split("=")[0].lstrip("-").replace("-", "_")
        for a in (argv if argv is not None else sys.argv[1:])
        if a.startswith("--")
    }
    if args.quick:
        for k, v in quick.items():
            if k not in given:
                setattr(args, k, v)
    return given


def main(argv: list[str] | None = None) -> None:
    """Teacher, jobs, throughput, then the table and the figures."""
    args = parse_args(argv)
    command = "python benchmarks/results_table.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    work, out_dir = Path(args.work), Path(args.out_dir)
    divergences = [d for d in args.divergences.split(",") if d]
    unknown = [d for d in divergences if d not in NAMES]
    if unknown:
        raise SystemExit(f"--divergences: unknown {unknown}; valid: {', '.join(NAMES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    nfes = sorted({_valid_nfe(int(k)) for k in args.nfes.split(",") if k} | {REF_NFE})
    gans = [g for g in args.gan.split(",") if g]
    if not gans or set(gans) - {"on", "off"}:
        raise SystemExit(f"--gan: expected on, off or on,off; got {args.gan!r}")
    gan_modes = [g == "on" for g in ("on", "off") if g in gans]
    disc_taps = [t for t in args.disc_taps.split(",") if t]

    # 1. The teacher (the demo's), cached in --work.
    t_dir = work / "teacher"
    tcfg = teacher_config(DemoConfig(teacher_steps=args.teacher_steps, seed=0))
    state = "train" if args.retrain else cached_teacher(t_dir, tcfg)
    if state == "reuse":
        print(f"reusing the teacher in {t_dir}", flush=True)
    else:
        if state == "train" and t_dir.exists():
            shutil.rmtree(t_dir)
        shutil.rmtree(work / "students", ignore_errors=True)  # distilled from another teacher
        print(f"teacher: {args.teacher_steps} steps -> {t_dir}", flush=True)
        train_teacher_run(tcfg, t_dir, resume=state == "resume")
    teacher = load_run(t_dir)

    # 2. What every job shares: the 35-NFE teacher samples, Inception statistics of the data.
    ref_path = work / f"teacher_ref_{REF_NFE}nfe_n{args.n}_step{teacher.step}.pt"
    if not ref_path.is_file() or state != "reuse":
        x, _ = sample_run(teacher, args.n, TEACHER_REF_SEED, nfe=REF_NFE)
        torch.save(x.clamp(-1, 1), ref_path)
    shared: dict[str, Any] = {"teacher": str(t_dir), "teacher_step": teacher.step, "n": args.n}
    shared |= {
        "teacher_ref": str(ref_path),
        "distill_steps": args.distill_steps,
        "gan_weight": args.gan_weight,
        "disc_taps": disc_taps,
        "ratio_binning": args.ratio_binning,
        "ratio_bins": args.ratio_bins,
        "fake_weighting": args.fake_weighting,
    }
    if args.inception:
        det = Path(args.inception).resolve()
        if not det.is_file():
            raise SystemExit(f"--inception: no such file '{args.inception}'")
        key = zlib.crc32(f"{det}:{det.stat().st_size}:{det.stat().st_mtime_ns}".encode())
        stats = work / f"digits_inception_stats_{key:08x}.npz"  # one per detector file
        if not stats.is_file():
            print("Inception statistics of the data ...", flush=True)
            save_stats(
                stats,
                *feature_stats(InceptionFeatures(args.inception)(load_dataset("digits").images)),
            )
        shared |= {"inception": args.inception, "inception_stats": str(stats)}

    # 3. Jobs: students (long) first, then teacher evaluations; one thread per process.
    jobs = [
        shared
        | {
            "kind": "student",
            "name": d,
            "nfe": 1,
            "gan": gan,
            "seed": s,
            "dir": str(_student_dir(work, d, gan, s)),
        }
        for d in divergences
        for gan in gan_modes
        for s in seeds
    ]
    jobs += [
        shared | {"kind": "teacher", "name": "teacher", "nfe": k, "gan": False, "seed": s}
        for k in nfes
        for s in seeds
    ]
    print(f"{len(jobs)} jobs on {args.jobs} process(es) ...", flush=True)
    if args.jobs <= 1:  # in this process (also when the script is imported, not run)
        rows = [run_job(j) for j in jobs]
    else:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            rows = list(pool.imap_unordered(run_job, jobs, chunksize=1))

    # 4. Throughput, side by side in this process.
    speed_runs = {f"teacher-{k}": (str(t_dir), k) for k in nfes}
    speed_runs |= {
        f"{d}-{'gan' if g else 'nogan'}": (str(_student_dir(work, d, g, seeds[0])), None)
        for d in divergences
        for g in gan_modes
    }
    print("throughput ...", flush=True)
    speed = measure_throughput(speed_runs, args.time_n)

    # 5. Table, figures, raw numbers.
    order = {("teacher", "teacher", k, False): i for i, k in enumerate(nfes)}
    order |= {
        ("student", d, 1, g): len(nfes) + 2 * i + (not g)
        for i, d in enumerate(divergences)
        for g in (True, False)
    }
    keys = [c[0] for c in COLUMNS + LOG_COLUMNS] + ["fid", "train_s", "job_samples_per_s"]
    keys += sorted({k for r in rows for k in r if k.startswith("log_")} - set(keys))
    summary = dict(sorted(aggregate(rows, keys).items(), key=lambda kv: order[kv[0]]))
    info = vars(args) | {"seeds": seeds, "cpus": os.cpu_count(), "teacher_step": teacher.step}
    students = [r for r in rows if r["kind"] == "student"]
    info["train_s"] = statistics.mean(r["train_s"] for r in students) if students else 0.0
    n_reused = sum(r["reused"] for r in students)
    info["reused"] = (
        f"teacher {'reused' if state == 'reuse' else 'trained'}, "
        f"{n_reused} of {len(students)} students reused from {work}"
    )
    info["num_data"] = len(load_dataset("digits"))
    info["taps_text"] = ",".join(disc_taps) if disc_taps else "encoder (every enc*)"
    wall = time.perf_counter() - t_start
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(summary, speed, info, wall, command)
    students_rows = [r for r in rows if r["kind"] == "student"]
    paired = paired_table(
        sorted(students_rows, key=lambda r: (divergences.index(r["name"]), not r["gan"]))
    )
    table += "\n" + "\n".join(paired) + "\n" if paired else ""
    atomic_write_text(table, out_dir / "digits_table.md")
    fid_figure(summary, divergences, out_dir / "digits_fid_vs_nfe.png", bool(args.inception))
    grid_seeds, labels = sample_seeds(0, 20), torch.arange(20) % 10
    blocks = {
        f"teacher\n{REF_NFE} NFE": generate(
            run_sampler(teacher, REF_NFE), teacher.shape, grid_seeds, labels
        )
    }
    for d in divergences:
        student = load_run(_student_dir(work, d, gan_modes[0], seeds[0]))
        blocks[d] = generate(student.model, student.shape, grid_seeds, labels)
    samples_figure(blocks, out_dir / "digits_students.png")
    raw = {"command": command, "wall_s": wall, "args": info, "speed": speed, "rows": rows}
    raw["summary"] = [
        {"group": list(g), **{k: list(v) for k, v in s.items()}} for g, s in summary.items()
    ]
    atomic_write_text(json.dumps(raw, indent=2), work / "results.json")
    print(table)
    print(
        f"wrote {out_dir}/digits_table.md, digits_fid_vs_nfe.png, digits_students.png; "
        f"raw numbers in {work}/results.json"
    )


if __name__ == "__main__":
    main()
