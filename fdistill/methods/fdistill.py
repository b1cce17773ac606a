"""The f-distill method: the critic step and the generator step (DESIGN.md section 1).

:class:`FDistill` holds the frozen teacher, the student generator, the fake-score denoiser
and the discriminator head, and computes both losses. It knows nothing of data loading,
optimisers or processes: its :meth:`FDistill.plan` tells the engine (:func:`fdistill.engine.train`)
to run ``critic_ratio`` critic updates, then one generator update, and to average the generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fdistill import rng
from fdistill.critic import MultiScaleHead, feature_taps_of
from fdistill.denoisers.base import Features, sigma_view
from fdistill.divergences import Divergence
from fdistill.generator import Student
from fdistill.loss import (
    RATIO_BINNINGS,
    FDistillWeights,
    RatioNormalizer,
    SigmaBins,
    approx_r1_penalty,
    discriminator_loss,
    distribution_matching_loss,
    gan_generator_loss,
    r1_penalty,
)
from fdistill.methods.base import Inputs, Method, Optimizer, Phase, Plan, Streams
from fdistill.noise_levels import (
    OFFICIAL_T_RANGE,
    DiscreteTimeLevels,
    KarrasGridLevels,
    TimestepBins,
)
from fdistill.options import comma_list, option
from fdistill.samplers import guide

FEATURE_SOURCES = ("fake", "teacher")
NOISE_LEVELS = ("auto", "karras", "timestep")
R1_FORMS = ("exact", "approx", "off")


FAKE_WEIGHTINGS = ("edm", "none")


@dataclass
class LossConfig:
    """Hyperparameters of the f-distill losses. Defaults: paper Table 5 (CIFAR-10) and, where
    the paper is silent, the official code (discriminator on the teacher's encoder, 10 ratio
    bins linear in sigma, unweighted fake-score loss).

    ``ratio_binning``: noise-level bins of the ratio normalisation, ``"log-sigma"`` (equal width
    in log sigma) or ``"linear-sigma"`` (equal width in sigma, the official code, which uses
    ``ratio_bins=10``); ``ratio_bins``: their number; they also break the critic's statistics
    down by noise level. ``fake_weighting``: the fake score's denoising loss, ``"edm"`` (EDM's
    ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2``) or ``"none"`` (the
    unweighted x0 error, the official code).
    """

    sigma_min: float = option(0.002, help="smallest noise level (set from the teacher)", cli=False)
    sigma_max: float = option(80.0, help="largest noise level (set from the teacher)", cli=False)
    rho: float = option(7.0, help="Karras grid exponent of the noise levels", cli=False)
    num_sigmas: int = option(1000, help="points of the Karras noise-level grid", cli=False)
    gan_weight: float = option(1e-3, help="weight of the GAN term of the generator loss")
    r1_gamma: float = option(0.0, help="R1 penalty weight (0: off)")
    r1: str = option(
        "exact",
        help="R1 form when --r1-gamma > 0: the exact gradient penalty 0.5*gamma*|grad logit|^2 "
        "(a double backward), the official approximation gamma*mean((logit(x) - "
        "logit(x + 0.1 eps))^2), or off",
        choices=R1_FORMS,
        legacy="exact",
    )
    logit_clip: float = option(10.0, help="clip of the discriminator logit (log r)")
    r_clip: tuple[float, float] = option(
        (0.1, 20.0), help="clip of the density ratio r before normalisation", cli=False
    )
    normalize: bool = option(True, help="no two-stage normalisation", negate="--no-normalize")
    ratio_bins: int = option(10, help="noise-level bins of the ratio normalisation")
    ratio_binning: str = option(
        "auto",
        help="variable of the ratio normalisation's bins (auto, the official code: linear in "
        "the timestep for a discrete-time teacher, in sigma for an EDM teacher)",
        choices=("auto", *RATIO_BINNINGS, "linear-timestep"),
    )
    noise_levels: str = option(
        "auto",
        help="noise levels of every loss (auto, the official code: uniform timesteps over "
        "--t-range for a discrete-time teacher, a uniform index into the Karras grid for an "
        "EDM teacher)",
        choices=NOISE_LEVELS,
        legacy="karras",
    )
    t_range: tuple[int, int] = option(
        OFFICIAL_T_RANGE,
        help="timesteps a discrete-time teacher's noise levels are drawn from (official SD "
        "f-distill: 1,999; DMD2: 20,980)",
        parse=comma_list(int, 2, "two integers T_MIN,T_MAX"),
        metavar="T_MIN,T_MAX",
        legacy=OFFICIAL_T_RANGE,
    )
    real_sigma: str = option(
        "independent",
        help="noise levels of the discriminator's real batch: their own draw (independent, "
        "the official code) or the fake batch's (same)",
        choices=("independent", "same"),
        legacy="same",
    )
    ratio_ema: float = option(0.0, help="EMA of the ratio normaliser's bin means (0: none)")
    weighting: str = option(
        "dmd", help="distribution-matching weight: dmd or score", choices=("dmd", "score")
    )
    fake_weighting: str = option(
        "none",
        help="fake-score loss: unweighted x0 error (official) or EDM's lambda weighting",
        choices=FAKE_WEIGHTINGS,
    )
    disc_features: str = option(
        "teacher",
        help="discriminator on the frozen teacher encoder (official) or on the fake-score "
        "encoder, trained with it (DMD2)",
        choices=FEATURE_SOURCES,
    )
    guidance: float = option(1.0, help="CFG scale of the teacher (class labels or text)")
    sigma_data: float = option(0.5, help="data standard deviation (from the teacher)", cli=False)

    def validate(self) -> None:
        """Raise ``ValueError`` (one line) for an option value outside its accepted set."""
        choices = {
            "disc_features": FEATURE_SOURCES,
            "fake_weighting": FAKE_WEIGHTINGS,
            "ratio_binning": ("auto", *RATIO_BINNINGS, "linear-timestep"),
            "noise_levels": NOISE_LEVELS,
            "r1": R1_FORMS,
            "real_sigma": ("independent", "same"),
            "weighting": ("dmd", "score"),
        }
        for name, ok in choices.items():
            if getattr(self, name) not in ok:
                raise ValueError(
                    f"loss option {name} must be one of {', '.join(ok)}, "
                    f"got {getattr(self, name)!r}"
                )
        if int(self.ratio_bins) < 1:
            raise ValueError(
                f"loss option ratio_bins must be an integer >= 1, got {self.ratio_bins}"
            )


def resolved_levels(cfg: LossConfig, discrete: bool) -> tuple[str, str]:
    """``(noise_levels, ratio_binning)`` with "auto" resolved for a teacher's time
    parameterisation (``discrete``: a DDPM-style schedule), as the official code does; one line
    for a choice the teacher cannot take."""
    levels = (
        cfg.noise_levels if cfg.noise_levels != "auto" else ("timestep" if discrete else "karras")
    )
    binning = cfg.ratio_binning
    if binning == "auto":
        binning = "linear-timestep" if discrete else "linear-sigma"
    if not discrete and "timestep" in (levels, binning.split("-")[-1]):
        raise ValueError(
            "--noise-levels timestep and --ratio-binning linear-timestep need a discrete-time "
            "teacher (a diffusers DDPM or Stable Diffusion schedule)"
        )
    return levels, binning


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Temporarily stop weight gradients of ``modules`` (inputs still get gradients)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _host(values: dict[str, Tensor], binned: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Statistics as detached float 0-dim tensors where they were computed: no host sync.

    ``binned`` maps a name to ``[2, num_bins]`` (sum, count) rows, kept as ``name/bins``; at a
    logging step :func:`fdistill.training.host_stats` turns them into ``name/bin<k>`` means
    (empty bins left out) with one device-to-host copy for everything.
    """
    out = {k: v.detach().float() for k, v in values.items()}
    return out | {f"{name}/bins": b.detach().float() for name, b in (binned or {}).items()}


class FDistill(Method):
    """Teacher, student, fake score and discriminator head, with the two f-distill losses.

    The head reads the encoder features of the teacher (``disc_features="teacher"``, frozen,
    as the official code does) or of the fake score (``"fake"``, trained with the head): a
    list of maps, one per tap the feature network selects (``set_feature_taps``). A
    :class:`MultiScaleHead` must be built for exactly those maps.
    """

    def __init__(
        self,
        teacher: nn.Module,
        generator: nn.Module,
        fake_score: nn.Module,
        head: nn.Module,
        divergence: Divergence,
        cfg: LossConfig,
        schedule: object | None = None,
    ):
        super().__init__()
        cfg.validate()
        self.teacher, self.generator, self.fake_score, self.head = (
            teacher,
            generator,
            fake_score,
            head,
        )
        self.teacher.requires_grad_(False).eval()
        self.cfg = cfg
        self._needs_real = False  # a forward-input K-step student reads real data (plan())
        source = teacher if cfg.disc_features == "teacher" else fake_score
        if isinstance(head, MultiScaleHead):
            maps = feature_taps_of(source).selected_feature_maps()
            if tuple(maps) != head.maps:
                raise ValueError(
                    f"the discriminator head reads {[m.name for m in head.maps]} but the "
                    f"{cfg.disc_features} network's selected feature taps are "
                    f"{[m.name for m in maps]}: build it with MultiScaleHead.for_network"
                )
        # The time parameterisation decides the noise levels and the ratio bins ("auto"):
        # ``schedule`` (a discrete-time teacher's, with ``alphas_cumprod``) or EDM sigmas.
        levels, binning = resolved_levels(cfg, schedule is not None)
        if levels == "timestep":
            self.levels = DiscreteTimeLevels.from_schedule(schedule, *cfg.t_range)
        else:
            self.levels = KarrasGridLevels(cfg.sigma_min, cfg.sigma_max, cfg.rho, cfg.num_sigmas)
        bins = (cfg.sigma_min, cfg.sigma_max, cfg.ratio_bins)
        if binning == "linear-timestep":
            self.sigma_bins = TimestepBins(schedule.alphas_cumprod, cfg.ratio_bins)
        else:
            self.sigma_bins = SigmaBins(*bins, binning)
        normalizer = (
            RatioNormalizer(*bins, cfg.r_clip, cfg.ratio_ema, bins=self.sigma_bins)
            if cfg.normalize
            else None
        )
        # The normaliser's bins also break the discriminator's statistics down.
        self.weights = FDistillWeights(divergence, cfg.logit_clip, normalizer)

    kind = "distill"
    trained = ("generator", "fake_score", "head")

    def plan(self, cfg) -> Plan:
        """``cfg.critic_ratio`` critic updates (fake score and head, ``cfg.lr_critic``), then one
        generator update (``cfg.lr_gen``); the generator is averaged. With R1 the
        discriminator's feature network is differentiated twice, which compiled graphs
        (AOT autograd) do not support: that network stays eager."""
        # decided before the engine wraps the student (a DDP wrapper hides its attributes)
        self._needs_real = isinstance(self.generator, Student) and self.generator.needs_real_data
        r1_net = None
        if self.cfg.r1_gamma > 0 and self.cfg.r1 == "exact":
            r1_net = "teacher" if self.cfg.disc_features == "teacher" else "fake_score"
        return Plan(
            optimizers={
                "opt_g": Optimizer(("generator",), cfg.lr_gen),
                "opt_c": Optimizer(("fake_score", "head"), cfg.lr_critic),
            },
            phases=(
                Phase("critic", "opt_c", self.critic_phase, cfg.critic_ratio, "grad_norm_critic"),
                Phase(
                    "generator",
                    "opt_g",
                    self.generator_phase,
                    1,
                    "grad_norm_gen",
                    # the ratio normaliser's bin and batch means: of the whole batch
                    prepare=self.generator_prepass if self.weights.normalizer else None,
                    fixed=self.whole_batch_weights,
                ),
            ),
            ema="generator",
            compile=("generator", "fake_score"),
            eager=("fake_score",) if r1_net == "fake_score" else (),
            compile_frozen=() if r1_net == "teacher" else (self.teacher,),
        )

    def state_objects(self) -> dict[str, object]:
        return {"weights": self.weights}

    def critic_phase(self, inputs: Inputs, n: int, streams: Streams):
        """One critic loss on a fresh batch: real data from ``streams["data"]``, the student's
        inputs and every noise draw from ``streams["noise"]``."""
        x_real, c_real = inputs.real(n, streams["data"])
        z, c, x_student = self._student_inputs(inputs, n, streams)
        return self.critic_loss(z, c, x_real, c_real, streams["noise"], x_student=x_student)

    def generator_phase(self, inputs: Inputs, n: int, streams: Streams):
        """One generator loss on fresh student inputs (all draws from ``streams["noise"]``)."""
        z, c, x_student = self._student_inputs(inputs, n, streams)
        return self.generator_loss(z, c, streams["noise"], x_student=x_student)

    @torch.no_grad()
    def generator_prepass(self, inputs: Inputs, n: int, streams: Streams) -> Tensor:
        """``[n, 2]`` rows ``(logit, sigma)`` of the generator phase's samples: the same draws
        as :meth:`generator_phase` makes and the same logits its loss weights by, without
        gradients (for exact micro-batch accumulation with the ratio normaliser)."""
        z, c, x_student = self._student_inputs(inputs, n, streams)
        gen = streams["noise"]
        x = self.student_sample(z, c, gen, x_student)
        sigma = self.sample_sigma(x.shape[0], gen).to(x.dtype)
        x_t = self._noise(x, sigma, gen)
        feature_net = self.fake_score if self.cfg.disc_features == "fake" else self.teacher
        logit = self.head(feature_net(x_t, sigma, c, return_features="only"))
        return torch.stack([logit.float(), sigma.float()], 1)

    def whole_batch_weights(self, rows: Tensor) -> contextlib.AbstractContextManager:
        """Inside the block the weights ``h`` are normalised by the statistics of ``rows``
        (every micro-batch's :meth:`generator_prepass`)."""
        return self.weights.fixed(rows[:, 0].contiguous(), rows[:, 1].contiguous())

    def _student_inputs(self, inputs: Inputs, n: int, streams: Streams):
        """``(z, cond, x_student)``: the student's noise and conditioning, and for a K-step
        student trained on forward-noised data (``student_inputs="forward"``) a real batch of
        its own (whose conditioning it then generates for)."""
        z, c = inputs.latents(n, streams["noise"])
        if not self._needs_real:
            return z, c, None
        x_student, c = inputs.real(n, streams["data"])
        return z, c, x_student

    def critic_parameters(self) -> list[nn.Parameter]:
        return [*self.fake_score.parameters(), *self.head.parameters()]

    def student_sample(
        self,
        z: Tensor,
        cond: Tensor | None,
        generator: rng.RandomSource = None,
        x_student: Tensor | None = None,
    ) -> Tensor:
        """The student's training sample ``x0``: one step from ``z`` (K = 1), or K-step
        backward simulation / forward-noised ``x_student`` (:class:`fdistill.generator.Student`),
        through ``self.generator`` so a DDP wrapper syncs its gradients."""
        return self.generator(z, cond, generator, train=True, x_real=x_student).x0

    def sample_sigma(self, n: int, generator: rng.RandomSource = None) -> Tensor:
        """Noise levels of ``n`` samples (:mod:`fdistill.noise_levels`): a uniform index into
        the Karras grid, extremes excluded, or uniform timesteps of a discrete-time teacher."""
        return self.levels.sample(n, generator)

    def _teacher(self, x_t: Tensor, sigma: Tensor, cond: Tensor | None, features: Features):
        """Teacher denoiser with optional classifier-free guidance, features from the cond pass
        (``features``: a ``return_features`` mode; False for none)."""
        out = (
            self.teacher(x_t, sigma, cond, return_features=features)
            if features
            else (self.teacher(x_t, sigma, cond), None)
        )
        if self.cfg.guidance != 1.0 and cond is not None:
            with torch.no_grad():
                uncond = self.teacher(x_t, sigma, None)
            out = (guide(uncond, out[0], self.cfg.guidance), out[1])
        return out

    def _noise(self, x: Tensor, sigma: Tensor, generator: rng.RandomSource) -> Tensor:
        eps = rng.randn(x.shape, generator, device=x.device, dtype=x.dtype)
        return x + sigma_view(sigma, x) * eps

    def fake_score_weight(self, sigma: Tensor) -> Tensor:
        """Per-sample weight of the fake score's x0 error (``cfg.fake_weighting``)."""
        if self.cfg.fake_weighting == "none":
            return torch.ones_like(sigma)
        sd = self.cfg.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2

    def critic_loss(
        self,
        z: Tensor,
        cond: Tensor | None,
        x_real: Tensor,
        cond_real: Tensor | None,
        generator: rng.RandomSource = None,
        *,
        x_student: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Fake-score denoising loss on detached student samples + discriminator loss.

        Statistics: the losses, mean logits, ``disc_gap`` (mean real logit minus mean fake
        logit) and, per noise-level bin of the ratio normaliser, ``disc_gap/bin<k>`` and
        ``disc_loss/bin<k>`` (bins without samples in this batch are left out).
        """
        with torch.no_grad():
            x_fake = self.student_sample(z, cond, generator, x_student)
        n = x_fake.shape[0]
        sigma = self.sample_sigma(n, generator).to(x_fake.dtype)
        sigma_r = sigma
        if self.cfg.real_sigma == "independent":  # the official code: their own draw
            sigma_r = self.sample_sigma(n, generator).to(x_real.dtype)
        xf_t = self._noise(x_fake, sigma, generator)
        xr_t = self._noise(x_real, sigma_r, generator)
        use_fake = self.cfg.disc_features == "fake"
        out = self.fake_score(xf_t, sigma, cond, return_features=use_fake)
        d_fake, feats_fake = out if use_fake else (out, None)
        err = (d_fake - x_fake).float().pow(2).reshape(n, -1).mean(1)
        dsm = self.fake_score_weight(sigma.float()) * err

        r1_form = self.cfg.r1 if self.cfg.r1_gamma > 0 else "off"
        need_r1 = r1_form == "exact"
        if need_r1:
            xr_t = xr_t.detach().requires_grad_(True)

        # Real samples (and, with teacher features, fake ones) only need features: "only"
        # stops each network after its deepest tap instead of running the decoder for nothing.
        def real_logit(x: Tensor, s: Tensor, c: Tensor | None) -> Tensor:
            if use_fake:
                return self.head(self.fake_score(x, s, c, return_features="only"))
            with torch.set_grad_enabled(need_r1):
                feats = self.teacher(x, s, c, return_features="only")
            return self.head(feats)

        logit_real = real_logit(xr_t, sigma_r, cond_real)
        if not use_fake:
            with torch.no_grad():
                feats_fake = self.teacher(xf_t, sigma, cond, return_features="only")
        logit_fake = self.head(feats_fake)
        disc = discriminator_loss(logit_real, logit_fake)
        loss = dsm + disc
        lr, lf = logit_real.detach(), logit_fake.detach()
        values = {"loss_dsm": dsm.mean(), "loss_disc": disc.mean()}
        if need_r1:
            r1 = r1_penalty(logit_real, xr_t)
            loss = loss + 0.5 * self.cfg.r1_gamma * r1
            values["r1"] = r1.mean()
        elif r1_form == "approx":  # the official form: gamma * mse(logit(x), logit(x + 0.1 eps))
            r1 = approx_r1_penalty(real_logit, xr_t, sigma_r, cond_real, generator, 0.1, logit_real)
            loss = loss + self.cfg.r1_gamma * r1
            values["r1"] = r1.mean()
        values |= {"logit_real": lr.mean(), "logit_fake": lf.mean()}
        values["disc_gap"] = values["logit_real"] - values["logit_fake"]
        idx = self.sigma_bins(sigma)
        # Per-bin sums of the gap, the loss and the count in one index_add_ (rows are added
        # in order, as three separate ones would); rows (gap, count) and (loss, count).
        per_sample = (
            (lr - lf).float(),
            disc.detach().float(),
            torch.ones_like(lr, dtype=torch.float32),
        )
        binned = lr.new_zeros(self.sigma_bins.num_bins, 3, dtype=torch.float32)
        binned = binned.index_add_(0, idx, torch.stack(per_sample, 1)).T
        stats = _host(values, {"disc_gap": binned[0::2], "disc_loss": binned[1:]})
        return loss.mean(), stats

    def generator_loss(
        self,
        z: Tensor,
        cond: Tensor | None,
        generator: rng.RandomSource = None,
        *,
        x_student: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """h-weighted distribution matching loss + GAN term, at one ``(x_t, sigma)`` per sample.

        The teacher's and fake score's denoised estimates and the discriminator's log-ratio
        all come from the same noised student sample, one pass of each network: the features
        come from the denoising pass of the feature network (the teacher's, or the fake
        score's for ``disc_features="fake"``). With the GAN term that pass keeps a graph only
        up to its deepest tap (``return_features="encoder_grad"``): the denoised estimates
        enter the loss detached, so nothing after the taps keeps activations for a backward
        pass that never reaches it. Statistics include the spread of the weights: ``h_min``,
        ``h_mean``, ``h_max`` and ``h_cv`` (std / mean).
        """
        x = self.student_sample(z, cond, generator, x_student)
        n = x.shape[0]
        sigma = self.sample_sigma(n, generator).to(x.dtype)
        x_t = self._noise(x.detach(), sigma, generator)
        gan = self.cfg.gan_weight > 0
        if gan:  # the GAN term needs d logit / d x: route x_t through the graph
            x_t = x_t + (x - x.detach())
        mode = "encoder_grad" if gan else True
        with frozen(self.fake_score, self.head), torch.set_grad_enabled(gan):
            if self.cfg.disc_features == "fake":
                d_fake, feats = self.fake_score(x_t, sigma, cond, return_features=mode)
                with torch.no_grad():
                    d_teacher, _ = self._teacher(x_t, sigma, cond, features=False)
            else:
                d_teacher, feats = self._teacher(x_t, sigma, cond, features=mode)
                with torch.no_grad():
                    d_fake = self.fake_score(x_t, sigma, cond)
            logit = self.head(feats)
        h = self.weights(logit.detach(), sigma)
        loss = distribution_matching_loss(
            x, d_teacher.detach(), d_fake.detach(), h, sigma, self.cfg.weighting
        )
        values = {"loss_dm": loss.detach().mean()}
        if gan:
            g = gan_generator_loss(logit)
            loss = loss + self.cfg.gan_weight * g
            values["loss_gan"] = g.detach().mean()
        h_mean = h.mean()
        values |= {
            "h_min": h.min(),
            "h_mean": h_mean,
            "h_max": h.max(),
            "h_cv": h.std(correction=0) / h_mean.clamp_min(1e-12),
        }
        return loss.mean(), _host(values)


class ConstantLogit(nn.Module):
    """A head that reads no features and returns logit 0 (``r = 1``): without real data there
    is no density ratio, so every divergence's weight ``h`` is constant."""

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return feats[0].new_zeros(feats[0].shape[0], dtype=torch.float32)


class DistributionMatchingOnly(FDistill):
    """f-distill without real data: the critic step trains the fake score alone (no
    discriminator, nothing read from ``x_real``); the generator loss is the distribution-
    matching term with ``h = 1`` after normalisation (reverse KL, i.e. DMD)."""

    def critic_loss(self, z, cond, x_real=None, cond_real=None, generator=None, *, x_student=None):
        with torch.no_grad():
            x_fake = self.student_sample(z, cond, generator, x_student)
        n = x_fake.shape[0]
        sigma = self.sample_sigma(n, generator).to(x_fake.dtype)
        xf_t = self._noise(x_fake, sigma, generator)
        err = (self.fake_score(xf_t, sigma, cond) - x_fake).float().pow(2).reshape(n, -1).mean(1)
        dsm = self.fake_score_weight(sigma.float()) * err
        return dsm.mean(), {"loss_dsm": float(dsm.detach().mean())}
