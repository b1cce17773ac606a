"""How well does each discriminator design tell a fixed digits student from the data?

Issue 9's measurement. The student is frozen, so the only thing that differs between the
variants is the discriminator: for the same budget (``--steps`` critic updates, batch 64, the
library's :meth:`fdistill.distill.FDistill.critic_loss`, AdamW at the distillation defaults) we
train only the head (plus the fake-score network for the ``fake`` feature source, which is
trained by its denoising loss and the head's loss together, as DMD2 does) and then measure, on
held-out batches at fixed noise levels:

* the logit gap ``mean logit(real) - mean logit(fake)`` (nats; 0 = blind; at the optimum it is
  ``KL(p_t || q_t) + KL(q_t || p_t)``, the Jeffreys divergence between the noised sets);
* the discriminator loss ``softplus(-logit_real) + softplus(logit_fake)`` (``2 ln 2 = 1.386``
  at chance).

Variants (``--variants``): ``teacher-mid`` (the old design: one head on the frozen teacher's
bottleneck), ``teacher-enc`` (the official design: one head per encoder resolution of the
frozen teacher, logits averaged; 8x8 and 4x4 on digits), ``fake-enc`` and ``fake-mid`` (the
fake score's encoder maps / bottleneck, trained with the head; DMD2 puts its classifier on the
fake score's bottleneck).

Students (``--students``): ``init`` (the teacher's own one step, where every student starts)
and ``js200`` (a 200-iteration JS student distilled with the official settings: the table's
budget). Real images are split: the discriminator trains on 1,497 digits and is evaluated on
the 300 it never saw (and, to expose memorisation, on 300 of those it trained on); fake
evaluation samples use seeds the training never drew.

    python benchmarks/disc_gap.py                  # 15-20 min on 2 shared CPU cores
    python benchmarks/disc_gap.py --quick          # smoke run, writes into WORK/results

Writes ``benchmarks/results/disc_gap.md`` and ``WORK/disc_gap.json``; the teacher is the one
``benchmarks/results_table.py`` uses (cached in ``--work``, default ``runs/bench-digits``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shlex
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from fdistill.critic import feature_taps_of
from fdistill.data import ImageDataset, load_dataset
from fdistill.demo import DemoConfig, cached_teacher, distill_config, teacher_config
from fdistill.denoisers.registry import copy_denoiser
from fdistill.distill import FDistill
from fdistill.generator import OneStepGenerator
from fdistill.loss import discriminator_loss
from fdistill.metrics import mean_std
from fdistill.pipeline import (
    DistillConfig,
    apply_preset,
    build_distill,
    distill_run,
    generate,
    image_sampler,
    latent_sampler,
    load_run,
    sample_seeds,
    seeded_labels,
    train_teacher_run,
)
from fdistill.runs import atomic_write_text
from fdistill.teachers import load_teacher
from fdistill.training import Dist, make_batch_randoms, optimizer_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_table import apply_quick  # noqa: E402

VARIANTS = {  # name: (feature source, taps; None = every encoder map)
    "teacher-mid": ("teacher", ("mid",)),
    "teacher-enc": ("teacher", None),
    "fake-enc": ("fake", None),
    "fake-mid": ("fake", ("mid",)),
}
STUDENTS = ("init", "js200")
SIGMAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
HELD_OUT = 300
SPLIT_SEED = 1234
EVAL_FAKE_SEED = 7777  # sample_seeds(7777, n): far from the training streams
QUICK = {"steps": 30, "evals": "10,30", "teacher_steps": 100, "student_steps": 10}
QUICK |= {"work": "runs/bench-digits-quick", "variants": "teacher-mid,fake-enc"}


def official(d: DistillConfig) -> DistillConfig:
    """The official discriminator settings on top of a digits config: every encoder map of the
    teacher, 10 linear-sigma ratio bins, the unweighted fake-score loss."""
    loss = replace(d.loss, ratio_binning="linear-sigma", ratio_bins=10, fake_weighting="none")
    return replace(d, disc_taps=None, loss=loss)


def split_data(ds: ImageDataset) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """(train, held-out, a same-size slice of train) of the digits, by a fixed permutation."""
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(SPLIT_SEED))
    held, train = perm[:HELD_OUT], perm[HELD_OUT:]

    def sub(idx: Tensor, name: str) -> ImageDataset:
        return ImageDataset(ds.images[idx], ds.labels[idx], num_classes=ds.num_classes, name=name)

    return sub(train, "train"), sub(held, "held-out"), sub(train[:HELD_OUT], "train-slice")


# ----------------------------------------------------------------------------- one job
def build_model(teacher_dir: str, student: str, work: Path, variant: str) -> FDistill:
    """FDistill with the variant's discriminator and the fixed student as its generator."""
    source, taps = VARIANTS[variant]
    teacher = load_teacher(teacher_dir)
    d = official(apply_preset(DistillConfig(teacher=teacher_dir), "digits"))
    cfg = replace(d, disc_taps=taps, loss=replace(d.loss, disc_features=source))
    model = build_distill(cfg, teacher)
    if student == "init":
        gen = OneStepGenerator(copy_denoiser(teacher), sigma_init=teacher.info.sigma_max)
    else:
        gen = load_run(work / "disc_gap" / f"student-{student}").model
    model.generator = gen.requires_grad_(False).eval()
    if source == "teacher":  # only the head learns; skip the fake score's weight gradients
        model.fake_score.requires_grad_(False)
    return model


@torch.no_grad()
def held_out_eval(model: FDistill, sets: dict[str, tuple[Tensor, Tensor]], reps: int) -> dict:
    """Per noise level: logit gap and discriminator loss of each real set against held-out
    student samples (``reps`` noise draws per image), and the logits' spread."""
    source = model.teacher if model.cfg.disc_features == "teacher" else model.fake_score
    was = model.fake_score.training
    model.fake_score.eval()
    fake_x, fake_c = sets["fake"]
    g = torch.Generator().manual_seed(99)
    out: dict[str, dict[str, float]] = {}
    for s in SIGMAS:

        def logits(x: Tensor, c: Tensor, s: float = s) -> Tensor:
            x = x.repeat(reps, 1, 1, 1)
            c = c.repeat(reps)
            sig = torch.full((len(x),), s)
            x_t = x + s * torch.randn(x.shape, generator=g)
            return torch.cat(
                [
                    model.head(source(xb, sb, cb, return_features="only"))
                    for xb, sb, cb in zip(x_t.split(512), sig.split(512), c.split(512), strict=True)
                ]
            )

        lf = logits(fake_x, fake_c)
        row = {"fake_logit_std": float(lf.std())}
        for name in ("held", "train"):
            lr = logits(*sets[name])
            n = min(len(lr), len(lf))
            row[f"gap_{name}"] = float(lr.mean() - lf.mean())
            row[f"loss_{name}"] = float(discriminator_loss(lr[:n], lf[:n]).mean())
        out[f"{s:g}"] = row
    model.fake_score.train(was)
    return out


def run_job(job: dict) -> dict:
    """Train one discriminator variant against one fixed student; evaluate at ``evals``."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    work = Path(job["work"])
    model = build_model(job["teacher"], job["student"], work, job["variant"])
    train, held, train_slice = split_data(load_dataset("digits"))
    seeds = sample_seeds(EVAL_FAKE_SEED, HELD_OUT)
    labels = seeded_labels(seeds, 10)
    fake = generate(model.generator, (1, 8, 8), seeds, labels)
    sets = {
        "fake": (fake, labels),
        "held": (held.images, held.labels),
        "train": (train_slice.images, train_slice.labels),
    }
    params = [p for p in model.critic_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=job["lr"], betas=(0.9, 0.999), weight_decay=1e-2)
    gens = make_batch_randoms(job["seed"], Dist())
    sample_real = image_sampler(train, torch.device("cpu"), True)
    sample_latents = latent_sampler((1, 8, 8), 10, torch.device("cpu"))
    evals, logged, history = sorted(job["evals"]), [], {}
    if 0 in evals:
        history[0] = held_out_eval(model, sets, job["reps"])
    for step in range(1, job["steps"] + 1):
        x_real, c_real = sample_real(job["batch"], gens["data"])
        z, c = sample_latents(job["batch"], gens["noise"])
        loss, stats = model.critic_loss(z, c, x_real, c_real, gens["noise"])
        optimizer_step(opt, params, loss, stats, step=step, grad_clip=10.0, world=1)
        logged.append({k: float(stats[k]) for k in ("loss_disc", "disc_gap", "loss_dsm")})
        if step in evals:
            history[step] = held_out_eval(model, sets, job["reps"])
    tail = logged[-max(1, len(logged) // 10) :]  # the last 10% of steps, as the logs show them
    row = {k: job[k] for k in ("variant", "student", "seed")}
    row["taps"] = list(feature_taps_of(_source(model)).feature_taps)
    row["train_log"] = {k: sum(r[k] for r in tail) / len(tail) for k in tail[0]}
    row["history"] = {str(k): v for k, v in history.items()}
    row["seconds"] = time.perf_counter() - t0
    last = history[max(history)]
    print(
        f"  {row['student']:>6} {row['variant']:<12} seed {row['seed']}: held-out gap "
        + ", ".join(f"s={s} {last[s]['gap_held']:.2f}" for s in ("0.01", "0.1", "1", "10"))
        + f"  ({row['seconds']:.0f} s)",
        flush=True,
    )
    return row


def _source(model: FDistill):
    return model.teacher if model.cfg.disc_features == "teacher" else model.fake_score


# ----------------------------------------------------------------------------- report
def markdown(rows: list[dict], a: argparse.Namespace, wall: float, command: str) -> str:
    """Tables: held-out gap and loss per noise level after the full budget, their growth over
    training, and the gap on training images (memorisation)."""
    variants = [v for v in a.variants.split(",") if v]
    students = [s for s in a.students.split(",") if s]
    seeds = sorted({r["seed"] for r in rows})
    final = str(max(int(k) for k in rows[0]["history"]))

    def cell(st: str, v: str, step: str, s: str, key: str, d: int = 2) -> str:
        vals = [
            r["history"][step][s][key]
            for r in rows
            if r["student"] == st and r["variant"] == v and step in r["history"]
        ]
        if not vals:
            return "—"
        m, e = mean_std(vals)
        return f"{m:.{d}f} ± {e:.{d}f}" if len(vals) > 1 else f"{m:.{d}f}"

    sig = [f"{s:g}" for s in SIGMAS]
    desc = {
        "init": "the teacher's own one step (every student's starting point; cFID ~89)",
        "js200": f"a {a.student_steps}-iteration JS student, official settings (cFID ~3)",
    }
    lines = [
        "# Discriminator designs on a fixed digits student: logit gap and loss per noise level",
        "",
        f"Regenerate: `{command}`  ",
        f"Wall time {wall:.0f} s ({a.jobs} single-thread jobs). Each variant trains for "
        f"{final} critic updates (batch {a.batch}, AdamW lr {a.lr:g}, `FDistill.critic_loss`, "
        f"noise levels drawn as in distillation) against a frozen student; only the head learns "
        f"(with `fake-*`, the fake score too, by its denoising loss plus the head's). Held-out: "
        f"{HELD_OUT} digits the discriminator never saw against {HELD_OUT} student samples of "
        f"unseen seeds, {a.reps} noise draws each. Mean ± std over discriminator seeds {seeds}.",
        "",
        "Logit gap = mean logit(real) − mean logit(fake), in nats (0: blind). Loss = "
        "softplus(−logit_real) + softplus(logit_fake); chance is 2 ln 2 = 1.386.",
        "",
        "Variants: " + "; ".join(f"`{v}` = {VARIANTS[v][0]} features, taps "
                                 f"{','.join(VARIANTS[v][1]) if VARIANTS[v][1] else 'enc8,enc4'}"
                                 for v in variants) + ".",
        "",
    ]  # fmt: skip
    for st in students:
        lines += [f"## Student `{st}`: {desc.get(st, st)}", ""]
        for key, title, d in (
            ("gap_held", "held-out logit gap (nats) ↑", 2),
            ("loss_held", "held-out discriminator loss ↓", 3),
        ):
            lines += [
                f"**{title}, after {final} updates**",
                "",
                "| variant | " + " | ".join(f"σ={s}" for s in sig) + " |",
                "|---|" + "---:|" * len(sig),
            ]
            for v in variants:
                lines.append(
                    f"| {v} | " + " | ".join(cell(st, v, final, s, key, d) for s in sig) + " |"
                )
            lines.append("")
        steps = sorted({int(k) for r in rows for k in r["history"]})
        lines += [
            "**held-out logit gap at σ=0.01 / 0.1 / 1 over training (updates)**",
            "",
            "| variant | " + " | ".join(str(k) for k in steps) + " |",
            "|---|" + "---:|" * len(steps),
        ]
        for v in variants:
            lines.append(
                f"| {v} | "
                + " | ".join(
                    " / ".join(cell(st, v, str(k), s, "gap_held").split(" ±")[0]
                               for s in ("0.01", "0.1", "1"))
                    for k in steps
                )
                + " |"
            )  # fmt: skip
        lines += [
            "",
            "**memorisation: logit gap on 300 training digits minus held-out, after "
            f"{final} updates** (σ=0.01 / 0.1 / 1); and the training log's own numbers "
            "(mean over the last 10% of updates, all noise levels mixed)",
            "",
            "| variant | train − held-out gap | log: disc_gap | log: loss_disc |",
            "|---|---:|---:|---:|",
        ]
        for v in variants:
            rs = [r for r in rows if r["student"] == st and r["variant"] == v]
            if not rs:
                continue
            ev = [r["history"][final] for r in rs]
            mem = " / ".join(
                f"{mean_std([e[s]['gap_train'] - e[s]['gap_held'] for e in ev])[0]:.2f}"
                for s in ("0.01", "0.1", "1")
            )
            lg = mean_std([r["train_log"]["disc_gap"] for r in rs])
            ll = mean_std([r["train_log"]["loss_disc"] for r in rs])
            lines.append(f"| {v} | {mem} | {lg[0]:.2f} ± {lg[1]:.2f} | {ll[0]:.3f} ± {ll[1]:.3f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--students", default=",".join(STUDENTS))
    p.add_argument("--seeds", default="0,1", help="discriminator seeds")
    p.add_argument("--steps", type=int, default=1000, help="critic updates per variant")
    p.add_argument("--evals", default="0,100,300,1000", help="updates after which to evaluate")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--reps", type=int, default=4, help="noise draws per held-out image")
    p.add_argument("--teacher-steps", type=int, default=DemoConfig.teacher_steps)
    p.add_argument("--student-steps", type=int, default=200, help="iterations of the js student")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work", default="runs/bench-digits")
    p.add_argument("--out", default="benchmarks/results/disc_gap.md")
    p.add_argument("--quick", action="store_true", help="smoke run with tiny budgets")
    args = p.parse_args(argv)
    given = apply_quick(args, argv, QUICK)
    if args.quick:
        if "out" not in given:
            args.out = str(Path(args.work) / "results" / "disc_gap.md")
        if "seeds" not in given:
            args.seeds = "0"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/disc_gap.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    work = Path(args.work)
    for v in args.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r}; valid: {', '.join(VARIANTS)}")
    students = [s for s in args.students.split(",") if s]
    for s in students:
        if s not in STUDENTS:
            raise SystemExit(f"--students: unknown {s!r}; valid: {', '.join(STUDENTS)}")

    t_dir = work / "teacher"
    tcfg = teacher_config(DemoConfig(teacher_steps=args.teacher_steps, seed=0))
    state = cached_teacher(t_dir, tcfg)
    if state != "reuse":
        if state == "train":
            shutil.rmtree(t_dir, ignore_errors=True)
        print(f"teacher: {args.teacher_steps} steps -> {t_dir}", flush=True)
        train_teacher_run(tcfg, t_dir, resume=state == "resume")
    if "js200" in students:
        s_dir = work / "disc_gap" / "student-js200"
        done = s_dir / "done.json"
        want = {"teacher_step": load_run(t_dir).step, "steps": args.student_steps}
        if not done.is_file() or json.loads(done.read_text()) != want:
            print(f"student: js, {args.student_steps} iterations -> {s_dir}", flush=True)
            d = official(distill_config(DemoConfig(distill_steps=args.student_steps), t_dir))
            d = replace(d, grid_every=0, train=replace(d.train, progress=False))
            shutil.rmtree(s_dir, ignore_errors=True)
            distill_run(d, s_dir)
            atomic_write_text(json.dumps(want), done)

    evals = sorted({int(k) for k in args.evals.split(",") if k} | {args.steps})
    evals = [k for k in evals if k <= args.steps]
    jobs = [
        {
            "teacher": str(t_dir),
            "work": str(work),
            "student": st,
            "variant": v,
            "seed": int(seed),
            "steps": args.steps,
            "evals": evals,
            "batch": args.batch,
            "lr": args.lr,
            "reps": args.reps,
        }
        for seed in args.seeds.split(",")
        for st in students
        for v in args.variants.split(",")
    ]
    print(f"{len(jobs)} discriminators on {args.jobs} process(es) ...", flush=True)
    if args.jobs <= 1:  # in this process (also when the script is imported, not run)
        rows = [run_job(j) for j in jobs]
    else:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            rows = list(pool.imap_unordered(run_job, jobs, chunksize=1))
    rows.sort(key=lambda r: (r["student"], r["variant"], r["seed"]))
    wall = time.perf_counter() - t_start
    table = markdown(rows, args, wall, command)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(table, out)
    atomic_write_text(
        json.dumps({"command": command, "rows": rows}, indent=1), work / "disc_gap.json"
    )
    print(table)
    print(f"wrote {out}; raw numbers in {work / 'disc_gap.json'}")


if __name__ == "__main__":
    main()
