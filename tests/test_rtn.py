"""RTN against a plain NumPy transcription of reference GPTQ's ``Quantizer`` (min-max and MSE)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lqx.formats import affine
from lqx.quant.rtn import RTNConfig, find_params, rtn_quantize

jax.config.update("jax_numpy_rank_promotion", "raise")

F32 = np.float32


def np_round_scale(scale, scale_dtype):
  fi = np.finfo(scale_dtype)
  lo = fi.tiny if np.dtype(scale_dtype) == np.float32 else fi.smallest_subnormal
  return np.clip(scale, lo, fi.max).astype(scale_dtype).astype(F32)


def np_find_params(x, bits, sym, mse, scale_dtype):
  """Reference ``Quantizer.find_params`` on rows of ``x`` (groups, n), in float32."""
  maxq = F32(2**bits - 1)
  x = x.astype(F32)
  xmin = np.minimum(x.min(1), 0)
  xmax = np.maximum(x.max(1), 0)
  if sym:
    xmax = np.maximum(np.abs(xmin), xmax)
    xmin = np.where(xmin < 0, -xmax, xmin)
  empty = (xmin == 0) & (xmax == 0)
  xmin, xmax = np.where(empty, F32(-1), xmin), np.where(empty, F32(1), xmax)

  def params(lo, hi):
    scale = np_round_scale((hi - lo) / maxq, scale_dtype)
    zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.clip(np.round(-lo / scale), 0, maxq)
    return scale, zero

  scale, zero = params(xmin, xmax)
  if mse:
    best = np.full(x.shape[0], np.inf, F32)
    for i in range(int(0.8 * 100)):
      p = F32(1 - i / 100)
      s1, z1 = params(p * xmin, p * xmax)
      q = s1[:, None] * (np.clip(np.round(x / s1[:, None]) + z1[:, None], 0, maxq) - z1[:, None])
      err = np.sum(np.abs(q - x) ** F32(2.4), 1)
      better = err < best
      best, scale, zero = np.where(better, err, best), np.where(better, s1, scale), np.where(better, z1, zero)
  return scale, zero


def np_rtn_per_oc(w, bits, group_size, sym, mse=False, scale_dtype=np.float16):
  """Per-OC groups the reference's way: ``find_params(W[:, i:i+g])`` for ``i = 0, g, ...`` (last may be short)."""
  ic, oc = w.shape
  g = ic if group_size == -1 else group_size
  codes, deq, scales = np.zeros((ic, oc)), np.zeros((ic, oc), F32), []
  for i in range(0, ic, g):
    x = w[i:i + g].T  # reference layout: one row per output channel, only this group's real columns
    scale, zero = np_find_params(x, bits, sym, mse, scale_dtype)
    q = np.clip(np.round(x / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
    codes[i:i + g], deq[i:i + g], scales = q.T, (scale[:, None] * (q - zero[:, None])).T, scales + [scale]
  return codes, deq, np.stack(scales)


def np_rtn(w, bits, group_size, group_axis, sym, mse=False, scale_dtype=np.float16):
  """Codes ``(IC, OC)`` and dequantized weights by grouping, min-max, rounding."""
  if group_axis == "oc":
    return np_rtn_per_oc(w, bits, group_size, sym, mse, scale_dtype)
  ic, oc = w.shape
  gi, go = affine.group_shape(w.shape, group_size, group_axis)
  groups = w.reshape(ic // gi, gi, oc // go, go).transpose(0, 2, 1, 3).reshape(-1, gi * go)
  scale, zero = np_find_params(groups, bits, sym, mse, scale_dtype)
  codes = np.clip(np.round(groups / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
  deq = scale[:, None] * (codes - zero[:, None])
  back = lambda a: a.reshape(ic // gi, oc // go, gi, go).transpose(0, 2, 1, 3).reshape(ic, oc)
  return back(codes), back(deq), scale.reshape(ic // gi, oc // go)


# On IC=64: ("oc", 24) is ragged (24 + 24 + 16), ("oc", 100) is one group.
LAYOUTS = [("oc", 32), ("oc", 24), ("oc", 100), ("oc", -1), ("ic", 16), ("ic", -1), ("tensor", -1)]


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 6, 8]), layout=st.sampled_from(LAYOUTS), sym=st.booleans(),
       sd=st.sampled_from([np.float16, np.float32]), nonneg=st.booleans(), seed=st.integers(0, 999))
def test_matches_numpy_min_max(bits, layout, sym, sd, nonneg, seed):
  w = np.random.default_rng(seed).normal(size=(64, 48)).astype(F32)
  if nonneg:  # exercises the reference's symmetric quirk (xmin stays 0) on some groups
    w[:32] = np.abs(w[:32])
  cfg = RTNConfig(bits, layout[1], layout[0], sym=sym, scale_dtype=sd)
  qa = rtn_quantize(jnp.asarray(w), cfg)
  codes, deq, scale = np_rtn(w, bits, layout[1], layout[0], sym, scale_dtype=sd)
  np.testing.assert_array_equal(np.asarray(qa.codes()), codes)
  np.testing.assert_array_equal(np.asarray(qa.scale).astype(F32), scale)
  np.testing.assert_allclose(np.asarray(qa.dequantize()), deq, rtol=1e-6, atol=1e-7)
  assert qa.sym == sym and qa.scale.dtype == sd


@pytest.mark.parametrize("bits, layout, sym", [(2, ("oc", 32), False), (3, ("ic", 16), True), (4, ("oc", -1), False),
                                               (3, ("oc", 24), False), (2, ("oc", 24), True)])
def test_mse_matches_numpy_and_is_never_worse(bits, layout, sym):
  rng = np.random.default_rng(bits)
  w = (rng.standard_t(3, size=(64, 48)) * 0.02).astype(F32)  # heavy tails: clipping pays off
  cfg = RTNConfig(bits, layout[1], layout[0], sym=sym, mse=True, scale_dtype=np.float32)
  qa = rtn_quantize(jnp.asarray(w), cfg)
  codes, deq, _ = np_rtn(w, bits, layout[1], layout[0], sym, mse=True, scale_dtype=np.float32)
  assert np.mean(np.asarray(qa.codes()) == codes) >= 0.999
  plain = np.asarray(rtn_quantize(jnp.asarray(w), RTNConfig(bits, layout[1], layout[0], sym=sym,
                                                            scale_dtype=np.float32)).dequantize())
  # The search includes the plain range (p = 1), so its own objective never gets worse, group by group.
  gi, go = affine.group_shape(w.shape, layout[1], layout[0])
  n_gi, n_go = affine.scale_shape(w.shape, layout[1], layout[0])
  per_group = lambda d: np.sum(np.pad(np.abs(d - w) ** 2.4, ((0, n_gi * gi - 64), (0, 0))).reshape(
      n_gi, gi, n_go, go), axis=(1, 3))
  assert np.all(per_group(np.asarray(qa.dequantize())) <= per_group(plain) * (1 + 1e-5))
  # And in plain MSE on these heavy-tailed weights it helps overall.
  assert np.mean((np.asarray(qa.dequantize()) - w) ** 2) < np.mean((plain - w) ** 2)


def test_find_params_edge_cases():
  x = jnp.asarray([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [-3.0, -1.0, 0.5]])
  s, z = find_params(x, bits=4, sym=False, axis=1, scale_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(s), [2 / 15, 3 / 15, 3.5 / 15], rtol=1e-6)  # all-zero row -> [-1, 1]
  np.testing.assert_array_equal(np.asarray(z), [7, 0, 13])  # round(-xmin/scale) in f32: 1/(2/15) = 7.4999995
  s, z = find_params(x, bits=4, sym=True, axis=1, scale_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(s), [2 / 15, 3 / 15, 6 / 15], rtol=1e-6)  # row 2: xmin stays 0
  np.testing.assert_array_equal(np.asarray(z), [8, 8, 8])


def test_ragged_last_group_uses_only_its_rows():
  # IC=200, g=64: groups 0-63, 64-127, 128-191 and the short 192-199. The short group holds small weights;
  # padding by repeating rows (or reading past it) would widen its range, masking must not.
  rng = np.random.default_rng(0)
  w = rng.normal(size=(200, 32)).astype(F32)
  w[192:] *= 0.01
  for mse in (False, True):
    qa = rtn_quantize(jnp.asarray(w), RTNConfig(3, 64, mse=mse, scale_dtype=np.float32))
    assert qa.scale.shape == (4, 32) and qa.zero.shape == (2, 32)  # ceil(4 * 3 / 8) zero bytes
    codes, deq, scale = np_rtn_per_oc(w, 3, 64, sym=False, mse=mse, scale_dtype=np.float32)
    if mse:  # XLA may fuse the shrink products (FMA): scales can differ by an ulp, as in the test above
      np.testing.assert_allclose(np.asarray(qa.scale), scale, rtol=1e-6)
      assert np.mean(np.asarray(qa.codes()) == codes) >= 0.999
    else:
      np.testing.assert_array_equal(np.asarray(qa.scale), scale)
      np.testing.assert_array_equal(np.asarray(qa.codes()), codes)
      np.testing.assert_allclose(np.asarray(qa.dequantize()), deq, rtol=1e-6, atol=1e-9)
      last = w[192:]
      lo, hi = np.minimum(last.min(0), 0), np.maximum(last.max(0), 0)
      np.testing.assert_allclose(np.asarray(qa.scale[3]), (hi - lo) / 7, rtol=1e-6)
    assert np.max(np.abs(np.asarray(qa.dequantize())[192:] - last)) < 0.01  # the short group's own fine step


def test_group_larger_than_ic_is_one_group():
  w = jax.random.normal(jax.random.key(1), (100, 32))
  a = rtn_quantize(w, RTNConfig(4, 128))
  b = rtn_quantize(w, RTNConfig(4, -1))
  assert a.scale.shape == b.scale.shape == (1, 32) and a.group_size == 128
  np.testing.assert_array_equal(np.asarray(a.codes()), np.asarray(b.codes()))
  np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))


def test_per_tensor_and_jit():
  w = jax.random.normal(jax.random.key(0), (64, 32))
  cfg = RTNConfig(4, -1, "tensor")
  qa = rtn_quantize(w, cfg)
  assert qa.scale.shape == (1, 1) and qa.zero.shape == (1, 1)
  jitted = jax.jit(rtn_quantize, static_argnums=1)(w, cfg)
  np.testing.assert_array_equal(np.asarray(jitted.packed), np.asarray(qa.packed))


def test_errors():
  w = jnp.ones((256, 96))
  with pytest.raises(ValueError, match=r"bits=7 is not a packable code width; expected one of \(2, 3, 4, 5, 6, 8\)"):
    RTNConfig(7)
  with pytest.raises(ValueError, match=r"bits=1 is not a packable"):
    RTNConfig(1)
  with pytest.raises(ValueError, match=r"group_size=64 does not divide the output-channel axis \(OC=96\); per-IC "
                                       r"groups must tile OC exactly"):
    rtn_quantize(w, RTNConfig(4, 64, "ic"))
  with pytest.raises(ValueError, match=r"group_axis='tensor' takes group_size=-1"):
    RTNConfig(4, 128, "tensor")
  with pytest.raises(ValueError, match=r"group_axis='rows' is not one of"):
    RTNConfig(4, 128, "rows")
  with pytest.raises(ValueError, match=r"group_size=0 must be a positive int or -1"):
    RTNConfig(4, 0)
  with pytest.raises(ValueError, match="not a scale storage type"):
    RTNConfig(4, scale_dtype=jnp.float64)
  with pytest.raises(ValueError, match=r"w \(256, 96\) has 2 NaN/Inf entries"):
    rtn_quantize(w.at[0, 0].set(jnp.nan).at[3, 1].set(jnp.inf), RTNConfig(4))
  with pytest.raises(ValueError, match=r"w must be a 2-D \(IC, OC\) kernel, got shape \(4, 64, 96\)"):
    rtn_quantize(jnp.ones((4, 64, 96)), RTNConfig(4))
  with pytest.raises(ValueError, match="w must be a float array, got dtype int32"):
    rtn_quantize(jnp.ones((256, 96), jnp.int32), RTNConfig(4))
