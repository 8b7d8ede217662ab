"""Hugging Face checkpoint folder (``config.json`` + safetensors) -> LLaMA config and params.

Reads ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM`` folders
holding ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
Tensors are read with ``safetensors``' numpy backend (never pickle); F32, F16 and
BF16 are accepted and cast to ``dtype`` (float32 by default, as the GGUF reader
returns). Torch ``(out, in)`` weights become ``(in, out)`` kernels; Q/K rows are
already in the ``rotate_half`` layout that ``lqx.models.llama`` uses.

What lqx's decoder does not compute is rejected with an error, not approximated:
scaled RoPE (``rope_scaling``/``rope_parameters`` other than the default type),
activations other than SiLU, LLaMA's ``attention_bias`` (it includes an o_proj
bias) and ``mlp_bias``. A sliding attention window W (Mistral v0.1, Qwen2 with
``use_sliding_window``) is accepted: lqx attends to the full causal prefix, which
equals sliding-window attention for sequences of at most W tokens, so
``config.max_seq_len`` is set to ``min(max_position_embeddings, W)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so safetensors' numpy backend reads BF16
import numpy as np

from lqx.models.llama import LlamaConfig, layer_names

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # a buffer some older checkpoints saved
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


class HFError(ValueError):
  """A Hugging Face folder is unreadable, truncated, or not a supported model."""


def _read_json(path: Path) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise HFError(f"{path}: not valid JSON: {e}") from e


def architecture(cfg: dict, path: Path) -> str:
  """The supported architecture named by a ``config.json`` dict."""
  archs = cfg.get("architectures") or [_MODEL_TYPES.get(cfg.get("model_type"), cfg.get("model_type"))]
  for a in archs:
    if a in SUPPORTED_ARCHITECTURES:
      return a
  raise HFError(f"{path}: unsupported architecture {', '.join(map(repr, archs))} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")


def _rope_theta(cfg: dict, path: Path) -> float:
  """RoPE base; raises on any RoPE scaling (transformers 4: ``rope_scaling``, 5: ``rope_parameters``)."""
  for key in ("rope_scaling", "rope_parameters"):
    rp = cfg.get(key) or {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in (None, "default"):
      raise HFError(f"{path}: {key} type {kind!r} is not supported (lqx implements unscaled RoPE only)")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
      raise HFError(f"{path}: partial_rotary_factor={rp['partial_rotary_factor']} is not supported")
  theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
  return float(theta)


def _sliding_window(cfg: dict, arch: str) -> int | None:
  w = cfg.get("sliding_window")
  if not w:
    return None
  if arch == "Qwen2ForCausalLM":
    layer_types = cfg.get("layer_types") or []
    return w if cfg.get("use_sliding_window") or "sliding_attention" in layer_types else None
  return w


def _first_id(x) -> int | None:
  """A token id from config.json, which may be null, an int or a list (first one wins)."""
  if isinstance(x, (list, tuple)):
    x = x[0] if x else None
  return None if x is None else int(x)


def read_config(path: str | Path) -> LlamaConfig:
  """The ``config.json`` of a Hugging Face folder as a ``LlamaConfig``."""
  path = Path(path)
  file = path / "config.json"
  if not file.is_file():
    raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model folder)")
  cfg = _read_json(file)
  arch = architecture(cfg, file)
  act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
  if act != "silu":
    raise HFError(f"{file}: hidden_act {act!r} is not supported (lqx's MLP is SwiGLU with silu)")
  if arch == "LlamaForCausalLM":
    for flag in ("attention_bias", "mlp_bias"):
      if cfg.get(flag):
        raise HFError(f"{file}: {flag}=true is not supported (lqx has q/k/v biases only, as Qwen2)")
  max_len = int(cfg.get("max_position_embeddings", 2048))
  window = _sliding_window(cfg, arch)
  if window is not None:
    max_len = min(max_len, int(window))
  try:
    return LlamaConfig(
        vocab_size=int(cfg["vocab_size"]),
        dim=int(cfg["hidden_size"]),
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=int(cfg["num_attention_heads"]),
        n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        ffn_dim=int(cfg["intermediate_size"]),
        head_dim=cfg.get("head_dim"),
        rope_theta=_rope_theta(cfg, file),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attn_bias=arch == "Qwen2ForCausalLM",
        max_seq_len=max_len,
        bos_token_id=_first_id(cfg.get("bos_token_id")),
        eos_token_id=_first_id(cfg.get("eos_token_id")),
    )
  except KeyError as e:
    raise HFError(f"{file}: required key {e.args[0]!r} is missing") from e
  except (TypeError, ValueError) as e:
    raise HFError(f"{file}: {e}") from e


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
  """HF tensor name -> (path in the lqx tree, torch shape (out, in), is_kernel)."""
  c = config
  D, V, F = c.dim, c.vocab_size, c.ffn_dim
  t = {"model.embed_tokens.weight": (("embed", "embedding"), (V, D), False)}
  for i, name in enumerate(layer_names(c)):
    pre = f"model.layers.{i}."
    t[pre + "input_layernorm.weight"] = ((name, "attn_norm", "scale"), (D,), False)
    for proj, out in (("q", c.q_dim), ("k", c.kv_dim), ("v", c.kv_dim)):
      t[pre + f"self_attn.{proj}_proj.weight"] = ((name, "attn", f"{proj}_proj", "kernel"), (out, D), True)
      if c.attn_bias:
        t[pre + f"self_attn.{proj}_proj.bias"] = ((name, "attn", f"{proj}_proj", "bias"), (out,), False)
    t[pre + "self_attn.o_proj.weight"] = ((name, "attn", "o_proj", "kernel"), (D, c.q_dim), True)
    t[pre + "post_attention_layernorm.weight"] = ((name, "mlp_norm", "scale"), (D,), False)
    t[pre + "mlp.gate_proj.weight"] = ((name, "mlp", "gate_proj", "kernel"), (F, D), True)
    t[pre + "mlp.up_proj.weight"] = ((name, "mlp", "up_proj", "kernel"), (F, D), True)
    t[pre + "mlp.down_proj.weight"] = ((name, "mlp", "down_proj", "kernel"), (D, F), True)
  t["model.norm.weight"] = (("final_norm", "scale"), (D,), False)
  if not c.tie_embeddings:
    t["lm_head.weight"] = (("lm_head", "kernel"), (V, D), True)
  return t


def safetensors_files(path: str | Path) -> dict[str, Path]:
  """Tensor name -> the safetensors file in folder ``path`` that holds it (from the index if sharded)."""
  from safetensors import safe_open

  path = Path(path)
  index = path / "model.safetensors.index.json"
  if index.is_file():
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise HFError(f"{index}: no 'weight_map'")
    return {name: path / file for name, file in weight_map.items()}
  files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else sorted(path.glob("*.safetensors"))
  if not files:
    raise HFError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors "
                  f"(pickled .bin checkpoints are not read)")
  where = {}
  for file in files:
    with _open(file, safe_open) as f:
      where.update(dict.fromkeys(f.keys(), file))
  return where


def _open(file: Path, safe_open):
  if not file.is_file():
    raise HFError(f"{file}: safetensors file not found")
  try:
    return safe_open(str(file), framework="np")
  except Exception as e:  # SafetensorError on a truncated or corrupt header
    raise HFError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def load_hf(path: str | Path, dtype=np.float32) -> tuple[LlamaConfig, dict]:
  """Reads a Hugging Face LLaMA-family folder into ``(config, params)`` (numpy leaves).

  ``dtype``: leaf dtype (default float32, like ``load_gguf``); ``None`` keeps the
  stored one (e.g. ``ml_dtypes.bfloat16``).
  """
  from safetensors import safe_open

  path = Path(path)
  config = read_config(path)
  expected = expected_tensors(config)
  where = safetensors_files(path)
  missing = [n for n in expected if n not in where]
  if missing:
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise HFError(f"{path}: tensor {missing[0]!r}{more} is missing from the safetensors files")
  unexpected = [n for n in where if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
                and not (n == "lm_head.weight" and config.tie_embeddings)]
  if unexpected:
    raise HFError(f"{path}: unexpected tensors {unexpected[:5]} (a feature lqx's {type(config).__name__} "
                  f"does not implement, or a config.json that does not match the weights)")

  params: dict = {}
  by_file: dict[Path, list[str]] = {}
  for name in expected:
    by_file.setdefault(where[name], []).append(name)
  for file, names in by_file.items():
    with _open(file, safe_open) as f:
      present = set(f.keys())
      for name in names:
        sub, shape, is_kernel = expected[name]
        if name not in present:
          raise HFError(f"{file}: tensor {name!r} is missing (the index lists it in this file)")
        sl = f.get_slice(name)
        got, kind = tuple(sl.get_shape()), sl.get_dtype()
        if got != shape:
          raise HFError(f"{file}: tensor {name!r} has shape {got}, expected {shape} (torch (out, in) order)")
        if kind not in _FLOAT_DTYPES:
          raise HFError(f"{file}: tensor {name!r} has dtype {kind}, expected one of {_FLOAT_DTYPES}")
        w = f.get_tensor(name)
        if not np.all(np.isfinite(w)):
          raise HFError(f"{file}: tensor {name!r} contains NaN or Inf")
        if dtype is not None:
          w = w.astype(dtype, copy=False)
        w = np.ascontiguousarray(w.T) if is_kernel else w
        node = params
        for key in sub[:-1]:
          node = node.setdefault(key, {})
        node[sub[-1]] = w
  ordered = {k: params[k] for k in ("embed", *layer_names(config), "final_norm", "lm_head") if k in params}
  return config, ordered


def load_tokenizer(path: str | Path):
  """The tokenizer saved in a Hugging Face folder (local files only, no hub access)."""
  from transformers import AutoTokenizer

  path = Path(path)
  if not any((path / f).is_file() for f in _TOKENIZER_FILES):
    raise HFError(f"{path}: no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)})")
  try:
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except Exception as e:
    raise HFError(f"{path}: could not build a tokenizer: {type(e).__name__}: {e}") from e
