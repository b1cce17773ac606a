"""--batch-gpu changes memory, not the result: micro-batch accumulation with the ratio
normaliser on equals the whole batch (the normaliser's bin and batch means are those of the
whole batch), and so does a K-step student's."""

from __future__ import annotations

import pytest
import torch

from fdistill.cli import main
from fdistill.runs import load_checkpoint

TINY = ["--channels", "8", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return tiny_teacher


def _run(teacher, out, *extra):
    argv = ["distill", "--teacher", str(teacher), "--out", str(out), "--steps", "3"]
    argv += ["--batch", "8", "--critic-ratio", "2", "--grid-every", "0", *TINY[2:], *extra]
    assert main(argv) == 0
    return load_checkpoint(out)["state"]


def _worst_relative(a: dict, b: dict) -> float:
    worst = 0.0
    for k, v in a.items():
        if v.is_floating_point() and v.numel():
            worst = max(worst, float((v - b[k]).norm() / v.norm().clamp_min(1e-12)))
    return worst


@pytest.mark.parametrize("extra", [[], ["--student-steps", "2"], ["--ratio-ema", "0.5"]])
def test_micro_batches_equal_the_whole_batch_with_the_normaliser(teacher, tmp_path, extra):
    whole = _run(teacher, tmp_path / "whole", *extra)
    micro = _run(teacher, tmp_path / "micro", "--batch-gpu", "4", *extra)
    for part in ("generator", "fake_score", "head", "ema"):
        assert _worst_relative(whole[part], micro[part]) < 1e-5, part
    # the EMA of the normaliser's bin means is updated once per step, as by the whole batch
    torch.testing.assert_close(micro["weights"], whole["weights"], rtol=1e-5, atol=1e-7)
