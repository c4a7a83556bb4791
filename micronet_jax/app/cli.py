"""The ``micronet-jax`` command.

    micronet-jax train --model lenet --dataset fashion_mnist --quant iao --w-bits 8 --a-bits 8 --epochs 8
    micronet-jax train --model nin --quant float --sparsity 1e-4 --out runs/sparse
    micronet-jax prune --from runs/sparse --percent 0.5 --out runs/pruned
    micronet-jax train --from runs/pruned --quant float --epochs 2 --out runs/finetuned
    micronet-jax convert --from runs/w1a1 --out runs/w1a1-packed   # iao: integer, binary/ternary: packed
    micronet-jax eval --artifact runs/w1a1-packed

Each command line is a config (``parse_config``) run through ``pipelines.run``, and
``config_to_argv`` writes a config back as the command line that reproduces it (the
experiment scripts print these).

Bad values (bits out of range, unknown method or model, missing data) end with a
one-paragraph message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from micronet_jax import models
from micronet_jax._src.core.observers import OBSERVERS
from micronet_jax._src.flax.calibrate import METHODS
from micronet_jax.app import data as data_lib
from micronet_jax.app import parallel, pipelines, plots, rundir, runs, table
from micronet_jax.app.config import (DEPLOY_FORMATS, LR_SCHEDULES, QUANT_METHODS, ConvertConfig, EvalConfig,
                                     PruneConfig, PtqConfig, TrainConfig)
from micronet_jax.app.errors import ConfigError, Interrupted

OBSERVER_CHOICES = tuple(OBSERVERS)

EXIT_USAGE = 2


DATA_DIR_CIFAR10 = "cifar10: tensorflow-datasets' data_dir"  # --data-dir's meaning where tfds is the source

def _add_train(sub) -> None:
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
                 f"({data_lib.SYSTEM_DIRS['fashion_mnist']}), then tensorflow-datasets. For cifar10, which "
                 "comes only through tensorflow-datasets: its data_dir (default ~/tensorflow_datasets)")
  p.add_argument("--quant", default=d.quant, choices=QUANT_METHODS,
                 help="float: no quantization; dorefa: DoReFa weights/activations, first layer float "
                 "(micronet's placement); iao: affine int-style quantization of every layer "
                 "(weights symmetric per output channel, activations asymmetric per tensor); binary / ternary: "
                 "micronet's wbwtab, 1-bit XNOR-Net / 2-bit TWN weights with the first and last conv float, "
                 "--a-bits 1 for binary activations or 32 for float ReLU; lsq: learned step sizes on every "
                 "layer, the first and last at 8 bits; pact: learned activation clip (PACT) with LSQ weights, "
                 "first layer float")
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
  p.add_argument("--per-channel", action="store_true",
                 help="lsq, pact: learn one weight step per output channel (default: one per tensor, as the LSQ "
                 "paper)")
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
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing output directory (the old one is kept until the new one is complete)")
  p.add_argument("--out", default=None, help="run directory (default: runs/MODEL-QUANT-wWaA)")
  p.add_argument("--resume", default=None, metavar="RUN_DIR",
                 help="continue the interrupted run RUN_DIR (killed, or stopped by Ctrl-C/SIGTERM) from its latest "
                 "checkpoint, with its own settings, to the same result as an uninterrupted run; no other flag "
                 "but --no-progress may be given")
  p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="STEPS",
                 help="save a resumable checkpoint every STEPS steps (and at every epoch end); 0: epoch ends only")
  p.add_argument("--limit-train", type=int, default=None, help="use only the first N training examples")
  p.add_argument("--limit-test", type=int, default=None, help="use only the first N test examples")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _defaults(cls: type) -> dict[str, Any]:
  """The field defaults of a config class: the parser's defaults, so they live in one place."""
  return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _add_ptq(sub) -> None:
  d = _defaults(PtqConfig)
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
  p.add_argument("--method", default=d["method"], choices=METHODS,
                 help="range observer: percentile of |x| (micronet's), minmax, moving_average, or mse "
                 "(MSE-optimal clipping)")
  p.add_argument("--w-bits", type=int, default=d["w_bits"], help="weight bits, 2..16")
  p.add_argument("--a-bits", type=int, default=d["a_bits"], help="activation bits, 2..16")
  p.add_argument("--batches", type=int, default=d["batches"], help="calibration batches")
  p.add_argument("--batch-size", type=int, default=d["batch_size"], help="calibration batch size")
  p.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm separate (default: fold into convs)")
  p.add_argument("--data-dir", default=None, help=f"folder with the dataset's IDX files ({DATA_DIR_CIFAR10})")
  p.add_argument("--seed", type=int, default=d["seed"], help="seed of the calibration batch order")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing output directory (the old one is kept until the new one is complete)")
  p.add_argument("--out", required=True, help="run directory to write")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_prune(sub) -> None:
  d = _defaults(PruneConfig)
  p = sub.add_parser(
      "prune",
      help="network slimming: prune BatchNorm channels of a (sparse-trained) float run",
      description="Prune the channels with the smallest BatchNorm |gamma| of a float NIN/NIN-GC run "
      "(global threshold, micronet's network slimming), build the smaller network with the kept weights, "
      "and write a run directory that `train --from OUT` fine-tunes or quantizes.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--from", dest="from_run", required=True, metavar="RUN_DIR", help="float run to prune")
  p.add_argument("--percent", type=float, default=d["percent"], help="fraction of prunable channels to remove, in [0, 1)")
  p.add_argument("--regular", type=int, default=d["regular"], metavar="N",
                 help="regular pruning: channel counts rounded to a multiple of N (1: normal pruning)")
  p.add_argument("--no-compensate", action="store_true",
                 help="drop pruned channels' ReLU(beta) instead of folding it into the next conv's bias "
                 "(micronet's behaviour)")
  p.add_argument("--data-dir", default=None,
                 help=f"folder with the dataset's IDX files, for the accuracy report ({DATA_DIR_CIFAR10})")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing output directory (the old one is kept until the new one is complete)")
  p.add_argument("--out", required=True, help="run directory to write")


def _add_convert(sub) -> None:
  p = sub.add_parser(
      "convert",
      help="deploy artifact of an IAO run (integer-only) or of a binary/ternary run (BN fused, kernels packed)",
      description="Convert an IAO (QAT or PTQ) run into an integer-only network (int8 weights, int32 biases and "
      "requantization multipliers; no float weights), or a binary/ternary run into its packed deploy "
      "(BatchNorms fused into biases, 1-bit binary / 2-bit ternary kernels with one float32 alpha per output "
      "channel). Writes OUT/deploy.npz (the deploy arrays), OUT/integer_model.jax (a jax.export StableHLO "
      "artifact of the deploy forward, arrays included) and OUT/deploy.json, and checks the deploy forward "
      "(and, for binary weights with binary inputs, the XNOR/popcount forward) against the fake-quant "
      "forward on the test set.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--from", dest="from_run", required=True, metavar="RUN_DIR", help="iao, binary or ternary run to convert")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing output directory (the old one is kept until the new one is complete)")
  p.add_argument("--out", required=True, help="artifact directory to write")
  p.add_argument("--data-dir", default=None, help=f"folder with the dataset's IDX files ({DATA_DIR_CIFAR10})")
  p.add_argument("--format", default="stablehlo", choices=DEPLOY_FORMATS,
                 help="onnx: also write OUT/integer_model.onnx (integer ops, batch 1; needs the onnx extra) and "
                 "check it with onnxruntime against the integer deploy on the test set")


def _add_eval(sub) -> None:
  p = sub.add_parser(
      "eval",
      help="evaluate a converted (integer or packed binary) artifact on the test set, without the model's code",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--artifact", required=True, metavar="DIR", help="directory written by `convert`")
  p.add_argument("--data-dir", default=None, help=f"folder with the dataset's IDX files ({DATA_DIR_CIFAR10})")
  p.add_argument("--limit-test", type=int, default=None, help="evaluate on the first N test images")


# ----------------------------------------------------------------------------- args <-> configs


def _train_config(args: argparse.Namespace) -> TrainConfig:
  given = {k: getattr(args, k) for k in (
      "model", "dataset", "data_dir", "quant", "w_bits", "a_bits", "epochs", "batch_size", "eval_batch_size",
      "lr", "lr_schedule", "weight_decay", "sparsity", "observer", "fold_bn", "per_channel", "qaft", "seed", "out",
      "limit_train", "limit_test", "checkpoint_every")}
  return runs.train_config(args.from_run, model_cfg=args.cfg, **given)


CONFIGS = {  # command -> (the config it runs, args -> config)
    "train": (TrainConfig, _train_config),
    "ptq": (PtqConfig, lambda a: PtqConfig(a.from_run, a.out, a.method, a.w_bits, a.a_bits, a.batches, a.batch_size,
                                           not a.no_fold_bn, a.data_dir, a.seed)),
    "prune": (PruneConfig, lambda a: PruneConfig(a.from_run, a.out, a.percent, a.regular, not a.no_compensate,
                                                 a.data_dir)),
    "convert": (ConvertConfig, lambda a: ConvertConfig(a.from_run, a.out, a.data_dir, a.format)),
    "eval": (EvalConfig, lambda a: EvalConfig(a.artifact, a.data_dir, a.limit_test)),
}
# field -> flag; a flag without a value is a bool field's (True: given), "--no-..." one's inverse.
FLAGS = {
    "from_run": "--from", "model_cfg": "--cfg", "fold_bn": "--fold-bn", "qaft": "--qaft",
    "compensate_beta": "--no-compensate", "artifact": "--artifact",
}
ALWAYS = {"from_run", "artifact", "model", "quant", "out"}  # written even when they are the default


def _flag(cls: type, field: str) -> str:
  if cls is PtqConfig and field == "fold_bn":
    return "--no-fold-bn"
  return FLAGS.get(field, "--" + field.replace("_", "-"))


def _baseline(config: Any) -> dict[str, Any]:
  """What the command line gives each field when its flag is left out."""
  if isinstance(config, TrainConfig):  # the method's defaults, or inherited from --from
    c = config  # the bits and lr defaults follow --quant and --qaft, which are given
    base = dataclasses.asdict(runs.train_config(c.from_run, model=c.model, quant=c.quant, qaft=c.qaft, out=c.out))
    return {**base, "qaft": False}
  return _defaults(type(config))


def config_to_argv(config: Any) -> list[str]:
  """The ``micronet-jax`` arguments that run ``config``: ``parse_config`` of them is
  ``config``. Flags equal to what the command would infer are left out, so a
  ``TrainConfig`` with ``from_run`` needs that run's config.json (what it inherits)."""
  command = next((name for name, (cls, _) in CONFIGS.items() if type(config) is cls), None)
  if command is None:
    raise TypeError(f"no command runs a {type(config).__name__}")
  base, argv = _baseline(config), [command]
  for f in dataclasses.fields(config):
    value, flag = getattr(config, f.name), _flag(type(config), f.name)
    if value is None or (f.name not in ALWAYS and f.name in base and value == base[f.name]):
      continue
    if isinstance(value, bool):
      if value != flag.startswith("--no-"):  # the flag gives this value
        argv.append(flag)
        continue
      raise ConfigError(f"{command} cannot set {f.name}={value} on the command line (it is "
                        f"{base.get(f.name)} when {flag} is not given)")
    argv += [flag, *map(_text, value)] if isinstance(value, (tuple, list)) else [flag, _text(value)]
  return argv


def _text(value: Any) -> str:
  return repr(value) if isinstance(value, float) else str(value)


def parse_config(argv: list[str]) -> Any:
  """The config a ``micronet-jax`` command line runs (argparse exits on a bad flag)."""
  args = build_parser().parse_args(argv)
  return CONFIGS[args.command][1](args)


# ----------------------------------------------------------------------------- the command


def _report(result: Any, config: Any) -> None:
  """The lines a command prints after its pipeline's own report."""
  if isinstance(config, TrainConfig):
    out = config.out
    print(f"\n| run | epochs | test acc | best test acc | s/epoch |\n|---|---|---|---|---|\n"
          f"| {result.label} | {result.epochs} | {100 * result.test_accuracy:.2f}% | "
          f"{100 * result.best_test_accuracy:.2f}% | {result.seconds_per_epoch:.1f} |")
    print(f"wrote {out}/metrics.json and {out}/checkpoint")
  elif isinstance(config, PtqConfig):
    print(f"wrote {config.out} (fine-tune it with: micronet-jax train --from {config.out} --quant iao --qaft ...)")
  elif isinstance(config, PruneConfig):
    print(f"wrote {config.out} (fine-tune it with: micronet-jax train --from {config.out} --quant float ...)")
  elif isinstance(config, ConvertConfig):
    print(f"wrote {config.out} (evaluate it with: micronet-jax eval --artifact {config.out})")


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
  table.add_parser(sub)
  plots.add_parser(sub)
  return parser


def _resume_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainConfig:
  """The config of the interrupted run ``args.resume``; any other flag given is an error."""
  defaults = vars(parser.parse_args(["train"]))
  given = sorted(k for k, v in vars(args).items() if k not in ("resume", "no_progress") and v != defaults.get(k))
  if given:
    raise ConfigError(f"--resume continues a run with its own settings; do not also give {', '.join(given)}")
  config = runs.read_config(rundir.incomplete_dir(args.resume)) if os.path.isdir(
      rundir.incomplete_dir(args.resume)) else None
  if config is None:
    done = " (it finished: nothing to resume)" if os.path.isdir(args.resume) else ""
    raise ConfigError(f"no interrupted run to resume at {args.resume}{done}")
  return dataclasses.replace(config, out=os.path.normpath(args.resume))


COMMANDS = {"table": table.main, "plot": plots.main}


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    parallel.initialize_distributed()
    if args.command in COMMANDS:  # commands that run several configs, or none
      return COMMANDS[args.command](args)
    resume = getattr(args, "resume", None) is not None
    config = _resume_config(args, parser) if resume else CONFIGS[args.command][1](args)
    result = pipelines.run(config, progress=not getattr(args, "no_progress", False),
                           overwrite=getattr(args, "overwrite", False), resume=resume)
    _report(result, config)
    return 0
  except (ConfigError, data_lib.DataError) as e:
    print(f"micronet-jax {args.command}: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except Interrupted as e:
    print(f"micronet-jax {args.command}: {e}", file=sys.stderr)
    return e.exit_status
  except KeyboardInterrupt:
    print(f"micronet-jax {args.command}: interrupted", file=sys.stderr)
    return 130
  except OSError as e:  # a full disk, a read-only folder: what failed, and that nothing old was lost
    print(f"micronet-jax {args.command}: error: {e.strerror or e} ({e.filename or ''}); an existing output "
          f"directory is left as it was", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
  sys.exit(main())
