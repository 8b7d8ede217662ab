"""GGUF (llama.cpp) -> LLaMA config and float parameter pytree.

Every tensor is dequantized with the ``gguf`` package (Q4_0/Q4_1/Q5_x/Q8_0/K-quants,
F16/BF16/F32) to float32. llama.cpp stores Q and K rows in a permuted rotary layout
(interleaved pairs); we un-permute them to the Hugging Face ``rotate_half`` layout
so that one model code path serves GGUF and safetensors checkpoints.

Untrusted files: the header, the metadata and the tensor table are read by a small
bounded parser of our own (``scan``) before anything else touches the file. Every
declared count or length is checked against the bytes left in the file and a cap, so
a hostile file cannot make the reader loop or allocate without end. The config is
checked against the tensors actually present (block count, shapes, types) before
any tensor is decoded, and what lqx's decoder does not compute (RoPE scaling,
partial rotary, MoE, unknown metadata or tensors) is rejected, not ignored. A sliding
attention window W is accepted as ``lqx.io.hf`` does: ``max_seq_len`` becomes
``min(context_length, W)``, where full causal attention is exact. Every error is a
``GGUFError`` (a ``ModelFileError``) naming the file and the field or tensor.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import re
import struct
from pathlib import Path

import numpy as np

from lqx.io.errors import ModelFileError
from lqx.models.llama import LlamaConfig, layer_names

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_VERSIONS = (2, 3)

# Caps on declared sizes, far above any real checkpoint, far below what hurts.
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_KEY_LEN = 1 << 16  # key and tensor name lengths
MAX_ARRAY_LEN = 1 << 22  # elements of one metadata array (vocabularies are ~2^18)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_LAYERS = 1 << 12
MAX_WIDTH = 1 << 20  # embedding_length, feed_forward_length, head_dim
MAX_HEADS = 1 << 14
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 28

# GGUF metadata value types (gguf.constants.GGUFValueType).
_STRING, _ARRAY, _BOOL = 8, 9, 7
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_INTS = (0, 1, 2, 3, 4, 5, 10, 11)
_FLOATS = (6, 12)
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
               7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}

# GGUF tensor name (per block) -> path in the lqx block.
_BLOCK_TENSORS = {
    "attn_norm.weight": ("attn_norm", "scale"),
    "attn_q.weight": ("attn", "q_proj", "kernel"),
    "attn_k.weight": ("attn", "k_proj", "kernel"),
    "attn_v.weight": ("attn", "v_proj", "kernel"),
    "attn_q.bias": ("attn", "q_proj", "bias"),
    "attn_k.bias": ("attn", "k_proj", "bias"),
    "attn_v.bias": ("attn", "v_proj", "bias"),
    "attn_output.weight": ("attn", "o_proj", "kernel"),
    "ffn_norm.weight": ("mlp_norm", "scale"),
    "ffn_gate.weight": ("mlp", "gate_proj", "kernel"),
    "ffn_up.weight": ("mlp", "up_proj", "kernel"),
    "ffn_down.weight": ("mlp", "down_proj", "kernel"),
}
_BLOCK_RE = re.compile(r"blk\.(\d{1,9})\.")

# Metadata keys under "<arch>." that lqx reads, or checks to hold their neutral value.
_ARCH_KEYS = {
    "block_count", "context_length", "embedding_length", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "attention.sliding_window", "attention.causal",
    "rope.freq_base", "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor", "rope.freq_scale",
    "expert_count", "expert_used_count",
}


class GGUFError(ModelFileError):
  """A GGUF file is unreadable, truncated, or not a supported model."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One entry of the tensor table: ggml dims (fastest first), type, byte range in the file."""

  name: str
  dims: tuple[int, ...]
  ggml_type: int
  start: int  # absolute file offset
  n_bytes: int

  @property
  def shape(self) -> tuple[int, ...]:
    """Torch / numpy order, e.g. (out, in)."""
    return tuple(reversed(self.dims))


@dataclasses.dataclass(frozen=True)
class Array:
  """A metadata array: element type and length (values are checked, not kept)."""

  item_type: int
  count: int


@dataclasses.dataclass
class Header:
  """What ``scan`` read: metadata ``key -> (type, value)`` and the tensor table."""

  path: Path
  version: int
  metadata: dict
  tensors: dict
  data_offset: int
  size: int


# ----------------------------------------------------------------------------- bounded parser


class _Cursor:
  """Reads little-endian values from ``buf``, never past ``size``; errors name the field."""

  def __init__(self, buf, size: int, path: Path):
    self.buf, self.size, self.path, self.pos = buf, size, path, 0

  def fail(self, msg: str):
    raise GGUFError(f"{self.path}: {msg}")

  def left(self) -> int:
    return self.size - self.pos

  def take(self, n: int, what: str) -> int:
    if n < 0 or n > self.left():
      self.fail(f"{what} runs past the end of the file at offset {self.pos} "
                f"(needs {n} bytes, {self.left()} left; truncated or corrupt?)")
    at = self.pos
    self.pos += n
    return at

  def unpack(self, fmt: str, what: str):
    at = self.take(struct.calcsize(fmt), what)
    return struct.unpack_from(fmt, self.buf, at)[0]

  def count(self, what: str, cap: int, min_item: int) -> int:
    """A declared u64 count, checked against ``cap`` and what the rest of the file can hold."""
    n = self.unpack("<Q", what)
    room = self.left() // max(min_item, 1)
    if n > cap or n > room:
      self.fail(f"{what} declares {n} entries, more than the file can hold "
                f"({self.left()} bytes left, at most {min(cap, room)})")
    return n

  def string(self, what: str, cap: int | None = None) -> str:
    n = self.unpack("<Q", f"length of {what}")
    if n > self.left() or (cap is not None and n > cap):
      self.fail(f"{what} declares a length of {n} bytes, more than the file can hold ({self.left()} bytes left)")
    at = self.take(n, what)
    try:
      return self.buf[at:at + n].decode("utf-8")
    except UnicodeDecodeError as e:
      self.fail(f"{what} is not valid UTF-8: {e}")


def _value(c: _Cursor, vtype: int, key: str):
  if vtype in _SCALARS:
    v = c.unpack(_SCALARS[vtype], f"value of {key!r}")
    if vtype == _BOOL:
      if v > 1:
        c.fail(f"metadata key {key!r}: bool value {v} is neither 0 nor 1")
      return bool(v)
    return v
  if vtype == _STRING:
    return c.string(f"value of {key!r}")
  if vtype == _ARRAY:
    item = c.unpack("<I", f"array type of {key!r}")
    if item == _ARRAY:
      c.fail(f"metadata key {key!r} is an array of arrays (not supported)")
    if item not in _SCALARS and item != _STRING:
      c.fail(f"metadata key {key!r} has unknown array element type {item}")
    size = 8 if item == _STRING else struct.calcsize(_SCALARS[item])
    n = c.count(f"array length of {key!r}", MAX_ARRAY_LEN, size)
    if item == _STRING:
      for i in range(n):
        c.string(f"element {i} of {key!r}")
    else:
      c.take(n * size, f"array {key!r}")
    return Array(item, n)
  c.fail(f"metadata key {key!r} has unknown value type {vtype}")


def scan(path: str | Path) -> Header:
  """Reads and checks the header, metadata and tensor table of a GGUF file, with every size bounded."""
  import gguf

  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  size = path.stat().st_size
  if size < 24:
    raise GGUFError(f"{path}: not a GGUF file ({size} bytes; truncated?)")
  with open(path, "rb") as f:
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  try:
    return _scan(path, buf, size, gguf)
  finally:
    buf.close()


def _scan(path: Path, buf, size: int, gguf) -> Header:
  c = _Cursor(buf, size, path)
  if buf[:4] != b"GGUF":
    c.fail(f"not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
  c.pos = 4
  version = c.unpack("<I", "version")
  if version not in SUPPORTED_VERSIONS:
    why = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
    c.fail(f"GGUF version {version} is not supported{why} (supported: {SUPPORTED_VERSIONS})")
  n_tensors = c.unpack("<Q", "tensor count")
  n_kv = c.unpack("<Q", "metadata key/value count")
  # A key/value takes >= 13 bytes (key length, type, 1-byte value), a tensor entry >= 32.
  if n_kv > MAX_KV or 13 * n_kv > c.left():
    c.fail(f"metadata key/value count {n_kv} is more than the file can hold ({c.left()} bytes left)")
  if n_tensors > MAX_TENSORS or 32 * n_tensors + 13 * n_kv > c.left():
    c.fail(f"tensor count {n_tensors} is more than the file can hold ({c.left()} bytes left)")

  metadata: dict = {}
  for i in range(n_kv):
    key = c.string(f"name of metadata key {i}", MAX_KEY_LEN)
    vtype = c.unpack("<I", f"type of {key!r}")
    value = _value(c, vtype, key)
    if key in metadata:
      c.fail(f"metadata key {key!r} appears twice")
    metadata[key] = (vtype, value)

  if 32 * n_tensors > c.left():
    c.fail(f"tensor count {n_tensors} is more than the file can hold ({c.left()} bytes left)")
  entries = []
  for i in range(n_tensors):
    name = c.string(f"name of tensor {i}", MAX_KEY_LEN)
    n_dims = c.unpack("<I", f"dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
      c.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    dims = tuple(c.unpack("<Q", f"dimension {d} of tensor {name!r}") for d in range(n_dims))
    ggml_type = c.unpack("<I", f"type of tensor {name!r}")
    offset = c.unpack("<Q", f"data offset of tensor {name!r}")
    entries.append((name, dims, ggml_type, offset))

  alignment = gguf.GGUF_DEFAULT_ALIGNMENT
  if "general.alignment" in metadata:
    vtype, alignment = metadata["general.alignment"]
    if vtype != 4 or alignment == 0 or alignment & (alignment - 1):
      c.fail(f"general.alignment must be a uint32 power of two, got {_TYPE_NAMES.get(vtype)} {alignment!r}")
  data_offset = -(-c.pos // alignment) * alignment
  if data_offset > size:
    c.fail(f"tensor data section starts at offset {data_offset}, past the end of the file ({size} bytes; truncated?)")

  tensors: dict = {}
  for name, dims, ggml_type, offset in entries:
    if name in tensors:
      c.fail(f"tensor {name!r} appears twice")
    if ggml_type not in gguf.GGML_QUANT_SIZES:
      c.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
    qtype = gguf.GGMLQuantizationType(ggml_type)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if any(d == 0 for d in dims):
      c.fail(f"tensor {name!r} has an empty dimension: dims {dims}")
    if dims[0] % block:
      c.fail(f"tensor {name!r} ({qtype.name}) has rows of {dims[0]} values, not a multiple of its block size {block}")
    if offset % alignment:
      c.fail(f"tensor {name!r} data offset {offset} is not a multiple of the alignment {alignment}")
    n_bytes = math.prod(dims) // block * type_size  # Python ints: no overflow
    if offset > size or n_bytes > size - data_offset - offset:
      c.fail(f"tensor {name!r} data ({n_bytes} bytes at offset {data_offset + offset}) runs past the end of "
             f"the file ({size} bytes; truncated?)")
    tensors[name] = TensorInfo(name, dims, ggml_type, data_offset + offset, n_bytes)
  ranges = sorted((t.start, t.start + t.n_bytes, t.name) for t in tensors.values())
  for (_, end, a), (start, _, b) in zip(ranges, ranges[1:]):
    if start < end:
      c.fail(f"tensors {a!r} and {b!r} overlap in the file")
  return Header(path, version, metadata, tensors, data_offset, size)


# ----------------------------------------------------------------------------- config


class _Meta:
  """Typed, range-checked access to a header's metadata; errors name the file and key."""

  def __init__(self, header: Header):
    self.h, self.path = header, header.path

  def fail(self, msg: str):
    raise GGUFError(f"{self.path}: {msg}")

  def has(self, key: str) -> bool:
    return key in self.h.metadata

  def _get(self, key, default, kinds, kind_name):
    """``(value, True)`` if ``key`` is present with a type in ``kinds``, else ``(default, False)``."""
    if key not in self.h.metadata:
      if default is _MISSING:
        self.fail(f"metadata key {key!r} is missing")
      return default, False
    vtype, value = self.h.metadata[key]
    if vtype not in kinds:
      self.fail(f"metadata key {key!r} must be {kind_name}, got {_TYPE_NAMES.get(vtype, vtype)} {value!r}")
    return value, True

  def get_int(self, key: str, default=None, lo: int = 1, hi: int = 1 << 62):
    v, found = self._get(key, default, _INTS, "an integer")
    if found and not lo <= v <= hi:
      self.fail(f"metadata key {key!r} is {v}, expected {lo} to {hi}")
    return v

  def get_float(self, key: str, default=None, lo: float = 0.0, hi: float = math.inf):
    v, found = self._get(key, default, _INTS + _FLOATS, "a number")
    if found:
      v = float(v)
      if not (math.isfinite(v) and lo < v < hi):
        self.fail(f"metadata key {key!r} is {v}, expected a finite number in ({lo}, {hi})")
    return v

  def get_str(self, key: str, default=None):
    return self._get(key, default, (_STRING,), "a string")[0]

  def get_bool(self, key: str, default=None):
    return self._get(key, default, (_BOOL,), "a bool")[0]


_MISSING = object()


def _unsupported(m: _Meta, arch: str) -> None:
  """Rejects metadata for features lqx's decoder does not compute (messages as in ``lqx.io.hf``)."""
  kind = m.get_str(f"{arch}.rope.scaling.type", "none")
  if kind != "none":
    m.fail(f"{arch}.rope.scaling.type {kind!r} is not supported (lqx implements unscaled RoPE only)")
  for key in (f"{arch}.rope.scaling.factor", f"{arch}.rope.freq_scale"):
    if m.has(key) and m.get_float(key) != 1.0:
      m.fail(f"{key}={m.get_float(key)} is not supported (lqx implements unscaled RoPE only)")
  for key in (f"{arch}.expert_count", f"{arch}.expert_used_count"):
    if m.get_int(key, 0, lo=0) != 0:
      m.fail(f"{key}={m.get_int(key, lo=0)} is not supported (mixture of experts; lqx has one dense MLP)")
  if m.has(f"{arch}.attention.causal"):
    if not m.get_bool(f"{arch}.attention.causal"):
      m.fail(f"{arch}.attention.causal=false is not supported (lqx is a causal decoder)")
  for key in m.h.metadata:
    if key.startswith(f"{arch}.") and key[len(arch) + 1:] not in _ARCH_KEYS:
      m.fail(f"metadata key {key!r} is not supported (a feature lqx's LlamaConfig does not implement)")
  if m.has("split.count") and m.get_int("split.count", lo=0) > 1:
    m.fail(f"split.count={m.get_int('split.count', lo=0)}: split GGUF files are not supported (merge them first)")


def _blocks(h: Header, n_layers: int, arch: str) -> None:
  """``block_count`` must match the ``blk.N.`` tensors present: no missing and no extra blocks."""
  seen = set()
  for name in h.tensors:
    if name.startswith("blk."):
      mt = _BLOCK_RE.match(name)
      if not mt:
        raise GGUFError(f"{h.path}: unexpected tensor {name!r} (no block index)")
      i = int(mt.group(1))
      if i >= n_layers:
        raise GGUFError(f"{h.path}: tensor {name!r} is beyond {arch}.block_count={n_layers} (extra tensors)")
      seen.add(i)
  if len(seen) != n_layers:
    missing = min(set(range(n_layers)) - seen)
    raise GGUFError(f"{h.path}: {arch}.block_count={n_layers} but the file holds no tensors for block {missing} "
                    f"(tensors for {len(seen)} blocks)")


def _config(h: Header) -> LlamaConfig:
  m = _Meta(h)
  arch = m.get_str("general.architecture", _MISSING)
  if arch not in SUPPORTED_ARCHITECTURES:
    m.fail(f"unsupported architecture {arch!r} (supported: {SUPPORTED_ARCHITECTURES})")
  _unsupported(m, arch)
  n_layers = m.get_int(f"{arch}.block_count", _MISSING, hi=MAX_LAYERS)
  _blocks(h, n_layers, arch)
  dim = m.get_int(f"{arch}.embedding_length", _MISSING, hi=MAX_WIDTH)
  n_heads = m.get_int(f"{arch}.attention.head_count", _MISSING, hi=MAX_HEADS)
  n_kv = m.get_int(f"{arch}.attention.head_count_kv", n_heads, hi=n_heads)
  if n_heads % n_kv:
    m.fail(f"{arch}.attention.head_count={n_heads} is not a multiple of {arch}.attention.head_count_kv={n_kv}")
  if m.has(f"{arch}.attention.key_length"):
    head_dim = m.get_int(f"{arch}.attention.key_length", hi=MAX_WIDTH)
  elif dim % n_heads:
    m.fail(f"{arch}.embedding_length={dim} is not a multiple of {arch}.attention.head_count={n_heads} "
           f"and {arch}.attention.key_length is missing")
  else:
    head_dim = dim // n_heads
  if head_dim % 2:
    m.fail(f"head dimension {head_dim} must be even for RoPE ({arch}.attention.key_length)")
  for key, what in ((f"{arch}.attention.value_length", "value heads"), (f"{arch}.rope.dimension_count",
                                                                         "partial rotary embedding")):
    if m.has(key) and m.get_int(key, hi=MAX_WIDTH) != head_dim:
      m.fail(f"{key}={m.get_int(key, hi=MAX_WIDTH)} differs from the head dimension {head_dim} "
             f"({what} not supported)")
  tokens = h.metadata.get("tokenizer.ggml.tokens")
  n_tokens = tokens[1].count if tokens and isinstance(tokens[1], Array) and tokens[1].count else None
  vocab = m.get_int(f"{arch}.vocab_size", n_tokens, hi=MAX_VOCAB)
  if vocab is None:
    m.fail(f"vocabulary size unknown (no {arch}.vocab_size and no tokenizer.ggml.tokens)")
  max_len = m.get_int(f"{arch}.context_length", 2048, hi=MAX_CONTEXT)
  window = m.get_int(f"{arch}.attention.sliding_window", 0, lo=0, hi=MAX_CONTEXT)
  if window:
    max_len = min(max_len, window)
  ids = {}
  for key in ("bos", "eos"):
    ids[key] = m.get_int(f"tokenizer.ggml.{key}_token_id", None, lo=0, hi=vocab - 1)
  try:
    return LlamaConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        ffn_dim=m.get_int(f"{arch}.feed_forward_length", _MISSING, hi=MAX_WIDTH),
        head_dim=head_dim,
        rope_theta=m.get_float(f"{arch}.rope.freq_base", 10000.0),
        norm_eps=m.get_float(f"{arch}.attention.layer_norm_rms_epsilon", _MISSING, hi=1.0),
        tie_embeddings="output.weight" not in h.tensors,
        attn_bias="blk.0.attn_q.bias" in h.tensors,
        max_seq_len=max_len,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
    )
  except GGUFError:
    raise
  except (TypeError, ValueError, ArithmeticError) as e:  # LlamaConfig's own checks
    raise GGUFError(f"{h.path}: {e}") from e


def read_config(path: str | Path, header: Header | None = None) -> LlamaConfig:
  """The architecture metadata of a GGUF file as a ``LlamaConfig`` (checked against its tensors)."""
  return _config(header or scan(path))


# ----------------------------------------------------------------------------- tensors


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool, int]]:
  """GGUF tensor name -> (path in the lqx tree, torch shape (out, in), is_kernel, rotary heads or 0)."""
  c = config
  D, V, F = c.dim, c.vocab_size, c.ffn_dim
  shapes = {
      "attn_norm.weight": ((D,), False, 0),
      "attn_q.weight": ((c.q_dim, D), True, c.n_heads),
      "attn_k.weight": ((c.kv_dim, D), True, c.n_kv_heads),
      "attn_v.weight": ((c.kv_dim, D), True, 0),
      "attn_q.bias": ((c.q_dim,), False, 0),
      "attn_k.bias": ((c.kv_dim,), False, 0),
      "attn_v.bias": ((c.kv_dim,), False, 0),
      "attn_output.weight": ((D, c.q_dim), True, 0),
      "ffn_norm.weight": ((D,), False, 0),
      "ffn_gate.weight": ((F, D), True, 0),
      "ffn_up.weight": ((F, D), True, 0),
      "ffn_down.weight": ((D, F), True, 0),
  }
  t = {"token_embd.weight": (("embed", "embedding"), (V, D), False, 0)}
  for i, name in enumerate(layer_names(c)):
    for suffix, sub in _BLOCK_TENSORS.items():
      if suffix.endswith(".bias") and not c.attn_bias:
        continue
      shape, kernel, heads = shapes[suffix]
      t[f"blk.{i}.{suffix}"] = ((name, *sub), shape, kernel, heads)
  t["output_norm.weight"] = (("final_norm", "scale"), (D,), False, 0)
  if not c.tie_embeddings:
    t["output.weight"] = (("lm_head", "kernel"), (V, D), True, 0)
  return t


def _check_tensors(h: Header, table: dict) -> None:
  """Missing, extra, wrongly shaped or non-float tensors: errors before anything is decoded."""
  import gguf

  missing = [n for n in table if n not in h.tensors]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise GGUFError(f"{h.path}: tensor {missing[0]!r} is missing{more}")
  extra = [n for n in h.tensors if n not in table]
  if extra:
    if "rope_freqs.weight" in extra:
      raise GGUFError(f"{h.path}: tensor 'rope_freqs.weight' (scaled RoPE, as Llama 3.1) is not supported "
                      f"(lqx implements unscaled RoPE only)")
    if any("_exps" in n or "ffn_gate_inp" in n for n in extra):
      raise GGUFError(f"{h.path}: tensors {extra[:5]} are mixture-of-experts weights (not supported)")
    raise GGUFError(f"{h.path}: unexpected tensors {extra[:5]} (a feature lqx's LlamaConfig does not "
                    f"implement, or metadata that does not match the weights)")
  floats = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
  ints = {gguf.GGMLQuantizationType[k] for k in ("I8", "I16", "I32", "I64")}
  for name, (_, shape, _, _) in table.items():
    t = h.tensors[name]
    if t.shape != shape:
      raise GGUFError(f"{h.path}: tensor {name!r} has shape {t.shape}, expected {shape} (torch (out, in) order)")
    qtype = gguf.GGMLQuantizationType(t.ggml_type)
    if qtype in ints:
      raise GGUFError(f"{h.path}: tensor {name!r} has integer type {qtype.name}, expected a float or quantized type")
    if len(shape) == 1 and qtype not in floats:
      raise GGUFError(f"{h.path}: tensor {name!r} is 1-D but has type {qtype.name} (expected F32, F16 or BF16)")


def _dequantize(t: TensorInfo, f, path: Path) -> np.ndarray:
  """Float32 copy of a GGUF tensor in numpy (torch) order, e.g. (out, in), read from open file ``f``."""
  import gguf
  from gguf.quants import dequantize

  qtype = gguf.GGMLQuantizationType(t.ggml_type)
  f.seek(t.start)
  data = f.read(t.n_bytes)
  if len(data) != t.n_bytes:
    raise GGUFError(f"{path}: tensor {t.name!r} data runs past the end of the file (truncated while read?)")
  rows = math.prod(t.shape[:-1])
  raw = np.frombuffer(data, np.uint8).reshape(rows, t.n_bytes // rows)
  try:
    w = dequantize(raw, qtype)
  except NotImplementedError as e:
    raise GGUFError(f"{path}: tensor {t.name!r} has unsupported type {qtype.name}") from e
  except Exception as e:
    raise GGUFError(f"{path}: tensor {t.name!r} ({qtype.name}) could not be decoded: {type(e).__name__}: {e}") from e
  if w.size != math.prod(t.shape):
    raise GGUFError(f"{path}: tensor {t.name!r} decodes to {w.size} values, expected shape {t.shape}")
  w = np.array(w, np.float32).reshape(t.shape)  # a writable copy
  if not np.all(np.isfinite(w)):
    raise GGUFError(f"{path}: tensor {t.name!r} contains NaN or Inf")
  return w


def unpermute_rotary(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's ``permute``: interleaved-pair rows -> HF half-split rows.

  w_out_in: (n_heads * Dh, in), torch layout. Within each head llama.cpp orders
  rows as (pair, 2); Hugging Face orders them as (2, pair).
  """
  out, rest = w_out_in.shape[0], w_out_in.shape[1:]
  return (w_out_in.reshape(n_heads, out // n_heads // 2, 2, *rest)
          .swapaxes(1, 2).reshape(w_out_in.shape))


def load_gguf(path: str | Path) -> tuple[LlamaConfig, dict]:
  """Reads a llama-architecture GGUF file into ``(config, params)`` (float32 numpy leaves)."""
  path = Path(path)
  h = scan(path)
  config = _config(h)
  table = expected_tensors(config)
  _check_tensors(h, table)
  params: dict = {}
  with open(path, "rb") as f:
    for name, (sub, _, kernel, heads) in table.items():
      w = _dequantize(h.tensors[name], f, path)
      if heads:
        w = unpermute_rotary(w, heads)
      node = params
      for key in sub[:-1]:
        node = node.setdefault(key, {})
      node[sub[-1]] = np.ascontiguousarray(w.T) if kernel else w
  return config, params


def load_tokenizer(path: str | Path):
  """The Hugging Face tokenizer stored in a GGUF file, built from that file alone.

  transformers would read ``tokenizer_config.json`` and friends from the GGUF's folder
  (and could follow an ``auto_map`` to code there), so the tokenizer is built in an
  empty temporary folder holding only a link to the file, with ``trust_remote_code=False``.
  """
  import shutil
  import tempfile

  path = Path(path)
  h = scan(path)
  m = _Meta(h)
  tokens = h.metadata.get("tokenizer.ggml.tokens")
  if tokens is None:
    m.fail("no tokenizer in the file (metadata key 'tokenizer.ggml.tokens' is missing)")
  if not isinstance(tokens[1], Array) or tokens[1].item_type != _STRING or tokens[1].count == 0:
    m.fail("metadata key 'tokenizer.ggml.tokens' must be a non-empty array of strings")
  n = tokens[1].count
  for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
    if key in h.metadata and (not isinstance(h.metadata[key][1], Array) or h.metadata[key][1].count != n):
      m.fail(f"metadata key {key!r} must be an array of {n} entries, one per token")
  for key in h.metadata:
    if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
      m.get_int(key, lo=0, hi=n - 1)
  m.get_str("tokenizer.ggml.model", _MISSING)
  from transformers import AutoTokenizer

  with tempfile.TemporaryDirectory(prefix="lqx-gguf-tokenizer-") as tmp:
    link = Path(tmp) / "model.gguf"
    try:
      link.symlink_to(path.resolve())
    except OSError:
      shutil.copyfile(path, link)
    try:
      tok = AutoTokenizer.from_pretrained(tmp, gguf_file=link.name, trust_remote_code=False,
                                          local_files_only=True)
    except Exception as e:
      raise GGUFError(f"{path}: could not build a tokenizer: {type(e).__name__}: {e}") from e
  tok.name_or_path = str(path)
  return tok
