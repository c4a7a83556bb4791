"""Integer-only vs float inference: images per second of the jitted eval forward on CPU.

    python benchmarks/integer_inference.py [--batch-size 256] [--repeats 30]

For LeNet and a wider conv net (NIN at half width, BatchNorm folded), in one process:
the float model's eval forward, the fake-quant IAO W8A8 eval forward, and
``integer_apply`` of the converted model (int8 conv/dot with int32 accumulation). The
quantized models are calibrated on random inputs (speed does not depend on the
weights). Each forward is timed ``repeats`` times after a warm-up, interleaved; the
median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax import models

from micronet_jax._src.core import rules
from micronet_jax._src.flax.calibrate import calibrate
from micronet_jax._src.deploy.integer import convert, integer_apply
from micronet_jax._src.flax.transform import quantize_model, quantize_variables

NETS = {
    "LeNet": (models.LeNet(), False),
    "NIN/2 (BN folded)": (models.NIN(cfg=(96, 80, 48, 96, 96, 96, 96, 96)), True),
}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--repeats", type=int, default=30)
  args = p.parse_args()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(args.batch_size, 28, 28, 1)).astype(np.float32)
  print(f"batch {args.batch_size}, {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
  print("| network | forward | median ms/batch | images/s | speed-up vs float |")
  print("|---|---|---|---|---|")
  for name, (model, fold) in NETS.items():
    variables = model.init(jax.random.key(0), jnp.asarray(x[:1]), train=False)
    qmodel = quantize_model(model, rules.iao_rules(8, 8, fold_bn=fold))
    qvars = quantize_variables(qmodel, variables, jnp.asarray(x[:1]), train=False)
    qvars = calibrate(qmodel, qvars, [jnp.asarray(x[i:i + 32]) for i in range(0, 128, 32)])
    deploy = convert(qmodel, qvars, jnp.asarray(x[:2]))
    xq = deploy.quantize_input(x)
    fns = {
        "float": (jax.jit(lambda v, x: model.apply(v, x, train=False)), (variables, jnp.asarray(x))),
        "fake-quant W8A8": (jax.jit(lambda v, x: qmodel.apply(v, x, train=False)), (qvars, jnp.asarray(x))),
        "integer W8A8": (jax.jit(integer_apply), (deploy, xq)),
    }
    times = {k: [] for k in fns}
    for f, a in fns.values():
      for _ in range(3):
        jax.block_until_ready(f(*a))
    for _ in range(args.repeats):
      for k, (f, a) in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(*a))
        times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["float"])
    for k, ts in times.items():
      med = statistics.median(ts)
      print(f"| {name} | {k} | {1e3 * med:.2f} | {args.batch_size / med:,.0f} | {base / med:.2f}x |")


if __name__ == "__main__":
  main()
