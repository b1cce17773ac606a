"""The presets' real networks on a CPU: parameter counts and one distillation iteration (issue 7).

``--preset cifar10`` / ``imagenet64`` train the published EDM networks (DDPM++ CIFAR-10,
55.73M parameters; ADM ImageNet-64, 295.90M) with the paper's Table 5 settings. This script
builds each with random weights (EDM's initialisation, then every parameter perturbed by
``N(0, 0.02^2)`` so the zero-initialised output layers are not zero and no weight is denormal),
applies the preset (:func:`fdistill.pipeline.apply_preset`: discriminator taps, ratio binning,
critic ratio, GAN weight, R1) through :func:`fdistill.pipeline.build_distill`, and measures at
a small batch, the way ``benchmarks/step_cost.py`` does:

* teacher step: one update of the engine running teacher training
  (:class:`fdistill.methods.Denoising`: EDM loss forward + backward + AdamW, the update
  ``train-teacher`` runs);
* critic update and generator update of :class:`fdistill.methods.FDistill`, each one update
  of the training engine (:meth:`fdistill.engine.Engine.update`: the code ``distill`` runs);
* distillation update = ``(k * critic + generator) / (k + 1)`` at the preset's ratio ``k``,
  and its ratio to the teacher step;
* peak memory of a generator update against a teacher step: what the update allocates on top
  of the resident state (PyTorch profiler, ``step_cost.peak_bytes``), and resident + transient.

The teacher step trains the teacher network itself (its own engine and AdamW; dropout on, as
in EDM training) and the distillation freezes it again, so ImageNet-64 needs no fourth copy of 296M
weights. Rounds interleave teacher step, critic update and generator update after a warm-up
round (AdamW state, allocator); timings are medians. ``--timeout`` bounds the whole run: a
measurement that would not finish in time is skipped (or stopped) and its cell printed as
``-``. Rows print as they complete.

    python benchmarks/real_size.py --out benchmarks/results/real_size_cpu.md
    python benchmarks/real_size.py --presets cifar10 --reps 5
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import resource
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import drop_grads, engine_update, peak_bytes, state_bytes, timed  # noqa: E402

from fdistill.config import PRESETS, DistillConfig, apply_preset  # noqa: E402
from fdistill.denoisers import EDMLoss  # noqa: E402
from fdistill.denoisers.registry import build_denoiser  # noqa: E402
from fdistill.denoisers.songunet import edm_preset_kwargs  # noqa: E402
from fdistill.distill import FDistill  # noqa: E402
from fdistill.engine import Engine, TeacherTrainConfig  # noqa: E402
from fdistill.methods import Denoising, Inputs  # noqa: E402
from fdistill.recipes import build_distill  # noqa: E402
from fdistill.teachers.registry import TeacherInfo  # noqa: E402

# Parameter counts of the published networks, as published (two decimals, in millions).
PUBLISHED = {"cifar10": 55.73e6, "imagenet64": 295.90e6}
NETWORK_NAMES = {"cifar10": "DDPM++ (SongUNet)", "imagenet64": "ADM (DhariwalUNet)"}
DEFAULT_BATCH = {"cifar10": 2, "imagenet64": 1}
DEFAULT_REPS = {"cifar10": 3, "imagenet64": 3}  # the --timeout guard may cut them
WEIGHT_NOISE = 0.02
MIB = 2**20


class OutOfTime(Exception):
    """The run's ``--timeout`` was reached."""


class Budget:
    """Wall-clock budget of the whole run.

    :meth:`fits` says whether a measurement expected to take ``seconds`` can still finish;
    :meth:`guard` stops one that overruns (``SIGALRM`` raises :class:`OutOfTime` as soon as the
    running PyTorch operation returns; where signals are unavailable only :meth:`fits` acts).
    """

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits(self, seconds: float) -> bool:
        return self.left() > seconds

    @contextmanager
    def guard(self) -> Iterator[None]:
        if self.left() <= 0:
            raise OutOfTime
        use_alarm = math.isfinite(self.left()) and hasattr(signal, "setitimer") and _main_thread()
        if use_alarm:

            def on_alarm(signum, frame):
                raise OutOfTime

            old = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.left())
        try:
            yield
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------- the networks
def teacher_config(preset: str, **network_overrides) -> dict:
    """The ``"edm"`` model config (:func:`fdistill.teachers.edm_pickle.build_edm`) of EDM's
    published network for ``preset``; ``network_overrides`` shrink it (tests)."""
    kw = edm_preset_kwargs(preset)
    network = kw.pop("model_type")
    channels = kw.pop("img_channels")
    kw.update(in_channels=channels, out_channels=channels, **network_overrides)
    return {
        "type": "edm",
        "precond": "EDMPrecond",
        "precond_kwargs": {"sigma_data": 0.5},
        "network": network,
        "network_kwargs": kw,
    }


def random_teacher(config: dict, seed: int = 0, noise: float = WEIGHT_NOISE) -> nn.Module:
    """The network of ``config`` with EDM's initialisation plus ``N(0, noise^2)`` on every
    parameter, carrying the ``.info`` an EDM pickle of it would give."""
    torch.manual_seed(seed)
    teacher = build_denoiser(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    kw = config["network_kwargs"]
    res, ch = int(kw["img_resolution"]), int(kw["in_channels"])
    teacher.info = TeacherInfo(
        family="random",
        shape=(ch, res, res),
        num_classes=int(kw.get("label_dim", 0)),
        sigma_min=0.002,
        sigma_max=80.0,
        sigma_data=0.5,
        details={"network": config["network"], "weights": f"EDM init + N(0, {noise}^2)"},
    )
    return teacher


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- measurement
@dataclass
class Result:
    """What was measured for one preset; ``None`` where it was not (timeout)."""

    preset: str
    network: str
    params: int
    published: float | None
    batch: int
    critic_ratio: int
    disc_taps: tuple[str, ...] = ()
    reps: int = 0
    time: dict[str, float] = field(default_factory=dict)  # median wall seconds per kind
    cpu: dict[str, float] = field(default_factory=dict)  # median process CPU seconds per kind
    mem: dict[str, int] = field(default_factory=dict)  # transient peak bytes
    resident: dict[str, int] = field(default_factory=dict)
    head_params: int = 0
    max_rss: int = 0  # process peak RSS so far, bytes
    stopped: str = ""  # what the timeout cut off

    def per_update(self, critic: str = "critic", clock: str = "wall") -> float | None:
        """Seconds per distillation update at the critic ratio (``critic``: which critic time;
        ``clock``: ``"wall"`` or ``"cpu"``)."""
        t, k = (self.time if clock == "wall" else self.cpu), self.critic_ratio
        if critic not in t or "generator" not in t:
            return None
        return (k * t[critic] + t["generator"]) / (k + 1)


class PresetBench:
    """A preset's teacher, its teacher-training step and its f-distill model, side by side."""

    def __init__(self, preset: str, batch: int, config: dict | None = None, seed: int = 0):
        self.preset, self.batch = preset, batch
        self.config = config or teacher_config(preset)
        self.teacher = random_teacher(self.config, seed)
        info = self.teacher.info
        self.cfg = apply_preset(DistillConfig(), preset)
        self.gen = torch.Generator().manual_seed(seed + 2)
        self.shape = (batch, *info.shape)
        self.x_real = torch.rand(self.shape, generator=self.gen) * 2 - 1
        self.num_classes = info.num_classes
        self.model: FDistill | None = None
        # Teacher training of the teacher itself, set up in the engine as train-teacher does
        # (the Denoising method, EDM loss; its EMA copy is outside the update and not timed).
        real = Inputs(real=lambda n, gen: (self.x_real[:n], self.labels()), latents=None)
        loop = replace(TeacherTrainConfig(), batch=batch, batch_gpu=None, progress=False)
        streams = {"data": self.gen, "noise": self.gen}
        self.teacher_engine = Engine(Denoising(self.teacher, EDMLoss()), real, loop, gens=streams)

    def labels(self) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        return torch.randint(self.num_classes, (self.batch,), generator=self.gen)

    def teacher_step(self) -> None:
        """One teacher-training update of the engine on the teacher network itself (dropout
        on, as in training); frozen again after, gradients dropped."""
        teacher = self.teacher
        was_training = teacher.training
        teacher.train().requires_grad_(True)
        try:
            engine_update(self.teacher_engine, "denoise")
        finally:
            teacher.requires_grad_(self.model is None).train(was_training)
            drop_grads(self.teacher_engine)

    def build_model(self) -> FDistill:
        """Student, fake score and heads from the teacher, with the preset applied, set up in
        the engine (:class:`fdistill.engine.Engine`) at this batch: the updates timed are the
        ones training runs."""
        self.teacher.eval()
        self.model = build_distill(self.cfg, self.teacher)
        loop = replace(self.cfg.train, batch=self.batch, batch_gpu=None, progress=False)
        inputs = Inputs(
            real=lambda n, gen: (self.x_real[:n], self.labels()),
            latents=lambda n, gen: (self.latents(), self.labels()),
        )
        streams = {"data": self.gen, "noise": self.gen}
        self.engine = Engine(self.model, inputs, loop, gens=streams)
        return self.model

    def latents(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.gen)

    def critic_update(self) -> None:
        """One critic update of the engine (fake score and heads, the preset's R1)."""
        engine_update(self.engine, "critic")

    def critic_update_without_r1(self) -> None:
        """A critic update with the R1 penalty off (to attribute its cost)."""
        cfg = self.model.cfg
        gamma, cfg.r1_gamma = cfg.r1_gamma, 0.0
        try:
            self.critic_update()
        finally:
            cfg.r1_gamma = gamma

    def generator_update(self) -> None:
        """One generator update of the engine."""
        engine_update(self.engine, "generator")

    def forward_pass(self) -> None:
        """The teacher network's forward without gradients: what a student sample costs."""
        with torch.no_grad():
            self.teacher(self.x_real, torch.ones(self.batch), self.labels())

    def feature_pass(self) -> None:
        """The teacher up to its deepest discriminator tap without gradients: one batch of the
        discriminator's inputs (call after :meth:`build_model`, which selects the taps)."""
        with torch.no_grad():
            self.teacher(self.x_real, torch.ones(self.batch), self.labels(), return_features="only")

    def drop_grads(self) -> None:
        """No gradients resident (an engine update leaves its own until the next one)."""
        drop_grads(self.teacher_engine, *([self.engine] if self.model is not None else []))

    def resident(self) -> dict[str, int]:
        """Weights + AdamW moments held during each kind of update."""
        m = self.model
        trained = (m.generator, m.fake_score, m.head)
        return {
            "teacher": state_bytes(self.teacher, trained=(self.teacher,)),
            "distill": state_bytes(m.teacher, *trained, trained=trained),
        }


KINDS = ("teacher", "critic", "generator")
CLOCKS = {"cpu": "CPU time", "wall": "wall"}


def timed_both(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds (``step_cost.timed``) and this process's CPU seconds of ``fn``.

    With one torch thread the CPU time is the work itself; the wall time also holds the waits
    for a core that other processes on this shared machine cause.
    """
    c0 = time.process_time()
    wall = timed(fn, torch.device("cpu"))
    return wall, time.process_time() - c0


def measure(
    preset: str,
    batch: int | None = None,
    reps: int | None = None,
    budget: Budget | None = None,
    config: dict | None = None,
    report: Callable[[str], None] = lambda s: None,
) -> Result:
    """Build ``preset``'s teacher (or ``config``'s) and measure one distillation iteration.

    ``reps`` timed rounds follow one warm-up round; each round runs a teacher step, one critic
    update and one generator update. Then the transient peak memory of each. Whatever
    ``budget`` does not allow is left out of the result (``Result.stopped`` says what).
    """
    batch = batch or DEFAULT_BATCH.get(preset, 2)
    reps = reps or DEFAULT_REPS.get(preset, 1)
    budget = budget or Budget(math.inf)
    bench = PresetBench(preset, batch, config)
    res = Result(
        preset=preset,
        network=NETWORK_NAMES.get(preset, bench.config["network"]),
        params=num_params(bench.teacher),
        published=PUBLISHED.get(preset) if config is None else None,
        batch=batch,
        critic_ratio=bench.cfg.train.critic_ratio,
        disc_taps=tuple(bench.cfg.disc_taps or ()),
    )
    report(f"{preset}: built {res.network}, {res.params / 1e6:.2f} M parameters, batch {batch}")
    run = {"teacher": bench.teacher_step, "critic": bench.critic_update}
    run["generator"] = bench.generator_update
    kinds = KINDS
    if bench.cfg.loss.r1_gamma > 0:  # last in each round: the preset's own kinds come first
        run["critic_no_r1"] = bench.critic_update_without_r1
        kinds = (*KINDS, "critic_no_r1")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[float]] = {k: [] for k in kinds}
    last: dict[str, float] = {}
    try:
        # Teacher warm-up before the copies exist: its AdamW state then counts as resident.
        with budget.guard():
            last["teacher"] = timed_both(bench.teacher_step)[0]
            bench.build_model()
        res.head_params = num_params(bench.model.head)
        report(f"{preset}: teacher warm-up {last['teacher']:.2f} s; distillation model built")
        for r in range(reps + 1):
            for kind in kinds:
                if r == 0 and kind == "teacher":
                    continue
                if not budget.fits(last.get(kind, 0.0)):
                    raise OutOfTime
                with budget.guard():
                    last[kind], cpu = timed_both(run[kind])
                if r:
                    times[kind].append(last[kind])
                    cpus[kind].append(cpu)
            report(
                f"{preset}: round {r}{' (warm-up)' if r == 0 else ''}: "
                + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in last.items())
            )
            if r:
                res.reps = r
                res.time = {k: statistics.median(v) for k, v in times.items() if v}
                res.cpu = {k: statistics.median(v) for k, v in cpus.items() if v}
        res.resident = bench.resident()
        for kind in ("generator", "teacher", "critic"):
            # profiling costs about two passes; zero_grad as in step_cost: no gradients resident
            if not budget.fits(2 * last[kind]):
                raise OutOfTime
            with budget.guard():
                bench.drop_grads()
                res.mem[kind] = peak_bytes(run[kind], torch.device("cpu"))
            report(f"{preset}: {kind} transient peak {res.mem[kind] / MIB:.0f} MiB")
    except OutOfTime:
        done = [k for k in KINDS if k in res.mem]
        res.stopped = (
            f"--timeout reached after {res.reps} timed round(s), memory of "
            f"{', '.join(done) or 'nothing'}"
        )
        report(f"{preset}: {res.stopped}")
    res.max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return res


# --------------------------------------------------------------------------- output
def _ms(t: dict[str, float], k: str) -> str:
    return f"{t[k] * 1e3:,.0f} ms" if k in t else "-"


def _mib(v: int | None) -> str:
    return f"{v / MIB:,.0f} MiB" if v else "-"


def _x(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


PARAM_HEADER = (
    "| preset | network | parameters (ours) | published | ours - published | discriminator taps | "
    "head parameters |\n|---|---|---|---|---|---|---|"
)
TIME_HEADER = (
    "| preset | clock | batch | timed rounds | teacher step | critic update | generator update | "
    "distill update (ratio k) | distill / teacher | critic / teacher | generator / teacher | "
    "critic update without R1 (distill / teacher) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)
MEM_HEADER = (
    "| preset | transient: teacher step | critic update | generator update | "
    "generator / teacher | resident: teacher training | distillation | "
    "total (resident + transient): generator / teacher | process peak RSS |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def param_row(r: Result) -> str:
    pub = f"{r.published / 1e6:.2f} M" if r.published else "-"
    diff = f"{r.params - r.published:+,.0f}" if r.published else "-"
    return (
        f"| {r.preset} | {r.network} | {r.params / 1e6:.2f} M ({r.params:,}) | {pub} | {diff} | "
        f"{', '.join(r.disc_taps) or '-'} | {r.head_params:,} |"
    )


def time_row(r: Result, clock: str = "cpu") -> str:
    t = r.time if clock == "wall" else r.cpu
    tt, per = t.get("teacher"), r.per_update(clock=clock)
    per_s = f"{per * 1e3:,.0f} ms (k={r.critic_ratio})" if per else "-"
    no_r1 = "R1 off in the preset"
    if "critic_no_r1" in t:
        no_r1 = f"{_ms(t, 'critic_no_r1')} ({_x(r.per_update('critic_no_r1', clock), tt)})"
    return (
        f"| {r.preset} | {CLOCKS[clock]} | {r.batch} | {r.reps} | {_ms(t, 'teacher')} | "
        f"{_ms(t, 'critic')} | "
        f"{_ms(t, 'generator')} | {per_s} | **{_x(per, tt)}** | {_x(t.get('critic'), tt)} | "
        f"{_x(t.get('generator'), tt)} | {no_r1} |"
    )


def mem_row(r: Result) -> str:
    m, rt, rd = r.mem, r.resident.get("teacher"), r.resident.get("distill")
    total = (
        _x(m["generator"] + rd, m["teacher"] + rt)
        if "generator" in m and "teacher" in m and rt
        else "-"
    )
    return (
        f"| {r.preset} | {_mib(m.get('teacher'))} | {_mib(m.get('critic'))} | "
        f"{_mib(m.get('generator'))} | **{_x(m.get('generator'), m.get('teacher'))}** | "
        f"{_mib(rt)} | {_mib(rd)} | {total} | {_mib(r.max_rss)} |"
    )


def tables(results: list[Result]) -> str:
    """The three Markdown tables of ``results``."""
    times = [time_row(r, clock) for r in results for clock in CLOCKS]
    out = [PARAM_HEADER, *map(param_row, results), "", TIME_HEADER, *times]
    out += ["", MEM_HEADER, *map(mem_row, results)]
    notes = [f"- {r.preset}: {r.stopped}" for r in results if r.stopped]
    return "\n".join(out + ([""] + notes if notes else []))


NOTES = """\
How to read it:

- The machine has 2 CPU cores shared with other agents running at the same time. The
  benchmark uses one torch thread; *wall* timings include the waits for a core that the other
  processes cause, *CPU time* (this process's, `time.process_time`) is the work itself and the
  steadier of the two. Each is the median of the timed rounds after a warm-up round; teacher
  step, critic update and generator update are interleaved within each round.
- Teacher step: EDM loss forward + backward + AdamW of the teacher network (dropout on); the
  benchmark trains the teacher in place, then freezes it for distillation, so no fourth copy
  of the weights is needed. Distill update = (k critic updates + 1 generator update) / (k + 1)
  at the preset's critic ratio k; target <= 1.5x a teacher step (DESIGN.md section 4).
- Transient memory = what an update allocates on top of the resident state (PyTorch profiler,
  `step_cost.peak_bytes`); resident = weights + AdamW moments (teacher training: one network;
  distillation: frozen teacher, generator, fake score, head). At batch 1-2 the transient peak
  of every update is dominated by one network's gradients, so the generator/teacher transient
  ratio says little about activations; the resident state dominates the total.
- Process peak RSS: the process's high-water mark up to the end of that preset (the
  teacher-training AdamW state, temporaries of building the copies and allocator slack
  included)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default="cifar10,imagenet64", help="comma separated")
    p.add_argument("--batch", type=int, default=None, help="default: cifar10 2, imagenet64 1")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=540.0, help="seconds for the whole run")
    p.add_argument("--out", default=None, help="also write the report (Markdown) here")
    args = p.parse_args(argv)
    args.presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    for name in args.presets:
        if name not in PUBLISHED:
            p.error(f"--presets: unknown preset {name!r}; valid: {', '.join(PUBLISHED)}")
    for name in ("batch", "reps", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name} must be an integer >= 1, got {v}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    budget, t0 = Budget(args.timeout), time.monotonic()

    def report(line: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {line}", file=sys.stderr, flush=True)

    cpu = platform.processor() or platform.machine()
    head = (
        f"torch {torch.__version__}, CPU ({cpu}), {args.threads} thread(s), "
        f"timeout {args.timeout:.0f} s; presets: "
        + "; ".join(
            f"{p} = batch {PRESETS[p]['batch']}, ratio {PRESETS[p]['critic_ratio']}, GAN "
            f"{PRESETS[p]['gan_weight']}, R1 {PRESETS[p]['r1_gamma']}, taps "
            f"{','.join(PRESETS[p]['disc_taps'])}, ratio EMA {PRESETS[p]['ratio_ema']}"
            for p in args.presets
        )
    )
    print(head, flush=True)
    results = []
    for preset in args.presets:
        if budget.left() <= 0:
            print(f"{preset}: skipped, --timeout reached", flush=True)
            continue
        r = measure(preset, args.batch, args.reps, budget, report=report)
        results.append(r)
        rows = [param_row(r), *(time_row(r, c) for c in CLOCKS), mem_row(r)]
        print("\n" + "\n".join(rows), flush=True)
    body = tables(results)
    print("\n" + body, flush=True)
    elapsed = time.monotonic() - t0
    if args.out:
        title = "The presets' real networks on this CPU (issue 7)"
        write_report(args.out, title, "real_size.py", argv, head, NOTES, body, elapsed)


def write_report(
    out: str | Path,
    title: str,
    script: str,
    argv: list[str] | None,
    head: str,
    notes: str,
    body: str,
    elapsed: float,
) -> None:
    """A benchmark's markdown report: title, the command that made it, date, run time, the
    settings line ``head``, the reading notes and the tables."""
    cmd = f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    text = (
        f"# {title}\n\n`{cmd.strip()}` ({datetime.date.today()}, {elapsed:.0f} s). {head}.\n\n"
        f"{notes}\n\n{body}\n"
    )
    Path(out).write_text(text)
    print(f"\nwrote {out}", flush=True)


if __name__ == "__main__":
    main()
