"""Datasets as numpy arrays, and batching.

Fashion-MNIST and MNIST come from, in this order:

1. ``data_dir`` (the four IDX files, gzipped or not, as distributed);
2. the Debian package's folder (``apt-get install dataset-fashion-mnist`` puts
   Fashion-MNIST in ``/usr/share/datasets/fashion-mnist``);
3. tensorflow-datasets, when it is installed and the dataset is prepared or can be
   downloaded.

Images are returned as float32 NHWC, scaled to [0, 1] and normalised with the
dataset's mean and standard deviation; labels as int32.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from typing import Iterator

import numpy as np

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SYSTEM_DIRS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}
# Per-dataset pixel mean and std on the training set, for inputs in [0, 1].
NORMALIZATION = {"fashion_mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}
DATASETS = tuple(NORMALIZATION)


class DataError(RuntimeError):
  """No source could provide the dataset; the message lists the ways to provide it."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  x_train: np.ndarray  # (N, H, W, C) float32, normalised
  y_train: np.ndarray  # (N,) int32
  x_test: np.ndarray
  y_test: np.ndarray
  source: str

  @property
  def num_classes(self) -> int:
    return int(max(self.y_train.max(), self.y_test.max())) + 1


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzipped) into a uint8 array of its stored shape."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (EOFError, OSError) as e:  # truncated or corrupt gzip (an interrupted download)
    raise DataError(f"{path} cannot be read: {e}") from None
  if len(data) < 4:
    raise DataError(f"{path} is truncated: {len(data)} bytes, shorter than an IDX header")
  zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise DataError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()})")
  if len(data) < 4 + 4 * ndim:
    raise DataError(f"{path} is truncated inside its header ({ndim} dimensions announced)")
  shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
  arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if arr.size != int(np.prod(shape)):
    raise DataError(f"{path} is truncated: header says {shape}, found {arr.size} bytes")
  return arr.reshape(shape)


def _find(folder: str, stem: str) -> str | None:
  for name in (stem, stem + ".gz"):
    p = os.path.join(folder, name)
    if os.path.exists(p):
      return p
  return None


def _from_idx_dir(folder: str) -> dict[str, np.ndarray] | None:
  paths = {k: _find(folder, v) for k, v in IDX_FILES.items()}
  if any(p is None for p in paths.values()):
    return None
  return {k: read_idx(p) for k, p in paths.items()}


def _from_tfds(name: str) -> dict[str, np.ndarray]:
  import tensorflow_datasets as tfds  # optional dependency

  out = {}
  for split in ("train", "test"):
    ds = tfds.data_source(name, split=split)
    records = [ds[i] for i in range(len(ds))]
    out[f"{split}_images"] = np.stack([r["image"] for r in records])[..., 0]
    out[f"{split}_labels"] = np.array([r["label"] for r in records])
  return out


def normalize(images: np.ndarray, name: str) -> np.ndarray:
  """uint8 (N, H, W) or (N, H, W, C) -> float32 NHWC, (x / 255 - mean) / std."""
  mean, std = NORMALIZATION[name]
  x = images.astype(np.float32) / 255.0
  if x.ndim == 3:
    x = x[..., None]
  return (x - np.float32(mean)) / np.float32(std)


def load(name: str, data_dir: str | None = None) -> Dataset:
  """Loads ``name`` ("fashion_mnist" or "mnist") from the first source that has it."""
  if name not in NORMALIZATION:
    raise DataError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
  tried = []
  raw, source = None, None
  if data_dir is not None:
    raw, source = _from_idx_dir(data_dir), data_dir
    tried.append(f"--data-dir {data_dir}: " + ("ok" if raw else "the four IDX files are not there"))
  if raw is None:
    folder = SYSTEM_DIRS[name]
    raw, source = _from_idx_dir(folder), folder
    tried.append(f"{folder}: " + ("ok" if raw else "not found"))
  if raw is None:
    try:
      raw, source = _from_tfds(name), "tensorflow-datasets"
    except ImportError:
      tried.append("tensorflow-datasets: not installed")
    except Exception as e:  # offline, not prepared, ...
      tried.append(f"tensorflow-datasets: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
  if raw is None:
    debian = name.replace("_", "-")
    raise DataError(
        f"could not load {name}. Tried:\n  " + "\n  ".join(tried) + "\nProvide it one of three ways:\n"
        f"  1. --data-dir DIR with {', '.join(IDX_FILES.values())} (optionally .gz)\n"
        f"  2. apt-get install -y dataset-{debian}   (installs {SYSTEM_DIRS[name]})\n"
        f"  3. pip install tensorflow-datasets, online, so that tfds can download {name}"
    )
  return Dataset(
      name=name,
      x_train=normalize(raw["train_images"], name),
      y_train=raw["train_labels"].astype(np.int32),
      x_test=normalize(raw["test_images"], name),
      y_test=raw["test_labels"].astype(np.int32),
      source=source,
  )


def subset(ds: Dataset, n_train: int | None = None, n_test: int | None = None) -> Dataset:
  """The first ``n_train``/``n_test`` examples (None keeps all), for quick runs and tests."""
  return dataclasses.replace(
      ds,
      x_train=ds.x_train[:n_train], y_train=ds.y_train[:n_train],
      x_test=ds.x_test[:n_test], y_test=ds.y_test[:n_test],
  )


def train_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Shuffled full batches (the remainder is dropped, so every step has one shape)."""
  if batch_size > len(x):
    raise ValueError(f"batch size {batch_size} is larger than the training set ({len(x)} examples)")
  order = np.random.default_rng(seed).permutation(len(x))
  for i in range(len(x) // batch_size):
    idx = order[i * batch_size : (i + 1) * batch_size]
    yield x[idx], y[idx]


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """In-order batches of one fixed size; the last is zero-padded and comes with a mask."""
  for i in range(0, len(x), batch_size):
    xb, yb = x[i : i + batch_size], y[i : i + batch_size]
    n = len(xb)
    mask = np.ones(batch_size, np.float32)
    if n < batch_size:
      pad = batch_size - n
      xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
      yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
      mask[n:] = 0
    yield xb, yb, mask
