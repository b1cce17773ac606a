"""Resume: N + M steps straight equal N steps, stop, resume to N + M — bit for bit on CPU."""

from __future__ import annotations

import pytest
import torch

from fdistill.cli import main
from fdistill.runs import load_checkpoint

TINY = ["--batch", "8", "--channels", "8", "--no-progress", "--seed", "3", "--device", "cpu"]


def assert_same_state(a, b, path: str = "") -> None:
    """Recursively compare checkpoint contents: tensors bit for bit, everything else by ==."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{path}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    else:
        assert a == b, path


def _teacher(out, steps: int, *extra: str) -> None:
    args = ["train-teacher", "--out", str(out), "--steps", str(steps), *TINY, *extra]
    assert main(args) == 0


def _distill(teacher, out, steps: int, *extra: str) -> None:
    args = ["distill", "--teacher", str(teacher), "--out", str(out), "--steps", str(steps)]
    args += ["--batch", "8", "--critic-ratio", "2", "--no-progress", "--seed", "5"]
    args += ["--device", "cpu"]
    assert main([*args, *extra]) == 0


def _compare_runs(straight, split) -> None:
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a["step"] == b["step"]
    assert_same_state(a["state"], b["state"], "state")
    assert_same_state(a["rng"], b["rng"], "rng")


def test_teacher_resume_is_bit_identical(tmp_path):
    # The straight run also writes sample grids: they must not touch the training streams.
    _teacher(tmp_path / "straight", 4, "--grid-every", "2")
    _teacher(tmp_path / "split", 2, "--grid-every", "0")
    _teacher(tmp_path / "split", 4, "--grid-every", "0", "--resume")
    _compare_runs(tmp_path / "straight", tmp_path / "split")
    # And the comparison can fail: one more step is a different state.
    _teacher(tmp_path / "longer", 5, "--grid-every", "0")
    with pytest.raises(AssertionError):
        _compare_runs(tmp_path / "straight", tmp_path / "longer")


def test_distill_resume_is_bit_identical(tmp_path):
    teacher = tmp_path / "teacher"
    _teacher(teacher, 2, "--grid-every", "0")
    _distill(teacher, tmp_path / "straight", 3, "--grid-every", "1", "--disc-features", "fake")
    _distill(teacher, tmp_path / "split", 1, "--grid-every", "0", "--disc-features", "fake")
    args = ["--grid-every", "0", "--disc-features", "fake", "--resume"]
    _distill(teacher, tmp_path / "split", 3, *args)
    _compare_runs(tmp_path / "straight", tmp_path / "split")
    a = load_checkpoint(tmp_path / "straight")["state"]
    assert set(a) == {"generator", "fake_score", "head", "weights", "ema", "opt_g", "opt_c"}
    # Every trained part moved away from its initialisation.
    init = load_checkpoint(teacher)["state"]["ema"]
    for key in ("generator", "fake_score"):
        moved = a[key] if key == "fake_score" else {k[9:]: v for k, v in a[key].items()}
        assert any(not torch.equal(moved[k], v) for k, v in init.items()), key


def test_resume_refuses_another_teacher(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    _teacher(teacher, 1, "--grid-every", "0")
    _distill(teacher, tmp_path / "s", 1, "--grid-every", "0")
    _teacher(teacher, 2, "--grid-every", "0", "--resume")  # the teacher moves on
    args = ["distill", "--teacher", str(teacher), "--out", str(tmp_path / "s"), "--resume"]
    assert main([*args, "--steps", "2", "--no-progress", "--device", "cpu"]) == 2
    assert "; teacher: " in capsys.readouterr().err.replace("(", "; ")


def test_a_run_saved_before_newer_options_resumes(tmp_path, capsys):
    """A run folder whose saved options lack the options added since (student levels, real
    noise levels, R1 form, noise-level sampler) resumes: each missing option compares as the
    value such runs behaved as; a command asking for another value is refused in one line."""
    _teacher(tmp_path / "t", 2)
    out = tmp_path / "s"
    _distill(tmp_path / "t", out, 1)
    ck = load_checkpoint(out)
    for key in ("student_steps", "student_sigmas", "student_inputs"):
        del ck["config"]["resume_options"][key]
    for key in ("real_sigma", "r1", "noise_levels", "t_range"):
        del ck["config"]["resume_options"]["loss"][key]
    torch.save(ck, out / "checkpoint.pt")
    _distill(tmp_path / "t", out, 2, "--resume")
    assert load_checkpoint(out)["step"] == 2
    args = ["distill", "--teacher", str(tmp_path / "t"), "--out", str(out), "--steps", "3"]
    args += ["--batch", "8", "--critic-ratio", "2", "--no-progress", "--seed", "5"]
    assert main([*args, "--device", "cpu", "--resume", "--real-sigma", "independent"]) == 2
    err = capsys.readouterr().err
    assert "loss.real_sigma: 'same' -> 'independent'" in err
