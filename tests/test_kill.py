"""SIGKILL a real ``fdistill distill`` while it writes a checkpoint, resume, and compare.

The run checkpoints every step; the test watches the run folder for the temp file of a
checkpoint being written and kills the process the moment it appears. After each kill the
run resumes (temp files are cleaned, the checkpoint left is the previous complete one); the
final weights must equal an uninterrupted run's bit for bit, and the metrics log must hold
every step exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fdistill import pipeline
from fdistill.runs import load_checkpoint

pytestmark = pytest.mark.slow

STEPS = 6


def _distill_cmd(teacher: Path, out: Path, resume: bool) -> list[str]:
    cmd = [
        sys.executable, "-m", "fdistill", "distill", "--teacher", str(teacher),
        "--out", str(out), "--steps", str(STEPS), "--batch", "16", "--critic-ratio", "2",
        "--ckpt-every", "1", "--log-every", "1", "--grid-every", "0", "--no-progress",
        "--threads", "1", "--device", "cpu", "--seed", "3",
    ]  # fmt: skip
    return cmd + (["--resume"] if resume else [])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kill") / "teacher"
    cfg = pipeline.TeacherConfig(
        max_images=256, model={"model_channels": 32}, grid_every=0, device="cpu"
    )
    cfg = replace(cfg, train=replace(cfg.train, steps=3, batch=16, progress=False))
    pipeline.train_teacher_run(cfg, out)
    return out


def _kill_during_write(cmd: list[str], out: Path, nth: int, timeout: float = 120.0) -> bool:
    """Start ``cmd``; SIGKILL it as soon as the temp file of its ``nth`` checkpoint write
    appears. True if killed mid-write, False if the process finished first."""
    pattern = ".checkpoint.pt.*.tmp"
    seen = set(out.glob(pattern))  # left by the previous kill; the run must clean them
    writes = 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            new = set(out.glob(pattern)) - seen if out.is_dir() else set()
            if new:
                writes += 1
                seen |= new
                if writes >= nth:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return True
            time.sleep(0.0002)
        assert proc.poll() is not None, "distill did not finish in time"
        assert proc.returncode == 0, proc.stderr.read().decode()
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_during_checkpoint_write_then_resume_is_bit_identical(teacher, tmp_path):
    ref = tmp_path / "straight"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(_distill_cmd(teacher, ref, False), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    kills, resume = 0, False
    for _ in range(4):  # each attempt is killed during its 2nd checkpoint write (if caught)
        if _kill_during_write(_distill_cmd(teacher, out, resume), out, nth=2):
            kills += 1
        resume = (out / "checkpoint.pt").is_file()
    assert kills >= 2, "never caught a checkpoint write in progress"
    print(f"killed during {kills} of 4 attempts' second checkpoint write")
    assert any(out.glob(".checkpoint.pt.*.tmp")) or kills < 4  # a kill left its temp file
    if not resume or load_checkpoint(out)["step"] < STEPS:  # finish without interruptions
        cmd = _distill_cmd(teacher, out, resume)
        subprocess.run(cmd, check=True, env=env, capture_output=True)

    a, b = load_checkpoint(ref), load_checkpoint(out)
    assert a["step"] == b["step"] == STEPS
    for name in ("generator", "fake_score", "head", "ema"):
        sa, sb = a["state"][name], b["state"][name]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs after {kills} kills"
    assert not list(out.glob(".*.tmp")), "temp files of killed writes were not cleaned up"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), f"metrics.jsonl steps after resumes: {steps}"
