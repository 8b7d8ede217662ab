"""The low-rank format: any other format plus a rank-``r`` correction ``a @ b`` (``LowRank``).

A ``LowRank`` stands for an ``(IC, OC)`` kernel as a base format (affine
``QArray``, a codebook, a sparse-outlier wrapper, ...) plus low-rank factors
``a`` ``(IC, r)`` and ``b`` ``(r, OC)`` (LoRC, ``lqx.quant.lorc``). Its invariant::

    dequantize() = base.dequantize() + deq(a) @ deq(b)            (float32 sum, cast to dtype)
    linear(x)    = base.linear(x) + (x @ deq(a)) @ deq(b)         (the product a @ b is never formed)

Factor storage (``factor_bits``):

* ``16``: ``a``, ``b`` float16; ``a_scale``, ``b_scale`` are ``None``; ``deq(a) = a``.
* ``8``: symmetric int8 codes in ``[-127, 127]`` with float16 scales, one per
  *row* of each factor: ``a_scale`` ``(IC, 1)`` (one per input channel, so input
  channels of very different magnitude -- activation outliers after whitening --
  do not share a scale) and ``b_scale`` ``(r, 1)`` (one per rank component; row
  ``k`` of ``b`` has norm ``sqrt(sigma_k)``, so the scales follow the singular
  values). ``deq(a) = a * a_scale``, ``deq(b) = b * b_scale``. Scales are
  rounded to float16 before the codes are chosen (``affine.round_scale``).

Static (aux) data: ``rank`` and ``factor_bits``; ``shape`` and ``dtype`` are the base's.
``stored_bits`` is the base's plus every own leaf at its stored dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lqx.formats import affine
from lqx.formats.storage import Wrapper

FACTOR_BITS = (8, 16)
SCALE_DTYPE = np.dtype(jnp.float16)
CODE_MAX = 127  # symmetric int8: codes in [-127, 127]
_HI = jax.lax.Precision.HIGHEST


def factor_dtype(factor_bits: int) -> np.dtype:
  """Stored dtype of the factors: int8 codes (``8``) or float16 (``16``)."""
  if factor_bits not in FACTOR_BITS:
    raise ValueError(f"{factor_bits=} is not a factor storage; expected 8 (int8 + float16 scales) or 16 (float16)")
  return np.dtype(np.int8) if factor_bits == 8 else np.dtype(jnp.float16)


@jax.jit
def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 codes of ``x`` ``(n, m)`` with one float16 scale per row: ``(codes (n, m), scale (n, 1))``.

  ``scale = max|row| / 127`` rounded to float16 first, then ``codes = round(x / scale)``
  clipped to ``[-127, 127]``; ``|x - codes * scale| <= scale / 2`` wherever no clipping occurs.
  """
  x = x.astype(jnp.float32)
  scale = affine.round_scale(jnp.max(jnp.abs(x), axis=1, keepdims=True) / CODE_MAX, SCALE_DTYPE)
  codes = jnp.clip(jnp.round(affine.ieee_div(x, scale)), -CODE_MAX, CODE_MAX)
  return codes.astype(jnp.int8), scale.astype(SCALE_DTYPE)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["base", "a", "b", "a_scale", "b_scale"],
    meta_fields=["rank", "factor_bits"],
)
@dataclasses.dataclass(frozen=True)
class LowRank(Wrapper):
  """``base`` plus a rank-``rank`` correction ``deq(a) @ deq(b)`` (module doc)."""

  base: Any  # any registered format standing for the same (IC, OC) kernel
  a: jax.Array  # (IC, r) int8 codes or float16
  b: jax.Array  # (r, OC) int8 codes or float16
  a_scale: jax.Array | None  # (IC, 1) float16 per row of a; None for float16 factors
  b_scale: jax.Array | None  # (r, 1) float16 per row of b; None for float16 factors
  rank: int
  factor_bits: int  # 8 | 16

  def factors(self) -> tuple[jax.Array, jax.Array]:
    """float32 ``(deq(a) (IC, r), deq(b) (r, OC))``."""
    return _factors(self)

  def dequantize(self) -> jax.Array:
    """The ``(IC, OC)`` kernel, ``base.dequantize() + deq(a) @ deq(b)``, in ``dtype``."""
    return _dequantize(self)

  def linear(self, x: jax.Array) -> jax.Array:
    """``x[..., IC] @ dequantize()`` as ``base.linear(x) + (x @ deq(a)) @ deq(b)``, in the dtype of ``x``."""
    a, b = self.factors()
    y = self.base.linear(x).astype(x.dtype)
    return y + jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x, a.astype(x.dtype)), b.astype(x.dtype))

  def check(self) -> None:
    """Raise ``ValueError`` unless the arrays have the shapes and dtypes ``rank``, ``factor_bits`` and
    the base's ``shape`` imply (checkpoint restore calls this; the base is validated on its own)."""
    if not (hasattr(self.base, "dequantize") and hasattr(self.base, "linear")):
      raise ValueError(f"base is a {type(self.base).__name__}; expected a quantized-kernel format")
    shape = self.shape
    if not (len(shape) == 2 and all(isinstance(d, (int, np.integer)) and d > 0 for d in shape)):
      raise ValueError(f"base.shape={shape!r} is not a pair of positive ints")
    if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
      raise ValueError(f"rank={self.rank!r} must be a positive int")
    fdt = factor_dtype(self.factor_bits)
    ic, oc = shape
    r = int(self.rank)
    scaled = self.factor_bits == 8
    want = {"a": ((ic, r), fdt), "b": ((r, oc), fdt),
            "a_scale": ((ic, 1), SCALE_DTYPE) if scaled else None,
            "b_scale": ((r, 1), SCALE_DTYPE) if scaled else None}
    for name, spec in want.items():
      x = getattr(self, name)
      got = None if x is None else (tuple(x.shape), np.dtype(x.dtype))
      if got != spec:
        need = "None" if spec is None else f"{spec[0]} {spec[1]}"
        raise ValueError(f"{name} is {'None' if got is None else f'{got[0]} {got[1]}'}, but rank={r}, "
                         f"factor_bits={self.factor_bits}, shape={shape} need {need}")


@jax.jit
def _factors(lr: LowRank) -> tuple[jax.Array, jax.Array]:
  a, b = lr.a.astype(jnp.float32), lr.b.astype(jnp.float32)
  if lr.a_scale is not None:
    a = a * lr.a_scale.astype(jnp.float32)
    b = b * lr.b_scale.astype(jnp.float32)
  return a, b


@jax.jit
def _dequantize(lr: LowRank) -> jax.Array:
  a, b = _factors(lr)
  w = lr.base.dequantize().astype(jnp.float32) + jnp.matmul(a, b, precision=_HI)
  return w.astype(lr.dtype)


def from_factors(base, a: jax.Array, b: jax.Array, *, factor_bits: int = 8) -> LowRank:
  """``LowRank`` of format ``base`` and float factors ``a`` ``(IC, r)``, ``b`` ``(r, OC)``, stored as
  ``factor_bits`` (8: int8 codes + per-row float16 scales, :func:`quantize_rows`; 16: float16)."""
  factor_dtype(factor_bits)
  ic, oc = tuple(base.shape)
  if a.ndim != 2 or b.ndim != 2 or a.shape[0] != ic or b.shape[1] != oc or a.shape[1] != b.shape[0]:
    raise ValueError(f"factors a {tuple(a.shape)} and b {tuple(b.shape)} do not fit a ({ic}, {oc}) kernel; "
                     f"expected ({ic}, r) and (r, {oc})")
  if a.shape[1] < 1:
    raise ValueError(f"rank must be >= 1, got factors a {tuple(a.shape)} and b {tuple(b.shape)}")
  if factor_bits == 16:
    return LowRank(base, a.astype(jnp.float16), b.astype(jnp.float16), None, None, int(a.shape[1]), 16)
  qa, sa = quantize_rows(a)
  qb, sb = quantize_rows(b)
  return LowRank(base, qa, qb, sa, sb, int(a.shape[1]), 8)
