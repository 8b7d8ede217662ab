"""lqx.io.export.gptq against an independent NumPy GPTQ reader written from the format's description."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lqx import data, formats, recipe, tree  # noqa: E402
from lqx.formats import affine, lowrank  # noqa: E402
from lqx.io import hf  # noqa: E402
from lqx.io.export.gptq import export_gptq, pack_kernel  # noqa: E402
from lqx.models import llama  # noqa: E402
from lqx.quant.rtn import RTNConfig, rtn_quantize  # noqa: E402

SMALL = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
             bos_token_id=1, eos_token_id=2)
BLOCK = r"layers_\d+/(attn|mlp)/\w+_proj/kernel"


# ----------------------------------------------------------------------------- the independent reader


def unpack(words: np.ndarray, bits: int, n: int, axis: int) -> np.ndarray:
  """``n`` values of ``bits`` bits from int32 words along ``axis``: one little-endian bit stream,
  value k at stream bits [k*bits, (k+1)*bits), word j holding stream bits [32j, 32j+32)."""
  w = np.ascontiguousarray(np.moveaxis(words, axis, -1)).astype("<u4")  # little-endian bytes of each word
  stream = np.unpackbits(w.view(np.uint8), axis=-1, bitorder="little")  # (..., 32 * n_words) bits
  vals = stream[..., : n * bits].reshape(*w.shape[:-1], n, bits).astype(np.int64) @ (1 << np.arange(bits))
  return np.moveaxis(vals, -1, axis)


def read_gptq(folder) -> tuple[dict, dict]:
  """``(config.json, {HF tensor name: float32 array})``: every GPTQ linear as its dequantized
  ``(out, in)`` weight ``w[i, o] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o])``, with ``z`` the
  stored zero + 1 for checkpoint_format "gptq" (AutoGPTQ v1), as stored for "gptq_v2"."""
  cfg = json.loads((folder / "config.json").read_text())
  q = cfg["quantization_config"]
  tensors = {}
  for file in sorted(folder.glob("*.safetensors")):
    tensors.update(load_file(file))
  out = {}
  for name, x in tensors.items():
    if name.endswith(".qweight"):
      base = name.removesuffix(".qweight")
      scales, g_idx = tensors[base + ".scales"].astype(np.float32), tensors[base + ".g_idx"]
      ic, oc = len(g_idx), scales.shape[1]
      assert x.dtype == np.int32 and x.shape == (ic * q["bits"] // 32, oc)
      assert tensors[base + ".scales"].dtype == np.float16 and g_idx.dtype == np.int32
      codes = unpack(x, q["bits"], ic, axis=0)
      zeros = unpack(tensors[base + ".qzeros"], q["bits"], oc, axis=1) + (q["checkpoint_format"] == "gptq")
      w = scales[g_idx] * (codes - zeros[g_idx]).astype(np.float32)
      out[base + ".weight"] = w.T
    elif not name.endswith((".qzeros", ".scales", ".g_idx")):
      assert x.dtype == np.float16, name
      out[name] = x.astype(np.float32)
  return cfg, out


# ----------------------------------------------------------------------------- models


def act_order(w, bits, group_size, sym, seed=0):
  """A QArray of ``w`` whose groups are formed over a random row order (as GPTQ's act-order stores them)."""
  perm = jnp.asarray(np.random.default_rng(seed).permutation(w.shape[0]), jnp.int32)
  grid = rtn_quantize(w[perm], RTNConfig(bits=bits, group_size=group_size, sym=sym))
  zero = None if sym else grid.zero_points()
  return affine.quantize_with_params(w, grid.scale.astype(jnp.float32), zero, bits=bits, group_size=group_size,
                                     group_axis="oc", perm=perm)


def small_model(bits=4, group_size=32, sym=False, perm=False, group_axis="oc", seed=0, **overrides):
  """Random small model, every block linear RTN-quantized; with ``perm``, layers_1's down_proj in act-order."""
  config = llama.LlamaConfig(**{**SMALL, **overrides})
  params = llama.init_params(config, jax.random.key(seed), std=0.08)
  params["final_norm"]["scale"] = 1 + 0.1 * jax.random.normal(jax.random.key(seed + 1), (config.dim,))
  method = RTNConfig(bits=bits, group_size=group_size, group_axis=group_axis, sym=sym)
  qparams, _ = recipe.quantize(None, params, (recipe.Rule(BLOCK, method),), progress=False)
  if perm:
    w = params["layers_1"]["mlp"]["down_proj"]["kernel"]
    qparams = tree.replace(qparams, "layers_1/mlp/down_proj/kernel", act_order(w, bits, group_size, sym))
  return config, params, qparams


def assert_reads_back(out, config, qparams):
  """The reader's weights are lqx's dequantized kernels bit for bit, floats their float16 rounding."""
  cfg, weights = read_gptq(out)
  table = hf.expected_tensors(config)
  assert set(weights) == set(table)
  for name, (sub, _, kernel) in table.items():
    leaf = tree.get(qparams, "/".join(sub))
    if formats.is_quantized(leaf):
      np.testing.assert_array_equal(weights[name], np.asarray(leaf.dequantize()).T, err_msg=name)
    else:
      want = np.asarray(leaf).astype(np.float16).astype(np.float32)
      np.testing.assert_array_equal(weights[name], want.T if kernel else want, err_msg=name)
  return cfg


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("bits,group_size,sym,perm,fmt", [
    (4, 32, False, False, "gptq"), (4, 32, True, True, "gptq"), (8, -1, False, True, "gptq"),
    (3, 32, False, True, "gptq_v2"), (2, 64, True, False, "gptq"), (4, 48, False, False, "gptq"),
], ids=["w4g32", "w4g32-sym-actorder", "w8-perchannel-actorder", "w3g32-v2-actorder", "w2g64-sym", "w4g48-short-last"])
def test_reader_gets_lqx_weights(tmp_path, bits, group_size, sym, perm, fmt):
  config, _, qparams = small_model(bits, group_size, sym, perm)
  out = export_gptq(tmp_path / "out", config, qparams, checkpoint_format=fmt)
  cfg = assert_reads_back(out, config, qparams)
  want = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": perm, "sym": sym,
          "checkpoint_format": fmt}
  assert cfg["quantization_config"] == want and cfg["dtype"] == "float16"
  assert json.loads((out / "quantize_config.json").read_text()) == {**want, "model_file_base_name": "model"}


def test_per_oc_qarray_is_gptq_qweight_bit_for_bit(tmp_path):
  """Without act-order, lqx's packed codes are GPTQ's qweight as they are (any of 2, 3, 4, 8 bits)."""
  for bits in (2, 3, 4, 8):
    w = jax.random.normal(jax.random.key(bits), (96, 64))
    qa = rtn_quantize(w, RTNConfig(bits=bits, group_size=32))
    t = pack_kernel(qa)
    np.testing.assert_array_equal(t["qweight"].view(np.uint32), np.asarray(qa.packed))
    np.testing.assert_array_equal(unpack(t["qweight"], bits, 96, axis=0), np.asarray(qa.codes()))
    np.testing.assert_array_equal(unpack(t["qzeros"], bits, 64, axis=1) + 1, np.asarray(qa.zero_points()))
    np.testing.assert_array_equal(t["g_idx"], np.arange(96) // 32)


def test_per_tensor_written_per_channel(tmp_path):
  config, _, qparams = small_model(8, -1, group_axis="tensor")
  out = export_gptq(tmp_path / "out", config, qparams)
  assert assert_reads_back(out, config, qparams)["quantization_config"]["group_size"] == -1


def test_float_model_from_reader_matches_lqx(tmp_path):
  """Names, transposes and config.json of the folder: a transformers model built from the reader's
  weights gives lqx's logits (lqx run on the same float16-rounded embeddings and norms)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config, _, qparams = small_model(4, 32, perm=True, tie_embeddings=False)
  out = export_gptq(tmp_path / "out", config, qparams)
  _, weights = read_gptq(out)
  hcfg = transformers.AutoConfig.from_pretrained(out)
  assert hcfg.quantization_config["bits"] == 4
  del hcfg.quantization_config
  model = transformers.AutoModelForCausalLM.from_config(hcfg, dtype=torch.float32, attn_implementation="eager")
  missing, unexpected = model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()},
                                              strict=False)
  assert not missing and not unexpected
  rounded = jax.tree.map(lambda x: x if formats.is_quantized(x) else x.astype(jnp.float16).astype(jnp.float32),
                         qparams, is_leaf=formats.is_quantized)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))
  with torch.no_grad():
    got = model(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(got, np.asarray(llama.apply(config, rounded, jnp.asarray(tokens))), atol=1e-4, rtol=0)


def test_zero_point_zero_needs_v2(tmp_path):
  config, params, qparams = small_model()
  w = jnp.abs(params["layers_0"]["attn"]["v_proj"]["kernel"])  # all >= 0: min-max zero point 0
  qa = rtn_quantize(w, RTNConfig(bits=4, group_size=32))
  assert np.any(np.asarray(qa.zero_points()) == 0)
  qparams = tree.replace(qparams, "layers_0/attn/v_proj/kernel", qa)
  with pytest.raises(ValueError, match=r"layers_0/attn/v_proj/kernel: \d+ groups have zero point 0.*gptq_v2"):
    export_gptq(tmp_path / "v1", config, qparams)
  assert not any(tmp_path.iterdir())
  out = export_gptq(tmp_path / "v2", config, qparams, checkpoint_format="gptq_v2")
  assert_reads_back(out, config, qparams)


def _replace(qparams, params, path, make):
  """``qparams`` with ``path`` set to ``make(float kernel)``."""
  return tree.replace(qparams, path, make(tree.get(params, path)))


def _lowrank(w):
  base = rtn_quantize(w, RTNConfig(bits=4, group_size=32))
  return lowrank.from_factors(base, jnp.zeros((w.shape[0], 2)), jnp.zeros((2, w.shape[1])), factor_bits=16)


@pytest.mark.parametrize("make,match", [
    (lambda w: w, "a float block linear"),
    (lambda w: rtn_quantize(w, RTNConfig(bits=5, group_size=32)), "5-bit codes; GPTQ packs 2, 3, 4, 8 bits"),
    (lambda w: rtn_quantize(w, RTNConfig(bits=4, group_size=32, group_axis="ic")), "per-IC groups"),
    (lambda w: rtn_quantize(w, RTNConfig(bits=8, group_size=32)), "8-bit, group_size 32, but layers_0/attn/q_proj/kernel is 4-bit"),
    (lambda w: rtn_quantize(w, RTNConfig(bits=4, group_size=-1)), "group_size -1, but"),
    (_lowrank, "'lowrank' format"),
    (lambda w: rtn_quantize(w, RTNConfig(bits=4, group_size=32, scale_dtype=jnp.float32)),
     "are not float16 values.*round_scales=True"),
], ids=["float", "5bit", "per-ic", "mixed-bits", "mixed-groups", "lowrank", "float32-scales"])
def test_inexpressible_kernels_named(tmp_path, make, match):
  config, params, qparams = small_model()
  qparams = _replace(qparams, params, "layers_1/mlp/up_proj/kernel", make)
  with pytest.raises(ValueError, match="layers_1/mlp/up_proj/kernel: .*" + match):
    export_gptq(tmp_path / "out", config, qparams)
  assert not any(tmp_path.iterdir())


def test_round_scales_rounds_to_float16(tmp_path):
  config, params, qparams = small_model()
  path = "layers_1/mlp/up_proj/kernel"
  qparams = _replace(qparams, params, path, lambda w: rtn_quantize(w, RTNConfig(bits=4, group_size=32,
                                                                                scale_dtype=jnp.float32)))
  out = export_gptq(tmp_path / "out", config, qparams, round_scales=True)
  _, weights = read_gptq(out)
  qa = tree.get(qparams, path)
  s16 = np.asarray(qa.scale).astype(np.float16).astype(np.float32)
  assert not np.array_equal(s16, np.asarray(qa.scale))
  g = np.arange(qa.shape[0]) // 32
  want = (np.asarray(qa.codes(), np.float32) - np.asarray(qa.zero_points())[g]) * s16[g]
  np.testing.assert_array_equal(weights["model.layers.1.mlp.up_proj.weight"], want.T)


def test_other_rejections(tmp_path):
  config, params, qparams = small_model(tie_embeddings=False)
  head = tree.replace(qparams, "lm_head/kernel", rtn_quantize(params["lm_head"]["kernel"], RTNConfig(bits=4)))
  with pytest.raises(ValueError, match="lm_head/kernel: quantized, but GPTQ checkpoints quantize only the block"):
    export_gptq(tmp_path / "a", config, head)
  config, _, qparams = small_model(ffn_dim=80)
  with pytest.raises(ValueError, match=r"layers_0/mlp/gate_proj/kernel: shape \(IC, OC\) = \(64, 80\).*multiples of 32"):
    export_gptq(tmp_path / "b", config, qparams)
  with pytest.raises(ValueError, match="checkpoint_format='gptq_v3'"):
    export_gptq(tmp_path / "c", *small_model()[::2], checkpoint_format="gptq_v3")
  assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_rtn_and_gptq_actorder(tmp_path, smollm2):
  """SmolLM2, every block linear W4 g128 asymmetric with float16 scales: RTN, except layers_0's k_proj
  by lqx's GPTQ with act-order (Hessian of real token embeddings; its IC 576 = 4.5 groups of 128, so
  act-order's short group is the last 64 rows in Hessian order). The reader gets back lqx's
  dequantized weights bit for bit."""
  config, params, tokenizer = smollm2
  rtn = recipe.make_method("rtn", bits=4, group_size=128)
  qparams, _ = recipe.quantize(None, params, recipe.default_recipe(rtn), progress=False)
  tokens = tokenizer(data.load_text("train")[:20000])["input_ids"]
  x = params["embed"]["embedding"][jnp.asarray(tokens)]
  gptq = recipe.make_method("gptq", bits=4, group_size=128, act_order=True)
  path = "layers_0/attn/k_proj/kernel"
  q0, _ = gptq.quantize(tree.get(params, path), {"hessian": 2 * x.T @ x / len(tokens)}, name=path)
  assert q0.perm is not None and q0.scale_dtype == np.float16 and q0.scale.shape == (5, 192)
  qparams = tree.replace(qparams, path, q0)
  out = export_gptq(tmp_path / "smollm2-gptq", config, qparams, tokenizer=tokenizer)
  cfg = assert_reads_back(out, config, qparams)
  assert cfg["quantization_config"] == {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True,
                                        "sym": False, "checkpoint_format": "gptq"}
  tensors = load_file(out / "model.safetensors")
  assert not np.array_equal(tensors["model.layers.0.self_attn.k_proj.g_idx"], np.arange(576) // 128)
  k = qparams["layers_5"]["attn"]["k_proj"]["kernel"]  # no act-order: lqx's words are the qweight
  np.testing.assert_array_equal(tensors["model.layers.5.self_attn.k_proj.qweight"].view(np.uint32),
                                np.asarray(k.packed))
  assert (out / "tokenizer.json").is_file()
