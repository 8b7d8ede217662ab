"""FlexQ-style activation quantization: per-token codes, the exact integer path, the ActQuant format,
path rules, checkpoints, and W6A8 / W6A6 on the real SmolLM2-135M."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqx import evaluate, formats, nn, quant, recipe
from lqx.formats import affine
from lqx.formats.actquant import ActQuant
from lqx.io import checkpoint
from lqx.quant import activations as A
from lqx.quant.rtn import RTNConfig, rtn_quantize


def _x(rng, shape, zero_tokens=((0, 1),), zero_group=None):
  """Random activations with a few heavy channels (outliers), some all-zero tokens and an all-zero group."""
  x = rng.normal(size=shape) * np.where(rng.random(shape[-1]) < 0.02, 30.0, 1.0)
  for t in zero_tokens:
    x[t] = 0.0
  if zero_group is not None:
    t, lo, hi = zero_group
    x[t][..., lo:hi] = 0.0
  return jnp.asarray(x, jnp.float32)


def _np_quantize(x, bits, g):
  """Per-token reference in numpy float32, one group at a time."""
  x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
  k = x.shape[-1]
  g = k if g == -1 else g
  qmax = 2 ** (bits - 1) - 1
  codes, scales = np.zeros(x.shape, np.int8), []
  for lo in range(0, k, g):
    blk = x[:, lo:lo + g]
    s = np.max(np.abs(blk), axis=1) / np.float32(qmax)
    s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
    codes[:, lo:lo + g] = np.clip(np.round(blk / s[:, None]), -qmax, qmax)
    scales.append(s)
  return codes, np.stack(scales, axis=1)


# ----------------------------------------------------------------------------- per-token codes


@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("k, g", [(576, 128), (256, 128), (100, 128), (576, -1), (320, 64)])
def test_quantize_activations_per_token_groups(bits, k, g):
  rng = np.random.default_rng(bits * 1000 + k)
  x = _x(rng, (2, 6, k), zero_tokens=((0, 1),), zero_group=((1, 2), k - min(k, 40), k))
  codes, scale = A.quantize_activations(x, bits, g)
  n_groups = 1 if g == -1 else -(-k // g)
  assert (codes.dtype, codes.shape) == (jnp.int8, x.shape)
  assert (scale.dtype, scale.shape) == (jnp.float32, (2, 6, n_groups))
  want_codes, want_scale = _np_quantize(x, bits, g)
  np.testing.assert_array_equal(np.asarray(codes).reshape(-1, k), want_codes)
  np.testing.assert_array_equal(np.asarray(scale).reshape(-1, n_groups), want_scale)
  qmax = 2 ** (bits - 1) - 1
  assert int(jnp.max(jnp.abs(codes))) == qmax  # each nonzero group reaches +-qmax
  deq = A.dequantize_activations(codes, scale, g)
  bound = np.repeat(np.asarray(scale), 1 if g == -1 else g, axis=-1)[..., :k] / 2
  assert np.all(np.abs(np.asarray(deq - x)) <= bound * (1 + 1e-6))
  # All-zero tokens (and groups): scale 1, codes 0, dequantized exactly 0, no NaN anywhere.
  assert np.all(np.asarray(codes[0, 1]) == 0) and np.all(np.asarray(scale[0, 1]) == 1)
  fq = A.fake_quant(x, bits, g)
  assert np.all(np.asarray(fq[0, 1]) == 0) and np.all(np.asarray(fq[1, 2, k - min(k, 40):]) == 0)
  assert np.all(np.isfinite(np.asarray(fq)))


def test_fake_quant_keeps_dtype_and_short_last_group_is_its_own():
  rng = np.random.default_rng(0)
  x = _x(rng, (4, 576), zero_tokens=())
  x = x.at[:, 520].set(1000.0)  # an outlier in the short last group (channels 512..575) only
  codes, scale = A.quantize_activations(x, 6, 128)
  assert np.all(np.asarray(scale[:, 4]) == np.float32(1000.0) / 31)
  assert np.all(np.asarray(scale[:, :4]) < 10)  # the full groups do not see it
  for dt in (jnp.bfloat16, jnp.float16):
    assert A.fake_quant(x.astype(dt), 8, 128).dtype == dt
  with pytest.raises(ValueError, match="act_bits=3"):
    A.quantize_activations(x, 3, 128)
  with pytest.raises(ValueError, match="act_group_size=0"):
    A.fake_quant(x, 8, 0)


# ----------------------------------------------------------------------------- integer path


def _w(rng, k, n, g, wbits):
  qmax = 2 ** (wbits - 1) - 1
  codes = jnp.asarray(rng.integers(-qmax - 1, qmax + 1, size=(k, n)), jnp.int8)
  scale = jnp.asarray(rng.uniform(1e-3, 2e-2, size=(-(-k // g) if g != -1 else 1, n)), jnp.float16)
  return codes, scale


@pytest.mark.parametrize("k, n, g, abits, wbits", [
    (576, 48, 128, 8, 6), (576, 40, 128, 6, 6), (1536, 32, 128, 8, 8), (320, 24, 64, 8, 8), (200, 16, -1, 8, 6)])
def test_int_linear_equals_reference_bit_for_bit(k, n, g, abits, wbits):
  rng = np.random.default_rng(k + n)
  x = _x(rng, (3, 7, k), zero_tokens=((0, 0), (2, 6)), zero_group=((1, 3), 0, min(k, 64)))
  w_codes, w_scale = _w(rng, k, n, g, wbits)
  y = A.int_linear(x, w_codes, w_scale, act_bits=abits, group_size=g)
  y_ref = A.int_linear_reference(x, w_codes, w_scale, act_bits=abits, group_size=g)
  assert y.dtype == jnp.float32 and y.shape == (3, 7, n)
  assert np.asarray(y).tobytes() == np.asarray(y_ref).tobytes()
  assert np.all(np.asarray(y[0, 0]) == 0) and np.all(np.asarray(y[2, 6]) == 0)
  # ... and both are fake_quant(x) @ W, to float32 rounding (float64 check).
  n_rows = k if g == -1 else g
  w = np.asarray(w_codes, np.float64) * np.repeat(np.asarray(w_scale, np.float64), n_rows, axis=0)[:k]
  want = np.asarray(A.fake_quant(x, abits, g), np.float64) @ w
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_int_linear_is_int8_dot_with_int32_accumulation():
  rng = np.random.default_rng(1)
  x = _x(rng, (5, 576))
  w_codes, w_scale = _w(rng, 576, 8, 128, 6)
  closed = jax.make_jaxpr(lambda x: A.int_linear(x, w_codes, w_scale, act_bits=8, group_size=128))(x)

  def eqns(jaxpr):
    for e in jaxpr.eqns:
      yield e
      for sub in jax.core.jaxprs_in_params(e.params):
        yield from eqns(sub)

  dots = [e for e in eqns(closed.jaxpr) if e.primitive.name == "dot_general"]
  assert len(dots) == 1, dots
  (dot,) = dots
  assert dot.params["preferred_element_type"] == jnp.int32
  assert [(v.aval.dtype, v.aval.shape) for v in dot.invars] == [(jnp.int8, (5, 5, 128)), (jnp.int8, (5, 128, 8))]
  assert (dot.outvars[0].aval.dtype, dot.outvars[0].aval.shape) == (jnp.int32, (5, 5, 8))  # (G, T, N)
  with pytest.raises(ValueError, match="w_codes is int32"):
    A.int_linear(x, w_codes.astype(jnp.int32), w_scale, act_bits=8, group_size=128)
  with pytest.raises(ValueError, match=r"w_scale has shape \(5, 8\); per-OC groups of 64 on K=576 need \(9, 8\)"):
    A.int_linear(x, w_codes, w_scale, act_bits=8, group_size=64)


# ----------------------------------------------------------------------------- weights: lqx rtn sym vs FlexQ's grid


def test_rtn_sym_is_gptq_grid_and_absmax_quantize_is_flexqs():
  """lqx's rtn sym=True is reference GPTQ's grid (2*absmax/63 at 6 bits), not FlexQ's absmax/31."""
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(576, 16)) * 0.05, jnp.float32)
  absmax = np.stack([np.abs(np.asarray(w)[lo:lo + 128]).max(0) for lo in range(0, 576, 128)])  # (5, 16)
  rtn = quant.make("rtn", bits=6, group_size=128, sym=True).quantize(w)[0]
  np.testing.assert_allclose(np.asarray(rtn.scale, np.float32), 2 * absmax / 63, rtol=1e-3)
  flex = A.absmax_quantize(w, bits=6, group_size=128)
  assert flex.sym and flex.scale.shape == (5, 16)
  np.testing.assert_allclose(np.asarray(flex.scale, np.float32), absmax / 31, rtol=1e-3)
  signed = np.asarray(flex.stored_codes(), np.int32) - 32
  assert signed.min() == -31 and signed.max() == 31
  assert np.max(np.abs(np.asarray(flex.dequantize() - w))) <= np.max(np.asarray(flex.scale, np.float32)) / 2 * 1.01


# ----------------------------------------------------------------------------- the format


def _aq(act_bits=8, k=576, n=64, seed=0, weights="absmax", dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(size=(k, n)) * 0.05, dtype)
  base = A.absmax_quantize(w) if weights == "absmax" else quant.make("rtn", bits=6, group_size=128,
                                                                      sym=True).quantize(w)[0]
  return ActQuant(base, act_bits, 128), base


def test_format_registered_invariants_and_storage():
  aq, base = _aq()
  assert formats.FORMATS["actquant"] is ActQuant and formats.name_of(aq) == "actquant" and formats.is_quantized(aq)
  leaves = jax.tree_util.tree_flatten_with_path(aq)[0]
  assert [jax.tree_util.keystr(p) for p, _ in leaves][:1] == [".base.packed"]
  assert len(leaves) == len(jax.tree.leaves(base))  # no leaves of its own
  assert (aq.shape, aq.dtype, aq.stored_bits, aq.bits_per_weight) == (
      base.shape, base.dtype, base.stored_bits, base.bits_per_weight)
  assert np.asarray(aq.dequantize()).tobytes() == np.asarray(base.dequantize()).tobytes()
  x = _x(np.random.default_rng(5), (2, 9, 576))
  y = jax.jit(nn.linear)(x, aq)
  want = base.linear(A.fake_quant(x, 8, 128))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
  assert not np.allclose(np.asarray(y), np.asarray(base.linear(x)), rtol=0, atol=1e-7)  # the input was quantized
  back = jax.tree.unflatten(jax.tree.structure(aq), jax.tree.leaves(aq))
  assert type(back) is ActQuant and (back.act_bits, back.act_group_size) == (8, 128)


@pytest.mark.parametrize("act_bits, weights", [(8, "absmax"), (6, "absmax"), (8, "rtn"), (6, "rtn")])
def test_format_linear_matches_integer_path(act_bits, weights):
  aq, _ = _aq(act_bits, weights=weights, seed=act_bits)
  x = _x(np.random.default_rng(7), (3, 4, 576))
  assert aq.int_unsupported() is None
  y_int, y = aq.int_linear(x), nn.linear(x, aq)
  scale = float(np.max(np.abs(np.asarray(y))))
  np.testing.assert_allclose(np.asarray(y_int), np.asarray(y), rtol=1e-5, atol=1e-6 * scale)
  codes, w_scale = aq.int_codes()
  y_ref = A.int_linear_reference(x, codes, w_scale, act_bits=act_bits, group_size=128)
  assert np.asarray(y_int).tobytes() == np.asarray(y_ref).tobytes()


def test_int_path_refuses_bases_it_cannot_run():
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.normal(size=(256, 32)), jnp.float32)
  cases = {
      "asymmetric": rtn_quantize(w, RTNConfig(bits=6, group_size=128)),
      "groups of 64": rtn_quantize(w, RTNConfig(bits=6, group_size=64, sym=True)),
      "per-IC": rtn_quantize(w, RTNConfig(bits=6, group_size=8, group_axis="ic", sym=True)),
      "perm": affine.quantize_with_params(w, jnp.ones((2, 32)), None, bits=6, group_size=128, group_axis="oc",
                                          perm=jnp.arange(256)[::-1]),
  }
  for why, base in cases.items():
    aq = ActQuant(base, 8, 128)
    assert aq.int_unsupported() is not None, why
    with pytest.raises(ValueError, match="int_linear needs"):
      aq.int_linear(jnp.ones((2, 256)))
    assert nn.linear(jnp.ones((2, 256)), aq).shape == (2, 32)  # the fake-quant path takes any base


@pytest.mark.parametrize("field, value, message", [
    ("act_bits", 3, "act_bits=3 must be an int in 4..8"), ("act_bits", 9, "act_bits=9"),
    ("act_bits", True, "act_bits=True"), ("act_group_size", 0, "act_group_size=0"),
    ("act_group_size", 2.0, "act_group_size=2.0")])
def test_check_rejects_bad_settings(field, value, message):
  aq, _ = _aq()
  aq.check()
  with pytest.raises(ValueError, match=message):
    ActQuant(**{**vars(aq), field: value}).check()
  with pytest.raises(ValueError, match="ActQuant of an ActQuant"):
    ActQuant(aq, 8, 128).check()


def test_checkpoint_round_trip(tmp_path):
  aq8, _ = _aq(8, seed=1)
  aq6, _ = _aq(6, k=320, n=48, seed=2, weights="rtn", dtype=jnp.bfloat16)
  params = {"layers_0": {"mlp": {"down_proj": {"kernel": aq8}, "up_proj": {"kernel": aq6}},
                         "norm": {"scale": jnp.ones((8,))}}}
  path = checkpoint.save(tmp_path / "ckpt", None, params)
  spec = checkpoint.read_json(path)["tree"]["dict"]["layers_0"]["dict"]["mlp"]["dict"]["down_proj"]["dict"]
  assert spec["kernel"]["format"]["name"] == "actquant"
  assert spec["kernel"]["format"]["static"] == {"act_bits": 8, "act_group_size": 128}
  _, restored, _ = checkpoint.restore(path)
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
  k = restored["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert type(k) is ActQuant and type(k.base) is affine.QArray and (k.act_bits, k.act_group_size) == (6, 128)
  # A saved ActQuant whose settings are invalid is refused by check() on restore.
  bad = checkpoint.save(tmp_path / "bad", None, {"k": ActQuant(aq8.base, 3, 128)})
  with pytest.raises(checkpoint.CheckpointError, match="actquant format does not fit its arrays: act_bits=3"):
    checkpoint.restore(bad)


# ----------------------------------------------------------------------------- path rules


def _small_qparams():
  rng = np.random.default_rng(4)

  def w(*s):
    return jnp.asarray(rng.normal(size=s) * 0.1, jnp.float32)

  def block():
    return {"attn": {p: {"kernel": w(64, 64)} for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "attn_norm": {"scale": jnp.ones((64,))},
            "mlp": {"gate_proj": {"kernel": w(64, 96)}, "up_proj": {"kernel": w(64, 96)},
                    "down_proj": {"kernel": w(96, 64)}}}

  params = {"embed": {"embedding": w(32, 64)}, "layers_0": block(), "layers_1": block()}
  method = quant.make("rtn", bits=6, group_size=128, sym=True)
  return params, recipe.quantize(None, params, recipe.default_recipe(method), progress=False)[0]


def test_with_activation_bits_and_flexq_rule():
  params, q = _small_qparams()
  a8 = A.with_activation_bits(q, 8)
  for i in (0, 1):
    for grp, proj in [("attn", "q_proj"), ("attn", "o_proj"), ("mlp", "down_proj")]:
      k = a8[f"layers_{i}"][grp][proj]["kernel"]
      assert type(k) is ActQuant and k.act_bits == 8 and k.base is q[f"layers_{i}"][grp][proj]["kernel"]
  assert a8["embed"]["embedding"] is q["embed"]["embedding"]
  assert type(q["layers_0"]["mlp"]["down_proj"]["kernel"]) is affine.QArray  # input not mutated
  flex = A.flexq_activations(q)
  bits = {f"{g}/{p}": flex["layers_1"][g][p]["kernel"].act_bits for g in ("attn", "mlp")
          for p in flex["layers_1"][g] if p.endswith("_proj")}
  assert bits == {"attn/q_proj": 6, "attn/k_proj": 6, "attn/v_proj": 6, "attn/o_proj": 6,
                  "mlp/gate_proj": 6, "mlp/up_proj": 6, "mlp/down_proj": 8}
  with pytest.raises(ValueError, match="layers_0/attn/k_proj/kernel already quantizes its input at 6 bits"):
    A.with_activation_bits(flex, 6)
  with pytest.raises(ValueError, match="layers_0/attn/k_proj/kernel is a float array"):
    A.with_activation_bits(params, 8)
  with pytest.raises(ValueError, match="matches no parameter"):
    A.with_activation_bits(q, 8, paths=r"nothing/here")


# ----------------------------------------------------------------------------- the real model

EVAL_TOKENS, SEQ_LEN = 1024, 512


@pytest.mark.slow
def test_smollm2_w6a8_near_float_and_a6_no_better(smollm2, heldout_tokens):
  """SmolLM2-135M, W6 (RTN sym g128) with A16 / A8 / A6 / FlexQ's rule, on a reduced held-out eval."""
  config, params, _ = smollm2
  w6, _ = recipe.quantize(config, params, recipe.default_recipe(quant.make("rtn", bits=6, group_size=128, sym=True)),
                          progress=False)

  def ppl(p):
    return evaluate.perplexity(config, p, heldout_tokens, seq_len=SEQ_LEN, batch_size=2, max_tokens=EVAL_TOKENS,
                               progress=False).ppl

  got = {"float": ppl(params), "w6a16": ppl(w6), "w6a8": ppl(A.with_activation_bits(w6, 8)),
         "w6a6": ppl(A.with_activation_bits(w6, 6)), "flexq": ppl(A.flexq_activations(w6))}
  assert all(np.isfinite(v) for v in got.values()), got
  assert got["w6a8"] < 1.2 * got["float"], got
  assert got["w6a6"] >= got["w6a8"] - 0.05, got
  assert got["w6a6"] >= got["flexq"] - 0.05, got  # 8-bit down_proj inputs never hurt much
