"""LoRC (ZeroQuant-V2, arXiv 2303.08302): low-rank compensation of any method's quantization error.

After a base method quantizes ``w`` ``(IC, OC)`` to ``Q``, the error ``E = w - deq(Q)``
is approximated by a rank-``r`` product ``a @ b`` and stored beside ``Q``
(``lqx.formats.lowrank.LowRank``), so the kernel becomes ``deq(Q) + a @ b``.

* plain (``whiten=False``, LoRC): truncated SVD ``E ≈ U_r S_r V_r^T``,
  ``a = U_r S_r^{1/2}`` ``(IC, r)``, ``b = S_r^{1/2} V_r^T`` ``(r, OC)``; by
  Eckart-Young ``||E - a b||_F^2 = sum_{k > r} s_k^2``, the least weight error of any rank r.
* whitened (``whiten=True``; the activation-aware form of EoRA arXiv 2410.21271,
  LQER arXiv 2402.02446): minimizes the *output* error on the calibration data,
  ``tr((E - a b)^T H (E - a b)) = 2/N ||X (E - a b)||_F^2`` with ``H = 2/N X^T X``
  (the GPTQ Hessian, ``lqx.quant.hessian``; no extra pass). With ``H_d = H + d I
  = L L^T`` (Cholesky), ``||L^T (E - M)||_F`` is minimized over rank-r ``M`` by the
  truncated SVD of ``L^T E``: ``L^T E ≈ U_r S_r V_r^T``, ``a = L^{-T} U_r S_r^{1/2}``,
  ``b = S_r^{1/2} V_r^T``.

Damping (our choice): ``d = damp * mean(diag H)`` (``damp=0.01``, GPTQ's relative
rule; ``d = 1`` if ``H`` is all zeros, which makes the whitened form the plain
one). The factors are then exactly optimal for ``tr(D^T H D) + d ||D||_F^2``, not
for ``tr(D^T H D)`` alone; since the plain factors minimize ``||D||_F^2``, the
whitened ones are never worse than the plain ones on the *undamped* output error
either (``f_H(W) <= f_H(P) + d (f_I(P) - f_I(W)) <= f_H(P)``). The damping keeps
``L^{-T}`` bounded where ``H`` is (nearly) singular: dead or rare input channels.

Factors are stored as int8 codes with per-row float16 scales (``factor_bits=8``,
``lowrank.quantize_rows``) or float16 (``factor_bits=16``).

Choices where the paper leaves it open or where we deviate:

* ZeroQuant-V2 has no public code; it splits ``S`` as ``S^{1/2}`` on both
  factors (as here) and quantizes factors to 8 bits; its scale layout is not
  specified -- ours is one scale per row of ``a`` (input channel) and per row of
  ``b`` (rank component) (``lqx.formats.lowrank``).
* EoRA eigendecomposes the activation covariance and inverts ``Q Λ^{1/2}``
  (shifting eigenvalues only if some are negative); we use a Cholesky factor of
  the relatively damped ``H`` (one factorization and a triangular solve; any
  square root ``S S^T = H_d`` gives the same optimum). LQER scales by a
  *diagonal* of activation magnitudes only; ours is the full-matrix optimum.
* The factors are fitted to the base's error once and not refitted after they
  are quantized to int8; with an AdaDim base the axis is judged before compensation.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lqx.formats import lowrank
from lqx.formats.lowrank import LowRank
from lqx.quant.gptq import proxy_loss

_HI = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnums=3)
def _split(u: jax.Array, s: jax.Array, vt: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  root = jnp.sqrt(s[:rank])
  return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


@jax.jit
def _svd(e: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  return jnp.linalg.svd(e.astype(jnp.float32), full_matrices=False)


def damped(h: jax.Array, damp: float) -> jax.Array:
  """``H + d I`` with ``d = damp * mean(diag H)`` (``d = 1`` if that is not positive), float32 ``(IC, IC)``."""
  h = h.astype(jnp.float32)
  d = damp * jnp.mean(jnp.diagonal(h))
  d = jnp.where(d > 0, d, 1.0)
  return h + d * jnp.eye(h.shape[0], dtype=jnp.float32)


@jax.jit
def _whitened_svd(e: jax.Array, h: jax.Array, damp: float):
  """``(L, U, S, V^T)``: ``H_d = L L^T`` and the SVD of ``L^T e``."""
  l = jnp.linalg.cholesky(damped(h, damp))
  return (l, *_svd(jnp.matmul(l.T, e.astype(jnp.float32), precision=_HI)))


@jax.jit
def _unwhiten(l: jax.Array, a: jax.Array) -> jax.Array:
  return jax.scipy.linalg.solve_triangular(l.T, a, lower=False)  # L^{-T} a


def low_rank_factors(e: jax.Array, rank: int, *, h: jax.Array | None = None,
                     damp: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """float32 factors ``(a (IC, r), b (r, OC))`` with ``a @ b`` the best rank-``rank`` fit of ``e`` ``(IC, OC)``.

  ``h`` None: least ``||e - a b||_F`` (truncated SVD). ``h`` ``(IC, IC)``: least
  ``tr((e - a b)^T (h + d I) (e - a b))``, ``d = damp * mean(diag h)`` (module doc).
  Jittable (``rank`` static); a ``h`` that is not positive definite even after
  damping gives NaN factors (``LoRCConfig.quantize`` checks on the host).
  """
  if e.ndim != 2:
    raise ValueError(f"e has shape {tuple(e.shape)}; expected an (IC, OC) matrix")
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= min(e.shape):
    raise ValueError(f"rank={rank!r} must be an int in [1, min(IC, OC)] = [1, {min(e.shape)}] for e {tuple(e.shape)}")
  if h is None:
    return _split(*_svd(e), int(rank))
  if tuple(h.shape) != (e.shape[0],) * 2:
    raise ValueError(f"h has shape {tuple(h.shape)}; e {tuple(e.shape)} needs ({e.shape[0]}, {e.shape[0]})")
  if not damp > 0:
    raise ValueError(f"damp={damp} must be > 0 (a fraction of mean(diag H))")
  l, u, s, vt = _whitened_svd(e, h, damp)
  a, b = _split(u, s, vt, int(rank))
  return _unwhiten(l, a), b


@jax.jit
def _sq(x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(x.astype(jnp.float32)))


@dataclasses.dataclass(frozen=True)
class LoRCConfig:
  """LoRC over a base method: its kernel plus rank-``rank`` factors of its error. Hashable."""

  base: Any  # a method config (lqx.quant protocol)
  rank: int = 8
  whiten: bool = False  # fit the output error on the calibration data (needs the Hessian)
  factor_bits: int = 8  # 8: int8 codes + float16 per-row scales; 16: float16 factors
  damp: float = 0.01  # whitening: relative to mean(diag H)

  def __post_init__(self):
    if not callable(getattr(self.base, "quantize", None)):
      raise ValueError(f"LoRCConfig.base must be a method config with quantize(), got {type(self.base).__name__}")
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoRCConfig.rank={self.rank!r} must be a positive int")
    if not isinstance(self.whiten, bool):
      raise ValueError(f"LoRCConfig.whiten={self.whiten!r} must be a bool")
    lowrank.factor_dtype(self.factor_bits)
    if not self.damp > 0:
      raise ValueError(f"LoRCConfig.damp={self.damp} must be > 0 (a fraction of mean(diag H))")

  @property
  def name(self) -> str:
    return self.base.name + ("+wlorc" if self.whiten else "+lorc")

  @property
  def bits(self) -> int:
    return self.base.bits

  @property
  def stats(self) -> tuple[str, ...]:
    base = tuple(self.base.stats)
    return base + (("hessian",) if self.whiten and "hessian" not in base else ())

  @property
  def judges(self) -> bool:
    """Whether ``quantize`` uses a judge callback: the base's answer."""
    return bool(getattr(self.base, "judges", False))

  def shared(self, shape) -> list:
    """The base's shared solves (GPTQ's q/k/v), which reach ``quantize`` as ``solved``."""
    return list(self.base.shared(shape)) if hasattr(self.base, "shared") else []

  def quantize(self, w: jax.Array, stats: dict | None = None, *, name: str | None = None,
               judge=None, solved: dict | None = None) -> tuple[LowRank, dict]:
    """Method protocol (``lqx.quant``): the base's kernel plus factors of its error, as a ``LowRank``.

    ``info``: the base's, with ``proxy_loss`` now the compensated kernel's
    ``tr(D^T H D)`` (``base_proxy_loss`` the base's) when ``stats`` holds a Hessian,
    plus ``rank``, ``whiten``, ``factor_bits``, ``lorc_damp``, ``weight_residual`` (``||E - a b||_F^2 /
    ||E||_F^2`` with the stored factors) and ``output_residual`` (the same for
    ``tr(. ^T H .)``, with a Hessian).
    """
    stats = stats or {}
    q, info = self.base.quantize(w, stats, name=name, judge=judge, solved=solved)
    t0 = time.perf_counter()
    h = stats.get("hessian")
    if self.whiten and h is None:
      raise ValueError(f"{name}: whitened LoRC needs calibration data (a Hessian); pass calibration tokens")
    if self.rank > min(w.shape):
      raise ValueError(f"{name}: LoRC rank={self.rank} exceeds min(IC, OC) of the kernel {tuple(w.shape)}")
    base_deq = q.dequantize()
    e = w.astype(jnp.float32) - base_deq.astype(jnp.float32)
    a, b = low_rank_factors(e, self.rank, h=h if self.whiten else None, damp=self.damp)
    if not bool(jnp.all(jnp.isfinite(a)) & jnp.all(jnp.isfinite(b))):
      raise ValueError(f"{name}: LoRC factors are not finite (H not positive definite with damp={self.damp}?); "
                       f"raise damp")
    lr = lowrank.from_factors(q, a, b, factor_bits=self.factor_bits)
    fa, fb = lr.factors()
    if not bool(jnp.all(jnp.isfinite(fa)) & jnp.all(jnp.isfinite(fb))):
      raise ValueError(f"{name}: LoRC factors overflow float16 storage (factor_bits={self.factor_bits}); use 8")
    d = e - jnp.matmul(fa, fb, precision=_HI)
    info = {k: v for k, v in info.items() if k != "proxy_loss"}
    info.update(rank=self.rank, whiten=self.whiten, factor_bits=self.factor_bits, lorc_damp=self.damp,
                weight_residual=float(_sq(d)) / max(float(_sq(e)), float(np.finfo(np.float32).tiny)))
    if h is not None:
      base_loss, loss = float(proxy_loss(w, base_deq, h)), float(proxy_loss(w, lr.dequantize(), h))
      info.update(proxy_loss=loss, base_proxy_loss=base_loss,
                  output_residual=loss / max(base_loss, float(np.finfo(np.float32).tiny)))
    info["seconds"] = info.get("seconds", 0.0) + time.perf_counter() - t0
    return lr, info
