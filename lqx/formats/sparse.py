"""The dense-and-sparse format: any other format plus a fixed-capacity list of exact corrections (``Sparse``).

A ``Sparse`` stands for an ``(IC, OC)`` kernel ``w`` as a base format (affine
``QArray``, a codebook, ...) plus ``capacity`` entries ``(index, values)``, as
SqueezeLLM's dense-and-sparse decomposition (arXiv 2306.07629, Sec. 4.2) keeps
its outliers and most sensitive weights in a sparse full-precision matrix. Its
invariant, on the flat row-major kernel (entry ``(i, o)`` is ``i * OC + o``)::

    dequantize() = base.dequantize() + scatter_add(index, values)     (float32 sum, cast to dtype)
    linear(x)    = base.linear(x) + sum_k x[..., index[k] // OC] * values[k]  into output index[k] % OC

``linear`` never densifies the sparse part: it gathers the ``capacity`` input
columns it needs and scatter-adds their products into the ``OC`` outputs.

Storage (the leaves; static capacity = their length, so a ``Sparse`` jits and shards):

* ``index``: int32 ``(capacity,)`` flat positions ``i * OC + o``. Unused slots are
  *padding*: index ``IC * OC`` (one past the last entry) with value 0; scatters
  drop it, so padding adds nothing whatever its value. :meth:`Sparse.from_dense`
  writes real entries sorted ascending and unique, padding last; ``dequantize``
  and ``linear`` are correct for any order (duplicate real indices would add up).
* ``values``: ``value_dtype`` ``(capacity,)``: the *delta* ``w - base`` at each
  position, so dense plus sparse reproduces ``w`` there (the authors instead keep
  the full weight and quantize the dense part with it zeroed, so their pair gives
  ``w + base(0)``). float16 by default (the authors' fp16 sparse matrix) or float32.

Exactness. With float32 values, ``from_dense`` stores ``d = fl32(w - b)`` for the
base value ``b``; it is the float32 nearest to ``w - b``, so ``fl32(b + d)`` is as
close to ``w`` as any float32 delta makes it. It equals ``w`` exactly whenever
``w - b`` is a float32: always when ``b/2 <= w <= 2b`` (Sterbenz), so wherever the
base rounds ``w`` to the nearest level of a grid holding 0 without clipping
(affine min-max codes: ``b = 0`` or ``|w - b| <= |b|/2``). Otherwise (e.g. ``|b|``
well above ``|w|`` and ``w`` holding bits below ``ulp(b)``) no float32 delta is
exact; the error is the two roundings, at most ``ulp(d)/2 + ulp(w)/2``.
With float16 values the delta is further rounded to the nearest float16: error at
most ``max(2**-11 |d|, 2**-25)`` plus the float32 rounding of the sum.

Static (aux) data: ``value_dtype``; ``shape`` and ``dtype`` are the base's.
``nnz`` (real entries) is a traced int32 count. ``stored_bits`` is the base's plus
both own leaves at their stored dtypes, padding included.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lqx.formats.storage import Wrapper

VALUE_DTYPES = (np.dtype(jnp.float16), np.dtype(jnp.float32))
INDEX_DTYPE = np.dtype(np.int32)
MAX_NUMEL = np.iinfo(np.int32).max  # the padding index IC * OC must itself be an int32


def check_value_dtype(value_dtype) -> np.dtype:
  """``value_dtype`` as a numpy dtype; raises unless float16 or float32."""
  try:
    dt = np.dtype(value_dtype)
  except TypeError:
    dt = None
  if dt not in VALUE_DTYPES:
    raise ValueError(f"{value_dtype=} is not a sparse value type; expected float16 or float32")
  return dt


def _concrete(x) -> bool:
  """Whether ``x`` holds readable values (not a tracer, a ``ShapeDtypeStruct`` or a remote shard)."""
  if isinstance(x, np.ndarray):
    return True
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_fully_addressable


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["base", "index", "values"],
    meta_fields=["value_dtype"],
)
@dataclasses.dataclass(frozen=True)
class Sparse(Wrapper):
  """``base`` plus ``scatter_add(index, values)`` on the flat ``(IC, OC)`` kernel (module doc)."""

  base: Any  # any registered format standing for the same (IC, OC) kernel
  index: jax.Array  # (capacity,) int32 flat i * OC + o; padding = IC * OC
  values: jax.Array  # (capacity,) value_dtype: w - base at index; 0 for padding
  value_dtype: np.dtype

  @property
  def capacity(self) -> int:
    """Number of slots (static), real entries and padding."""
    return int(self.index.shape[0])

  @property
  def nnz(self) -> jax.Array:
    """int32 count of real (non-padding) entries; traced under jit."""
    ic, oc = self.shape
    return jnp.sum(self.index < ic * oc, dtype=jnp.int32)

  @classmethod
  def from_dense(cls, base, w: jax.Array, index: jax.Array, *, value_dtype=jnp.float16) -> Sparse:
    """``Sparse`` of format ``base`` (standing for ``w`` ``(IC, OC)``) keeping ``w`` exactly at flat ``index``.

    ``index`` ``(capacity,)`` integer positions ``i * OC + o``; ``IC * OC`` marks padding.
    Duplicates are kept once (the extra slots become padding). Stores ``w - base`` there as
    ``value_dtype`` (module doc: exactness). On concrete inputs raises ``ValueError`` for an
    index outside ``[0, IC * OC]`` or a delta that is not finite in ``value_dtype``; under
    jit such indices become padding.
    """
    vdt = check_value_dtype(value_dtype)
    shape = tuple(base.shape)
    if tuple(w.shape) != shape:
      raise ValueError(f"w has shape {tuple(w.shape)}; base stands for a {shape} kernel")
    index = jnp.asarray(index)
    if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
      raise ValueError(f"index must be a 1-D integer array of flat positions, got {index.ndim}-D {index.dtype}")
    numel = shape[0] * shape[1]
    if numel > MAX_NUMEL:
      raise ValueError(f"a {shape} kernel has {numel} entries; int32 flat indices allow at most {MAX_NUMEL}")
    if _concrete(index) and index.size and not (0 <= int(jnp.min(index)) and int(jnp.max(index)) <= numel):
      raise ValueError(f"index holds values outside [0, {numel}] (IC * OC = {numel} is padding)")
    idx, values = _from_dense(base, w, index, vdt)
    if _concrete(values) and not bool(jnp.all(jnp.isfinite(values))):
      raise ValueError(f"w - base at index is not finite in {vdt} (w not finite, or |w - base| > "
                       f"{float(jnp.finfo(vdt).max)}); pass value_dtype=float32 or check w")
    sp = cls(base, idx, values, vdt)
    sp.check()
    return sp

  def dequantize(self) -> jax.Array:
    """The ``(IC, OC)`` kernel, ``base.dequantize() + scatter_add(index, values)``, in ``dtype``."""
    return _dequantize(self)

  def linear(self, x: jax.Array) -> jax.Array:
    """``x[..., IC] @ dequantize()`` as ``base.linear(x)`` plus the sparse product, in the dtype of ``x``."""
    y = self.base.linear(x)
    return (y.astype(jnp.float32) + _sparse_product(x, self.index, self.values, self.shape)).astype(x.dtype)

  def check(self) -> None:
    """Raise ``ValueError`` unless ``index`` and ``values`` are ``(capacity,)`` int32 and ``value_dtype``
    and, when their values are readable, every index lies in ``[0, IC * OC]`` (checkpoint restore calls
    this; the base is validated on its own)."""
    if not (hasattr(self.base, "dequantize") and hasattr(self.base, "linear") and hasattr(self.base, "shape")):
      raise ValueError(f"base is a {type(self.base).__name__}; expected a quantized-kernel format")
    shape = self.shape
    if not (len(shape) == 2 and all(isinstance(d, (int, np.integer)) and d > 0 for d in shape)):
      raise ValueError(f"base.shape={shape!r} is not a pair of positive ints")
    numel = shape[0] * shape[1]
    if numel > MAX_NUMEL:
      raise ValueError(f"a {shape} kernel has {numel} entries; int32 flat indices allow at most {MAX_NUMEL}")
    vdt = check_value_dtype(self.value_dtype)
    got = {n: (tuple(getattr(self, n).shape), np.dtype(getattr(self, n).dtype)) for n in ("index", "values")}
    if len(got["index"][0]) != 1 or got["index"][1] != INDEX_DTYPE:
      raise ValueError(f"index is {got['index'][0]} {got['index'][1]}; expected (capacity,) int32")
    want = (got["index"][0], vdt)
    if got["values"] != want:
      raise ValueError(f"values is {got['values'][0]} {got['values'][1]}, but index {got['index'][0]} and "
                       f"value_dtype={vdt} need {want[0]} {want[1]}")
    if _concrete(self.index) and self.index.size:
      lo, hi = int(np.min(np.asarray(self.index))), int(np.max(np.asarray(self.index)))
      if lo < 0 or hi > numel:
        raise ValueError(f"index holds values in [{lo}, {hi}]; a {shape} kernel needs [0, {numel}] "
                         f"({numel} is padding)")


@functools.partial(jax.jit, static_argnums=3)
def _from_dense(base, w: jax.Array, index: jax.Array, value_dtype: np.dtype) -> tuple[jax.Array, jax.Array]:
  numel = w.shape[0] * w.shape[1]
  idx = index.astype(jnp.int32)
  idx = jnp.sort(jnp.where((idx >= 0) & (idx < numel), idx, numel))
  dup = jnp.zeros(idx.shape, bool).at[1:].set(idx[1:] == idx[:-1])
  idx = jnp.sort(jnp.where(dup, numel, idx))
  real = idx < numel
  at = jnp.where(real, idx, 0)
  b = base.dequantize().astype(jnp.float32).reshape(numel)[at]
  delta = jnp.where(real, w.astype(jnp.float32).reshape(numel)[at] - b, 0.0)
  return idx, delta.astype(value_dtype)


@jax.jit
def _dequantize(sp: Sparse) -> jax.Array:
  ic, oc = sp.shape
  flat = sp.base.dequantize().astype(jnp.float32).reshape(ic * oc)
  flat = flat.at[sp.index].add(sp.values.astype(jnp.float32), mode="drop")  # padding (IC*OC) is dropped
  return flat.reshape(ic, oc).astype(sp.dtype)


@functools.partial(jax.jit, static_argnums=3)
def _sparse_product(x: jax.Array, index: jax.Array, values: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """float32 ``(..., OC)``: ``x[..., IC]`` times the sparse entries, without forming the ``(IC, OC)`` matrix."""
  ic, oc = shape
  real = index < ic * oc
  rows = jnp.where(real, index // oc, 0)
  cols = jnp.where(real, index % oc, oc)  # column OC is out of range: padding products are dropped
  v = values.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + values.shape)
  prod = jnp.take(x, rows, axis=-1).astype(jnp.float32) * v  # (..., capacity)
  return jnp.zeros(x.shape[:-1] + (oc,), jnp.float32).at[..., cols].add(prod, mode="drop")
