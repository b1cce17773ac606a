"""Few-step students end to end: ``distill --student-steps K`` (backward simulation or forward
inputs), the run and export records, K-step sampling per seed, strict bit-exact resume, and
one-line errors for bad levels."""

from __future__ import annotations

import json

import pytest
import torch

from fdistill.cli import main
from fdistill.models import load_run
from fdistill.runs import load_checkpoint
from fdistill.sampling import sample_run, sample_seeds

TINY = ["--channels", "8", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return tiny_teacher


def _distill(teacher, out, *extra):
    argv = ["distill", "--teacher", str(teacher), "--out", str(out), "--batch", "8"]
    argv += ["--critic-ratio", "1", "--grid-every", "0", *TINY[2:], *extra]
    return main(argv)


@pytest.mark.parametrize("inputs", ["backward", "forward"])
def test_k_step_run_records_samples_and_exports(teacher, tmp_path, inputs):
    out = tmp_path / "run"
    assert (
        _distill(teacher, out, "--steps", "2", "--student-steps", "2", "--student-inputs", inputs)
        == 0
    )
    cfg = json.loads((out / "config.json").read_text())
    levels = cfg["student"]["sigmas"]
    # the default levels of an EDM teacher: the first 2 points of a 3-point Karras grid
    smin, smax, rho = 0.002, 80.0, 7.0
    want = [
        (smax ** (1 / rho) + i / 2 * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in (0, 1)
    ]
    assert levels == pytest.approx(want, rel=1e-6) and cfg["student"]["inputs"] == inputs
    run = load_run(out)
    assert run.model.steps == 2
    # K-step samples: per seed, independent of the batch, equal to a loop written here
    one, _ = sample_run(run, 3, seed=4, batch=1)
    three, labels = sample_run(run, 3, seed=4, batch=3)
    torch.testing.assert_close(one, three, rtol=0, atol=1e-6)  # batch-size kernels round alike
    den = run.model.denoiser
    for i, s in enumerate(sample_seeds(4, 3)):
        g = torch.Generator().manual_seed(s)
        z = torch.randn((1, 1, 8, 8), generator=g)
        c = labels[i : i + 1]
        x = den(levels[0] * z, levels[0], c)
        x = den(x + levels[1] * torch.randn((1, 1, 8, 8), generator=g), levels[1], c)
        torch.testing.assert_close(three[i : i + 1], x, rtol=0, atol=1e-6)
    # the export records the levels and samples the same
    assert main(["export", str(out), "--out", str(tmp_path / "export")]) == 0
    exported = load_run(tmp_path / "export")
    assert torch.equal(sample_run(exported, 3, seed=4)[0], three)
    # --nfe must be the student's K
    assert main(["sample", "--ckpt", str(out), "--nfe", "1", "--out", str(tmp_path / "x.npz")]) == 2
    assert main(["sample", "--ckpt", str(out), "--nfe", "2", "--out", str(tmp_path / "x.npz")]) == 0


def test_k4_resume_is_bit_exact(teacher, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    k4 = ["--student-steps", "4"]
    assert _distill(teacher, straight, "--steps", "3", *k4) == 0
    assert _distill(teacher, split, "--steps", "1", *k4) == 0
    assert _distill(teacher, split, "--steps", "3", *k4, "--resume") == 0
    a, b = load_checkpoint(straight)["state"], load_checkpoint(split)["state"]
    for part in ("generator", "fake_score", "head", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k}"


def test_k1_is_todays_student(teacher, tmp_path):
    """--student-steps 1 (the default) writes the one-step run of before, weights and all."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert _distill(teacher, a, "--steps", "2") == 0
    assert _distill(teacher, b, "--steps", "2", "--student-steps", "1") == 0
    sa, sb = load_checkpoint(a)["state"]["generator"], load_checkpoint(b)["state"]["generator"]
    assert all(torch.equal(v, sb[k]) for k, v in sa.items())
    assert json.loads((a / "config.json").read_text())["student"]["steps"] == 1


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--student-steps", "0"], "--student-steps"),
        (["--student-steps", "2", "--student-sigmas", "1,5"], "descending"),
        (
            ["--student-steps", "2", "--student-sigmas", "500,1"],
            "outside the teacher's noise range",
        ),
        (["--student-steps", "3", "--student-sigmas", "80,1"], "--student-sigmas"),
        (["--student-sigmas", "abc"], "--student-sigmas"),
        (["--student-inputs", "sideways"], "--student-inputs"),
    ],
)
def test_bad_student_levels_are_one_line(teacher, tmp_path, capsys, extra, needle):
    try:
        code = _distill(teacher, tmp_path / "run", "--steps", "1", *extra)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and needle in err, err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
