"""In-kernel unpacking of b-bit codes packed along K into uint32 words (lqx's layout).

The layout (``lqx.packing.pack(codes, bits, axis=0)``) is a little-endian bit
stream down each column: code ``k`` occupies stream bits ``[k*b, (k+1)*b)``, word
``j`` holds stream bits ``[32j, 32j+32)``. For ``b`` in {2, 4, 8}, word ``j``
holds rows ``j*(32/b) + s`` at bits ``[s*b, (s+1)*b)``. For ``b = 3`` the stream
is dense: every 32 rows fill exactly 3 words (a "chunk"), and rows 10 and 21 of a
chunk straddle two words.

Everything here is shift-and-mask on uint32 with ``lax.broadcasted_iota`` shift
tables, a broadcast over a new middle axis and a reshape that merges it into
the row axis: it lowers for Mosaic TPU (no i8/i4 arithmetic, no captured
constants) and for Triton (no uint4 bitcast; the arrays are power-of-two sized
when the block sizes are).

API (all return int32 codes, rows along axis 0):

* ``unpack(words, bits)``: ``(R, C)`` uint32 -> ``(R*32/bits, C)``, bits 2, 4, 8.
* ``unpack3(w0, w1, w2)``: word 0, 1, 2 of each chunk, each ``(R, C)`` -> ``(32R, C)``.
* ``load_codes(ref, k0, bk, bits)``: read code rows ``[k0, k0+bk)`` of a packed
  ref (any of 2, 3, 4, 8 bits; ``k0`` may be traced) and unpack them. ``k0`` and
  ``bk`` must be multiples of ``32/bits`` (32 for 3 bits). For 3 bits the ref
  holds the dense stream as stored, in one of two views (no repacking):
  - 2-D ``(3K/32, C)`` as stored: the three words of each chunk are read with
    stride-3 loads (Triton; Mosaic TPU rejects strided loads unless C == 128:
    "The last dim size is not 128 in original base memref");
  - 3-D ``(K/32, 3, C)`` = :func:`as_chunks` (a free reshape), blocks
    ``(bk/32, 3, bn)``: word ``t`` is ``ref[:, t, :]`` (TPU; legal because the
    last two block dims ``(3, bn)`` equal the array's).
* ``unpack_reference(words, bits, k)``: the same in plain jnp for a whole array
  (host side, for references and tests), ``(ceil(k*bits/32), C)`` -> ``(k, C)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

BITS = (2, 3, 4, 8)


def rows_per_word(bits: int) -> int:
  """Codes per uint32 word for bits 2, 4, 8 (for 3 bits: 32 codes per 3 words)."""
  return 32 // bits


def unpack(words: jax.Array, bits: int) -> jax.Array:
  """uint32 ``(R, C)`` -> int32 codes ``(R * 32/bits, C)``; row ``j*(32/bits) + s`` = bits ``[s*b, (s+1)*b)`` of word ``j``."""
  if bits not in (2, 4, 8):
    raise ValueError(f"{bits=} must be 2, 4 or 8 for unpack(); use unpack3 for 3 bits")
  r, c = words.shape
  per = 32 // bits
  shift = lax.broadcasted_iota(jnp.uint32, (1, per, c), 1) * jnp.uint32(bits)
  w = jnp.broadcast_to(words.astype(jnp.uint32)[:, None, :], (r, per, c))
  codes = (w >> shift) & jnp.uint32((1 << bits) - 1)
  return codes.reshape(r * per, c).astype(jnp.int32)


def unpack3(w0: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
  """Dense 3-bit stream -> int32 codes ``(32R, C)``.

  ``w0, w1, w2`` ``(R, C)`` uint32 are words 0, 1, 2 of each 32-code chunk
  (rows ``3r``, ``3r+1``, ``3r+2`` of the packed array). Code ``i`` of a chunk
  starts at chunk bit ``3i``: word ``3i // 32``, shift ``3i % 32``; codes 10 and
  21 take their high bits from the next word.
  """
  r, c = w0.shape
  start = lax.broadcasted_iota(jnp.uint32, (1, 32, c), 1) * jnp.uint32(3)
  word = start >> 5  # start // 32 (shifts: no signed division in the kernel)
  shift = start & jnp.uint32(31)
  b = lambda w: jnp.broadcast_to(w.astype(jnp.uint32)[:, None, :], (r, 32, c))
  w0, w1, w2 = b(w0), b(w1), b(w2)
  lo = jnp.where(word == 0, w0, jnp.where(word == 1, w1, w2)) >> shift
  # High part, only for codes that straddle (shift > 29): bits from the next word.
  straddle = shift > 29
  hi_shift = jnp.where(straddle, jnp.uint32(32) - shift, jnp.uint32(0))
  hi = jnp.where(word == 0, w1, w2) << hi_shift
  codes = (lo | jnp.where(straddle, hi, jnp.uint32(0))) & jnp.uint32(7)
  return codes.reshape(r * 32, c).astype(jnp.int32)


def load_codes(ref, k0, bk: int, bits: int, cols=slice(None)) -> jax.Array:
  """Read and unpack code rows ``[k0, k0 + bk)`` of a packed uint32 ref -> int32 ``(bk, ncols)``.

  ``ref`` holds lqx's packed layout (rows = words along K). ``k0`` (static or
  traced) and ``bk`` must be multiples of ``32/bits`` (of 32 for 3 bits).
  ``cols`` selects columns (a slice or ``pl.ds``).
  """
  if bits == 3:
    if bk % 32:
      raise ValueError(f"{bk=} is not a multiple of 32 (3-bit chunks)")
    n = bk // 32
    if len(ref.shape) == 3:  # (chunks, 3, C) view
      words = [ref[pl.ds(k0 // 32, n), t, cols] for t in range(3)]
    else:
      words = [ref[pl.ds((k0 // 32) * 3 + t, n, stride=3), cols] for t in range(3)]
    return unpack3(*words)
  per = 32 // bits
  if bk % per:
    raise ValueError(f"{bk=} is not a multiple of {per} codes per word for {bits=}")
  return unpack(ref[pl.ds(k0 // per, bk // per), cols], bits)


def as_chunks(packed: jax.Array) -> jax.Array:
  """3-bit words ``(3K/32, C)`` -> ``(K/32, 3, C)``, chunk ``r``'s word ``t`` at ``[r, t]`` (free reshape)."""
  rows, c = packed.shape
  if rows % 3:
    raise ValueError(f"packed has {rows} rows; a whole number of 3-word chunks (K % 32 == 0) is needed")
  return packed.reshape(rows // 3, 3, c)


def unpack_reference(words: jax.Array, bits: int, k: int) -> jax.Array:
  """Whole-array unpack in plain jnp: ``(ceil(k*bits/32), C)`` uint32 -> int32 ``(k, C)``."""
  w = words.astype(jnp.uint32)
  nw, c = w.shape
  bit = jnp.arange(32, dtype=jnp.uint32)
  stream = ((w[:, None, :] >> bit[None, :, None]) & 1).reshape(nw * 32, c)[: k * bits]
  weights = (jnp.uint32(1) << jnp.arange(bits, dtype=jnp.uint32))[None, :, None]
  return jnp.sum(stream.reshape(k, bits, c) * weights, axis=1).astype(jnp.int32)
