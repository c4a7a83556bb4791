"""``micronet-jax convert --format onnx``: the artifact directory gets integer_model.onnx,
checked with onnxruntime (skipped without it: pip install -e ".[onnx]")."""

import pytest

from micronet_jax.app import cli, runs
from micronet_jax.app.config import ConvertConfig
from micronet_jax.app.errors import ConfigError
from tests.conftest import make_idx_dir

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def test_cli_convert_format_onnx(tmp_path, capsys):
  """float -> ptq -> ``convert --format onnx`` on a tiny synthetic dataset: the artifact
  directory holds integer_model.onnx, which onnxruntime runs equal to integer_apply."""
  make_idx_dir(tmp_path / "idx", n_train=128, n_test=40, seed=1)
  idx = tmp_path / "idx"
  flt, ptq, art = tmp_path / "float", tmp_path / "ptq", tmp_path / "onnx"
  run = lambda *a: cli.main([str(v) for v in a])  # noqa: E731
  assert run("train", "--model", "lenet", "--quant", "float", "--epochs", "1", "--batch-size", "64",
             "--eval-batch-size", "40", "--data-dir", idx, "--out", flt, "--no-progress") == 0
  assert run("ptq", "--from", flt, "--batches", "2", "--batch-size", "32", "--data-dir", idx, "--out", ptq,
             "--no-progress") == 0
  capsys.readouterr()
  assert run("convert", "--from", ptq, "--data-dir", idx, "--out", art, "--format", "onnx") == 0
  assert "equals integer_apply on 40/40 test images" in capsys.readouterr().out
  assert (art / runs.ARTIFACT_FILE).exists()  # the StableHLO artifact that `eval` runs is still written
  m = onnx.load(str(art / "integer_model.onnx"))
  assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == [1, 28, 28, 1]
  with pytest.raises(SystemExit):  # argparse: not one of the choices
    run("convert", "--from", ptq, "--data-dir", idx, "--out", tmp_path / "x", "--format", "tflite")
  with pytest.raises(ConfigError, match="format must be one of stablehlo, onnx"):
    ConvertConfig(str(ptq), str(tmp_path / "x"), format="tflite")
  assert cli.config_to_argv(ConvertConfig("a", "b", format="onnx"))[-2:] == ["--format", "onnx"]
