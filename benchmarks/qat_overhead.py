"""QAT overhead: median milliseconds per jitted train step, float vs quantized LeNet.

    python benchmarks/qat_overhead.py [--batch-size 128] [--steps 200] [--rounds 5]

All variants run in one process on the same batch. Steps are timed one by one (each
waits for its result), in interleaved rounds so that drift of the machine's speed hits
every variant alike; the median over all timed steps is reported, with the ratio to
the float step.
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

from micronet_jax.app import train
from micronet_jax._src.flax.transform import quantize_model

VARIANTS = {
    "float": (),
    "DoReFa W8A8": rules.dorefa_rules(8, 8),
    "IAO W8A8": rules.iao_rules(8, 8),
}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--steps", type=int, default=200, help="timed steps per variant in total")
  p.add_argument("--rounds", type=int, default=5, help="interleaved rounds the steps are split into")
  p.add_argument("--warmup", type=int, default=20)
  args = p.parse_args()

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.batch_size, 28, 28, 1)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 10, args.batch_size).astype(np.int32))
  model = models.LeNet()
  states = {}
  for name, r in VARIANTS.items():
    net = quantize_model(model, r) if r else model
    variables = net.init(jax.random.key(0), x, train=False)
    states[name] = train.create_train_state(net.apply, variables, train.make_optimizer(1e-3))
    for _ in range(args.warmup):
      states[name], m = train.train_step(states[name], x, y)
    jax.block_until_ready(m)

  times = {name: [] for name in VARIANTS}
  per_round = max(1, args.steps // args.rounds)
  for _ in range(args.rounds):
    for name in VARIANTS:
      for _ in range(per_round):
        t0 = time.perf_counter()
        states[name], m = train.train_step(states[name], x, y)
        jax.block_until_ready(m)
        times[name].append(time.perf_counter() - t0)

  base = statistics.median(times["float"])
  print(f"LeNet train step, batch {args.batch_size}, {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}), jax {jax.__version__}, {per_round * args.rounds} steps each")
  print("| variant | median ms/step | ratio to float |")
  print("|---|---|---|")
  for name, ts in times.items():
    med = statistics.median(ts)
    print(f"| {name} | {1e3 * med:.2f} | {med / base:.2f}x |")


if __name__ == "__main__":
  main()
