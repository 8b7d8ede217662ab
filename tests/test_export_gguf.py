"""lqx.io.export.gguf: exact repacking of QArrays into GGUF block types, and whole-model export.

Every repacked tensor is decoded two ways (``gguf.quants.dequantize`` and lqx's own
reader) and compared bit for bit with lqx's dequantized weights.
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from lqx import recipe, tree  # noqa: E402
from lqx.formats import affine  # noqa: E402
from lqx.io import load_model  # noqa: E402
from lqx.io.export import gguf as export  # noqa: E402
from lqx.io.gguf import load_gguf, unpermute_rotary  # noqa: E402
from lqx.models import llama  # noqa: E402
from lqx.quant.rtn import RTNConfig, rtn_quantize  # noqa: E402

SMALL = llama.LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                          tie_embeddings=False, max_seq_len=64, rope_theta=20000.0, bos_token_id=1, eos_token_id=2)


def _w(ic, oc, seed=0):
  return jax.random.normal(jax.random.key(seed), (ic, oc)) * 0.05


def _rows_ref(qa):
  """lqx's float32 weights as GGUF rows (OC, IC); equal to ``dequantize()`` for float32 QArrays."""
  return np.asarray(qa.dequantize(), np.float32).T


# ----------------------------------------------------------------------------- repacking


@pytest.mark.parametrize("bits,sym,group_size,want", [
    (4, True, 32, "Q4_0"), (8, True, 32, "Q8_0"), (5, True, 32, "Q5_0"),
    (3, True, 32, "Q4_0"), (2, True, 128, "Q4_0"), (4, True, -1, "Q4_0"),  # fewer bits, groups of 32k
    (4, False, 32, "Q5_0"), (5, False, 64, "Q8_0"), (6, True, 32, "Q8_0"),
])
def test_repack_types(bits, sym, group_size, want):
  qa = rtn_quantize(_w(128, 48), RTNConfig(bits=bits, group_size=group_size, sym=sym))
  raw, qtype, choice = export.encode(qa, kernel=True)
  assert (choice.ggml_type, choice.exact, qtype.name) == (want, True, want)
  assert raw.dtype == np.uint8 and raw.shape == (48, 128 // 32 * gguf.GGML_QUANT_SIZES[qtype][1])
  np.testing.assert_array_equal(dequantize(raw, qtype), _rows_ref(qa))


@settings(max_examples=12, deadline=None)
@given(ic=st.sampled_from([64, 96]), oc=st.sampled_from([16]), bits=st.sampled_from([2, 3, 4, 5, 6, 8]),
       sym=st.booleans(), g=st.sampled_from([32, 64, -1]), heads=st.sampled_from([0, 2, 4]),
       sd=st.sampled_from([jnp.float16, jnp.bfloat16]), seed=st.integers(0, 999))
def test_repack_is_exact_or_falls_back(ic, oc, bits, sym, g, heads, sd, seed):
  """Random QArrays (per-OC groups, any bits): a block type decodes to lqx's weights bit for bit, or floats."""
  qa = rtn_quantize(_w(ic, oc, seed), RTNConfig(bits=bits, group_size=g, sym=sym, scale_dtype=sd))
  raw, qtype, choice = export.encode(qa, kernel=True, heads=heads, float_type="f32")
  got = dequantize(raw, qtype) if raw.dtype == np.uint8 else raw
  got = unpermute_rotary(np.asarray(got, np.float32).reshape(oc, ic), heads) if heads else got
  if sym and bits <= 4 and (g == -1 or g % 32 == 0):
    assert choice.ggml_type == "Q4_0"
  if sym and bits <= 8 or bits <= 7:
    assert choice.ggml_type.startswith("Q"), choice  # bf16 scales of N(0, 0.05) weights are float16 values
  assert choice.exact
  np.testing.assert_array_equal(got, _rows_ref(qa))


def test_q4_1_when_the_min_is_a_float16():
  """Asymmetric 4-bit with power-of-two scales: m = -scale * zero is a float16, so Q4_1 (5.0 bpw) is exact."""
  rng = np.random.default_rng(0)
  codes = jnp.asarray(rng.integers(0, 16, (64, 16)), jnp.uint8)
  scale = jnp.asarray(2.0 ** -rng.integers(4, 9, (2, 16)), jnp.float32)
  zero = jnp.asarray(rng.integers(0, 16, (2, 16)), jnp.float32)
  qa = affine.from_codes(codes, scale, zero, bits=4, group_size=32, group_axis="oc", dtype=jnp.float32)
  raw, qtype, choice = export.encode(qa, kernel=True)
  assert choice.ggml_type == "Q4_1" and choice.exact
  np.testing.assert_array_equal(dequantize(raw, qtype), _rows_ref(qa))


def test_act_order_perm_is_undone_before_blocking():
  """Codes stored in act-order: a perm inside each block of 32 still repacks exactly; a global one cannot."""
  w = _w(128, 16)
  inside = jnp.asarray(np.concatenate([np.random.default_rng(b).permutation(32) + 32 * b for b in range(4)]))
  cfg = dict(bits=4, group_size=32, group_axis="oc")
  qa = affine.quantize_with_params(w, jnp.full((4, 16), 0.01), None, perm=inside, **cfg)
  raw, qtype, choice = export.encode(qa, kernel=True)
  assert choice.ggml_type == "Q4_0"
  np.testing.assert_array_equal(dequantize(raw, qtype), _rows_ref(qa))
  scale = jnp.asarray(np.random.default_rng(1).uniform(0.005, 0.02, (4, 16)), jnp.float32)
  anywhere = jnp.asarray(np.random.default_rng(2).permutation(128))
  qa = affine.quantize_with_params(w, scale, None, perm=anywhere, **cfg)
  raw, _, choice = export.encode(qa, kernel=True)
  assert choice.ggml_type == "F16" and "vary within a block" in choice.note


@pytest.mark.parametrize("layout,why", [
    (dict(bits=4, group_size=16, group_axis="ic", sym=True), "vary within a block"),
    (dict(bits=4, group_size=16, group_axis="oc", sym=True), "vary within a block"),
    (dict(bits=4, group_size=32, group_axis="oc", sym=True, scale_dtype=jnp.float32), "not all float16"),
])
def test_unrepackable_layouts_fall_back_to_floats(layout, why):
  qa = rtn_quantize(_w(96, 32), RTNConfig(**layout))
  raw, qtype, choice = export.encode(qa, kernel=True)
  assert (qtype.name, choice.ggml_type, raw.dtype) == ("F16", "F16", np.float16)
  assert why in choice.note
  np.testing.assert_allclose(raw.astype(np.float32), _rows_ref(qa), rtol=1e-3, atol=1e-7)
  raw, qtype, choice = export.encode(qa, kernel=True, float_type="f32")
  assert qtype.name == "F32" and choice.exact
  np.testing.assert_array_equal(raw, _rows_ref(qa))


def test_rows_not_multiple_of_32_fall_back():
  qa = rtn_quantize(_w(100, 16), RTNConfig(bits=4, group_size=32, sym=True))  # IC=100: last group of 4
  assert "not a multiple of 32" in export.encode(qa, kernel=True)[2].note


def test_gguf_requantization_would_lose_accuracy():
  """Why the exporter packs codes itself: gguf's Q4_0 quantizer, fed lqx's dequantized weights, picks other scales."""
  qa = rtn_quantize(_w(256, 64), RTNConfig(bits=4, group_size=32, sym=True))
  ref = _rows_ref(qa)
  requant = dequantize(gguf.quants.quantize(ref, gguf.GGMLQuantizationType.Q4_0), gguf.GGMLQuantizationType.Q4_0)
  exact, qtype, _ = export.encode(qa, kernel=True)
  assert np.array_equal(dequantize(exact, qtype), ref) and not np.array_equal(requant, ref)


def test_permute_rotary_inverts_unpermute():
  x = np.arange(4 * 16 * 3).reshape(64, 3)
  np.testing.assert_array_equal(unpermute_rotary(export.permute_rotary(x, 4), 4), x)
  assert not np.array_equal(export.permute_rotary(x, 4), x)


# ----------------------------------------------------------------------------- whole model (small)


def _quantized_small(method=None, tie=False):
  config = SMALL if not tie else llama.LlamaConfig(**{**SMALL.__dict__, "tie_embeddings": True})
  params = llama.init_params(config, jax.random.key(0))
  method = method or recipe.make_method("rtn", bits=4, group_size=32, group_axis="oc", sym=True)
  rules = [recipe.Rule(recipe.BLOCK_LINEARS, method)]
  if not tie:
    rules.append(recipe.Rule("lm_head/kernel", method))
  qparams, _ = recipe.quantize(None, params, rules, progress=False)
  return config, qparams


def _as_stored(config):
  """GGUF stores the norm epsilon as a float32."""
  return dataclasses.replace(config, norm_eps=float(np.float32(config.norm_eps)))


def _dequantized(params):
  return jax.tree.map(lambda x: np.asarray(x.dequantize() if hasattr(x, "dequantize") else x, np.float32),
                      params, is_leaf=lambda x: hasattr(x, "dequantize"))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_small_model_round_trips_exactly(tmp_path, tie):
  config, qparams = _quantized_small(tie=tie)
  out = export.export_gguf(tmp_path / "small.gguf", config, qparams, float_type="f32")
  got_config, got = load_model(out)
  assert got_config == _as_stored(config)
  want = _dequantized(qparams)
  flat_got, flat_want = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_flatten_with_path(want)[0]
  assert [k for k, _ in flat_got] == [k for k, _ in flat_want]
  for (k, a), (_, b) in zip(flat_got, flat_want):
    assert np.array_equal(np.asarray(a), b), jax.tree_util.keystr(k)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 9)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(llama.apply(config, got, tokens)),
                                np.asarray(llama.apply(config, jax.tree.map(jnp.asarray, want), tokens)))
  np.testing.assert_allclose(np.asarray(llama.apply(config, got, tokens)),
                             np.asarray(llama.apply(config, qparams, tokens)), atol=1e-5, rtol=0)
  reader = gguf.GGUFReader(out)
  types = {t.name: t.tensor_type.name for t in reader.tensors}
  assert ("output.weight" in types) == (not tie)
  assert {types[f"blk.{i}.{n}.weight"] for i in range(2) for n in ("attn_q", "attn_k", "ffn_down")} == {"Q4_0"}
  assert types["token_embd.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
  assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)
  assert reader.fields["llama.context_length"].contents() == 64


def test_choose_types_reports_each_tensor():
  config, qparams = _quantized_small(recipe.make_method("rtn", bits=4, group_size=16, group_axis="ic", sym=True))
  choices = export.choose_types(config, qparams)
  q = choices["blk.0.attn_q.weight"]
  assert q.ggml_type == "F16" and not q.exact and "vary within a block" in q.note
  assert choices["blk.1.ffn_norm.weight"].ggml_type == "F32" and choices["token_embd.weight"].ggml_type == "F16"


def test_f16_default_and_asymmetric_types(tmp_path):
  config, qparams = _quantized_small(recipe.make_method("rtn", bits=4, group_size=32, group_axis="oc", sym=False))
  out = export.export_gguf(tmp_path / "asym.gguf", config, qparams)
  types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
  assert types["blk.0.ffn_up.weight"] == "Q5_0" and types["token_embd.weight"] == "F16"
  _, got = load_gguf(out)
  np.testing.assert_array_equal(got["layers_1"]["mlp"]["up_proj"]["kernel"],
                                np.asarray(qparams["layers_1"]["mlp"]["up_proj"]["kernel"].dequantize()))


# ----------------------------------------------------------------------------- bad input


def test_refuses_to_overwrite_and_writes_atomically(tmp_path, monkeypatch):
  config, qparams = _quantized_small()
  out = tmp_path / "m.gguf"
  out.write_bytes(b"old")
  with pytest.raises(FileExistsError, match=r"m\.gguf exists; pass overwrite=True"):
    export.export_gguf(out, config, qparams)
  real = export.encode

  def failing(leaf, *, name, **kw):
    if name == "output_norm.weight":
      raise RuntimeError("disk full")
    return real(leaf, name=name, **kw)

  monkeypatch.setattr(export, "encode", failing)
  with pytest.raises(RuntimeError, match="disk full"):
    export.export_gguf(out, config, qparams, overwrite=True)
  assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
  monkeypatch.setattr(export, "encode", real)
  export.export_gguf(out, config, qparams, overwrite=True)
  assert load_gguf(out)[0] == _as_stored(config)


@pytest.mark.parametrize("change,match", [
    (dict(attn_bias=True), r"attn_bias=True: exporting attention biases"),
    (dict(embed_multiplier=2.0), r"config\.embed_multiplier=2\.0: GGUF llama has no such setting"),
    (dict(attn_logit_scale=0.1), r"config\.attn_logit_scale=0\.1"),
])
def test_unsupported_configs(tmp_path, change, match):
  config = llama.LlamaConfig(**{**SMALL.__dict__, **change})
  with pytest.raises(ValueError, match=match):
    export.export_gguf(tmp_path / "x.gguf", config, llama.init_params(config, jax.random.key(0)))


def test_param_and_argument_errors(tmp_path):
  config, qparams = _quantized_small()
  bad = {**qparams, "extra": {"kernel": jnp.zeros((4, 4))}}
  with pytest.raises(ValueError, match=r"leaves a llama GGUF cannot hold: \['extra/kernel'\]"):
    export.export_gguf(tmp_path / "x.gguf", config, bad)
  missing = {k: v for k, v in qparams.items() if k != "final_norm"}
  with pytest.raises(ValueError, match=r"params has no 'final_norm/scale' \(needed for GGUF tensor 'output_norm"):
    export.export_gguf(tmp_path / "x.gguf", config, missing)
  with pytest.raises(ValueError, match=r"must end with \.gguf"):
    export.export_gguf(tmp_path / "x.bin", config, qparams)
  with pytest.raises(ValueError, match=r"float_type='f8'"):
    export.export_gguf(tmp_path / "x.gguf", config, qparams, float_type="f8")
  with pytest.raises(ValueError, match=r"tokenizer: a object is not a fast Hugging Face tokenizer"):
    export.export_gguf(tmp_path / "x.gguf", config, qparams, tokenizer=object())
  assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- SmolLM2


TEXT = ("ROMEO: But, soft! what light through yonder window breaks? It is the east, and Juliet is the sun. "
        "1234 <|im_end|>")


@pytest.mark.slow
def test_smollm2_rtn_w4_exports_exactly(tmp_path, smollm2):
  from lqx.io import load_tokenizer

  config, params, tok = smollm2
  method = recipe.make_method("rtn", bits=4, group_size=32, group_axis="oc", sym=True)
  qparams, _ = recipe.quantize(None, params, recipe.default_recipe(method), progress=False)
  out = export.export_gguf(tmp_path / "smollm2-w4.gguf", config, qparams, tokenizer="smollm2-135m",
                           float_type="f32")
  types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
  assert sum(v == "Q4_0" for v in types.values()) == 7 * 30 and "output.weight" not in types
  got_config, got = load_model(out)
  assert got_config == _as_stored(config)
  for path in ("layers_0/attn/q_proj/kernel", "layers_17/attn/k_proj/kernel", "layers_29/mlp/down_proj/kernel"):
    want = np.asarray(tree.get(qparams, path).dequantize())
    assert np.array_equal(np.asarray(tree.get(got, path)), want), path
  np.testing.assert_array_equal(np.asarray(got["embed"]["embedding"]), np.asarray(params["embed"]["embedding"]))
  ids = tok(TEXT)["input_ids"]
  tokens = jnp.asarray([ids])
  want_logits = np.asarray(llama.apply(config, jax.tree.map(jnp.asarray, _dequantized(qparams)), tokens))
  np.testing.assert_array_equal(np.asarray(llama.apply(config, got, tokens)), want_logits)
  back = load_tokenizer(out)
  assert back(TEXT)["input_ids"] == ids and back.decode(ids) == tok.decode(ids)


@pytest.mark.slow
def test_hf_tokenizer_object_is_converted(tmp_path, smollm2):
  """A byte-level BPE tokenizer with no GGUF behind it is converted and encodes the same ids."""
  from lqx import data
  from lqx.io import gguf as reader
  from lqx.io import load_tokenizer

  tok = reader.load_tokenizer(smollm2[2].name_or_path)
  tok.name_or_path = ""
  config = llama.LlamaConfig(**{**SMALL.__dict__, "vocab_size": smollm2[0].vocab_size})
  params = llama.init_params(config, jax.random.key(0))
  out = export.export_gguf(tmp_path / "tok.gguf", config, params, tokenizer=tok)
  fields = gguf.GGUFReader(out).fields
  assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "default"
  back = load_tokenizer(out)
  text = data.load_text("heldout")[:20000] + TEXT
  assert back(text)["input_ids"] == tok(text)["input_ids"]
  with pytest.raises(ValueError, match=r"tokenizer has token ids up to 49151 but config\.vocab_size is 96"):
    export.export_gguf(tmp_path / "small.gguf", SMALL, llama.init_params(SMALL, jax.random.key(0)), tokenizer=tok)
  with pytest.raises(ValueError, match=r"its tokenizer has 49152 tokens but config\.vocab_size is 96"):
    export.export_gguf(tmp_path / "small.gguf", SMALL, llama.init_params(SMALL, jax.random.key(0)),
                       tokenizer="smollm2-135m")
