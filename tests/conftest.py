"""Shared test set-up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

SD_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "diffusers" / "sd15_tiny"


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


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random-weight transformers CLIP folder (the SD fixture's tokenizer), saved by
    transformers' own code: the CLIP-score tests' model."""
    transformers = pytest.importorskip("transformers")
    if not (SD_FIXTURE / "tokenizer").is_dir():
        pytest.skip(f"the fixture tokenizer is absent ({SD_FIXTURE})")
    text = dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=999,
    )
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2
    )
    vision["num_attention_heads"] = 4
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    d = tmp_path_factory.mktemp("clip") / "tiny-clip"
    transformers.CLIPModel(cfg).save_pretrained(d)
    for f in (SD_FIXTURE / "tokenizer").iterdir():
        shutil.copy(f, d / f.name)
    (d / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "crop_size": {"height": 32, "width": 32},
                "size": {"shortest_edge": 32},
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "do_resize": True,
                "do_center_crop": True,
                "do_normalize": True,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "resample": 3,
            }
        )
    )
    return d


@pytest.fixture
def engine_updates(monkeypatch):
    """A counter of the training engine's updates (``Engine.update``) by method and phase,
    ``{(method class name, phase name): count}``: benchmarks show with it that what they time
    is the engine's own update."""
    from collections import Counter

    from fdistill.engine import Engine

    calls: Counter = Counter()
    update = Engine.update

    def counted(self, phase, step):
        calls[type(self.method).__name__, phase.name] += 1
        return update(self, phase, step)

    monkeypatch.setattr(Engine, "update", counted)
    return calls
