"""What a user types or a file holds never destroys a run nor ends in a traceback.

One table of commands, each refused before any work: exit code 2, one line on stderr naming the
option or file at fault, and every input's bytes unchanged. Beside it: the run-folder lock under
a live and a dead holder, Ctrl-C (one line with the resume command, exit 130), a full disk (the
previous checkpoint intact), and prompts split on newlines only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fdistill import recipes, runs
from fdistill.cli import main
from fdistill.data.captions import read_prompts
from fdistill.fsutil import LOCK_NAME

TINY = ["--channels", "8", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A teacher run, a student run, an export, data files and crafted copies."""
    d = tmp_path_factory.mktemp("hostile")
    t, s = d / "teacher", d / "student"
    assert main(["train-teacher", "--out", str(t), "--steps", "1", "--batch", "8", *TINY]) == 0
    args = ["distill", "--teacher", str(t), "--out", str(s), "--steps", "1", "--batch", "8"]
    assert main([*args, "--critic-ratio", "1", "--grid-every", "0", *TINY[2:]]) == 0
    assert main(["export", str(s), "--out", str(d / "export")]) == 0
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", images=rng.integers(0, 255, (16, 8, 8, 1), dtype=np.uint8))
    (d / "images").mkdir()
    (d / "prompts.txt").write_text("a cat\na dog\n")
    # a run whose config says 16 channels while its weights have 8
    shutil.copytree(s, d / "mismatch")
    ck = torch.load(d / "mismatch" / "checkpoint.pt", weights_only=True)
    ck["config"]["model"]["model_channels"] = 16
    torch.save(ck, d / "mismatch" / "checkpoint.pt")
    # an export whose config.json nests 10,000 levels deep
    shutil.copytree(d / "export", d / "deep_export")
    (d / "deep_export" / "config.json").write_text("[" * 10_000 + "]" * 10_000)
    # an export whose weights file is garbage
    shutil.copytree(d / "export", d / "junk_export")
    (d / "junk_export" / "model.safetensors").write_bytes(b"\x00" * 64)
    (d / "notjson.json").write_text("{not json")
    return {
        "d": d,
        "t": t,
        "s": s,
        "e": d / "export",
        "npz": d / "data.npz",
        "img": d / "images",
        "prompts": d / "prompts.txt",
    }


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted([path] if path.is_file() else path.rglob("*")):
        if p.is_file() and p.name != LOCK_NAME:
            h.update(str(p.relative_to(path.parent)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _cases(w: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    d, t, s, e, npz = w["d"], str(w["t"]), str(w["s"]), str(w["e"]), str(w["npz"])
    img, prompts = str(w["img"]), str(w["prompts"])
    ck, cfgj = str(w["s"] / "checkpoint.pt"), str(w["s"] / "config.json")
    tt = ["train-teacher", "--steps", "1", "--batch", "8", *TINY]
    ds = ["distill", "--teacher", t, "--steps", "1", "--batch", "8", "--no-progress"]
    new = ["--out", str(d / "new")]
    smp = ["sample", "--ckpt", s]
    return [
        # outputs onto inputs (data loss before)
        ("sample --grid onto the checkpoint", [*smp, "--grid", ck], "--grid"),
        ("sample --out onto the checkpoint", [*smp, "--out", ck], "--out"),
        ("sample --out onto config.json", [*smp, "--out", cfgj], "--out"),
        ("sample --out is the run folder", [*smp, "--out", s], "--out"),
        ("sample --out contains the run", [*smp, "--out", str(d)], "--out"),
        (
            "sample from a checkpoint file onto its config",
            ["sample", "--ckpt", ck, "--out", cfgj],
            "--out",
        ),
        (
            "sample --grid onto the export",
            ["sample", "--ckpt", e, "--grid", str(w["e"] / "model.safetensors")],
            "--grid",
        ),
        ("eval --out onto the checkpoint", ["eval", "--ckpt", s, "--out", ck], "--out"),
        ("eval --out onto its --ref", ["eval", "--ckpt", s, "--ref", npz, "--out", npz], "--out"),
        ("export onto its own run", ["export", s, "--out", s], "--out"),
        ("export into the folder holding the run", ["export", s, "--out", str(d)], "--out"),
        (
            "export onto the teacher's checkpoint",
            ["export", s, "--out", str(w["t"] / "checkpoint.pt")],
            "--out",
        ),
        ("ref-stats onto its data", ["ref-stats", "--data", npz, "--out", npz], "--out"),
        ("distill --out onto its teacher", [*ds, "--out", t], "--out"),
        ("distill --out onto its data", [*ds, "--data", npz, "--out", npz], "--out"),
        ("train-teacher --out onto its data folder", [*tt, "--data", img, "--out", img], "--out"),
        ("train-teacher --out onto its data file", [*tt, "--data", npz, "--out", npz], "--out"),
        # options that do not apply
        ("distill --resolution without --data", [*ds, *new, "--resolution", "8"], "--resolution"),
        ("distill --max-images without --data", [*ds, *new, "--max-images", "5"], "--max-images"),
        ("distill --range without --data", [*ds, *new, "--range", "0,1"], "--range"),
        (
            "distill text option, image teacher",
            [*ds, *new, "--latent-cache", str(d / "c")],
            "--latent-cache",
        ),
        ("distill --prompts, image teacher", [*ds, *new, "--prompts", prompts], "--prompts"),
        # silent wrong results before
        (
            "sample --guidance nan",
            ["sample", "--ckpt", t, "--guidance", "nan", "--out", str(d / "g.npz")],
            "--guidance",
        ),
        (
            "sample --nfe 0",
            ["sample", "--ckpt", t, "--nfe", "0", "--out", str(d / "g.npz")],
            "--nfe",
        ),
        ("sample --batch 0", [*smp, "--batch", "0", "--out", str(d / "g.npz")], "--batch"),
        ("train-teacher --label-dropout 2", [*tt, *new, "--label-dropout", "2"], "--label-dropout"),
        (
            "train-teacher --label-dropout nan",
            [*tt, *new, "--label-dropout", "nan"],
            "--label-dropout",
        ),
        ("distill --guidance nan", [*ds, *new, "--guidance", "nan"], "--guidance"),
        ("distill --ratio-ema 1", [*ds, *new, "--ratio-ema", "1"], "--ratio-ema"),
        ("distill --betas 1,2", [*ds, *new, "--betas", "1,2"], "--betas"),
        ("distill --betas one number", [*ds, *new, "--betas", "0.9"], "--betas"),
        (
            "toy --start-modes -1",
            ["toy", "--start-modes", "-1", "--out", str(d / "toy")],
            "--start-modes",
        ),
        (
            "toy --weight-spread 0.5",
            ["toy", "--weight-spread", "0.5", "--out", str(d / "toy")],
            "--weight-spread",
        ),
        # tracebacks before
        ("--threads -1", [*tt, *new, "--threads", "-1"], "--threads"),
        ("--device foo", [*tt, *new, "--device", "foo"], "--device"),
        ("sample --device foo", [*smp, "--device", "foo", "--out", str(d / "g.npz")], "--device"),
        ("--channels 0", [*tt, *new, "--channels", "0"], "--channels"),
        ("--channel-mult 0", [*tt, *new, "--channel-mult", "0"], "--channel-mult"),
        ("--num-blocks -1", [*tt, *new, "--num-blocks", "-1"], "--num-blocks"),
        ("--arch mlp --depth 0", [*tt, *new, "--arch", "mlp", "--depth", "0"], "--depth"),
        (
            "config does not fit the weights",
            ["sample", "--ckpt", str(d / "mismatch"), "--out", str(d / "g.npz")],
            "mismatch",
        ),
        (
            "export config nested 10,000 deep",
            ["sample", "--ckpt", str(d / "deep_export"), "--out", str(d / "g.npz")],
            "deep_export",
        ),
        (
            "export weights are garbage",
            ["sample", "--ckpt", str(d / "junk_export"), "--out", str(d / "g.npz")],
            "junk_export",
        ),
        ("inspect a JSON that is not JSON", ["inspect", str(d / "notjson.json")], "notjson.json"),
        (
            "distill from a garbage export",
            [*ds[:1], "--teacher", str(d / "junk_export"), *new],
            "junk_export",
        ),
    ]


def test_hostile_table(world, capsys):
    """At least 40 cases: exit 2, one line naming the culprit, inputs unchanged."""
    cases = _cases(world)
    assert len(cases) >= 40
    before = {p: _digest(p) for p in world["d"].iterdir()}
    for case, argv, needle in cases:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own one-line errors
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{case}: exit {code}, stderr {err!r}"
        assert "\n" not in err and err.startswith("fdistill: error:"), f"{case}: {err!r}"
        assert needle in err, f"{case}: {needle!r} not in {err!r}"
        for p, h in before.items():
            assert _digest(p) == h, f"{case}: {p.name} changed"
    assert not (world["d"] / "new" / "checkpoint.pt").exists()


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(world, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    argv = ["distill", "--teacher", str(world["t"]), "--out", str(out), "--steps", "1"]
    argv += ["--batch", "8", "--critic-ratio", "1", "--grid-every", "0", *TINY[2:]]
    # a live holder (this test's parent process): refused, naming it
    holder = os.getppid()
    (out / LOCK_NAME).write_text(f"pid={holder}\nhost={os.uname().nodename}\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"in use by process {holder}" in err and "\n" not in err.strip()
    assert not (out / "checkpoint.pt").exists()
    # a dead holder: the stale lock is taken over and released at the end
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    (out / LOCK_NAME).write_text(f"pid={dead}\nhost={os.uname().nodename}\n")
    assert main(argv) == 0
    assert (out / "checkpoint.pt").is_file() and not (out / LOCK_NAME).exists()


def test_ctrl_c_prints_the_resume_command(world, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipes, "distill_run", interrupted)
    out = tmp_path / "run"
    argv = ["distill", "--teacher", str(world["t"]), "--out", str(out), "--steps", "5"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "interrupted" in err
    assert err.endswith(f"fdistill {' '.join(argv)} --resume")


def test_disk_full_names_the_file_and_keeps_the_checkpoint(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["train-teacher", "--out", str(out), "--steps", "2", "--batch", "8", *TINY]
    assert main([*argv, "--ckpt-every", "1"]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    real = torch.save

    def full(obj, f, *a, **k):
        if isinstance(obj, dict) and "rng" in obj:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                               "failed writing file data/3: file write failed")  # fmt: skip
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    assert main([*argv[:4], "4", *argv[5:], "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no space left" in err and "checkpoint.pt" in err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not list(out.glob(".*.tmp"))


def test_prompts_split_on_newlines_only(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a cat\u2028on a mat\r\nsecond\n\n", encoding="utf-8")
    assert read_prompts(p) == ["a cat\u2028on a mat", "second"]


def test_metrics_lines_that_are_not_objects_do_not_block_resume(world, tmp_path):
    out = tmp_path / "run"
    argv = ["train-teacher", "--out", str(out), "--steps", "2", "--batch", "8", *TINY]
    assert main(argv) == 0
    with open(out / runs.METRICS, "a") as f:
        f.write('[1, 2]\n42\n"text"\n' + "[" * 5000 + "\n")
    assert main([*argv[:4], "3", *argv[5:], "--resume"]) == 0
    lines = (out / runs.METRICS).read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 3]
