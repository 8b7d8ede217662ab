"""Weighted 1-D k-means: against the exact DP, k-means++ and unweighted solutions; determinism; edge rows."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqx.quant import kmeans

R, N = 48, 128


def rows(seed=0, zeros=0.0):
  """``(x, w)`` ``(R, N)`` float32: heavy-tailed values, weights spanning 3 decades (``zeros`` of them 0)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_t(4, (R, N)).astype(np.float32) * rng.uniform(0.01, 2, (R, 1)).astype(np.float32)
  w = (10 ** rng.uniform(-3, 0, (R, N))).astype(np.float32)
  w[rng.random((R, N)) < zeros] = 0
  return x, w


def sse64(x, w, c):
  """float64 weighted error per row, nearest centroid (brute force)."""
  d = (np.asarray(x, np.float64)[:, :, None] - np.asarray(c, np.float64)[:, None, :]) ** 2
  return np.sum(np.asarray(w, np.float64) * d.min(axis=2), axis=1)


def kmeanspp_lloyd(x, w, k, rng, iters=100):
  """One plain weighted k-means++ start and Lloyd to convergence, numpy float64 (reference)."""
  c = [x[rng.choice(x.size, p=w / w.sum())]]
  for _ in range(k - 1):
    d2 = w * np.min((x[:, None] - np.array(c)[None]) ** 2, axis=1)
    c.append(x[rng.choice(x.size, p=d2 / d2.sum())] if d2.sum() > 0 else c[0])
  c = np.array(c)
  for _ in range(iters):
    a = np.argmin((x[:, None] - c[None]) ** 2, axis=1)
    new = np.array([np.sum(w[a == j] * x[a == j]) / w[a == j].sum() if w[a == j].sum() > 0 else c[j]
                    for j in range(k)])
    if np.array_equal(new, c):
      break
    c = new
  return c


@pytest.mark.parametrize("k", [4, 8])
def test_close_to_the_exact_optimum_and_never_worse_than_kmeanspp(k):
  x, w = rows(seed=k)
  c, codes = kmeans.weighted_kmeans_1d(x, w, k, key=jax.random.key(0))
  assert c.shape == (R, k) and c.dtype == jnp.float32 and codes.shape == (R, N) and codes.dtype == jnp.int32
  c = np.asarray(c)
  assert np.all(np.diff(c, axis=1) >= 0)
  ours = sse64(x, w, c)
  _, opt = kmeans.optimal_1d(x, w, k)
  excess = ours / opt - 1
  assert excess.min() > -1e-5  # nothing beats the optimum (float32 rounding aside)
  assert np.mean(excess <= 1e-4) >= 0.9 and excess.max() < 0.02, np.sort(excess)[-5:]
  rng = np.random.default_rng(k)
  single = np.array([sse64(x[r:r + 1], w[r:r + 1], kmeanspp_lloyd(x[r].astype(np.float64), w[r].astype(np.float64),
                                                                   k, rng)[None])[0] for r in range(R)])
  assert np.all(ours <= single * (1 + 1e-4)), np.max(ours / single)
  assert np.mean(single / opt - 1 > 1e-4) > 0.2  # the reference is not trivially optimal on these rows


def test_weighted_never_worse_than_unweighted_on_the_weighted_objective():
  x, w = rows(seed=3)
  k = 8
  c, _ = kmeans.weighted_kmeans_1d(x, w, k, key=jax.random.key(0))
  unweighted, _ = kmeans.optimal_1d(x, np.ones_like(w), k)  # the best clustering that ignores the weights
  ours, other = sse64(x, w, c), sse64(x, w, unweighted)
  assert np.all(ours <= other * (1 + 1e-5))
  assert np.mean(ours < other * 0.99) > 0.5  # the weights matter on these rows


def test_codes_are_nearest_and_weighted_sse_matches():
  x, w = rows(seed=4)
  c, codes = kmeans.weighted_kmeans_1d(x, w, 8, key=jax.random.key(1))
  c, codes = np.asarray(c), np.asarray(codes)
  picked = np.take_along_axis(c, codes, axis=1)
  np.testing.assert_array_equal(np.abs(x - picked), np.min(np.abs(x[:, :, None] - c[:, None, :]), axis=2))
  np.testing.assert_allclose(np.asarray(kmeans.weighted_sse(x, w, c)), sse64(x, w, c), rtol=1e-5)
  shuffled = np.asarray(jax.random.permutation(jax.random.key(0), c, axis=1, independent=True))
  np.testing.assert_allclose(np.asarray(kmeans.weighted_sse(x, w, shuffled)), sse64(x, w, c), rtol=1e-5)


def test_deterministic_and_independent_of_other_rows():
  x, w = rows(seed=5)
  a = kmeans.weighted_kmeans_1d(x, w, 8, key=jax.random.key(7))
  b = kmeans.weighted_kmeans_1d(x, w, 8, key=jax.random.key(7))
  for u, v in zip(a, b):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  perm = np.random.default_rng(0).permutation(R)  # a row's result does not depend on the other rows
  c, _ = kmeans.weighted_kmeans_1d(x[perm], w[perm], 8, key=jax.random.key(7))
  np.testing.assert_allclose(np.asarray(c), np.asarray(a[0])[perm], rtol=1e-4, atol=1e-6)
  pp = [kmeans.weighted_kmeans_1d(x, w, 8, key=jax.random.key(s), n_init=2)[0] for s in (7, 7, 8)]
  np.testing.assert_array_equal(np.asarray(pp[0]), np.asarray(pp[1]))  # k-means++ starts: the key decides
  assert np.all(sse64(x, w, pp[2]) <= sse64(x, w, a[0]) * (1 + 1e-6))  # extra starts never make it worse


def test_zero_weight_entries_are_ignored():
  x, w = rows(seed=6, zeros=0.5)
  k = 4
  c, codes = kmeans.weighted_kmeans_1d(x, w, k, key=jax.random.key(0))
  ours = sse64(x, w, c)
  opt = np.array([kmeans.optimal_1d(x[r:r + 1][:, w[r] > 0], w[r:r + 1][:, w[r] > 0], k)[1][0] for r in range(R)])
  assert np.mean(ours <= opt * (1 + 1e-4)) >= 0.9 and np.all(ours <= opt * 1.02)
  # moving zero-weight entries anywhere changes nothing
  moved = np.where(w > 0, x, 100 * np.sign(x)).astype(np.float32)
  c2, codes2 = kmeans.weighted_kmeans_1d(moved, w, k, key=jax.random.key(0))
  np.testing.assert_allclose(sse64(x, w, c2), ours, rtol=1e-4)
  assert np.all(np.abs(np.asarray(c2)) < 100)  # no centroid chases weightless points


def test_constant_rows_all_zero_weights_and_few_values():
  x, w = rows(seed=7)
  x[0] = 0.25  # constant row
  x[1] = np.repeat(np.float32([-1, 0.5, 3]), [40, 40, 48])  # fewer distinct values than k
  w[2] = 0  # all-zero weights: clustered as uniform
  w[3] = 0
  w[3, 5] = 1.0  # a single weighted entry
  c, codes = kmeans.weighted_kmeans_1d(x, w, 8, key=jax.random.key(0))
  c, codes = np.asarray(c), np.asarray(codes)
  assert np.all(np.isfinite(c)) and np.all((codes >= 0) & (codes < 8))
  np.testing.assert_array_equal(c[0], np.full(8, 0.25, np.float32))
  assert set(np.unique(c[1])) >= {-1.0, 0.5, 3.0} and sse64(x[1:2], w[1:2], c[1:2])[0] == 0
  x[4], w[4] = x[2], 1.0  # the same row, uniform weights
  c, codes = kmeans.weighted_kmeans_1d(x, w, 8, key=jax.random.key(0))
  c = np.asarray(c)
  np.testing.assert_allclose(c[2], c[4], rtol=1e-5)
  assert x[3, 5] in c[3]


def test_optimal_1d_matches_brute_force():
  rng = np.random.default_rng(8)
  for _ in range(10):
    n, k = 7, 3
    x, w = rng.normal(size=n), rng.uniform(0, 1, n) * (rng.random(n) > 0.2)
    xs, ws = x[np.argsort(x)], w[np.argsort(x)]
    best = np.inf
    for cut in itertools.combinations(range(1, n), k - 1):
      err = 0.0
      for part_x, part_w in zip(np.split(xs, cut), np.split(ws, cut)):
        if part_w.sum() > 0:
          err += np.sum(part_w * (part_x - np.sum(part_w * part_x) / part_w.sum()) ** 2)
      best = min(best, err)
    c, sse = kmeans.optimal_1d(x[None], w[None], k)
    assert sse[0] == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert sse64(x[None], w[None], c)[0] == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_bad_arguments():
  x = np.zeros((4, 16), np.float32)
  with pytest.raises(ValueError, match="weight has shape"):
    kmeans.weighted_kmeans_1d(x, np.ones((4, 15)), 4, key=jax.random.key(0))
  with pytest.raises(ValueError, match="x has shape"):
    kmeans.weighted_kmeans_1d(x[0], np.ones(16), 4, key=jax.random.key(0))
  with pytest.raises(ValueError, match="weight must be"):
    kmeans.weighted_kmeans_1d(x, -np.ones((4, 16)), 4, key=jax.random.key(0))
  with pytest.raises(ValueError, match="k=0"):
    kmeans.weighted_kmeans_1d(x, np.ones((4, 16)), 0, key=jax.random.key(0))
  with pytest.raises(ValueError, match="max_iter"):
    kmeans.weighted_kmeans_1d(x, np.ones((4, 16)), 4, key=jax.random.key(0), max_iter=0)
  with pytest.raises(ValueError, match="NaN"):
    kmeans.weighted_kmeans_1d(np.full((4, 16), np.nan), np.ones((4, 16)), 4, key=jax.random.key(0))
