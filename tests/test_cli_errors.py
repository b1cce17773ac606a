# ruff: noqa: E501
"""Every user-facing failure of the CLI: exit code 2, one line ``fdistill: error: ...`` naming
the bad option, value or file — never a traceback (issue: runs that cannot be silently
corrupted). One table of bad inputs, walked through ``fdistill.cli.main`` in-process."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest

from fdistill.cli import main

TINY = ["--channels", "8", "--no-progress", "--device", "cpu"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_MARKER",))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny teacher and student runs and a set of bad files, made once."""
    d = tmp_path_factory.mktemp("cli_errors")
    teacher, student = d / "teacher", d / "student"
    assert (
        main(["train-teacher", "--out", str(teacher), "--steps", "1", "--batch", "8", *TINY]) == 0
    )
    args = ["distill", "--teacher", str(teacher), "--out", str(student), "--steps", "1"]
    args += ["--batch", "8", "--critic-ratio", "1", "--grid-every", "0", "--no-progress"]
    assert main([*args, "--device", "cpu"]) == 0
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 8, 8), dtype=np.uint8)
    np.savez(d / "stray.npz", images=img, labels=np.r_[np.arange(29) % 10, 500])
    np.savez(d / "float.npz", images=img.astype(np.float32) / 255, labels=np.arange(30) % 10)
    rgb16 = rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8)
    np.savez(d / "rgb16.npz", images=rgb16, labels=np.arange(30) % 10)
    (d / "random.bin").write_bytes(rng.bytes(4096))
    (d / "evil.pkl").write_bytes(pickle.dumps(_Evil()))
    (d / "truncated").mkdir()
    blob = (teacher / "checkpoint.pt").read_bytes()
    (d / "truncated" / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])
    (d / "not_a_dir").write_text("x")
    assert main(["export", str(student), "--out", str(d / "export")]) == 0
    empty = d / "empty_run"
    empty.mkdir()
    return d


def _cases(d):
    t, s = str(d / "teacher"), str(d / "student")
    tt = ["train-teacher", "--steps", "1", "--batch", "8", *TINY]
    ds = ["distill", "--teacher", t, "--steps", "1", "--batch", "8", "--no-progress"]
    ds += ["--device", "cpu"]
    out = ["--out", str(d / "new_run")]
    ro = str(d / "not_a_dir" / "sub")  # cannot be created: its parent is a file
    return [
        # (case, argv, text the one-line message must contain)
        ("steps 0", [*tt, *out, "--steps", "0"], "--steps"),
        ("steps negative", [*tt, *out, "--steps", "-5"], "--steps"),
        ("steps not a number", [*tt, *out, "--steps", "abc"], "--steps"),
        ("batch 0", [*tt, *out, "--batch", "0"], "--batch"),
        ("lr 0", [*tt, *out, "--lr", "0"], "--lr"),
        ("lr nan", [*tt, *out, "--lr", "nan"], "--lr"),
        ("ema decay > 1", [*tt, *out, "--ema-decay", "1.5"], "--ema-decay"),
        ("ckpt-every 0", [*tt, *out, "--ckpt-every", "0"], "--ckpt-every"),
        ("log-every 0", [*tt, *out, "--log-every", "0"], "--log-every"),
        ("grid-every -1", [*tt, *out, "--grid-every", "-1"], "--grid-every"),
        ("grad-clip -1", [*tt, *out, "--grad-clip", "-1"], "--grad-clip"),
        ("missing data", [*tt, *out, "--data", str(d / "nope.npz")], "nope.npz"),
        ("stray label", [*tt, *out, "--data", str(d / "stray.npz")], "500"),
        ("float data without range", [*tt, *out, "--data", str(d / "float.npz")], "--range"),
        ("bad --range", [*tt, *out, "--range", "1"], "--range"),
        ("unwritable --out", [*tt, "--out", ro], "--out"),
        ("resume with nothing saved", [*tt, "--out", str(d / "empty_run"), "--resume"], "--resume"),
        ("existing run without --resume", [*tt, "--out", t], "--resume"),
        ("resume with another lr", [*tt, "--out", t, "--resume", "--lr", "1e-2"], "lr"),
        ("unknown arch", [*tt, *out, "--arch", "vit"], "--arch"),
        ("teacher missing", ["distill", "--teacher", str(d / "gone"), *out], "gone"),
        ("teacher random bytes", ["distill", "--teacher", str(d / "random.bin"), *out], "random.bin"),
        ("teacher malicious pickle", ["distill", "--teacher", str(d / "evil.pkl"), *out], "evil.pkl"),
        ("teacher truncated checkpoint", ["distill", "--teacher", str(d / "truncated"), *out], "truncated"),
        ("teacher is a student", ["distill", "--teacher", s, *out], "not a teacher"),
        ("unknown divergence", [*ds, *out, "--divergence", "kl2"], "--divergence"),
        ("gan weight < 0", [*ds, *out, "--gan-weight", "-1"], "--gan-weight"),
        ("critic ratio 0", [*ds, *out, "--critic-ratio", "0"], "--critic-ratio"),
        ("r1 < 0", [*ds, *out, "--r1-gamma", "-1"], "--r1-gamma"),
        ("lr-critic 0", [*ds, *out, "--lr-critic", "0"], "--lr-critic"),
        ("unknown disc tap", [*ds, *out, "--disc-taps", "enc99"], "enc99"),
        ("alpha divergence without alpha", [*ds, *out, "--divergence", "alpha"], "alpha"),
        ("data does not fit teacher", [*ds, *out, "--data", str(d / "rgb16.npz")], "teacher expects"),
        ("unknown preset", [*ds, *out, "--preset", "mnist"], "--preset"),
        ("sample: nothing to write", ["sample", "--ckpt", s], "--grid"),
        ("sample: missing ckpt", ["sample", "--ckpt", str(d / "gone"), "--grid", "g.png"], "gone"),
        ("sample: n 0", ["sample", "--ckpt", s, "--n", "0", "--out", str(d / "x.npz")], "--n"),
        ("sample: class 99", ["sample", "--ckpt", s, "--class", "99", "--out", str(d / "x.npz")], "--class"),
        ("sample: student with nfe 5", ["sample", "--ckpt", s, "--nfe", "5", "--out", str(d / "x.npz")], "--nfe"),
        ("sample: unwritable --out", ["sample", "--ckpt", s, "--out", ro + "/x.npz"], "--out"),
        ("eval: unknown metric", ["eval", "--ckpt", s, "--metrics", "is"], "--metrics"),
        ("eval: missing ckpt", ["eval", "--ckpt", str(d / "gone")], "gone"),
        ("eval: bad inception file", ["eval", "--ckpt", s, "--n", "10", "--inception", str(d / "random.bin")], "random.bin"),
        ("eval: unwritable --out", ["eval", "--ckpt", s, "--n", "10", "--out", ro + "/m.json"], "--out"),
        ("ref-stats: missing data", ["ref-stats", "--data", str(d / "gone.zip"), "--out", str(d / "r.npz")], "gone.zip"),
        ("inspect: missing", ["inspect", str(d / "gone")], "gone"),
        ("inspect: random bytes", ["inspect", str(d / "random.bin")], "random.bin"),
        ("export: existing export", ["export", s, "--out", str(d / "export")], "export"),
        ("export: not a run", ["export", str(d / "random.bin"), "--out", str(d / "e2")], "random.bin"),
        ("toy: steps 0", ["toy", "--steps", "0", "--out", str(d / "toy")], "--steps"),
        ("no command", [], "command"),
        ("unknown option", ["sample", "--ckpt", s, "--bogus"], "--bogus"),
    ]  # fmt: skip


def test_bad_inputs_give_one_line_and_exit_2(env, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a pickle that ran code would leave its marker here
    results = []
    for case, argv, needle in _cases(env):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse errors
            code = e.code
        err = capsys.readouterr().err.strip()
        results.append((case, code, err))
        assert code == 2, f"{case}: exit {code}, stderr {err!r}"
        assert "\n" not in err and err.startswith("fdistill: error:"), f"{case}: {err!r}"
        assert needle in err, f"{case}: {needle!r} not in {err!r}"
        assert "Traceback" not in err
    assert len(results) >= 30
    assert not (tmp_path / "EVIL_MARKER").exists()
    assert not (env / "new_run" / "checkpoint.pt").exists()  # nothing trained on bad input


def test_debug_shows_the_traceback(env):
    with pytest.raises(ValueError, match="--steps"):
        main(["--debug", "train-teacher", "--steps", "0", "--out", str(env / "dbg"), *TINY])


def test_resume_extends_steps_and_records_what_ran(env, tmp_path):
    """The options that may change on resume take effect and config.json records them."""
    import json

    run = tmp_path / "t"
    shutil.copytree(env / "teacher", run)
    assert main(["train-teacher", "--out", str(run), "--steps", "2", "--batch", "8", *TINY,
                 "--resume", "--log-every", "1"]) == 0  # fmt: skip
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["options"]["train"]["steps"] == 2 and cfg["options"]["train"]["log_every"] == 1
