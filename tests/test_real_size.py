"""benchmarks/real_size.py: the presets' published networks and its measuring core, shrunk."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from fdistill.distill import FDistill

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def rs():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("real_size")
    finally:
        sys.path.remove(str(BENCH))


def tiny(rs, preset: str) -> dict:
    """The preset's network family and layout, a few thousand times smaller."""
    return rs.teacher_config(
        preset, model_channels=16, channel_mult=[1, 1, 1, 1], num_blocks=1, attn_resolutions=[8]
    )


@pytest.mark.parametrize("preset", ["cifar10", "imagenet64"])
def test_published_parameter_counts(rs, preset):
    """The benchmark's teacher configs, rebuilt through the model registry (on the meta device:
    no memory), have the published networks' sizes to the paper's last digit."""
    from fdistill.denoisers.registry import build_denoiser

    with torch.device("meta"):
        net = build_denoiser(rs.teacher_config(preset))
    published = {"cifar10": 55.73e6, "imagenet64": 295.90e6}[preset]  # EDM paper
    assert rs.PUBLISHED[preset] == published
    assert abs(rs.num_params(net) - published) <= 0.01e6  # within the last digit published


def test_teacher_config_rebuilds_through_registry(rs):
    """The benchmark's teacher is the "edm" model type an EDM pickle of that network loads as,
    with non-trivial outputs (EDM zero-initialises the output layer: D would be c_skip * x)."""
    cfg = tiny(rs, "cifar10")
    teacher = rs.random_teacher(cfg)
    assert teacher.config["type"] == "edm" and teacher.config["network"] == "SongUNet"
    assert teacher.info.shape == (3, 32, 32) and teacher.info.num_classes == 10
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        d = teacher(x, sigma, torch.tensor([1, 7]))
    c_skip = (0.25 / (sigma**2 + 0.25)).view(-1, 1, 1, 1)
    assert (d - c_skip * x).abs().mean() > 1e-2
    assert rs.teacher_config("imagenet64")["network"] == "DhariwalUNet"


@pytest.mark.parametrize(
    "preset, taps, ratio, gan, r1, ema",
    [  # paper Table 5 and the official code's discriminator scales / ratio EMA / no R1
        ("cifar10", ("enc32", "enc16", "enc8"), 5, 1e-3, 0.0, 0.0),
        ("imagenet64", ("enc8",), 5, 3e-3, 0.0, 0.5),
    ],
)
def test_preset_applied_and_measured(rs, preset, taps, ratio, gan, r1, ema):
    bench = rs.PresetBench(preset, 2, tiny(rs, preset))
    bench.teacher_step()
    model = bench.build_model()
    assert isinstance(model, FDistill)
    assert tuple(m.name for m in model.head.maps) == taps
    assert bench.cfg.train.critic_ratio == ratio
    lc = model.cfg
    assert (lc.gan_weight, lc.r1_gamma, lc.ratio_ema) == (gan, r1, ema)
    assert (model.sigma_bins.binning, lc.ratio_bins, lc.fake_weighting) == (
        "linear-sigma",
        10,
        "none",
    )
    assert lc.disc_features == "teacher"

    # The teacher step trains the teacher; distillation updates must not touch it.
    before = [p.detach().clone() for p in model.teacher.parameters()]
    gen_before = [p.detach().clone() for p in model.generator.parameters()]
    bench.critic_update()
    bench.generator_update()
    assert all(torch.equal(a, p) for a, p in zip(before, model.teacher.parameters(), strict=True))
    assert any(
        not torch.equal(a, p) for a, p in zip(gen_before, model.generator.parameters(), strict=True)
    )
    bench.teacher_step()
    assert any(
        not torch.equal(a, p) for a, p in zip(before, model.teacher.parameters(), strict=True)
    )
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_measure_core(rs):
    """One warm-up and one timed round of each update, then memory, at a tiny size."""
    cfg, threads = tiny(rs, "cifar10"), torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark runs, so CPU time <= wall time
    try:
        r = rs.measure("cifar10", batch=2, reps=1, config=cfg)
    finally:
        torch.set_num_threads(threads)
    assert r.stopped == "" and r.reps == 1
    # the cifar10 preset has no R1 (the official configs): no second critic timing
    assert set(r.time) == {"teacher", "critic", "generator"}
    k, t = r.critic_ratio, r.time
    assert r.per_update() == pytest.approx((k * t["critic"] + t["generator"]) / (k + 1))
    assert set(r.cpu) == set(t) and all(v > 0 for v in r.cpu.values())
    # one thread: the process's CPU time cannot exceed the wall time by more than clock noise
    assert all(r.cpu[k] <= 1.05 * t[k] + 0.01 for k in t)
    # Lower bounds that need no measurement: an update allocates at least the gradients of
    # what it trains (teacher: the network; generator: its copy of it).
    param_bytes = 4 * r.params
    assert r.mem["teacher"] >= param_bytes and r.mem["generator"] >= param_bytes
    assert r.mem["critic"] >= param_bytes  # the fake score's gradients
    # Resident: teacher training = weights + 2 AdamW moments; distillation = frozen teacher +
    # generator and fake score with moments (3 + 3) + the head with moments.
    assert r.resident["teacher"] == 3 * param_bytes
    assert r.resident["distill"] == 7 * param_bytes + 3 * 4 * r.head_params
    text = rs.tables([r])
    assert "| cifar10 | DDPM++ (SongUNet) | 0.15 M" in text and "(k=5)" in text


def test_timeout_reports_what_was_measured(rs):
    """An exhausted budget stops the run early and leaves unmeasured cells empty."""
    r = rs.measure("cifar10", batch=1, reps=3, budget=rs.Budget(0.0), config=tiny(rs, "cifar10"))
    assert r.stopped.startswith("--timeout reached after 0 timed round(s)")
    assert r.time == r.cpu == r.mem == {} and r.per_update() is None
    for clock in ("cpu", "wall"):
        assert rs.time_row(r, clock).count("| - ") >= 4


def test_cli_rejects_unknown_preset(rs):
    with pytest.raises(SystemExit):
        rs.parse_args(["--presets", "mnist"])


def test_timeout_stops_a_running_measurement(rs):
    """A budget that runs out mid-update stops it (SIGALRM) instead of waiting for the end."""
    import time

    t0 = time.monotonic()
    r = rs.measure("cifar10", batch=2, reps=50, budget=rs.Budget(0.3), config=tiny(rs, "cifar10"))
    assert time.monotonic() - t0 < 5.0  # 51 rounds would take far longer
    assert r.stopped.startswith("--timeout reached") and r.reps < 50


def test_cli_writes_report_within_timeout(rs, tmp_path, capsys):
    """With no time left every preset is skipped, and the report is still written."""
    out, threads = tmp_path / "report.md", torch.get_num_threads()
    try:
        rs.main(["--timeout", "0", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert text.startswith("# The presets' real networks")
    assert "2 CPU cores shared" in text and "| preset | clock |" in text
    assert "cifar10: skipped, --timeout reached" in capsys.readouterr().out
