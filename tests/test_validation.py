"""Numbers that never lie: bad token ids, lengths and batch sizes are errors naming the argument,
and float16 scales that would overflow fall back to float32 instead of clipping the weights."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lqx
from lqx import calibrate, data, evaluate, recipe
from lqx.models import llama
from lqx.quant import grid
from lqx.quant.gptq import GPTQConfig, gptq_quantize
from lqx.quant.rtn import RTNConfig, rtn_quantize

CONFIG = llama.LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)


@pytest.fixture(scope="module")
def params():
  return llama.init_params(CONFIG, jax.random.key(0))


def stream(n=256, seed=0):
  return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, n).astype(np.int32)


def windows(n=2, t=16, seed=0):
  return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (n, t)).astype(np.int32)


# ----------------------------------------------------------------------------- the shared checker


def test_check_tokens_accepts_and_converts():
  out = data.check_tokens(np.array([[1, 2, 3]], np.int64), 10, name="x")
  assert out.dtype == np.int32 and out.shape == (1, 3)


@pytest.mark.parametrize("tokens, kw, match", [
    (np.array([[1, 10]]), {}, r"x holds token ids in \[1, 10\].*< vocab_size=10"),
    (np.array([[-1, 2]]), {}, r"x holds token ids in \[-1, 2\].*>= 0"),
    (np.array([[1.0, 2.0]]), {}, "x must hold integer token ids"),
    (np.array([[True, False]]), {}, "x must hold integer token ids"),
    (np.zeros((0, 4), np.int32), {}, r"x is empty .*batch size > 0"),
    (np.zeros((3, 0), np.int32), {}, r"x has sequences of 0 tokens.*>= 2"),
    (np.zeros((3, 1), np.int32), {}, r"x has sequences of 1 tokens.*>= 2"),
    (np.zeros((3, 9), np.int32), {"max_len": 8}, r"x has sequences of 9 tokens.*<= 8 \(config.max_seq_len\)"),
    (np.zeros((3,), np.int32), {"ndim": 2}, r"x must be 2-D"),
    (np.array([], np.float64), {"ndim": 1}, "x is empty"),
])
def test_check_tokens_errors_name_the_argument(tokens, kw, match):
  with pytest.raises(ValueError, match=match):
    data.check_tokens(tokens, 10, name="x", **kw)


@pytest.mark.parametrize("value, match", [(0, "n must be >= 1, got 0"), (-3, "n must be >= 1"),
                                          (2.5, "n must be an int"), (True, "n must be an int"),
                                          (99, r"n must be <= 10 \(limit\), got 99")])
def test_check_count(value, match):
  with pytest.raises(ValueError, match=match):
    data.check_count(value, "n", max_value=10, max_what="limit")


# ----------------------------------------------------------------------------- evaluation


def test_perplexity_runs_on_good_input(params):
  res = evaluate.perplexity(CONFIG, params, stream(), seq_len=16, progress=False)
  assert np.isfinite(res.ppl) and res.windows == 16


@pytest.mark.parametrize("bad, match", [
    (CONFIG.vocab_size, r"tokens holds token ids .*vocab_size=96"),
    (10**6, r"tokens holds token ids .*vocab_size=96"),
    (-1, r"tokens holds token ids in \[-1, .*>= 0"),
])
def test_perplexity_bad_ids(params, bad, match):
  t = stream()
  t[17] = bad
  with pytest.raises(ValueError, match=match):
    evaluate.perplexity(CONFIG, params, t, seq_len=16, progress=False)


@pytest.mark.parametrize("seq_len, match", [(0, "seq_len must be >= 2, got 0"), (1, "seq_len must be >= 2, got 1"),
                                            (33, r"seq_len must be <= 32 \(config.max_seq_len\), got 33")])
def test_perplexity_seq_len(params, seq_len, match):
  with pytest.raises(ValueError, match=match):
    evaluate.perplexity(CONFIG, params, stream(), seq_len=seq_len, progress=False)


@pytest.mark.parametrize("kw, match", [
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"max_tokens": 8}, "max_tokens=8 is less than one window of seq_len=16"),
])
def test_perplexity_counts(params, kw, match):
  with pytest.raises(ValueError, match=match):
    evaluate.perplexity(CONFIG, params, stream(), seq_len=16, progress=False, **kw)


def test_perplexity_short_or_float_stream(params):
  with pytest.raises(ValueError, match="tokens holds 10 tokens, fewer than one window of seq_len=16"):
    evaluate.perplexity(CONFIG, params, stream(10), seq_len=16, progress=False)
  with pytest.raises(ValueError, match="tokens must hold integer token ids"):
    evaluate.perplexity(CONFIG, params, stream().astype(np.float32), seq_len=16, progress=False)
  with pytest.raises(ValueError, match="tokens must be a 1-D stream"):
    evaluate.perplexity(CONFIG, params, windows(), seq_len=16, progress=False)


# ----------------------------------------------------------------------------- generation


def test_generate_checks(params):
  assert llama.generate(CONFIG, params, windows(1, 4), 3).shape == (1, 3)
  prompt = windows(1, 4)
  prompt[0, 1] = CONFIG.vocab_size
  with pytest.raises(ValueError, match=r"prompt holds token ids .*vocab_size=96"):
    llama.generate(CONFIG, params, prompt, 3)
  prompt[0, 1] = -5
  with pytest.raises(ValueError, match=r"prompt holds token ids in \[-5"):
    llama.generate(CONFIG, params, prompt, 3)
  with pytest.raises(ValueError, match=r"prompt has sequences of 30 tokens.*<= 29 \(config.max_seq_len=32 minus"):
    llama.generate(CONFIG, params, windows(1, 30), 3)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
    llama.generate(CONFIG, params, windows(1, 4), 0)
  with pytest.raises(ValueError, match="max_new_tokens must be <= 31"):
    llama.generate(CONFIG, params, windows(1, 4), 40)
  with pytest.raises(ValueError, match=r"prompt is empty .*batch size > 0"):
    llama.generate(CONFIG, params, np.zeros((0, 4), np.int32), 3)
  with pytest.raises(ValueError, match="prompt has sequences of 0 tokens"):
    llama.generate(CONFIG, params, np.zeros((1, 0), np.int32), 3)


# ----------------------------------------------------------------------------- calibration


GPTQ = GPTQConfig(bits=4, group_size=32)


@pytest.mark.parametrize("tokens, match", [
    (np.zeros((2, 0), np.int32), r"calibration_tokens has sequences of 0 tokens"),
    (np.zeros((2, 1), np.int32), r"calibration_tokens has sequences of 1 tokens"),
    (np.zeros((0, 16), np.int32), r"calibration_tokens is empty"),
    (windows(2, 33), r"calibration_tokens has sequences of 33 tokens .*<= 32 \(config.max_seq_len\)"),
    (np.full((2, 16), CONFIG.vocab_size, np.int32), r"calibration_tokens holds token ids .*vocab_size=96"),
    (np.full((2, 16), -1, np.int32), r"calibration_tokens holds token ids in \[-1, -1\]"),
    (windows().astype(np.float32), "calibration_tokens must hold integer token ids"),
    (windows()[0], "calibration_tokens must be 2-D"),
])
def test_quantize_calibration_tokens(params, tokens, match):
  with pytest.raises(ValueError, match=match):
    lqx.quantize(CONFIG, params, lqx.default_recipe(GPTQ), tokens, progress=False)


def test_quantize_batch_size(params):
  with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
    lqx.quantize(CONFIG, params, lqx.default_recipe(GPTQ), windows(), batch_size=0, progress=False)


def test_sequence_length_zero_is_an_error_not_zero_kernels(params):
  targets = recipe.match(lqx.default_recipe(GPTQ), params)
  with pytest.raises(ValueError, match=r"tokens has sequences of 0 tokens"):
    calibrate.quantize_sequential(CONFIG, params, targets, np.zeros((4, 0), np.int32), progress=False)
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    calibrate.quantize_sequential(CONFIG, params, targets, windows(), batch_size=0, progress=False)


def test_units_need_batches(params):
  units = llama.units(CONFIG)
  targets = recipe.match(lqx.default_recipe(GPTQ), params)
  with pytest.raises(ValueError, match="batches is empty"):
    calibrate.quantize_units(units, params, targets, [], progress=False)
  with pytest.raises(ValueError, match="batches is empty"):
    calibrate.capture(units, params, iter([]))
  with pytest.raises(ValueError, match=r"batches\[1\] is empty"):
    calibrate.capture(units, params, [jnp.asarray(windows()), jnp.zeros((0, 16), jnp.int32)])
  with pytest.raises(ValueError, match="calibration_tokens is empty"):
    lqx.quantize(units, params, lqx.default_recipe(GPTQ), np.zeros((0, 16), np.int32), progress=False)


# ----------------------------------------------------------------------------- scale overflow


def big_kernel(scale=3e5, shape=(256, 64), seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-scale, scale, shape).astype(np.float32))


def rel_err(w, q):
  return float(jnp.linalg.norm(q.dequantize().astype(jnp.float32) - w) / jnp.linalg.norm(w))


def test_rtn_scale_overflow_falls_back_to_float32():
  w = big_kernel()  # 3 bits: scale ~ 6e5 / 7 > 65504
  cfg = RTNConfig(bits=3, group_size=128)
  with pytest.warns(UserWarning, match="float16 scales out of range"):
    q, info = cfg.quantize(w, name="big")
  assert q.scale_dtype == np.float32
  assert info == {"scale_dtype": "float32", "scale_dtype_requested": "float16"}
  ref = rtn_quantize(w, RTNConfig(bits=3, group_size=128, scale_dtype=jnp.float32))
  assert rel_err(w, q) == pytest.approx(rel_err(w, ref), rel=1e-6)
  # Min-max RTN: every weight is within half a step of its code.
  step = float(jnp.max(q.scale.astype(jnp.float32)))
  assert float(jnp.max(jnp.abs(q.dequantize() - w))) <= 0.5 * step * (1 + 1e-5)
  assert rel_err(w, q) < 0.2  # 3-bit uniform data: ~0.14; clipped float16 scales lose far more


def test_rtn_scale_underflow_falls_back_to_float32():
  w = big_kernel(1e-9)  # scales ~1e-10, below float16's smallest subnormal
  with pytest.warns(UserWarning, match="float16 scales out of range"):
    q, info = RTNConfig(bits=4, group_size=128).quantize(w)
  assert q.scale_dtype == np.float32 and info["scale_dtype"] == "float32"
  assert rel_err(w, q) < 0.1


def test_normal_weights_keep_float16_scales():
  w = big_kernel(0.05)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    q, info = RTNConfig(bits=3, group_size=128).quantize(w)
  assert q.scale_dtype == np.float16 and info == {}
  assert not grid.scales_out_of_range(q.scale, q.scale_dtype)


def test_gptq_scale_overflow_falls_back_to_float32():
  w = big_kernel()
  x = np.random.default_rng(1).normal(size=(512, 256)).astype(np.float32)
  h = jnp.asarray(2 / 512 * x.T @ x)
  with pytest.warns(UserWarning, match="float16 scales out of range"):
    q, info = gptq_quantize(w, h, GPTQConfig(bits=3, group_size=128), name="big")
  ref, ref_info = gptq_quantize(w, h, GPTQConfig(bits=3, group_size=128, scale_dtype=jnp.float32))
  assert q.scale_dtype == np.float32 and info["scale_dtype"] == "float32"
  assert info["scale_dtype_requested"] == "float16"
  np.testing.assert_array_equal(np.asarray(q.codes()), np.asarray(ref.codes()))
  assert info["proxy_loss"] == pytest.approx(ref_info["proxy_loss"], rel=1e-6)


def test_quantize_model_with_huge_kernel(params):
  big = dict(params)
  big["layers_0"] = jax.tree.map(lambda a: a, params["layers_0"])
  big["layers_0"]["attn"]["q_proj"]["kernel"] = big_kernel(shape=params["layers_0"]["attn"]["q_proj"]["kernel"].shape)
  method = GPTQConfig(bits=3, group_size=32)
  with pytest.warns(UserWarning, match="float16 scales out of range"):
    qparams, report = lqx.quantize(CONFIG, big, lqx.default_recipe(method), windows(), progress=False)
  q = qparams["layers_0"]["attn"]["q_proj"]["kernel"]
  assert q.scale_dtype == np.float32
  others = [qparams[f"layers_{i}"]["mlp"]["down_proj"]["kernel"] for i in range(2)]
  assert all(o.scale_dtype == np.float16 for o in others)
  err = next(l.error for l in report.layers if l.name == "layers_0/attn/q_proj/kernel")
  assert err < 0.2
