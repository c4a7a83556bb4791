"""Datasets as numpy arrays, and batching.

CIFAR-10 comes only from tensorflow-datasets (``pip install -e ".[tfds]"``): tfds
downloads and prepares it on first use, which needs the network, and ``data_dir``, when
given, is tfds's ``data_dir`` (where it is prepared or already lies). Offline, and not
prepared there, it is a ``DataError`` that says so and how to provide it.

Fashion-MNIST and MNIST come from ``data_dir`` (the four IDX files, gzipped or not, as
distributed) when it is given, and only from there: a missing folder or a missing file
is an error naming it, never a silent switch to another copy. Without ``data_dir``,
from the first of

1. the Debian package's folder (``apt-get install dataset-fashion-mnist`` puts
   Fashion-MNIST in ``/usr/share/datasets/fashion-mnist``);
2. tensorflow-datasets, when it is installed and the dataset is prepared or can be
   downloaded.

``Dataset.source`` says which (the folder, or "tensorflow-datasets"). Every IDX file is
checked before use: its magic number (unsigned bytes, 3 dimensions for images, 1 for
labels), its length against its header, 28x28 images, as many labels as images, and
labels in 0..9; a file that fails is a ``DataError`` (a ``ConfigError``) naming it.

Images are returned as float32 NHWC, scaled to [0, 1] and normalised with the
dataset's mean and standard deviation (per channel for CIFAR-10); labels as int32.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import zlib
from typing import Iterator

import numpy as np

from micronet_jax.app.errors import ConfigError

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
# Per-dataset pixel mean and std on the training set, for inputs in [0, 1]: one value for the
# grey sets, one per channel (R, G, B) for CIFAR-10. CIFAR-10's std is the pixels' own
# (0.247, 0.243, 0.261), not the (0.2023, 0.1994, 0.2010) that micronet and many CIFAR
# scripts copy, which is not the training set's standard deviation.
NORMALIZATION = {
    "fashion_mnist": (0.2860, 0.3530),
    "mnist": (0.1307, 0.3081),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
DATASETS = tuple(NORMALIZATION)
NUM_CLASSES = {"fashion_mnist": 10, "mnist": 10, "cifar10": 10}
IMAGE_SHAPE = {"fashion_mnist": (28, 28), "mnist": (28, 28), "cifar10": (32, 32)}
CHANNELS = {"fashion_mnist": 1, "mnist": 1, "cifar10": 3}
TFDS_ONLY = ("cifar10",)  # no IDX files and no Debian package: tensorflow-datasets is the one source
TITLES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10"}  # for messages
IDX_NDIM = {"train_images": 3, "train_labels": 1, "test_images": 3, "test_labels": 1}


class DataError(ConfigError):
  """The dataset cannot be used: no source has it (the message lists the ways to provide
  it), or a file is missing, unreadable or inconsistent (the message names it). A
  ``ConfigError``: the CLI exits with status 2."""


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
    """The dataset's class count (10), not the largest label seen: a training set that
    lacks the last class still builds the model every checkpoint of this dataset has."""
    return NUM_CLASSES[self.name] if self.name in NUM_CLASSES else int(max(self.y_train.max(), self.y_test.max())) + 1


def read_idx(path: str, ndim: int | None = None) -> np.ndarray:
  """Reads an IDX file (optionally gzipped) into a uint8 array of its stored shape.

  The magic number must announce unsigned bytes (0x0000 08 ..) and, when ``ndim`` is
  given, that many dimensions (0x00000803 for images, 0x00000801 for labels)."""
  want_ndim = ndim
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (EOFError, OSError, zlib.error) as e:  # truncated or corrupt gzip (an interrupted download)
    raise DataError(f"{path} cannot be read: {e}") from None
  if len(data) < 4:
    raise DataError(f"{path} is truncated: {len(data)} bytes, shorter than an IDX header")
  zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise DataError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()})")
  if ndim != want_ndim and want_ndim is not None:
    raise DataError(f"{path} has magic number 0x{data[:4].hex()}: {ndim} dimension(s), expected {want_ndim} "
                    f"(0x000008{want_ndim:02x})")
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


def _from_idx_dir(folder: str, name: str) -> dict[str, np.ndarray]:
  """The four checked arrays of the IDX files in ``folder``; a missing folder or file is a
  DataError naming it."""
  if not os.path.isdir(folder):
    raise DataError(f"data folder {folder} " + ("is not a folder" if os.path.exists(folder) else "does not exist"))
  paths = {k: _find(folder, v) for k, v in IDX_FILES.items()}
  missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
  if missing:
    raise DataError(f"data folder {folder} is incomplete: {', '.join(missing)} (or .gz) "
                    f"{'is' if len(missing) == 1 else 'are'} not there; it needs all four of "
                    f"{', '.join(IDX_FILES.values())}")
  raw = {k: read_idx(p, IDX_NDIM[k]) for k, p in paths.items()}
  check_arrays(raw, name, paths)
  return raw


def check_arrays(raw: dict[str, np.ndarray], name: str, where: dict[str, str] | None = None) -> None:
  """Checks the four raw arrays of ``name``: (N, 28, 28) images ((N, 32, 32, 3) for
  CIFAR-10), (N,) labels, as many labels as images, labels in 0..NUM_CLASSES-1, at least
  one example per split. ``where`` names each array's file for the message."""
  where = where or {k: f"{name} {k.replace('_', ' ')}" for k in IDX_FILES}
  h, w = IMAGE_SHAPE[name]
  c = CHANNELS[name]
  shape = (h, w) if c == 1 else (h, w, c)  # grey images are stored without a channel axis
  for split in ("train", "test"):
    images, labels = raw[f"{split}_images"], raw[f"{split}_labels"]
    img_file, lbl_file = where[f"{split}_images"], where[f"{split}_labels"]
    if images.ndim != 1 + len(shape) or images.shape[1:] != shape:
      raise DataError(f"{img_file} holds images of shape {images.shape[1:]}, expected "
                      f"{'x'.join(map(str, shape))} for {name}")
    if labels.ndim != 1:
      raise DataError(f"{lbl_file} holds labels of shape {labels.shape}, expected one label per image")
    if len(images) == 0:
      raise DataError(f"{img_file} holds no images")
    if len(labels) != len(images):
      raise DataError(f"{lbl_file} has {len(labels)} labels but {img_file} has {len(images)} images")
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES[name]))
    if bad.size:
      raise DataError(f"{lbl_file} has label {int(labels[bad[0]])} at index {int(bad[0])} ({bad.size} out of range); "
                      f"{name} labels are 0..{NUM_CLASSES[name] - 1}")


def _from_tfds(name: str) -> dict[str, np.ndarray]:
  import tensorflow_datasets as tfds  # optional dependency

  out = {}
  for split in ("train", "test"):
    ds = tfds.data_source(name, split=split)
    records = [ds[i] for i in range(len(ds))]
    out[f"{split}_images"] = np.stack([r["image"] for r in records])[..., 0]
    out[f"{split}_labels"] = np.array([r["label"] for r in records])
  return out


# tensorflow-datasets does not depend on TensorFlow, yet encodes CIFAR-10's images with it when
# preparing and reads them back through tf.data: our tfds extra installs both.
NEEDS_TF = ('tensorflow-datasets also needs TensorFlow for CIFAR-10: pip install -e ".[tfds]" installs both, '
            "or pip install tensorflow")
TFDS_OFFLINE_HINT = (
    "To provide it, prepare it with tensorflow-datasets on a machine that is online:\n"
    "  python -c \"import tensorflow_datasets as tfds; "
    "tfds.builder('{name}', data_dir='DIR').download_and_prepare()\"\n"
    "then copy DIR to this machine and pass --data-dir DIR.")


def _from_tfds_arrays(name: str, data_dir: str | None) -> dict[str, np.ndarray]:
  """The four raw arrays of ``name`` (CIFAR-10) through tensorflow-datasets, prepared in
  ``data_dir`` (tfds's own default, ~/tensorflow_datasets, when None).

  What ``tfds.load(name, batch_size=-1, as_supervised=True)`` does, in its two steps, so
  that a failure to download or prepare (offline, as a rule) is told apart from one to
  read what is prepared. Each is a DataError that says which, with tfds's own words."""
  try:
    import tensorflow_datasets as tfds  # optional dependency
  except ImportError:
    raise DataError(f"{TITLES[name]} is loaded through tensorflow-datasets, which is not installed: "
                    f'pip install -e ".[tfds]" ({NEEDS_TF})') from None
  title = TITLES[name]
  where = data_dir or "tensorflow-datasets' default data dir ($TFDS_DATA_DIR, else ~/tensorflow_datasets)"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare()  # a no-op where it is prepared already
  except ImportError as e:  # a module tfds needs (TensorFlow, to encode the images), not the network
    raise DataError(f"tensorflow-datasets could not prepare {title}: {_one_line(e)} ({NEEDS_TF})") from None
  except Exception as e:  # tfds wraps the network's errors in its own types; any failure here is the download's
    raise DataError(
        f"{title} could not be downloaded: it is not prepared in {where} and tensorflow-datasets could not "
        "fetch it; this machine looks offline (no network).\n"
        f"  tensorflow-datasets said: {_one_line(e)}\n" + TFDS_OFFLINE_HINT.format(name=name)) from None
  out = {}
  try:
    for split in ("train", "test"):
      images, labels = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
      out[f"{split}_images"], out[f"{split}_labels"] = np.asarray(images), np.asarray(labels)
  except ImportError as e:
    raise DataError(f"tensorflow-datasets could not read {title}: {_one_line(e)} ({NEEDS_TF})") from None
  except Exception as e:  # prepared, but unreadable: a truncated or foreign copy
    raise DataError(f"{title} is prepared in {where} but could not be read: {_one_line(e)}") from None
  return out


def _one_line(e: BaseException) -> str:
  """``Type: first line of the message`` (at most 200 characters): tfds's errors run to pages."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def normalize(images: np.ndarray, name: str) -> np.ndarray:
  """uint8 (N, H, W) or (N, H, W, C) -> float32 NHWC, (x / 255 - mean) / std, with one
  (mean, std) for the grey sets and one per channel (the last axis) for CIFAR-10."""
  mean, std = NORMALIZATION[name]
  x = images.astype(np.float32) / 255.0
  if x.ndim == 3:
    x = x[..., None]
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def load(name: str, data_dir: str | None = None) -> Dataset:
  """Loads ``name`` ("fashion_mnist" or "mnist") from ``data_dir`` (only from there when
  it is given), else from the first source that has it; "cifar10" through
  tensorflow-datasets, with ``data_dir`` as tfds's data_dir (see the module docstring)."""
  if name not in NORMALIZATION:
    raise DataError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
  if name in TFDS_ONLY:
    raw = _from_tfds_arrays(name, data_dir)
    check_arrays(raw, name)
    source = "tensorflow-datasets" + (f" ({data_dir})" if data_dir else "")
  elif data_dir is not None:  # what the user named, or nothing: never a silent fallback
    raw, source = _from_idx_dir(data_dir, name), data_dir
  else:
    raw, source = _default_source(name)
  return Dataset(
      name=name,
      x_train=normalize(raw["train_images"], name),
      y_train=raw["train_labels"].astype(np.int32),
      x_test=normalize(raw["test_images"], name),
      y_test=raw["test_labels"].astype(np.int32),
      source=source,
  )


def _default_source(name: str) -> tuple[dict[str, np.ndarray], str]:
  """(raw arrays, source) from the system folder or tensorflow-datasets. A system folder
  that has all four files is used (and a bad file in it is an error, not a reason to
  look elsewhere); an absent or incomplete one is reported among what was tried."""
  folder, tried = SYSTEM_DIRS[name], []
  if all(_find(folder, stem) for stem in IDX_FILES.values()):
    return _from_idx_dir(folder, name), folder
  tried.append(f"{folder}: " + ("incomplete (not all four IDX files)" if os.path.isdir(folder) else "not found"))
  try:
    raw = _from_tfds(name)
  except ImportError:
    tried.append("tensorflow-datasets: not installed")
  except Exception as e:  # offline, not prepared, ...
    tried.append(f"tensorflow-datasets: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
  else:
    check_arrays(raw, name)
    return raw, "tensorflow-datasets"
  debian = name.replace("_", "-")
  raise DataError(
      f"could not load {name}. Tried:\n  " + "\n  ".join(tried) + "\nProvide it one of three ways:\n"
      f"  1. --data-dir DIR with {', '.join(IDX_FILES.values())} (optionally .gz)\n"
      f"  2. apt-get install -y dataset-{debian}   (installs {SYSTEM_DIRS[name]})\n"
      f"  3. pip install tensorflow-datasets, online, so that tfds can download {name}"
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
