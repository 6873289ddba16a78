"""Readers, resampling, task splits, shots and batch order on the real data sources."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_ft.cli import main
from edge_ft.data.batches import epoch_batch_indices, epoch_batches, epoch_order, random_shifts
from edge_ft.data.npz import load_npz
from edge_ft.data.readers import (
    DEBIAN_FASHION_ROOT,
    find_idx_pair,
    read_any,
    read_fashion,
    read_idx,
    read_idx_dataset,
    read_image_folder,
    read_mnist_5k,
    read_uci_digits,
)
from edge_ft.data.resample import MNIST_BOX, centre_of_mass, mnist_style, resize
from edge_ft.data.tasks import DIGITS_TRAIN_ROWS, get_task, source_split, take_shots, target_split
from edge_ft.errors import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "fashion-mnist"
needs_debian_fashion = pytest.mark.skipif(
    not (DEBIAN_FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (make data installs it)",
)


@pytest.fixture(scope="module")
def digits():
    return read_uci_digits()


# ---- IDX -------------------------------------------------------------------------------------------------------


def test_fixture_reads_as_fashion_mnist():
    x, y = read_fashion("train", FIXTURE)
    xt, yt = read_fashion("test", FIXTURE)
    assert x.shape == (100, 28, 28) and xt.shape == (100, 28, 28) and x.dtype == np.uint8
    assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    assert y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # Fashion-MNIST's documented first training labels


@needs_debian_fashion
def test_debian_fashion_is_complete_and_matches_fixture():
    x, y = read_fashion("train")
    xt, yt = read_fashion("test")
    assert x.shape == (60_000, 28, 28) and xt.shape == (10_000, 28, 28)
    assert np.bincount(y).tolist() == [6000] * 10 and np.bincount(yt).tolist() == [1000] * 10
    fx, fy = read_fashion("train", FIXTURE)
    assert np.array_equal(fx, x[:100]) and np.array_equal(fy, y[:100])


def test_plain_dotted_and_torchvision_layouts(tmp_path):
    expected = read_idx_dataset(FIXTURE, "test")
    plain = tmp_path / "plain"
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    for folder in (plain, raw):
        folder.mkdir(parents=True)
    for gz in FIXTURE.glob("t10k-*.gz"):
        data = gzip.decompress(gz.read_bytes())
        (plain / gz.name[:-3].replace("-idx", ".idx")).write_bytes(data)  # t10k-images.idx3-ubyte spelling
        shutil.copy(gz, raw / gz.name)
    for root in (plain, tmp_path / "tv"):
        x, y = read_idx_dataset(root, "test")
        assert np.array_equal(x, expected[0]) and np.array_equal(y, expected[1])
    assert find_idx_pair(tmp_path / "tv", "test")[0].parent == raw


@pytest.mark.parametrize("damage", ["truncate_gz", "truncate_raw", "bad_magic", "not_gzip"])
def test_corrupt_idx_is_a_user_error_naming_the_file(tmp_path, damage):
    data = gzip.decompress((FIXTURE / "t10k-images-idx3-ubyte.gz").read_bytes())
    path = tmp_path / "t10k-images-idx3-ubyte"
    if damage == "truncate_gz":
        path = path.with_suffix(".gz")
        path.write_bytes(gzip.compress(data)[:-500])
    elif damage == "truncate_raw":
        path.write_bytes(data[:-28])
    elif damage == "bad_magic":
        path.write_bytes(b"\x01\x02" + data[2:])
    else:
        path = path.with_suffix(".gz")
        path.write_bytes(data)
    with pytest.raises(UserError, match=path.name):
        read_idx(path)


def test_labels_must_match_images(tmp_path):
    shutil.copy(FIXTURE / "t10k-images-idx3-ubyte.gz", tmp_path)
    shutil.copy(FIXTURE / "train-labels-idx1-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz")
    labels = gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    bad_labels = labels[:8] + bytes([0, 0, 0, 99]) + labels[12:-99]
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bad_labels))
    with pytest.raises(UserError, match="t10k-labels"):
        read_idx_dataset(tmp_path, "test")


def test_missing_idx_folder_says_what_it_looked_for(tmp_path):
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        read_idx_dataset(tmp_path, "train")


# ---- MNIST 5k, UCI digits, resampling --------------------------------------------------------------------------


def test_mnist_5k_is_shuffled_deterministically():
    x, y = read_mnist_5k()
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8 and x.max() == 255
    assert np.bincount(y).sum() == 5000 and len(np.unique(y)) == 10
    assert len(np.unique(y[:50])) >= 8  # the csv is sorted by label; ours is not
    x2, y2 = read_mnist_5k()
    assert np.array_equal(y, y2) and np.array_equal(x, x2)


def test_uci_digits_resampled_like_mnist(digits):
    x, y = digits
    assert x.shape == (1797, 28, 28) and x.dtype == np.uint8 and y[:10].tolist() == list(range(10))
    for img in x:
        rows, cols = np.nonzero(img)
        assert np.ptp(rows) < MNIST_BOX and np.ptp(cols) < MNIST_BOX  # ink fits in the 20x20 box
        assert max(np.ptp(rows), np.ptp(cols)) >= MNIST_BOX - 2  # ... and fills it along its longer side
        cy, cx = centre_of_mass(img.astype(float))
        assert abs(cy - 14) <= 0.75 and abs(cx - 14) <= 0.75  # integer shift: within half a pixel plus rounding
    assert x.max() == 255


def test_resize_keeps_flat_regions_and_anti_aliases():
    flat = np.full((8, 8), 7.0)
    assert np.allclose(resize(flat, 20, 13), 7.0)
    checker = np.indices((16, 16)).sum(0) % 2 * 255.0
    assert np.allclose(resize(checker, 4, 4), 127.5, atol=20)  # without anti-aliasing this would alias to 0/255


def test_mnist_style_preserves_aspect_ratio():
    bar = np.zeros((8, 8))
    bar[1:7, 3:5] = 16  # a 6x2 vertical stroke
    out = mnist_style(bar, 16)
    rows, cols = np.nonzero(out)
    assert np.ptp(rows) + 1 == 20 and 6 <= np.ptp(cols) + 1 <= 9  # 20 x ~6.7, not stretched to 20x20


# ---- image folders and .npz ------------------------------------------------------------------------------------


def _write_pngs(root: Path, x, y, invert_class: int | None = None):
    from PIL import Image

    for i, (img, label) in enumerate(zip(x, y)):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - img if label == invert_class else img).save(folder / f"{i:03d}.png")


def test_image_folder_round_trip_and_polarity(tmp_path):
    x, y = read_fashion("test", FIXTURE)
    keep = np.isin(y, [1, 7])  # trousers on black; sneakers saved dark-on-light must come back inverted
    _write_pngs(tmp_path, x[keep], y[keep], invert_class=7)
    got_x, got_y, classes = read_image_folder(tmp_path)
    assert classes == ["class_1", "class_7"]
    order = np.argsort(y[keep], kind="stable")
    assert np.array_equal(got_x, x[keep][order]) and got_y.tolist() == (y[keep][order] == 7).astype(int).tolist()


def test_broken_image_is_a_user_error(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match="x.png"):
        read_image_folder(tmp_path)


def _fixture_image(index: int = 0) -> np.ndarray:
    return read_fashion("test", FIXTURE)[0][index]


def test_transparent_png_is_composited_onto_its_page(tmp_path):
    from PIL import Image

    from edge_ft.data.readers import read_image

    ink = _fixture_image()  # white on black; drawn as black strokes on a transparent page, as a canvas saves it
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = ink
    Image.fromarray(rgba, "RGBA").save(tmp_path / "drawn.png")
    light = np.zeros((28, 28, 4), np.uint8)  # white strokes on a transparent page
    light[..., :3], light[..., 3] = 255, ink
    Image.fromarray(light, "RGBA").save(tmp_path / "light.png")
    Image.fromarray(np.stack([np.zeros_like(ink), ink], -1), "LA").save(tmp_path / "grey-alpha.png")
    for name in ("drawn.png", "light.png", "grey-alpha.png"):
        assert np.abs(read_image(tmp_path / name).astype(int) - ink).max() <= 1, name


def test_sixteen_bit_png_is_scaled_from_its_full_range(tmp_path):
    from PIL import Image

    from edge_ft.data.readers import read_image

    ink = _fixture_image(1)
    Image.fromarray(ink.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 0..65535, white on black
    Image.fromarray((255 - ink).astype(np.uint16) * 257).save(tmp_path / "page.png")  # dark ink on a light page
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    assert np.array_equal(read_image(tmp_path / "deep.png"), ink)
    assert np.array_equal(read_image(tmp_path / "page.png"), ink)


def test_an_image_that_comes_out_flat_is_refused_naming_the_file(tmp_path, capsys):
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "src" / name).mkdir(parents=True)
        Image.fromarray(_fixture_image()).save(tmp_path / "src" / name / "ok.png")
    Image.fromarray(np.zeros((28, 28, 4), np.uint8), "RGBA").save(tmp_path / "src" / "b" / "empty.png")
    assert main(["data", "convert", str(tmp_path / "src"), "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "empty.png" in err and "flat grey level" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.npz").exists()


def test_read_any_dispatches(tmp_path):
    assert read_any(FIXTURE, "test")[0].shape == (100, 28, 28)
    with pytest.raises(UserError, match="no such"):
        read_any(tmp_path / "missing")


# ---- tasks, splits, shots --------------------------------------------------------------------------------------


def test_task_names_and_aliases():
    assert get_task("mnist→digits") is get_task("mnist-digits")
    assert get_task("mnist→fashion").target == "fashion"
    with pytest.raises(UserError, match="mnist-digits"):
        get_task("cifar")


def test_source_split_is_the_shuffled_5k_cut():
    split = source_split()
    x, y = read_mnist_5k()
    assert (len(split.y_train), len(split.y_test)) == (4000, 1000)
    assert np.array_equal(np.concatenate([split.y_train, split.y_test]), y)  # disjoint and complete


def test_digits_split_by_position(digits):
    split = target_split("mnist-digits")
    assert (len(split.y_train), len(split.y_test)) == (DIGITS_TRAIN_ROWS, 1797 - DIGITS_TRAIN_ROWS)
    assert np.array_equal(np.concatenate([split.x_train, split.x_test]), digits[0])
    five = target_split("mnist-digits", shots=5)
    assert np.bincount(five.y_train).tolist() == [5] * 10 and len(five.y_test) == 597


def test_shots_are_exact_nested_and_deterministic():
    y = np.repeat(np.arange(10), 30)
    five, ten = take_shots(y, 5), take_shots(y, 10)
    assert np.bincount(y[five]).tolist() == [5] * 10 and np.bincount(y[ten]).tolist() == [10] * 10
    assert set(five) <= set(ten) and np.array_equal(five, take_shots(y, 5))
    assert not np.array_equal(five, take_shots(y, 5, seed=1))
    with pytest.raises(UserError, match="only 30"):
        take_shots(y, 31)


@needs_debian_fashion
def test_fashion_task_defaults_to_100_shots():
    split = target_split("mnist-fashion")
    assert np.bincount(split.y_train).tolist() == [100] * 10 and len(split.y_test) == 10_000


def test_export_cli_writes_device_files(tmp_path, capsys):
    assert main(["data", "export", "mnist-digits", "--out", str(tmp_path), "--shots", "3"]) == 0
    x, y = load_npz(tmp_path / "train.npz")
    xt, yt = load_npz(tmp_path / "test.npz")
    assert x.shape == (30, 28, 28) and np.bincount(y).tolist() == [3] * 10 and xt.shape == (597, 28, 28)
    assert (tmp_path / "task.json").is_file()
    assert main(["data", "export", "mnist-digits", "--out", str(tmp_path), "--shots", "500"]) == 2
    assert "--shots 500" in capsys.readouterr().err


def test_convert_cli(tmp_path):
    assert main(["data", "convert", str(FIXTURE), "--split", "test", "--out", str(tmp_path / "f.npz")]) == 0
    assert np.array_equal(load_npz(tmp_path / "f.npz")[1], read_fashion("test", FIXTURE)[1])


# ---- batch order -----------------------------------------------------------------------------------------------


def test_epoch_order_is_seeded_and_numpy_only():
    a = epoch_order(100, seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(100)) and np.array_equal(a, epoch_order(100, 3, 0))
    assert not np.array_equal(a, epoch_order(100, 3, 1)) and not np.array_equal(a, epoch_order(100, 4, 0))
    assert a[:5].tolist() == np.random.default_rng([3, 0]).permutation(100)[:5].tolist()  # the documented recipe


def test_epoch_batches_cover_the_data():
    x, y = read_fashion("test", FIXTURE)
    batches = epoch_batches(x, y, 32, seed=0, epoch=0)
    assert [len(b[1]) for b in batches] == [32, 32, 32, 4]
    assert batches[0][0].shape == (32, 1, 28, 28) and batches[0][0].dtype == np.float32
    assert sorted(np.concatenate([b[1] for b in batches]).tolist()) == sorted(y.tolist())
    assert [len(i) for i in epoch_batch_indices(100, 32, 0, 0, drop_last=True)] == [32, 32, 32]
    with pytest.raises(UserError):
        epoch_batch_indices(100, 0, 0, 0)


def test_random_shifts_move_whole_images():
    x, _ = read_fashion("test", FIXTURE)
    moved = random_shifts(x, 2, seed=0, epoch=0)
    assert np.array_equal(moved, random_shifts(x, 2, seed=0, epoch=0)) and not np.array_equal(moved, x)
    for src, dst in zip(x[:20], moved[:20]):
        padded = np.pad(src, 2)
        assert any(np.array_equal(dst, padded[2 - dy : 30 - dy, 2 - dx : 30 - dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))
    assert random_shifts(x, 0, 0, 0) is x


def test_pretraining_uses_full_mnist_idx_under_data_root(tmp_path):
    """A torchvision-style MNIST tree (written here from the 5k subset: MNIST itself is not committed)."""
    import struct

    x, y = read_mnist_5k()
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, sl in (("train", slice(0, 300)), ("t10k", slice(300, 400))):
        for kind, arr, rank in (("images", x[sl], 3), ("labels", y[sl].astype(np.uint8), 1)):
            header = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
            (raw / f"{prefix}-{kind}-idx{rank}-ubyte").write_bytes(header + arr.tobytes())
    split = source_split(tmp_path)
    assert np.array_equal(split.x_train, x[:300]) and np.array_equal(split.y_test, y[300:400])
    assert "official" in split.info["source"] and split.info["n_train"] == 300


def test_data_modules_never_import_torch():
    import subprocess
    import sys

    code = ("import sys\n"
            "class NoTorch:\n"  # any `import torch...` now raises ImportError
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('torch imported')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "import edge_ft.data.batches, edge_ft.data.readers, edge_ft.data.tasks, edge_ft.training_defaults\n"
            "import edge_ft.commands.data, edge_ft.commands.pretrain, edge_ft.commands.finetune\n"
            "from edge_ft.data.tasks import target_split; print(len(target_split('mnist-digits', shots=2).y_train))\n"
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "20"


# ---- inputs of any model shape ---------------------------------------------------------------------------------


def test_npz_holds_uint8_images_of_any_shape_scaled_to_unit_range(tmp_path):
    """Fashion-MNIST (the committed fixture) zero-padded to 32x32 and replicated to three channels: ResNet-8's
    input. uint8 (N,3,32,32) is scaled /255 like LeNet-5's (N,28,28)."""
    from edge_ft.data.npz import save_npz, to_float

    x, y = read_fashion("test", FIXTURE)
    rgb = np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None], 3, axis=1)
    save_npz(tmp_path / "rgb.npz", rgb, y, input_shape=(3, 32, 32))
    loaded, labels = load_npz(tmp_path / "rgb.npz", input_shape=(3, 32, 32))
    assert loaded.dtype == np.uint8 and loaded.shape == (100, 3, 32, 32) and np.array_equal(labels, y)
    inputs = to_float(loaded[:4])
    assert inputs.shape == (4, 3, 32, 32) and inputs.dtype == np.float32
    np.testing.assert_array_equal(inputs, rgb[:4].astype(np.float32) / 255)
    batches = epoch_batches(loaded, labels, 32, seed=0, epoch=0)
    assert batches[0][0].shape == (32, 3, 32, 32) and batches[0][0].max() <= 1.0
    # LeNet-5's files are unchanged: one channel stays (N,28,28), and scales as it always did.
    save_npz(tmp_path / "grey.npz", x[:, None], y)
    grey, _ = load_npz(tmp_path / "grey.npz")
    assert grey.shape == (100, 28, 28) and np.array_equal(to_float(grey), x[:, None].astype(np.float32) / 255)


def test_npz_holds_float32_inputs_as_they_are(tmp_path):
    from edge_ft.data.npz import save_npz, to_float

    rng = np.random.default_rng(0)
    mfcc = rng.standard_normal((20, 1, 49, 10)).astype(np.float32) * 30  # DS-CNN's input, any range
    y = rng.integers(0, 12, 20)
    save_npz(tmp_path / "kws.npz", mfcc, y, input_shape=(1, 49, 10))
    x, _ = load_npz(tmp_path / "kws.npz", num_classes=12, input_shape=(1, 49, 10))
    assert x.dtype == np.float32 and np.array_equal(to_float(x), mfcc)


@pytest.mark.parametrize("x, shape, message", [
    (np.zeros((4, 28, 28), np.uint8), (3, 32, 32), "x must have shape (N, 3, 32, 32) for the model's input "
     "[3, 32, 32], got (4, 28, 28)"),
    (np.zeros((4, 1, 49, 10), np.float32), (3, 32, 32), "x must have shape (N, 3, 32, 32)"),
    (np.zeros((4, 3, 32, 32), np.uint8), (1, 28, 28), "x must have shape (N, 28, 28) or (N, 1, 28, 28)"),
    (np.full((4, 1, 49, 10), np.nan, np.float32), (1, 49, 10), "NaN/Inf"),
    (np.zeros((4, 3, 32, 32)) + 0.5, (3, 32, 32), "or as float32 (N, 3, 32, 32) model inputs"),
], ids=["digits-for-resnet8", "mfcc-for-resnet8", "rgb-for-lenet5", "nan-inputs", "float64-fractions"])
def test_npz_shape_or_type_that_does_not_fit_the_model_is_one_line(tmp_path, x, shape, message):
    from edge_ft.data.npz import validate_xy

    with pytest.raises(UserError) as error:
        validate_xy(x, np.zeros(len(x), np.int64), "data.npz", input_shape=shape)
    assert message in str(error.value) and "\n" not in str(error.value)
