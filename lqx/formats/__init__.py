"""Quantized-weight formats: one small protocol, and a registry by name.

A format stands for a float ``(IC, OC)`` kernel (Flax layout). Every format is a
JAX pytree (its arrays are leaves, its settings static), so it jits, shards and
checkpoints, and implements :class:`QuantizedKernel`:

  shape, dtype       the logical kernel's ``(IC, OC)`` and dtype
  dequantize()       the float ``(IC, OC)`` kernel it stands for
  linear(x)          ``x[..., IC] @ kernel`` (``lqx.nn.linear`` calls it; a format may
                     fuse it, e.g. into a Pallas kernel, as long as it equals
                     ``x @ dequantize()`` to float tolerance)
  stored_bits        exact storage: every array, at its stored dtype, padding included
  bits_per_weight    ``stored_bits / (IC * OC)``

Formats compose as wrappers that hold another format as a data field (e.g. a
sparse-outlier or low-rank format around an affine one), each in its own file
here with its invariant in the module docstring. ``FORMATS`` maps a name to the
class; checkpoints store that name. Add a format: one file, one ``register`` line.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import numpy as np

from lqx.formats.actquant import ActQuant
from lqx.formats.affine import QArray
from lqx.formats.codebook import Codebook
from lqx.formats.lowrank import LowRank
from lqx.formats.sparse import Sparse


@runtime_checkable
class QuantizedKernel(Protocol):
  """What every format provides (module docstring)."""

  shape: tuple[int, int]
  dtype: np.dtype

  def dequantize(self) -> jax.Array: ...

  def linear(self, x: jax.Array) -> jax.Array: ...

  @property
  def stored_bits(self) -> int: ...

  @property
  def bits_per_weight(self) -> float: ...


FORMATS: dict[str, type] = {}


def register(name: str, cls: type) -> type:
  """Adds format ``cls`` under ``name`` (the name checkpoints store). Returns ``cls``."""
  if name in FORMATS and FORMATS[name] is not cls:
    raise ValueError(f"format name {name!r} is taken by {FORMATS[name].__name__}")
  missing = [a for a in ("dequantize", "linear", "stored_bits", "bits_per_weight") if not hasattr(cls, a)]
  if missing:
    raise TypeError(f"format {cls.__name__} lacks {missing} (lqx.formats.QuantizedKernel)")
  FORMATS[name] = cls
  return cls


def name_of(kernel) -> str:
  """The registered name of ``kernel``'s format; raises for an unregistered type."""
  for name, cls in FORMATS.items():
    if type(kernel) is cls:
      return name
  raise ValueError(f"{type(kernel).__name__} is not a registered format (lqx.formats.FORMATS: {sorted(FORMATS)})")


def is_quantized(x) -> bool:
  """Whether ``x`` is a quantized kernel (any format), as opposed to a float array."""
  return isinstance(x, QuantizedKernel)


register("affine", QArray)
register("codebook", Codebook)
register("lowrank", LowRank)
register("sparse", Sparse)
register("actquant", ActQuant)
