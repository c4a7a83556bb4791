"""Recipes: a ``TrainConfig`` -> the model, its quantization rules and the optimizer.

The recipe does not know the zoo: a model declares the constructor fields an
application may set (``KNOBS``, read through ``models.knobs``), and the recipe sets the
ones a config asks for: ``cfg`` (the config's ``model_cfg``), ``act`` (the identity in
front of binary activations, so that the sign sees the pre-activation) and
``dropout_rate`` (0 in front of binary activations). A config that needs a knob the
model lacks fails with the models that have it.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import traverse_util

from micronet_jax import models
from micronet_jax._src.core import binary as binary_lib
from micronet_jax._src.core import rules as rules_lib
from micronet_jax._src.flax.calibrate import make_observer
from micronet_jax._src.flax.transform import QuantizedModel, quantize_model, quantize_variables
from micronet_jax._src.prune import slimming as prune_lib
from micronet_jax.app import train as train_lib
from micronet_jax.app.config import BINARY_BITS, TrainConfig
from micronet_jax.app.errors import ConfigError

# Which layers the binary preset counts: micronet's convs only, or also dense layers for
# networks with only two convs (LeNet: conv1 and the classifier float, conv2 and fc1 binary).
# A placement choice of the recipe, not a property of the model, so it stays here.
BINARY_LAYERS = {"lenet": "all"}


def _having(knob: str) -> str:
  """The models that declare ``knob``, for an error message: 'lenet, nin or nin_gc'."""
  names = sorted(n for n in models.MODELS if knob in models.knobs(n))
  return " or ".join(filter(None, (", ".join(names[:-1]), names[-1]))) if names else "no model"


def model_kwargs(config: TrainConfig) -> dict[str, Any]:
  """The constructor fields ``config`` sets on its model, each one a declared knob."""
  kwargs: dict[str, Any] = {}
  if config.model_cfg is not None:
    if "cfg" not in models.knobs(config.model):
      raise ConfigError(f"model {config.model} takes no channel config")
    kwargs["cfg"] = config.model_cfg
  if config.quant in BINARY_BITS and config.a_bits == 1:  # sign replaces the ReLUs (see binary.py)
    if "act" not in models.knobs(config.model):
      raise ConfigError(f"model {config.model} has no `act` field to replace its ReLUs by the sign: binary "
                        f"activations (a_bits 1) need {_having('act')} (or a_bits 32)")
    kwargs["act"] = binary_lib.identity
    # Dropout in front of a sign is not dropout: sign(0) = +1, so every dropped unit
    # reads +1, a biased corruption the evaluated network never sees (LeNet W1A1 on
    # Fashion-MNIST: 79.2% with LeNet's dropout 0.5, 84.7% without).
    if "dropout_rate" in models.knobs(config.model):
      kwargs["dropout_rate"] = 0.0
  return kwargs


def rules(config: TrainConfig) -> list | None:
  """The quantization rules of ``config`` (None or empty: the float model)."""
  if config.quant in BINARY_BITS:
    return rules_lib.binary_rules(config.w_bits, config.a_bits, layers=BINARY_LAYERS.get(config.model, "conv"))
  if config.quant == "iao":
    return rules_lib.iao_rules(config.w_bits, config.a_bits, fold_bn=config.fold_bn,
                               observer=make_observer(config.observer, config.a_bits))
  if config.quant == "lsq":
    return rules_lib.lsq_rules(config.w_bits, config.a_bits, fold_bn=config.fold_bn, per_channel=config.per_channel)
  if config.quant == "pact":
    return rules_lib.pact_rules(config.w_bits, config.a_bits, per_channel=config.per_channel)
  return rules_lib.preset(config.quant, config.w_bits, config.a_bits)


def build(config: TrainConfig, num_classes: int = 10) -> tuple[Any, Any]:
  """(float model, model to train: the float one or its quantized version)."""
  model = models.get_model(config.model, num_classes=num_classes, **model_kwargs(config))
  r = rules(config)
  return model, (quantize_model(model, r) if r else model)


def init_quantizer_params(net: Any, variables: dict, x_first: Any) -> dict:
  """``variables`` with the quantizers' own params (LSQ's steps and offsets, PACT's alpha)
  initialised from the weights and ``x_first``, the first training batch, as the papers do;
  ``variables`` itself when ``net`` has no such params (float, DoReFa, IAO, binary)."""
  if not isinstance(net, QuantizedModel):
    return variables
  key = jax.random.key(0)
  float_shapes = jax.eval_shape(lambda: net.model.init(key, x_first[:1], train=False))
  float_params = traverse_util.flatten_dict(float_shapes.get("params", {}))
  params = traverse_util.flatten_dict(variables.get("params", {}))
  if set(params) == set(float_params):
    return variables
  float_vars = {**{c: t for c, t in variables.items() if c != "quant_stats"},
                "params": traverse_util.unflatten_dict({k: v for k, v in params.items() if k in float_params})}
  fresh = quantize_variables(net, float_vars, x_first, train=False)
  return {**fresh, "quant_stats": variables["quant_stats"]} if "quant_stats" in variables else fresh


def learning_rate(config: TrainConfig, total_steps: int) -> float | optax.Schedule:
  """``config.lr`` held constant, or cosine-decayed from it to 0 over ``total_steps``.

  Binary and ternary weights need the decay most: with a constant rate their latent
  weights keep crossing zero, so the sign pattern (and the test accuracy) jumps between
  epochs until the last one.
  """
  if config.lr_schedule == "cosine":
    return optax.cosine_decay_schedule(config.lr, max(total_steps, 1))
  return config.lr


def optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  """Adam at ``learning_rate`` with the config's weight decay, after the network-slimming
  sparsity term on BatchNorm scales when ``config.sparsity`` is set."""
  tx = train_lib.make_optimizer(learning_rate(config, total_steps), config.weight_decay)
  return optax.chain(prune_lib.bn_sparsity(config.sparsity), tx) if config.sparsity else tx
