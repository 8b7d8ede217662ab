"""A PyTorch transcription of reference GPTQ's pipeline, for parity checks (not part of lqx).

Written from the GPTQ paper and the behaviour of IST-DASLab/gptq (``gptq.py``,
``quant.py``, ``llama.py``); no code of the reference is copied. It runs on
transformers' ``LlamaForCausalLM`` in float32, as the reference does:

* ``ref_hessian``: the reference's running average ``H = 2/n_seq * sum x x^T``
  folded one calibration sequence at a time (``GPTQ.add_batch``);
* ``ref_solve``: ``fasterquant`` in the torch layout ``W (OC, IC)``: dead
  inputs, 1% damping of ``mean(diag H)``, ``chol -> cholesky_inverse -> chol
  (upper)``, lazy blocks of 128, dynamic per-OC groups read from ``W`` as of
  the start of the current block (a short last group when ``g`` does not divide
  IC), float32 min-max scales (``scale_dtype`` rounds them, for comparisons);
* ``ref_pipeline``: ``llama_sequential``: block by block, inputs from the
  already-quantized blocks, one calibration sequence per forward; all seven
  Hessians of a block from one forward (the reference's default), or stage by
  stage with ``true_sequential=True`` (its ``--true-sequential`` flag).

``solver="reference"`` with ``reference_dir`` set runs the public reference's own
``GPTQ``/``Quantizer`` classes, imported at run time from a local copy, instead
of ``ref_solve`` (the copy is never part of lqx).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

TRUE_SEQUENTIAL = (("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"), ("self_attn.o_proj",),
                   ("mlp.up_proj", "mlp.gate_proj"), ("mlp.down_proj",))
ALL_LINEARS = tuple(n for stage in TRUE_SEQUENTIAL for n in stage)
# torch module name -> lqx param path inside a block
LQX_NAME = {"self_attn.q_proj": "attn/q_proj", "self_attn.k_proj": "attn/k_proj",
            "self_attn.v_proj": "attn/v_proj", "self_attn.o_proj": "attn/o_proj",
            "mlp.gate_proj": "mlp/gate_proj", "mlp.up_proj": "mlp/up_proj", "mlp.down_proj": "mlp/down_proj"}


class RefHessian:
  """The reference's streaming Hessian: ``H = 2/n * sum_seq X^T X`` with n counting sequences."""

  def __init__(self, ic: int, dtype=torch.float32):
    self.h = torch.zeros((ic, ic), dtype=dtype)
    self.n = 0

  def add(self, x: torch.Tensor) -> None:
    """x: (B, T, IC) inputs of the linear; B sequences."""
    b = x.shape[0] if x.ndim == 3 else 1
    x = x.reshape(-1, x.shape[-1]).t().to(self.h.dtype)
    self.h *= self.n / (self.n + b)
    self.n += b
    x = math.sqrt(2 / self.n) * x
    self.h += x.matmul(x.t())


def _params(x: torch.Tensor, maxq: int, sym: bool, scale_dtype):
  """Min-max (scale, zero) per row of ``x`` (OC, g), the range holding 0, as the reference's Quantizer."""
  zeros = torch.zeros(x.shape[0], dtype=x.dtype)
  xmin = torch.minimum(x.min(1)[0], zeros)
  xmax = torch.maximum(x.max(1)[0], zeros)
  if sym:
    xmax = torch.maximum(xmin.abs(), xmax)
    xmin = torch.where(xmin < 0, -xmax, xmin)
  empty = (xmin == 0) & (xmax == 0)
  xmin = torch.where(empty, -1.0, xmin)
  xmax = torch.where(empty, 1.0, xmax)
  scale = (xmax - xmin) / maxq
  if scale_dtype is not None and scale_dtype != x.dtype:  # rounded to the storage dtype, kept in x's precision
    scale = scale.to(scale_dtype).to(x.dtype)
  zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
  return scale, zero


@torch.no_grad()
def ref_solve(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False,
              damp: float = 0.01, block_size: int = 128, scale_dtype=None, dtype=torch.float32,
              u_dtype=None):
  """GPTQ of torch-layout ``w`` (OC, IC) with Hessian ``h`` (IC, IC).

  Returns ``(q, codes)``: dequantized weights (OC, IC) and integer codes (OC, IC) int64.
  ``dtype=torch.float64`` runs the same steps in double precision (a yardstick for float32 rounding;
  with ``scale_dtype=torch.float32`` its scales are rounded to float32 as lqx stores them);
  ``u_dtype=torch.float64`` factors H in double precision only (U then rounded to ``dtype``).
  """
  W = w.clone().to(dtype)
  H = h.clone().to(dtype)
  oc, ic = W.shape
  maxq = 2**bits - 1
  if group_size == -1:
    scale, zero = _params(W, maxq, sym, scale_dtype)
  dead = torch.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  idx = torch.arange(ic)
  H[idx, idx] += damp * torch.mean(torch.diag(H))
  Hu = H if u_dtype is None else H.to(u_dtype)
  U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hu)), upper=True).to(dtype)
  Q = torch.zeros_like(W)
  codes = torch.zeros((oc, ic), dtype=torch.int64)
  for i1 in range(0, ic, block_size):
    i2 = min(i1 + block_size, ic)
    W1 = W[:, i1:i2].clone()
    err1 = torch.zeros_like(W1)
    for i in range(i2 - i1):
      c = i1 + i
      if group_size != -1 and c % group_size == 0:
        scale, zero = _params(W[:, c:c + group_size], maxq, sym, scale_dtype)
      col = W1[:, i]
      q = torch.clamp(torch.round(col / scale) + zero, 0, maxq)
      codes[:, c] = q.long()
      Q[:, c] = scale * (q - zero)
      e = (col - Q[:, c]) / U[c, c]
      W1[:, i:] -= e[:, None] * U[c, c:i2][None, :]
      err1[:, i] = e
    W[:, i2:] -= err1.matmul(U[i1:i2, i2:])
  return Q, codes


def official_solver(reference_dir: str):
  """A solver with ``ref_solve``'s signature that runs IST-DASLab/gptq's classes from ``reference_dir``.

  It returns ``(q, None)``: the reference keeps no codes, so compare dequantized weights.
  """
  if reference_dir not in sys.path:
    sys.path.insert(0, reference_dir)
  import gptq as official  # noqa: PLC0415  (the local copy, at run time)
  import quant as official_quant  # noqa: PLC0415
  torch.cuda.synchronize = lambda *a, **k: None  # the reference times itself with CUDA syncs

  @torch.no_grad()
  def solve(w, h, bits, group_size=128, sym=False, damp=0.01, block_size=128, scale_dtype=None):
    if scale_dtype not in (None, torch.float32):
      raise ValueError("the official reference keeps float32 scales")
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = w.clone().float()
    g = official.GPTQ(layer)
    g.H = h.clone().float()
    g.quantizer = official_quant.Quantizer()
    g.quantizer.configure(bits, perchannel=True, sym=sym, mse=False)
    import contextlib, io  # noqa: E401,PLC0415
    with contextlib.redirect_stdout(io.StringIO()):
      g.fasterquant(blocksize=block_size, percdamp=damp, groupsize=group_size)
    return layer.weight.data.clone(), None

  return solve


def _layer_kwargs(model, tokens: torch.Tensor):
  """The keyword arguments the model passes to its decoder layers (mask, positions, rotary)."""
  seen = {}

  class Stop(Exception):
    pass

  def grab(_module, args, kwargs):
    seen["args"], seen["kwargs"] = args, kwargs
    raise Stop

  handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
  try:
    model(tokens)
  except Stop:
    pass
  finally:
    handle.remove()
  return seen["args"][0], {k: v for k, v in seen["kwargs"].items() if k not in ("hidden_states",)}


@torch.no_grad()
def ref_pipeline(model, tokens: np.ndarray, bits: int, group_size: int, *, sym: bool = False,
                 true_sequential: bool = False, solver=ref_solve, scale_dtype=None, n_blocks: int | None = None,
                 on_layer=None, progress: bool = True, batch_size: int = 1,
                 hessian_dtype=torch.float32) -> dict:
  """Reference GPTQ over ``model`` (quantized in place) on calibration ``tokens`` (N, T).

  ``on_layer(block_index, lqx_path, w, h, q, codes)`` is called after each solve
  with torch tensors in the torch layout. Returns ``{lqx_path: codes (IC, OC) int}``.
  ``batch_size`` (sequences per forward; the reference uses 1) and ``hessian_dtype``
  change only float rounding: they measure how much the result moves under it.
  """
  model.config.use_cache = False
  layers = model.model.layers
  n_blocks = len(layers) if n_blocks is None else n_blocks
  toks = torch.from_numpy(np.asarray(tokens, np.int64))
  _, kwargs = _layer_kwargs(model, toks[:batch_size])
  inps = [model.model.embed_tokens(toks[j:j + batch_size]) for j in range(0, len(toks), batch_size)]
  stages = TRUE_SEQUENTIAL if true_sequential else (ALL_LINEARS,)
  out_codes = {}
  for i in tqdm(range(n_blocks), desc="reference blocks", disable=not progress):
    layer = layers[i]
    mods = dict(layer.named_modules())
    for stage in stages:
      hs = {name: RefHessian(mods[name].in_features, hessian_dtype) for name in stage}
      hooks = [mods[name].register_forward_hook(lambda m, a, o, name=name: hs[name].add(a[0].data))
               for name in stage]
      for x in inps:
        layer(x, **kwargs)
      for hk in hooks:
        hk.remove()
      for name in stage:
        w = mods[name].weight.data.clone()
        q, codes = solver(w, hs[name].h.float(), bits, group_size, sym=sym, scale_dtype=scale_dtype)
        path = f"layers_{i}/{LQX_NAME[name]}/kernel"
        if on_layer is not None:
          on_layer(i, path, w, hs[name].h, q, codes)
        mods[name].weight.data = q.to(w.dtype)
        out_codes[path] = None if codes is None else codes.t().numpy()
        del hs[name]
    outs = []
    for x in inps:
      y = layer(x, **kwargs)
      outs.append(y[0] if isinstance(y, tuple) else y)
    inps = outs
  return out_codes
