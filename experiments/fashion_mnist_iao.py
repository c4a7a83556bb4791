"""IAO end to end on Fashion-MNIST: QAT with BN folding, PTQ (each calibration method),
PTQ -> QAFT, and the integer-only accuracy of every quantized model.

    python experiments/fashion_mnist_iao.py --lenet-float runs/fashion_mnist_qat/float \\
        --nin-float runs/fashion_mnist_prune/float

Starts from float runs made by the other two experiments (LeNet: fashion_mnist_qat.py;
NIN/4, a conv+BN network: fashion_mnist_prune.py). The steps are a list of configs
(train, ptq and convert), run one after another through the pipelines; a step that
starts from the run of an earlier one gets its config when it runs. The table (fake-quant and integer test accuracy,
prediction agreement) goes to ``RESULTS_DIR/fashion_mnist_iao.md`` with the commands.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from micronet_jax.app import runs
from micronet_jax.app.config import ConvertConfig, PtqConfig
from report import write_report
from steps import run_step

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("minmax", "moving_average", "percentile", "mse")


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lenet-float", default="runs/fashion_mnist_qat/float")
  p.add_argument("--nin-float", default="runs/fashion_mnist_prune/float")
  p.add_argument("--qat-epochs", type=int, default=1, help="QAT epochs from the float checkpoint")
  p.add_argument("--qaft-epochs", type=int, default=1)
  p.add_argument("--runs-dir", default="runs/fashion_mnist_iao")
  p.add_argument("--reuse", action="store_true",
                 help="skip a training/PTQ command whose run directory already has metrics.json from an "
                 "earlier run of this script (conversions are always redone)")
  p.add_argument("--results-dir", default=os.path.join(HERE, "results"))
  args = p.parse_args()
  d = args.runs_dir
  steps: list[tuple[str, str, object]] = []  # (row label, run dir, () -> config; None: the float start)
  for net, src in (("LeNet", args.lenet_float), ("NIN/4", args.nin_float)):
    tag = net.lower().replace("/", "")
    steps.append((f"{net} float", src, None))
    steps.append((f"{net} QAT IAO W8A8, BN folded, from float ({args.qat_epochs} ep, lr 1e-4)", f"{d}/{tag}-qat",
                  functools.partial(runs.train_config, src, quant="iao", fold_bn=True, epochs=args.qat_epochs,
                                    lr=1e-4, out=f"{d}/{tag}-qat")))
    for m in METHODS:
      steps.append((f"{net} PTQ W8A8 {m}", f"{d}/{tag}-ptq-{m}",
                    functools.partial(PtqConfig, src, f"{d}/{tag}-ptq-{m}", method=m, batches=200, batch_size=32)))
    steps.append((f"{net} PTQ percentile -> QAFT ({args.qaft_epochs} ep, lr 1e-5)", f"{d}/{tag}-qaft",
                  functools.partial(runs.train_config, f"{d}/{tag}-ptq-percentile", quant="iao", qaft=True,
                                    epochs=args.qaft_epochs, out=f"{d}/{tag}-qaft")))
  commands = []
  for label, run_dir, make_config in steps:
    if make_config is None:  # the float starting point
      continue
    for name, config in ((label, make_config()), (f"{label}: convert", ConvertConfig(run_dir, f"{run_dir}/int8"))):
      cmd, _ = run_step(name, config, reuse=args.reuse and not isinstance(config, ConvertConfig))
      commands.append(cmd)

  lines = ["| model | fake-quant test acc | integer-only test acc | same prediction | vs float (fake-quant) |",
           "|---|---|---|---|---|"]
  base = None
  for label, run_dir, _ in steps:
    with open(os.path.join(run_dir, "metrics.json")) as f:
      m = json.load(f)
    if label.endswith(" float"):
      base = m["test_accuracy"]
      lines.append(f"| {label} | {100 * base:.2f}% (float) | - | - | - |")
      continue
    with open(os.path.join(run_dir, "int8", "deploy.json")) as f:
      dep = json.load(f)
    lines.append(f"| {label} | {100 * dep['fake_quant_test_accuracy']:.2f}% | {100 * dep['deploy_test_accuracy']:.2f}% | "
                 f"{100 * dep['prediction_agreement']:.2f}% | {100 * (dep['fake_quant_test_accuracy'] - base):+.2f} |")
  table = "\n".join(lines)
  print("\n" + table)
  write_report(
      args.results_dir, "fashion_mnist_iao", title="IAO on Fashion-MNIST: QAT, PTQ, QAFT and the integer-only path",
      intro="Produced by `python experiments/fashion_mnist_iao.py " + " ".join(sys.argv[1:]) + "`, which runs:",
      commands=commands,
      paragraphs=[
          "Test accuracy on the 10,000 Fashion-MNIST test images. \"fake-quant\" is the quantized model's "
          "eval forward in float arithmetic; \"integer-only\" is `integer_apply` of the converted model "
          "(int8 weights, int32 accumulation and bias, fixed-point requantization); \"same prediction\" is the "
          "fraction of test images where both give the same class. PTQ calibrates on 200 batches of 32 "
          "training images (no augmentation), BatchNorm folded; QAFT freezes observers and BatchNorm statistics.",
      ],
      table=table,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
