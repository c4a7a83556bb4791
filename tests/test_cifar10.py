"""CIFAR-10 through tensorflow-datasets, with no network and no real tfds: a fake
``tensorflow_datasets`` module in ``sys.modules`` hands back small deterministic arrays,
or fails its download the way an offline machine does, or is missing. Values checked:
shapes, dtypes, one normalised pixel per channel, labels; the offline and missing-tfds
messages through ``data.load``, ``micronet-jax train`` and ``micronet-jax table`` (exit
status 2, no traceback); one real LeNet epoch on the fake data."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest

from conftest import run_cli
from micronet_jax.app import data

N_TRAIN, N_TEST = 64, 32
# What getaddrinfo says on a machine without DNS: the text the offline message must carry.
DNS_FAILURE = "Failed to resolve 'www.cs.toronto.edu' ([Errno -3] Temporary failure in name resolution)"


def fake_split(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
  """(n, 32, 32, 3) uint8 images counting up from ``offset`` mod 256, labels 0..9 cycling
  (int64, as tfds gives them): every value is known without storing it."""
  images = ((np.arange(n * 32 * 32 * 3) + offset) % 256).astype(np.uint8).reshape(n, 32, 32, 3)
  return images, (np.arange(n) % 10).astype(np.int64)


class FakeBuilder:
  def __init__(self, tfds: FakeTfds, name: str, data_dir: str | None):
    self.tfds, self.name, self.data_dir = tfds, name, data_dir

  def download_and_prepare(self) -> None:
    self.tfds.calls.append(("download_and_prepare", self.name, self.data_dir))
    if self.tfds.offline:
      raise ConnectionError(DNS_FAILURE + "\nand a second line that must not reach the message")

  def as_dataset(self, split: str, batch_size: int, as_supervised: bool):
    self.tfds.calls.append(("as_dataset", split, batch_size, as_supervised))
    return fake_split(N_TRAIN, 0) if split == "train" else fake_split(N_TEST, 7)


class FakeTfds(types.ModuleType):
  """The part of tensorflow_datasets that ``data`` uses: builder(), as_numpy()."""

  def __init__(self, offline: bool = False):
    super().__init__("tensorflow_datasets")
    self.offline, self.calls = offline, []

  def builder(self, name: str, data_dir: str | None = None) -> FakeBuilder:
    return FakeBuilder(self, name, data_dir)

  def as_numpy(self, x):  # the fake's datasets are numpy already
    return x


@pytest.fixture
def online(monkeypatch) -> FakeTfds:
  fake = FakeTfds()
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  return fake


@pytest.fixture
def offline(monkeypatch) -> FakeTfds:
  fake = FakeTfds(offline=True)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  return fake


def assert_offline_message(text: str) -> None:
  assert "CIFAR-10 could not be downloaded" in text
  assert "this machine looks offline (no network)" in text
  assert f"ConnectionError: {DNS_FAILURE}" in text  # tfds's words, its first line only
  assert "a second line" not in text
  assert "download_and_prepare()" in text and "--data-dir DIR" in text  # how to provide it
  assert "Traceback" not in text


def test_load_cifar10_shapes_dtypes_values(online, tmp_path):
  ds = data.load("cifar10", data_dir=str(tmp_path))
  assert ds.x_train.shape == (N_TRAIN, 32, 32, 3) and ds.x_test.shape == (N_TEST, 32, 32, 3)
  assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
  assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
  np.testing.assert_array_equal(ds.y_train, np.arange(N_TRAIN) % 10)
  np.testing.assert_array_equal(ds.y_test, np.arange(N_TEST) % 10)
  assert ds.num_classes == 10
  # Pixel (1, 2, 3) of train image 1: flat index ((1*32 + 2)*32 + 3)*3 + c = 3273 + c -> 201, 202, 203;
  # each channel normalised with its own CIFAR-10 mean and std.
  for c, (mean, std) in enumerate(zip((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))):
    assert ds.x_train[1, 2, 3, c] == pytest.approx(((201 + c) / 255 - mean) / std, abs=1e-6)
  # Test pixel (0, 0, 0) counts from 7: 7, 8, 9.
  assert ds.x_test[0, 0, 0, 0] == pytest.approx((7 / 255 - 0.4914) / 0.2470, abs=1e-6)
  # --data-dir is tfds's data_dir; the whole split in one batch, as (image, label)
  assert online.calls[0] == ("download_and_prepare", "cifar10", str(tmp_path))
  assert ("as_dataset", "train", -1, True) in online.calls and ("as_dataset", "test", -1, True) in online.calls
  assert ds.source == f"tensorflow-datasets ({tmp_path})"
  assert data.load("cifar10").source == "tensorflow-datasets"


def test_load_cifar10_offline_says_so(offline):
  with pytest.raises(data.DataError) as e:
    data.load("cifar10")
  assert_offline_message(str(e.value))
  assert "~/tensorflow_datasets" in str(e.value)  # where tfds looked, without --data-dir


def test_load_cifar10_without_tfds_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
  with pytest.raises(data.DataError, match=r'tensorflow-datasets, which is not installed: pip install -e "\.\[tfds\]"'):
    data.load("cifar10")


def test_load_cifar10_without_tensorflow_is_not_called_offline(online, monkeypatch):
  # tfds imports TensorFlow lazily, when it first encodes an image: a missing module, not a missing network
  def prepare(self):
    raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

  monkeypatch.setattr(FakeBuilder, "download_and_prepare", prepare)
  with pytest.raises(data.DataError) as e:
    data.load("cifar10")
  text = str(e.value)
  assert text.startswith("tensorflow-datasets could not prepare CIFAR-10: ModuleNotFoundError: No module named")
  assert "pip install tensorflow" in text and "offline" not in text


def test_load_cifar10_bad_arrays_are_an_error(online, monkeypatch):
  monkeypatch.setattr(FakeBuilder, "as_dataset", lambda self, split, batch_size, as_supervised:
                      (np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.int64)))
  with pytest.raises(data.DataError, match=r"holds images of shape \(28, 28\), expected 32x32x3 for cifar10"):
    data.load("cifar10")


def test_train_cifar10_offline_exits_2(capsys, tmp_path, offline):
  out_dir = tmp_path / "run"
  rc, out, err = run_cli(capsys, "train", "--dataset", "cifar10", "--out", out_dir, "--no-progress")
  assert rc == 2 and out == ""
  assert err.startswith("micronet-jax train: error: CIFAR-10 could not be downloaded")
  assert_offline_message(err)
  assert not out_dir.exists()


def test_table_cifar10_offline_exits_2(capsys, tmp_path, offline):
  results = tmp_path / "results"
  rc, out, err = run_cli(capsys, "table", "--dataset", "cifar10", "--rows", "lenet-float",
                         "--runs-dir", tmp_path / "runs", "--results-dir", results)
  assert rc == 2
  assert "micronet-jax table: error: CIFAR-10 could not be downloaded" in err
  assert_offline_message(err)
  assert not results.exists()  # no table written from nothing


def test_train_lenet_one_epoch_on_fake_cifar10(capsys, tmp_path, online):
  out_dir = tmp_path / "run"
  rc, out, err = run_cli(capsys, "train", "--dataset", "cifar10", "--model", "lenet", "--quant", "float",
                         "--epochs", 1, "--batch-size", 16, "--eval-batch-size", 16, "--out", out_dir,
                         "--no-progress")
  assert rc == 0, err
  assert f"wrote {out_dir}/metrics.json" in out
  with open(out_dir / "metrics.json") as f:
    m = json.load(f)
  assert m["config"]["dataset"] == "cifar10" and m["data_source"] == "tensorflow-datasets"
  epoch = m["history"][0]
  assert epoch["epoch"] == 1 and math.isfinite(epoch["train_loss"]) and math.isfinite(epoch["test_loss"])
  assert 0.0 <= m["test_accuracy"] <= 1.0
