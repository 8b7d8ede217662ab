"""Layers that accept a float kernel or a quantized one.

A kernel is either a float array of shape ``(in, out)`` or a quantized format
(``lqx.formats``: ``dequantize()`` gives that array, ``linear(x)`` the product).
The kernel chooses the compute path here, so model code never checks what it was given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def materialize(w) -> jax.Array:
  """The float ``(in, out)`` array behind a kernel (dequantized if quantized)."""
  return w.dequantize() if hasattr(w, "dequantize") else w


def linear(x: jax.Array, w, bias: jax.Array | None = None) -> jax.Array:
  """``x[..., in] @ w[in, out] (+ bias[out])`` in the dtype of ``x``; a format computes its own product."""
  if hasattr(w, "linear"):
    y = w.linear(x).astype(x.dtype)
  else:
    y = jnp.einsum("...i,io->...o", x, materialize(w).astype(x.dtype))
  if bias is not None:
    y = y + bias.astype(y.dtype).reshape((1,) * (y.ndim - 1) + bias.shape)
  return y


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis, computed in float32 (as LLaMA does)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + scale.shape)
  return (y * scale).astype(x.dtype)
