"""PNG plots: training curves of runs (``micronet-jax plot``) and the compression table's
accuracy against model size. matplotlib is an optional extra (``pip install
'micronet-jax[plot]'``), imported only when a plot is drawn."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Sequence

from micronet_jax.app import runs
from micronet_jax.app.errors import ConfigError


def pyplot() -> Any:
  """matplotlib's pyplot on the file-only Agg backend, or a ``ConfigError`` saying how to install it."""
  try:
    import matplotlib
  except ImportError:
    raise ConfigError("plots need matplotlib: pip install 'micronet-jax[plot]'") from None
  matplotlib.use("Agg")  # no display: PNGs only
  import matplotlib.pyplot as plt
  return plt


def training_curves(run_dirs: Sequence[str], out: str) -> str:
  """Draws train/test loss and test accuracy per epoch of each run (from its
  ``metrics.jsonl``, ``runs.read_epochs``) into the PNG ``out``; returns ``out``."""
  curves = []
  for run_dir in run_dirs:
    if not any(os.path.exists(os.path.join(run_dir, f)) for f in (runs.EPOCHS_FILE, runs.METRICS_FILE)):
      raise ConfigError(f"{run_dir} is not a run directory (no {runs.EPOCHS_FILE} or {runs.METRICS_FILE})")
    epochs = runs.read_epochs(run_dir)
    if not epochs:
      raise ConfigError(f"{run_dir} has no epoch records (metrics.jsonl) to plot")
    curves.append((os.path.normpath(run_dir), epochs))
  plt = pyplot()
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
  for i, (name, epochs) in enumerate(curves):
    color = f"C{i % 10}"
    x = [e["epoch"] for e in epochs]
    ax_loss.plot(x, [e["train_loss"] for e in epochs], "--", color=color, label=f"{name} (train)")
    ax_loss.plot(x, [e["test_loss"] for e in epochs], "-o", color=color, ms=3, label=f"{name} (test)")
    ax_acc.plot(x, [100 * e["test_accuracy"] for e in epochs], "-o", color=color, ms=3, label=name)
  ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (dashed: train, solid: test)")
  ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
  ax_acc.legend(fontsize=7)
  fig.tight_layout()
  save_figure(fig, out, plt)
  return out


def accuracy_vs_size(points: Sequence[dict[str, Any]], out: str, title: str) -> str:
  """One labelled point per table row: size in MB (log scale) against test accuracy in
  %, with the spread over seeds as an error bar. ``points``: dicts with ``label``,
  ``group`` (the architecture: one colour each), ``size_mb``, ``accuracy`` (%) and
  ``spread`` (%, 0 for one seed)."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(9, 5.5))
  groups = list(dict.fromkeys(p["group"] for p in points))
  for i, p in enumerate(points):
    color = f"C{groups.index(p['group']) % 10}"
    ax.errorbar(p["size_mb"], p["accuracy"], yerr=p["spread"] or None, fmt="o", color=color, capsize=3)
    # labels of points that nearly coincide stack downwards, one line per earlier neighbour, so all stay readable
    near = sum(abs(math.log10(p["size_mb"] / q["size_mb"])) < 0.05 and abs(p["accuracy"] - q["accuracy"]) < 1.5
               for q in points[:i])
    ax.annotate(p["label"], (p["size_mb"], p["accuracy"]), textcoords="offset points",
                xytext=(5, 4 - 11 * near), fontsize=7)
  for g in groups:  # legend entries, one per architecture
    ax.plot([], [], "o", color=f"C{groups.index(g) % 10}", label=g)
  ax.set_xscale("log")
  ax.set(xlabel="model size (MB, log scale)", ylabel="test accuracy (%)", title=title)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  save_figure(fig, out, plt)
  return out


def save_figure(fig: Any, out: str, plt: Any) -> None:
  """Writes ``fig`` to ``out`` (its folder made if needed) at the project's dpi, and closes it."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- the command


def add_parser(sub: Any) -> None:
  p = sub.add_parser("plot", help="draw the training curves (loss, test accuracy per epoch) of runs into a PNG",
                     description="Reads each run's metrics.jsonl and draws train/test loss and test accuracy "
                     "per epoch, one colour per run.")
  p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run directories")
  p.add_argument("--out", default="training_curves.png", help="PNG file to write (default: training_curves.png)")


def main(args: argparse.Namespace) -> int:
  print(f"wrote {training_curves(args.run_dirs, args.out)}")
  return 0
