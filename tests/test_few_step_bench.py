"""Smoke run of the few-step benchmark (benchmarks/few_step.py) at toy sizes.

It checks that the script runs end to end on the library as it is and writes its report; the
numbers themselves are measured by running the script (benchmarks/results/few_step.*).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
