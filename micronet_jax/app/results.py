"""What each pipeline returns: frozen, typed results whose fields are the keys of the
JSON file the pipeline writes (``metrics.json`` of a run, ``deploy.json`` of an artifact),
so ``to_json`` writes the file and ``from_json`` reads it back."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T", bound="_Json")


class _Json:
  def to_json(self) -> dict[str, Any]:
    """The result as the JSON object its pipeline writes."""
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls: type[T], obj: dict[str, Any]) -> T:
    """The result from its JSON object (keys the result does not have are ignored)."""
    return cls(**{f.name: obj[f.name] for f in dataclasses.fields(cls) if f.name in obj})


@dataclasses.dataclass(frozen=True)
class TrainResult(_Json):
  """A training run. ``history``: one record per epoch (train/test loss and accuracy,
  seconds); ``seconds_per_epoch`` leaves out the first epoch (compilation)."""

  label: str
  test_accuracy: float
  best_test_accuracy: float
  epochs: int
  seconds_per_epoch: float
  first_epoch_seconds: float
  total_seconds: float
  history: list[dict[str, float]]
  model_stats: dict[str, Any]  # ModelStats.row(): params, MMACs, size_mb, compression
  config: dict[str, Any]  # the TrainConfig
  versions: dict[str, str]


@dataclasses.dataclass(frozen=True)
class PtqResult(_Json):
  """Post-training quantization: the float and the calibrated model's test accuracy."""

  label: str
  method: str
  calibration_batches: int
  calibration_batch_size: int
  calibration_seconds: float
  float_test_accuracy: float
  test_accuracy: float
  best_test_accuracy: float  # = test_accuracy, so a PTQ run reads like a training run
  model_stats: dict[str, Any]
  config: dict[str, Any]  # the TrainConfig that `train --from` fine-tunes
  versions: dict[str, str]


@dataclasses.dataclass(frozen=True)
class PruneResult(_Json):
  """Network slimming: the original, the masked original (what the pruned network
  reproduces) and the pruned network, with their sizes."""

  label: str
  percent: float
  regular: int
  threshold: float
  cfg_before: list[int]
  cfg: list[int]
  test_accuracy_before: float
  test_accuracy_masked: float
  test_accuracy: float
  model_stats_before: dict[str, Any]
  model_stats: dict[str, Any]
  params_removed: float
  config: dict[str, Any]
  versions: dict[str, str]


@dataclasses.dataclass(frozen=True)
class ConvertResult(_Json):
  """A deploy artifact and how it agrees with the fake-quant model on the test set.

  ``kind`` "integer" (IAO: int8 weights, integer-only forward; ``input_*`` is the first
  layer's input grid) or "binary" (binary/ternary: BN fused, kernels packed; the input is
  float, ``input_*`` None). ``artifact_batch``: the batch size the exported forward takes
  (None: any). ``xnor_test_accuracy``: binary networks with XNOR-able layers
  (binary weights and inputs) run by XNOR/popcount, else None.
  """

  kind: str
  from_run: str
  label: str
  dataset: str
  input_shape: list[int]
  artifact_batch: int | None
  input_scale: float | None
  input_zero_point: int | None
  input_range: list[int] | None
  deploy_bytes: int
  deploy_npz_bytes: int
  artifact_bytes: int
  float_params_bytes: int
  fake_quant_test_accuracy: float
  deploy_test_accuracy: float
  prediction_agreement: float
  xnor_test_accuracy: float | None
  test_images: int
  versions: dict[str, str]


@dataclasses.dataclass(frozen=True)
class EvalResult(_Json):
  """An artifact's test accuracy, computed without the model's code."""

  label: str
  kind: str
  test_accuracy: float
  test_images: int
