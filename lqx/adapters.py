"""Calibration adapters: a user's Flax model as ``lqx.calibrate.Units``.

Each adapter runs the whole model as one unit and reports the input of every
linear it calls (``nnx.Linear`` / ``nn.Dense``, and lqx's ``QLinear`` / ``QDense``)
under the linear's kernel path in the model's params, in call order::

  units = lqx.adapters.nnx_units(model)            # NNX: model(x)
  units = lqx.adapters.linen_units(module)         # Linen: module.apply({"params": p}, x)
  qparams, report = lqx.quantize(units, params, rules, calibration_inputs)

With one unit, ``quantize_units`` reruns the model once per linear so each
linear's Hessian sees the linears before it already quantized (GPTQ's sequential
order). A linear called twice (shared weights) reports its last input only.
"""

from __future__ import annotations

import jax
from flax import linen as nn
from flax import nnx

from lqx.calibrate import Units
from lqx.layers import QDense, QLinear


class _Tap(nnx.Module):
  """Calls ``layer`` after reporting its input to ``report(key, x)``."""

  def __init__(self, layer, report, key: str):
    self.layer, self.report, self.key = layer, report, key

  def __call__(self, x, *args, **kwargs):
    self.report(self.key, x)
    return self.layer(x, *args, **kwargs)


def nnx_units(model: nnx.Module, wrt=nnx.Param) -> Units:
  """``model`` (called as ``model(x)``) as one unit over the pure dict of its ``wrt`` state,
  ``nnx.to_pure_dict(nnx.state(model, wrt))``. The model itself is not changed."""
  graphdef, state, rest = nnx.split(model, wrt, ...)

  def run(name, p, x):
    st = jax.tree.map(lambda a: a, state)
    nnx.replace_by_pure_dict(st, p)
    m = nnx.merge(graphdef, st, rest)
    inputs: dict = {}
    for keys, node in list(nnx.iter_graph(m)):
      if isinstance(node, (nnx.Linear, QLinear)) and keys:
        owner = m
        for k in keys[:-1]:
          owner = owner[k] if isinstance(k, int) else getattr(owner, k)
        tap = _Tap(node, inputs.__setitem__, "/".join(map(str, keys)) + "/kernel")
        if isinstance(keys[-1], int):
          owner[keys[-1]] = tap
        else:
          setattr(owner, keys[-1], tap)
    return m(x), inputs

  return Units(names=("",), run=run)


def linen_units(module: nn.Module, **apply_kwargs) -> Units:
  """``module`` as one unit: ``module.apply({"params": p}, x, **apply_kwargs)``, reporting
  the input of every ``nn.Dense`` / ``QDense`` call (via ``nn.intercept_methods``)."""

  def run(name, p, x):
    inputs: dict = {}

    def intercept(next_fun, args, kwargs, context):
      mod = context.module
      if context.method_name == "__call__" and isinstance(mod, (nn.Dense, QDense)) and args:
        inputs["/".join(mod.path) + "/kernel"] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(intercept):
      y = module.apply({"params": p}, x, **apply_kwargs)
    return y, inputs

  return Units(names=("",), run=run)
