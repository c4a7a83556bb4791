"""Checkpoints and exact resume: a run stopped by SIGTERM/SIGINT (or killed) and resumed
ends with the same params, observer ranges, BN statistics and metrics as one that ran
through (issue 12 part 3, issue 11 part 6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import make_idx_dir
from micronet_jax.app import checkpoints, cli, pipelines, rundir, runs
from micronet_jax.app.config import TrainConfig
from micronet_jax.app.errors import Interrupted


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("idx")
  make_idx_dir(folder, n_train=192, n_test=40)
  return str(folder)


def _config(idx_dir: str, out: str, **kw) -> TrainConfig:
  # 192 / 32 = 6 steps an epoch, 3 epochs; a checkpoint every 4 steps falls mid-epoch.
  base = dict(model="lenet", quant="iao", w_bits=8, a_bits=8, epochs=3, batch_size=32, eval_batch_size=40,
              data_dir=idx_dir, out=out, checkpoint_every=4, lr_schedule="cosine")
  return TrainConfig(**{**base, **kw})


def _final(out: str) -> tuple[dict, dict]:
  config, _, variables = runs.load_run(out)
  return jax.device_get(variables), runs.read_metrics(out)


def _assert_same_run(a: str, b: str, loss_rtol: float = 0.0) -> None:
  """Same variables bit for bit and the same epoch records (train loss, a float32 sum over
  chunks, to ``loss_rtol`` when the chunks differ)."""
  (va, ma), (vb, mb) = _final(a), _final(b)
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(va), jax.tree_util.tree_leaves_with_path(vb)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))  # bit for bit
  strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "train_loss")} for r in h]
  assert strip(ma["history"]) == strip(mb["history"])
  for ra, rb in zip(ma["history"], mb["history"]):
    assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=loss_rtol, abs=0)
  assert ma["test_accuracy"] == mb["test_accuracy"]


@pytest.fixture(scope="module")
def reference(idx_dir, tmp_path_factory):
  """The uninterrupted run."""
  out = str(tmp_path_factory.mktemp("ref") / "run")
  pipelines.train(_config(idx_dir, out), progress=False, log=lambda s: None)
  return out


def test_chunking_does_not_change_the_result(idx_dir, reference, tmp_path):
  # checkpoint_every 0: one chunk per epoch instead of chunks of 4 and 2 steps
  out = str(tmp_path / "run")
  pipelines.train(_config(idx_dir, out, checkpoint_every=0), progress=False, log=lambda s: None)
  _assert_same_run(reference, out, loss_rtol=1e-6)


def test_sigterm_saves_and_resume_gives_the_same_run(idx_dir, reference, tmp_path, monkeypatch):
  out = str(tmp_path / "run")
  config = _config(idx_dir, out)
  saves = []
  real_save = checkpoints.Progress.save

  def save_then_signal(self, state, sums, meta):
    real_save(self, state, sums, meta)
    saves.append(int(state.step))
    if len(saves) == 2:  # after the epoch-end checkpoint at step 6, as a launcher would
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(checkpoints.Progress, "save", save_then_signal)
  with pytest.raises(Interrupted) as e:
    pipelines.train(config, progress=False, log=lambda s: None)
  assert e.value.exit_status == 143 and "--resume" in str(e.value)
  # saves at 4 and at the end of epoch 1 (6); chunks are aligned within each epoch, so the
  # next one is epoch 2's steps 0..3 (global 6..10): it runs, then the stop saves at 10
  assert saves == [4, 6, 10] and e.value.step == 10
  assert not os.path.exists(out) and os.path.isdir(rundir.incomplete_dir(out))
  assert len(runs.read_epochs(rundir.incomplete_dir(out))) == 1  # epoch 1 finished before the stop
  monkeypatch.setattr(checkpoints.Progress, "save", real_save)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run

  lines = []
  pipelines.train(config, progress=False, log=lines.append, resume=True)
  assert any("resuming at step 10 of 18 (epoch 2)" in line for line in lines)
  _assert_same_run(reference, out)
  assert not os.path.exists(rundir.incomplete_dir(out))
  assert not os.path.exists(os.path.join(out, checkpoints.PROGRESS_DIR))  # progress is not kept once done
  assert [r["epoch"] for r in runs.read_epochs(out)] == [1, 2, 3]


def test_resume_of_a_finished_or_missing_run_is_refused(idx_dir, reference, tmp_path, capsys):
  assert cli.main(["train", "--resume", reference]) == 2
  assert "nothing to resume" in capsys.readouterr().err
  assert cli.main(["train", "--resume", str(tmp_path / "nope")]) == 2
  assert "no interrupted run" in capsys.readouterr().err
  assert cli.main(["train", "--resume", reference, "--epochs", "3"]) == 2
  assert "do not also give epochs" in capsys.readouterr().err


def _wait_for(predicate, timeout: float) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def test_ctrl_c_in_a_real_process_exits_130_and_resumes(idx_dir, tmp_path):
  """A separate ``micronet-jax train`` process gets SIGINT while it trains: it saves,
  prints how to resume and exits with 130 (no crash at shutdown), and ``--resume``
  finishes the run to the same params as an uninterrupted one."""
  out = str(tmp_path / "run")
  long = _config(idx_dir, out, epochs=12, checkpoint_every=2, quant="float")
  argv = cli.config_to_argv(long) + ["--no-progress"]
  proc = subprocess.Popen([sys.executable, "-m", "micronet_jax.app.cli", *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=os.getcwd())
  progress = os.path.join(rundir.incomplete_dir(out), checkpoints.PROGRESS_DIR)
  started = _wait_for(lambda: os.path.isdir(progress) and any(d.isdigit() for d in os.listdir(progress)), 120)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=120)
  assert started, stderr
  assert proc.returncode == 130, (proc.returncode, stderr[-2000:])
  assert "stopped by SIGINT" in stderr and f"micronet-jax train --resume {out}" in stderr
  assert "Traceback" not in stderr

  assert cli.main(["train", "--resume", out, "--no-progress"]) == 0
  ref = str(tmp_path / "ref")
  pipelines.train(_config(idx_dir, ref, epochs=12, checkpoint_every=2, quant="float"), progress=False,
                  log=lambda s: None)
  _assert_same_run(ref, out)
  with open(os.path.join(out, runs.CONFIG_FILE)) as f:
    assert json.load(f)["out"] == out


def test_scan_loop_trains_like_the_dispatched_one():
  """``fit(scan=True)`` (the accelerator default: chunks in one lax.scan) and the CPU
  default (steps dispatched one by one) run the same steps on the same batches."""
  from micronet_jax.app import data as data_lib, recipes, train as train_lib

  rng = np.random.default_rng(0)
  x = rng.normal(size=(96, 28, 28, 1)).astype(np.float32)
  y = (np.arange(96) % 10).astype(np.int32)
  ds = data_lib.Dataset("fashion_mnist", x, y, x[:32], y[:32], "synthetic")
  config = TrainConfig(quant="iao")
  _, net = recipes.build(config)
  variables = net.init(jax.random.key(0), x[:1], train=False)
  out = {}
  for scan in (True, False):
    state = train_lib.create_train_state(net.apply, variables, recipes.optimizer(config, 6), seed=0)
    state, history = train_lib.fit(state, ds, 2, batch_size=32, eval_batch_size=32, progress=False, log=None,
                                   chunk_steps=2, scan=scan)
    out[scan] = (jax.device_get(state.variables), history)
  for a, b in zip(jax.tree.leaves(out[True][0]), jax.tree.leaves(out[False][0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # the same maths, compiled in another loop
  for ra, rb in zip(out[True][1], out[False][1]):
    assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
