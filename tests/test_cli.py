"""The ``micronet-jax`` command: help, bad values (exit status 2, one error line, no
traceback), missing data, and short runs that write a run directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import make_idx_dir, run_cli

PREFIX = "micronet-jax train: error: "



def error_line(err: str) -> str:
  """The one line of stderr that reports the error; no traceback anywhere."""
  assert "Traceback" not in err
  lines = [line for line in err.splitlines() if "error:" in line]
  assert len(lines) == 1, err
  return lines[0]


def test_train_help(capsys):
  rc, out, err = run_cli(capsys, "train", "--help")
  assert rc == 0 and err == ""
  for flag in ("--w-bits", "--a-bits", "--quant", "--model", "--data-dir", "--limit-train", "--no-progress"):
    assert flag in out, flag
  assert "dorefa" in out and "iao" in out and "2..16" in out


def test_no_command_is_a_usage_error(capsys):
  rc, _, err = run_cli(capsys)
  assert rc == 2
  assert "required: COMMAND" in error_line(err)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--w-bits", 1], "w_bits must be in 2..16, or 32 for float; got 1"),
        (["--w-bits", 17], "w_bits must be in 2..16, or 32 for float; got 17"),
        (["--a-bits", 0], "a_bits must be in 2..16, or 32 for float; got 0"),
        (["--epochs", 0], "epochs must be at least 1, got 0"),
        (["--batch-size", -4], "batch_size must be at least 1, got -4"),
        (["--lr", 0], "lr must be > 0, got 0.0"),
        (["--weight-decay", -0.1], "weight_decay must be >= 0, got -0.1"),
        # until f34231f: 0 crashed in Dataset.num_classes, a negative N silently dropped the last N
        (["--limit-train", 0], "limit_train must be at least 1, got 0"),
        (["--limit-train", -5], "limit_train must be at least 1, got -5"),
        (["--limit-test", 0], "limit_test must be at least 1, got 0"),
    ],
    ids=["w-bits-1", "w-bits-17", "a-bits-0", "epochs-0", "batch-size-neg", "lr-0", "wd-neg",
         "limit-train-0", "limit-train-neg", "limit-test-0"],
)
def test_bad_values_exit_2(capsys, tmp_path, no_data_sources, args, message):
  out_dir = tmp_path / "run"
  rc, out, err = run_cli(capsys, "train", *args, "--out", out_dir, "--no-progress")
  assert rc == 2
  assert err.strip() == PREFIX + message  # exactly one line
  assert out == ""
  assert not out_dir.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quant", "foo"], "argument --quant: invalid choice: 'foo'"),
        (["--model", "foo"], "argument --model: invalid choice: 'foo'"),
        (["--dataset", "svhn"], "argument --dataset: invalid choice: 'svhn'"),
        (["--w-bits", "eight"], "argument --w-bits: invalid int value: 'eight'"),
        (["--lr-schedule", "step"], "argument --lr-schedule: invalid choice: 'step'"),
    ],
    ids=["quant", "model", "dataset", "w-bits-not-int", "lr-schedule"],
)
def test_bad_choices_exit_2(capsys, tmp_path, no_data_sources, args, message):
  rc, out, err = run_cli(capsys, "train", *args, "--out", tmp_path / "run")
  assert rc == 2 and out == ""
  line = error_line(err)
  assert line.startswith(PREFIX) and message in line
  assert err.startswith("usage: micronet-jax train")


def test_missing_data_exit_2(capsys, tmp_path, no_data_sources):
  out_dir = tmp_path / "run"
  rc, out, err = run_cli(capsys, "train", "--data-dir", "/nonexistent", "--out", out_dir, "--no-progress")
  assert rc == 2 and out == ""
  # a --data-dir that is not there is an error naming it, never a fallback to another copy
  assert error_line(err) == PREFIX + "data folder /nonexistent does not exist"
  assert not out_dir.exists()
  rc, out, err = run_cli(capsys, "train", "--out", out_dir, "--no-progress")  # no source at all
  assert rc == 2 and out == ""
  assert error_line(err) == PREFIX + "could not load fashion_mnist. Tried:"
  assert "tensorflow-datasets: not installed" in err
  assert "--data-dir DIR" in err
  assert "apt-get install -y dataset-fashion-mnist" in err
  assert "pip install tensorflow-datasets" in err
  assert not out_dir.exists()


def test_run_on_synthetic_data_dir(capsys, tmp_path, no_data_sources):
  folder = tmp_path / "idx"
  make_idx_dir(folder, n_train=48, n_test=20, gz=True)
  out_dir = tmp_path / "run"
  rc, out, err = run_cli(
      capsys, "train", "--data-dir", folder, "--quant", "float", "--epochs", 1, "--batch-size", 16,
      "--eval-batch-size", 8, "--out", out_dir, "--no-progress",
  )
  assert rc == 0, err
  assert "| float | 1 |" in out and f"wrote {out_dir}/metrics.json" in out
  with open(out_dir / "metrics.json") as f:
    m = json.load(f)
  assert m["config"]["data_dir"] == str(folder) and m["config"]["quant"] == "float"
  assert m["history"][0]["epoch"] == 1 and 0.0 <= m["test_accuracy"] <= 1.0
  assert os.path.isdir(out_dir / "checkpoint")


def test_batch_larger_than_training_set_exit_2(capsys, tmp_path, no_data_sources):
  # Regression: until f34231f train_batches' ValueError escaped from main() as a traceback.
  folder = tmp_path / "idx"
  make_idx_dir(folder, n_train=48, n_test=20)
  out_dir = tmp_path / "run"
  rc, out, err = run_cli(capsys, "train", "--data-dir", folder, "--batch-size", 64, "--epochs", 1,
                         "--out", out_dir, "--no-progress")
  assert rc == 2
  assert error_line(err) == PREFIX + "batch size 64 is larger than the training set (48 examples)"
  assert not out_dir.exists()


@pytest.mark.realdata
def test_tiny_dorefa_run(capsys, tmp_path, fashion_mnist_dir):
  out_dir = tmp_path / "tmp"
  rc, out, err = run_cli(
      capsys, "train", "--quant", "dorefa", "--w-bits", 4, "--a-bits", 4, "--epochs", 1,
      "--limit-train", 512, "--limit-test", 256, "--batch-size", 128, "--out", out_dir, "--no-progress",
  )
  assert rc == 0, err
  assert "| dorefa W4A4 | 1 |" in out
  assert f"wrote {out_dir}/metrics.json and {out_dir}/checkpoint" in out
  with open(out_dir / "metrics.json") as f:
    m = json.load(f)
  assert m["config"]["w_bits"] == 4 and m["config"]["a_bits"] == 4 and m["config"]["quant"] == "dorefa"
  assert m["config"]["limit_train"] == 512 and m["config"]["limit_test"] == 256
  assert m["label"] == "dorefa W4A4" and m["epochs"] == 1
  assert 0.0 <= m["test_accuracy"] <= 1.0
  assert os.path.isdir(out_dir / "checkpoint") and os.path.isfile(out_dir / "config.json")


def _console_script():
  exe = shutil.which("micronet-jax")
  if exe is None:
    pytest.skip("micronet-jax console script not on PATH (pip install -e . to get it)")
  return exe


def test_console_script_help():
  r = subprocess.run([_console_script(), "--help"], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("usage: micronet-jax")
  assert "train" in r.stdout


def test_console_script_bad_value_exit_status():
  # main() returns 2; the entry point must turn that into the process's exit status.
  r = subprocess.run([_console_script(), "train", "--w-bits", "1"], capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip() == PREFIX + "w_bits must be in 2..16, or 32 for float; got 1"
