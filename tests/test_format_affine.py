"""QArray: exact tree spec, exact bits per weight, the dequantize invariant, jit, orbax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lqx.formats import affine
from lqx.formats.affine import QArray

jax.config.update("jax_numpy_rank_promotion", "raise")

# ("oc", 24) and ("oc", 60) are ragged on most IC below (e.g. 100 = 4*24 + 4); ("oc", 128) > IC is one group.
LAYOUTS = [("oc", 32), ("oc", 24), ("oc", 60), ("oc", 128), ("oc", -1), ("ic", 16), ("ic", -1), ("tensor", -1)]


def expand(p, gi, go, ic, oc):
  """Per-group values -> (IC, OC); a short last group takes fewer rows."""
  return np.repeat(np.repeat(p, gi, 0), go, 1)[:ic, :oc]


def make(ic, oc, bits, group_axis, group_size, sym, scale_dtype=jnp.float16, perm=False, seed=0,
         dtype=jnp.float32):
  """A QArray from random codes / scales / zeros, plus those raw arrays (stored order)."""
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 2**bits, size=(ic, oc))
  scale = rng.uniform(0.01, 1.0, size=affine.scale_shape((ic, oc), group_size, group_axis)).astype(np.float32)
  zero = None if sym else rng.integers(0, 2**bits, size=scale.shape)
  p = rng.permutation(ic) if perm else None
  qa = affine.from_codes(jnp.asarray(codes), jnp.asarray(scale), None if zero is None else jnp.asarray(zero),
                         bits=bits, group_size=group_size, group_axis=group_axis, dtype=dtype,
                         scale_dtype=scale_dtype, perm=None if p is None else jnp.asarray(p))
  return qa, codes, scale, zero, p


def spec(qa):
  return [(jax.tree_util.keystr(path), tuple(x.shape), np.dtype(x.dtype))
          for path, x in jax.tree_util.tree_flatten_with_path(qa)[0]]


def test_tree_spec_exact():
  qa, *_ = make(256, 96, 4, "oc", 128, sym=False)
  assert spec(qa) == [(".packed", (32, 96), np.dtype(np.uint32)), (".scale", (2, 96), np.dtype(np.float16)),
                      (".zero", (1, 96), np.dtype(np.uint8))]
  assert (qa.bits, qa.group_size, qa.group_axis, qa.shape, qa.dtype, qa.scale_dtype) == (
      4, 128, "oc", (256, 96), np.dtype(np.float32), np.dtype(np.float16))
  qa, *_ = make(100, 96, 3, "oc", -1, sym=True, scale_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  assert spec(qa) == [(".packed", (10, 96), np.dtype(np.uint32)), (".scale", (1, 96), np.dtype(jnp.bfloat16))]
  assert qa.dtype == jnp.bfloat16 and qa.dequantize().dtype == jnp.bfloat16
  qa, *_ = make(64, 96, 2, "ic", 32, sym=False, perm=True, scale_dtype=jnp.float32)
  assert spec(qa) == [(".packed", (4, 96), np.dtype(np.uint32)), (".scale", (64, 3), np.dtype(np.float32)),
                      (".zero", (16, 3), np.dtype(np.uint8)), (".perm", (64,), np.dtype(np.int32))]
  qa, *_ = make(64, 32, 8, "tensor", -1, sym=False)
  assert spec(qa) == [(".packed", (16, 32), np.dtype(np.uint32)), (".scale", (1, 1), np.dtype(np.float16)),
                      (".zero", (1, 1), np.dtype(np.uint8))]


@pytest.mark.parametrize("args, bpw", [
    # codes 4.0 + f16 scales 2*96*16/24576 + zeros 1 byte*96*8/24576
    ((256, 96, 4, "oc", 128, False), 4 + 0.125 + 0.03125),
    # 3-bit codes on IC=100: 10 words = 320 bits per column; one f16 scale per column
    ((100, 96, 3, "oc", -1, True), 3.2 + 0.16),
    # per-IC g32 2-bit, bf16 scales (64, 3), zeros 16 bytes x 3
    ((64, 96, 2, "ic", 32, False, jnp.bfloat16), 2 + 0.5 + 0.0625),
    # per-tensor 8-bit: one f32 scale and one zero byte
    ((256, 96, 8, "tensor", -1, False, jnp.float32), 8 + 40 / 24576),
    # act-order perm: int32 per input channel = 32/OC bits
    ((128, 64, 4, "oc", 32, True, jnp.float16, True), 4 + 0.5 + 0.5),
    # ragged per-OC g64 on IC=200 (3 x 64 + 8): 4 groups. Codes 25 words = 800 bits per column (exact),
    # 4 f16 scales = 64 bits and ceil(4*4/8) = 2 zero bytes = 16 bits per column, over 200 weights.
    ((200, 64, 4, "oc", 64, False), 4 + 0.32 + 0.08),
    # 3-bit: ceil(600/32) = 19 words = 608 bits per column; same 4 scales and 2 zero bytes.
    ((200, 64, 3, "oc", 64, False), (608 + 64 + 16) / 200),
    # SmolLM2's IC=576, g128 (4 x 128 + 64): 54 words, 5 f16 scales, ceil(15/8) = 2 zero bytes per column.
    ((576, 32, 3, "oc", 128, False), 3 + (80 + 16) / 576),
    # g > IC: one group per output channel, as g=-1.
    ((100, 96, 3, "oc", 128, True), 3.2 + 0.16),
])
def test_bits_per_weight_by_hand(args, bpw):
  qa, *_ = make(*args)
  assert qa.bits_per_weight == pytest.approx(bpw, rel=0, abs=1e-12)
  assert qa.nbytes * 8 == pytest.approx(bpw * args[0] * args[1], abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(ic=st.sampled_from([32, 96, 100, 256]), oc=st.sampled_from([16, 48]), bits=st.sampled_from([2, 3, 4, 5, 6, 8]),
       layout=st.sampled_from(LAYOUTS), sym=st.booleans(),
       sd=st.sampled_from([jnp.float16, jnp.bfloat16, jnp.float32]), perm=st.booleans())
def test_bits_per_weight_formula(ic, oc, bits, layout, sym, sd, perm):
  group_axis, group_size = layout
  n_gi, n_go = affine.scale_shape((ic, oc), group_size, group_axis)
  abstract = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)  # trace only: no compilation
  qa = jax.eval_shape(
      lambda c, s, z, p: affine.from_codes(c, s, z, bits=bits, group_size=group_size, group_axis=group_axis,
                                           dtype=jnp.float32, scale_dtype=sd, perm=p),
      abstract((ic, oc), jnp.uint8), abstract((n_gi, n_go), jnp.float32),
      None if sym else abstract((n_gi, n_go), jnp.float32), abstract((ic,), jnp.int32) if perm else None)
  gi = affine.group_shape((ic, oc), group_size, group_axis)[0]
  assert n_gi == (-(-ic // gi) if group_axis == "oc" else ic if group_axis == "ic" else 1)
  total = (32 * -(-ic * bits // 32) * oc + 8 * np.dtype(sd).itemsize * n_gi * n_go
           + (0 if sym else 8 * -(-n_gi * bits // 8) * n_go) + (32 * ic if perm else 0))
  assert qa.bits_per_weight == total / (ic * oc)
  assert qa.bits_per_weight >= bits


@settings(max_examples=15, deadline=None)
@given(ic=st.sampled_from([32, 64, 100]), oc=st.sampled_from([16, 48]), bits=st.sampled_from([2, 3, 4, 5, 6, 8]),
       layout=st.sampled_from(LAYOUTS), sym=st.booleans(), perm=st.booleans(), seed=st.integers(0, 999))
def test_dequantize_invariant(ic, oc, bits, layout, sym, perm, seed):
  group_axis, group_size = layout
  qa, codes, scale, zero, p = make(ic, oc, bits, group_axis, group_size, sym, perm=perm, seed=seed)
  gi, go = qa.group_shape
  s = expand(scale.astype(np.float16).astype(np.float32), gi, go, ic, oc)
  z = 2.0 ** (bits - 1) if sym else expand(zero, gi, go, ic, oc)
  np.testing.assert_array_equal(np.asarray(qa.zero_points()), 2.0 ** (bits - 1) if sym else zero)
  expect_stored = (codes - z) * s  # invariant on the stored (act-order) rows: w[perm] ≈ (code - z) * s
  w = np.asarray(qa.dequantize())
  w_stored = w if p is None else w[p]
  np.testing.assert_allclose(w_stored, expect_stored, rtol=1e-6, atol=0)
  c = np.asarray(qa.codes())
  np.testing.assert_array_equal(c if p is None else c[p], codes)


@settings(max_examples=10, deadline=None)
@given(layout=st.sampled_from(LAYOUTS), bits=st.sampled_from([2, 3, 4, 8]), seed=st.integers(0, 999))
def test_quantize_with_params_error_within_half_step(layout, bits, seed):
  group_axis, group_size = layout
  w = np.random.default_rng(seed).normal(size=(64, 48)).astype(np.float32)
  gi, go = affine.group_shape(w.shape, group_size, group_axis)
  n_gi, n_go = affine.scale_shape(w.shape, group_size, group_axis)
  # NaN-pad a short last group: nanmin / nanmax see only its real rows.
  g = np.pad(w, ((0, n_gi * gi - 64), (0, 0)), constant_values=np.nan).reshape(n_gi, gi, n_go, go)
  lo, hi = np.minimum(np.nanmin(g, (1, 3)), 0), np.maximum(np.nanmax(g, (1, 3)), 0)
  scale = (hi - lo) / (2**bits - 1)
  zero = np.round(-lo / affine.round_scale(jnp.asarray(scale), jnp.float32))
  qa = affine.quantize_with_params(jnp.asarray(w), jnp.asarray(scale), jnp.asarray(zero), bits=bits,
                                   group_size=group_size, group_axis=group_axis, scale_dtype=jnp.float32)
  step = expand(scale, gi, go, 64, 48)
  assert np.all(np.abs(np.asarray(qa.dequantize()) - w) <= 0.5 * step * (1 + 1e-5) + 1e-7)


def test_jit_eval_shape_and_tree_roundtrip():
  qa, *_ = make(128, 64, 3, "oc", 32, sym=False, perm=True)
  out = jax.jit(lambda q: q.dequantize())(qa)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(qa.dequantize()))
  same = jax.jit(lambda q: q)(qa)
  assert isinstance(same, QArray) and jax.tree.structure(same) == jax.tree.structure(qa)
  shapes = jax.eval_shape(lambda q: q, qa)
  assert shapes.bits_per_weight == qa.bits_per_weight
  leaves, treedef = jax.tree.flatten(qa)
  assert all(isinstance(x, jax.Array) for x in leaves)
  assert jax.tree.unflatten(treedef, leaves).shape == (128, 64)


def test_orbax_roundtrip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  for sym in (False, True):
    qa, *_ = make(64, 32, 3, "ic", 16, sym=sym)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / f"q{sym}", qa)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / f"q{sym}", jax.eval_shape(lambda q: q, qa))
    assert isinstance(restored, QArray) and spec(restored) == spec(qa)
    np.testing.assert_array_equal(np.asarray(restored.dequantize()), np.asarray(qa.dequantize()))


def test_ragged_per_oc_groups_by_hand():
  # IC=10, g=4: rows 0-3, 4-7 and the short group 8-9. Three 3-bit zeros per column take ceil(9/8) = 2 bytes.
  codes = np.arange(10 * 3).reshape(10, 3) % 8
  scale = np.array([[1.0, 2.0, 4.0], [0.5, 0.25, 1.0], [8.0, 1.0, 2.0]], np.float32)
  zero = np.array([[2, 5, 7], [0, 1, 3], [7, 6, 4]])
  qa = affine.from_codes(jnp.asarray(codes), jnp.asarray(scale), jnp.asarray(zero), bits=3, group_size=4,
                         group_axis="oc", dtype=jnp.float32, scale_dtype=jnp.float32)
  assert qa.group_shape == (4, 1) and qa.scale.shape == (3, 3) and qa.zero.shape == (2, 3)  # ceil(3*3/8) bytes
  np.testing.assert_array_equal(np.asarray(qa.zero_points()), zero)
  rows = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(np.asarray(qa.dequantize()), (codes - zero[rows]) * scale[rows])
  # quantize_with_params rounds each row against its own group's parameters.
  w = np.asarray(qa.dequantize()) + 0.1 * scale[rows]
  again = affine.quantize_with_params(jnp.asarray(w), jnp.asarray(scale), jnp.asarray(zero), bits=3, group_size=4,
                                      group_axis="oc", scale_dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(again.codes()), codes)
  # g >= IC is a single group per output channel.
  assert affine.group_shape((10, 3), 16, "oc") == (10, 1) and affine.scale_shape((10, 3), 16, "oc") == (1, 3)


def test_errors():
  codes = jnp.zeros((64, 32), jnp.uint8)
  with pytest.raises(ValueError, match=r"scale has shape \(1, 32\); .*group_size=48 on \(64, 32\) needs \(2, 32\)"):
    affine.from_codes(codes, jnp.ones((1, 32)), None, bits=4, group_size=48, group_axis="oc", dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"group_size=5 does not divide the output-channel axis \(OC=32\); per-IC "
                                       r"groups must tile OC exactly"):
    affine.from_codes(codes, jnp.ones((64, 6)), None, bits=4, group_size=5, group_axis="ic", dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"group_size=64 does not divide the output-channel axis \(OC=32\)"):
    affine.group_shape((64, 32), 64, "ic")  # unlike per-OC, g > OC is not one group
  for bad in (0, -2, 1.5, True):
    with pytest.raises(ValueError, match=r"group_size=.* must be a positive int or -1"):
      affine.group_shape((64, 32), bad, "oc")
  with pytest.raises(ValueError, match=r"zero has shape \(2, 32\); expected \(3, 32\)"):
    affine.from_codes(codes, jnp.ones((3, 32)), jnp.ones((2, 32)), bits=4, group_size=24, group_axis="oc",
                      dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"scale has shape \(2, 32\); .* needs \(3, 32\)"):
    affine.quantize_with_params(jnp.zeros((64, 32)), jnp.ones((2, 32)), None, bits=4, group_size=24,
                                group_axis="oc")
  with pytest.raises(ValueError, match=r"scale has shape \(1, 32\); .* needs \(2, 32\)"):
    affine.from_codes(codes, jnp.ones((1, 32)), None, bits=4, group_size=32, group_axis="oc", dtype=jnp.float32)
  with pytest.raises(ValueError, match="is not a packable code width"):
    affine.from_codes(codes, jnp.ones((2, 32)), None, bits=7, group_size=32, group_axis="oc", dtype=jnp.float32)
  with pytest.raises(ValueError, match="not a scale storage type"):
    affine.from_codes(codes, jnp.ones((2, 32)), None, bits=4, group_size=32, group_axis="oc",
                      dtype=jnp.float32, scale_dtype=jnp.int8)
  with pytest.raises(ValueError, match="group_axis='tensor' takes group_size=-1"):
    affine.group_shape((64, 32), 32, "tensor")


def test_round_scale_keeps_scales_positive_and_finite():
  s = affine.round_scale(jnp.asarray([0.0, 1e-9, 1e-3, 1e6]), jnp.float16)
  assert np.all(np.asarray(s) > 0) and np.all(np.isfinite(np.asarray(s)))
  assert float(s[3]) == float(np.finfo(np.float16).max)
