"""Plain Linen models that know nothing about quantization or pruning.

All are called as ``model.apply(variables, x, train=bool)`` on NHWC inputs and return
logits. Widths are fields (``cfg``, ``channels``, ``widths``) so a pruned network can be
rebuilt from its config.
"""

from micronet_jax.models.lenet import LeNet
from micronet_jax.models.nin import NIN, NIN_CFG, NIN_GC_CFG, NINGC, channel_shuffle
from micronet_jax.models.resnet import BasicBlock, BottleNeck, ResNet, resnet18, resnet34, resnet50

MODELS = {
    "lenet": LeNet,
    "nin": NIN,
    "nin_gc": NINGC,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}


def knobs(name: str) -> tuple[str, ...]:
  """The constructor fields of model ``name`` an application may set (its ``KNOBS``).

  Each model declares them, so that a recipe (``micronet_jax.app.recipes``) asks the model
  instead of knowing the zoo; a factory (``resnet18``, ...) declares none.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  return tuple(getattr(MODELS[name], "KNOBS", ()))


def get_model(name: str, num_classes: int = 10, **kwargs):
  """A model by name; ``kwargs`` go to its constructor (e.g. ``cfg=...`` for nin)."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  return MODELS[name](num_classes=num_classes, **kwargs)
