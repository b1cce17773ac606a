# ruff: noqa: E501
"""External teachers through the whole pipeline: detect, distil, sample, export, inspect.

Uses the real-format fixtures in ``../shared/fixtures`` (EDM pickles and a diffusers DDPM
folder, both saved by their official code); skipped where that folder is absent.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fdistill import pipeline
from fdistill.cli import main
from fdistill.runs import is_export, load_checkpoint
from fdistill.samplers import sample_with_nfe, seeded_randn
from fdistill.teachers import detect_format, load_teacher

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
SONG = FIXTURES / "edm" / "edm_songunet_tiny_cond.pkl"
DDPM = FIXTURES / "diffusers" / "ddpm_tiny_eps"

needs_fixtures = pytest.mark.skipif(
    not SONG.is_file(), reason=f"real-format fixtures not found at {FIXTURES}"
)


def _rgb_npz(path: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path, images=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), labels=np.arange(n) % 10
    )
    return path


def _distill(teacher, data, out, *extra) -> list[str]:
    args = ["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out)]
    args += ["--steps", "2", "--batch", "4", "--critic-ratio", "1", "--grid-every", "0"]
    return [*args, "--no-progress", "--device", "cpu", *extra]


@needs_fixtures
def test_formats_are_detected_by_content_not_name(tmp_path):
    renamed = tmp_path / "model.bin"
    shutil.copy(SONG, renamed)
    assert detect_format(renamed).name == "edm-pickle"
    assert detect_format(SONG).name == "edm-pickle"
    if DDPM.is_dir():
        assert detect_format(DDPM).name == "diffusers"
    (tmp_path / "fake.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="accepted: .*EDM"):
        detect_format(tmp_path / "fake.pkl")


@needs_fixtures
def test_edm_pickle_distils_samples_and_exports_without_the_teacher(tmp_path, capsys):
    data = _rgb_npz(tmp_path / "d.npz")
    run = tmp_path / "run"
    assert main(_distill(SONG, data, run)) == 0
    ckpt = load_checkpoint(run)
    assert ckpt["config"]["model"]["type"] == "edm"
    assert ckpt["config"]["teacher"]["family"] == "edm-pickle"
    # The student started as the teacher's own one step from its sigma_max (80 for EDM).
    teacher = load_teacher(SONG)
    model = pipeline.build_distill(pipeline.DistillConfig(teacher=str(SONG)), teacher)
    z, c = seeded_randn(range(3), (3, 8, 8)), torch.tensor([1, 4, 7])
    with torch.no_grad():
        torch.testing.assert_close(
            model.generator(z, c), sample_with_nfe(teacher, z, 1, c), rtol=0, atol=1e-5
        )
    assert model.generator.sigma_init == teacher.info.sigma_max == 80.0

    exp = tmp_path / "export"
    assert main(["export", str(run), "--out", str(exp)]) == 0
    assert is_export(exp)
    a, b = pipeline.load_run(run), pipeline.load_run(exp)
    xa, la = pipeline.sample_run(a, 5, seed=3)
    xb, lb = pipeline.sample_run(b, 5, seed=3)
    assert torch.equal(xa, xb) and torch.equal(la, lb)
    assert main(["inspect", str(exp)]) == 0
    assert "distill" in capsys.readouterr().out


@needs_fixtures
def test_any_teacher_samples_at_any_nfe(tmp_path):
    grid = tmp_path / "t.png"
    assert main(["sample", "--ckpt", str(SONG), "--nfe", "3", "--n", "4", "--grid", str(grid)]) == 0
    assert grid.is_file()
    run = pipeline.load_run(SONG)
    x, _ = pipeline.sample_run(run, 4, seed=0, nfe=3)
    ref = sample_with_nfe(load_teacher(SONG), seeded_randn(pipeline.sample_seeds(0, 4), (3, 8, 8)), 3,
                          pipeline.seeded_labels(pipeline.sample_seeds(0, 4), 10))  # fmt: skip
    torch.testing.assert_close(x, ref)


@needs_fixtures
def test_inspect_reports_family_and_feature_maps(capsys):
    assert main(["inspect", str(SONG), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"family": "edm-pickle"' in out and "enc8" in out and '"num_classes": 10' in out


@pytest.mark.skipif(not DDPM.is_dir(), reason=f"diffusers fixture not found at {FIXTURES}")
def test_diffusers_ddpm_folder_distils(tmp_path):
    pytest.importorskip("diffusers")
    teacher = tmp_path / "ddpm"
    shutil.copytree(DDPM, teacher)  # the fixture folder is read-only in CI
    data = _rgb_npz(tmp_path / "d.npz")
    run = tmp_path / "run"
    assert main(_distill(teacher, data, run)) == 0
    cfg = load_checkpoint(run)["config"]
    assert cfg["model"]["type"] == "diffusers-unet2d"
    # The student starts at the schedule's own top sigma, not EDM's 80.
    assert cfg["sigma_init"] == pytest.approx(load_teacher(teacher).info.sigma_max)
    assert cfg["sigma_init"] > 100
    x, _ = pipeline.sample_run(pipeline.load_run(run), 3, seed=0)
    assert torch.isfinite(x).all()


@needs_fixtures
def test_teacher_that_does_not_fit_the_data_is_refused_before_training(tmp_path):
    rng = np.random.default_rng(0)
    bad = tmp_path / "gray.npz"
    np.savez(
        bad, images=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), labels=np.arange(20) % 10
    )
    out = tmp_path / "run"
    assert main(_distill(SONG, bad, out)) == 2
    assert not (out / "checkpoint.pt").exists()


@needs_fixtures
def test_raw_teacher_option_is_refused_for_a_pickle(tmp_path, capsys):
    data = _rgb_npz(tmp_path / "d.npz")
    assert main(_distill(SONG, data, tmp_path / "run", "--raw-teacher")) == 2
    assert "--raw-teacher" in capsys.readouterr().err
