"""Width-scaling diagnostics: top singular values, spectra, sublayer gains, coordinate checks.

A *matrix param* is any leaf with ``ndim >= 2``; it is read as the
``(prod(shape[:-1]), shape[-1])`` matrix (an ``(in, out)`` kernel as is).
Results are keyed by param path (``"layers_0/attn/q_proj/kernel"``), ready for JSON.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lqx import nn
from lqx.models import llama
from lqx.tree import is_kernel_leaf, path_str


def _as_matrix(w: jax.Array) -> jax.Array:
  w = nn.materialize(w)
  if w.ndim < 2:
    raise ValueError(f"expected a matrix (ndim >= 2), got shape {w.shape}")
  return w.reshape(-1, w.shape[-1]).astype(jnp.float32)


def matrix_params(params) -> dict[str, jax.Array]:
  """``{path: matrix}`` of every leaf with ``ndim >= 2``.

  A quantized kernel counts as the float matrix it stands for (dequantized), never
  as its storage arrays (packed codes, scales, zeros).
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_kernel_leaf)
  mats = {path_str(p): nn.materialize(x) for p, x in flat}
  return {k: x for k, x in mats.items() if getattr(x, "ndim", 0) >= 2}


def _power_iteration(w: jax.Array, v: jax.Array, iters: int) -> tuple[jax.Array, jax.Array]:
  def body(_, v):
    u = w @ v
    u = u / jnp.maximum(jnp.linalg.norm(u), 1e-30)
    v = w.T @ u
    return v / jnp.maximum(jnp.linalg.norm(v), 1e-30)

  v = jax.lax.fori_loop(0, iters, body, v / jnp.maximum(jnp.linalg.norm(v), 1e-30))
  return jnp.linalg.norm(w @ v), v


@functools.partial(jax.jit, static_argnames="iters")
def top_singular_value(w: jax.Array, v0: jax.Array | None = None, *,
                       iters: int = 100) -> tuple[jax.Array, jax.Array]:
  """Top singular value of ``w`` by ``iters`` power iterations on ``w^T w``. Jitted.

  Args:
    w: (m, n) matrix (higher ranks are flattened to ``(prod(shape[:-1]), shape[-1])``).
    v0: (n,) start vector; pass the returned ``v`` to warm-start the next call
      (a few iterations then suffice while ``w`` changes slowly). Default: a fixed
      random vector.
  Returns:
    ``(sigma, v)``: float32 scalar <= ||w||_2 (equal at convergence) and the (n,)
    unit right singular vector estimate.
  """
  w = _as_matrix(w)
  if v0 is None:
    v0 = jax.random.normal(jax.random.key(0), (w.shape[1],), jnp.float32)
  elif v0.shape != (w.shape[1],):
    raise ValueError(f"v0 must have shape ({w.shape[1]},) for w of shape {w.shape}, got {v0.shape}")
  return _power_iteration(w, v0.astype(jnp.float32), iters)


@functools.partial(jax.jit, static_argnames="iters")
def _top_all(mats: dict, state: dict, iters: int):
  out = {k: _power_iteration(_as_matrix(w), state[k], iters) for k, w in mats.items()}
  return {k: s for k, (s, _) in out.items()}, {k: v for k, (_, v) in out.items()}


def top_singular_values(params, state: dict | None = None, *,
                        iters: int = 100) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Top singular value of every matrix param, by jitted power iteration.

  Returns ``({path: sigma}, state)``; pass ``state`` back (with fewer ``iters``)
  to warm-start the next call, e.g. during training.
  """
  mats = matrix_params(params)
  if state is None:
    key = jax.random.key(0)
    state = {k: jax.random.normal(jax.random.fold_in(key, i), (w.shape[-1],), jnp.float32)
             for i, (k, w) in enumerate(mats.items())}
  elif state.keys() != mats.keys():
    raise ValueError(f"state has paths {sorted(state)} but params' matrices are {sorted(mats)}")
  return _top_all(mats, state, iters)


def singular_values(w: jax.Array, *, max_dim: int = 2048) -> np.ndarray:
  """Full spectrum (descending, float64 numpy) of a small matrix."""
  m = _as_matrix(w)
  if min(m.shape) > max_dim:
    raise ValueError(f"matrix of shape {m.shape} is too large for a full SVD (max_dim={max_dim}); "
                     f"use top_singular_value")
  return np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)


def spectra(params, *, max_dim: int = 2048) -> dict[str, np.ndarray]:
  """``{path: singular values}`` of every matrix param whose smaller side is <= ``max_dim``."""
  return {k: singular_values(w, max_dim=max_dim) for k, w in matrix_params(params).items()
          if min(_as_matrix(w).shape) <= max_dim}


def spectrum_shape(svals: np.ndarray, n_points: int = 32) -> np.ndarray:
  """Spectrum normalized by its top value, at ``n_points`` relative ranks in [0, 1].

  Spectra of matrices of different sizes (widths) become comparable curves:
  ``shape[j] = s(r_j) / s_1`` with ``r_j = j / (n_points - 1)`` of the way down the
  (linearly interpolated) sorted spectrum.
  """
  s = np.sort(np.asarray(svals, np.float64))[::-1]
  if s.size == 0 or s[0] <= 0:
    raise ValueError(f"spectrum must be non-empty with a positive top value, got {s[:4]}")
  return np.interp(np.linspace(0, 1, n_points), np.linspace(0, 1, s.size), s / s[0])


def compare_spectrum_shapes(spectra_by_width: Mapping[int, np.ndarray], *,
                            n_points: int = 32) -> dict:
  """Shape of one matrix's spectrum across widths, against the narrowest width.

  Returns ``{"shapes": {width: (n_points,) list}, "max_abs_diff": {width: float}}``;
  a near-fixed shape (small differences) is what the sqrt(lr/wd) theory predicts.
  """
  widths = sorted(spectra_by_width)
  shapes = {w: spectrum_shape(spectra_by_width[w], n_points) for w in widths}
  ref = shapes[widths[0]]
  return {"shapes": {w: s.tolist() for w, s in shapes.items()},
          "max_abs_diff": {w: float(np.max(np.abs(s - ref))) for w, s in shapes.items()}}


def _rms(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


@functools.partial(jax.jit, static_argnums=0)
def sublayer_gains(config: llama.LlamaConfig, params: dict, tokens: jax.Array) -> dict[str, jax.Array]:
  """Gains of each LLaMA block on ``tokens`` (B, T). Jitted; config is static.

  ``"layers_i/attn"`` and ``"layers_i/mlp"``: RMS(sublayer output) / RMS(residual
  stream entering it); ``"layers_i"``: RMS(block output) / RMS(block input).
  """
  x = llama.embed(config, params, tokens)
  positions = jnp.arange(tokens.shape[1])
  gains = {}
  for name in llama.layer_names(config):
    p = params[name]
    x_in = x
    h, _ = llama.attention(config, p["attn"], nn.rms_norm(x, p["attn_norm"]["scale"], config.norm_eps),
                           positions)
    gains[f"{name}/attn"] = _rms(h) / _rms(x)
    x = x + h
    h = llama.mlp(p["mlp"], nn.rms_norm(x, p["mlp_norm"]["scale"], config.norm_eps))
    gains[f"{name}/mlp"] = _rms(h) / _rms(x)
    x = x + h
    gains[name] = _rms(x) / _rms(x_in)
  return gains


def llama_activations(config: llama.LlamaConfig, params: dict, tokens: jax.Array) -> dict[str, jax.Array]:
  """Activations for a coordinate check: ``embed``, each block's output, ``logits``."""
  xs = llama.hidden_states(config, params, tokens)
  acts = {"embed": xs[0]}
  acts.update({name: x for name, x in zip(llama.layer_names(config), xs[1:])})
  acts["logits"] = llama.head(config, params, xs[-1])
  return acts


def coord_check(widths: Sequence[int],
                trajectory: Callable[[int], Sequence[Mapping[str, jax.Array]]]) -> dict:
  """muP coordinate check: activation size per layer against width over training steps.

  Args:
    widths: model widths, ascending.
    trajectory: ``width -> [acts_0, acts_1, ...]``, one ``{layer: activation}``
      dict per step (step 0 = init), the same layers and step count at every width.
  Returns:
    ``{"widths", "layers", "rms": [width][step][layer] RMS of the coordinates,
    "slopes": [step][layer] log2-log2 slope of RMS against width}``. Under muP the
    slopes stay near 0 at every step; a blow-up shows as a positive slope.
  """
  widths = list(widths)
  rms, layers = [], None
  for w in widths:
    steps = trajectory(w)
    if layers is None:
      layers = list(steps[0])
    rms.append([[float(_rms(acts[k])) for k in layers] for acts in steps])
  arr = np.asarray(rms)  # (W, S, L)
  if arr.ndim != 3:
    raise ValueError("trajectory must return the same number of steps and layers at every width")
  flat = arr.reshape(len(widths), -1)
  slopes = np.full(flat.shape[1], np.nan)  # nan where an activation is 0 (e.g. a zero readout)
  ok = np.all(flat > 0, axis=0)
  if len(widths) > 1 and ok.any():
    slopes[ok] = np.polyfit(np.log2(widths), np.log2(flat[:, ok]), 1)[0]
  return {"widths": widths, "layers": layers, "rms": arr.tolist(),
          "slopes": slopes.reshape(arr.shape[1], arr.shape[2]).tolist()}


def plot_coord_check(result: dict, path=None, *, steps: Sequence[int] | None = None):
  """One panel per step: activation RMS against width (log-log), a line per layer."""
  from matplotlib.figure import Figure

  rms = np.asarray(result["rms"])
  steps = list(range(rms.shape[1])) if steps is None else list(steps)
  fig = Figure(figsize=(3.2 * len(steps), 3))
  axes = fig.subplots(1, len(steps), sharey=True, squeeze=False)
  for ax, s in zip(axes[0], steps):
    for j, layer in enumerate(result["layers"]):
      ax.plot(result["widths"], rms[:, s, j], "o-", label=layer)
    ax.set(xscale="log", yscale="log", xlabel="width", title=f"step {s}")
    ax.set_xticks(result["widths"], [str(w) for w in result["widths"]])
    ax.xaxis.set_minor_formatter("")
  axes[0, 0].set_ylabel("RMS of coordinates")
  axes[0, -1].legend(fontsize=7)
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=110)
  return fig
