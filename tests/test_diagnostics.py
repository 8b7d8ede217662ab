"""Top singular values, spectra, sublayer gains and the coordinate check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqx import diagnostics
from lqx.models import llama
from lqx.optim import mup


def random_matrix(m, n, seed=0):
  return jax.random.normal(jax.random.key(seed), (m, n))


def low_rank_matrix(m, n, rank, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (m, rank)) @ jax.random.normal(k2, (rank, n))


@pytest.mark.parametrize("w", [random_matrix(64, 48), random_matrix(200, 100, 1), random_matrix(30, 300, 2),
                               low_rank_matrix(128, 96, 3), low_rank_matrix(50, 70, 1, 3)],
                         ids=["rand64x48", "rand200x100", "rand30x300", "rank3", "rank1"])
def test_power_iteration_matches_spectral_norm(w):
  sigma, v = diagnostics.top_singular_value(w)
  want = float(jnp.linalg.norm(w, 2))
  assert float(sigma) == pytest.approx(want, rel=1e-3)
  assert float(sigma) <= want * (1 + 1e-5)
  assert float(jnp.linalg.norm(v)) == pytest.approx(1.0, rel=1e-5)


def test_power_iteration_warm_start():
  w = random_matrix(96, 64)
  _, v = diagnostics.top_singular_value(w, iters=200)
  w2 = w + 0.01 * random_matrix(96, 64, 5)  # one "training step" later
  sigma, _ = diagnostics.top_singular_value(w2, v, iters=5)
  assert float(sigma) == pytest.approx(float(jnp.linalg.norm(w2, 2)), rel=1e-3)
  with pytest.raises(ValueError, match=r"v0 must have shape \(64,\)"):
    diagnostics.top_singular_value(w, jnp.ones(96))


def test_top_singular_values_of_a_model():
  base = llama.LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32,
                           tie_embeddings=False)
  params = mup.init_params(mup.mup_config(base, base), jax.random.key(0), readout="scaled")
  sig, state = diagnostics.top_singular_values(params)
  assert set(sig) == {"embed/embedding", "lm_head/kernel", "layers_0/attn/q_proj/kernel",
                      "layers_0/attn/k_proj/kernel", "layers_0/attn/v_proj/kernel",
                      "layers_0/attn/o_proj/kernel", "layers_0/mlp/gate_proj/kernel",
                      "layers_0/mlp/up_proj/kernel", "layers_0/mlp/down_proj/kernel"}
  mats = diagnostics.matrix_params(params)
  for k, s in sig.items():
    assert float(s) == pytest.approx(float(jnp.linalg.norm(mats[k], 2)), rel=1e-3), k
  sig2, _ = diagnostics.top_singular_values(params, state, iters=3)  # warm start
  for k in sig:
    assert float(sig2[k]) == pytest.approx(float(sig[k]), rel=1e-4)
  with pytest.raises(ValueError, match="state has paths"):
    diagnostics.top_singular_values(params, {"x": jnp.ones(3)})


def test_spectra_and_shapes():
  w = random_matrix(40, 20)
  s = diagnostics.singular_values(w)
  np.testing.assert_allclose(s, np.linalg.svd(np.asarray(w, np.float64), compute_uv=False), rtol=1e-5)
  with pytest.raises(ValueError, match="too large for a full SVD"):
    diagnostics.singular_values(w, max_dim=10)
  assert set(diagnostics.spectra({"a": w, "b": jnp.ones(3), "c": random_matrix(400, 300)},
                                 max_dim=256)) == {"a"}
  shape = diagnostics.spectrum_shape(s, 16)
  assert shape[0] == 1.0 and np.all(np.diff(shape) <= 0)
  # Gaussian matrices of one aspect ratio share a spectrum shape (Marchenko-Pastur).
  cmp = diagnostics.compare_spectrum_shapes({64: diagnostics.singular_values(random_matrix(128, 64, 1)),
                                             256: diagnostics.singular_values(random_matrix(512, 256, 2))})
  assert cmp["max_abs_diff"][64] == 0.0 and cmp["max_abs_diff"][256] < 0.1


def test_sublayer_gains():
  c = llama.LlamaConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=32,
                        tie_embeddings=False)
  params = mup.init_params(c, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
  gains = {k: float(v) for k, v in diagnostics.sublayer_gains(c, params, tokens).items()}
  assert set(gains) == {f"layers_{i}{s}" for i in range(2) for s in ("", "/attn", "/mlp")}
  assert all(g > 0 for g in gains.values())
  # A zero o_proj silences attention: its gain is 0 and the block's gain comes from the MLP.
  o_proj = params["layers_0"]["attn"]["o_proj"]
  o_proj["kernel"] = jnp.zeros_like(o_proj["kernel"])
  gains0 = diagnostics.sublayer_gains(c, params, tokens)
  assert float(gains0["layers_0/attn"]) == 0.0


def test_coord_check_slopes_and_plot(tmp_path):
  def trajectory(width):  # layer "a" grows like sqrt(width), "b" is flat
    key = jax.random.key(width)
    return [{"a": jnp.sqrt(width) * (1 + s) * jnp.ones((4, width)), "b": jax.random.normal(key, (64, width))}
            for s in range(3)]

  res = diagnostics.coord_check([16, 64, 256], trajectory)
  assert res["layers"] == ["a", "b"] and np.shape(res["rms"]) == (3, 3, 2)
  slopes = np.asarray(res["slopes"])
  np.testing.assert_allclose(slopes[:, 0], 0.5, atol=1e-6)
  assert np.all(np.abs(slopes[:, 1]) < 0.05)
  diagnostics.plot_coord_check(res, tmp_path / "cc.png")
  assert (tmp_path / "cc.png").stat().st_size > 1000


def test_quantized_kernels_count_as_their_matrix():
  """A QArray is diagnosed as the matrix it dequantizes to, not as packed words/scales/zeros."""
  from lqx.quant.rtn import RTNConfig, rtn_quantize
  w = jax.random.normal(jax.random.key(3), (128, 64)) / 8
  q = rtn_quantize(w, RTNConfig(bits=4, group_size=32))
  params = {"dense": {"kernel": q, "bias": jnp.zeros(64)}, "float": {"kernel": w}}
  mats = diagnostics.matrix_params(params)
  assert set(mats) == {"dense/kernel", "float/kernel"}
  np.testing.assert_array_equal(mats["dense/kernel"], q.dequantize())
  tops, _ = diagnostics.top_singular_values(params)
  want = float(np.linalg.svd(np.asarray(q.dequantize()), compute_uv=False)[0])
  np.testing.assert_allclose(float(tops["dense/kernel"]), want, rtol=1e-3)
  assert set(diagnostics.spectra(params)) == {"dense/kernel", "float/kernel"}
