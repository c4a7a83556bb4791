"""Epoch time of LeNet float and IAO W8A8 on Fashion-MNIST: micronet-jax against PyTorch/micronet.

    pip install torch==2.13.0          # benchmarks only: torch is not a micronet-jax dependency
    python benchmarks/epoch_time.py [--steps 100] [--rounds 3]
    python benchmarks/epoch_time.py --steps 5 --rounds 1 --limit-train 2000   # quick

An epoch is 60000 examples in batches of 128 (468 steps, the remainder dropped). Each
variant trains ``--steps`` steps of real Fashion-MNIST (the IDX files in
/usr/share/datasets/fashion-mnist, or ``--data-dir``) in every round, and the median time
per step over rounds is scaled to an epoch. Rounds interleave the variants in one
process, so drift of a shared machine hits all of them alike. Timed:

- ``jax scan``: what ``micronet_jax.app.train.fit`` runs: ``train_chunk`` (one jitted
  ``lax.scan`` over a dataset held on device) in chunks of ``--chunk`` steps;
- ``jax dispatch``: ``train_step`` dispatched once per step on batches gathered on device;
- ``torch``: ``benchmarks/torch_micronet.py``'s micronet LeNet and IAO step, on tensors
  held in memory and indexed per batch (no DataLoader workers: the fastest plain loop).

Evaluation is not timed (it is the same forward pass on both sides and micronet's is a
separate loop).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax import models
from micronet_jax._src.core import rules
from micronet_jax._src.flax.transform import quantize_model
from micronet_jax.app import data as data_lib
from micronet_jax.app import train

EPOCH_STEPS = 60000 // 128


def jax_runner(quant: bool, x_all, y_all, order, chunk: int, scan: bool):
  """A function of no arguments that trains ``len(order)`` steps and waits for them."""
  net = quantize_model(models.LeNet(), rules.iao_rules(8, 8)) if quant else models.LeNet()
  variables = net.init(jax.random.key(0), x_all[:2], train=False)
  box = [train.create_train_state(net.apply, variables, train.make_optimizer(1e-3))]

  def run():
    state = box[0]
    if scan:
      for i in range(0, len(order), chunk):
        state, m = train.train_chunk(state, x_all, y_all, order[i:i + chunk])
    else:
      for idx in order:
        state, m = train.train_step(state, x_all[idx], y_all[idx])
    jax.block_until_ready(m)
    box[0] = state
  return run


def torch_runner(quant: bool, x_np: np.ndarray, y_np: np.ndarray, order_np: np.ndarray):
  import torch

  import torch_micronet as tm

  x = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
  y = torch.from_numpy(y_np.astype(np.int64))
  order = torch.from_numpy(order_np.astype(np.int64))
  model, opt = tm.make(quant)

  def run():
    for idx in order:
      loss = tm.train_step(model, opt, x[idx], y[idx])
    float(loss)
  return run


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=100, help="timed steps per variant and round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--chunk", type=int, default=100, help="steps per train_chunk scan (fit's default)")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--data-dir", default=None)
  p.add_argument("--limit-train", type=int, default=None, help="use only the first N training examples")
  p.add_argument("--no-torch", action="store_true", help="time only micronet-jax")
  p.add_argument("--no-scan", action="store_true", help="skip the jax scan loop (slow on XLA:CPU, see RESULTS.md)")
  args = p.parse_args()

  ds = data_lib.load("fashion_mnist", args.data_dir)
  x_np, y_np = ds.x_train[: args.limit_train], ds.y_train[: args.limit_train]
  rng = np.random.default_rng(0)
  order_np = np.stack([rng.choice(len(x_np), args.batch_size, replace=False) for _ in range(args.steps)]).astype(np.int32)
  x_all, y_all, order = jnp.asarray(x_np), jnp.asarray(y_np), jnp.asarray(order_np)

  runners = {}
  for quant, label in ((False, "float"), (True, "IAO W8A8")):
    if not args.no_scan:
      runners[f"jax scan, {label}"] = jax_runner(quant, x_all, y_all, order, args.chunk, scan=True)
    runners[f"jax dispatch, {label}"] = jax_runner(quant, x_all, y_all, order, args.chunk, scan=False)
    if not args.no_torch:
      runners[f"torch (micronet), {label}"] = torch_runner(quant, x_np, y_np, order_np)
  for run in runners.values():  # compile and warm up
    run()

  times = {k: [] for k in runners}
  names = list(runners)
  for r in range(args.rounds):
    for name in names[r % len(names):] + names[: r % len(names)]:
      t0 = time.perf_counter()
      runners[name]()
      times[name].append((time.perf_counter() - t0) / args.steps)

  versions = f"jax {jax.__version__}"
  if not args.no_torch:
    import torch
    versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
  load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
  print(f"LeNet, Fashion-MNIST, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds per variant, "
        f"epoch = {EPOCH_STEPS} steps, {os.cpu_count()} cpus, {versions}, load average {' '.join(load)}")
  print("| loop | model | ms/step | s/epoch | IAO/float |")
  print("|---|---|---|---|---|")
  for name in names:
    loop, label = name.split(", ")
    med = statistics.median(times[name])
    fl = statistics.median(times[f"{loop}, float"])
    print(f"| {loop} | {label} | {1e3 * med:.2f} | {med * EPOCH_STEPS:.1f} | {med / fl:.2f}x |")


if __name__ == "__main__":
  main()
