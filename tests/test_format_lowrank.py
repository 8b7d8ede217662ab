"""LowRank: the dequantize/linear invariant, exact stored bits, pytree, check(), checkpoint round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqx import formats, nn
from lqx.formats import lowrank
from lqx.formats.lowrank import LowRank
from lqx.io import checkpoint
from lqx.quant.rtn import RTNConfig, rtn_quantize

IC, OC, R = 96, 80, 6


def make(factor_bits=8, seed=0, dtype=jnp.float32):
  """A LowRank over a 3-bit g32 QArray of a random kernel, with random float factors (and those factors)."""
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(size=(IC, OC)) / 8, dtype)
  base = rtn_quantize(w, RTNConfig(bits=3, group_size=32))
  a = rng.normal(size=(IC, R)) * np.linspace(0.1, 3.0, IC)[:, None] / 10  # rows of very different size
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(rng.normal(size=(R, OC)) / 10, jnp.float32)
  return lowrank.from_factors(base, a, b, factor_bits=factor_bits), base, a, b


def spec(x):
  return [(jax.tree_util.keystr(p), tuple(l.shape), np.dtype(l.dtype)) for p, l in
          jax.tree_util.tree_flatten_with_path(x)[0]]


def test_registered_and_tree_spec():
  lr, base, _, _ = make(8)
  assert formats.FORMATS["lowrank"] is LowRank and formats.name_of(lr) == "lowrank" and formats.is_quantized(lr)
  own = spec(lr)[len(spec(base)):]
  assert [s[0] for s in spec(lr)[:len(spec(base))]] == [".base" + s[0] for s in spec(base)]
  assert own == [(".a", (IC, R), np.dtype(np.int8)), (".b", (R, OC), np.dtype(np.int8)),
                 (".a_scale", (IC, 1), np.dtype(np.float16)), (".b_scale", (R, 1), np.dtype(np.float16))]
  assert (lr.rank, lr.factor_bits, lr.shape, lr.dtype) == (R, 8, (IC, OC), base.dtype)
  lr16, *_ = make(16)
  assert spec(lr16)[len(spec(base)):] == [(".a", (IC, R), np.dtype(np.float16)), (".b", (R, OC), np.dtype(np.float16))]
  assert lr16.a_scale is None and lr16.b_scale is None


@pytest.mark.parametrize("factor_bits", [8, 16])
def test_dequantize_invariant_and_exact_bits(factor_bits):
  lr, base, a, b = make(factor_bits)
  fa, fb = lr.factors()
  if factor_bits == 8:  # codes * per-row scale, codes in [-127, 127], max |code| = 127 on every row
    np.testing.assert_array_equal(fa, lr.a.astype(np.float32) * lr.a_scale.astype(np.float32))
    assert np.all(np.max(np.abs(np.asarray(lr.a, np.int32)), axis=1) == 127)
    assert np.all(np.max(np.abs(np.asarray(lr.b, np.int32)), axis=1) == 127)
    # Rounding error at most half a step of each row's (stored) scale.
    assert np.all(np.abs(np.asarray(fa - a)) <= np.asarray(lr.a_scale, np.float32) / 2 * (1 + 1e-6))
    assert np.all(np.abs(np.asarray(fb - b)) <= np.asarray(lr.b_scale, np.float32) / 2 * (1 + 1e-6))
  else:
    np.testing.assert_array_equal(fa, a.astype(jnp.float16).astype(np.float32))
  ref = np.asarray(base.dequantize(), np.float64) + np.asarray(fa, np.float64) @ np.asarray(fb, np.float64)
  np.testing.assert_allclose(lr.dequantize(), ref, rtol=1e-6, atol=1e-6)
  own_bits = 8 * (IC * R + R * OC) * (1 if factor_bits == 8 else 2) + (16 * (IC + R) if factor_bits == 8 else 0)
  assert lr.stored_bits == base.stored_bits + own_bits
  assert lr.stored_bits == sum(8 * l.size * l.dtype.itemsize for l in jax.tree.leaves(lr))
  assert lr.bits_per_weight == lr.stored_bits / (IC * OC)


def test_linear_matches_dequantize_under_jit_and_never_densifies():
  lr, *_ = make(8)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 7, IC)), jnp.float32)
  y = jax.jit(nn.linear)(x, lr)
  np.testing.assert_allclose(y, x @ lr.dequantize(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(lambda l: l.dequantize())(lr), lr.dequantize(), rtol=1e-6, atol=1e-7)
  # The factors' product is never formed: no matmul in linear's jaxpr yields an (IC, OC) array.
  jaxpr = str(jax.make_jaxpr(lambda l, v: l.linear(v))(lr, x))
  dots = [line for line in jaxpr.splitlines() if "dot_general" in line and "=" in line]
  assert dots and not any(f"[{IC},{OC}]" in line.split("=")[0] for line in dots), dots
  assert any(f"f32[2,7,{R}]" in line.split("=")[0] for line in dots)
  # bfloat16 inputs: computed in the dtype of x.
  assert jax.jit(nn.linear)(x.astype(jnp.bfloat16), lr).dtype == jnp.bfloat16


def test_nested_format_base_and_pytree_round_trip():
  inner, *_ = make(16)
  rng = np.random.default_rng(9)
  outer = lowrank.from_factors(inner, jnp.asarray(rng.normal(size=(IC, 2)) / 50, jnp.float32),
                               jnp.asarray(rng.normal(size=(2, OC)) / 50, jnp.float32))
  leaves, treedef = jax.tree_util.tree_flatten(outer)
  back = jax.tree_util.tree_unflatten(treedef, leaves)
  assert type(back.base) is LowRank and type(back.base.base) is type(inner.base)
  assert all(np.array_equal(x, y) for x, y in zip(leaves, jax.tree.leaves(back)))
  fa, fb = outer.factors()
  np.testing.assert_allclose(outer.dequantize(), inner.dequantize() + fa @ fb, rtol=1e-6, atol=1e-6)
  assert outer.stored_bits == inner.stored_bits + 8 * (IC * 2 + 2 * OC) + 16 * (IC + 2)
  outer.check()


def test_check_rejects_wrong_shapes_and_dtypes():
  lr, *_ = make(8)
  lr.check()
  bad = {
      "a": lr.a[:-1], "b": lr.b[:, :-1], "a_scale": lr.a_scale[:, :0], "b_scale": None,
  }
  for field, value in bad.items():
    with pytest.raises(ValueError, match=field):
      LowRank(**{**vars(lr), field: value}).check()
  with pytest.raises(ValueError, match="rank"):
    LowRank(**{**vars(lr), "rank": R + 1}).check()
  with pytest.raises(ValueError, match="a is"):
    LowRank(**{**vars(lr), "a": lr.a.astype(jnp.float16)}).check()
  with pytest.raises(ValueError, match="factor_bits"):
    LowRank(**{**vars(lr), "factor_bits": 4}).check()
  lr16, *_ = make(16)
  with pytest.raises(ValueError, match="a_scale"):
    LowRank(**{**vars(lr16), "a_scale": lr.a_scale}).check()
  with pytest.raises(ValueError, match="base"):
    LowRank(**{**vars(lr), "base": jnp.zeros((IC, OC))}).check()
  with pytest.raises(ValueError, match="do not fit"):
    lowrank.from_factors(lr.base, jnp.zeros((IC, 2)), jnp.zeros((3, OC)))


def test_checkpoint_round_trip_bit_exact(tmp_path):
  lr8, *_ = make(8, seed=1)
  lr16, *_ = make(16, seed=2, dtype=jnp.bfloat16)
  params = {"layers_0": {"attn": {"q_proj": {"kernel": lr8}, "k_proj": {"kernel": lr16}},
                         "norm": {"scale": jnp.ones((IC,))}}}
  path = checkpoint.save(tmp_path / "ckpt", None, params)
  _, restored, _ = checkpoint.restore(path)
  flat_a, tree_a = jax.tree_util.tree_flatten(params)
  flat_b, tree_b = jax.tree_util.tree_flatten(restored)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
  assert type(restored["layers_0"]["attn"]["q_proj"]["kernel"]) is LowRank
  np.testing.assert_array_equal(restored["layers_0"]["attn"]["k_proj"]["kernel"].dequantize(), lr16.dequantize())


def test_checkpoint_restore_rejects_a_lowrank_that_does_not_fit(tmp_path):
  lr, *_ = make(8)
  bad = LowRank(**{**vars(lr), "rank": R - 1, "b": lr.b[:-1], "b_scale": lr.b_scale[:-1]})  # a still has R columns
  path = checkpoint.save(tmp_path / "bad", None, {"k": bad})
  with pytest.raises(checkpoint.CheckpointError, match="lowrank format does not fit"):
    checkpoint.restore(path)
