"""SqueezeLLM (arXiv 2306.07629): Fisher-weighted codebooks, optionally dense-and-sparse.

Each output channel of an ``(IC, OC)`` kernel gets its own ``2**bits``-entry
lookup table, found by 1-D k-means over the channel's ``IC`` weights with the
diagonal Fisher as sample weights (objective ``sum_i F_i (w_i - c(w_i))^2``,
``lqx.quant.kmeans``); codes and tables are stored as a ``Codebook``
(``lqx.formats.codebook``). With ``sensitive_frac``/``outlier_frac`` > 0, the
most Fisher-sensitive weights (strict ``>`` threshold) and magnitude outliers
(the authors' interquartile-range rule, its multiplier set per matrix to hit the
fraction exactly; ``lqx.quant.outliers``) leave the dense part: they get zero weight in
k-means, and a fixed-capacity ``Sparse`` wrapper (``lqx.formats.sparse``) stores
``w - table[code]`` at their positions, so dense + sparse reproduces them.

Deviations from the authors' code (SqueezeAILab/SqueezeLLM):

* k-means runs on device for all channels of a kernel at once (a dynamic-program
  start on the sorted row, a windowed DP refinement, then Lloyd to a fixed point;
  ``lqx.quant.kmeans``) instead of
  scikit-learn's ``KMeans(n_clusters=2**b, n_init="auto", max_iter=50,
  random_state=0)`` row by row on CPU; ``experiments/bench_kmeans.py`` compares
  the two on SmolLM2's rows.
* Tables are rounded to ``table_dtype`` (float16) *before* codes are assigned,
  so every weight takes its nearest stored entry.
* The authors' Fisher is accumulated in bfloat16; lqx's in float32
  (``lqx.quant.fisher``).
* The authors keep the outlier's full value in the sparse matrix and quantize
  the dense matrix with the outlier zeroed; here the sparse part stores the
  difference to the dense code at that position, so the pair is exact.
* The outlier range multiplier is solved per matrix for a target fraction (in
  closed form: the rule depends on |w| only, so the outliers are the largest |w|;
  a bisection lands on the same set, ``tests/test_outliers.py``) instead of one
  hand-tuned value per model.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lqx.formats import codebook
from lqx.formats.sparse import Sparse
from lqx.quant import kmeans, outliers


@dataclasses.dataclass(frozen=True)
class SqueezeLLMConfig:
  """SqueezeLLM settings. Hashable. ``sensitive_frac=outlier_frac=0`` is the dense-only form."""

  bits: int
  sensitive_frac: float = 0.0  # paper: 0.0005 (0.05%) most Fisher-sensitive weights kept sparse
  outlier_frac: float = 0.0  # paper: 0.004 (0.40%) magnitude outliers kept sparse
  table_dtype: Any = jnp.float16
  value_dtype: Any = jnp.float16  # sparse values (the paper's fp16 sparse matrix)
  n_init: int = 0  # extra weighted k-means++ starts (lqx.quant.kmeans; its DP start needs none)
  max_iter: int = 50  # Lloyd steps, as the authors' scikit-learn call
  seed: int = 0

  stats = ("fisher",)

  def __post_init__(self):
    if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)) or not 2 <= self.bits <= 8:
      raise ValueError(f"SqueezeLLMConfig.bits must be an int in 2..8, got {self.bits!r}")
    for f in ("sensitive_frac", "outlier_frac"):
      v = getattr(self, f)
      if not isinstance(v, (int, float)) or not 0 <= v < 0.5:
        raise ValueError(f"SqueezeLLMConfig.{f} must be a fraction in [0, 0.5), got {v!r}")
    object.__setattr__(self, "table_dtype", np.dtype(self.table_dtype))
    object.__setattr__(self, "value_dtype", np.dtype(self.value_dtype))

  @property
  def sparse(self) -> bool:
    return self.sensitive_frac > 0 or self.outlier_frac > 0

  @property
  def name(self) -> str:
    if not self.sparse:
      return "squeezellm"
    return f"squeezellm-s{100 * (self.sensitive_frac + self.outlier_frac):g}"

  def quantize(self, w: jax.Array, stats: dict, *, name: str | None = None, **_) -> tuple:
    """Method protocol (``lqx.quant``): ``(Codebook or Sparse(Codebook), info)``.

    ``stats["fisher"]``: ``(IC, OC)`` diagonal Fisher of ``w``. ``info``: ``seconds``,
    ``sparse`` (entries kept sparse), ``fisher_error`` (``sum F (w - dense)^2`` over the
    dense entries).
    """
    where = f"{name}: " if name else ""
    if w.ndim != 2:
      raise ValueError(f"{where}expected a 2-D (IC, OC) kernel, got shape {tuple(w.shape)}")
    f = stats.get("fisher") if stats else None
    if f is None:
      raise ValueError(f"{where}SqueezeLLM needs stats['fisher'], the (IC, OC) diagonal Fisher of the kernel")
    if tuple(f.shape) != tuple(w.shape):
      raise ValueError(f"{where}stats['fisher'] has shape {tuple(f.shape)}; the kernel is {tuple(w.shape)}")
    t0 = time.perf_counter()
    w32, f = jnp.asarray(w, jnp.float32), jnp.asarray(f, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(f))) or bool(jnp.any(f < 0)):
      raise ValueError(f"{where}stats['fisher'] must be finite and non-negative")
    index, count = None, 0
    if self.sparse:
      index, count = outliers.select(w32, f, sensitive_frac=self.sensitive_frac, outlier_frac=self.outlier_frac)
      f = f.reshape(-1).at[index].set(0.0).reshape(f.shape)
    centroids, _ = kmeans.weighted_kmeans_1d(w32.T, f.T, 1 << self.bits, key=jax.random.key(self.seed),
                                             n_init=self.n_init, max_iter=self.max_iter)
    q = codebook.codebook_quantize(w, centroids, table_dtype=self.table_dtype)
    fisher_error = float(jnp.sum(f * (w32 - q.dequantize().astype(jnp.float32)) ** 2))
    if self.sparse:
      q = Sparse.from_dense(q, w, index, value_dtype=self.value_dtype)
    return q, {"seconds": time.perf_counter() - t0, "sparse": int(count), "fisher_error": fisher_error}
