"""Timing helpers shared by the benchmarks: best-of-n wall time and this machine's matmul rate.

Every benchmark prints ``matmul_gflops()`` beside its figures: machines differ by 2x or
more, so a figure means little without the machine's own rate measured in the same run.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def time_best(fn, repeats: int) -> float:
  """Seconds of the fastest of ``repeats`` calls of ``fn`` after one warm-up call (which compiles).

  ``fn`` must block until its result is ready (``jax.block_until_ready``).
  """
  fn()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
  """GFLOP/s of a jitted ``n``-cube matmul in ``dtype`` on the default device (best of ``repeats``)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(jnp.matmul)
  return 2 * n**3 / time_best(lambda: jax.block_until_ready(f(a, b)), repeats) / 1e9
