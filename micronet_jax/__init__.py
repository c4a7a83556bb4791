"""micronet-jax: quantization-aware training, PTQ and integer inference for JAX/Flax."""

from micronet_jax.binary import (
    BinaryActivation,
    BinaryWeight,
    TernaryWeight,
    binary_weight,
    center_clip,
    center_clip_projection,
    ternary_weight,
)
from micronet_jax.binary_deploy import FusedModel, PackedKernel, deploy, fuse_bn, pack_variables
from micronet_jax import calibrate, ops, prune, stats  # modules: mj.calibrate.calibrate, mj.ops.Add, ...
from micronet_jax.convert import Deploy, convert, integer_apply
from micronet_jax.layers import QuantConv, QuantConvTranspose, QuantDense
from micronet_jax.observers import MinMax, MovingAverageMinMax, RangeState
from micronet_jax.quantizers import (
    AffineActivation,
    AffineWeight,
    DoReFaActivation,
    DoReFaWeight,
    affine_fake_quant,
    affine_qparams,
    dorefa_activation,
    dorefa_weight,
)
from micronet_jax.stats import ModelStats, model_stats
from micronet_jax.rules import QuantRule, binary_rules, dorefa_rules, iao_rules, preset, ternary_rules
from micronet_jax.ste import clipped_round_ste, round_half_away, round_ste, sign_ste
from micronet_jax.transform import QuantizedModel, quantize_model, quantize_variables, summary

__version__ = "0.1.0"
