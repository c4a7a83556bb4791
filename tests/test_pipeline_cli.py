"""The command-line pipelines end to end on a tiny synthetic dataset:
float -> ptq -> qaft -> convert -> eval, and sparse -> prune -> fine-tune -> QAT."""

import dataclasses
import json

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
  assert f"{100 * dep['deploy_test_accuracy']:.2f}%" in capsys.readouterr().out


def test_qaft_keeps_observers_frozen(idx, float_run, tmp_path):
  from micronet_jax.app.runs import load_run
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


@pytest.mark.parametrize("model, quant, a_bits", [("lenet", "binary", "1"), ("nin", "ternary", "1")],
                         ids=["lenet-w1a1", "nin-w2a1"])
def test_binary_convert_eval(idx, tmp_path, capsys, model, quant, a_bits):
  """convert/eval handle binary and ternary runs: BN fused, kernels packed, exported; the
  packed deploy predicts what the fake-quant model predicts on the same images."""
  import jax

  from micronet_jax.app import runs
  from micronet_jax.app.data import load

  run_dir, art = tmp_path / "run", tmp_path / "packed"
  cfg = ["--cfg", *["8"] * 8] if model == "nin" else []
  assert run("train", "--model", model, *cfg, "--quant", quant, "--a-bits", a_bits, "--epochs", "1",
             "--batch-size", "64", "--data-dir", idx, "--out", run_dir, "--no-progress") == 0
  assert run("convert", "--from", run_dir, "--data-dir", idx, "--out", art) == 0
  dep = read(art / "deploy.json")
  assert dep["kind"] == "binary" and dep["test_images"] == 200 and dep["input_scale"] is None
  assert dep["prediction_agreement"] == 1.0
  assert (dep["xnor_test_accuracy"] is not None) == (quant == "binary")  # ternary codes are not XNOR-able
  assert dep["deploy_bytes"] < dep["float_params_bytes"]
  npz = np.load(art / "deploy.npz")
  assert any(k.endswith("/kernel/bits") and npz[k].dtype == np.uint8 for k in npz.files)
  # The exported artifact's logits are the fake-quant model's, on the same test images.
  _, net, variables = runs.load_run(str(run_dir))
  x = load("fashion_mnist", idx).x_test[:dep["artifact_batch"]]  # 200 images padded to the artifact's batch
  x = np.concatenate([x, np.zeros((dep["artifact_batch"] - len(x), *x.shape[1:]), x.dtype)])
  np.testing.assert_allclose(np.asarray(runs.read_exported(str(art)).call(x)),
                             np.asarray(jax.jit(lambda v, x: net.apply(v, x, train=False))(variables, x)),
                             rtol=1e-4, atol=1e-4)
  capsys.readouterr()
  assert run("eval", "--artifact", art, "--data-dir", idx, "--limit-test", "120") == 0
  out = capsys.readouterr().out
  assert f"{quant} W{1 if quant == 'binary' else 2}A1 packed artifact: test accuracy" in out and "120 images" in out


def test_config_to_argv_round_trips(tmp_path):
  """Every config is the command line config_to_argv writes for it (what the experiment
  scripts report), including a run started from another one."""
  from micronet_jax.app import runs
  from micronet_jax.app.config import ConvertConfig, EvalConfig, PruneConfig, PtqConfig, TrainConfig

  src = tmp_path / "ptq"
  src.mkdir()
  ptq_config = TrainConfig(model="nin", model_cfg=(8,) * 8, quant="iao", observer="percentile", fold_bn=True,
                           out=str(src))
  (src / "config.json").write_text(json.dumps(dataclasses.asdict(ptq_config)))
  configs = [
      TrainConfig(),
      TrainConfig(model="nin", model_cfg=(4, 4, 4, 8, 8, 8, 8, 8), quant="binary", w_bits=1, a_bits=32, lr=0.01,
                  lr_schedule="cosine", limit_train=100, sparsity=1e-4, out="runs/x"),
      TrainConfig(quant="float", epochs=3, weight_decay=5e-4, data_dir="/data", seed=3, out="runs/f"),
      runs.train_config(str(src), quant="iao", qaft=True, epochs=1, out="runs/qaft"),
      runs.train_config(str(src), quant="float", out="runs/float"),
      PtqConfig("a", "b", method="mse", fold_bn=False, batches=3), PruneConfig("a", "b", 0.3, 8, False),
      ConvertConfig("a", "b", "/data"), EvalConfig("a", limit_test=5),
  ]
  for c in configs:
    argv = cli.config_to_argv(c)
    assert cli.parse_config(argv) == c, argv
  qaft = cli.config_to_argv(configs[3])
  assert "--qaft" in qaft and "--observer" not in qaft and "--fold-bn" not in qaft  # inherited from the PTQ run
