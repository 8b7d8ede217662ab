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
from lqx.quant.gptq import GPTQConfig, can_share_solve, gptq_quantize, gptq_quantize_shared, proxy_loss
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


def relative_output_error(w: jax.Array, q: jax.Array, h: jax.Array, num: float | None = None) -> float:
  """tr(D^T H D) / tr(W^T H W) with D = W - Q: relative output error on the calibration inputs.

  ``num``: tr(D^T H D) when already known (GPTQ's info), to skip recomputing it.
  """
  den = float(proxy_loss(w, jnp.zeros_like(w), h))
  num = float(proxy_loss(w, q, h)) if num is None else num
  return num / max(den, float(jnp.finfo(jnp.float32).tiny))


@jax.jit
def relative_weight_error(w: jax.Array, q: jax.Array) -> jax.Array:
  w = w.astype(jnp.float32)
  return jnp.sum((w - q.astype(jnp.float32)) ** 2) / jnp.maximum(jnp.sum(w * w), jnp.finfo(jnp.float32).tiny)


# Jitted pieces; the config (and tap / judge names) are static, params are traced.
_embed = jax.jit(llama.embed, static_argnums=0)
_block_out = jax.jit(lambda c, p, x: llama.block(c, p, x)[0], static_argnums=0)


_judge_output = jax.jit(llama.judge_output, static_argnums=(0, 2))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _judge_sse(config, judge, p_cand, tap, ref):
  diff = llama.judge_output(config, p_cand, judge, tap).astype(jnp.float32) - ref.astype(jnp.float32)
  return jnp.sum(jnp.square(diff))


_hessian_update = jax.jit(hessian.update)
_advance = jax.jit(llama.advance, static_argnums=(0, 3))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _taps(config, p, x, names):
  """The block inputs ``names`` of the linears of block params ``p`` on block input ``x``."""
  rec = llama.block_taps(config, p, x)[1]
  return {n: rec[n] for n in names}


@jax.jit
def _hessian_updates(states: dict, taps: dict) -> dict:
  return {k: hessian.update(v, taps[k]) for k, v in states.items()}


def dense_in(config: llama.LlamaConfig, tap: str) -> int:
  """Features of the block input ``tap`` (the IC of the linears reading it)."""
  return {"attn_in": config.dim, "o_in": config.q_dim, "mlp_in": config.dim, "down_in": config.ffn_dim}[tap]


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


def _shared_solves(p, todo, targets, h) -> dict:
  """Path -> (QArray, info) for the GPTQ linears of one stage that can share a solve (same H, same config)."""
  groups: dict = {}
  for lin, path in todo:
    m = targets[path]
    if type(m) is GPTQConfig and can_share_solve(m):
      groups.setdefault(m, []).append((lin, path))
  out = {}
  for m, members in groups.items():
    if len(members) > 1:
      res = gptq_quantize_shared([_get(p, lin + "/kernel") for lin, _ in members], h, m,
                                 names=[path for _, path in members])
      out.update({path: r for (_, path), r in zip(members, res)})
  return out


def _quantize_one(config, p, lin: str, path: str, method, h, taps, judge,
                  solved=None) -> tuple[jax.Array, LayerReport]:
  """Quantizes block linear ``lin`` of dense block params ``p``; returns its QArray and report.

  ``solved``: its ``(QArray, info)`` when a shared solve already made it.
  """
  w = _get(p, lin + "/kernel")
  t0 = time.perf_counter()
  skipped, judged = [], {}
  if solved is not None:
    cands = [(method.group_axis, method)]
  elif isinstance(method, adadim.AdaDimConfig):
    cands, skipped = method.candidates(w.shape)
    if not cands:
      raise ValueError(f"{path}: no group axis fits {tuple(w.shape)}: {'; '.join(skipped)}")
  else:
    cands = [(getattr(method, "group_axis", "oc"), method)]
  results = []
  for axis, cfg in cands:
    q, info = solved if solved is not None else quantize_kernel(w, h, cfg, path)
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
    err, kind = relative_output_error(w, deq, h, info.get("proxy_loss")), "output"
  else:
    err, kind = float(relative_weight_error(w, deq)), "weight"
  rep = LayerReport(name=path, method=method_name(method), bits=cfg.bits, group_size=cfg.group_size,
                    group_axis=axis, bits_per_weight=q.bits_per_weight, error=err, error_kind=kind,
                    seconds=info.get("seconds", 0.0) if solved is not None else time.perf_counter() - t0,
                    numel=int(w.size), candidates=judged, skipped=skipped,
                    damp=info.get("damp"))
  return q, rep


def _subset(state: dict, step: str) -> dict:
  return {k: state[k] for k in llama.STEP_INPUTS[step]}


def _timed(timings: dict, key: str, fn):
  """``fn()`` with its result ready, its wall time added to ``timings[key]``."""
  t = time.perf_counter()
  out = jax.block_until_ready(fn())
  timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
  return out


def quantize_sequential(config: llama.LlamaConfig, params: dict, targets: dict, tokens: np.ndarray, *,
                        batch_size: int = 8, true_sequential: bool = False,
                        progress: bool = True) -> tuple[dict, list[LayerReport], dict]:
  """Quantizes the block linears in ``targets`` (param path -> method config) block by block.

  ``tokens``: (N, T) calibration sequences. Inputs of block i come from blocks
  0..i-1 already quantized. ``true_sequential=True`` (GPTQ's ``--true-sequential``):
  each stage's input is taken with the block's earlier stages already quantized;
  ``False`` (the reference ``llama.py``'s default): the Hessians of all seven
  linears come from one forward of the unquantized block. Returns new params (the
  input is not mutated), one ``LayerReport`` per quantized kernel in quantization
  order, and wall-time seconds by phase (``embed``, ``forward``, ``hessian``,
  ``solve``; compilation is inside the phase that triggered it).
  """
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 2 or tokens.shape[0] == 0:
    raise ValueError(f"calibration tokens must be (n_samples, seq_len), got shape {tokens.shape}")
  timings: dict = {}
  batches = [jnp.asarray(tokens[i: i + batch_size]) for i in range(0, len(tokens), batch_size)]
  xs = _timed(timings, "embed", lambda: [_embed(config, params, b) for b in batches])
  params = dict(params)
  reports = []
  for name in tqdm(llama.layer_names(config), desc="quantize blocks", disable=not progress, unit="block"):
    # Forward passes see dequantized kernels: one compiled shape serves every block
    # whatever mix of QArray layouts it holds (same values as running on the QArrays).
    p, dense = params[name], materialize(params[name])
    stages = [(stage, [(lin, f"{name}/{lin}/kernel") for lin in stage.linears if f"{name}/{lin}/kernel" in targets])
              for stage in llama.STAGES]
    if not any(todo for _, todo in stages):
      xs = _timed(timings, "forward", lambda: [_block_out(config, dense, x) for x in xs])
      continue
    judged = any(isinstance(targets[path], adadim.AdaDimConfig) for _, todo in stages for _, path in todo)
    if not true_sequential:  # every tap from one forward of the float block
      needed = tuple(stage.tap for stage, todo in stages if todo)
      hs = {tap: hessian.init(dense_in(config, tap)) for tap in needed}
      kept = {tap: [] for tap in needed}
      for x in xs:
        rec = _timed(timings, "forward", lambda: _taps(config, dense, x, needed))
        hs = _timed(timings, "hessian", lambda: _hessian_updates(hs, rec))
        if judged:
          for tap in needed:
            kept[tap].append(rec[tap])
    states = [{"x": x} for x in xs]
    for stage, todo in stages:
      if true_sequential:  # advance to this stage's input with the earlier stages quantized
        for st in states:
          st.update(_timed(timings, "forward", lambda: _advance(config, dense, _subset(st, stage.tap), stage.tap)))
        if not todo:
          continue
        state = hessian.init(states[0][stage.tap].shape[-1])
        for st in states:
          state = _timed(timings, "hessian", lambda: _hessian_update(state, st[stage.tap]))
        h, taps = hessian.finalize(state), [st[stage.tap] for st in states]
      elif not todo:
        continue
      else:
        h, taps = hessian.finalize(hs[stage.tap]), kept[stage.tap]
      t = time.perf_counter()
      solved = _shared_solves(dense, todo, targets, h)
      timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
      for lin, path in todo:
        t = time.perf_counter()
        q, rep = _quantize_one(config, dense, lin, path, targets[path], h, taps, stage.judge, solved.get(path))
        timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
        p, dense = _set(p, lin + "/kernel", q), _set(dense, lin + "/kernel", q.dequantize())
        reports.append(rep)
      del taps, h
      if true_sequential:  # drop what no later step reads
        later = [s.tap for s in llama.STAGES[llama.STAGES.index(stage) + 1:]] + ["out"]
        keep = set().union(*(llama.STEP_INPUTS[k] for k in later))
        states = [{k: v for k, v in st.items() if k in keep} for st in states]
    params[name] = p
    if true_sequential:
      xs = _timed(timings, "forward", lambda: [_advance(config, dense, _subset(st, "out"), "out")["out"]
                                               for st in states])
    else:
      xs = _timed(timings, "forward", lambda: [_block_out(config, dense, x) for x in xs])
    del states
  return params, reports, timings
