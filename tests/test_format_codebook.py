"""Codebook: codes/table round trip, nearest entry, exact stored bits, jit, pytree, checkpoint, check()."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lqx
from lqx import formats
from lqx.formats import codebook
from lqx.formats.codebook import Codebook
from lqx.io import checkpoint


def make(ic, oc, bits, table_dtype=jnp.float16, dtype=jnp.float32, seed=0):
  """A Codebook from random codes and tables, plus those raw arrays."""
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 2**bits, size=(ic, oc))
  table = rng.normal(size=(oc, 2**bits)).astype(np.float32)
  cb = codebook.from_codes(jnp.asarray(codes), jnp.asarray(table), bits=bits, dtype=dtype, table_dtype=table_dtype)
  return cb, codes, table


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_round_trip_codes_and_table(bits):
  cb, codes, table = make(100, 24, bits, seed=bits)
  assert cb.table.shape == (24, 2**bits) and cb.table.dtype == jnp.float16
  assert cb.packed.shape == (-(-100 * bits // 32), 24) and cb.packed.dtype == jnp.uint32
  np.testing.assert_array_equal(np.asarray(cb.codes()), codes)
  t16 = table.astype(np.float16).astype(np.float32)
  want = t16[np.arange(24)[None, :], codes]  # w[i, o] = table[o, code[i, o]]
  deq = cb.dequantize()
  assert deq.dtype == jnp.float32 and deq.shape == (100, 24)
  np.testing.assert_array_equal(np.asarray(deq), want)


@pytest.mark.parametrize("table_dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_nearest_stored_entry(table_dtype):
  rng = np.random.default_rng(1)
  w = rng.normal(size=(96, 40)).astype(np.float32)
  table = rng.normal(size=(40, 8)).astype(np.float32)
  table[3] = table[3, ::-1]  # unsorted and with repeats: still the nearest entry
  table[5, 2] = table[5, 6]
  cb = codebook.codebook_quantize(jnp.asarray(w), jnp.asarray(table), table_dtype=table_dtype)
  stored = np.asarray(jnp.asarray(table).astype(table_dtype).astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(cb.table.astype(jnp.float32)), stored)
  deq = np.asarray(cb.dequantize())
  best = np.min(np.abs(w[:, :, None] - stored[None, :, :]), axis=2)  # brute force over each column's table
  np.testing.assert_array_equal(np.abs(w - deq), best)
  codes = np.asarray(cb.codes())
  np.testing.assert_array_equal(deq, stored[np.arange(40)[None, :], codes])


def test_quantize_keeps_dtype_and_exact_values():
  w = jnp.asarray(np.linspace(-1, 1, 64 * 8).reshape(64, 8), jnp.bfloat16)
  table = jnp.tile(jnp.linspace(-1, 1, 16)[None], (8, 1))
  cb = codebook.codebook_quantize(w, table)
  assert cb.dtype == jnp.bfloat16 and cb.dequantize().dtype == jnp.bfloat16 and cb.bits == 4
  on_grid = jnp.tile(table[0].astype(jnp.float16)[None, :4].T, (16, 8))  # weights already on the table
  np.testing.assert_array_equal(np.asarray(codebook.codebook_quantize(on_grid, table).dequantize()),
                                np.asarray(on_grid))


@pytest.mark.parametrize("ic, oc, bits, table_dtype, bpw", [
    # SmolLM2 (576, 576) 3-bit, f16 tables: 54 words per column (exact) + 8 entries * 16 bits per column
    (576, 576, 3, jnp.float16, 3 + 16 * 8 / 576),
    # 4-bit on IC=100: 13 words = 416 bits per column, 16 f32 entries = 512 bits per column
    (100, 24, 4, jnp.float32, (416 + 512) / 100),
    # 3-bit on IC=100: ceil(300/32) = 10 words = 320 bits; 8 bf16 entries = 128 bits
    (100, 24, 3, jnp.bfloat16, (320 + 128) / 100),
    # 8-bit on IC=64: 16 words = 512 bits; 256 f16 entries = 4096 bits
    (64, 8, 8, jnp.float16, (512 + 4096) / 64),
])
def test_stored_bits_exact(ic, oc, bits, table_dtype, bpw):
  cb, *_ = make(ic, oc, bits, table_dtype)
  assert cb.stored_bits == int(round(bpw * ic * oc))
  assert cb.bits_per_weight == pytest.approx(bpw, rel=1e-12)
  assert cb.stored_bits == 8 * sum(x.nbytes for x in jax.tree.leaves(cb))


def test_jit_linear_matches_dequantize():
  cb, *_ = make(96, 48, 3)
  x = jax.random.normal(jax.random.key(0), (2, 5, 96))
  want = x @ cb.dequantize()
  np.testing.assert_allclose(np.asarray(lqx.nn.linear(x, cb)), np.asarray(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.jit(lqx.nn.linear)(x, cb)), np.asarray(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.dequantize())(cb)), np.asarray(cb.dequantize()))


def test_pytree_flatten_unflatten_and_registry():
  cb, *_ = make(64, 16, 4)
  leaves, treedef = jax.tree_util.tree_flatten(cb)
  assert [(x.shape, x.dtype) for x in leaves] == [((8, 16), jnp.uint32), ((16, 16), jnp.float16)]
  back = jax.tree_util.tree_unflatten(treedef, leaves)
  assert type(back) is Codebook and (back.bits, back.shape, back.dtype, back.table_dtype) == (
      4, (64, 16), np.dtype(np.float32), np.dtype(np.float16))
  doubled = jax.tree.map(lambda a: a, cb)
  np.testing.assert_array_equal(np.asarray(doubled.dequantize()), np.asarray(cb.dequantize()))
  assert formats.FORMATS["codebook"] is Codebook and formats.name_of(cb) == "codebook" and formats.is_quantized(cb)


def test_checkpoint_round_trip_bit_exact(tmp_path):
  cb, *_ = make(32, 48, 3, jnp.bfloat16)
  cb4, *_ = make(48, 32, 4, jnp.float32, dtype=jnp.bfloat16, seed=1)
  params = {"layers_0": {"mlp": {"up_proj": {"kernel": cb}, "down_proj": {"kernel": cb4}},
                         "norm": {"scale": jnp.ones(32)}}}
  path = checkpoint.save(tmp_path / "ckpt", None, params)
  _, restored, _ = checkpoint.restore(path)
  flat_a, tree_a = jax.tree_util.tree_flatten(params)
  flat_b, tree_b = jax.tree_util.tree_flatten(restored)
  assert tree_a == tree_b
  for a, b in zip(flat_a, flat_b):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  got = restored["layers_0"]["mlp"]["down_proj"]["kernel"]
  assert type(got) is Codebook and got.dtype == jnp.bfloat16 and got.table_dtype == jnp.float32


def test_check_rejects_wrong_shapes_and_dtypes():
  cb, *_ = make(100, 24, 3)
  cb.check()
  bad = [
      dict(packed=jnp.zeros((9, 24), jnp.uint32)),  # 100 3-bit codes need 10 words
      dict(packed=jnp.zeros((10, 24), jnp.uint8)),
      dict(table=jnp.zeros((24, 16), jnp.float16)),  # 3 bits: 8 entries
      dict(table=jnp.zeros((23, 8), jnp.float16)),
      dict(table=jnp.zeros((24, 8), jnp.float32)),  # table_dtype says float16
      dict(bits=7),
      dict(shape=(100, 24, 1)),
      dict(table_dtype=np.dtype(np.int8)),
  ]
  for change in bad:
    fields = dict(packed=cb.packed, table=cb.table, bits=cb.bits, shape=cb.shape, dtype=cb.dtype,
                  table_dtype=cb.table_dtype) | change
    with pytest.raises(ValueError):
      Codebook(**fields).check()
  sds = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), cb)  # restore checks before reading
  sds.check()


def test_bad_arguments():
  w = jnp.zeros((16, 4))
  with pytest.raises(ValueError, match="table"):
    codebook.codebook_quantize(w, jnp.zeros((4, 6)))  # 6 entries: not a power of two
  with pytest.raises(ValueError, match="table"):
    codebook.codebook_quantize(w, jnp.zeros((5, 8)))  # one table per output channel
  with pytest.raises(ValueError, match="bits"):
    codebook.codebook_quantize(w, jnp.zeros((4, 2)))  # 1 bit is not a packable width
  with pytest.raises(ValueError, match="table_dtype"):
    codebook.codebook_quantize(w, jnp.zeros((4, 8)), table_dtype=jnp.int8)
  with pytest.raises(ValueError, match="not finite"):
    codebook.codebook_quantize(w, jnp.full((4, 8), 1e6))  # overflows float16
  with pytest.raises(ValueError, match="w has shape"):
    codebook.codebook_quantize(jnp.zeros(16), jnp.zeros((4, 8)))
