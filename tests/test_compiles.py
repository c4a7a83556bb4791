"""How often calibrate and convert trace and compile: once per model and shapes, never per
call or per layer. Counted with jax.monitoring's trace/compile events and the jitted
helpers' dispatch caches. (train_step's one compilation over many steps is pinned in
tests/test_train.py::test_train_step_compiles_once.)

Every test uses a LeNet width and batch size that no other test uses, so that the
counts are exact whatever ran before in the same process.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from jax import monitoring

import micronet_jax as mj
from micronet_jax._src.flax import calibrate as calibrate_lib
from micronet_jax._src.flax.calibrate import calibrate, ptq_rules
from micronet_jax._src.deploy.integer import _codes, _weight_qparams, convert  # the jitted helpers, to count
from micronet_jax.models import LeNet
from tests.conftest import init_variables

TRACE = "/jax/core/compile/jaxpr_trace_duration"
COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def jax_events():
  """Yields a list that collects (event name, traced function name) while inside."""
  events: list[tuple[str, str]] = []

  def listener(name, _secs, **kw):
    events.append((name, str(kw.get("fun_name", ""))))

  monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    monitoring.unregister_event_duration_listener(listener)


def count(events, name: str, fun: str | None = None) -> int:
  return sum(n == name and (fun is None or fun in f) for n, f in events)


def batches(n: int, size: int, seed: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(size, 28, 28, 1)).astype(np.float32) for _ in range(n)]


def qat_variables(qmodel, model, x, seed):
  return mj.quantize_variables(qmodel, init_variables(model, x[:1], seed=seed), x[:1], train=False)


def test_calibrate_compiles_once_per_model_and_shape():
  model = LeNet(cfg=(3, 5, 7))
  qmodel = mj.quantize_model(model, ptq_rules("minmax"))
  before = calibrate_lib._observe._cache_size()
  with jax_events() as events:
    for seed in range(3):  # other params and other data each call, 4 batches each
      xs = batches(4, 6, seed)
      calibrate(qmodel, qat_variables(qmodel, model, xs[0], seed), xs)
    # an equal model built anew (a frozen dataclass, hashed by value) shares the entry
    twin = mj.quantize_model(LeNet(cfg=(3, 5, 7)), ptq_rules("minmax"))
    calibrate(twin, qat_variables(twin, model, xs[0], 9), xs)
  # until the fix: one trace and one compilation per calibrate() call (4 here)
  assert count(events, TRACE, "_observe") == 1
  assert count(events, COMPILE, "_observe") == 1
  assert calibrate_lib._observe._cache_size() - before == 1


def test_calibrate_new_shape_or_kwargs_is_one_more_compile():
  model = LeNet(cfg=(3, 5, 8))
  qmodel = mj.quantize_model(model, ptq_rules("minmax"))
  v = qat_variables(qmodel, model, batches(1, 1, 0)[0], 0)
  before = calibrate_lib._observe._cache_size()
  with jax_events() as events:
    calibrate(qmodel, v, batches(2, 6, 0))
    calibrate(qmodel, v, batches(2, 5, 0))  # another batch size
    calibrate(qmodel, v, batches(2, 6, 0), train=False)  # the default, spelled out
  assert count(events, COMPILE, "_observe") == 2
  assert calibrate_lib._observe._cache_size() - before == 2


def test_calibrate_unhashable_model_compiles_once_per_object():
  model = LeNet(cfg=[3, 5, 9])  # a list field: the Linen module cannot be hashed
  qmodel = mj.quantize_model(model, ptq_rules("minmax"))
  xs = batches(3, 6, 0)
  with jax_events() as events:
    a = calibrate(qmodel, qat_variables(qmodel, model, xs[0], 0), xs)
    b = calibrate(qmodel, qat_variables(qmodel, model, xs[0], 1), xs)
  assert count(events, COMPILE, "_observe") == 1
  assert not jax.tree.all(jax.tree.map(lambda u, w: bool(np.array_equal(u, w)), a["quant_stats"],
                                       b["quant_stats"]))  # both ran, on their own params


def test_convert_twice_compiles_nothing_the_second_time():
  model = LeNet(cfg=(3, 5, 10))
  qmodel = mj.quantize_model(model, ptq_rules("minmax"))
  xs = batches(2, 6, 0)
  first = calibrate(qmodel, qat_variables(qmodel, model, xs[0], 0), xs)
  second = calibrate(qmodel, qat_variables(qmodel, model, xs[0], 1), xs)
  before = _weight_qparams._cache_size()
  convert(qmodel, first, xs[0][:1])
  # one entry per (weight spec, kernel shape): LeNet's four layers
  assert _weight_qparams._cache_size() - before == 4
  sizes = (_weight_qparams._cache_size(), _codes._cache_size())
  with jax_events() as events:
    d = convert(qmodel, second, xs[0][:1])  # same model and shapes, other values
  # until the fix: 4 compilations here, one jax.jit(lambda) per layer
  assert count(events, COMPILE) == 0
  assert (_weight_qparams._cache_size(), _codes._cache_size()) == sizes
  assert set(d.layers) == {"Conv_0", "Conv_1", "Dense_0", "Dense_1"}
