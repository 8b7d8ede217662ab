"""LLaMA-family decoder as pure functions of ``(config, params)``.

Covers LLaMA / Mistral / SmolLM2 (GQA, RoPE, RMSNorm, SwiGLU, tied or untied
head), Llama 3.1's RoPE scaling (``Llama3RoPE``) and Qwen2-style q/k/v biases.
The parameter pytree is plain nested dicts; every kernel is ``(in, out)`` and may
be a float array or a ``QArray``::

  embed/embedding                       (V, D)
  layers_{i}/attn_norm/scale            (D,)
  layers_{i}/attn/{q,k,v}_proj/kernel   (D, H*Dh), (D, KV*Dh), (D, KV*Dh)
  layers_{i}/attn/{q,k,v}_proj/bias     only when config.attn_bias
  layers_{i}/attn/o_proj/kernel         (H*Dh, D)
  layers_{i}/mlp_norm/scale             (D,)
  layers_{i}/mlp/{gate,up}_proj/kernel  (D, F)
  layers_{i}/mlp/down_proj/kernel       (F, D)
  final_norm/scale                      (D,)
  lm_head/kernel                        (D, V)   only when not tied

Q/K use Hugging Face's rotary layout (``rotate_half``: the two halves of each
head are the real and imaginary parts). The block API (``embed``, ``block``,
``head``) lets calibration run the model one block at a time. ``forward`` is the
whole model unjitted, ``apply`` the same function jitted (config static).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lqx import data, nn


class Llama3RoPE(NamedTuple):
  """Llama 3.1 RoPE scaling (``rope_type: "llama3"``); see ``rope_inv_freq``.

  A tuple, so a ``LlamaConfig`` holding it stays hashable and a checkpoint stores
  it as a plain tuple (restored through ``LlamaConfig.__post_init__``).
  """

  factor: float  # low frequencies are divided by this (8 in Llama 3.1)
  low_freq_factor: float  # wavelengths above original_max_len / low_freq_factor are fully scaled
  high_freq_factor: float  # wavelengths below original_max_len / high_freq_factor are kept
  original_max_len: int  # the pretraining context (original_max_position_embeddings)

  def check(self) -> Llama3RoPE:
    """This scaling with float factors and an int length, or ``ValueError`` naming the bad field."""
    vals = []
    for name, v in zip(self._fields, self):
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= sys.float_info.max:
        raise ValueError(f"Llama3RoPE.{name} must be a finite number above 0, got {v!r}")
      if name == "original_max_len" and int(v) != v:
        raise ValueError(f"Llama3RoPE.original_max_len must be an integer, got {v!r}")
      vals.append(int(v) if name == "original_max_len" else float(v))
    out = Llama3RoPE(*vals)
    if out.high_freq_factor <= out.low_freq_factor:
      raise ValueError(f"Llama3RoPE.high_freq_factor={out.high_freq_factor} must be above "
                       f"low_freq_factor={out.low_freq_factor}")
    return out


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a LLaMA-family decoder. Hashable: usable as a static jit arg."""

  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  ffn_dim: int
  head_dim: int | None = None  # default dim // n_heads
  rope_theta: float = 10000.0
  rope_scaling: Llama3RoPE | None = None  # None: plain RoPE
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  attn_bias: bool = False
  max_seq_len: int = 2048
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  # muP knobs (1.0 / None = standard parametrization).
  attn_logit_scale: float | None = None  # None: 1/sqrt(head_dim); muP uses 1/head_dim
  embed_multiplier: float = 1.0
  readout_multiplier: float = 1.0

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim is None:
      if self.dim % self.n_heads:
        raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}; set head_dim")
      object.__setattr__(self, "head_dim", self.dim // self.n_heads)
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.rope_scaling is not None:
      r = self.rope_scaling
      if not (isinstance(r, tuple) and len(r) == len(Llama3RoPE._fields)):
        raise ValueError(f"LlamaConfig.rope_scaling must be None or a Llama3RoPE{Llama3RoPE._fields}, got {r!r}")
      object.__setattr__(self, "rope_scaling", Llama3RoPE(*r).check())

  @property
  def q_dim(self) -> int:
    return self.n_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.n_kv_heads * self.head_dim

  def num_params(self) -> int:
    shapes = jax.eval_shape(functools.partial(init_params, self), jax.random.key(0))
    return sum(x.size for x in jax.tree.leaves(shapes))


def layer_names(config: LlamaConfig) -> list[str]:
  return [f"layers_{i}" for i in range(config.n_layers)]


# ----------------------------------------------------------------------------- init


def init_params(config: LlamaConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
  """Random parameters with the standard LLaMA init (normal(std), unit norm gains)."""
  c = config
  keys = iter(jax.random.split(key, 8 * c.n_layers + 2))

  def dense(fan_in, fan_out):
    return {"kernel": (std * jax.random.normal(next(keys), (fan_in, fan_out))).astype(dtype)}

  params = {"embed": {"embedding": (std * jax.random.normal(next(keys), (c.vocab_size, c.dim))).astype(dtype)}}
  for name in layer_names(c):
    attn = {"q_proj": dense(c.dim, c.q_dim), "k_proj": dense(c.dim, c.kv_dim),
            "v_proj": dense(c.dim, c.kv_dim), "o_proj": dense(c.q_dim, c.dim)}
    if c.attn_bias:
      for proj, n in (("q_proj", c.q_dim), ("k_proj", c.kv_dim), ("v_proj", c.kv_dim)):
        attn[proj]["bias"] = jnp.zeros((n,), dtype)
    params[name] = {
        "attn_norm": {"scale": jnp.ones((c.dim,), dtype)},
        "attn": attn,
        "mlp_norm": {"scale": jnp.ones((c.dim,), dtype)},
        "mlp": {"gate_proj": dense(c.dim, c.ffn_dim), "up_proj": dense(c.dim, c.ffn_dim),
                "down_proj": dense(c.ffn_dim, c.dim)},
    }
  params["final_norm"] = {"scale": jnp.ones((c.dim,), dtype)}
  if not c.tie_embeddings:
    params["lm_head"] = dense(c.dim, c.vocab_size)
  return params


# ----------------------------------------------------------------------------- pieces


class KVCache(NamedTuple):
  """Keys and values of one block: ``k, v`` of shape (B, S_max, KV, Dh)."""

  k: jax.Array
  v: jax.Array


def rope_inv_freq(head_dim: int, theta: float, scaling: Llama3RoPE | None = None) -> jax.Array:
  """RoPE inverse frequencies (head_dim // 2,) float32: ``theta ** (-2i / head_dim)``.

  With Llama 3.1 scaling (wavelength ``w = 2 pi / f``, ``L = original_max_len``):
  ``f`` is kept where ``w < L / high_freq_factor``, divided by ``factor`` where
  ``w > L / low_freq_factor``, and in between mixed as ``(1 - s) f / factor + s f``
  with ``s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)``
  (0 at the long end of the band, 1 at the short end, so the three pieces join).
  """
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  if scaling is None:
    return inv_freq
  factor, low, high, orig = scaling
  wavelen = 2 * math.pi / inv_freq
  s = (orig / wavelen - low) / (high - low)
  mixed = (1 - s) * inv_freq / factor + s * inv_freq
  return jnp.where(wavelen < orig / high, inv_freq, jnp.where(wavelen > orig / low, inv_freq / factor, mixed))


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling: Llama3RoPE | None = None) -> jax.Array:
  """Rotary embedding, HF layout. x: (B, T, N, Dh); positions: (T,) int; ``scaling`` see ``rope_inv_freq``."""
  half = x.shape[-1] // 2
  inv_freq = rope_inv_freq(x.shape[-1], theta, scaling)
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (T, half)
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(config: LlamaConfig, p: dict, x: jax.Array, positions: jax.Array,
              cache: KVCache | None = None, record: dict | None = None) -> tuple[jax.Array, KVCache | None]:
  """Causal GQA self-attention. x: (B, T, D); positions: (T,) absolute positions.

  With a cache of length S, the new keys/values are written at ``positions`` and
  queries attend to every cached position <= their own. ``record``, if given, gets
  the input of o_proj under ``"o_in"`` (B, T, H*Dh).
  """
  out, cache = attend(config, p, x, positions, cache)
  if record is not None:
    record["o_in"] = out
  return nn.linear(out, p["o_proj"]["kernel"]), cache


ATTN_CHUNK = 128  # queries per causal chunk in attend() without a cache


def attend(config: LlamaConfig, p: dict, x: jax.Array, positions: jax.Array,
           cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
  """Attention up to o_proj's input: x (B, T, D) -> heads concatenated (B, T, H*Dh), and the cache.

  Without a cache, ``positions`` must increase along T (they are both the query
  and the key positions).
  """
  c = config
  B, T, _ = x.shape
  q = nn.linear(x, p["q_proj"]["kernel"], p["q_proj"].get("bias")).reshape(B, T, c.n_heads, c.head_dim)
  k = nn.linear(x, p["k_proj"]["kernel"], p["k_proj"].get("bias")).reshape(B, T, c.n_kv_heads, c.head_dim)
  v = nn.linear(x, p["v_proj"]["kernel"], p["v_proj"].get("bias")).reshape(B, T, c.n_kv_heads, c.head_dim)
  q = rope(q, positions, c.rope_theta, c.rope_scaling)
  k = rope(k, positions, c.rope_theta, c.rope_scaling)
  if cache is None:
    key_pos = positions
  else:
    start = positions[0]
    cache = KVCache(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, start, 0, 0)),
                    jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, start, 0, 0)))
    k, v = cache.k.astype(x.dtype), cache.v.astype(x.dtype)
    key_pos = jnp.arange(k.shape[1])
  KV, G, Dh, S = c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim, k.shape[1]
  scale = c.attn_logit_scale if c.attn_logit_scale is not None else c.head_dim ** -0.5
  q = q.reshape(B, T, KV, G, Dh).transpose(0, 2, 3, 1, 4)  # (B, KV, G, T, Dh)
  k = k.transpose(0, 2, 3, 1)  # (B, KV, Dh, S)
  v = v.transpose(0, 2, 1, 3)  # (B, KV, S, Dh)
  # Without a cache, queries and keys share the (increasing) positions: a chunk of
  # queries needs the keys up to its own end only, which skips most of the masked
  # half of the logits (2.6x faster on CPU at T=512 than one (T, S) product).
  chunks = [(t0, min(t0 + ATTN_CHUNK, T)) for t0 in range(0, T, ATTN_CHUNK)] if cache is None else [(0, T)]
  outs = []
  for t0, t1 in chunks:
    n, s1 = t1 - t0, (t1 if cache is None else S)
    logits = jnp.matmul(q[:, :, :, t0:t1].reshape(B, KV, G * n, Dh), k[..., :s1]).reshape(B, KV, G, n, s1)
    mask = key_pos[None, :s1] <= positions[t0:t1, None]  # (n, s1)
    logits = jnp.where(mask, logits.astype(jnp.float32) * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    outs.append(jnp.matmul(probs.reshape(B, KV, G * n, s1), v[:, :, :s1]).reshape(B, KV, G, n, Dh))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(B, T, c.q_dim), cache


def mlp(p: dict, x: jax.Array, record: dict | None = None) -> jax.Array:
  """SwiGLU: down(silu(gate(x)) * up(x)). ``record`` gets down_proj's input as ``"down_in"``."""
  h = jax.nn.silu(nn.linear(x, p["gate_proj"]["kernel"])) * nn.linear(x, p["up_proj"]["kernel"])
  if record is not None:
    record["down_in"] = h
  return nn.linear(h, p["down_proj"]["kernel"])


# ----------------------------------------------------------------------------- block API


def embed(config: LlamaConfig, params: dict, tokens: jax.Array, dtype=None) -> jax.Array:
  """tokens (B, T) int -> hidden states (B, T, D)."""
  table = nn.materialize(params["embed"]["embedding"])
  x = jnp.take(table, tokens, axis=0)
  if config.embed_multiplier != 1.0:
    x = x * config.embed_multiplier
  return x if dtype is None else x.astype(dtype)


def block(config: LlamaConfig, p: dict, x: jax.Array, positions: jax.Array | None = None,
          cache: KVCache | None = None, record: dict | None = None) -> tuple[jax.Array, KVCache | None]:
  """One pre-norm decoder block. x: (B, T, D) -> (B, T, D).

  ``record``, if given, is filled with the input of every linear (the taps of
  ``STAGES``): ``attn_in``, ``o_in``, ``mlp_in``, ``down_in``.
  """
  if positions is None:
    positions = jnp.arange(x.shape[1])
  h = nn.rms_norm(x, p["attn_norm"]["scale"], config.norm_eps)
  if record is not None:
    record["attn_in"] = h
  h, cache = attention(config, p["attn"], h, positions, cache, record)
  x = x + h
  h = nn.rms_norm(x, p["mlp_norm"]["scale"], config.norm_eps)
  if record is not None:
    record["mlp_in"] = h
  x = x + mlp(p["mlp"], h, record)
  return x, cache


class Stage(NamedTuple):
  """Linears of a block that share one input (a tap), in execution order.

  ``judge`` names the output on which AdaDim compares quantizations of them:
  the attention output for q/k/v, the MLP output for gate/up, their own
  output for o and down (``judge_output``).
  """

  tap: str
  linears: tuple[str, ...]  # paths inside a block, e.g. "attn/q_proj"
  judge: str


# GPTQ's "true sequential" order: each stage is quantized before the next one's inputs are taken.
STAGES = (
    Stage("attn_in", ("attn/q_proj", "attn/k_proj", "attn/v_proj"), "attn"),
    Stage("o_in", ("attn/o_proj",), "attn/o_proj"),
    Stage("mlp_in", ("mlp/gate_proj", "mlp/up_proj"), "mlp"),
    Stage("down_in", ("mlp/down_proj",), "mlp/down_proj"),
)


# advance(..., to): the block state entries each step reads.
STEP_INPUTS = {"attn_in": ("x",), "o_in": ("attn_in",), "mlp_in": ("x", "o_in"), "down_in": ("mlp_in",),
               "out": ("h", "down_in")}


def advance(config: LlamaConfig, p: dict, state: dict, to: str) -> dict:
  """One step of ``block``'s forward pass, for stage-by-stage calibration.

  ``state`` maps names to (B, T, ·) arrays: ``"x"`` (the block input) and what
  earlier steps returned; the step ``to`` reads ``STEP_INPUTS[to]`` and returns
  the new entries: ``attn_in``, ``o_in``, ``mlp_in`` (with ``h``, the residual
  stream after attention), ``down_in``, or ``out`` (the block output). Running
  the steps in that order computes ``block(config, p, x)[0]``; each step uses
  the kernels in ``p`` as they are at that moment, so quantizing one stage before
  advancing to the next gives GPTQ's ``--true-sequential`` inputs without
  recomputing the block from its input.
  """
  if to == "attn_in":
    return {"attn_in": nn.rms_norm(state["x"], p["attn_norm"]["scale"], config.norm_eps)}
  if to == "o_in":
    return {"o_in": attend(config, p["attn"], state["attn_in"], jnp.arange(state["attn_in"].shape[1]))[0]}
  if to == "mlp_in":
    h = state["x"] + nn.linear(state["o_in"], p["attn"]["o_proj"]["kernel"])
    return {"h": h, "mlp_in": nn.rms_norm(h, p["mlp_norm"]["scale"], config.norm_eps)}
  if to == "down_in":
    m, mlp_p = state["mlp_in"], p["mlp"]
    return {"down_in": jax.nn.silu(nn.linear(m, mlp_p["gate_proj"]["kernel"])) * nn.linear(m, mlp_p["up_proj"]["kernel"])}
  if to == "out":
    return {"out": state["h"] + nn.linear(state["down_in"], p["mlp"]["down_proj"]["kernel"])}
  raise ValueError(f"advance: unknown step {to!r}; steps are {tuple(STEP_INPUTS)}")


def block_taps(config: LlamaConfig, p: dict, x: jax.Array) -> tuple[jax.Array, dict]:
  """One block's output (B, T, D) and the inputs of its linears (``block``'s record)."""
  record: dict = {}
  y, _ = block(config, p, x, record=record)
  return y, record


def judge_output(config: LlamaConfig, p: dict, judge: str, tap: jax.Array) -> jax.Array:
  """The output named by ``judge`` (see ``Stage``) of block params ``p`` on its tap input."""
  if judge == "attn":
    return attention(config, p["attn"], tap, jnp.arange(tap.shape[1]))[0]
  if judge == "mlp":
    return mlp(p["mlp"], tap)
  group, proj = judge.split("/")
  return nn.linear(tap, p[group][proj]["kernel"])


def head(config: LlamaConfig, params: dict, x: jax.Array) -> jax.Array:
  """Final norm and readout: (B, T, D) -> float32 logits (B, T, V)."""
  x = nn.rms_norm(x, params["final_norm"]["scale"], config.norm_eps)
  if config.tie_embeddings:
    w = nn.materialize(params["embed"]["embedding"]).T
  else:
    w = params["lm_head"]["kernel"]
  logits = nn.linear(x, w).astype(jnp.float32)
  if config.readout_multiplier != 1.0:
    logits = logits * config.readout_multiplier
  return logits


def forward(config: LlamaConfig, params: dict, tokens: jax.Array) -> jax.Array:
  """tokens (B, T) int32 -> float32 logits (B, T, V). Unjitted, to compose under your own jit/grad/vmap."""
  x = embed(config, params, tokens)
  for name in layer_names(config):
    x, _ = block(config, params[name], x)
  return head(config, params, x)


apply = jax.jit(forward, static_argnums=0)
apply.__doc__ = """tokens (B, T) int32 -> float32 logits (B, T, V). Jitted ``forward``; config is static."""


def hidden_states(config: LlamaConfig, params: dict, tokens: jax.Array) -> list[jax.Array]:
  """Residual stream before each block and after the last: n_layers + 1 arrays (B, T, D)."""
  xs = [embed(config, params, tokens)]
  for name in layer_names(config):
    xs.append(block(config, params[name], xs[-1])[0])
  return xs


# ----------------------------------------------------------------------------- generation


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> list[KVCache]:
  shape = (batch, max_len, config.n_kv_heads, config.head_dim)
  return [KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layers)]


def _step(config, params, tokens, positions, caches):
  x = embed(config, params, tokens)
  new = []
  for name, cache in zip(layer_names(config), caches):
    x, cache = block(config, params[name], x, positions, cache)
    new.append(cache)
  return head(config, params, x[:, -1:]), new


@functools.partial(jax.jit, static_argnums=(0, 3))
def _generate(config, params, prompt, max_new_tokens, temperature, key):
  B, T = prompt.shape
  caches = init_cache(config, B, T + max_new_tokens)
  logits, caches = _step(config, params, prompt, jnp.arange(T), caches)

  def pick(logits, key):
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

  def body(carry, key):
    logits, caches, pos = carry
    tok = pick(logits[:, -1], key)
    logits, caches = _step(config, params, tok[:, None], pos[None], caches)
    return (logits, caches, pos + 1), tok

  keys = jax.random.split(key, max_new_tokens)
  _, toks = jax.lax.scan(body, (logits, caches, jnp.int32(T)), keys)
  return toks.T  # (B, max_new_tokens)


def check_tokens(config: LlamaConfig, tokens, *, name: str = "tokens", min_len: int = 2,
                 max_len: int | None = None, max_what: str = "config.max_seq_len"):
  """(B, T) int32 numpy token ids checked against ``config`` (``lqx.data.check_tokens``): ids
  in ``[0, vocab_size)``, ``B >= 1``, ``min_len <= T <= max_len`` (default ``config.max_seq_len``)."""
  return data.check_tokens(tokens, config.vocab_size, name=name, ndim=2, min_len=min_len,
                           max_len=config.max_seq_len if max_len is None else max_len, max_what=max_what)


def generate(config: LlamaConfig, params: dict, prompt: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, key: jax.Array | None = None) -> jax.Array:
  """Continues ``prompt`` (B, T) by ``max_new_tokens`` tokens with a KV cache.

  ``temperature == 0`` is greedy (deterministic); otherwise samples with ``key``.
  Returns the new tokens only, (B, max_new_tokens) int32. Raises ``ValueError`` for
  ids outside ``[0, vocab_size)``, an empty prompt, ``max_new_tokens < 1``, or
  ``T + max_new_tokens > config.max_seq_len``.
  """
  max_new_tokens = data.check_count(max_new_tokens, "max_new_tokens", max_value=config.max_seq_len - 1,
                                    max_what="config.max_seq_len - 1, leaving room for a prompt token")
  prompt = jnp.asarray(check_tokens(config, prompt, name="prompt", min_len=1,
                                    max_len=config.max_seq_len - max_new_tokens,
                                    max_what=f"config.max_seq_len={config.max_seq_len} minus "
                                             f"max_new_tokens={max_new_tokens}"))
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0 and key is None:
    raise ValueError("sampling (temperature > 0) needs an explicit jax.random key")
  if key is None:
    key = jax.random.key(0)
  return _generate(config, params, prompt, max_new_tokens, jnp.float32(temperature), key)


def units(config: LlamaConfig):
  """The decoder as ``lqx.calibrate.Units``: one unit per block, fed by the embedding.

  ``lqx.quantize`` runs LLaMA through ``lqx.calibrate.quantize_sequential`` (stages,
  shared solves, AdaDim's block-level judges); this adapter serves the generic path
  (``capture``, ``quantize_units``) and checks it against that one.
  """
  from lqx.calibrate import Units  # calibrate imports this module

  def run(name, p, x):
    y, taps = block_taps(config, p, x)
    return y, {f"{lin}/kernel": taps[stage.tap] for stage in STAGES for lin in stage.linears}

  return Units(names=tuple(layer_names(config)), run=run, first=lambda params, tokens: embed(config, params, tokens))
