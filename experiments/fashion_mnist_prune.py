"""Network slimming on Fashion-MNIST: float -> sparse -> pruned -> fine-tuned -> W8A8.

    python experiments/fashion_mnist_prune.py                     # the full pipeline
    python experiments/fashion_mnist_prune.py --epochs 1 --finetune-epochs 1 --qat-epochs 1

The network is micronet's NIN at a quarter of its width (cfg 48,40,24,48,48,48,48,48)
so that it trains on 2 CPU cores in minutes. The steps are a list of configs run one
after another through the pipelines (a step that starts from an earlier one's run gets
its config when it runs); the report shows each one's ``micronet-jax`` command. The table (params, MMACs, MB at the stored bit widths,
compression against the float network, test accuracy) goes to
``RESULTS_DIR/fashion_mnist_prune.md`` with the commands, seed and versions.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from micronet_jax.app import runs
from micronet_jax.app.config import PruneConfig, TrainConfig
from report import write_report
from steps import run_step

HERE = os.path.dirname(os.path.abspath(__file__))
CFG = (48, 40, 24, 48, 48, 48, 48, 48)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--epochs", type=int, default=3, help="epochs of the float and of the sparse run")
  p.add_argument("--finetune-epochs", type=int, default=2)
  p.add_argument("--qat-epochs", type=int, default=1)
  p.add_argument("--sparsity", type=float, default=1e-3)
  p.add_argument("--percent", type=float, default=0.5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--reuse", action="store_true",
                 help="skip a step whose run directory already has metrics.json from an earlier run of this "
                 "script with the same settings")
  p.add_argument("--runs-dir", default="runs/fashion_mnist_prune")
  p.add_argument("--results-dir", default=os.path.join(HERE, "results"))
  args = p.parse_args()

  d = args.runs_dir
  common = dict(seed=args.seed, batch_size=128)
  steps = {  # name: () -> config, called when the step runs (after the run it starts from exists)
      "float": lambda: TrainConfig(model="nin", model_cfg=CFG, quant="float", epochs=args.epochs, lr=1e-3,
                                   out=f"{d}/float", **common),
      "sparse": lambda: TrainConfig(model="nin", model_cfg=CFG, quant="float", epochs=args.epochs, lr=1e-3,
                                    sparsity=args.sparsity, out=f"{d}/sparse", **common),
      "pruned": lambda: PruneConfig(f"{d}/sparse", f"{d}/pruned", percent=args.percent),
      "finetuned": functools.partial(runs.train_config, f"{d}/pruned", quant="float", epochs=args.finetune_epochs,
                                     lr=1e-3, out=f"{d}/finetuned", **common),
      "pruned-iao-w8a8": functools.partial(runs.train_config, f"{d}/finetuned", quant="iao", w_bits=8, a_bits=8,
                                           epochs=args.qat_epochs, lr=1e-4, out=f"{d}/pruned-iao-w8a8", **common),
  }
  m, commands = {}, []
  for name, make_config in steps.items():
    cmd, m[name] = run_step(name, make_config(), reuse=args.reuse)
    commands.append(cmd)

  base = m["float"]["model_stats"]
  rows = [
      ("float NIN/4", "32/32", m["float"]["model_stats"], m["float"]["test_accuracy"]),
      (f"sparse-trained (s={args.sparsity:g})", "32/32", m["sparse"]["model_stats"], m["sparse"]["test_accuracy"]),
      (f"pruned {args.percent:.0%}, before fine-tuning", "32/32", m["pruned"]["model_stats"],
       m["pruned"]["test_accuracy"]),
      (f"pruned {args.percent:.0%}, fine-tuned", "32/32", m["finetuned"]["model_stats"],
       m["finetuned"]["test_accuracy"]),
      ("pruned + IAO W8A8 (QAT)", "8/8", m["pruned-iao-w8a8"]["model_stats"], m["pruned-iao-w8a8"]["test_accuracy"]),
  ]
  lines = ["| model | W/A bits | params | MMACs | size (MB) | compression | test acc | vs float |",
           "|---|---|---|---|---|---|---|---|"]
  for name, bits, s, acc in rows:
    lines.append(f"| {name} | {bits} | {s['params']:,} | {s['MMACs']:.2f} | {s['size_mb']:.4f} | "
                 f"{100 * (1 - s['size_mb'] / base['size_mb']):.1f}% | {100 * acc:.2f}% | "
                 f"{100 * (acc - m['float']['test_accuracy']):+.2f} |")
  table = "\n".join(lines)
  print("\n" + table)
  extra = (f"Pruning: threshold |gamma| > {m['pruned']['threshold']:.4g}, cfg {m['pruned']['cfg_before']} -> "
           f"{m['pruned']['cfg']}; masked original (pruned gamma zeroed, beta kept: what the pruned network "
           f"reproduces when beta is folded into the next bias) "
           f"{100 * m['pruned']['test_accuracy_masked']:.2f}%, pruned network {100 * m['pruned']['test_accuracy']:.2f}%, "
           f"{100 * m['pruned']['params_removed']:.1f}% fewer parameters.")
  write_report(
      args.results_dir, "fashion_mnist_prune", title="Network slimming of NIN/4 on Fashion-MNIST",
      intro="Produced by `python experiments/fashion_mnist_prune.py " + " ".join(sys.argv[1:])
      + "`, which runs, one after another:",
      commands=commands,
      paragraphs=[
          f"Seed {args.seed}; Adam, batch 128; test accuracy on the 10,000 test images after the last epoch. "
          "Size counts quantized kernels at their weight bits and everything else at 32 bits "
          "(MB = 10^6 bytes); compression is 1 - size / size of the float network.",
      ],
      table=table, after=[extra],
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
