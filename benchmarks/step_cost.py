"""Cost of an f-distill iteration against a teacher-training step of the same network.

DESIGN.md section 4: a distillation iteration (critic and generator updates in the configured
ratio, averaged per update) should cost at most 1.5x a teacher-training step (EDM loss,
forward + backward + optimiser) at the same batch; a generator update should peak at most
1.3x the memory of a teacher step; one-step sampling should be at least 30x faster than
35-NFE Heun. All are measured side by side in one process, on the same UNet and batch.

Every update timed or profiled is the training engine's own (:meth:`fdistill.engine.Engine.update`,
the update :func:`fdistill.engine.train` runs: loss, backward, NaN/Inf guard, gradient norm,
clipping, fused AdamW), on the objects the commands build:

* teacher step: the ``denoise`` phase of :class:`fdistill.methods.Denoising` with
  ``train-teacher``'s EDM loss and optimiser settings, training its own copy of the network;
* critic update and generator update: the ``critic`` and ``generator`` phases of the
  :class:`fdistill.methods.FDistill` that ``fdistill distill`` builds from the teacher
  (:func:`fdistill.recipes.build_distill`; ``distill``'s defaults except the options below:
  JS divergence, discriminator heads on every encoder map of the ``--disc-features`` network).

The teacher is the UNet ``train-teacher`` builds for these sizes
(:func:`fdistill.config.default_model`) with random weights, every parameter perturbed by
``N(0, 0.02^2)`` so no layer is exactly zero; real data is a fixed random batch, latents come
from the student's own sampler. Timings interleave the three kinds of update and report
medians. ``--bf16`` is the engine's bfloat16 autocast (``--bf16`` of the commands: CPU or CUDA).

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on a CPU the allocations the PyTorch
profiler records. "transient" is what an update allocates on top of the resident state
(activations, gradients, temporaries), measured with no gradients held (an engine update
leaves its gradients in place until the next one: they are dropped first); "resident" is
weights + AdamW state of what the update keeps in memory (teacher step: one network;
distillation: teacher, student, fake score, head). The EMA copy the engine also keeps (one
network in either run) is not counted.

    python benchmarks/step_cost.py                        # CPU, 32x32 RGB, batch 16
    python benchmarks/step_cost.py --device cuda --batch 128 --model-channels 128
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch
from torch import nn

from fdistill.conditioning import Conditioning, student_inputs
from fdistill.config import DistillConfig, TeacherConfig, default_model
from fdistill.denoisers import EDMLoss
from fdistill.denoisers.registry import build_denoiser, copy_denoiser
from fdistill.engine import Dist, Engine, LoopConfig, make_batch_randoms
from fdistill.generator import OneStepGenerator
from fdistill.methods import Denoising, Inputs, Method
from fdistill.methods.fdistill import resolved_levels
from fdistill.recipes import build_distill
from fdistill.samplers import heun_sampler
from fdistill.teachers.registry import TeacherInfo

WEIGHT_NOISE = 0.02
KINDS = ("teacher", "critic", "generator")
"""The kinds of update measured: the engine phases ``denoise`` (teacher training), ``critic``
and ``generator`` (distillation)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, default=3, help="image channels")
    p.add_argument("--model-channels", type=int, default=32)
    p.add_argument("--channel-mult", default="1,2,2")
    p.add_argument("--num-blocks", type=int, default=1)
    p.add_argument("--attn", default="16", help="attention resolutions, comma separated")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--critic-ratio", type=int, default=5)
    p.add_argument("--disc-features", default="teacher,fake", help="teacher, fake or both")
    p.add_argument("--gan-weight", type=float, default=1e-3)
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (after one warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--bf16", action="store_true", help="the engine's bfloat16 autocast (CPU or CUDA)"
    )
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, times: int = 1) -> float:
    """Seconds per call of ``fn`` over ``times`` calls back to back (synchronised at the ends)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(times):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / times


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak of what ``fn`` allocates on top of what is allocated when it starts."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    allocs = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in allocs:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def state_bytes(*modules: nn.Module, trained: tuple[nn.Module, ...] = ()) -> int:
    """Weights of ``modules`` plus AdamW's two moments for the ``trained`` ones."""
    size = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    return size + 2 * sum(p.numel() * p.element_size() for m in trained for p in m.parameters())


# --------------------------------------------------------------------------- the engine
def engine_update(engine: Engine, phase: str, step: int = 1) -> dict:
    """One optimiser update of ``engine``'s phase ``phase`` exactly as :func:`fdistill.engine.train`
    runs it, the method's trained modules in place as during training; its statistics."""
    with engine.running():
        return engine.update(engine.phase(phase), step)


def drop_grads(*engines: Engine) -> None:
    """Free the gradients the engines' optimisers hold (an update leaves its own in place)."""
    for engine in engines:
        for opt in engine.opts.values():
            opt.zero_grad(set_to_none=True)


def random_teacher(args: argparse.Namespace) -> nn.Module:
    """The UNet ``train-teacher`` builds for these sizes, random weights plus ``N(0, 0.02^2)`` on
    every parameter (no exactly-zero layers, as in a trained network), with the ``.info`` of a
    loaded teacher run (unconditional; ``train-teacher``'s sampling range)."""
    shape = (args.channels, args.resolution, args.resolution)
    config = default_model(
        "unet",
        shape,
        0,
        model_channels=args.model_channels,
        channel_mult=_ints(args.channel_mult),
        num_blocks=args.num_blocks,
        attn_resolutions=_ints(args.attn),
    )
    torch.manual_seed(0)
    teacher = build_denoiser(config)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(WEIGHT_NOISE * torch.randn_like(p))
    defaults = TeacherConfig()
    teacher.info = TeacherInfo(
        family="random",
        shape=shape,
        num_classes=0,
        sigma_min=defaults.sigma_min,
        sigma_max=defaults.sigma_max,
        sigma_data=config["sigma_data"],
        details={"model": config, "weights": f"init + N(0, {WEIGHT_NOISE}^2)"},
    )
    return teacher


class Bench:
    """The teacher, data and teacher-training engine shared by every measurement."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.device = args, torch.device(args.device)
        self.ddp = Dist(device=self.device)
        self.teacher = random_teacher(args).to(self.device)
        info = self.teacher.info
        self.gen = torch.Generator(device=self.device).manual_seed(0)
        self.shape = (args.batch, *info.shape)
        self.x_real = torch.rand(self.shape, device=self.device, generator=self.gen) * 2 - 1
        latents = student_inputs(info.shape, Conditioning(), self.device)
        self.inputs = Inputs(real=lambda n, gen: (self.x_real[:n], None), latents=latents)
        # Teacher training as train-teacher sets it up, of its own copy of the network (so
        # nothing is shared with the distillation's frozen teacher).
        tc = TeacherConfig()
        net = copy_denoiser(self.teacher, inference=False).to(self.device)
        loss = EDMLoss(tc.p_mean, tc.p_std, info.sigma_data)
        self.teacher_engine = self.engine(Denoising(net, loss), replace(tc.train, **self.loop()))
        self.teacher_step = partial(engine_update, self.teacher_engine, "denoise")

    def loop(self) -> dict:
        """The loop settings this benchmark sets in both kinds of run."""
        return {"batch": self.args.batch, "bf16": self.args.bf16, "progress": False}

    def engine(self, method: Method, cfg: LoopConfig) -> Engine:
        """``method`` set up in the engine as :func:`fdistill.engine.train` does on one process,
        with the random streams the commands draw from."""
        gens = make_batch_randoms(cfg.seed, self.ddp)
        return Engine(method, self.inputs, cfg, ddp=self.ddp, gens=gens)

    def latents(self) -> torch.Tensor:
        return torch.randn(self.shape, device=self.device, generator=self.gen)

    def distill_engine(self, feats: str) -> Engine:
        """The f-distill method ``fdistill distill`` builds from the teacher (``distill``'s
        defaults, this benchmark's GAN weight, critic ratio and feature network), in the engine."""
        args, base = self.args, DistillConfig()
        cfg = replace(
            base,
            loss=replace(base.loss, gan_weight=args.gan_weight, disc_features=feats),
            train=replace(base.train, critic_ratio=args.critic_ratio, **self.loop()),
        )
        levels, binning = resolved_levels(cfg.loss, self.teacher.info.schedule is not None)
        cfg = replace(cfg, loss=replace(cfg.loss, noise_levels=levels, ratio_binning=binning))
        torch.manual_seed(cfg.train.seed)  # the head's initialisation, as distill seeds it
        model = build_distill(cfg, self.teacher).to(self.device)
        return self.engine(model, cfg.train)

    def distill(self, feats: str) -> dict:
        """Timings (medians, seconds) and peak memory of teacher step, critic and generator."""
        args, dev = self.args, self.device
        engine = self.distill_engine(feats)
        model = engine.method
        run = {
            "teacher": self.teacher_step,
            "critic": partial(engine_update, engine, "critic"),
            "generator": partial(engine_update, engine, "generator"),
        }
        k = args.critic_ratio
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for r in range(args.rounds + 1):  # round 0 warms up (allocator, AdamW state)
            t = {"teacher": timed(run["teacher"], dev)}
            t["critic"] = statistics.mean(timed(run["critic"], dev) for _ in range(k))
            t["generator"] = timed(run["generator"], dev)
            for name, v in t.items():
                times[name] += [v] if r else []
        med = {name: statistics.median(v) for name, v in times.items()}

        mem = {}
        for kind in KINDS:  # each measured from a state without gradients
            drop_grads(self.teacher_engine, engine)
            mem[kind] = peak_bytes(run[kind], dev)
        drop_grads(self.teacher_engine, engine)
        trained = tuple(getattr(model, name) for name in model.trained)
        net = self.teacher_engine.method.net
        return {
            "time": med,
            "per_update": (k * med["critic"] + med["generator"]) / (k + 1),
            "mem": mem,
            "resident_teacher": state_bytes(net, trained=(net,)),
            "resident_distill": state_bytes(model.teacher, *trained, trained=trained),
        }

    def sampling(self) -> tuple[float, float]:
        """Median seconds of one student step and of 35-NFE Heun (18 steps), interleaved."""
        student, dev = OneStepGenerator(self.teacher), self.device
        z = self.latents()
        one, heun = [], []
        with torch.no_grad():
            for _ in range(3):
                one += [timed(lambda: student(z), dev) for _ in range(4)]
                heun.append(timed(lambda: heun_sampler(self.teacher, z, num_steps=18), dev))
        return statistics.median(one[1:]), statistics.median(heun[1:])

    def forward_costs(self) -> tuple[float, float]:
        """Median seconds of a no-grad full forward and of a feature-only one."""
        unet, dev, x = self.teacher.net, self.device, self.x_real
        c_noise = torch.full((len(x),), 0.1, device=dev)
        full, enc = [], []
        with torch.no_grad():
            for _ in range(self.args.rounds + 1):
                full.append(timed(lambda: unet(x, c_noise), dev))
                enc.append(timed(lambda: unet(x, c_noise, return_features="only"), dev))
        return statistics.median(full[1:]), statistics.median(enc[1:])


def main(argv: list[str] | None = None) -> dict:
    """Measure, print the tables; the measurements (``rows`` by feature network, ``sampling``:
    seconds of one step and of 35-NFE Heun, ``forward``: full and feature-only forward)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    n_params = sum(p.numel() for p in bench.teacher.parameters())
    print(
        f"UNet {args.resolution}x{args.resolution}x{args.channels}, {n_params / 1e6:.2f} M "
        f"parameters, batch {args.batch}, critic ratio {args.critic_ratio}, GAN weight "
        f"{args.gan_weight}, device {bench.device}, threads {args.threads}"
        + (", bf16" if args.bf16 else "")
    )
    feats = [f.strip() for f in args.disc_features.split(",") if f.strip()]
    rows = {f: bench.distill(f) for f in feats}
    t_one, t_heun = bench.sampling()
    f_full, f_enc = bench.forward_costs()

    print(
        "\n| disc features | teacher step | critic update | generator update | per update "
        "(ratio avg) | per update / teacher | critic / teacher | generator / teacher |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for f, r in rows.items():
        t, tt = r["time"], r["time"]["teacher"]
        print(
            f"| {f} | {tt * 1e3:.1f} ms | {t['critic'] * 1e3:.1f} ms | "
            f"{t['generator'] * 1e3:.1f} ms | {r['per_update'] * 1e3:.1f} ms | "
            f"**{r['per_update'] / tt:.2f}x** (target <= 1.5) | {t['critic'] / tt:.2f}x | "
            f"{t['generator'] / tt:.2f}x |"
        )
    frac = f_enc / f_full
    print(
        f"\nforward (no grad) F = {f_full * 1e3:.1f} ms; feature-only (input -> bottleneck, what "
        f"the discriminator passes run) {f_enc * 1e3:.1f} ms ({frac:.0%})."
    )
    for f, r in rows.items():
        t, k = r["time"], args.critic_ratio
        critic_floor = f_full + t["teacher"]  # generator forward + a denoising step of the fake
        gen_floor = 2 * f_full + t["teacher"] + (f_enc if args.gan_weight > 0 else 0)
        per_floor = (k * critic_floor + gen_floor) / (k + 1)
        print(
            f"{f}: floor of this schedule (critic: generator forward + fake-score step; "
            f"generator: its own step + teacher and fake-score forwards) = "
            f"{per_floor / t['teacher']:.2f}x a teacher step per update; measured "
            f"{r['per_update'] / t['teacher']:.2f}x"
        )
    mib = 2**20
    print(
        "\n| disc features | transient: teacher step | critic update | generator update | "
        "generator / teacher | resident: teacher training | distillation | "
        "total (resident + transient): generator / teacher |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for f, r in rows.items():
        m, rt, rd = r["mem"], r["resident_teacher"], r["resident_distill"]
        print(
            f"| {f} | {m['teacher'] / mib:.1f} MiB | {m['critic'] / mib:.1f} MiB | "
            f"{m['generator'] / mib:.1f} MiB | **{m['generator'] / m['teacher']:.2f}x** "
            f"(target <= 1.3) | {rt / mib:.1f} MiB | {rd / mib:.1f} MiB | "
            f"{(m['generator'] + rd) / (m['teacher'] + rt):.2f}x |"
        )
    print(
        f"\nsampling, batch {args.batch}: one step {t_one * 1e3:.2f} ms, 35-NFE Heun "
        f"{t_heun * 1e3:.1f} ms -> **{t_heun / t_one:.1f}x** faster (target >= 30, limit 35)"
    )
    return {"rows": rows, "sampling": (t_one, t_heun), "forward": (f_full, f_enc)}


if __name__ == "__main__":
    main()
