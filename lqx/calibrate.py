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
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lqx import data, nn, tree
from lqx.models import llama
from lqx.quant import hessian
from lqx.quant.gptq import proxy_loss


@dataclasses.dataclass
class LayerReport:
  """What happened to one quantized kernel."""

  name: str  # param path, e.g. "layers_3/attn/q_proj/kernel"
  method: str  # the method's name: "rtn", "gptq", "adadim-gptq", ...
  bits: int
  group_size: int | None  # the kernel's format settings, where it has them (affine)
  group_axis: str | None  # the axis used (AdaDim: the one chosen)
  bits_per_weight: float
  error: float  # relative output error ||X(W-Q)||^2 / ||XW||^2 on calibration inputs, or weight error
  error_kind: str  # "output" (calibration data) | "weight" (||W-Q||^2 / ||W||^2, no data)
  seconds: float
  numel: int  # weights in the kernel
  candidates: dict = dataclasses.field(default_factory=dict)  # AdaDim: axis -> judged output MSE
  skipped: list = dataclasses.field(default_factory=list)  # AdaDim: axes that did not fit, and why
  damp: float | None = None  # GPTQ: relative damping used
  fisher_error: float | None = None  # SqueezeLLM: sum F (W - Q)^2 over the dense entries


def report(path: str, method, w: jax.Array, q, info: dict, h: jax.Array | None, seconds: float) -> LayerReport:
  """The ``LayerReport`` of kernel ``w`` (IC, OC) quantized to ``q`` by ``method``."""
  deq = q.dequantize()
  if h is not None:
    err, kind = relative_output_error(w, deq, h, info.get("proxy_loss")), "output"
  else:
    err, kind = float(relative_weight_error(w, deq)), "weight"
  inner = q
  while hasattr(inner, "base"):  # wrapper formats (sparse, low-rank) around the one holding the codes
    inner = inner.base
  return LayerReport(name=path, method=method.name, bits=method.bits, group_size=getattr(inner, "group_size", None),
                     group_axis=info.get("group_axis", getattr(inner, "group_axis", None)),
                     bits_per_weight=q.bits_per_weight, error=err, error_kind=kind, seconds=seconds,
                     numel=int(w.size), candidates=info.get("candidates", {}), skipped=info.get("skipped", []),
                     damp=info.get("damp"), fisher_error=info.get("fisher_error"))


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


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _judge_sses(config, judge, lin, p, kernels, tap):
  """(len(kernels),) mean squared differences over ``tap`` of the ``judge`` output between
  block params ``p`` and ``p`` with ``lin``'s kernel replaced by each of ``kernels``.

  One computation: XLA shares what the candidates have in common with the
  reference (e.g. k/v when judging q candidates, up(x) when judging gate).
  """
  ref = llama.judge_output(config, p, judge, tap).astype(jnp.float32)
  mses = [jnp.mean(jnp.square(llama.judge_output(config, tree.replace(p, lin + "/kernel", k), judge, tap)
                              .astype(jnp.float32) - ref)) for k in kernels]
  return jnp.stack(mses)


def own_output(judge: str) -> bool:
  """Whether ``judge`` names a linear's own output (its error then follows from H, no forward)."""
  return "/" in judge


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


def materialize(params):
  """``params`` with every quantized kernel replaced by its dequantized float array."""
  return jax.tree.map(nn.materialize, params, is_leaf=tree.is_kernel_leaf)




def _shared_solves(p, todo, targets, stats) -> dict:
  """``{path: {config: (kernel, info)}}`` for the solves of one stage that kernels reading
  the same input can share (methods' optional ``shared``): q/k/v, gate/up."""
  groups: dict = {}
  for lin, path in todo:
    w = tree.get(p, lin + "/kernel")
    for cfg in getattr(targets[path], "shared", lambda shape: [])(w.shape):
      groups.setdefault(cfg, []).append((w, path))
  out: dict = {}
  for cfg, members in groups.items():
    if len(members) > 1:
      res = cfg.quantize_shared([w for w, _ in members], stats, [path for _, path in members])
      for (_, path), r in zip(members, res):
        out.setdefault(path, {})[cfg] = r
  return out


def _quantize_one(config, p, lin: str, path: str, method, h, taps, judge, solved: dict | None = None,
                  extra: dict | None = None):
  """``(kernel, LayerReport)`` of block linear ``lin`` of dense block params ``p``.

  ``solved``: config -> ``(kernel, info)`` made by a shared solve. Methods that
  choose between candidates get a judge over ``taps`` (``_judge``). ``extra``: more
  statistics of this kernel (e.g. ``{"fisher": F}``).
  """
  w = tree.get(p, lin + "/kernel")
  t0 = time.perf_counter()
  q, info = method.quantize(w, {"hessian": h, **(extra or {})}, name=path, solved=solved,
                            judge=lambda probes: _judge(config, p, lin, judge, w, h, taps, probes))
  shared = bool(solved) and not info.get("candidates")
  return q, report(path, method, w, q, info, h, info.get("seconds", 0.0) if shared else time.perf_counter() - t0)


def _judge(config, p, lin: str, judge: str, w, h, taps, probes: dict) -> dict:
  """Axis -> mean squared error of ``judge``'s output with ``lin``'s kernel replaced by each probe.

  On a linear's own output this is ``tr(D^T H D) / (2 OC)`` with ``D = w - probe``,
  exactly (``lqx.quant.hessian``), so no forward runs.
  """
  if own_output(judge):
    return _own_output_mse(w, h, probes)
  rows = np.array([t.shape[0] for t in taps], np.float64)  # batches are (B, T, D), equal T
  mse = sum(r * np.asarray(_judge_sses(config, judge, lin, p, tuple(probes.values()), t), np.float64)
            for r, t in zip(rows, taps)) / rows.sum()
  return {axis: float(v) for axis, v in zip(probes, mse)}


def _own_output_mse(w, h, probes: dict) -> dict:
  """Label -> mean squared error of the linear's own output, ``tr(D^T H D) / (2 OC)`` with ``D = w - probe``."""
  return {label: float(proxy_loss(w, k, h)) / (2 * w.shape[1]) for label, k in probes.items()}


def _subset(state: dict, step: str) -> dict:
  return {k: state[k] for k in llama.STEP_INPUTS[step]}


def _timed(timings: dict, key: str, fn):
  """``fn()`` with its result ready, its wall time added to ``timings[key]``."""
  t = time.perf_counter()
  out = jax.block_until_ready(fn())
  timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
  return out


def quantize_sequential(config: llama.LlamaConfig, params: dict, targets: dict, tokens: np.ndarray, *,
                        batch_size: int = 8, true_sequential: bool = False, stats: dict | None = None,
                        progress: bool = True) -> tuple[dict, list[LayerReport], dict]:
  """Quantizes the block linears in ``targets`` (param path -> method config) block by block.

  ``tokens``: (N, T) calibration sequences. Inputs of block i come from blocks
  0..i-1 already quantized. ``true_sequential=True`` (GPTQ's ``--true-sequential``):
  each stage's input is taken with the block's earlier stages already quantized;
  ``False`` (the reference ``llama.py``'s default): the Hessians of all seven
  linears come from one forward of the unquantized block. Returns new params (the
  input is not mutated), one ``LayerReport`` per quantized kernel in quantization
  order, and wall-time seconds by phase (``embed``, ``forward``, ``hessian``,
  ``solve``; compilation is inside the phase that triggered it). ``stats``: path ->
  statistics taken before calibration (e.g. ``{"fisher": F}``), passed to the methods
  beside the Hessian. Raises ``ValueError``
  unless ``tokens`` holds ids in ``[0, vocab_size)``, N >= 1 and 2 <= T <= ``config.max_seq_len``.
  """
  tokens = llama.check_tokens(config, tokens, name="tokens", min_len=2)
  batch_size = data.check_count(batch_size, "batch_size")
  timings: dict = {}
  batches = [jnp.asarray(tokens[i: i + batch_size]) for i in range(0, len(tokens), batch_size)]
  xs = _timed(timings, "embed", lambda: [_embed(config, params, b) for b in batches])
  params = dict(params)
  reports = []
  names = llama.layer_names(config)
  names = names[:1 + max((i for i, n in enumerate(names) if any(t.startswith(n + "/") for t in targets)), default=-1)]
  for name in tqdm(names, desc="quantize blocks", disable=not progress, unit="block"):
    # Forward passes see dequantized kernels: one compiled shape serves every block
    # whatever mix of QArray layouts it holds (same values as running on the QArrays).
    p, dense = params[name], materialize(params[name])
    stages = [(stage, [(lin, f"{name}/{lin}/kernel") for lin in stage.linears if f"{name}/{lin}/kernel" in targets])
              for stage in llama.STAGES]
    if not any(todo for _, todo in stages):
      xs = _timed(timings, "forward", lambda: [_block_out(config, dense, x) for x in xs])
      continue
    judged = {stage.tap for stage, todo in stages if not own_output(stage.judge)
              and any(getattr(targets[path], "judges", False) for _, path in todo)}
    if not true_sequential:  # every tap from one forward of the float block
      needed = tuple(stage.tap for stage, todo in stages if todo)
      hs = {tap: hessian.init(dense_in(config, tap)) for tap in needed}
      kept = {tap: [] for tap in needed}
      for x in xs:
        rec = _timed(timings, "forward", lambda: _taps(config, dense, x, needed))
        hs = _timed(timings, "hessian", lambda: _hessian_updates(hs, rec))
        for tap in judged:
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
      solved = _shared_solves(dense, todo, targets, {"hessian": h})
      timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
      for lin, path in todo:
        t = time.perf_counter()
        q, rep = _quantize_one(config, dense, lin, path, targets[path], h, taps, stage.judge, solved.get(path),
                               (stats or {}).get(path))
        timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
        p, dense = tree.replace(p, lin + "/kernel", q), tree.replace(dense, lin + "/kernel", q.dequantize())
        reports.append(rep)
      del taps, h
      if true_sequential:  # drop what no later step reads
        later = [s.tap for s in llama.STAGES[llama.STAGES.index(stage) + 1:]] + ["out"]
        keep = set().union(*(llama.STEP_INPUTS[k] for k in later))
        states = [{k: v for k, v in st.items() if k in keep} for st in states]
    params[name] = p
    if name != names[-1]:  # blocks after the last calibrated one are not run
      xs = _timed(timings, "forward", lambda: (
          [_advance(config, dense, _subset(st, "out"), "out")["out"] for st in states] if true_sequential
          else [_block_out(config, dense, x) for x in xs]))
    del states
  return params, reports, timings


# ----------------------------------------------------------------------------- any model


@dataclasses.dataclass(frozen=True)
class Units:
  """A model as sequential units, for calibration (the LLaMA decoder, or a user's Flax model).

  ``names``: param-path prefixes of the units in execution order; a unit's params are
  the subtree at its name (``""``: the whole tree). ``run(name, unit_params, x) ->
  (y, inputs)`` runs one unit on ``x`` and returns its output (the next unit's input)
  and, for each linear it ran, ``{kernel path inside the unit: (..., IC) input}`` in
  execution order (e.g. ``{"fc1/kernel": x, ...}``); it must be jittable, and sees float
  kernels only. ``first(params, batch)`` gives unit 0's input (default: the batch).
  Adapters: ``lqx.models.llama.units``, ``lqx.adapters.nnx_units`` / ``linen_units``.
  """

  names: tuple[str, ...]
  run: Callable
  first: Callable | None = None


def _join(*parts: str) -> str:
  return "/".join(p for p in parts if p)


def _subtree(params, name: str):
  return tree.get(params, name) if name else params


def _put(params, name: str, value):
  return tree.replace(params, name, value) if name else value


def _hessians(run, p, xs, paths) -> dict:
  """Path -> H of each kernel path inside a unit, over the batches ``xs`` (one accumulation
  per path, even where two linears read the same input)."""
  states: dict = {}
  for x in xs:
    _, inputs = run(p, x)
    for path in paths:
      if path not in inputs:
        raise ValueError(f"{path}: the unit's run did not report this linear's input "
                         f"(it reported {sorted(inputs)})")
      state = states[path] if path in states else hessian.init(inputs[path].shape[-1])
      states[path] = _hessian_update(state, inputs[path])
  return {k: hessian.finalize(v) for k, v in states.items()}


def _call_order(units: Units, name: str, p, x) -> list[str]:
  """The kernel paths unit ``name`` reports, in call order (jit would sort the dict's keys)."""
  order: list = []

  def f(p, x):
    y, inputs = units.run(name, p, x)
    order.extend(inputs)
    return y

  jax.eval_shape(f, p, x)
  return order


def _check_batches(batches, name: str = "batches") -> list:
  """``batches`` as a list; ``ValueError`` if it is empty or a batch has no rows (model inputs, any dtype)."""
  batches = list(batches)
  if not batches:
    raise ValueError(f"{name} is empty: calibration needs at least one batch of model inputs")
  for i, b in enumerate(batches):
    leaves = jax.tree.leaves(b)
    if not leaves or any(np.size(x) == 0 for x in leaves):
      shapes = [tuple(np.shape(x)) for x in leaves]
      raise ValueError(f"{name}[{i}] is empty (shapes {shapes}): every batch needs at least one non-empty row")
  return batches


def capture(units: Units, params, batches, paths=None) -> dict:
  """``{kernel path: {"hessian": H}}`` on the float model, nothing quantized.

  ``batches``: iterable of model inputs; ``paths``: kernel paths to capture (default:
  every linear the units report). Unit i is fed by the float units 0..i-1.
  """
  batches = _check_batches(batches)
  xs = [b if units.first is None else units.first(params, b) for b in batches]
  out = {}
  for name in units.names:
    run = jax.jit(functools.partial(units.run, name))
    p = materialize(_subtree(params, name))
    reported = _call_order(units, name, p, xs[0])
    want = [k for k in reported if paths is None or _join(name, k) in paths]
    out.update({_join(name, k): {"hessian": h} for k, h in _hessians(run, p, xs, want).items()})
    xs = [run(p, x)[0] for x in xs]
  return out


def quantize_units(units: Units, params, targets: dict, batches, *, true_sequential: bool = True,
                   stats: dict | None = None, progress: bool = True) -> tuple[dict, list[LayerReport]]:
  """Quantizes the kernels in ``targets`` (path -> method) unit by unit, as GPTQ does.

  Unit i's inputs come from units 0..i-1 already quantized. Inside a unit, with
  ``true_sequential`` each linear's Hessian is taken with the linears before it
  quantized (the unit is rerun once per linear); otherwise all come from one
  forward of the float unit. Methods that choose between candidates are judged on
  the linear's own output (exact from H). ``stats``: path -> statistics taken before
  calibration (e.g. ``{"fisher": F}``), passed beside the Hessian. Returns ``(qparams, reports)``.
  """
  batches = _check_batches(batches)
  xs = [b if units.first is None else units.first(params, b) for b in batches]
  done = set()
  reports = []
  for name in tqdm(units.names, desc="quantize units", disable=not progress, unit="unit"):
    run = jax.jit(functools.partial(units.run, name))
    p = _subtree(params, name)
    dense = materialize(p)
    order = _call_order(units, name, dense, xs[0])
    todo = [k for k in order if _join(name, k) in targets]
    prefix = name + "/" if name else ""
    reported = {prefix + k for k in order}
    unreported = [t for t in targets if t.startswith(prefix) and t not in reported
                  and not any(t.startswith(n + "/") for n in units.names if n != name)]
    if unreported:
      raise ValueError(f"{unreported[0]}: matched by the recipe, but unit {name!r} did not report this linear's "
                       f"input (it reported {order})")
    hs = {} if true_sequential else _hessians(run, dense, xs, todo)
    for k in todo:
      path, method = _join(name, k), targets[_join(name, k)]
      h = _hessians(run, dense, xs, [k])[k] if true_sequential else hs[k]
      w = tree.get(dense, k)
      t0 = time.perf_counter()
      q, info = method.quantize(w, {"hessian": h, **(stats or {}).get(path, {})}, name=path,
                                judge=lambda probes: _own_output_mse(w, h, probes))
      reports.append(report(path, method, w, q, info, h, time.perf_counter() - t0))
      p, dense = tree.replace(p, k, q), tree.replace(dense, k, q.dequantize())
      done.add(path)
    params = _put(params, name, p)
    xs = [run(dense, x)[0] for x in xs]
  missing = sorted(set(targets) - done)
  if missing:
    raise ValueError(f"{missing[0]}: matched by the recipe but in no unit (units {list(units.names)})")
  return params, reports
