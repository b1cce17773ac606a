"""2-D distillation against an exact Gaussian-mixture teacher: the method, fully observable.

The teacher is a :class:`~fdistill.teachers.GaussianMixture`, so its scores are exact and the
student can be compared with the very distribution it is asked to match; real data are
samples of the mixture. Networks are small MLPs, so a run takes a minute on a CPU.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from fdistill.critic import MultiScaleHead
from fdistill.denoisers import MLP, EDMPrecond
from fdistill.distill import FDistill, LossConfig
from fdistill.divergences import get_divergence
from fdistill.generator import OneStepGenerator
from fdistill.metrics import logr_calibration, mean_std, toy_metrics
from fdistill.runs import atomic_write_text, load_checkpoint
from fdistill.teachers import GaussianMixture
from fdistill.training import TrainConfig, train_distill


@dataclass
class ToyConfig:
    """Everything a toy run depends on (saved as ``config.json``)."""

    divergence: str = "js"
    alpha: float | None = None
    n_modes: int = 8
    radius: float = 2.0
    std: float = 0.1
    weight_spread: float = 10.0
    start_modes: int = 0
    warm_steps: int = 300
    # 64 wide, 2 residual blocks: the default run reaches >= 30 it/s on a 2-core machine with
    # the same quality as the 128 x 3 nets used before (README, "The 2-D toy");
    # benchmarks/toy_modes.py pins 128 x 3, the size its recorded results used
    hidden: int = 64
    depth: int = 2
    n_eval: int = 10_000
    loss: LossConfig = field(
        # the toy's own setting: its exact teacher has no encoder, so the head reads the fake
        # score; noise levels up to 10 and 8 log-sigma ratio bins suit a 2-D mixture
        default_factory=lambda: LossConfig(
            sigma_min=0.01,
            sigma_max=10.0,
            gan_weight=1e-2,
            num_sigmas=500,
            ratio_bins=8,
            ratio_binning="log-sigma",
            fake_weighting="edm",
            disc_features="fake",
            real_sigma="same",
        )
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=1500, batch=256, lr_gen=1e-3, lr_critic=1e-3, ema_decay=0.99, ckpt_every=10**9
        )
    )


def make_teacher(cfg: ToyConfig) -> GaussianMixture:
    """An 8-mode (by default) ring whose weights span ``weight_spread`` geometrically."""
    k = cfg.n_modes
    weights = torch.tensor([cfg.weight_spread ** (i / max(k - 1, 1)) for i in range(k)])
    return GaussianMixture.ring(k, radius=cfg.radius, std=cfg.std, weights=weights)


def data_std(teacher: GaussianMixture) -> float:
    return math.sqrt(float(torch.trace(teacher.covariance())) / teacher.dim)


def build(cfg: ToyConfig, teacher: GaussianMixture) -> FDistill:
    """Student, fake score and discriminator head for a 2-D teacher."""
    sd = data_std(teacher)
    loss_cfg = replace(cfg.loss, sigma_data=sd)

    def denoiser() -> EDMPrecond:
        return EDMPrecond(MLP(teacher.dim, hidden=cfg.hidden, depth=cfg.depth), sigma_data=sd)

    params = {"alpha": cfg.alpha} if cfg.alpha is not None else {}
    fake_score = denoiser()
    return FDistill(
        teacher=_FeaturelessTeacher(teacher),
        generator=OneStepGenerator(denoiser(), sigma_init=cfg.loss.sigma_max),
        fake_score=fake_score,
        # the head reads the fake score's one feature tap, the MLP's last hidden layer
        head=MultiScaleHead.for_network(fake_score, hidden=cfg.hidden),
        divergence=get_divergence(cfg.divergence, **params),
        cfg=loss_cfg,
    )


class _FeaturelessTeacher(torch.nn.Module):
    """The exact mixture as a teacher; it has no encoder, so the head must use the fake score."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x, sigma, cond=None, return_features=False):
        if return_features:
            raise ValueError(
                "the exact mixture teacher has no encoder features: use disc_features='fake'"
            )
        return self.mixture(x, sigma)


def samplers(teacher: GaussianMixture):
    """``(sample_real, sample_latents)`` of the engine's :class:`~fdistill.methods.Inputs`."""

    def sample_real(n: int, gen: torch.Generator):
        return teacher.sample(n, generator=gen, dtype=torch.float32), None

    def sample_latents(n: int, gen: torch.Generator):
        return torch.randn(n, teacher.dim, generator=gen), None

    return sample_real, sample_latents


@torch.no_grad()
def generate(generator: torch.nn.Module, n: int, seed: int, dim: int = 2) -> torch.Tensor:
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return generator(z)


def warm_start(model: FDistill, cfg: ToyConfig, teacher: GaussianMixture) -> None:
    """Pre-train the student on the first ``start_modes`` modes only (reverse KL), so that the
    run starts from a generator that covers part of the teacher, as mode-seeking would leave it."""
    sub = GaussianMixture(
        teacher.means[: cfg.start_modes],
        teacher.covs[: cfg.start_modes],
        teacher.weights[: cfg.start_modes],
    )
    warm = FDistill(
        _FeaturelessTeacher(sub),
        model.generator,
        model.fake_score,
        model.head,
        get_divergence("rkl"),
        replace(model.cfg, gan_weight=0.0),
    )
    real, lat = samplers(sub)
    tcfg = replace(cfg.train, steps=cfg.warm_steps, seed=cfg.train.seed + 7919, progress=False)
    train_distill(warm, real, lat, tcfg)


def run(cfg: ToyConfig, out: str | Path | None = None, quiet: bool = False) -> dict:
    """Train one toy student, evaluate it, and (with ``out``) write config, metrics and a plot."""
    torch.manual_seed(cfg.train.seed)
    teacher = make_teacher(cfg)
    model = build(cfg, teacher)
    out = Path(out) if out is not None else None
    t0 = time.perf_counter()
    start_metrics = None
    if cfg.start_modes:
        warm_start(model, cfg, teacher)
        start = generate(model.generator, cfg.n_eval, seed=cfg.train.seed + 1)
        start_metrics = toy_metrics(start, teacher, generator=torch.Generator().manual_seed(1))
    real, lat = samplers(teacher)
    tcfg = replace(cfg.train, progress=cfg.train.progress and not quiet)
    ema = train_distill(model, real, lat, tcfg, out, config={"toy": asdict(cfg)})
    train_s = time.perf_counter() - t0

    student = generate(ema.module, cfg.n_eval, seed=cfg.train.seed + 1)
    metrics = toy_metrics(student, teacher, generator=torch.Generator().manual_seed(1))
    metrics["train_seconds"] = train_s
    metrics["logr_calibration"] = calibration(model, teacher, cfg)
    if start_metrics is not None:
        metrics["start"] = {k: start_metrics[k] for k in ("mode_coverage", "tv")}
    if out is not None:
        atomic_write_text(json.dumps(metrics, indent=2), out / "metrics.json")
        scatter(teacher, student, out / "samples.png", title=_title(cfg, metrics))
        with open(out / "log.txt", "a") as f:
            f.write(json.dumps({"config": asdict(cfg), "metrics": metrics}, default=str) + "\n")
    return metrics


@torch.no_grad()
def calibration(model: FDistill, teacher: GaussianMixture, cfg: ToyConfig) -> dict:
    """Error of the head's learned log-ratio against the exact ``log p_sigma / q_sigma``.

    Uses the raw (non-EMA) generator, the one the critic was trained against.
    """

    def logr_fn(x, sigma):
        return model.head(model.fake_score(x, sigma, None, return_features="only"))

    samples = generate(model.generator, 8000, seed=cfg.train.seed + 2)
    sigmas = [s for s in (0.1, 0.3, 1.0, 3.0) if cfg.loss.sigma_min <= s <= cfg.loss.sigma_max]
    res = logr_calibration(
        logr_fn,
        teacher,
        samples,
        sigmas,
        n_eval=2000,
        clip=cfg.loss.logit_clip,
        generator=torch.Generator().manual_seed(3),
    )
    return {
        "sigma": res["sigma"],
        "mae": res["mae"],
        "mae_mean": res["mae_mean"],
        "pearson": res["pearson"],
    }


def _title(cfg: ToyConfig, m: dict) -> str:
    return f"{cfg.divergence}: coverage {m['mode_coverage']:.2f}, TV {m['tv']:.3f}"


def scatter(teacher, student, path: Path, title: str = "", ax=None) -> None:
    """Teacher samples (grey) and student samples (colour) on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    t = teacher.sample(len(student), generator=torch.Generator().manual_seed(0))
    ax.scatter(t[:, 0], t[:, 1], s=1, c="0.6", alpha=0.4, label="teacher")
    ax.scatter(student[:, 0], student[:, 1], s=1, c="C3", alpha=0.4, label="student")
    lim = float(teacher.means.abs().max()) * 1.6 + 0.5
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title)
    ax.title.set_fontsize(9)
    if own:
        ax.legend(loc="upper right", markerscale=6, fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


SUMMARY_KEYS = ("mode_coverage", "tv", "precision", "recall", "teacher_loglik")


def _run_job(job: tuple[ToyConfig, str, bool]) -> dict:
    cfg, out, quiet = job
    torch.set_num_threads(1)
    return run(cfg, out, quiet=quiet)


def compare(
    cfg: ToyConfig,
    divergences: list[str],
    seeds: list[int],
    out: str | Path,
    quiet: bool = True,
    jobs: int = 1,
) -> dict[str, dict[str, tuple[float, float]]]:
    """Run every divergence for every seed; write a Markdown table, JSON and one figure.

    ``jobs > 1`` runs that many single-threaded processes side by side.
    """
    out = Path(out)
    grid = [(name, seed) for name in divergences for seed in seeds]
    cfgs = [
        (replace(cfg, divergence=n, train=replace(cfg.train, seed=s)), str(out / f"{n}-s{s}"), True)
        for n, s in grid
    ]
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(jobs) as pool:
            metrics = pool.map(_run_job, cfgs, chunksize=1)
    else:
        metrics = [run(c, o, quiet=q) for c, o, q in cfgs]
    results: dict[str, list[dict]] = {}
    for (name, seed), m in zip(grid, metrics, strict=True):
        results.setdefault(name, []).append(m)
        if not quiet:
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {m[k]:.3f}" for k in SUMMARY_KEYS))
    summary = {
        name: {k: mean_std([r[k] for r in rs]) for k in (*SUMMARY_KEYS, "train_seconds")}
        | {"logr_mae": mean_std([r["logr_calibration"]["mae_mean"] for r in rs])}
        for name, rs in results.items()
    }
    table = markdown_table(summary, len(seeds))
    atomic_write_text(table, out / "compare.md")
    atomic_write_text(
        json.dumps({"summary": summary, "runs": results}, indent=2), out / "compare.json"
    )
    _compare_figure(cfg, divergences, seeds[0], out)
    print(table)
    return summary


def markdown_table(summary: dict, n_seeds: int) -> str:
    cols = [*SUMMARY_KEYS, "logr_mae", "train_seconds"]
    head = "| divergence | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    rows = "".join(
        f"| {name} | " + " | ".join(f"{s[c][0]:.3f} ± {s[c][1]:.3f}" for c in cols) + " |\n"
        for name, s in summary.items()
    )
    return head + rows + f"\nmean ± std over {n_seeds} seed(s).\n"


def _compare_figure(cfg: ToyConfig, divergences: list[str], seed: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = make_teacher(cfg)
    n = len(divergences)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], divergences, strict=True):
        run_dir = out / f"{name}-s{seed}"
        m = json.loads((run_dir / "metrics.json").read_text())
        c = replace(cfg, divergence=name, train=replace(cfg.train, seed=seed))
        model = build(c, teacher)
        ck = load_checkpoint(run_dir)
        model.generator.load_state_dict(ck["state"]["ema"])
        scatter(teacher, generate(model.generator, 4000, seed=seed + 1), run_dir, _title(c, m), ax)
    fig.tight_layout()
    fig.savefig(out / "compare.png")
    plt.close(fig)
