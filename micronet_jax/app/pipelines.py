"""The pipelines: a config in, a run directory written, a typed result out.

    train(TrainConfig)  -> TrainResult    float, QAT, or QAFT (``qaft=True``, from a QAT/PTQ run)
    ptq(PtqConfig)      -> PtqResult      calibrate a float run's IAO observers and freeze them
    prune(PruneConfig)  -> PruneResult    network slimming of a float run
    convert(ConvertConfig) -> ConvertResult, evaluate_artifact(EvalConfig) -> EvalResult
                                          (``artifacts``: the deploy artifact and its test)

``run(config)`` picks the pipeline by the config's type; the CLI and the scripts in
``experiments/`` call it. Every result is also written as the run's ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax

from micronet_jax import models
from micronet_jax._src.flax.calibrate import calibrate
from micronet_jax._src.flax.centering import center_clip_projection
from micronet_jax._src.flax.stats import model_stats
from micronet_jax._src.flax.transform import QuantizedModel, quantize_variables, summary
from micronet_jax._src.prune import slimming as prune_lib
from micronet_jax.app import artifacts, checkpoints, interrupt, parallel, recipes, rundir, runs
from micronet_jax.app import data as data_lib
from micronet_jax.app import train as train_lib
from micronet_jax.app import config as config_lib
from micronet_jax.app.config import ConvertConfig, EvalConfig, PruneConfig, PtqConfig, TrainConfig
from micronet_jax.app.errors import ConfigError
from micronet_jax.app.evaluation import evaluate, model_forward
from micronet_jax.app.results import ConvertResult, EvalResult, PruneResult, PtqResult, TrainResult

Log = Callable[[str], Any]
# Steps per jitted scan: the host dispatches once per chunk; signals and checkpoints act at chunk ends.
CHUNK_STEPS = 100


def _start_variables(config: TrainConfig, net: Any, x0: jax.Array, log: Log, x_first: Any) -> dict:
  """Fresh variables, or the ``from_run`` checkpoint fitted to this run's quantization;
  learned quantizer params (LSQ, PACT) start from ``x_first``, the first training batch."""
  if config.from_run is None:
    variables = jax.jit(lambda k: net.init(k, x0, train=False))(jax.random.key(config.seed))
    return recipes.init_quantizer_params(net, variables, x_first)
  src, _, variables = runs.load_run(config.from_run)
  if (src.model, src.model_cfg) != (config.model, config.model_cfg):
    raise ConfigError(f"--from {config.from_run} holds {src.model} cfg={src.model_cfg}, "
                      f"not {config.model} cfg={config.model_cfg}")
  quant_fields = lambda c: (c.quant, c.w_bits, c.a_bits, c.observer, c.fold_bn)
  if quant_fields(src) == quant_fields(config):
    log(f"starting from {config.from_run} ({src.label}), observers included")
    return variables
  variables = {k: v for k, v in variables.items() if k != "quant_stats"}
  log(f"starting from {config.from_run} ({src.label}) weights" + ("" if config.quant == "float" else
                                                                ", fresh observers"))
  if isinstance(net, QuantizedModel):
    variables = quantize_variables(net, variables, x_first, train=False)
  return variables


def _start_state(config: TrainConfig, dataset: data_lib.Dataset, log: Log) -> tuple[Any, jax.Array, Any]:
  """(model, example input, initial TrainState) of a training run."""
  _, net = recipes.build(config, dataset.num_classes)
  x0 = config.example_input()
  try:  # micronet's centering and clipping of binary weights, after every step
    project = center_clip_projection(net, x0, train=False)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  variables = _start_variables(config, net, x0, log, dataset.x_train[:config.batch_size])
  if isinstance(net, QuantizedModel):
    log(summary(net, x0, train=False))
  total_steps = config.epochs * (len(dataset.x_train) // config.batch_size)
  # QAFT: observers and BatchNorm statistics stay as the QAT/PTQ run left them.
  frozen = ("quant_stats", "batch_stats") if config.qaft else ()
  state = train_lib.create_train_state(net.apply, variables, recipes.optimizer(config, total_steps),
                                       seed=config.seed, frozen=frozen, project=project)
  return net, x0, state


def _eval_batch(config: TrainConfig, n_test: int, mesh: Any, log: Log) -> int:
  """The evaluation batch: ``config.eval_batch_size``, an error when it was given larger
  than the test set; the default (``EVAL_BATCH_DEFAULT``) is cut to the test set, rounded
  down to a multiple of the devices (the masked padding makes the accuracy the same)."""
  if config.eval_batch_size <= n_test:
    return config.eval_batch_size
  if config.eval_batch_size != config_lib.EVAL_BATCH_DEFAULT:
    raise ConfigError(f"eval batch size {config.eval_batch_size} is larger than the test set "
                      f"({n_test} examples); give --eval-batch-size {n_test} or less")
  devices = mesh.devices.size
  batch = max(n_test // devices, 1) * devices
  log(f"eval batch {batch} (the default {config.eval_batch_size} is more than the {n_test} test examples)")
  return batch


def _check_observed(config: TrainConfig, model_state: dict) -> None:
  """QAFT freezes the observers, so every one must hold a range seen on data (a QAT or
  PTQ run with the same quantization); ranges at their initial [0, 0] would stay there."""
  key = lambda k: str(getattr(k, "key", getattr(k, "name", k)))
  fresh = ["/".join(map(key, path[:-1])) for path, leaf in
           jax.tree_util.tree_flatten_with_path(model_state.get("quant_stats", {}))[0]
           if key(path[-1]) == "initialized" and not bool(jax.device_get(leaf))]
  if fresh:
    raise ConfigError(f"--qaft fine-tunes with frozen observers, but {len(fresh)} observer(s) of --from "
                      f"{config.from_run} have seen no data ({', '.join(fresh[:3])}{', ...' if len(fresh) > 3 else ''}): "
                      "run QAT (train --quant iao) or PTQ (micronet-jax ptq) first, with the same --quant, bits, "
                      "--observer and --fold-bn")


def train(config: TrainConfig, progress: bool = True, log: Log = print, *, overwrite: bool = False,
          resume: bool = False) -> TrainResult:
  """Trains as ``config`` says and writes the run directory ``config.out``.

  The run is written in ``OUT.incomplete`` (``rundir.RunWriter``) with resumable
  checkpoints every ``config.checkpoint_every`` steps and at each epoch end; SIGINT or
  SIGTERM saves one and raises ``Interrupted``. ``resume`` continues such a run from its
  latest checkpoint to the same result as an uninterrupted run. ``overwrite`` allows
  replacing an existing ``OUT`` (kept until the new run is complete).
  """
  mesh = parallel.data_mesh()
  try:
    parallel.check_divisible(mesh, config.batch_size)
    parallel.check_divisible(mesh, config.eval_batch_size, "eval batch size")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  with rundir.RunWriter(config.out, overwrite=overwrite, resume=resume) as writer:
    dataset = data_lib.subset(data_lib.load(config.dataset, config.data_dir), config.limit_train, config.limit_test)
    if config.batch_size > len(dataset.x_train):
      raise ConfigError(f"batch size {config.batch_size} is larger than the training set "
                        f"({len(dataset.x_train)} examples)")
    eval_batch = _eval_batch(config, len(dataset.x_test), mesh, log)
    net, x0, state = _start_state(config, dataset, log)
    if config.qaft:
      _check_observed(config, state.model_state)
    if not resume:
      runs.write_config(writer.path, config)
    writer.keep_on_error = True  # from here on OUT.incomplete holds a resumable run
    devices = mesh.devices.size
    log(f"{config.label}: {config.model} on {config.dataset} ({len(dataset.x_train)} train / "
        f"{len(dataset.x_test)} test, from {dataset.source}), {config.epochs} epochs, batch {config.batch_size}, "
        f"{devices} {jax.default_backend()} device{'s' if devices > 1 else ''}")
    start = time.perf_counter()
    with checkpoints.Progress(os.path.join(writer.path, checkpoints.PROGRESS_DIR), config.checkpoint_every) as prog, \
         interrupt.StopOnSignal() as stop:
      state, history = train_lib.fit(
          state, dataset, config.epochs, config.batch_size, config.seed, eval_batch, progress=progress,
          log=log, mesh=mesh, checkpoints=prog, on_epoch=lambda h: runs.write_epochs(writer.path, h), stop=stop,
          chunk_steps=min(CHUNK_STEPS, config.checkpoint_every or CHUNK_STEPS),
          resume_hint=f"continue with `micronet-jax train --resume {config.out}`")
    runs.write_epochs(writer.path, history)
    accs = [h["test_accuracy"] for h in history]
    steady = [h["seconds"] for h in history[1:]] or [history[0]["seconds"]]
    result = TrainResult(
        label=config.label, test_accuracy=accs[-1], best_test_accuracy=max(accs), epochs=config.epochs,
        seconds_per_epoch=sum(steady) / len(steady), first_epoch_seconds=history[0]["seconds"],
        total_seconds=time.perf_counter() - start, history=list(history),
        model_stats=model_stats(net, state.variables, x0, train=False).row(),
        config=dataclasses.asdict(config), versions=train_lib.package_versions(),
    )
    runs.write_run_files(writer.path, config, jax.device_get(state.variables),
                         {**result.to_json(), "data_source": dataset.source})
    writer.commit(skip=(checkpoints.PROGRESS_DIR,))
  return result


def prune(config: PruneConfig, log: Log = print, *, overwrite: bool = False) -> PruneResult:
  """Slims a float run and writes a run directory that ``train --from`` accepts.

  Reports test accuracy of the original, of the masked original (pruned channels'
  gamma zeroed, and beta too unless ``compensate_beta``: the network the pruned one
  reproduces) and of the pruned network, with parameters and size.
  """
  with rundir.RunWriter(config.out, overwrite=overwrite) as writer:
    src, model, variables = runs.load_run(config.from_run)
    if src.quant != "float":
      raise ConfigError(f"{config.from_run} is a {src.label} run; prune a float run, then quantize the pruned one")
    try:
      new_model, new_vars, plan = prune_lib.prune(model, variables, config.percent, config.regular,
                                                  config.compensate_beta)
    except ValueError as e:
      raise ConfigError(str(e)) from e
    dataset = data_lib.load(src.dataset, config.data_dir or src.data_dir)
    x0 = src.example_input()
    masked = prune_lib.mask_variables(model, variables, plan, zero_beta=not config.compensate_beta)
    acc = evaluate({"before": model_forward(model, variables), "masked": model_forward(model, masked),
                    "pruned": model_forward(new_model, new_vars)},
                   dataset.x_test, dataset.y_test, src.eval_batch_size).accuracy
    before, after = model_stats(model, variables, x0, train=False), model_stats(new_model, new_vars, x0, train=False)
    out_config = dataclasses.replace(src, model_cfg=tuple(plan.cfg), from_run=config.from_run, out=config.out,
                                     sparsity=0.0)
    result = PruneResult(
        label=f"pruned {config.percent:.0%}" + (f" (regular {config.regular})" if config.regular > 1 else ""),
        percent=config.percent, regular=config.regular, threshold=plan.threshold,
        cfg_before=list(src.model_cfg or models.get_model(src.model).cfg), cfg=list(plan.cfg),
        # masked: what the pruned network reproduces (pruned channels' beta kept, folded into
        # the next bias, with compensation; zeroed as micronet does without it)
        test_accuracy_before=acc["before"], test_accuracy_masked=acc["masked"], test_accuracy=acc["pruned"],
        model_stats_before=before.row(), model_stats=after.row(), params_removed=1 - after.params / before.params,
        config=dataclasses.asdict(out_config), versions=train_lib.package_versions(),
    )
    runs.write_run_files(writer.path, out_config, new_vars, {**result.to_json(), "data_source": dataset.source})
    writer.commit()
    r = result
    log(f"threshold |gamma| > {plan.threshold:.4g}; cfg {r.cfg_before} -> {r.cfg} (test set from {dataset.source})\n"
        f"| model | params | MMACs | test acc |\n|---|---|---|---|\n"
        f"| original | {before.params:,} | {before.macs / 1e6:.2f} | {100 * r.test_accuracy_before:.2f}% |\n"
        f"| masked (pruned gamma = 0{'' if config.compensate_beta else ', beta = 0'}) | {before.params:,} | "
        f"{before.macs / 1e6:.2f} | {100 * r.test_accuracy_masked:.2f}% |\n"
        f"| pruned | {after.params:,} | {after.macs / 1e6:.2f} | {100 * r.test_accuracy:.2f}% |")
    return result


def ptq(config: PtqConfig, progress: bool = True, log: Log = print, *, overwrite: bool = False) -> PtqResult:
  """Post-training quantization of a float run: calibrate IAO observers, freeze, report.

  Calibration batches are ``config.batches`` shuffled training batches of
  ``config.batch_size`` (no augmentation). Reports test accuracy of the float and of the
  quantized model, and writes a run directory that ``train --from OUT --qaft`` fine-tunes.
  """
  with rundir.RunWriter(config.out, overwrite=overwrite) as writer:
    src, model, variables = runs.load_run(config.from_run)
    if src.quant != "float":
      raise ConfigError(f"{config.from_run} is a {src.label} run; PTQ starts from a float run")
    run_config = dataclasses.replace(
        src, quant="iao", w_bits=config.w_bits, a_bits=config.a_bits, observer=config.method, fold_bn=config.fold_bn,
        from_run=config.from_run, out=config.out, data_dir=config.data_dir or src.data_dir, seed=config.seed)
    dataset = data_lib.load(run_config.dataset, run_config.data_dir)
    _, qmodel = recipes.build(run_config, dataset.num_classes)
    x0 = run_config.example_input()
    qvars = quantize_variables(qmodel, variables, x0, train=False)
    if config.batches * config.batch_size > len(dataset.x_train):
      raise ConfigError(f"{config.batches} batches of {config.batch_size} exceed the training set "
                        f"({len(dataset.x_train)})")
    batches = (x for x, _ in data_lib.train_batches(dataset.x_train, dataset.y_train, config.batch_size,
                                                     seed=config.seed))
    start = time.perf_counter()
    qvars = calibrate(qmodel, qvars, batches, config.batches, progress=progress)
    seconds = time.perf_counter() - start
    acc = evaluate({"float": model_forward(model, variables), "ptq": model_forward(qmodel, qvars)},
                   dataset.x_test, dataset.y_test, src.eval_batch_size).accuracy
    result = PtqResult(
        label=f"PTQ {config.method} W{config.w_bits}A{config.a_bits}" + (", BN folding on" if config.fold_bn else ""),
        method=config.method, calibration_batches=config.batches, calibration_batch_size=config.batch_size,
        calibration_seconds=seconds, float_test_accuracy=acc["float"], test_accuracy=acc["ptq"],
        best_test_accuracy=acc["ptq"], model_stats=model_stats(qmodel, qvars, x0, train=False).row(),
        config=dataclasses.asdict(run_config), versions=train_lib.package_versions(),
    )
    runs.write_run_files(writer.path, run_config, qvars, {**result.to_json(), "data_source": dataset.source})
    writer.commit()
    log(f"data from {dataset.source}\n| model | test acc |\n|---|---|\n| float | {100 * result.float_test_accuracy:.2f}% |\n"
        f"| {result.label} | {100 * result.test_accuracy:.2f}% |")
    return result


Config = TrainConfig | PtqConfig | PruneConfig | ConvertConfig | EvalConfig
Result = TrainResult | PtqResult | PruneResult | ConvertResult | EvalResult


def run(config: Config, progress: bool = True, log: Log = print, *, overwrite: bool = False,
        resume: bool = False) -> Result:
  """The pipeline of ``config``'s type, run. ``overwrite``: may replace an existing output
  directory; ``resume``: continue an interrupted training run."""
  if resume and not isinstance(config, TrainConfig):
    raise ConfigError("only a training run can be resumed")
  if isinstance(config, TrainConfig):
    return train(config, progress=progress, log=log, overwrite=overwrite, resume=resume)
  if isinstance(config, PtqConfig):
    return ptq(config, progress=progress, log=log, overwrite=overwrite)
  if isinstance(config, PruneConfig):
    return prune(config, log=log, overwrite=overwrite)
  if isinstance(config, ConvertConfig):
    return artifacts.convert(config, log=log, overwrite=overwrite)
  if isinstance(config, EvalConfig):
    return artifacts.evaluate_artifact(config, log=log)
  raise TypeError(f"no pipeline for a {type(config).__name__}")
