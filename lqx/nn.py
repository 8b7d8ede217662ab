"""Layers that accept a float kernel or a quantized one, and the switch between Pallas kernels and XLA.

A kernel is either a float array of shape ``(in, out)`` or a quantized format
(``lqx.formats``: ``dequantize()`` gives that array, ``linear(x)`` the product).
The kernel chooses the compute path here, so model code never checks what it was given.

Quantized formats compute ``linear`` with a fused Pallas dequant-matmul
(``pallas_kernels/``) on TPU (Mosaic) and GPU (Triton), and with XLA
(dequantize, then matmul) on CPU. :func:`pallas_target` makes that choice; it is
read when a function is traced, so a jitted function keeps the path it was
traced with. :func:`kernels` overrides it: ``"xla"`` forces the XLA reference
path everywhere, ``"interpret"`` runs the Pallas kernels in the interpreter (on
CPU, for tests). The environment variable ``LQX_KERNELS`` sets the default
(``auto`` when unset).
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import jax
import jax.numpy as jnp

KERNEL_MODES = ("auto", "xla", "interpret")
KERNEL_BACKENDS = ("tpu", "triton")
_mode: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar("lqx_kernels", default=None)


def _check_mode(mode: str, where: str) -> str:
  if mode not in KERNEL_MODES:
    raise ValueError(f"{where}={mode!r} is not a kernel mode; expected one of {KERNEL_MODES}")
  return mode


def kernel_mode() -> tuple[str, str | None]:
  """``(mode, backend)`` now in force: :func:`kernels`' setting, else ``$LQX_KERNELS`` (default ``auto``)."""
  current = _mode.get()
  if current is not None:
    return current
  return _check_mode(os.environ.get("LQX_KERNELS", "auto").strip().lower() or "auto", "LQX_KERNELS"), None


@contextlib.contextmanager
def kernels(mode: str, *, backend: str | None = None):
  """Within the block, quantized ``linear`` uses ``mode``: ``"auto"`` (Pallas on TPU/GPU, XLA on CPU),
  ``"xla"`` (dequantize, then matmul: the reference path) or ``"interpret"`` (the Pallas kernel of
  ``backend``, ``"tpu"`` or ``"triton"`` (default), run by the Pallas interpreter).

  The path is fixed when a function is traced, and jax's compile caches do not know this
  setting, so entering and leaving the block clears them (``jax.clear_caches()``): jitted
  functions retrace with the path in force.
  """
  _check_mode(mode, "mode")
  if backend is not None and backend not in KERNEL_BACKENDS:
    raise ValueError(f"{backend=} is not a kernel backend; expected one of {KERNEL_BACKENDS}")
  token = _mode.set((mode, backend))
  jax.clear_caches()
  try:
    yield
  finally:
    _mode.reset(token)
    jax.clear_caches()


def pallas_target() -> tuple[str, bool] | None:
  """``(backend, interpret)`` for a quantized ``linear`` traced now, or ``None`` for the XLA path.

  ``auto``: ``("tpu", False)`` on TPU, ``("triton", False)`` on GPU, ``None`` elsewhere.
  """
  mode, backend = kernel_mode()
  if mode == "xla":
    return None
  if mode == "interpret":
    return backend or "triton", True
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu", False
  if platform == "gpu":
    return "triton", False
  return None


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
