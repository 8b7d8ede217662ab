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


def write_gguf(path, model, qtype=F32, arch="llama", drop=(), replace=None, skip_keys=(), extra=None,
               tokenizer=None):
  """Writes ``model`` as a llama GGUF; 2-D weights in ``qtype``, norms always F32.

  ``extra``: metadata ``key -> (value, GGUFValueType)`` added after the usual keys;
  ``tokenizer``: ``(tokens, merges)`` of a byte-level BPE vocabulary to store.
  """
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
  for key, (value, vtype) in (extra or {}).items():
    sub = None
    if vtype == gguf.GGUFValueType.ARRAY:
      sub = gguf.GGUFValueType.STRING if isinstance(value[0], str) else gguf.GGUFValueType.UINT8
    w.add_key_value(key, value, vtype, sub_type=sub)
  if tokenizer is not None:
    tokens, merges = tokenizer
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t.startswith("<") else 1 for t in tokens])
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


# ----------------------------------------------------------------------------- hostile files (issue P6)

VT = gguf.GGUFValueType
U32, U64, I32, F32V, STR, ARR = VT.UINT32, VT.UINT64, VT.INT32, VT.FLOAT32, VT.STRING, VT.ARRAY


def _patch(path, old: bytes, new: bytes):
  """Replaces the one occurrence of ``old`` in the file by ``new`` (same length)."""
  data = path.read_bytes()
  assert data.count(old) == 1 and len(old) == len(new), old
  path.write_bytes(data.replace(old, new))


def _after_key(path, key: str) -> int:
  """File offset just past the name of metadata key ``key`` (where its type starts)."""
  data = path.read_bytes()
  name = len(key).to_bytes(8, "little") + key.encode()
  assert data.count(name) == 1
  return data.index(name) + len(name)


def _put(path, offset: int, value: int, width: int = 8):
  data = bytearray(path.read_bytes())
  data[offset:offset + width] = (value % (1 << 8 * width)).to_bytes(width, "little")
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("length", [2**31 + 1, 2**63 - 1, 2**64 - 1])
def test_huge_array_length_is_rejected_before_the_gguf_reader(tmp_path, length, monkeypatch):
  path = write_gguf(tmp_path / "arr.gguf", hf_model(), extra={"general.tags": ([1, 2, 3], ARR)})
  _put(path, _after_key(path, "general.tags") + 8, length)  # after the type and element type
  monkeypatch.setattr(gguf, "GGUFReader", None)  # the bound must not depend on the dependency
  with pytest.raises(GGUFError, match=rf"arr\.gguf.*array length of 'general\.tags' declares {length}"):
    load_gguf(path)


@pytest.mark.parametrize("field,offset", [("tensor count", 8), ("metadata key/value count", 16)])
@pytest.mark.parametrize("value", [2**31, 2**63 - 1])
def test_huge_header_counts_are_rejected(tmp_path, field, offset, value):
  path = write_gguf(tmp_path / "count.gguf", hf_model())
  _put(path, offset, value)
  with pytest.raises(GGUFError, match=rf"count\.gguf: {field} {value} is more than the file can hold"):
    load_gguf(path)


def test_huge_string_length_is_rejected(tmp_path):
  path = write_gguf(tmp_path / "str.gguf", hf_model(), extra={"general.name": ("tiny", STR)})
  _put(path, _after_key(path, "general.name") + 4, 2**62)
  with pytest.raises(GGUFError, match=r"str\.gguf.*value of 'general\.name' declares a length of"):
    load_gguf(path)


def test_non_utf8_metadata_is_a_gguf_error(tmp_path):
  path = write_gguf(tmp_path / "utf.gguf", hf_model(), extra={"general.name": ("ABCD", STR)})
  _patch(path, b"ABCD", b"\xff\xfe\xff\xfe")
  with pytest.raises(GGUFError, match=r"utf\.gguf.*value of 'general\.name' is not valid UTF-8"):
    load_gguf(path)


def test_gguf_error_is_a_model_file_error():
  from lqx.io.errors import ModelFileError

  assert issubclass(GGUFError, ModelFileError) and issubclass(GGUFError, ValueError)


@pytest.mark.parametrize("value,vtype", [(10**6, U32), (2**32, U64), (2**63 - 1, U64)])
def test_huge_block_count_is_rejected_at_once(tmp_path, value, vtype):
  import time

  path = write_gguf(tmp_path / "blocks.gguf", hf_model(), skip_keys=("block_count",),
                    extra={"llama.block_count": (value, vtype)})
  t0 = time.perf_counter()
  with pytest.raises(GGUFError, match=rf"blocks\.gguf.*'llama\.block_count' is {value}, expected 1 to"):
    load_gguf(path)
  assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize("value,match", [
    (1, r"tensor 'blk\.1\.[a-z_.]+' is beyond llama\.block_count=1 \(extra tensors\)"),
    (3, r"llama\.block_count=3 but the file holds no tensors for block 2"),
])
def test_block_count_must_match_the_tensors(tmp_path, value, match):
  path = write_gguf(tmp_path / "blocks.gguf", hf_model(), skip_keys=("block_count",),
                    extra={"llama.block_count": (value, U32)})
  with pytest.raises(GGUFError, match=r"blocks\.gguf: " + match):
    load_gguf(path)


@pytest.mark.parametrize("key,value,vtype,match", [
    ("head_count", 0, U32, r"'llama\.attention\.head_count' is 0, expected 1 to"),
    ("head_count", "four", STR, r"'llama\.attention\.head_count' must be an integer, got string 'four'"),
    ("head_count_kv", 3, U32, r"head_count=4 is not a multiple of llama\.attention\.head_count_kv=3"),
    ("head_count_kv", -2, I32, r"'llama\.attention\.head_count_kv' is -2"),
    ("embedding_length", 2.5, F32V, r"'llama\.embedding_length' must be an integer, got float32"),
    ("feed_forward_length", 0, U32, r"'llama\.feed_forward_length' is 0"),
    ("vocab_size", 2**40, U64, r"'llama\.vocab_size' is 1099511627776"),
    ("rope_freq_base", float("nan"), F32V, r"'llama\.rope\.freq_base' is nan"),
    ("rope_freq_base", 0.0, F32V, r"'llama\.rope\.freq_base' is 0\.0"),
    ("rope_freq_base", -1.0, F32V, r"'llama\.rope\.freq_base' is -1\.0"),
    ("rope_freq_base", float("inf"), F32V, r"'llama\.rope\.freq_base' is inf"),
    ("layer_norm_rms_eps", float("nan"), F32V, r"'llama\.attention\.layer_norm_rms_epsilon' is nan"),
    ("layer_norm_rms_eps", "1e-5", STR, r"'llama\.attention\.layer_norm_rms_epsilon' must be a number"),
    ("eos", 128, U32, r"'tokenizer\.ggml\.eos_token_id' is 128, expected 0 to 127"),
    ("context_length", 0, U32, r"'llama\.context_length' is 0"),
])
def test_bad_metadata_values_are_gguf_errors(tmp_path, key, value, vtype, match):
  full = {"head_count": "llama.attention.head_count", "head_count_kv": "llama.attention.head_count_kv",
          "rope_freq_base": "llama.rope.freq_base", "layer_norm_rms_eps": "llama.attention.layer_norm_rms_epsilon",
          "eos": "tokenizer.ggml.eos_token_id"}.get(key, f"llama.{key}")
  path = write_gguf(tmp_path / "meta.gguf", hf_model(), skip_keys=(key,), extra={full: (value, vtype)})
  with pytest.raises(GGUFError, match=r"meta\.gguf: .*" + match):
    load_gguf(path)


@pytest.mark.parametrize("extra,match", [
    ({"llama.rope.scaling.type": ("linear", STR)}, r"llama\.rope\.scaling\.type 'linear' is not supported"),
    ({"llama.rope.scaling.factor": (4.0, F32V)}, r"llama\.rope\.scaling\.factor=4\.0 is not supported"),
    ({"llama.rope.freq_scale": (0.5, F32V)}, r"llama\.rope\.freq_scale=0\.5 is not supported"),
    ({"llama.rope.dimension_count": (8, U32)}, r"llama\.rope\.dimension_count=8 differs from the head dimension 16 "
                                               r"\(partial rotary"),
    ({"llama.attention.value_length": (32, U32)}, r"llama\.attention\.value_length=32 differs"),
    ({"llama.expert_count": (8, U32)}, r"llama\.expert_count=8 is not supported \(mixture of experts"),
    ({"llama.attention.causal": (False, VT.BOOL)}, r"llama\.attention\.causal=false is not supported"),
    ({"llama.attention.layer_norm_epsilon": (1e-5, F32V)},
     r"metadata key 'llama\.attention\.layer_norm_epsilon' is not supported"),
    ({"llama.rope.scaling.original_context_length": (32, U32)},
     r"'llama\.rope\.scaling\.original_context_length' is not supported"),
    ({"split.count": (2, VT.UINT16)}, r"split GGUF files are not supported"),
])
def test_unsupported_features_are_rejected(tmp_path, extra, match):
  path = write_gguf(tmp_path / "feat.gguf", hf_model(), extra=extra)
  with pytest.raises(GGUFError, match=r"feat\.gguf: .*" + match):
    load_gguf(path)


def test_neutral_feature_metadata_is_accepted(tmp_path):
  extra = {"llama.rope.scaling.type": ("none", STR), "llama.rope.dimension_count": (16, U32),
           "llama.expert_count": (0, U32), "llama.attention.key_length": (16, U32),
           "llama.attention.value_length": (16, U32)}
  config, _ = load_gguf(write_gguf(tmp_path / "ok.gguf", hf_model(), extra=extra))
  assert config.head_dim == 16


def test_sliding_window_caps_max_seq_len_as_the_hf_loader(tmp_path):
  path = write_gguf(tmp_path / "swa.gguf", hf_model(), extra={"llama.attention.sliding_window": (32, U32)})
  assert load_gguf(path)[0].max_seq_len == 32


@pytest.mark.parametrize("name,shape,match", [
    ("blk.0.attn_output.bias", (64,), r"unexpected tensors \['blk\.0\.attn_output\.bias'\]"),
    ("rope_freqs.weight", (8,), r"'rope_freqs\.weight' \(scaled RoPE"),
    ("blk.1.ffn_gate_inp.weight", (64, 4), r"mixture-of-experts"),
    ("blk.7.ffn_up.weight", (96, 64), r"'blk\.7\.ffn_up\.weight' is beyond llama\.block_count=2"),
    ("blk.x.ffn_up.weight", (96, 64), r"unexpected tensor 'blk\.x\.ffn_up\.weight'"),
])
def test_extra_tensors_are_rejected(tmp_path, name, shape, match):
  bad = {name: np.ones(shape[::-1] if len(shape) > 1 else shape, np.float32)}
  path = write_gguf(tmp_path / "extra.gguf", hf_model(), replace=bad)
  with pytest.raises(GGUFError, match=r"extra\.gguf: .*" + match):
    load_gguf(path)


def test_duplicate_tensor_name_is_rejected(tmp_path):
  path = write_gguf(tmp_path / "dup.gguf", hf_model())
  _patch(path, b"blk.1.ffn_up.weight", b"blk.0.ffn_up.weight")
  data = path.read_bytes()
  assert data.count(b"blk.0.ffn_up.weight") == 2
  with pytest.raises(GGUFError, match=r"dup\.gguf: tensor 'blk\.0\.ffn_up\.weight' appears twice"):
    load_gguf(path)


def test_duplicate_metadata_key_is_rejected(tmp_path):
  path = write_gguf(tmp_path / "dup.gguf", hf_model(), extra={"general.nama": ("x", STR), "general.name": ("y", STR)})
  _patch(path, b"general.nama", b"general.name")
  with pytest.raises(GGUFError, match=r"dup\.gguf: metadata key 'general\.name' appears twice"):
    load_gguf(path)


def test_integer_tensor_type_is_rejected(tmp_path):
  bad = {"blk.0.ffn_norm.weight": np.ones(64, np.int32)}
  path = write_gguf(tmp_path / "int.gguf", hf_model(), replace=bad)
  with pytest.raises(GGUFError, match=r"int\.gguf: tensor 'blk\.0\.ffn_norm\.weight' has integer type I32"):
    load_gguf(path)


def test_tensor_offset_past_the_end_is_rejected(tmp_path):
  path = write_gguf(tmp_path / "off.gguf", hf_model())
  data = path.read_bytes()
  name = b"output_norm.weight"
  at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name) + 4 + 8 + 4  # 1 dim, type
  _put(path, at, 2**40)
  with pytest.raises(GGUFError, match=r"off\.gguf: tensor 'output_norm\.weight' data .* runs past the end"):
    load_gguf(path)


# ----------------------------------------------------------------------------- tokenizer


def tiny_tokenizer(letters="abcdefghijklmnopqrstuvwxyz"):
  """A byte-level BPE vocabulary (tokens, merges) over ``letters``, with special tokens 0-2."""
  tokens = ["<unk>", "<s>", "</s>", "\u0120", *letters]
  merges = []
  for a, b in (("t", "h"), ("th", "e"), ("\u0120", "the"), ("i", "n"), ("\u0120", "k")):
    if a in tokens and b in tokens:
      merges.append(f"{a} {b}")
      tokens.append(a + b)
  return tokens, merges


def test_tokenizer_ignores_files_next_to_the_gguf(tmp_path):
  """A hostile tokenizer_config.json (auto_map to code) and tokenizer.json in the folder are not used."""
  import json

  from lqx.io.gguf import load_tokenizer

  clean, hostile = tmp_path / "clean", tmp_path / "hostile"
  clean.mkdir()
  hostile.mkdir()
  tok = tiny_tokenizer()
  write_gguf(clean / "m.gguf", hf_model(), tokenizer=tok)
  (hostile / "m.gguf").write_bytes((clean / "m.gguf").read_bytes())
  want = load_tokenizer(clean / "m.gguf")
  # A different vocabulary saved as tokenizer.json, plus code that marks its import.
  write_gguf(tmp_path / "other.gguf", hf_model(), tokenizer=tiny_tokenizer("zyxwvutsrqponmlkjihgfedcba!?"))
  load_tokenizer(tmp_path / "other.gguf").save_pretrained(hostile)
  marker = tmp_path / "EXECUTED"
  (hostile / "evil_tok.py").write_text(
      f"open({str(marker)!r}, 'w').write('pwned')\n"
      "from transformers import PreTrainedTokenizerFast\n"
      "class EvilTokenizer(PreTrainedTokenizerFast):\n  pass\n")
  cfg = json.loads((hostile / "tokenizer_config.json").read_text())
  cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil_tok.EvilTokenizer", None]})
  (hostile / "tokenizer_config.json").write_text(json.dumps(cfg))
  (hostile / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {
      "AutoConfig": "evil_tok.EvilConfig", "AutoTokenizer": ["evil_tok.EvilTokenizer", None]}}))
  got = load_tokenizer(hostile / "m.gguf")
  assert not marker.exists()
  assert type(got) is type(want)
  assert got.backend_tokenizer.to_str() == want.backend_tokenizer.to_str()
  assert got.get_vocab() == want.get_vocab() and len(got) == len(want) >= len(tok[0])
  assert got("the king")["input_ids"] == want("the king")["input_ids"]


def test_tokenizer_rejects_out_of_range_special_ids(tmp_path):
  from lqx.io.gguf import load_tokenizer

  path = write_gguf(tmp_path / "tok.gguf", hf_model(), tokenizer=tiny_tokenizer(), skip_keys=("eos",),
                    extra={"tokenizer.ggml.eos_token_id": (4000, U32)})
  with pytest.raises(GGUFError, match=r"tok\.gguf: metadata key 'tokenizer\.ggml\.eos_token_id' is 4000"):
    load_tokenizer(path)


def test_tokenizer_missing_is_a_gguf_error(tmp_path):
  from lqx.io.gguf import load_tokenizer

  with pytest.raises(GGUFError, match=r"none\.gguf: no tokenizer"):
    load_tokenizer(write_gguf(tmp_path / "none.gguf", hf_model()))
