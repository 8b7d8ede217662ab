"""Sparse-position selection (``lqx.quant.outliers``) against numpy references of the SqueezeLLM authors' rules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqx.quant import outliers


def heavy(seed, shape, df):
  return (np.random.default_rng(seed).standard_t(df, shape) * 0.02).astype(np.float32)


def fisher_like(seed, shape):
  return np.random.default_rng(seed).chisquare(1.0, shape).astype(np.float32)


def real(index, numel):
  index = np.asarray(index)
  return index[index < numel]


def ref_sensitive(f, k):
  """The authors' ``gweight > gweight.topk(k).values[-1]``."""
  return np.flatnonzero(f.ravel() > np.sort(f.ravel())[::-1][k - 1])


def authors_outliers(w, r, exclude=()):
  """The authors' rule at range ``r``: ``|w| >= max(|Q1 - r IQR|, |Q3 + r IQR|)``, minus ``exclude``."""
  q1, q3 = np.quantile(w.astype(np.float64), [0.25, 0.75])
  t = max(abs(q1 - r * (q3 - q1)), abs(q3 + r * (q3 - q1)))
  mask = np.abs(w.ravel()) >= t
  mask[np.asarray(exclude, int)] = False
  return np.flatnonzero(mask)


def bisect_range(w, k, exclude=()):
  """Bisect ``r`` (authors' rule) until exactly ``k`` weights are outliers; None if no ``r`` gives ``k``."""
  lo, hi = 0.0, 1.0
  while len(authors_outliers(w, hi, exclude)) > k:
    hi *= 2
  for _ in range(100):
    mid = (lo + hi) / 2
    n = len(authors_outliers(w, mid, exclude))
    if n == k:
      return mid
    lo, hi = (mid, hi) if n > k else (lo, mid)
  return None


def test_sensitive_keeps_strictly_greater_than_the_kth():
  f = fisher_like(0, (96, 160))
  for frac in (0.0005, 0.01):
    k = round(frac * f.size)
    index = outliers.sensitive(f, frac)
    assert index.shape == (k,) and index.dtype == jnp.int32
    got = real(index, f.size)
    np.testing.assert_array_equal(got, ref_sensitive(f, k))  # sorted, as the reference
    assert len(got) == k - 1  # distinct values: the k-th itself is the threshold, not kept
    assert np.all(np.asarray(index)[len(got):] == f.size)


def test_sensitive_ties_at_the_threshold_are_left_out():
  f = np.zeros((40, 50), np.float32)
  f.ravel()[:10] = np.arange(10, 20)  # ten distinct large values
  f.ravel()[100:120] = 5.0  # twenty ties
  for k, want in ((5, 4), (10, 9), (12, 10), (30, 10), (31, 30)):
    got = real(outliers.sensitive(f, k / f.size), f.size)
    np.testing.assert_array_equal(got, ref_sensitive(f, k))
    assert len(got) == want
  assert outliers.sensitive(f, 0.0).shape == (0,)


@pytest.mark.parametrize("shape,df,frac", [((96, 160), 2.0, 0.004), ((64, 256), 3.0, 0.004), ((128, 96), 5.0, 0.02)])
def test_iqr_outliers_hit_the_target_like_bisection_under_the_authors_rule(shape, df, frac):
  w = heavy(1, shape, df)
  k = round(frac * w.size)
  index, r = outliers.iqr_outliers(w, frac)
  got = real(index, w.size)
  assert index.shape == (k,) and len(got) == k  # exactly the target, every matrix
  np.testing.assert_array_equal(got, np.sort(np.argsort(-np.abs(w.ravel()), kind="stable")[:k]))
  np.testing.assert_array_equal(authors_outliers(w, float(r)), got)  # the authors' rule at r picks this set
  r_bis = bisect_range(w, k)
  assert r_bis is not None and r_bis > 0
  np.testing.assert_array_equal(authors_outliers(w, r_bis), got)
  np.testing.assert_allclose(float(outliers.iqr_threshold(w, float(r))),
                             (np.sort(np.abs(w.ravel()))[::-1][k - 1] + np.sort(np.abs(w.ravel()))[::-1][k]) / 2,
                             rtol=1e-5)


def test_iqr_outliers_never_pick_excluded_and_still_hit_the_target():
  w = heavy(2, (96, 160), 2.0)
  top = np.argsort(-np.abs(w.ravel()))
  exclude = np.concatenate([top[:30], [w.size, w.size]]).astype(np.int32)  # padding entries are ignored
  k = round(0.004 * w.size)
  index, r = outliers.iqr_outliers(w, 0.004, exclude=exclude)
  got = real(index, w.size)
  assert len(got) == k and not set(got) & set(top[:30])
  np.testing.assert_array_equal(got, np.sort(top[30:30 + k]))
  np.testing.assert_array_equal(authors_outliers(w, float(r), top[:30]), got)


def test_select_counts_and_union():
  w = heavy(3, (128, 256), 3.0)
  f = fisher_like(4, w.shape) * np.abs(w)
  numel = w.size
  index, count = outliers.select(w, f, sensitive_frac=0.0005, outlier_frac=0.004)
  k_s, k_o = round(0.0005 * numel), round(0.004 * numel)
  assert index.shape == (k_s + k_o,) and index.dtype == jnp.int32
  assert int(count) == k_s + k_o - 1 and abs(int(count) - round(0.0045 * numel)) <= 1
  got = np.asarray(index)
  assert np.all(np.diff(got[: int(count)]) > 0) and np.all(got[int(count):] == numel)  # sorted, unique, padding last
  got = got[: int(count)]
  sens = ref_sensitive(f, k_s)
  assert set(sens) <= set(got)
  outl = np.setdiff1d(got, sens)
  rest = np.setdiff1d(np.arange(numel), got)
  assert len(outl) == k_o and np.abs(w.ravel()[outl]).min() >= np.abs(w.ravel()[rest]).max()
  jitted = jax.jit(functools.partial(outliers.select, sensitive_frac=0.0005, outlier_frac=0.004))(w, f)
  np.testing.assert_array_equal(jitted[0], index)
  assert int(jitted[1]) == int(count)
  empty, n = outliers.select(w, f, sensitive_frac=0.0, outlier_frac=0.0)
  assert empty.shape == (0,) and int(n) == 0


def test_arguments_are_checked():
  w = heavy(5, (16, 24), 3.0)
  with pytest.raises(ValueError, match="w must be a 2-D"):
    outliers.iqr_outliers(w.ravel(), 0.01)
  with pytest.raises(ValueError, match="fisher must be a 2-D"):
    outliers.sensitive(w[None], 0.01)
  with pytest.raises(ValueError, match="fisher has shape"):
    outliers.select(w, w[:, :-1])
  for bad in (-0.1, 1.5, True, "0.1"):
    with pytest.raises(ValueError, match="frac"):
      outliers.sensitive(w, bad)
  with pytest.raises(ValueError, match="exclude"):
    outliers.iqr_outliers(w, 0.01, exclude=np.zeros((2, 2), np.int32))
