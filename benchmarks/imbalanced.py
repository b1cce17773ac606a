"""Where mode-seeking should bite on images: recovering rare digit classes a student lacks.

Setting (all unconditional, 8x8 digits, the official discriminator settings):

* **target data**: the digits with classes 0-4 kept at 1/10 of their images (about 18 each;
  classes 5-9 whole, about 180 each), so a rare class is ~1.8 % of the data, a common one ~18 %;
* **teacher**: an unconditional EDM UNet trained on the target data (the demo's recipe);
* **warm start**: a student that lacks the rare classes: a second teacher trained on classes
  5-9 only, distilled with reverse KL (``--warm-steps`` iterations); its generator and fake score
  start every run below (the discriminator heads start fresh);
* **runs**: distil the target teacher from that warm start with rkl, js, fkl, hellinger,
  ``--seeds`` each, GAN term off (so the divergence alone moves the student), for a fixed
  budget, under noise settings ``--settings`` ``name:sigma_max``: ``full`` trains on the
  whole noise range of the teacher (sigma up to 80), ``trunc`` only up to a small sigma.

Why it should bite: every divergence's gradient is an expectation over the *student's* noised
samples of ``h(r) * (score_q - score_p)``. A class the student never draws contributes no
samples, so only noise levels where the noised rare and common classes overlap (large sigma)
carry a pull toward it. With the noise range truncated below the distance between classes,
reverse KL (``h = 1``) sees nothing to fix at the missing classes; forward KL (``h = r``) and
JS (``h = r / (r + 1)``) up-weight the student samples where the estimated ``r = p / q`` is
large, i.e. the few samples that lie toward the classes the student under-draws — if the
discriminator ranks them. The table measures whether it does (the logs' logit gap and ``h_cv``).

Metrics (shipped digit classifier, ``--n`` samples): class-histogram total variation against
the teacher's own histogram (35-NFE Heun, the distillation target) and against the data's
class frequencies; the rare classes' share relative to the teacher's; per-class k-NN recall of
the rare classes (the fraction of the teacher's samples of class k inside the student's k-NN
manifold in classifier features); classifier FID against the teacher's samples.

    python benchmarks/imbalanced.py            # about 16 min on 2 CPU cores
    python benchmarks/imbalanced.py --quick    # smoke run into WORK/results

Writes ``benchmarks/results/imbalanced.md`` and ``imbalanced.png``; raw numbers in
``WORK/imbalanced.json``; teachers and runs cached in ``--work`` (``runs/bench-imbalanced``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shlex
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fdistill.config import apply_preset, apply_teacher_preset
from fdistill.data import load_dataset
from fdistill.demo import cached_teacher
from fdistill.distill import FDistill, LossConfig
from fdistill.divergences import get_divergence
from fdistill.metrics import frechet_distance, mean_std, tv_distance
from fdistill.metrics.classifier import (
    class_histogram,
    classifier_features,
    load_classifier,
)
from fdistill.metrics.knn import in_manifold, kth_nn_sq_radii
from fdistill.pipeline import (
    DistillConfig,
    TeacherConfig,
    build_distill,
    distill_run,
    generate,
    image_sampler,
    latent_sampler,
    load_run,
    run_sampler,
    sample_seeds,
    train_teacher_run,
)
from fdistill.runs import atomic_write_text, load_checkpoint
from fdistill.teachers import load_teacher
from fdistill.training import Dist, TrainConfig, make_batch_randoms, train_distill

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_table import apply_quick  # noqa: E402

RARE = (0, 1, 2, 3, 4)
DIVERGENCES = ("rkl", "js", "fkl", "hellinger")
EVAL_SEED, REF_SEED = 3000, 4000  # student / teacher evaluation samples (disjoint)
QUICK = {"teacher_steps": 100, "warm_steps": 10, "steps": 10, "n": 400, "seeds": "0"}
QUICK |= {"divergences": "rkl,fkl", "work": "runs/bench-imbalanced-quick"}


# ----------------------------------------------------------------------------- data, teachers
def make_data(work: Path) -> dict[str, Path]:
    """``target.npz`` (classes 0-4 at 1/10) and ``common.npz`` (classes 5-9 only)."""
    ds = load_dataset("digits")
    keep = torch.ones(len(ds), dtype=torch.bool)
    for c in RARE:
        idx = (ds.labels == c).nonzero().flatten()
        keep[idx[len(idx) // 10 :]] = False  # the first tenth of each rare class stays
    common = ~torch.isin(ds.labels, torch.tensor(RARE))
    out = {}
    for name, mask in (("target", keep), ("common", common)):
        path = work / f"{name}.npz"
        if not path.is_file():
            work.mkdir(parents=True, exist_ok=True)
            np.savez(path, images=ds.images[mask].numpy(), labels=ds.labels[mask].numpy())
        out[name] = path
    return out


def teacher_cfg(data: Path, steps: int) -> TeacherConfig:
    """The demo's teacher recipe, unconditional, on ``data``."""
    t = TeacherConfig(data=str(data), value_range=(-1.0, 1.0), conditional=False, grid_every=0)
    t = apply_teacher_preset(t, "digits")
    return replace(t, train=replace(t.train, steps=steps, seed=0, progress=False))


def ensure_teacher(out: Path, cfg: TeacherConfig) -> None:
    state = cached_teacher(out, cfg)
    if state == "reuse":
        print(f"reusing the teacher in {out}", flush=True)
        return
    if state == "train":
        shutil.rmtree(out, ignore_errors=True)
    print(f"teacher on {Path(cfg.data).name}: {cfg.train.steps} steps -> {out}", flush=True)
    train_teacher_run(cfg, out, resume=state == "resume")


def official_loss(gan_weight: float) -> LossConfig:
    """The official discriminator settings (teacher encoder maps, linear-sigma bins, unweighted
    fake-score loss), with the digits GAN weight or none."""
    return LossConfig(
        gan_weight=gan_weight,
        disc_features="teacher",
        ratio_binning="linear-sigma",
        ratio_bins=10,
        fake_weighting="none",
    )


def train_cfg(steps: int, seed: int) -> TrainConfig:
    digits = apply_preset(DistillConfig(), "digits").train
    return replace(digits, steps=steps, seed=seed, progress=False, ckpt_every=10**9)


# ----------------------------------------------------------------------------- one run
def run_job(job: dict) -> dict:
    """Distil the target teacher from the warm start with one divergence, seed and noise range
    (or reuse the finished run in ``job["dir"]``); then the class metrics of its EMA generator
    and where its discriminator puts the weights."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = Path(job["dir"])
    teacher = load_teacher(job["teacher"])
    cfg = DistillConfig(
        teacher=job["teacher"],
        divergence=job["divergence"],
        loss=official_loss(job["gan_weight"]),
        train=train_cfg(job["steps"], job["seed"]),
    )
    torch.manual_seed(job["seed"])
    m = build_distill(cfg, teacher)
    loss_cfg = replace(m.cfg, sigma_max=job["sigma_max"])  # noise levels of the losses only
    model = FDistill(
        m.teacher, m.generator, m.fake_score, m.head, get_divergence(job["divergence"]), loss_cfg
    )
    reused = _finished(out, job)
    if not reused:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        warm = load_checkpoint(Path(job["warm"]))["state"]
        model.generator.load_state_dict(warm["ema"])
        model.fake_score.load_state_dict(warm["fake_score"])
        ds = load_dataset(job["data"], value_range=(-1.0, 1.0), labels=False)
        cpu = torch.device("cpu")
        train_distill(
            model,
            image_sampler(ds, cpu, False),
            latent_sampler(teacher.info.shape, 0, cpu),
            cfg.train,
            out,
            config={"job": job, "loss": asdict(loss_cfg)},
            gens=make_batch_randoms(job["seed"], Dist()),
        )
    state = load_checkpoint(out)["state"]
    model.head.load_state_dict(state["head"])
    model.generator.load_state_dict(state["ema"])  # evaluate the EMA generator
    model.eval()
    seeds = sample_seeds(EVAL_SEED + job["seed"], job["n"])
    x = generate(model.generator, tuple(teacher.info.shape), seeds)
    row = {k: job[k] for k in ("setting", "sigma_max", "divergence", "seed")}
    row |= class_metrics(x, job)
    row |= weights_by_class(model, x, torch.tensor(row.pop("pred")), job["seed"])
    row |= log_stats(out)
    row["reused"] = reused
    row["seconds"] = time.perf_counter() - t0
    print(
        f"  {row['setting']:<6} {row['divergence']:<9} seed {row['seed']}: TV teacher "
        f"{row['tv_teacher']:.3f}, rare share {row['rare_ratio']:.2f} of the teacher's, "
        f"log gap {row.get('log_disc_gap', float('nan')):.2f}, h_cv "
        f"{row.get('log_h_cv', float('nan')):.2f}, h rare/common "
        f"{row['h_rare_over_common']:.2f} ({row['seconds']:.0f} s)",
        flush=True,
    )
    return row


def _finished(out: Path, job: dict) -> bool:
    """Whether ``out`` holds a finished run of exactly ``job``."""
    if not (out / "config.json").is_file() or not (out / "checkpoint.pt").is_file():
        return False
    saved = json.loads((out / "config.json").read_text()).get("job")
    return saved == json.loads(json.dumps(job)) and load_checkpoint(out)["step"] >= job["steps"]


@torch.no_grad()
def weights_by_class(model: FDistill, x: Tensor, pred: Tensor, seed: int) -> dict[str, float]:
    """Where the discriminator puts the weight on the student's own samples ``x``: noised at
    the losses' noise levels, the normalised ``h`` (as the generator loss computes it) averaged
    over samples the classifier calls rare, divided by its average over common ones (1: the
    weighting ignores the missing classes); and the logit difference between the two groups
    at sigma < 1 (nats; > 0: the discriminator sees that rare-looking samples are too few)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    grid = model.levels.sigma_grid  # the Karras grid the noise levels are drawn from
    idx = torch.randint(len(grid), (len(x),), generator=g)
    sigma = grid[idx]
    x_t = x + sigma[:, None, None, None] * torch.randn(x.shape, generator=g)
    logit = torch.cat(
        [
            model.head(model.teacher(xb, sb, None, return_features="only"))
            for xb, sb in zip(x_t.split(500), sigma.split(500), strict=True)
        ]
    )
    h = model.weights(logit, sigma)
    rare = torch.isin(pred, torch.tensor(RARE))
    low = sigma < 1
    out = {"h_rare_over_common": float(h[rare].mean() / h[~rare].mean())}
    out["logit_rare_minus_common"] = float(logit[rare & low].mean() - logit[~rare & low].mean())
    return out


def class_metrics(x: Tensor, ref: dict) -> dict:
    """Histogram, TVs, rare share, rare per-class recall and cFID against the teacher's samples
    (``ref["teacher_ref"]``: a saved dict of the teacher's samples' features and classes)."""
    clf = load_classifier("digits")
    feats = classifier_features(clf, x.clamp(-1, 1))
    with torch.no_grad():
        pred = clf.head(feats).argmax(1)
    hist = class_histogram(torch.nn.functional.one_hot(pred, 10).float())
    t = torch.load(ref["teacher_ref"], weights_only=True)
    t_hist = t["hist"].double()
    data_hist = torch.tensor(ref["data_hist"], dtype=torch.float64)
    rare = list(RARE)
    out = {
        "pred": pred.tolist(),
        "hist": hist.tolist(),
        "tv_teacher": tv_distance(hist, t_hist),
        "tv_data": tv_distance(hist, data_hist),
        "rare_share": float(hist[rare].sum()),
        "rare_ratio": float(hist[rare].sum() / t_hist[rare].sum()),
        "cfid_teacher": frechet_distance(t["feats"], feats),
    }
    # Per-class recall: teacher samples of class k inside the student's k-NN balls.
    radii = kth_nn_sq_radii(feats, 3)
    inside = in_manifold(t["feats"], feats, radii)
    for k in range(10):
        sel = t["pred"] == k
        out[f"recall_{k}"] = float(inside[sel].double().mean()) if sel.any() else float("nan")
    out["recall_rare"] = float(inside[torch.isin(t["pred"], torch.tensor(rare))].double().mean())
    out["recall_all"] = float(inside.double().mean())
    return out


def log_stats(run: Path, start_frac: float = 0.5) -> dict[str, float]:
    """Means over the second half of a run's ``metrics.jsonl``: discriminator gap and loss, the
    weights' spread."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in recs)
    recs = [r for r in recs if r["step"] > start_frac * last]
    keys = ("disc_gap", "loss_disc", "h_cv", "h_max", "loss_dm")
    out = {}
    for k in keys:
        vals = [r[k] for r in recs if k in r]
        if vals:
            out[f"log_{k}"] = sum(vals) / len(vals)
    return out


# ----------------------------------------------------------------------------- report
def fmt(vals: list[float], d: int = 3) -> str:
    m, s = mean_std(vals)
    return f"{m:.{d}f} ± {s:.{d}f}"


def markdown(rows: list[dict], ref: dict, a: argparse.Namespace, wall: float, cmd: str) -> str:
    divs = [d for d in a.divergences.split(",") if d]
    settings = [s.split(":")[0] for s in a.settings.split(",") if s]
    sig = {s.split(":")[0]: float(s.split(":")[1]) for s in a.settings.split(",") if s}
    seeds = sorted({r["seed"] for r in rows})
    t_hist, d_hist, w = ref["teacher_hist"], ref["data_hist"], ref["warm"]
    cols = (
        ("tv_teacher", "class TV vs teacher ↓", 3),
        ("tv_data", "class TV vs data ↓", 3),
        ("rare_ratio", "rare share / teacher's", 2),
        ("recall_rare", "recall, rare classes", 3),
        ("recall_all", "recall, all", 3),
        ("cfid_teacher", "cFID vs teacher ↓", 2),
        ("h_rare_over_common", "h rare / common", 2),
        ("logit_rare_minus_common", "logit rare − common", 2),
        ("log_disc_gap", "log: disc gap", 2),
        ("log_loss_disc", "log: disc loss", 3),
        ("log_h_cv", "log: h_cv", 3),
        ("log_h_max", "log: h_max", 2),
    )
    pct = lambda h: " / ".join(f"{100 * v:.1f}" for v in h)  # noqa: E731
    lines = [
        "# Rare digit classes: does the divergence decide whether a student recovers them?",
        "",
        f"Regenerate: `{cmd}`  ",
        f"Wall time {wall:.0f} s ({a.jobs} single-thread jobs; "
        f"{sum(r.get('reused', False) for r in rows)} of {len(rows)} runs reused from {a.work}).",
        "",
        f"Target data: digits with classes 0-4 kept at 1/10 ({ref['n_target']} images). Teacher: "
        f"unconditional UNet (demo recipe, {a.teacher_steps} steps) on it. Warm start: a "
        f"teacher on classes 5-9 only ({ref['n_common']} images), distilled with reverse KL for "
        f"{a.warm_steps} iterations; its EMA generator and fake score start every run. Runs: "
        f"{a.steps} iterations (batch 64, critic ratio 5, lr 2e-4), GAN weight "
        f"{a.gan_weight:g}, official discriminator (heads on the teacher's enc8 + enc4 maps, "
        "10 linear-sigma ratio bins, unweighted fake-score loss); noise levels of the losses "
        "from the Karras grid up to sigma_max. Metrics on "
        f"{a.n} samples in the shipped digit classifier's space; the teacher's reference: "
        f"{a.n} 35-NFE Heun samples. Mean ± std over seeds {seeds} (the seed changes the "
        "distillation's draws; the teachers and the warm start are shared).",
        "",
        "Columns: class-histogram TV against the teacher's histogram (the distillation target) "
        "and the data's; the student's share of rare classes over the teacher's; k-NN recall "
        "(k = 3, classifier features) of the teacher's rare-class samples and of all; 'h rare / "
        "common': the mean normalised weight h the run's final discriminator gives the student's "
        "own samples the classifier calls rare, over the mean it gives common ones (noise levels "
        "as in training; 1 = the weighting ignores the deficit); 'logit rare − common': the same "
        "groups' logit difference at σ < 1; 'log:' the run's metrics.jsonl, second half.",
        "",
        "Class histograms (% per class 0..9; classes 0-4 are the rare ones):",
        "",
        f"* data: {pct(d_hist)}",
        f"* teacher (35 NFE): {pct(t_hist)} — TV to data {tv_distance(t_hist, d_hist):.3f}",
        f"* warm start (student before the runs): {pct(w['hist'])} — TV to teacher "
        f"{w['tv_teacher']:.3f}, rare share {w['rare_ratio']:.2f} of the teacher's, rare "
        f"recall {w['recall_rare']:.3f}, cFID vs teacher {w['cfid_teacher']:.2f}",
        "",
    ]
    for st in settings:
        lines += [
            f"## `{st}`: noise levels up to sigma {sig[st]:g}",
            "",
            "| divergence | " + " | ".join(c[1] for c in cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for dv in divs:
            rs = [r for r in rows if r["setting"] == st and r["divergence"] == dv]
            if not rs:
                continue
            cells = [
                fmt([r[k] for r in rs if k in r], d) if k in rs[0] else "—" for k, _, d in cols
            ]
            lines.append(f"| {dv} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Per rare class: k-NN recall of the teacher's class-k samples / student share (%):",
            "",
            "| divergence | " + " | ".join(f"class {k}" for k in RARE) + " |",
            "|---|" + "---:|" * len(RARE),
            "| teacher share | " + " | ".join(f"{100 * t_hist[k]:.1f}" for k in RARE) + " |",
            "| warm start | "
            + " | ".join(f"{w[f'recall_{k}']:.2f} / {100 * w['hist'][k]:.1f}" for k in RARE)
            + " |",
        ]
        for dv in divs:
            rs = [r for r in rows if r["setting"] == st and r["divergence"] == dv]
            if not rs:
                continue
            cells = [
                f"{mean_std([r[f'recall_{k}'] for r in rs])[0]:.2f} / "
                f"{100 * mean_std([r['hist'][k] for r in rs])[0]:.1f}"
                for k in RARE
            ]
            lines.append(f"| {dv} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], ref: dict, a: argparse.Namespace, path: Path) -> None:
    """Class histograms: teacher, warm start and each divergence (mean over seeds) per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s.split(":")[0] for s in a.settings.split(",") if s]
    divs = [d for d in a.divergences.split(",") if d]
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 3.6), squeeze=False)
    k = np.arange(10)
    series = [("teacher", ref["teacher_hist"]), ("warm start", ref["warm"]["hist"])]
    for ax, st in zip(axes[0], settings, strict=True):
        cur = series + [
            (
                dv,
                np.mean(
                    [r["hist"] for r in rows if r["setting"] == st and r["divergence"] == dv], 0
                ),
            )
            for dv in divs
            if any(r["setting"] == st and r["divergence"] == dv for r in rows)
        ]
        wdt = 0.8 / len(cur)
        for i, (name, h) in enumerate(cur):
            ax.bar(k + (i - len(cur) / 2 + 0.5) * wdt, 100 * np.asarray(h), wdt, label=name)
        ax.set_xticks(k)
        ax.set_xlabel("class (0-4 rare)")
        ax.set_ylabel("% of samples")
        ax.set_title(f"{st}: sigma up to {dict(s.split(':') for s in a.settings.split(','))[st]}")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--divergences", default=",".join(DIVERGENCES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--settings", default="full:80,trunc:1", help="name:sigma_max of the losses' noise levels"
    )
    p.add_argument("--steps", type=int, default=200, help="distillation iterations per run")
    p.add_argument("--warm-steps", type=int, default=200, help="iterations of the warm start")
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--gan-weight", type=float, default=0.0)
    p.add_argument("--n", type=int, default=4000, help="samples per evaluation")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work", default="runs/bench-imbalanced")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    given = apply_quick(args, argv, QUICK)
    if args.quick and "out_dir" not in given:
        args.out_dir = str(Path(args.work) / "results")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cmd = "python benchmarks/imbalanced.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    work, out_dir = Path(args.work), Path(args.out_dir)
    data = make_data(work)

    # 1. Teachers: the target, and the common-only one behind the warm start.
    t_dir, c_dir = work / "teacher", work / "teacher-common"
    ensure_teacher(t_dir, teacher_cfg(data["target"], args.teacher_steps))
    ensure_teacher(c_dir, teacher_cfg(data["common"], args.teacher_steps))

    # 2. The warm start: reverse KL from the common-only teacher (cached).
    w_dir = work / "warm"
    want = {"teacher_step": load_run(c_dir).step, "steps": args.warm_steps}
    done = w_dir / "done.json"
    if not done.is_file() or json.loads(done.read_text()) != want:
        shutil.rmtree(w_dir, ignore_errors=True)
        print(f"warm start: rkl, {args.warm_steps} iterations -> {w_dir}", flush=True)
        d = DistillConfig(
            teacher=str(c_dir),
            divergence="rkl",
            loss=official_loss(1e-2),
            grid_every=0,
            train=train_cfg(args.warm_steps, 0),
        )
        distill_run(d, w_dir)
        atomic_write_text(json.dumps(want), done)

    # 3. The teacher's reference samples and the data's class frequencies.
    teacher = load_run(t_dir)
    ref_path = work / f"teacher_ref_n{args.n}_step{teacher.step}.pt"
    if not ref_path.is_file():
        print(f"teacher reference: {args.n} samples, 35 NFE", flush=True)
        x = generate(run_sampler(teacher, 35), teacher.shape, sample_seeds(REF_SEED, args.n))
        clf = load_classifier("digits")
        feats = classifier_features(clf, x.clamp(-1, 1))
        with torch.no_grad():
            pred = clf.head(feats).argmax(1)
        hist = class_histogram(torch.nn.functional.one_hot(pred, 10).float())
        torch.save({"feats": feats, "pred": pred, "hist": hist}, ref_path)
    target = load_dataset(str(data["target"]), value_range=(-1.0, 1.0))
    data_hist = (torch.bincount(target.labels, minlength=10).double() / len(target)).tolist()
    shared = {"teacher_ref": str(ref_path), "data_hist": data_hist}
    warm = load_run(w_dir)
    xw = generate(warm.model, warm.shape, sample_seeds(EVAL_SEED, args.n))
    ref = {
        "teacher_hist": torch.load(ref_path, weights_only=True)["hist"].tolist(),
        "data_hist": data_hist,
        "warm": {k: v for k, v in class_metrics(xw, shared).items() if k != "pred"},
        "n_target": len(target),
        "n_common": len(load_dataset(str(data["common"]), value_range=(-1.0, 1.0), labels=False)),
    }
    print(
        f"teacher hist {[round(v, 3) for v in ref['teacher_hist']]}; warm start: TV teacher "
        f"{ref['warm']['tv_teacher']:.3f}, rare share {ref['warm']['rare_ratio']:.2f}",
        flush=True,
    )

    # 4. The runs.
    settings = [(s.split(":")[0], float(s.split(":")[1])) for s in args.settings.split(",") if s]
    jobs = [
        shared
        | {
            "teacher": str(t_dir),
            "data": str(data["target"]),
            "warm": str(w_dir),
            "setting": name,
            "sigma_max": smax,
            "divergence": dv,
            "seed": int(seed),
            "steps": args.steps,
            "gan_weight": args.gan_weight,
            "n": args.n,
            "dir": str(work / "runs" / f"{name}-{dv}-s{seed}"),
        }
        for name, smax in settings
        for seed in args.seeds.split(",")
        for dv in args.divergences.split(",")
    ]
    print(f"{len(jobs)} runs on {args.jobs} process(es) ...", flush=True)
    if args.jobs <= 1:  # in this process (also when the script is imported, not run)
        rows = [run_job(j) for j in jobs]
    else:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            rows = list(pool.imap_unordered(run_job, jobs, chunksize=1))
    wall = time.perf_counter() - t_start
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, ref, args, wall, cmd)
    atomic_write_text(table, out_dir / "imbalanced.md")
    figure(rows, ref, args, out_dir / "imbalanced.png")
    atomic_write_text(
        json.dumps({"command": cmd, "ref": ref, "rows": rows}, indent=1), work / "imbalanced.json"
    )
    print(table)
    print(f"wrote {out_dir}/imbalanced.md, imbalanced.png; raw numbers in {work}/imbalanced.json")


if __name__ == "__main__":
    main()
