"""Weighted 1-D k-means, row by row, on device; and an exact dynamic-programming oracle.

For each row ``r`` of ``x`` ``(R, n)`` with weights ``weight`` ``(R, n) >= 0``, find ``k``
centroids ``c[r]`` (sorted ascending) minimizing the weighted error (SqueezeLLM's
sensitivity-weighted objective, ``weight`` = the Fisher diagonal)::

    sse[r] = sum_i weight[r, i] * min_j (x[r, i] - c[r, j])**2

A row whose weights are all zero is clustered with uniform weights (its weighted error
is 0 whatever the centroids). Zero-weight entries do not move centroids; every entry
still gets the code of its nearest centroid.

:func:`weighted_kmeans_1d` (jnp, jitted, rows vmapped and processed ``chunk`` at a time).
An optimal 1-D clustering is a set of contiguous runs of the sorted row, so:

1. Each row is sorted once (an int32 sort key with the float order; equal values share
   their weight at the first copy) and scaled to ``[-1, 1]``; prefix sums of ``w``,
   ``w*x`` and ``w*x**2`` give any run's weight, mean and error in O(1).
2. Start: the exact k-means (dynamic program) of the row cut into about ``atoms`` runs
   (at equal counts, equal weights and equal value steps), an inner cluster spanning at
   most ``max(48, 4*atoms/k)`` of them: O(k atoms 48). This places the clusters globally.
3. Refine: move all ``k-1`` boundaries jointly to their best positions among ``b_j + d``,
   ``|d| <= window`` (every step to 4, then 1.5x apart), an exact DP over those choices,
   repeated (at most ``refine`` times) until none moves.
4. Lloyd steps on the sorted values (clusters are the runs between centroid midpoints,
   found by ``searchsorted``; centroids their weighted means) until no boundary moves, at
   most ``max_iter``; a cluster with (almost) no weight keeps its centroid.
5. Optionally ``n_init`` greedy weighted k-means++ starts (D^2 sampling with the weights,
   drawn from ``key``), each followed by Lloyd; the start with the least error is kept.
   Every entry of the unsorted row gets the index of its nearest centroid.

Steps 2-4 use no random numbers. Errors from float32 prefix sums lose about 1e-4 (relative)
in the costs the DPs compare, so a near-tie can go either way; the result is always a Lloyd
fixed point (each entry nearest its centroid, each centroid its cluster's mean).

:func:`optimal_1d` is the exact optimum (numpy float64 dynamic program over the sorted
values, O(k n^2)), the oracle for tests and experiments.

Deviations from SqueezeLLM (``quantization/nuq.py``), which calls scikit-learn
``KMeans(n_clusters=2**b, n_init="auto", max_iter=50, random_state=0)`` per row on CPU
(one greedy k-means++ start, Lloyd to a centroid-shift tolerance): rows run in parallel
on device, and the clustering starts from a DP on atoms refined by a windowed DP instead of
random starts (k-means++ starts are optional); Lloyd runs to a fixed point.
``experiments/bench_kmeans.py`` compares the errors on SmolLM2's rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_FAR = 4.0  # a centroid slot not chosen yet: beyond the scaled data's [-1, 1], so its cluster is empty
_MIN_WEIGHT = 1e-6  # a cluster with less than this fraction of the row's weight keeps its centroid
SPAN = 48  # an inner cluster of the DP start spans at most max(SPAN, 4*atoms/k) atoms


def _sort_key(x: jax.Array) -> jax.Array:
  """float32 -> int32 with the same order (XLA sorts int32 several times faster than float32)."""
  b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return b ^ ((b >> 31) & 0x7FFFFFFF)


def _from_sort_key(key: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(key ^ ((key >> 31) & 0x7FFFFFFF), jnp.float32)


def _sort_row(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(xs, ws)``: ``x`` ``(n,)`` sorted, and the weights with each run of equal values' total at its first copy."""
  xs = _from_sort_key(jnp.sort(_sort_key(x)))
  first = jnp.searchsorted(xs, x, side="left", method="scan_unrolled")
  return xs, jnp.zeros_like(w).at[first].add(w)


def _prefix(v: jax.Array) -> jax.Array:
  """``(n+1,)`` prefix sums of ``v`` ``(n,)``, starting at 0."""
  return jnp.concatenate([jnp.zeros(1, v.dtype), jnp.cumsum(v)])


def _bounds(xs: jax.Array, c: jax.Array) -> jax.Array:
  """``(k+1,)`` cluster boundaries in sorted ``xs``: cluster ``j`` is ``xs[b[j]:b[j+1]]`` (nearest to ``c[j]``)."""
  mid = jnp.searchsorted(xs, (c[1:] + c[:-1]) / 2, side="left", method="scan_unrolled")
  n = jnp.full(1, xs.shape[0], mid.dtype)
  return jnp.concatenate([jnp.zeros(1, mid.dtype), mid, n])


def _range(p: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Sum of the summand of prefix sums ``p`` over ``[lo, hi)``."""
  return p[hi] - p[lo]


def _cost(pw, ps, pq, lo, hi, c):
  """Weighted error of the points ``[lo, hi)`` about ``c``, from prefix sums of ``w``, ``w*x``, ``w*x**2``."""
  return _range(pq, lo, hi) - 2 * c * _range(ps, lo, hi) + c * c * _range(pw, lo, hi)


def _kmeanspp(key, xs, pw, ps, pq, k: int, trials: int) -> jax.Array:
  """Greedy weighted k-means++ start: ``(k,)`` sorted centroids.

  Each step draws ``trials`` candidates with probability ``w * D^2`` and keeps the one
  that leaves the least error (sklearn's greedy variant; ``trials=1`` is plain k-means++).
  """
  n = xs.shape[0]
  keys = jax.random.split(key, k)
  first = jnp.searchsorted(pw[1:], jax.random.uniform(keys[0]) * pw[-1], side="right")
  c = jnp.full(k, _FAR, jnp.float32).at[0].set(xs[jnp.minimum(first, n - 1)])
  steps = int(np.ceil(np.log2(n + 1)))

  def cost(lo, hi, c):
    return jnp.maximum(_cost(pw, ps, pq, lo, hi, c), 0)

  def add(i, c):
    b = _bounds(xs, c)
    err = cost(b[:-1], b[1:], c)
    cum = jnp.cumsum(err)

    def draw(u):  # a point drawn by w * D^2 (u uniform in [0, total error)), and the error after adding it
      j = jnp.minimum(jnp.searchsorted(cum, u, side="right"), k - 1)
      u = u - (cum[j] - err[j])

      def bisect(_, lohi):  # smallest p in [lo, hi] whose error over [b[j], p] exceeds u
        lo, hi = lohi
        mid = (lo + hi) // 2
        above = cost(b[j], mid + 1, c[j]) > u
        return jnp.where(above, lo, mid + 1), jnp.where(above, mid, hi)

      p, _ = jax.lax.fori_loop(0, steps, bisect, (b[j], jnp.maximum(b[j + 1] - 1, b[j])))
      v = xs[jnp.clip(p, 0, n - 1)]
      at = jnp.searchsorted(c, v, side="right")  # v goes between c[at-1] and c[at]; only their points move
      left, right = c[jnp.maximum(at - 1, 0)], c[jnp.minimum(at, k - 1)]
      lo, hi = jnp.where(at > 0, b[jnp.maximum(at - 1, 0)], 0), b[jnp.minimum(at + 1, k)]
      m1 = jnp.where(at > 0, jnp.searchsorted(xs, (left + v) / 2, side="left"), 0)
      m2 = jnp.searchsorted(xs, (v + right) / 2, side="left")
      m1, m2 = jnp.clip(m1, lo, hi), jnp.clip(jnp.maximum(m2, m1), lo, hi)
      before = jnp.where(at > 0, err[jnp.maximum(at - 1, 0)], 0) + err[jnp.minimum(at, k - 1)]
      after = cost(lo, m1, left) + cost(m1, m2, v) + cost(m2, hi, right)
      return v, after - before

    u = jax.random.uniform(keys[i], (trials,)) * cum[-1]
    v, gain = jax.vmap(draw)(u)
    v = jnp.where(cum[-1] > 0, v[jnp.argmin(gain)], c[0])  # no error left: duplicate a centroid
    at = jnp.searchsorted(c, v, side="right")
    idx = jnp.arange(k)
    return jnp.where(idx < at, c, jnp.where(idx == at, v, jnp.roll(c, 1)))  # insert, drop the last (_FAR)

  return jax.lax.fori_loop(1, k, add, c)


def _atom_start(xs, pw, ps, pq, k: int, atoms: int) -> jax.Array:
  """``(k+1,)`` boundaries of the exact k-means of the sorted row cut into about ``atoms`` runs (DP).

  The runs are cut at equal counts, equal weight and equal value steps (a third each), so
  both dense regions and isolated heavy points get their own runs. An inner cluster may
  span at most ``span`` runs (the first and last any number): O(k atoms span).
  """
  n = xs.shape[0]
  if k == 1:
    return jnp.array([0, n], jnp.int32)
  a = atoms // 3
  cuts = jnp.sort(jnp.concatenate([
      jnp.array([0, n], jnp.int32),
      jnp.round(jnp.arange(1, a) * (n / a)).astype(jnp.int32),
      jnp.searchsorted(pw[1:-1], jnp.arange(1, a) * (pw[-1] / a), side="left").astype(jnp.int32) + 1,
      jnp.searchsorted(xs, jnp.linspace(-1, 1, atoms - 2 * a + 1)[1:-1], side="left").astype(jnp.int32)]))
  m = cuts.shape[0]
  span = min(m - 1, max(SPAN, 4 * m // k))
  aw, as_, aq = pw[cuts], ps[cuts], pq[cuts]

  def cost(lo, hi):  # error of the points between cuts lo and hi about their mean
    sw, ss = aw[hi] - aw[lo], as_[hi] - as_[lo]
    return jnp.maximum(aq[hi] - aq[lo] - ss * ss / jnp.where(sw > 0, sw, 1), 0)

  d, end = jnp.arange(span + 1)[:, None], jnp.arange(m)[None, :]
  band = jnp.where(end >= d, cost(jnp.maximum(end - d, 0), end), jnp.inf)  # [d, i]: the run of cuts i-d .. i

  def layer(best, _):  # new[i] = min over d of best[i - d] + band[d, i]
    pad = jnp.concatenate([jnp.full(span, jnp.inf, best.dtype), best])
    new = best + band[0]
    for e in range(1, span + 1):  # a chain of elementwise minima: XLA fuses it into one loop
      new = jnp.minimum(new, pad[span - e:span - e + m] + band[e])
    return new, best

  idx = jnp.arange(m)
  first = cost(jnp.zeros_like(idx), idx)  # one run from the start
  best, bests = jax.lax.scan(layer, first, None, length=k - 2)  # bests[j][i]: least error of cuts[:i] in j+1 runs
  last = jnp.argmin(best + cost(idx, jnp.full_like(idx, m - 1)))  # the last run, to the end

  def back(i, best):
    e = idx[:span + 1]
    t = i - jnp.argmin(jnp.where(i >= e, best[jnp.maximum(i - e, 0)], jnp.inf) + band[:, i])
    return t, t

  _, ts = jax.lax.scan(back, last, bests, reverse=True)
  inner = jnp.concatenate([ts, last[None]])
  return jnp.concatenate([jnp.array([0], jnp.int32), cuts[inner], jnp.array([n], jnp.int32)])


def _means(xs, pw, ps, b):
  """``(k,)`` sorted centroids: the weighted means of the runs between boundaries ``b`` ``(k+1,)``."""
  wj = pw[b[1:]] - pw[b[:-1]]
  ok = wj > _MIN_WEIGHT * pw[-1]
  mean = (ps[b[1:]] - ps[b[:-1]]) / jnp.where(ok, wj, 1)
  c = jax.lax.cummax(jnp.where(ok, mean, -2 * _FAR))
  return jnp.where(c < -_FAR, jnp.min(jnp.where(ok, mean, _FAR)), c)


def _offsets(window: int) -> np.ndarray:
  """Boundary moves tried by :func:`_refine`: every step up to 4, then steps growing by 1.5x up to ``window``."""
  steps = set(range(min(window, 4) + 1))
  step = 4.0
  while round(step * 1.5) <= window:
    step *= 1.5
    steps.add(int(round(step)))
  steps = sorted(steps)
  return np.array([-v for v in steps[:0:-1]] + steps, np.int32)


def _refine(xs, pw, ps, pq, b, window: int, iters: int):
  """Move all boundaries ``b`` ``(k+1,)`` jointly to the best positions near each (DP), until none moves.

  Boundary ``j`` tries ``b[j] + _offsets(window)``: an exact DP over those choices, O(k w^2)
  with ``w = len(_offsets(window))``, at most ``iters`` times.
  """
  n = xs.shape[0]
  off = jnp.asarray(_offsets(window))

  def cost(lo, hi):  # errors of the runs [lo, hi) about their means, from prefix sums at lo and hi; 
    (wl, sl, ql), (wh, sh, qh) = lo, hi
    wj, sj = wh - wl, sh - sl
    return jnp.maximum(qh - ql - sj * sj / jnp.where(wj > 0, wj, 1), 0)

  def at(p):
    return pw[p], ps[p], pq[p]

  def once(b):
    cand = jnp.clip(b[1:-1, None] + off[None, :], 0, n)  # (k-1, c) candidates of each inner boundary
    pre = at(cand)
    order = jnp.where(cand[:-1, :, None] <= cand[1:, None, :], 0, jnp.inf)  # runs may be empty, not negative

    def step(err, pair):
      prev, nxt, bad = pair
      total = err[:, None] + cost(tuple(v[:, None] for v in prev), tuple(v[None, :] for v in nxt)) + bad
      return jnp.min(total, axis=0), jnp.argmin(total, axis=0)

    first = cost(at(jnp.zeros((), cand.dtype)), tuple(v[0] for v in pre))
    err, args = jax.lax.scan(step, first, (tuple(v[:-1] for v in pre), tuple(v[1:] for v in pre), order))
    last = jnp.argmin(err + cost(tuple(v[-1] for v in pre), at(jnp.array(n))))
    _, pick = jax.lax.scan(lambda u, a: (a[u], a[u]), last, args, reverse=True)
    pick = jnp.concatenate([pick, last[None]])
    return b.at[1:-1].set(cand[jnp.arange(cand.shape[0]), pick])

  def body(state):
    b, _, it = state
    new = once(b)
    return new, jnp.any(new != b), it + 1

  b, _, _ = jax.lax.while_loop(lambda s: s[1] & (s[2] < iters), body, (b, jnp.array(True), 0))
  return b


def _lloyd(xs, pw, ps, pq, c, max_iter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Lloyd from sorted ``c`` until no boundary moves: ``(centroids (k,), boundaries (k+1,), error)``."""
  min_w = _MIN_WEIGHT * pw[-1]

  def update(c, b):
    lo, hi = b[:-1], b[1:]
    wj = _range(pw, lo, hi)
    mean = _range(ps, lo, hi) / jnp.where(wj > min_w, wj, 1)
    mean = jnp.clip(mean, xs[jnp.minimum(lo, xs.shape[0] - 1)], xs[jnp.maximum(hi - 1, 0)])
    return jax.lax.cummax(jnp.where(wj > min_w, mean, c))

  def body(state):
    c, b, _, it = state
    c = update(c, b)
    b_new = _bounds(xs, c)
    return c, b_new, jnp.any(b_new != b), it + 1

  b = _bounds(xs, c)
  c, b, _, _ = jax.lax.while_loop(lambda s: s[2] & (s[3] < max_iter), body, (c, b, jnp.array(True), 0))
  return c, b, jnp.sum(_cost(pw, ps, pq, b[:-1], b[1:], c))


def _nearest(x: jax.Array, c: jax.Array) -> jax.Array:
  """int32 index of the centroid of sorted ``c`` ``(k,)`` nearest to each of ``x`` ``(n,)`` (ties: the lower)."""
  k = c.shape[0]
  i = jnp.searchsorted((c[1:] + c[:-1]) / 2, x, side="left", method="scan_unrolled")
  cand = jnp.clip(i[:, None] + jnp.arange(-1, 2)[None, :], 0, k - 1)  # midpoints round: check the neighbours
  dist = jnp.abs(x[:, None] - c[cand])
  return jnp.take_along_axis(cand, jnp.argmin(dist, axis=1)[:, None], axis=1)[:, 0].astype(jnp.int32)


def _cluster_row(x, w, key, k: int, n_init: int, max_iter: int, atoms: int, window: int, refine: int):
  """Steps 1-5 of the module doc for one row ``x``, ``w`` ``(n,)``: ``(centroids (k,), codes (n,))``."""
  x = x.astype(jnp.float32)
  w = w.astype(jnp.float32)
  w = jnp.where(jnp.sum(w) > 0, w, jnp.ones_like(w))
  w = w / jnp.mean(w)
  mu = jnp.sum(w * x) / jnp.sum(w)
  scale = jnp.max(jnp.abs(x - mu))
  scale = jnp.where(scale > 0, scale, 1)
  x_sorted, ws = _sort_row(x, w)
  xs = (x_sorted - mu) / scale
  pw, ps, pq = _prefix(ws), _prefix(ws * xs), _prefix(ws * xs * xs)
  b = _atom_start(xs, pw, ps, pq, k, atoms)
  if k > 1 and refine:
    b = _refine(xs, pw, ps, pq, b, window, refine)
  c, b, err = _lloyd(xs, pw, ps, pq, _means(xs, pw, ps, b), max_iter)
  if n_init:
    def start(key):
      return _lloyd(xs, pw, ps, pq, _kmeanspp(key, xs, pw, ps, pq, k, 2 + int(np.log(k))), max_iter)

    cs, bs, errs = jax.vmap(start)(jax.random.split(key, n_init))
    best = jnp.argmin(errs)
    c, b = jnp.where(errs[best] < err, cs[best], c), jnp.where(errs[best] < err, bs[best], b)
  lo, hi = b[:-1], b[1:]  # a mean lies in its cluster's range (exactly a repeated value's, despite rounding)
  inside = jnp.clip(c * scale + mu, x_sorted[jnp.minimum(lo, x.shape[0] - 1)], x_sorted[jnp.maximum(hi - 1, 0)])
  c = jax.lax.cummax(jnp.where(hi > lo, inside, jnp.clip(c * scale + mu, x_sorted[0], x_sorted[-1])))
  return c, _nearest(x, c)


@functools.partial(jax.jit, static_argnames=("k", "n_init", "max_iter", "atoms", "window", "refine", "chunk"))
def _kmeans(x, weight, key, *, k, n_init, max_iter, atoms, window, refine, chunk):
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(x.shape[0]))
  row = functools.partial(_cluster_row, k=k, n_init=n_init, max_iter=max_iter, atoms=atoms, window=window,
                          refine=refine)
  return jax.lax.map(lambda a: row(*a), (x, weight, keys), batch_size=chunk)


def _check_rows(x, weight, k) -> None:
  if x.ndim != 2:
    raise ValueError(f"x has shape {tuple(x.shape)}; expected (R, n) rows")
  if weight.shape != x.shape:
    raise ValueError(f"weight has shape {tuple(weight.shape)}; expected {tuple(x.shape)} like x")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"{k=} must be a positive int")
  if not isinstance(x, jax.core.Tracer) and not bool(np.all(np.isfinite(np.asarray(x)))):
    raise ValueError("x has NaN or Inf entries")
  if not isinstance(weight, jax.core.Tracer):
    w = np.asarray(weight)
    if not bool(np.all(np.isfinite(w))) or bool(np.any(w < 0)):
      raise ValueError("weight must be finite and >= 0")


def weighted_kmeans_1d(x: jax.Array, weight: jax.Array, k: int, *, key: jax.Array, n_init: int = 0,
                       max_iter: int = 50, atoms: int = 192, window: int = 8, refine: int = 8,
                       chunk: int = 128) -> tuple[jax.Array, jax.Array]:
  """Weighted k-means of each row of ``x`` ``(R, n)`` (module doc) -> ``(centroids, codes)``.

  ``weight`` ``(R, n)`` is ``>= 0``. Returns float32 centroids ``(R, k)`` sorted ascending and
  int32 codes ``(R, n)``, the index of each entry's nearest centroid. ``atoms`` (at least
  ``4*k`` are used), ``window`` and ``refine`` set the DP start and refinement, ``max_iter``
  the Lloyd steps, ``n_init`` extra k-means++ starts (row ``r`` draws from
  ``fold_in(key, r)``; with ``n_init=0`` the key is unused). A row's result does not depend on
  the other rows, up to float rounding (XLA may vectorize other batch shapes differently).
  ``chunk`` rows are processed at a time (memory). Centroids repeat when a row has fewer than
  ``k`` distinct values; a cluster of one repeated value gets exactly that value.
  """
  x, weight = jnp.asarray(x), jnp.asarray(weight)
  _check_rows(x, weight, k)
  options = dict(n_init=n_init, max_iter=max_iter, atoms=atoms, window=window, refine=refine, chunk=chunk)
  for name, v in options.items():
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if name in ("n_init", "refine") else 1):
      raise ValueError(f"{name}={v!r} must be a {'non-negative' if name in ('n_init', 'refine') else 'positive'} int")
  options = {name: int(v) for name, v in options.items()}
  options["atoms"] = max(options["atoms"], 4 * int(k), 6)
  options["chunk"] = min(options["chunk"], max(x.shape[0], 1))
  return _kmeans(x, weight, key, k=int(k), **options)


@jax.jit
def weighted_sse(x: jax.Array, weight: jax.Array, centroids: jax.Array) -> jax.Array:
  """``(R,)`` float32 ``sum_i weight * (x - nearest centroid)**2`` per row; ``centroids`` ``(R, k)``, any order."""
  x = x.astype(jnp.float32)
  c = jnp.sort(centroids.astype(jnp.float32), axis=1)
  codes = jax.vmap(_nearest)(x, c)
  return jnp.sum(weight.astype(jnp.float32) * (x - jnp.take_along_axis(c, codes, axis=1)) ** 2, axis=1)


def optimal_1d(x, weight, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact weighted k-means of each row of ``x`` ``(R, n)`` -> ``(centroids (R, k), sse (R,))``, numpy float64.

  Dynamic program over the sorted values (an optimal 1-D clustering is contiguous runs),
  O(k n^2) time and O(n^2) memory per row: meant for n up to about 2000. An all-zero-weight
  row is clustered with uniform weights (as :func:`weighted_kmeans_1d`); a cluster of
  zero-weight values gets their plain mean. With fewer than ``k`` values the last repeats.
  """
  x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
  _check_rows(x, weight, k)
  out = [_optimal_row(a, w, int(k)) for a, w in zip(x, weight)]
  return np.array([c for c, _ in out]).reshape(len(out), k), np.array([e for _, e in out])


def _optimal_row(x: np.ndarray, w: np.ndarray, k: int) -> tuple[np.ndarray, float]:
  order = np.argsort(x, kind="stable")
  x, w = x[order], w[order]
  sse_w = w
  if not w.sum() > 0:
    w = np.ones_like(w)
  n = x.size
  m = min(k, n)
  pw, ps, pq = (np.concatenate([[0.0], np.cumsum(v)]) for v in (w, w * x, w * x * x))
  sw = pw[None, :] - pw[:, None]  # [t, i]: the run x[t:i]
  ss = ps[None, :] - ps[:, None]
  cost = np.maximum(pq[None, :] - pq[:, None] - ss * ss / np.where(sw > 0, sw, 1), 0)
  cost = np.where(np.triu(np.ones((n + 1, n + 1), bool), 1), cost, np.inf)  # runs need t < i
  best = cost[0].copy()  # best[i]: least error of x[:i] in j runs
  arg = np.zeros((m, n + 1), np.int64)
  for j in range(1, m):
    total = best[:, None] + cost
    arg[j] = np.argmin(total, axis=0)
    best = total[arg[j], np.arange(n + 1)]
  cuts = [n]
  for j in range(m - 1, 0, -1):
    cuts.append(arg[j][cuts[-1]])
  cuts = [0] + cuts[::-1]
  cent = []
  for lo, hi in zip(cuts[:-1], cuts[1:]):
    cw = w[lo:hi]
    cent.append(np.sum(cw * x[lo:hi]) / cw.sum() if cw.sum() > 0 else x[lo:hi].mean())
  cent = np.array(cent + [cent[-1]] * (k - m))
  near = np.min((x[:, None] - cent[None, :]) ** 2, axis=1)
  return cent, float(np.sum(sse_w * near))
