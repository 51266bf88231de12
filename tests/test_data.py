"""Data loading: bundled digits (split, standardization), .npz files (shapes, clear errors), batching."""

import re

import jax
import numpy as np
import pytest

from jaxopt_lab.lab import data


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load_digits()


def test_digits_split_is_stratified_standardized_and_fixed(digits):
    assert digits.x_train.shape == (1347, 8, 8, 1) and digits.x_test.shape == (450, 8, 8, 1)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int32
    # Stratified: every class keeps its share of the whole set in both parts (within one example).
    all_labels = np.concatenate([digits.y_train, digits.y_test])
    for part in (digits.y_train, digits.y_test):
        expected = np.bincount(all_labels, minlength=10) * len(part) / len(all_labels)
        assert np.all(np.abs(np.bincount(part, minlength=10) - expected) <= 1.0)
    # Standardized with the training statistics: the training pixels have mean 0 and std 1.
    np.testing.assert_allclose(digits.x_train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(digits.x_train.std(), 1.0, atol=1e-5)
    assert abs(digits.x_test.mean()) > 1e-4  # the test set is NOT re-centred with its own statistics
    again = data.load_digits()
    np.testing.assert_array_equal(again.x_test, digits.x_test)
    assert "1347 train / 450 test" in digits.describe()


def test_test_fraction_is_checked():
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits(test_fraction=1.5)


@pytest.fixture(scope="module")
def mnist1d() -> data.Dataset:
    return data.load_mnist1d()


def test_mnist1d_is_the_papers_split_of_1d_signals(mnist1d):
    assert mnist1d.x_train.shape == (4000, 40, 1) and mnist1d.x_test.shape == (1000, 40, 1)
    assert mnist1d.x_train.dtype == np.float32 and mnist1d.y_train.dtype == np.int32
    assert mnist1d.num_classes == 10 and mnist1d.image_shape == (40, 1)
    for labels in (mnist1d.y_train, mnist1d.y_test):  # 500 per class, shuffled before the 80/20 split
        counts = np.bincount(labels, minlength=10)
        assert counts.sum() == len(labels) and counts.min() > 0.08 * len(labels)
    np.testing.assert_allclose(mnist1d.x_train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(mnist1d.x_train.std(), 1.0, atol=1e-5)
    assert mnist1d.describe() == "mnist1d: 4000 train / 1000 test signals of length 40 x 1 channel, 10 classes"
    assert not mnist1d.x_train.flags.writeable  # the cached arrays cannot be changed by a caller
    assert data.load_mnist1d().x_train is not mnist1d.x_train  # cached generation, a fresh Dataset


def test_mnist1d_is_generated_locally_and_deterministically(mnist1d, monkeypatch):
    import random
    import socket

    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("load_mnist1d must not touch the network")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    data._mnist1d_arrays.cache_clear()  # really regenerate
    np.random.seed(123)  # noqa: NPY002 (the global state is what is tested)
    random.seed(123)
    regenerated = data.load_mnist1d()
    # The generator seeds the global NumPy and `random` generators: their state is restored.
    assert np.random.randint(1 << 30) == np.random.RandomState(123).randint(1 << 30)  # noqa: NPY002
    assert random.random() == random.Random(123).random()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(regenerated, name), getattr(mnist1d, name))


def test_load_dataset_takes_a_builtin_name_or_a_path(mnist1d, digits, tmp_path):
    from pathlib import Path

    assert data.BUILTIN_DATASETS == ("digits", "mnist1d")
    for name in ("mnist1d", Path("mnist1d")):  # the CLI may hand over a Path
        np.testing.assert_array_equal(data.load_dataset(name).x_test, mnist1d.x_test)
    for name in (None, "digits"):
        np.testing.assert_array_equal(data.load_dataset(name).x_test, digits.x_test)
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_dataset(tmp_path / "mnist1d")  # any other spelling is a path
    for name, ds in (("digits", digits), ("mnist1d", mnist1d)):  # the specs configs are checked against
        assert data.BUILTIN_SPECS[name] == (len(ds.y_train), len(ds.y_test), ds.image_shape, ds.num_classes)


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


def _arrays(x_train, x_test, num_classes=3):
    rng = np.random.default_rng(0)
    return dict(x_train=x_train, y_train=rng.integers(0, num_classes, len(x_train)),
                x_test=x_test, y_test=rng.integers(0, num_classes, len(x_test)))


@pytest.mark.parametrize("shape, expected", [((6, 4, 4), (4, 4, 1)), ((6, 16), (4, 4, 1)),
                                             ((6, 4, 4, 3), (4, 4, 3))])
def test_npz_accepts_common_layouts_and_standardizes_with_train_statistics(tmp_path, shape, expected):
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, shape).astype(np.uint8)
    x_test = rng.integers(0, 256, (5, *shape[1:])).astype(np.uint8)
    ds = data.load_npz(_save(tmp_path / "mine.npz", **_arrays(x_train, x_test)))
    assert ds.name == "mine" and ds.image_shape == expected and ds.x_train.dtype == np.float32
    channels = x_train.reshape(6, *expected).astype(np.float64)
    mean, std = channels.mean(axis=(0, 1, 2)), channels.std(axis=(0, 1, 2))
    np.testing.assert_allclose(ds.pixel_mean, mean, rtol=1e-5)
    np.testing.assert_allclose(ds.x_test, (x_test.reshape(5, *expected) - mean) / std, rtol=1e-4, atol=1e-5)
    assert ds.num_classes == int(max(ds.y_train.max(), ds.y_test.max())) + 1
    assert data.load_dataset(tmp_path / "mine.npz").image_shape == expected


def test_npz_column_labels_are_squeezed(tmp_path):
    arrays = _arrays(np.zeros((4, 2, 2)), np.ones((3, 2, 2)))
    arrays["y_train"] = arrays["y_train"][:, None]
    assert data.load_npz(_save(tmp_path / "a.npz", **arrays)).y_train.shape == (4,)


def _bad(tmp_path, **changes):
    arrays = {**_arrays(np.zeros((4, 2, 2)), np.ones((3, 2, 2))), **changes}
    arrays = {k: v for k, v in arrays.items() if v is not None}
    return _save(tmp_path / "bad.npz", **arrays)


@pytest.mark.parametrize("changes, message", [
    (dict(y_test=None), "lacks the array(s) y_test"),
    (dict(y_train=np.zeros(3, np.int64)), "same number"),
    (dict(y_train=np.zeros(4, np.float32)), "integer class labels"),
    (dict(y_train=-np.ones(4, np.int64)), "negative label"),
    (dict(x_train=np.full((4, 2, 2), np.nan)), "NaN or infinite"),
    (dict(x_train=np.zeros((4, 3))), "square image"),
    (dict(x_train=np.zeros((4, 3, 5, 5)), x_test=np.zeros((3, 3, 5, 5))), "channels-first"),
    (dict(x_test=np.zeros((3, 3, 3))), "differ in shape"),
    (dict(x_train=np.zeros((4,))), "2, 3 or 4 dimensions"),
])
def test_bad_npz_files_raise_a_clear_error(tmp_path, changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        data.load_npz(_bad(tmp_path, **changes))


def test_missing_or_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_npz(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        data.load_npz(tmp_path / "text.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        data.load_npz(tmp_path / "single.npy")


def test_shuffled_batches_are_a_permutation_and_large_batches_are_consecutive_small_ones():
    key = jax.random.key(3)
    order = np.asarray(data.shuffled_batches(key, 100, 8))
    assert order.shape == (12, 8) and len(set(order.ravel().tolist())) == 96
    large = np.asarray(data.shuffled_batches(key, 128, 32))
    small = np.asarray(data.shuffled_batches(key, 128, 8))
    np.testing.assert_array_equal(large.reshape(-1, 8), small)


@pytest.mark.parametrize("count, size, message", [(10, 0, "batch_size"), (0, 1, "num_examples"),
                                                  (10, 11, "exceeds"), (10, 2.0, "batch_size")])
def test_num_batches_checks_its_arguments(count, size, message):
    with pytest.raises(ValueError, match=message):
        data.num_batches(count, size)


def test_npz_labels_of_a_single_class_are_rejected(tmp_path):
    arrays = _arrays(np.zeros((4, 2, 2)), np.ones((3, 2, 2)))
    arrays.update(y_train=np.full(4, 99), y_test=np.array([0, 1, 99]))
    with pytest.raises(ValueError, match=r"every training label is 99; expected y_train to cover at least 2"):
        data.load_npz(_save(tmp_path / "one.npz", **arrays))


@pytest.mark.parametrize("y_train, y_test, count, shown", [
    ([1, 2, 1, 2], [1, 2, 1], 1, "0"),  # labels from 1: class 0 is never trained on
    ([0, 5, 0, 9], [0, 5, 9], 7, "1-4, 6-8"),
    ([0, 1, 0, 1], [0, 1, 3], 2, "2-3"),  # a test label above every training label
    ([0, 2, 4, 6, 8, 10, 12, 14], [0, 2, 4], 7, "1, 3, 5, 7, 9, 11, ..."),
])
def test_npz_classes_without_a_training_example_warn(tmp_path, y_train, y_test, count, shown):
    arrays = dict(x_train=np.zeros((len(y_train), 2, 2)), y_train=np.array(y_train),
                  x_test=np.zeros((len(y_test), 2, 2)), y_test=np.array(y_test))
    with pytest.warns(UserWarning) as record:
        ds = data.load_npz(_save(tmp_path / "gaps.npz", **arrays))
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller
    k = ds.num_classes
    assert k == max(max(y_train), max(y_test)) + 1
    assert f"{count} of the {k} classes (0..{k - 1}: " in str(record[0].message)
    assert f"have no training example: {shown}; relabel" in str(record[0].message)


def test_npz_with_every_class_trained_does_not_warn(tmp_path, recwarn):
    arrays = _arrays(np.zeros((6, 2, 2)), np.ones((3, 2, 2)))
    arrays.update(y_train=np.array([0, 1, 2, 0, 1, 2]), y_test=np.array([2, 2, 2]))
    assert data.load_npz(_save(tmp_path / "ok.npz", **arrays)).num_classes == 3
    assert [str(w.message) for w in recwarn if "no training example" in str(w.message)] == []
