"""Flax layers whose kernel may be quantized: ``QLinear`` (NNX) and ``QDense`` (Linen).

A kernel is a float ``(in, out)`` array or a quantized one (anything with
``dequantize()``, e.g. ``lqx.QArray``); both go through ``lqx.nn.linear``, so
a layer computes ``x[..., in] @ kernel + bias[out]`` in the dtype of ``x``
(or ``dtype`` when set). Params keep the names and paths of ``nnx.Linear`` /
``nn.Dense`` (``.../kernel``, ``.../bias``), so a param tree quantized by
``lqx.quantize`` lines up with the model it came from.

NNX: build the model as usual, quantize its params, then ``load_quantized``::

  qparams, _ = lqx.quantize(None, nnx.to_pure_dict(nnx.state(model, nnx.Param)), rules)
  load_quantized(model, qparams)  # every quantized nnx.Linear is now a QLinear

Linen: use ``QDense`` where ``nn.Dense`` was (same fields, same param tree) and
``model.apply({"params": qparams}, x)``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from lqx import tree
from lqx.nn import linear


class Quantized(nnx.Variable):
  """A quantized kernel in an NNX module. Not an ``nnx.Param``: ``nnx.state(model, nnx.Param)``
  and optimizers (``wrt=nnx.Param``) leave it out; ``nnx.state(model, Quantized)`` selects it."""


def _shape(kernel) -> tuple[int, ...]:
  return tuple(int(d) for d in kernel.shape)


class QLinear(nnx.Module):
  """``nnx.Linear`` whose kernel may be quantized.

  ``kernel``: float ``(in, out)`` array (stored as ``nnx.Param``) or a
  quantized kernel of that shape (stored as ``Quantized``). ``bias``:
  ``(out,)`` or ``None``. Computes in the dtype of ``x``, or ``dtype`` if set.
  """

  def __init__(self, kernel, bias: jax.Array | None = None, *, dtype=None):
    shape = _shape(kernel)
    if len(shape) != 2:
      raise ValueError(f"kernel must be (in, out), got shape {shape}")
    if bias is not None and _shape(bias) != shape[1:]:
      raise ValueError(f"bias has shape {_shape(bias)}; kernel {shape} needs ({shape[1]},)")
    self.kernel = Quantized(kernel) if tree.is_kernel_leaf(kernel) else nnx.Param(kernel)
    self.bias = nnx.data(None) if bias is None else nnx.Param(bias)
    self.in_features, self.out_features = shape
    self.use_bias = bias is not None
    self.dtype = dtype

  @classmethod
  def from_linear(cls, layer: nnx.Linear | QLinear, kernel) -> QLinear:
    """A ``QLinear`` with ``layer``'s bias and ``dtype`` and this ``kernel`` (same ``(in, out)``).

    ``layer``'s ``precision``/``dot_general``/``promote_dtype`` are not carried over.
    """
    want = (layer.in_features, layer.out_features)
    if _shape(kernel) != want:
      raise ValueError(f"kernel has shape {_shape(kernel)}; the layer is {want} (in, out)")
    bias = None if layer.bias is None else layer.bias.get_value()
    return cls(kernel, bias, dtype=layer.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.dtype is not None:
      x = x.astype(self.dtype)
    bias = None if self.bias is None else self.bias.get_value()
    return linear(x, self.kernel.get_value(), bias)


def load_quantized(model: nnx.Module, qparams: dict) -> None:
  """Loads ``qparams`` into ``model`` in place; every ``nnx.Linear`` whose kernel is quantized
  becomes a ``QLinear`` holding it.

  ``qparams``: a pure dict like ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``
  (what ``lqx.quantize`` returns for it). A quantized leaf ``"a/0/kernel"``
  replaces the ``nnx.Linear`` (or ``QLinear``) at ``a/0``; a float leaf sets
  the Variable at its path (at a quantized kernel: swaps a float one back in).
  Variables absent from ``qparams`` are left as they are. Raises ``ValueError``
  naming the path, before changing anything, when a leaf has no matching
  variable, a quantized leaf is not a linear kernel, or shapes differ. A module
  reachable by two paths is replaced only at the first.
  """
  nodes = {"/".join(map(str, keys)): (keys, node) for keys, node in nnx.iter_graph(model)}
  updates, swaps = [], []  # checked in full before the model changes
  for keys, value in jax.tree_util.tree_leaves_with_path(qparams, is_leaf=tree.is_kernel_leaf):
    path = tree.path_str(keys)
    var = nodes.get(path, (None, None))[1]
    if not tree.is_kernel_leaf(value) and not isinstance(var, Quantized):
      if not isinstance(var, nnx.Variable):
        raise ValueError(f"{path}: the model has no variable at this path")
      if jnp.shape(value) != jnp.shape(var.get_value()):
        raise ValueError(f"{path}: shape {jnp.shape(value)} does not match the model's {jnp.shape(var.get_value())}")
      updates.append((var, value))
      continue
    parent, _, name = path.rpartition("/")
    layer_keys, layer = nodes.get(parent, ((), None)) if parent else ((), None)
    if name != "kernel" or not isinstance(layer, (nnx.Linear, QLinear)):
      found = f"{parent!r} is {type(layer).__name__}" if layer is not None else f"there is no submodule {parent!r}"
      raise ValueError(f"{path}: a quantized leaf must be the kernel of an nnx.Linear; {found}")
    want = (layer.in_features, layer.out_features)
    if _shape(value) != want:
      raise ValueError(f"{path}: kernel has shape {_shape(value)}; the layer is {want} (in, out)")
    swaps.append((layer_keys, layer, value))
  for var, value in updates:
    var.set_value(value)
  for keys, layer, q in swaps:  # after the updates, so the new layer takes the loaded bias
    owner, new = nodes["/".join(map(str, keys[:-1]))][1], QLinear.from_linear(layer, q)
    if isinstance(keys[-1], int):  # an item of an nnx.List (e.g. nnx.Sequential.layers)
      owner[keys[-1]] = new
    else:
      setattr(owner, keys[-1], new)


class QDense(nn.Module):
  """``nn.Dense`` whose ``params["kernel"]`` may be quantized (same fields subset, same param tree).

  ``init`` makes a float ``(in, features)`` kernel and ``(features,)`` bias;
  ``apply`` reads the kernel as given, float or quantized, checking only its
  shape. Computes in the dtype of ``x``, or ``dtype`` if set.
  """

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (jnp.shape(x)[-1], self.features)
    if self.has_variable("params", "kernel"):
      # self.param would compare the leaves of a quantized kernel with the float shape and raise.
      kernel = nn.meta.unbox(self.get_variable("params", "kernel"))
      if _shape(kernel) != shape:
        path = "/".join(self.scope.path + ("kernel",))
        raise ValueError(f"{path}: kernel has shape {_shape(kernel)}; input and features need {shape}")
    else:
      kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    if self.dtype is not None:
      x = x.astype(self.dtype)
    return linear(x, kernel, bias)
