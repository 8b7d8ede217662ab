"""Hugging Face checkpoint folder (``config.json`` + safetensors) -> LLaMA config and params.

Reads ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM`` folders
holding ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
Tensors are read with ``safetensors``' numpy backend (never pickle); F32, F16,
BF16 and F64 are accepted and cast to ``dtype`` (float32 by default, as the GGUF
reader returns). Torch ``(out, in)`` weights become ``(in, out)`` kernels; Q/K rows
are already in the ``rotate_half`` layout that ``lqx.models.llama`` uses.

RoPE comes from ``rope_theta`` and the scaling object (transformers 4 writes
``rope_scaling``, transformers 5 ``rope_parameters``; where a file has both they
must agree): the default type, or Llama 3.1's ``"llama3"`` with all of
``factor``, ``low_freq_factor``, ``high_freq_factor`` and
``original_max_position_embeddings`` (``LlamaConfig.rope_scaling``).

What lqx's decoder does not compute is rejected with an error, not approximated:
other RoPE scalings (``linear``, ``dynamic``, ``yarn``, ``longrope``, ...) or
scaling keys a type does not use, partial rotary embeddings, mixture-of-experts
keys, activations other than SiLU, LLaMA's ``attention_bias`` (it includes an
o_proj bias) and ``mlp_bias``, and ``auto_map`` custom model code. A sliding
attention window W (Mistral v0.1, Qwen2 with ``use_sliding_window``) is accepted:
lqx attends to the full causal prefix, which equals sliding-window attention for
sequences of at most W tokens, so ``config.max_seq_len`` is set to
``min(max_position_embeddings, W)``.

The folder is untrusted input. Every failure is an ``HFError`` (a
``ModelFileError``) naming the file and the field or tensor: JSON must be UTF-8,
size-capped and free of duplicate keys; counts in ``config.json`` must be real
integers in range and consistent, booleans real booleans, and the layer count
must match the ``model.layers.N.`` tensors before the expected tensor set is
built; safetensors header lengths are bounded by the file size before anything
is parsed; every file the index names must resolve inside the folder (symlinks
included; a Hugging Face hub cache snapshot may link into its ``blobs``); a tensor
may live in one file only; shapes and dtypes are checked before data is read,
and values must be finite. Tokenizers never run a folder's Python code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from pathlib import Path, PurePosixPath

import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so safetensors' numpy backend reads BF16
import numpy as np

from lqx.io.errors import ModelFileError
from lqx.models.llama import Llama3RoPE, LlamaConfig, layer_names

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # a buffer some older checkpoints saved
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
_MAX_JSON_BYTES = 16 << 20  # config.json and the index are kilobytes (a 405B model's index: ~100 KB)
_MAX_HEADER_BYTES = 16 << 20  # safetensors allows 100 MB; real headers are well under 1 MB
_LIMITS = {  # upper bounds of config.json counts, far above any released model
    "vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_hidden_layers": 1024,
    "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "head_dim": 1 << 12,
    "max_position_embeddings": 1 << 26, "sliding_window": 1 << 26,
}
_ROPE_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
             "moe_intermediate_size", "n_shared_experts", "shared_expert_intermediate_size")
_LAYER_TYPES = ("full_attention", "sliding_attention")
_LAYER_RE = re.compile(r"model\.layers\.(\d{1,9})\.")
_REQUIRED = object()


class HFError(ModelFileError):
  """A Hugging Face folder is unreadable, truncated, or not a supported model."""


# ----------------------------------------------------------------------------- untrusted files


def _show(v, n=60) -> str:
  """A short repr of a config value for error messages."""
  r = repr(v)
  return r if len(r) <= n else r[: n - 3] + "..."


class _DuplicateKey(Exception):
  pass


def _no_duplicates(pairs):
  obj = {}
  for k, v in pairs:
    if k in obj:
      raise _DuplicateKey(k)
    obj[k] = v
  return obj


def _parse_json(data: bytes, where: str):
  """JSON from bytes: strict UTF-8, no duplicate keys; any failure is an HFError naming ``where``."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise HFError(f"{where}: not UTF-8 text (byte {e.start}: {e.reason})") from e
  try:
    return json.loads(text, object_pairs_hook=_no_duplicates)
  except _DuplicateKey as e:
    raise HFError(f"{where}: key {_show(e.args[0])} appears twice (which one is meant?)") from None
  except (ValueError, RecursionError) as e:  # JSONDecodeError, int digit limit, deep nesting
    raise HFError(f"{where}: not valid JSON: {type(e).__name__}: {_show(str(e), 200)}") from e


def _roots(root: Path) -> tuple[Path, ...]:
  """Folders the files of ``root`` may resolve into: itself, and the blobs of a hub cache snapshot."""
  real = root.resolve()
  if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
    return real, real.parent.parent / "blobs"  # <cache>/models--org--name/snapshots/<rev>/x -> ../../blobs/<sha>
  return (real,)


def _confine(root: Path, file: Path, what: str) -> Path:
  """``file``, after checking that it (symlinks followed) lies inside the model folder ``root``."""
  try:
    real = file.resolve()
  except (OSError, RuntimeError, ValueError) as e:  # symlink loop, odd names
    raise HFError(f"{what}: cannot resolve {file}: {e}") from e
  if not any(real.is_relative_to(r) for r in _roots(root)):
    raise HFError(f"{what}: {file} resolves to {real}, outside the model folder {root.resolve()}")
  return file


def _read_json(file: Path, root: Path | None = None) -> dict:
  """The JSON object in ``file`` (inside folder ``root``, default its parent), size-capped."""
  _confine(file.parent if root is None else root, file, str(file))
  if not file.is_file():
    raise HFError(f"{file}: not a regular file")
  try:
    with open(file, "rb") as f:
      data = f.read(_MAX_JSON_BYTES + 1)
  except OSError as e:
    raise HFError(f"{file}: cannot read: {e}") from e
  if len(data) > _MAX_JSON_BYTES:
    raise HFError(f"{file}: larger than {_MAX_JSON_BYTES} bytes (not a model folder's JSON)")
  obj = _parse_json(data, str(file))
  if not isinstance(obj, dict):
    raise HFError(f"{file}: top level is a JSON {type(obj).__name__}, expected an object")
  return obj


def _header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Tensor name -> (dtype, shape) from a safetensors header, its length bounded by the file size first."""
  if not file.is_file():
    raise HFError(f"{file}: safetensors file not found")
  try:
    with open(file, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      head = f.read(8)
      if len(head) < 8:
        raise HFError(f"{file}: {size} bytes, too short for a safetensors header (truncated?)")
      n = struct.unpack("<Q", head)[0]
      if n > size - 8 or n > _MAX_HEADER_BYTES:
        raise HFError(f"{file}: header length field is {n} bytes but {size - 8} follow it "
                      f"(limit {_MAX_HEADER_BYTES}; truncated or corrupt?)")
      data = f.read(n)
  except OSError as e:
    raise HFError(f"{file}: cannot read: {e}") from e
  hdr = _parse_json(data, f"{file} (safetensors header)")
  if not isinstance(hdr, dict):
    raise HFError(f"{file}: safetensors header is a JSON {type(hdr).__name__}, expected an object")
  out = {}
  for name, info in hdr.items():
    if name == "__metadata__":
      continue
    ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
    if not ok or not all(type(d) is int and d >= 0 for d in info["shape"]):
      raise HFError(f"{file}: safetensors header entry {_show(name)} is {_show(info)}, "
                    f"expected {{dtype, shape, data_offsets}} (corrupt?)")
    out[name] = (info["dtype"], tuple(info["shape"]))
  return out


@contextlib.contextmanager
def _reading(file: Path):
  """Turns what the safetensors library raises on a corrupt file into an HFError naming it."""
  try:
    yield
  except (HFError, MemoryError, KeyboardInterrupt, SystemExit):
    raise
  except BaseException as e:  # SafetensorError, numpy's ValueError, a pyo3 PanicException (a BaseException)
    raise HFError(f"{file}: not a readable safetensors file (truncated or corrupt?): "
                  f"{type(e).__name__}: {_show(str(e), 200)}") from e


# ----------------------------------------------------------------------------- config.json


def _get(cfg: dict, key: str, file: Path, default):
  if key in cfg:
    return cfg[key]
  if default is _REQUIRED:
    raise HFError(f"{file}: required key {key!r} is missing")
  return default


def _int(cfg: dict, key: str, file: Path, default=_REQUIRED, lo: int = 1) -> int | None:
  """An integer field (not a bool, float or string) in ``[lo, _LIMITS[key]]``; absent or null gives
  ``default`` where there is one."""
  v = _get(cfg, key, file, default)
  if v is None and default is not _REQUIRED:
    return default
  if type(v) is not int:
    raise HFError(f"{file}: {key} must be an integer, got {_show(v)}")
  hi = _LIMITS.get(key)
  if v < lo or (hi is not None and v > hi):
    raise HFError(f"{file}: {key}={_show(v)} is out of range [{lo}, {hi if hi is not None else 'inf'}]")
  return v


def _float(v, field: str, file: Path, hi: float = math.inf) -> float:
  """A finite number in ``(0, hi)`` (JSON ints accepted, bools and strings not)."""
  if type(v) not in (int, float) or not (0 < v < hi) or not math.isfinite(v):
    bound = "" if hi == math.inf else f" and below {hi}"
    raise HFError(f"{file}: {field} must be a finite number above 0{bound}, got {_show(v)}")
  return float(v)


def _bool(cfg: dict, key: str, file: Path, default: bool) -> bool:
  v = _get(cfg, key, file, default)
  if type(v) is not bool:
    raise HFError(f"{file}: {key} must be true or false, got {_show(v)}")
  return v


def _token_id(cfg: dict, key: str, file: Path) -> int | None:
  """A token id, which config.json may give as null, an int or a list of ints (the first one wins)."""
  x = cfg.get(key)
  ids = x if isinstance(x, list) else [] if x is None else [x]
  if not all(type(i) is int and i >= 0 for i in ids):
    raise HFError(f"{file}: {key} must be null, a token id or a list of them, got {_show(x)}")
  return ids[0] if ids else None


def architecture(cfg: dict, path: Path) -> str:
  """The supported architecture named by a ``config.json`` dict."""
  model_type = cfg.get("model_type")
  if model_type is not None and not isinstance(model_type, str):
    raise HFError(f"{path}: model_type must be a string, got {_show(model_type)}")
  archs = cfg.get("architectures")
  if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
    raise HFError(f"{path}: architectures must be a list of class names, got {_show(archs)}")
  archs = archs or [_MODEL_TYPES.get(model_type, model_type)]
  for a in archs:
    if a in SUPPORTED_ARCHITECTURES:
      return a
  raise HFError(f"{path}: unsupported architecture {', '.join(map(_show, archs))} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")


def _full_rotary(v, field: str, file: Path):
  if type(v) not in (int, float) or v != 1:
    raise HFError(f"{file}: {field}={_show(v)} is not supported (lqx rotates the whole head)")


def _llama3(rp: dict, key: str, path: Path) -> Llama3RoPE:
  """The Llama 3.1 scaling of a ``rope_type: "llama3"`` object; every field required and checked."""
  missing = [k for k in _LLAMA3_KEYS if rp.get(k) is None]
  if missing:
    raise HFError(f"{path}: {key} of type 'llama3' lacks {', '.join(map(repr, missing))}")
  factor, low, high = (_float(rp[k], f"{key}.{k}", path) for k in _LLAMA3_KEYS[:3])
  orig = rp["original_max_position_embeddings"]
  if type(orig) is not int or not 1 <= orig <= _LIMITS["max_position_embeddings"]:
    raise HFError(f"{path}: {key}.original_max_position_embeddings must be an integer in "
                  f"[1, {_LIMITS['max_position_embeddings']}], got {_show(orig)}")
  if high <= low:
    raise HFError(f"{path}: {key}.high_freq_factor={high} must be above low_freq_factor={low}")
  return Llama3RoPE(factor, low, high, orig)


def _rope(cfg: dict, path: Path) -> tuple[float, Llama3RoPE | None]:
  """RoPE base and scaling (None or Llama 3.1's) from ``rope_theta`` and the scaling objects
  (transformers 4: ``rope_scaling``, 5: ``rope_parameters``), which must agree where both are given."""
  thetas, scalings = {}, {}
  if cfg.get("rope_theta") is not None:
    thetas["rope_theta"] = _float(cfg["rope_theta"], "rope_theta", path)
  if "partial_rotary_factor" in cfg:
    _full_rotary(cfg["partial_rotary_factor"], "partial_rotary_factor", path)
  for key in ("rope_scaling", "rope_parameters"):
    rp = cfg.get(key)
    if rp is None:
      continue
    if not isinstance(rp, dict):
      raise HFError(f"{path}: {key} must be an object or null, got {_show(rp)}")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in (None, "default", "llama3"):
      raise HFError(f"{path}: {key} type {_show(kind)} is not supported "
                    f"(lqx implements unscaled RoPE and 'llama3' scaling only)")
    known = _ROPE_KEYS + (_LLAMA3_KEYS if kind == "llama3" else ())
    extra = sorted(k for k in rp if k not in known)
    if extra:
      raise HFError(f"{path}: {key} has {', '.join(map(repr, extra))}, which lqx's "
                    f"{'llama3-scaled' if kind == 'llama3' else 'unscaled'} RoPE does not implement")
    if "partial_rotary_factor" in rp:
      _full_rotary(rp["partial_rotary_factor"], f"{key}.partial_rotary_factor", path)
    if rp.get("rope_theta") is not None:
      thetas[f"{key}.rope_theta"] = _float(rp["rope_theta"], f"{key}.rope_theta", path)
    scalings[key] = _llama3(rp, key, path) if kind == "llama3" else None
  if len(set(thetas.values())) > 1:
    raise HFError(f"{path}: RoPE bases disagree: {', '.join(f'{k}={v}' for k, v in thetas.items())}")
  if len(set(scalings.values())) > 1:
    shown = (f"{k} is {'unscaled' if v is None else v}" for k, v in scalings.items())
    raise HFError(f"{path}: RoPE scalings disagree: {', '.join(shown)}")
  return next(iter(thetas.values()), 10000.0), next(iter(scalings.values()), None)


def _sliding_window(cfg: dict, arch: str, path: Path, n_layers: int) -> int | None:
  w = _int(cfg, "sliding_window", path, None)
  if arch != "Qwen2ForCausalLM":
    return w
  use = _bool(cfg, "use_sliding_window", path, False)
  _int(cfg, "max_window_layers", path, None, lo=0)
  layer_types = cfg.get("layer_types")
  if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != n_layers
                                  or not all(t in _LAYER_TYPES for t in layer_types)):
    raise HFError(f"{path}: layer_types must list {n_layers} of {_LAYER_TYPES}, got {_show(layer_types)}")
  if not (use or "sliding_attention" in (layer_types or [])):
    return None
  if w is None:
    raise HFError(f"{path}: sliding attention is on (use_sliding_window/layer_types) but sliding_window is null")
  return w


def read_config(path: str | Path) -> LlamaConfig:
  """The ``config.json`` of a Hugging Face folder as a ``LlamaConfig``; every field checked."""
  path = Path(path)
  file = path / "config.json"
  if not (file.exists() or file.is_symlink()):
    raise HFError(f"{path}: no config.json (not a Hugging Face model folder)")
  cfg = _read_json(file, path)
  arch = architecture(cfg, file)
  amap = cfg.get("auto_map")
  if amap is not None and (not isinstance(amap, dict) or any(str(k).startswith("AutoModel") for k in amap)):
    raise HFError(f"{file}: auto_map {_show(amap)} points to custom model code; lqx reads the standard "
                  f"{arch} layout only and never runs a folder's code")
  act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
  if act != "silu":
    raise HFError(f"{file}: hidden_act {_show(act)} is not supported (lqx's MLP is SwiGLU with silu)")
  if arch == "LlamaForCausalLM":
    for flag in ("attention_bias", "mlp_bias"):
      if _bool(cfg, flag, file, False):
        raise HFError(f"{file}: {flag}=true is not supported (lqx has q/k/v biases only, as Qwen2)")
  for key in _MOE_KEYS:
    if cfg.get(key) not in (None, 0):
      raise HFError(f"{file}: {key}={_show(cfg[key])}: mixture-of-experts layers are not supported")
  n_layers = _int(cfg, "num_hidden_layers", file)
  n_heads = _int(cfg, "num_attention_heads", file)
  n_kv = _int(cfg, "num_key_value_heads", file, None) or n_heads
  dim = _int(cfg, "hidden_size", file)
  head_dim = _int(cfg, "head_dim", file, None)
  if head_dim is None and dim % n_heads:
    raise HFError(f"{file}: hidden_size={dim} is not a multiple of num_attention_heads={n_heads} (and no head_dim)")
  if n_heads % n_kv:
    raise HFError(f"{file}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
  if (head_dim or dim // n_heads) % 2:
    raise HFError(f"{file}: head_dim={head_dim or dim // n_heads} must be even for RoPE")
  max_len = _int(cfg, "max_position_embeddings", file, 2048)
  rope_theta, rope_scaling = _rope(cfg, file)
  window = _sliding_window(cfg, arch, file, n_layers)
  if window is not None:
    max_len = min(max_len, window)
  try:
    return LlamaConfig(
        vocab_size=_int(cfg, "vocab_size", file),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        ffn_dim=_int(cfg, "intermediate_size", file),
        head_dim=head_dim,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=_float(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", file, hi=1.0),
        tie_embeddings=_bool(cfg, "tie_word_embeddings", file, False),
        attn_bias=arch == "Qwen2ForCausalLM",
        max_seq_len=max_len,
        bos_token_id=_token_id(cfg, "bos_token_id", file),
        eos_token_id=_token_id(cfg, "eos_token_id", file),
    )
  except (TypeError, ValueError) as e:
    if isinstance(e, HFError):
      raise
    raise HFError(f"{file}: {e}") from e


# ----------------------------------------------------------------------------- tensors


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


def _shard(path: Path, index: Path, name, value) -> Path:
  """The file a ``weight_map`` entry names: a relative ``.safetensors`` path inside the folder."""
  where = f"{index}: weight_map[{_show(name)}]"
  if not isinstance(value, str):
    raise HFError(f"{where} is {_show(value)}, expected a file name")
  parts = PurePosixPath(value).parts
  if (not value.endswith(".safetensors") or value.startswith("/") or ".." in parts or "\\" in value
      or "\0" in value or ":" in value):
    raise HFError(f"{where} = {_show(value)}: expected a .safetensors file name inside the model folder")
  return _confine(path, path / value, where)


def _tensor_table(path: Path) -> tuple[dict[str, Path], dict[str, tuple[str, tuple[int, ...]]]]:
  """(tensor name -> file, tensor name -> (dtype, shape)) from the index and the headers, which must agree."""
  index = path / "model.safetensors.index.json"
  listed = None
  if index.exists() or index.is_symlink():
    weight_map = _read_json(index, path).get("weight_map")
    if not isinstance(weight_map, dict):
      raise HFError(f"{index}: 'weight_map' is {_show(weight_map)}, expected an object of tensor name -> file")
    listed = {name: _shard(path, index, name, file) for name, file in weight_map.items()}
    files = list(dict.fromkeys(listed.values()))
  elif (path / "model.safetensors").exists() or (path / "model.safetensors").is_symlink():
    files = [path / "model.safetensors"]
  else:
    files = sorted(path.glob("*.safetensors"))
    if not files:
      raise HFError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors "
                    f"(pickled .bin checkpoints are not read)")
  where, info = {}, {}
  for file in files:
    _confine(path, file, str(file))
    for name, entry in _header(file).items():
      if name in where:
        raise HFError(f"{file}: tensor {name!r} is also in {where[name]} (duplicate tensors: which one is meant?)")
      if listed is not None and listed.get(name) != file:
        other = f"maps it to {listed[name].name}" if name in listed else "does not list it"
        raise HFError(f"{file}: holds tensor {name!r} but {index.name} {other}")
      where[name], info[name] = file, entry
  for name, file in (listed or {}).items():
    if name not in where:
      raise HFError(f"{file}: tensor {name!r} is missing (the index lists it in this file)")
  return where, info


def safetensors_files(path: str | Path) -> dict[str, Path]:
  """Tensor name -> the safetensors file in folder ``path`` that holds it (from the index if sharded)."""
  return _tensor_table(Path(path))[0]


def _check_layers(config: LlamaConfig, where: dict, path: Path):
  """The declared layer count must match the ``model.layers.N.`` tensors (before any per-layer work)."""
  found = {int(m.group(1)) for n in where if (m := _LAYER_RE.match(n))}
  n = max(found) + 1 if found else 0
  if n != config.n_layers:
    held = f"{n} layers (model.layers.0-{n - 1})" if n else "no model.layers.N tensors"
    raise HFError(f"{path / 'config.json'}: num_hidden_layers={config.n_layers} but the safetensors files hold {held}")


def load_hf(path: str | Path, dtype=np.float32) -> tuple[LlamaConfig, dict]:
  """Reads a Hugging Face LLaMA-family folder into ``(config, params)`` (numpy leaves).

  ``dtype``: leaf dtype (default float32, like ``load_gguf``); ``None`` keeps the
  stored one (e.g. ``ml_dtypes.bfloat16``).
  """
  from safetensors import safe_open

  path = Path(path)
  config = read_config(path)
  where, info = _tensor_table(path)
  _check_layers(config, where, path)
  expected = expected_tensors(config)
  missing = [n for n in expected if n not in where]
  if missing:
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise HFError(f"{path}: tensor {missing[0]!r}{more} is missing from the safetensors files")
  tied_head = config.tie_embeddings and "lm_head.weight" in where
  unexpected = [n for n in where if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
                and not (n == "lm_head.weight" and tied_head)]
  if unexpected:
    raise HFError(f"{path}: unexpected tensors {[_show(n) for n in unexpected[:5]]} (a feature lqx's "
                  f"{type(config).__name__} does not implement, or a config.json that does not match the weights)")
  if tied_head:  # read it too: tie_word_embeddings=true may only drop a copy of the embedding
    expected = {**expected, "lm_head.weight": (("_tied_head",), expected["model.embed_tokens.weight"][1], False)}
  for name, (_, shape, _) in expected.items():
    kind, got = info[name]
    if got != shape:
      raise HFError(f"{where[name]}: tensor {name!r} has shape {got}, expected {shape} (torch (out, in) order)")
    if kind not in _FLOAT_DTYPES:
      raise HFError(f"{where[name]}: tensor {name!r} has dtype {_show(kind)}, expected one of {_FLOAT_DTYPES}")

  params: dict = {}
  by_file: dict[Path, list[str]] = {}
  for name in expected:
    by_file.setdefault(where[name], []).append(name)
  for file, names in by_file.items():
    with _reading(file), safe_open(str(file), framework="np") as f:
      for name in names:
        sub, shape, is_kernel = expected[name]
        raw = f.get_tensor(name)
        if tuple(raw.shape) != shape:
          raise HFError(f"{file}: tensor {name!r} read with shape {raw.shape}, expected {shape}")
        with np.errstate(over="ignore", invalid="ignore"):
          w = raw if dtype is None else raw.astype(dtype, copy=False)
        if not np.all(np.isfinite(w)):
          bad = "contains NaN or Inf" if w is raw or not np.all(np.isfinite(raw)) else f"overflows {w.dtype}"
          raise HFError(f"{file}: tensor {name!r} {bad}")
        w = np.ascontiguousarray(w.T) if is_kernel else w
        node = params
        for key in sub[:-1]:
          node = node.setdefault(key, {})
        node[sub[-1]] = w
  if tied_head:
    head = params.pop("_tied_head")
    if not np.array_equal(head, params["embed"]["embedding"]):
      raise HFError(f"{where['lm_head.weight']}: tie_word_embeddings is true but tensor 'lm_head.weight' differs "
                    f"from 'model.embed_tokens.weight' (tying would drop the real head)")
  ordered = {k: params[k] for k in ("embed", *layer_names(config), "final_norm", "lm_head") if k in params}
  return config, ordered


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | Path):
  """The tokenizer saved in a Hugging Face folder (local files only, no hub access, no custom code)."""
  path = Path(path)
  if not any((path / f).is_file() for f in _TOKENIZER_FILES):
    raise HFError(f"{path}: no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)})")
  for name in ("tokenizer_config.json", "config.json"):
    file = path / name
    if not (file.exists() or file.is_symlink()):
      continue
    amap = _read_json(file, path).get("auto_map")
    if amap is not None and (name == "tokenizer_config.json" or not isinstance(amap, dict) or "AutoTokenizer" in amap):
      raise HFError(f"{file}: auto_map {_show(amap)} names custom tokenizer code; lqx never runs a folder's "
                    f"Python code (trust_remote_code=False)")
  from transformers import AutoTokenizer

  try:
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
  except Exception as e:
    raise HFError(f"{path}: could not build a tokenizer: {type(e).__name__}: {e}") from e
