"""Calibration of any model through ``lqx.calibrate.Units``: LLaMA, a user's NNX and Linen models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import lqx
from lqx import adapters, calibrate, tree
from lqx.layers import QDense, load_quantized
from lqx.models import llama

W3 = lqx.GPTQConfig(bits=3, group_size=16)
R3 = lqx.RTNConfig(bits=3, group_size=16)


def features(key, n, d=32):
  """Inputs with correlated features (one fixed low-rank mix plus noise), as activations are."""
  k2, k3 = jax.random.split(key)
  mix = jax.random.normal(jax.random.key(42), (8, d))
  return jax.random.normal(k2, (n, 8)) @ mix + 0.1 * jax.random.normal(k3, (n, d))


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(32, 64, rngs=rngs)
    self.hidden = nnx.List([nnx.Linear(64, 64, rngs=rngs)])
    self.out = nnx.Linear(64, 16, use_bias=False, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.gelu(self.fc1(x))
    for layer in self.hidden:
      x = jax.nn.gelu(layer(x))
    return self.out(x)


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jax.nn.gelu(QDense(64, name="fc1")(x))
    x = jax.nn.gelu(QDense(64, name="fc2")(x))
    return QDense(16, use_bias=False, name="out")(x)


def output_error(y, ref):
  return float(jnp.sum((y - ref) ** 2) / jnp.sum(ref ** 2))


def test_nnx_model_gptq_beats_rtn_through_the_public_api():
  model = MLP(nnx.Rngs(0))
  x_cal, x_test = features(jax.random.key(1), 512), features(jax.random.key(2), 256)
  ref = model(x_test)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rules = [lqx.Rule(r".*kernel", W3)]
  q_gptq, rep = lqx.quantize(adapters.nnx_units(model), params, rules, x_cal, progress=False)
  q_rtn, _ = lqx.quantize(None, params, [lqx.Rule(r".*kernel", R3)], progress=False)
  assert [l.name for l in rep.layers] == ["fc1/kernel", "hidden/0/kernel", "out/kernel"]  # call order
  assert all(l.error_kind == "output" and l.method == "gptq" for l in rep.layers)
  errs = {}
  for label, qp in (("gptq", q_gptq), ("rtn", q_rtn)):
    m = nnx.clone(model)
    load_quantized(m, qp)
    errs[label] = output_error(nnx.jit(lambda m, x: m(x))(m, x_test), ref)
  assert errs["gptq"] < 0.8 * errs["rtn"], errs
  assert isinstance(tree.get(params, "fc1/kernel"), jax.Array)  # the input tree is untouched


def test_linen_model_gptq_beats_rtn_through_the_public_api():
  module = LinenMLP()
  x_cal, x_test = features(jax.random.key(3), 512), features(jax.random.key(4), 256)
  params = module.init(jax.random.key(0), x_cal[:1])["params"]
  ref = module.apply({"params": params}, x_test)
  q_gptq, rep = lqx.quantize(adapters.linen_units(module), params, [lqx.Rule(r".*kernel", W3)], x_cal,
                             progress=False)
  q_rtn, _ = lqx.quantize(None, params, [lqx.Rule(r".*kernel", R3)], progress=False)
  assert [l.name for l in rep.layers] == ["fc1/kernel", "fc2/kernel", "out/kernel"]
  apply = jax.jit(module.apply)
  e_gptq = output_error(apply({"params": q_gptq}, x_test), ref)
  e_rtn = output_error(apply({"params": q_rtn}, x_test), ref)
  assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_true_sequential_sees_earlier_linears_quantized():
  """Linear k's Hessian is taken with linears < k quantized (true-sequential) or all float."""
  module = LinenMLP()
  x = features(jax.random.key(5), 64)
  params = module.init(jax.random.key(0), x[:1])["params"]
  units = adapters.linen_units(module)
  seen = {}
  real = lqx.GPTQConfig.quantize

  def spy(self, w, stats, *, name=None, **kw):
    seen[name] = stats["hessian"]
    return real(self, w, stats, name=name, **kw)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(lqx.GPTQConfig, "quantize", spy)
    q, _ = calibrate.quantize_units(units, params, {"fc1/kernel": W3, "fc2/kernel": W3}, [x], progress=False)
    h_seq = dict(seen)
    calibrate.quantize_units(units, params, {"fc1/kernel": W3, "fc2/kernel": W3}, [x], true_sequential=False,
                             progress=False)
  fc1_out = jax.nn.gelu(x @ tree.get(q, "fc1/kernel").dequantize() + params["fc1"]["bias"][None])
  fc1_float = jax.nn.gelu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"][None])
  for h, inp in ((h_seq["fc2/kernel"], fc1_out), (seen["fc2/kernel"], fc1_float)):
    np.testing.assert_allclose(h, 2 / len(inp) * inp.T @ inp, rtol=1e-4, atol=1e-5)


def test_capture_gives_float_model_hessians():
  model = MLP(nnx.Rngs(0))
  x = features(jax.random.key(6), 128)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  stats = calibrate.capture(adapters.nnx_units(model), params, [x[:64], x[64:]])
  assert list(stats) == ["fc1/kernel", "hidden/0/kernel", "out/kernel"]
  np.testing.assert_allclose(stats["fc1/kernel"]["hessian"], 2 / 128 * x.T @ x, rtol=1e-4, atol=1e-5)
  h1 = jax.nn.gelu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"][None])
  np.testing.assert_allclose(stats["hidden/0/kernel"]["hessian"], 2 / 128 * h1.T @ h1, rtol=1e-4, atol=1e-5)


def test_llama_units_match_the_decoder_pipeline():
  """The generic engine on ``llama.units`` equals ``quantize_sequential``'s reference pipeline."""
  config = llama.LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)
  params = llama.init_params(config, jax.random.key(0))
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (4, 32), 0, config.vocab_size), np.int32)
  method = lqx.GPTQConfig(bits=3, group_size=32)
  rules = lqx.default_recipe(method)
  q_dec, rep_dec = lqx.quantize(config, params, rules, tokens, true_sequential=False, progress=False)
  targets = {l.name: method for l in rep_dec.layers}
  q_gen, layers_gen = calibrate.quantize_units(llama.units(config), params, targets, [jnp.asarray(tokens)],
                                            true_sequential=False, progress=False)
  assert [l.name for l in layers_gen] == [l.name for l in rep_dec.layers]
  for a, b in zip(rep_dec.layers, layers_gen):
    same = np.mean(np.asarray(tree.get(q_dec, a.name).codes()) == np.asarray(tree.get(q_gen, b.name).codes()))
    assert same >= 0.999, (a.name, same)
    np.testing.assert_allclose(a.error, b.error, rtol=1e-3, err_msg=a.name)


def test_unreported_linear_is_a_clear_error():
  module = LinenMLP()
  x = features(jax.random.key(7), 16)
  params = module.init(jax.random.key(0), x[:1])["params"]
  params = {**params, "extra": {"kernel": jnp.ones((32, 16))}}
  with pytest.raises(ValueError, match="extra/kernel: matched by the recipe, but unit '' did not report"):
    lqx.quantize(adapters.linen_units(module), params, [lqx.Rule(r".*kernel", W3)], x, progress=False)
  with pytest.raises(ValueError, match="need the model to calibrate"):
    lqx.quantize(None, params, [lqx.Rule(r".*kernel", W3)], x, progress=False)
