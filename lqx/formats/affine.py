"""The affine (uniform) format: packed integer codes, scales, zero points (``QArray``).

A ``QArray`` stands for an ``(IC, OC)`` kernel ``w`` quantized to ``bits``-bit
unsigned codes in groups. Its invariant, with ``s`` and ``z`` broadcast over
each group::

    w[perm] ≈ (code - z) * s        code, z in [0, 2**bits - 1]   (perm = identity if None)

Group layouts (``group_axis``, ``group_size``; ``-1`` is one group spanning the axis):

* ``"oc"``: per-OC groups, ``g`` consecutive input channels of one output
  channel (GPTQ's g128). Stored row ``j`` is in group ``j // g``, so ``scale`` is
  ``(ceil(IC/g), OC)`` and, when ``g`` does not divide IC, the *last* group is
  shorter (``IC - (ceil(IC/g) - 1) * g`` rows), as in reference GPTQ, which
  starts a group at every multiple of ``g`` and reads ``W[:, i:i+g]``
  (IC=576, g=128: four groups of 128 and one of 64). ``g >= IC`` is one group
  (``scale`` ``(1, OC)``, like ``-1``).
* ``"ic"``: per-IC groups, ``g`` consecutive output channels of one input
  channel (AdaDim). ``g`` must divide OC (AdaDim's reference reshapes by it);
  ``scale`` is ``(IC, OC/g)``; ``(IC, 1)`` for ``-1``.
* ``"tensor"``: one scale for the whole matrix (``group_size`` must be ``-1``);
  ``scale`` is ``(1, 1)``.

Storage (the leaves; all are arrays, so a QArray jits, shards and checkpoints):

* ``packed``: uint32 words, codes bit-packed along the IC axis (``lqx.packing``),
  ``(ceil(IC*bits/32), OC)``. OC stays a plain axis, so sharding over OC is free.
* ``scale``: ``scale_dtype`` (float16 by default, bfloat16 or float32).
* ``zero``: integer zero points as ``bits``-bit codes packed along axis 0 into
  uint8 words, ``(ceil(G_ic*bits/8), G_oc)`` for scale shape ``(G_ic, G_oc)``,
  as GPTQ stores integer zero points (``round(-xmin/scale)`` is always an
  integer in ``[0, maxq]``). ``None`` for symmetric quantization, whose zero
  is the constant ``2**(bits-1)`` (GPTQ's ``(maxq+1)/2``) and costs no bits.
* ``perm``: int32 ``(IC,)`` or ``None``. GPTQ with act-order and dynamic groups
  forms groups in act-order, so codes and scales are stored in that row order:
  stored row ``j`` is input channel ``perm[j]``. A kernel can use
  ``x[..., perm] @ dequantize_permuted`` instead of un-permuting weights.

Static (aux) data: ``bits``, ``group_size``, ``group_axis``, ``shape``,
``dtype`` (of the original weight) and ``scale_dtype``.

Scales are rounded to ``scale_dtype`` *before* codes are chosen
(:func:`round_scale`), so ``dequantize()`` returns exactly the values the
quantizer reasoned about (GPTQ's error feedback sees the stored scale).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lqx import nn, packing
from lqx.formats.storage import Stored

GROUP_AXES = ("oc", "ic", "tensor")
SCALE_DTYPES = (np.dtype(jnp.float16), np.dtype(jnp.bfloat16), np.dtype(jnp.float32))
CODE_WORD = np.dtype(np.uint32)
ZERO_WORD = np.dtype(np.uint8)


def maxq(bits: int) -> int:
  """Largest code, ``2**bits - 1``."""
  return (1 << bits) - 1


def sym_zero(bits: int) -> int:
  """Zero point of symmetric quantization, ``2**(bits-1)`` (GPTQ's ``(maxq+1)/2``)."""
  return 1 << (bits - 1)


def check_scale_dtype(scale_dtype) -> np.dtype:
  """``scale_dtype`` as a numpy dtype; raises unless float16, bfloat16 or float32."""
  try:
    dt = np.dtype(scale_dtype)
  except TypeError:
    dt = None
  if dt not in SCALE_DTYPES:
    raise ValueError(f"{scale_dtype=} is not a scale storage type; expected float16, bfloat16 or float32")
  return dt


def group_shape(shape: tuple[int, int], group_size: int, group_axis: str) -> tuple[int, int]:
  """``(gi, go)``: the extent of one full group along IC and OC for this layout.

  Per-OC groups are ``(min(g, IC), 1)``; the last one may be shorter (module
  doc). Per-IC groups are ``(1, g)`` and raise ``ValueError`` unless ``g``
  divides OC.
  """
  if group_axis not in GROUP_AXES:
    raise ValueError(f"{group_axis=} is not one of {GROUP_AXES}")
  if len(shape) != 2:
    raise ValueError(f"expected a 2-D (IC, OC) kernel, got shape {tuple(shape)}")
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or (
      group_size != -1 and group_size <= 0):
    raise ValueError(f"{group_size=} must be a positive int or -1 (one group spanning the axis)")
  ic, oc = shape
  if group_axis == "tensor":
    if group_size != -1:
      raise ValueError(
          f"group_axis='tensor' takes group_size=-1 (one group spanning the whole matrix), got {group_size=}")
    return ic, oc
  if group_axis == "oc":
    return (ic if group_size == -1 else min(int(group_size), ic)), 1
  if group_size != -1 and oc % group_size:
    raise ValueError(
        f"{group_size=} does not divide the output-channel axis (OC={oc}); per-IC groups must tile OC "
        f"exactly (only per-OC groups may end with a shorter group)")
  return 1, (oc if group_size == -1 else int(group_size))


def scale_shape(shape: tuple[int, int], group_size: int, group_axis: str) -> tuple[int, int]:
  """``(G_ic, G_oc)``: number of groups along IC and OC, ``(ceil(IC/gi), ceil(OC/go))``."""
  gi, go = group_shape(shape, group_size, group_axis)
  return -(-shape[0] // gi), -(-shape[1] // go)


def expand_groups(p: jax.Array, shape: tuple[int, int], group_size: int, group_axis: str) -> jax.Array:
  """Per-group values ``(G_ic, G_oc)`` -> ``(IC, OC)``: entry ``(i, o)`` gets ``p[i // gi, o // go]``.

  A short last group simply takes fewer rows (broadcast, then cut to ``shape``).
  """
  ic, oc = shape
  gi, go = group_shape(shape, group_size, group_axis)
  g_ic, g_oc = p.shape
  full = jnp.broadcast_to(p[:, None, :, None], (g_ic, gi, g_oc, go)).reshape(g_ic * gi, g_oc * go)
  return full[:ic, :oc]


def scale_bounds(scale_dtype) -> tuple[float, float]:
  """``(lo, hi)``: the positive range :func:`round_scale` clips scales of ``scale_dtype`` to."""
  dt = check_scale_dtype(scale_dtype)
  fi = jnp.finfo(dt)
  lo = float(fi.smallest_subnormal) if dt != np.float32 else float(fi.tiny)
  return lo, float(fi.max)


def round_scale(scale: jax.Array, scale_dtype) -> jax.Array:
  """Scale as stored: clipped to the finite positive range of ``scale_dtype``, rounded, float32
  (float64 for a float64 ``scale`` under ``jax.enable_x64``).

  float16 scales below 6.1e-5 are subnormal and keep fewer mantissa bits; use
  bfloat16 or float32 for such tiny weights. A clipped scale (float16: above 65504,
  i.e. groups spanning more than ``65504 * maxq``, or below 6e-8) loses the group's
  range; RTN and GPTQ detect it (``lqx.quant.grid.scales_out_of_range``) and switch
  that kernel to float32 scales.
  """
  dt = check_scale_dtype(scale_dtype)
  lo, hi = scale_bounds(dt)
  ft = jnp.promote_types(jnp.result_type(scale), jnp.float32)  # float64 only under jax.enable_x64
  scale = jnp.clip(scale.astype(ft), lo, hi)
  return scale.astype(dt).astype(ft)


def ieee_div(a, b) -> jax.Array:
  """``a / b`` rounded as IEEE division, even when ``b`` is broadcast.

  XLA rewrites ``x / broadcast(b)`` as ``x * (1/b)``, which can be 1 ulp off;
  that flips ``round()`` on exact .5 ties, and symmetric min-max puts every
  group's extreme value on one. Materializing the divisor prevents the rewrite.
  """
  a, b = jnp.asarray(a), jnp.asarray(b, dtype=jnp.result_type(a))
  shape = jnp.broadcast_shapes(a.shape, b.shape)
  return jnp.broadcast_to(a, shape) / jax.lax.optimization_barrier(jnp.broadcast_to(b, shape))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["packed", "scale", "zero", "perm"],
    meta_fields=["bits", "group_size", "group_axis", "shape", "dtype", "scale_dtype"],
)
@dataclasses.dataclass(frozen=True)
class QArray(Stored):
  """Quantized ``(IC, OC)`` kernel; ``w[perm] ≈ (code - zero) * scale`` per group (module doc)."""

  packed: jax.Array  # (ceil(IC*bits/32), OC) uint32 codes, packed along IC
  scale: jax.Array  # (G_ic, G_oc) scale_dtype
  zero: jax.Array | None  # (ceil(G_ic*bits/8), G_oc) uint8, packed along axis 0; None: symmetric
  perm: jax.Array | None  # (IC,) int32 row order of codes/scales; None: identity
  bits: int
  group_size: int
  group_axis: str
  shape: tuple[int, int]
  dtype: np.dtype
  scale_dtype: np.dtype

  @property
  def ndim(self) -> int:
    return 2

  @property
  def group_shape(self) -> tuple[int, int]:
    """``(gi, go)``: extent of one full group along IC and OC (a per-OC last group may be shorter)."""
    return group_shape(self.shape, self.group_size, self.group_axis)

  @property
  def sym(self) -> bool:
    return self.zero is None

  def stored_codes(self) -> jax.Array:
    """uint8 ``(IC, OC)`` codes in stored row order (act-order if ``perm`` is set)."""
    return packing.unpack(self.packed, self.bits, self.shape[0], axis=0)

  def zero_points(self) -> jax.Array:
    """float32 ``(G_ic, G_oc)`` zero points (the constant ``2**(bits-1)`` if symmetric)."""
    if self.zero is None:
      return jnp.full(self.scale.shape, sym_zero(self.bits), jnp.float32)
    return packing.unpack(self.zero, self.bits, self.scale.shape[0], axis=0).astype(jnp.float32)

  def codes(self) -> jax.Array:
    """uint8 ``(IC, OC)`` codes in the original input-channel order."""
    return _codes(self)

  def dequantize_stored(self) -> jax.Array:
    """float32 ``(IC, OC)`` ``(code - zero) * scale`` in stored row order."""
    return _dequantize_stored(self)

  def dequantize(self) -> jax.Array:
    """The ``(IC, OC)`` kernel in the original dtype and input-channel order."""
    return _dequantize(self)

  def linear(self, x: jax.Array) -> jax.Array:
    """``x[..., IC] @ dequantize()`` in the dtype of ``x``.

    The fused Pallas kernel (``pallas_kernels.dequant_matmul``) where ``lqx.nn.pallas_target``
    picks one (TPU, GPU) and it supports this layout (bits 2, 3, 4, 8; per-OC or per-IC
    groups; x in bfloat16 or float32); XLA (dequantize, then matmul) otherwise. With
    ``perm``, x's columns are taken in stored order instead of un-permuting the weights.
    """
    target = nn.pallas_target()
    if target is None or not _kernel_supports(self, x):
      return jnp.einsum("...i,io->...o", x, self.dequantize().astype(x.dtype))
    from pallas_kernels.dequant_matmul import dequant_matmul  # noqa: PLC0415 (Pallas only when used)
    x2 = x.reshape(-1, self.shape[0])
    if self.perm is not None:
      x2 = jnp.take(x2, self.perm, axis=1)
    zero = None if self.zero is None else self.zero_points()
    y = dequant_matmul(x2, self.packed, self.scale, zero, bits=self.bits, group_size=self.group_size,
                       group_axis=self.group_axis, backend=target[0], interpret=target[1])
    return y.reshape(*x.shape[:-1], self.shape[1])


# Inputs the formats send to a kernel (the kernels' own tests cover these two; float16 stays on XLA).
KERNEL_X_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float32))


def _kernel_supports(qa: QArray, x: jax.Array) -> bool:
  """Whether ``pallas_kernels.dequant_matmul`` takes this kernel and input (else ``linear`` uses XLA)."""
  from pallas_kernels import dequant_matmul as dq  # noqa: PLC0415
  return qa.bits in dq.BITS and qa.group_axis in dq.GROUP_AXES and np.dtype(x.dtype) in KERNEL_X_DTYPES and x.size > 0


def _unpermute(qa: QArray, x: jax.Array) -> jax.Array:
  return x if qa.perm is None else jnp.take(x, jnp.argsort(qa.perm), axis=0)


@jax.jit
def _codes(qa: QArray) -> jax.Array:
  return _unpermute(qa, qa.stored_codes())


@jax.jit
def _dequantize_stored(qa: QArray) -> jax.Array:
  expand = functools.partial(expand_groups, shape=qa.shape, group_size=qa.group_size, group_axis=qa.group_axis)
  q = qa.stored_codes().astype(jnp.float32)
  return (q - expand(qa.zero_points())) * expand(qa.scale.astype(jnp.float32))


@jax.jit
def _dequantize(qa: QArray) -> jax.Array:
  return _unpermute(qa, _dequantize_stored(qa)).astype(qa.dtype)


def from_codes(codes: jax.Array, scale: jax.Array, zero: jax.Array | None, *, bits: int,
               group_size: int, group_axis: str, dtype, scale_dtype=jnp.float16,
               perm: jax.Array | None = None) -> QArray:
  """Pack integer ``codes`` ``(IC, OC)`` (stored row order) with their group parameters.

  ``scale`` and ``zero`` are ``(G_ic, G_oc)`` (:func:`scale_shape`; per-OC
  groups: ``(ceil(IC/g), OC)``); ``zero`` holds integers in ``[0, 2**bits - 1]``
  or is ``None`` (symmetric, zero ``2**(bits-1)``).
  """
  packing.check_bits(bits)
  sd = check_scale_dtype(scale_dtype)
  shape = tuple(int(d) for d in codes.shape)
  gshape = scale_shape(shape, group_size, group_axis)
  if tuple(scale.shape) != gshape:
    raise ValueError(f"scale has shape {tuple(scale.shape)}; {group_axis=}, {group_size=} on {shape} needs {gshape}")
  if zero is not None and tuple(zero.shape) != gshape:
    raise ValueError(f"zero has shape {tuple(zero.shape)}; expected {gshape} like scale")
  if perm is not None and tuple(perm.shape) != (shape[0],):
    raise ValueError(f"perm has shape {tuple(perm.shape)}; expected ({shape[0]},)")
  meta = dict(bits=int(bits), group_size=int(group_size), group_axis=group_axis, shape=shape,
              dtype=np.dtype(dtype), scale_dtype=sd)
  return _build(codes, scale, zero, perm, tuple(sorted(meta.items())))


@functools.partial(jax.jit, static_argnums=4)
def _build(codes, scale, zero, perm, meta) -> QArray:
  meta = dict(meta)
  bits = meta["bits"]
  packed_zero = None
  if zero is not None:
    z = jnp.clip(jnp.round(zero), 0, maxq(bits)).astype(jnp.uint8)
    packed_zero = packing.pack(z, bits, axis=0, word_dtype=ZERO_WORD)
  return QArray(packed=packing.pack(codes, bits, axis=0, word_dtype=CODE_WORD),
                scale=scale.astype(meta["scale_dtype"]), zero=packed_zero,
                perm=None if perm is None else perm.astype(jnp.int32), **meta)


def quantize_with_params(w: jax.Array, scale: jax.Array, zero: jax.Array | None, *, bits: int,
                         group_size: int, group_axis: str, scale_dtype=jnp.float16,
                         perm: jax.Array | None = None) -> QArray:
  """Round ``w`` ``(IC, OC)`` to codes ``clip(round(w/s) + z, 0, maxq)`` for given group params.

  ``scale`` ``(G_ic, G_oc)`` (:func:`scale_shape`) is first rounded to
  ``scale_dtype`` (:func:`round_scale`); ``zero`` holds integers (or ``None``:
  symmetric). With ``perm``, groups are formed over ``w[perm]`` (act-order rows)
  and the QArray stores that order.
  """
  packing.check_bits(bits)
  gshape = scale_shape(w.shape, group_size, group_axis)
  if tuple(scale.shape) != gshape:
    raise ValueError(f"scale has shape {tuple(scale.shape)}; {group_axis=}, {group_size=} on "
                     f"{tuple(w.shape)} needs {gshape}")
  return _quantize_with_params(w, scale, zero, perm, bits, group_size, group_axis, check_scale_dtype(scale_dtype))


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _quantize_with_params(w, scale, zero, perm, bits, group_size, group_axis, scale_dtype) -> QArray:
  if perm is not None:
    w = jnp.take(w, perm, axis=0)
  s = round_scale(scale, scale_dtype)
  z = jnp.full(s.shape, sym_zero(bits), jnp.float32) if zero is None else jnp.round(zero).astype(jnp.float32)
  expand = functools.partial(expand_groups, shape=w.shape, group_size=group_size, group_axis=group_axis)
  q = jnp.clip(jnp.round(ieee_div(w.astype(jnp.float32), expand(s))) + expand(z), 0, maxq(bits))
  return from_codes(q.astype(jnp.uint8), s, zero, bits=bits, group_size=group_size,
                    group_axis=group_axis, dtype=w.dtype, scale_dtype=scale_dtype, perm=perm)
