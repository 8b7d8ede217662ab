"""Recipes (param-path regex -> method config) and ``quantize(config, params, recipe, tokens)``.

A recipe is a sequence of ``Rule``s; each parameter path (``"layers_3/attn/q_proj/kernel"``)
takes the method of the first rule whose regex matches it in full, and stays
float when no rule matches or the rule's method is ``None``. The default recipe
quantizes every block linear and leaves embeddings, norms and the head in float.
``save_recipe`` / ``load_recipe`` write and read recipes as JSON or YAML files
(``lqx.recipe_file``).
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax.numpy as jnp
import numpy as np

from lqx import calibrate, data, quant, tree
from lqx.models import llama
from lqx.quant.adadim import AdaDimConfig
from lqx.quant.gptq import GPTQConfig
from lqx.quant.rtn import RTNConfig

BLOCK_LINEARS = r"layers_\d+/(attn|mlp)/\w+_proj/kernel"
# The calibration pipeline of quantize(): True is GPTQ's --true-sequential (each stage of a
# block sees the earlier stages quantized), False the reference llama.py's default (all
# Hessians of a block from one forward). Chosen by measurement: README, "GPTQ parity".
DEFAULT_TRUE_SEQUENTIAL = False
Method = RTNConfig | GPTQConfig | AdaDimConfig  # for type hints; any lqx.quant protocol method works


@dataclasses.dataclass(frozen=True)
class Rule:
  pattern: str  # regex, matched in full against the "/"-joined param path
  method: Method | None  # None: keep float

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule.pattern {self.pattern!r} is not a valid regex: {e}") from e


def default_recipe(method: Method) -> tuple[Rule, ...]:
  """Every block linear with ``method``; embeddings, norms and the head stay float."""
  return (Rule(BLOCK_LINEARS, method),)


def load_recipe(path) -> tuple[Rule, ...]:
  """The rules of a ``.json`` / ``.yaml`` recipe file (``lqx.recipe_file``); ``RecipeError`` names file, rule, field."""
  from lqx import recipe_file  # noqa: PLC0415 (it imports this module)

  return recipe_file.load(path)


def save_recipe(path, rules) -> None:
  """Write ``rules`` to a ``.json`` / ``.yaml`` recipe file (``lqx.recipe_file``) that ``load_recipe`` reads back equal."""
  from lqx import recipe_file  # noqa: PLC0415

  recipe_file.save(path, rules)


def match(recipe, params) -> dict[str, Method]:
  """Param path -> method for every leaf a rule quantizes. Raises if nothing matches."""
  recipe = tuple(recipe)
  if not recipe:
    raise ValueError("recipe is empty: give at least one Rule(pattern, method)")
  targets = {}
  for path in tree.paths(params):
    for rule in recipe:
      if re.fullmatch(rule.pattern, path):
        if rule.method is not None:
          targets[path] = rule.method
        break
  if not targets:
    pats = ", ".join(repr(r.pattern) for r in recipe)
    raise ValueError(f"recipe matches no parameter to quantize (patterns {pats}; "
                     f"paths look like {tree.paths(params)[:3]})")
  return targets


@dataclasses.dataclass
class QuantReport:
  layers: list  # of calibrate.LayerReport
  seconds: float
  calibration_tokens: int
  calibration_sha256: str | None = None  # data.tokens_sha256 of the (N, T) windows; None without them
  true_sequential: bool | None = None  # the calibration pipeline (None: no calibration ran)
  timings: dict = dataclasses.field(default_factory=dict)  # seconds by phase (calibrate.quantize_sequential)

  @property
  def bits_per_weight(self) -> float:
    """Bits per weight over the quantized kernels (scales, zeros and padding included)."""
    n = sum(l.numel for l in self.layers)
    return sum(l.bits_per_weight * l.numel for l in self.layers) / max(n, 1)

  def to_json(self) -> dict:
    return {"bits_per_weight": self.bits_per_weight, "seconds": self.seconds,
            "calibration_tokens": self.calibration_tokens, "calibration_sha256": self.calibration_sha256,
            "true_sequential": self.true_sequential, "timings": self.timings,
            "layers": [dataclasses.asdict(l) for l in self.layers]}


def quantize(config: llama.LlamaConfig | calibrate.Units | None, params: dict, recipe,
             calibration_tokens: np.ndarray | None = None,
             *, batch_size: int = 8, true_sequential: bool | None = None, fisher: dict | None = None,
             progress: bool = True) -> tuple[dict, QuantReport]:
  """Quantizes ``params`` by ``recipe``; returns ``(qparams, report)``. Pure: ``params`` is untouched.

  ``config``: a ``LlamaConfig`` (the decoder, ``calibrate.quantize_sequential``), any
  model as ``calibrate.Units`` (``lqx.adapters.nnx_units`` / ``linen_units``;
  ``calibrate.quantize_units``), or None for data-free methods on any pytree.
  ``calibration_tokens``: (N, ...) model inputs, (N, T) token ids for LLaMA; needed
  by methods with ``stats`` (GPTQ, AdaDim, SqueezeLLM without ``fisher``); RTN alone
  runs without them. Reports give output errors for calibrated kernels and weight
  errors otherwise (data-free methods, or when no method needs a Hessian: SqueezeLLM
  alone is then applied kernel by kernel, as it does not depend on calibration order).
  Linears inside the units are calibrated; other matched leaves (e.g. the embedding)
  take a method without Hessian.
  ``true_sequential`` picks the calibration pipeline (None: ``DEFAULT_TRUE_SEQUENTIAL``
  for LLaMA, True for ``Units``). The report's ``calibration_sha256`` is
  ``data.tokens_sha256`` of integer (N, T) calibration tokens (None otherwise).
  Arguments are checked first (``ValueError`` naming the argument): ``batch_size >= 1``;
  for LLaMA, ``calibration_tokens`` ids in ``[0, vocab_size)`` with N >= 1 and
  2 <= T <= ``config.max_seq_len``; for other models, non-empty inputs.
  """
  t0 = time.perf_counter()
  batch_size = data.check_count(batch_size, "batch_size")
  if calibration_tokens is not None:
    if isinstance(config, llama.LlamaConfig):
      calibration_tokens = llama.check_tokens(config, calibration_tokens, name="calibration_tokens", min_len=2)
    elif np.size(calibration_tokens) == 0:
      raise ValueError(f"calibration_tokens is empty (shape {np.shape(calibration_tokens)}): expected "
                       f"(n_samples, ...) model inputs with n_samples >= 1")
  targets = match(recipe, params)
  needs_data = {m.name for m in targets.values() if "hessian" in m.stats or ("fisher" in m.stats and fisher is None)}
  if needs_data and calibration_tokens is None:
    raise ValueError(f"methods {sorted(needs_data)} need calibration_tokens (n_samples, ...)")
  if needs_data and not isinstance(config, (llama.LlamaConfig, calibrate.Units)):
    raise ValueError(f"methods {sorted(needs_data)} need the model to calibrate: pass a LlamaConfig or "
                     f"lqx.calibrate.Units (e.g. lqx.adapters.nnx_units(model)) as config, "
                     f"got {type(config).__name__}")
  t = time.perf_counter()
  stats = _fisher_stats(config, params, targets, calibration_tokens, fisher, progress)
  timings = {"fisher": time.perf_counter() - t} if stats else {}
  if isinstance(config, calibrate.Units):
    in_units = re.compile("|".join(re.escape(n) + "/.*" if n else ".*" for n in config.names))
  else:
    in_units = re.compile(r"layers_\d+/.*")
  in_blocks = {k: v for k, v in targets.items() if in_units.fullmatch(k)}
  outside = {k: v for k, v in targets.items() if k not in in_blocks}
  reports, pipeline = [], None
  qparams = params
  if not in_blocks or calibration_tokens is None or config is None or not any(
      "hessian" in m.stats for m in in_blocks.values()):  # no Hessian needed: nothing to calibrate in order
    outside = targets
  elif isinstance(config, calibrate.Units):
    inputs = np.asarray(calibration_tokens)
    batches = [jnp.asarray(inputs[i: i + batch_size]) for i in range(0, len(inputs), batch_size)]
    pipeline = True if true_sequential is None else true_sequential
    qparams, reports = calibrate.quantize_units(config, params, in_blocks, batches, true_sequential=pipeline,
                                                stats=stats, progress=progress)
  else:
    pipeline = DEFAULT_TRUE_SEQUENTIAL if true_sequential is None else true_sequential
    qparams, reports, phases = calibrate.quantize_sequential(
        config, params, in_blocks, calibration_tokens, batch_size=batch_size,
        true_sequential=pipeline, stats=stats, progress=progress)
    timings.update(phases)
  for path, method in outside.items():
    if "hessian" in method.stats:
      raise ValueError(f"{path}: only methods without Hessians (e.g. RTN, SqueezeLLM) apply outside the "
                       f"model's units, got {method.name} (needs {', '.join(method.stats)})")
    t = time.perf_counter()
    w = tree.get(qparams, path)
    q, info = method.quantize(w, stats.get(path, {}), name=path)
    qparams = tree.replace(qparams, path, q)
    reports.append(calibrate.report(path, method, w, q, info, None, time.perf_counter() - t))
  ntok = 0 if calibration_tokens is None else int(np.asarray(calibration_tokens).size)
  a = None if calibration_tokens is None else np.asarray(calibration_tokens)
  sha = data.tokens_sha256(a) if a is not None and a.ndim == 2 and a.dtype.kind in "iu" else None
  return qparams, QuantReport(layers=reports, seconds=time.perf_counter() - t0, calibration_tokens=ntok,
                              calibration_sha256=sha, true_sequential=pipeline, timings=timings)


def _fisher_stats(config, params, targets: dict, tokens, fisher: dict | None, progress: bool) -> dict:
  """Path -> ``{"fisher": (IC, OC) float32}`` for the targets whose method needs it (else ``{}``)."""
  paths = sorted(p for p, m in targets.items() if "fisher" in m.stats)
  if not paths:
    return {}
  if fisher is None:
    if not isinstance(config, llama.LlamaConfig):
      raise ValueError(f"{paths[0]}: its method needs the diagonal Fisher; for a model other than the LLaMA "
                       f"decoder pass fisher={{path: (IC, OC) array}} (lqx.quant.fisher.diagonal_fisher)")
    from lqx.quant import fisher as fisher_lib  # noqa: PLC0415 (autodiff only when a method needs it)
    fisher = fisher_lib.llama_fisher(config, params, tokens, paths=paths, progress=progress)
  out = {}
  for p in paths:
    if p not in fisher:
      raise ValueError(f"fisher has no entry for {p} (it has {len(fisher)} paths, e.g. {sorted(fisher)[:2]})")
    f, shape = jnp.asarray(fisher[p], jnp.float32), tuple(tree.get(params, p).shape)
    if f.shape != shape:
      raise ValueError(f"fisher[{p!r}] has shape {f.shape}; the kernel is {shape}")
    out[p] = {"fisher": f}
  return out


METHODS = tuple(quant.METHODS)  # the registry's names (CLI choices)


def make_method(name: str, *, bits: int, group_size: int = 128, group_axis: str = "oc", sym: bool = False,
                act_order: bool = False, static_groups: bool = False, mse: bool = False,
                scale_dtype=jnp.float16, **options) -> Method:
  """A method config from its CLI name (``lqx.quant.METHODS``). AdaDim ignores ``group_axis``;
  SqueezeLLM ignores the affine layout options. ``options``: method-specific settings
  (SqueezeLLM ``sensitive_frac``/``outlier_frac``, LoRC ``rank``/``factor_bits``)."""
  if name not in quant.METHODS:
    raise ValueError(f"method must be one of {tuple(quant.METHODS)}, got {name!r}")
  opts = dict(bits=bits, group_size=group_size, group_axis=group_axis, sym=sym, mse=mse, scale_dtype=scale_dtype)
  if act_order or static_groups:
    if name.split("+")[0].removeprefix("adadim-") != "gptq":
      raise ValueError(f"act_order and static_groups are GPTQ options; {name} takes neither")
    opts.update(act_order=act_order, static_groups=static_groups)
  return quant.make(name, **opts, **options)
