"""GGUF (llama.cpp) -> LLaMA config and float parameter pytree.

Every tensor is dequantized with the ``gguf`` package (Q4_0/Q4_1/Q5_x/Q8_0/K-quants,
F16/BF16/F32) to float32. llama.cpp stores Q and K rows in a permuted rotary layout
(interleaved pairs); we un-permute them to the Hugging Face ``rotate_half`` layout
so that one model code path serves GGUF and safetensors checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lqx.models.llama import LlamaConfig, layer_names

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name (per block) -> (path in the lqx tree, is_kernel).
_BLOCK_TENSORS = {
    "attn_norm.weight": (("attn_norm", "scale"), False),
    "attn_q.weight": (("attn", "q_proj", "kernel"), True),
    "attn_k.weight": (("attn", "k_proj", "kernel"), True),
    "attn_v.weight": (("attn", "v_proj", "kernel"), True),
    "attn_q.bias": (("attn", "q_proj", "bias"), False),
    "attn_k.bias": (("attn", "k_proj", "bias"), False),
    "attn_v.bias": (("attn", "v_proj", "bias"), False),
    "attn_output.weight": (("attn", "o_proj", "kernel"), True),
    "ffn_norm.weight": (("mlp_norm", "scale"), False),
    "ffn_gate.weight": (("mlp", "gate_proj", "kernel"), True),
    "ffn_up.weight": (("mlp", "up_proj", "kernel"), True),
    "ffn_down.weight": (("mlp", "down_proj", "kernel"), True),
}


class GGUFError(ValueError):
  """A GGUF file is unreadable, truncated, or not a supported model."""


def _reader(path: Path):
  import gguf  # imported lazily: only this reader needs it

  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  try:
    return gguf.GGUFReader(str(path), "r")
  except Exception as e:  # the reader raises many types on bad bytes
    raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from e


def _field(reader, key: str, path: Path, default=None):
  f = reader.fields.get(key)
  if f is None:
    if default is not None:
      return default
    raise GGUFError(f"{path}: metadata key {key!r} is missing")
  return f.contents()


def _token_id(reader, key: str) -> int | None:
  f = reader.fields.get(key)
  return None if f is None else int(f.contents())


def read_config(path: str | Path, reader=None) -> LlamaConfig:
  """The architecture metadata of a GGUF file as a ``LlamaConfig``."""
  path = Path(path)
  r = reader or _reader(path)
  arch = _field(r, "general.architecture", path)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise GGUFError(f"{path}: unsupported architecture {arch!r} (supported: {SUPPORTED_ARCHITECTURES})")
  names = {t.name for t in r.tensors}
  n_heads = int(_field(r, f"{arch}.attention.head_count", path))
  dim = int(_field(r, f"{arch}.embedding_length", path))
  tokens = r.fields.get("tokenizer.ggml.tokens")
  vocab = int(_field(r, f"{arch}.vocab_size", path, default=len(tokens.data) if tokens else -1))
  if vocab <= 0:
    raise GGUFError(f"{path}: vocabulary size unknown (no {arch}.vocab_size and no tokenizer.ggml.tokens)")
  try:
    return LlamaConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=int(_field(r, f"{arch}.block_count", path)),
        n_heads=n_heads,
        n_kv_heads=int(_field(r, f"{arch}.attention.head_count_kv", path, default=n_heads)),
        ffn_dim=int(_field(r, f"{arch}.feed_forward_length", path)),
        head_dim=int(_field(r, f"{arch}.attention.key_length", path, default=dim // n_heads)),
        rope_theta=float(_field(r, f"{arch}.rope.freq_base", path, default=10000.0)),
        norm_eps=float(_field(r, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        tie_embeddings="output.weight" not in names,
        attn_bias="blk.0.attn_q.bias" in names,
        max_seq_len=int(_field(r, f"{arch}.context_length", path, default=2048)),
        bos_token_id=_token_id(r, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_token_id(r, "tokenizer.ggml.eos_token_id"),
    )
  except GGUFError:
    raise
  except ValueError as e:  # LlamaConfig's own checks
    raise GGUFError(f"{path}: {e}") from e


def unpermute_rotary(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's ``permute``: interleaved-pair rows -> HF half-split rows.

  w_out_in: (n_heads * Dh, in), torch layout. Within each head llama.cpp orders
  rows as (pair, 2); Hugging Face orders them as (2, pair).
  """
  out, rest = w_out_in.shape[0], w_out_in.shape[1:]
  return (w_out_in.reshape(n_heads, out // n_heads // 2, 2, *rest)
          .swapaxes(1, 2).reshape(w_out_in.shape))


def _dequantize(t, path: Path) -> np.ndarray:
  """Float32 array of a GGUF tensor in numpy (torch) order, e.g. (out, in)."""
  from gguf.quants import dequantize

  want = tuple(int(d) for d in reversed(t.shape.tolist()))
  try:
    w = dequantize(t.data, t.tensor_type)
  except NotImplementedError as e:
    raise GGUFError(f"{path}: tensor {t.name!r} has unsupported type {t.tensor_type.name}") from e
  except Exception as e:
    raise GGUFError(f"{path}: tensor {t.name!r} ({t.tensor_type.name}) could not be decoded "
                    f"(truncated file?): {e}") from e
  if w.size != int(np.prod(want)):
    raise GGUFError(f"{path}: tensor {t.name!r} holds {w.size} values, expected shape {want} "
                    f"(truncated file?)")
  w = np.asarray(w, np.float32).reshape(want)
  if not np.all(np.isfinite(w)):
    raise GGUFError(f"{path}: tensor {t.name!r} contains NaN or Inf")
  return w


def load_gguf(path: str | Path) -> tuple[LlamaConfig, dict]:
  """Reads a llama-architecture GGUF file into ``(config, params)`` (float32 numpy leaves)."""
  path = Path(path)
  r = _reader(path)
  config = read_config(path, r)
  tensors = {t.name: t for t in r.tensors}
  want = _expected(config)

  def get(name, sub, *, kernel=False, rotary_heads=None):
    if name not in tensors:
      raise GGUFError(f"{path}: tensor {name!r} is missing")
    w = _dequantize(tensors[name], path)
    node = want
    for key in sub:
      if key not in node:
        raise GGUFError(f"{path}: unexpected tensor {name!r} (inconsistent with the other blocks?)")
      node = node[key]
    shape = tuple(reversed(node.shape)) if kernel else tuple(node.shape)
    if w.shape != shape:
      raise GGUFError(f"{path}: tensor {name!r} has shape {w.shape}, expected {shape} (torch (out, in) order)")
    if rotary_heads:
      w = unpermute_rotary(w, rotary_heads)
    return np.ascontiguousarray(w.T) if kernel else w

  params: dict = {"embed": {"embedding": get("token_embd.weight", ("embed", "embedding"))}}
  for i, name in enumerate(layer_names(config)):
    block: dict = {}
    for suffix, (sub, is_kernel) in _BLOCK_TENSORS.items():
      full = f"blk.{i}.{suffix}"
      if full not in tensors:
        if suffix.endswith(".bias"):
          continue
        raise GGUFError(f"{path}: tensor {full!r} is missing")
      heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}.get(suffix.split(".")[0])
      node = block
      for key in sub[:-1]:
        node = node.setdefault(key, {})
      node[sub[-1]] = get(full, (name, *sub), kernel=is_kernel, rotary_heads=heads)
    params[name] = block
  params["final_norm"] = {"scale": get("output_norm.weight", ("final_norm", "scale"))}
  if not config.tie_embeddings:
    params["lm_head"] = {"kernel": get("output.weight", ("lm_head", "kernel"), kernel=True)}
  _check_shapes(config, params, path)
  return config, params


def _expected(config: LlamaConfig) -> dict:
  """The lqx param tree of ``config`` as shapes (``jax.ShapeDtypeStruct`` leaves)."""
  import jax

  from lqx.models import llama

  return jax.eval_shape(lambda: llama.init_params(config, jax.random.key(0)))


def _check_shapes(config: LlamaConfig, params: dict, path: Path) -> None:
  import jax

  want = _expected(config)
  got_paths = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
  for k, v in jax.tree_util.tree_leaves_with_path(want):
    name = jax.tree_util.keystr(k)
    if name not in got_paths:
      raise GGUFError(f"{path}: parameter {name} is missing")
    if got_paths[name] != v.shape:
      raise GGUFError(f"{path}: parameter {name} has shape {got_paths[name]}, expected {v.shape}")


def load_tokenizer(path: str | Path):
  """The Hugging Face tokenizer stored in a GGUF file."""
  from transformers import AutoTokenizer

  path = Path(path)
  return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
