"""Pack b-bit unsigned codes densely into unsigned words, and back.

Codes along one axis are read as a bit stream, little-endian: code ``k``
occupies stream bits ``[k*b, (k+1)*b)`` and word ``j`` holds stream bits
``[j*W, (j+1)*W)`` for word width ``W`` (32 for uint32, 8 for uint8), its bit 0
first. A code may straddle two words (3, 5 and 6 bits in uint32: 32 codes of 3
bits fill exactly 3 words). ``n`` codes take ``ceil(n*b/W)`` words: only the
last word carries padding, which is zero.

Everything here is pure ``jnp`` with static shapes (jittable); the bit layout
is a few vectorized shifts and sums (whole codes per word when ``b`` divides
``W``, an explicit bit stream otherwise).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

BITS = (2, 3, 4, 5, 6, 8)
WORD_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint32))


def check_bits(bits: int) -> None:
  """Raise unless ``bits`` is a packable code width."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in BITS:
    raise ValueError(f"{bits=} is not a packable code width; expected one of {BITS}")


def _word_bits(word_dtype) -> int:
  word_dtype = np.dtype(word_dtype)
  if word_dtype not in WORD_DTYPES:
    raise ValueError(f"{word_dtype=} is not a word type; expected uint8 or uint32")
  return 8 * word_dtype.itemsize


def num_words(n: int, bits: int, word_dtype=np.uint32) -> int:
  """Words holding ``n`` codes of ``bits`` bits: ``ceil(n * bits / word_bits)``."""
  check_bits(bits)
  return -(-n * bits // _word_bits(word_dtype))


def pack(codes: jax.Array, bits: int, *, axis: int = -1, word_dtype=np.uint32) -> jax.Array:
  """Pack codes in ``[0, 2**bits)`` along ``axis`` into words.

  ``codes[..., n, ...]`` (any integer dtype; values are masked to ``bits`` bits)
  -> ``words[..., ceil(n*bits/W), ...]`` of ``word_dtype``; other axes unchanged.
  """
  check_bits(bits)
  _word_bits(word_dtype)
  return _pack(jnp.asarray(codes), int(bits), axis, np.dtype(word_dtype))


def _along_last(v: np.ndarray, ndim: int) -> np.ndarray:
  """A 1-D table shaped to broadcast along the last of ``ndim`` axes (no rank promotion)."""
  return v.astype(np.uint32).reshape((1,) * (ndim - 1) + (-1,))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _pack(codes, bits, axis, word_dtype):
  wbits = _word_bits(word_dtype)
  codes = jnp.moveaxis(codes, axis, -1)
  lead, n = codes.shape[:-1], codes.shape[-1]
  n_words = -(-n * bits // wbits)
  c = codes.astype(jnp.uint32) & jnp.uint32((1 << bits) - 1)
  if wbits % bits == 0:  # whole codes per word: shift each into place and add
    per = wbits // bits
    c = jnp.pad(c, [(0, 0)] * len(lead) + [(0, n_words * per - n)]).reshape(*lead, n_words, per)
    words = jnp.sum(c << _along_last(np.arange(per) * bits, c.ndim), axis=-1, dtype=jnp.uint32)
  else:  # codes straddle words: spell out the bit stream, regroup into words
    stream = ((c[..., None] >> _along_last(np.arange(bits), c.ndim + 1)) & 1).reshape(*lead, n * bits)
    stream = jnp.pad(stream, [(0, 0)] * len(lead) + [(0, n_words * wbits - n * bits)])
    stream = stream.reshape(*lead, n_words, wbits)
    words = jnp.sum(stream << _along_last(np.arange(wbits), stream.ndim), axis=-1, dtype=jnp.uint32)
  return jnp.moveaxis(words.astype(word_dtype), -1, axis)


def unpack(words: jax.Array, bits: int, n: int, *, axis: int = -1) -> jax.Array:
  """Inverse of :func:`pack`: ``words[..., ceil(n*bits/W), ...]`` -> uint8 ``codes[..., n, ...]``.

  The word width is taken from ``words.dtype`` (uint8 or uint32).
  """
  check_bits(bits)
  wbits = _word_bits(words.dtype)
  expected = -(-n * bits // wbits)
  if words.shape[axis] != expected:
    raise ValueError(
        f"words have {words.shape[axis]} entries along {axis=}; {n=} codes of {bits=} need {expected}")
  return _unpack(words, int(bits), int(n), axis)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unpack(words, bits, n, axis):
  wbits = _word_bits(words.dtype)
  w = jnp.moveaxis(words, axis, -1).astype(jnp.uint32)
  lead, n_words = w.shape[:-1], w.shape[-1]
  mask = jnp.uint32((1 << bits) - 1)
  if wbits % bits == 0:
    per = wbits // bits
    codes = (w[..., None] >> _along_last(np.arange(per) * bits, w.ndim + 1)) & mask
    codes = codes.reshape(*lead, n_words * per)[..., :n]
  else:
    stream = ((w[..., None] >> _along_last(np.arange(wbits), w.ndim + 1)) & 1).reshape(*lead, n_words * wbits)
    stream = stream[..., : n * bits].reshape(*lead, n, bits)
    codes = jnp.sum(stream << _along_last(np.arange(bits), stream.ndim), axis=-1, dtype=jnp.uint32)
  return jnp.moveaxis(codes.astype(jnp.uint8), -1, axis)
