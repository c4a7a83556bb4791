"""The compression table and the plot command on a tiny synthetic dataset: every row run
through the pipelines, the markdown's rows and values against the runs' own results,
the PNGs written; an unknown dataset refused before any run (CIFAR-10 offline:
test_cifar10.py)."""

import json
import os
import re

import pytest

from micronet_jax.app import cli, runs, table
from micronet_jax.app.errors import ConfigError
from tests.conftest import make_idx_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Rows of every kind (float, slimming without a deploy, a packed binary deploy, an integer
# deploy with BN folding); the other rows are the same pipelines with other configs (the committed table runs them).
KEYS = ["nin-float", "nin-finetuned", "lenet-binary-w1a1", "nin-ptq-w8a8"]
ROWS = table.select_rows(KEYS)
TINY = table.Budget(lenet_epochs=1, lenet_qat_epochs=1, lenet_limit_train=None, nin_cfg=(8,) * 8, nin_epochs=1,
                    nin_sparse_epochs=1, nin_finetune_epochs=1, nin_qat_epochs=1, nin_limit_train=None,
                    gc_cfg=(2, 2, 16, 16, 4, 32, 32, 8), gc_epochs=1, gc_limit_train=128, prune_percent=0.25,
                    sparsity=1e-3, ptq_batches=5, seeds=1, eval_batch_size=50)


def _is_png(path) -> bool:
  with open(path, "rb") as f:
    return f.read(8) == PNG_MAGIC


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  pytest.importorskip("matplotlib")
  root = tmp_path_factory.mktemp("table")
  idx = str(root / "idx")
  make_idx_dir(idx, n_train=256, n_test=100, seed=3)
  md = table.run_table("small", dataset="fashion_mnist", runs_dir=str(root / "runs"), results_dir=str(root / "res"),
                       data_dir=idx, budget=TINY, argv=["--budget", "small"], log=lambda s: None, row_keys=KEYS)
  with open(md) as f:
    text = f.read()
  with open(root / "res" / "compression_table.json") as f:
    data = json.load(f)
  return root, text, data


def _cells(text: str, row: str) -> list[str]:
  line = next(x for x in text.splitlines() if x.startswith(f"| {row} |"))
  return [c.strip() for c in line.strip("|").split("|")]


def test_every_row_is_in_the_table_with_its_runs_values(made):
  root, text, data = made
  assert [r["row"] for r in data["rows"]] == [r.name for r in ROWS]
  seed0 = root / "runs" / "seed0"
  for row in ROWS:
    cells = _cells(text, row.name)
    m = runs.read_metrics(str(seed0 / row.step))
    base = runs.read_metrics(str(seed0 / row.base))
    assert cells[3] == f"{100 * m['test_accuracy']:.2f}"  # one seed: no spread
    if row.step != row.base:
      assert cells[4] == f"{100 * (m['test_accuracy'] - base['test_accuracy']):+.2f}"
    assert cells[6] == f"{m['model_stats']['params']:,}"
    assert cells[8] == f"{m['model_stats']['size_mb']:.4f}"
    assert cells[9] == f"{100 * (1 - m['model_stats']['size_mb'] / base['model_stats']['size_mb']):.1f}%"
    if row.deploy:  # the deploy's agreement with the fake-quant model, from its deploy.json
      dep = runs.read_deploy(str(seed0 / row.step / table.DEPLOY_DIR))
      assert cells[11] == f"{100 * dep['deploy_test_accuracy']:.2f}"
      assert cells[12] == f"{100 * dep['prediction_agreement']:.2f}"
      assert dep["kind"] == ("integer" if "iao" in row.step or "ptq" in row.step else "binary")
    else:
      assert cells[10:] == ["-", "-", "-"]
  # what the compressed rows must show whatever the accuracy: fewer bits, fewer params
  assert _cells(text, "float NIN")[9] == "0.0%"
  assert float(_cells(text, "W1A1")[9].rstrip("%")) > 80  # 1-bit kernels in conv2 and fc1
  nin, pruned = data["rows"][0], data["rows"][1]
  assert pruned["params"] < nin["params"] and pruned["compression"] > 0


def test_targets_are_judged_on_the_mean_delta(made):
  _, text, data = made
  for r, row in zip(data["rows"], ROWS):
    cell = _cells(text, row.name)[5]
    if row.target is None:
      assert cell == "-"
    else:
      assert cell == f"≥ -{row.target:g}: " + ("met" if r["delta"][0] >= -row.target else "NOT met")


def test_report_has_the_commands_and_a_png(made):
  root, text, _ = made
  assert "`micronet-jax table --budget small`" in text
  assert len(re.findall(r"^micronet-jax (train|ptq|prune|convert) ", text, re.M)) == len(table.needed_steps(ROWS))
  assert "micronet-jax prune --from" in text and "micronet-jax ptq --from" in text
  assert "Software: python" in text and "compression_table.png" in text
  assert _is_png(root / "res" / "compression_table.png")


def test_rows_need_the_runs_they_start_from():
  assert table.needed_steps(table.select_rows(["nin-pruned-iao-w8a8"])) == {
      "nin-float", "nin-sparse", "nin-pruned", "nin-finetuned", "nin-pruned-iao-w8a8", "nin-pruned-iao-w8a8:deploy"}
  assert table.needed_steps(table.ROWS) == set(table.steps(TINY, 0, "r", None))  # every step serves a row
  with pytest.raises(table.ConfigError, match="unknown rows"):
    table.select_rows(["nope"])
  args = cli.build_parser().parse_args(["table", "--seeds", "2", "--rows", "lenet-float", "nin-float"])
  assert table._argv(args) == ["--budget", "small", "--seeds", "2", "--rows", "lenet-float", "nin-float"]


def test_spread_over_seeds():
  assert table.format_mean_sd([1.0]) == "1.00"
  assert table.format_mean_sd([1.0, 3.0]) == "2.00 ± 1.41"
  assert table.format_mean_sd([-1.0, -2.0], "{:+.2f}") == "-1.50 ± 0.71"


def test_unknown_dataset_is_refused_before_any_run(tmp_path):
  # argparse keeps it from the command line; the Python API is checked before a run directory is made
  with pytest.raises(ConfigError, match="--dataset svhn is not a dataset micronet_jax.app.data loads; .*cifar10"):
    table.run_table("small", dataset="svhn", runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "res"),
                    log=lambda _: None)
  assert not (tmp_path / "runs").exists() and not (tmp_path / "res").exists()
  assert not os.listdir(tmp_path)


def test_plot_command_draws_two_runs(made, tmp_path, capsys):
  root, _, _ = made
  a, b = root / "runs" / "seed0" / "lenet-float", root / "runs" / "seed0" / "lenet-binary-w1a1"
  out = tmp_path / "curves.png"
  assert cli.main(["plot", str(a), str(b), "--out", str(out)]) == 0
  assert _is_png(out) and f"wrote {out}" in capsys.readouterr().out
  assert cli.main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
  assert "is not a run directory" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
