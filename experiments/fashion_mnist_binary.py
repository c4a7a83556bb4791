"""Binary and ternary networks (micronet's wbwtab) on Fashion-MNIST: LeNet and NIN (32-96 channels).

    python experiments/fashion_mnist_binary.py                      # the full table
    python experiments/fashion_mnist_binary.py --nets lenet --lenet-epochs 1

For each network: float, binary weights (A32), ternary weights (A32), binary weights with
binary activations (W1A1) and ternary weights with binary activations (W2A1): a list of
``TrainConfig``s run through the train pipeline with the same seed, optimizer and batch,
one after another; the quantized runs start from the float run's weights unless
``--scratch``. Every quantized run is then converted (``ConvertConfig``: BN -> bias
fusion, 1-/2-bit packing) and the packed model is evaluated on the test set (W1A1 also
through the XNOR/popcount path), so the table shows that the deploy artifact computes
what the fake-quant model computes.
Writes ``RESULTS_DIR/fashion_mnist_binary.md`` and ``.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys

from micronet_jax.app.config import ConvertConfig, TrainConfig
from micronet_jax.app.train import package_versions
from report import write_report
from steps import run_step

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = {  # name: (quant, w_bits, a_bits)
    "float": ("float", 32, 32),
    "binary-w1a32": ("binary", 1, 32),
    "ternary-w2a32": ("ternary", 2, 32),
    "binary-w1a1": ("binary", 1, 1),
    "ternary-w2a1": ("ternary", 2, 1),
}
# NIN at 1/6 to 1/2 of micronet's widths (binary layers need width; this fits the CPU budget). (NIN-GC would be micronet's choice, but XLA's CPU
# grouped convolutions are ~20x slower per MAC than plain ones: 9 s per batch-128 step at
# 1/8 width on this 2-core machine, against 0.4 s for this NIN.)
NIN_CFG = (32, 32, 32, 64, 64, 64, 96, 96)


def table(results: dict[str, dict]) -> str:
  lines = ["| network | run | W bits | A bits | test acc (last) | best | vs float (last) | params | size (MB) | "
           "compression | packed deploy (bytes) | packed acc | XNOR acc | s/epoch |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for key, m in results.items():
    net, name = key.split(":")
    c, s = m["config"], m["model_stats"]
    base = results.get(f"{net}:float")
    delta = "" if base is None else f"{100 * (m['test_accuracy'] - base['test_accuracy']):+.2f}"
    wb = "32" if c["quant"] == "float" else str(c["w_bits"])
    ab = "32" if c["quant"] == "float" else str(c["a_bits"])
    d = m.get("deploy", {})
    packed = f"{d['bytes']:,}" if d else "-"
    pacc = f"{100 * d['accuracy']:.2f}% ({100 * d['agreement']:.1f}% agree)" if d else "-"
    xacc = f"{100 * d['xnor_accuracy']:.2f}%" if d.get("xnor_accuracy") is not None else "-"
    lines.append(f"| {net} | {m['label']} | {wb} | {ab} | {100 * m['test_accuracy']:.2f}% | "
                 f"{100 * m['best_test_accuracy']:.2f}% | {delta} | {s['params']:,} | {s['size_mb']:.4f} | "
                 f"{100 * s['compression']:.2f}% | {packed} | {pacc} | {xacc} | {m['seconds_per_epoch']:.1f} |")
  return "\n".join(lines)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nets", nargs="+", default=["lenet", "nin"], choices=["lenet", "nin"])
  p.add_argument("--runs", nargs="+", default=list(ROWS), choices=list(ROWS))
  p.add_argument("--lenet-epochs", type=int, default=10)
  p.add_argument("--nin-epochs", type=int, default=5)
  p.add_argument("--nin-limit-train", type=int, default=None,
                 help="NIN trains on the first N training images (default: all 60,000)")
  p.add_argument("--scratch", action="store_true",
                 help="train the binary/ternary runs from random weights instead of from the float run's "
                 "(micronet's --refine; the float run must be among --runs or already in --runs-dir)")
  p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (micronet's 0.01)")
  p.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"])
  p.add_argument("--nin-cfg", type=int, nargs=8, default=NIN_CFG, help="NIN channel widths")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
  p.add_argument("--runs-dir", default="runs/fashion_mnist_binary", help="where the run directories go")
  p.add_argument("--results-dir", default=os.path.join(HERE, "results"), help="where the table goes")
  p.add_argument("--reuse", action="store_true",
                 help="skip a run whose directory already holds metrics.json with exactly this run's config "
                 "(the packed deploy is still rebuilt and evaluated)")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args()

  results, commands = {}, []
  for net in args.nets:
    float_dir = os.path.join(args.runs_dir, f"{net}-float")
    if not args.scratch and "float" not in args.runs and not os.path.isdir(float_dir):
      p.error(f"no float run to start from: add float to --runs, train {float_dir}, or pass --scratch")
    for name in args.runs:
      quant, w, a = ROWS[name]
      cfg = TrainConfig(
          model=net, model_cfg=tuple(args.nin_cfg) if net == "nin" else None, dataset="fashion_mnist",
          data_dir=args.data_dir, quant=quant, w_bits=w, a_bits=a,
          epochs=args.lenet_epochs if net == "lenet" else args.nin_epochs,
          limit_train=args.nin_limit_train if net == "nin" else None,
          batch_size=128, lr=args.lr, lr_schedule=args.lr_schedule, seed=args.seed,
          from_run=None if quant == "float" or args.scratch else float_dir,
          out=os.path.join(args.runs_dir, f"{net}-{name}"))
      cmd, m = run_step(f"{net} {name}", cfg, reuse=args.reuse, progress=not args.no_progress)
      commands.append(cmd)
      if quant != "float":  # the packed deploy, rebuilt and evaluated every time
        cmd, dep = run_step(f"{net} {name} packed deploy", ConvertConfig(cfg.out, os.path.join(cfg.out, "packed"),
                                                                         args.data_dir))
        commands.append(cmd)
        m["deploy"] = {"accuracy": dep["deploy_test_accuracy"], "agreement": dep["prediction_agreement"],
                       "bytes": dep["deploy_bytes"], "xnor_accuracy": dep["xnor_test_accuracy"]}
      results[f"{net}:{name}"] = m

  text = table(results)
  print("\n" + text)
  cmdline = (f"python experiments/fashion_mnist_binary.py --nets {' '.join(args.nets)} --runs {' '.join(args.runs)} "
             f"--lenet-epochs {args.lenet_epochs} --nin-epochs {args.nin_epochs} "
             f"--nin-cfg {' '.join(map(str, args.nin_cfg))} "
             + (f"--nin-limit-train {args.nin_limit_train} " if args.nin_limit_train else "")
             + ("--scratch " if args.scratch else "") + f"--lr {args.lr} --lr-schedule {args.lr_schedule} --seed {args.seed}")
  write_report(
      args.results_dir, "fashion_mnist_binary", title="Binary and ternary networks on Fashion-MNIST (micronet's wbwtab)",
      intro=f"Produced by `{cmdline}` on {package_versions()['devices']} ({os.cpu_count()} cores), which runs, one "
      f"after another (training alone: {sum(m['total_seconds'] for m in results.values()) / 60:.1f} minutes in all):",
      commands=commands,
      paragraphs=[
          f"Seed {args.seed}; Adam lr {args.lr} ({args.lr_schedule} schedule), batch 128, no weight decay; "
          + ("every run from random weights" if args.scratch else
             "float from random weights, then every binary/ternary run from the float run's weights (`--from`, "
             "micronet's `--refine`), for as many epochs again")
          + "; test accuracy on the "
          "10,000 test images after each epoch (\"best\" is the maximum over epochs, \"last\" the final epoch). "
          "s/epoch excludes the first epoch (compilation).",
          "Placement (`mj.binary_rules`): NIN as micronet (first and last conv float, the 7 convs between "
          "binary/ternary; with A1 every conv after the first gets a binary input, the sign replacing the ReLU). "
          "LeNet has only two convs, so its dense layers count too: conv1 and the classifier keep float weights, "
          "conv2 and fc1 are binary/ternary, and with A1 conv2, fc1 and the classifier get binary inputs. "
          f"NIN widths `--cfg {' '.join(map(str, args.nin_cfg))}`, trained on "
          + (f"the first {args.nin_limit_train:,}" if args.nin_limit_train else "all 60,000")
          + " training images; LeNet on all 60,000. micronet's own "
          "choice, NIN-GC, is not used: XLA's CPU grouped convolutions are about 20x slower per MAC than plain ones.",
          "Size as micronet's table: parameters (BatchNorm included), MB = 10^6 bytes with binary kernels at 1 bit, "
          "ternary at 2 bits and everything else at 32 bits, compression = 1 - size / float size. "
          "\"packed deploy\" is the real artifact after BN -> bias fusion (`micronet-jax convert`, `mj.deploy_binary`): packed kernels, "
          "one float32 alpha per output channel, float first/last layers and biases; BatchNorms are gone. "
          "\"packed acc\" evaluates that artifact (kernels unpacked on the fly) and says how many test predictions "
          "equal the fake-quant model's; \"XNOR acc\" runs every W1A1 layer by XNOR/popcount.",
      ],
      table=text, data=results,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
