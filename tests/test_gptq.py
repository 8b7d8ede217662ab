"""GPTQ against a float64 NumPy transcription of the reference, column by column.

``np_gptq`` is written from the paper's algorithm and reference GPTQ's
``fasterquant`` (IST-DASLab/gptq) in the reference layout ``W (OC, IC)``: one
column (input channel) at a time, error fed into *all* later columns at once,
no lazy blocks. Two details of the reference it keeps: per-channel parameters
come from ``W`` before dead columns are zeroed, and dynamic group parameters
are read from ``W`` as of the start of the enclosing ``block_size`` block.
Groups are slices ``W[:, i:i+g]`` as in the reference, so when ``g`` does not
divide IC the last one is simply shorter (dynamic, act-order and static).
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqx.quant import hessian
from lqx.quant.gptq import GPTQConfig, gptq_quantize
from lqx.quant.rtn import RTNConfig, rtn_quantize

jax.config.update("jax_numpy_rank_promotion", "raise")

IC, OC, N = 256, 96, 1024


def np_round_scale(scale, dtype):
  fi = np.finfo(dtype)
  lo = fi.tiny if np.dtype(dtype) == np.float32 else fi.smallest_subnormal
  return np.clip(scale, lo, fi.max).astype(dtype).astype(np.float64)


def np_find_params(x, bits, sym, scale_dtype):
  """Reference ``Quantizer.find_params(x, weight=True)``: one (scale, zero) per row of ``x``."""
  maxq = 2**bits - 1
  xmin, xmax = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
  if sym:
    xmax = np.maximum(np.abs(xmin), xmax)
    xmin = np.where(xmin < 0, -xmax, xmin)
  empty = (xmin == 0) & (xmax == 0)
  xmin, xmax = np.where(empty, -1.0, xmin), np.where(empty, 1.0, xmax)
  scale = np_round_scale((xmax - xmin) / maxq, scale_dtype)
  zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.clip(np.round(-xmin / scale), 0, maxq)
  return scale, zero


def np_gptq(w, h, bits, group_size=128, group_axis="oc", sym=False, act_order=False, static_groups=False,
            damp=0.01, block_size=128, scale_dtype=np.float16, **_):
  """Codes and dequantized weights, both (IC, OC) in our layout."""
  W = np.array(w, np.float64).T.copy()  # reference layout (OC, IC): columns are input channels
  H = np.array(h, np.float64).copy()
  rows, cols = W.shape
  g, maxq = group_size, 2**bits - 1
  fp = lambda x: np_find_params(x, bits, sym, scale_dtype)
  if group_axis == "tensor":
    s, z = fp(W.reshape(1, -1))
    fixed = np.full(rows, s[0]), np.full(rows, z[0])
  elif g == -1:
    fixed = fp(W)
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  if static_groups:
    groups = [fp(W[:, i:i + g]) for i in range(0, cols, g)]
  perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
  W, H = W[:, perm], H[perm][:, perm]
  H += damp * np.mean(np.diag(H)) * np.eye(cols)
  U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper Cholesky factor of H^-1
  codes, Q = np.zeros_like(W), np.zeros_like(W)
  for c in range(cols):
    if c % block_size == 0:
      at_block_start = W.copy()
    if group_axis == "ic":
      go = rows if g == -1 else g
      s, z = (np.repeat(a, go) for a in fp(W[:, c].reshape(rows // go, go)))
    elif group_axis == "tensor" or g == -1:
      s, z = fixed
    elif static_groups:
      s, z = groups[perm[c] // g]
    elif c % g == 0:
      s, z = fp(at_block_start[:, c:c + g])
    q = np.clip(np.round(W[:, c] / s) + z, 0, maxq)
    codes[:, c], Q[:, c] = q, s * (q - z)
    err = (W[:, c] - Q[:, c]) / U[c, c]
    W[:, c:] -= np.outer(err, U[c, c:])
  inv = np.argsort(perm)
  return codes[:, inv].T, Q[:, inv].T


def correlated_inputs(rng, n=N, ic=IC):
  """Activations with correlated channels and channel scales spread over two decades."""
  mix = np.eye(ic) + rng.normal(size=(ic, ic)) * (0.9 ** np.arange(ic) / 4)[None]
  return rng.normal(size=(n, ic)) @ mix.T * rng.lognormal(0, 1, ic)


def np_proxy(w, q, h):
  d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
  return float(np.sum(d * (np.asarray(h, np.float64) @ d)))


@pytest.fixture(scope="module")
def layer():
  rng = np.random.default_rng(0)
  x = correlated_inputs(rng)
  h = (2 / N * x.T @ x).astype(np.float32)
  w = (rng.normal(size=(IC, OC)) * 0.05).astype(np.float32)
  return w, h


F32 = dict(scale_dtype=np.float32)
CASES = {
    "g128": dict(bits=3, **F32),
    "act_order": dict(bits=3, act_order=True, **F32),
    "act_order_static": dict(bits=3, act_order=True, static_groups=True, **F32),
    # g < block and IC % block != 0: the block-start snapshot and the padded last block
    "g32_act_order_block96": dict(bits=3, group_size=32, act_order=True, block_size=96, **F32),
    "per_ic_g32_act_order": dict(bits=3, group_size=32, group_axis="ic", act_order=True, **F32),
    "per_channel_sym_f16": dict(bits=4, group_size=-1, sym=True),
    "per_tensor": dict(bits=4, group_size=-1, group_axis="tensor", **F32),
    "mse_g64_f16": dict(bits=2, group_size=64, mse=True),
}


def run(w, h, **kw):
  qa, info = gptq_quantize(jnp.asarray(w), jnp.asarray(h), GPTQConfig(**kw), name="test")
  return qa, info


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(layer, case):
  w, h = layer
  kw = CASES[case]
  qa, info = run(w, h, **kw)
  if kw.get("mse"):  # the reference transcription has no MSE search: compare to a run without it
    ref_codes, ref_q = np.asarray(qa.codes()), np.asarray(qa.dequantize())
  else:
    ref_codes, ref_q = np_gptq(w, h, **kw)
    assert np.mean(np.asarray(qa.codes()) == ref_codes) >= 0.999
    assert info["proxy_loss"] == pytest.approx(np_proxy(w, ref_q, h), rel=1e-3)
  assert info["proxy_loss"] == pytest.approx(np_proxy(w, qa.dequantize(), h), rel=1e-4)
  assert info["damp"] == pytest.approx(0.01) and info["gptq_loss"] > 0
  rtn = rtn_quantize(jnp.asarray(w), RTNConfig(kw["bits"], kw.get("group_size", 128), kw.get("group_axis", "oc"),
                                               kw.get("sym", False), kw.get("mse", False),
                                               kw.get("scale_dtype", np.float16)))
  assert info["proxy_loss"] < 0.85 * np_proxy(w, rtn.dequantize(), h)
  assert qa.shape == (IC, OC) and qa.scale.dtype == kw.get("scale_dtype", np.float16)
  assert (qa.perm is not None) == (kw.get("act_order", False) and not kw.get("static_groups", False)
                                   and kw.get("group_axis", "oc") == "oc" and kw.get("group_size", 128) != -1)


RAGGED_IC = 200  # not a multiple of 64, 96 or the 128 block: every per-OC group layout below ends short
RAGGED_CASES = {
    "g64": dict(bits=3, group_size=64, **F32),  # 3 x 64 + 8
    "g64_act_order": dict(bits=3, group_size=64, act_order=True, **F32),
    "g64_static": dict(bits=3, group_size=64, static_groups=True, **F32),
    "g64_act_order_static": dict(bits=3, group_size=64, act_order=True, static_groups=True, **F32),
    # 96 + 96 + 8: the last group starts at 192 and its g-row window would pass the padded
    # rows (256), so it is read through a window moved back and masked
    "g96_act_order": dict(bits=4, group_size=96, act_order=True, **F32),
    # g < block, block not dividing g: groups read from the block-start snapshot; 48 x 4 + 8
    "g48_block32_sym_f16": dict(bits=3, group_size=48, block_size=32, sym=True),
    # g > IC: one group per output channel (taken like a dynamic group, after dead rows are zeroed)
    "g256_act_order": dict(bits=3, group_size=256, act_order=True, **F32),
}


@pytest.fixture(scope="module")
def ragged_layer():
  rng = np.random.default_rng(2)
  x = correlated_inputs(rng, ic=RAGGED_IC)
  x[:, [7, 195]] = 0  # dead inputs, one in the short last group
  h = (2 / N * x.T @ x).astype(np.float32)
  w = (rng.normal(size=(RAGGED_IC, OC)) * 0.05).astype(np.float32)
  return w, h


@pytest.mark.parametrize("case", list(RAGGED_CASES))
def test_ragged_last_group_matches_reference(ragged_layer, case):
  w, h = ragged_layer
  kw = RAGGED_CASES[case]
  qa, info = run(w, h, **kw)
  ref_codes, ref_q = np_gptq(w, h, **kw)
  g = kw["group_size"]
  assert qa.scale.shape == (-(-RAGGED_IC // g), OC) and qa.group_size == g
  assert np.mean(np.asarray(qa.codes()) == ref_codes) >= 0.999
  assert info["proxy_loss"] == pytest.approx(np_proxy(w, ref_q, h), rel=1e-3)
  assert info["proxy_loss"] == pytest.approx(np_proxy(w, qa.dequantize(), h), rel=1e-4)
  rtn = rtn_quantize(jnp.asarray(w), RTNConfig(kw["bits"], g, "oc", kw.get("sym", False),
                                               scale_dtype=kw.get("scale_dtype", np.float16)))
  assert info["proxy_loss"] < 0.85 * np_proxy(w, rtn.dequantize(), h)
  assert (qa.perm is not None) == (kw.get("act_order", False) and not kw.get("static_groups", False))


def test_ragged_mse_never_reads_other_rows(ragged_layer):
  # The MSE search over the short last group sees only its rows: scaling every other row by 100
  # leaves its parameters unchanged when the Hessian couples nothing (H = I: GPTQ is RTN).
  w, _ = ragged_layer
  eye = np.eye(RAGGED_IC, dtype=np.float32)
  cfg = dict(bits=2, group_size=64, mse=True, **F32)
  a, _ = run(w, eye, **cfg)
  w2 = w.copy()
  w2[:192] *= 100
  b, _ = run(w2, eye, **cfg)
  np.testing.assert_array_equal(np.asarray(a.scale[3]), np.asarray(b.scale[3]))
  np.testing.assert_array_equal(np.asarray(a.codes())[192:], np.asarray(b.codes())[192:])
  rtn = rtn_quantize(jnp.asarray(w), RTNConfig(2, 64, mse=True, scale_dtype=np.float32))
  np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(rtn.scale))


def test_invariant_to_hessian_scale(layer):
  # Reference H is ours times tokens per sequence; damping is relative, so codes agree.
  w, h = layer
  a, _ = run(w, h, **CASES["g128"])
  b, _ = run(w, 7.0 * h, **CASES["g128"])
  assert np.mean(np.asarray(a.codes()) == np.asarray(b.codes())) >= 0.999


def test_dead_inputs_and_rank_deficient_hessian(layer):
  w, _ = layer
  rng = np.random.default_rng(1)
  x = correlated_inputs(rng, n=64)  # 64 tokens < 256 channels: H has rank <= 64
  dead = rng.choice(IC, 10, replace=False)
  x[:, dead] = 0
  h = (2 / 64 * x.T @ x).astype(np.float32)
  qa, info = run(w, h, **CASES["g128"])
  ref_codes, ref_q = np_gptq(w, h, **CASES["g128"])
  assert np.mean(np.asarray(qa.codes()) == ref_codes) >= 0.999
  assert np.all(np.asarray(qa.dequantize())[dead] == 0)  # dead rows are zeroed, then quantized exactly
  assert np.isfinite(info["proxy_loss"]) and info["proxy_loss"] == pytest.approx(np_proxy(w, ref_q, h), rel=1e-3)


def test_all_zero_hessian(layer):
  w, _ = layer
  qa, info = run(w, np.zeros((IC, IC), np.float32), **CASES["g128"])
  assert np.all(np.asarray(qa.dequantize()) == 0) and info["proxy_loss"] == 0


def test_damping_retries_then_clear_error(layer):
  w, _ = layer
  ones = np.ones((IC, IC), np.float32)
  eye = np.eye(IC, dtype=np.float32)
  # Eigenvalues -4 (and 5*IC-4): PD only once the damping reaches 10 * mean(diag H) = 10.
  _, info = run(w, eye + 5 * (ones - eye), **CASES["g128"])
  assert info["damp"] == pytest.approx(10.0) and info["damp_abs"] == pytest.approx(10.0)
  with pytest.raises(ValueError, match=r"GPTQ on layer 'layers_3/mlp/up_proj': H is not positive definite even "
                                       r"with damping 10 \* mean\(diag H\)"):
    gptq_quantize(jnp.asarray(w), jnp.asarray(eye + 50 * (ones - eye)), GPTQConfig(**CASES["g128"]),
                  name="layers_3/mlp/up_proj")


def test_errors(layer):
  w, h = layer
  cfg = GPTQConfig(bits=3)
  with pytest.raises(ValueError, match=r"H of layer 'q' has shape \(96, 96\); w \(256, 96\) needs \(256, 256\)"):
    gptq_quantize(jnp.asarray(w), jnp.asarray(h[:96, :96]), cfg, name="q")
  with pytest.raises(ValueError, match="H of layer 'q' has NaN/Inf"):
    gptq_quantize(jnp.asarray(w), jnp.asarray(h).at[0, 1].set(jnp.nan), cfg, name="q")
  with pytest.raises(ValueError, match=r"w of layer 'q' \(256, 96\) has 1 NaN/Inf"):
    gptq_quantize(jnp.asarray(w).at[0, 1].set(jnp.inf), jnp.asarray(h), cfg, name="q")
  with pytest.raises(ValueError, match=r"w of layer 'q'.*group_size=64 does not divide the output-channel axis "
                                       r"\(OC=96\); per-IC groups must tile OC exactly"):
    gptq_quantize(jnp.asarray(w), jnp.asarray(h), GPTQConfig(bits=3, group_size=64, group_axis="ic"), name="q")
  with pytest.raises(ValueError, match=r"group_size=0 must be a positive int or -1"):
    GPTQConfig(bits=3, group_size=0)
  with pytest.raises(ValueError, match="static_groups applies to per-OC groups"):
    GPTQConfig(bits=3, group_axis="ic", static_groups=True)
  with pytest.raises(ValueError, match="damp=0 must be > 0"):
    GPTQConfig(bits=3, damp=0)
  with pytest.raises(ValueError, match="bits=7 is not a packable code width"):
    GPTQConfig(bits=7)


def output_error(x, w, qa):
  return float(np.linalg.norm(x @ w - x @ np.asarray(qa.dequantize(), np.float64)))


def test_per_ic_wins_on_activation_outliers():
  # Eight input channels carry 50x activations and 1/50x weights (same function, as after a
  # norm with large gains). Per-OC groups lump those tiny weights with normal ones and round
  # them to zero; per-IC groups give each such input channel its own scales.
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(2048, IC)) @ (np.eye(IC) + rng.normal(size=(IC, IC)) / 160)
  w0 = rng.normal(size=(IC, OC)) * 0.05
  s = np.ones(IC)
  s[rng.choice(IC, 8, replace=False)] = 50
  x, w = x0 * s, w0 / s[:, None]
  h = (2 / 2048 * x.T @ x).astype(np.float32)
  per_oc, _ = run(w.astype(np.float32), h, **CASES["g32_act_order_block96"])
  per_ic, _ = run(w.astype(np.float32), h, **CASES["per_ic_g32_act_order"])
  assert output_error(x, w, per_ic) < 0.85 * output_error(x, w, per_oc)


def test_per_oc_wins_on_weight_outliers_along_output_channels():
  # One output channel per 32-wide OC group has 8x weights: every per-IC group's range is
  # set by it, crushing the other 31 weights; per-OC groups isolate it.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2048, IC)) @ (np.eye(IC) + rng.normal(size=(IC, IC)) / 160)
  w = rng.normal(size=(IC, OC)) * 0.05
  w[:, [rng.integers(32 * k, 32 * k + 32) for k in range(OC // 32)]] *= 8
  h = (2 / 2048 * x.T @ x).astype(np.float32)
  per_oc, _ = run(w.astype(np.float32), h, **CASES["g32_act_order_block96"])
  per_ic, _ = run(w.astype(np.float32), h, **CASES["per_ic_g32_act_order"])
  assert output_error(x, w, per_oc) < 0.85 * output_error(x, w, per_ic)


def test_hessian_streaming():
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(3, 5, 16)).astype(np.float32), rng.normal(size=(7, 16)).astype(np.float32)]
  state = hessian.init(16)
  update = jax.jit(hessian.update)
  for x in xs:
    state = update(state, jnp.asarray(x))
  flat = np.concatenate([x.reshape(-1, 16) for x in xs]).astype(np.float64)
  assert int(state.count) == 22
  np.testing.assert_allclose(np.asarray(hessian.finalize(state)), 2 / 22 * flat.T @ flat, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(hessian.finalize(hessian.init(4))), np.zeros((4, 4)))
  with pytest.raises(ValueError, match="x has 8 features on its last axis; the state has IC=16"):
    hessian.update(state, jnp.ones((2, 8)))


SHARDED = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lqx.quant.gptq import GPTQConfig, gptq_quantize
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 256)) @ (np.eye(256) + rng.normal(size=(256, 256)) / 16)
    h = jnp.asarray(2 / 512 * x.T @ x, jnp.float32)
    w = jnp.asarray(rng.normal(size=(256, 96)) * 0.05, jnp.float32)
    oc = NamedSharding(Mesh(np.array(jax.devices()), ("oc",)), P(None, "oc"))
    for cfg in [GPTQConfig(bits=3, group_size=32, act_order=True), GPTQConfig(bits=4, group_size=12, group_axis="ic")]:
      ref, ref_info = gptq_quantize(w, h, cfg)
      out, info = gptq_quantize(jax.device_put(w, oc), h, cfg)
      assert out.packed.sharding.spec == P(None, "oc"), out.packed.sharding
      for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert abs(info["proxy_loss"] - ref_info["proxy_loss"]) <= 1e-5 * ref_info["proxy_loss"]
    print("SHARDED_OK")
""")


def test_sharded_over_output_channels_matches_unsharded():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run([sys.executable, "-c", SHARDED], env=env, cwd=root, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0 and "SHARDED_OK" in res.stdout, res.stderr[-3000:]


def test_blocked_cholesky():
  from lqx.quant.gptq import cholesky
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 200))
  a = x.T @ x / 400 + 0.1 * np.eye(200)  # 200 is not a multiple of the 128 block
  np.testing.assert_allclose(np.asarray(cholesky(jnp.asarray(a, jnp.float32))), np.linalg.cholesky(a),
                             rtol=0, atol=2e-5)
  a[150, 150] = -1.0  # not positive definite: NaN, never a silently wrong factor
  assert np.isnan(np.asarray(cholesky(jnp.asarray(a, jnp.float32)))).any()


@pytest.mark.parametrize("n", [96, 128, 200])  # one block (XLA once aborted on reversals here), exact, ragged
def test_inverse_cholesky_factor(n):
  from lqx.quant.gptq import inv_chol_upper, inv_lower
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2 * n, n))
  h = x.T @ x / (2 * n)
  l = np.linalg.cholesky(h)
  np.testing.assert_allclose(np.asarray(inv_lower(jnp.asarray(l, jnp.float32))), np.linalg.inv(l), atol=2e-4)
  u, rel, ok = jax.jit(lambda h: inv_chol_upper(h, 0.01, 3))(jnp.asarray(h, jnp.float32))
  hd = h + 0.01 * np.mean(np.diag(h)) * np.eye(n)
  assert bool(ok) and float(rel) == pytest.approx(0.01)
  np.testing.assert_allclose(np.triu(np.asarray(u)), np.asarray(u))  # upper triangular
  np.testing.assert_allclose(np.asarray(u).T @ np.asarray(u), np.linalg.inv(hd), atol=2e-4 * np.abs(np.linalg.inv(hd)).max())


def test_shared_solve_equals_separate_solves(layer):
  # q/k/v (or gate/up) read one input: solved side by side along OC they get the codes of their own solves.
  from lqx.quant.gptq import gptq_quantize_shared
  w, h = layer
  parts = [jnp.asarray(w[:, :40]), jnp.asarray(w[:, 40:64]), jnp.asarray(w[:, 64:])]
  for cfg in (GPTQConfig(bits=3, group_size=64), GPTQConfig(bits=4, group_size=-1, act_order=True, sym=True),
              GPTQConfig(bits=3, group_size=48, static_groups=True, act_order=True)):
    shared = gptq_quantize_shared(parts, jnp.asarray(h), cfg, names=["q", "k", "v"])
    for part, (qa, info) in zip(parts, shared):
      alone, info1 = gptq_quantize(part, jnp.asarray(h), cfg)
      np.testing.assert_array_equal(np.asarray(qa.codes()), np.asarray(alone.codes()))
      np.testing.assert_array_equal(np.asarray(qa.dequantize()), np.asarray(alone.dequantize()))
      assert info["proxy_loss"] == pytest.approx(info1["proxy_loss"], rel=1e-5)
  per_ic = GPTQConfig(bits=3, group_size=8, group_axis="ic")  # couples output channels: solved one by one
  shared = gptq_quantize_shared(parts[1:], jnp.asarray(h), per_ic)
  np.testing.assert_array_equal(np.asarray(shared[0][0].codes()),
                                np.asarray(gptq_quantize(parts[1], jnp.asarray(h), per_ic)[0].codes()))
