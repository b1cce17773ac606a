"""Data parallelism on CPU: 2 gloo processes under torchrun against one process, same global batch.

Run as a script under torchrun, this file is the worker: for each variant it trains a tiny
teacher and distils it through :mod:`fdistill.pipeline`, and saves every rank's parameters.
Variants: ``ddp`` (DistributedDataParallel, the default), ``accum`` (DDP with two micro-batches
per process, ``--batch-gpu``), ``fsdp`` (FSDP2 shards; the distillation is stopped after one
step and resumed, so the sharded checkpoint is written and read back). Then both loops are
called directly on a tiny EDM SongUNet with a parameter that gets no gradient, under DDP and
FSDP (:func:`edm_runs`), and on a vector MLP compiled, with accumulation (:func:`mlp_runs`).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fdistill import pipeline, rng
from fdistill.critic import MultiScaleHead
from fdistill.denoisers import MLP, EDMPrecond
from fdistill.denoisers.songunet import SongUNet
from fdistill.distill import FDistill, LossConfig
from fdistill.divergences import get_divergence
from fdistill.generator import OneStepGenerator
from fdistill.rng import BatchRandom
from fdistill.training import (
    TeacherTrainConfig,
    TrainConfig,
    distributed,
    make_batch_randoms,
    train_distill,
    train_teacher,
)

VARIANTS = ("ddp", "accum", "fsdp")  # run under torchrun; "plain": normaliser off (single process)


def configs(
    root: Path, variant: str = "ddp"
) -> tuple[pipeline.TeacherConfig, pipeline.DistillConfig]:
    """Tiny runs whose only randomness comes from the rank-independent training streams."""
    t = pipeline.TeacherConfig(device="cpu", grid_every=0, model={"model_channels": 8})
    # Label dropout draws from each rank's own global RNG, so it is off here.
    t = replace(t, model=t.model | {"label_dropout": 0.0})
    t = replace(t, train=replace(t.train, steps=3, batch=8, progress=False, lr_warmup=0))
    d = pipeline.DistillConfig(teacher=str(root / "teacher"), device="cpu", grid_every=0)
    d = replace(d, train=replace(d.train, steps=2, batch=8, critic_ratio=2, progress=False))
    # "accum" (two micro-batches a process) must equal the whole-batch run with the ratio
    # normaliser on: its bin and batch means are the whole batch's (the engine's prepass).
    # "plain" turns the normaliser off: it shows the comparison can fail.
    if variant == "plain":
        d = replace(d, loss=replace(d.loss, normalize=False))
    if variant == "accum":
        t = replace(t, train=replace(t.train, batch_gpu=2))
        d = replace(d, train=replace(d.train, batch_gpu=2))
    if variant == "fsdp":
        t = replace(t, train=replace(t.train, fsdp=True))
        d = replace(d, train=replace(d.train, fsdp=True))
    return t, d


def train_both(root: Path, variant: str = "ddp") -> dict[str, dict[str, torch.Tensor]]:
    """Teacher then distillation in ``root``; the trained parameters of every part."""
    t, d = configs(root, variant)
    teacher = pipeline.train_teacher_run(t, root / "teacher")
    if variant == "fsdp":  # one step, then resume to the end: a sharded checkpoint round trip
        pipeline.distill_run(replace(d, train=replace(d.train, steps=1)), root / "student")
        student = pipeline.distill_run(d, root / "student", resume=True)
    else:
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


def edm_runs(variant: str = "single") -> dict[str, dict[str, torch.Tensor]]:
    """Both loops, called directly, on a tiny EDM SongUNet whose ``map_augment`` gets no
    gradient (no augmentation labels are passed), with the head on the fake score's features
    (two fake-score passes per critic backward); ``variant`` "fsdp" shards."""
    with distributed("cpu") as ddp:
        torch.manual_seed(0)
        net = SongUNet(
            8, 1, 1, label_dim=3, augment_dim=2, model_channels=8, channel_mult=[1, 2], dropout=0.0
        )
        net = EDMPrecond(net.requires_grad_(True))
        g = torch.Generator().manual_seed(1)
        data, labels = torch.randn(32, 1, 8, 8, generator=g), torch.arange(32) % 3

        def sample_real(n, gen):
            idx = rng.randint(len(data), (n,), gen)
            return data[idx], labels[idx]

        def sample_latents(n, gen):
            return rng.randn((n, 1, 8, 8), gen), rng.randint(3, (n,), gen)

        fsdp = variant == "fsdp"
        cfg = TeacherTrainConfig(steps=2, batch=8, lr=1e-3, progress=False, fsdp=fsdp)
        ema = train_teacher(net, sample_real, cfg, ddp=ddp, gens=make_batch_randoms(0, ddp))
        teacher = ema.module
        fake = copy.deepcopy(teacher).requires_grad_(True).train()
        model = FDistill(
            teacher,
            OneStepGenerator(copy.deepcopy(fake), sigma_init=80.0),
            fake,
            MultiScaleHead.for_network(fake, hidden=16),
            get_divergence("js"),
            LossConfig(gan_weight=1e-2, disc_features="fake"),
        )
        cfg = TrainConfig(steps=2, batch=8, critic_ratio=2, lr_gen=1e-3, progress=False, fsdp=fsdp)
        gen_ema = train_distill(
            model, sample_real, sample_latents, cfg, ddp=ddp, gens=make_batch_randoms(1, ddp)
        )
    return {
        "teacher": net.state_dict(),
        "teacher_ema": teacher.state_dict(),
        "generator": model.generator.state_dict(),
        "fake_score": model.fake_score.state_dict(),
        "head": model.head.state_dict(),
        "generator_ema": gen_ema.module.state_dict(),
    }


def mlp_runs(variant: str = "single") -> dict[str, dict[str, torch.Tensor]]:
    """Distillation of a vector MLP teacher, compiled (dynamo + AOT autograd, quick) under DDP
    or FSDP with two micro-batches a process; "single": one process, eager, whole batches."""
    with distributed("cpu") as ddp:
        torch.manual_seed(0)
        teacher = EDMPrecond(MLP(4, hidden=32, depth=2), sigma_data=1.0)
        for p in teacher.parameters():
            torch.nn.init.normal_(p, std=0.2)
        fake = copy.deepcopy(teacher).requires_grad_(True)
        model = FDistill(
            teacher,
            OneStepGenerator(copy.deepcopy(fake), sigma_init=80.0),
            fake,
            MultiScaleHead.for_network(fake, hidden=16),
            get_divergence("js"),
            LossConfig(gan_weight=1e-2, normalize=False, disc_features="fake"),
        )
        vec = torch.randn(32, 4, generator=torch.Generator().manual_seed(2))
        cfg = TrainConfig(steps=3, batch=8, critic_ratio=2, lr_gen=1e-3, progress=False)
        if variant != "single":
            cfg = replace(cfg, batch_gpu=2, compile=True, compile_backend="aot_eager")
            cfg = replace(cfg, fsdp=variant == "fsdp_compile")
        gen_ema = train_distill(
            model,
            lambda n, g: (vec[rng.randint(len(vec), (n,), g)], None),
            lambda n, g: (rng.randn((n, 4), g), None),
            cfg,
            ddp=ddp,
            gens=make_batch_randoms(1, ddp),
        )
    return {
        "generator": model.generator.state_dict(),
        "fake_score": model.fake_score.state_dict(),
        "head": model.head.state_dict(),
        "generator_ema": gen_ema.module.state_dict(),
    }


def _compare(ranks: list[dict], ref_run: dict, variant: str, atol: float) -> None:
    for part, params in ref_run.items():
        for name, ref in params.items():
            r0, r1 = ranks[0][part][name], ranks[1][part][name]
            where = f"{variant}: {part}.{name}"
            # Averaged gradients make the ranks' replicas identical, bit for bit.
            assert torch.equal(r0, r1), f"{where} differs between ranks"
            # Same global batch as one process: equal up to float round-off.
            torch.testing.assert_close(r0, ref, rtol=1e-3, atol=atol, msg=where)


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
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # One process, no accumulation: the reference of every variant, accumulation included.
    single = train_both(tmp_path / "single")
    plain = train_both(tmp_path / "single_plain", "plain")

    # Adam turns the all-reduce's float round-off in tiny gradients into parameter differences
    # of ~2e-6 after a few steps; a wrong data split moves parameters by ~lr = 2e-4 per step.
    atol = 2e-5
    for variant in VARIANTS:
        ref_run = single
        ranks = [
            torch.load(tmp_path / "ddp" / variant / f"rank{r}.pt", weights_only=True)
            for r in (0, 1)
        ]
        _compare(ranks, ref_run, variant, atol)
        # Rank 0 wrote the run folders.
        assert (tmp_path / "ddp" / variant / "student" / "checkpoint.pt").is_file()
    edm = edm_runs()
    for variant in ("ddp", "fsdp"):
        ranks = [
            torch.load(tmp_path / "ddp" / f"edm_{variant}" / f"rank{r}.pt", weights_only=True)
            for r in (0, 1)
        ]
        _compare(ranks, edm, f"edm {variant}", atol)
    mlp = mlp_runs()
    for variant in ("ddp_compile", "fsdp_compile"):
        ranks = [
            torch.load(tmp_path / "ddp" / f"mlp_{variant}" / f"rank{r}.pt", weights_only=True)
            for r in (0, 1)
        ]
        _compare(ranks, mlp, f"mlp {variant}", atol)
    unused = "denoiser.net.map_augment.weight"
    assert torch.equal(edm["generator"][unused], edm["teacher_ema"][unused.split(".", 1)[1]])
    # The student moved from its initialisation (the EMA teacher) by far more than atol, and
    # the normaliser changes the result by far more too: the comparisons can fail.
    init = {f"denoiser.{k}": v for k, v in single["teacher_ema"].items()}
    moved = max((v - init[k]).abs().max().item() for k, v in single["generator"].items())
    assert moved > 10 * atol
    normaliser = max(
        (v - plain["generator"][k]).abs().max().item() for k, v in single["generator"].items()
    )
    assert normaliser > 5 * atol  # 1.3e-4 with the official loss defaults


def _worker(root: Path) -> None:
    torch.set_num_threads(1)
    rank = os.environ["RANK"]
    for variant in VARIANTS:
        params = train_both(root / variant, variant)
        torch.save(params, root / variant / f"rank{rank}.pt")
    for variant in ("ddp", "fsdp"):
        params = edm_runs(variant)
        (root / f"edm_{variant}").mkdir(parents=True, exist_ok=True)
        torch.save(params, root / f"edm_{variant}" / f"rank{rank}.pt")
    for variant in ("ddp_compile", "fsdp_compile"):
        params = mlp_runs(variant)
        (root / f"mlp_{variant}").mkdir(parents=True, exist_ok=True)
        torch.save(params, root / f"mlp_{variant}" / f"rank{rank}.pt")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
