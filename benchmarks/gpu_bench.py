"""GPU benchmark of the training loop at the paper's network sizes (issue 11).

For EDM's class-conditional CIFAR-10 DDPM++ (55.7 M parameters) and ImageNet-64 ADM (295.9 M)
networks, random weights behind ``EDMPrecond(net, sigma_data=0.5)``, one process:

* a teacher-training step (EDM loss, forward + backward + fused AdamW) against the f-distill
  updates (critic and generator updates, their ratio-weighted average per update, and a
  whole iteration of ``--critic-ratio`` critic updates + 1 generator update), in ms and
  images/s, with bf16 autocast off and on, eager and ``torch.compile``d;
* peak memory of each kind of update: what it allocates on top of the resident state
  ("transient": activations, gradients, temporaries) and the total;
* one-step student sampling against 35-NFE Heun (18 steps) sampling of the teacher.

Targets (DESIGN.md section 4): distillation update <= 1.5x a teacher step; generator-update
transient memory <= 1.3x a teacher step's; one-step sampling >= 30x the 35-NFE teacher.

Every update timed or measured is the training engine's own
(:meth:`fdistill.engine.Engine.update`, the update :func:`fdistill.engine.train` runs: loss,
backward, the NaN/Inf guard on the device, gradient norm, clipping, fused AdamW), through
``step_cost.engine_update``, on the objects the commands build:

* teacher step: the ``denoise`` phase of :class:`fdistill.methods.Denoising` (EDM loss,
  ``train-teacher``'s optimiser settings at learning rate 1e-4), training its own copy of the
  teacher network (dropout on, as a teacher run);
* critic and generator updates: the ``critic`` and ``generator`` phases of the
  :class:`fdistill.methods.FDistill` that ``fdistill distill`` builds from the teacher
  (:func:`fdistill.recipes.build_distill`: ``distill``'s defaults, JS divergence, heads 64
  wide on the teacher's encoder, the GAN weight and critic ratio below; student and fake score
  are the teacher's dropout-free copies, as ``distill`` makes them).

bf16 is the engine's own autocast (``LoopConfig.bf16``, ``--bf16`` of the commands) and the
compiled rows the engine's own ``torch.compile`` (``LoopConfig.compile`` and
:meth:`fdistill.engine.Engine.compile`: the teacher-training network; the frozen teacher,
student and fake score of the distillation), so every variant measured runs through the engine.
Resident state is what the two engines hold (networks, AdamW moments, and each engine's EMA
copy: of the teacher-training network and of the student), so "total" counts it; transient
memory is measured with no gradients held (an engine update leaves its own in place until the
next one: they are dropped first). One-step and Heun sampling are no updates and run the
networks directly (under the same autocast).

Timings synchronise only at the ends of a block of updates (the engine adds no host
synchronisation per update), and report the median over rounds. Rows print as soon as they
are measured, so a time-out keeps what finished; ``--budget`` skips what would not fit. The
discriminator reads the teacher's encoder (CIFAR-10: 32, 16 and 8; ImageNet-64: 8), GAN weight
1e-3 / 3e-3 and ratio 5, as in the paper's Table 5; per-GPU batches are the paper's global
batch over 16 and 8 GPUs (2048 / 16 = 128 and 512 / 8 = 64; ``--batch`` overrides). Compiled
rows run in a child process with the time left as its time-out, so the script ends within
``--budget`` (default 450 s) plus a few seconds whatever compiling costs.

    python benchmarks/gpu_bench.py                 # one CUDA GPU, within --budget (450 s)
    python benchmarks/gpu_bench.py --tiny          # tiny networks on the CPU, about a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_size import teacher_config  # noqa: E402
from step_cost import drop_grads, engine_update, sync, timed  # noqa: E402

from fdistill import rng  # noqa: E402
from fdistill.config import DistillConfig  # noqa: E402
from fdistill.denoisers import EDMLoss  # noqa: E402
from fdistill.denoisers.registry import build_denoiser, copy_denoiser  # noqa: E402
from fdistill.engine import (  # noqa: E402
    Dist,
    Engine,
    LoopConfig,
    NonFiniteError,
    TeacherTrainConfig,
    autocast,
    make_batch_randoms,
)
from fdistill.generator import OneStepGenerator  # noqa: E402
from fdistill.methods import Denoising, Inputs, Method  # noqa: E402
from fdistill.methods.fdistill import resolved_levels  # noqa: E402
from fdistill.recipes import build_distill  # noqa: E402
from fdistill.samplers import heun_sampler  # noqa: E402
from fdistill.teachers.registry import TeacherInfo  # noqa: E402


@dataclass
class Network:
    """One benchmarked network: EDM preset, overrides, batch per GPU, taps, GAN weight."""

    preset: str
    batch: int
    taps: list[str] | None
    gan_weight: float
    overrides: dict = field(default_factory=dict)


NETWORKS = {
    "cifar10-ddpm++": Network("cifar10", 128, None, 1e-3),
    "imagenet64-adm": Network("imagenet64", 64, ["enc8"], 3e-3),
}
TINY = {
    "cifar10-ddpm++": Network(
        "cifar10",
        4,
        None,
        1e-3,
        dict(img_resolution=16, model_channels=16, channel_mult=[1, 2], num_blocks=1),
    ),
    "imagenet64-adm": Network(
        "imagenet64",
        4,
        ["enc8"],
        3e-3,
        dict(
            img_resolution=16,
            model_channels=32,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[],
            label_dim=10,
        ),
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny networks on the CPU (a smoke run)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--networks", default=",".join(NETWORKS), help="comma separated")
    p.add_argument("--critic-ratio", type=int, default=5)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; tiny 1)")
    p.add_argument(
        "--budget", type=float, default=450.0, help="seconds; later rows are skipped past it"
    )
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch of every network")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # child: NAME:PREC:BACKEND
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    return p.parse_args(argv)


def say(text: str = "") -> None:
    print(text, flush=True)


def peak(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """``(transient, total)`` MiB of one call of ``fn`` on CUDA; NaN elsewhere."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    top = torch.cuda.max_memory_allocated(device)
    return (top - base) / 2**20, top / 2**20


def build_teacher(spec: Network, device: torch.device) -> tuple[nn.Module, int]:
    """Random-weight EDM network behind EDM preconditioning (EDM's initialisation), with the
    ``.info`` an EDM pickle of it would give; the number of classes."""
    config = teacher_config(spec.preset, **spec.overrides)
    torch.manual_seed(0)
    teacher = build_denoiser(config)
    kw = config["network_kwargs"]
    res, ch, classes = int(kw["img_resolution"]), int(kw["in_channels"]), int(kw["label_dim"])
    teacher.info = TeacherInfo(
        family="random",
        shape=(ch, res, res),
        num_classes=classes,
        sigma_min=0.002,
        sigma_max=80.0,
        sigma_data=0.5,
        details={"network": config["network"], "weights": "EDM init"},
    )
    if spec.taps is not None:
        teacher.set_feature_taps(spec.taps)
    return teacher.to(device), classes


class Bench:
    """One network at one setting (bf16, compile): a teacher step and the f-distill updates,
    each an update of the training engine (:meth:`fdistill.engine.Engine.update`)."""

    def __init__(
        self,
        spec: Network,
        device: torch.device,
        bf16: bool,
        compiled: str | None,
        critic_ratio: int = 5,
    ):
        self.device, self.ddp = device, Dist(device=device)
        teacher, classes = build_teacher(spec, device)
        info = teacher.info
        self.shape = (spec.batch, *info.shape)
        gen = torch.Generator(device=device).manual_seed(0)  # the fixed real batch and labels
        self.x_real = torch.rand(self.shape, device=device, generator=gen) * 2 - 1
        self.labels = torch.randint(classes, (spec.batch,), device=device, generator=gen)
        self.inputs = Inputs(real=self.real, latents=self.latents)
        loop = {"batch": spec.batch, "batch_gpu": None, "bf16": bf16, "progress": False}
        loop |= {"compile": compiled is not None, "compile_backend": compiled or "inductor"}
        # Teacher training as train-teacher sets it up, of its own copy of the network (dropout
        # on; nothing shared with the distillation's frozen teacher).
        with device:  # the copies are made where they run (fast at 296 M parameters)
            net = copy_denoiser(teacher, inference=False)
        tcfg = replace(TeacherTrainConfig(), lr=1e-4, **loop)
        self.teacher_engine = self.engine(Denoising(net, EDMLoss()), tcfg)
        # The f-distill method distill builds from the teacher, in the engine.
        base = DistillConfig()
        cfg = replace(
            base,
            divergence="js",
            head_hidden=64,
            disc_taps=tuple(spec.taps) if spec.taps is not None else None,
            loss=replace(base.loss, gan_weight=spec.gan_weight, disc_features="teacher"),
            train=replace(base.train, critic_ratio=critic_ratio, **loop),
        )
        levels, binning = resolved_levels(cfg.loss, info.schedule is not None)
        cfg = replace(cfg, loss=replace(cfg.loss, noise_levels=levels, ratio_binning=binning))
        torch.manual_seed(cfg.train.seed)  # the head's initialisation, as distill seeds it
        with device:
            model = build_distill(cfg, teacher)
        self.distill_engine = self.engine(model.to(device), cfg.train)
        self.compile_s = 0.0
        for engine in (self.teacher_engine, self.distill_engine):
            engine.compile()  # what train() compiles (nothing unless compiling)

    def engine(self, method: Method, cfg: LoopConfig) -> Engine:
        """``method`` set up in the engine as :func:`fdistill.engine.train` does on one
        process, with the random streams the commands draw from."""
        gens = make_batch_randoms(cfg.seed, self.ddp)
        return Engine(method, self.inputs, cfg, ddp=self.ddp, gens=gens)

    def real(self, n: int, gen: rng.RandomSource) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_real[:n], self.labels[:n]

    def latents(self, n: int, gen: rng.RandomSource) -> tuple[torch.Tensor, torch.Tensor]:
        return rng.randn((n, *self.shape[1:]), gen, device=self.device), self.labels[:n]

    def teacher_step(self) -> None:
        engine_update(self.teacher_engine, "denoise")

    def critic_update(self) -> None:
        engine_update(self.distill_engine, "critic")

    def generator_update(self) -> None:
        engine_update(self.distill_engine, "generator")

    def warm_up(self, ratio: int) -> None:
        """One of each update (allocator, AdamW state, every compiled graph), timed."""
        t0 = time.perf_counter()
        self.teacher_step()
        for _ in range(ratio):
            self.critic_update()
        self.generator_update()
        sync(self.device)
        self.compile_s = time.perf_counter() - t0

    def measure(self, ratio: int, rounds: int) -> dict:
        times: dict[str, list[float]] = {"teacher": [], "critic": [], "generator": []}
        for _ in range(rounds):
            times["teacher"].append(timed(self.teacher_step, self.device, 2))
            times["critic"].append(timed(self.critic_update, self.device, ratio))
            times["generator"].append(timed(self.generator_update, self.device, 2))
        med = {k: statistics.median(v) for k, v in times.items()}
        engines = (self.teacher_engine, self.distill_engine)
        mem = {}
        for kind, fn in (
            ("teacher", self.teacher_step),
            ("critic", self.critic_update),
            ("generator", self.generator_update),
        ):
            drop_grads(*engines)  # each measured from a state without gradients
            mem[kind] = peak(fn, self.device)
        drop_grads(*engines)
        for engine in engines:  # random weights should still give finite updates
            try:  # timings stand either way
                engine.guard.check()
            except NonFiniteError as e:
                say(f"note: {e}")
        return {"time": med, "mem": mem}


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


def fmt_mib(*values: float) -> str:
    """``a / b`` MiB, or n/a where memory is not measured (CPU)."""
    return "n/a" if any(v != v for v in values) else " / ".join(f"{v:.0f}" for v in values)


def bench_row(name: str, spec: Network, dev: torch.device, args, bf16: bool, compiled) -> None:
    """Measure one setting and print its table row (``OOM`` if it does not fit)."""
    prec, mode = ("bf16" if bf16 else "fp32"), compiled or "eager"
    try:
        k = args.critic_ratio
        b = Bench(spec, dev, bf16, compiled, k)
        b.warm_up(k)
        r = b.measure(k, args.rounds)
    except torch.OutOfMemoryError:
        say(f"| {name} | {prec} | {mode} | {spec.batch} | out of memory: try --batch |")
        return
    t, mem, n = r["time"], r["mem"], spec.batch
    per_update = (k * t["critic"] + t["generator"]) / (k + 1)
    iteration = k * t["critic"] + t["generator"]
    (mt, mt_tot), (mg, mg_tot) = mem["teacher"], mem["generator"]
    say(
        f"| {name} | {prec} | {mode} | {n} | {fmt_ms(t['teacher'])} | "
        f"{n / t['teacher']:.0f} | {fmt_ms(t['critic'])} | {fmt_ms(t['generator'])} | "
        f"{fmt_ms(per_update)} | **{per_update / t['teacher']:.2f}x** | "
        f"{n / iteration:.0f} | {fmt_mib(mt, mt_tot)} | {fmt_mib(mem['critic'][0])} | "
        f"{fmt_mib(mg, mg_tot)} | **{fmt_mib(mg / mt * 100)}%** | {b.compile_s:.0f} |"
    )
    del b
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def child_row(name: str, bf16: bool, backend: str, args, timeout: float) -> None:
    """:func:`bench_row` in a child process that is killed after ``timeout`` seconds."""
    cmd = [sys.executable, __file__, "--row", f"{name}:{int(bf16)}:{backend}"]
    cmd += ["--critic-ratio", str(args.critic_ratio), "--rounds", str(args.rounds)]
    cmd += ["--device", args.device] + (["--tiny"] if args.tiny else [])
    cmd += ["--batch", str(args.batch)] if args.batch else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    prec = "bf16" if bf16 else "fp32"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        say(f"| {name} | {prec} | {backend} | timed out after {timeout:.0f} s |")
        return
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    if proc.returncode or not rows:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        say(f"| {name} | {prec} | {backend} | failed: {tail[0][:200]} |")
        return
    for line in rows:
        say(line)


def sampling_row(name: str, spec: Network, dev: torch.device, bf16: bool, rounds: int) -> None:
    teacher, classes = build_teacher(spec, dev)
    teacher.eval()
    student = OneStepGenerator(teacher, sigma_init=80.0)
    net = teacher.net
    shape = (spec.batch, net.img_channels, net.img_resolution, net.img_resolution)
    gen = torch.Generator(device=dev).manual_seed(1)
    z = torch.randn(shape, device=dev, generator=gen)
    c = torch.randint(classes, (spec.batch,), device=dev, generator=gen)
    one, heun = [], []
    with torch.no_grad(), autocast(dev, bf16):
        student(z, c)  # warm-up
        heun_sampler(teacher, z, c, num_steps=2)
        for _ in range(rounds):
            one.append(timed(lambda: student(z, c), dev, 4))
            heun.append(timed(lambda: heun_sampler(teacher, z, c, num_steps=18), dev))
    t1, th = statistics.median(one), statistics.median(heun)
    say(
        f"| {name} | {'bf16' if bf16 else 'fp32'} | {spec.batch} | {fmt_ms(t1)} | "
        f"{spec.batch / t1:.0f} | {fmt_ms(th)} | {spec.batch / th:.1f} | **{th / t1:.1f}x** |"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        say("no CUDA device: run with --tiny (CPU) or on a GPU machine")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (1 if args.tiny else 5)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    specs = dict(TINY if args.tiny else NETWORKS)
    if args.batch:
        specs = {k: dataclasses.replace(v, batch=args.batch) for k, v in specs.items()}
    if args.row:  # a child process: one compiled row
        name, bf16, backend = args.row.split(":")
        bench_row(name, specs[name], dev, args, bool(int(bf16)), backend)
        return 0
    names = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"--networks {','.join(unknown)}: known are {', '.join(specs)}")
    backend = "aot_eager" if args.tiny else "inductor"  # tiny: no code generation, seconds
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    say(
        f"fdistill GPU benchmark on {device_name}, torch {torch.__version__}, critic ratio "
        f"{args.critic_ratio}, rounds {args.rounds}" + (" (tiny networks)" if args.tiny else "")
    )
    for name in names:
        teacher, _ = build_teacher(specs[name], dev)
        size = sum(p.numel() for p in teacher.parameters()) / 1e6
        say(f"{name}: {size:.2f} M parameters, batch {specs[name].batch} per GPU")
        del teacher

    def left() -> float:
        return args.budget - (time.perf_counter() - t_start)

    header = (
        "| network | precision | compile | batch | teacher step ms | teacher img/s | critic ms "
        "| generator ms | distill update ms | update / teacher (<= 1.5) | iteration img/s | "
        "teacher MiB (transient / total) | critic MiB | generator MiB (transient / total) | "
        "generator / teacher (<= 130%) | warm-up s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    say("\n" + header)
    for name in names:
        for bf16 in (True, False):
            if left() < 30:
                say(f"| {name} | {'bf16' if bf16 else 'fp32'} | eager | skipped: time budget |")
                continue
            bench_row(name, specs[name], dev, args, bf16, None)

    say(
        "\n| network | precision | batch | one-step ms | one-step img/s | 35-NFE Heun ms | "
        "Heun img/s | speed-up (>= 30) |"
    )
    say("|---|---|---|---|---|---|---|---|")
    for name in names:
        for bf16 in (True, False):
            if left() < 15:
                say(f"| {name} | {'bf16' if bf16 else 'fp32'} | skipped: time budget |")
                continue
            sampling_row(name, specs[name], dev, bf16, args.rounds)

    if not args.no_compile:
        say(
            f"\ntorch.compile ({backend}, bf16), each row in a child process killed when the "
            "budget runs out; warm-up includes compiling every graph:\n" + header
        )
        for name in names:
            if left() < 30:
                say(f"| {name} | bf16 | {backend} | skipped: time budget |")
                continue
            child_row(name, True, backend, args, left())
    say(f"\ndone in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
