"""The codebook (lookup-table) format: packed b-bit codes and one table per output channel (``Codebook``).

A ``Codebook`` stands for an ``(IC, OC)`` kernel ``w`` whose output channel ``o`` takes its
values from a ``2**bits``-entry table (non-uniform quantization, as SqueezeLLM's). Invariant::

    w[i, o] ≈ table[o, code[i, o]]        code in [0, 2**bits - 1]

Storage (the leaves; all arrays, so a Codebook jits, shards over OC and checkpoints):

* ``packed``: uint32 words, codes bit-packed along the IC axis (``lqx.packing``, as the
  affine format), ``(ceil(IC*bits/32), OC)``.
* ``table``: ``(OC, 2**bits)`` in ``table_dtype`` (float16 by default, bfloat16 or float32).
  Entries need not be sorted or distinct.

Static (aux) data: ``bits`` (2, 3, 4, 5, 6 or 8: the packable widths), ``shape``,
``dtype`` (of the original weight) and ``table_dtype``.

:func:`codebook_quantize` rounds the table to ``table_dtype`` *before* it assigns each weight
to its nearest stored entry, so ``dequantize()`` returns exactly what was reasoned about.
A 3-bit (576, 576) kernel with float16 tables costs ``3 + 16*8/576 ≈ 3.22`` bits per weight.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lqx import nn, packing
from lqx.formats.affine import CODE_WORD, KERNEL_X_DTYPES, SCALE_DTYPES
from lqx.formats.storage import Stored

TABLE_DTYPES = SCALE_DTYPES  # float16, bfloat16, float32


def check_table_dtype(table_dtype) -> np.dtype:
  """``table_dtype`` as a numpy dtype; raises unless float16, bfloat16 or float32."""
  try:
    dt = np.dtype(table_dtype)
  except TypeError:
    dt = None
  if dt not in TABLE_DTYPES:
    raise ValueError(f"{table_dtype=} is not a table storage type; expected float16, bfloat16 or float32")
  return dt


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["packed", "table"],
    meta_fields=["bits", "shape", "dtype", "table_dtype"],
)
@dataclasses.dataclass(frozen=True)
class Codebook(Stored):
  """Quantized ``(IC, OC)`` kernel; ``w[i, o] ≈ table[o, code[i, o]]`` (module doc)."""

  packed: jax.Array  # (ceil(IC*bits/32), OC) uint32 codes, packed along IC
  table: jax.Array  # (OC, 2**bits) table_dtype
  bits: int
  shape: tuple[int, int]
  dtype: np.dtype
  table_dtype: np.dtype

  @property
  def ndim(self) -> int:
    return 2

  def check(self) -> None:
    """Raise ``ValueError`` unless the arrays have the shapes and dtypes the static fields imply.

    Reads only shapes, dtypes and static fields (checkpoint restore calls it on
    ``jax.ShapeDtypeStruct`` leaves).
    """
    packing.check_bits(self.bits)
    shape = self.shape
    if not (isinstance(shape, tuple) and len(shape) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
      raise ValueError(f"shape={shape!r} is not a pair of positive ints")
    if not (isinstance(self.dtype, np.dtype) and jnp.issubdtype(self.dtype, jnp.floating)):
      raise ValueError(f"dtype={self.dtype!r} is not a float dtype")
    if not isinstance(self.table_dtype, np.dtype):
      raise ValueError(f"table_dtype={self.table_dtype!r} is not a dtype")
    td = check_table_dtype(self.table_dtype)
    ic, oc = shape
    want = {"packed": ((packing.num_words(ic, self.bits, CODE_WORD), oc), CODE_WORD),
            "table": ((oc, 1 << self.bits), td)}
    for name, (wshape, wdtype) in want.items():
      x = getattr(self, name)
      if x is None or (tuple(x.shape), np.dtype(x.dtype)) != (wshape, wdtype):
        got = "None" if x is None else f"{tuple(x.shape)} {np.dtype(x.dtype)}"
        raise ValueError(f"{name} is {got}, but bits={self.bits}, shape={shape}, table_dtype={td} "
                         f"need {wshape} {wdtype}")

  def codes(self) -> jax.Array:
    """uint8 ``(IC, OC)`` codes."""
    return packing.unpack(self.packed, self.bits, self.shape[0], axis=0)

  def dequantize(self) -> jax.Array:
    """The ``(IC, OC)`` kernel ``table[o, code[i, o]]`` in the original dtype."""
    return _dequantize(self)

  def linear(self, x: jax.Array) -> jax.Array:
    """``x[..., IC] @ dequantize()`` in the dtype of ``x``.

    The fused Pallas kernel (``pallas_kernels.lut_matmul``) where ``lqx.nn.pallas_target``
    picks one (TPU, GPU) and it supports this codebook (bits 2, 3, 4; x in bfloat16 or
    float32); XLA (dequantize, then matmul) otherwise.
    """
    target = nn.pallas_target()
    if target is not None:
      from pallas_kernels import lut_matmul as lut  # noqa: PLC0415 (Pallas only when used)
    if target is None or self.bits not in lut.BITS or np.dtype(x.dtype) not in KERNEL_X_DTYPES or not x.size:
      return jnp.einsum("...i,io->...o", x, self.dequantize().astype(x.dtype))
    y = lut.lut_matmul(x.reshape(-1, self.shape[0]), self.packed, self.table, bits=self.bits, backend=target[0],
                   interpret=target[1])
    return y.reshape(*x.shape[:-1], self.shape[1])


@jax.jit
def _dequantize(cb: Codebook) -> jax.Array:
  codes = cb.codes().astype(jnp.int32)
  table = cb.table.astype(jnp.float32)
  return jnp.take_along_axis(table.T, codes, axis=0).astype(cb.dtype)


def nearest_entry(w: jax.Array, table: jax.Array) -> jax.Array:
  """int32 ``(IC, OC)``: for each ``w[i, o]`` the index of the entry of ``table[o]`` ``(OC, K)`` nearest to it.

  Ties go to the entry of lower value (then lower index). Distances are float32.
  """
  return _nearest_entry(jnp.asarray(w), jnp.asarray(table))


@jax.jit
def _nearest_entry(w, table):
  t = table.astype(jnp.float32)
  order = jnp.argsort(t, axis=1)  # sort each table; search its midpoints, then check the neighbours
  ts = jnp.take_along_axis(t, order, axis=1)
  k = ts.shape[1]

  def column(x, ts):
    i = jnp.searchsorted((ts[1:] + ts[:-1]) / 2, x, side="left")
    cand = jnp.clip(i[:, None] + jnp.arange(-1, 2)[None, :], 0, k - 1)
    best = jnp.argmin(jnp.abs(x[:, None] - ts[cand]), axis=1)
    return jnp.take_along_axis(cand, best[:, None], axis=1)[:, 0]

  sorted_idx = jax.vmap(column, in_axes=(1, 0), out_axes=1)(w.astype(jnp.float32), ts)
  return jnp.take_along_axis(order.T, sorted_idx, axis=0).astype(jnp.int32)


def from_codes(codes: jax.Array, table: jax.Array, *, bits: int, dtype, table_dtype=jnp.float16) -> Codebook:
  """Pack integer ``codes`` ``(IC, OC)`` in ``[0, 2**bits)`` with ``table`` ``(OC, 2**bits)`` (to ``table_dtype``)."""
  packing.check_bits(bits)
  td = check_table_dtype(table_dtype)
  if codes.ndim != 2:
    raise ValueError(f"codes has shape {tuple(codes.shape)}; expected a 2-D (IC, OC) array")
  shape = tuple(int(d) for d in codes.shape)
  if tuple(table.shape) != (shape[1], 1 << bits):
    raise ValueError(f"table has shape {tuple(table.shape)}; {bits=} on {shape} needs {(shape[1], 1 << bits)}")
  cb = Codebook(packed=packing.pack(codes, bits, axis=0, word_dtype=CODE_WORD), table=jnp.asarray(table).astype(td),
                bits=int(bits), shape=shape, dtype=np.dtype(dtype), table_dtype=td)
  cb.check()
  return cb


def codebook_quantize(w: jax.Array, table: jax.Array, *, table_dtype=jnp.float16) -> Codebook:
  """``w`` ``(IC, OC)`` -> ``Codebook``: ``table`` ``(OC, 2**bits)`` rounded to ``table_dtype``, then each
  weight coded as its nearest stored entry (:func:`nearest_entry`)."""
  w, table = jnp.asarray(w), jnp.asarray(table)
  if w.ndim != 2:
    raise ValueError(f"w has shape {tuple(w.shape)}; expected a 2-D (IC, OC) kernel")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"w has dtype {w.dtype}; expected a float kernel")
  k = table.shape[-1] if table.ndim == 2 else 0
  bits = int(np.log2(k)) if k > 0 else 0
  if table.ndim != 2 or table.shape[0] != w.shape[1] or k != 1 << bits:
    raise ValueError(f"table has shape {tuple(table.shape)}; expected (OC, 2**bits) = ({w.shape[1]}, 2**bits)")
  packing.check_bits(bits)
  td = check_table_dtype(table_dtype)
  stored = table.astype(td)
  if not isinstance(stored, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(stored.astype(jnp.float32)))):
    raise ValueError(f"table has entries that are not finite in {td} (NaN, Inf or out of range)")
  return from_codes(nearest_entry(w, stored), stored, bits=bits, dtype=w.dtype, table_dtype=td)
