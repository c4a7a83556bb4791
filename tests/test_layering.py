"""The package's layering, enforced: each layer imports only the layers below it.

    _src/core     framework-neutral: STEs, quantizers, observers, binary, fixed point, rules,
                  the seam contract and what is written once against it, BN-folding maths, MACs
    _src/flax     the Linen adapter: the seam on Linen scopes, the plan, the transform
    _src/deploy   integer and packed-binary deploy, from the flax layer's plan
    _src/prune    network slimming
    _src/nnx      the NNX adapter: the seam on NNX variables, quantized NNX layers computing through
                  core; a Linen view of an NNX model for the plan and the deploy only
    micronet_jax  the curated public API (__init__, ops)
    models        the model zoo, built on the public API
    app           training loop, data, runs and the CLI: may use everything

Nothing below ``app`` imports it, and nothing in the library imports the zoo (a model
declares what the library needs, e.g. ``slim_layout()`` for pruning).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "micronet_jax"

ALLOWED = {  # layer -> the layers it may import (its own included)
    "_src.core": {"_src.core"},
    "_src.flax": {"_src.core", "_src.flax"},
    "_src.deploy": {"_src.core", "_src.flax", "_src.deploy"},
    "_src.prune": {"_src.core", "_src.flax", "_src.prune"},
    "_src.nnx": {"_src.core", "_src.flax", "_src.deploy", "_src.nnx"},  # NNX reuses the Linen plan and deploy
    "api": {"_src.core", "_src.flax", "_src.deploy", "_src.prune", "_src.nnx", "api"},
    "models": {"api", "models"},
    "app": {"_src.core", "_src.flax", "_src.deploy", "_src.prune", "_src.nnx", "api", "models", "app"},
}


def _layer_of_module(dotted: str) -> str:
  """'micronet_jax._src.flax.plan' -> '_src.flax'; the public modules -> 'api'."""
  parts = dotted.split(".")[1:]
  if parts == ["_src", "__init__"]:  # the empty private package marker
    return "_src.core"
  if parts[:1] == ["_src"]:
    return ".".join(parts[:2])
  if parts[:1] in (["models"], ["app"]):
    return parts[0]
  return "api"


def _imports(path: pathlib.Path) -> list[str]:
  tree = ast.parse(path.read_text())
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out.append(node.module)
      # "from micronet_jax import ops" imports a module of the package
      out += [f"{node.module}.{a.name}" for a in node.names if node.module == "micronet_jax" and a.name == "ops"]
  return [m for m in out if m == "micronet_jax" or m.startswith("micronet_jax.")]


FILES = sorted(PKG.rglob("*.py"))


def test_every_file_belongs_to_a_layer():
  assert len(FILES) > 20
  for f in FILES:
    assert _layer_of_module("micronet_jax." + ".".join(f.relative_to(PKG).with_suffix("").parts)) in ALLOWED


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_respect_the_layers(path):
  own = _layer_of_module("micronet_jax." + ".".join(path.relative_to(PKG).with_suffix("").parts))
  bad = [m for m in _imports(path) if _layer_of_module(m) not in ALLOWED[own]]
  assert not bad, f"{path.relative_to(PKG)} ({own}) imports {bad}; allowed layers: {sorted(ALLOWED[own])}"


def test_no_file_is_over_400_lines():
  long = {str(f.relative_to(PKG)): n for f in FILES if (n := len(f.read_text().splitlines())) > 400}
  assert not long, long


def test_public_names_are_not_modules():
  """``mj.calibrate`` is the function, never a module that shadows it, and every name in
  ``__all__`` exists."""
  import types

  import micronet_jax as mj

  for name in mj.__all__:
    assert hasattr(mj, name), name
    assert not isinstance(getattr(mj, name), types.ModuleType), name
