"""What the training engine adds to the updates it runs, at tiny sizes (DESIGN.md section 4).

The engine (:func:`fdistill.engine.train`) wraps every optimiser update in its bookkeeping:
the device-side NaN/Inf guard, statistics, micro-batching, the EMA, logging. At real sizes that
is lost in the networks' cost; at tiny sizes it is not. This script times the engine's update
against a bare hand-written loop doing the same updates: the same method losses, optimisers
(fused AdamW), gradient clipping and EMA, with no guard, statistics or logging. Both start
from the same weights and random streams, so they must end with the same weights; the script
checks that they do (bit for bit) before it reports a time.

Workloads: the default 2-D toy (``fdistill toy``: f-distill, MLP networks, batch 256, 5 critic
updates per generator update) and teacher training (EDM loss) of the same MLP. Rounds
interleave engine and bare runs; the table gives medians of the per-step times after a
warm-up, per optimiser update: wall time, and the CPU time of the process's one thread (which
a busy machine disturbs less; the ratio is taken on both). The best round is reported, as
``timeit`` does: on a shared machine slower rounds measure the neighbours.

    python benchmarks/engine_overhead.py            # writes benchmarks/results/engine_overhead.md
    python benchmarks/engine_overhead.py --quick    # a few steps, for the smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from fdistill import toy
from fdistill.denoisers import MLP, EDMPrecond
from fdistill.engine import (
    Dist,
    LoopConfig,
    TeacherTrainConfig,
    make_adamw,
    make_generators,
    train,
)
from fdistill.methods import Denoising, Inputs
from fdistill.methods.base import Method

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="engine steps per timed run")
    p.add_argument("--warmup", type=int, default=10, help="first steps of a run not timed")
    p.add_argument("--rounds", type=int, default=5, help="engine/bare run pairs")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the CI default)")
    p.add_argument("--workloads", default="toy,teacher", help="toy, teacher or both")
    p.add_argument("--out", type=Path, default=RESULTS / "engine_overhead.md")
    p.add_argument("--quick", action="store_true", help="a few steps and rounds (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds = 4, 1, 1
    return args


# --------------------------------------------------------------------------- workloads
def toy_workload() -> tuple[Method, Inputs, LoopConfig]:
    """The default ``fdistill toy --divergence js`` method, inputs and loop settings."""
    cfg = toy.ToyConfig()
    teacher = toy.make_teacher(cfg)
    torch.manual_seed(cfg.train.seed)
    method = toy.build(cfg, teacher)
    real, latents = toy.samplers(teacher)
    return method, Inputs(real=real, latents=latents), cfg.train


def teacher_workload() -> tuple[Method, Inputs, LoopConfig]:
    """EDM teacher training of the toy's MLP denoiser on the toy's mixture, batch 256."""
    cfg = toy.ToyConfig()
    mixture = toy.make_teacher(cfg)
    torch.manual_seed(0)
    net = EDMPrecond(MLP(mixture.dim, hidden=cfg.hidden, depth=cfg.depth), toy.data_std(mixture))
    real, _ = toy.samplers(mixture)
    return Denoising(net), Inputs(real=real), TeacherTrainConfig(batch=256, ema_decay=0.99)


WORKLOADS: dict[str, Callable[[], tuple[Method, Inputs, LoopConfig]]] = {
    "toy": toy_workload,
    "teacher": teacher_workload,
}


# --------------------------------------------------------------------------- the two loops
Times = list[tuple[float, float]]
"""Per-step ``(wall, thread CPU)`` seconds."""


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def _steps(marks: list[tuple[float, float]]) -> Times:
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:], strict=False)]


def engine_run(method: Method, inputs: Inputs, cfg: LoopConfig) -> tuple[Times, nn.Module]:
    """Step times of :func:`fdistill.engine.train` (the code every run uses); the EMA module."""
    marks = [_clock()]
    ema = train(method, inputs, cfg, on_step=lambda done, e: marks.append(_clock()))
    return _steps(marks[1:]), ema.module


def bare_run(method: Method, inputs: Inputs, cfg: LoopConfig) -> tuple[Times, nn.Module]:
    """The same updates, written by hand: per phase ``repeat`` times zero_grad, loss,
    backward, clip, AdamW step; then the EMA. No guard, statistics, logging or micro-batches."""
    plan = method.plan(cfg)
    gens = make_generators(cfg.seed, Dist())
    params = {o: method.parameters_of(spec.modules) for o, spec in plan.optimizers.items()}
    opts = {
        o: make_adamw(params[o], spec.lr, cfg.betas, cfg.weight_decay, torch.device("cpu"))
        for o, spec in plan.optimizers.items()
    }
    target = getattr(method, plan.ema)
    ema = copy.deepcopy(target).requires_grad_(False).eval()
    ema_params, target_params = list(ema.parameters()), list(target.parameters())
    weight = 1 - cfg.ema_decay
    marks = [_clock()]
    for step in range(1, cfg.steps + 1):
        for o, spec in plan.optimizers.items():
            if spec.warmup > 0:
                for group in opts[o].param_groups:
                    group["lr"] = spec.lr * min(1.0, step / spec.warmup)
        for phase in plan.phases:
            opt, ps = opts[phase.optimizer], params[phase.optimizer]
            for _ in range(phase.repeat):
                opt.zero_grad(set_to_none=True)
                loss, _ = phase.loss(inputs, cfg.batch, gens)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(ps, cfg.grad_clip)
                opt.step()
        with torch.no_grad():
            for e, p in zip(ema_params, target_params, strict=True):
                e.lerp_(p, weight)
        marks.append(_clock())
    return _steps(marks[1:]), ema


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def measure(name: str, args: argparse.Namespace) -> dict:
    """Interleaved engine and bare runs of one workload: per-update medians and their ratio."""
    method, inputs, cfg = WORKLOADS[name]()
    cfg = replace(cfg, steps=args.steps, progress=False, ckpt_every=10**9)
    updates = sum(phase.repeat for phase in method.plan(cfg).phases)
    runs: dict[str, list[tuple[float, float]]] = {"engine": [], "bare": []}
    same, skip = True, max(args.warmup - 1, 0)
    for _ in range(args.rounds):
        te, ema_e = engine_run(copy.deepcopy(method), inputs, cfg)
        tb, ema_b = bare_run(copy.deepcopy(method), inputs, cfg)
        same = same and same_weights(ema_e, ema_b)
        for key, times in (("engine", te), ("bare", tb)):
            wall, cpu = zip(*times[skip:], strict=True)
            runs[key].append((statistics.median(wall), statistics.median(cpu)))
    # ms per update of the best round (wall and CPU taken separately)
    best = {k: [1e3 * min(r[i] for r in v) / updates for i in (0, 1)] for k, v in runs.items()}
    (e_ms, e_cpu), (b_ms, b_cpu) = best["engine"], best["bare"]
    return {
        "workload": name,
        "updates_per_step": updates,
        "batch": cfg.batch,
        "bare_ms": b_ms,
        "engine_ms": e_ms,
        "ratio": e_ms / b_ms,
        "bare_cpu_ms": b_cpu,
        "engine_cpu_ms": e_cpu,
        "cpu_ratio": e_cpu / b_cpu,
        "engine_it_s": 1e3 / (e_ms * updates),
        "bare_it_s": 1e3 / (b_ms * updates),
        "same_weights": same,
        "rounds_ms": {k: [[1e3 * x / updates for x in r] for r in v] for k, v in runs.items()},
    }


def table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        "| workload | updates/step | bare ms/update | engine ms/update | engine / bare "
        "| CPU: bare ms | CPU: engine ms | CPU: engine / bare | engine it/s | same weights |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['workload']} | {r['updates_per_step']} | {r['bare_ms']:.3f} | "
        f"{r['engine_ms']:.3f} | {r['ratio']:.3f} | {r['bare_cpu_ms']:.3f} | "
        f"{r['engine_cpu_ms']:.3f} | {r['cpu_ratio']:.3f} | {r['engine_it_s']:.1f} | "
        f"{'yes' if r['same_weights'] else 'NO'} |\n"
        for r in rows
    )
    note = (
        f"\n{args.rounds} interleaved rounds of {args.steps} steps each: the median per-step "
        f"time after {args.warmup} warm-up steps, best round; torch "
        f"{torch.__version__}, {args.threads} thread(s), {platform.processor() or 'cpu'}. "
        "Goal (DESIGN.md section 4): engine / bare <= 1.10.\n"
    )
    return "# Engine overhead at tiny sizes\n\n" + head + body + note


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(w, args) for w in args.workloads.split(",") if w.strip()]
    text = table(rows, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
    )
    for r in rows:
        if not r["same_weights"]:
            raise SystemExit(f"{r['workload']}: the engine and the bare loop disagree")
    return rows


if __name__ == "__main__":
    main()
