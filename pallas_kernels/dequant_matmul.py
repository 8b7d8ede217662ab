"""Fused dequantize-and-multiply for uniform (affine) b-bit codes: ``y = x @ W``.

``W`` ``(K, N)`` = (in, out) is stored as lqx stores it (``lqx.formats.affine.QArray``)::

    W[k, n] = (code[k, n] - zero[group]) * scale[group]

* ``packed`` ``(ceil(K*bits/32), N)`` uint32: codes packed along K, little-endian
  bit stream (``pallas_kernels.unpack``); bits 2, 3 (dense stream, read in place:
  the TPU kernel views it as ``(K/32, 3, N)``, a free reshape), 4, 8.
* per-OC groups (``group_axis="oc"``, GPTQ's g128): ``g`` consecutive rows of one
  column share a group; ``scale`` ``(ceil(K/g), N)``, the last group shorter when
  ``g`` does not divide K. per-IC groups (``"ic"``, AdaDim): ``g`` consecutive
  columns of one row; ``g`` divides N; ``scale`` ``(K, N/g)``. ``g = -1``: one
  group over the whole axis.
* ``scale`` float16/bfloat16/float32; ``zero`` float32 of scale's shape, or None
  for symmetric codes (zero ``2**(bits-1)``).

Kernel: each ``(bk, bn)`` code tile is unpacked (shift and mask on uint32),
dequantized *before* the dot, ``w = (code - Z) * S`` in float32 with ``Z, S``
expanded from per-segment rows/columns, cast to ``x.dtype`` and multiplied on the
MXU / tensor cores with float32 accumulation (``precision=HIGHEST`` for float32
``x``). One code path for both group axes.

Group scales are relaid outside the kernel per call (they are small: about
``1/g`` of the weight count) into per-*segment* arrays: a tile is cut into
segments of ``sb = gcd(bk, g)`` rows (per-OC) or ``gcd(bn, g)`` columns (per-IC),
each inside one group, so any tile size works, including ``g`` not dividing K
(K=576, g=128, bk=192: segments of 64 rows). Scales become float32 there.

Backends:

* ``"tpu"`` (Mosaic): grid ``(M/bm, N/bn, K/bk)``, K innermost, f32 VMEM accumulator.
  Per-OC scales ``(K/bk, bk/sb, N)`` with blocks ``(None, bk/sb, bn)``; per-IC
  ``(N/bn, K, bn/sbn)`` with blocks ``(None, bk, bn/sbn)`` (last two block dims
  always equal the array's, so the (8, 128) rule holds for any group size).
  Per-IC columns are expanded along lanes by a select chain (one ``where`` per
  segment, at most 32 a tile), not by a broadcast-and-reshape, whose ``(bk, c, sb)``
  intermediate overflowed v4's 16 MiB VMEM (e.g. K = N = 576, g64: 22.7 MiB).
* ``"triton"`` (GPU): grid ``(M/bm, N/bn)``, a ``fori_loop`` over K tiles in the
  kernel; all tile sizes powers of two.

Padding: ``x`` is padded along M (and K) per call, cheap. When K or N is not a
multiple of the chosen tile, ``packed`` is zero-padded per call, a copy of the
weights; :func:`default_block_sizes` avoids it for the SmolLM2 and Llama shapes
(on TPU by taking K or N whole when no legal tile divides it, e.g. bk = 576).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels import unpack as unpack_lib

BITS = (2, 3, 4, 8)
GROUP_AXES = ("oc", "ic")
BACKENDS = ("tpu", "triton")
X_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(jnp.float16))
SCALE_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Static tile sizes: ``bm`` rows of x, ``bk`` input channels, ``bn`` output channels."""
  bm: int
  bk: int
  bn: int


# ----------------------------------------------------------------------------- block sizes

def _code_unit(bits: int, backend: str) -> int:
  """Smallest legal bk step: whole words (32 rows per 3-word chunk at 3 bits).

  TPU: bk is x's lane dim (a multiple of 128) and the packed block's sublane dim
  (a multiple of 8 uint32 words).
  """
  per = 32 if bits == 3 else 32 // bits
  if backend == "tpu":
    return 256 if bits == 3 else max(128, 8 * per)
  return max(per, 16)


def _round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def _pow2_floor(a: int) -> int:
  return 1 << (max(a, 1).bit_length() - 1)


def _resolve_group(group_size: int, size: int) -> int:
  """Group length along its axis: ``-1`` (or ``g >= size``) is one group of ``size``."""
  return size if group_size == -1 or group_size >= size else group_size


def default_block_sizes(m: int, k: int, n: int, *, bits: int, group_size: int, group_axis: str,
                        backend: str) -> BlockSizes:
  """Tile sizes for an ``(m, k) @ (k, n)`` product; a tile that divides K and N when one is legal.

  TPU: ``bm`` a multiple of 16 (<= 256), ``bn`` the largest of 512/384/256/128
  dividing N, else N whole (<= 2048), else 256 (N padded); ``bk`` the largest
  multiple of the word unit (:func:`_code_unit`) dividing K with ``bk*bn <= 2**18``,
  else K whole when K is word aligned and the tile stays <= 2**19 elements, else
  512 (K padded). Triton: powers of two, ``bm`` 16..64, ``bn`` 16..128 and
  ``bk`` 16..128 dividing N and K where possible (else 64, padded).
  ``group_size``/``group_axis`` do not constrain the choice (segments handle any).
  """
  del group_size, group_axis
  unit = _code_unit(bits, backend)
  per = 32 if bits == 3 else 32 // bits
  if backend == "tpu":
    bm = _round_up(m, 16) if m <= 128 else (128 if m <= 512 else 256)
    bn = next((c for c in (512, 384, 256, 128) if n % c == 0), None)
    if bn is None:
      bn = n if n <= 2048 else 256
    cap = max(unit, (1 << 18) // bn)
    bk = next((c for c in range(cap - cap % unit, 0, -unit) if k % c == 0), None)
    if bk is None:
      bk = k if (k % per == 0 and k * bn <= (1 << 19)) else max(unit, 512)
    return BlockSizes(bm, bk, bn)
  if backend == "triton":
    bm = min(max(16, 1 << (m - 1).bit_length()), 64)
    bn = next((c for c in (128, 64, 32, 16) if n % c == 0), 64)
    bk = next((c for c in (128, 64, 32, 16) if k % c == 0 and c % unit == 0), 64)
    return BlockSizes(bm, bk, bn)
  raise ValueError(f"{backend=} is not one of {BACKENDS}")


# ----------------------------------------------------------------------------- validation

def _check(x, packed, scale, zero, bits, group_size, group_axis, backend, block_sizes):
  if bits not in BITS:
    raise ValueError(f"{bits=} is not supported; expected one of {BITS}")
  if group_axis not in GROUP_AXES:
    raise ValueError(f"{group_axis=} is not one of {GROUP_AXES}")
  if not (group_size == -1 or group_size > 0):
    raise ValueError(f"{group_size=} must be positive or -1")
  if x.ndim != 2 or jnp.dtype(x.dtype) not in X_DTYPES:
    raise ValueError(f"x must be 2-D bfloat16/float32/float16 (M, K); got {x.shape} {x.dtype}")
  m, k = x.shape
  if packed.ndim != 2 or packed.dtype != jnp.uint32:
    raise ValueError(f"packed must be 2-D uint32; got {packed.shape} {packed.dtype}")
  n = packed.shape[1]
  if packed.shape[0] != -(-k * bits // 32):
    raise ValueError(f"packed has {packed.shape[0]} rows; {k=} codes of {bits=} need {-(-k * bits // 32)}")
  if group_axis == "oc":
    g = _resolve_group(group_size, k)
    want = (-(-k // g), n)
  else:
    g = _resolve_group(group_size, n)
    if n % g:
      raise ValueError(f"{group_size=} does not divide N={n} (per-IC groups)")
    want = (k, n // g)
  if tuple(scale.shape) != want or jnp.dtype(scale.dtype) not in SCALE_DTYPES:
    raise ValueError(f"scale must be float16/bfloat16/float32 of shape {want} for {group_axis=}, "
                     f"{group_size=}; got {tuple(scale.shape)} {scale.dtype}")
  if zero is not None and (tuple(zero.shape) != want or zero.dtype != jnp.float32):
    raise ValueError(f"zero must be float32 of shape {want} (like scale) or None; "
                     f"got {tuple(zero.shape)} {zero.dtype}")
  if backend is not None and backend not in BACKENDS:
    raise ValueError(f"{backend=} is not one of {BACKENDS}")
  if block_sizes is not None:
    bm, bk, bn = block_sizes.bm, block_sizes.bk, block_sizes.bn
    unit = 32 if bits == 3 else 32 // bits
    if bk % unit:
      raise ValueError(f"{bk=} is not a multiple of {unit} (whole words of {bits}-bit codes)")
    if backend == "triton" and any(b & (b - 1) for b in (bm, bk, bn)):
      raise ValueError(f"block_sizes={block_sizes} must be powers of two for backend='triton'")
    if backend == "tpu" and (bm % 8 or (bn % 128 and bn != n)
                             or (bk % _code_unit(bits, "tpu") and bk < k)):
      raise ValueError(f"block_sizes={block_sizes}: TPU needs bm % 8 == 0, bn % 128 == 0 or bn == N, "
                       f"bk % {_code_unit(bits, 'tpu')} == 0 or bk >= K")
  return m, k, n, g


def _resolve_backend(backend):
  if backend is not None:
    return backend
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform == "gpu":
    return "triton"
  raise ValueError(f"backend=None needs a TPU or GPU default backend (have {platform!r}); "
                   f"pass backend='tpu' or 'triton'")


# ----------------------------------------------------------------------------- host-side layout

def _segment_scales(a, *, g, group_axis, k_pad, n_pad, bk, bn):
  """Relay group params (scale's shape) as float32 per-segment arrays (see module doc).

  per-OC: ``(k_pad/bk, bk/sb, n_pad)``, entry ``[t, i, n]`` = group of row ``t*bk + i*sb``.
  per-IC: ``(n_pad/bn, k_pad, bn/sb)``, entry ``[t, k, i]`` = group of column ``t*bn + i*sb``.
  Padded rows/columns take the last group (their codes meet zero x or are sliced off).
  """
  a = a.astype(jnp.float32)
  if group_axis == "oc":
    sb = math.gcd(bk, g)
    rows = jnp.minimum(jnp.arange(k_pad // sb) * sb // g, a.shape[0] - 1)
    a = jnp.pad(a[rows], ((0, 0), (0, n_pad - a.shape[1])), mode="edge")
    return a.reshape(k_pad // bk, bk // sb, n_pad), sb
  sb = math.gcd(bn, g)
  cols = jnp.minimum(jnp.arange(n_pad // sb) * sb // g, a.shape[1] - 1)
  a = jnp.pad(a[:, cols], ((0, k_pad - a.shape[0]), (0, 0)), mode="edge")
  return a.reshape(k_pad, n_pad // bn, bn // sb).transpose(1, 0, 2), sb


# Per-IC expansion by a select chain (TPU) up to this many segments per tile, else by a
# broadcast and reshape (always on Triton).
_MAX_SELECT_SEGMENTS = 32


def _expand(a, sb, shape, group_axis, lane_select=False):
  """Per-segment block -> ``shape`` (bk, bn): per-OC ``(bk/sb, bn)`` rows, per-IC ``(bk, bn/sb)`` columns.

  Per-IC with ``lane_select`` (TPU): start from column 0 broadcast along lanes and
  overwrite lanes ``>= i*sb`` with column ``i``, one select per segment. The
  broadcast-and-reshape form moves the segment axis onto sublanes as a
  ``(bk, c, sb)`` value padded to ``(bk, 8k, 128m)`` tiles: megabytes of VMEM and
  register spills for a ``(576, 576)`` tile, over v4's 16 MiB with the scale windows.
  Same values either way.
  """
  bk, bn = shape
  if group_axis == "oc":
    r = a.shape[0]
    if r == 1:
      return a
    return jnp.broadcast_to(a[:, None, :], (r, sb, bn)).reshape(bk, bn)
  c = a.shape[1]
  if c == 1:
    return a
  if lane_select and c <= _MAX_SELECT_SEGMENTS:
    lane = lax.broadcasted_iota(jnp.int32, (1, bn), 1)
    out = jnp.broadcast_to(a[:, 0:1], (bk, bn))
    for i in range(1, c):
      out = jnp.where(lane >= i * sb, a[:, i:i + 1], out)
    return out
  return jnp.broadcast_to(a[:, :, None], (bk, c, sb)).reshape(bk, bn)


def _dequant(codes, s, z, *, sb, group_axis, zero_const, dtype, lane_select=False):
  """int32 codes ``(bk, bn)`` -> ``((codes - Z) * S).astype(dtype)``, computed in float32."""
  shape = codes.shape
  expand = functools.partial(_expand, sb=sb, shape=shape, group_axis=group_axis,
                             lane_select=lane_select)
  zz = zero_const if z is None else expand(z)
  w = (codes.astype(jnp.float32) - zz) * expand(s)
  return w.astype(dtype)


def _dot(x, w):
  precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  return jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)


# ----------------------------------------------------------------------------- kernels

def dequant_matmul_tpu_kernel(x_ref, p_ref, s_ref, *rest, bits, sb, group_axis, zero_const, bk,
                              has_zero):
  """Grid (i, j, kk): o[i, j] = sum_kk x[i, kk] @ dequant(p[kk, j]); f32 accumulator in VMEM."""
  if has_zero:
    z_ref, o_ref, acc_ref = rest
  else:
    (o_ref, acc_ref), z_ref = rest, None

  @pl.when(pl.program_id(2) == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  x = x_ref[...]
  codes = unpack_lib.load_codes(p_ref, 0, bk, bits)
  w = _dequant(codes, s_ref[...], None if z_ref is None else z_ref[...], sb=sb,
               group_axis=group_axis, zero_const=zero_const, dtype=x.dtype, lane_select=True)
  acc_ref[...] += _dot(x, w)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _store():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def dequant_matmul_triton_kernel(x_ref, p_ref, s_ref, *rest, bits, sb, group_axis, zero_const, bk,
                                 bn, nk, has_zero):
  """Grid (i, j): refs hold all of K; a fori_loop over the ``nk`` K tiles."""
  if has_zero:
    z_ref, o_ref = rest
  else:
    (o_ref,), z_ref = rest, None
  bm = x_ref.shape[0]

  def params(ref, kk):
    if group_axis == "oc":  # (k_pad/sb, bn): bk/sb rows per tile
      return ref[pl.ds(kk * (bk // sb), bk // sb), :]
    return ref[pl.ds(kk * bk, bk), :]  # (k_pad, bn/sb)

  def body(kk, acc):
    k0 = pl.multiple_of(kk * bk, bk)
    x = x_ref[:, pl.ds(k0, bk)]
    codes = unpack_lib.load_codes(p_ref, k0, bk, bits)
    w = _dequant(codes, params(s_ref, kk), None if z_ref is None else params(z_ref, kk), sb=sb,
                 group_axis=group_axis, zero_const=zero_const, dtype=x.dtype)
    return acc + _dot(x, w)

  acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


# ----------------------------------------------------------------------------- public op

@functools.partial(jax.jit, static_argnames=("bits", "group_size", "group_axis", "block_sizes",
                                             "backend", "interpret"))
def dequant_matmul(x, packed, scale, zero=None, *, bits, group_size, group_axis, block_sizes=None,
                   backend=None, interpret=False):
  """``x (M, K) @ W (K, N)`` with W dequantized from uniform codes in the kernel -> ``(M, N)`` x.dtype.

  See the module docstring for the storage layout. ``block_sizes`` (static) defaults
  to :func:`default_block_sizes`; ``backend`` "tpu" or "triton" (None: from
  ``jax.default_backend()``; required on CPU); ``interpret`` runs the Pallas
  interpreter (on CPU). Float32 accumulation.
  """
  m, k, n, g = _check(x, packed, scale, zero, bits, group_size, group_axis, backend, block_sizes)
  backend = _resolve_backend(backend)
  bs = block_sizes or default_block_sizes(m, k, n, bits=bits, group_size=group_size,
                                          group_axis=group_axis, backend=backend)
  _check(x, packed, scale, zero, bits, group_size, group_axis, backend, bs)
  bm, bk, bn = bs.bm, bs.bk, bs.bn
  m_pad, k_pad, n_pad = _round_up(m, bm), _round_up(k, bk), _round_up(n, bn)
  words = k_pad * bits // 32
  x = jnp.pad(x, ((0, m_pad - m), (0, k_pad - k)))
  if packed.shape != (words, n_pad):  # a copy of the weights: only for shapes no tile divides
    packed = jnp.pad(packed, ((0, words - packed.shape[0]), (0, n_pad - n)))
  lay = functools.partial(_segment_scales, g=g, group_axis=group_axis, k_pad=k_pad, n_pad=n_pad,
                          bk=bk, bn=bn)
  s, sb = lay(scale)
  params = [s] if zero is None else [s, lay(zero)[0]]
  statics = dict(bits=bits, sb=sb, group_axis=group_axis, zero_const=float(1 << (bits - 1)), bk=bk,
                 has_zero=zero is not None)
  out_shape = jax.ShapeDtypeStruct((m_pad, n_pad), x.dtype)
  wrows = bk * bits // 32

  if backend == "tpu":
    p_block = (wrows, bn), lambda i, j, kk: (kk, j)
    if bits == 3:  # (K/32, 3, N) view: Mosaic has no strided load on these refs
      packed = unpack_lib.as_chunks(packed)
      p_block = (bk // 32, 3, bn), lambda i, j, kk: (kk, 0, j)
    if group_axis == "oc":
      p_spec = pl.BlockSpec((None, bk // sb, bn), lambda i, j, kk: (kk, 0, j))
    else:
      p_spec = pl.BlockSpec((None, bk, bn // sb), lambda i, j, kk: (j, kk, 0))
    out = pl.pallas_call(
        functools.partial(dequant_matmul_tpu_kernel, **statics),
        out_shape=out_shape,
        grid=(m_pad // bm, n_pad // bn, k_pad // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                  pl.BlockSpec(*p_block)] + [p_spec] * len(params),
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(x, packed, *params)
  else:
    if group_axis == "oc":  # (k_pad/sb, n_pad) 2-D
      params = [p.reshape(k_pad // sb, n_pad) for p in params]
      p_spec = pl.BlockSpec((k_pad // sb, bn), lambda i, j: (0, j))
    else:
      p_spec = pl.BlockSpec((None, k_pad, bn // sb), lambda i, j: (j, 0, 0))
    out = pl.pallas_call(
        functools.partial(dequant_matmul_triton_kernel, bn=bn, nk=k_pad // bk, **statics),
        out_shape=out_shape,
        grid=(m_pad // bm, n_pad // bn),
        in_specs=[pl.BlockSpec((bm, k_pad), lambda i, j: (i, 0)),
                  pl.BlockSpec((words, bn), lambda i, j: (0, j))] + [p_spec] * len(params),
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )(x, packed, *params)
  return out[:m, :n]


def dequant_matmul_reference(x, packed, scale, zero=None, *, bits, group_size, group_axis,
                             block_sizes=None, backend=None, interpret=False):
  """Pure jnp: dequantize W to float32, ``x.astype(f32) @ W`` (HIGHEST), cast to x.dtype."""
  del block_sizes, interpret
  m, k, n, g = _check(x, packed, scale, zero, bits, group_size, group_axis, backend, None)
  codes = unpack_lib.unpack_reference(packed, bits, k).astype(jnp.float32)
  zero = jnp.full(scale.shape, float(1 << (bits - 1)), jnp.float32) if zero is None else zero
  s, z = scale.astype(jnp.float32), zero.astype(jnp.float32)
  if group_axis == "oc":
    idx = jnp.arange(k) // g
    w = (codes - z[idx]) * s[idx]
  else:
    idx = jnp.arange(n) // g
    w = (codes - z[:, idx]) * s[:, idx]
  y = jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
  return y.astype(x.dtype)
