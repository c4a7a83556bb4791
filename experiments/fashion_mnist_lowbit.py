"""Low-bit QAT on Fashion-MNIST: LeNet at W4A4, W3A3 and W2A2 for DoReFa, IAO, LSQ and PACT.

    python experiments/fashion_mnist_lowbit.py                      # the full table (3 epochs each)
    python experiments/fashion_mnist_lowbit.py --epochs 1 --methods lsq --bits 4

Every run is a ``TrainConfig`` through the train pipeline (the report shows each one's
``micronet-jax train`` command) with the same seed, optimizer (Adam 1e-3), batch (128)
and number of epochs, from scratch; the runs go one after another. The placements are
each method's own (``micronet_jax._src.core.rules``):

* dorefa: first layer float, every later one W/A bits (micronet's);
* iao: every layer W/A bits, the image input included (micronet's "full quantization");
* lsq: every layer, the first and the last at 8 bits (weights and input) as in the LSQ
  paper, the image input on an LSQ+ grid (learned offset), the others W/A bits;
* pact: DoReFa's placement, DoReFa weights (as in the PACT paper) and PACT activations.

Writes ``RESULTS_DIR/fashion_mnist_lowbit.md`` and ``.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys

from micronet_jax.app.config import TrainConfig
from report import write_report
from steps import run_step

METHODS = ("dorefa", "iao", "lsq", "pact")
BITS = (4, 3, 2)
HERE = os.path.dirname(os.path.abspath(__file__))


def runs(methods, bits) -> dict[str, dict]:
  out = {"float": dict(quant="float")}
  for b in bits:
    for m in methods:
      out[f"{m}-w{b}a{b}"] = dict(quant=m, w_bits=b, a_bits=b)
  return out


def table(results: dict[str, dict]) -> str:
  base = results.get("float")
  lines = ["| run | W bits | A bits | test acc (last epoch) | best test acc | vs float (last) | s/epoch |",
           "|---|---|---|---|---|---|---|"]
  for m in results.values():
    c = m["config"]
    wb, ab = ("32", "32") if c["quant"] == "float" else (str(c["w_bits"]), str(c["a_bits"]))
    delta = "" if base is None else f"{100 * (m['test_accuracy'] - base['test_accuracy']):+.2f}"
    lines.append(f"| {m['label']} | {wb} | {ab} | {100 * m['test_accuracy']:.2f}% | "
                 f"{100 * m['best_test_accuracy']:.2f}% | {delta} | {m['seconds_per_epoch']:.1f} |")
  return "\n".join(lines)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  p.add_argument("--bits", nargs="+", type=int, default=list(BITS), choices=BITS)
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
  p.add_argument("--runs-dir", default="runs/fashion_mnist_lowbit", help="where the run directories go")
  p.add_argument("--results-dir", default=os.path.join(HERE, "results"), help="where the table goes")
  p.add_argument("--reuse", action="store_true", help="reuse finished runs made with the same config")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args()

  specs = runs(args.methods, args.bits)
  configs = {name: TrainConfig(model="lenet", dataset="fashion_mnist", data_dir=args.data_dir, epochs=args.epochs,
                                batch_size=128, lr=1e-3, seed=args.seed, out=os.path.join(args.runs_dir, name),
                                **spec)
             for name, spec in specs.items()}
  results, commands = {}, []
  for name, cfg in configs.items():
    cmd, results[name] = run_step(name, cfg, reuse=args.reuse, progress=not args.no_progress)
    commands.append(cmd)

  text = table(results)
  print("\n" + text)
  chosen = (f" --methods {' '.join(args.methods)}" if args.methods != list(METHODS) else "") + (
      f" --bits {' '.join(map(str, args.bits))}" if args.bits != list(BITS) else "")
  write_report(
      args.results_dir, "fashion_mnist_lowbit", title="LeNet low-bit QAT on Fashion-MNIST: DoReFa, IAO, LSQ, PACT",
      intro=f"Produced by `python experiments/fashion_mnist_lowbit.py --epochs {args.epochs} --seed {args.seed}"
      f"{chosen}`, which runs, one after another:",
      commands=commands,
      paragraphs=[
          f"Seed {args.seed}; Adam lr 1e-3, batch 128, no weight decay, {args.epochs} epochs from scratch for every "
          "run; test accuracy on the 10,000 test images after each epoch (\"best\" is the maximum over epochs, "
          "\"last\" the final epoch). s/epoch excludes the first epoch (compilation).",
          "Placements: dorefa keeps the first layer float; iao quantizes every layer and the image input at W/A "
          "bits; lsq quantizes every layer but keeps the first and the last at 8 bits (the LSQ paper's choice; "
          "the image input on an LSQ+ grid with a learned offset); pact keeps the first layer float and uses "
          "DoReFa weights with PACT activations (the PACT paper's pairing; alpha starts at 2 mean|x| "
          "sqrt(2^b - 1) on the first batch and has no L2 penalty).",
      ],
      table=text, data=results,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
