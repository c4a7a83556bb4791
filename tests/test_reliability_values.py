"""Reliability, bad values: every non-finite or out-of-domain value of every command is
exit status 2 with one message on stderr, before any work (no run directory, not even
``OUT.incomplete``); argparse's own usage errors are status 2 without a traceback; and
``prune --percent 0`` gives back the original network."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from micronet_jax.app import pipelines, recipes, runs
from micronet_jax.app.config import ConvertConfig, EvalConfig, PruneConfig, PtqConfig, TrainConfig
from micronet_jax.app.errors import ConfigError
from conftest import make_idx_dir, run_cli



def assert_refused(capsys, tmp_path, command, *argv, message: str, quiet: bool = True) -> None:
  """``micronet-jax COMMAND ARGV --out OUT`` exits 2 with exactly ``message`` and writes
  nothing (``quiet``: prints nothing on stdout either)."""
  out_dir = tmp_path / "out"
  out_args = [] if command == "eval" else ["--out", out_dir]
  rc, out, err = run_cli(capsys, command, *argv, *out_args)
  assert rc == 2, err
  assert err.strip() == f"micronet-jax {command}: error: {message}"  # one line, no traceback
  assert out == "" or not quiet
  assert not out_dir.exists() and not os.path.exists(f"{out_dir}.incomplete")


# ----------------------------------------------------------------------------- train


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "inf"], "lr must be a finite number, got inf"),
        (["--lr", "nan"], "lr must be a finite number, got nan"),
        (["--lr", "1e400"], "lr must be a finite number, got inf"),  # overflows to inf in float()
        (["--lr=-1e-3"], "lr must be > 0, got -0.001"),
        (["--weight-decay", "nan"], "weight_decay must be a finite number, got nan"),
        (["--weight-decay", "inf"], "weight_decay must be a finite number, got inf"),
        (["--weight-decay=-inf"], "weight_decay must be a finite number, got -inf"),
        (["--sparsity", "nan"], "sparsity must be a finite number, got nan"),
        (["--sparsity", "inf"], "sparsity must be a finite number, got inf"),
        (["--sparsity=-1e-4"], "sparsity must be >= 0, got -0.0001"),
        (["--seed", "-1"], "seed must be in 0..4294967295, got -1"),
        (["--seed", str(2**32)], "seed must be in 0..4294967295, got 4294967296"),
        (["--model", "lenet", "--cfg", "0", "20", "50"], "model_cfg channel widths must all be at least 1, got [0, 20, 50]"),
        (["--model", "lenet", "--cfg", "-3", "20", "50"],
         "model_cfg channel widths must all be at least 1, got [-3, 20, 50]"),
        (["--model", "lenet", "--cfg", "6", "16", "120", "84"],
         "model_cfg of lenet must be 3 channel widths (default [10, 20, 50]), got 4: [6, 16, 120, 84]"),
        (["--model", "resnet18", "--cfg", "8"], "model resnet18 has no channel config (--cfg); its widths are fixed"),
        (["--eval-batch-size", "0"], "eval_batch_size must be at least 1, got 0"),
        (["--limit-test", "100", "--eval-batch-size", "128"],
         "eval_batch_size 128 is larger than the test set (limit_test 100); give --eval-batch-size 100 or less"),
        (["--qaft", "--quant", "iao"],
         "qaft fine-tunes a QAT or PTQ run: give --from RUN_DIR (its observers must have seen data)"),
        (["--checkpoint-every", "-5"], "checkpoint_every must be >= 0 steps, got -5"),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) else "",
)
def test_train_bad_values_exit_2(capsys, tmp_path, no_data_sources, args, message):
  assert_refused(capsys, tmp_path, "train", *args, "--no-progress", message=message)


def test_train_empty_out_exit_2(capsys, tmp_path, no_data_sources):
  rc, out, err = run_cli(capsys, "train", "--out", "", "--no-progress")
  assert rc == 2 and err.strip() == "micronet-jax train: error: out (--out) must name a directory, got ''"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cfg", "1.5"], "argument --cfg: invalid int value: '1.5'"),
        (["--cfg", "eight"], "argument --cfg: invalid int value: 'eight'"),
        (["--cfg"], "argument --cfg: expected at least one argument"),
        (["--seed", "0.5"], "argument --seed: invalid int value: '0.5'"),
        (["--epochs", "1e3"], "argument --epochs: invalid int value: '1e3'"),
        (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
        (["--observer", "max"], "argument --observer: invalid choice: 'max'"),
    ],
    ids=["cfg-float", "cfg-word", "cfg-empty", "seed-float", "epochs-float", "lr-word", "observer"],
)
def test_train_non_numbers_are_usage_errors(capsys, tmp_path, args, message):
  rc, out, err = run_cli(capsys, "train", *args, "--out", tmp_path / "out")
  assert rc == 2 and out == "" and "Traceback" not in err
  assert err.startswith("usage: micronet-jax train")
  (line,) = [line for line in err.splitlines() if "error:" in line]
  assert line.startswith("micronet-jax train: error: ") and message in line
  assert not (tmp_path / "out").exists()


def test_eval_batch_larger_than_the_loaded_test_set(capsys, tmp_path, no_data_sources):
  make_idx_dir(tmp_path / "idx", n_train=48, n_test=20)
  assert_refused(capsys, tmp_path, "train", "--data-dir", tmp_path / "idx", "--batch-size", 16,
                 "--eval-batch-size", 32, "--no-progress",
                 message="eval batch size 32 is larger than the test set (20 examples); give --eval-batch-size 20 or "
                 "less")


def test_default_eval_batch_is_cut_to_a_small_test_set(capsys, tmp_path, no_data_sources):
  make_idx_dir(tmp_path / "idx", n_train=32, n_test=20)
  rc, out, err = run_cli(capsys, "train", "--data-dir", tmp_path / "idx", "--quant", "float", "--batch-size", 16,
                         "--epochs", 1, "--out", tmp_path / "run", "--no-progress")
  assert rc == 0, err
  assert "eval batch 20 (the default 1000 is more than the 20 test examples)" in out
  assert runs.read_config(str(tmp_path / "run")).eval_batch_size == 1000  # the config says what was asked


def _fake_run(out, **fields) -> TrainConfig:
  """A run directory holding zero variables (observers never updated), no training."""
  config = TrainConfig(epochs=1, eval_batch_size=8, out=str(out), **fields)
  _, net = recipes.build(config)
  like = jax.eval_shape(lambda: net.init(jax.random.key(0), config.example_input(), train=False))
  os.makedirs(out)
  runs.write_run_files(str(out), config, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), like),
                       {"label": config.label})
  return config


def test_qaft_from_a_run_whose_observers_saw_nothing(capsys, tmp_path, no_data_sources):
  make_idx_dir(tmp_path / "idx", n_train=48, n_test=20)
  _fake_run(tmp_path / "qat", quant="iao")
  assert_refused(
      capsys, tmp_path, "train", "--from", tmp_path / "qat", "--quant", "iao", "--qaft", "--data-dir",
      tmp_path / "idx", "--batch-size", 16, "--eval-batch-size", 20, "--no-progress",
      message=f"--qaft fine-tunes with frozen observers, but 4 observer(s) of --from {tmp_path / 'qat'} have seen no "
      "data (Conv_0/input, Conv_1/input, Dense_0/input, ...): run QAT (train --quant iao) or PTQ (micronet-jax ptq) "
      "first, with the same --quant, bits, --observer and --fold-bn", quiet=False)  # after loading --from


# ----------------------------------------------------------------------------- ptq, prune, convert, eval


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("ptq", ["--seed", "-1"], "seed must be in 0..4294967295, got -1"),
        ("ptq", ["--batches", "0"], "batches must be at least 1, got 0"),
        ("ptq", ["--batch-size", "-32"], "batch_size must be at least 1, got -32"),
        ("ptq", ["--w-bits", "1"], "w_bits must be in 2..16; got 1"),
        ("ptq", ["--a-bits", "32"], "a_bits must be in 2..16; got 32"),
        ("prune", ["--percent", "nan"], "percent (--percent) must be in [0, 1), got nan"),
        ("prune", ["--percent", "inf"], "percent (--percent) must be in [0, 1), got inf"),
        ("prune", ["--percent=-0.1"], "percent (--percent) must be in [0, 1), got -0.1"),
        ("prune", ["--percent", "1"], "percent (--percent) must be in [0, 1), got 1.0"),
        ("prune", ["--regular", "0"], "regular (--regular) must be >= 1, got 0"),
        ("eval", ["--limit-test", "0"], "limit_test must be at least 1, got 0"),
        ("eval", ["--limit-test", "-3"], "limit_test must be at least 1, got -3"),
    ],
)
def test_other_commands_bad_values_exit_2(capsys, tmp_path, command, args, message):
  source = ["--artifact", tmp_path / "src"] if command == "eval" else ["--from", tmp_path / "src"]
  assert_refused(capsys, tmp_path, command, *source, *args, message=message)


def test_configs_reject_bad_values_from_python():
  for bad in (dict(lr=float("inf")), dict(weight_decay=float("nan")), dict(seed=-1), dict(model_cfg=(0, 1, 2)),
              dict(lr="fast")):
    with pytest.raises(ConfigError):
      TrainConfig(**bad)
  with pytest.raises(ConfigError, match="has a value of the wrong type"):
    TrainConfig(lr="fast")
  with pytest.raises(ConfigError, match="percent"):
    PruneConfig("a", "b", percent=float("nan"))
  with pytest.raises(ConfigError, match="seed"):
    PtqConfig("a", "b", seed=-5)
  with pytest.raises(ConfigError, match="out"):
    PtqConfig("a", "")
  with pytest.raises(ConfigError, match="limit_test"):
    EvalConfig("a", limit_test=0)
  ConvertConfig("a", "b")  # nothing numeric to check


# ----------------------------------------------------------------------------- prune --percent 0

NIN_SMALL = (8, 8, 8, 16, 16, 16, 16, 16)


def test_prune_percent_0_writes_the_original_network(tmp_path, no_data_sources):
  make_idx_dir(tmp_path / "idx", n_train=16, n_test=10)
  config = TrainConfig(model="nin", model_cfg=NIN_SMALL, quant="float", epochs=1, eval_batch_size=10,
                       out=str(tmp_path / "src"))
  model, _ = recipes.build(config)
  like = jax.eval_shape(lambda: model.init(jax.random.key(0), config.example_input(), train=False))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), like)
  variables["batch_stats"] = jax.tree.map(lambda a: np.abs(a) + 0.5, variables["batch_stats"])  # variances > 0
  os.makedirs(config.out)
  runs.write_run_files(config.out, config, variables, {"label": "float"})
  lines = []
  result = pipelines.prune(PruneConfig(config.out, str(tmp_path / "pruned"), 0.0, regular=4,
                                       data_dir=str(tmp_path / "idx")), log=lines.append)
  assert result.cfg == result.cfg_before == list(NIN_SMALL) and result.params_removed == 0.0
  assert result.test_accuracy == result.test_accuracy_before == result.test_accuracy_masked
  _, _, src_vars = runs.load_run(config.out)
  out_config, _, pruned = runs.load_run(str(tmp_path / "pruned"))
  assert out_config.model_cfg == NIN_SMALL
  assert jax.tree.structure(pruned) == jax.tree.structure(src_vars)
  jax.tree.map(np.testing.assert_array_equal, pruned, src_vars)
  assert runs.read_metrics(str(tmp_path / "pruned"))["data_source"] == str(tmp_path / "idx")
