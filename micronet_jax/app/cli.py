"""The ``micronet-jax`` command.

    micronet-jax train --model lenet --dataset fashion_mnist --quant iao --w-bits 8 --a-bits 8 --epochs 8
    micronet-jax train --model nin --quant float --sparsity 1e-4 --out runs/sparse
    micronet-jax prune --from runs/sparse --percent 0.5 --out runs/pruned
    micronet-jax train --from runs/pruned --quant float --epochs 2 --out runs/finetuned

Bad values (bits out of range, unknown method or model, missing data) end with a
one-paragraph message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from micronet_jax.app import data as data_lib
from micronet_jax import models
from micronet_jax.app.errors import ConfigError
from micronet_jax._src.core.observers import OBSERVERS

OBSERVER_CHOICES = tuple(OBSERVERS)

EXIT_USAGE = 2


class UsageError(Exception):
  """A bad command-line value: reported in one message, exit status 2."""


def _add_train(sub) -> None:
  from micronet_jax.app.experiment import LR_SCHEDULES, QUANT_METHODS, TrainConfig

  d = TrainConfig()
  p = sub.add_parser(
      "train",
      help="train a model (float or quantization-aware) and write a run directory",
      description="Train a model from scratch or from another run (--from), in float or with "
      "quantization-aware training (QAT). Prints test accuracy after every epoch and writes "
      "OUT/metrics.json, OUT/config.json and an orbax checkpoint in OUT/checkpoint.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--model", default=None, choices=sorted(models.MODELS),
                 help=f"network architecture (default: {d.model}, or the --from run's)")
  p.add_argument("--cfg", type=int, nargs="+", default=None, metavar="C",
                 help="channel widths of the model (default: the model's own, or the --from run's)")
  p.add_argument("--dataset", default=None, choices=data_lib.DATASETS,
                 help=f"dataset (default: {d.dataset}, or the --from run's)")
  p.add_argument("--from", dest="from_run", default=None, metavar="RUN_DIR",
                 help="start from this run's checkpoint and architecture (fine-tune a pruned network, "
                 "quantize a float one, ...)")
  p.add_argument("--data-dir", default=None,
                 help="folder with the four IDX files; default: the Debian package's folder "
                 f"({data_lib.SYSTEM_DIRS['fashion_mnist']}), then tensorflow-datasets")
  p.add_argument("--quant", default=d.quant, choices=QUANT_METHODS,
                 help="float: no quantization; dorefa: DoReFa weights/activations, first layer float "
                 "(micronet's placement); iao: affine int-style quantization of every layer "
                 "(weights symmetric per output channel, activations asymmetric per tensor); binary / ternary: "
                 "micronet's wbwtab, 1-bit XNOR-Net / 2-bit TWN weights with the first and last conv float, "
                 "--a-bits 1 for binary activations or 32 for float ReLU")
  p.add_argument("--w-bits", type=int, default=None,
                 help=f"weight bits, 2..16 (32 keeps weights float); default {d.w_bits}, binary 1, ternary 2")
  p.add_argument("--a-bits", type=int, default=None,
                 help=f"activation bits, 2..16 (32 keeps activations float); binary/ternary: 1 or 32; "
                 f"default {d.a_bits}, binary/ternary 1")
  p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
  p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
  p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="evaluation batch size")
  p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {d.lr}; binary/ternary 0.01 as micronet's wbwtab, whose "
                 "latent weights must cross zero; 1e-5 with --qaft)")
  p.add_argument("--lr-schedule", default=d.lr_schedule, choices=LR_SCHEDULES,
                 help="constant learning rate, or cosine decay from --lr to 0 over all steps")
  p.add_argument("--fold-bn", action="store_true",
                 help="iao: fold every BatchNorm that directly consumes a conv into the quantized conv")
  p.add_argument("--observer", default=None, choices=OBSERVER_CHOICES,
                 help=f"iao: activation range observer (default: {d.observer}, or the --from run's when it "
                 "has the same --quant)")
  p.add_argument("--qaft", action="store_true",
                 help="quantization-aware fine-tuning of a QAT/PTQ run (--from): observers and BatchNorm "
                 "statistics frozen, weights, gamma and beta train")
  p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                 help="coupled L2 weight decay added to the gradient before Adam (micronet's)")
  p.add_argument("--sparsity", type=float, default=d.sparsity,
                 help="network-slimming sparse training: add S*sign(gamma) to every BatchNorm scale's "
                 "gradient (micronet's -sr --s S)")
  p.add_argument("--seed", type=int, default=d.seed, help="seed for init, shuffling and dropout")
  p.add_argument("--out", default=None, help="run directory (default: runs/MODEL-QUANT-wWaA)")
  p.add_argument("--limit-train", type=int, default=None, help="use only the first N training examples")
  p.add_argument("--limit-test", type=int, default=None, help="use only the first N test examples")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
  from micronet_jax.app.experiment import TrainConfig, method_defaults, read_config, run

  d = TrainConfig()
  src = read_config(args.from_run) if args.from_run else d
  model = args.model or src.model
  model_cfg = args.cfg if args.cfg is not None else (src.model_cfg if model == src.model else None)
  w_bits, a_bits, lr = method_defaults(args.quant, args.qaft)
  w_bits = w_bits if args.w_bits is None else args.w_bits
  a_bits = a_bits if args.a_bits is None else args.a_bits
  out = args.out
  if out is None:
    out = f"runs/{model}-{args.quant}" + ("" if args.quant == "float" else f"-w{w_bits}a{a_bits}")
  config = TrainConfig(
      model=model, model_cfg=model_cfg, dataset=args.dataset or src.dataset, data_dir=args.data_dir,
      quant=args.quant, sparsity=args.sparsity, from_run=args.from_run,
      w_bits=w_bits, a_bits=a_bits, epochs=args.epochs, batch_size=args.batch_size,
      eval_batch_size=args.eval_batch_size, weight_decay=args.weight_decay, seed=args.seed,
      lr=lr if args.lr is None else args.lr,
      lr_schedule=args.lr_schedule,
      fold_bn=args.fold_bn or (src.fold_bn and args.quant == src.quant), qaft=args.qaft,
      observer=args.observer or (src.observer if args.quant == src.quant else d.observer),
      out=out, limit_train=args.limit_train, limit_test=args.limit_test,
  )
  m = run(config, progress=not args.no_progress)
  print(f"\n| run | epochs | test acc | best test acc | s/epoch |\n|---|---|---|---|---|\n"
        f"| {m['label']} | {m['epochs']} | {100 * m['test_accuracy']:.2f}% | "
        f"{100 * m['best_test_accuracy']:.2f}% | {m['seconds_per_epoch']:.1f} |")
  print(f"wrote {out}/metrics.json and {out}/checkpoint")
  return 0


def _add_ptq(sub) -> None:
  from micronet_jax._src.flax.calibrate import METHODS

  p = sub.add_parser(
      "ptq",
      help="post-training quantization of a float run (calibrate, freeze, evaluate)",
      description="Post-training IAO quantization: run calibration batches from the training set through "
      "the activation observers (the model in evaluation mode: BatchNorm statistics untouched, nothing "
      "trains), freeze the ranges, report test accuracy before and after, and write a run directory "
      "that `train --from OUT --qaft` fine-tunes.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--from", dest="from_run", required=True, metavar="RUN_DIR", help="float run to quantize")
  p.add_argument("--method", default="percentile", choices=METHODS,
                 help="range observer: percentile of |x| (micronet's), minmax, moving_average, or mse "
                 "(MSE-optimal clipping)")
  p.add_argument("--w-bits", type=int, default=8, help="weight bits, 2..16")
  p.add_argument("--a-bits", type=int, default=8, help="activation bits, 2..16")
  p.add_argument("--batches", type=int, default=200, help="calibration batches")
  p.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
  p.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm separate (default: fold into convs)")
  p.add_argument("--data-dir", default=None, help="folder with the dataset's IDX files")
  p.add_argument("--seed", type=int, default=0, help="seed of the calibration batch order")
  p.add_argument("--out", required=True, help="run directory to write")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.set_defaults(func=_ptq)


def _ptq(args: argparse.Namespace) -> int:
  from micronet_jax.app.experiment import ptq_run
  from micronet_jax._src.core.quantizers import MAX_BITS, MIN_BITS

  for name in ("w_bits", "a_bits"):
    if not MIN_BITS <= getattr(args, name) <= MAX_BITS:
      raise UsageError(f"--{name.replace('_', '-')} must be in {MIN_BITS}..{MAX_BITS}, got {getattr(args, name)}")
  if args.batches < 1 or args.batch_size < 1:
    raise UsageError("--batches and --batch-size must be at least 1")
  ptq_run(args.from_run, args.out, args.method, args.w_bits, args.a_bits, args.batches, args.batch_size,
          not args.no_fold_bn, args.data_dir, args.seed, progress=not args.no_progress)
  print(f"wrote {args.out} (fine-tune it with: micronet-jax train --from {args.out} --quant iao --qaft ...)")
  return 0


def _add_prune(sub) -> None:
  p = sub.add_parser(
      "prune",
      help="network slimming: prune BatchNorm channels of a (sparse-trained) float run",
      description="Prune the channels with the smallest BatchNorm |gamma| of a float NIN/NIN-GC run "
      "(global threshold, micronet's network slimming), build the smaller network with the kept weights, "
      "and write a run directory that `train --from OUT` fine-tunes or quantizes.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--from", dest="from_run", required=True, metavar="RUN_DIR", help="float run to prune")
  p.add_argument("--percent", type=float, default=0.5, help="fraction of prunable channels to remove, in [0, 1)")
  p.add_argument("--regular", type=int, default=1, metavar="N",
                 help="regular pruning: channel counts rounded to a multiple of N (1: normal pruning)")
  p.add_argument("--no-compensate", action="store_true",
                 help="drop pruned channels' ReLU(beta) instead of folding it into the next conv's bias "
                 "(micronet's behaviour)")
  p.add_argument("--data-dir", default=None, help="folder with the dataset's IDX files (for the accuracy report)")
  p.add_argument("--out", required=True, help="run directory to write")
  p.set_defaults(func=_prune)


def _prune(args: argparse.Namespace) -> int:
  from micronet_jax.app.experiment import prune_run

  if not 0.0 <= args.percent < 1.0:
    raise UsageError(f"--percent must be in [0, 1), got {args.percent}")
  if args.regular < 1:
    raise UsageError(f"--regular must be >= 1, got {args.regular}")
  prune_run(args.from_run, args.out, args.percent, args.regular, not args.no_compensate, args.data_dir)
  print(f"wrote {args.out} (fine-tune it with: micronet-jax train --from {args.out} --quant float ...)")
  return 0


def _add_convert(sub) -> None:
  p = sub.add_parser(
      "convert",
      help="integer-only deploy artifact of an IAO run (int8 weights, int32 bias, fixed-point requantization)",
      description="Convert an IAO (QAT or PTQ) run into an integer-only network: writes OUT/deploy.npz (int8 "
      "weights, int32 biases and requantization multipliers; no float weights), OUT/integer_model.jax (a "
      "jax.export StableHLO artifact of the integer forward, arrays included) and OUT/deploy.json, and "
      "checks the integer forward against the fake-quant forward on the test set.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--from", dest="from_run", required=True, metavar="RUN_DIR", help="iao run to convert")
  p.add_argument("--out", required=True, help="artifact directory to write")
  p.add_argument("--data-dir", default=None, help="folder with the dataset's IDX files")
  p.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
  from micronet_jax.app.experiment import convert_run

  convert_run(args.from_run, args.out, args.data_dir)
  print(f"wrote {args.out} (evaluate it with: micronet-jax eval --artifact {args.out})")
  return 0


def _add_eval(sub) -> None:
  p = sub.add_parser(
      "eval",
      help="evaluate a converted integer artifact on the test set, without the model's code",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--artifact", required=True, metavar="DIR", help="directory written by `convert`")
  p.add_argument("--data-dir", default=None, help="folder with the dataset's IDX files")
  p.add_argument("--limit-test", type=int, default=None, help="evaluate on the first N test images")
  p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
  from micronet_jax.app.experiment import eval_artifact

  if args.limit_test is not None and args.limit_test < 1:
    raise UsageError(f"--limit-test must be at least 1, got {args.limit_test}")
  eval_artifact(args.artifact, args.data_dir, limit_test=args.limit_test)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="micronet-jax",
      description="Quantization-aware training and compression of Flax models (a JAX port of micronet).",
  )
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  _add_train(sub)
  _add_prune(sub)
  _add_ptq(sub)
  _add_convert(sub)
  _add_eval(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return args.func(args)
  except (UsageError, ConfigError, data_lib.DataError) as e:
    print(f"micronet-jax {args.command}: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
