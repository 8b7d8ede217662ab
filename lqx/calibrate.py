"""Block-sequential calibration: quantize a LLaMA-family model block by block.

As reference GPTQ (``llama_sequential``): the calibration sequences are embedded,
then for each block i the inputs come from blocks 0..i-1 *already quantized*.
Inside a block, linears are quantized stage by stage in execution order
(``llama.STAGES``, GPTQ's ``--true-sequential``): a stage's shared input (its
tap) is recomputed with the earlier stages already quantized, its Hessian
``H = 2/N X^T X`` is accumulated batch by batch in float32, then each linear of
the stage is quantized. The tap of the current stage is kept for AdaDim's output
comparisons: memory is bounded by ``N * T * max(D, F)`` floats, the same order
as the block inputs that every sequential method keeps.

Defaults are CPU-sized (see ``experiments/quantize.py``): the GPTQ paper uses
128 sequences x 2048 tokens; lqx defaults to 32 x 512 (16k tokens).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lqx import nn
from lqx.models import llama
from lqx.quant import adadim, hessian
from lqx.quant.gptq import GPTQConfig, gptq_quantize, proxy_loss
from lqx.quant.rtn import RTNConfig, rtn_quantize


@dataclasses.dataclass
class LayerReport:
  """What happened to one quantized kernel."""

  name: str  # param path, e.g. "layers_3/attn/q_proj/kernel"
  method: str  # "rtn" | "gptq" | "adadim-rtn" | "adadim-gptq"
  bits: int
  group_size: int
  group_axis: str  # the axis used (AdaDim: the one chosen)
  bits_per_weight: float
  error: float  # relative output error ||X(W-Q)||^2 / ||XW||^2 on calibration inputs, or weight error
  error_kind: str  # "output" (calibration data) | "weight" (||W-Q||^2 / ||W||^2, no data)
  seconds: float
  numel: int  # weights in the kernel
  candidates: dict = dataclasses.field(default_factory=dict)  # AdaDim: axis -> judged output MSE
  skipped: list = dataclasses.field(default_factory=list)  # AdaDim: axes that did not fit, and why
  damp: float | None = None  # GPTQ: relative damping used


def method_name(cfg) -> str:
  if isinstance(cfg, adadim.AdaDimConfig):
    return "adadim-" + method_name(cfg.base)
  return {RTNConfig: "rtn", GPTQConfig: "gptq"}[type(cfg)]


def quantize_kernel(w: jax.Array, h: jax.Array | None, cfg: RTNConfig | GPTQConfig, name: str):
  """``(QArray, info)`` of one kernel with RTN or GPTQ; errors name the param path."""
  if isinstance(cfg, GPTQConfig):
    if h is None:
      raise ValueError(f"{name}: GPTQ needs calibration data (a Hessian); pass calibration tokens")
    return gptq_quantize(w, h, cfg, name=name)
  try:
    return rtn_quantize(w, cfg), {}
  except ValueError as e:
    raise ValueError(f"{name}: {e}") from e


def relative_output_error(w: jax.Array, q: jax.Array, h: jax.Array) -> float:
  """tr(D^T H D) / tr(W^T H W) with D = W - Q: relative output error on the calibration inputs."""
  den = float(proxy_loss(w, jnp.zeros_like(w), h))
  return float(proxy_loss(w, q, h)) / max(den, float(jnp.finfo(jnp.float32).tiny))


@jax.jit
def relative_weight_error(w: jax.Array, q: jax.Array) -> jax.Array:
  w = w.astype(jnp.float32)
  return jnp.sum((w - q.astype(jnp.float32)) ** 2) / jnp.maximum(jnp.sum(w * w), jnp.finfo(jnp.float32).tiny)


# Jitted pieces; the config (and tap / judge names) are static, params are traced.
_embed = jax.jit(llama.embed, static_argnums=0)
_block_out = jax.jit(lambda c, p, x: llama.block(c, p, x)[0], static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _tap(config, p, x, tap):
  return llama.block_taps(config, p, x)[1][tap]


_judge_output = jax.jit(llama.judge_output, static_argnums=(0, 2))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _judge_sse(config, judge, p_cand, tap, ref):
  diff = llama.judge_output(config, p_cand, judge, tap).astype(jnp.float32) - ref.astype(jnp.float32)
  return jnp.sum(jnp.square(diff))


_hessian_update = jax.jit(hessian.update)


def materialize(tree):
  """``tree`` with every QArray replaced by its dequantized float kernel."""
  return jax.tree.map(nn.materialize, tree, is_leaf=lambda x: hasattr(x, "dequantize"))


def _get(tree: dict, path: str):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _set(tree: dict, path: str, value) -> dict:
  """A copy of nested dict ``tree`` with ``path`` replaced (the input is not mutated)."""
  head, _, rest = path.partition("/")
  return {**tree, head: value if not rest else _set(tree[head], rest, value)}


def _quantize_one(config, p, lin: str, path: str, method, h, taps, judge) -> tuple[jax.Array, LayerReport]:
  """Quantizes block linear ``lin`` of dense block params ``p``; returns its QArray and report."""
  w = _get(p, lin + "/kernel")
  t0 = time.perf_counter()
  skipped, judged = [], {}
  if isinstance(method, adadim.AdaDimConfig):
    cands, skipped = method.candidates(w.shape)
    if not cands:
      raise ValueError(f"{path}: no group axis fits {tuple(w.shape)}: {'; '.join(skipped)}")
  else:
    cands = [(getattr(method, "group_axis", "oc"), method)]
  results = []
  for axis, cfg in cands:
    q, info = quantize_kernel(w, h, cfg, path)
    results.append((axis, cfg, q, info))
  choice = 0
  if len(results) > 1:
    sel = method.selection_config(cands[0][1]) if isinstance(method, adadim.AdaDimConfig) else None
    probes = {axis: _set(p, lin + "/kernel", (q if sel is None else rtn_quantize(
        w, dataclasses.replace(sel, group_axis=axis))).dequantize()) for axis, cfg, q, _ in results}
    sse = {axis: 0.0 for axis in probes}
    n = 0
    for t in taps:  # the reference output once per batch, then each candidate against it
      ref = _judge_output(config, p, judge, t)
      n += ref.size
      for axis, probe in probes.items():
        sse[axis] += float(_judge_sse(config, judge, probe, t, ref))
    judged = {axis: v / n for axis, v in sse.items()}
    choice = min(range(len(results)), key=lambda i: judged[results[i][0]])
  axis, cfg, q, info = results[choice]
  deq = q.dequantize()
  if h is not None:
    err, kind = float(relative_output_error(w, deq, h)), "output"
  else:
    err, kind = float(relative_weight_error(w, deq)), "weight"
  rep = LayerReport(name=path, method=method_name(method), bits=cfg.bits, group_size=cfg.group_size,
                    group_axis=axis, bits_per_weight=q.bits_per_weight, error=err, error_kind=kind,
                    seconds=time.perf_counter() - t0, numel=int(w.size), candidates=judged, skipped=skipped,
                    damp=info.get("damp"))
  return q, rep


def quantize_sequential(config: llama.LlamaConfig, params: dict, targets: dict, tokens: np.ndarray, *,
                        batch_size: int = 8, progress: bool = True) -> tuple[dict, list[LayerReport]]:
  """Quantizes the block linears in ``targets`` (param path -> method config) block by block.

  ``tokens``: (N, T) calibration sequences. Returns new params (the input is not
  mutated) and one ``LayerReport`` per quantized kernel, in quantization order.
  """
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 2 or tokens.shape[0] == 0:
    raise ValueError(f"calibration tokens must be (n_samples, seq_len), got shape {tokens.shape}")
  batches = [jnp.asarray(tokens[i: i + batch_size]) for i in range(0, len(tokens), batch_size)]
  inps = [_embed(config, params, b) for b in batches]
  params = dict(params)
  reports = []
  names = llama.layer_names(config)
  for name in tqdm(names, desc="quantize blocks", disable=not progress, unit="block"):
    # Forward passes see dequantized kernels: one compiled shape serves every block
    # whatever mix of QArray layouts it holds (same values as running on the QArrays).
    p, dense = params[name], materialize(params[name])
    for stage in llama.STAGES:
      todo = [(lin, f"{name}/{lin}/kernel") for lin in stage.linears if f"{name}/{lin}/kernel" in targets]
      if not todo:
        continue
      taps = [_tap(config, dense, x, stage.tap) for x in inps]
      state = hessian.init(taps[0].shape[-1])
      for t in taps:
        state = _hessian_update(state, t)
      h = hessian.finalize(state)
      for lin, path in todo:
        q, rep = _quantize_one(config, dense, lin, path, targets[path], h, taps, stage.judge)
        p, dense = _set(p, lin + "/kernel", q), _set(dense, lin + "/kernel", q.dequantize())
        reports.append(rep)
      del taps
    params[name] = p
    inps = [_block_out(config, dense, x) for x in inps]
  return params, reports
