"""Streaming accumulation of a linear layer's input Hessian ``H = 2/N * X^T X``.

``init``/``update``/``finalize`` on a NamedTuple state, optax-style, so a
calibration loop folds any number of batches in bounded memory::

  state = hessian.init(ic)
  for x in batches:                      # x[..., IC], any leading axes
    state = hessian.update(state, x)     # jittable
  h = hessian.finalize(state)            # (IC, IC) float32

``N`` counts rows (tokens) folded. Reference GPTQ (``GPTQ.add_batch``) divides
by the number of *sequences* instead, so its H is ours times tokens-per-sequence.
GPTQ's result does not depend on a positive scale of H (its damping is relative
to ``mean(diag H)``), so the two give identical quantized weights; the proxy
loss ``tr(ΔW^T H ΔW)`` with our H is ``2 * mean over tokens of ||x ΔW||^2``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class HessianState(NamedTuple):
  sum: jax.Array  # (IC, IC) float32, sum over rows of x x^T
  count: jax.Array  # () int32, rows folded


def init(ic: int) -> HessianState:
  """Empty state for ``ic`` input channels."""
  if ic <= 0:
    raise ValueError(f"{ic=} must be positive")
  return HessianState(jnp.zeros((ic, ic), jnp.float32), jnp.zeros((), jnp.int32))


def update(state: HessianState, x: jax.Array) -> HessianState:
  """Fold inputs ``x[..., IC]`` (leading axes flattened into rows) into the state."""
  ic = state.sum.shape[0]
  if x.shape[-1] != ic:
    raise ValueError(f"x has {x.shape[-1]} features on its last axis; the state has IC={ic}")
  x = x.reshape(-1, ic).astype(jnp.float32)
  xtx = jnp.einsum("ni,nj->ij", x, x, precision=jax.lax.Precision.HIGHEST)
  return HessianState(state.sum + xtx, state.count + x.shape[0])


def finalize(state: HessianState) -> jax.Array:
  """``H = 2/N * sum x x^T`` ``(IC, IC)`` float32; all zeros if nothing was folded."""
  return state.sum * (2.0 / jnp.maximum(state.count, 1).astype(jnp.float32))
