"""micronet-jax: quantization-aware training, PTQ, binary/ternary networks, BN folding,
integer-only inference and channel pruning for JAX/Flax.

The public API is what this module exports (``__all__``); everything under ``_src`` is
private. ``micronet_jax.ops`` (ops a model marks for quantization), ``micronet_jax.models``
(the model zoo) and ``micronet_jax.app`` (training loop, data, runs, the CLI) are public
submodules built on this API.
"""

from micronet_jax._src.core.binary import (BinaryActivation, BinaryWeight, TernaryWeight, binary_weight, center_clip,
                                           ternary_weight)
from micronet_jax._src.core.learned import (LsqActivation, LsqPlusActivation, LsqWeight, PactActivation, grad_scale,
                                            lsq_fake_quant, pact_activation)
from micronet_jax._src.core.observers import MinMax, MovingAverageMinMax, MSEClip, Percentile, RangeState
from micronet_jax._src.core.protocol import AffineGrid, QState, Quantizer
from micronet_jax._src.core.quantizers import (AffineActivation, AffineWeight, DoReFaActivation, DoReFaWeight,
                                               affine_fake_quant, affine_qparams, dorefa_activation, dorefa_weight)
from micronet_jax._src.core.rules import (QuantRule, binary_rules, dorefa_rules, iao_rules, lsq_rules, pact_rules,
                                          preset, ternary_rules)
from micronet_jax._src.core.ste import clipped_round_ste, round_half_away, round_ste, sign_ste
from micronet_jax._src.deploy.binary import FusedModel, PackedKernel, deploy_binary, fuse_bn, pack_variables
from micronet_jax._src.deploy.integer import Deploy, convert, integer_apply
from micronet_jax._src.deploy.onnx_export import export_onnx
from micronet_jax._src.deploy.records import (FoldedBatchNorm, InputGrid, IntAdd, IntClamp, IntConv, IntDense,
                                              Requant, Xnor, XnorConv, nbytes)
from micronet_jax._src.deploy.serialize import export
from micronet_jax._src.flax.calibrate import calibrate, ptq_rules
from micronet_jax._src.flax.centering import center_clip_projection
from micronet_jax._src.flax.layers import QuantConv, QuantConvTranspose, QuantDense
from micronet_jax._src.flax.plan import BatchNormPlan, LayerPlan, ModelPlan
from micronet_jax._src.flax.stats import ModelStats, model_stats
from micronet_jax._src.flax.transform import QuantizedModel, quantize_variables, summary
from micronet_jax._src.nnx.transform import quantize_model  # Linen or NNX
from micronet_jax._src.prune.slimming import (PrunePlan, SlimLayer, bn_sparsity, mask_variables, prune,
                                             prune_variables, select_channels)

__version__ = "0.1.0"

__all__ = [
    # quantizers and their protocol
    "Quantizer", "QState", "AffineGrid",
    "DoReFaWeight", "DoReFaActivation", "AffineWeight", "AffineActivation",
    "BinaryWeight", "TernaryWeight", "BinaryActivation",
    "LsqWeight", "LsqActivation", "LsqPlusActivation", "PactActivation",
    "MinMax", "MovingAverageMinMax", "Percentile", "MSEClip", "RangeState",
    # pure functions
    "round_ste", "clipped_round_ste", "sign_ste", "round_half_away",
    "dorefa_weight", "dorefa_activation", "affine_fake_quant", "affine_qparams",
    "binary_weight", "ternary_weight", "center_clip",
    "lsq_fake_quant", "pact_activation", "grad_scale",
    # rules and the transform
    "QuantRule", "dorefa_rules", "iao_rules", "lsq_rules", "pact_rules", "binary_rules", "ternary_rules", "preset",
    "ptq_rules",
    "quantize_model", "quantize_variables", "QuantizedModel", "summary",
    "ModelPlan", "LayerPlan", "BatchNormPlan",
    "QuantDense", "QuantConv", "QuantConvTranspose",
    "calibrate", "center_clip_projection", "model_stats", "ModelStats",
    # deploy
    "convert", "integer_apply", "Deploy",
    "fuse_bn", "pack_variables", "deploy_binary", "FusedModel", "PackedKernel",
    "export", "export_onnx", "nbytes",
    "IntDense", "IntConv", "IntAdd", "IntClamp", "Requant", "InputGrid", "FoldedBatchNorm", "Xnor", "XnorConv",
    # pruning
    "bn_sparsity", "prune", "select_channels", "prune_variables", "mask_variables", "PrunePlan", "SlimLayer",
]
