"""The deploy pipelines: a trained run -> a deploy artifact, and the artifact's test.

``convert`` builds, through the public API, the integer-only deploy of an IAO run
(``mj.convert``: int8 weights, int32 bias, fixed-point requantization) or the packed
deploy of a binary/ternary run (``mj.deploy_binary``: BatchNorms fused, kernels at 1 or
2 bits), writes the artifact directory (``runs``: deploy.json, deploy.npz and a
``jax.export`` of the deploy forward) and checks the deploy forward against the
fake-quant forward on the test set. ``evaluate_artifact`` runs the exported forward
without the model's code.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import micronet_jax as mj
from micronet_jax._src.deploy.integer import quantize_input
from micronet_jax.app import data as data_lib
from micronet_jax.app import rundir, runs
from micronet_jax.app import train as train_lib
from micronet_jax.app.config import BINARY_BITS, ConvertConfig, EvalConfig
from micronet_jax.app.errors import ConfigError
from micronet_jax.app.evaluation import evaluate, model_forward
from micronet_jax.app.results import ConvertResult, EvalResult

Log = Callable[[str], Any]
KINDS = {"iao": "integer", "lsq": "integer", **{q: "binary" for q in BINARY_BITS}}  # run's quant -> deploy kind
EVAL_BATCH = 500
ONNX_FILE = "integer_model.onnx"  # convert --format onnx


def _flat(tree: Any) -> dict[str, np.ndarray]:
  """Every array leaf of ``tree`` as numpy, keyed by its path ('params/Conv_1/kernel/bits')."""
  def name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))

  return {"/".join(name(k) for k in path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _integer(qmodel: Any, variables: dict, x_test: np.ndarray, from_run: str) -> tuple[Any, dict, dict, dict]:
  """(artifact for ``mj.export``, arrays, input grid fields, forwards) of an IAO run."""
  try:
    deploy = mj.convert(qmodel, variables, jnp.asarray(x_test[:2]))
  except ValueError as e:
    raise ConfigError(f"cannot convert {from_run}: {e}") from e
  int_fn = jax.jit(lambda xq: mj.integer_apply(deploy, xq))
  grid = {"input_scale": deploy.input_scale, "input_zero_point": deploy.input_zero_point,
          "input_range": list(deploy.input_range)}
  return deploy, deploy.flat_arrays(), grid, {"deploy": lambda x: int_fn(deploy.quantize_input(x))}


def _binary(qmodel: Any, variables: dict, x_test: np.ndarray, from_run: str) -> tuple[Any, dict, dict, dict]:
  """(artifact for ``mj.export``, arrays, input grid fields, forwards) of a binary/ternary run."""
  try:
    fused, packed = mj.deploy_binary(qmodel, variables, jnp.asarray(x_test[:1]), train=False)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"cannot deploy {from_run}: {e}") from e
  forwards = {"deploy": model_forward(fused, packed)}
  if fused.xnor_layers:  # binary weights and inputs: also by XNOR/popcount
    forwards["xnor"] = model_forward(fused, packed, xnor=True)
  grid = {"input_scale": None, "input_zero_point": None, "input_range": None}
  return (fused, packed), _flat(packed), grid, forwards


def _export(artifact: Any, kind: str, input_shape: tuple[int, ...], batch: int) -> tuple[Any, int | None]:
  """(exported deploy forward, its fixed batch size or None for any batch).

  The packed binary forward is exported for batches of ``batch``: with a symbolic batch
  its trace failed in the model plan (the MAC count took
  ``int(np.prod(out_shape))`` of a shape holding the batch). ``evaluate`` pads every
  batch to one size, so a fixed batch costs ``eval`` nothing.
  """
  if kind == "integer":
    return mj.export(artifact, input_shape), None
  fused, packed = artifact
  fn = jax.jit(lambda x: fused.apply(packed, x, train=False))
  return jax.export.export(fn)(jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)), batch


def _write_onnx(deploy: Any, out: str, x_test: np.ndarray, log: Log) -> None:
  """OUT/integer_model.onnx (batch 1), checked with onnxruntime against ``integer_apply``
  on every test image: the two must agree exactly."""
  try:
    import onnxruntime as ort
    blob = mj.export_onnx(deploy, x_test.shape[1:])
  except ImportError as e:
    raise ConfigError(f"--format onnx needs onnx and onnxruntime (pip install 'micronet-jax[onnx]'): {e}") from e
  with open(os.path.join(out, ONNX_FILE), "wb") as f:
    f.write(blob)
  session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
  xq = np.asarray(deploy.quantize_input(x_test))
  ours = np.asarray(jax.jit(lambda q: mj.integer_apply(deploy, q, dequantize=False))(xq))
  theirs = np.concatenate([session.run(["acc"], {"x": xq[i:i + 1]})[0] for i in range(len(xq))])
  same = int(np.sum(np.all(ours.reshape(len(xq), -1) == theirs.reshape(len(xq), -1), axis=1)))
  log(f"{ONNX_FILE}: {len(blob):,} bytes; onnxruntime {ort.__version__} equals integer_apply on {same}/{len(xq)} "
      "test images")
  if same != len(xq):
    raise ConfigError(f"the ONNX export differs from integer_apply on {len(xq) - same} test images")


def convert(config: ConvertConfig, batch_size: int = EVAL_BATCH, log: Log = print, *,
            overwrite: bool = False) -> ConvertResult:
  """Deploy artifact of an IAO or binary/ternary run in ``config.out``; reports sizes and
  the fake-quant, deploy (and XNOR) test accuracy and prediction agreement."""
  with rundir.RunWriter(config.out, overwrite=overwrite) as writer:
    src, qmodel, variables = runs.load_run(config.from_run)
    if src.quant not in KINDS:
      raise ConfigError(f"{config.from_run} is a {src.label} run; conversion needs an iao (QAT or PTQ) run "
                        f"(integer deploy) or a binary/ternary run (packed deploy)")
    kind = KINDS[src.quant]
    if config.format == "onnx" and kind != "integer":
      raise ConfigError(f"--format onnx exports integer deploys (iao runs); {config.from_run} is a {src.label} run")
    dataset = data_lib.load(src.dataset, config.data_dir or src.data_dir)
    build = _integer if kind == "integer" else _binary
    artifact, arrays, grid, forwards = build(qmodel, variables, dataset.x_test, config.from_run)
    ev = evaluate({"fake_quant": model_forward(qmodel, variables), **forwards}, dataset.x_test, dataset.y_test,
                  batch_size)

    npz = os.path.join(writer.path, runs.ARRAYS_FILE)
    np.savez(npz, **arrays)
    exported, artifact_batch = _export(artifact, kind, dataset.x_test.shape[1:], batch_size)
    float_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
    result = ConvertResult(
        kind=kind, from_run=config.from_run, label=src.label, dataset=src.dataset,
        input_shape=list(dataset.x_test.shape[1:]), artifact_batch=artifact_batch, **grid,
        deploy_bytes=mj.nbytes(artifact if kind == "integer" else artifact[1]),
        deploy_npz_bytes=os.path.getsize(npz), artifact_bytes=runs.write_exported(writer.path, exported),
        float_params_bytes=4 * float_params, fake_quant_test_accuracy=ev.accuracy["fake_quant"],
        deploy_test_accuracy=ev.accuracy["deploy"], prediction_agreement=ev.agreement["deploy"],
        xnor_test_accuracy=ev.accuracy.get("xnor"), test_images=ev.images, versions=train_lib.package_versions(),
    )
    rundir.write_json(os.path.join(writer.path, runs.DEPLOY_FILE), result.to_json())
    if config.format == "onnx":
      _write_onnx(artifact, writer.path, dataset.x_test, log)
    writer.commit()
    what = ("int8 weights, int32 bias/multipliers" if kind == "integer" else
            "packed 1-/2-bit kernels, float32 alphas, biases and float layers")
    xnor = "" if result.xnor_test_accuracy is None else f"| XNOR/popcount | {100 * result.xnor_test_accuracy:.2f}% |\n"
    agree = round(result.prediction_agreement * ev.images)
    log(f"| artifact | bytes |\n|---|---|\n| float params (float32) | {result.float_params_bytes:,} |\n"
        f"| deploy arrays ({what}) | {result.deploy_bytes:,} |\n"
        f"| {runs.ARTIFACT_FILE} (StableHLO, arrays included) | {result.artifact_bytes:,} |\n\n"
        f"| forward | test acc |\n|---|---|\n| fake-quant ({src.label}) | {100 * result.fake_quant_test_accuracy:.2f}% |\n"
        f"| {'integer-only' if kind == 'integer' else 'packed deploy'} | {100 * result.deploy_test_accuracy:.2f}% |\n"
        f"{xnor}same predicted class on {agree}/{ev.images} test images ({100 * result.prediction_agreement:.2f}%)")
    return result


def evaluate_artifact(config: EvalConfig, batch_size: int = EVAL_BATCH, log: Log = print) -> EvalResult:
  """Test accuracy of a ``convert`` artifact, run without the model's Python code."""
  meta = runs.read_deploy(config.artifact)
  exported = runs.read_exported(config.artifact)
  dataset = data_lib.subset(data_lib.load(meta["dataset"], config.data_dir), None, config.limit_test)
  kind = meta.get("kind", "integer")  # artifacts from before the binary deploy are integer ones
  if kind == "integer":
    grid = (meta["input_scale"], meta["input_zero_point"], tuple(meta["input_range"]))
    forward = lambda x: exported.call(quantize_input(x, *grid))
  else:
    forward = lambda x: exported.call(jnp.asarray(x, jnp.float32))
  batch_size = meta.get("artifact_batch") or batch_size  # a fixed-batch artifact gets its batch
  acc = evaluate({kind: forward}, dataset.x_test, dataset.y_test, batch_size).accuracy[kind]
  recorded, n = meta.get("deploy_test_accuracy"), len(dataset.x_test)
  if recorded is not None and n == meta.get("test_images") and meta.get("dataset") == dataset.name:
    # The same test set as at conversion: an integer artifact is exact, so any change means the
    # artifact or the data changed; a packed binary one computes in float32 (one image of slack).
    slack = 0 if kind == "integer" else 1
    if abs(round(acc * n) - round(recorded * n)) > slack:
      raise ConfigError(f"{config.artifact} gives {100 * acc:.2f}% on the {n} test images, but {100 * recorded:.2f}% "
                        f"was recorded when it was converted: the artifact or the test data changed")
  log(f"{meta['label']} {'integer' if kind == 'integer' else 'packed'} artifact: test accuracy {100 * acc:.2f}% on {len(dataset.x_test)} images")
  return EvalResult(label=meta["label"], kind=kind, test_accuracy=acc, test_images=len(dataset.x_test))
