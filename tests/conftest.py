"""Shared fixtures: synthetic IDX folders written with numpy, a small slice of the real
Fashion-MNIST (skipped, with the reason, where the Debian package is not installed), and
a way to take every data source away."""

from __future__ import annotations

import gzip
import os
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micronet_jax.app import data

FASHION_MNIST_DIR = data.SYSTEM_DIRS["fashion_mnist"]
NO_FASHION_MNIST = (
    f"Fashion-MNIST IDX files not found in {FASHION_MNIST_DIR} "
    "(apt-get install -y dataset-fashion-mnist to run the realdata tests)"
)


def idx_bytes(arr: np.ndarray) -> bytes:
  """The IDX encoding of a uint8 array: 0x0000, type 0x08, ndim, big-endian dims, data."""
  arr = np.asarray(arr, np.uint8)
  return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path: str, arr: np.ndarray) -> str:
  """Writes ``arr`` as IDX to ``path``, gzipped when ``path`` ends with .gz."""
  raw = idx_bytes(arr)
  with open(path, "wb") as f:
    f.write(gzip.compress(raw) if path.endswith(".gz") else raw)
  return path


def make_idx_dir(folder, n_train: int = 48, n_test: int = 20, gz: bool = False, seed: int = 0) -> dict:
  """Writes the four IDX files of a tiny 28x28 dataset into ``folder``; returns the arrays."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  arrays = {
      "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
      "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
  }
  # Every class present in both splits, so num_classes is 10 whatever the seed.
  arrays["train_labels"][:10] = np.arange(10)
  arrays["test_labels"][:10] = np.arange(10)
  for key, stem in data.IDX_FILES.items():
    write_idx(os.path.join(str(folder), stem + (".gz" if gz else "")), arrays[key])
  return arrays


@pytest.fixture(params=["raw", "gz"])
def synthetic_idx_dir(request, tmp_path):
  """(folder, arrays): a tiny IDX dataset, once with plain and once with gzipped files."""
  folder = tmp_path / f"idx-{request.param}"
  arrays = make_idx_dir(folder, gz=request.param == "gz")
  return str(folder), arrays


@pytest.fixture
def no_data_sources(monkeypatch, tmp_path):
  """No system folder and no tensorflow-datasets: ``load`` can only use --data-dir."""
  missing = str(tmp_path / "no-such-system-dir")
  monkeypatch.setattr(data, "SYSTEM_DIRS", {name: f"{missing}/{name}" for name in data.DATASETS})
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
  return missing


def run_cli(capsys, *argv):
  """(exit status, stdout, stderr) of ``micronet-jax ARGV`` run in this process."""
  from micronet_jax.app import cli

  try:
    rc = cli.main([str(a) for a in argv])
  except SystemExit as e:  # argparse: --help, bad choices
    rc = e.code
  out, err = capsys.readouterr()
  return rc, out, err


def fashion_mnist_installed() -> bool:
  return all(data._find(FASHION_MNIST_DIR, stem) for stem in data.IDX_FILES.values())


@pytest.fixture(scope="session")
def fashion_mnist_dir():
  """The Debian package's folder; skips the test when the files are not there."""
  if not fashion_mnist_installed():
    pytest.skip(NO_FASHION_MNIST)
  return FASHION_MNIST_DIR


@pytest.fixture(scope="session")
def fashion_mnist_small(fashion_mnist_dir):
  """2000 training and 1000 test images of the real Fashion-MNIST."""
  return data.subset(data.load("fashion_mnist", fashion_mnist_dir), 2000, 1000)


def init_variables(model, x, seed: int = 0) -> dict:
  """Float variables of the shapes ``model.init`` gives, drawn with numpy: a jitted init
  compiles every initializer (seconds per model on this machine) for nothing we test.
  Kernels LeCun-normal (Flax's default), biases 0, BN scale 1, running mean 0, var 1."""
  rng = np.random.default_rng(seed)

  def draw(path, sd):
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(rng.normal(size=sd.shape) / np.sqrt(np.prod(sd.shape[:-1])), sd.dtype)
    return jnp.full(sd.shape, 1.0 if name in ("scale", "var") else 0.0, sd.dtype)

  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(lambda: model.init(jax.random.key(0), x)))


# Long end-to-end runs whose code paths the fast suite already covers with smaller
# models: marked "slow", left out of the README's test command (`addopts` in
# pyproject.toml) and run by .ci/run as a second step (`python -m pytest -q -m slow`).
SLOW = (
    "test_data_parallel.py::",  # an 8-device child process (1 vs 8 devices); 70 s
    "test_table.py::",  # the whole compression table on a few hundred images; 45 s
    "test_resume.py::test_ctrl_c_in_a_real_process",  # real-process resume, as the SIGTERM test does
    "test_reliability_rundirs.py::test_sigkill_during_an_overwrite",
    "test_convert_ops.py::test_nin_gc_group_convs_and_channel_shuffles",  # grouped convs: 20x slow on XLA:CPU
    "test_convert_ops.py::test_concat_of_branches_with_different_scales",
    "test_pipeline_cli.py::test_prune_pipeline",  # prune is covered by test_prune
    "test_pipeline_cli.py::test_binary_convert_eval[nin",
    # and test_convert.py's NIN agreement network (``[nin]``): LeNet and ResNet stay
    "test_nnx.py::test_nnx_and_linen_agree_exactly[lenet-dorefa]",  # the other families cover it
    "test_nnx.py::test_nnx_and_linen_agree_exactly[resnet-dorefa]",
    "test_learned.py::test_cli_trains_with_learned_quantizers",  # the CLI on learned quantizers; test_cli covers it
    "test_any_model_nnx.py::test_ptq_calibration",  # NNX calibration: test_nnx and the Linen zoo cover it
    "test_any_model.py::test_ptq_calibration_moves_only_the_observers[resnet",  # the ViT's and LM's stay
    "test_any_model.py::test_ptq_calibration_moves_only_the_observers[mobilenet",
    "test_train.py::test_short_real_run_learns",  # real-data training: test_learned's LSQ run stays
    "test_nnx.py::test_nnx_and_linen_agree_exactly[lenet-iao]",  # resnet-iao-fold and test_nnx_kinds cover it
    "test_nnx.py::test_nnx_and_linen_agree_exactly[lenet-binary]",  # resnet-binary stays
    "test_convert_format_cli.py::test_cli_convert_format_onnx",
    "test_nnx.py::test_nnx_and_linen_agree_exactly[resnet-binary]",  # lenet/resnet binary: test_binary covers it
    "test_transform.py::test_param_tree_is_the_float_models",  # test_any_model* check it on every zoo model  # test_onnx_export covers the graph
    "test_convert_ops.py::test_residual_add_shares_the_union_range",  # test_onnx_export's resnet_add covers it
    "test_nnx.py::test_qat_with_nnx_jit_and_with_split_merge_jax_jit_agree",
    "test_nnx_kinds.py::test_nnx_layer_kinds_match_linen_values_gradients_and_statistics[linear_general-iao]",
    "test_nnx_kinds.py::test_nnx_layer_kinds_match_linen_values_gradients_and_statistics[einsum_embed_attend-iao]",
)


def _slow_nnx_qat(name: str) -> bool:
  """The NNX zoo's QAT step under IAO (LSQ's, with its every-step-learns check, stays)."""
  return name.startswith("test_any_model_nnx.py::test_a_jitted_qat_step") and "iao" in name


def _is_slow(nodeid: str) -> bool:
  name = nodeid.split("/")[-1]
  if name.startswith("test_convert.py::"):
    return name.endswith("[nin]")
  if name.startswith("test_any_model_nnx.py::test_a_jitted_qat_step"):
    return _slow_nnx_qat(name)
  return name.startswith(SLOW)


def pytest_collection_modifyitems(config, items):
  for item in items:
    if _is_slow(item.nodeid):
      item.add_marker(pytest.mark.slow)
