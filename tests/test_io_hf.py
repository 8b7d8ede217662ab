"""lqx.io.hf against transformers' PyTorch models on small random configs."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="HF parity tests need PyTorch (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers", reason="HF parity tests need transformers")

import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from lqx.io import hf, load_model, load_tokenizer  # noqa: E402
from lqx.models import llama  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
             bos_token_id=1, eos_token_id=2)


def _randomize(model, seed=0):
  """Non-trivial values everywhere: HF init leaves norm gains at 1 and biases at 0."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      p.copy_(1 + 0.1 * noise if "norm" in name else (0.1 if name.endswith("bias") else 0.08) * noise)
  return model


def save_hf(folder, arch="llama", shard=None, dtype=torch.float32, **overrides):
  """A random transformers model saved as safetensors in ``folder``; returns the torch model."""
  cls_config, cls_model = {
      "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
      "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
  }[arch]
  config = cls_config(**{**SMALL, **overrides})
  model = _randomize(cls_model(config).eval())
  model.config._attn_implementation = "eager"
  kw = {"max_shard_size": shard} if shard else {}
  model.to(dtype).save_pretrained(folder, safe_serialization=True, **kw)
  return model.float()


def _tokens(config, T=11, B=2, seed=0):
  return np.random.default_rng(seed).integers(0, config.vocab_size, (B, T)).astype(np.int32)


def _assert_logits_match(model, config, params, T=11):
  tokens = _tokens(config, T)
  with torch.no_grad():
    want = model(torch.from_numpy(tokens).long()).logits.numpy()
  got = np.asarray(llama.apply(config, params, jnp.asarray(tokens)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie,theta,shard", [(False, 10000.0, None), (True, 500000.0, None),
                                             (False, 10000.0, "20KB")],
                         ids=["gqa-untied", "tied-theta5e5", "sharded"])
def test_llama_parity(tmp_path, tie, theta, shard):
  model = save_hf(tmp_path, tie_word_embeddings=tie, rope_theta=theta, shard=shard)
  if shard:
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
  config, params = hf.load_hf(tmp_path)
  assert (config.n_heads, config.n_kv_heads, config.head_dim) == (4, 2, 16)
  assert config.rope_theta == theta and config.tie_embeddings == tie
  assert (config.bos_token_id, config.eos_token_id, config.max_seq_len) == (1, 2, 64)
  assert ("lm_head" in params) == (not tie)
  assert params["layers_1"]["attn"]["k_proj"]["kernel"].shape == (64, 32)  # (in, out)
  _assert_logits_match(model, config, params)


def test_qwen2_biases(tmp_path):
  model = save_hf(tmp_path, arch="qwen2", tie_word_embeddings=True, rope_theta=1e6)
  config, params = load_model(tmp_path)
  assert config.attn_bias and config.rope_theta == 1e6
  assert params["layers_0"]["attn"]["q_proj"]["bias"].shape == (64,)
  assert "bias" not in params["layers_0"]["attn"]["o_proj"]
  _assert_logits_match(model, config, params)


def test_mistral_sliding_window_caps_max_seq_len(tmp_path):
  model = save_hf(tmp_path, arch="mistral", sliding_window=16, head_dim=16)
  config, params = hf.load_hf(tmp_path)
  assert config.max_seq_len == 16  # full causal attention == sliding window up to 16 tokens
  _assert_logits_match(model, config, params, T=16)


def test_bf16_checkpoint(tmp_path):
  model = save_hf(tmp_path, dtype=torch.bfloat16)
  config, params = hf.load_hf(tmp_path)
  w = params["layers_0"]["mlp"]["down_proj"]["kernel"]
  want = model.model.layers[0].mlp.down_proj.weight.detach().to(torch.bfloat16).float().numpy().T
  assert w.dtype == np.float32 and np.array_equal(w, want)
  _, raw = hf.load_hf(tmp_path, dtype=None)
  assert raw["layers_0"]["mlp"]["down_proj"]["kernel"].dtype.name == "bfloat16"


def test_generate_matches_recompute_and_hf(tmp_path):
  model = save_hf(tmp_path, rope_theta=10000.0)
  config, params = hf.load_hf(tmp_path)
  prompt = _tokens(config, T=5)
  steps = 6
  got = np.asarray(llama.generate(config, params, prompt, steps))
  seq = prompt
  for _ in range(steps):  # greedy by recomputing the whole prefix
    nxt = np.asarray(llama.apply(config, params, jnp.asarray(seq)))[:, -1].argmax(-1)
    seq = np.concatenate([seq, nxt[:, None].astype(np.int32)], axis=1)
  np.testing.assert_array_equal(got, seq[:, prompt.shape[1]:])
  model.generation_config.eos_token_id = None  # random weights: never stop early
  with torch.no_grad():
    out = model.generate(torch.from_numpy(prompt).long(), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                         do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)
  np.testing.assert_array_equal(got, out[:, prompt.shape[1]:].numpy())


def test_tokenizer_from_folder(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "to", "be", "or", "not"])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path)
  save_hf(tmp_path)
  assert load_tokenizer(tmp_path)("to be or not")["input_ids"] == [3, 4, 5, 6]


# ----------------------------------------------------------------------------- bad input


def test_truncated_safetensors_names_file(tmp_path):
  save_hf(tmp_path)
  file = tmp_path / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[: len(data) // 2])
  with pytest.raises(hf.HFError, match=r"model\.safetensors.*truncated"):
    hf.load_hf(tmp_path)


def test_truncated_shard_names_file(tmp_path):
  save_hf(tmp_path, shard="20KB")
  file = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
  file.write_bytes(file.read_bytes()[:100])
  with pytest.raises(hf.HFError, match=file.name):
    hf.load_hf(tmp_path)


def _rewrite(folder, edit):
  """Rewrites model.safetensors with ``edit(tensors)`` applied (numpy writer, float32)."""
  from safetensors.numpy import load_file

  tensors = load_file(folder / "model.safetensors")
  edit(tensors)
  save_file(tensors, folder / "model.safetensors")


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
  save_hf(tmp_path)
  name = "model.layers.1.self_attn.k_proj.weight"
  _rewrite(tmp_path, lambda t: t.__setitem__(name, np.zeros((24, 64), np.float32)))
  with pytest.raises(hf.HFError, match=rf"{name}.*\(24, 64\).*expected \(32, 64\)"):
    hf.load_hf(tmp_path)


def test_missing_tensor_names_it(tmp_path):
  save_hf(tmp_path)
  name = "model.layers.0.mlp.up_proj.weight"
  _rewrite(tmp_path, lambda t: t.pop(name))
  with pytest.raises(hf.HFError, match=name):
    hf.load_hf(tmp_path)


def test_nan_names_tensor(tmp_path):
  save_hf(tmp_path)
  name = "model.norm.weight"
  _rewrite(tmp_path, lambda t: t[name].__setitem__(3, np.inf))
  with pytest.raises(hf.HFError, match=rf"{name}.*NaN or Inf"):
    hf.load_hf(tmp_path)


def _edit_config(folder, **changes):
  cfg = json.loads((folder / "config.json").read_text())
  cfg.update(changes)
  (folder / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture_names_it(tmp_path):
  save_hf(tmp_path)
  _edit_config(tmp_path, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
  with pytest.raises(hf.HFError, match=r"GPTNeoXForCausalLM.*supported: LlamaForCausalLM"):
    load_model(tmp_path)


def test_rope_scaling_rejected(tmp_path):
  save_hf(tmp_path)
  _edit_config(tmp_path, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
  with pytest.raises(hf.HFError, match="llama3"):
    hf.load_hf(tmp_path)


def test_dispatch_errors(tmp_path):
  with pytest.raises(ValueError, match="not a known model name"):
    load_model(tmp_path / "nope")
  with pytest.raises(ValueError, match="no config.json"):
    load_model(tmp_path)
  save_hf(tmp_path)
  with pytest.raises(hf.HFError, match="no tokenizer files"):
    load_tokenizer(tmp_path)
