"""GPTQ (Frantar et al. 2022), faithful to IST-DASLab/gptq ``gptq.py``, in our layout.

The reference works on the torch weight ``W_ref`` ``(OC, IC)``, whose columns
are input channels; our kernel is ``w = W_ref.T`` ``(IC, OC)``, so every
reference *column* is a *row* of ``w`` here and ``H`` is ``(IC, IC)``.

Steps (reference ``fasterquant``, same order):

1. per-channel / per-tensor group parameters come from the original ``w``;
2. dead inputs (``H_ii == 0``): ``H_ii = 1`` and row ``i`` of ``w`` is zeroed;
3. ``static_groups``: per-OC group parameters from the (dead-zeroed) ``w``;
4. ``act_order``: rows and ``H`` permuted by descending ``diag H`` (stable:
   ties keep index order; torch's descending argsort is not stable);
5. ``H += damp * mean(diag H) * I``; if the Cholesky factorization fails
   (NaN), retry with ``damp * 10**k`` for ``k <= max_damp_retries``, then raise
   ``ValueError`` naming the layer;
6. ``U``: upper Cholesky factor of ``H^-1``, computed as the inverse of the
   upper-triangular ``R`` with ``H = R R^T`` (``R`` from :func:`cholesky` of the
   index-reversed ``H``): one factorization, where the reference goes chol ->
   cholesky_inverse -> chol; equal in exact arithmetic;
7. rows in blocks of ``block_size``: each row ``c`` is quantized, its error
   ``e = (w_c - q_c) / U_cc`` is fed back into the later rows of the block
   (``w_j -= U_cj e``), and after the block into all later rows at once
   (lazy batch update).

Group parameters per layout:

* per-OC groups, dynamic (default): at each group's first row ``c`` (every
  multiple of ``g``, in act-order if enabled), from rows ``[c, min(c+g, IC))`` of
  ``w`` *as of the start of the current block* -- the reference reads
  ``W[:, c:c+g]``, which holds every earlier block's update but not the current
  block's in-block updates (the two agree whenever ``block_size`` divides
  ``g``). When ``g`` does not divide IC the last group is shorter, as the
  reference's slice is (IC=576, g=128: 4 x 128 + 64); its parameters see only
  its own rows. With act-order the groups are consecutive in act-order, so the
  QArray stores rows in that order with ``perm``.
* per-OC groups, ``static_groups``: fixed before the solve from the unpermuted
  ``w``, groups ``[i, i+g)`` for ``i = 0, g, 2g, ...`` (the last may be
  shorter); row ``c`` uses group ``perm[c] // g`` (stored in original order).
* per-OC ``g >= IC``: one group per output channel, parameters taken like a
  dynamic (or static) group, i.e. after dead rows are zeroed (``-1`` takes them
  before, step 1).
* per-IC groups (AdaDim, johnheo/adadim-llm ``gptq.py`` ``cfg='ic'``): when row
  ``c`` (one input channel) is reached, its groups of ``g`` consecutive output
  channels get min-max parameters from the row as already updated by error
  feedback, then the row is quantized with them. We use the same min-max rule
  as everywhere (``lqx.quant.grid.find_params``: range contains 0, sym/mse
  options); AdaDim's ``pseudo_quantize_tensor`` uses AWQ's ``[min, max]`` with a
  ``1e-5`` clamp instead.
* ``group_size=-1`` (per channel) and ``group_axis="tensor"``: fixed in step 1.

Precision: the solve runs in float32, or in float64 when ``H`` is float64 under
``jax.enable_x64`` (scales are still rounded to ``scale_dtype``). Two correct
float32 solves of an ill-conditioned ``H`` can differ in ~0.2% of codes (near-tie
flips fed forward); in float64 lqx and the reference transcription agree in every
layer (``experiments/gptq_parity.py``, ``tests/test_gptq_pipeline.py``).

Rows of ``w`` (output channels are its columns) are independent given ``H``;
the solve only contracts over IC, so ``w`` may be sharded along OC.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

from lqx.formats import affine
from lqx.formats.affine import QArray
from lqx.quant import grid

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
  """GPTQ settings (reference defaults). Hashable: usable as a static jit argument."""

  bits: int
  group_size: int = 128  # -1: one group spanning the axis (per-channel)
  group_axis: str = "oc"  # "oc" | "ic" | "tensor"
  sym: bool = False
  act_order: bool = False
  static_groups: bool = False  # per-OC groups only
  damp: float = 0.01  # relative to mean(diag H)
  block_size: int = 128
  mse: bool = False
  scale_dtype: Any = jnp.float16
  max_damp_retries: int = 3  # damp * 10**k, k = 1..max_damp_retries, after a failed Cholesky

  name = "gptq"
  stats = ("hessian",)

  def quantize(self, w: jax.Array, stats: dict, *, name: str | None = None, solved: dict | None = None,
               **_) -> tuple[QArray, dict]:
    """Method protocol (``lqx.quant``): :func:`gptq_quantize` with ``stats["hessian"]``.

    ``solved``: config -> ``(QArray, info)`` already made by :meth:`quantize_shared`.
    """
    if solved and self in solved:
      return solved[self]
    if stats.get("hessian") is None:
      raise ValueError(f"{name}: GPTQ needs calibration data (a Hessian); pass calibration tokens")
    return gptq_quantize(w, stats["hessian"], self, name=name)

  def shared(self, shape) -> list:
    """Configs whose solve kernels reading one input can share (:func:`can_share_solve`)."""
    return [self] if can_share_solve(self) else []

  def quantize_shared(self, ws: list, stats: dict, names: list) -> list:
    return gptq_quantize_shared(ws, stats["hessian"], self, names=names)

  def __post_init__(self):
    grid.check_layout_config(self.bits, self.group_size, self.group_axis)
    object.__setattr__(self, "scale_dtype", affine.check_scale_dtype(self.scale_dtype))
    if self.static_groups and (self.group_axis != "oc" or self.group_size == -1):
      raise ValueError(
          f"static_groups applies to per-OC groups (group_axis='oc', group_size > 0), "
          f"got group_axis={self.group_axis!r}, group_size={self.group_size}")
    if not self.damp > 0:
      raise ValueError(f"damp={self.damp} must be > 0 (a fraction of mean(diag H))")
    if not isinstance(self.block_size, int) or self.block_size <= 0:
      raise ValueError(f"block_size={self.block_size} must be a positive int")
    if not isinstance(self.max_damp_retries, int) or self.max_damp_retries < 0:
      raise ValueError(f"max_damp_retries={self.max_damp_retries} must be an int >= 0")


def _mode(config: GPTQConfig) -> str:
  if config.group_axis == "ic":
    return "ic"
  if config.group_axis == "tensor" or config.group_size == -1:
    return "fixed"
  return "static" if config.static_groups else "dynamic"


CHOL_BLOCK = 128


def _cholesky_small(a: jax.Array) -> jax.Array:
  """Lower Cholesky factor of a ``(b, b)`` block, column by column in a ``fori_loop``.

  A non-positive pivot makes ``sqrt`` NaN, and NaN reaches every later column.
  """
  rows = jnp.arange(a.shape[0])

  def column(j, l):
    v = a[:, j] - jnp.einsum("ik,k->i", l, l[j], precision=_HI)  # columns >= j of l are still zero
    return l.at[:, j].set(jnp.where(rows >= j, v / jnp.sqrt(v[j]), 0.0))

  return jax.lax.fori_loop(0, a.shape[0], column, jnp.zeros_like(a))


def cholesky(a: jax.Array, block: int = CHOL_BLOCK) -> jax.Array:
  """Lower Cholesky factor of a symmetric ``(n, n)`` matrix; NaN if it is not positive definite.

  Right-looking by blocks, unrolled at trace time so that each trailing update
  touches only the trailing submatrix (``2 n^3 / 3`` flops in matmuls); the
  diagonal blocks are factored by :func:`_cholesky_small`. Not
  ``jnp.linalg.cholesky`` because on CPU that is OpenBLAS potrf, whose threads
  contend with XLA's pool: on 2 busy cores a 576^2 factorization took 0.1-0.5 s
  and a 4096^2 one 1.2-3.2 s (0.6 s with one OpenBLAS thread).
  """
  n = a.shape[0]
  l = jnp.zeros_like(a)
  for k0 in range(0, n, block):
    k1 = min(k0 + block, n)
    lkk = _cholesky_small(a[k0:k1, k0:k1])
    l = l.at[k0:k1, k0:k1].set(lkk)
    if k1 < n:
      panel = jax.scipy.linalg.solve_triangular(lkk, a[k1:, k0:k1].T, lower=True).T  # (n - k1, b)
      l = l.at[k1:, k0:k1].set(panel)
      a = a.at[k1:, k1:].add(-jnp.einsum("ib,jb->ij", panel, panel, precision=_HI))
  return l


def inv_lower(l: jax.Array, block: int = CHOL_BLOCK) -> jax.Array:
  """Inverse of a lower-triangular ``(n, n)`` matrix, block row by block row (unrolled, ``~2 n^3 / 3`` flops).

  ``X = L^-1``: ``X_ii = L_ii^-1`` and ``X_i,:i = -X_ii L_i,:i X_:i,:i``. NaN in ``l`` reaches ``X``.
  """
  n = l.shape[0]
  x = jnp.zeros_like(l)
  for i0 in range(0, n, block):
    i1 = min(i0 + block, n)
    xii = jax.scipy.linalg.solve_triangular(l[i0:i1, i0:i1], jnp.eye(i1 - i0, dtype=l.dtype), lower=True)
    x = x.at[i0:i1, i0:i1].set(xii)
    if i0:
      inner = jnp.einsum("ik,kj->ij", l[i0:i1, :i0], x[:i0, :i0], precision=_HI)
      x = x.at[i0:i1, :i0].set(-jnp.einsum("ik,kj->ij", xii, inner, precision=_HI))
  return x


def inv_chol_upper(h: jax.Array, damp: float, max_retries: int):
  """Upper Cholesky factor ``U`` of ``(H + d I)^-1`` (``U^T U``), ``d = damp * 10**k * mean(diag H)``.

  ``k`` is the first of ``0..max_retries`` whose factorization is finite.
  Returns ``(U, damp * 10**k, ok)``; ``ok`` is False if every attempt failed.
  """
  n = h.shape[0]
  eye = jnp.eye(n, dtype=h.dtype)
  h = (h + h.T) / 2
  mean_diag = jnp.mean(jnp.diagonal(h))

  def attempt(k):
    rel = damp * (10.0 ** k.astype(h.dtype))
    hd = h + (rel * mean_diag) * eye
    # H = R R^T with R upper: R is the lower factor L of the index-reversed H,
    # reversed, and U = R^-1 is L^-1 reversed.
    rev = jnp.arange(n - 1, -1, -1)  # a gather, not lax.rev: XLA's simplifier aborts on rev here for n <= 128
    u = inv_lower(cholesky(hd[rev][:, rev]))[rev][:, rev]
    return u, rel, jnp.all(jnp.isfinite(u))

  def cond(state):
    k, _, _, ok = state
    return (~ok) & (k < max_retries)

  def body(state):
    k = state[0] + 1
    return (k, *attempt(k))

  k0 = jnp.zeros((), jnp.int32)
  _, u, rel, ok = jax.lax.while_loop(cond, body, (k0, *attempt(k0)))
  return u, rel, ok


@functools.partial(jax.jit, static_argnames=("config",))
def _solve(w: jax.Array, h: jax.Array, config: GPTQConfig):
  ic, oc = w.shape
  bits, g, sd = config.bits, config.group_size, config.scale_dtype
  mode = _mode(config)
  mq = affine.maxq(bits)
  fp = functools.partial(grid.find_params, bits=bits, sym=config.sym, mse=config.mse, scale_dtype=sd)
  ft = jnp.promote_types(h.dtype, jnp.float32)  # float64 only for a float64 H under jax.enable_x64
  w0 = w.astype(ft)
  h0 = h.astype(ft)

  # 1. Fixed (per-channel / per-tensor) parameters, from w before dead rows are zeroed.
  if mode == "fixed":
    if config.group_axis == "tensor":
      s, z = fp(w0, axis=(0, 1))
      fixed = (jnp.full((oc,), s), jnp.full((oc,), z))
    else:
      fixed = fp(w0, axis=0)
  # 2. Dead inputs.
  dead = jnp.diagonal(h0) == 0
  hh = h0 + jnp.diag(dead.astype(ft))
  ww = jnp.where(dead[:, None], 0.0, w0)
  if mode in ("static", "dynamic"):
    gsz = affine.group_shape(w.shape, g, "oc")[0]  # min(g, IC); groups start at multiples of it
    n_groups = -(-ic // gsz)
    ragged = n_groups * gsz != ic  # the last group is shorter
  # 3. Static groups on the unpermuted rows.
  if mode == "static":
    x, mask = ww, None
    if ragged:  # pad to whole groups; the mask keeps the padding out of the parameters
      x = jnp.pad(ww, ((0, n_groups * gsz - ic), (0, 0)))
      mask = (jnp.arange(n_groups * gsz) < ic).reshape(n_groups, gsz, 1)
    static_s, static_z = fp(x.reshape(n_groups, gsz, oc), axis=1, mask=mask)  # (G, OC)
  # 4. Act-order.
  perm = jnp.argsort(-jnp.diagonal(hh)) if config.act_order else jnp.arange(ic)
  if config.act_order:
    ww = ww[perm]
    hh = hh[perm][:, perm]
  # 5-6. Damping and the upper Cholesky factor of H^-1.
  u, damp_rel, ok = inv_chol_upper(hh, config.damp, config.max_damp_retries)

  # 7. Blocked column (here: row) loop. Pad to whole blocks; padded rows are
  # zero, have U_cc = 1 and no coupling, so they never touch real rows.
  bs = config.block_size
  nb = -(-ic // bs)
  icp = nb * bs
  wp = jnp.pad(ww, ((0, icp - ic), (0, 0)))
  up = jnp.pad(u, ((0, icp - ic), (0, icp - ic))) + jnp.diag(
      (jnp.arange(icp) >= ic).astype(ft))

  if mode == "ic":
    go = oc if g == -1 else g
    store = (jnp.zeros((icp, oc // go), ft),) * 2  # per-row group params
  elif mode == "dynamic":
    store = (jnp.zeros((n_groups, oc), ft),) * 2  # per-group params
  else:
    store = ()
  cur0 = (jnp.ones((oc,), ft), jnp.zeros((oc,), ft))

  def row_params(c, row, snapshot, store, cur):
    """(scale, zero) for row ``c`` (both (OC,)), plus updated store / current group."""
    if mode == "fixed":
      return fixed[0], fixed[1], store, cur
    if mode == "static":
      gi = perm[jnp.minimum(c, ic - 1)] // gsz
      return static_s[gi], static_z[gi], store, cur
    if mode == "ic":
      s, z = fp(row.reshape(oc // go, go), axis=1)  # (OC/go,)
      store = tuple(jax.lax.dynamic_update_slice(a, v[None], (c, 0)) for a, v in zip(store, (s, z)))
      return jnp.repeat(s, go), jnp.repeat(z, go), store, cur
    # dynamic per-OC groups: new parameters at each group start (the reference's
    # W[:, c:c+g] as of the block start). The short last group is read through a
    # window moved back to fit the padded rows, masked to rows [c, IC).
    def new_group(operand):
      store, _ = operand
      start = jnp.minimum(c, icp - gsz)  # = c unless the last group is short
      x = jax.lax.dynamic_slice(snapshot, (start, 0), (gsz, oc))
      mask = None
      if ragged:
        rows = start + jnp.arange(gsz)
        mask = ((rows >= c) & (rows < ic))[:, None]
      cur = fp(x, axis=0, mask=mask)
      store = tuple(jax.lax.dynamic_update_slice(a, v[None], (c // gsz, 0)) for a, v in zip(store, cur))
      return store, cur

    store, cur = jax.lax.cond((c % gsz == 0) & (c < ic), new_group, lambda operand: operand, (store, cur))
    return cur[0], cur[1], store, cur

  def block(b, carry):
    wfull, codes, store, cur, loss = carry
    i1 = b * bs
    w1 = jax.lax.dynamic_slice(wfull, (i1, 0), (bs, oc))
    u1 = jax.lax.dynamic_slice(up, (i1, i1), (bs, bs))

    def column(i, c2):
      codes1, err1, store, cur, loss = c2
      c = i1 + i
      # In-block feedback, applied when the row is reached (left-looking):
      # row = w1[i] - sum_{j<i} U_ji e_j; err1 rows >= i are still zero.
      row = w1[i] - jnp.einsum("b,bo->o", u1[:, i], err1, precision=_HI)
      d = u1[i, i]
      s, z, store, cur = row_params(c, row, wfull, store, cur)
      q = jnp.clip(jnp.round(affine.ieee_div(row, s)) + z, 0, mq)
      qrow = s * (q - z)
      err = affine.ieee_div(row - qrow, d)
      loss = loss + 0.5 * err**2  # per output channel: no cross-OC reduction
      codes1 = jax.lax.dynamic_update_slice(codes1, q.astype(jnp.uint8)[None], (i, 0))
      err1 = jax.lax.dynamic_update_slice(err1, err[None], (i, 0))
      return codes1, err1, store, cur, loss

    init = (jnp.zeros((bs, oc), jnp.uint8), jnp.zeros((bs, oc), ft), store, cur, loss)
    codes1, err1, store, cur, loss = jax.lax.fori_loop(0, bs, column, init)
    codes = jax.lax.dynamic_update_slice(codes, codes1, (i1, 0))
    # Lazy batch update of every later row: w[i2:] -= U[i1:i2, i2:]^T err1.
    urows = jax.lax.dynamic_slice(up, (i1, 0), (bs, icp))
    urows = jnp.where(jnp.arange(icp)[None, :] >= i1 + bs, urows, 0.0)
    wfull = wfull - jnp.einsum("bj,bo->jo", urows, err1, precision=_HI)
    return wfull, codes, store, cur, loss

  carry = (wp, jnp.zeros((icp, oc), jnp.uint8), store, cur0, jnp.zeros((oc,), ft))
  _, codes, store, _, gptq_loss = jax.lax.fori_loop(0, nb, block, carry)
  codes = codes[:ic]

  # Back to storage layout.
  invperm = jnp.argsort(perm)
  qperm = None
  if mode == "dynamic":
    scale, zero = store
    qperm = perm if config.act_order else None
  else:
    if config.act_order:
      codes = codes[invperm]
    if mode == "ic":
      scale, zero = (a[:ic] for a in store)
      if config.act_order:
        scale, zero = scale[invperm], zero[invperm]
    elif mode == "static":
      scale, zero = static_s, static_z
    elif config.group_axis == "tensor":
      scale, zero = fixed[0][:1, None], fixed[1][:1, None]
    else:
      scale, zero = fixed[0][None], fixed[1][None]
  damp_abs = damp_rel * jnp.mean(jnp.diagonal(hh))
  return codes, scale, zero, qperm, gptq_loss, damp_rel, damp_abs, ok


@jax.jit
def _delta(w, q):
  return w.astype(jnp.float32) - q.astype(jnp.float32)


@jax.jit
def _matmul(h, d):
  return jnp.einsum("ij,jo->io", h.astype(jnp.float32), d, precision=_HI)


@jax.jit
def _inner(d, hd):
  return jnp.sum(d * hd)


def proxy_loss(w: jax.Array, q: jax.Array, h: jax.Array) -> jax.Array:
  """``tr((w - q)^T H (w - q))`` for ``(IC, OC)`` kernels ``w, q`` and ``H`` ``(IC, IC)``, float32.

  Three separate jits on purpose: XLA:CPU fuses matmul + reduction into one
  kernel that runs several times slower than the matmul alone.
  """
  d = _delta(w, q)
  return _inner(d, _matmul(h, d))


def gptq_quantize(w: jax.Array, h: jax.Array, config: GPTQConfig, *,
                  name: str | None = None) -> tuple[QArray, dict]:
  """GPTQ-quantize an ``(IC, OC)`` kernel given its input Hessian ``h`` ``(IC, IC)``.

  Returns ``(QArray, info)``; ``info`` holds Python floats:

  * ``proxy_loss``: ``tr((w - Q)^T H (w - Q))`` with ``w`` and ``H`` as given and
    ``Q = affine.dequantize()`` (``= 2/N ||X w - X Q||^2`` for ``H = 2/N X^T X``);
  * ``gptq_loss``: the reference's printed error, ``sum (w_c - q_c)^2 / U_cc^2 / 2``;
  * ``damp``: relative damping used (``config.damp * 10**k``); ``damp_abs`` the
    absolute value added to ``diag H``;
  * ``seconds``: wall time of the solve (compilation included on the first
    call for a shape and config; the proxy loss is not timed);
  * ``scale_dtype`` / ``scale_dtype_requested``: only when the scales fell outside
    ``config.scale_dtype``'s range and the kernel was solved again with float32 scales.

  Not itself jittable (it checks the factorization on the host to raise); the
  solve inside is one jitted computation per shape and config.

  Raises ``ValueError`` (naming the layer ``name``) on bad shapes, NaN/Inf in
  ``w`` or ``h``, or a Hessian that is not positive definite after all retries.
  Output channels may be sharded: pass ``w`` with a ``NamedSharding`` over OC.
  """
  return gptq_quantize_shared([w], h, config, names=[name])[0]


def can_share_solve(config: GPTQConfig) -> bool:
  """Whether kernels with one Hessian can be solved together, side by side along OC.

  Output channels are independent given ``H`` for per-OC groups and per-channel
  parameters; per-tensor and per-IC groups couple output channels.
  """
  return config.group_axis == "oc"


def gptq_quantize_shared(ws: list, h: jax.Array, config: GPTQConfig, *,
                         names: list | None = None) -> list[tuple[QArray, dict]]:
  """:func:`gptq_quantize` of several ``(IC, OC_i)`` kernels that read the same input (one ``h``).

  With per-OC groups (:func:`can_share_solve`) the kernels are solved in one
  call, concatenated along OC (q/k/v, or gate/up, of a LLaMA block): output
  channels are independent given ``H``, so each kernel gets the codes a solve of
  its own gives, in fewer, wider column steps. ``info["seconds"]`` is then the
  shared solve's time split by output channels.
  """
  names = [None] * len(ws) if names is None else list(names)
  layers = [f"layer {n!r}" if n else "unnamed layer (pass name=...)" for n in names]
  for w, layer in zip(ws, layers):
    grid.check_kernel(w, config.group_size, config.group_axis, name=f"w of {layer}")
  ic = ws[0].shape[0]
  for w, layer in zip(ws, layers):
    if tuple(h.shape) != (ic, ic) or w.shape[0] != ic:
      raise ValueError(f"H of {layer} has shape {tuple(h.shape)}; w {tuple(w.shape)} needs "
                       f"({w.shape[0]}, {w.shape[0]})")
  if not isinstance(h, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(h))):
    raise ValueError(f"H of {', '.join(layers)} has NaN/Inf entries")
  if len(ws) > 1 and not can_share_solve(config):
    return [gptq_quantize_shared([w], h, config, names=[n])[0] for w, n in zip(ws, names)]
  t0 = time.perf_counter()
  w_all = ws[0] if len(ws) == 1 else jnp.concatenate([w.astype(ws[0].dtype) for w in ws], axis=1)
  codes, scale, zero, perm, loss, damp_rel, damp_abs, ok = jax.block_until_ready(_solve(w_all, h, config))
  seconds = time.perf_counter() - t0
  if not bool(ok):
    top = config.damp * 10.0 ** config.max_damp_retries
    raise ValueError(
        f"GPTQ on {', '.join(layers)}: H is not positive definite even with damping {top:g} * mean(diag H) "
        f"(damp={config.damp}, max_damp_retries={config.max_damp_retries}); check the calibration "
        f"inputs or raise max_damp_retries")
  out, o0 = [], 0
  for w in ws:
    o1 = o0 + w.shape[1]
    cols = slice(o0, o1) if len(ws) > 1 else slice(None)
    qa = affine.from_codes(codes[:, cols], scale[:, cols], None if config.sym else zero[:, cols],
                           bits=config.bits, group_size=config.group_size, group_axis=config.group_axis,
                           dtype=w.dtype, scale_dtype=config.scale_dtype, perm=perm)
    info = dict(proxy_loss=float(proxy_loss(w, qa.dequantize(), h)), gptq_loss=float(jnp.sum(loss[cols])),
                damp=float(damp_rel), damp_abs=float(damp_abs), seconds=seconds * w.shape[1] / w_all.shape[1])
    out.append((qa, info))
    o0 = o1
  redo = [i for i, (qa, _) in enumerate(out) if grid.scales_out_of_range(qa.scale, config.scale_dtype)]
  if redo:  # scales clipped by the storage dtype: solve those kernels again with float32 scales
    grid.warn_scale_fallback(config.scale_dtype)
    wide = dataclasses.replace(config, scale_dtype=grid.FALLBACK_SCALE_DTYPE)
    again = gptq_quantize_shared([ws[i] for i in redo], h, wide, names=[names[i] for i in redo])
    for i, (qa, info) in zip(redo, again):
      out[i] = (qa, {**info, **grid.fallback_info(config.scale_dtype)})
  return out
