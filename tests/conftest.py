"""Shared test set-up."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads can make small
    convolutions 10-100x slower, and one thread keeps timings of the suite predictable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A 2-step digits teacher run (8 channels, batch 8) trained through the CLI, shared by the
    tests that only need some teacher to distil."""
    from fdistill.cli import main

    out = tmp_path_factory.mktemp("tiny_teacher") / "teacher"
    args = ["train-teacher", "--out", str(out), "--steps", "2", "--batch", "8"]
    assert main([*args, "--channels", "8", "--no-progress", "--device", "cpu"]) == 0
    return out
