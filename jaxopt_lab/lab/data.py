"""Classification data for the real-data experiments: digits, MNIST-1D, any ``.npz``, and batching.

Three sources give the same :class:`Dataset` (channels-last ``float32`` inputs standardized with the
*training* set's mean and standard deviation, ``int32`` labels); :func:`load_dataset` picks one by name:

- :func:`load_digits` (``"digits"``, the default): scikit-learn's bundled 1,797 real 8x8 handwritten
  digits (shipped inside the wheel, no download), images ``(N, 8, 8, 1)``, split once into train/test with
  a fixed *stratified* split so every class keeps its share in both parts.
- :func:`load_mnist1d` (``"mnist1d"``): MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with
  MNIST-1D", arXiv:2011.14439), 1-D signals ``(N, 40, 1)``, 4,000 train / 1,000 test, generated locally by the
  ``mnist1d`` package with its default arguments (the dataset of the paper's table; nothing is downloaded).
- :func:`load_npz`: a user's file with the arrays ``x_train, y_train, x_test, y_test`` (MNIST, CIFAR-10,
  anything), so the same experiments run on other data through ``jaxopt-lab run NAME --data PATH.npz``.

Batching happens inside the jitted training loop: :func:`shuffled_batches` turns a key into one epoch's
index matrix, so an epoch is a ``lax.scan`` over its rows and the data never leaves the device.

>>> from jaxopt_lab.lab import data
>>> ds = data.load_digits()
>>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
((1347, 8, 8, 1), (450, 8, 8, 1), 10)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_SPECS",
    "NPZ_KEYS",
    "Dataset",
    "DatasetSpec",
    "load_dataset",
    "load_digits",
    "load_mnist1d",
    "load_npz",
    "num_batches",
    "shuffled_batches",
    "standardize",
    "stratified_split",
]

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# The names `load_dataset` (and `jaxopt-lab run --data NAME`) accepts besides a .npz path.
BUILTIN_DATASETS = ("digits", "mnist1d")


class DatasetSpec(NamedTuple):
    """A dataset's sizes and input shape, known without loading it (for checking configs abstractly)."""

    train_size: int
    test_size: int
    input_shape: tuple[int, ...]
    num_classes: int


# What `load_dataset(name)` returns, for configs checked without generating the data (a test keeps these
# equal to the loaded datasets).
BUILTIN_SPECS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(1347, 450, (8, 8, 1), 10),
    "mnist1d": DatasetSpec(4000, 1000, (40, 1), 10),
}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split of inputs and labels (N,) ``int32`` in ``[0, num_classes)``.

    Inputs are channels-last ``float32``: images ``(N, H, W, C)`` or 1-D signals ``(N, L, C)``.
    ``pixel_mean``/``pixel_std`` are the training-set statistics the inputs were standardized with
    (one per channel), kept so a caller can map a change in raw pixel units into standardized units.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    pixel_mean: np.ndarray
    pixel_std: np.ndarray

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One example's shape: ``(H, W, C)`` for images, ``(L, C)`` for signals."""
        return tuple(self.x_train.shape[1:])

    def describe(self) -> str:
        """One line for summaries: name, sizes, input shape, classes.

        >>> load_mnist1d().describe()
        'mnist1d: 4000 train / 1000 test signals of length 40 x 1 channel, 10 classes'
        """
        *spatial, channels = self.image_shape
        plural = "" if channels == 1 else "s"
        what = (f"signals of length {spatial[0]} x {channels} channel{plural}" if len(spatial) == 1
                else f"images of {'x'.join(map(str, self.image_shape))}")
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test {what}, "
                f"{self.num_classes} classes")


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                 np.ndarray]:
    """Per-channel standardization with the training set's statistics (never the test set's).

    One mean and one standard deviation per channel over all training pixels, so the spatial
    structure of an image is kept (per-pixel statistics would turn every always-blank border pixel
    into a 0/0). Returns ``(x_train, x_test, mean, std)`` in ``float32``.
    """
    axes = tuple(range(x_train.ndim - 1))
    mean = x_train.mean(axis=axes, dtype=np.float64)
    std = x_train.std(axis=axes, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)  # a constant channel is only centred

    def scale(x: np.ndarray) -> np.ndarray:
        return ((x - mean) / std).astype(np.float32)
    return scale(x_train), scale(x_test), mean.astype(np.float32), std.astype(np.float32)


def stratified_split(labels: Any, fraction: float, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(kept, held_out)`` of a fixed split that holds out ``fraction`` of every class.

    In scikit-learn's ``train_test_split`` order (shuffled): index arrays with it to split the data.

    >>> kept, held_out = stratified_split(np.repeat(np.arange(4), 10), 0.2)
    >>> len(kept), len(held_out), sorted(np.bincount(np.repeat(np.arange(4), 10)[held_out]).tolist())
    (32, 8, [2, 2, 2, 2])
    """
    from sklearn.model_selection import train_test_split  # seconds to import: only when used

    labels = np.asarray(labels)
    kept, held_out = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels,
                                      random_state=seed)
    return kept, held_out


def load_digits(*, test_fraction: float = 0.25, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits, a fixed stratified split, standardized.

    Args:
      test_fraction: share of the 1,797 images held out for testing (default 0.25: 1,347 / 450).
      split_seed: seed of the split. Keep the default so every experiment and run sees the same split;
        the training seeds of an experiment vary initialization and batch order, not the data.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load_digits: test_fraction must lie in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits as sklearn_digits  # seconds to import: only when digits load

    bunch = sklearn_digits()
    images = bunch.images.astype(np.float32)[..., None]  # (1797, 8, 8, 1), pixel values 0..16
    labels = bunch.target.astype(np.int32)
    train, test = stratified_split(labels, test_fraction, seed=split_seed)
    x_train, x_test, mean, std = standardize(images[train], images[test])
    y_train, y_test = labels[train], labels[test]
    return Dataset("digits", x_train, y_train, x_test, y_test, 10, mean, std)


def _as_images(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    """(N, H, W) -> (N, H, W, 1); (N, H*W) with a square H*W -> (N, H, W, 1); (N, H, W, C) as it is."""
    if x.ndim == 2:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(f"load_npz: {path}: {key} has shape {x.shape}; flat rows must hold a square image "
                             f"(H*W with H == W), got {x.shape[1]} values per row. Save (N, H, W[, C]) instead")
        return x.reshape(x.shape[0], side, side, 1)
    if x.ndim == 3:
        return x[..., None]
    if x.ndim == 4:
        if x.shape[1] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
            raise ValueError(f"load_npz: {path}: {key} has shape {x.shape}, which looks channels-first "
                             f"(N, C, H, W); expected channels-last (N, H, W, C): "
                             f"save x.transpose(0, 2, 3, 1)")
        return x
    raise ValueError(f"load_npz: {path}: {key} must have 2, 3 or 4 dimensions (N, H*W), (N, H, W) or "
                     f"(N, H, W, C), got shape {x.shape}")


def _check_classes(y_train: np.ndarray, num_classes: int, path: Path) -> None:
    """At least 2 classes among the training labels; a warning for classes of ``0..K-1`` never trained on."""
    present = np.unique(y_train).tolist()
    if len(present) < 2:
        raise ValueError(f"load_npz: {path}: every training label is {present[0]}; expected y_train to "
                         f"cover at least 2 classes")
    # The classes without a training example, as runs between the labels present (never an array of
    # num_classes entries: a stray label of 10**9 must not allocate gigabytes to say so).
    edges = [-1, *present, num_classes]
    gaps = [(a + 1, b - 1) for a, b in itertools.pairwise(edges) if b - a > 1]
    if gaps:
        count = sum(b - a + 1 for a, b in gaps)
        runs = [str(a) if a == b else f"{a}-{b}" for a, b in gaps]
        shown = ", ".join(runs[:6] + (["..."] if len(runs) > 6 else []))
        warnings.warn(f"load_npz: {path}: {count} of the {num_classes} classes (0..{num_classes - 1}: labels "
                      f"count from 0 up to the largest) have no training example: {shown}; relabel to "
                      f"0..K-1 unless the model should have those outputs", UserWarning, stacklevel=3)


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """A dataset from a ``.npz`` file holding ``x_train, y_train, x_test, y_test``.

    Images may be ``(N, H, W, C)`` (channels last), ``(N, H, W)`` or flat ``(N, H*W)`` square images,
    of any real dtype (``uint8`` is fine); labels are integers ``0..K-1`` with ``K`` = the largest label + 1.
    The images are standardized per channel with the training statistics, like :func:`load_digits`.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a readable ``.npz``, a missing array, mismatched lengths or image shapes,
        non-integer or negative labels, training labels of a single class, non-finite pixels, or an
        empty split.

    Warns:
      UserWarning: some of the classes ``0..K-1`` have no training example (labels that skip classes,
        or a test label above every training label): the model gets ``K`` outputs all the same.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_npz: no such file: {path}")
    with open(path, "rb") as f:
        is_npy = f.read(6) == b"\x93NUMPY"
    if not is_npy and not zipfile.is_zipfile(path):  # else np.load would try, and blame, pickle
        raise ValueError(f"load_npz: {path} is not a readable .npz archive: not a zip file (np.savez writes "
                         f"one); expected the arrays {', '.join(NPZ_KEYS)}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"load_npz: {path} is not a readable .npz archive ({err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"load_npz: {path} holds a single array, expected a .npz archive with the arrays "
                         f"{', '.join(NPZ_KEYS)}")
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise ValueError(f"load_npz: {path} lacks the array(s) {', '.join(missing)}; expected "
                             f"{', '.join(NPZ_KEYS)}, found {', '.join(archive.files) or 'none'}")
        try:
            arrays = {k: archive[k] for k in NPZ_KEYS}
        except ValueError as err:  # object arrays need pickle, which we refuse
            raise ValueError(f"load_npz: {path}: cannot read the arrays without pickle ({err})") from None

    xs, ys = {}, {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise ValueError(f"load_npz: {path}: x_{split} must hold real numbers, got dtype {x.dtype}")
        y = np.squeeze(y) if y.ndim == 2 and 1 in y.shape else y
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"load_npz: {path}: y_{split} must be a 1-D array of integer class labels, "
                             f"got shape {arrays[f'y_{split}'].shape} and dtype {y.dtype}")
        if len(y) == 0 or len(x) != len(y):
            raise ValueError(f"load_npz: {path}: x_{split} and y_{split} must hold the same number (> 0) of "
                             f"examples, got {len(x)} and {len(y)}")
        if y.min() < 0:
            raise ValueError(f"load_npz: {path}: y_{split} holds a negative label ({y.min()})")
        x = _as_images(x, f"x_{split}", path).astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"load_npz: {path}: x_{split} holds NaN or infinite values")
        xs[split], ys[split] = x, y.astype(np.int32)
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        raise ValueError(f"load_npz: {path}: train and test images differ in shape: "
                         f"{xs['train'].shape[1:]} vs {xs['test'].shape[1:]}")
    num_classes = int(max(ys["train"].max(), ys["test"].max())) + 1
    _check_classes(ys["train"], num_classes, path)
    x_train, x_test, mean, std = standardize(xs["train"], xs["test"])
    return Dataset(path.stem, x_train, ys["train"], x_test, ys["test"], num_classes, mean, std)


def load_dataset(name_or_path: str | os.PathLike[str] | None = None) -> Dataset:
    """The experiments' data (``--data``): a built-in dataset by name, or a ``.npz`` file.

    ``None`` or ``"digits"``: :func:`load_digits`; ``"mnist1d"``: :func:`load_mnist1d`; anything else is
    a path for :func:`load_npz` (write ``./mnist1d`` for a file that happens to carry a built-in name).

    >>> load_dataset("mnist1d").x_train.shape, load_dataset(None).name
    ((4000, 40, 1), 'digits')
    """
    if name_or_path is None:
        return load_digits()
    name = os.fspath(name_or_path)
    if name == "digits":
        return load_digits()
    if name == "mnist1d":
        return load_mnist1d()
    return load_npz(name_or_path)


def load_mnist1d() -> Dataset:
    """MNIST-1D: 4,000 train / 1,000 test signals ``(N, 40, 1)`` of 10 classes, generated locally.

    ``mnist1d.data.make_dataset(get_dataset_args())``: the package's default arguments (seed 42, 5,000
    examples, an 80/20 split), which generate the dataset of the paper's (Greydanus & Kobak) table. The
    package's ``get_dataset`` is never called, so nothing is downloaded or written to disk. Generation
    takes a few seconds; the arrays are cached for the process (read-only) and the global NumPy/``random``
    state the generator seeds is restored afterwards. The signals are standardized with the training
    statistics (the generator standardized them over all 5,000; the difference is ~1e-3).
    """
    x_train, y_train, x_test, y_test = _mnist1d_arrays()
    x_train, x_test, mean, std = standardize(x_train, x_test)
    for array in (x_train, x_test):
        array.flags.writeable = False
    return Dataset("mnist1d", x_train, y_train, x_test, y_test, 10, mean, std)


@functools.cache
def _mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:  # mnist1d imports in seconds: only when MNIST-1D is generated
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - a dependency of jaxopt-lab
        raise ImportError("load_mnist1d needs the `mnist1d` package: pip install mnist1d") from err
    numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002 (the global state)
    try:
        generated = make_dataset(get_dataset_args())
    finally:  # make_dataset seeds the global generators; leave them as they were
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)
    arrays = (generated["x"][..., None].astype(np.float32), generated["y"].astype(np.int32),
              generated["x_test"][..., None].astype(np.float32), generated["y_test"].astype(np.int32))
    for array in arrays:
        array.flags.writeable = False
    return arrays


def num_batches(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped, so every step has the same shape)."""
    for name, value in (("num_examples", num_examples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"num_batches: {name} must be a positive integer, got {value!r}")
    if batch_size > num_examples:
        raise ValueError(f"num_batches: batch_size={batch_size} exceeds the {num_examples} examples")
    return num_examples // batch_size


def shuffled_batches(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    """One epoch's example indices, ``(num_batches, batch_size)``: a fresh permutation, remainder dropped.

    Jit-friendly (``num_examples`` and ``batch_size`` are static). With the same key, batches of 32 are
    the batches of 128 cut into consecutive quarters whenever both sizes divide ``num_examples``, which
    is what makes accumulated and large-batch runs comparable step for step.
    """
    count = num_batches(num_examples, batch_size)
    order = jax.random.permutation(key, num_examples)
    return order[: count * batch_size].reshape(count, batch_size)

