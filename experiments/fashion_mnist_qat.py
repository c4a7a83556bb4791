"""QAT on Fashion-MNIST: LeNet in float, DoReFa W8A8/W4A4 and IAO W8A8/W4A4.

    python experiments/fashion_mnist_qat.py                 # the full table (8 epochs each)
    python experiments/fashion_mnist_qat.py --epochs 1 --runs float iao-w8a8

The runs are a list of ``TrainConfig``s through the train pipeline (the report shows
each one's ``micronet-jax train`` command), with the same seed, optimizer (Adam 1e-3)
and batch (128); the runs go one after another so that their timings are comparable. Writes
``RESULTS_DIR/fashion_mnist_qat.md`` (the table, the commands, seed and versions) and
``RESULTS_DIR/fashion_mnist_qat.json``, and prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys

from micronet_jax.app.config import TrainConfig
from report import write_report
from steps import run_step

RUNS = {
    "float": dict(quant="float"),
    "dorefa-w8a8": dict(quant="dorefa", w_bits=8, a_bits=8),
    "dorefa-w4a4": dict(quant="dorefa", w_bits=4, a_bits=4),
    "iao-w8a8": dict(quant="iao", w_bits=8, a_bits=8),
    "iao-w4a4": dict(quant="iao", w_bits=4, a_bits=4),
    # DoReFa at 16 bits: what DoReFa's reparametrisation costs without rounding error
    "dorefa-w16a16": dict(quant="dorefa", w_bits=16, a_bits=16),
}
HERE = os.path.dirname(os.path.abspath(__file__))


def table(results: dict[str, dict]) -> str:
  base = results.get("float")
  lines = ["| run | W bits | A bits | test acc (last epoch) | best test acc | vs float (last) | s/epoch |",
           "|---|---|---|---|---|---|---|"]
  for name, m in results.items():
    c = m["config"]
    wb = "32" if c["quant"] == "float" else str(c["w_bits"])
    ab = "32" if c["quant"] == "float" else str(c["a_bits"])
    delta = "" if base is None else f"{100 * (m['test_accuracy'] - base['test_accuracy']):+.2f}"
    lines.append(f"| {m['label']} | {wb} | {ab} | {100 * m['test_accuracy']:.2f}% | "
                 f"{100 * m['best_test_accuracy']:.2f}% | {delta} | {m['seconds_per_epoch']:.1f} |")
  return "\n".join(lines)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="which rows to run")
  p.add_argument("--epochs", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
  p.add_argument("--runs-dir", default="runs/fashion_mnist_qat", help="where the run directories go")
  p.add_argument("--results-dir", default=os.path.join(HERE, "results"), help="where the table goes")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args()

  configs = {name: TrainConfig(model="lenet", dataset="fashion_mnist", data_dir=args.data_dir, epochs=args.epochs,
                                batch_size=128, lr=1e-3, seed=args.seed, out=os.path.join(args.runs_dir, name),
                                **RUNS[name])
             for name in args.runs}
  results, commands = {}, []
  for name, cfg in configs.items():
    cmd, results[name] = run_step(name, cfg, progress=not args.no_progress)
    commands.append(cmd)

  text = table(results)
  print("\n" + text)
  write_report(
      args.results_dir, "fashion_mnist_qat", title="LeNet QAT on Fashion-MNIST",
      intro=f"Produced by `python experiments/fashion_mnist_qat.py --epochs {args.epochs} --seed {args.seed}"
      + (f" --runs {' '.join(args.runs)}" if args.runs != list(RUNS) else "") + "`, which runs, one after another:",
      commands=commands,
      paragraphs=[
          f"Seed {args.seed}; Adam lr 1e-3, batch 128, no weight decay, {args.epochs} epochs from scratch; "
          "test accuracy on the 10,000 test images after each epoch (\"best\" is the maximum over epochs, "
          "\"last\" the final epoch). s/epoch excludes the first epoch (compilation).",
      ],
      table=text, data=results,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
