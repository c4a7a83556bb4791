"""The command-line pipelines end to end on a tiny synthetic dataset:
float -> ptq -> qaft -> convert -> eval, and sparse -> prune -> fine-tune -> QAT."""

import json
import os

import numpy as np
import pytest

from micronet_jax.app import cli
from tests.conftest import make_idx_dir


def run(*argv) -> int:
  return cli.main([str(a) for a in argv])


def read(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def idx(tmp_path_factory):
  folder = tmp_path_factory.mktemp("idx")
  make_idx_dir(folder, n_train=384, n_test=200, seed=1)
  return str(folder)


@pytest.fixture(scope="module")
def float_run(idx, tmp_path_factory):
  out = tmp_path_factory.mktemp("runs") / "float"
  assert run("train", "--model", "lenet", "--quant", "float", "--epochs", "1", "--batch-size", "64",
             "--data-dir", idx, "--out", out, "--no-progress") == 0
  return out


def test_ptq_qaft_convert_eval(idx, float_run, tmp_path, capsys):
  ptq, qaft, art = tmp_path / "ptq", tmp_path / "qaft", tmp_path / "int8"
  assert run("ptq", "--from", float_run, "--method", "percentile", "--batches", "5", "--batch-size", "32",
             "--data-dir", idx, "--out", ptq, "--no-progress") == 0
  m = read(ptq / "metrics.json")
  assert m["config"]["quant"] == "iao" and m["config"]["observer"] == "percentile"
  assert m["calibration_batches"] == 5 and 0 <= m["test_accuracy"] <= 1
  assert run("train", "--from", ptq, "--quant", "iao", "--qaft", "--epochs", "1", "--batch-size", "64",
             "--data-dir", idx, "--out", qaft, "--no-progress") == 0
  q = read(qaft / "metrics.json")
  assert q["config"]["qaft"] and q["config"]["lr"] == 1e-5 and q["config"]["observer"] == "percentile"
  assert run("convert", "--from", qaft, "--data-dir", idx, "--out", art) == 0
  dep = read(art / "deploy.json")
  assert dep["test_images"] == 200 and dep["prediction_agreement"] >= 0.99
  assert dep["deploy_bytes"] < dep["float_params_bytes"] / 2  # int8 weights
  npz = np.load(art / "deploy.npz")
  assert all(np.issubdtype(npz[k].dtype, np.integer) for k in npz.files if k != "out_scale")
  capsys.readouterr()
  # The exported StableHLO artifact reproduces integer_apply's predictions exactly.
  assert run("eval", "--artifact", art, "--data-dir", idx) == 0
  assert f"{100 * dep['integer_test_accuracy']:.2f}%" in capsys.readouterr().out


def test_qaft_keeps_observers_frozen(idx, float_run, tmp_path):
  from micronet_jax.app.experiment import load_run
  import jax

  ptq, qaft = tmp_path / "ptq", tmp_path / "qaft"
  assert run("ptq", "--from", float_run, "--method", "minmax", "--batches", "3", "--data-dir", idx,
             "--out", ptq, "--no-progress") == 0
  assert run("train", "--from", ptq, "--quant", "iao", "--qaft", "--epochs", "1", "--batch-size", "64",
             "--data-dir", idx, "--out", qaft, "--no-progress") == 0
  _, _, before = load_run(str(ptq))
  _, _, after = load_run(str(qaft))
  for a, b in zip(jax.tree.leaves(before["quant_stats"]), jax.tree.leaves(after["quant_stats"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["params"]),
                                                       jax.tree.leaves(after["params"])))


def test_prune_pipeline(idx, tmp_path):
  cfg = ["8", "8", "8", "8", "8", "8", "8", "8"]
  sparse, pruned, ft, q = (tmp_path / n for n in ("sparse", "pruned", "ft", "q"))
  assert run("train", "--model", "nin", "--cfg", *cfg, "--quant", "float", "--sparsity", "1e-3", "--epochs", "1",
             "--batch-size", "64", "--data-dir", idx, "--out", sparse, "--no-progress") == 0
  assert run("prune", "--from", sparse, "--percent", "0.5", "--regular", "2", "--data-dir", idx, "--out", pruned) == 0
  p = read(pruned / "metrics.json")
  assert all(c % 2 == 0 and 2 <= c <= 8 for c in p["cfg"]) and sum(p["cfg"]) <= 40
  assert p["model_stats"]["params"] < p["model_stats_before"]["params"]
  assert read(pruned / "config.json")["model_cfg"] == p["cfg"]
  assert run("train", "--from", pruned, "--quant", "float", "--epochs", "1", "--batch-size", "64",
             "--data-dir", idx, "--out", ft, "--no-progress") == 0
  assert run("train", "--from", ft, "--quant", "iao", "--fold-bn", "--epochs", "1", "--batch-size", "64",
             "--data-dir", idx, "--out", q, "--no-progress") == 0
  m = read(q / "metrics.json")
  assert m["config"]["model_cfg"] == p["cfg"] and m["config"]["fold_bn"]
  assert m["model_stats"]["size_mb"] < p["model_stats"]["size_mb"] / 2


def test_pipeline_usage_errors(idx, float_run, tmp_path, capsys):
  assert run("ptq", "--from", float_run, "--w-bits", "1", "--out", tmp_path / "x") == 2
  assert run("convert", "--from", float_run, "--data-dir", idx, "--out", tmp_path / "y") == 2  # not an iao run
  assert run("eval", "--artifact", tmp_path / "nothing") == 2
  assert run("train", "--from", tmp_path / "nothing", "--out", tmp_path / "z") == 2
  assert run("train", "--quant", "float", "--qaft", "--data-dir", idx, "--out", tmp_path / "w") == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.count("error:") == 5
