"""The dense-and-sparse format (``lqx.formats.sparse``): exact reconstruction, linear, bits, checkpoints, checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqx import formats, nn, quant
from lqx.formats.sparse import Sparse
from lqx.io import checkpoint

IC, OC = 128, 192
NUMEL = IC * OC


def rtn3(w):
  return quant.make("rtn", bits=3, group_size=64).quantize(w, {})[0]


@pytest.fixture(scope="module")
def problem():
  """A heavy-tailed kernel, its 3-bit RTN base, and 600 sparse positions (largest |w| plus random ones)."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_t(3.0, (IC, OC)) * 0.02, jnp.float32)
  top = np.argsort(-np.abs(np.asarray(w)).ravel())[:300]
  index = np.unique(np.concatenate([top, rng.choice(NUMEL, 300, replace=False)])).astype(np.int32)
  return w, rtn3(w), index


def normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def real_part(sp):
  idx = np.asarray(sp.index)
  return idx[idx < NUMEL]


def test_float32_values_reproduce_every_stored_weight_exactly(problem):
  w, base, index = problem
  sp = Sparse.from_dense(base, w, index, value_dtype=jnp.float32)
  deq, b = np.asarray(sp.dequantize()), np.asarray(base.dequantize())
  assert deq.dtype == np.float32 and sp.value_dtype == np.float32 and int(sp.nnz) == len(index)
  np.testing.assert_array_equal(np.sort(real_part(sp)), index)
  np.testing.assert_array_equal(deq.ravel()[index], np.asarray(w).ravel()[index])
  others = np.setdiff1d(np.arange(NUMEL), index)
  np.testing.assert_array_equal(deq.ravel()[others], b.ravel()[others])
  assert not np.array_equal(b.ravel()[index], np.asarray(w).ravel()[index])  # the base alone is not exact


def test_float32_delta_is_the_best_float32_delta_when_no_exact_one_exists(problem):
  """A base far from w (another kernel's codes): exact wherever w - b is a float32, else optimal among neighbors."""
  w, _, index = problem
  far = rtn3(normal(3, (IC, OC), 0.05))
  sp = Sparse.from_dense(far, w, index, value_dtype=jnp.float32)
  wv = np.asarray(w).ravel()[index]
  b = np.asarray(far.dequantize()).ravel()[index]
  out = np.asarray(sp.dequantize()).ravel()[index]
  representable = np.float32(wv.astype(np.float64) - b) == wv.astype(np.float64) - b
  assert 0 < representable.sum() < len(index)  # both cases occur
  np.testing.assert_array_equal(out[representable], wv[representable])
  d = np.asarray(sp.values)[np.argsort(np.asarray(sp.index))][: len(index)]
  err = np.abs(out.astype(np.float64) - wv)
  for step in (np.inf, -np.inf):
    alt = (b + np.nextafter(d, np.float32(step))).astype(np.float32)
    assert np.all(err <= np.abs(alt.astype(np.float64) - wv))


def test_float16_values_error_is_bounded_by_float16_rounding(problem):
  w, base, index = problem
  sp = Sparse.from_dense(base, w, index)
  assert sp.values.dtype == np.float16 and sp.value_dtype == np.float16
  wv = np.asarray(w).ravel()[index].astype(np.float64)
  d = wv - np.asarray(base.dequantize()).ravel()[index]
  out = np.asarray(sp.dequantize()).ravel()[index].astype(np.float64)
  bound = np.maximum(2.0**-11 * np.abs(d), 2.0**-25) + 2.0**-23 * np.abs(wv)
  assert np.all(np.abs(out - wv) <= bound)
  assert np.any(out != wv)  # float16 rounding does happen
  d32 = np.asarray(w).ravel()[index] - np.asarray(base.dequantize()).ravel()[index]  # index is sorted, as sp's
  np.testing.assert_array_equal(np.asarray(sp.values), d32.astype(np.float16))  # the nearest float16 delta


def test_padding_and_duplicates_add_nothing(problem):
  w, base, index = problem
  ref = Sparse.from_dense(base, w, index, value_dtype=jnp.float32)
  messy = np.concatenate([[NUMEL, NUMEL], index[::-1], index[:7]]).astype(np.int32)
  sp = Sparse.from_dense(base, w, messy, value_dtype=jnp.float32)
  assert sp.capacity == len(messy) and int(sp.nnz) == len(index)
  idx = np.asarray(sp.index)
  np.testing.assert_array_equal(idx[: len(index)], index)  # sorted, unique, padding last
  assert np.all(idx[len(index):] == NUMEL) and np.all(np.asarray(sp.values)[len(index):] == 0)
  np.testing.assert_array_equal(sp.dequantize(), ref.dequantize())
  # padding slots add nothing whatever their value; real duplicates (not made by from_dense) add up
  x = normal(1, (4, IC))
  pad = Sparse(base, jnp.array([NUMEL, NUMEL], jnp.int32), jnp.array([7.0, -3.0]), np.dtype(np.float32))
  np.testing.assert_array_equal(pad.dequantize(), base.dequantize())
  np.testing.assert_array_equal(pad.linear(x), base.linear(x))
  dup = Sparse(base, jnp.array([5, NUMEL, 3, 5], jnp.int32), jnp.array([1.0, 9.0, 2.0, 3.0]), np.dtype(np.float32))
  want = np.asarray(base.dequantize()).ravel().copy()
  want[5] += np.float32(4.0)
  want[3] += np.float32(2.0)
  np.testing.assert_array_equal(np.asarray(dup.dequantize()).ravel(), want)
  np.testing.assert_allclose(dup.linear(x), x @ dup.dequantize(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lead,value_dtype", [((), jnp.float16), ((5,), jnp.float32), ((2, 3), jnp.float16)])
def test_linear_equals_x_at_dequantize_under_jit(problem, lead, value_dtype):
  w, base, index = problem
  sp = Sparse.from_dense(base, w, index, value_dtype=value_dtype)
  x = normal(2, lead + (IC,))
  y = jax.jit(lambda s, x: s.linear(x))(sp, x)
  assert y.shape == lead + (OC,) and y.dtype == x.dtype
  want = np.einsum("...i,io->...o", np.asarray(x, np.float64), np.asarray(sp.dequantize(), np.float64))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(nn.linear(x, sp), sp.linear(x))
  np.testing.assert_array_equal(jax.jit(lambda s: s.dequantize())(sp), sp.dequantize())
  assert int(jax.jit(lambda s: s.nnz)(sp)) == len(index)


def test_linear_in_bfloat16(problem):
  w, base, index = problem
  sp = Sparse.from_dense(base, w, index)
  x = normal(4, (3, IC)).astype(jnp.bfloat16)
  y = sp.linear(x)
  assert y.dtype == jnp.bfloat16
  want = np.asarray(x, np.float32) @ np.asarray(sp.dequantize())
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("value_dtype,value_bits", [(jnp.float16, 16), (jnp.float32, 32)])
def test_stored_bits_are_exact(problem, value_dtype, value_bits):
  w, base, index = problem
  sp = Sparse.from_dense(base, w, np.concatenate([index, [NUMEL]]), value_dtype=value_dtype)
  cap = len(index) + 1
  assert sp.stored_bits == base.stored_bits + cap * 32 + cap * value_bits
  assert sp.bits_per_weight == sp.stored_bits / NUMEL
  assert formats.is_quantized(sp) and formats.name_of(sp) == "sparse"


def test_checkpoint_round_trip_is_bit_exact(problem, tmp_path):
  w, base, index = problem
  sp = Sparse.from_dense(base, w, index)
  params = {"blocks": {"0": {"kernel": sp}}, "norm": jnp.arange(4, dtype=jnp.bfloat16)}
  path = checkpoint.save(tmp_path / "ckpt", None, params)
  for target in (None, params):
    _, restored, _ = checkpoint.restore(path, target)
    r = restored["blocks"]["0"]["kernel"]
    assert type(r) is Sparse and type(r.base) is type(base) and r.value_dtype == sp.value_dtype
    flat_a, tree_a = jax.tree_util.tree_flatten(params)
    flat_b, tree_b = jax.tree_util.tree_flatten(restored)
    assert tree_a == tree_b
    for a, b in zip(flat_a, flat_b):
      assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(r.dequantize(), sp.dequantize())


def test_check_rejects_arrays_that_do_not_fit(problem):
  w, base, index = problem
  sp = Sparse.from_dense(base, w, index)
  f16 = np.dtype(np.float16)
  bad = {
      "values shape": Sparse(base, sp.index, sp.values[:-1], f16),
      "values dtype": Sparse(base, sp.index, sp.values.astype(jnp.float32), f16),
      "index dtype": Sparse(base, np.asarray(sp.index, np.int16), sp.values, f16),
      "index rank": Sparse(base, sp.index[None], sp.values[None], f16),
      "index too large": Sparse(base, sp.index.at[0].set(NUMEL + 1), sp.values, f16),
      "index negative": Sparse(base, sp.index.at[3].set(-1), sp.values, f16),
      "value_dtype": Sparse(base, sp.index, sp.values.astype(jnp.bfloat16), np.dtype(jnp.bfloat16)),
      "base": Sparse(w, sp.index, sp.values, f16),
  }
  for what, s in bad.items():
    with pytest.raises(ValueError):
      s.check()
      pytest.fail(what)
  sp.check()  # the real one passes, and so do shape-only leaves (checkpoint restore's first pass)
  Sparse(base, jax.ShapeDtypeStruct(sp.index.shape, jnp.int32), jax.ShapeDtypeStruct(sp.values.shape, f16),
         f16).check()


def test_from_dense_rejects_bad_arguments(problem):
  w, base, index = problem
  with pytest.raises(ValueError, match="w has shape"):
    Sparse.from_dense(base, w[:, :-1], index)
  with pytest.raises(ValueError, match="1-D integer"):
    Sparse.from_dense(base, w, index[None])
  with pytest.raises(ValueError, match="1-D integer"):
    Sparse.from_dense(base, w, index.astype(np.float32))
  with pytest.raises(ValueError, match="outside"):
    Sparse.from_dense(base, w, np.array([0, NUMEL + 1]))
  with pytest.raises(ValueError, match="value_dtype"):
    Sparse.from_dense(base, w, index, value_dtype=jnp.int8)
  huge = w.at[0, 0].set(1e6)
  with pytest.raises(ValueError, match="not finite in float16"):
    Sparse.from_dense(base, huge, np.array([0, 1]))
  Sparse.from_dense(base, huge, np.array([0]), value_dtype=jnp.float32)  # float32 holds it
  # under jit nothing can raise: out-of-range indices become padding
  sp = jax.jit(lambda b, w, i: Sparse.from_dense(b, w, i))(base, w, jnp.array([-4, 7, NUMEL + 9], jnp.int32))
  np.testing.assert_array_equal(sp.index, [7, NUMEL, NUMEL])
