"""Round-to-nearest quantization with min-max (or MSE-clipped) group parameters.

The group parameters (reference GPTQ's ``Quantizer.find_params``, one group per
reduction, MSE clipping) live in ``lqx.quant.grid``, shared with GPTQ.

Layouts are named by ``group_axis`` ("oc": per-OC groups, "ic": per-IC groups,
"tensor": one group, which requires ``group_size=-1``); ``group_size=-1`` is
per-channel (one group spanning the axis). Per-OC groups need not divide IC:
the last group is shorter and its parameters (min-max and the MSE search) see
only its real rows (``lqx.formats.affine`` module doc).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from lqx.formats import affine
from lqx.formats.affine import QArray
from lqx.quant import grid
from lqx.quant.grid import check_kernel, check_layout_config, find_params  # noqa: F401 (shared grid)


@dataclasses.dataclass(frozen=True)
class RTNConfig:
  """Round-to-nearest settings. Hashable: usable as a static jit argument."""

  bits: int
  group_size: int = 128  # -1: one group spanning the axis (per-channel)
  group_axis: str = "oc"  # "oc" | "ic" | "tensor" (module doc)
  sym: bool = False
  mse: bool = False
  scale_dtype: Any = jnp.float16

  name = "rtn"
  stats = ()  # data-free

  def __post_init__(self):
    check_layout_config(self.bits, self.group_size, self.group_axis)
    object.__setattr__(self, "scale_dtype", affine.check_scale_dtype(self.scale_dtype))

  def quantize(self, w: jax.Array, stats: dict | None = None, *, name: str | None = None, **_) -> tuple[QArray, dict]:
    """Method protocol (``lqx.quant``): ``(QArray, {})``; errors name the param path ``name``."""
    try:
      q = rtn_quantize(w, self)
      return q, ({} if q.scale_dtype == self.scale_dtype else grid.fallback_info(self.scale_dtype))
    except ValueError as e:
      raise ValueError(f"{name}: {e}" if name else str(e)) from e


@functools.partial(jax.jit, static_argnames=("config",))
def _rtn(w: jax.Array, config: RTNConfig) -> QArray:
  ic, oc = w.shape
  gi, go = affine.group_shape(w.shape, config.group_size, config.group_axis)
  g_ic, g_oc = affine.scale_shape(w.shape, config.group_size, config.group_axis)
  x = w.astype(jnp.float32)
  mask = None
  if g_ic * gi != ic:  # per-OC groups with a short last group: pad, and mask the padding out
    x = jnp.pad(x, ((0, g_ic * gi - ic), (0, 0)))
    mask = (jnp.arange(g_ic * gi) < ic).reshape(g_ic, gi, 1, 1)
  x = x.reshape(g_ic, gi, g_oc, go)
  scale, zero = find_params(x, bits=config.bits, sym=config.sym, axis=(1, 3), mse=config.mse,
                            scale_dtype=config.scale_dtype, mask=mask)
  return affine.quantize_with_params(
      w, scale, None if config.sym else zero, bits=config.bits, group_size=config.group_size,
      group_axis=config.group_axis, scale_dtype=config.scale_dtype)


def rtn_quantize(w: jax.Array, config: RTNConfig) -> QArray:
  """Round-to-nearest quantization of an ``(IC, OC)`` kernel -> ``QArray``.

  Scales have shape ``(ceil(IC/g), OC)`` for per-OC groups (the last group
  may be shorter), ``(IC, OC/g)`` for per-IC groups (``g`` must divide OC),
  ``(1, 1)`` per tensor (``lqx.formats.affine``). Jittable with
  ``config`` static; NaN/Inf checks run only on concrete inputs. On concrete inputs,
  a kernel whose scales fall outside ``config.scale_dtype``'s range is quantized with
  float32 scales instead, with a warning (``lqx.quant.grid.scales_out_of_range``).
  """
  check_kernel(w, config.group_size, config.group_axis)
  q = _rtn(w, config)
  if grid.scales_out_of_range(q.scale, config.scale_dtype):
    grid.warn_scale_fallback(config.scale_dtype)
    q = _rtn(w, dataclasses.replace(config, scale_dtype=grid.FALLBACK_SCALE_DTYPE))
  return q
