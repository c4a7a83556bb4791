"""Ops a model marks so that quantization and integer inference see them: ``Add`` (a
residual add on one shared scale), ``ReLU6`` (a clamp on the integer grid) and
``global_avg_pool`` (an integer-exact mean). In float they are exactly ``a + b``,
``jax.nn.relu6`` and a mean."""

from micronet_jax._src.flax.ops import Add, ReLU6, global_avg_pool

__all__ = ["Add", "ReLU6", "global_avg_pool"]
