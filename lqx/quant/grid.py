"""Grid primitives every uniform (affine) method shares: layout checks and group parameters.

Parameters follow reference GPTQ's ``Quantizer.find_params`` (IST-DASLab/gptq
``quant.py``), with one group per reduction:

* the range always contains 0: ``xmin = min(min x, 0)``, ``xmax = max(max x, 0)``;
* asymmetric: ``scale = (xmax - xmin) / maxq``, ``zero = round(-xmin / scale)``;
* symmetric: ``xmax = max(|xmin|, xmax)``, ``xmin = -xmax`` if ``xmin < 0``
  (so an all-nonnegative group keeps ``xmin = 0``, as the reference does),
  ``zero = (maxq + 1) / 2``;
* an all-zero group (``xmin == xmax == 0``) uses the range ``[-1, 1]``;
* ``mse=True`` shrinks the range by ``p = 1 - i/grid`` for ``i < maxshrink*grid``
  and keeps the ``p`` with the smallest ``sum |Q(x) - x|**norm`` (first on ties),
  with the reference's ``grid=100, maxshrink=0.8, norm=2.4``.

The one departure: each scale is rounded to its storage dtype before the zero
point and the codes are computed (``lqx.affine.round_scale``); with
``scale_dtype=float32`` this is the reference exactly. A scale outside the storage
dtype's range (float16: a group spanning more than ``65504 * maxq``, e.g. weights
near 3e5 at 3 bits, or tiny non-zero weights) would be clipped: the methods check
:func:`scales_out_of_range` on the result and redo that kernel with float32 scales,
warning once (:func:`warn_scale_fallback`) and recording it in their ``info``
(:func:`fallback_info`).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from lqx import packing
from lqx.formats import affine

MSE_NORM = 2.4
MSE_GRID = 100
MSE_MAXSHRINK = 0.8


def check_layout_config(bits: int, group_size: int, group_axis: str) -> None:
  """Validate bits / group_size / group_axis before any shape is known."""
  packing.check_bits(bits)
  if group_axis not in affine.GROUP_AXES:
    raise ValueError(f"{group_axis=} is not one of {affine.GROUP_AXES}")
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or (
      group_size != -1 and group_size <= 0):
    raise ValueError(f"{group_size=} must be a positive int or -1 (one group spanning the axis)")
  if group_axis == "tensor" and group_size != -1:
    raise ValueError(
        f"group_axis='tensor' takes group_size=-1 (one group spanning the whole matrix), got {group_size=}")


def check_kernel(w, group_size: int, group_axis: str, name: str = "w") -> None:
  """Raise ``ValueError`` unless ``w`` is a 2-D float ``(IC, OC)`` kernel fitting the groups.

  NaN/Inf are checked only when ``w`` is concrete (not under ``jit``).
  """
  if getattr(w, "ndim", None) != 2:
    raise ValueError(f"{name} must be a 2-D (IC, OC) kernel, got shape {tuple(np.shape(w))}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"{name} must be a float array, got dtype {w.dtype}")
  try:
    affine.group_shape(w.shape, group_size, group_axis)
  except ValueError as e:
    raise ValueError(f"{name} {tuple(w.shape)}: {e}") from None
  if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
    bad = int(jnp.sum(~jnp.isfinite(w)))
    raise ValueError(f"{name} {tuple(w.shape)} has {bad} NaN/Inf entries; quantization needs finite weights")


def find_params(x: jax.Array, *, bits: int, sym: bool, axis, mse: bool = False,
                scale_dtype=jnp.float16, norm: float = MSE_NORM, grid: int = MSE_GRID,
                maxshrink: float = MSE_MAXSHRINK, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Scale and zero point of each group of ``x``, a group being a slice along ``axis``.

  Returns float32 ``(scale, zero)`` with ``axis`` (int or tuple) reduced away.
  ``scale`` is already rounded to ``scale_dtype``; ``zero`` holds integers in
  ``[0, maxq]`` (the constant ``2**(bits-1)`` when ``sym``). See the module doc.
  ``mask`` (bool, broadcastable to ``x``; True = real element) excludes padding
  (a short last group) from the min/max and from the MSE error sum; every group
  needs at least one real element.
  """
  packing.check_bits(bits)
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  mq = affine.maxq(bits)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays float64 (jax.enable_x64)
  if mask is not None:  # masked-out entries read as 0, which the range always contains
    x = jnp.where(mask, x, 0.0)
  xmin = jnp.minimum(jnp.min(x, axis=axes), 0.0)
  xmax = jnp.maximum(jnp.max(x, axis=axes), 0.0)
  if sym:
    xmax = jnp.maximum(jnp.abs(xmin), xmax)
    xmin = jnp.where(xmin < 0, -xmax, xmin)
  empty = (xmin == 0) & (xmax == 0)
  xmin = jnp.where(empty, -1.0, xmin)
  xmax = jnp.where(empty, 1.0, xmax)

  def params(lo, hi):
    scale = affine.round_scale(affine.ieee_div(hi - lo, float(mq)), scale_dtype)
    if sym:
      return scale, jnp.full_like(scale, affine.sym_zero(bits))
    return scale, jnp.clip(jnp.round(-lo / scale), 0, mq)

  scale, zero = params(xmin, xmax)
  if not mse:
    return scale, zero

  shrink = jnp.asarray([1 - i / grid for i in range(int(maxshrink * grid))], x.dtype)

  def body(i, carry):
    best, scale, zero = carry
    s1, z1 = params(shrink[i] * xmin, shrink[i] * xmax)
    sk, zk = jnp.expand_dims(s1, axes), jnp.expand_dims(z1, axes)
    q = sk * (jnp.clip(jnp.round(affine.ieee_div(x, sk)) + zk, 0, mq) - zk)
    err = jnp.abs(q - x) ** norm
    err = jnp.sum(err if mask is None else jnp.where(mask, err, 0.0), axis=axes)
    better = err < best
    return jnp.where(better, err, best), jnp.where(better, s1, scale), jnp.where(better, z1, zero)

  init = (jnp.full(scale.shape, jnp.inf, x.dtype), scale, zero)
  _, scale, zero = jax.lax.fori_loop(0, shrink.shape[0], body, init)
  return scale, zero


FALLBACK_SCALE_DTYPE = np.dtype(np.float32)


def scales_out_of_range(scale, scale_dtype) -> bool:
  """Whether stored scales of ``scale_dtype`` sit at a clip bound of ``affine.round_scale``.

  True when some group's scale overflowed the dtype (float16: > 65504) or fell below
  its smallest subnormal (non-zero weights that would round to a zero scale): that
  group's range is lost. Always False for float32. ``scale`` must be concrete.
  """
  dt = affine.check_scale_dtype(scale_dtype)
  if dt == FALLBACK_SCALE_DTYPE or isinstance(scale, jax.core.Tracer):
    return False
  lo, hi = affine.scale_bounds(dt)
  s = np.asarray(jnp.asarray(scale, jnp.float32))
  return bool(np.any(s >= hi) or np.any(s <= lo))


def warn_scale_fallback(scale_dtype) -> None:
  """Warn (once per process and dtype: Python's default warning filter) that kernels fell back to float32 scales."""
  dt = affine.check_scale_dtype(scale_dtype)
  lo, hi = affine.scale_bounds(dt)
  warnings.warn(f"{dt.name} scales out of range for some weight groups (scale > {hi:g} or < {lo:g}, e.g. weights "
                f"beyond ~{hi:g} * maxq / 2); those kernels are quantized with float32 scales instead (the method's "
                f"info['scale_dtype'] and QArray.scale_dtype say which)", UserWarning, stacklevel=3)


def fallback_info(scale_dtype) -> dict:
  """The ``info`` entries of a kernel that fell back from ``scale_dtype`` to float32 scales."""
  return {"scale_dtype": FALLBACK_SCALE_DTYPE.name, "scale_dtype_requested": affine.check_scale_dtype(scale_dtype).name}
