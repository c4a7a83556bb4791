"""Low-bit QAT on Fashion-MNIST: LeNet and NIN at W4A4, W3A3 and W2A2 for DoReFa, IAO,
LSQ and PACT, fine-tuned from the same float model, over several seeds.

    python experiments/fashion_mnist_lowbit.py                       # the table (2 seeds, ~40 min on 2 cores)
    python experiments/fashion_mnist_lowbit.py --networks lenet --methods lsq --bits 4 --seeds 1

Per network and seed, every run is a ``TrainConfig`` through the train pipeline (the
report lists each one's ``micronet-jax`` command):

1. ``float``: ``--float-epochs`` from scratch (lr 1e-2, cosine);
2. ``float+ft``: the float model trained ``--qat-epochs`` more, with the QAT runs' optimizer
   and schedule: the baseline every quantized run is compared with, so that a delta
   measures quantization and not the extra epochs;
3. each method at each bit width: ``--qat-epochs`` from the float weights (lr ``--lr``,
   cosine), the fine-tuning the LSQ paper does;
4. each LSQ run converted to the integer deploy (``micronet-jax convert``): its accuracy
   and its agreement with the fake-quant model on every test image.

Placements are each method's own (``micronet_jax._src.core.rules``): dorefa keeps the first
layer float (micronet's); iao quantizes every layer and the image input; lsq every layer,
the first and last at 8 bits (the paper's choice), the image input on an LSQ+ grid, one
weight step per tensor (the paper's) or, lsq-pc, per output channel (``--per-channel``); pact
keeps the first layer float, with LSQ weights and PACT activations. On NIN, iao and lsq
fold the BatchNorms into the convs (so the model converts to integers).

Writes ``RESULTS_DIR/fashion_mnist_lowbit.md``, ``.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from micronet_jax.app import plots, runs
from micronet_jax.app.config import ConvertConfig, TrainConfig
from micronet_jax.app.table import BUDGETS, format_mean_sd, mean_sd
from report import write_report
from steps import run_step

NETWORKS = ("lenet", "nin")
METHODS = ("dorefa", "iao", "lsq", "lsq-pc", "pact")  # lsq-pc: LSQ with one weight step per output channel
BITS = (4, 3, 2)
TARGETS = {(m, b): t for m in ("lsq", "lsq-pc") for b, t in ((4, 0.3), (2, 2.0))}  # points below float+ft, issue 14
FOLDS = ("iao", "lsq")  # methods whose NIN runs fold BatchNorm
CONVERTED = ("lsq", "lsq-pc")
NIN_CFG = BUDGETS["small"].nin_cfg
HERE = os.path.dirname(os.path.abspath(__file__))


def run_name(method: str, bits: int) -> str:
  return f"{method}-w{bits}a{bits}"


def seed_steps(net: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
  """step name -> a function making its config, in run order (a step may read the run
  made by the step before it)."""
  d = os.path.join(args.runs_dir, net, f"seed{seed}")
  common = dict(seed=seed, data_dir=args.data_dir, limit_train=args.nin_limit_train if net == "nin" else None)
  base = f"{d}/float"
  s: dict[str, Any] = {
      "float": lambda: TrainConfig(model=net, model_cfg=NIN_CFG if net == "nin" else None, quant="float",
                                   epochs=args.float_epochs, lr=1e-2, lr_schedule="cosine", out=base, **common),
      "float+ft": lambda: runs.train_config(base, quant="float", epochs=args.qat_epochs, lr=args.lr,
                                            lr_schedule="cosine", out=f"{d}/float-ft", **common),
  }
  for b in args.bits:
    for m in args.methods:
      name = run_name(m, b)
      quant, per_channel = m.removesuffix("-pc"), m.endswith("-pc")
      s[name] = lambda quant=quant, per_channel=per_channel, b=b, name=name: runs.train_config(
          base, quant=quant, w_bits=b, a_bits=b, per_channel=per_channel, epochs=args.qat_epochs, lr=args.lr,
          lr_schedule="cosine", fold_bn=net == "nin" and quant in FOLDS, out=f"{d}/{name}", **common)
      if m in CONVERTED:
        s[f"{name}:deploy"] = lambda name=name: ConvertConfig(f"{d}/{name}", f"{d}/{name}/deploy", args.data_dir)
  return s


def records(results: dict[str, list[dict[str, dict]]], methods, bits) -> list[dict[str, Any]]:
  """One record per (network, run): per-seed accuracies, deltas against the same seed's
  float+ft, and deploy agreement where the run was converted."""
  out = []
  for net, per_seed in results.items():
    for name, method, b in [("float", "float", 32), ("float+ft", "float", 32),
                            *((run_name(m, b), m, b) for b in bits for m in methods)]:
      acc = [100 * r[name]["test_accuracy"] for r in per_seed]
      delta = [a - 100 * r["float+ft"]["test_accuracy"] for a, r in zip(acc, per_seed)]
      deploys = [r[f"{name}:deploy"] for r in per_seed if f"{name}:deploy" in r]
      target = TARGETS.get((method, b))
      out.append(dict(network=net, run=name, method=method, bits=b, accuracy=acc, delta=delta, target=target,
                      met=None if target is None else mean_sd(delta)[0] >= -target,
                      agreement=[100 * x["prediction_agreement"] for x in deploys],
                      deploy_accuracy=[100 * x["deploy_test_accuracy"] for x in deploys]))
  return out


def markdown_table(recs: list[dict[str, Any]]) -> str:
  lines = ["| network | run | W/A bits | test acc (%) | vs float+ft (points) | target | integer deploy acc (%) | "
           "deploy = fake-quant (%) |", "|---|---|---|---|---|---|---|---|"]
  for r in recs:
    bits = "32/32" if r["bits"] == 32 else f"{r['bits']}/{r['bits']}"
    delta = "(baseline)" if r["run"] == "float+ft" else format_mean_sd(r["delta"], "{:+.2f}")
    target = "-" if r["target"] is None else f"≥ -{r['target']:g}: {'met' if r['met'] else 'NOT met'}"
    dep = (format_mean_sd(r["deploy_accuracy"]), format_mean_sd(r["agreement"])) if r["agreement"] else ("-", "-")
    lines.append(f"| {r['network']} | {r['run']} | {bits} | {format_mean_sd(r['accuracy'])} | {delta} | {target} | "
                 f"{dep[0]} | {dep[1]} |")
  return "\n".join(lines)


def plot(recs: list[dict[str, Any]], methods, bits, out: str, title: str) -> str:
  """Test accuracy against bits, one line per method, one panel per network, the float+ft
  model as a dashed line; error bars are the spread over seeds."""
  plt = plots.pyplot()
  nets = list(dict.fromkeys(r["network"] for r in recs))
  fig, axes = plt.subplots(1, len(nets), figsize=(5.5 * len(nets), 4.2), squeeze=False)
  for ax, net in zip(axes[0], nets):
    by = {r["run"]: r for r in recs if r["network"] == net}
    ax.axhline(mean_sd(by["float+ft"]["accuracy"])[0], color="k", ls="--", lw=1, label="float+ft")
    for m in methods:
      ys = [mean_sd(by[run_name(m, b)]["accuracy"]) for b in bits]
      ax.errorbar(list(bits), [y[0] for y in ys], yerr=[y[1] for y in ys], marker="o", capsize=3, label=m)
    ax.set(title=net, xlabel="W/A bits", ylabel="test accuracy (%)", xticks=list(bits))
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  plots.save_figure(fig, out, plt)
  return out


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  p.add_argument("--bits", nargs="+", type=int, default=list(BITS), choices=BITS)
  p.add_argument("--seeds", type=int, default=2, help="run seeds 0..N-1 (default 2)")
  p.add_argument("--float-epochs", type=int, default=3, help="epochs of the float model from scratch (default 3)")
  p.add_argument("--qat-epochs", type=int, default=2,
                 help="epochs of every run from the float weights, float+ft included (default 2)")
  p.add_argument("--lr", type=float, default=1e-3, help="Adam lr of the runs from the float weights (default 1e-3)")
  p.add_argument("--nin-limit-train", type=int, default=10000,
                 help="NIN trains on the first N training images (default 10000; LeNet on all 60000)")
  p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
  p.add_argument("--runs-dir", default="runs/fashion_mnist_lowbit", help="where the run directories go")
  p.add_argument("--results-dir", default=os.path.join(HERE, "results"), help="where the table goes")
  p.add_argument("--reuse", action="store_true", help="reuse finished runs made with the same config")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args()
  if args.seeds < 1:
    p.error(f"--seeds must be at least 1, got {args.seeds}")

  results: dict[str, list[dict[str, dict]]] = {}
  commands = []
  for net in args.networks:
    for seed in range(args.seeds):
      r = {}
      for name, make in seed_steps(net, seed, args).items():
        cmd, r[name] = run_step(f"{net} seed {seed}: {name}", make(), reuse=args.reuse,
                                progress=not args.no_progress)
        commands.append(cmd)
      results.setdefault(net, []).append(r)

  recs = records(results, args.methods, args.bits)
  text = markdown_table(recs)
  print("\n" + text)
  argv = " ".join(sys.argv[1:])
  png = plot(recs, args.methods, args.bits, os.path.join(args.results_dir, "fashion_mnist_lowbit.png"),
             f"Low-bit QAT from float on Fashion-MNIST ({args.seeds} seed(s))")
  write_report(
      args.results_dir, "fashion_mnist_lowbit", title="Low-bit QAT on Fashion-MNIST: DoReFa, IAO, LSQ, PACT",
      intro=f"Produced by `python experiments/fashion_mnist_lowbit.py{' ' + argv if argv else ''}`, which runs, "
      "one after another:",
      commands=commands,
      paragraphs=[
          f"Seeds 0..{args.seeds - 1}; each cell is the mean ± sample standard deviation over the seeds, and each "
          "delta is taken against the same seed's float+ft model before averaging. The float model trains "
          f"{args.float_epochs} epochs from scratch (Adam lr 1e-2, cosine); every other run trains "
          f"{args.qat_epochs} epochs from its weights (Adam lr {args.lr:g}, cosine to 0, batch 128, no weight "
          "decay), float+ft included. LeNet trains on all 60,000 training images, NIN (cfg "
          f"{','.join(map(str, NIN_CFG))}, the compression table's) on the first {args.nin_limit_train:,}; test "
          "accuracy is on the 10,000 test images after the last epoch.",
          "Placements: dorefa keeps the first layer float; iao quantizes every layer and the image input; lsq "
          "every layer, the first and the last at 8 bits (the LSQ paper's), the image input on an LSQ+ grid "
          "(learned offset), one weight step per tensor (lsq-pc: per output channel, `--per-channel`); pact "
          "keeps the first layer float and pairs PACT activations (alpha from the first batch, no L2 penalty) "
          "with LSQ weights. On NIN, iao and lsq fold every BatchNorm into its conv. LSQ "
          "runs are converted to the integer deploy and run by `integer_apply` on every test image.",
      ],
      table=text, after=[f"![accuracy against bits]({os.path.basename(png)})"],
      data={"args": vars(args), "records": recs, "runs": results},
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
