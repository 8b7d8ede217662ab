"""The activation-quantized format: any weight format whose *input* is quantized per token (``ActQuant``).

An ``ActQuant`` stands for the same ``(IC, OC)`` kernel as its base format and
changes only how ``linear`` treats its input: dynamic symmetric per-token
quantization of ``x`` in groups of ``act_group_size`` input channels at
``act_bits`` (FlexQ's W6A8 / W6A6, ``lqx.quant.activations``: scales from each
token's own group absmax, nothing calibrated or stored). Its invariant::

    dequantize() = base.dequantize()                                  (the weights are the base's)
    linear(x)    = base.linear(fake_quant(x, act_bits, act_group_size))
    stored_bits  = base.stored_bits                                   (activations are not stored)

``fake_quant`` (``lqx.quant.activations.fake_quant``) returns ``x``'s dtype, so the
base's ``linear`` (a Pallas kernel where it has one) runs unchanged on the
dequantized input. For a symmetric affine base (``QArray``, no ``perm``) whose
per-OC groups are the activation groups, :meth:`ActQuant.int_linear` computes the
same product on integers (int8 x int8 -> int32 per group,
``lqx.quant.activations.int_linear``); it equals ``linear`` to float32 rounding.

Static (aux) data: ``act_bits`` (4..8) and ``act_group_size`` (a positive int, or
-1 for one group spanning IC); ``shape`` and ``dtype`` are the base's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lqx.formats.storage import Wrapper

ACT_BITS = (4, 5, 6, 7, 8)


def check_act_bits(bits) -> int:
  """``bits`` as an int; raises ``ValueError`` unless it is in 4..8 (codes fit int8)."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in ACT_BITS:
    raise ValueError(f"act_bits={bits!r} must be an int in {ACT_BITS[0]}..{ACT_BITS[-1]}")
  return int(bits)


def check_act_group_size(group_size) -> int:
  """``group_size`` as an int; raises ``ValueError`` unless it is a positive int or -1 (one group)."""
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or (
      group_size != -1 and group_size <= 0):
    raise ValueError(f"act_group_size={group_size!r} must be a positive int or -1 (one group spanning IC)")
  return int(group_size)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["base"],
    meta_fields=["act_bits", "act_group_size"],
)
@dataclasses.dataclass(frozen=True)
class ActQuant(Wrapper):
  """``base``'s kernel, with its input fake-quantized per token at ``act_bits`` (module doc)."""

  base: Any  # any registered format standing for the (IC, OC) kernel
  act_bits: int  # 4..8
  act_group_size: int  # input channels per activation group; -1: one group spanning IC

  def dequantize(self) -> jax.Array:
    """The ``(IC, OC)`` kernel: the base's (activation quantization changes no weight)."""
    return self.base.dequantize()

  def quantize_input(self, x: jax.Array) -> jax.Array:
    """``x[..., IC]`` quantized and dequantized per token and group, in ``x``'s dtype."""
    from lqx.quant import activations  # lazy: lqx.quant imports lqx.formats
    return activations.fake_quant(x, self.act_bits, self.act_group_size)

  def linear(self, x: jax.Array) -> jax.Array:
    """``quantize_input(x) @ dequantize()`` via the base's ``linear``, in ``x``'s dtype."""
    return self.base.linear(self.quantize_input(x)).astype(x.dtype)

  def int_codes(self) -> tuple[jax.Array, jax.Array]:
    """``(codes int8 (IC, OC), scale (G, OC))`` of a symmetric affine base with per-OC groups of
    ``act_group_size``: ``base.dequantize() = codes * scale`` per group. Raises ``ValueError``
    for any other base (:meth:`int_unsupported`)."""
    why = self.int_unsupported()
    if why:
      raise ValueError(f"int_linear needs {why}")
    q = self.base
    from lqx.formats import affine
    codes = q.stored_codes().astype(jnp.int16) - affine.sym_zero(q.bits)
    return codes.astype(jnp.int8), q.scale

  def int_unsupported(self) -> str | None:
    """``None`` when :meth:`int_linear` applies, else what it needs that the base lacks."""
    from lqx.formats.affine import QArray, group_shape
    q = self.base
    if type(q) is not QArray:
      return f"an affine QArray base, not a {type(q).__name__}"
    if not q.sym or q.perm is not None or q.bits > 8:
      return f"a symmetric QArray of at most 8 bits without perm (got sym={q.sym}, perm={q.perm is not None}, " \
             f"bits={q.bits})"
    ic = q.shape[0]
    act_rows = ic if self.act_group_size == -1 else min(self.act_group_size, ic)
    if q.group_axis == "tensor" or group_shape(q.shape, q.group_size, q.group_axis) != (act_rows, 1):
      return (f"per-OC weight groups equal to the activation groups ({act_rows} rows); the base has "
              f"group_axis={q.group_axis!r}, group_size={q.group_size}")
    return None

  def int_linear(self, x: jax.Array) -> jax.Array:
    """``linear(x)`` on integers (``lqx.quant.activations.int_linear``), in ``x``'s dtype: equal to
    ``linear(x)`` to float32 rounding. Needs a symmetric affine base (:meth:`int_unsupported`)."""
    from lqx.quant import activations
    codes, scale = self.int_codes()
    y = activations.int_linear(x, codes, scale, act_bits=self.act_bits, group_size=self.act_group_size)
    return y.astype(x.dtype)

  def check(self) -> None:
    """Raise ``ValueError`` unless the base is a format and ``act_bits`` / ``act_group_size`` are valid
    (checkpoint restore calls this; the base is validated on its own)."""
    if not (hasattr(self.base, "dequantize") and hasattr(self.base, "linear") and hasattr(self.base, "shape")):
      raise ValueError(f"base is a {type(self.base).__name__}; expected a quantized-kernel format")
    if isinstance(self.base, ActQuant):
      raise ValueError("base already quantizes its input (ActQuant of an ActQuant)")
    shape = self.shape
    if not (len(shape) == 2 and all(isinstance(d, (int, np.integer)) and d > 0 for d in shape)):
      raise ValueError(f"base.shape={shape!r} is not a pair of positive ints")
    check_act_bits(self.act_bits)
    check_act_group_size(self.act_group_size)
