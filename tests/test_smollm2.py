"""SmolLM2-135M from the packaged GGUF: config, perplexity, generation."""

import jax.numpy as jnp
import numpy as np
import pytest

from lqx import data, evaluate
from lqx.models import llama


def test_config_read_from_gguf(smollm2):
  config, params, _ = smollm2
  assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads) == (30, 576, 9, 3)
  assert (config.vocab_size, config.ffn_dim, config.head_dim) == (49152, 1536, 64)
  assert config.tie_embeddings and "lm_head" not in params
  assert config.rope_theta == 1e5
  assert abs(config.norm_eps - 1e-5) < 1e-9
  assert sum(x.size for x in __import__("jax").tree.leaves(params)) == 134_515_008


def test_heldout_perplexity_is_plausible(smollm2, heldout_tokens):
  config, params, _ = smollm2
  res = evaluate.perplexity(config, params, heldout_tokens, seq_len=256, batch_size=4,
                            max_tokens=16 * 256, progress=False)
  assert res.windows == 16 and res.tokens == 16 * 255
  # A 135M model on Shakespeare: far better than uniform (49152) and than a unigram
  # model (~1000), but no miracle. Broken RoPE/unpermute gives ppl in the thousands.
  assert 15 < res.ppl < 80, res.ppl


def test_rope_unpermute_matters(smollm2, heldout_tokens):
  """Leaving Q/K in llama.cpp's interleaved layout must hurt: guards the un-permute."""
  from lqx.io.gguf import unpermute_rotary

  config, params, _ = smollm2
  toks = jnp.asarray(data.windows(heldout_tokens, 128)[:2])
  good = evaluate.window_nll(config, params, toks).mean()
  p = dict(params)
  for name in llama.layer_names(config)[:4]:
    blk = {**p[name], "attn": dict(p[name]["attn"])}
    w = np.asarray(blk["attn"]["q_proj"]["kernel"]).T
    # Apply the inverse of the un-permute (a second different reordering) to Q only.
    blk["attn"]["q_proj"] = {"kernel": jnp.asarray(unpermute_rotary(w, config.n_heads).T)}
    p[name] = blk
  bad = evaluate.window_nll(config, p, toks).mean()
  assert bad > good + 0.5 * 127


def test_greedy_generation_is_deterministic_and_matches_full_forward(smollm2):
  config, params, tok = smollm2
  prompt = np.array([tok("To be, or not to be, that is the question:").input_ids], np.int32)
  a = np.asarray(llama.generate(config, params, prompt, 12))
  b = np.asarray(llama.generate(config, params, prompt, 12))
  np.testing.assert_array_equal(a, b)
  # The KV-cache path must pick what a full forward over prompt + generated picks.
  seq = np.concatenate([prompt, a], axis=1)
  logits = np.asarray(llama.apply(config, params, jnp.asarray(seq)))
  full = logits[0, prompt.shape[1] - 1: -1].argmax(-1)
  assert (full == a[0]).mean() >= 11 / 12  # allow one float near-tie
  assert len(tok.decode(a[0]).strip()) > 0


def test_sampled_generation_needs_key_and_depends_on_it(smollm2):
  config, params, _ = smollm2
  prompt = np.array([[1, 2, 3, 4]], np.int32)
  with pytest.raises(ValueError, match="key"):
    llama.generate(config, params, prompt, 4, temperature=1.0)
  import jax
  a = llama.generate(config, params, prompt, 16, temperature=1.0, key=jax.random.key(1))
  b = llama.generate(config, params, prompt, 16, temperature=1.0, key=jax.random.key(2))
  assert not np.array_equal(np.asarray(a), np.asarray(b))
