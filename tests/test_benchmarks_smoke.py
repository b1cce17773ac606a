"""Smoke runs of the benchmarks at toy sizes (discriminator, imbalanced classes, results table,
engine overhead, few-step students, step cost).

They check that the scripts run end to end on the library as it is and write their reports;
the numbers themselves are measured by running the scripts (benchmarks/results/).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_disc_gap_smoke(tmp_path):
    mod = _load("disc_gap")
    out = tmp_path / "disc_gap.md"
    mod.main(
        [
            "--quick",
            "--jobs", "1",
            "--work", str(tmp_path / "w"),
            "--out", str(out),
            "--teacher-steps", "20",
            "--student-steps", "2",
            "--steps", "5",
            "--evals", "0,5",
            "--reps", "1",
            "--students", "init",
        ]
    )  # fmt: skip
    text = out.read_text()
    assert "teacher-mid" in text and "fake-enc" in text and "σ=0.01" in text
    rows = json.loads((tmp_path / "w" / "disc_gap.json").read_text())["rows"]
    taps = {r["variant"]: r["taps"] for r in rows}
    assert taps == {"teacher-mid": ["mid"], "fake-enc": ["enc8", "enc4"]}
    # Before any update the head is untrained: held-out loss near chance is not guaranteed,
    # but every noise level must be reported with a finite gap.
    for r in rows:
        for s in ("0.01", "0.1", "1", "10"):
            assert abs(r["history"]["5"][s]["gap_held"]) < 1e3


@pytest.mark.slow
def test_imbalanced_smoke(tmp_path):
    mod = _load("imbalanced")
    out_dir = tmp_path / "res"
    mod.main(
        [
            "--quick",
            "--jobs", "1",
            "--work", str(tmp_path / "w"),
            "--out-dir", str(out_dir),
            "--teacher-steps", "20",
            "--warm-steps", "2",
            "--steps", "2",
            "--n", "200",
            "--divergences", "fkl",
            "--settings", "trunc:1",
        ]
    )  # fmt: skip
    assert (out_dir / "imbalanced.png").is_file()
    raw = json.loads((tmp_path / "w" / "imbalanced.json").read_text())
    (row,) = raw["rows"]
    assert row["divergence"] == "fkl" and row["sigma_max"] == 1.0
    assert abs(sum(row["hist"]) - 1) < 1e-9 and 0 <= row["tv_teacher"] <= 1
    # The target data keeps a tenth of classes 0-4: their share is about 1/10 of the others'.
    data = raw["ref"]["data_hist"]
    assert 0.07 < sum(data[:5]) / sum(data[5:]) < 0.13
    assert "| fkl |" in (out_dir / "imbalanced.md").read_text()


@pytest.mark.slow
def test_results_table_smoke(tmp_path):
    mod = _load("results_table")
    work, out_dir = tmp_path / "w", tmp_path / "res"
    mod.main(
        [
            "--quick",
            "--jobs", "1",
            "--work", str(work),
            "--out-dir", str(out_dir),
            "--teacher-steps", "20",
            "--distill-steps", "2",
            "--n", "100",
            "--time-n", "20",
            "--nfes", "1",
            "--divergences", "rkl,fkl",
            "--gan", "on",
        ]
    )  # fmt: skip
    text = (out_dir / "digits_table.md").read_text()
    assert "10 linear-sigma ratio bins" in text and "'none'" in text
    assert "| fkl | on |" in text  # the paired-by-seed table
    cfg = json.loads((work / "students" / "fkl-gan-s0" / "config.json").read_text())
    assert cfg["disc_taps"] == ["enc8", "enc4"]
    assert cfg["options"]["loss"]["ratio_binning"] == "linear-sigma"
    assert cfg["options"]["loss"]["fake_weighting"] == "none"
    rows = json.loads((work / "results.json").read_text())["rows"]
    fkl = next(r for r in rows if r["name"] == "fkl")
    assert "log_h_cv" in fkl and "log_disc_gap/bin0" in fkl


@pytest.mark.slow
def test_engine_overhead_smoke(tmp_path):
    mod = _load("engine_overhead")
    out = tmp_path / "engine_overhead.md"
    rows = mod.main(["--quick", "--out", str(out)])
    assert [r["workload"] for r in rows] == ["toy", "teacher"]
    # The bare loop does the engine's updates: both end with the same weights, bit for bit.
    assert all(r["same_weights"] for r in rows)
    assert all(r["bare_ms"] > 0 and r["engine_ms"] > 0 for r in rows)
    assert "| toy | 6 |" in out.read_text()
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["rows"][0]["updates_per_step"] == 6


@pytest.mark.slow
def test_few_step_smoke(tmp_path):
    mod = _load("few_step")
    work, out_dir = tmp_path / "w", tmp_path / "res"
    raw = mod.main(
        [
            "--quick",
            "--jobs", "1",
            "--work", str(work),
            "--out-dir", str(out_dir),
            "--teacher-steps", "10",
            "--distill-steps", "2",
            "--n", "100",
            "--time-n", "20",
            "--nfes", "1",
            "--divergences", "rkl",
        ]
    )  # fmt: skip
    for ext in ("md", "json", "png"):
        assert (out_dir / f"few_step.{ext}").is_file()
    rows = json.loads((out_dir / "few_step.json").read_text())["rows"]
    assert rows == json.loads(json.dumps(raw["rows"]))
    students = [r for r in rows if r["kind"] == "student"]
    # Equal iterations at K = 1 and 2, and K = 2 again under the K = 1 runs' budget.
    assert sorted((r["k"], r["budget"]) for r in students) == [
        (1, "iters"),
        (2, "iters"),
        (2, "wall"),
    ]
    for r in students:
        assert len(r["sigmas"]) == r["k"] and r["sigmas"][0] == pytest.approx(80.0)
        assert r["train_cpu_s"] > 0 and r["train_s"] > 0 and r["job_samples_per_s"] > 0
        assert 0 <= r["crecall"] <= 1 and r["cfid"] >= 0 and r["cfid_teacher"] >= 0
        cfg = json.loads((work / "students" / f"digits-rkl-K{r['k']}-iters-s0" / "config.json")
                         .read_text())  # fmt: skip
        assert cfg["options"]["student_steps"] == r["k"]
    wall = next(r for r in students if r["budget"] == "wall")
    assert wall["steps"] == raw["args"]["budget_steps"][2] >= 1
    teacher = {r["k"] for r in rows if r["kind"] == "teacher"}
    assert teacher == {1, 35}  # the reference NFE is always evaluated
    assert {f"digits-student-{k}" for k in (1, 2)} <= set(raw["speed"])
    text = (out_dir / "few_step.md").read_text()
    assert "| rkl | equal iterations | 2 |" in text and "| rkl | equal budget | 2 |" in text
    assert "## Update cost against K = 1" in text and "direct: CPU s / step" in text
    assert re.search(r"(\d+) of \1 pairs logged identical records", text)  # same trajectory
    cost = raw["args"]["cost"]
    assert set(cost) == {1, 2} and all(
        len(c["cpu"]) == 1 and c["wall"][0] > 0 for c in cost.values()
    )
    assert "MNIST-5k not run" in text
    # A rerun reuses every student and the teacher: only the evaluation is repeated.
    again = mod.main(["--quick", "--jobs", "1", "--work", str(work), "--out-dir", str(out_dir),
                      "--teacher-steps", "10", "--distill-steps", "2", "--n", "100",
                      "--time-n", "20", "--nfes", "1", "--divergences", "rkl"])  # fmt: skip
    assert all(r["reused"] for r in again["rows"] if r["kind"] == "student")


@pytest.mark.slow
def test_step_cost_smoke(engine_updates, capsys):
    """step_cost at tiny sizes: every update it times or profiles is the engine's own update
    (``Engine.update``, counted here) of the methods the commands build, and it prints its
    tables."""
    mod = _load("step_cost")
    calls = engine_updates
    threads = torch.get_num_threads()
    try:
        out = mod.main(
            [
                "--resolution", "8",
                "--model-channels", "8",
                "--channel-mult", "1,1",
                "--attn", "4",
                "--batch", "2",
                "--critic-ratio", "2",
                "--rounds", "1",
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    # Per feature network (teacher, fake): a warm-up and one timed round of 1 teacher step,
    # k = 2 critic updates and 1 generator update, then one profiled update of each kind.
    assert calls == {
        ("Denoising", "denoise"): 2 * 3,
        ("FDistill", "critic"): 2 * (2 * 2 + 1),
        ("FDistill", "generator"): 2 * 3,
    }
    rows = out["rows"]
    assert set(rows) == {"teacher", "fake"}
    for r in rows.values():
        assert set(r["time"]) == set(r["mem"]) == {"teacher", "critic", "generator"}
        assert all(v > 0 for v in (*r["time"].values(), *r["mem"].values()))
        assert r["resident_distill"] > r["resident_teacher"] > 0
    t_one, t_heun = out["sampling"]
    assert 0 < t_one < t_heun
    text = capsys.readouterr().out
    assert "| disc features | teacher step | critic update | generator update |" in text
    assert "| teacher |" in text and "| fake |" in text and "35-NFE Heun" in text
