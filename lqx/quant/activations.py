"""Dynamic per-token activation quantization (FlexQ's W6A8 / W6A6) and its exact integer matmul.

FlexQ (arXiv 2508.04405; released code, ``flexq_quantize/quantizer.py``) quantizes
the *input* of every block linear at run time, per token, in groups of ``g``
consecutive input channels (``g = 128``), symmetrically::

    scale[t, j] = max_{k in group j} |x[t, k]| / (2**(a-1) - 1)              (a = act bits)
    code[t, k]  = clip(round(x[t, k] / scale[t, j]), -(2**(a-1) - 1), 2**(a-1) - 1)
    x[t, k]    ~= code[t, k] * scale[t, j]

(``round`` is round-half-to-even, as ``torch.round``). Nothing is calibrated or
stored: the scales come from the activations themselves. Attention's own matmuls
(``Q K^T``, ``P V``) stay in float, as in FlexQ (their q/k/v/p quantizers run at 16
bits); only the inputs of the linears are quantized.

Axes: ``x`` is ``(..., K)`` with K the input channels (the IC of an ``(IC, OC)``
kernel); every leading index is one token. Group ``j`` is channels
``[j*g, min((j+1)*g, K))``, so there are ``G = ceil(K/g)`` groups and, when ``g``
does not divide K, the last one is *shorter* (SmolLM2's K = 576, g = 128: four
groups of 128 and one of 64), exactly as lqx's per-OC weight groups
(``lqx.formats.affine``). ``g = -1`` (or ``g >= K``) is one group per token.

The integer path (:func:`int_linear`) needs the weight's per-OC groups to be the
activation groups (same ``g`` along K): then group ``j`` of a token meets group
``j`` of every output channel, the product of codes is an integer dot product
(int8 x int8, int32 accumulation), and both scales factor out of it::

    y[t, n] = sum_j  float32(sum_{k in j} a[t, k] * w[k, n])  *  (sa[t, j] * sw[j, n])

with the group terms added in order ``j = 0, 1, ..., G-1`` in float32.
:func:`int_linear_reference` computes the same thing from integer-valued float32
codes and equals it bit for bit (its docstring says when and why).

Where lqx departs from FlexQ's code:

* **Short last groups.** FlexQ's quantizer reshapes the whole ``(T, K)`` matrix to
  ``(-1, g)`` and never pads activations, so for ``g`` not dividing K its "groups"
  run across token rows (and across rows of the weight); lqx uses real groups of
  each token, the last one shorter.
* **All-zero groups.** FlexQ clamps every scale to ``[1e-5, 1e4]``; lqx leaves the
  scale ``absmax / qmax`` unclamped and only replaces a zero scale (an all-zero
  group, or one whose scale underflows) by 1, so its codes are 0 and it
  dequantizes to exactly 0. They differ only for groups with
  ``absmax < 1e-5 * qmax`` or ``absmax > 1e4 * qmax``.
* **Precision.** FlexQ runs the model in float16 (scales and products float16,
  the emulated matmul fake-quantized in float16); lqx computes codes and scales in
  float32 whatever ``x``'s dtype, and the integer path accumulates each group in
  int32 and adds the scaled group partial sums in float32 (FlexQ's CUDA kernel adds
  them in its own order and precision).
* **Weights.** FlexQ's symmetric weight grid is ``scale = absmax / (2**(b-1) - 1)``
  (absmax / 31 at 6 bits), codes in ``[-31, 31]``. lqx's ``rtn`` with ``sym=True``
  follows reference GPTQ instead: ``scale = 2 * absmax / (2**b - 1)`` (absmax / 31.5
  at 6 bits), codes ``- 2**(b-1)`` in ``[-32, 31]``, and an all-nonnegative group
  gets ``scale = max / (2**b - 1)``. :func:`absmax_quantize` is FlexQ's grid,
  stored as a symmetric ``QArray`` (its codes never reach ``-2**(b-1)``).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from lqx import tree
from lqx.formats import affine
from lqx.formats.actquant import ActQuant, check_act_bits, check_act_group_size
from lqx.formats.affine import QArray

BLOCK_LINEARS = r"layers_\d+/(attn|mlp)/\w+_proj/kernel"  # as lqx.recipe.BLOCK_LINEARS
DOWN_PROJ = r"layers_\d+/mlp/down_proj/kernel"
NOT_DOWN_PROJ = r"layers_\d+/(attn/\w+|mlp/(gate|up))_proj/kernel"
_HI = jax.lax.Precision.HIGHEST


def code_max(bits: int) -> int:
  """Largest symmetric code magnitude, ``2**(bits-1) - 1`` (127 at 8 bits, 31 at 6)."""
  return (1 << (bits - 1)) - 1


def num_groups(k: int, group_size: int) -> int:
  """``G = ceil(K / g)`` groups along K (``g = -1``: one group)."""
  return 1 if group_size == -1 else -(-k // group_size)


def _group_len(k: int, group_size: int) -> int:
  return k if group_size == -1 else min(group_size, k)


def _grouped(x: jax.Array, group_size: int) -> jax.Array:
  """``(..., K)`` -> ``(..., G, g)``, the short last group padded with zeros."""
  k = x.shape[-1]
  g = _group_len(k, group_size)
  n = num_groups(k, group_size)
  if n * g != k:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n * g - k)])
  return x.reshape(*x.shape[:-1], n, g)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def quantize_activations(x: jax.Array, bits: int, group_size: int) -> tuple[jax.Array, jax.Array]:
  """Dynamic symmetric per-token codes of ``x`` ``(..., K)``: ``(codes int8 (..., K), scale float32 (..., G))``.

  ``G = ceil(K / group_size)``; group ``j`` is channels ``[j*g, (j+1)*g)`` of one token,
  the last one possibly shorter (module doc). ``scale = absmax / (2**(bits-1) - 1)``
  computed in float32, 1 where that is 0 (all-zero group: codes 0, dequantizes to 0);
  ``codes = clip(round(x / scale), -qmax, qmax)`` with IEEE division (``affine.ieee_div``).
  Invariant: ``|x - codes * scale| <= scale / 2`` for every finite ``x``.
  """
  check_act_bits(bits)
  check_act_group_size(group_size)
  qmax = code_max(bits)
  k = x.shape[-1]
  xg = _grouped(x.astype(jnp.float32), group_size)  # (..., G, g)
  scale = affine.ieee_div(jnp.max(jnp.abs(xg), axis=-1), float(qmax))  # (..., G); not x * (1/qmax)
  scale = jnp.where(scale > 0, scale, 1.0)
  codes = jnp.clip(jnp.round(affine.ieee_div(xg, scale[..., None])), -qmax, qmax)
  codes = codes.reshape(*x.shape[:-1], -1)[..., :k]
  return codes.astype(jnp.int8), scale


@functools.partial(jax.jit, static_argnames=("group_size",))
def dequantize_activations(codes: jax.Array, scale: jax.Array, group_size: int) -> jax.Array:
  """float32 ``(..., K)`` ``codes * scale`` of :func:`quantize_activations`' output."""
  k = codes.shape[-1]
  deq = _grouped(codes.astype(jnp.float32), group_size) * scale[..., None]
  return deq.reshape(*codes.shape[:-1], -1)[..., :k]


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def fake_quant(x: jax.Array, bits: int, group_size: int) -> jax.Array:
  """``x`` ``(..., K)`` quantized and dequantized (:func:`quantize_activations`), in ``x``'s dtype.

  The product ``code * scale`` is formed in float32 and then cast, so a bfloat16 ``x``
  gets the float32 value rounded once.
  """
  codes, scale = quantize_activations(x, bits, group_size)
  return dequantize_activations(codes, scale, group_size).astype(x.dtype)


def _check_int_operands(x, w_codes, w_scale, group_size):
  if w_codes.ndim != 2 or w_scale.ndim != 2:
    raise ValueError(f"w_codes {tuple(w_codes.shape)} and w_scale {tuple(w_scale.shape)} must be 2-D (K, N), (G, N)")
  k, n = w_codes.shape
  if x.shape[-1] != k:
    raise ValueError(f"x has {x.shape[-1]} input channels; w_codes {tuple(w_codes.shape)} expects {k}")
  if np.dtype(w_codes.dtype) != np.int8:
    raise ValueError(f"w_codes is {np.dtype(w_codes.dtype)}; expected signed int8 codes (code - zero)")
  want = (num_groups(k, group_size), n)
  if tuple(w_scale.shape) != want:
    raise ValueError(f"w_scale has shape {tuple(w_scale.shape)}; per-OC groups of {group_size} on K={k} need {want} "
                     f"(the weight's groups must be the activation groups)")


def _combine(partial: jax.Array, a_scale: jax.Array, w_scale: jax.Array) -> jax.Array:
  """float32 ``(T, N)``: ``sum_j partial[j] * (a_scale[:, j] * w_scale[j])``, added in order j = 0..G-1.

  ``partial`` ``(G, T, N)`` float32 (exact integers), ``a_scale`` ``(T, G)``, ``w_scale`` ``(G, N)``.
  The optimization barrier keeps both callers' inputs opaque, so XLA compiles the same sum for both.
  """
  partial, a_scale, w_scale = jax.lax.optimization_barrier((partial, a_scale, w_scale))
  y = None
  for j in range(partial.shape[0]):
    term = partial[j] * (a_scale[:, j:j + 1] * w_scale[j:j + 1, :])
    y = term if y is None else y + term
  return y


def _operands(x, w_codes, w_scale, act_bits, group_size):
  """Flattened activation codes ``(G, T, g)``, scales ``(T, G)``, weight codes ``(G, g, N)``, scales float32."""
  k, n = w_codes.shape
  a_codes, a_scale = quantize_activations(x, act_bits, group_size)
  a_codes, a_scale = a_codes.reshape(-1, k), a_scale.reshape(-1, a_scale.shape[-1])
  ag = jnp.moveaxis(_grouped(a_codes, group_size), 1, 0)  # (G, T, g); short group padded with code 0
  wg = _grouped(w_codes.T, group_size).transpose(1, 2, 0)  # (G, g, N)
  return ag, a_scale, wg, w_scale.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("act_bits", "group_size"))
def _int_linear(x, w_codes, w_scale, act_bits, group_size):
  ag, a_scale, wg, ws = _operands(x, w_codes, w_scale, act_bits, group_size)
  acc = jax.lax.dot_general(ag, wg, (((2,), (1,)), ((0,), (0,))),
                            preferred_element_type=jnp.int32)  # (G, T, N) int32
  y = _combine(acc.astype(jnp.float32), a_scale, ws)
  return y.reshape(*x.shape[:-1], w_codes.shape[1])


@functools.partial(jax.jit, static_argnames=("act_bits", "group_size"))
def _int_linear_reference(x, w_codes, w_scale, act_bits, group_size):
  ag, a_scale, wg, ws = _operands(x, w_codes, w_scale, act_bits, group_size)
  partial = jnp.einsum("gtk,gkn->gtn", ag.astype(jnp.float32), wg.astype(jnp.float32), precision=_HI)
  y = _combine(partial, a_scale, ws)
  return y.reshape(*x.shape[:-1], w_codes.shape[1])


def int_linear(x: jax.Array, w_codes: jax.Array, w_scale: jax.Array, *, act_bits: int,
               group_size: int) -> jax.Array:
  """``x[..., K] @ W`` on integers: float32 ``(..., N)``.

  ``w_codes`` int8 ``(K, N)`` signed weight codes (``code - zero``), ``w_scale`` ``(G, N)``
  (any float dtype) for per-OC groups of ``group_size`` along K, the last one possibly
  shorter: ``W[k, n] = w_codes[k, n] * w_scale[k // g, n]``. ``x`` is quantized per token
  in the *same* groups (:func:`quantize_activations` at ``act_bits``); each group's
  codes meet with ``lax.dot_general`` on int8 operands and int32 accumulation
  (``|acc| <= g * 127 * 128``), and the scaled group sums are added in float32 in group
  order (module doc). Equals ``fake_quant(x) @ W`` to float32 rounding, and
  :func:`int_linear_reference` bit for bit.
  """
  check_act_bits(act_bits)
  check_act_group_size(group_size)
  _check_int_operands(x, w_codes, w_scale, group_size)
  return _int_linear(x, w_codes, w_scale, act_bits, group_size)


def int_linear_reference(x: jax.Array, w_codes: jax.Array, w_scale: jax.Array, *, act_bits: int,
                         group_size: int) -> jax.Array:
  """:func:`int_linear` in float arithmetic only, equal to it bit for bit.

  The same activation codes and scales, but each group's product is a float32 matmul
  (``Precision.HIGHEST``) of the codes as integer-valued float32. Every product and
  partial sum is then an integer of magnitude at most ``g * 127 * 128`` (2,080,768 for
  ``g = 128``), below ``2**24``, so each is exact in float32 whatever order the matmul
  adds in, and the group sums equal the int32 accumulators converted to float32. Both
  functions then combine the groups with the same code (``_combine``: the same products
  ``acc * (sa * sw)`` added in the same order), so the results agree bit for bit. Exact
  as long as ``g * 2**(a-1) * 2**(b-1) < 2**24`` (``g < 1024`` at 8-bit activations
  and weights).
  """
  check_act_bits(act_bits)
  check_act_group_size(group_size)
  _check_int_operands(x, w_codes, w_scale, group_size)
  return _int_linear_reference(x, w_codes, w_scale, act_bits, group_size)


# ----------------------------------------------------------------------------- weights and params


def absmax_quantize(w: jax.Array, bits: int = 6, group_size: int = 128, scale_dtype=jnp.float16) -> QArray:
  """FlexQ's symmetric weight RTN: per-OC groups of ``group_size``, ``scale = absmax / (2**(bits-1) - 1)``.

  A symmetric ``QArray`` (zero ``2**(bits-1)``) whose signed codes lie in
  ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``; the scale is rounded to ``scale_dtype``
  first (``affine.round_scale``), an all-zero group gets scale 1. Differs from
  ``rtn`` with ``sym=True`` (module doc: Weights).
  """
  w = jnp.asarray(w)
  if w.ndim != 2:
    raise ValueError(f"expected a 2-D (IC, OC) kernel, got shape {tuple(w.shape)}")
  check_act_group_size(group_size)
  if not 2 <= bits <= 8:
    raise ValueError(f"{bits=} must be in [2, 8]")
  absmax = jnp.max(jnp.abs(_grouped(w.astype(jnp.float32).T, group_size)), axis=-1).T  # (G, OC)
  scale = affine.ieee_div(absmax, float(code_max(bits)))
  scale = jnp.where(scale > 0, scale, 1.0)
  return affine.quantize_with_params(w, scale, None, bits=bits, group_size=group_size, group_axis="oc",
                                     scale_dtype=scale_dtype)


def with_activation_bits(qparams, act_bits: int, group_size: int = 128, paths: str = BLOCK_LINEARS):
  """A copy of ``qparams`` whose quantized kernels at paths matching ``paths`` (in full) quantize their inputs.

  Each such kernel ``k`` becomes ``ActQuant(k, act_bits, group_size)`` (``lqx.formats.actquant``);
  everything else is unchanged (the input is not mutated). Raises ``ValueError`` when
  ``paths`` matches no kernel, matches a float leaf (only quantized kernels are wrapped) or
  a kernel that already quantizes its input. Compose for mixed rules, e.g.
  :func:`flexq_activations`.
  """
  check_act_bits(act_bits)
  check_act_group_size(group_size)
  pattern = re.compile(paths)
  out, hits = qparams, []
  for path in tree.paths(qparams):
    if not pattern.fullmatch(path):
      continue
    leaf = tree.get(qparams, path)
    if isinstance(leaf, ActQuant):
      raise ValueError(f"{path} already quantizes its input at {leaf.act_bits} bits; narrow paths={paths!r}")
    if not tree.is_kernel_leaf(leaf):
      raise ValueError(f"{path} is a float array, not a quantized kernel; quantize its weights first "
                       f"(ActQuant wraps a format)")
    out = tree.replace(out, path, ActQuant(leaf, act_bits, group_size))
    hits.append(path)
  if not hits:
    raise ValueError(f"paths={paths!r} matches no parameter (paths look like {tree.paths(qparams)[:3]})")
  return out


def flexq_activations(qparams, group_size: int = 128):
  """FlexQ's fixed rule (``--flex_linear_quant``): ``down_proj`` inputs at 8 bits, every other block linear at 6."""
  return with_activation_bits(with_activation_bits(qparams, 8, group_size, DOWN_PROJ), 6, group_size, NOT_DOWN_PROJ)
