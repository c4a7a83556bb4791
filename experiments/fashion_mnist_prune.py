"""Network slimming on Fashion-MNIST: float -> sparse -> pruned -> fine-tuned -> W8A8.

    python experiments/fashion_mnist_prune.py                     # the full pipeline
    python experiments/fashion_mnist_prune.py --epochs 1 --finetune-epochs 1 --qat-epochs 1

The network is micronet's NIN at a quarter of its width (cfg 48,40,24,48,48,48,48,48)
so that it trains on 2 CPU cores in minutes. Every step is a ``micronet-jax`` command,
run one after another; the table (params, MMACs, MB at the stored bit widths,
compression against the float network, test accuracy) goes to
``RESULTS_DIR/fashion_mnist_prune.md`` with the commands, seed and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from micronet_jax.app import cli
from report import write_report

HERE = os.path.dirname(os.path.abspath(__file__))
CFG = "48 40 24 48 48 48 48 48"


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
  common = f"--seed {args.seed} --batch-size 128 --no-progress"
  commands = {
      "float": f"train --model nin --cfg {CFG} --quant float --epochs {args.epochs} --lr 1e-3 {common} --out {d}/float",
      "sparse": f"train --model nin --cfg {CFG} --quant float --epochs {args.epochs} --lr 1e-3 "
                f"--sparsity {args.sparsity} {common} --out {d}/sparse",
      "pruned": f"prune --from {d}/sparse --percent {args.percent} --out {d}/pruned",
      "finetuned": f"train --from {d}/pruned --quant float --epochs {args.finetune_epochs} --lr 1e-3 {common} "
                   f"--out {d}/finetuned",
      "pruned+iao": f"train --from {d}/finetuned --quant iao --w-bits 8 --a-bits 8 --epochs {args.qat_epochs} "
                    f"--lr 1e-4 {common} --out {d}/pruned-iao-w8a8",
  }
  for name, c in commands.items():
    run_dir = c.rsplit("--out ", 1)[1].split()[0]
    if args.reuse and os.path.exists(os.path.join(run_dir, "metrics.json")):
      print(f"\n=== {name}: reusing {run_dir} (made by: micronet-jax {c})", flush=True)
      continue
    print(f"\n=== {name}: micronet-jax {c}", flush=True)
    rc = cli.main(shlex.split(c))
    if rc:
      return rc

  def metrics(name):
    with open(os.path.join(d, name, "metrics.json")) as f:
      return json.load(f)

  m = {name: metrics(name) for name in ("float", "sparse", "pruned", "finetuned", "pruned-iao-w8a8")}
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
      commands=[f"micronet-jax {c}" for c in commands.values()],
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
