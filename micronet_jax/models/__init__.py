"""Plain Linen models that know nothing about quantization. All take ``(x, train)``."""

from micronet_jax.models.lenet import LeNet

MODELS = {"lenet": LeNet}


def get_model(name: str, num_classes: int = 10, **kwargs):
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  return MODELS[name](num_classes=num_classes, **kwargs)
