"""Mixed-precision allocation as a multiple-choice knapsack (after ROCKET, arXiv 2602.11008).

Each target kernel ("layer") has a few *options* (a method config, e.g. GPTQ 3-bit g128,
GPTQ 4-bit g64, GPTQ 3-bit + whitened LoRC r8), each with an exact storage cost in bits
(the format's own ``stored_bits``: codes, scales, zeros, tables, sparse entries, factors)
and a measured error. ``solve`` picks one option per layer minimizing the summed error
subject to the summed cost <= a bit budget, exactly, by dynamic programming over the cost
axis. Three layers::

  solve(layers, budget_bits)                     pure, model-free: {layer: [Option, ...]} -> {layer: Option}
  options_for_layer(w, stats, candidates)        one kernel, one statistics capture -> [Option, ...]
  allocate(config, params, tokens, candidates,   capture Hessians once on the float model, build every
           budget_bpw=...)                       layer's options, solve -> (recipe, plan) for lqx.quantize

**The DP.** Costs are exact integers. The cheapest option of every layer is taken as the
base; the DP runs over the *extra* cost above it, divided by the GCD of all extra costs
(so the table is exact, not rounded, whatever the scale of the bits). The table is
``n_layers x (capacity + 1)`` float64 cells, ``capacity = min(floor((budget - base) / gcd),
sum of the largest extras / gcd)``. Above ``MAX_CELLS`` cells (or ``resolution`` cells on
the cost axis when given), costs are discretized: the extra cost of each option is rounded
UP to a whole number of buckets of ``ceil(capacity_bits / resolution)`` bits, so a plan
that fits in buckets fits in exact bits. The answer may then be suboptimal, but its error is
at most the exact optimum's for a budget ``n_layers`` buckets smaller (every plan of that
smaller budget still fits once rounded up), and a ``UserWarning`` says so. For SmolLM2-135M's
210 linears (106M weights) with options spanning 2.5 bits per weight, that is ~5.6 kbit
buckets, so within 1.2 Mbit (~0.01 bit per weight) of a 3-bit budget (arithmetic, not run).

**Ties** are broken deterministically: among plans of least total error (float64, summed
from the last layer to the first), the least total cost; then, reading layers in the
order of the ``layers`` dict, the earliest option in each layer's list. ``solve_greedy``:
see its docstring.

**Errors** (``allocate``). With ``error="hessian"`` (default) a layer's raw error is the
output proxy ``tr(D^T H D)`` with ``D = deq(kernel) - w`` and ``H = 2/N X^T X``
(``lqx.quant.hessian``). Raw values of different layers are on different scales (they
scale with each layer's input activations and weights: ``down_proj`` reads other inputs than
``q_proj``, and the residual stream grows with depth), so summing them would let the
loudest layers dominate. We sum instead ``numel * tr(D^T H D) /
tr(W^T H W)``: each layer's *relative* output error (the ``error`` of its ``LayerReport``),
weighted by its number of weights. The objective is then ``n_weights`` times the
size-weighted mean relative output error, the same average the uniform baselines report,
and a layer's share of the objective is its share of the model's weights. This is a
proxy: it assumes layers matter in proportion to their size and that errors add. With
``error="fisher"`` the raw error ``sum F * D^2`` (diagonal Fisher, ``lqx.quant.fisher``)
is already (twice) a second-order estimate of the increase of the model's loss, the same
quantity for every layer, so it is summed unnormalized.

**Deviations from ROCKET.** ROCKET allocates a *parameter* budget between compression
levels of its own sparse dictionary factorization in a whitened activation space, with a
calibration reconstruction error per layer and level. Here the options are any lqx
quantization methods (bit widths, group sizes, LoRC ranks; low-rank factors only as LoRC
compensation, no whitening transform of the kernel itself), the budget is exact *stored
bits* from the formats' accounting, and the errors are per-layer proxies (relative output
error on captured Hessians, or Fisher-weighted), not end-to-end loss. The Hessians are
captured once on the *float* model (``calibrate.capture``: every layer sees float inputs),
while ``lqx.quantize`` then calibrates block-sequentially on the quantized prefix: the
planned errors are those of each layer alone, and the realized ones differ (the costs do
not, see ``allocate``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import warnings
from fractions import Fraction
from typing import Any

import jax.numpy as jnp
import numpy as np

MAX_CELLS = 10_000_000  # DP table cells (float64) above which costs are discretized
ERRORS = ("hessian", "fisher")


@dataclasses.dataclass(frozen=True)
class Option:
  """One way to store one layer: its exact cost in bits and its error (lower is better)."""

  label: str
  cost_bits: int  # exact stored bits of the layer under this option (formats' stored_bits)
  error: float  # a measured loss proxy
  payload: Any = None  # e.g. the method config


def budget_from_bpw(bpw: float, n_weights: int) -> int:
  """The budget in bits for ``bpw`` bits per weight over ``n_weights``: ``floor(bpw * n_weights)``.

  The product is taken exactly, then snapped to the nearest integer when within ``1e-9``
  relative of it (float noise: ``3.3 * 10`` is 32.99999..., and a ``bpw`` computed as
  ``bits / n_weights`` must give ``bits`` back), and floored otherwise.
  """
  if isinstance(n_weights, bool) or not isinstance(n_weights, (int, np.integer)) or n_weights < 1:
    raise ValueError(f"n_weights must be a positive int, got {n_weights!r}")
  if isinstance(bpw, bool) or not isinstance(bpw, (int, float, np.integer, np.floating)) \
     or not math.isfinite(bpw) or bpw <= 0:
    raise ValueError(f"bpw must be a positive finite number of bits per weight, got {bpw!r}")
  x = Fraction(float(bpw)) * int(n_weights)
  near = round(x)
  return int(near) if abs(x - near) <= Fraction(1, 10**9) * x else math.floor(x)


def _check(layers: dict, budget_bits) -> tuple[list[str], list[list[Option]]]:
  """Validated ``(names, option lists)``; ``ValueError`` naming the layer otherwise."""
  if not isinstance(layers, dict) or not layers:
    raise ValueError(f"layers must be a non-empty dict {{layer: [Option, ...]}}, got {layers!r}")
  if isinstance(budget_bits, bool) or not isinstance(budget_bits, (int, np.integer)):
    raise ValueError(f"budget_bits must be an int (exact bits), got {budget_bits!r}")
  names, opts = list(layers), []
  for name in names:
    options = list(layers[name])
    if not options:
      raise ValueError(f"layer {name!r} has no options")
    for o in options:
      if not isinstance(o, Option):
        raise ValueError(f"layer {name!r}: options must be Option, got {type(o).__name__}")
      if isinstance(o.cost_bits, bool) or not isinstance(o.cost_bits, (int, np.integer)):
        raise ValueError(f"layer {name!r} option {o.label!r}: cost_bits must be an int, got {o.cost_bits!r}")
      if o.cost_bits < 0:
        raise ValueError(f"layer {name!r} option {o.label!r}: negative cost_bits {o.cost_bits}")
      if not math.isfinite(float(o.error)):
        raise ValueError(f"layer {name!r} option {o.label!r}: error is {o.error} (must be finite)")
    opts.append(options)
  mins = [min(int(o.cost_bits) for o in options) for options in opts]
  if sum(mins) > budget_bits:
    big = max(range(len(names)), key=mins.__getitem__)
    raise ValueError(f"budget of {int(budget_bits)} bits is infeasible: the cheapest choice for every layer "
                     f"already costs {sum(mins)} bits ({len(names)} layers; the largest, {names[big]!r}, "
                     f"needs {mins[big]} bits at least)")
  return names, opts


def solve(layers: dict[str, list[Option]], budget_bits: int, *, resolution: int | None = None) -> dict[str, Option]:
  """``{layer: Option}`` minimizing the summed ``error`` with summed ``cost_bits <= budget_bits``.

  Exact (dynamic programming over the GCD-reduced extra cost, module docstring) unless the
  table would exceed ``MAX_CELLS`` cells or, when ``resolution`` is given, ``resolution + 1``
  cells on the cost axis; then extra costs are rounded up to buckets (never over budget in
  exact bits) and a ``UserWarning`` says so. Ties: module docstring. ``ValueError`` (naming
  the layer) on an empty option list, a negative cost, a non-finite error, or a budget
  below the cheapest choice (naming that total).
  """
  plan, note = _dp(layers, budget_bits, resolution)
  if note:
    warnings.warn(note, stacklevel=2)
  return plan


def _dp(layers: dict, budget_bits, resolution) -> tuple[dict, str | None]:
  """``(plan, None)`` when exact; ``(plan, what was discretized)`` otherwise."""
  names, opts = _check(layers, budget_bits)
  if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer))
                                 or resolution < 1):
    raise ValueError(f"resolution must be a positive int (cells on the cost axis), got {resolution!r}")
  base = [min(int(o.cost_bits) for o in options) for options in opts]
  extra = [[int(o.cost_bits) - b for o in options] for options, b in zip(opts, base)]
  room = int(budget_bits) - sum(base)  # >= 0 by _check
  g = math.gcd(*(e for ex in extra for e in ex)) or 1  # 0: every option costs its layer's minimum
  cap_bits = min(room, sum(max(ex) for ex in extra))  # more room than the dearest plan buys nothing
  cap = cap_bits // g
  limit = MAX_CELLS // len(names) - 1 if resolution is None else int(resolution)
  note = None
  if cap <= limit:
    steps = [np.array([e // g for e in ex], np.int64) for ex in extra]
  else:
    bucket = -(-cap_bits // limit)  # ceil: at most `limit` buckets fit in cap_bits
    note = (f"allocate.solve: an exact table would have {len(names)} x {cap + 1} cells; costs are discretized "
            f"to buckets of {bucket} bits ({cap_bits // bucket + 1} cells on the cost axis), each option's extra "
            f"cost rounded up: the plan fits the budget in exact bits but may not be optimal")
    cap = cap_bits // bucket
    steps = [np.array([-(-e // bucket) for e in ex], np.int64) for ex in extra]  # rounded UP
  errs = [np.array([float(o.error) for o in options], np.float64) for options in opts]
  # Suffix tables: best[i, c] = least error of layers i.. with extra cost exactly c steps (inf: unreachable).
  n = len(names)
  best = np.full((n + 1, cap + 1), np.inf)
  best[n, 0] = 0.0
  for i in range(n - 1, -1, -1):
    row = best[i]
    for s, e in zip(steps[i], errs[i]):
      if s <= cap:
        np.minimum(row[s:], best[i + 1, :cap + 1 - s] + e, out=row[s:])
  c = int(np.argmin(best[0]))  # the first minimum: least cost among least error
  plan = {}
  for i, name in enumerate(names):  # forward: the first option of each layer that stays optimal
    for j, (s, e) in enumerate(zip(steps[i], errs[i])):
      if s <= c and best[i + 1, c - s] + e == best[i, c]:
        plan[name] = opts[i][j]
        c -= int(s)
        break
    else:  # pragma: no cover (the table is consistent by construction)
      raise AssertionError(f"DP backtrack failed at layer {name!r}")
  spent = sum(int(o.cost_bits) for o in plan.values())
  assert spent <= budget_bits, (spent, budget_bits)
  return plan, note


def solve_greedy(layers: dict[str, list[Option]], budget_bits: int) -> dict[str, Option]:
  """The baseline: the cheapest option per layer (least error among equally cheap, then the
  first), then repeatedly the upgrade with the largest error reduction per extra bit that
  fits in what is left (an upgrade lowers its layer's error; one costing no extra bit is
  taken first). Ties: the first layer, then the first option. Same checks as ``solve``."""
  names, opts = _check(layers, budget_bits)
  cur = [min(range(len(o)), key=lambda j, o=o: (int(o[j].cost_bits), float(o[j].error), j)) for o in opts]
  left = int(budget_bits) - sum(int(opts[i][cur[i]].cost_bits) for i in range(len(names)))
  while True:
    pick, pick_key = None, None
    for i, options in enumerate(opts):
      now = options[cur[i]]
      for j, o in enumerate(options):
        gain, more = float(now.error) - float(o.error), int(o.cost_bits) - int(now.cost_bits)
        if gain <= 0 or more > left:
          continue
        key = (math.inf, gain) if more <= 0 else (gain / more, 0.0)
        if pick_key is None or key > pick_key:
          pick, pick_key = (i, j), key
    if pick is None:
      break
    i, j = pick
    left -= int(opts[i][j].cost_bits) - int(opts[i][cur[i]].cost_bits)
    cur[i] = j
  return {name: opts[i][cur[i]] for i, name in enumerate(names)}


# ----------------------------------------------------------------------------- options from methods


def method_label(method) -> str:
  """A short label for a method config: ``"gptq-w3-g128"``, ``"gptq+wlorc-w3-g128-r8"``, ``"squeezellm-w3"``."""
  inner = method
  while hasattr(inner, "base"):
    inner = inner.base
  parts = [method.name, f"w{method.bits}"]
  if getattr(inner, "group_size", None) is not None:
    parts.append(f"g{inner.group_size}")
  if getattr(method, "rank", None) is not None:
    parts.append(f"r{method.rank}")
  return "-".join(parts)


def _candidates(candidates) -> list[tuple[str, Any]]:
  """``[(label, method), ...]`` from a dict ``{label: method}`` or a sequence of methods; labels unique."""
  items = list(candidates.items()) if isinstance(candidates, dict) else [(method_label(m), m) for m in candidates]
  if not items:
    raise ValueError("candidates is empty: give at least one method config")
  labels = [l for l, _ in items]
  dup = sorted({l for l in labels if labels.count(l) > 1})
  if dup:
    raise ValueError(f"candidate labels {dup} repeat: pass a dict {{label: method}} to tell them apart")
  for label, m in items:
    if not callable(getattr(m, "quantize", None)):
      raise ValueError(f"candidate {label!r} is not a method config (no quantize()): {m!r}")
  return items


def _output_mse(w, h, probes: dict) -> dict:
  from lqx.calibrate import _own_output_mse  # noqa: PLC0415 (calibrate imports the models)
  return _own_output_mse(w, h, probes)


def options_for_layer(w, stats: dict, candidates, *, error: str = "hessian", name: str | None = None) -> list[Option]:
  """``[Option(label, stored_bits, err, payload=method)]``: kernel ``w`` (IC, OC) quantized by each candidate.

  ``stats``: one capture of this kernel's statistics, shared by every candidate:
  ``{"hessian": H}`` (IC, IC), plus ``{"fisher": F}`` (IC, OC) for methods or errors that
  need it. ``candidates``: method configs (labels from ``method_label``) or ``{label: method}``.
  ``err``: ``tr(D^T H D)`` with ``D = deq(kernel) - w`` (``error="hessian"``) or
  ``sum F * D^2`` (``error="fisher"``). Methods choosing between candidates (AdaDim) are
  judged on the layer's own output, exactly from ``H``.
  """
  from lqx.quant.gptq import proxy_loss  # noqa: PLC0415
  where = f"{name}: " if name else ""
  if error not in ERRORS:
    raise ValueError(f"error must be one of {ERRORS}, got {error!r}")
  if getattr(w, "ndim", None) != 2:
    raise ValueError(f"{where}expected a 2-D (IC, OC) kernel, got shape {tuple(np.shape(w))}")
  if stats.get(error) is None:
    raise ValueError(f"{where}error={error!r} needs stats[{error!r}] (have {sorted(stats)})")
  h = stats.get("hessian")
  out = []
  for label, method in _candidates(candidates):
    missing = [s for s in method.stats if stats.get(s) is None]
    if missing:
      raise ValueError(f"{where}candidate {label!r} needs stats {missing} (have {sorted(stats)})")
    judge = None if h is None else (lambda probes: _output_mse(w, h, probes))
    q, _ = method.quantize(w, stats, name=name, judge=judge)
    deq = q.dequantize().astype(jnp.float32)
    if error == "hessian":
      err = float(proxy_loss(w, deq, h))
    else:
      err = float(jnp.sum(stats["fisher"].astype(jnp.float32) * jnp.square(deq - w.astype(jnp.float32))))
    out.append(Option(label, int(q.stored_bits), err, payload=method))
  return out


# ----------------------------------------------------------------------------- whole models


def allocate(config, params: dict, tokens, candidates, *, budget_bpw: float, paths=None, error: str = "hessian",
             fisher: dict | None = None, batch_size: int = 8, resolution: int | None = None,
             progress: bool = True) -> tuple[tuple, dict]:
  """``(recipe, plan)`` for one budget: :func:`measure`, then :func:`plan` (their docstrings)."""
  measured = measure(config, params, tokens, candidates, paths=paths, error=error, fisher=fisher,
                     batch_size=batch_size, progress=progress)
  return plan(measured, budget_bpw, resolution=resolution)


@dataclasses.dataclass(frozen=True)
class Measured:
  """Every target's options, measured once; :func:`plan` solves any number of budgets from it."""
  targets: list[str]
  layers: dict[str, list[Option]]  # path -> options with normalized errors (what the solver sums)
  raw: dict[str, dict[str, float]]  # path -> label -> raw error
  numel: dict[str, int]
  error: str
  seconds: float


def measure(config, params: dict, tokens, candidates, *, paths=None, error: str = "hessian",
            fisher: dict | None = None, batch_size: int = 8, progress: bool = True) -> Measured:
  """Every target kernel's options (:class:`Measured`): each candidate's exact stored bits and error.

  ``config``: a ``LlamaConfig`` or any model as ``calibrate.Units``. ``tokens``: (N, ...)
  calibration inputs. ``candidates``: method configs or ``{label: method}``, offered to every
  target. ``paths``: regex over param paths (default ``recipe.BLOCK_LINEARS``), matched in
  full. ``fisher``: ``{path: (IC, OC)}`` cache; computed from ``tokens`` (LLaMA only) when a
  candidate or ``error="fisher"`` needs it and none is given.

  Hessians are captured ONCE, on the float model, for all targets (``calibrate.capture``;
  not block-sequential: simplest, and one capture serves every option of every layer).
  Errors are normalized as the module docstring says.
  """
  from lqx import calibrate, recipe, tree  # noqa: PLC0415 (recipe imports lqx.quant)
  from lqx.models import llama  # noqa: PLC0415
  from lqx.quant.gptq import proxy_loss  # noqa: PLC0415
  t0 = time.perf_counter()
  if error not in ERRORS:
    raise ValueError(f"error must be one of {ERRORS}, got {error!r}")
  items = _candidates(candidates)
  pattern = recipe.BLOCK_LINEARS if paths is None else paths
  targets = [p for p in tree.paths(params) if re.fullmatch(pattern, p)]
  if not targets:
    raise ValueError(f"paths {pattern!r} matches no parameter (paths look like {tree.paths(params)[:3]})")
  if isinstance(config, llama.LlamaConfig):
    tokens = llama.check_tokens(config, tokens, name="tokens", min_len=2)
    units = llama.units(config)
  elif isinstance(config, calibrate.Units):
    units = config
  else:
    raise ValueError(f"config must be a LlamaConfig or lqx.calibrate.Units, got {type(config).__name__}")
  arr = np.asarray(tokens)
  if arr.size == 0:
    raise ValueError(f"tokens is empty (shape {arr.shape}): expected (n_samples, ...) model inputs")
  batches = [jnp.asarray(arr[i: i + batch_size]) for i in range(0, len(arr), batch_size)]
  stats = calibrate.capture(units, params, batches, paths=set(targets))
  missing = [p for p in targets if p not in stats]
  if missing:
    raise ValueError(f"{missing[0]}: matched by paths, but no unit reported this linear's input")
  if error == "fisher" or any("fisher" in m.stats for _, m in items):
    if fisher is None:
      if not isinstance(config, llama.LlamaConfig):
        raise ValueError("the diagonal Fisher is needed: for a model other than the LLaMA decoder pass "
                         "fisher={path: (IC, OC) array} (lqx.quant.fisher.diagonal_fisher)")
      from lqx.quant import fisher as fisher_lib  # noqa: PLC0415
      fisher = fisher_lib.llama_fisher(config, params, tokens, paths=targets, progress=progress)
    for p in targets:
      if p not in fisher:
        raise ValueError(f"fisher has no entry for {p}")
      stats[p] = {**stats[p], "fisher": jnp.asarray(fisher[p], jnp.float32)}
  from tqdm.auto import tqdm  # noqa: PLC0415
  layers, raw, numel = {}, {}, {}
  for p in tqdm(targets, desc="allocate options", disable=not progress, unit="layer"):
    w = jnp.asarray(tree.get(params, p), jnp.float32)
    opts = options_for_layer(w, stats[p], dict(items), error=error, name=p)
    numel[p] = int(w.size)
    if error == "hessian":  # relative output error, weighted by size (module docstring)
      den = max(float(proxy_loss(w, jnp.zeros_like(w), stats[p]["hessian"])), float(np.finfo(np.float32).tiny))
      scale = numel[p] / den
    else:
      scale = 1.0
    raw[p] = {o.label: o.error for o in opts}
    layers[p] = [dataclasses.replace(o, error=o.error * scale) for o in opts]
  return Measured(targets, layers, raw, numel, error, time.perf_counter() - t0)


def plan(measured: Measured, budget_bpw: float, *, resolution: int | None = None) -> tuple[tuple, dict]:
  """``(recipe, plan)``: one option per target within ``budget_bpw`` bits per weight (over the
  targets, everything stored included: ``budget_from_bpw``), by the exact knapsack.

  The recipe is a tuple of ``recipe.Rule`` with one exact-path regex per target;
  ``lqx.quantize(config, params, recipe, tokens, fisher=...)`` applies it, and its kernels then
  hold exactly ``plan["total_bits"]`` bits (stored sizes depend on shapes and settings only; a
  method whose layout is chosen from data, AdaDim, may choose differently there).

  ``plan``: ``budget_bits``, ``n_weights``, ``total_bits``, ``bits_per_weight`` (promised, over
  the targets), ``objective`` (summed solver error), ``mean_relative_error`` (``"hessian"``:
  size-weighted mean relative output error), ``error``, ``exact``, ``seconds`` and
  ``layers``: path -> ``label``, ``cost_bits``, ``bits_per_weight``, ``numel``, ``error``
  (raw), ``objective`` (normalized) and ``options`` (every candidate's label, cost, objective).
  """
  from lqx import recipe  # noqa: PLC0415 (recipe imports lqx.quant)
  t0 = time.perf_counter()
  targets, layers, raw, numel, error = measured.targets, measured.layers, measured.raw, measured.numel, measured.error
  n_weights = sum(numel.values())
  budget = budget_from_bpw(budget_bpw, n_weights)
  chosen, note = _dp(layers, budget, resolution)
  if note:
    warnings.warn(note, stacklevel=2)
  total_bits = sum(o.cost_bits for o in chosen.values())
  objective = sum(o.error for o in chosen.values())
  rules = tuple(recipe.Rule(re.escape(p), chosen[p].payload) for p in targets)
  summary = {
      "budget_bpw": float(budget_bpw), "budget_bits": budget, "n_weights": n_weights, "total_bits": total_bits,
      "bits_per_weight": total_bits / n_weights, "objective": objective,
      "mean_relative_error": objective / n_weights if error == "hessian" else None,
      "error": error, "exact": note is None, "seconds": measured.seconds + time.perf_counter() - t0,
      "layers": {p: {"label": chosen[p].label, "cost_bits": chosen[p].cost_bits,
                     "bits_per_weight": chosen[p].cost_bits / numel[p], "numel": numel[p],
                     "error": raw[p][chosen[p].label], "objective": chosen[p].error,
                     "options": [{"label": o.label, "cost_bits": o.cost_bits, "objective": o.error}
                                 for o in layers[p]]} for p in targets},
  }
  return rules, summary


