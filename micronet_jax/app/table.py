"""The compression table: every row of micronet's CIFAR-10 table, on Fashion-MNIST, by one command.

    micronet-jax table --budget small            # 2 CPU cores
    micronet-jax table --budget full --seeds 3   # what a GPU would run

Rows, in micronet's order: float; NIN-GC (group convs, channel shuffles); pruned (network
slimming: sparse training, prune, fine-tune); binary W / float A; ternary W / float A; W1A1;
W2A1; DoReFa W8A8; IAO W8A8 with BN folding; IAO W4A4; PTQ W8A8; prune + quantize. LeNet
carries the binary/ternary rows and IAO W4A4; NIN at a reduced width the rows that need
BatchNorm (DoReFa's activation clip, folding, slimming); each row is compared with the
float model of its own architecture. Every step is a config run through ``pipelines.run``
(quantized runs start from the float weights, micronet's ``--refine``), reported as the
``micronet-jax`` command that reproduces it; a deploy, where one exists, is converted and
checked against the fake-quant model. Writes ``RESULTS/compression_table.md``, .json, .png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shlex
import statistics
import time
from typing import Any, Callable, Sequence

from micronet_jax.app import data as data_lib
from micronet_jax.app import pipelines, plots, runs
from micronet_jax.app.config import ConvertConfig, PruneConfig, PtqConfig, TrainConfig
from micronet_jax.app.errors import ConfigError
from micronet_jax.app.train import package_versions


@dataclasses.dataclass(frozen=True)
class Budget:
  """Epochs, widths and subsets of one table run (``None``: the whole split)."""

  lenet_epochs: int  # float LeNet, from random weights
  lenet_qat_epochs: int  # each quantized LeNet, from the float LeNet
  lenet_limit_train: int | None
  nin_cfg: tuple[int, ...]
  nin_epochs: int  # float NIN, from random weights
  nin_sparse_epochs: int  # sparse training (L1 on BN scales), from the float NIN
  nin_finetune_epochs: int  # the pruned NIN
  nin_qat_epochs: int  # IAO W8A8 (folded) of the float and of the pruned NIN
  nin_limit_train: int | None
  gc_cfg: tuple[int, ...]  # NIN-GC widths (each divisible by its groups)
  gc_epochs: int
  gc_limit_train: int | None
  prune_percent: float
  sparsity: float
  ptq_batches: int  # of 32 training images
  seeds: int  # default --seeds
  eval_batch_size: int = 1000  # at most the test set


BUDGETS = {
    # NIN at 1/8 of micronet's widths, NIN-GC at 1/16-1/32, NIN training subsets, 2 seeds: 2 CPU cores, 30 minutes.
    "small": Budget(lenet_epochs=3, lenet_qat_epochs=2, lenet_limit_train=None,
                    nin_cfg=(24, 20, 12, 24, 24, 24, 24, 24), nin_epochs=3, nin_sparse_epochs=1,
                    nin_finetune_epochs=2, nin_qat_epochs=1, nin_limit_train=20000,
                    gc_cfg=(16, 16, 16, 32, 32, 32, 32, 32), gc_epochs=2, gc_limit_train=10000,
                    prune_percent=0.3, sparsity=1e-3, ptq_batches=50, seeds=2),
    # micronet's widths and (for NIN) about its float schedule, the whole training set, 3 seeds.
    "full": Budget(lenet_epochs=20, lenet_qat_epochs=10, lenet_limit_train=None,
                   nin_cfg=(192, 160, 96, 192, 192, 192, 192, 192), nin_epochs=60, nin_sparse_epochs=30,
                   nin_finetune_epochs=30, nin_qat_epochs=10, nin_limit_train=None,
                   gc_cfg=(256, 256, 256, 512, 512, 512, 1024, 1024), gc_epochs=60, gc_limit_train=None,
                   prune_percent=0.5, sparsity=1e-4, ptq_batches=200, seeds=3),
}


@dataclasses.dataclass(frozen=True)
class Row:
  """A table row: the step whose run it reports, the float step it is compared with, whether it has a deploy."""

  name: str
  network: str
  bits: str  # "W/A"
  step: str
  base: str
  deploy: bool = False  # converted to RUN/deploy (IAO: integer-only; binary/ternary: packed)
  target: float | None = None  # the accuracy loss against ``base`` it should stay within, in points


ROWS = (
    Row("float LeNet", "lenet", "32/32", "lenet-float", "lenet-float"),
    Row("float NIN", "nin", "32/32", "nin-float", "nin-float"),
    Row("NIN-GC (group conv)", "nin_gc", "32/32", "nin_gc-float", "nin-float"),
    Row("pruned (slimming, fine-tuned)", "nin", "32/32", "nin-finetuned", "nin-float"),
    Row("binary W / float A", "lenet", "1/32", "lenet-binary-w1a32", "lenet-float", True, 2.0),
    Row("ternary W / float A", "lenet", "2/32", "lenet-ternary-w2a32", "lenet-float", True, 2.0),
    Row("W1A1", "lenet", "1/1", "lenet-binary-w1a1", "lenet-float", True, 8.0),
    Row("W2A1 (ternary W, binary A)", "lenet", "2/1", "lenet-ternary-w2a1", "lenet-float", True),
    Row("DoReFa W8A8", "nin", "8/8", "nin-dorefa-w8a8", "nin-float", False, 0.5),
    Row("IAO W8A8, BN folded", "nin", "8/8", "nin-iao-w8a8", "nin-float", True, 0.5),
    Row("IAO W4A4", "lenet", "4/4", "lenet-iao-w4a4", "lenet-float", True),
    Row("PTQ W8A8 (percentile, BN folded)", "nin", "8/8", "nin-ptq-w8a8", "nin-float", True),
    Row("prune + quantize (IAO W8A8)", "nin", "8/8", "nin-pruned-iao-w8a8", "nin-float", True, 3.0),
)
DEPLOY_DIR = "deploy"  # a converted run's artifact: RUN/deploy
# step -> the step whose run it starts from (a row needs its step, its base and their parents)
PARENT = {"nin-sparse": "nin-float", "nin-pruned": "nin-sparse", "nin-finetuned": "nin-pruned",
          "nin-pruned-iao-w8a8": "nin-finetuned", "nin-iao-w8a8": "nin-float", "nin-ptq-w8a8": "nin-float",
          "nin-dorefa-w8a8": "nin-float",
          **{r.step: "lenet-float" for r in ROWS if r.network == "lenet" and r.step != r.base}}


def select_rows(keys: Sequence[str] | None = None) -> tuple[Row, ...]:
  """The rows whose step is in ``keys`` (None: all), in the table's order."""
  unknown = sorted(set(keys or ()) - {r.step for r in ROWS})
  if unknown:
    raise ConfigError(f"unknown rows {unknown}; choose from {[r.step for r in ROWS]}")
  return tuple(r for r in ROWS if keys is None or r.step in keys)


def needed_steps(rows: Sequence[Row]) -> set[str]:
  """The steps ``rows`` need: their runs, float runs and deploys, and every run these start from."""
  out = {f"{r.step}:deploy" for r in rows if r.deploy}
  todo = [s for r in rows for s in (r.step, r.base)]
  while todo:
    step = todo.pop()
    if step not in out:
      out.add(step)
      todo += [PARENT[step]] if step in PARENT else []
  return out


def steps(budget: Budget, seed: int, runs_dir: str, data_dir: str | None,
          dataset: str = "fashion_mnist") -> dict[str, Callable[[], Any]]:
  """name -> (() -> config) in run order; a step's config is made when it runs, after the
  run it starts from exists (``runs.train_config`` reads that run's model and widths)."""
  d, b = runs_dir, budget
  lenet = dict(dataset=dataset, data_dir=data_dir, seed=seed, batch_size=128, eval_batch_size=b.eval_batch_size,
               limit_train=b.lenet_limit_train)
  nin = dict(lenet, limit_train=b.nin_limit_train)

  def lenet_q(quant: str, w: int, a: int, lr: float) -> Callable[[], TrainConfig]:
    return lambda: runs.train_config(f"{d}/lenet-float", quant=quant, w_bits=w, a_bits=a, lr=lr,
                                     lr_schedule="cosine", epochs=b.lenet_qat_epochs,
                                     out=f"{d}/lenet-{quant}-w{w}a{a}", **lenet)

  s: dict[str, Callable[[], Any]] = {
      "lenet-float": lambda: TrainConfig(model="lenet", quant="float", epochs=b.lenet_epochs, lr=1e-2,
                                         lr_schedule="cosine", out=f"{d}/lenet-float", **lenet),
      "lenet-binary-w1a32": lenet_q("binary", 1, 32, 1e-2),
      "lenet-ternary-w2a32": lenet_q("ternary", 2, 32, 1e-2),
      "lenet-binary-w1a1": lenet_q("binary", 1, 1, 1e-2),
      "lenet-ternary-w2a1": lenet_q("ternary", 2, 1, 1e-2),
      "lenet-iao-w4a4": lenet_q("iao", 4, 4, 1e-3),
      "nin-float": lambda: TrainConfig(model="nin", model_cfg=b.nin_cfg, quant="float", epochs=b.nin_epochs,
                                       lr=1e-2, lr_schedule="cosine", out=f"{d}/nin-float", **nin),
      "nin_gc-float": lambda: TrainConfig(model="nin_gc", model_cfg=b.gc_cfg, quant="float", epochs=b.gc_epochs,
                                          lr=1e-2, lr_schedule="cosine", out=f"{d}/nin_gc-float",
                                          **dict(nin, limit_train=b.gc_limit_train)),
      "nin-iao-w8a8": lambda: runs.train_config(f"{d}/nin-float", quant="iao", w_bits=8, a_bits=8, fold_bn=True,
                                                lr=1e-4, epochs=b.nin_qat_epochs, out=f"{d}/nin-iao-w8a8", **nin),
      # On NIN, as in micronet: its BatchNorms absorb DoReFa's activation scale (clip(0.1 x, 0, 1)). On LeNet,
      # which has none, one epoch from the float weights lost 9 to 23 points (budget small, lr 1e-3 / 1e-4).
      "nin-dorefa-w8a8": lambda: runs.train_config(f"{d}/nin-float", quant="dorefa", w_bits=8, a_bits=8, lr=1e-3,
                                                   lr_schedule="cosine", epochs=b.nin_qat_epochs,
                                                   out=f"{d}/nin-dorefa-w8a8", **nin),
      "nin-ptq-w8a8": lambda: PtqConfig(f"{d}/nin-float", f"{d}/nin-ptq-w8a8", method="percentile",
                                        batches=b.ptq_batches, batch_size=32, fold_bn=True, data_dir=data_dir,
                                        seed=seed),
      "nin-sparse": lambda: runs.train_config(f"{d}/nin-float", quant="float", sparsity=b.sparsity, lr=1e-3,
                                              epochs=b.nin_sparse_epochs, out=f"{d}/nin-sparse", **nin),
      "nin-pruned": lambda: PruneConfig(f"{d}/nin-sparse", f"{d}/nin-pruned", percent=b.prune_percent,
                                        data_dir=data_dir),
      "nin-finetuned": lambda: runs.train_config(f"{d}/nin-pruned", quant="float", lr=1e-3, lr_schedule="cosine",
                                                 epochs=b.nin_finetune_epochs, out=f"{d}/nin-finetuned", **nin),
      "nin-pruned-iao-w8a8": lambda: runs.train_config(f"{d}/nin-finetuned", quant="iao", w_bits=8, a_bits=8,
                                                       fold_bn=True, lr=1e-4, epochs=b.nin_qat_epochs,
                                                       out=f"{d}/nin-pruned-iao-w8a8", **nin),
  }
  for row in ROWS:  # the deploys last, after every training run
    if row.deploy:
      s[f"{row.step}:deploy"] = lambda r=row: ConvertConfig(f"{d}/{r.step}", f"{d}/{r.step}/{DEPLOY_DIR}", data_dir)
  return s


def command(config: Any) -> str:
  """The ``micronet-jax`` command line that runs ``config``."""
  from micronet_jax.app.cli import config_to_argv  # the CLI imports this module
  return "micronet-jax " + shlex.join(config_to_argv(config))


def run_step(name: str, config: Any, reuse: bool = False, log: Callable[[str], Any] = print,
             progress: bool = False) -> tuple[str, dict, bool]:
  """(command, result JSON, whether reused) of one step, run again in place unless ``reuse``
  finds it finished with exactly ``config`` (a step that is not training: its result file)."""
  cmd = command(config)
  path = os.path.join(config.out, runs.DEPLOY_FILE if isinstance(config, ConvertConfig) else runs.METRICS_FILE)
  if reuse and os.path.exists(path) and (not isinstance(config, TrainConfig) or runs.is_done(config)):
    log(f"\n=== {name}: reusing {config.out} (made by: {cmd})")
    with open(path) as f:
      return cmd, json.load(f), True
  log(f"\n=== {name}: {cmd}")
  return cmd, pipelines.run(config, progress=progress, log=log, overwrite=True).to_json(), False


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
  """The mean and the sample standard deviation (0 for one value) of per-seed results."""
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_mean_sd(values: Sequence[float], fmt: str = "{:.2f}") -> str:
  """The "mean ± sd" of per-seed results (the mean alone for one seed), each number in ``fmt``."""
  mean, sd = mean_sd(values)
  return fmt.format(mean) + (f" ± {sd:.2f}" if len(values) > 1 else "")


def summarize(results: list[dict[str, dict]], rows: Sequence[Row] = ROWS) -> list[dict[str, Any]]:
  """One record per row from the per-seed results (step name -> result JSON): accuracies
  and deltas against the same seed's float run, in points, and the model's sizes."""
  out = []
  for row in rows:
    accs = [100 * r[row.step]["test_accuracy"] for r in results]
    deltas = [a - 100 * r[row.base]["test_accuracy"] for a, r in zip(accs, results)]
    stats, base = results[0][row.step]["model_stats"], results[0][row.base]["model_stats"]
    deploys = [r[f"{row.step}:deploy"] for r in results] if row.deploy else []
    mean_delta = statistics.fmean(deltas)
    out.append(dict(
        row=row.name, network=row.network, bits=row.bits, accuracy=accs, delta=deltas,
        params=stats["params"], mmacs=stats["MMACs"], size_mb=stats["size_mb"],
        compression=1 - stats["size_mb"] / base["size_mb"],
        target=row.target, met=None if row.target is None or row.step == row.base else mean_delta >= -row.target,
        agreement=[100 * d["prediction_agreement"] for d in deploys],
        deploy_accuracy=[100 * d["deploy_test_accuracy"] for d in deploys],
        deploy_kind=(deploys or [{}])[0].get("kind"), deploy_bytes=(deploys or [{}])[0].get("deploy_bytes"),
    ))
  return out


def markdown_table(records: list[dict[str, Any]], networks: dict[str, str]) -> str:
  lines = ["| row | network | W/A bits | test acc (%) | vs float, same arch (points) | target | params | MMACs | "
           "size (MB) | compression | deploy | deploy acc (%) | deploy = fake-quant (%) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    is_base = r["row"].startswith("float ")
    target = "-" if r["target"] is None else f"≥ -{r['target']:g}: {'met' if r['met'] else 'NOT met'}"
    deploy = "-" if r["deploy_kind"] is None else f"{r['deploy_kind']}, {r['deploy_bytes']:,} B"
    lines.append(
        f"| {r['row']} | {networks[r['network']]} | {r['bits']} | {format_mean_sd(r['accuracy'])} | "
        f"{'(baseline)' if is_base else format_mean_sd(r['delta'], '{:+.2f}')} | {target} | {r['params']:,} | "
        f"{r['mmacs']:.2f} | {r['size_mb']:.4f} | {100 * r['compression']:.1f}% | {deploy} | "
        f"{format_mean_sd(r['deploy_accuracy']) if r['agreement'] else '-'} | {format_mean_sd(r['agreement']) if r['agreement'] else '-'} |")
  return "\n".join(lines)


def check_dataset(dataset: str) -> None:
  """Refuses, before any run directory exists, a dataset the data layer does not load."""
  if dataset not in data_lib.DATASETS:
    raise ConfigError(f"--dataset {dataset} is not a dataset micronet_jax.app.data loads; choose one of "
                      f"{', '.join(data_lib.DATASETS)}")


def run_table(budget_name: str, seeds: int | None = None, dataset: str = "fashion_mnist",
              runs_dir: str = "runs/compression_table", results_dir: str = "experiments/results",
              data_dir: str | None = None, reuse: bool = False, name: str = "compression_table",
              budget: Budget | None = None, argv: list[str] | None = None, log: Callable[[str], Any] = print,
              row_keys: Sequence[str] | None = None) -> str:
  """Runs every step of every seed (0..seeds-1), writes RESULTS/NAME.md, .json and .png;
  returns the markdown path. ``budget`` overrides ``BUDGETS[budget_name]`` (tests);
  ``row_keys``: only these rows (by step name) and the steps they need."""
  check_dataset(dataset)
  rows = select_rows(row_keys)
  needed = needed_steps(rows)
  b = budget or BUDGETS[budget_name]
  seeds = b.seeds if seeds is None else seeds
  if seeds < 1:
    raise ConfigError(f"--seeds must be at least 1, got {seeds}")
  start, load_start, cpu_start = time.perf_counter(), os.getloadavg()[0], _cpu()
  results, commands, reused = [], [], 0
  for seed in range(seeds):
    m = {}
    for step, make in steps(b, seed, os.path.join(runs_dir, f"seed{seed}"), data_dir, dataset).items():
      if step not in needed:
        continue
      cmd, m[step], was_reused = run_step(f"seed {seed}: {step}", make(), reuse=reuse, log=log)
      commands.append(cmd)
      reused += was_reused
    results.append(m)
  wall, cpu = time.perf_counter() - start, _cpu() - cpu_start
  records = summarize(results, rows)
  networks = {"lenet": "LeNet", "nin": f"NIN cfg {','.join(map(str, b.nin_cfg))}",
              "nin_gc": f"NIN-GC cfg {','.join(map(str, b.gc_cfg))}"}
  table = markdown_table(records, networks)
  log("\n" + table)
  os.makedirs(results_dir, exist_ok=True)
  png = os.path.join(results_dir, f"{name}.png")
  plots.accuracy_vs_size(
      [dict(label=r["row"], group=networks[r["network"]], size_mb=r["size_mb"], accuracy=mean_sd(r["accuracy"])[0],
            spread=mean_sd(r["accuracy"])[1]) for r in records], png,
      f"micronet's compression table on Fashion-MNIST (--budget {budget_name}, {seeds} seed(s))")
  versions, cmdline = package_versions(), "micronet-jax table " + shlex.join(argv or [])
  train_s = sum(m.get("total_seconds", 0.0) for r in results for m in r.values())
  md = _markdown(budget_name, b, seeds, cmdline, commands, table, versions, (wall, cpu, train_s, reused),
                 (load_start, os.getloadavg()[0]), png)
  path = os.path.join(results_dir, f"{name}.md")
  with open(path, "w") as f:
    f.write(md)
  with open(os.path.join(results_dir, f"{name}.json"), "w") as f:
    json.dump({"command": cmdline, "budget": dataclasses.asdict(b), "seeds": seeds, "versions": versions,
               "wall_seconds": wall, "cpu_seconds": cpu, "rows": records}, f, indent=2)
  log(f"\nwrote {path} and {png}")
  return path


def _cpu() -> float:
  """User + system CPU seconds of this process (its compute, whatever else shares the machine)."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _markdown(budget_name, b, seeds, cmdline, commands, table, versions, seconds, loads, png) -> str:
  (wall, cpu, train_s, reused), (load0, load1) = seconds, loads
  load = f"; 1-minute load average {load0:.1f} at the start, {load1:.1f} at the end"
  text = [
      "# micronet's compression table on Fashion-MNIST", "",
      f"Produced by `{cmdline}` (budget `{budget_name}`, seeds {', '.join(map(str, range(seeds)))}) on "
      f"{versions['devices']} ({os.cpu_count()} cores): {wall / 60:.1f} minutes of wall time and {cpu / 60:.1f} of "
      f"CPU time (user + system){load}" + (f", {reused} of the {len(commands)} steps reused from earlier runs with "
                                           "the same configs" if reused else "")
      + f"; the training runs record {train_s / 60:.1f} minutes of training. It ran, one after another:", "",
      "```", *commands, "```", "",
      f"Budget `{budget_name}`: {describe(b)} Adam, batch 128; test accuracy on all 10,000 test images "
      "after the last epoch" + (f", mean ± standard deviation over {seeds} seeds." if seeds > 1 else
                                 ", one seed (a difference under about 1 point is within seed noise here)."),
      "", "" if budget_name == "full" else f"`--budget full` (what a GPU would run; not run here): "
      f"{describe(BUDGETS['full'])} Seeds 0-{BUDGETS['full'].seeds - 1}.", "",
      "\"vs float\" is the accuracy change against the float model of the same architecture (same seed), in "
      "points; NIN-GC is compared with NIN, and pruned networks with the NIN they were pruned from. Size counts "
      "quantized kernels at their weight bits and everything else at 32 bits (MB = 10^6 bytes); compression is "
      "1 - size / size of that float model. \"deploy\" is the converted artifact (`micronet-jax convert`: integer: "
      "int8/int4 weights, integer-only forward; binary: BatchNorm fused, kernels packed at 1 or 2 bits) with its "
      "test accuracy and the share of test images on which it predicts what the fake-quant model predicts; "
      "DoReFa has no deploy converter.", "",
      table, "",
      f"![accuracy against model size]({os.path.basename(png)})", "",
      "Software: " + ", ".join(f"{k} {v}" for k, v in versions.items()), "",
  ]
  return "\n".join(text)


def describe(b: Budget) -> str:
  """The budget in a sentence: epochs, widths and training subsets of each network."""
  def n(limit: int | None) -> str:
    return "all 60,000" if limit is None else f"the first {limit:,}"
  return (f"LeNet float {b.lenet_epochs} epochs, each quantized LeNet {b.lenet_qat_epochs} from the float weights, "
          f"on {n(b.lenet_limit_train)} training images; NIN (cfg {', '.join(map(str, b.nin_cfg))}) float "
          f"{b.nin_epochs} epochs, sparse training (s={b.sparsity:g}) {b.nin_sparse_epochs} from the float weights, "
          f"pruning {b.prune_percent:.0%} of the channels, fine-tuning {b.nin_finetune_epochs}, DoReFa and IAO "
          f"W8A8 QAT {b.nin_qat_epochs} from the float or the fine-tuned weights, on {n(b.nin_limit_train)} training images; NIN-GC (cfg "
          f"{', '.join(map(str, b.gc_cfg))}) {b.gc_epochs} epochs on {n(b.gc_limit_train)}; PTQ calibrates on "
          f"{b.ptq_batches} batches of 32.")


# ----------------------------------------------------------------------------- the command


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--budget", default="small", choices=sorted(BUDGETS),
                 help="small: 2 CPU cores within 30 minutes; full: micronet's widths, what a GPU would run")
  p.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1 (default: 2 small, 3 full)")
  p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "cifar10"])
  p.add_argument("--data-dir", default=None, help="folder with the dataset's IDX files (cifar10: tensorflow-datasets' data_dir)")
  p.add_argument("--runs-dir", default="runs/compression_table", help="where the run directories go")
  p.add_argument("--results-dir", default=os.path.join("experiments", "results"), help="where the table goes")
  p.add_argument("--rows", nargs="+", default=None, choices=[r.step for r in ROWS], metavar="ROW",
                 help=f"only these rows (and the runs they start from): {', '.join(r.step for r in ROWS)}")
  p.add_argument("--reuse", action="store_true",
                 help="keep a step whose run already exists, made with exactly this step's config")


def add_parser(sub: Any) -> None:
  p = sub.add_parser("table", help="run every row of micronet's compression table and write it with a plot",
                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(p)


def _argv(args: argparse.Namespace) -> list[str]:
  """The flags of ``args`` that differ from the defaults (``--budget`` always): the command line reported."""
  defaults = argparse.ArgumentParser()
  add_arguments(defaults)
  d = vars(defaults.parse_args([]))
  argv = ["--budget", args.budget]
  for key in ("seeds", "dataset", "data_dir", "runs_dir", "results_dir", "rows"):
    value = getattr(args, key)
    if value != d[key]:
      argv += ["--" + key.replace("_", "-"), *(value if isinstance(value, list) else [str(value)])]
  return argv + (["--reuse"] if args.reuse else [])


def main(args: argparse.Namespace) -> int:
  run_table(args.budget, args.seeds, args.dataset, args.runs_dir, args.results_dir, args.data_dir, args.reuse,
            argv=_argv(args), row_keys=args.rows)
  return 0
