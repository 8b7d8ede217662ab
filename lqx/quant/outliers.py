"""Which weights of one ``(IC, OC)`` kernel SqueezeLLM keeps sparse: Fisher-sensitive ones and magnitude outliers.

SqueezeLLM's dense-and-sparse decomposition (arXiv 2306.07629, Sec. 4.2;
SqueezeAILab/SqueezeLLM ``squeezellm/outliers.py``,
``quantization/generate_outlier_config.py``) removes two sets from the dense
matrix, per weight matrix:

* **Sensitive** (:func:`sensitive`): with ``k = frac * numel`` weights requested,
  the threshold is the ``k``-th largest Fisher value and the weights *strictly*
  greater are kept (``gweight > topk(k).values[-1]``), so ties at the threshold,
  and the ``k``-th weight itself, are left out: ``count <= k - 1`` (``k >= 1``).
* **Outliers** (:func:`iqr_outliers`): from the quartiles ``Q1``, ``Q3`` of the
  whole signed matrix (``np.quantile``, linear interpolation) and a range ``r``,
  ``T_min = Q1 - r IQR`` and ``T_max = Q3 + r IQR`` are made symmetric,
  ``T = max(|T_min|, |T_max|)``, and the weights with ``|w| >= T`` are outliers
  (after the sensitive ones have been zeroed, so outliers come from the rest).
  The authors tune one ``r`` by hand for the whole model (1.5-2.0 suggested) to
  reach a total percentage; the paper keeps 0.45% of weights sparse, 0.05%
  sensitive plus 0.40% outliers.

Here every matrix hits its fraction instead (deviation): the symmetric rule
selects by ``|w|`` alone and, for ``r >= 0``, ``T(r) = r IQR + max(Q3, -Q1)`` is
linear in ``r``, so the outliers for a target count ``k`` are simply the ``k``
largest ``|w|`` among the non-excluded weights (ties broken by position) and
``r`` follows in closed form; no bisection is needed (the tests check that
bisecting ``r`` under the authors' rule lands on the same set). The returned ``r``
puts ``T`` halfway between the ``k``-th and ``(k+1)``-th largest ``|w|``, so the
authors' rule at that ``r`` (``>=`` or ``>``) picks exactly these weights when
there are no ties there.

Counting rule: a fraction ``frac`` of an ``(IC, OC)`` kernel is
``k = round(frac * IC * OC)`` entries (Python ``round``: nearest, halves to
even; the authors' sensitive count is ``int()``, i.e. floor). Indices are flat
row-major ``i * OC + o`` int32 in fixed-size arrays of ``k`` slots, sorted
ascending, unused slots padded with ``IC * OC`` (the ``lqx.formats.sparse``
convention; JAX scatters drop it). Functions are jitted with the fractions static.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

MAX_NUMEL = np.iinfo(np.int32).max  # the padding index IC * OC must itself be an int32


def _check_kernel(x, name: str) -> tuple[int, int]:
  if getattr(x, "ndim", None) != 2:
    raise ValueError(f"{name} must be a 2-D (IC, OC) array, got shape {tuple(getattr(x, 'shape', ()))}")
  ic, oc = (int(d) for d in x.shape)
  if ic * oc > MAX_NUMEL:
    raise ValueError(f"{name} has {ic * oc} entries; int32 flat indices allow at most {MAX_NUMEL}")
  return ic, oc


def count(frac: float, shape: tuple[int, int], name: str = "frac") -> int:
  """Entries a fraction ``frac`` in ``[0, 1]`` of an ``(IC, OC)`` kernel asks for: ``round(frac * IC * OC)``."""
  if isinstance(frac, bool) or not isinstance(frac, (int, float, np.floating, np.integer)) or not 0 <= frac <= 1:
    raise ValueError(f"{name}={frac!r} must be a fraction in [0, 1]")
  return int(round(float(frac) * shape[0] * shape[1]))


def sensitive(fisher: jax.Array, frac: float) -> jax.Array:
  """Flat int32 ``(k,)`` positions of the weights whose Fisher is strictly above the ``k``-th largest.

  ``fisher`` ``(IC, OC)``; ``k = round(frac * IC * OC)``. Kept: ``fisher > t`` with
  ``t`` the ``k``-th largest value (authors' rule), at most ``k - 1`` of them
  (fewer with ties at ``t``); the other slots are padding ``IC * OC``. Sorted ascending.
  """
  shape = _check_kernel(fisher, "fisher")
  return _sensitive(jnp.asarray(fisher, jnp.float32), count(frac, shape, "frac"))


@functools.partial(jax.jit, static_argnums=1)
def _sensitive(fisher: jax.Array, k: int) -> jax.Array:
  numel = fisher.size
  if k == 0:
    return jnp.zeros((0,), jnp.int32)
  top, idx = jax.lax.top_k(fisher.reshape(numel), k)
  return jnp.sort(jnp.where(top > top[-1], idx, numel)).astype(jnp.int32)


def iqr_threshold(w: jax.Array, r: float) -> jax.Array:
  """The authors' symmetric outlier threshold ``max(|Q1 - r IQR|, |Q3 + r IQR|)`` of ``w`` ``(IC, OC)``.

  Quartiles of all of ``w`` (signed; linear interpolation as ``np.quantile``). Outliers are ``|w| >= T``.
  """
  _check_kernel(w, "w")
  q1, q3 = jnp.quantile(jnp.asarray(w, jnp.float32), jnp.array([0.25, 0.75]))
  return jnp.maximum(jnp.abs(q1 - r * (q3 - q1)), jnp.abs(q3 + r * (q3 - q1)))


def iqr_outliers(w: jax.Array, frac: float, *, exclude: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """``(index, r)``: the ``k = round(frac * IC * OC)`` largest ``|w|`` outside ``exclude``, and their range ``r``.

  ``w`` ``(IC, OC)``; ``exclude`` flat positions ``(n,)`` never selected (padding
  ``IC * OC`` allowed), e.g. :func:`sensitive`'s. ``index`` int32 ``(k,)`` sorted
  ascending, exactly ``min(k, IC * OC - excluded)`` real entries, padding ``IC * OC``.
  ``r`` (float32 scalar): the multiplier of the authors' rule (module doc) whose
  ``T`` lies halfway between the ``k``-th and ``(k+1)``-th largest ``|w|``, i.e.
  ``(T - max(Q3, -Q1)) / IQR`` over quartiles of all of ``w``; ``inf`` for ``k = 0``;
  negative only when ``k`` reaches into the quartiles, where the authors' rule has no such ``r``.
  """
  shape = _check_kernel(w, "w")
  k = count(frac, shape, "frac")
  if exclude is None:
    exclude = jnp.zeros((0,), jnp.int32)
  exclude = jnp.asarray(exclude)
  if exclude.ndim != 1 or not jnp.issubdtype(exclude.dtype, jnp.integer):
    raise ValueError(f"exclude must be a 1-D integer array of flat positions, got {exclude.ndim}-D {exclude.dtype}")
  return _iqr_outliers(jnp.asarray(w, jnp.float32), exclude.astype(jnp.int32), k)


@functools.partial(jax.jit, static_argnums=2)
def _iqr_outliers(w: jax.Array, exclude: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  numel = w.size
  q1, q3 = jnp.quantile(w, jnp.array([0.25, 0.75]))
  mag = jnp.abs(w.reshape(numel)).at[exclude].set(-1.0, mode="drop")  # excluded: below every |w|
  top, idx = jax.lax.top_k(mag, min(k + 1, numel))
  real = top[:k] >= 0
  index = jnp.sort(jnp.where(real, idx[:k], numel)).astype(jnp.int32)
  if k == 0:
    return index, jnp.array(jnp.inf, jnp.float32)
  below = top[k] if k < numel else jnp.float32(0)
  t = (top[k - 1] + jnp.maximum(below, 0.0)) / 2
  return index, (t - jnp.maximum(q3, -q1)) / (q3 - q1)


def select(w: jax.Array, fisher: jax.Array, *, sensitive_frac: float = 0.0005,
           outlier_frac: float = 0.004) -> tuple[jax.Array, jax.Array]:
  """``(index, count)``: the sparse positions of ``w`` ``(IC, OC)``, sensitive ones first, then outliers.

  ``index`` int32 ``(k_s + k_o,)`` with ``k_s = round(sensitive_frac * IC * OC)`` and
  ``k_o = round(outlier_frac * IC * OC)``: :func:`sensitive` on ``fisher`` (``(IC, OC)``,
  strict ``>``: ``n_s <= k_s - 1`` entries), then :func:`iqr_outliers` of ``w`` among the
  rest (exactly ``min(k_o, IC * OC - n_s)``), merged, sorted ascending, padding
  ``IC * OC`` last. ``count`` (int32 scalar) = ``n_s + min(k_o, IC * OC - n_s)``:
  ``k_s + k_o - 1`` when ``k_s >= 1`` and the top Fisher values are distinct.
  """
  shape = _check_kernel(w, "w")
  if tuple(fisher.shape) != shape:
    raise ValueError(f"fisher has shape {tuple(fisher.shape)}; expected {shape} like w")
  s = sensitive(fisher, sensitive_frac)
  o, _ = iqr_outliers(w, outlier_frac, exclude=s)
  index = jnp.sort(jnp.concatenate([s, o]))
  return index, jnp.sum(index < shape[0] * shape[1], dtype=jnp.int32)
