"""Fuzzing ``lqx.io.hf.load_hf``: seeded mutations of tiny valid folders either load or raise ``HFError``.

Three base folders (LLaMA 1 layer F32; LLaMA 2 layers F16 in 3 shards with an index;
Qwen2 tied BF16) are mutated: byte flips, truncations and header length overwrites
of the safetensors files, header JSON edits, NaN/Inf/F64-overflow data, JSON edits
of config.json and the index (wrong types, extreme numbers, NaN, missing keys,
lists for objects, non-UTF-8 bytes, path traversal), symlinks out of the folder,
duplicate tensors. Each case runs in a worker subprocess under ``RLIMIT_AS`` (~1.5 GB)
with a per-case deadline and must either load (finite arrays of the shapes its
config declares) or raise ``HFError`` (a ``ModelFileError``); cases whose mutation
is invalid by construction (``must_fail``) must raise. Anything else (another
exception, a timeout, a crash, MemoryError) fails the test.

``LQX_FUZZ_CASES`` (default 300), ``LQX_FUZZ_SEED`` (0), ``LQX_FUZZ_TIMEOUT`` (s per case, 8).
Run one case by hand: ``python tests/test_fuzz_hf.py --case SEED:INDEX``.
"""

import json
import math
import os
import random
import resource
import selectors
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_CASES = int(os.environ.get("LQX_FUZZ_CASES", 300))
SEED = int(os.environ.get("LQX_FUZZ_SEED", 0))
CASE_TIMEOUT = float(os.environ.get("LQX_FUZZ_TIMEOUT", 8))
MEM_LIMIT = 1_500_000_000

BASES = {
    "llama1": dict(arch="llama", layers=1, dim=16, heads=2, kv=1, ffn=24, vocab=32, tie=False, dtype="F32", shards=1),
    "llama2_sharded": dict(arch="llama", layers=2, dim=32, heads=4, kv=2, ffn=40, vocab=48, tie=False, dtype="F16",
                           shards=3),
    "qwen2_tied": dict(arch="qwen2", layers=1, dim=16, heads=2, kv=2, ffn=24, vocab=32, tie=True, dtype="BF16",
                       shards=1),
}
_BASE_SEEDS = {name: i for i, name in enumerate(BASES)}
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bfloat16", "F64": np.float64}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
_BAD_BITS = {"F32": (0x7FC00000, 0x7F800000, 0xFF800000), "F16": (0x7E00, 0x7C00, 0xFC00),
             "BF16": (0x7FC0, 0x7F80, 0xFF80), "F64": (0x7FF8000000000000, 0x7FF0000000000000)}


# ----------------------------------------------------------------------------- base folders


def base_tensors(spec: dict, seed: int = 0) -> dict:
  """HF tensor name -> torch-layout array for ``spec`` (written independently of lqx.io.hf)."""
  import ml_dtypes

  rng = np.random.default_rng(seed)
  D, V, F, hd = spec["dim"], spec["vocab"], spec["ffn"], spec["dim"] // spec["heads"]
  q, kv = spec["heads"] * hd, spec["kv"] * hd
  shapes = {"model.embed_tokens.weight": (V, D)}
  for i in range(spec["layers"]):
    p = f"model.layers.{i}."
    shapes.update({p + "input_layernorm.weight": (D,), p + "self_attn.q_proj.weight": (q, D),
                   p + "self_attn.k_proj.weight": (kv, D), p + "self_attn.v_proj.weight": (kv, D),
                   p + "self_attn.o_proj.weight": (D, q), p + "post_attention_layernorm.weight": (D,),
                   p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                   p + "mlp.down_proj.weight": (D, F)})
    if spec["arch"] == "qwen2":
      shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                     p + "self_attn.v_proj.bias": (kv,)})
  shapes["model.norm.weight"] = (D,)
  if not spec["tie"]:
    shapes["lm_head.weight"] = (V, D)
  dt = ml_dtypes.bfloat16 if spec["dtype"] == "BF16" else _NP_DTYPES[spec["dtype"]]
  return {n: (0.1 * rng.standard_normal(s)).astype(dt) for n, s in shapes.items()}


def base_config(spec: dict) -> dict:
  """A config.json as transformers 5 writes it for ``spec``."""
  cfg = {"architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[spec["arch"]]],
         "model_type": spec["arch"], "vocab_size": spec["vocab"], "hidden_size": spec["dim"],
         "num_hidden_layers": spec["layers"], "num_attention_heads": spec["heads"],
         "num_key_value_heads": spec["kv"], "intermediate_size": spec["ffn"], "hidden_act": "silu",
         "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": spec["tie"],
         "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "bos_token_id": 1, "eos_token_id": 2,
         "attention_dropout": 0.0, "initializer_range": 0.02, "pad_token_id": None, "use_cache": True,
         "transformers_version": "5.24.0"}
  if spec["arch"] == "llama":
    cfg.update(attention_bias=False, mlp_bias=False, head_dim=spec["dim"] // spec["heads"], pretraining_tp=1)
  else:
    cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=28,
               layer_types=["full_attention"] * spec["layers"])
  return cfg


def write_folder(folder: Path, spec: dict, seed: int = 0):
  """A valid tiny HF folder: config.json and model.safetensors, or ``shards`` files plus an index."""
  from safetensors.numpy import save_file

  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(base_config(spec), indent=2))
  tensors = base_tensors(spec, seed)
  n = spec["shards"]
  if n == 1:
    save_file(tensors, folder / "model.safetensors")
    return
  names = list(tensors)
  weight_map = {}
  for k in range(n):
    file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    part = {name: tensors[name] for name in names[k::n]}
    save_file(part, folder / file)
    weight_map.update(dict.fromkeys(part, file))
  total = sum(t.nbytes for t in tensors.values())
  index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ----------------------------------------------------------------------------- mutations


def _st_files(folder: Path) -> list[Path]:
  return sorted(folder.glob("*.safetensors"))


def _split(file: Path) -> tuple[dict, bytes]:
  data = file.read_bytes()
  n = struct.unpack("<Q", data[:8])[0]
  return json.loads(data[8:8 + n]), data[8 + n:]


def _join(file: Path, header, body: bytes, raw: bytes | None = None):
  text = raw if raw is not None else json.dumps(header).encode()
  file.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _edit_json(file: Path, edit):
  obj = json.loads(file.read_text())
  obj = edit(obj) or obj
  file.write_text(json.dumps(obj))


_HOSTILE = [None, True, False, 0, -1, 1, 2, 3, 7, 2**31, 2**32, 2**63, 10**6, 10**30, 1.5, 16.0, -0.0,
            math.nan, math.inf, -math.inf, 1e308, 1e-300, "16", "", "false", "true", "silu", [], [1], [16, 16],
            {}, {"a": 1}, "x" * 5000]
_COUNT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_OPTIONAL_COUNT_KEYS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
_CONFIG_KEYS = (*_COUNT_KEYS, *_OPTIONAL_COUNT_KEYS, "tie_word_embeddings", "attention_bias", "mlp_bias",
                "rope_theta", "rms_norm_eps", "bos_token_id", "eos_token_id", "hidden_act", "architectures",
                "model_type", "rope_parameters", "rope_scaling", "use_sliding_window", "layer_types",
                "partial_rotary_factor", "num_local_experts", "auto_map", "torch_dtype", "some_unknown_key")


def _is_int(v) -> bool:
  return type(v) is int


def _is_num(v) -> bool:
  return type(v) in (int, float) and math.isfinite(v)


def _must_fail_value(key: str, v, spec: dict) -> bool:
  """True when config.json[key] = v is invalid whatever else the folder holds."""
  if key in _COUNT_KEYS:
    return not _is_int(v) or v <= 0 or (key == "num_hidden_layers" and v != spec["layers"])
  if key in _OPTIONAL_COUNT_KEYS:
    return v is not None and (not _is_int(v) or v <= 0)
  if key == "tie_word_embeddings":
    return v is not spec["tie"]
  if (key in ("attention_bias", "mlp_bias") and spec["arch"] == "llama") or (
      key == "use_sliding_window" and spec["arch"] == "qwen2"):  # the base has sliding_window: null
    return v is not False
  if key == "rope_theta":
    return v is not None and v != 10000.0
  if key == "rms_norm_eps":
    return not (_is_num(v) and 0 < v < 1)
  if key in ("bos_token_id", "eos_token_id"):
    ids = v if isinstance(v, list) else [] if v is None else [v]
    return not all(_is_int(i) and i >= 0 for i in ids)
  if key == "hidden_act":
    return v != "silu"
  if key == "partial_rotary_factor":
    return not (_is_num(v) and v == 1)
  if key == "num_local_experts":
    return v not in (None, 0)
  if key == "rope_parameters":
    return v not in (None, {}, {"rope_theta": 10000.0, "rope_type": "default"})
  return False


def mutate(rng: random.Random, folder: Path, outside: Path, spec: dict) -> tuple[str, bool]:
  """Applies one random mutation to ``folder``; returns (label, must_fail)."""
  files = _st_files(folder)
  file = rng.choice(files)
  index = folder / "model.safetensors.index.json"
  kinds = ["flip", "truncate", "header_len", "header_json", "bad_value", "f64", "config_value", "config_value",
           "config_delete", "config_root", "config_bytes", "rope", "symlink", "duplicate", "tie", "layers"]
  if index.exists():
    kinds += ["index", "index", "index"]
  kind = rng.choice(kinds)

  if kind == "flip":
    data = bytearray(file.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    lo, hi = (0, min(len(data), 8 + n)) if rng.random() < 0.5 else (min(len(data), 8 + n), len(data))
    for _ in range(rng.randint(1, 8)):
      pos = rng.randrange(lo, hi) if hi > lo else rng.randrange(len(data))
      data[pos] = data[pos] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
    file.write_bytes(bytes(data))
    return f"flip {file.name}", False

  if kind == "truncate":
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    cut = rng.choice([rng.randrange(9), rng.randrange(8, 8 + n), rng.randrange(8 + n, len(data))])
    file.write_bytes(data[:cut])
    return f"truncate {file.name} to {cut}", True  # every tensor is read: losing bytes must fail

  if kind == "header_len":
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    size = len(data)
    value = rng.choice([0, 1, 7, 8, n - 1, n + 1, size - 8, size - 7, size, 2**31, 2**32, 2**32 + n, 2**63,
                        2**64 - 1, 100_000_000, 100_000_001, rng.getrandbits(64), rng.getrandbits(32)])
    file.write_bytes(struct.pack("<Q", value) + data[8:])
    return f"header_len {file.name} = {value}", value != n and value > size - 8

  if kind == "header_json":
    header, body = _split(file)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    op = rng.choice(["dtype", "shape", "offsets", "delete", "rename", "duplicate", "metadata", "root"])
    if op == "dtype":
      entry["dtype"] = rng.choice(["I64", "I32", "BOOL", "U8", "F8_E4M3", "float32", "", 5, None, "F16", "F32",
                                   "BF16", "F64"])
    elif op == "shape":
      s = entry["shape"]
      entry["shape"] = rng.choice([[], [0], [-1], [2**31], [2**63], [2**64], s + [1], s[::-1], [1] + s,
                                   [d + 1 for d in s], ["3"], 1.5, [2**32, 2**32], [0, 2**62]])
    elif op == "offsets":
      a, b = entry["data_offsets"]
      entry["data_offsets"] = rng.choice([[b, a], [0, 2**64], [-1, b], [a, b + 2], [a, 2**63], "0", [a], [a, a]])
    elif op == "delete":
      del header[name]
    elif op == "rename":
      header[rng.choice(["model.layers.7.mlp.up_proj.weight", "model.layers.99999999999.x", "model.layers.-1.x",
                         "lm_head.bias", name + ".extra"])] = header.pop(name)
    elif op == "metadata":
      header["__metadata__"] = rng.choice([{"format": 5}, [1], "pt", {"a": {"b": 1}}])
    elif op == "root":
      _join(file, None, body, raw=rng.choice([b"[]", b"null", b"1", b'"x"', b"{" * 5000]))
      return f"header_json root {file.name}", True
    if op == "duplicate":  # the same key twice in the JSON text
      text = json.dumps(header)
      dup = json.dumps({name: entry})[1:-1]
      _join(file, None, body, raw=("{" + dup + ", " + text[1:]).encode())
      return f"header_json duplicate {name}", True
    _join(file, header, body)
    return f"header_json {op} {name}", op in ("delete", "rename", "root")

  if kind == "bad_value":  # a NaN/Inf bit pattern inside a tensor's data
    header, body = _split(file)
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    size = _ITEMSIZE[entry["dtype"]]
    a, b = entry["data_offsets"]
    k = rng.randrange((b - a) // size)
    bits = rng.choice(_BAD_BITS[entry["dtype"]])
    body = bytearray(body)
    body[a + k * size:a + (k + 1) * size] = bits.to_bytes(size, "little")
    _join(file, header, bytes(body))
    return f"bad_value {name}[{k}]", True

  if kind == "f64":  # widen one tensor to F64: finite values load, ones beyond float32 must fail
    from safetensors.numpy import load_file, save_file

    tensors = load_file(file)
    name = rng.choice(list(tensors))
    big = rng.random() < 0.5
    tensors[name] = np.full(tensors[name].shape, 1e300, np.float64) if big else tensors[name].astype(np.float64)
    save_file(tensors, file)
    return f"f64 {name} big={big}", big

  cfg_file = folder / "config.json"
  if kind == "config_value":
    key = rng.choice(_CONFIG_KEYS)
    value = rng.choice(_HOSTILE)
    _edit_json(cfg_file, lambda c: c.__setitem__(key, value))
    return f"config {key}={value!r:.40}", _must_fail_value(key, value, spec)

  if kind == "config_delete":
    cfg = json.loads(cfg_file.read_text())
    key = rng.choice(list(cfg))
    _edit_json(cfg_file, lambda c: c.pop(key))
    return f"config del {key}", key in _COUNT_KEYS

  if kind == "config_root":
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(rng.choice([[cfg], [], "config", 1, None, [list(cfg.items())]])))
    return "config root", True

  if kind == "config_bytes":
    data = cfg_file.read_bytes()
    op = rng.choice(["latin1", "invalid_utf8", "truncate", "flip"])
    if op == "latin1":
      data = data.replace(b'"silu"', '"silué"'.encode("latin-1"))
    elif op == "invalid_utf8":
      pos = rng.randrange(len(data))
      data = data[:pos] + rng.choice([b"\xff", b"\xfe\xff", b"\xc3", b"\x80", b"\xed\xa0\x80"]) + data[pos:]
    elif op == "truncate":
      data = data[:rng.randrange(len(data))]
    else:
      data = bytearray(data)
      pos = rng.randrange(len(data))
      data[pos] ^= 1 << rng.randrange(8)
      data = bytes(data)
    cfg_file.write_bytes(data)
    return f"config bytes {op}", op != "flip"

  if kind == "rope":
    key = rng.choice(["rope_parameters", "rope_scaling"])
    value = rng.choice([{"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}, {"type": "linear", "factor": 2.0},
                        {"rope_type": "default", "rope_theta": math.nan}, {"rope_type": "yarn"},
                        {"rope_type": "default", "partial_rotary_factor": 0.5}, [], "default", 1,
                        {"rope_type": "default", "mrope_section": [1, 2]}, {"rope_type": "default", "rope_theta": 0},
                        {"rope_type": "default", "rope_theta": 10000.0}, {"rope_type": None}, None])
    _edit_json(cfg_file, lambda c: c.__setitem__(key, value))
    ok = value is None or value in ({"rope_type": "default", "rope_theta": 10000.0}, {"rope_type": None})
    return f"rope {key}={value!r:.40}", not ok

  if kind == "symlink":
    op = rng.choice(["outside", "devzero", "loop", "config_outside", "inside"])
    if op == "outside":
      target = outside / file.name
      shutil.copy(file, target)
      file.unlink()
      file.symlink_to(target)
    elif op == "devzero":
      file.unlink()
      file.symlink_to("/dev/zero")
    elif op == "loop":
      file.unlink()
      file.symlink_to(file.name)
    elif op == "config_outside":
      shutil.copy(cfg_file, outside / "config.json")
      cfg_file.unlink()
      cfg_file.symlink_to(outside / "config.json")
    else:  # a link that stays inside the folder is fine
      (folder / "sub").mkdir(exist_ok=True)
      file.rename(folder / "sub" / file.name)
      file.symlink_to(Path("sub") / file.name)
    return f"symlink {op} {file.name}", op != "inside"

  if kind == "duplicate":  # a second copy of a tensor in another file
    from safetensors.numpy import load_file, save_file

    tensors = load_file(file)
    name = rng.choice(list(tensors))
    others = [f for f in files if f != file]
    if others:
      other = rng.choice(others)
      extra = load_file(other)
    else:  # single file: split it into two unindexed files, both holding ``name``
      other = folder / "model-extra.safetensors"
      file.rename(folder / "model-a.safetensors")
      file = folder / "model-a.safetensors"
      extra = {}
    extra[name] = tensors[name] if rng.random() < 0.5 else tensors[name] * 2
    save_file(extra, other)
    return f"duplicate {name}", True

  if kind == "tie":
    from safetensors.numpy import load_file, save_file

    if spec["tie"]:  # add an lm_head: an exact copy of the embedding loads, anything else must fail
      tensors = load_file(file)
      emb = load_file(next(f for f in files if "model.embed_tokens.weight" in load_file(f)))["model.embed_tokens.weight"]
      same = rng.random() < 0.5
      tensors["lm_head.weight"] = emb if same else emb * 2
      save_file(tensors, file)
      if index.exists():
        _edit_json(index, lambda ix: ix["weight_map"].__setitem__("lm_head.weight", file.name))
      return f"tie lm_head same={same}", not same
    value = rng.choice([True, "true", "false", 1, None])
    _edit_json(cfg_file, lambda c: c.__setitem__("tie_word_embeddings", value))
    return f"tie {value!r}", True  # a real, different lm_head is present

  if kind == "layers":
    value = rng.choice([0, -1, spec["layers"] + 1, 10**6, 2**32, 1024, 1025, 2**63, spec["layers"]])
    _edit_json(cfg_file, lambda c: c.__setitem__("num_hidden_layers", value))
    return f"layers {value}", value != spec["layers"]

  # index
  ix = json.loads(index.read_text())
  wm = ix["weight_map"]
  name = rng.choice(list(wm))
  op = rng.choice(["dotdot", "absolute", "type", "missing_file", "other_shard", "config", "drop", "add", "wm_type",
                   "root", "bytes", "duplicate", "subdir_dotdot"])
  shard = wm[name]
  if op in ("dotdot", "absolute"):
    shutil.copy(folder / shard, outside / shard)
    wm[name] = f"../{outside.name}/{shard}" if op == "dotdot" else str(outside / shard)
  elif op == "type":
    wm[name] = rng.choice([5, None, [], {}, True, 1.5])
  elif op == "missing_file":
    wm[name] = "model-99999-of-99999.safetensors"
  elif op == "other_shard":
    wm[name] = rng.choice([f for f in set(wm.values()) if f != shard])
  elif op == "config":
    wm[name] = "config.json"
  elif op == "subdir_dotdot":
    wm[name] = f"sub/../{shard}"
  elif op == "drop":
    del wm[name]
  elif op == "add":
    wm["model.layers.0.extra.weight"] = shard
  elif op == "wm_type":
    ix["weight_map"] = rng.choice([list(wm.items()), None, "x", 1])
  elif op == "root":
    ix = rng.choice([[ix], [], None])
  if op == "bytes":
    index.write_bytes(index.read_bytes().replace(b'"weight_map"', b'"weight_map\xff"'))
  elif op == "duplicate":
    text = json.dumps(wm)
    ix_text = json.dumps({**ix, "weight_map": None}).replace("null", "{" + json.dumps({name: shard})[1:-1] + ", "
                                                             + text[1:])
    index.write_text(ix_text)
  else:
    index.write_text(json.dumps(ix))
  return f"index {op} {name}", True


# ----------------------------------------------------------------------------- checking one case


def declared_shapes(config) -> dict:
  """Path -> shape of the lqx tree that ``config`` declares (kernels (in, out)), written independently."""
  D, V, F = config.dim, config.vocab_size, config.ffn_dim
  q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
  out = {("embed", "embedding"): (V, D), ("final_norm", "scale"): (D,)}
  for i in range(config.n_layers):
    n = f"layers_{i}"
    out.update({(n, "attn_norm", "scale"): (D,), (n, "mlp_norm", "scale"): (D,),
                (n, "attn", "q_proj", "kernel"): (D, q), (n, "attn", "k_proj", "kernel"): (D, kv),
                (n, "attn", "v_proj", "kernel"): (D, kv), (n, "attn", "o_proj", "kernel"): (q, D),
                (n, "mlp", "gate_proj", "kernel"): (D, F), (n, "mlp", "up_proj", "kernel"): (D, F),
                (n, "mlp", "down_proj", "kernel"): (F, D)})
    if config.attn_bias:
      out.update({(n, "attn", "q_proj", "bias"): (q,), (n, "attn", "k_proj", "bias"): (kv,),
                  (n, "attn", "v_proj", "bias"): (kv,)})
  if not config.tie_embeddings:
    out[("lm_head", "kernel")] = (D, V)
  return out


def _leaves(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaves(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def run_case(case_seed: str, bases: Path) -> dict:
  """Builds, mutates and loads one case; the outcome is 'load', 'error' or 'bad' (a failure)."""
  from lqx.io import hf
  from lqx.io.errors import ModelFileError

  rng = random.Random(case_seed)
  base = rng.choice(sorted(BASES))
  work = Path(tempfile.mkdtemp(prefix="fuzz_hf_"))
  try:
    folder, outside = work / "model", work / "outside"
    outside.mkdir()
    shutil.copytree(bases / base, folder, symlinks=True)
    n_mut = 1 if rng.random() < 0.85 else rng.randint(2, 3)
    labels, must_fail = [], False
    for k in range(n_mut):
      try:
        label, fail = mutate(rng, folder, outside, BASES[base])
      except Exception:  # a stacked mutation that does not apply to what an earlier one left (a JSON list...)
        if k == 0:
          raise
        break
      labels.append(label)
      must_fail = fail if n_mut == 1 else False  # stacked mutations may undo each other
    res = {"case": case_seed, "base": base, "mutation": " + ".join(labels), "kind": labels[0].split()[0]}
    try:
      config, params = hf.load_hf(folder)
    except hf.HFError as e:
      ok = isinstance(e, ModelFileError) and isinstance(e, ValueError)
      return {**res, "outcome": "error" if ok else "bad", "detail": str(e).splitlines()[0][:300]}
    except BaseException as e:  # noqa: BLE001  anything else is a finding
      return {**res, "outcome": "bad", "detail": f"raw {type(e).__name__}: {str(e)[:300]}"}
    got = {path: v for path, v in _leaves(params)}
    want = declared_shapes(config)
    problems = []
    if must_fail:
      problems.append("loaded a folder that must be rejected")
    if set(got) != set(want):
      problems.append(f"tree {sorted(set(got) ^ set(want))[:4]}")
    for path, v in got.items():
      if path in want and tuple(v.shape) != want[path]:
        problems.append(f"{path} shape {v.shape} != {want[path]}")
      if not (v.dtype == np.float32 and np.all(np.isfinite(v))):
        problems.append(f"{path} dtype {v.dtype} or non-finite")
    return {**res, "outcome": "bad" if problems else "load", "detail": "; ".join(problems)[:300]}
  finally:
    shutil.rmtree(work, ignore_errors=True)


def worker(bases: Path, seeds: list[str]):
  """Runs cases in this process under RLIMIT_AS, printing START and a JSON result line per case."""
  resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  import lqx.io.hf  # noqa: F401  imports before the first deadline
  import safetensors.numpy  # noqa: F401

  print("READY", flush=True)
  for s in seeds:
    print("START", s, flush=True)
    try:
      res = run_case(s, bases)
    except MemoryError:
      res = {"case": s, "outcome": "bad", "detail": "MemoryError while building/mutating the case"}
    print("RESULT", json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- driver


def run_cases(bases: Path, seeds: list[str], timeout: float = CASE_TIMEOUT) -> list[dict]:
  """Runs ``seeds`` in worker subprocesses; a case past ``timeout`` or a dead worker is a 'bad' result."""
  results, todo = [], list(seeds)
  while todo:
    proc = subprocess.Popen([sys.executable, __file__, "--worker", str(bases), *todo], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    current, failure, tail, started = None, None, [], False
    deadline = time.monotonic() + 120  # the first deadline covers the imports
    try:
      while todo:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
          failure = f"timeout > {timeout}s" if current else "worker stalled between cases"
          break
        line = proc.stdout.readline()
        if not line:
          failure = f"worker died (rc={proc.wait()}): {''.join(tail)[-600:]}"
          break
        tail = (tail + [line])[-10:]
        if line.startswith("START "):
          current, deadline, started = line.split()[1], time.monotonic() + timeout, True
        elif line.startswith("RESULT "):
          results.append(json.loads(line[7:]))
          todo.remove(current)
          current, deadline = None, time.monotonic() + timeout
    finally:
      if proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait()
      proc.stdout.close()
    if failure:
      results.append({"case": current or "(worker)", "outcome": "bad", "detail": failure})
      if current is not None:
        todo.remove(current)  # go on with the cases after the one that hung or crashed
      elif not started:
        break  # workers cannot start: no point retrying
  return results


def test_fuzz_hf_reader(tmp_path, capsys):
  t0 = time.monotonic()
  bases = tmp_path / "bases"
  for name, spec in BASES.items():
    write_folder(bases / name, spec, seed=_BASE_SEEDS[name])
  seeds = [f"{SEED}:{i}" for i in range(N_CASES)]
  results = run_cases(bases, seeds)
  bad = [r for r in results if r["outcome"] == "bad"]
  n_err = sum(r["outcome"] == "error" for r in results)
  n_load = sum(r["outcome"] == "load" for r in results)
  kinds = {}
  for r in results:
    k = kinds.setdefault(r.get("kind", "?"), [0, 0])
    k[r["outcome"] == "load"] += r["outcome"] != "bad"
  with capsys.disabled():
    print(f"\nfuzz lqx.io.hf: {len(results)} cases (seed {SEED}): {n_err} clean HFError, {n_load} loads, "
          f"{len(bad)} bad, {time.monotonic() - t0:.1f}s")
    print("  by mutation (errors/loads): " + ", ".join(f"{k} {e}/{l}" for k, (e, l) in sorted(kinds.items())))
  assert not bad, "\n".join(f"{r['case']} {r.get('mutation', '')}: {r['detail']}" for r in bad[:20])
  assert len(results) == len(seeds)
  assert n_load > 0 and n_err > 0


def test_bases_load(tmp_path):
  """The unmutated folders load, with the exact stored values (so mutations start from valid input)."""
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from lqx.io import hf

  for name, spec in BASES.items():
    write_folder(tmp_path / name, spec, seed=3)
    config, params = hf.load_hf(tmp_path / name)
    want = base_tensors(spec, seed=3)
    assert (config.n_layers, config.tie_embeddings, config.attn_bias) == (spec["layers"], spec["tie"],
                                                                          spec["arch"] == "qwen2")
    assert np.array_equal(params["layers_0"]["attn"]["k_proj"]["kernel"],
                          want["model.layers.0.self_attn.k_proj.weight"].astype(np.float32).T)
    assert {p: v.shape for p, v in _leaves(params)} == declared_shapes(config)


if __name__ == "__main__":
  if sys.argv[1] == "--worker":
    worker(Path(sys.argv[2]), sys.argv[3:])
  elif sys.argv[1] == "--case":  # reproduce one case: python tests/test_fuzz_hf.py --case 0:17
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as d:
      for name, spec in BASES.items():
        write_folder(Path(d) / name, spec, seed=_BASE_SEEDS[name])
      print(json.dumps(run_case(sys.argv[2], Path(d)), indent=2))
