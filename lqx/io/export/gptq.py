"""lqx ``(config, params)`` with affine block linears -> a GPTQ checkpoint folder (AutoGPTQ's layout).

Each block linear ``model.layers.N.{self_attn,mlp}.X_proj`` is stored as four tensors
(``IC`` input features, ``OC`` output features, ``G`` groups, ``b`` bits)::

  qweight  int32 (IC*b/32, OC)   codes packed along the input axis, in input-channel order
  qzeros   int32 (G, OC*b/32)    zero points packed along the output axis
  scales   float16 (G, OC)
  g_idx    int32 (IC,)           group of each input channel

Packing is a little-endian bit stream per column (qweight) or row (qzeros): value ``k``
occupies stream bits ``[k*b, (k+1)*b)``, word ``j`` holds stream bits ``[32j, 32j+32)``
(3-bit values straddle words), which is also ``lqx.packing``'s layout. A GPTQ reader
computes ``w[i, o] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o])``, where ``z``
is the stored zero plus one in ``checkpoint_format="gptq"`` (AutoGPTQ's format, the
default: it stores ``zero - 1``, so a zero point of 0 cannot be written and raises) or
the stored zero itself in ``"gptq_v2"`` (GPTQModel's). This equals ``QArray.dequantize()``
bit for bit: codes and zeros are copied, and float16 scales are stored as they are.

Which QArrays fit: 2, 3, 4 or 8 bits; per-OC groups (``group_size`` g: group ``i // g``,
a shorter last group when g does not divide IC, as lqx and reference GPTQ form them),
per-channel (g = -1) or per-tensor (written per-channel, the one scale repeated);
act-order (``perm``) via ``g_idx`` (``desc_act``); symmetric or not; IC and OC multiples
of 32; float16 scales (bfloat16/float32 ones only if float16 holds them exactly, unless
``round_scales``). The whole model shares one ``bits`` and ``group_size`` (one
``quantization_config``), and every block linear must be quantized (a GPTQ loader
replaces each with a quantized linear). Anything else (codebooks, sparse/low-rank/
activation wrappers, per-IC groups, 5/6 bits, mixed layouts, float block linears, a
quantized head) raises ``ValueError`` naming the parameter and the reason.

Embeddings, norms, the head and biases are float16 tensors; ``config.json`` is
``lqx.io.export.hf.hf_config`` plus ``quantization_config``, and ``quantize_config.json``
repeats it for AutoGPTQ.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from lqx import formats, packing
from lqx.formats.affine import QArray
from lqx.io.export import hf as hf_export
from lqx.models.llama import LlamaConfig

BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def _is_block_linear(path: str, kernel: bool) -> bool:
  return kernel and path.startswith("layers_")


def check_kernel(path: str, leaf) -> QArray:
  """``leaf`` if GPTQ can store it exactly as written here; else ``ValueError`` naming ``path`` and why."""
  if not formats.is_quantized(leaf):
    raise ValueError(f"{path}: a float block linear; a GPTQ checkpoint quantizes every block linear (its loaders "
                     f"replace each with a quantized linear). Quantize it too, or export with export_hf")
  if type(leaf) is not QArray:
    raise ValueError(f"{path}: {formats.name_of(leaf)!r} format ({type(leaf).__name__}); GPTQ stores only "
                     f"affine codes (w = scale * (q - zero)) with nothing around them")
  if leaf.bits not in BITS:
    raise ValueError(f"{path}: {leaf.bits}-bit codes; GPTQ packs {', '.join(map(str, BITS))} bits")
  if leaf.group_axis == "ic":
    raise ValueError(f"{path}: per-IC groups (group_size={leaf.group_size} output channels share a scale); "
                     f"GPTQ's groups run along the input channels of one output channel")
  ic, oc = leaf.shape
  if ic % 32 or oc % 32:
    raise ValueError(f"{path}: shape (IC, OC) = {leaf.shape}; GPTQ's quantized linear needs both multiples of "
                     f"32 (qweight has in_features // 32 * bits rows)")
  return leaf


def group_size(qa: QArray) -> int:
  """GPTQ's ``group_size`` of a QArray: its per-OC group size, or -1 for one group per output channel."""
  return -1 if qa.group_axis == "tensor" or qa.group_size == -1 else qa.group_size


def quantization_config(params_by_path: dict, checkpoint_format: str = "gptq") -> dict:
  """``quantization_config`` of the checked block linears ``{path: QArray}``; raises unless they share
  one ``bits`` and ``group_size``."""
  if checkpoint_format not in CHECKPOINT_FORMATS:
    raise ValueError(f"checkpoint_format={checkpoint_format!r}; expected one of {CHECKPOINT_FORMATS}")
  (first, q0), *_ = params_by_path.items()
  for path, qa in params_by_path.items():
    if (qa.bits, group_size(qa)) != (q0.bits, group_size(q0)):
      raise ValueError(f"{path}: {qa.bits}-bit, group_size {group_size(qa)}, but {first} is {q0.bits}-bit, "
                       f"group_size {group_size(q0)}; a GPTQ checkpoint has one bits and group_size for all layers")
  return {"quant_method": "gptq", "bits": q0.bits, "group_size": group_size(q0),
          "desc_act": any(qa.perm is not None for qa in params_by_path.values()),
          "sym": all(qa.zero is None for qa in params_by_path.values()), "checkpoint_format": checkpoint_format}


def _fp16_scales(qa: QArray, path: str, round_scales: bool) -> np.ndarray:
  s = np.asarray(qa.scale, np.float32)
  with np.errstate(over="ignore"):
    s16 = s.astype(np.float16)
  if not np.all(np.isfinite(s16)):
    raise ValueError(f"{path}: scales up to {s.max():.4g} overflow GPTQ's float16 scales")
  if not round_scales and not np.array_equal(s16.astype(np.float32), s):
    n = int(np.sum(s16.astype(np.float32) != s))
    raise ValueError(f"{path}: {n} of its {qa.scale_dtype} scales are not float16 values; GPTQ stores float16 "
                     f"scales (pass round_scales=True to round them, which changes the weights slightly)")
  return s16


def pack_kernel(qa: QArray, *, checkpoint_format: str = "gptq", round_scales: bool = False,
                path: str = "kernel") -> dict[str, np.ndarray]:
  """``{"qweight", "qzeros", "scales", "g_idx"}`` of a checked QArray (module doc: layout and convention)."""
  check_kernel(path, qa)
  if checkpoint_format not in CHECKPOINT_FORMATS:
    raise ValueError(f"checkpoint_format={checkpoint_format!r}; expected one of {CHECKPOINT_FORMATS}")
  ic, oc = qa.shape
  gi = qa.group_shape[0] if qa.group_axis == "oc" else ic
  if qa.perm is None:
    words = np.asarray(qa.packed)  # already GPTQ's qweight: codes in input order, packed along IC
    g_idx = np.arange(ic) // gi
  else:  # stored row j is input channel perm[j] and belongs to group j // gi
    words = np.asarray(packing.pack(qa.codes(), qa.bits, axis=0))
    g_idx = np.argsort(np.asarray(qa.perm)) // gi
  scales = np.broadcast_to(_fp16_scales(qa, path, round_scales), (qa.scale.shape[0], oc))
  zeros = np.broadcast_to(np.asarray(qa.zero_points(), np.int64), scales.shape)
  if checkpoint_format == "gptq":
    if np.any(zeros == 0):
      raise ValueError(f"{path}: {int(np.sum(zeros == 0))} groups have zero point 0, which the 'gptq' format "
                       f"cannot store (it stores zero - 1); use checkpoint_format='gptq_v2'")
    zeros = zeros - 1
  qzeros = np.asarray(packing.pack(zeros.astype(np.uint32), qa.bits, axis=1))
  return {"qweight": words.view(np.int32), "qzeros": qzeros.view(np.int32),
          "scales": np.ascontiguousarray(scales), "g_idx": g_idx.astype(np.int32)}


def export_gptq(out_dir: str | Path, config: LlamaConfig, params: dict, *, tokenizer=None,
                checkpoint_format: str = "gptq", round_scales: bool = False, overwrite: bool = False,
                max_shard_bytes: int = hf_export.MAX_SHARD_BYTES) -> Path:
  """Writes ``(config, params)`` as a GPTQ checkpoint folder; returns its absolute path.

  Every block linear must be a QArray GPTQ can store (module doc; otherwise ``ValueError``
  naming it, before anything is written). ``checkpoint_format``: ``"gptq"`` (zeros stored
  minus one) or ``"gptq_v2"`` (as is). ``round_scales``: accept scales that float16 rounds.
  ``tokenizer``, ``overwrite``, ``max_shard_bytes``: as ``export_hf``.
  """
  from lqx.io.export import check_destination, write_folder

  check_destination(out_dir, overwrite)
  table = hf_export.leaves(config, params)
  kernels = {}
  for name, (path, leaf, kernel) in table.items():
    if _is_block_linear(path, kernel):
      kernels[path] = check_kernel(path, leaf)
    elif formats.is_quantized(leaf):
      raise ValueError(f"{path}: quantized, but GPTQ checkpoints quantize only the block linears; "
                       f"keep it float (it is written as float16)")
  qcfg = quantization_config(kernels, checkpoint_format)
  tok_files = None if tokenizer is None else hf_export.tokenizer_files(tokenizer)
  cfg = {**hf_export.hf_config(config, np.float16), "quantization_config": qcfg}
  specs, source = {}, {}
  for name, (path, leaf, kernel) in table.items():
    if path not in kernels:
      specs[name] = (tuple(leaf.shape)[::-1] if kernel else tuple(leaf.shape), np.dtype(np.float16))
      continue
    ic, oc = leaf.shape
    n_groups = leaf.scale.shape[0]
    base = name.removesuffix(".weight")
    shapes = ((ic * leaf.bits // 32, oc), (n_groups, oc * leaf.bits // 32), (n_groups, oc), (ic,))
    for suffix, shape, dt in zip(_SUFFIXES, shapes, (np.int32, np.int32, np.float16, np.int32)):
      specs[f"{base}.{suffix}"] = (shape, np.dtype(dt))
      source[f"{base}.{suffix}"] = (path, suffix)

  @functools.lru_cache(maxsize=1)  # the four tensors of one kernel are asked for in a row
  def packed(path):
    return pack_kernel(kernels[path], checkpoint_format=checkpoint_format, round_scales=round_scales, path=path)

  for path in kernels:  # every scale and zero checked before anything is written
    packed(path)

  def value(name):
    if name in source:
      path, suffix = source[name]
      return packed(path)[suffix]
    path, leaf, kernel = table[name]
    return hf_export.float_value(leaf, kernel, np.float16, path)

  def write(folder: Path):
    if tok_files is not None:
      hf_export.save_tokenizer(tok_files, folder)
    hf_export.write_safetensors(folder, specs, value, max_shard_bytes)
    hf_export.write_json(folder / "config.json", cfg)
    hf_export.write_json(folder / "quantize_config.json", {**qcfg, "model_file_base_name": "model"})

  return write_folder(out_dir, write, kind=checkpoint_format, overwrite=overwrite)


__all__ = ["export_gptq", "pack_kernel", "check_kernel", "quantization_config", "group_size", "BITS",
           "CHECKPOINT_FORMATS"]
