"""Measured activation sensitivity: which linear inputs need 8 bits (instead of FlexQ's fixed rule).

FlexQ's released code quantizes every block linear's input at 6 bits except ``down_proj``'s,
at 8 (``lqx.quant.activations.flexq_activations``). Here the choice is measured instead:

* **Units.** One unit per *input* of a block's linears, as FlexQ's rule is one per input:
  ``layers_{i}/attn_in`` (q/k/v read it), ``o_in`` (o_proj), ``mlp_in`` (gate/up) and
  ``down_in`` (down_proj), the taps of ``llama.STAGES``. A kernel reading the input
  quantizes it once (a fused q/k/v or gate/up kernel takes one set of codes), so the
  linears sharing it share its bit width: SmolLM2-135M has 30 x 4 = 120 units.
* **Signal** (:func:`measure`). With W6 weights everywhere and every input at A8, a
  unit's sensitivity is the increase of the mean next-token cross-entropy on
  calibration windows when that unit alone goes to A6. Cross-entropy rather than KL to
  the float model: it is the quantity held-out perplexity reports, its difference on
  shared windows is paired (both runs see the same tokens), and it needs no float
  logits (``N * T * V`` floats) kept or recomputed. A small unit's delta can come out
  negative (noise of a finite sample); it is kept as measured.
* **Speed.** The model is run block by block: one pass at all-A8 stores every block's
  input; a unit of block ``i`` reruns blocks ``i..L-1`` and the head from there.
  Each unit's bit width is a traced flag (``_Switch``: ``lax.cond`` between
  ``fake_quant(x, 8)`` and ``fake_quant(x, 6)``, the functions ``ActQuant`` calls), so
  one compiled block serves every layer and every choice. A 6-bit code can flip on a
  rounding difference between two compiled programs (the whole model jitted at once,
  another batch split), so a delta agrees with a whole-model evaluation of the same
  batches to float rounding, and with other splits only to the size of such flips.
* **Choice** (:func:`choose`). Options per unit: A6 (cost ``6 * c``, error = its delta)
  and A8 (cost ``8 * c``, error 0), solved by ``allocate.solve`` (exact multiple-choice
  knapsack) under a bit budget. The cost ``c`` (:func:`unit_costs`) is the unit's
  multiply-accumulates per token (``"macs"``: the summed ``IC * OC`` of its kernels, what
  an integer kernel's throughput scales with, by default) or its input width
  (``"width"``: ``IC``, the activation elements quantized per token). The sum of deltas
  is a first-order (additive) estimate of the loss of a mixed choice.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lqx import tree
from lqx.formats.actquant import check_act_group_size
from lqx.models import llama
from lqx.quant import activations, allocate

COSTS = ("macs", "width")
HIGH, LOW = 8, 6  # activation bits compared


@functools.partial(jax.tree_util.register_dataclass, data_fields=["base", "low"], meta_fields=["group_size"])
@dataclasses.dataclass(frozen=True)
class _Switch:
  """``base``'s kernel with its input fake-quantized at ``LOW`` bits where the traced bool ``low``
  is true, else at ``HIGH`` (``ActQuant.linear`` at either width, chosen without recompiling)."""

  base: Any
  low: jax.Array  # bool scalar
  group_size: int

  def linear(self, x: jax.Array) -> jax.Array:
    xq = jax.lax.cond(self.low, lambda v: activations.fake_quant(v, LOW, self.group_size),
                      lambda v: activations.fake_quant(v, HIGH, self.group_size), x)
    return self.base.linear(xq).astype(x.dtype)


def units(config: llama.LlamaConfig, qparams, paths: str = activations.BLOCK_LINEARS) -> dict[str, tuple[str, ...]]:
  """``{unit: kernel paths}``, one unit per block input (``layers_{i}/{tap}``, ``llama.STAGES``), in
  execution order, for the kernels matching ``paths`` in full. ``ValueError`` when a unit is matched in
  part (its linears share one input, so they take one width), a match is not a quantized kernel, or
  nothing matches."""
  pattern = re.compile(paths)
  out = {}
  for layer in llama.layer_names(config):
    for stage in llama.STAGES:
      kernels = tuple(f"{layer}/{lin}/kernel" for lin in stage.linears)
      hit = [bool(pattern.fullmatch(k)) for k in kernels]
      if not any(hit):
        continue
      if not all(hit):
        raise ValueError(f"paths={paths!r} matches only part of {layer}/{stage.tap} ({', '.join(kernels)}): "
                         f"linears reading one input take one activation width")
      for k in kernels:
        leaf = tree.get(qparams, k)
        if isinstance(leaf, activations.ActQuant) or not tree.is_kernel_leaf(leaf):
          raise ValueError(f"{k} must be a weight-quantized kernel without activation quantization, "
                           f"got {type(leaf).__name__}")
      out[f"{layer}/{stage.tap}"] = kernels
  if not out:
    raise ValueError(f"paths={paths!r} matches no block linear")
  return out


def unit_costs(qparams, unit_paths: dict[str, tuple[str, ...]], cost: str = "macs") -> dict[str, int]:
  """``{unit: c}``: per-token multiply-accumulates (``"macs"``, summed ``IC * OC``) or input width
  (``"width"``, ``IC``) of each unit's kernels (module doc)."""
  if cost not in COSTS:
    raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
  out = {}
  for u, kernels in unit_paths.items():
    shapes = [tuple(tree.get(qparams, k).shape) for k in kernels]
    out[u] = sum(ic * oc for ic, oc in shapes) if cost == "macs" else shapes[0][0]
  return out


@dataclasses.dataclass(frozen=True)
class Sensitivity:
  """What :func:`measure` found: the all-A8 calibration loss and each unit's increase at A6."""

  loss: float  # mean next-token NLL (nats) on the calibration windows, every unit at A8
  delta: dict[str, float]  # unit -> loss(unit at A6, the rest at A8) - loss
  units: dict[str, tuple[str, ...]]  # unit -> its kernel paths
  tokens: int  # predicted tokens averaged over
  seconds: float


@functools.partial(jax.jit, static_argnums=0)
def _block(config, p, x):
  return llama.block(config, p, x)[0]


@functools.partial(jax.jit, static_argnums=0)
def _nll_sum(config, params, x, tokens):
  """Summed next-token NLL of hidden states ``x`` (B, T, D) before the head, for ``tokens`` (B, T)."""
  logp = jax.nn.log_softmax(llama.head(config, params, x)[:, :-1], axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).sum()


def _switched(qparams, unit_paths, group_size):
  low = jnp.asarray(False)
  out = qparams
  for kernels in unit_paths.values():
    for k in kernels:
      out = tree.replace(out, k, _Switch(tree.get(qparams, k), low, group_size))
  return out


def _flip(params, kernels):
  for k in kernels:
    params = tree.replace(params, k, dataclasses.replace(tree.get(params, k), low=jnp.asarray(True)))
  return params


def measure(config: llama.LlamaConfig, qparams, tokens, *, group_size: int = 128,
            paths: str = activations.BLOCK_LINEARS, batch_size: int = 4, progress: bool = True) -> Sensitivity:
  """Each unit's calibration loss increase from A8 to A6, every other input at A8 (module doc).

  ``qparams``: weight-quantized params (formats at the kernels matching ``paths``, no
  ``ActQuant`` there; other kernels stay as they are, e.g. float and unquantized inputs).
  ``tokens``: (N, T) calibration windows (``lqx.data.sample_windows`` of the training text),
  run ``batch_size`` windows at a time. Activation groups of ``group_size`` channels.
  """
  from tqdm.auto import tqdm  # noqa: PLC0415
  t0 = time.perf_counter()
  group_size = check_act_group_size(group_size)
  tokens = llama.check_tokens(config, tokens, name="tokens", min_len=2)
  batch_size = int(batch_size)
  if batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size}")
  unit_paths = units(config, qparams, paths)
  params = _switched(qparams, unit_paths, group_size)
  names = llama.layer_names(config)
  arr = np.asarray(tokens)
  batches = [jnp.asarray(arr[i: i + batch_size]) for i in range(0, len(arr), batch_size)]
  inputs = []  # per batch: the input of every block, at all-A8
  total = 0.0
  for b in batches:
    x = llama.embed(config, params, b)
    xs = []
    for name in names:
      xs.append(x)
      x = _block(config, params[name], x)
    inputs.append(xs)
    total += float(_nll_sum(config, params, x, b))
  n_pred = arr.shape[0] * (arr.shape[1] - 1)
  loss = total / n_pred
  delta = {}
  for u in tqdm(unit_paths, desc="activation sensitivity", disable=not progress, unit="unit"):
    start = names.index(u.split("/")[0])
    p = _flip(params, unit_paths[u])
    total = 0.0
    for b, xs in zip(batches, inputs):
      x = xs[start]
      for name in names[start:]:
        x = _block(config, p[name], x)
      total += float(_nll_sum(config, p, x, b))
    delta[u] = total / n_pred - loss
  return Sensitivity(loss, delta, unit_paths, n_pred, time.perf_counter() - t0)


def choose(delta: dict[str, float], costs: dict[str, int], budget_bits: int) -> set[str]:
  """The units given A8 (the rest A6) minimizing the summed delta of the A6 units, with
  ``sum(8 c if A8 else 6 c) <= budget_bits`` (``allocate.solve``: exact; ties go to the cheaper plan)."""
  missing = sorted(set(delta) ^ set(costs))
  if missing:
    raise ValueError(f"delta and costs must name the same units; {missing[:3]} appear in only one")
  layers = {u: [allocate.Option(f"A{LOW}", LOW * int(costs[u]), float(delta[u])),
                allocate.Option(f"A{HIGH}", HIGH * int(costs[u]), 0.0)] for u in delta}
  plan = allocate.solve(layers, int(budget_bits))
  return {u for u, o in plan.items() if o.label == f"A{HIGH}"}


def bits_of(costs: dict[str, int], high: set[str]) -> int:
  """Activation-bit cost ``sum(8 c if unit in high else 6 c)`` of a choice."""
  return sum((HIGH if u in high else LOW) * int(c) for u, c in costs.items())


def with_choice(qparams, unit_paths: dict[str, tuple[str, ...]], high: set[str], group_size: int = 128):
  """``qparams`` with the inputs of the units in ``high`` at A8 and every other unit's at A6 (``ActQuant``)."""
  unknown = sorted(set(high) - set(unit_paths))
  if unknown:
    raise ValueError(f"units {unknown[:3]} are not among the measured units")
  out = qparams
  for bits, chosen in ((HIGH, [u for u in unit_paths if u in high]), (LOW, [u for u in unit_paths if u not in high])):
    if chosen:
      regex = "|".join(re.escape(k) for u in chosen for k in unit_paths[u])
      out = activations.with_activation_bits(out, bits, group_size, regex)
  return out
