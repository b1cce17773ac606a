"""``fdistill eval``: data against itself, teacher and student runs, JSON, seeds, errors.

The runs are the tiny ones of ``test_pipeline.py`` (8-channel UNet, a few steps): only the
plumbing is under test here; the metric values themselves are checked in test_evaluate.py.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from fdistill.cli import main
from fdistill.data import load_dataset
from fdistill.metrics import inception as inception_mod
from fdistill.metrics.classifier import classifier_features, load_classifier
from fdistill.metrics.fid import (
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    load_stats,
    save_stats,
)
from fdistill.pipeline import load_run, sample_run

TINY = ["--channels", "8", "--no-progress", "--seed", "0", "--device", "cpu"]
# One result schema for every source (fdistill.evaluation.RESULT_KEYS); None where not applicable.
TOP_KEYS = {"source", "n", "seed", "reference", "num_reference", "ref_stats", "classifier"}
TOP_KEYS |= {"generation", "metrics", "notes", "protocol", "protocol_settings", "captions"}
TOP_KEYS |= {"captions_drawn", "clip_model", "resolution"}
METRIC_KEYS = {"num_fake", "num_real", "notes", "cfid", "cprecision", "crecall"}
METRIC_KEYS |= {"class_hist", "class_coverage", "class_tv_uniform", "class_tv_data"}
METRIC_KEYS |= {"mean_confidence", "mean_confidence_real"}


@pytest.fixture(autouse=True)
def _no_inception(monkeypatch):
    """No Inception detector is found unless a test passes one."""
    monkeypatch.delenv(inception_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(inception_mod, "_packaged_inception", lambda: None)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    args = ["train-teacher", "--out", str(out), "--steps", "3", "--batch", "8"]
    assert main([*args, *TINY, "--grid-every", "0"]) == 0
    return out


def _distill(teacher, out) -> None:
    args = ["distill", "--teacher", str(teacher), "--out", str(out), "--steps", "2"]
    args += ["--batch", "8", "--critic-ratio", "1", "--grid-every", "0"]
    assert main([*args, "--no-progress", "--device", "cpu"]) == 0


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    _distill(teacher, out)
    return out


def _eval(tmp_path, *args: str, name: str = "m.json") -> dict:
    out = tmp_path / name
    assert main(["eval", *args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _finite_numbers(d: dict) -> None:
    for key, v in d.items():
        if isinstance(v, float | int) and not isinstance(v, bool):
            assert math.isfinite(v), key
        elif isinstance(v, list) and v and isinstance(v[0], float):
            assert all(math.isfinite(x) for x in v), key


def test_data_against_itself(tmp_path, capsys):
    res = _eval(tmp_path, "--ckpt", "digits", "--ref", "digits", "--n", "100000")
    m = res["metrics"]
    assert res["source"]["kind"] == "data" and res["generation"] is None
    assert res["n"] == m["num_fake"] == m["num_real"] == 1797
    assert res["classifier"] == "digits"  # the shipped one, for a built-in reference
    assert abs(m["cfid"]) < 1e-6
    assert m["cprecision"] == m["crecall"] == 1.0 and m["class_coverage"] == 1.0
    assert m["class_tv_data"] < 0.01
    assert "only 1797 images" in " ".join(m["notes"])
    out = capsys.readouterr().out
    assert "classifier FID" in out and "recall (classifier)" in out

    # The first n images against all of them: FID of classifier features computed here.
    res = _eval(tmp_path, "--ckpt", "digits", "--ref", "digits", "--n", "400", "--metrics", "fid")
    digits = load_dataset("digits")
    clf = load_classifier("digits")
    f_all = classifier_features(clf, digits.images)
    want = frechet_distance(f_all, classifier_features(clf, digits.images[:400]))
    assert set(res["metrics"]) == {"num_fake", "num_real", "notes", "cfid"}
    assert res["metrics"]["cfid"] == pytest.approx(want, rel=1e-9)


def test_npz_data_source(tmp_path):
    digits = load_dataset("digits")
    pixels = np.floor((digits.images[:300].numpy() + 1) * 127.5 + 0.5).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=pixels.transpose(0, 2, 3, 1))
    res = _eval(tmp_path, "--ckpt", str(tmp_path / "d.npz"), "--ref", str(tmp_path / "d.npz"))
    assert res["source"]["kind"] == "data" and res["n"] == 300
    assert res["classifier"] is None  # no shipped classifier for a file reference
    assert res["metrics"]["notes"]
    res = _eval(tmp_path, "--ckpt", str(tmp_path / "d.npz"), "--ref", "digits", "--n", "50")
    m = res["metrics"]
    assert res["classifier"] == "digits" and m["num_fake"] == 50 and m["cprecision"] > 0.9


def test_teacher_and_student_json(teacher, student, tmp_path):
    res = _eval(tmp_path, "--ckpt", str(teacher), "--nfe", "3", "--n", "40", "--seed", "1")
    assert set(res) == TOP_KEYS
    assert res["source"] == {"spec": str(teacher), "kind": "teacher", "step": 3, "nfe": 3}
    assert res["reference"] == "digits" and res["num_reference"] == 1797  # from config.json
    assert set(res["metrics"]) == METRIC_KEYS
    assert res["generation"]["samples_per_s"] > 0
    _finite_numbers(res["metrics"])
    _finite_numbers(res["generation"])
    assert any("Inception" in note for note in res["metrics"]["notes"])

    # A student finds its data set through its teacher run.
    res = _eval(tmp_path, "--ckpt", str(student), "--n", "40", "--metrics", "fid,pr")
    assert res["source"]["kind"] == "student" and res["source"]["nfe"] == 1
    assert res["reference"] == "digits"
    assert set(res["metrics"]) == {"num_fake", "num_real", "notes", "cfid", "cprecision", "crecall"}
    _finite_numbers(res["metrics"])
    # The default teacher NFE is 35; a checkpoint file works as its folder.
    res = _eval(tmp_path, "--ckpt", str(teacher / "checkpoint.pt"), "--n", "8", "--metrics", "fid")
    assert res["source"]["nfe"] == 35


def test_same_seed_same_numbers(student, teacher, tmp_path):
    base = ["--ckpt", str(student), "--n", "30", "--inception", "none"]
    a = _eval(tmp_path, *base, "--seed", "5", name="a.json")
    again = _eval(tmp_path, *base, "--seed", "5", name="again.json")
    b = _eval(tmp_path, *base, "--seed", "5", "--batch", "7", name="b.json")
    c = _eval(tmp_path, *base, "--seed", "6", name="c.json")
    assert a["metrics"] == again["metrics"]
    # Another batch size: the same samples, up to float round-off of batched convolutions.
    assert b["metrics"]["cfid"] == pytest.approx(a["metrics"]["cfid"], rel=1e-6)
    assert b["metrics"]["class_hist"] == a["metrics"]["class_hist"]
    assert a["metrics"]["cfid"] != c["metrics"]["cfid"]
    # The numbers are those of the samples sample_run gives.
    x, _ = sample_run(load_run(student), 30, seed=5)
    clf = load_classifier("digits")
    want = frechet_distance(
        classifier_features(clf, load_dataset("digits").images),
        classifier_features(clf, x.clamp(-1, 1)),
    )
    assert a["metrics"]["cfid"] == pytest.approx(want, rel=1e-9)
    t = ["--ckpt", str(teacher), "--n", "12", "--nfe", "2", "--metrics", "fid,classes"]
    assert (
        _eval(tmp_path, *t, name="t1.json")["metrics"]
        == _eval(tmp_path, *t, name="t2.json")["metrics"]
    )


def test_student_finds_its_data_after_the_teacher_moved(teacher, tmp_path):
    moved = tmp_path / "teacher-copy"
    shutil.copytree(teacher, moved)
    _distill(moved, tmp_path / "s")
    shutil.rmtree(moved)
    res = _eval(tmp_path, "--ckpt", str(tmp_path / "s"), "--n", "8")
    assert res["reference"] == "digits" and math.isfinite(res["metrics"]["cfid"])


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--ckpt", "{tmp}/none"], "--ckpt"),
        (["--ckpt", "digits"], "--ref"),
        (["--ckpt", "digits", "--ref", "{tmp}/none.npz"], "--ref"),
        (["--ckpt", "digits", "--ref", "digits", "--ref-stats", "{tmp}/s.npz"], "--ref-stats"),
        (["--ckpt", "digits", "--ref", "digits", "--inception", "{tmp}/i.pt"], "--inception"),
        (["--ckpt", "digits", "--ref", "digits", "--classifier", "{tmp}/c"], "--classifier"),
        (["--ckpt", "digits", "--ref", "digits", "--metrics", "fid,is"], "--metrics"),
        (["--ckpt", "digits", "--ref", "digits", "--nfe", "3"], "--nfe"),
    ],
)
def test_errors_name_the_flag(args, flag, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fdistill: error:") and flag in err and "Traceback" not in err


def test_student_nfe_error(student, capsys):
    assert main(["eval", "--ckpt", str(student), "--nfe", "4", "--n", "4"]) == 2
    assert "--nfe" in capsys.readouterr().err


class PixelDetector(nn.Module):
    """Inception stand-in (NVIDIA calling convention): channel-0 pixels as features."""

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        return img[:, 0].to(torch.float32).flatten(1)


def test_ref_stats_fid(tmp_path):
    det = tmp_path / "det.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(PixelDetector()), str(det))
    digits = load_dataset("digits")

    def pixels(x: Tensor) -> np.ndarray:  # uint8 quantisation, round half up
        return np.floor((x.numpy().astype(np.float64) + 1) * 127.5 + 0.5).reshape(len(x), -1)

    ref = pixels(digits.images[1000:])
    save_stats(tmp_path / "ref.npz", *feature_stats(ref))
    args = ["--ckpt", "digits", "--n", "500", "--ref", "digits", "--metrics", "fid,pr"]
    res = _eval(tmp_path, *args, "--inception", str(det), "--ref-stats", str(tmp_path / "ref.npz"))
    m = res["metrics"]
    want = frechet_distance_from_stats(
        *feature_stats(pixels(digits.images[:500])), *feature_stats(ref)
    )
    assert m["fid"] == pytest.approx(want, rel=1e-6)
    assert res["ref_stats"] == str(tmp_path / "ref.npz")
    assert 0 < m["precision"] <= 1 and 0 < m["recall"] <= 1 and "cfid" in m
    # Stats alone (no reference images): FID only, classifier metrics skipped with a note.
    res = _eval(
        tmp_path,
        "--ckpt",
        "digits",
        "--n",
        "500",
        "--inception",
        str(det),
        "--ref-stats",
        str(tmp_path / "ref.npz"),
    )
    assert res["metrics"]["fid"] == pytest.approx(want, rel=1e-6)
    assert "cfid" not in res["metrics"] and res["metrics"]["notes"]


def test_ref_stats_command_matches_direct_statistics(tmp_path, capsys):
    det = tmp_path / "det.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(PixelDetector()), str(det))
    out = tmp_path / "stats" / "digits.npz"
    args = ["ref-stats", "--data", "digits", "--n", "300", "--inception", str(det)]
    assert main([*args, "--features", "64", "--out", str(out)]) == 0
    mu, sigma = load_stats(out)
    images = load_dataset("digits").images[:300]
    x = np.floor((images.numpy().astype(np.float64) + 1) * 127.5 + 0.5).reshape(300, -1)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-6, atol=1e-6)
    assert main(["ref-stats", "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err


def test_detector_and_stats_of_different_sizes_is_one_line(tmp_path, capsys):
    """An Inception file whose features do not match --ref-stats: one line naming both flags."""
    det = tmp_path / "det.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(PixelDetector()), str(det))  # 64 features for digits
    save_stats(tmp_path / "ref.npz", np.zeros(10), np.eye(10))
    args = ["--ckpt", "digits", "--n", "20", "--inception", str(det)]
    assert main(["eval", *args, "--ref-stats", str(tmp_path / "ref.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fdistill: error:") and "Traceback" not in err
    assert "returned 64 features, expected 10" in err and "--ref-stats" in err
