"""lqx ``(config, params)`` -> a Hugging Face safetensors folder of the dequantized model.

The folder is what ``transformers.AutoModelForCausalLM.from_pretrained`` loads and
``lqx.io.hf.load_hf`` reads back::

  config.json                         LlamaForCausalLM (Qwen2ForCausalLM when config.attn_bias)
  model.safetensors                   or model-0000i-of-0000n.safetensors + model.safetensors.index.json
  tokenizer.json, tokenizer_config.json, ...   when a tokenizer is given (its Hugging Face files)
  lqx_export.json                     the files written (lqx.io.export.write_folder)

Every quantized leaf is written as its ``dequantize()`` (any format), transposed to
torch's ``(out, in)``; the tensor names and shapes are ``lqx.io.hf.expected_tensors``,
the loader's own table, so the two cannot drift apart. ``config.json`` is the inverse
of ``lqx.io.hf.read_config``: RoPE base and Llama 3.1 scaling both as transformers 5's
``rope_parameters`` and transformers 4's ``rope_theta``/``rope_scaling``, the dtype as
``dtype`` and ``torch_dtype``. What a Hugging Face LLaMA config has no field for (lqx's
muP multipliers) raises ``ValueError`` instead of being written wrong.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from lqx import formats, tree
from lqx.formats.actquant import ActQuant
from lqx.io import hf as hf_reader
from lqx.models.llama import LlamaConfig

DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}
MAX_SHARD_BYTES = 5 << 30


def dtype_name(dtype) -> str:
  """``"float32"``, ``"float16"`` or ``"bfloat16"`` for a dtype; ``ValueError`` for any other."""
  dt = np.dtype(dtype)
  for name, d in DTYPES.items():
    if d == dt:
      return name
  raise ValueError(f"dtype {dt} cannot be written; expected one of {tuple(DTYPES)}")


def check_config(config: LlamaConfig) -> None:
  """``ValueError`` unless a Hugging Face LLaMA/Qwen2 ``config.json`` can state ``config`` exactly."""
  if not isinstance(config, LlamaConfig):
    raise TypeError(f"config must be an lqx LlamaConfig, got {type(config).__name__}")
  plain = {"attn_logit_scale": None, "embed_multiplier": 1.0, "readout_multiplier": 1.0}
  odd = [f"{k}={getattr(config, k, d)}" for k, d in plain.items() if getattr(config, k, d) != d]
  if odd:
    raise ValueError(f"config has muP settings {', '.join(odd)}, which a Hugging Face LLaMA config has no field "
                     f"for; fold them into the weights first")


def hf_config(config: LlamaConfig, dtype) -> dict:
  """The ``config.json`` dict of ``config`` with weights of ``dtype`` (inverse of ``lqx.io.hf.read_config``)."""
  check_config(config)
  c = config
  rope = {"rope_type": "default", "rope_theta": float(c.rope_theta)}
  scaling = getattr(c, "rope_scaling", None)  # a Llama3RoPE, or None
  if scaling is not None:
    rope = {"rope_type": "llama3", "rope_theta": float(c.rope_theta), "factor": float(scaling.factor),
            "low_freq_factor": float(scaling.low_freq_factor), "high_freq_factor": float(scaling.high_freq_factor),
            "original_max_position_embeddings": int(scaling.original_max_len)}
  qwen2 = c.attn_bias  # lqx's q/k/v biases without an o_proj bias: Qwen2's attention
  out = {
      "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
      "model_type": "qwen2" if qwen2 else "llama",
      "vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": c.ffn_dim,
      "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
      "head_dim": c.head_dim, "hidden_act": "silu", "max_position_embeddings": c.max_seq_len,
      "rms_norm_eps": float(c.norm_eps), "rope_theta": float(c.rope_theta), "rope_parameters": rope,
      "tie_word_embeddings": bool(c.tie_embeddings), "bos_token_id": c.bos_token_id,
      "eos_token_id": c.eos_token_id, "dtype": dtype_name(dtype), "torch_dtype": dtype_name(dtype),
  }
  if scaling is not None:
    out["rope_scaling"] = rope  # transformers 4 reads this key
  out.update({"use_sliding_window": False} if qwen2 else {"attention_bias": False, "mlp_bias": False})
  return out


def leaves(config: LlamaConfig, params: dict) -> dict[str, tuple[str, object, bool]]:
  """HF tensor name -> (lqx param path, leaf, is_kernel), every leaf of ``params`` used exactly once.

  ``ValueError`` naming the path for a missing or extra leaf, a shape that does not fit ``config``,
  or an ``ActQuant`` (its activation quantization would be silently dropped).
  """
  table = hf_reader.expected_tensors(config)
  by_path = {"/".join(sub): (name, shape, kernel) for name, (sub, shape, kernel) in table.items()}
  have = set(tree.paths(params))
  extra = sorted(p for p in have if p not in by_path)
  if extra:
    raise ValueError(f"params has {extra[0]}, which has no tensor in a Hugging Face checkpoint of this config "
                     f"(attn_bias={config.attn_bias}, tie_embeddings={config.tie_embeddings})")
  missing = [p for p in by_path if p not in have]
  if missing:
    raise ValueError(f"params lacks {missing[0]}, which config needs ({len(missing)} leaves missing)")
  out = {}
  for path, (name, shape, kernel) in by_path.items():
    leaf = tree.get(params, path)
    want = shape[::-1] if kernel else shape
    if tuple(leaf.shape) != want:
      raise ValueError(f"{path}: shape {tuple(leaf.shape)}, config needs {want}")
    node = leaf
    while node is not None:  # a wrapper format holds its base in .base
      if isinstance(node, ActQuant):
        raise ValueError(f"{path}: quantizes its input activations (ActQuant), which a Hugging Face model "
                         f"cannot express; export its weights alone by replacing it with its .base")
      node = getattr(node, "base", None)
    out[name] = (path, leaf, kernel)
  return out


def float_value(leaf, kernel: bool, dtype, path: str) -> np.ndarray:
  """The leaf as a contiguous numpy array of ``dtype``: dequantized if quantized, ``(out, in)`` if a kernel."""
  x = np.asarray(leaf.dequantize() if formats.is_quantized(leaf) else leaf)
  if x.dtype.kind != "f" and x.dtype != DTYPES["bfloat16"]:
    raise ValueError(f"{path}: dtype {x.dtype} is not a float type")
  with np.errstate(over="ignore", invalid="ignore"):
    x = np.ascontiguousarray((x.T if kernel else x).astype(dtype, copy=False))
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{path}: NaN or Inf as {np.dtype(dtype)} (not finite in lqx, or out of {np.dtype(dtype)}'s range)")
  return x


def tokenizer_files(tokenizer) -> dict[str, bytes]:
  """``{file name: bytes}`` of ``tokenizer``: a ``{name: bytes}`` dict as it is, a model name or path
  (an lqx checkpoint's stored files verbatim) or a transformers tokenizer (``lqx.io.tokenizer_files``),
  or a bare ``tokenizers.Tokenizer`` (wrapped in ``PreTrainedTokenizerFast``)."""
  if isinstance(tokenizer, dict):
    files = tokenizer
  else:
    if not isinstance(tokenizer, (str, Path)) and not hasattr(tokenizer, "save_pretrained"):
      from tokenizers import Tokenizer

      if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a transformers tokenizer, a tokenizers.Tokenizer, a model name/path "
                        f"or {{file name: bytes}}, got {type(tokenizer).__name__}")
      from transformers import PreTrainedTokenizerFast

      tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    from lqx import io

    files = io.tokenizer_files(tokenizer)
  for name, data in files.items():
    if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) and isinstance(data, bytes)):
      raise ValueError(f"tokenizer file {name!r}: expected a plain file name and its bytes")
  return files


def save_tokenizer(files: dict[str, bytes], folder: Path) -> None:
  """Writes tokenizer ``files`` (:func:`tokenizer_files`) into ``folder`` (none may exist yet)."""
  for name, data in files.items():
    with open(folder / name, "xb") as f:
      f.write(data)


def write_safetensors(folder: Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
                      value: Callable[[str], np.ndarray], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Writes tensors ``name -> value(name)`` (shape and dtype as ``specs`` says) into ``folder``; returns the files.

  One ``model.safetensors`` when they fit in ``max_shard_bytes``, else shards in ``specs`` order
  with a ``model.safetensors.index.json``. Values are made one shard at a time.
  """
  from safetensors.numpy import save_file

  if max_shard_bytes < 1:
    raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
  shards, size = [[]], 0
  for name, (shape, dt) in specs.items():
    n = int(np.prod(shape)) * np.dtype(dt).itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  files = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for file, names in zip(files, shards):
    arrays = {}
    for name in names:
      x = value(name)
      if (tuple(x.shape), x.dtype) != (tuple(specs[name][0]), np.dtype(specs[name][1])):
        raise AssertionError(f"{name}: made {x.shape} {x.dtype}, planned {specs[name]}")
      arrays[name] = x
    if (folder / file).exists():
      raise FileExistsError(f"{folder / file}: already written (a tokenizer file of that name?)")
    save_file(arrays, str(folder / file), metadata={"format": "pt"})  # transformers requires format "pt"
    os.chmod(folder / file, folder.stat().st_mode & 0o666)  # safetensors creates it 0600; others get the umask's
  if len(files) > 1:
    total = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in specs.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {name: file for file, names in zip(files, shards) for name in names}}
    write_json(folder / "model.safetensors.index.json", index)
    files.append("model.safetensors.index.json")
  return files


def write_json(file: Path, obj: dict) -> None:
  """``obj`` as indented JSON in a new file (``FileExistsError`` if something already wrote it)."""
  with open(file, "x", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def export_hf(out_dir: str | Path, config: LlamaConfig, params: dict, *, tokenizer=None, dtype=None,
              overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
  """Writes ``(config, params)`` as a Hugging Face safetensors folder, quantized leaves dequantized.

  ``dtype``: of every tensor (float32, float16 or bfloat16); None keeps each leaf's own
  (a quantized leaf's original ``dtype``), and ``config.json`` then names the widest.
  ``tokenizer``: None (no tokenizer files), a transformers tokenizer, a ``tokenizers.Tokenizer``,
  a model name/path (an lqx checkpoint's stored tokenizer is copied verbatim) or ``{file name: bytes}``
  (:func:`tokenizer_files`). ``out_dir`` must be missing or empty, or
  (``overwrite=True``) an earlier lqx export; the folder appears only when complete
  (``lqx.io.export.write_folder``). Returns its absolute path.
  """
  from lqx.io.export import check_destination, write_folder

  check_destination(out_dir, overwrite)
  table = leaves(config, params)
  tok_files = None if tokenizer is None else tokenizer_files(tokenizer)
  if dtype is not None:
    dtype = DTYPES[dtype_name(dtype)]
  dts = {name: np.dtype(dtype or leaf.dtype) for name, (_, leaf, _) in table.items()}
  for name, dt in dts.items():
    if dt not in DTYPES.values():
      raise ValueError(f"{table[name][0]}: dtype {dt} cannot be written; pass dtype= one of {tuple(DTYPES)}")
  kinds = set(dts.values())
  cfg = hf_config(config, kinds.pop() if len(kinds) == 1 else np.float32)  # mixed: float32 holds them all
  specs = {name: (tuple(leaf.shape)[::-1] if kernel else tuple(leaf.shape), dts[name])
           for name, (_, leaf, kernel) in table.items()}

  def value(name):
    path, leaf, kernel = table[name]
    return float_value(leaf, kernel, dts[name], path)

  def write(folder: Path):
    if tok_files is not None:
      save_tokenizer(tok_files, folder)
    write_safetensors(folder, specs, value, max_shard_bytes)
    write_json(folder / "config.json", cfg)

  return write_folder(out_dir, write, kind="hf", overwrite=overwrite)


__all__ = ["export_hf", "hf_config", "check_config", "leaves", "float_value", "tokenizer_files", "save_tokenizer",
           "write_safetensors", "write_json", "DTYPES"]
