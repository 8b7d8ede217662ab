"""lqx ``(config, params)`` -> a llama-architecture GGUF file, quantized kernels repacked exactly.

A GGUF weight is a torch-order ``(rows, C)`` matrix (a kernel's ``(OC, IC)``, the
embedding's ``(vocab, dim)``) cut into blocks of 32 consecutive values of a row:
for a kernel, 32 consecutive *input* channels of one output channel, which is an
lqx per-OC group (``group_axis="oc"``). A ``QArray`` (``w ≈ (code - zero) * scale``)
is written in the smallest block type that decodes to its ``dequantize_stored()``
weights (in input-channel order) bit for bit, if one does:

=====  ====  ===================  ==========================================
type   bpw   GGUF decodes         holds exactly, with ``t = code - zero``
=====  ====  ===================  ==========================================
Q4_0   4.5   ``d * (q - 8)``      ``-8 <= t <= 7`` (4-bit sym; 2/3-bit sym)
Q4_1   5.0   ``d * q + m``        ``code <= 15`` and ``m = -scale * zero`` a float16
Q5_0   5.5   ``d * (q - 16)``     ``-16 <= t <= 15`` (5-bit sym, 4-bit asym)
Q5_1   6.0   ``d * q + m``        ``code <= 31`` and ``m`` a float16
Q8_0   8.5   ``d * q``            ``-128 <= t <= 127`` (8-bit sym, <= 7-bit asym)
=====  ====  ===================  ==========================================

and always ``d = scale`` a float16 value and ``scale``, ``zero`` constant on each
block (per-OC groups of any multiple of 32, per-channel, per-tensor; not per-IC
groups). The products and sums are exact in float32, so the decoded weights equal
lqx's; each repacked tensor is decoded again here and compared bit for bit.
Everything else (float kernels, other layouts, codebooks and wrapper formats) is
written as F16 (``float_type="f16"``, the default) or F32; 1-D tensors (norms) as
F32. Nothing is ever re-quantized by the ``gguf`` package. :func:`choose_types`
says per tensor which type is used, whether it is exact, and why.

Q and K rows are permuted into llama.cpp's interleaved rotary order (the inverse of
``lqx.io.gguf.unpermute_rotary``); the permutation moves whole rows, so it commutes
with row blocks. Tied embeddings write ``token_embd`` and no ``output.weight``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from lqx.models.llama import LlamaConfig

log = logging.getLogger(__name__)

BLOCK = 32  # values per block of every type written here
FLOAT_TYPES = ("f16", "f32")
# Block types in the order tried (smallest first): name -> (q range lo, hi, has a min m).
# Offset types store q = t + offset with t = code - zero; min types store q = code, m = -scale * zero.
_OFFSET = {"Q4_0": (-8, 7), "Q5_0": (-16, 15), "Q8_0": (-128, 127)}
_MIN = {"Q4_1": 15, "Q5_1": 31}
_ORDER = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


@dataclasses.dataclass(frozen=True)
class Choice:
  """How one tensor is written: its GGUF type, whether it decodes to lqx's weights bit for bit, and why."""

  name: str
  ggml_type: str  # "Q4_0", "F16", ...
  exact: bool
  note: str


class _NoBlocks(Exception):
  """A QArray no block type holds exactly; the message says why."""


# ----------------------------------------------------------------------------- layouts


def permute_rotary(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
  """Hugging Face half-split rows -> llama.cpp interleaved pairs (inverse of ``unpermute_rotary``).

  w_out_in: ``(n_heads * Dh, ...)``; within each head rows go from ``(2, pair)`` to ``(pair, 2)``.
  """
  out, rest = w_out_in.shape[0], w_out_in.shape[1:]
  return (w_out_in.reshape(n_heads, 2, out // n_heads // 2, *rest)
          .swapaxes(1, 2).reshape(w_out_in.shape))


def _rows(x: np.ndarray, kernel: bool) -> np.ndarray:
  """An lqx ``(IC, OC)`` array as GGUF rows: ``(OC, IC)`` for a kernel, unchanged for the embedding."""
  return np.ascontiguousarray(x.T) if kernel else x


def _affine_rows(qa, kernel: bool):
  """``(codes, scale, zero)`` of a QArray as GGUF rows: ``(R, C)`` int32 codes, ``(R, C/32)`` block params.

  Raises ``_NoBlocks`` unless scale and zero are constant on every block of 32 values of a row.
  """
  import jax.numpy as jnp

  from lqx.formats import affine

  rows = qa.shape[1] if kernel else qa.shape[0]
  cols = qa.shape[0] if kernel else qa.shape[1]
  if cols % BLOCK:
    raise _NoBlocks(f"GGUF rows of {cols} values are not a multiple of {BLOCK}")
  inv = None if qa.perm is None else np.argsort(np.asarray(qa.perm))

  def full(p):  # (G_ic, G_oc) -> (R, C/32, 32) in input-channel order
    x = np.asarray(affine.expand_groups(jnp.asarray(p, jnp.float32), qa.shape, qa.group_size, qa.group_axis))
    return _rows(x if inv is None else x[inv], kernel).reshape(rows, cols // BLOCK, BLOCK)

  scale, zero = full(qa.scale), full(qa.zero_points())
  if not (np.all(scale == scale[..., :1]) and np.all(zero == zero[..., :1])):
    raise _NoBlocks(f"scale/zero vary within a block of {BLOCK} values along a GGUF row "
                    f"({qa.group_axis!r} groups of {qa.group_size}; GGUF blocks need per-OC groups of a multiple "
                    f"of {BLOCK})")
  codes = _rows(np.asarray(qa.codes()).astype(np.int32), kernel)
  return codes, scale[..., 0], zero[..., 0]


# ----------------------------------------------------------------------------- block encoders


def _nibbles(q: np.ndarray) -> np.ndarray:
  """``(R, nb, 32)`` values < 16 -> ``(R, nb, 16)`` bytes: low nibble value j, high nibble value j + 16."""
  q = q.astype(np.uint8)
  return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
  """``(R, nb, 32)`` 5-bit values -> ``(R, nb, 4)`` bytes: bit j of the little-endian uint32 is bit 4 of value j."""
  return np.packbits(((q >> 4) & 1).astype(np.uint8), axis=-1, bitorder="little")


def _f16_bytes(x: np.ndarray) -> np.ndarray:
  return x.astype(np.float16)[..., None].view(np.uint8)


def _pack(kind: str, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
  """``(R, nb * size)`` uint8 blocks of ``kind``: ``q`` ``(R, nb, 32)`` stored integers, ``d``, ``m`` ``(R, nb)``."""
  parts = [_f16_bytes(d)] + ([_f16_bytes(m)] if m is not None else [])
  if kind == "Q8_0":
    parts.append(q.astype(np.int8).view(np.uint8))
  else:
    parts += ([_high_bits(q)] if kind.startswith("Q5") else []) + [_nibbles(q)]
  blocks = np.concatenate(parts, axis=-1)
  return blocks.reshape(blocks.shape[0], -1)


def _repack(qa, kernel: bool) -> tuple[str, np.ndarray, str]:
  """``(type, (R, bytes) uint8, note)``: the smallest block type holding ``qa`` exactly; raises ``_NoBlocks``."""
  codes, scale, zero = _affine_rows(qa, kernel)
  codes = codes.reshape(codes.shape[0], -1, BLOCK)  # (R, nb, 32)
  d = scale.astype(np.float16)
  if not np.array_equal(d.astype(np.float32), scale):
    raise _NoBlocks(f"scales ({np.dtype(qa.scale_dtype).name}) are not all float16 values")
  t = codes - zero[..., None].astype(np.int32)
  m = -(scale.astype(np.float64) * zero)  # exact in float64
  m_ok = np.array_equal(m.astype(np.float16).astype(np.float64), m)
  for kind in _ORDER:
    if kind in _OFFSET:
      lo, hi = _OFFSET[kind]
      if lo <= t.min() and t.max() <= hi:
        offset = 0 if kind == "Q8_0" else -lo
        return kind, _pack(kind, t + offset, d, None), f"{qa.bits}-bit codes; d = scale, q = code - zero + {offset}"
    elif m_ok and codes.max() <= _MIN[kind]:
      return kind, _pack(kind, codes, d, m.astype(np.float16)), f"{qa.bits}-bit codes; d = scale, m = -scale * zero"
  raise _NoBlocks(f"no block type holds code - zero in [{t.min()}, {t.max()}]"
                  f"{'' if m_ok else ' and -scale * zero is not a float16'}")


def _reference(leaf, kernel: bool) -> np.ndarray:
  """Float32 weight as GGUF rows: a QArray's ``dequantize_stored()`` in IC order, else ``dequantize()``."""
  from lqx.formats.affine import QArray

  if isinstance(leaf, QArray):
    w = np.asarray(leaf.dequantize_stored())
    if leaf.perm is not None:
      w = w[np.argsort(np.asarray(leaf.perm))]
  elif hasattr(leaf, "dequantize"):
    w = np.asarray(leaf.dequantize())
  else:
    w = np.asarray(leaf)
  return _rows(w.astype(np.float32), kernel) if w.ndim == 2 else w.astype(np.float32)


def encode(leaf, *, kernel: bool, heads: int = 0, float_type: str = "f16", name: str = "tensor"):
  """``(raw, ggml_type, Choice)`` for one lqx leaf, ready for ``GGUFWriter.add_tensor(name, raw, raw_dtype=...)``.

  ``leaf``: an ``(IC, OC)`` kernel (``kernel=True``), the ``(vocab, dim)`` embedding or a 1-D
  vector (``kernel=False``), float or any ``lqx.formats`` format. ``raw`` is ``(R, bytes)``
  uint8 for block types and a float array otherwise, rows in GGUF (torch) order and, with
  ``heads``, in llama.cpp's rotary order. Exact block types are checked by decoding.
  """
  import gguf
  from gguf.quants import dequantize

  from lqx.formats.affine import QArray

  if float_type not in FLOAT_TYPES:
    raise ValueError(f"float_type={float_type!r}; expected one of {FLOAT_TYPES}")
  ref = _reference(leaf, kernel)
  if heads:
    ref = permute_rotary(ref, heads)
  why = ""
  if isinstance(leaf, QArray):
    try:
      kind, raw, note = _repack(leaf, kernel)
      if heads:
        raw = permute_rotary(raw, heads)
      qtype = gguf.GGMLQuantizationType[kind]
      if not np.array_equal(dequantize(raw, qtype).reshape(ref.shape), ref):
        raise AssertionError(f"{name}: {kind} repacking does not decode to lqx's weights (a bug in lqx)")
      return raw, qtype, Choice(name, kind, True, note)
    except _NoBlocks as e:
      why = f"QArray not repacked ({e}); "
  elif hasattr(leaf, "dequantize"):
    why = f"{type(leaf).__name__} has no GGUF block type; "
  if ref.ndim == 1 or float_type == "f32":
    return ref, gguf.GGMLQuantizationType.F32, Choice(name, "F32", True, why + "float32 values")
  w16 = ref.astype(np.float16)
  if not np.all(np.isfinite(w16)):
    return ref, gguf.GGMLQuantizationType.F32, Choice(name, "F32", True, why + "beyond float16 range")
  exact = np.array_equal(w16.astype(np.float32), ref)
  return w16, gguf.GGMLQuantizationType.F16, Choice(name, "F16", bool(exact), why + "rounded to float16")


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_fields(tokenizer, vocab_size: int) -> list[tuple]:
  """``[(key, value, GGUFValueType, array item type or None)]``: the ``tokenizer.*`` metadata to write.

  ``tokenizer``: a ``.gguf`` file or lqx model name (its ``tokenizer.*`` keys, verbatim); another
  model path ``lqx.io.load_tokenizer`` reads (its tokenizer, converted); or a Hugging Face
  tokenizer object: converted if byte-level BPE, copied from its file if lqx loaded it from a GGUF.
  """
  if isinstance(tokenizer, (str, Path)):
    from lqx.io import _resolve, load_tokenizer

    kind, path = _resolve(tokenizer)
    if kind == "gguf":
      return _copy_gguf_tokenizer(path, vocab_size)
    tokenizer = load_tokenizer(tokenizer)
  source = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
  if source.suffix == ".gguf" and source.is_file():
    return _copy_gguf_tokenizer(source, vocab_size)
  return _convert_hf_tokenizer(tokenizer, vocab_size)


def _copy_gguf_tokenizer(path: Path, vocab_size: int) -> list[tuple]:
  import gguf

  from lqx.io.gguf import scan

  scan(path)  # lqx's bounded checks before the gguf package reads the file
  out = []
  for key, field in gguf.GGUFReader(path).fields.items():
    if key.startswith("tokenizer."):
      vtype = field.types[0]
      out.append((key, field.contents(), vtype, field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None))
  tokens = next((v for k, v, _, _ in out if k == "tokenizer.ggml.tokens"), None)
  if tokens is None:
    raise ValueError(f"{path}: no tokenizer to copy (metadata key 'tokenizer.ggml.tokens' is missing)")
  if len(tokens) != vocab_size:
    raise ValueError(f"{path}: its tokenizer has {len(tokens)} tokens but config.vocab_size is {vocab_size}")
  return out


def _convert_hf_tokenizer(tokenizer, vocab_size: int) -> list[tuple]:
  """GGUF ``gpt2`` tokenizer metadata from a Hugging Face byte-level BPE tokenizer's ``tokenizer.json``."""
  import json

  import gguf

  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    raise ValueError(f"tokenizer: a {type(tokenizer).__name__} is not a fast Hugging Face tokenizer; "
                     f"pass the .gguf file to copy its tokenizer from instead")
  spec = json.loads(backend.to_str())
  model = spec.get("model") or {}
  if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
    raise ValueError(f"tokenizer: only byte-level BPE tokenizers (GGUF model 'gpt2') are converted, this one is "
                     f"{model.get('type')!r}; pass the .gguf file to copy its tokenizer from instead")
  ids = dict(model["vocab"])
  added = {int(t["id"]): t for t in spec.get("added_tokens") or ()}
  ids.update({t["content"]: i for i, t in added.items()})
  if max(ids.values()) >= vocab_size:
    raise ValueError(f"tokenizer has token ids up to {max(ids.values())} but config.vocab_size is {vocab_size}")
  T = gguf.TokenType
  tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [int(T.UNUSED)] * vocab_size
  for token, i in ids.items():
    tokens[i] = token
    types[i] = int(T.NORMAL)
  for i, t in added.items():
    types[i] = int(T.CONTROL if t.get("special") else T.USER_DEFINED)
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]
  V = gguf.GGUFValueType
  out = [("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", "default", V.STRING, None),
         ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING), ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
         ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING)]
  for which in ("bos", "eos", "unk", "pad"):
    i = getattr(tokenizer, f"{which}_token_id", None)
    if i is not None:
      key = "padding" if which == "pad" else "unknown" if which == "unk" else which
      out.append((f"tokenizer.ggml.{key}_token_id", int(i), V.UINT32, None))
  if isinstance(getattr(tokenizer, "add_bos_token", None), bool):
    out.append(("tokenizer.ggml.add_bos_token", tokenizer.add_bos_token, V.BOOL, None))
  if isinstance(getattr(tokenizer, "chat_template", None), str):
    out.append(("tokenizer.chat_template", tokenizer.chat_template, V.STRING, None))
  return out


# ----------------------------------------------------------------------------- model


def _check_config(config: LlamaConfig) -> None:
  if not isinstance(config, LlamaConfig):
    raise TypeError(f"config must be an lqx LlamaConfig, got {type(config).__name__}")
  if config.attn_bias:
    # llama.cpp permutes Q/K biases like their rows; lqx.io.gguf reads biases unpermuted.
    raise ValueError("config.attn_bias=True: exporting attention biases to GGUF is not supported "
                     "(lqx's GGUF reader and llama.cpp disagree on the Q/K bias order)")
  if getattr(config, "rope_scaling", None) is not None:
    raise ValueError(f"config.rope_scaling={config.rope_scaling!r}: scaled RoPE is not exported to GGUF "
                     f"(llama.cpp stores it as a rope_freqs tensor, which lqx's GGUF reader rejects)")
  knobs = dict(attn_logit_scale=None, embed_multiplier=1.0, readout_multiplier=1.0)
  for k, neutral in knobs.items():
    if getattr(config, k) != neutral:
      raise ValueError(f"config.{k}={getattr(config, k)!r}: GGUF llama has no such setting (muP knob); "
                       f"fold it into the weights or export a standard-parametrization model")


def _leaves(config: LlamaConfig, params: dict) -> list:
  """``[(gguf name, leaf, kernel, heads)]`` in the reader's table order; errors name missing/extra paths."""
  from lqx import tree
  from lqx.io.gguf import expected_tensors

  table = expected_tensors(config)
  want = {"/".join(sub): name for name, (sub, _, _, _) in table.items()}
  have = tree.paths(params)
  extra = [p for p in have if p not in want]
  if extra:
    raise ValueError(f"params has leaves a llama GGUF cannot hold: {extra[:3]} (tie_embeddings="
                     f"{config.tie_embeddings}, attn_bias={config.attn_bias})")
  out = []
  for name, (sub, shape, kernel, heads) in table.items():
    path = "/".join(sub)
    if path not in have:
      raise ValueError(f"params has no {path!r} (needed for GGUF tensor {name!r})")
    leaf = tree.get(params, path)
    got = tuple(leaf.shape)
    lqx_shape = tuple(reversed(shape)) if kernel else shape
    if got != lqx_shape:
      raise ValueError(f"params {path!r} has shape {got}, expected {lqx_shape} for this config")
    out.append((name, leaf, kernel, heads))
  return out


def choose_types(config: LlamaConfig, params: dict, *, float_type: str = "f16") -> dict[str, Choice]:
  """GGUF tensor name -> the ``Choice`` ``export_gguf`` makes for it (encodes every tensor; nothing is written)."""
  _check_config(config)
  return {name: encode(leaf, kernel=kernel, heads=heads, float_type=float_type, name=name)[2]
          for name, leaf, kernel, heads in _leaves(config, params)}


def _file_type(kinds: list[str]) -> int:
  """``general.file_type``: llama.cpp's ``LlamaFileType`` of the most common type of the 2-D weights."""
  import gguf

  top = max(set(kinds), key=kinds.count)
  return int(gguf.LlamaFileType.ALL_F32 if top == "F32" else gguf.LlamaFileType[f"MOSTLY_{top}"])


def export_gguf(out_path: str | Path, config: LlamaConfig, params: dict, *, tokenizer=None,
                overwrite: bool = False, float_type: str = "f16") -> Path:
  """Writes ``(config, params)`` as a llama GGUF file; returns its path. Module doc: what is exact.

  ``tokenizer``: None (no vocabulary; lqx loads the file, llama.cpp needs one), a ``.gguf``
  file or lqx model name whose ``tokenizer.*`` metadata is copied verbatim, or a Hugging Face
  byte-level BPE tokenizer (one lqx loaded from a GGUF is copied from that file).
  ``float_type``: ``"f16"`` or ``"f32"`` for what no block type holds (norms are always F32).
  The file is written next to ``out_path`` and renamed into place; an existing file is
  replaced only with ``overwrite=True``. Logs one line per tensor type at INFO.
  """
  import gguf

  out = Path(out_path).expanduser()
  if out.suffix != ".gguf":
    raise ValueError(f"out_path {str(out)!r} must end with .gguf")
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
  if not out.parent.is_dir():
    raise FileNotFoundError(f"{out.parent} is not a folder (out_path {str(out)!r})")
  if float_type not in FLOAT_TYPES:
    raise ValueError(f"float_type={float_type!r}; expected one of {FLOAT_TYPES}")
  _check_config(config)
  leaves = _leaves(config, params)
  tok_fields = [] if tokenizer is None else tokenizer_fields(tokenizer, config.vocab_size)

  fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
  os.close(fd)
  try:
    w = gguf.GGUFWriter(tmp, "llama")
    choices, encoded = [], []
    for name, leaf, kernel, heads in leaves:
      raw, qtype, choice = encode(leaf, kernel=kernel, heads=heads, float_type=float_type, name=name)
      encoded.append((name, raw, qtype))
      choices.append(choice)
    kinds = [ch.ggml_type for ch, (_, leaf, _, _) in zip(choices, leaves) if len(leaf.shape) == 2]
    _write_metadata(w, config, _file_type(kinds), tok_fields)
    for name, raw, qtype in encoded:
      w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  _log_summary(out, choices)
  return out


def _write_metadata(w, config: LlamaConfig, file_type: int, tok_fields: list) -> None:
  import gguf

  c = config
  w.add_context_length(c.max_seq_len)
  w.add_embedding_length(c.dim)
  w.add_block_count(c.n_layers)
  w.add_feed_forward_length(c.ffn_dim)
  w.add_head_count(c.n_heads)
  w.add_head_count_kv(c.n_kv_heads)
  w.add_layer_norm_rms_eps(c.norm_eps)
  w.add_rope_freq_base(c.rope_theta)
  w.add_rope_dimension_count(c.head_dim)
  if c.head_dim * c.n_heads != c.dim:
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
  w.add_vocab_size(c.vocab_size)
  w.add_file_type(file_type)
  w.add_quantization_version(gguf.GGML_QUANT_VERSION)
  ids = {"tokenizer.ggml.bos_token_id": c.bos_token_id, "tokenizer.ggml.eos_token_id": c.eos_token_id}
  for key, value, vtype, sub in tok_fields:
    if ids.get(key) is None:  # the config's special ids win over the tokenizer's
      w.add_key_value(key, value, vtype, sub_type=sub)
  for key, value in ids.items():
    if value is not None:
      w.add_key_value(key, int(value), gguf.GGUFValueType.UINT32)


def _log_summary(out: Path, choices: list[Choice]) -> None:
  counts: dict[str, int] = {}
  for ch in choices:
    counts[ch.ggml_type] = counts.get(ch.ggml_type, 0) + 1
  inexact = [ch.name for ch in choices if not ch.exact]
  log.info("%s: %s; %d of %d tensors exact%s", out, ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
           len(choices) - len(inexact), len(choices), f" (rounded: {inexact[:3]}...)" if inexact else "")
  for ch in choices:
    log.debug("%s: %s (%s)", ch.name, ch.ggml_type, ch.note)
