"""lqx.packing against a bit-by-bit NumPy bit stream."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lqx import packing

jax.config.update("jax_numpy_rank_promotion", "raise")


def np_pack(codes: np.ndarray, bits: int, word_bits: int) -> np.ndarray:
  """Reference: spell out every bit, LSB first, and regroup into words, LSB first."""
  n = codes.shape[-1]
  stream = (codes[..., :, None].astype(np.uint64) >> np.arange(bits, dtype=np.uint64)) & 1
  stream = stream.reshape(*codes.shape[:-1], n * bits)
  n_words = -(-n * bits // word_bits)
  stream = np.concatenate(
      [stream, np.zeros((*codes.shape[:-1], n_words * word_bits - n * bits), np.uint64)], axis=-1)
  stream = stream.reshape(*codes.shape[:-1], n_words, word_bits)
  return np.sum(stream << np.arange(word_bits, dtype=np.uint64), axis=-1)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(packing.BITS), word=st.sampled_from([np.uint8, np.uint32]),
       lead=st.sampled_from([(), (1,), (3,), (2, 5)]), n=st.sampled_from([0, 1, 2, 5, 31, 32, 33, 64, 97]),
       seed=st.integers(0, 2**16))
def test_pack_matches_bit_stream_and_round_trips(bits, word, lead, n, seed):
  codes = np.random.default_rng(seed).integers(0, 2**bits, size=(*lead, n))
  words = packing.pack(codes, bits, word_dtype=word)
  wbits = 8 * np.dtype(word).itemsize
  assert words.dtype == word
  assert words.shape == (*lead, -(-n * bits // wbits)) == (*lead, packing.num_words(n, bits, word))
  np.testing.assert_array_equal(np.asarray(words).astype(np.uint64), np_pack(codes, bits, wbits))
  back = packing.unpack(words, bits, n)
  assert back.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(back), codes)


@settings(max_examples=15, deadline=None)
@given(bits=st.sampled_from(packing.BITS), shape=st.sampled_from([(5, 7, 3), (33, 2, 4), (1, 64, 1)]),
       axis=st.sampled_from([0, 1, 2, -1, -2]), seed=st.integers(0, 2**16))
def test_pack_along_any_axis(bits, shape, axis, seed):
  codes = np.random.default_rng(seed).integers(0, 2**bits, size=shape)
  words = packing.pack(codes, bits, axis=axis)
  ref = np.moveaxis(packing.pack(np.moveaxis(codes, axis, -1), bits), -1, axis)
  np.testing.assert_array_equal(np.asarray(words), np.asarray(ref))
  np.testing.assert_array_equal(np.asarray(packing.unpack(words, bits, shape[axis], axis=axis)), codes)


def test_dense_widths_and_padding_of_last_word_only():
  # 32 codes of 3 bits fill exactly 3 uint32 words; 33 need a 4th, padded with zeros.
  assert packing.pack(np.full(32, 7), 3).shape == (3,)
  assert np.all(np.asarray(packing.pack(np.full(32, 7), 3)) == 0xFFFFFFFF)
  w = np.asarray(packing.pack(np.full(33, 7), 3))
  assert w.shape == (4,) and w[3] == 0b111
  assert packing.pack(np.zeros(32), 5).shape == (5,)
  assert packing.pack(np.zeros(16), 6).shape == (3,)
  assert packing.pack(np.zeros(8), 3, word_dtype=np.uint8).shape == (3,)
  assert int(packing.pack(np.array([1, 2, 3]), 4)[0]) == 0x321


def test_jit_matches_eager():
  codes = np.random.default_rng(0).integers(0, 32, size=(4, 70))
  f = jax.jit(lambda c: packing.unpack(packing.pack(c, 5), 5, 70))
  np.testing.assert_array_equal(np.asarray(f(codes)), codes)


@pytest.mark.parametrize("bits", [0, 1, 7, 9, 16, True, 4.0])
def test_bad_bits(bits):
  match = r"bits=.* is not a packable code width; expected one of \(2, 3, 4, 5, 6, 8\)"
  with pytest.raises(ValueError, match=match):
    packing.pack(np.zeros(4), bits)


def test_bad_word_count_and_dtype():
  with pytest.raises(ValueError, match=r"n=33 codes of bits=3 need 4"):
    packing.unpack(jnp.zeros((3,), jnp.uint32), 3, 33)
  with pytest.raises(ValueError, match="not a word type"):
    packing.pack(np.zeros(4), 4, word_dtype=np.uint16)
