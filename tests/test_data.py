"""Tests for fedgen.core.data: IDX readers on real MNIST, FedGen's partition, local test split, shards."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedgen.core.data import (
    DataError,
    Dataset,
    builtin_data_dir,
    describe_histogram,
    dirichlet_partition,
    label_histogram,
    label_restricted_test_split,
    load_idx_dataset,
    load_shard,
    read_idx_images,
    read_idx_labels,
    save_shard,
)
from fedgen.core.task import prepare

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_DIR = SHARED_DATA / "mnist"

needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST files not found under {MNIST_DIR} (see shared/data/README.md)",
)


@pytest.fixture(scope="module")
def mnist_train() -> Dataset:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST files not found under {MNIST_DIR}")
    return load_idx_dataset(MNIST_DIR, "train")


@pytest.fixture(scope="module")
def mnist_test() -> Dataset:
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST files not found under {MNIST_DIR}")
    return load_idx_dataset(MNIST_DIR, "test")


@pytest.fixture(scope="module")
def subset_train() -> Dataset:
    return load_idx_dataset(builtin_data_dir(), "train")


def _idx_images(n: int, magic: int = 2051, rows: int = 28, cols: int = 28) -> bytes:
    header = np.array([magic, n, rows, cols], dtype=">u4").tobytes()
    return header + (np.arange(n * rows * cols) % 256).astype(np.uint8).tobytes()


def _idx_labels(labels: list[int], magic: int = 2049) -> bytes:
    return np.array([magic, len(labels)], dtype=">u4").tobytes() + bytes(labels)


# --------------------------------------------------------------------------- IDX readers


@needs_mnist
def test_real_mnist_counts_and_ranges(mnist_train: Dataset, mnist_test: Dataset) -> None:
    assert mnist_train.samples.shape == (60000, 28, 28) and mnist_train.samples.dtype == np.uint8
    assert mnist_test.samples.shape == (10000, 28, 28)
    assert mnist_train.labels.dtype == np.int64 and len(mnist_train) == 60000 and len(mnist_test) == 10000
    for ds in (mnist_train, mnist_test):
        assert set(np.unique(ds.labels)) == set(range(10))
    assert mnist_train.name == "mnist"
    # Known MNIST facts: first training label is 5, first test label is 7; class 1 is the largest.
    assert mnist_train.labels[0] == 5 and mnist_test.labels[0] == 7
    assert np.bincount(mnist_train.labels).tolist()[1] == 6742


@needs_mnist
def test_reader_accepts_plain_idx(tmp_path: Path) -> None:
    raw = gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "labels").write_bytes(raw)
    assert np.array_equal(
        read_idx_labels(tmp_path / "labels"), read_idx_labels(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    )


def test_shipped_subset_is_balanced(subset_train: Dataset) -> None:
    test = load_idx_dataset(builtin_data_dir(), "test")
    assert builtin_data_dir().name == "mnist_subset" and subset_train.name == "mnist_subset"
    assert subset_train.samples.shape == (6000, 28, 28) and len(test) == 1000
    assert np.bincount(subset_train.labels, minlength=10).tolist() == [600] * 10
    assert np.bincount(test.labels, minlength=10).tolist() == [100] * 10


@needs_mnist
def test_shipped_subset_images_are_real_mnist(mnist_test: Dataset) -> None:
    sub = load_idx_dataset(builtin_data_dir(), "test")
    pairs = zip(mnist_test.samples, mnist_test.labels, strict=True)
    source = {hashlib.sha1(img.tobytes()).digest(): int(y) for img, y in pairs}
    for img, y in zip(sub.samples, sub.labels, strict=True):
        assert source[hashlib.sha1(img.tobytes()).digest()] == y


def test_bad_magic_is_rejected(tmp_path: Path) -> None:
    p = tmp_path / "imgs"
    p.write_bytes(_idx_images(2, magic=2049))
    with pytest.raises(DataError, match="bad magic 2049"):
        read_idx_images(p)
    q = tmp_path / "labels.gz"
    q.write_bytes(gzip.compress(_idx_labels([1, 2], magic=2051)))
    with pytest.raises(DataError, match="bad magic 2051"):
        read_idx_labels(q)


def test_truncated_files_are_rejected(tmp_path: Path) -> None:
    p = tmp_path / "imgs"
    p.write_bytes(_idx_images(3)[:-1])
    with pytest.raises(DataError, match="truncated"):
        read_idx_images(p)
    q = tmp_path / "labels"
    q.write_bytes(_idx_labels([1, 2, 3])[:-2])
    with pytest.raises(DataError, match="truncated"):
        read_idx_labels(q)
    r = tmp_path / "hdr"
    r.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match="header"):
        read_idx_images(r)
    gz = gzip.compress(_idx_images(3))
    s = tmp_path / "imgs.gz"
    s.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataError, match="gzip"):
        read_idx_images(s)


def test_wrong_dims_and_count_mismatch_and_missing(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(_idx_images(1, rows=32, cols=32))
    with pytest.raises(DataError, match="32x32"):
        read_idx_images(tmp_path / "x")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_images(3))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_labels([1, 2])))
    with pytest.raises(DataError, match=r"3 images but .* 2 labels"):
        load_idx_dataset(tmp_path, "train")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz"):
        load_idx_dataset(tmp_path, "test")
    with pytest.raises(DataError, match="not found"):
        read_idx_labels(tmp_path / "nope")


def test_mnist_preprocessing_matches_fedgen_transform() -> None:
    imgs = np.array([[[0, 255], [128, 51]]], dtype=np.uint8)
    out = prepare("mnist").task.preprocess(torch.from_numpy(imgs)).numpy()
    assert out.dtype == np.float32 and out.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(out[0, 0], (imgs[0] / 255.0 - 0.5) / 0.5, rtol=0, atol=1e-6)
    assert out.min() == -1.0 and out.max() == 1.0


def test_dataset_subset_and_validation(subset_train: Dataset) -> None:
    sub = subset_train.subset(np.array([3, 1]))
    assert len(sub) == 2 and sub.labels.tolist() == subset_train.labels[[3, 1]].tolist()
    assert len(subset_train.subset(np.array([], dtype=np.int64))) == 0
    with pytest.raises(DataError, match="int64"):
        Dataset(samples=subset_train.samples[:2], labels=np.zeros(2, dtype=np.int32), name="x")


# --------------------------------------------------------------------------- partition


@needs_mnist
def test_partition_fedgen_mnist_setting(mnist_train: Dataset) -> None:
    """FedGen's MNIST run: 20 users, 1,500 images per class -> 15,000 training images."""
    parts = dirichlet_partition(mnist_train.labels, n_clients=20, alpha=0.1, seed=42, samples_per_class=1500)
    assert len(parts) == 20
    allidx = np.concatenate(parts)
    assert len(allidx) == 15000 and len(np.unique(allidx)) == 15000  # disjoint
    hist = label_histogram(mnist_train.labels, parts, 10)
    assert hist.sum(axis=0).tolist() == [1500] * 10
    assert hist.sum(axis=1).min() >= 10
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    text = describe_histogram(hist)
    assert text.count("\n") == 20 + 3 and "15000" in text


def test_partition_all_samples_when_uncapped(subset_train: Dataset) -> None:
    parts = dirichlet_partition(subset_train.labels, n_clients=7, alpha=0.5, seed=1, min_samples=50)
    allidx = np.sort(np.concatenate(parts))
    assert np.array_equal(allidx, np.arange(len(subset_train)))
    assert min(len(p) for p in parts) >= 50
    # A class with fewer samples than the cap contributes all it has.
    labels = np.array([0] * 30 + [1] * 5)
    parts = dirichlet_partition(labels, n_clients=2, alpha=1.0, seed=0, samples_per_class=20, min_samples=1)
    assert label_histogram(labels, parts, 2).sum(axis=0).tolist() == [20, 5]


def test_partition_is_deterministic(subset_train: Dataset) -> None:
    a = dirichlet_partition(subset_train.labels, 10, 0.3, seed=5, samples_per_class=300)
    b = dirichlet_partition(subset_train.labels, 10, 0.3, seed=5, samples_per_class=300)
    c = dirichlet_partition(subset_train.labels, 10, 0.3, seed=6, samples_per_class=300)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=False))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c, strict=False))


def test_label_skew_grows_as_alpha_shrinks(subset_train: Dataset) -> None:
    def skew(alpha: float) -> float:
        vals = []
        for seed in range(3):
            parts = dirichlet_partition(subset_train.labels, 10, alpha, seed=seed, samples_per_class=300)
            hist = label_histogram(subset_train.labels, parts, 10)
            vals.append((hist.max(axis=1) / hist.sum(axis=1)).mean())
        return float(np.mean(vals))

    s_small, s_mid, s_large = skew(0.05), skew(1.0), skew(100.0)
    assert s_small > s_mid > s_large
    assert s_large < 0.2  # near uniform: about 1/10 per label


def test_partition_argument_errors() -> None:
    labels = np.repeat(np.arange(3), 10)
    with pytest.raises(ValueError, match="n_clients"):
        dirichlet_partition(labels, 0, 1.0, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(labels, 2, 0.0, seed=0)
    with pytest.raises(DataError, match=">= 10 samples"):
        dirichlet_partition(labels, 4, 1.0, seed=0)  # 30 samples cannot give 4 clients 10 each
    with pytest.raises(DataError, match="tries"):
        # One class, tiny alpha: almost all samples land on one client, so 10/10/10 is out of reach.
        dirichlet_partition(np.zeros(30, dtype=np.int64), 3, 0.01, seed=0, max_tries=5)


# --------------------------------------------------------------------------- local test split


@needs_mnist
def test_label_restricted_test_split(mnist_train: Dataset, mnist_test: Dataset) -> None:
    parts = dirichlet_partition(mnist_train.labels, n_clients=20, alpha=0.1, seed=42, samples_per_class=1500)
    label_sets = [set(np.unique(mnist_train.labels[p]).tolist()) for p in parts]
    for seed in (0, None):
        tests = label_restricted_test_split(mnist_test.labels, label_sets, seed=seed)
        assert len(tests) == 20
        allidx = np.concatenate(tests)
        assert len(np.unique(allidx)) == len(allidx)  # disjoint across clients
        per_label = np.bincount(mnist_test.labels, minlength=10) // 20
        expected = sum(int(per_label[c]) for s in label_sets for c in s)
        assert len(allidx) == expected
        for s, t in zip(label_sets, tests, strict=False):
            assert set(np.unique(mnist_test.labels[t]).tolist()) == s
    # seed=None reproduces FedGen's file-order slices; arrays of train labels are accepted too.
    tests = label_restricted_test_split(mnist_test.labels, [mnist_train.labels[p] for p in parts], seed=None)
    first_with_0 = next(k for k, s in enumerate(label_sets) if 0 in s)
    zeros = tests[first_with_0][mnist_test.labels[tests[first_with_0]] == 0]
    assert np.array_equal(zeros, np.flatnonzero(mnist_test.labels == 0)[: len(zeros)])


# --------------------------------------------------------------------------- shards


def test_shard_round_trip(tmp_path: Path, subset_train: Dataset) -> None:
    train, test = subset_train.subset(np.arange(0, 50)), subset_train.subset(np.arange(50, 60))
    path = tmp_path / "shards" / "client-3.npz"
    save_shard(path, train, test)
    got_train, got_test = load_shard(path)
    assert got_test is not None
    assert np.array_equal(got_train.samples, train.samples) and np.array_equal(got_train.labels, train.labels)
    assert np.array_equal(got_test.samples, test.samples) and got_test.labels.dtype == np.int64
    assert [p.name for p in path.parent.iterdir()] == ["client-3.npz"]  # no temp file left behind
    save_shard(path, train)  # overwrite, without a test split
    got_train, got_test = load_shard(path)
    assert got_test is None and len(got_train) == 50


def test_shard_rejects_bad_arrays(tmp_path: Path) -> None:
    imgs = np.zeros((2, 28, 28), dtype=np.uint8)
    mnist = prepare("mnist")
    p = tmp_path / "float.npz"  # a readable shard, but not what the task stores
    np.savez(p, train_images=imgs.astype(np.float32), train_labels=np.array([1, 2]))
    with pytest.raises(DataError, match=r"float32 \[2, 28, 28\], task 'mnist' expects uint8 \[N, 28, 28\]"):
        mnist.check(load_shard(p)[0], "float.npz")
    p = tmp_path / "flabels.npz"
    np.savez(p, train_images=imgs, train_labels=np.array([1.0, 2.0]))
    with pytest.raises(DataError, match="train_y"):
        load_shard(p)
    p = tmp_path / "range.npz"
    np.savez(p, train_x=imgs, train_y=np.array([1, 10]))
    with pytest.raises(DataError, match=r"labels span 1..10, task 'mnist' has classes 0..9"):
        mnist.check(load_shard(p)[0], "range.npz")
    p = tmp_path / "negative.npz"
    np.savez(p, train_x=imgs, train_y=np.array([1, -1]))
    with pytest.raises(DataError, match="negative label"):
        load_shard(p)
    p = tmp_path / "pickled.npz"
    np.savez(p, train_images=imgs, train_labels=np.array([{"x": 1}, 2], dtype=object))
    with pytest.raises(DataError, match=r"train_labels.*pickle"):
        load_shard(p)
    p = tmp_path / "half.npz"
    np.savez(p, train_images=imgs, train_labels=np.array([1, 2]), test_images=imgs)
    with pytest.raises(DataError, match="test_y"):
        load_shard(p)
    p = tmp_path / "junk.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk.npz"):
        load_shard(p)
    with pytest.raises(DataError, match="not found"):
        load_shard(tmp_path / "absent.npz")
