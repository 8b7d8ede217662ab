"""Recipes (param-path regex -> method config) and ``quantize(config, params, recipe, tokens)``.

A recipe is a sequence of ``Rule``s; each parameter path (``"layers_3/attn/q_proj/kernel"``)
takes the method of the first rule whose regex matches it in full, and stays
float when no rule matches or the rule's method is ``None``. The default recipe
quantizes every block linear and leaves embeddings, norms and the head in float.
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from lqx import calibrate, data
from lqx.models import llama
from lqx.quant.adadim import AdaDimConfig
from lqx.quant.gptq import GPTQConfig
from lqx.quant.rtn import RTNConfig

BLOCK_LINEARS = r"layers_\d+/(attn|mlp)/\w+_proj/kernel"
# The calibration pipeline of quantize(): True is GPTQ's --true-sequential (each stage of a
# block sees the earlier stages quantized), False the reference llama.py's default (all
# Hessians of a block from one forward). Chosen by measurement: README, "GPTQ parity".
DEFAULT_TRUE_SEQUENTIAL = False
Method = RTNConfig | GPTQConfig | AdaDimConfig


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


def param_paths(params) -> list[str]:
  """"/"-joined dict-key paths of every leaf (QArrays count as leaves), layers in numeric order."""
  out = []
  for keys, _ in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: hasattr(x, "dequantize")):
    out.append("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys))
  return sorted(out, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)])


def match(recipe, params) -> dict[str, Method]:
  """Param path -> method for every leaf a rule quantizes. Raises if nothing matches."""
  recipe = tuple(recipe)
  if not recipe:
    raise ValueError("recipe is empty: give at least one Rule(pattern, method)")
  targets = {}
  for path in param_paths(params):
    for rule in recipe:
      if re.fullmatch(rule.pattern, path):
        if rule.method is not None:
          targets[path] = rule.method
        break
  if not targets:
    pats = ", ".join(repr(r.pattern) for r in recipe)
    raise ValueError(f"recipe matches no parameter to quantize (patterns {pats}; "
                     f"paths look like {param_paths(params)[:3]})")
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


def quantize(config: llama.LlamaConfig, params: dict, recipe, calibration_tokens: np.ndarray | None = None,
             *, batch_size: int = 8, true_sequential: bool = DEFAULT_TRUE_SEQUENTIAL,
             progress: bool = True) -> tuple[dict, QuantReport]:
  """Quantizes ``params`` by ``recipe``; returns ``(qparams, report)``. Pure: ``params`` is untouched.

  ``calibration_tokens`` (N, T) are needed by GPTQ and AdaDim (block-sequential,
  ``lqx.calibrate``); RTN alone runs without them (its report then gives weight
  errors instead of output errors). Block linears are calibrated; other matched
  leaves (e.g. the embedding) take RTN on the weights. ``true_sequential``
  picks the calibration pipeline (``calibrate.quantize_sequential``). The report's
  ``calibration_sha256`` is ``data.tokens_sha256(calibration_tokens)`` (None without them).
  """
  t0 = time.perf_counter()
  targets = match(recipe, params)
  block_re = re.compile(r"layers_\d+/.*")
  in_blocks = {k: v for k, v in targets.items() if block_re.fullmatch(k)}
  outside = {k: v for k, v in targets.items() if k not in in_blocks}
  needs_data = any(not isinstance(m, RTNConfig) for m in targets.values())
  if needs_data and calibration_tokens is None:
    kinds = sorted({calibrate.method_name(m) for m in targets.values() if not isinstance(m, RTNConfig)})
    raise ValueError(f"methods {kinds} need calibration_tokens (n_samples, seq_len)")
  reports, timings, pipeline = [], {}, None
  qparams = params
  if in_blocks and calibration_tokens is not None:
    qparams, reports, timings = calibrate.quantize_sequential(
        config, params, in_blocks, calibration_tokens, batch_size=batch_size,
        true_sequential=true_sequential, progress=progress)
    pipeline = true_sequential
  else:
    outside = targets
  for path, method in outside.items():
    if not isinstance(method, RTNConfig):
      raise ValueError(f"{path}: only RTN applies outside the decoder blocks, got {calibrate.method_name(method)}")
    t = time.perf_counter()
    w = calibrate._get(qparams, path)
    q, _ = calibrate.quantize_kernel(w, None, method, path)
    qparams = calibrate._set(qparams, path, q)
    reports.append(calibrate.LayerReport(
        name=path, method="rtn", bits=method.bits, group_size=method.group_size, group_axis=method.group_axis,
        bits_per_weight=q.bits_per_weight, error=float(calibrate.relative_weight_error(w, q.dequantize())),
        error_kind="weight", seconds=time.perf_counter() - t, numel=int(w.size)))
  ntok = 0 if calibration_tokens is None else int(np.asarray(calibration_tokens).size)
  sha = None if calibration_tokens is None else data.tokens_sha256(np.asarray(calibration_tokens))
  return qparams, QuantReport(layers=reports, seconds=time.perf_counter() - t0, calibration_tokens=ntok,
                              calibration_sha256=sha, true_sequential=pipeline, timings=timings)


METHODS = ("rtn", "gptq", "adadim-rtn", "adadim-gptq")


def make_method(name: str, *, bits: int, group_size: int = 128, group_axis: str = "oc", sym: bool = False,
                act_order: bool = False, static_groups: bool = False, mse: bool = False,
                scale_dtype=jnp.float16) -> Method:
  """A method config from its CLI name (one of ``METHODS``). AdaDim ignores ``group_axis``."""
  if name not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {name!r}")
  base_name = name.removeprefix("adadim-")
  if base_name == "rtn":
    if act_order or static_groups:
      raise ValueError("act_order and static_groups are GPTQ options; RTN takes neither")
    base = RTNConfig(bits=bits, group_size=group_size, group_axis=group_axis, sym=sym, mse=mse,
                     scale_dtype=scale_dtype)
  else:
    base = GPTQConfig(bits=bits, group_size=group_size, group_axis=group_axis, sym=sym, act_order=act_order,
                      static_groups=static_groups, mse=mse, scale_dtype=scale_dtype)
  return AdaDimConfig(base) if name.startswith("adadim-") else base
