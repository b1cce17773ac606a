"""Image pipeline end to end through the CLI: teacher, distillation, sampling, NaN stop."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fdistill import pipeline
from fdistill.cli import main
from fdistill.denoisers import EDMLoss
from fdistill.denoisers.registry import build_denoiser
from fdistill.runs import load_checkpoint
from fdistill.samplers import sample_with_nfe, seeded_randn
from fdistill.teachers import load_teacher

TINY = ["--channels", "8", "--no-progress", "--seed", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    args = ["train-teacher", "--out", str(out), "--steps", "3", "--batch", "8"]
    assert main([*args, *TINY, "--grid-every", "2", "--ckpt-every", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    args = ["distill", "--teacher", str(teacher), "--out", str(out), "--divergence", "js"]
    args += ["--steps", "2", "--batch", "8", "--critic-ratio", "2", "--grid-every", "1"]
    assert main([*args, "--no-progress", "--device", "cpu"]) == 0
    return out


def test_teacher_run_files(teacher):
    assert {p.name for p in teacher.iterdir()} >= {"checkpoint.pt", "config.json", "metrics.jsonl"}
    assert sorted(p.name for p in (teacher / "grids").iterdir()) == ["0000002.png", "0000003.png"]
    ckpt = load_checkpoint(teacher)
    assert ckpt["step"] == 3
    config = json.loads((teacher / "config.json").read_text())
    assert config["model"]["model_channels"] == 8 and config["num_classes"] == 10
    # The config beside the weights rebuilds the network: every saved tensor fits it exactly.
    net = build_denoiser(config["model"])
    net.load_state_dict(ckpt["state"]["ema"])
    records = [json.loads(line) for line in (teacher / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and math.isfinite(records[-1]["loss"])


def test_student_run_files_and_logged_weights(student):
    assert (student / "checkpoint.pt").is_file()
    assert sorted(p.name for p in (student / "grids").iterdir()) == ["0000001.png", "0000002.png"]
    rec = json.loads((student / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 2
    for key in ("loss_dm", "loss_gan", "loss_dsm", "loss_disc", "it_s"):
        assert math.isfinite(rec[key])
    # Two-stage normalisation divides h by its batch mean.
    assert rec["h_min"] <= rec["h_mean"] <= rec["h_max"]
    assert rec["h_mean"] == pytest.approx(1.0, abs=1e-5)


def test_student_starts_as_teacher_one_step(teacher):
    """Before any update G(z, c) is the teacher's one Euler step from sigma_max, computed here
    by the sampler, and the fake score is the teacher."""
    model = pipeline.build_distill(
        pipeline.DistillConfig(teacher=str(teacher)), load_teacher(teacher)
    )
    z = seeded_randn(range(5), (1, 8, 8))
    c = torch.arange(5)
    with torch.no_grad():
        got = model.generator(z, c)
        ref = sample_with_nfe(model.teacher, z, 1, c)
        x, sigma = torch.randn(5, 1, 8, 8), torch.full((5,), 1.3)
        torch.testing.assert_close(model.fake_score(x, sigma, c), model.teacher(x, sigma, c))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert model.cfg.disc_features == "teacher"
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_sample_cli_writes_npz_and_grid(student, tmp_path):
    npz, png = tmp_path / "s.npz", tmp_path / "s.png"
    args = ["sample", "--ckpt", str(student), "--n", "12", "--seed", "3"]
    assert main([*args, "--grid", str(png), "--out", str(npz)]) == 0
    data = np.load(npz)
    assert data["images"].shape == (12, 8, 8, 1) and data["images"].dtype == np.uint8
    assert data["labels"].shape == (12,) and set(data["labels"]) <= set(range(10))
    assert png.stat().st_size > 0
    # Same seed and checkpoint -> the same array.
    assert main([*args, "--out", str(tmp_path / "again.npz")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "again.npz")["images"], data["images"])


def test_samples_do_not_depend_on_batch_size(student, teacher):
    for path, nfe in ((student, None), (teacher, 3)):
        run = pipeline.load_run(path)
        big, lab = pipeline.sample_run(run, 10, seed=1, nfe=nfe, batch=64)
        small, lab_small = pipeline.sample_run(run, 10, seed=1, nfe=nfe, batch=3)
        prefix, _ = pipeline.sample_run(run, 4, seed=1, nfe=nfe)
        assert torch.isfinite(big).all()
        other, _ = pipeline.sample_run(run, 10, seed=2, nfe=nfe)
        assert not torch.allclose(other, big)
        torch.testing.assert_close(small, big, rtol=0, atol=1e-5)
        torch.testing.assert_close(prefix, big[:4], rtol=0, atol=1e-5)
        assert torch.equal(lab, lab_small)
        # Latents are the per-seed draws of samplers.seeded_randn.
        z = seeded_randn(pipeline.sample_seeds(1, 10), (1, 8, 8))
        with torch.no_grad():
            ref = run.model(z, lab) if nfe is None else sample_with_nfe(run.model, z, nfe, lab)
        torch.testing.assert_close(big, ref, rtol=0, atol=1e-5)


def test_sample_class_and_errors(student, teacher, tmp_path, capsys):
    npz = tmp_path / "c.npz"
    assert (
        main(["sample", "--ckpt", str(student), "--n", "5", "--class", "7", "--out", str(npz)]) == 0
    )
    assert (np.load(npz)["labels"] == 7).all()
    assert (
        main(["sample", "--ckpt", str(student), "--n", "5", "--class", "10", "--out", str(npz)])
        == 2
    )
    assert "--class must be in [0, 10)" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(student), "--nfe", "3", "--out", str(npz)]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["sample", "--ckpt", str(tmp_path / "empty"), "--out", str(npz)]) == 2
    assert "not a teacher fdistill can load" in capsys.readouterr().err
    # an output inside an input folder is refused before any work
    assert main(["sample", "--ckpt", str(tmp_path), "--out", str(npz)]) == 2
    assert "is inside the input --ckpt" in capsys.readouterr().err
    # A checkpoint file works as well as its run folder.
    ckpt_file = str(teacher / "checkpoint.pt")
    assert main(["sample", "--ckpt", ckpt_file, "--nfe", "2", "--n", "3", "--out", str(npz)]) == 0


def test_existing_run_needs_resume(teacher, capsys):
    args = ["train-teacher", "--out", str(teacher), "--steps", "3", "--batch", "8"]
    assert main([*args, *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    # Resuming with another architecture is refused with the saved value in the message.
    assert main([*args, "--channels", "16", "--no-progress", "--resume"]) == 2
    assert "model_channels" in capsys.readouterr().err


def test_preset_then_explicit_options(teacher, tmp_path):
    """--preset sets paper Table 5 values (DESIGN.md), explicit options win; R1 runs."""
    out = tmp_path / "preset"
    args = ["distill", "--teacher", str(teacher), "--out", str(out), "--preset", "cifar10"]
    args += ["--steps", "1", "--batch", "4", "--critic-ratio", "1", "--grid-every", "0"]
    args += ["--disc-taps", "enc8,enc4"]  # the preset's 32/16/8 maps do not exist at 8x8
    args += ["--r1-gamma", "1"]  # the official configs have no R1; Table 5 says 1
    assert main([*args, "--no-progress", "--device", "cpu", "--disc-features", "fake"]) == 0
    opts = json.loads((out / "config.json").read_text())["options"]
    assert (opts["train"]["batch"], opts["train"]["critic_ratio"], opts["train"]["steps"]) == (
        4,
        1,
        1,
    )
    assert opts["train"]["lr_gen"] == opts["train"]["lr_critic"] == 1e-4
    assert opts["train"]["weight_decay"] == 1e-2
    assert (opts["loss"]["gan_weight"], opts["loss"]["r1_gamma"]) == (1e-3, 1.0)
    assert opts["loss"]["disc_features"] == "fake"
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(rec["r1"])
    # batch, ratio, GAN weight, LR, R1, CFG, generator updates: paper Table 5, except where the
    # official code differs (R1 off in every official config, Table 5: 1 / 0 / 1; SD: 100k
    # iterations = 10k generator updates, Table 5: 60k)
    table5 = {
        "cifar10": (2048, 5, 1e-3, 1e-4, 0.0, 1.0, 60_000),
        "imagenet64": (512, 5, 3e-3, 2e-6, 0.0, 1.0, 380_000),
        "t2i": (1024, 10, 1e-3, 1e-5, 0.0, 1.75, 10_000),
    }
    for name, want in table5.items():
        c = pipeline.apply_preset(pipeline.DistillConfig(), name)
        got = (c.train.batch, c.train.critic_ratio, c.loss.gan_weight, c.train.lr_gen)
        got += (c.loss.r1_gamma, c.loss.guidance, c.train.steps)
        assert got == want, name


def test_nan_stops_with_message_and_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    args = ["train-teacher", "--out", str(out), "--batch", "4", *TINY, "--grid-every", "0"]
    assert main([*args, "--steps", "2"]) == 0
    before = (out / "checkpoint.pt").read_bytes()

    real_call = EDMLoss.__call__

    def poisoned(self, *a, **kw):
        return real_call(self, *a, **kw) * float("nan")

    monkeypatch.setattr(EDMLoss, "__call__", poisoned)
    assert main([*args, "--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 3" in err and "last good checkpoint" in err
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.slow
def test_demo_writes_report_and_reuses_teacher(tmp_path, capsys):
    from fdistill import demo

    cfg = demo.DemoConfig(teacher_steps=2, distill_steps=1, n_eval=12, teacher_nfe=3, threads=None)
    report = demo.run_demo(cfg, tmp_path)
    names = {p.name for p in report.iterdir()}
    assert names >= {"comparison.png", "metrics.json", "report.md", "student.png", "teacher.png"}
    m = json.loads((report / "metrics.json").read_text())
    assert set(m["samples"]) == {"student", "teacher_1nfe", "teacher_3nfe"}
    assert m["timings"]["sampling_speedup"] > 0
    assert all(math.isfinite(m["samples"]["student"][c]) for c in demo.REPORT_COLUMNS)
    assert "| student |" in (report / "report.md").read_text()
    demo.run_demo(cfg, tmp_path)
    assert "reusing the teacher" in capsys.readouterr().out
