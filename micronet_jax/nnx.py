"""Flax NNX: quantize an unmodified ``nnx.Module`` with the same rules and quantizer specs
as a Linen model.

    import micronet_jax as mj
    import micronet_jax.nnx as mjn

    qmodel = mjn.quantize(model, mj.iao_rules(8, 8, fold_bn=True), x)   # a quantized copy
    ...train qmodel with nnx.Optimizer + nnx.jit; model.train() / model.eval()...
    deploy = mjn.convert(qmodel, x)                                      # integer deploy
    logits = mj.integer_apply(deploy, deploy.quantize_input(x))

``micronet_jax.quantize_model(model, rules, x)`` is the same as ``quantize`` for an NNX
model. Every layer kind Linen quantizes is quantized: ``nnx.Linear``, ``LinearGeneral``,
``Einsum``, ``Embed`` (and ``attend``), ``Conv``, ``ConvTranspose``, user subclasses of
them, and the QK^T/PV products of ``nnx.MultiHeadAttention`` (children ``qk_product`` and
``pv_product``, kind ``"attention"``). ``QuantStats`` is the ``nnx.Variable`` type of the
observed ranges; ``Add`` marks a residual add, as ``micronet_jax.ops.Add`` does in Linen.
"""

from micronet_jax._src.nnx.bridge import QuantStats, linen_variables
from micronet_jax._src.nnx.attention import QuantMultiHeadAttention, QuantProduct
from micronet_jax._src.nnx.layers import (Add, FoldedBatchNorm, QuantAdd, QuantConv, QuantConvTranspose, QuantEinsum,
                                          QuantEmbed, QuantLinear, QuantLinearGeneral)
from micronet_jax._src.nnx.transform import calibrate, convert, plan, quantize, summary
from micronet_jax._src.nnx.twin import LinenTwin, twin

__all__ = [
    "quantize", "plan", "summary", "calibrate", "convert",
    "QuantStats", "Add", "QuantLinear", "QuantLinearGeneral", "QuantEinsum", "QuantEmbed", "QuantConv",
    "QuantConvTranspose", "FoldedBatchNorm", "QuantAdd", "QuantMultiHeadAttention", "QuantProduct",
    "linen_variables", "twin", "LinenTwin",
]
