"""Fused codebook (lookup-table) dequant-matmul: ``y = x @ W`` with ``W[k, n] = table[n, code[k, n]]``.

Shapes (``W`` is ``(K, N) = (in, out)``):

* ``x``: ``(M, K)`` bfloat16 or float32; any ``M >= 1``.
* ``packed``: ``(ceil(K*bits/32), N)`` uint32, codes packed along K as a little-endian
  bit stream (code ``k`` of column ``n`` occupies stream bits ``[k*bits, (k+1)*bits)``;
  for 2 and 4 bits word ``j`` holds codes ``j*(32/bits) + s`` at bits
  ``[s*bits, (s+1)*bits)``; 3 bits is dense: 32 codes fill exactly 3 words and codes
  10 and 21 of each 32-code chunk straddle two words). Same layout as ``lqx.packing``.
* ``table``: ``(N, 2**bits)`` float16, bfloat16 or float32; one table per output column.
* result: ``(M, N)`` in ``x.dtype``; accumulation in float32.

How the kernel looks codes up. Each ``(bk, bn)`` tile of codes is unpacked with shifts
and masks on uint32 (``pallas_kernels.unpack``: a broadcast over the codes-per-word
axis, then a reshape; for 3 bits the packed array is viewed as ``(K/32, 3, N)``, a free
reshape, and the three words of each 32-code chunk go to ``unpack3``), and
dequantized with a ``2**bits``-way select chain ``w = where(code == j, table[j], w)``
over a float32 ``(2**bits, bn)`` table tile. The select chain is used on both backends:
on TPU ``jnp.take`` does not lower, and a per-column lookup ``table[code[k, n], n]`` is a
sublane gather, which does not lower either (v4 has none), while ``2**bits`` selects per
weight compile on every TPU generation and on Triton; for 2-4 bits that is at most 16
VPU ops per weight. The tile is then cast to the
matmul dtype (``x.dtype``) and multiplied on the MXU / tensor cores. For float32 ``x``
the dot runs at ``Precision.HIGHEST`` (no bf16 / tf32 rounding of the operands).

Backends:

* ``"tpu"`` (Mosaic): grid ``(M/bm, N/bn, K/bk)``, K innermost ("arbitrary"), a float32
  VMEM accumulator. A block dim is a multiple of 128 (8 for ``bm``) or the whole
  (padded) axis, so K = 576 runs as one K step.
* ``"triton"`` (GPU): grid ``(M/bm, N/bn)``, a ``fori_loop`` over K in steps of ``bk``
  inside the kernel; ``bm``, ``bk`` and ``bn`` are powers of two.

Padding. ``x`` is zero-padded to ``(M_pad, K_pad)`` on every call (cheap: activations).
The weights (``packed``, ``table``) are padded only when ``K`` or ``N`` is not a multiple
of the chosen ``bk`` / ``bn`` (odd shapes, e.g. ``K % 32 != 0``); that copies the weights
on each call, so prefer shapes the default block sizes divide (all SmolLM2 shapes,
``(K, N)`` in ``{(576, 576), (576, 192), (576, 1536), (1536, 576)}``, need no weight
padding on either backend). Padded codes are 0 and meet zero activations, so they add
nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from .unpack import unpack, unpack3

BITS = (2, 3, 4)
BACKENDS = ("tpu", "triton")
X_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(np.float32))
TABLE_DTYPES = (np.dtype(np.float16), np.dtype(jnp.bfloat16), np.dtype(np.float32))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Static tile sizes: ``bm`` rows of ``x``, ``bk`` input channels, ``bn`` output channels.

  ``bk`` is a multiple of 32 (one 3-bit chunk is 32 codes in 3 words). TPU: ``bm`` a
  multiple of 8; ``bk`` and ``bn`` multiples of 128 or at least the whole axis.
  Triton: all three powers of two, ``bm, bn >= 16``.
  """

  bm: int
  bk: int
  bn: int


def _round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def _is_pow2(a: int) -> bool:
  return a > 0 and a & (a - 1) == 0


def _largest_divisor(n: int, step: int, cap: int) -> int | None:
  """Largest multiple of ``step`` that divides ``n`` and is at most ``cap`` (None if none)."""
  for b in range(cap - cap % step, 0, -step):
    if n % b == 0:
      return b
  return None


def _largest_pow2_divisor(n: int, lo: int, hi: int) -> int | None:
  """Largest power of two in ``[lo, hi]`` that divides ``n`` (None if none)."""
  b = hi
  while b >= lo:
    if n % b == 0:
      return b
    b //= 2
  return None


def default_block_sizes(m: int, k: int, n: int, *, bits: int, backend: str) -> BlockSizes:
  """Tile sizes for an ``(m, k) @ (k, n)`` product with ``bits``-bit codes on ``backend``.

  TPU: ``bm`` = ``m`` rounded up to 16 when ``m <= 256`` (one M block), else 256 or 128,
  whichever pads less; ``bk`` / ``bn`` = the largest multiple of 128 up to 512 that
  divides ``k`` / ``n``, else the whole (32-rounded) axis when it is at most 1024, else 512
  with padding. Tiles stay at most 1024 x 1024 codes: with the unpacked float32 tile and
  the select chain's temporaries that fits v4's 16 MiB of scoped VMEM (2016 x 2016 did not).
  Triton: ``bm`` = 16 up to ``m <= 16``, else the next power of two up to 64; ``bk`` /
  ``bn`` = the largest power of two in ``[32, 128]`` / ``[16, 128]`` dividing the axis,
  else 64 with padding.
  """
  del bits  # the same tiles fit 2, 3 and 4 bits
  if backend == "tpu":
    if m <= 256:
      bm = _round_up(m, 16)
    else:
      bm = min((256, 128), key=lambda b: (_round_up(m, b), -b))

    def axis(size):
      b = _largest_divisor(size, 128, 512)
      if b is not None:
        return b
      return _round_up(size, 32) if size <= 1024 else 512

    return BlockSizes(bm=bm, bk=axis(k), bn=axis(n))
  if backend == "triton":
    bm = 16 if m <= 16 else min(64, 1 << (m - 1).bit_length())
    bk = _largest_pow2_divisor(k, 32, 128) or 64
    bn = _largest_pow2_divisor(n, 16, 128) or 64
    return BlockSizes(bm=bm, bk=bk, bn=bn)
  raise ValueError(f"{backend=} is not one of {BACKENDS}")


# ---------------------------------------------------------------------------
# In-kernel lookup (shared by both backends; unpacking is pallas_kernels.unpack).


def _table_rows(t_ref):
  """The rows of a float32 ``(2**bits, bn)`` table ref, each ``(1, bn)`` (ref loads: Triton has no value slicing)."""
  return [t_ref[pl.ds(j, 1), :] for j in range(t_ref.shape[0])]


def _lookup(codes, rows):
  """int32 ``(bk, bn)`` codes, ``2**bits`` float32 ``(1, bn)`` table rows -> float32 ``(bk, bn)``.

  A select chain ``w = where(code == j, table[j], w)`` (see the module docstring).
  """
  w = jnp.broadcast_to(rows[0], codes.shape)
  for j in range(1, len(rows)):
    w = jnp.where(codes == j, rows[j], w)
  return w


def _dot(x, w):
  precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32, precision=precision)


# ---------------------------------------------------------------------------
# Kernels.


def lut_matmul_kernel(x_ref, w_ref, t_ref, o_ref, acc_ref, *, bits):
  """TPU body for one ``(i, j, k)`` grid step.

  x_ref ``(bm, bk)``; w_ref ``(bk*bits/32, bn)`` uint32, or ``(bk/32, 3, bn)`` for 3 bits;
  t_ref ``(2**bits, bn)`` float32; o_ref ``(bm, bn)``; acc_ref ``(bm, bn)`` float32 scratch.
  """

  @pl.when(pl.program_id(2) == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  if bits == 3:
    codes = unpack3(w_ref[:, 0, :], w_ref[:, 1, :], w_ref[:, 2, :])
  else:
    codes = unpack(w_ref[...], bits)
  acc_ref[...] += _dot(x_ref[...], _lookup(codes, _table_rows(t_ref)))

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _store():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def lut_matmul_triton_kernel(x_ref, w_ref, t_ref, o_ref, *, bits, bk):
  """Triton body for one ``(i, j)`` program: loops over K in steps of ``bk``.

  x_ref ``(bm, K_pad)``; w_ref ``(K_pad*bits/32, bn)`` uint32, or ``(K_pad/32, 3, bn)``
  for 3 bits; t_ref ``(2**bits, bn)`` float32; o_ref ``(bm, bn)``.
  """
  bm, k_pad = x_ref.shape
  bn = o_ref.shape[1]
  rows = _table_rows(t_ref)

  def body(step, acc):
    x = x_ref[:, pl.ds(pl.multiple_of(step * bk, bk), bk)]
    if bits == 3:
      chunks = pl.ds(pl.multiple_of(step * (bk // 32), bk // 32), bk // 32)
      codes = unpack3(w_ref[chunks, 0, :], w_ref[chunks, 1, :], w_ref[chunks, 2, :])
    else:
      n_rows = bk * bits // 32
      codes = unpack(w_ref[pl.ds(pl.multiple_of(step * n_rows, n_rows), n_rows), :], bits)
    return acc + _dot(x, _lookup(codes, rows))

  acc = lax.fori_loop(0, k_pad // bk, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


# ---------------------------------------------------------------------------
# Public op and reference.


def _check_args(x, packed, table, bits):
  """Validate shapes and dtypes; return ``(m, k, n)``."""
  if isinstance(bits, bool) or bits not in BITS:
    raise ValueError(f"{bits=} is not supported; expected one of {BITS}")
  if x.ndim != 2:
    raise ValueError(f"x must be (M, K); got {x.shape=}")
  if np.dtype(x.dtype) not in X_DTYPES:
    raise ValueError(f"{x.dtype=} is not bfloat16 or float32")
  m, k = x.shape
  if packed.ndim != 2 or np.dtype(packed.dtype) != np.uint32:
    raise ValueError(f"packed must be (ceil(K*bits/32), N) uint32; got {packed.shape=} {packed.dtype=}")
  n = packed.shape[1]
  if packed.shape[0] != -(-k * bits // 32):
    raise ValueError(f"{packed.shape=} does not hold K={k} codes of {bits=}: need {-(-k * bits // 32)} rows")
  if table.shape != (n, 1 << bits):
    raise ValueError(f"{table.shape=} is not (N, 2**bits) = {(n, 1 << bits)}")
  if np.dtype(table.dtype) not in TABLE_DTYPES:
    raise ValueError(f"{table.dtype=} is not float16, bfloat16 or float32")
  return m, k, n


def _resolve_backend(backend):
  if backend is None:
    platform = jax.default_backend()
    if platform == "tpu":
      return "tpu"
    if platform == "gpu":
      return "triton"
    raise ValueError(f"{backend=} must be given on the {platform!r} backend; expected one of {BACKENDS}")
  if backend not in BACKENDS:
    raise ValueError(f"{backend=} is not one of {BACKENDS}")
  return backend


def _check_block_sizes(bs: BlockSizes, m: int, k: int, n: int, backend: str) -> None:
  bm, bk, bn = bs.bm, bs.bk, bs.bn
  if min(bm, bk, bn) <= 0:
    raise ValueError(f"block sizes must be positive; got {bs}")
  if bk % 32:
    raise ValueError(f"{bk=} is not a multiple of 32")
  if backend == "tpu":
    if bm % 8:
      raise ValueError(f"{bm=} is not a multiple of 8")
    if bk % 128 and bk < k:
      raise ValueError(f"{bk=} is not a multiple of 128 and is less than {k=}")
    if bn % 128 and bn < n:
      raise ValueError(f"{bn=} is not a multiple of 128 and is less than {n=}")
  else:
    for name, b, lo in (("bm", bm, 16), ("bk", bk, 32), ("bn", bn, 16)):
      if not _is_pow2(b) or b < lo:
        raise ValueError(f"{name}={b} is not a power of two >= {lo} (Triton)")


def lut_matmul_reference(x, packed, table, *, bits, block_sizes=None, backend=None, interpret=False):
  """Pure-jnp ``x @ W``, ``W[k, n] = table[n, code[k, n]]`` in float32; result in ``x.dtype``.

  Same signature as :func:`lut_matmul`; ``block_sizes``, ``backend`` and ``interpret``
  are ignored.
  """
  del block_sizes, backend, interpret
  _, k, n = _check_args(x, packed, table, bits)
  return _reference(x, packed, table, bits=bits, k=k)


@functools.partial(jax.jit, static_argnames=["bits", "k"])
def _reference(x, packed, table, *, bits, k):
  n_words = packed.shape[0]
  bit = jnp.arange(32, dtype=jnp.uint32)
  stream = ((packed[:, None, :] >> bit[None, :, None]) & 1).reshape(n_words * 32, -1)
  stream = stream[: k * bits].reshape(k, bits, -1)
  codes = jnp.sum(stream << jnp.arange(bits, dtype=jnp.uint32)[None, :, None], axis=1)
  w = jnp.take_along_axis(table.astype(jnp.float32).T, codes.astype(jnp.int32), axis=0)
  y = jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
  return y.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=["bits", "block_sizes", "backend", "interpret"])
def lut_matmul(x, packed, table, *, bits, block_sizes=None, backend=None, interpret=False):
  """``x @ W`` with ``W[k, n] = table[n, code[k, n]]``, dequantized tile by tile in the kernel.

  x ``(M, K)`` bfloat16/float32; packed ``(ceil(K*bits/32), N)`` uint32 (``lqx.packing``
  layout along K); table ``(N, 2**bits)`` float16/bfloat16/float32; ``bits`` in
  ``{2, 3, 4}``. Returns ``(M, N)`` in ``x.dtype`` (float32 accumulation).

  ``block_sizes``: a :class:`BlockSizes`, or None for :func:`default_block_sizes`.
  ``backend``: ``"tpu"`` (Mosaic) or ``"triton"``; None takes it from
  ``jax.default_backend()`` (an error on CPU). ``interpret``: run the Pallas interpreter
  (CPU). See the module docstring for the tiling and the padding of odd shapes.
  """
  m, k, n = _check_args(x, packed, table, bits)
  backend = _resolve_backend(backend)
  if block_sizes is None:
    block_sizes = default_block_sizes(m, k, n, bits=bits, backend=backend)
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"{block_sizes=} is not a BlockSizes")
  _check_block_sizes(block_sizes, m, k, n, backend)
  bm, bk, bn = block_sizes.bm, block_sizes.bk, block_sizes.bn
  m_pad, k_pad, n_pad = _round_up(m, bm), _round_up(k, bk), _round_up(n, bn)

  x = jnp.pad(x, ((0, m_pad - m), (0, k_pad - k)))
  rows = k_pad * bits // 32
  if (rows, n_pad) != packed.shape:  # odd shapes only: copies the weights
    packed = jnp.pad(packed, ((0, rows - packed.shape[0]), (0, n_pad - n)))
  table_t = table.astype(jnp.float32).T  # (2**bits, N): tiny
  if n_pad != n:
    table_t = jnp.pad(table_t, ((0, 0), (0, n_pad - n)))
  if bits == 3:
    packed = packed.reshape(k_pad // 32, 3, n_pad)  # free: row 3c + r -> (c, r)
  n_codes = 1 << bits
  out_shape = jax.ShapeDtypeStruct((m_pad, n_pad), x.dtype)

  if backend == "tpu":
    if bits == 3:
      w_spec = pl.BlockSpec((bk // 32, 3, bn), lambda i, j, kk: (kk, 0, j))
    else:
      w_spec = pl.BlockSpec((bk * bits // 32, bn), lambda i, j, kk: (kk, j))
    out = pl.pallas_call(
        functools.partial(lut_matmul_kernel, bits=bits),
        out_shape=out_shape,
        grid=(m_pad // bm, n_pad // bn, k_pad // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            w_spec,
            pl.BlockSpec((n_codes, bn), lambda i, j, kk: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=bool(interpret),
        name="lut_matmul",
    )(x, packed, table_t)
  else:
    if bits == 3:
      w_spec = pl.BlockSpec((k_pad // 32, 3, bn), lambda i, j: (0, 0, j))
    else:
      w_spec = pl.BlockSpec((rows, bn), lambda i, j: (0, j))
    out = pl.pallas_call(
        functools.partial(lut_matmul_triton_kernel, bits=bits, bk=bk),
        out_shape=out_shape,
        grid=(m_pad // bm, n_pad // bn),
        in_specs=[
            pl.BlockSpec((bm, k_pad), lambda i, j: (i, 0)),
            w_spec,
            pl.BlockSpec((n_codes, bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=bool(interpret),
        name="lut_matmul",
    )(x, packed, table_t)
  return out[:m, :n]
