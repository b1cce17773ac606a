"""End to end on the exact 2-D teacher: CLI outputs, determinism, and that distillation works."""

import json
from dataclasses import replace

import pytest

from fdistill.cli import main
from fdistill.toy import ToyConfig, run


def tiny(cfg: ToyConfig, steps: int, **kw) -> ToyConfig:
    return replace(
        cfg, n_eval=2000, train=replace(cfg.train, steps=steps, batch=64, progress=False), **kw
    )


def test_cli_writes_outputs_and_is_seeded(tmp_path):
    args = ["toy", "--divergence", "fkl", "--steps", "8", "--batch", "64", "--seed", "3"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    for name in ("metrics.json", "samples.png", "metrics.jsonl", "log.txt", "checkpoint.pt"):
        assert (tmp_path / "a" / name).is_file(), name
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    a.pop("train_seconds"), b.pop("train_seconds")
    assert a == b
    assert 0.0 <= a["mode_coverage"] <= 1.0 and 0.0 <= a["tv"] <= 1.0


def test_cli_rejects_unknown_divergence(capsys):
    with pytest.raises(SystemExit):
        main(["toy", "--compare", "rkl,kl"])
    assert "unknown divergence(s) kl" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_writes_table(tmp_path):
    assert (
        main(
            ["toy", "--compare", "rkl,js", "--steps", "5", "--batch", "64", "--out", str(tmp_path)]
        )
        == 0
    )
    table = (tmp_path / "compare.md").read_text()
    assert "| rkl |" in table and "| js |" in table
    assert (tmp_path / "compare.png").is_file()


@pytest.mark.slow
def test_distillation_finds_the_modes():
    """From a collapsed start, a JS student of a 4-mode ring ends on all modes, far better
    than the untrained generator (exact teacher = independent reference)."""
    # 128 x 3 MLPs: at 250 steps the default 64 x 2 nets are still on their way (TV 0.13-0.24
    # over seeds 0-2, against 0.03-0.04; at the default 1,500 steps they are level)
    cfg = tiny(ToyConfig(n_modes=4, weight_spread=1.0, hidden=128, depth=3), steps=250)
    cfg = replace(cfg, train=replace(cfg.train, batch=128))
    before = run(replace(cfg, train=replace(cfg.train, steps=0)), quiet=True)
    after = run(cfg, quiet=True)
    assert after["mode_coverage"] == 1.0
    assert after["tv"] < 0.15 < before["tv"]
    assert after["teacher_loglik"] > before["teacher_loglik"] + 1.0
