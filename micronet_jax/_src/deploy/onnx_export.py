"""ONNX export of an integer ``Deploy``: the jaxpr of ``integer_apply`` written as an ONNX
graph of integer operators, for onnxruntime (CPU) or any runtime with the same ops.

The deploy's forward is traced once (``jax.make_jaxpr``, fixed batch size) and every
primitive is written as ONNX (``onnx_ops.PRIMITIVES``); nested ``jit`` and custom-JVP
calls are inlined. An equation whose inputs are all constants (the deploy's arrays, and
everything the requantization derives from its shifts) is evaluated here by JAX itself
and stored as an initializer, so the graph keeps only the arithmetic on activations and
a ``select_n`` with a constant, uniform predicate keeps only the branch it selects.

Every op is integer-exact in both JAX and ONNX, so the runtime's outputs equal
``integer_apply``'s bit for bit: int8 x int8 -> int32 convolutions and matmuls are
``ConvInteger`` / ``MatMulInteger`` (exact int32 accumulation), the fixed-point
requantization is int32 ``Mul``/``Add``/``Sub``/``BitwiseAnd``/``Max``/``Min``/``Where``,
with an arithmetic right shift by k written as the exact division
(x - Mod(x, 2^k)) / 2^k (ONNX's ``BitShift`` is unsigned only, its integer ``Div``
truncates), a left shift as a wrapping multiply by 2^k, and max-pooling as the ``Max``
of strided slices (onnxruntime's ``MaxPool`` has no int32 kernel). The one float op is
the final ``logits = out_scale * float(acc)``, a float32 multiply in both runtimes.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from micronet_jax._src.deploy import onnx_ops
from micronet_jax._src.deploy.integer import Deploy, integer_apply

OPSET = 18  # BitwiseAnd, ReduceSum/ReduceMax with axes inputs
IR_VERSION = 9


def _sub_jaxpr(eqn: Any) -> Any:
  """The ClosedJaxpr a call-like equation (jit, custom_jvp_call, ...) runs, or None."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    j = eqn.params.get(key)
    if isinstance(j, jcore.ClosedJaxpr):
      return j
  return None


class _Writer:
  """Walks a jaxpr; ``env`` maps each variable to a numpy constant or an ONNX tensor name."""

  def __init__(self, onnx: Any):
    self.g = onnx_ops.Graph(onnx)

  def read(self, env: dict, v: Any) -> Any:
    if isinstance(v, jcore.Literal):
      return np.asarray(v.val, v.aval.dtype)
    return env[v]

  def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    env: dict = {}
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = np.asarray(c)
    for v, a in zip(jaxpr.invars, args):
      env[v] = a
    for eqn in jaxpr.eqns:
      ins = [self.read(env, v) for v in eqn.invars]
      outs = self.eqn(eqn, ins)
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [self.read(env, v) for v in jaxpr.outvars]

  def eqn(self, eqn: Any, ins: list[Any]) -> list[Any]:
    sub = _sub_jaxpr(eqn)
    if sub is not None and eqn.primitive.name != "custom_vjp_call":
      return self.run(sub.jaxpr, sub.consts, ins)
    if all(isinstance(x, np.ndarray) for x in ins):  # constant folding, by JAX's own arithmetic
      out = eqn.primitive.bind(*(jnp.asarray(x) for x in ins), **eqn.params)
      return [np.asarray(o) for o in out] if eqn.primitive.multiple_results else [np.asarray(out)]
    name = eqn.primitive.name
    fn = onnx_ops.PRIMITIVES.get(name)
    if fn is None:
      raise NotImplementedError(f"export_onnx: the JAX primitive {name!r} has no ONNX translation "
                                f"(supported: {', '.join(sorted(onnx_ops.PRIMITIVES))})")
    out = fn(self.g, ins, [v.aval for v in eqn.invars], [v.aval for v in eqn.outvars], **eqn.params)
    return out if isinstance(out, list) else [out]


def function_to_onnx(fn: Callable, specs: Sequence[jax.ShapeDtypeStruct], input_names: Sequence[str],
                     output_names: Sequence[str]) -> Any:
  """``fn`` (JAX ops on arrays of ``specs``) as a checked ``onnx.ModelProto`` with inputs
  ``input_names`` and outputs ``output_names``."""
  import onnx  # an optional dependency: pip install micronet-jax[onnx]
  from onnx import helper

  closed = jax.make_jaxpr(fn)(*specs)
  w = _Writer(onnx)
  inputs = list(input_names)
  outs = w.run(closed.jaxpr, closed.consts, inputs)
  avals = [v.aval for v in closed.jaxpr.outvars]
  if len(avals) != len(output_names):
    raise ValueError(f"{len(avals)} outputs, {len(output_names)} names")
  for out, name in zip(outs, output_names):
    w.g.identity(w.g.name_of(out), name)

  def info(name, a):
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(a.dtype)), a.shape)

  graph = helper.make_graph(w.g.nodes, "micronet_jax", [info(n, s) for n, s in zip(inputs, specs)],
                            [info(n, a) for n, a in zip(output_names, avals)], initializer=w.g.initializers)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="micronet_jax")
  model.ir_version = IR_VERSION
  onnx.checker.check_model(model)
  return model


def export_onnx(deploy: Deploy, input_shape: Sequence[int], *, batch_size: int = 1) -> bytes:
  """The serialized ONNX model (``onnx.ModelProto`` bytes) of ``integer_apply(deploy, .)``.

  Input ``x``: (batch_size, *input_shape) uint8 (or int8, as the deploy's input grid), the
  codes of ``deploy.quantize_input``. Outputs ``acc`` (int32, ``integer_apply(...,
  dequantize=False)``) and ``logits`` (float32, ``integer_apply``'s). The batch size is
  fixed at export (the traced reshapes name it). Needs the ``onnx`` package (the
  ``onnx`` extra); checked with onnxruntime, whose outputs equal ``integer_apply``'s.
  """
  if not isinstance(deploy, Deploy):
    raise TypeError(f"export_onnx expects an integer Deploy (mj.convert), got {type(deploy).__name__}")
  dtype = np.uint8 if deploy.input_range[0] >= 0 else np.int8
  spec = jax.ShapeDtypeStruct((int(batch_size), *(int(d) for d in input_shape)), dtype)

  def forward(xq):
    acc = integer_apply(deploy, xq, dequantize=False)
    return acc, acc * deploy.out_scale  # integer_apply's own dequantization

  return function_to_onnx(forward, [spec], ["x"], ["acc", "logits"]).SerializeToString()
