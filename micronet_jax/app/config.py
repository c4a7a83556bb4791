"""The frozen configs of the application's pipelines, validated on construction.

One config per pipeline: ``TrainConfig`` (train, QAT, QAFT), ``PtqConfig``,
``PruneConfig``, ``ConvertConfig`` and ``EvalConfig``. A config is everything a run needs
and nothing else, so that it is stored in the run directory (``config.json``), compared
to skip a finished run, and turned into the command that reproduces it
(``cli.config_to_argv``). A bad value raises ``ConfigError`` naming the field, the value
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from micronet_jax import models
from micronet_jax._src.core import rules as rules_lib
from micronet_jax._src.core.observers import OBSERVERS as OBSERVER_NAMES
from micronet_jax._src.core.quantizers import MAX_BITS, MIN_BITS
from micronet_jax._src.flax.calibrate import METHODS as PTQ_METHODS
from micronet_jax.app import data as data_lib
from micronet_jax.app.errors import ConfigError

QUANT_METHODS = ("float", *rules_lib.PRESETS)
LEARNED_STEP_METHODS = ("lsq", "pact")  # methods whose weights have a learned step (--per-channel)
DEPLOY_FORMATS = ("stablehlo", "onnx")  # convert --format
BINARY_BITS = {"binary": 1, "ternary": 2}  # weight bits of the wbwtab methods
LR_SCHEDULES = ("constant", "cosine")
INPUT_SHAPES = {"fashion_mnist": (28, 28, 1), "mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
EVAL_BATCH_DEFAULT = 1000  # TrainConfig.eval_batch_size when not given: at most the test set's size
MAX_SEED = 2**32 - 1  # seeds are taken as unsigned 32-bit integers, so each run has its own


def _validated(config) -> None:
  """Runs ``config._validate()``; its ValueError becomes a ConfigError with the same text.

  The ValueError is raised by ``_validate`` itself and says everything: chaining it would
  only repeat the message in a traceback the CLI never shows (``from None``)."""
  try:
    config._validate()
  except ValueError as e:
    raise ConfigError(str(e)) from None
  except TypeError as e:  # a field of the wrong type (from the Python API or a hand-edited config.json)
    raise ConfigError(f"{type(config).__name__} has a value of the wrong type: {e}") from None


def _check_bits(name: str, bits: int, float_ok: bool = True) -> None:
  if not (MIN_BITS <= bits <= MAX_BITS or (float_ok and bits == 32)):
    raise ValueError(f"{name} must be in {MIN_BITS}..{MAX_BITS}" + (", or 32 for float" if float_ok else "")
                     + f"; got {bits}")


def _check_at_least_1(config, *names: str) -> None:
  for name in names:
    value = getattr(config, name)
    if value is not None and value < 1:
      raise ValueError(f"{name} must be at least 1, got {value}")


def _check_finite(config, name: str, positive: bool = False) -> None:
  """A float field that must be finite and >= 0 (> 0 when ``positive``): nan and inf
  compare False either way, so they are named here rather than slipping through."""
  value = getattr(config, name)
  if not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value}")
  if value < 0 or (positive and value == 0):
    raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")


def _check_model_cfg(model: str, cfg: tuple[int, ...]) -> None:
  """--cfg: as many channel widths as the model's own cfg, each at least 1."""
  if "cfg" not in models.knobs(model):
    raise ValueError(f"model {model} has no channel config (--cfg); its widths are fixed")
  default = tuple(models.get_model(model).cfg)
  if len(cfg) != len(default):
    raise ValueError(f"model_cfg of {model} must be {len(default)} channel widths (default {list(default)}), "
                     f"got {len(cfg)}: {list(cfg)}")
  if min(cfg) < 1:
    raise ValueError(f"model_cfg channel widths must all be at least 1, got {list(cfg)}")


def _check_out(out: str) -> None:
  if not isinstance(out, str) or not out.strip():
    raise ValueError(f"out (--out) must name a directory, got {out!r}")


def _check_seed(seed: int) -> None:
  if not 0 <= seed <= MAX_SEED:
    raise ValueError(f"seed must be in 0..{MAX_SEED}, got {seed}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run: float, QAT (``quant``), or QAFT (``qaft``, from a QAT/PTQ run)."""

  model: str = "lenet"
  model_cfg: tuple[int, ...] | None = None  # channel widths (e.g. of a pruned network)
  dataset: str = "fashion_mnist"
  data_dir: str | None = None
  quant: str = "iao"
  w_bits: int = 8
  a_bits: int = 8
  epochs: int = 8
  batch_size: int = 128
  eval_batch_size: int = EVAL_BATCH_DEFAULT  # the default is capped at the test set; a larger explicit one is an error
  lr: float = 1e-3
  lr_schedule: str = "constant"  # or "cosine": decays to 0 over all training steps
  weight_decay: float = 0.0
  sparsity: float = 0.0  # network-slimming L1 strength on BatchNorm scales
  observer: str = "moving_average"  # iao activation observer / calibration method
  fold_bn: bool = False  # iao: fold BatchNorms that directly consume a conv
  per_channel: bool = False  # lsq, pact: one learned weight step per output channel (else one per tensor)
  qaft: bool = False  # fine-tune with observers and BatchNorm statistics frozen
  seed: int = 0
  out: str = "runs/lenet-iao-w8a8"
  from_run: str | None = None
  limit_train: int | None = None
  limit_test: int | None = None
  checkpoint_every: int = 1000  # steps between resumable checkpoints (also at every epoch end); 0: epoch ends only

  def __post_init__(self):
    if self.model_cfg is not None:
      object.__setattr__(self, "model_cfg", tuple(int(c) for c in self.model_cfg))
    _validated(self)

  def _validate(self):
    if self.model not in models.MODELS:
      raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(models.MODELS)}")
    if self.dataset not in data_lib.DATASETS:
      raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {list(data_lib.DATASETS)}")
    if self.quant not in QUANT_METHODS:
      raise ValueError(f"unknown quantization method {self.quant!r}; choose one of {list(QUANT_METHODS)}")
    if self.quant in BINARY_BITS:  # fixed widths: binary W1, ternary W2 (32: float), A1 or A32
      if self.w_bits not in (BINARY_BITS[self.quant], 32):
        raise ValueError(f"{self.quant} weights are {BINARY_BITS[self.quant]} bit(s): w_bits must be "
                         f"{BINARY_BITS[self.quant]} (or 32 for float weights); got {self.w_bits}")
      if self.a_bits not in (1, 32):
        raise ValueError(f"with {self.quant} weights a_bits must be 1 (binary) or 32 (float ReLU); got {self.a_bits}")
    else:
      _check_bits("w_bits", self.w_bits)
      _check_bits("a_bits", self.a_bits)
    _check_at_least_1(self, "epochs", "batch_size", "eval_batch_size")
    if self.model_cfg is not None:
      _check_model_cfg(self.model, self.model_cfg)
    _check_finite(self, "lr", positive=True)
    if self.lr_schedule not in LR_SCHEDULES:
      raise ValueError(f"unknown lr schedule {self.lr_schedule!r}; choose one of {list(LR_SCHEDULES)}")
    for name in ("weight_decay", "sparsity"):
      _check_finite(self, name)
    _check_seed(self.seed)
    _check_out(self.out)
    _check_at_least_1(self, "limit_train", "limit_test")
    if self.limit_test is not None and self.limit_test < self.eval_batch_size != EVAL_BATCH_DEFAULT:
      raise ValueError(f"eval_batch_size {self.eval_batch_size} is larger than the test set "
                       f"(limit_test {self.limit_test}); give --eval-batch-size {self.limit_test} or less")
    if self.checkpoint_every < 0:
      raise ValueError(f"checkpoint_every must be >= 0 steps, got {self.checkpoint_every}")
    if self.observer not in OBSERVER_NAMES:
      raise ValueError(f"unknown observer {self.observer!r}; choose one of {list(OBSERVER_NAMES)}")
    if self.per_channel and self.quant not in LEARNED_STEP_METHODS:
      raise ValueError(f"per_channel (--per-channel) sets learned weight steps: it needs --quant "
                       f"{' or '.join(LEARNED_STEP_METHODS)}, got {self.quant}")
    if self.qaft and self.quant == "float":
      raise ValueError("qaft fine-tunes a quantized model: choose --quant (and --from a QAT or PTQ run)")
    if self.qaft and self.from_run is None:
      raise ValueError("qaft fine-tunes a QAT or PTQ run: give --from RUN_DIR (its observers must have seen data)")

  @property
  def label(self) -> str:
    if self.quant == "float":
      return "float"
    return f"{self.quant} W{self.w_bits}A{self.a_bits}"

  def example_input(self) -> jax.Array:
    return jnp.zeros((1, *INPUT_SHAPES[self.dataset]), jnp.float32)


def method_defaults(quant: str, qaft: bool = False) -> tuple[int, int, float]:
  """(w_bits, a_bits, lr) that ``micronet-jax train`` uses when they are not given.

  Binary/ternary: their fixed weight bits, binary activations and micronet's wbwtab rate
  0.01 (at 1e-3 the latent weights, clipped to [-1, 1], barely cross zero). QAFT
  fine-tunes at 1e-5. Otherwise ``TrainConfig``'s defaults.
  """
  d = TrainConfig()
  w_bits, a_bits, lr = (BINARY_BITS[quant], 1, 1e-2) if quant in BINARY_BITS else (d.w_bits, d.a_bits, d.lr)
  return w_bits, a_bits, 1e-5 if qaft else lr


@dataclasses.dataclass(frozen=True)
class PtqConfig:
  """Post-training IAO quantization of the float run ``from_run``: ``batches`` shuffled
  training batches of ``batch_size`` through the ``method`` observers, then frozen."""

  from_run: str
  out: str
  method: str = "percentile"
  w_bits: int = 8
  a_bits: int = 8
  batches: int = 200
  batch_size: int = 32
  fold_bn: bool = True
  data_dir: str | None = None
  seed: int = 0  # of the calibration batch order

  def __post_init__(self):
    _validated(self)

  def _validate(self):
    if self.method not in PTQ_METHODS:
      raise ValueError(f"unknown calibration method {self.method!r}; choose one of {list(PTQ_METHODS)}")
    _check_bits("w_bits", self.w_bits, float_ok=False)
    _check_bits("a_bits", self.a_bits, float_ok=False)
    _check_at_least_1(self, "batches", "batch_size")
    _check_seed(self.seed)
    _check_out(self.out)


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """Network slimming of the float run ``from_run``: remove ``percent`` of the prunable
  channels (counts rounded to a multiple of ``regular``); ``compensate_beta`` folds the
  pruned channels' ReLU(beta) into the next conv's bias (micronet drops it)."""

  from_run: str
  out: str
  percent: float = 0.5
  regular: int = 1
  compensate_beta: bool = True
  data_dir: str | None = None  # for the accuracy report

  def __post_init__(self):
    _validated(self)

  def _validate(self):
    if not 0.0 <= self.percent < 1.0:
      raise ValueError(f"percent (--percent) must be in [0, 1), got {self.percent}")
    if self.regular < 1:
      raise ValueError(f"regular (--regular) must be >= 1, got {self.regular}")
    _check_out(self.out)


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
  """The deploy artifact of ``from_run`` in ``out``: integer-only for an IAO run, BN-fused
  and bit-packed for a binary/ternary one."""

  from_run: str
  out: str
  data_dir: str | None = None
  format: str = "stablehlo"  # "onnx": also OUT/integer_model.onnx (mj.export_onnx), integer deploys only

  def __post_init__(self):
    _validated(self)

  def _validate(self):
    if self.format not in DEPLOY_FORMATS:
      raise ValueError(f"format must be one of {', '.join(DEPLOY_FORMATS)}, got {self.format!r}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Test accuracy of the artifact in ``artifact`` (written by convert), on the first
  ``limit_test`` test images (None: all)."""

  artifact: str
  data_dir: str | None = None
  limit_test: int | None = None

  def __post_init__(self):
    _validated(self)

  def _validate(self):
    _check_at_least_1(self, "limit_test")
