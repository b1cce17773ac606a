"""One evaluation entry for every source (``fdistill.evaluation.evaluate``): a class-label run
and a text-to-image model give one result schema, a captioned image folder and a data set go
through the same stream, and the earlier entry points give the entry's numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from fdistill import evaluation
from fdistill.evaluation import RESULT_KEYS, evaluate, evaluate_source, format_table
from fdistill.metrics import inception as inception_mod

SD_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "diffusers" / "sd15_tiny"


@pytest.fixture(autouse=True)
def _no_inception(monkeypatch):
    """No Inception detector is found unless a test passes one."""
    monkeypatch.delenv(inception_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(inception_mod, "_packaged_inception", lambda: None)


@pytest.fixture
def streams(monkeypatch) -> list[str]:
    """The kinds of the sources :func:`evaluate` streamed, in order."""
    kinds: list[str] = []
    real = evaluation.sample_stream

    def spy(src, *args, **kwargs):
        kinds.append(src.kind)
        return real(src, *args, **kwargs)

    monkeypatch.setattr(evaluation, "sample_stream", spy)
    return kinds


def test_class_label_run_and_text_model_share_one_schema(
    tiny_teacher, tiny_clip, tmp_path, streams
):
    pytest.importorskip("diffusers", reason="text-to-image needs diffusers")
    if not (SD_FIXTURE / "unet" / "config.json").is_file():
        pytest.skip(f"the Stable Diffusion fixture is absent ({SD_FIXTURE})")
    sd = tmp_path / "sd"
    shutil.copytree(SD_FIXTURE, sd)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bus\na cat on a mat\nan apple\n")

    label = evaluate(tiny_teacher, nfe=2, n=12, inception=False, batch=8)
    text = evaluate(sd, captions=prompts, clip=tiny_clip, n=2, nfe=2, batch=2)
    assert streams == ["teacher", "teacher"]
    assert list(label) == list(text) == list(RESULT_KEYS)
    assert label["source"] == {"spec": str(tiny_teacher), "kind": "teacher", "step": 2, "nfe": 2}
    assert text["source"] == {"spec": str(sd), "kind": "teacher", "step": 0, "nfe": 2}
    # What each is conditioned on and measured by follows from the source.
    assert label["captions"] is None and label["classifier"] == "digits"
    assert label["reference"] == "digits" and "cfid" in label["metrics"]
    assert text["captions"] == str(prompts) and text["classifier"] is None
    assert text["n"] == 2 and -1 <= text["metrics"]["clip_score"] <= 1
    assert label["notes"] == label["metrics"]["notes"] and text["notes"] == []
    assert "classifier FID" in format_table(label) and "CLIP score" in format_table(text)

    # The earlier entry points are the same evaluation.
    old = evaluate_source(tiny_teacher, nfe=2, n=12, inception=False, batch=8)
    assert old["metrics"] == label["metrics"]
    from fdistill.t2i import evaluate_t2i

    old = evaluate_t2i(sd, captions=prompts, clip=tiny_clip, n=2, nfe=2, batch=2)
    assert old["metrics"] == text["metrics"]


def test_captioned_folder_and_data_set_go_through_one_stream(tiny_clip, tmp_path, streams):
    pytest.importorskip("transformers", reason="CLIP score needs transformers")
    from fdistill.data.captions import load_image
    from fdistill.metrics.clip import CLIPScorer

    folder = tmp_path / "captioned"
    folder.mkdir()
    captions = ["a red square", "a blue circle", "a green field"]
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f"{i}.png")
    records = [{"file": f"{i}.png", "caption": c} for i, c in enumerate(captions)]
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    data = evaluate("digits", ref="digits", n=50, inception=False)
    cap = evaluate(folder, clip=tiny_clip)
    assert streams == ["data", "images"]
    assert list(data) == list(cap) == list(RESULT_KEYS)
    assert data["generation"] is None and cap["generation"] is None
    assert data["n"] == 50 and data["metrics"]["num_fake"] == 50
    assert cap["n"] == 3 and cap["captions"] == str(folder / "captions.jsonl")
    # CLIP score of the folder's images with their own captions, computed here.
    images = torch.stack([load_image(folder / f"{i}.png", 16) for i in range(3)])
    want = CLIPScorer(tiny_clip).score(images, captions).double()
    m = cap["metrics"]
    assert m["clip_score"] == pytest.approx(float(want.mean()), abs=1e-6)
    assert m["clip_score_std"] == pytest.approx(float(want.std(correction=0)), abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"clip": "{tmp}"}, "--clip"),
        ({"metrics": "fid,clip"}, "--metrics clip"),
        ({"protocol": "dmd2"}, "--protocol"),
        ({"guidance": 2.0}, "--guidance"),
        ({"batch": 0}, "--batch"),
    ],
)
def test_inputs_that_do_not_apply_name_their_flag(kwargs, flag, tmp_path):
    """A data set is not text-conditioned and not sampled: one line naming the flag."""
    kwargs = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v
              for k, v in kwargs.items()}  # fmt: skip
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        evaluate("digits", ref="digits", n=10, inception=False, **kwargs)
    assert flag in str(e.value) and "\n" not in str(e.value)


class ChannelMeans(torch.nn.Module):
    """Inception stand-in: the mean of each colour channel of the 8-bit image (3 features)."""

    num_features = 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        u8 = torch.floor((images.double() + 1) * 127.5 + 0.5).clamp(0, 255)
        return u8.mean((2, 3))


def test_text_fid_against_images_or_their_statistics(tmp_path):
    """Zero-shot FID of a captioned folder against reference images equals FID against saved
    statistics of the same images, and both equal the Frechet distance computed here."""
    from fdistill.data.captions import load_image
    from fdistill.metrics.fid import feature_stats, frechet_distance, save_stats

    def folder(name: str, n: int, seed: int) -> Path:
        root = tmp_path / name
        root.mkdir()
        records = []
        for i in range(n):
            pixels = np.random.default_rng(seed + i).integers(0, 256, (12, 12, 3), np.uint8)
            PIL.Image.fromarray(pixels).save(root / f"{i}.png")
            records.append({"file": f"{i}.png", "caption": f"image {i}"})
        (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return root

    fake, real = folder("fake", 5, 0), folder("real", 6, 100)
    det = ChannelMeans()
    f_fake = det(torch.stack([load_image(fake / f"{i}.png", 12) for i in range(5)]))
    f_real = det(torch.stack([load_image(real / f"{i}.png", 12) for i in range(6)]))
    save_stats(tmp_path / "real.npz", *feature_stats(f_real.numpy()))
    want = frechet_distance(f_real.numpy(), f_fake.numpy())

    by_images = evaluate(fake, ref=real, inception=det)
    by_stats = evaluate(fake, ref_stats=tmp_path / "real.npz", inception=det)
    assert by_images["metrics"]["fid"] == pytest.approx(want, rel=1e-9) and want > 0
    assert by_stats["metrics"]["fid"] == pytest.approx(want, rel=1e-9)
    assert by_images["num_reference"] == 6 and by_stats["ref_stats"] == str(tmp_path / "real.npz")
    assert "zero-shot FID" in format_table(by_stats)
