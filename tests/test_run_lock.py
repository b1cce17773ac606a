"""The run-folder lock (one process per run folder, stale locks taken over) and the check that
no output overwrites an input."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
from pathlib import Path

import pytest

from fdistill.fsutil import LOCK_NAME, RunLock, RunLockedError, check_outputs


def _contend(folder: str, start, results) -> None:
    start.wait()
    try:
        with RunLock(folder):
            results.put(("won", os.getpid()))
            start.wait()  # hold the lock until every contender has tried
    except RunLockedError as e:
        results.put(("refused", str(e)))
        start.wait()


def test_two_processes_on_one_folder_exactly_one_wins(tmp_path):
    ctx = mp.get_context("fork")
    n = 3
    start, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), start, results)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=20) for _ in range(n)]
    for p in procs:
        p.join(timeout=20)
    won = [g for g in got if g[0] == "won"]
    refused = [g for g in got if g[0] == "refused"]
    assert len(won) == 1 and len(refused) == n - 1, got
    for _, msg in refused:
        assert "\n" not in msg and str(tmp_path) in msg
    assert not (tmp_path / LOCK_NAME).exists()  # released on exit


def test_a_live_holder_is_named_and_the_lock_released_on_error(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(
            RunLockedError, match=f"process {os.getpid()} on {socket.gethostname()}"
        ):
            RunLock(tmp_path).acquire()
    with pytest.raises(ZeroDivisionError), RunLock(tmp_path):
        raise ZeroDivisionError
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path):
    p = mp.get_context("fork").Process(target=os._exit, args=(0,))
    p.start()
    p.join()
    (tmp_path / LOCK_NAME).write_text(f"pid={p.pid}\nhost={socket.gethostname()}\n")
    with RunLock(tmp_path) as lock:
        assert lock.held
        assert f"pid={os.getpid()}" in (tmp_path / LOCK_NAME).read_text()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text("pid=1\nhost=elsewhere.example\n")
    with pytest.raises(RunLockedError, match="process 1 on elsewhere.example"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).exists()


def _run(tmp: Path) -> Path:
    run = tmp / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"ckpt")
    (run / "config.json").write_text("{}")
    return run


@pytest.mark.parametrize(
    "out, inp, refused",
    [
        ("run/checkpoint.pt", {"--ckpt": "run"}, True),  # sample --out onto the checkpoint
        ("run/checkpoint.pt", {"--ckpt": "run/checkpoint.pt"}, True),
        ("run", {"--ckpt": "run"}, True),  # export RUN --out RUN
        (".", {"--ckpt": "run"}, True),  # an output folder containing the run
        ("run/grid.png", {"--ckpt": "run"}, False),  # beside the run's files: fine
        ("link/checkpoint.pt", {"--ckpt": "run"}, True),  # through a symlink
        ("data/out", {"--data": "data"}, True),  # inside an input folder
        ("elsewhere", {"--ckpt": "run", "--data": "data"}, False),
        ("data/a.png/x", {"--data": "data/a.png"}, True),
    ],
)
def test_outputs_never_overwrite_inputs(tmp_path, monkeypatch, out, inp, refused):
    monkeypatch.chdir(tmp_path)
    run = _run(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(b"png")
    (tmp_path / "link").symlink_to(run)
    if refused:
        with pytest.raises(ValueError) as info:
            check_outputs({"--out": out}, inp)
        msg = str(info.value)
        assert "\n" not in msg and "--out" in msg and any(k in msg for k in inp)
    else:
        check_outputs({"--out": out}, inp)
    assert (run / "checkpoint.pt").read_bytes() == b"ckpt"
