"""Host-side data loading: compact 8-bit storage and the sharded, prefetching ImageLoader.

The reference everywhere is the sampler the pipeline used before the loader existed (copied
below): the whole data set as float32 on the device, ``images[randint(N, (n,), gen)]``. The
loader must hand out the same batches, bit for bit, and leave the data stream where that
sampler leaves it, however far its workers have prefetched.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn

from fdistill import rng
from fdistill.data import ImageDataset, load_dataset
from fdistill.data.dataset import uint8_to_float
from fdistill.denoisers import EDMPrecond, UNet
from fdistill.loader import ImageLoader
from fdistill.pipeline import image_sampler
from fdistill.rng import BatchRandom
from fdistill.runs import load_checkpoint
from fdistill.training import MicroBatches, TeacherTrainConfig, train_teacher


def in_memory_sampler(ds: ImageDataset, device, conditional: bool):
    """The pipeline's sampler before the loader: every image on the device, indexed."""
    images = ds.images.to(device)
    labels = ds.labels.to(device) if conditional else None

    def sample(n, gen):
        idx = rng.randint(len(images), (n,), gen, device=device)
        return images[idx], (labels[idx] if labels is not None else None)

    return sample


def as_float(u: np.ndarray) -> torch.Tensor:
    """8-bit pixels -> [-1, 1], computed in float64 and rounded once (independent of the code)."""
    return torch.from_numpy((u.astype(np.float64) / 127.5 - 1).astype(np.float32))


def pixels(n: int = 40, c: int = 3, r: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, c, r, r), dtype=np.uint8)


def dataset(kind: str = "uint8", n: int = 40) -> ImageDataset:
    u = pixels(n)
    images = torch.from_numpy(u) if kind == "uint8" else as_float(u)
    return ImageDataset(images, np.arange(n) % 4)


def same(a, b) -> bool:
    return (a is None and b is None) or torch.equal(a, b)


# --------------------------------------------------------------------------- storage
def test_uint8_table_matches_float64_rounding():
    u = np.arange(256, dtype=np.uint8)
    assert torch.equal(uint8_to_float(torch.from_numpy(u)), as_float(u))


def test_8bit_sources_stay_uint8(tmp_path):
    u = pixels(6, c=3, r=5)
    np.savez(tmp_path / "a.npz", images=u.transpose(0, 2, 3, 1), labels=np.arange(6) % 2)
    ds = load_dataset(tmp_path / "a.npz")
    assert ds.storage.dtype == torch.uint8 and ds.pixels is not None
    assert ds.storage.element_size() * ds.storage.numel() == u.size  # a quarter of float32
    assert ds.images.dtype == torch.float32 and torch.equal(ds.images, as_float(u))
    image, label = ds[3]
    assert torch.equal(image, as_float(u)[3]) and label == 1
    idx = torch.tensor([5, 0, 5])
    x, y = ds.take(idx)
    assert torch.equal(x, as_float(u)[idx]) and y.tolist() == [1, 0, 1]

    folder = tmp_path / "png"
    folder.mkdir()
    for i, img in enumerate(u):
        PIL.Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i}.png")
    ds = load_dataset(folder)
    assert ds.storage.dtype == torch.uint8 and torch.equal(ds.images, as_float(u))
    # --resolution equal to the images' size keeps them 8-bit; a real resize makes floats.
    assert load_dataset(folder, resolution=5).storage.dtype == torch.uint8
    assert load_dataset(folder, resolution=3).storage.dtype == torch.float32
    # Without labels (a built-in's relabelled copy) the storage is kept too.
    assert load_dataset(tmp_path / "a.npz", labels=False).storage.dtype == torch.uint8


def test_non_8bit_sources_stay_float(tmp_path):
    g16 = np.random.default_rng(1).integers(0, 65536, (4, 1, 3, 3), dtype=np.uint16)
    np.savez(tmp_path / "b.npz", images=g16)
    ds = load_dataset(tmp_path / "b.npz")
    want = torch.from_numpy((g16 / 32767.5 - 1).astype(np.float32))
    assert ds.storage.dtype == torch.float32 and torch.equal(ds.images, want)
    assert load_dataset("digits").storage.dtype == torch.float32  # pixels 0..16
    # A float tensor of 255s is still refused: uint8 must be said by the dtype.
    with pytest.raises(ValueError, match="scaled to"):
        ImageDataset(torch.full((2, 1, 4, 4), 255.0))


# --------------------------------------------------------------------------- loader
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_loader_equals_in_memory_sampler(workers, kind):
    ds = dataset(kind)
    new = ImageLoader(ds, "cpu", True, workers=workers, prefetch=3)
    old = in_memory_sampler(ds, "cpu", True)
    g_new, g_old = BatchRandom(11), BatchRandom(11)
    for n in (4, 4, 4, 6, 6, 4, 4):
        (x, y), (x_ref, y_ref) = new(n, g_new), old(n, g_old)
        assert x.dtype == torch.float32 and torch.equal(x, x_ref) and torch.equal(y, y_ref)
        # The stream is where the in-memory draw left it, not where the workers are.
        assert torch.equal(g_new.get_state(), g_old.get_state())
    # Plain generators too, and unconditional data.
    new = ImageLoader(ds, "cpu", False, workers=workers)
    old = in_memory_sampler(ds, "cpu", False)
    g_new, g_old = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        (x, y), (x_ref, _) = new(5, g_new), old(5, g_old)
        assert torch.equal(x, x_ref) and y is None
        assert torch.equal(g_new.get_state(), g_old.get_state())
    new.close()


def test_loader_unpredictable_stream_draws_as_before():
    """No generator: the global RNG, drawn directly (nothing to prefetch from)."""
    ds = dataset()
    torch.manual_seed(3)
    x, y = ImageLoader(ds, "cpu", True)(6, None)
    torch.manual_seed(3)
    x_ref, y_ref = in_memory_sampler(ds, "cpu", True)(6, None)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_loader_leaves_global_rng_alone():
    """The DataLoader's worker seed must not come from the global RNG (dropout masks)."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = ImageLoader(dataset(), "cpu", True, workers=2)
    gen = BatchRandom(1)
    for _ in range(4):
        loader(4, gen)
    assert torch.equal(torch.get_rng_state(), before)
    loader.close()


def test_each_rank_reads_only_its_shard():
    """Rank r of 2 gets rows r*n..(r+1)*n of the single-process draw, and gathers only those."""
    ds, n = dataset(), 3
    old = in_memory_sampler(ds, "cpu", True)
    g_old = BatchRandom(4)
    full = [old(2 * n, g_old) for _ in range(3)]
    for r in (0, 1):
        loader = ImageLoader(ds, "cpu", True, rank=r, world=2)
        gathered = []
        original = loader.rows.__getitems__
        loader.rows.__getitems__ = lambda d, f=original, g=gathered: g.append(len(d.index)) or f(d)
        gen = BatchRandom(4, rank=r, world=2)
        for x_full, y_full in full:
            x, y = loader(n, gen)
            assert torch.equal(x, x_full[r * n : (r + 1) * n])
            assert torch.equal(y, y_full[r * n : (r + 1) * n])
        assert gathered == [n, n, n]
        assert torch.equal(gen.get_state(), g_old.get_state())


@pytest.mark.parametrize("workers", [0, 2])
def test_micro_batches_and_rewinds(workers):
    """Micro-batches slice one gathered block; a rewound stream (a resume) restarts the
    prefetcher at the restored state."""
    ds, k, n = dataset(), 2, 3
    old = in_memory_sampler(ds, "cpu", True)
    loader = ImageLoader(ds, "cpu", True, workers=workers)
    g_old, g_new = {"data": BatchRandom(2)}, {"data": BatchRandom(2)}
    ref = [old(n * k, g_old["data"]) for _ in range(4)]

    def run(steps):
        out = []
        for _ in range(steps):
            parts = [loader(n, g_new["data"]) for _ in MicroBatches(g_new, k)]
            out.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
        return out

    got = run(2)
    saved = g_new["data"].get_state()
    got += run(2)
    assert all(same(a[0], b[0]) and same(a[1], b[1]) for a, b in zip(got, ref, strict=True))
    assert torch.equal(g_new["data"].get_state(), g_old["data"].get_state())
    g_new["data"].set_state(saved)  # as a resume restores it
    again = run(2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, ref[2:], strict=True))
    # And the comparison can fail: a stream one draw ahead gives other images.
    assert not torch.equal(ref[0][0], ref[1][0])
    loader.close()


# --------------------------------------------------------------------------- in the loop
def _net() -> EDMPrecond:
    torch.manual_seed(0)
    net = UNet(4, 3, model_channels=8, channel_mult=(1,), num_classes=4, label_dropout=0.2)
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    return EDMPrecond(net)


CFG = TeacherTrainConfig(
    steps=4, batch=6, batch_gpu=3, lr=1e-3, progress=False, ckpt_every=2, log_every=1
)


def _train(sample_real, out=None, steps=4, resume=False, net=None):
    torch.manual_seed(7)  # label dropout draws from the global RNG
    gens = {"data": BatchRandom(3), "noise": BatchRandom(4)}
    net = net or _net()
    train_teacher(net, sample_real, replace(CFG, steps=steps), out, gens=gens, resume=resume)
    return net


def test_training_with_loader_equals_in_memory_and_resumes(tmp_path):
    """A teacher trained from the loader (two workers, two micro-batches an update, label
    dropout on the global RNG) equals one trained from the in-memory sampler, and stopping at
    step 2 then resuming gives the straight run's checkpoint bit for bit."""
    ds = dataset()
    ref = _train(in_memory_sampler(ds, "cpu", True))
    straight = _train(image_sampler(ds, torch.device("cpu"), True, workers=2), tmp_path / "a")
    for (name, a), b in zip(ref.state_dict().items(), straight.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    init = _net().state_dict()
    assert any(not torch.equal(t, init[k]) for k, t in ref.state_dict().items())  # it trained

    _train(image_sampler(ds, torch.device("cpu"), True, workers=2), tmp_path / "b", steps=2)
    loader = image_sampler(ds, torch.device("cpu"), True, workers=2)
    _train(loader, tmp_path / "b", resume=True, net=copy.deepcopy(_net()))
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a["step"] == b["step"] == 4
    for key in ("net", "ema"):
        for name, t in a["state"][key].items():
            assert torch.equal(t, b["state"][key][name]), f"{key}.{name}"
    for name, t in a["rng"][0].items():
        assert torch.equal(t, b["rng"][0][name]), name


def test_device_branch_runs_on_meta():
    """The non-CPU branch (rows moved as stored, decoded on the device) on the meta device:
    shapes and dtypes only, since this machine has no GPU."""
    loader = ImageLoader(dataset(), "meta", True, pin_memory=False)
    gen = BatchRandom(0)
    x, y = loader(5, gen)
    assert x.device.type == y.device.type == "meta"
    assert x.shape == (5, 3, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.long
    g_old = BatchRandom(0)
    in_memory_sampler(dataset(), "cpu", True)(5, g_old)
    assert torch.equal(gen.get_state(), g_old.get_state())
