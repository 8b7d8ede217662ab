"""lqx.io.gguf on small GGUF files written here with gguf.GGUFWriter.

The files are converted from random transformers models the way llama.cpp's
``convert_hf_to_gguf.py`` does it (names, Q/K row permutation, metadata), so
parity with the PyTorch model checks the un-permutation end to end.
"""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the GGUF reader needs the gguf package")
torch = pytest.importorskip("torch", reason="GGUF parity tests need PyTorch (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers", reason="GGUF parity tests need transformers")

import jax.numpy as jnp  # noqa: E402

from lqx.io import load_model  # noqa: E402
from lqx.io.gguf import GGUFError, load_gguf  # noqa: E402
from lqx.models import llama  # noqa: E402

F32, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0

_NAMES = {  # HF name (per layer) -> GGUF name (per block), as in gguf.tensor_mapping
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def hf_model(tie=False, seed=0):
  """A random float32 LlamaForCausalLM (GQA: 4 heads, 2 KV heads) with non-unit norm gains."""
  config = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      intermediate_size=96, max_position_embeddings=64, rope_theta=20000.0, rms_norm_eps=1e-5,
      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
  model = transformers.LlamaForCausalLM(config).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      p.copy_(1 + 0.1 * noise if "norm" in name else 0.08 * noise)
  return model


def permute(w, n_head, n_head_kv=None):
  """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``: HF half-split rows -> interleaved pairs."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_tensors(model):
  """GGUF name -> torch-order float32 array, Q/K permuted as llama.cpp stores them."""
  c = model.config
  out = {}
  for name, t in model.state_dict().items():
    w = t.detach().numpy().astype(np.float32)
    if name == "model.embed_tokens.weight":
      out["token_embd.weight"] = w
    elif name == "model.norm.weight":
      out["output_norm.weight"] = w
    elif name == "lm_head.weight":
      if not c.tie_word_embeddings:
        out["output.weight"] = w
    else:
      _, _, i, rest = name.split(".", 3)
      if rest == "self_attn.q_proj.weight":
        w = permute(w, c.num_attention_heads, c.num_attention_heads)
      elif rest == "self_attn.k_proj.weight":
        w = permute(w, c.num_attention_heads, c.num_key_value_heads)
      out[f"blk.{i}.{_NAMES[rest]}"] = w
  return out


def write_gguf(path, model, qtype=F32, arch="llama", drop=(), replace=None, skip_keys=()):
  """Writes ``model`` as a llama GGUF; 2-D weights in ``qtype``, norms always F32."""
  c = model.config
  tensors = {**to_gguf_tensors(model), **(replace or {})}
  w = gguf.GGUFWriter(str(path), arch)
  keys = {
      "context_length": lambda: w.add_context_length(c.max_position_embeddings),
      "embedding_length": lambda: w.add_embedding_length(c.hidden_size),
      "block_count": lambda: w.add_block_count(c.num_hidden_layers),
      "feed_forward_length": lambda: w.add_feed_forward_length(c.intermediate_size),
      "head_count": lambda: w.add_head_count(c.num_attention_heads),
      "head_count_kv": lambda: w.add_head_count_kv(c.num_key_value_heads),
      "rope_freq_base": lambda: w.add_rope_freq_base(c.rope_parameters["rope_theta"]),
      "layer_norm_rms_eps": lambda: w.add_layer_norm_rms_eps(c.rms_norm_eps),
      "vocab_size": lambda: w.add_vocab_size(c.vocab_size),
      "bos": lambda: w.add_bos_token_id(c.bos_token_id),
      "eos": lambda: w.add_eos_token_id(c.eos_token_id),
  }
  for key, add in keys.items():
    if key not in skip_keys:
      add()
  for name, t in tensors.items():
    if name in drop:
      continue
    if t.ndim == 2 and qtype != F32:
      w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _tokens(T=11, B=2):
  return np.random.default_rng(0).integers(0, 128, (B, T)).astype(np.int32)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_f32_gguf_matches_hf(tmp_path, tie):
  from lqx.io.hf import load_hf

  model = hf_model(tie)
  config, params = load_gguf(write_gguf(tmp_path / "tiny.gguf", model))
  assert (config.n_heads, config.n_kv_heads, config.head_dim, config.ffn_dim) == (4, 2, 16, 96)
  assert (config.rope_theta, config.tie_embeddings, config.max_seq_len) == (20000.0, tie, 64)
  assert (config.bos_token_id, config.eos_token_id) == (1, 2)
  # Same pytree as the safetensors path, bit for bit (so Q/K are un-permuted exactly).
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  _, want = load_hf(tmp_path / "hf")
  for (kp, a), (_, b) in zip(_leaves(params), _leaves(want), strict=True):
    assert a.shape == b.shape and np.array_equal(a, b), kp
  tokens = _tokens()
  with torch.no_grad():
    ref = model(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(np.asarray(llama.apply(config, params, jnp.asarray(tokens))), ref, atol=1e-4, rtol=0)


def _leaves(tree):
  import jax

  return jax.tree_util.tree_flatten_with_path(tree)[0]


def test_q8_0_gguf_dequantizes_and_unpermutes(tmp_path):
  model = hf_model()
  config, params = load_model(write_gguf(tmp_path / "tiny-q8.gguf", model, qtype=Q8_0))
  wq = model.model.layers[1].self_attn.k_proj.weight.detach().numpy()
  # Q8_0 blocks run along input channels, so they commute with llama.cpp's row permutation.
  want = gguf.quants.dequantize(gguf.quants.quantize(wq, Q8_0), Q8_0).T
  np.testing.assert_array_equal(params["layers_1"]["attn"]["k_proj"]["kernel"], want)
  assert not np.array_equal(want, wq.T)  # the quantization did round
  tokens = _tokens()
  with torch.no_grad():
    ref = model(torch.from_numpy(tokens).long()).logits.numpy()
  got = np.asarray(llama.apply(config, params, jnp.asarray(tokens)))
  assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()


# ----------------------------------------------------------------------------- bad input


def test_truncated_gguf_names_file(tmp_path):
  path = write_gguf(tmp_path / "cut.gguf", hf_model())
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(GGUFError, match=r"cut\.gguf.*truncated"):
    load_gguf(path)


def test_truncated_header_names_file(tmp_path):
  path = write_gguf(tmp_path / "cut.gguf", hf_model())
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(GGUFError, match=r"cut\.gguf"):
    load_gguf(path)


def test_unknown_architecture(tmp_path):
  path = write_gguf(tmp_path / "neox.gguf", hf_model(), arch="gptneox")
  with pytest.raises(GGUFError, match=r"neox\.gguf.*'gptneox'.*supported"):
    load_gguf(path)


def test_missing_tensor_names_it(tmp_path):
  path = write_gguf(tmp_path / "hole.gguf", hf_model(), drop=("blk.1.ffn_up.weight",))
  with pytest.raises(GGUFError, match=r"hole\.gguf.*'blk\.1\.ffn_up\.weight' is missing"):
    load_gguf(path)


def test_missing_metadata_names_key(tmp_path):
  path = write_gguf(tmp_path / "meta.gguf", hf_model(), skip_keys=("block_count",))
  with pytest.raises(GGUFError, match=r"meta\.gguf.*'llama\.block_count' is missing"):
    load_gguf(path)


def test_no_vocab_size_is_a_clear_error(tmp_path):
  path = write_gguf(tmp_path / "novocab.gguf", hf_model(), skip_keys=("vocab_size",))
  with pytest.raises(GGUFError, match=r"novocab\.gguf.*vocab"):
    load_gguf(path)


def test_absent_special_tokens_are_none(tmp_path):
  config, _ = load_gguf(write_gguf(tmp_path / "nobos.gguf", hf_model(), skip_keys=("bos", "eos")))
  assert config.bos_token_id is None and config.eos_token_id is None


def test_wrong_shape_names_tensor(tmp_path):
  bad = {"blk.0.attn_k.weight": np.zeros((24, 64), np.float32)}
  path = write_gguf(tmp_path / "shape.gguf", hf_model(), replace=bad)
  with pytest.raises(GGUFError, match=r"'blk\.0\.attn_k\.weight' has shape \(24, 64\), expected \(32, 64\)"):
    load_gguf(path)


def test_nan_names_tensor(tmp_path):
  bad = np.ones(64, np.float32)
  bad[5] = np.nan
  path = write_gguf(tmp_path / "nan.gguf", hf_model(), replace={"blk.1.ffn_norm.weight": bad})
  with pytest.raises(GGUFError, match=r"'blk\.1\.ffn_norm\.weight' contains NaN"):
    load_gguf(path)


@pytest.mark.slow
def test_smollm2_loads_by_name():
  from lqx.io import load_tokenizer

  config, params = load_model("smollm2-135m")
  assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads, config.ffn_dim) == (30, 576, 9, 3, 1536)
  assert config.tie_embeddings and config.rope_theta == 100000.0
  assert params["layers_0"]["attn"]["k_proj"]["kernel"].shape == (576, 192)
  ids = load_tokenizer("smollm2-135m")("The king is dead.")["input_ids"]
  logits = np.asarray(llama.apply(config, params, jnp.asarray([ids])))
  assert np.isfinite(logits).all()
