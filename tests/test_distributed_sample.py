"""``fdistill sample`` and ``fdistill eval`` under torchrun: the ranks share the batches and
rank 0 writes what one process writes.

Run as a script under torchrun, this file is the worker: it calls the CLI for a tiny student
and teacher. The test compares the files with those of the same commands in this process:
the ``.npz`` and PNG byte for byte, the metrics JSON number for number (the metrics are taken
from the float samples, so they see any difference the 8-bit files would round away).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fdistill.cli import main
from fdistill.models import load_run
from fdistill.sampling import generate, generate_batches, run_sampler, sample_seeds

TINY = ["--channels", "8", "--no-progress", "--seed", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    teacher, student = root / "teacher", root / "student"
    args = ["train-teacher", "--out", str(teacher), "--steps", "2", "--batch", "8"]
    assert main([*args, *TINY, "--grid-every", "0"]) == 0
    args = ["distill", "--teacher", str(teacher), "--out", str(student), "--steps", "1"]
    args += ["--batch", "8", "--critic-ratio", "1", "--grid-every", "0"]
    # a 2-step student: its re-noising draws continue each sample's own stream, so torchrun
    # must still equal one process (a one-step student is the K = 1 case of the same path)
    args += ["--student-steps", "2"]
    assert main([*args, "--no-progress", "--device", "cpu"]) == 0
    return teacher, student


def commands(teacher: Path, student: Path, out: Path) -> list[list[str]]:
    """The CLI calls both sides make: uneven shares (4 batches of 3, 3, 3, 1 over 2 ranks),
    a rank with nothing to do (n = 2 in one batch), a teacher, and evaluations."""
    out.mkdir(parents=True, exist_ok=True)
    sample = ["sample", "--device", "cpu", "--seed", "4"]
    ev = ["eval", "--device", "cpu", "--inception", "none", "--seed", "2"]
    return [
        [*sample, "--ckpt", str(student), "--n", "10", "--batch", "3"]
        + ["--out", str(out / "student.npz"), "--grid", str(out / "student.png")],
        [*sample, "--ckpt", str(student), "--n", "2", "--batch", "3"]
        + ["--out", str(out / "two.npz")],
        [*sample, "--ckpt", str(teacher), "--n", "5", "--batch", "2", "--nfe", "3"]
        + ["--out", str(out / "teacher.npz")],
        [*ev, "--ckpt", str(student), "--n", "30", "--batch", "7"]
        + ["--out", str(out / "student.json")],
        [*ev, "--ckpt", str(teacher), "--n", "12", "--batch", "5", "--nfe", "3"]
        + ["--out", str(out / "teacher.json")],
    ]


def test_rank_shares_merge_to_the_single_process_samples(runs):
    """Without processes: rank r of 3 runs batches r, r+3, ...; merged they are generate's."""
    run = load_run(runs[1])
    fn, seeds = run_sampler(run), sample_seeds(1, 11)
    labels = torch.arange(11) % run.num_classes
    want = generate(fn, run.shape, seeds, labels, batch=2)
    parts = [generate_batches(fn, run.shape, seeds, labels, 2, "cpu", r, 3) for r in range(3)]
    assert [sorted(p) for p in parts] == [[0, 3], [1, 4], [2, 5]]
    merged = {j: x for p in parts for j, x in p.items()}
    assert torch.equal(torch.cat([merged[j] for j in range(6)]), want)


@pytest.mark.slow
def test_torchrun_sample_and_eval_equal_one_process(runs, tmp_path):
    teacher, student = runs
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += [__file__, str(teacher), str(student), str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 processes" in proc.stdout

    for args in commands(teacher, student, tmp_path / "one"):
        assert main(args) == 0
    one, two = tmp_path / "one", tmp_path / "two"
    for name in ("student.npz", "two.npz", "teacher.npz"):
        a, b = np.load(one / name), np.load(two / name)
        assert a.files == b.files == ["images", "labels"], name
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
    assert (one / "student.png").read_bytes() == (two / "student.png").read_bytes()
    for name in ("student.json", "teacher.json"):
        a, b = json.loads((one / name).read_text()), json.loads((two / name).read_text())
        a.pop("generation"), b.pop("generation")  # timings
        assert a == b, name
        assert a["n"] == (30 if name == "student.json" else 12)
    # The comparison can fail: another seed gives other samples.
    args = ["sample", "--ckpt", str(student), "--n", "10", "--seed", "5"]
    assert main([*args, "--out", str(one / "other.npz")]) == 0
    other = np.load(one / "other.npz")["images"]
    assert not np.array_equal(other, np.load(one / "student.npz")["images"])


if __name__ == "__main__":
    torch.set_num_threads(1)
    teacher_dir, student_dir, out_dir = (Path(a) for a in sys.argv[1:4])
    for argv in commands(teacher_dir, student_dir, out_dir):
        code = main(argv)
        if code:
            raise SystemExit(code)
