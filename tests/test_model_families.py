"""Model families lqx reads from Hugging Face folders, each against transformers' PyTorch model.

Llama 3.1 RoPE scaling (both config.json spellings), Qwen2 (q/k/v biases, sliding
window on some layers), Mistral (sliding window: exact up to the window, which
caps ``max_seq_len``), and the clear load errors for what lqx does not compute.
"""

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="HF parity tests need PyTorch")
transformers = pytest.importorskip("transformers", reason="HF parity tests need transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from lqx.io import checkpoint, hf, load_model  # noqa: E402
from lqx.models import llama  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
             bos_token_id=1, eos_token_id=2)
# head_dim 16, theta 1e4: wavelengths 6.3, 20, 63, 200, ... -> with L = 32 one kept (< L/4),
# one mixed and six divided by the factor, so all three pieces of the rescaling are exercised.
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def save_family(folder, family, **overrides):
  """A transformers model of ``family`` with random weights (norm gains and biases too), saved as
  safetensors in ``folder``; returns it in eval mode with eager attention."""
  cls_config, cls_model = FAMILIES[family]
  model = cls_model(cls_config(**{**SMALL, **overrides})).eval()
  model.config._attn_implementation = "eager"
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      p.copy_(1 + 0.1 * noise if "norm" in name else (0.1 if name.endswith("bias") else 0.08) * noise)
  model.save_pretrained(folder, safe_serialization=True)
  return model


def _edit_config(folder, edit):
  file = folder / "config.json"
  cfg = json.loads(file.read_text())
  edit(cfg)
  file.write_text(json.dumps(cfg))


def _logits(model, config, params, T, seed=0):
  """(transformers logits, lqx logits) on the same random (2, T) token ids."""
  tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (2, T)).astype(np.int32)
  with torch.no_grad():
    want = model(torch.from_numpy(tokens).long()).logits.numpy()
  return want, np.asarray(llama.apply(config, params, jnp.asarray(tokens)))


# ----------------------------------------------------------------------------- Llama 3.1 RoPE


@pytest.mark.parametrize("head_dim,theta,orig", [(16, 1e4, 32), (64, 5e5, 64), (128, 5e5, 8192)])
def test_llama3_inv_freq_matches_transformers(head_dim, theta, orig):
  rp = {**LLAMA3, "rope_theta": theta, "original_max_position_embeddings": orig}
  hf_config = transformers.LlamaConfig(**{**SMALL, "hidden_size": 4 * head_dim, "head_dim": head_dim,
                                          "max_position_embeddings": 8 * orig, "rope_parameters": rp})
  want = ROPE_INIT_FUNCTIONS["llama3"](hf_config)[0].numpy()
  scaling = llama.Llama3RoPE(8.0, 1.0, 4.0, orig)
  got = np.asarray(llama.rope_inv_freq(head_dim, theta, scaling))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  plain = np.asarray(llama.rope_inv_freq(head_dim, theta))
  wavelen = 2 * np.pi / plain
  kept, scaled = wavelen < orig / 4, wavelen > orig
  np.testing.assert_array_equal(got[kept], plain[kept])
  np.testing.assert_allclose(got[scaled], plain[scaled] / 8, rtol=1e-6)
  mixed = ~kept & ~scaled
  assert scaled.any() and np.all((got[mixed] < plain[mixed]) & (got[mixed] > plain[mixed] / 8))


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_llama3_parity(tmp_path, spelling):
  model = save_family(tmp_path, "llama", rope_parameters=dict(LLAMA3))
  if spelling == "rope_scaling":  # transformers 4 writes the scaling object and the base apart
    _edit_config(tmp_path, lambda c: c.update(rope_theta=c["rope_parameters"].pop("rope_theta"),
                                              rope_scaling=c.pop("rope_parameters")))
    assert "rope_parameters" not in (tmp_path / "config.json").read_text()
  config, params = load_model(tmp_path)
  assert config.rope_scaling == llama.Llama3RoPE(8.0, 1.0, 4.0, 32)
  assert (config.rope_theta, config.max_seq_len) == (10000.0, 128)
  plain = np.asarray(llama.rope_inv_freq(config.head_dim, config.rope_theta))
  assert not np.allclose(np.asarray(llama.rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)),
                         plain)
  want, got = _logits(model, config, params, T=96)  # positions well past original_max_position_embeddings
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  _, unscaled = _logits(model, dataclasses.replace(config, rope_scaling=None), params, T=96)
  assert np.abs(unscaled - want).max() > 1e-2  # the scaling matters at these lengths


def test_llama3_config_checkpoint_round_trip(tmp_path):
  config = llama.LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24,
                             rope_theta=5e5, rope_scaling=(8, 1, 4.0, 8192.0))
  assert type(config.rope_scaling) is llama.Llama3RoPE and config.rope_scaling == (8.0, 1.0, 4.0, 8192)
  assert type(config.rope_scaling.original_max_len) is int and hash(config) == hash(dataclasses.replace(config))
  params = llama.init_params(config, jax.random.key(0))
  checkpoint.save(tmp_path / "new", config, params)
  restored, _, _ = checkpoint.restore(tmp_path / "new")
  assert restored == config and type(restored.rope_scaling) is llama.Llama3RoPE
  # A checkpoint written before the field existed (no "rope_scaling" among the fields) loads as plain RoPE.
  plain = dataclasses.replace(config, rope_scaling=None)
  checkpoint.save(tmp_path / "old", plain, params)
  jpath = tmp_path / "old" / checkpoint.JSON_NAME
  doc = json.loads(jpath.read_text())
  del doc["config"]["fields"]["rope_scaling"]
  doc["config_sha256"] = checkpoint._digest(doc["config"])
  jpath.write_text(json.dumps(doc))
  assert checkpoint.restore(tmp_path / "old")[0] == plain


@pytest.mark.parametrize("scaling,match", [
    ((8.0, 4.0, 4.0, 32), "high_freq_factor=4.0 must be above low_freq_factor=4.0"),
    ((0.0, 1.0, 4.0, 32), "factor must be a finite number above 0"),
    ((8.0, 1.0, 4.0, 32.5), "original_max_len must be an integer"),
    ((8.0, 1.0, 4.0), "rope_scaling must be None or a Llama3RoPE"),
    ("llama3", "rope_scaling must be None or a Llama3RoPE"),
])
def test_llama3_config_checked(scaling, match):
  with pytest.raises(ValueError, match=match):
    llama.LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24, rope_scaling=scaling)


# ----------------------------------------------------------------------------- Qwen2, Mistral


def test_qwen2_biases_gqa_untied_and_sliding_layers(tmp_path):
  model = save_family(tmp_path, "qwen2", tie_word_embeddings=False, use_sliding_window=True, sliding_window=24,
                      max_window_layers=1)
  assert model.config.layer_types == ["full_attention", "sliding_attention"]
  config, params = load_model(tmp_path)
  assert config.attn_bias and not config.tie_embeddings and config.max_seq_len == 24
  assert params["layers_1"]["attn"]["k_proj"]["bias"].shape == (32,)
  assert np.abs(np.asarray(params["layers_1"]["attn"]["k_proj"]["bias"])).max() > 0
  want, got = _logits(model, config, params, T=config.max_seq_len)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_mistral_exact_up_to_the_window_which_caps_max_seq_len(tmp_path):
  """lqx attends to the whole causal prefix: equal to sliding-window attention for T <= W only,
  so ``max_seq_len`` is W, and ``generate`` refuses to go past it."""
  W = 24
  model = save_family(tmp_path, "mistral", sliding_window=W)
  config, params = load_model(tmp_path)
  assert config.max_seq_len == W and config.attn_bias is False
  want, got = _logits(model, config, params, T=W)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  want, got = _logits(model, config, params, T=W + 8)  # past the window: the first W positions still agree,
  np.testing.assert_allclose(got[:, :W], want[:, :W], atol=1e-4, rtol=0)
  assert np.abs(got[:, W + 1:] - want[:, W + 1:]).max() > 1e-3  # the later ones do not (why max_seq_len is W)
  with pytest.raises(ValueError, match=f"config.max_seq_len={W}"):
    llama.generate(config, params, np.zeros((1, W - 2), np.int32), 4)


# ----------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize("key,value,match", [
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
     "rope_parameters type 'yarn' is not supported"),
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "rope_scaling type 'dynamic' is not supported"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling type 'linear' is not supported"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}, "type 'longrope' is not supported"),
    ("rope_parameters", {**LLAMA3, "original_max_position_embeddings": None},
     "rope_parameters of type 'llama3' lacks 'original_max_position_embeddings'"),
    ("rope_parameters", {**LLAMA3, "low_freq_factor": 4.0}, "high_freq_factor=4.0 must be above low_freq_factor=4.0"),
    ("rope_parameters", {**LLAMA3, "factor": "8"}, "rope_parameters.factor must be a finite number"),
    ("rope_parameters", {**LLAMA3, "original_max_position_embeddings": 32.0},
     "original_max_position_embeddings must be an integer"),
    ("rope_parameters", {**LLAMA3, "attention_factor": 1.0}, "'attention_factor', which lqx's llama3-scaled RoPE"),
    ("rope_scaling", LLAMA3, "RoPE scalings disagree: rope_scaling is Llama3RoPE.*rope_parameters is unscaled"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_rope_errors_name_file_and_type(tmp_path, key, value, match):
  save_family(tmp_path, "llama")  # its config.json has rope_parameters {"rope_type": "default", ...}
  _edit_config(tmp_path, lambda c: c.update({key: value}))
  with pytest.raises(hf.HFError, match=rf"config\.json: .*{match}"):
    load_model(tmp_path)


def test_moe_families_rejected(tmp_path):
  moe = transformers.MixtralConfig(**{**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2})
  transformers.MixtralForCausalLM(moe).save_pretrained(tmp_path / "mixtral", safe_serialization=True)
  with pytest.raises(hf.HFError, match=r"config\.json: unsupported architecture 'MixtralForCausalLM'"):
    load_model(tmp_path / "mixtral")
  save_family(tmp_path / "llama", "llama")  # a Llama config.json that declares experts
  _edit_config(tmp_path / "llama", lambda c: c.update(num_local_experts=4, num_experts_per_tok=2))
  with pytest.raises(hf.HFError, match=r"config\.json: num_local_experts=4: mixture-of-experts"):
    load_model(tmp_path / "llama")
