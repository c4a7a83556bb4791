"""Ops a model marks so that quantization and integer inference see them: ``Add`` (a
residual add on one shared scale), and ``global_avg_pool`` (an integer-exact mean).
In float they are exactly ``a + b`` and a mean."""

from micronet_jax._src.flax.ops import Add, global_avg_pool

__all__ = ["Add", "global_avg_pool"]
