"""DMD2's zero-shot COCO protocol: resizes against clean-fid and PIL, caption draws, CLIP score
with the prefix against a float64 hand computation, and the streamed FID against numpy/scipy."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fdistill.metrics.protocol import (
    DMD2Metrics,
    clean_inception_features,
    dmd2_quantize,
    draw_captions,
    read_caption_pool,
    write_drawn_captions,
)
from fdistill.metrics.resize import (
    center_crop_box,
    center_crop_lanczos,
    clean_resize,
    clean_resize_batch,
    eval_res_batch,
)

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "diffusers" / "sd15_tiny"
POOL = 23  # 299 = 13 * 23


def _images(seed: int = 0) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    noise = g.integers(0, 256, (64, 48, 3), np.uint8)
    yy, xx = np.mgrid[0:40, 0:70]
    ramp = np.stack([xx * 3, yy * 6, (xx + yy) * 2], axis=2).clip(0, 255).astype(np.uint8)
    return [noise, ramp, g.integers(0, 256, (256, 256, 3), np.uint8)]


# --------------------------------------------------------------------------- resizes
def test_clean_resize_equals_clean_fid():
    resize = pytest.importorskip(
        "cleanfid.resize", reason="clean-fid is absent: pip install --no-deps clean-fid==0.1.35"
    )
    theirs = resize.make_resizer("PIL", False, "bicubic", (299, 299))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fromarray(mode=) in new Pillow
        for im in _images():
            ref = theirs(im)
            ours = clean_resize(im)
            assert ours.dtype == ref.dtype == np.float32 and ours.shape == (299, 299, 3)
            assert np.array_equal(ours, ref)
        u8 = torch.from_numpy(np.stack([_images()[2]] * 2)).permute(0, 3, 1, 2)
        batch = clean_resize_batch(u8)
        assert batch.shape == (2, 3, 299, 299)
        assert np.array_equal(batch[1].permute(1, 2, 0).numpy(), theirs(_images()[2]))


def test_clean_resize_closed_forms():
    """Without clean-fid: a constant image stays constant; the output is not re-quantised."""
    const = np.full((37, 53, 3), 200, np.uint8)
    np.testing.assert_allclose(clean_resize(const), 200.0, rtol=0, atol=1e-3)
    out = clean_resize(_images()[0])
    assert not np.array_equal(out, np.round(out))  # float, like clean-fid's "clean" mode
    assert out.min() >= 0 and out.max() <= 255


def test_center_crop_offsets_and_lanczos():
    # torchvision center_crop offsets: int(round((side - crop) / 2)), Python's round
    assert center_crop_box(300, 200) == (50, 0, 250, 200)
    assert center_crop_box(301, 200) == (50, 0, 250, 200)  # round(50.5) == 50
    assert center_crop_box(303, 200) == (52, 0, 252, 200)  # round(51.5) == 52
    assert center_crop_box(40, 71) == (0, 16, 40, 56)
    for im in _images(1):
        h, w = im.shape[:2]
        s = min(h, w)
        top, left = int(round((h - s) / 2)), int(round((w - s) / 2))
        ref = PIL.Image.fromarray(im[top : top + s, left : left + s]).resize(
            (256, 256), PIL.Image.Resampling.LANCZOS
        )
        assert np.array_equal(center_crop_lanczos(im), np.asarray(ref))
    batch = eval_res_batch([torch.from_numpy(im).permute(2, 0, 1) for im in _images(1)], 32)
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 32, 32)


def test_dmd2_quantize_truncates():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 0.99999, 1.0, 1.5]).reshape(1, 1, 1, 7)
    expect = [0, 0, 127, 191, 254, 255, 255]  # floor((x + 1) * 127.5), clamped
    assert dmd2_quantize(x).flatten().tolist() == expect


# --------------------------------------------------------------------------- captions
@pytest.fixture
def coco_json(tmp_path) -> Path:
    anns = []
    for img in range(6):
        for c in range(1 + img % 3):
            anns.append({"image_id": 100 + img, "id": len(anns), "caption": f" img {img} cap {c} "})
    p = tmp_path / "captions_val2014.json"
    p.write_text(json.dumps({"images": [], "annotations": anns}))
    return p


def test_draw_captions_one_per_image_is_seeded(coco_json, tmp_path):
    pool = read_caption_pool(coco_json)
    d = draw_captions(coco_json, n=4, seed=0)
    # second implementation of the documented rule
    rng = np.random.default_rng(0)
    images = list(dict.fromkeys(pool.image_ids))
    chosen = [images[j] for j in rng.choice(len(images), size=4, replace=False)]
    expect = []
    for i in chosen:
        ks = [k for k, x in enumerate(pool.image_ids) if x == i]
        expect.append(pool.captions[ks[int(rng.integers(len(ks)))]])
    assert d.captions == expect and d.image_ids == chosen
    assert len(set(d.image_ids)) == 4 and all(c == c.strip() for c in d.captions)
    assert draw_captions(coco_json, n=4, seed=0) == d
    assert draw_captions(coco_json, n=4, seed=1).captions != d.captions
    whole = draw_captions(coco_json, n=30_000)
    assert whole.image_ids == images and len(whole) == 6
    path = write_drawn_captions(d, tmp_path / "results")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["caption"] for r in rows] == d.captions
    assert [r["image_id"] for r in rows] == d.image_ids
    assert d.describe()["seed"] == 0 and d.describe()["n"] == 4


def test_draw_captions_from_a_text_file(tmp_path):
    p = tmp_path / "caps.txt"
    p.write_text("\n".join(f"caption {i}" for i in range(50)) + "\n\n")
    d = draw_captions(p, n=10, seed=3)
    idx = np.random.default_rng(3).choice(50, size=10, replace=False)
    assert d.captions == [f"caption {i}" for i in idx]
    assert draw_captions(p, n=50).captions == [f"caption {i}" for i in range(50)]
    with pytest.raises(FileNotFoundError, match="--captions"):
        draw_captions(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="annotations"):
        read_caption_pool(bad)


# --------------------------------------------------------------------------- CLIP with prefix
def _hand_scores(path: Path, pixels: Tensor, ids: Tensor) -> Tensor:
    """float64 cosine of projected embeddings, pooled at the first end token by hand."""
    import transformers

    model = transformers.CLIPModel.from_pretrained(path).double().eval()
    with torch.no_grad():
        h = model.text_model(input_ids=ids).last_hidden_state
        eos = (ids == 999).int().argmax(1)
        t = h[torch.arange(len(ids)), eos] @ model.text_projection.weight.T
        v = model.vision_model(pixel_values=pixels.double()).last_hidden_state[:, 0]
        ln = model.vision_model.post_layernorm
        v = (v - v.mean(-1, keepdim=True)) / (
            v.var(-1, unbiased=False, keepdim=True) + ln.eps
        ).sqrt()
        v = (v * ln.weight + ln.bias) @ model.visual_projection.weight.T
    return (t * v).sum(-1) / (t.norm(dim=-1) * v.norm(dim=-1))


def test_clip_score_with_prefix_matches_float64_hand_computation(tiny_clip):
    import transformers

    from fdistill.metrics.clip import DMD2_PREFIX, CLIPScorer, clip_score

    tok = transformers.CLIPTokenizer.from_pretrained(tiny_clip)
    long = " ".join(["a photo of a cat on a mat"] * 20)
    texts = ["a photo of a cat", "a dog", long]
    pre = tok(DMD2_PREFIX, add_special_tokens=False).input_ids
    rows = []
    for t in texts:
        body = tok(t, add_special_tokens=False).input_ids
        row = [998] + pre + body
        row = row[:76] + [999] if len(row) >= 77 else row + [999] * (77 - len(row))  # DMD2's cut
        rows.append(row)
    ids = torch.tensor(rows)
    short = tok([DMD2_PREFIX + t for t in texts[:2]], padding="max_length", max_length=77).input_ids
    assert ids[:2].tolist() == short  # for captions that fit: the prefixed string, tokenised
    g = np.random.default_rng(3)
    u8 = torch.from_numpy(g.integers(0, 256, (3, 3, 32, 32), np.uint8))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).double()[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).double()[:, None, None]
    expect = _hand_scores(tiny_clip, (u8.double() / 255 - mean) / std, ids)
    scorer = CLIPScorer(tiny_clip)
    assert scorer.tokenize(texts, DMD2_PREFIX)[0].tolist() == rows
    got = scorer.score(u8, texts, DMD2_PREFIX).double()  # uint8 pixels in
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)
    floats = (u8.double() / 127.5 - 1).float()
    torch.testing.assert_close(
        scorer.score(floats, texts, DMD2_PREFIX).double(), got, rtol=0, atol=0
    )
    assert clip_score(u8, texts, scorer, batch=2, prefix=DMD2_PREFIX) == pytest.approx(
        float(expect.mean()), abs=1e-5
    )
    assert (scorer.score(u8, texts) - got).abs().max() > 1e-4  # the prefix changes the score


# --------------------------------------------------------------------------- FID path
class _Layers(nn.Module):
    def __init__(self, proj: Tensor) -> None:
        super().__init__()
        self.register_buffer("proj", proj)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, 23).flatten(1) @ self.proj  # POOL


class _FakeNvidia(nn.Module):
    """The NVIDIA file's shape: ``forward(img, return_features)`` with a ``layers`` body."""

    def __init__(self, proj: Tensor) -> None:
        super().__init__()
        self.layers = _Layers(proj)

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        raise RuntimeError("the clean path must call .layers, not resize again")


def _hand_features(u8_list: list[np.ndarray], proj: np.ndarray) -> np.ndarray:
    """crop + Lanczos 256 (PIL), clean resize (clean-fid's own if installed), normalise, head."""
    try:
        from cleanfid.resize import make_resizer

        resize = make_resizer("PIL", False, "bicubic", (299, 299))
    except ImportError:
        resize = clean_resize
    out = []
    for im in u8_list:
        s = min(im.shape[:2])
        top, left = int(round((im.shape[0] - s) / 2)), int(round((im.shape[1] - s) / 2))
        small = PIL.Image.fromarray(im[top : top + s, left : left + s]).resize(
            (256, 256), PIL.Image.Resampling.LANCZOS
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            x = resize(np.asarray(small)).astype(np.float64)
        x = (x - 128.0) / 128.0
        k = 299 // POOL
        pooled = x.transpose(2, 0, 1).reshape(3, k, POOL, k, POOL).mean(axis=(2, 4))
        out.append(pooled.reshape(-1) @ proj)
    return np.stack(out)


def _fid_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_dmd2_fid_through_inception_features(tmp_path):
    from fdistill.metrics.inception import InceptionFeatures

    nf = 6
    proj = torch.randn(3 * (299 // POOL) ** 2, nf, generator=torch.Generator().manual_seed(0)) / 20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_FakeNvidia(proj)), str(tmp_path / "inception.pt"))
    inception = InceptionFeatures(tmp_path / "inception.pt", num_features=nf)
    assert inception.convention == "nvidia"
    g = torch.Generator().manual_seed(1)
    fake = torch.rand(10, 3, 40, 56, generator=g) * 2 - 1
    refs = [
        torch.randint(0, 256, (3, 30 + 3 * i, 45), generator=g, dtype=torch.uint8) for i in range(9)
    ]
    for i, r in enumerate(refs):
        PIL.Image.fromarray(r.permute(1, 2, 0).numpy()).save(tmp_path / f"ref{i}.png")
    m = DMD2Metrics(inception, None)
    m.update(fake[:6], ["x"] * 6)
    m.update(fake[6:], ["x"] * 4)
    from fdistill.metrics.protocol import list_images

    assert m.update_reference_files(list_images(tmp_path), batch=4) == 9
    res = m.compute()
    fake_u8 = [
        np.floor((f.permute(1, 2, 0).numpy().astype(np.float64) + 1) * 127.5)
        .clip(0, 255)
        .astype(np.uint8)
        for f in fake
    ]
    hand_fake = _hand_features(fake_u8, proj.double().numpy())
    hand_ref = _hand_features([r.permute(1, 2, 0).numpy() for r in refs], proj.double().numpy())
    assert res["num_images"] == 10 and res["num_reference"] == 9
    assert res["fid"] == pytest.approx(_fid_by_hand(hand_fake, hand_ref), rel=1e-4, abs=1e-6)
    x299 = clean_resize_batch(eval_res_batch(dmd2_quantize(fake[:2])))
    feats = clean_inception_features(inception, x299)
    np.testing.assert_allclose(feats.numpy(), hand_fake[:2], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="299"):
        clean_inception_features(inception, torch.zeros(1, 3, 64, 64))
