"""Reliability, data files: a --data-dir that is missing or incomplete, and corrupt,
truncated or mismatched IDX files, are one clear error naming the folder or file (exit
status 2 from the CLI, no run directory); the source used is recorded."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from micronet_jax.app import data
from micronet_jax.app.errors import ConfigError
from conftest import idx_bytes, make_idx_dir, run_cli, write_idx

STEMS = data.IDX_FILES



def load_error(folder) -> str:
  with pytest.raises(data.DataError) as e:
    data.load("fashion_mnist", data_dir=str(folder))
  return str(e.value)


def test_data_error_is_a_config_error():
  assert issubclass(data.DataError, ConfigError)


# ----------------------------------------------------------------------------- the folder


def test_missing_data_dir_is_an_error_even_with_a_system_copy(tmp_path, monkeypatch):
  make_idx_dir(tmp_path / "sys")
  monkeypatch.setattr(data, "SYSTEM_DIRS", {"fashion_mnist": str(tmp_path / "sys"), "mnist": "/nonexistent"})
  assert load_error(tmp_path / "nope") == f"data folder {tmp_path / 'nope'} does not exist"
  assert data.load("fashion_mnist").source == str(tmp_path / "sys")  # without --data-dir: the system folder


def test_data_dir_that_is_a_file(tmp_path, no_data_sources):
  (tmp_path / "f").write_text("x")
  assert load_error(tmp_path / "f") == f"data folder {tmp_path / 'f'} is not a folder"


@pytest.mark.parametrize("missing", [["test_labels"], ["train_images", "test_images"]])
def test_incomplete_data_dir_names_the_missing_files(tmp_path, no_data_sources, missing):
  make_idx_dir(tmp_path, gz=True)
  for k in missing:
    os.remove(tmp_path / (STEMS[k] + ".gz"))
  names = ", ".join(STEMS[k] for k in STEMS if k in missing)
  msg = load_error(tmp_path)
  assert msg.startswith(f"data folder {tmp_path} is incomplete: {names} (or .gz) ")
  assert all(stem in msg for stem in STEMS.values())


def test_bad_system_folder_file_is_an_error_not_a_fallback(tmp_path, monkeypatch):
  make_idx_dir(tmp_path / "sys")
  monkeypatch.setattr(data, "SYSTEM_DIRS", {"fashion_mnist": str(tmp_path / "sys"), "mnist": "/nonexistent"})
  path = tmp_path / "sys" / STEMS["test_labels"]
  path.write_bytes(path.read_bytes()[:-3])
  with pytest.raises(data.DataError, match=f"{path} is truncated"):
    data.load("fashion_mnist")


# ----------------------------------------------------------------------------- one bad file


def _replace(folder, key, arr=None, payload=None, gz=False):
  """Replace the ``key`` file of an IDX folder by ``arr`` (IDX-encoded) or raw ``payload``."""
  path = os.path.join(folder, STEMS[key] + (".gz" if gz else ""))
  if arr is not None:
    write_idx(path, arr)
  else:
    with open(path, "wb") as f:
      f.write(payload)
  return path


def test_fewer_labels_than_images(tmp_path, no_data_sources):
  raw = make_idx_dir(tmp_path, n_train=48, n_test=20)
  _replace(tmp_path, "train_labels", raw["train_labels"][:47])
  assert load_error(tmp_path) == (f"{tmp_path / STEMS['train_labels']} has 47 labels but "
                                  f"{tmp_path / STEMS['train_images']} has 48 images")


@pytest.mark.parametrize("label", [10, 255])
def test_label_out_of_range(tmp_path, no_data_sources, label):
  raw = make_idx_dir(tmp_path, n_test=20)
  labels = raw["test_labels"].copy()
  labels[[13, 17]] = label
  path = _replace(tmp_path, "test_labels", labels)
  assert load_error(tmp_path) == (f"{path} has label {label} at index 13 (2 out of range); "
                                  "fashion_mnist labels are 0..9")


@pytest.mark.parametrize("shape", [(20, 32, 32), (20, 28, 27), (20, 784)])
def test_image_shape_checked(tmp_path, no_data_sources, shape):
  make_idx_dir(tmp_path, n_test=20)
  images = np.zeros(shape, np.uint8)
  if len(shape) == 3:
    path = _replace(tmp_path, "test_images", images)
    assert load_error(tmp_path) == f"{path} holds images of shape {shape[1:]}, expected 28x28 for fashion_mnist"
  else:  # a flat (N, 784) file: its magic number says 2 dimensions
    path = _replace(tmp_path, "test_images", images)
    assert load_error(tmp_path) == (f"{path} has magic number 0x00000802: 2 dimension(s), expected 3 (0x00000803)")


def test_labels_and_images_swapped(tmp_path, no_data_sources):
  raw = make_idx_dir(tmp_path)
  _replace(tmp_path, "train_labels", raw["train_images"])
  path = tmp_path / STEMS["train_labels"]
  assert load_error(tmp_path) == f"{path} has magic number 0x00000803: 3 dimension(s), expected 1 (0x00000801)"


def test_empty_split(tmp_path, no_data_sources):
  make_idx_dir(tmp_path)
  path = _replace(tmp_path, "test_images", np.zeros((0, 28, 28), np.uint8))
  _replace(tmp_path, "test_labels", np.zeros((0,), np.uint8))
  assert load_error(tmp_path) == f"{path} holds no images"


GOOD_LABELS = idx_bytes(np.arange(20, dtype=np.uint8) % 10)


@pytest.mark.parametrize(
    "payload, gz, message",
    [
        (b"", False, "is truncated: 0 bytes"),
        (b"\x00\x00\x08", False, "is truncated: 3 bytes"),
        (b"PK\x03\x04" + b"\x00" * 40, False, "is not an unsigned-byte IDX file (header 504b0304)"),
        (b"\x00\x00\x0d\x01" + GOOD_LABELS[4:], False, "is not an unsigned-byte IDX file (header 00000d01)"),
        (GOOD_LABELS[:6], False, "is truncated inside its header"),
        (GOOD_LABELS[:-1], False, "is truncated: header says (20,), found 19 bytes"),
        (GOOD_LABELS + b"\x00", False, "is truncated: header says (20,), found 21 bytes"),
        (gzip.compress(GOOD_LABELS)[:-9], True, "cannot be read"),  # an interrupted download
        (GOOD_LABELS, True, "cannot be read"),  # named .gz, not gzipped
        (b"\x1f\x8b\x08\x00" + bytes(range(200)), True, "cannot be read"),  # gzip magic, garbage body
    ],
    ids=["empty", "3-bytes", "zip", "float-dtype", "cut-header", "short-by-1", "long-by-1", "cut-gz", "not-gz",
         "garbage-gz"],
)
def test_garbage_and_truncated_files(tmp_path, no_data_sources, payload, gz, message):
  make_idx_dir(tmp_path, n_test=20, gz=gz)
  path = _replace(tmp_path, "test_labels", payload=payload, gz=gz)
  msg = load_error(tmp_path)
  assert msg.startswith(path) and message in msg, msg


def test_corrupted_gzip_body_names_the_file(tmp_path, no_data_sources):
  raw = make_idx_dir(tmp_path, gz=True)
  blob = bytearray(gzip.compress(idx_bytes(raw["train_images"])))
  blob[len(blob) // 2] ^= 0xFF  # a flipped byte: zlib error or CRC mismatch
  path = _replace(tmp_path, "train_images", payload=bytes(blob), gz=True)
  assert load_error(tmp_path).startswith(f"{path} cannot be read: ")


def test_check_arrays_names_the_dataset_without_files():
  ok = {"train_images": np.zeros((3, 28, 28), np.uint8), "train_labels": np.zeros(3, np.uint8),
        "test_images": np.zeros((2, 28, 28), np.uint8), "test_labels": np.array([1, 12], np.uint8)}
  data.check_arrays({**ok, "test_labels": np.array([1, 9], np.uint8)}, "mnist")
  with pytest.raises(data.DataError, match=r"^mnist test labels has label 12 at index 1 \(1 out of range\)"):
    data.check_arrays(ok, "mnist")


def test_num_classes_is_the_datasets_not_the_largest_label(tmp_path, no_data_sources):
  raw = make_idx_dir(tmp_path)
  _replace(tmp_path, "train_labels", np.minimum(raw["train_labels"], 8))
  _replace(tmp_path, "test_labels", np.minimum(raw["test_labels"], 8))
  assert data.load("fashion_mnist", str(tmp_path)).num_classes == 10


# ----------------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("command", ["train", "ptq", "prune", "convert", "eval"])
def test_cli_missing_data_dir_exit_2_no_run_dir(capsys, tmp_path, no_data_sources, command):
  out = tmp_path / "out"
  argv = {"train": ["--out", out, "--no-progress"], "ptq": ["--from", tmp_path / "src", "--out", out],
          "prune": ["--from", tmp_path / "src", "--out", out], "convert": ["--from", tmp_path / "src", "--out", out],
          "eval": ["--artifact", tmp_path / "src"]}[command]
  rc, stdout, err = run_cli(capsys, command, *argv, "--data-dir", tmp_path / "nodata")
  assert rc == 2 and "Traceback" not in err
  lines = [line for line in err.splitlines() if "error:" in line]
  assert len(lines) == 1 and lines[0].startswith(f"micronet-jax {command}: error: "), err
  if command == "train":  # the others stop first at the missing --from run
    assert lines[0].endswith(f"data folder {tmp_path / 'nodata'} does not exist")
  assert not out.exists() and not os.path.exists(str(out) + ".incomplete")


def test_cli_corrupt_labels_exit_2(capsys, tmp_path, no_data_sources):
  raw = make_idx_dir(tmp_path / "idx")
  path = _replace(tmp_path / "idx", "train_labels", raw["train_labels"][:10])
  rc, stdout, err = run_cli(capsys, "train", "--data-dir", tmp_path / "idx", "--out", tmp_path / "run", "--no-progress")
  assert rc == 2 and stdout == "" and "Traceback" not in err
  assert err.strip() == f"micronet-jax train: error: {path} has 10 labels but {tmp_path / 'idx' / STEMS['train_images']} has 48 images"
  assert not (tmp_path / "run").exists() and not (tmp_path / "run.incomplete").exists()


def test_train_prints_and_records_the_data_source(capsys, tmp_path, no_data_sources):
  folder = tmp_path / "idx"
  make_idx_dir(folder, n_train=32, n_test=16, gz=True)
  rc, out, err = run_cli(capsys, "train", "--data-dir", folder, "--quant", "float", "--epochs", 1, "--batch-size", 16,
                         "--eval-batch-size", 16, "--out", tmp_path / "run", "--no-progress")
  assert rc == 0, err
  assert f"from {folder})" in out
  with open(tmp_path / "run" / "metrics.json") as f:
    assert json.load(f)["data_source"] == str(folder)
