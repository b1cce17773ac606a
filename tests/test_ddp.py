"""DDP on CPU: 2 gloo processes under torchrun against one process with the same global batch.

Run as a script under torchrun, this file is the worker: it trains a tiny teacher and distils
it through :mod:`fdistill.pipeline` and saves every rank's parameters.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fdistill import pipeline, rng
from fdistill.rng import BatchRandom


def configs(root: Path) -> tuple[pipeline.TeacherConfig, pipeline.DistillConfig]:
    """Tiny runs whose only randomness comes from the rank-independent training streams."""
    t = pipeline.TeacherConfig(device="cpu", grid_every=0, model={"model_channels": 8})
    # Label dropout draws from each rank's own global RNG, so it is off here.
    t = replace(t, model=t.model | {"label_dropout": 0.0})
    t = replace(t, train=replace(t.train, steps=3, batch=8, progress=False, lr_warmup=0))
    d = pipeline.DistillConfig(teacher=str(root / "teacher"), device="cpu", grid_every=0)
    d = replace(d, train=replace(d.train, steps=2, batch=8, critic_ratio=2, progress=False))
    return t, d


def train_both(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Teacher then distillation in ``root``; the trained parameters of every part."""
    t, d = configs(root)
    teacher = pipeline.train_teacher_run(t, root / "teacher")
    student = pipeline.distill_run(d, root / "student")
    model = student.model
    return {
        "teacher": teacher.model.state_dict(),
        "teacher_ema": teacher.ema.state_dict(),
        "generator": model.generator.state_dict(),
        "fake_score": model.fake_score.state_dict(),
        "head": model.head.state_dict(),
        "generator_ema": student.ema.state_dict(),
    }


def test_batch_random_rows_are_the_single_process_slice():
    """Rank r of 2 draws exactly rows r*n..(r+1)*n of what one process draws, call after call."""
    single = BatchRandom(7)
    ranks = [BatchRandom(7, rank=r, world=2) for r in (0, 1)]
    for _ in range(3):
        full_x, full_i = single.randn((6, 2, 3)), single.randint(100, (6,))
        for r, g in enumerate(ranks):
            torch.testing.assert_close(
                g.randn((3, 2, 3)), full_x[3 * r : 3 * r + 3], rtol=0, atol=0
            )
            assert torch.equal(g.randint(100, (3,)), full_i[3 * r : 3 * r + 3])
    # Its state round-trips like a torch.Generator's, so checkpoints resume it exactly.
    state = ranks[1].get_state()
    a = rng.randn((3, 4), ranks[1])
    ranks[1].set_state(state)
    assert torch.equal(rng.randn((3, 4), ranks[1]), a)
    # A plain generator is passed through unchanged.
    g = torch.Generator().manual_seed(1)
    assert torch.equal(rng.randint(9, (5,), g), torch.randint(9, (5,), generator=g.manual_seed(1)))


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--standalone", __file__, str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = train_both(tmp_path / "single")

    # Adam turns the all-reduce's float round-off in tiny gradients into parameter differences
    # of ~2e-6 after a few steps; a wrong data split moves parameters by ~lr = 2e-4 per step.
    atol = 2e-5
    for part, params in single.items():
        for name, ref in params.items():
            r0, r1 = ranks[0][part][name], ranks[1][part][name]
            # Averaged gradients make the ranks' replicas identical, bit for bit.
            assert torch.equal(r0, r1), f"{part}.{name} differs between ranks"
            # Same global batch as one process: equal up to float round-off.
            torch.testing.assert_close(r0, ref, rtol=1e-3, atol=atol, msg=f"{part}.{name}")
    # The student moved from its initialisation (the EMA teacher) by far more than atol.
    init = {f"denoiser.{k}": v for k, v in single["teacher_ema"].items()}
    moved = max((v - init[k]).abs().max().item() for k, v in single["generator"].items())
    assert moved > 10 * atol
    # Rank 0 wrote the run folders.
    assert (tmp_path / "ddp" / "student" / "checkpoint.pt").is_file()


def _worker(root: Path) -> None:
    torch.set_num_threads(1)
    params = train_both(root)
    torch.save(params, root / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
