"""muP for the lqx LLaMA family: config knobs, initializer, parameter classes.

Relative to a base config (same depth and vocab, width ``d0``), a model of width
``d`` (``m = d / d0``) gets:

- hidden kernels (q/k/v/o, gate/up/down): ``normal(0, hidden_gain**2 / fan_in)``;
  matrix-like, so ``lqx.optim.width_scaled_adamw`` gives them lr / m;
- embedding: ``normal(0, embed_std**2)``, constant in width; vector-like;
- readout (``lm_head``, untied): muP's ``MuReadout`` form: logits are multiplied by
  ``d0 / d`` (``LlamaConfig.readout_multiplier``) and the kernel is zero
  (``readout="zero"``) or ``normal(0, 1 / fan_in)`` (``"scaled"``); vector-like;
- norm gains: ones; biases: zeros;
- attention logits: ``1/head_dim`` scaling (``attn="mup"``), written as
  ``sqrt(dh0) / dh`` so it equals the standard ``1/sqrt(dh0)`` at the base width;
  ``attn="standard"`` keeps ``1/sqrt(head_dim)``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lqx.models import llama
from lqx.optim.classes import param_classes


def mup_config(config: llama.LlamaConfig, base: llama.LlamaConfig, *,
               attn: str = "mup") -> llama.LlamaConfig:
  """``config`` with muP's readout multiplier ``d0/d`` and (``attn="mup"``) 1/head_dim attention."""
  if attn not in ("mup", "standard"):
    raise ValueError(f"attn must be 'mup' or 'standard', got {attn!r}")
  for name in ("vocab_size", "n_layers"):
    if getattr(config, name) != getattr(base, name):
      raise ValueError(f"config.{name}={getattr(config, name)} differs from base.{name}="
                       f"{getattr(base, name)}; muP scales width only")
  scale = base.head_dim ** 0.5 / config.head_dim if attn == "mup" else None
  return dataclasses.replace(config, readout_multiplier=base.dim / config.dim,
                             attn_logit_scale=scale)


def init_params(config: llama.LlamaConfig, key: jax.Array, *, dtype=jnp.float32,
                hidden_gain: float = 1.0, embed_std: float = 1.0,
                readout: str = "zero") -> dict:
  """muP parameters for ``config`` (the module doc gives each init).

  The tree has exactly the paths and shapes of ``lqx.models.llama.init_params``.
  """
  if readout not in ("zero", "scaled"):
    raise ValueError(f"readout must be 'zero' or 'scaled', got {readout!r}")
  if config.tie_embeddings and readout == "zero":
    raise ValueError("readout='zero' needs an untied lm_head (tie_embeddings=False); "
                     "tied models use readout='scaled'")
  shapes = jax.eval_shape(functools.partial(llama.init_params, config, dtype=dtype), key)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(key, len(flat))
  leaves = []
  for (path, s), k in zip(flat, keys):
    name = [getattr(p, "key", None) for p in path]
    if name[-1] == "scale":
      x = jnp.ones(s.shape)
    elif name[-1] == "bias":
      x = jnp.zeros(s.shape)
    elif name[0] == "embed":
      x = embed_std * jax.random.normal(k, s.shape)
    elif name[0] == "lm_head":
      x = (jnp.zeros(s.shape) if readout == "zero"
           else jax.random.normal(k, s.shape) / s.shape[0] ** 0.5)
    else:  # hidden (in, out) kernel
      x = hidden_gain * jax.random.normal(k, s.shape) / s.shape[0] ** 0.5
    leaves.append(x.astype(s.dtype))
  return jax.tree.unflatten(treedef, leaves)


def llama_classes(config: llama.LlamaConfig, base: llama.LlamaConfig, *,
                  delta: llama.LlamaConfig | None = None):
  """``param_classes`` of the LLaMA tree at ``config`` against ``base`` (shapes only).

  ``delta`` (another width) is needed only when ``config`` has the base width;
  by default a config of twice the base width (heads and head_dim as ``config``
  scales them) is used then.
  """
  def shapes(c):
    return jax.eval_shape(functools.partial(llama.init_params, c), jax.random.key(0))

  if delta is None and config.dim == base.dim:
    delta = dataclasses.replace(config, dim=2 * config.dim, ffn_dim=2 * config.ffn_dim,
                                n_heads=2 * config.n_heads, n_kv_heads=2 * config.n_kv_heads,
                                head_dim=config.head_dim)
  return param_classes(shapes(base), shapes(config),
                       delta=None if delta is None else shapes(delta))
