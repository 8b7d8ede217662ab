"""SqueezeLLM (lqx.quant.squeezellm) and the Fisher statistics path through lqx.quantize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lqx
from lqx import quant, tree
from lqx.formats.codebook import Codebook
from lqx.formats.sparse import Sparse
from lqx.models import llama
from lqx.quant import fisher as fisher_lib
from lqx.quant import kmeans

CONFIG = llama.LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)


@pytest.fixture(scope="module")
def kernel():
  k1, k2 = jax.random.split(jax.random.key(0))
  w = jax.random.t(k1, 3.0, (128, 48)) / 10  # heavy tails, as real weights
  f = jnp.exp(2 * jax.random.normal(k2, (128, 48)))  # Fisher spans decades
  return w, f


def test_dense_tables_are_the_weighted_kmeans_of_each_output_channel(kernel):
  w, f = kernel
  q, info = quant.make("squeezellm", bits=3).quantize(w, {"fisher": f})
  assert isinstance(q, Codebook) and q.table.shape == (48, 8) and q.table.dtype == jnp.float16
  c, _ = kmeans.weighted_kmeans_1d(w.T, f.T, 8, key=jax.random.key(0))
  np.testing.assert_array_equal(q.table, c.astype(jnp.float16))
  # Every weight takes its nearest stored entry, so the weighted error is the k-means objective.
  deq = np.asarray(q.dequantize(), np.float64)
  dist = np.abs(np.asarray(w)[:, :, None] - np.asarray(q.table, np.float64)[None])
  np.testing.assert_allclose(np.abs(deq - np.asarray(w)), dist.min(-1), atol=1e-7)
  assert info["fisher_error"] == pytest.approx(float(jnp.sum(f * (w - q.dequantize()) ** 2)), rel=1e-5)
  assert info["sparse"] == 0
  assert q.bits_per_weight == 3 + 8 * 16 / 128  # codes + one float16 table per output channel


def test_weighting_moves_the_error_off_sensitive_weights(kernel):
  """Fisher weights lower the Fisher-weighted error below unweighted k-means' (same tables format)."""
  w, f = kernel
  q_w, _ = quant.make("squeezellm", bits=3).quantize(w, {"fisher": f})
  q_u, _ = quant.make("squeezellm", bits=3).quantize(w, {"fisher": jnp.ones_like(f)})
  err = lambda q: float(jnp.sum(f * (w - q.dequantize()) ** 2))  # noqa: E731
  assert err(q_w) < 0.9 * err(q_u)


def test_dense_and_sparse(kernel):
  w, f = kernel
  m = quant.make("squeezellm", bits=3, sensitive_frac=0.005, outlier_frac=0.02, value_dtype=jnp.float32)
  q, info = m.quantize(w, {"fisher": f})
  assert isinstance(q, Sparse) and isinstance(q.base, Codebook) and m.name == "squeezellm-s2.5"
  k = round(0.025 * w.size)
  assert q.index.shape == (k,) and k - 1 <= info["sparse"] <= k
  idx = np.asarray(q.index)[np.asarray(q.index) < w.size]
  got, want = np.asarray(q.dequantize()).reshape(-1)[idx], np.asarray(w).reshape(-1)[idx]
  d = want - np.asarray(q.base.dequantize()).reshape(-1)[idx]
  # float32 deltas: exact unless w - base is not a float32 (lqx.formats.sparse), then within two roundings.
  assert np.all(np.abs(got - want) <= (np.spacing(np.abs(d)) + np.spacing(np.abs(want))) / 2)
  assert np.mean(got == want) > 0.9
  # The kept weights got zero weight in k-means: the dense part's weighted error ignores them.
  dense, _ = quant.make("squeezellm", bits=3).quantize(w, {"fisher": f})
  assert info["fisher_error"] < float(jnp.sum(f * (w - dense.dequantize()) ** 2))
  assert q.stored_bits == q.base.stored_bits + k * (32 + 32)


@pytest.mark.parametrize("stats, match", [
    ({}, "needs stats\\['fisher'\\]"),
    ({"fisher": jnp.ones((4, 4))}, "has shape \\(4, 4\\); the kernel is \\(128, 48\\)"),
    ({"fisher": -jnp.ones((128, 48))}, "finite and non-negative"),
])
def test_bad_fisher_is_named(kernel, stats, match):
  with pytest.raises(ValueError, match=match):
    quant.make("squeezellm", bits=3).quantize(kernel[0], stats, name="layers_0/mlp/up_proj/kernel")


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 1}, "bits must be an int in 2..8"), ({"bits": 3, "outlier_frac": 0.7}, "outlier_frac"),
    ({"bits": 3, "sensitive_frac": -0.1}, "sensitive_frac")])
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    quant.make("squeezellm", **kwargs)


def test_quantize_with_saved_fisher_needs_no_calibration_tokens(tmp_path):
  """A Fisher computed once (and cached) serves later runs; SqueezeLLM alone needs no forward."""
  params = llama.init_params(CONFIG, jax.random.key(1))
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (3, 16), 0, CONFIG.vocab_size), np.int32)
  method = quant.make("squeezellm", bits=3)
  q1, rep1 = lqx.quantize(CONFIG, params, lqx.default_recipe(method), tokens, progress=False)
  f = fisher_lib.llama_fisher(CONFIG, params, tokens, progress=False)
  fisher_lib.save_fisher(tmp_path / "f.npz", f)
  q2, rep2 = lqx.quantize(CONFIG, params, lqx.default_recipe(method), None,
                          fisher=fisher_lib.load_fisher(tmp_path / "f.npz"), progress=False)
  for a, b in zip(jax.tree.leaves(q1), jax.tree.leaves(q2)):
    np.testing.assert_array_equal(a, b)
  assert rep1.timings["fisher"] > 0 and len(rep2.layers) == 14
  assert {l.error_kind for l in rep2.layers} == {"weight"} and all(l.fisher_error is not None for l in rep2.layers)


def test_fisher_errors_are_named():
  params = llama.init_params(CONFIG, jax.random.key(1))
  recipe = lqx.default_recipe(quant.make("squeezellm", bits=3))
  with pytest.raises(ValueError, match="need calibration_tokens"):
    lqx.quantize(CONFIG, params, recipe, None, progress=False)
  f = {p: jnp.ones(tree.get(params, p).shape) for p in lqx.recipe.match(recipe, params)}
  bad = dict(f, **{"layers_1/mlp/down_proj/kernel": jnp.ones((3, 3))})
  with pytest.raises(ValueError, match=r"fisher\['layers_1/mlp/down_proj/kernel'\] has shape \(3, 3\)"):
    lqx.quantize(CONFIG, params, recipe, None, fisher=bad, progress=False)
  f.pop("layers_0/attn/q_proj/kernel")
  with pytest.raises(ValueError, match="fisher has no entry for layers_0/attn/q_proj/kernel"):
    lqx.quantize(CONFIG, params, recipe, None, fisher=f, progress=False)


def test_mixed_recipe_keeps_sequential_calibration():
  """With GPTQ in the recipe, SqueezeLLM kernels are quantized inside the block loop (later
  blocks see them quantized) and get output errors; the Fisher reaches them there."""
  params = llama.init_params(CONFIG, jax.random.key(1))
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (4, 16), 0, CONFIG.vocab_size), np.int32)
  rules = (lqx.Rule(r"layers_\d+/mlp/.*", quant.make("squeezellm", bits=4)),
           lqx.Rule(r"layers_\d+/attn/.*", quant.make("gptq", bits=4, group_size=32)))
  q, rep = lqx.quantize(CONFIG, params, rules, tokens, progress=False)
  kinds = {l.name: (l.method, l.error_kind) for l in rep.layers}
  assert kinds["layers_1/mlp/up_proj/kernel"] == ("squeezellm", "output")
  assert kinds["layers_1/attn/q_proj/kernel"] == ("gptq", "output")
  assert isinstance(tree.get(q, "layers_0/mlp/gate_proj/kernel"), Codebook)
