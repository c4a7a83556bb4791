"""QAT overhead: the train loop of every quantizer family against its float model.

    python benchmarks/qat_overhead.py [--batch-size 128] [--chunk 50] [--rounds 7]
    python benchmarks/qat_overhead.py --families "float,IAO W8A8" --rounds 2 --chunk 5   # quick

Every model is built the way ``micronet-jax train`` builds it (``recipes.build`` from a
``TrainConfig``, binary weights centred and clipped after each step), on LeNet; IAO
with BatchNorm folding runs on NIN at reduced width (``--nin-cfg``), against its own
float NIN. The primary number is the scan loop the trainer runs: ``train.train_chunk``
over ``--chunk`` steps of a dataset held on device, timed as a whole. The per-step
number (``train.train_step`` dispatched once per step, each waited for) is shown too
with ``--per-step``.

All variants live in one process and are timed in interleaved rounds (each round times
every variant once, in a rotated order), so a slow spell of a shared machine hits every
variant alike. The ratio reported is the median over rounds of (variant time / its
float model's time in the same round): paired, so machine drift cancels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax import models
from micronet_jax._src.flax.centering import center_clip_projection
from micronet_jax._src.flax.transform import quantize_model
from micronet_jax.app import recipes, train
from micronet_jax.app.config import TrainConfig

NIN_SMALL = (24, 20, 12, 24, 24, 24, 24, 24)  # NIN at 1/8 width: it fits the 2-core budget

# family -> (TrainConfig fields, name of the float variant it is compared with)
FAMILIES: dict[str, tuple[dict[str, Any], str]] = {
    "float": (dict(quant="float"), "float"),
    "DoReFa W8A8": (dict(quant="dorefa", w_bits=8, a_bits=8), "float"),
    "IAO W8A8": (dict(quant="iao", w_bits=8, a_bits=8), "float"),
    "binary W / float A": (dict(quant="binary", w_bits=1, a_bits=32), "float"),
    "ternary W / float A": (dict(quant="ternary", w_bits=2, a_bits=32), "float"),
    # W1A1 nets have no ReLU and no dropout (the sign replaces them): the float model of
    # the same architecture is LeNet with act=identity, dropout 0 (``float (W1A1 arch)``).
    "float (W1A1 arch)": (dict(quant="float"), "float (W1A1 arch)"),
    "W1A1": (dict(quant="binary", w_bits=1, a_bits=1), "float (W1A1 arch)"),
    "float NIN": (dict(quant="float", model="nin"), "float NIN"),
    "IAO W8A8 BN-folded NIN": (dict(quant="iao", w_bits=8, a_bits=8, model="nin", fold_bn=True), "float NIN"),
}


def build_state(fields: dict[str, Any], family: str, x0: jax.Array, nin_cfg: tuple[int, ...]):
  """The TrainState ``micronet-jax train`` would start from for ``fields``."""
  fields = dict(fields)
  if fields.get("model") == "nin":
    fields["model_cfg"] = nin_cfg
  config = TrainConfig(**fields)
  kwargs = recipes.model_kwargs(config)
  if family == "float (W1A1 arch)":  # the float twin of the W1A1 net: same knobs as it
    kwargs = recipes.model_kwargs(TrainConfig(quant="binary", w_bits=1, a_bits=1))
  model = models.get_model(config.model, **kwargs)
  rules = recipes.rules(config)
  net = quantize_model(model, rules) if rules else model
  project = center_clip_projection(net, x0, train=False)
  variables = jax.jit(lambda k: net.init(k, x0, train=False))(jax.random.key(0))
  variables = recipes.init_quantizer_params(net, variables, x0)
  return train.create_train_state(net.apply, variables, train.make_optimizer(1e-3), project=project)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--chunk", type=int, default=50, help="steps per timed train_chunk scan")
  p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
  p.add_argument("--per-step", type=int, default=0, metavar="N",
                 help="also time N single dispatched train_step calls per variant and round (default 0: off)")
  p.add_argument("--families", default=",".join(FAMILIES),
                 help="comma-separated subset of: " + ", ".join(FAMILIES) + " (their float models are added)")
  p.add_argument("--nin-cfg", default=",".join(map(str, NIN_SMALL)), help="NIN widths for the folded-BN family")
  p.add_argument("--nin-chunk", type=int, default=3,
                 help="steps per timed chunk for the NIN pair (a NIN step costs tens of LeNet steps)")
  args = p.parse_args()

  wanted = [f.strip() for f in args.families.split(",") if f.strip()]
  unknown = [f for f in wanted if f not in FAMILIES]
  if unknown:
    p.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
  names = [f for f in FAMILIES if f in wanted or f in {FAMILIES[w][1] for w in wanted}]
  nin_cfg = tuple(int(c) for c in args.nin_cfg.split(","))

  rng = np.random.default_rng(0)
  n = args.chunk * args.batch_size  # one chunk's worth of distinct examples
  x_all = jnp.asarray(rng.normal(size=(n, 28, 28, 1)).astype(np.float32))  # LeNet and NIN alike
  y_all = jnp.asarray(rng.integers(0, 10, n).astype(np.int32))
  order = jnp.asarray(rng.permutation(n).reshape(args.chunk, args.batch_size).astype(np.int32))
  # Per variant: the (steps, batch) index array of its timed chunk.
  orders = {name: order[: args.nin_chunk] if FAMILIES[name][0].get("model") == "nin" else order
            for name in names}
  x0 = x_all[: args.batch_size]

  states, compile_s = {}, {}
  for name in names:
    states[name] = build_state(FAMILIES[name][0], name, x0, nin_cfg)
    t0 = time.perf_counter()
    states[name], m = train.train_chunk(states[name], x_all, y_all, orders[name])  # compile + warm-up
    jax.block_until_ready(m)
    if args.per_step:
      states[name], m = train.train_step(states[name], x0, y_all[: args.batch_size])
      jax.block_until_ready(m)
    compile_s[name] = time.perf_counter() - t0

  chunk_t = {k: [] for k in names}
  step_t = {k: [] for k in names}
  for r in range(args.rounds):
    for name in names[r % len(names):] + names[: r % len(names)]:  # rotated order
      t0 = time.perf_counter()
      states[name], m = train.train_chunk(states[name], x_all, y_all, orders[name])
      jax.block_until_ready(m)
      chunk_t[name].append((time.perf_counter() - t0) / len(orders[name]))
      ts = []
      for i in range(args.per_step):
        xb, yb = x_all[order[i]], y_all[order[i]]
        jax.block_until_ready((xb, yb))
        t0 = time.perf_counter()
        states[name], m = train.train_step(states[name], xb, yb)
        jax.block_until_ready(m)
        ts.append(time.perf_counter() - t0)
      if ts:
        step_t[name].append(statistics.median(ts))

  def ratio(times, name):
    """'median (min-max)' of the per-round ratios to the float model."""
    rs = [a / b for a, b in zip(times[name], times[FAMILIES[name][1]])]
    return f"{statistics.median(rs):.3f}x ({min(rs):.2f}-{max(rs):.2f})"

  load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
  print(f"batch {args.batch_size}, train_chunk of {args.chunk} steps, {args.rounds} rounds, "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}, {os.cpu_count()} cpus), "
        f"jax {jax.__version__}, NIN cfg {nin_cfg} ({args.nin_chunk}-step chunks), load average {' '.join(load)}")
  head = "| family | model | float model | scan ms/step | QAT/float scan, median (range) |"
  sep = "|---|---|---|---|---|"
  if args.per_step:
    head += " dispatch ms/step | QAT/float dispatch, median (range) |"
    sep += "---|---|"
  print(head)
  print(sep)
  for name in names:
    model = "NIN" if FAMILIES[name][0].get("model") == "nin" else "LeNet"
    row = (f"| {name} | {model} | {FAMILIES[name][1]} | {1e3 * statistics.median(chunk_t[name]):.2f} "
           f"| {ratio(chunk_t, name)} |")
    if args.per_step:
      row += f" {1e3 * statistics.median(step_t[name]):.2f} | {ratio(step_t, name)} |"
    print(row)
  print("first call (compile + one chunk), s: " + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items()))


if __name__ == "__main__":
  main()
