"""micronet_jax.app.data: IDX reading, the three sources of ``load``, normalisation, batching."""

from __future__ import annotations

import gzip
import os
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from micronet_jax.app import data
from conftest import idx_bytes, make_idx_dir, write_idx

# ----------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (5, 28, 28), (3, 4, 5, 2)])
def test_read_idx_round_trip(tmp_path, suffix, shape):
  arr = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
  path = write_idx(str(tmp_path / f"a-idx{suffix}"), arr)
  with (gzip.open if suffix else open)(path, "rb") as f:
    head = f.read(4 + 4 * len(shape))
  assert head == struct.pack(">HBB", 0, 8, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
  out = data.read_idx(path)
  assert out.dtype == np.uint8
  assert out.shape == shape
  np.testing.assert_array_equal(out, arr)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(0, 6), min_size=1, max_size=4).map(tuple),
    gz=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_read_idx_round_trip_any_shape(shape, gz, seed):
  arr = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  with tempfile.TemporaryDirectory() as d:
    out = data.read_idx(write_idx(os.path.join(d, "x" + (".gz" if gz else "")), arr))
  assert out.shape == shape
  np.testing.assert_array_equal(out, arr)


def _write_bytes(tmp_path, name, payload, gz=False):
  path = tmp_path / (name + (".gz" if gz else ""))
  path.write_bytes(gzip.compress(payload) if gz else payload)
  return str(path)


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x00\x01" + GOOD[2:], "not an unsigned-byte IDX file"),  # magic must start 0x0000
        (GOOD[:2] + b"\x0d" + GOOD[3:], "not an unsigned-byte IDX file"),  # 0x0D: float32 data
        (GOOD[:-1], "truncated"),  # one data byte missing
        (GOOD[:16] , "truncated"),  # header only
        (GOOD + b"\x00", "header says"),  # one byte too many
        (GOOD[:3] + b"\x02" + GOOD[4:], "header says"),  # ndim 2: the dims disagree with the data
    ],
    ids=["magic", "dtype", "short-by-one", "header-only", "extra-byte", "wrong-ndim"],
)
def test_read_idx_bad_files_raise_data_error(tmp_path, payload, message, gz):
  path = _write_bytes(tmp_path, "bad-idx", payload, gz)
  with pytest.raises(data.DataError, match=message) as e:
    data.read_idx(path)
  assert path in str(e.value)


# Regression tests: until f34231f these escaped as struct.error / EOFError / BadGzipFile, and
# `micronet-jax train --data-dir` died with a traceback instead of exit status 2.
@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "shorter than an IDX header"),
        (b"\x00\x00", "shorter than an IDX header"),
        (GOOD[:8], "truncated inside its header"),  # ndim 3 announced, one dimension word present
    ],
    ids=["empty", "2-bytes", "cut-in-dims"],
)
def test_read_idx_header_truncated_raises_data_error(tmp_path, payload, message):
  with pytest.raises(data.DataError, match=message):
    data.read_idx(_write_bytes(tmp_path, "cut-idx", payload))


def test_read_idx_truncated_gzip_raises_data_error(tmp_path):
  arr = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
  path = tmp_path / "cut-idx.gz"
  path.write_bytes(gzip.compress(idx_bytes(arr))[:-100])  # an interrupted download
  with pytest.raises(data.DataError, match="cannot be read"):
    data.read_idx(str(path))


def test_read_idx_not_gzip_raises_data_error(tmp_path):
  path = tmp_path / "plain-idx.gz"
  path.write_bytes(GOOD)  # named .gz, stored raw
  with pytest.raises(data.DataError, match="cannot be read"):
    data.read_idx(str(path))


# ----------------------------------------------------------------------------- load


def test_load_from_data_dir_normalises(synthetic_idx_dir, no_data_sources):
  folder, raw = synthetic_idx_dir
  ds = data.load("fashion_mnist", data_dir=folder)
  assert ds.source == folder
  assert ds.name == "fashion_mnist"
  mean, std = data.NORMALIZATION["fashion_mnist"]
  for split in ("train", "test"):
    x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
    images, labels = raw[f"{split}_images"], raw[f"{split}_labels"]
    assert x.dtype == np.float32 and x.shape == (*images.shape, 1)  # NHWC, one channel
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, labels)
    expected = (images.astype(np.float64) / 255.0 - mean) / std
    np.testing.assert_allclose(x[..., 0], expected, rtol=1e-5, atol=1e-6)
  assert ds.num_classes == 10
  # 0 and 255 map to the ends of the normalised range.
  assert x.min() == pytest.approx(-mean / std, rel=1e-6)
  assert x.max() == pytest.approx((1 - mean) / std, rel=1e-6)


def test_load_mnist_uses_its_own_statistics(tmp_path, no_data_sources):
  raw = make_idx_dir(tmp_path / "m", gz=True, seed=3)
  ds = data.load("mnist", data_dir=str(tmp_path / "m"))
  mean, std = data.NORMALIZATION["mnist"]
  np.testing.assert_allclose(ds.x_train[..., 0], (raw["train_images"] / 255.0 - mean) / std, rtol=1e-5, atol=1e-6)


def test_load_mixed_gz_and_raw_files(tmp_path, no_data_sources):
  raw = make_idx_dir(tmp_path, gz=False, seed=5)
  stem = data.IDX_FILES["test_images"]
  write_idx(str(tmp_path / (stem + ".gz")), raw["test_images"])
  os.remove(tmp_path / stem)
  ds = data.load("fashion_mnist", data_dir=str(tmp_path))
  assert ds.x_test.shape == (20, 28, 28, 1)


def test_load_falls_back_to_system_dir(tmp_path, monkeypatch):
  make_idx_dir(tmp_path / "sys", gz=True, n_train=12, n_test=11)
  monkeypatch.setattr(data, "SYSTEM_DIRS", {"fashion_mnist": str(tmp_path / "sys"), "mnist": "/nonexistent"})
  ds = data.load("fashion_mnist")  # no --data-dir: the system folder (a given one is never replaced)
  assert ds.source == str(tmp_path / "sys")
  assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (11, 28, 28, 1)


@pytest.mark.parametrize("name, debian", [("fashion_mnist", "dataset-fashion-mnist"), ("mnist", "dataset-mnist")])
def test_load_without_any_source_lists_the_three_ways(tmp_path, no_data_sources, name, debian):
  with pytest.raises(data.DataError) as e:
    data.load(name)
  msg = str(e.value)
  # what was tried, and why each failed
  assert f"{no_data_sources}/{name}: not found" in msg
  assert "tensorflow-datasets: not installed" in msg
  # the three ways to provide the data
  assert "1. --data-dir DIR" in msg
  assert all(stem in msg for stem in data.IDX_FILES.values())
  assert f"2. apt-get install -y {debian}" in msg
  assert "3. pip install tensorflow-datasets" in msg


def test_load_only_three_of_four_files_is_missing_data(tmp_path, no_data_sources):
  make_idx_dir(tmp_path)
  os.remove(tmp_path / data.IDX_FILES["test_labels"])
  with pytest.raises(data.DataError, match=f"data folder {tmp_path} is incomplete: t10k-labels-idx1-ubyte"):
    data.load("fashion_mnist", data_dir=str(tmp_path))


def test_load_unknown_dataset():
  with pytest.raises(data.DataError, match="unknown dataset 'svhn'"):
    data.load("svhn")


def test_subset(synthetic_idx_dir):
  ds = data.load("fashion_mnist", synthetic_idx_dir[0])
  small = data.subset(ds, 5, 3)
  np.testing.assert_array_equal(small.x_train, ds.x_train[:5])
  np.testing.assert_array_equal(small.y_test, ds.y_test[:3])
  assert data.subset(ds).x_train.shape == ds.x_train.shape


@pytest.mark.realdata
def test_real_fashion_mnist_small(fashion_mnist_small, fashion_mnist_dir):
  ds = fashion_mnist_small
  assert ds.source == fashion_mnist_dir
  assert ds.x_train.shape == (2000, 28, 28, 1) and ds.x_test.shape == (1000, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert set(np.unique(ds.y_train)) == set(range(10)) and ds.num_classes == 10
  # normalised with the training-set statistics: about zero mean, unit std
  assert abs(float(ds.x_train.mean())) < 0.05
  assert abs(float(ds.x_train.std()) - 1.0) < 0.05


# ----------------------------------------------------------------------------- batching


def test_train_batches_drop_remainder_and_permute():
  n, bs = 103, 10
  x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  y = np.arange(n, dtype=np.int32)
  batches = list(data.train_batches(x, y, bs, seed=7))
  assert len(batches) == n // bs
  assert all(xb.shape == (bs, 3) and yb.shape == (bs,) for xb, yb in batches)
  seen = np.concatenate([yb for _, yb in batches])
  assert len(np.unique(seen)) == len(seen) == 100  # no repeats, 3 examples dropped
  assert set(seen) <= set(range(n))
  for xb, yb in batches:  # images stay with their labels
    np.testing.assert_array_equal(xb[:, 0], yb.astype(np.float32))
  assert not np.array_equal(seen, np.arange(100))  # shuffled


def test_train_batches_deterministic_per_seed():
  x, y = np.zeros((64, 2), np.float32), np.arange(64, dtype=np.int32)
  order = lambda seed: np.concatenate([yb for _, yb in data.train_batches(x, y, 16, seed)])
  np.testing.assert_array_equal(order(3), order(3))
  assert not np.array_equal(order(3), order(4))
  assert sorted(order(3)) == list(range(64))  # exact multiple: every example once


def test_train_batches_batch_larger_than_data():
  with pytest.raises(ValueError, match="larger than the training set"):
    next(data.train_batches(np.zeros((5, 1)), np.zeros(5), 6, seed=0))


def test_eval_batches_pad_with_zero_mask():
  n, bs = 23, 10
  x = np.arange(1, n + 1, dtype=np.float32).reshape(n, 1, 1, 1)
  y = np.arange(1, n + 1, dtype=np.int32)
  batches = list(data.eval_batches(x, y, bs))
  assert len(batches) == 3
  assert all(xb.shape == (bs, 1, 1, 1) and yb.shape == (bs,) and m.shape == (bs,) for xb, yb, m in batches)
  assert all(m.dtype == np.float32 for _, _, m in batches)
  np.testing.assert_array_equal(batches[0][2], np.ones(bs))
  np.testing.assert_array_equal(batches[2][2], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(batches[2][0][3:], 0)
  np.testing.assert_array_equal(batches[2][1][3:], 0)
  # in order, nothing lost
  kept = np.concatenate([yb[m > 0] for _, yb, m in batches])
  np.testing.assert_array_equal(kept, y)
  np.testing.assert_array_equal(np.concatenate([xb for xb, _, _ in batches])[:n], x)


def test_eval_batches_exact_multiple_has_no_padding():
  batches = list(data.eval_batches(np.ones((20, 2)), np.ones(20, np.int32), 10))
  assert len(batches) == 2 and all(m.sum() == 10 for _, _, m in batches)
