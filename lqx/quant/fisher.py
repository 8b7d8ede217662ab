"""Diagonal empirical Fisher of chosen kernels, a small on-disk cache, and per-layer sensitivity summaries.

SqueezeLLM (arXiv 2306.07629) weights each weight by the diagonal of the empirical
Fisher information of the causal-LM loss, gathered one calibration sequence at a time::

  F[path] = sum over sequences s of (d loss_s / d W[path]) ** 2     (IC, OC) float32, >= 0

``loss_s`` is the mean next-token cross-entropy of sequence ``s`` (``llama_loss``).
``F`` is a *sum* over sequences, not a mean, as the authors' gradient collection
(``kssteven418/SqueezeLLM-gradients``, ``run.py``) accumulates it; SqueezeLLM's
weighted k-means does not depend on a positive scale of F, but ``fisher_error`` in
``summarize`` does (divide by N for the per-sequence mean).

The streaming loop (``diagonal_fisher``) holds one gradient and the accumulator,
never a stack of per-sequence gradients; ``init`` continues an accumulation, so
``F(A + B) = diagonal_fisher(B, init=diagonal_fisher(A))`` (nested sample sets cost
nothing extra). Only the leaves at ``paths`` are differentiated: XLA prunes the rest
of the backward pass (e.g. the tied embedding's gradient).

Deviations from the authors' code: lqx differentiates the float32 model and squares
and sums in float32 (the reference casts the model to bfloat16 and accumulates the
squared gradients in bfloat16 ``.grad`` buffers), and takes the loss over all T - 1
predictions of a window (as Hugging Face's ``labels=input_ids`` does; same as the
reference). The sequences are lqx's calibration windows (``lqx.data.sample_windows``)
rather than C4.

Cache: ``save_fisher`` / ``load_fisher`` write and read an ``.npz`` whose keys are
param paths and values (IC, OC) float32 (no pickles).
"""

from __future__ import annotations

import functools
import math
import re
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lqx import tree
from lqx.models import llama

# Same as lqx.recipe.BLOCK_LINEARS (copied: recipe imports lqx.quant, so importing it here would cycle).
BLOCK_LINEARS = r"layers_\d+/(attn|mlp)/\w+_proj/kernel"


# ----------------------------------------------------------------------------- accumulation


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _accumulate(loss_fn: Callable, acc: dict, params, seq) -> dict:
  """``acc + (d loss_fn(params, seq) / d params[path]) ** 2`` for each path of ``acc``, in float32."""

  def loss_of(kernels):
    p = params
    for path, k in kernels.items():
      p = tree.replace(p, path, k)
    return loss_fn(p, seq)

  g = jax.grad(loss_of)({path: tree.get(params, path) for path in acc})
  return {path: acc[path] + jnp.square(g[path].astype(jnp.float32)) for path in acc}


def _check_paths(params, paths) -> list[str]:
  if isinstance(paths, str) or not paths:
    raise ValueError(f"paths must be a non-empty list of param paths, got {paths!r}")
  paths = list(dict.fromkeys(paths))
  for path in paths:
    try:
      leaf = tree.get(params, path)
    except (KeyError, TypeError, IndexError):
      raise ValueError(f"paths: {path!r} is not a param path (e.g. {tree.paths(params)[:2]})") from None
    if tree.is_kernel_leaf(leaf) or not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(f"paths: {path!r} must be a float array to differentiate, got {type(leaf).__name__} "
                       f"{getattr(leaf, 'dtype', '')} (a quantized kernel has no gradient)")
  return paths


def diagonal_fisher(loss_fn: Callable, params, sequences: Iterable, *, paths, init: dict | None = None,
                    progress: bool = True) -> dict[str, jax.Array]:
  """``{path: sum over sequences of (d loss_fn(params, seq) / d params[path]) ** 2}``, float32.

  ``loss_fn(params, seq) -> ()`` is the loss of one sequence (jittable; its identity is
  a static jit argument, so pass the same function object to reuse the compilation).
  Each result has the shape of its leaf ((IC, OC) for kernels). ``init``: an earlier
  result over the same paths to continue from (it is not modified). Memory: one
  gradient of the leaves at ``paths`` plus the accumulator.
  """
  paths = _check_paths(params, paths)
  if init is None:
    acc = {p: jnp.zeros(tree.get(params, p).shape, jnp.float32) for p in paths}
  else:
    if set(init) != set(paths):
      raise ValueError(f"init has paths {sorted(init)[:3]}...; expected the same paths as paths= "
                       f"({len(paths)} paths, e.g. {paths[:3]})")
    acc = {}
    for p in paths:
      shape = tuple(tree.get(params, p).shape)
      if tuple(np.shape(init[p])) != shape:
        raise ValueError(f"init[{p!r}] has shape {tuple(np.shape(init[p]))}; expected the leaf's shape {shape}")
      acc[p] = jnp.array(init[p], jnp.float32, copy=True)  # copied: the step donates its accumulator
  n = 0
  for seq in tqdm(sequences, desc="fisher", disable=not progress, unit="seq"):
    acc = _accumulate(loss_fn, acc, params, seq)
    n += 1
  if n == 0:
    raise ValueError("sequences is empty: the Fisher needs at least one calibration sequence")
  return {p: acc[p] for p in paths}


@functools.lru_cache(maxsize=None)
def llama_loss(config: llama.LlamaConfig) -> Callable:
  """``loss(params, seq)``: mean next-token cross-entropy of one (T,) int sequence, T >= 2.

  The causal-LM loss SqueezeLLM differentiates: logits of positions 0..T-2 predict
  tokens 1..T-1 (``llama.forward``, chunked causal attention). One function object per
  config (cached), so ``diagonal_fisher`` compiles once per config.
  """

  def loss(params, seq):
    logits = llama.forward(config, params, seq[None, :])[0, :-1]  # (T-1, V) float32
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, seq[1:, None], axis=-1))

  return loss


def block_linear_paths(params) -> list[str]:
  """Every block linear kernel (``BLOCK_LINEARS``) of a LLaMA param tree, layers in numeric order."""
  return [p for p in tree.paths(params) if re.fullmatch(BLOCK_LINEARS, p)]


def llama_fisher(config: llama.LlamaConfig, params: dict, tokens, *, paths=None, init: dict | None = None,
                 progress: bool = True) -> dict[str, jax.Array]:
  """Diagonal Fisher ``{path: (IC, OC) float32}`` of a LLaMA model over token windows ``tokens`` (N, T).

  ``paths`` default: every block linear kernel. One sequence per gradient (the
  per-sequence loss is ``llama_loss(config)``); ``init`` continues an earlier result.
  """
  tokens = llama.check_tokens(config, tokens)
  if paths is None:
    paths = block_linear_paths(params)
  return diagonal_fisher(llama_loss(config), params, tokens, paths=paths, init=init, progress=progress)


# ----------------------------------------------------------------------------- cache


def save_fisher(path: str | Path, fisher: dict) -> Path:
  """Writes ``{param path: (IC, OC) float32}`` to the ``.npz`` file ``path`` (exactly that name). Returns it."""
  arrays = _checked(fisher, "fisher")
  path = Path(path)
  with open(path, "wb") as f:  # a handle, so that numpy does not append ".npz"
    np.savez(f, **arrays)
  return path


def load_fisher(path: str | Path, params=None) -> dict[str, np.ndarray]:
  """``{param path: (IC, OC) float32 numpy}`` from a ``save_fisher`` file.

  With ``params``, also checks that every key is a param path of that tree with the
  same shape. ``ValueError`` naming the file for anything else (not an npz, a pickle,
  a non-2-D, non-float32, negative or non-finite array).
  """
  try:
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
      raise ValueError("it holds a single array (.npy), not named arrays")
    with z:
      arrays = {k: z[k] for k in z.files}
  except FileNotFoundError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a Fisher .npz file (save_fisher): {e}") from None
  try:
    arrays = _checked(arrays, "the file")
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  if params is not None:
    for k, v in arrays.items():
      try:
        shape = tuple(np.shape(tree.get(params, k)))
      except (KeyError, TypeError, IndexError):
        raise ValueError(f"{path}: key {k!r} is not a param path of the model") from None
      if shape != v.shape:
        raise ValueError(f"{path}: {k!r} has shape {v.shape}; the model's kernel has shape {shape}")
  return arrays


def _checked(fisher: dict, what: str) -> dict[str, np.ndarray]:
  """``fisher`` as numpy arrays after checking: non-empty, str keys, 2-D float32, finite, >= 0."""
  if not isinstance(fisher, dict) or not fisher:
    raise ValueError(f"{what} must be a non-empty dict {{param path: (IC, OC) float32}}, got {type(fisher).__name__}"
                     f"{'' if fisher else ' (empty)'}")
  out = {}
  for k, v in fisher.items():
    if not isinstance(k, str) or not k:
      raise ValueError(f"{what}: keys must be param paths (str), got {k!r}")
    a = np.asarray(v)
    if a.ndim != 2 or a.dtype != np.float32:
      raise ValueError(f"{what}: {k!r} must be a 2-D (IC, OC) float32 array, got shape {a.shape} dtype {a.dtype}")
    if not np.isfinite(a).all() or (a < 0).any():
      raise ValueError(f"{what}: {k!r} must be finite and >= 0 (a sum of squares)")
    out[k] = a
  return out


# ----------------------------------------------------------------------------- summaries


def summarize(w, fisher, hessian=None, q=None) -> dict[str, float]:
  """Sensitivity summary of one kernel ``w`` (IC, OC) with its Fisher ``fisher`` (IC, OC).

  Keys: ``numel``; ``fisher_trace`` (sum F), ``fisher_mean`` (sum F / numel),
  ``fisher_max``; with ``q`` (a dequantized (IC, OC) kernel or a format with
  ``dequantize()``): ``fisher_error`` = sum F (W - Q)^2 (twice SqueezeLLM's
  second-order estimate of the summed loss increase) and ``weight_error`` =
  sum (W - Q)^2; with ``hessian`` H (IC, IC): ``hessian_trace`` = tr H, and with
  ``q`` too ``hessian_error`` = tr((W-Q)^T H (W-Q)) (GPTQ's proxy loss).
  """
  w = jnp.asarray(w, jnp.float32)
  if w.ndim != 2:
    raise ValueError(f"w must be an (IC, OC) kernel, got shape {w.shape}")
  f = jnp.asarray(fisher, jnp.float32)
  if f.shape != w.shape:
    raise ValueError(f"fisher has shape {f.shape}; expected w's shape {w.shape}")
  out = {"numel": int(w.size), "fisher_trace": float(jnp.sum(f)), "fisher_mean": float(jnp.mean(f)),
         "fisher_max": float(jnp.max(f))}
  d = None
  if q is not None:
    q = jnp.asarray(q.dequantize() if tree.is_kernel_leaf(q) else q, jnp.float32)
    if q.shape != w.shape:
      raise ValueError(f"q has shape {q.shape}; expected w's shape {w.shape}")
    d = w - q
    out["fisher_error"] = float(jnp.sum(f * d * d))
    out["weight_error"] = float(jnp.sum(d * d))
  if hessian is not None:
    h = jnp.asarray(hessian, jnp.float32)
    if h.shape != (w.shape[0],) * 2:
      raise ValueError(f"hessian has shape {h.shape}; expected (IC, IC) = {(w.shape[0],) * 2}")
    out["hessian_trace"] = float(jnp.trace(h))
    if d is not None:
      hd = jnp.matmul(h, d, precision=jax.lax.Precision.HIGHEST)
      out["hessian_error"] = float(jnp.sum(d * hd))
  return out


def _ranks(x: np.ndarray) -> np.ndarray:
  """0-based ranks of a 1-D array (ties broken by position)."""
  r = np.empty(x.size, np.float64)
  r[np.argsort(x, kind="stable")] = np.arange(x.size)
  return r


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a - a.mean(), b - b.mean()
  den = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
  return float(np.dot(a, b) / den) if den > 0 else float("nan")


def correlations(a, b) -> dict[str, float]:
  """Pearson and Spearman (rank; ties broken by position) correlations of two same-shape arrays, flattened."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  if a.shape != b.shape or a.size < 2:
    raise ValueError(f"need two arrays of the same size >= 2, got sizes {a.size} and {b.size}")
  return {"pearson": _pearson(a, b), "spearman": _pearson(_ranks(a), _ranks(b))}


def top_overlap(a, b, frac: float = 0.0005) -> float:
  """Share of the ``ceil(frac * size)`` largest entries of ``a`` that are also among the largest of ``b``."""
  if not 0 < frac <= 1:
    raise ValueError(f"frac must be in (0, 1], got {frac}")
  a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
  k = max(1, math.ceil(frac * a.size))
  ta, tb = np.argpartition(-a, k - 1)[:k], np.argpartition(-b, k - 1)[:k]
  return len(np.intersect1d(ta, tb)) / k


def compare(fa: dict, fb: dict, *, frac: float = 0.0005, kernels: Iterable[str] | None = None) -> dict:
  """How two Fisher estimates over the same paths agree (e.g. 16 vs 64 sequences).

  ``layers``: Pearson of log traces and Spearman of traces across kernels.
  ``entries``: per kernel (``kernels``, default all) Pearson/Spearman of the entries
  and the overlap of the top ``frac`` entries (SqueezeLLM keeps the top 0.05% of
  Fisher as sparse fp16 values); ``summary`` their mean / min.
  """
  if set(fa) != set(fb):
    raise ValueError(f"fa and fb must have the same paths; only in fa: {sorted(set(fa) - set(fb))[:3]}, "
                     f"only in fb: {sorted(set(fb) - set(fa))[:3]}")
  paths = [p for p in fa]
  ta = np.array([float(np.sum(fa[p], dtype=np.float64)) for p in paths])
  tb = np.array([float(np.sum(fb[p], dtype=np.float64)) for p in paths])
  tiny = np.finfo(np.float64).tiny
  layers = {"kernels": len(paths), "pearson_log_trace": _pearson(np.log(ta + tiny), np.log(tb + tiny)),
            "spearman_trace": correlations(ta, tb)["spearman"]}
  entries = {}
  for p in (paths if kernels is None else list(kernels)):
    a, b = np.asarray(fa[p]), np.asarray(fb[p])
    entries[p] = {**correlations(a, b), "top_overlap": top_overlap(a, b, frac)}
  summary = {f"{stat}_{agg}": float(fn([e[stat] for e in entries.values()]))
             for stat in ("pearson", "spearman", "top_overlap") for agg, fn in (("mean", np.mean), ("min", np.min))}
  return {"frac": frac, "layers": layers, "summary": summary, "entries": entries}

