"""Block-ablation sensitivity of a LLaMA model: the calibration loss with one block skipped, or restored.

HierarchicalPrune (arXiv 2508.04663) ranks blocks by the change in quality when one is
removed; the float-restore below is the same probe for a quantized model. Both losses are
the mean next-token NLL (nats/token) over the calibration windows (N, T), the loss of
``lqx.quant.fisher.llama_loss`` averaged over windows:

* skip (``skip_block_losses``): the float model with block i skipped, i.e. the residual
  stream passes through it unchanged. Zeroing block i's o_proj and down_proj kernels
  makes its residual contribution exactly zero (``skip_block``), so any forward runs
  the skipped model; this equals a forward that omits the block.
* float-restore (``restore_block_losses``): the quantized model with block i's params
  restored to float (``restore_blocks``).

Sign conventions (``BlockAblation.deltas``): positive means the block matters, for both.
skip: ``losses[i] - base`` with ``base`` the float loss (> 0: removing the block hurts).
restore: ``base - losses[i]`` with ``base`` the quantized loss (> 0: quantizing the block
costs that much loss; restoring it wins it back).

Cost: the residual stream before every block is computed once per model and batch;
ablating block i then runs blocks i..L-1 and the head only (on average about 0.6 of a
forward's FLOPs for SmolLM2, estimated). One jitted function serves every block and both ablations: the
block params it receives change, their structure does not. Quantized kernels are taken
as their dequantized weights (``x @ dequantize()``, what weight-only formats compute);
activation-quantized kernels (``ActQuant``) are refused.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lqx import data, nn, tree
from lqx.models import llama


@dataclasses.dataclass(frozen=True)
class BlockAblation:
  """Per-block losses (nats/token) of one ablation on the calibration windows.

  ``kind``: ``"skip"`` (``base`` = float loss, ``losses[i]`` = block i skipped) or
  ``"restore"`` (``base`` = quantized loss, ``losses[i]`` = block i float).
  ``float_loss``: the float model's loss (for skip, equal to ``base``).
  """

  kind: str
  base: float
  float_loss: float
  losses: tuple[float, ...]

  @property
  def deltas(self) -> tuple[float, ...]:
    """Loss change per block, positive when the block matters (module docstring)."""
    if self.kind == "skip":
      return tuple(l - self.base for l in self.losses)
    return tuple(self.base - l for l in self.losses)


def skip_block(params: dict, i: int) -> dict:
  """A copy of ``params`` whose block ``i`` adds nothing to the residual stream (o_proj, down_proj zeroed)."""
  name = f"layers_{i}"
  if name not in params:
    raise ValueError(f"block {i} is not in the model ({sum(k.startswith('layers_') for k in params)} blocks)")
  return {**params, name: _zero_residual(params[name])}


def restore_blocks(qparams: dict, params: dict, blocks) -> dict:
  """A copy of ``qparams`` with the blocks ``blocks`` (indices) taken from the float ``params``."""
  out = dict(qparams)
  for i in blocks:
    name = f"layers_{i}"
    if name not in params or name not in qparams:
      raise ValueError(f"block {i} is not in both models")
    out[name] = params[name]
  return out


def skip_block_losses(config: llama.LlamaConfig, params: dict, tokens, *, batch_size: int = 4,
                      progress: bool = True) -> BlockAblation:
  """Loss of the float model with each block skipped in turn (``kind="skip"``). tokens: (N, T) ints."""
  f = _float_tree(params, "params")
  return _ablate(config, "skip", f, f, tokens, batch_size, progress)


def restore_block_losses(config: llama.LlamaConfig, qparams: dict, params: dict, tokens, *, batch_size: int = 4,
                         progress: bool = True) -> BlockAblation:
  """Loss of the quantized model ``qparams`` with each block restored from ``params`` in turn (``kind="restore"``).

  ``qparams`` and ``params`` must have the same tree (quantized kernels count as leaves).
  """
  q, f = _float_tree(qparams, "qparams"), _float_tree(params, "params")
  if jax.tree.structure(q) != jax.tree.structure(f):
    raise ValueError("qparams and params must have the same tree of params (a quantized copy of params)")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(q), jax.tree.leaves(f)):
    if a.shape != b.shape:
      raise ValueError(f"qparams[{tree.path_str(path)!r}] has shape {a.shape}; params has {b.shape}")
  return _ablate(config, "restore", q, f, tokens, batch_size, progress)


# ----------------------------------------------------------------------------- internals


def _zero_residual(block: dict) -> dict:
  """Block params whose attention and MLP outputs are exactly zero (x + 0 == x)."""
  attn = {**block["attn"], "o_proj": {**block["attn"]["o_proj"], "kernel": jnp.zeros_like(block["attn"]["o_proj"]["kernel"])}}
  mlp = {**block["mlp"], "down_proj": {**block["mlp"]["down_proj"],
                                       "kernel": jnp.zeros_like(block["mlp"]["down_proj"]["kernel"])}}
  return {**block, "attn": attn, "mlp": mlp}


def _float_tree(params: dict, name: str) -> dict:
  """``params`` with every quantized kernel dequantized (float arrays only); refuses activation quantization."""

  def dequantized(path, leaf):
    k = leaf
    while k is not None:
      if hasattr(k, "quantize_input"):
        raise ValueError(f"{name}[{tree.path_str(path)!r}] quantizes its input activations ({type(k).__name__}); "
                         f"block ablation takes kernels as their dequantized weights (weight-only formats)")
      k = getattr(k, "base", None)
    return jnp.asarray(nn.materialize(leaf))

  return jax.tree_util.tree_map_with_path(dequantized, params, is_leaf=tree.is_kernel_leaf)


_hidden_states = jax.jit(llama.hidden_states, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _nll_from(config: llama.LlamaConfig, first: dict, stack: dict, rest: dict, x: jax.Array, i: jax.Array,
              tokens: jax.Array) -> jax.Array:
  """Summed NLL (B,) of each window: block params ``first`` at index ``i`` on the residual stream ``x``
  (B, T, D) before block i, then blocks i+1..L-1 of ``stack`` (leaves stacked on a leading L axis),
  then the head of ``rest``."""
  x = llama.block(config, first, x)[0]
  x = jax.lax.fori_loop(i + 1, config.n_layers,
                        lambda j, x: llama.block(config, jax.tree.map(lambda a: a[j], stack), x)[0], x)
  logp = jax.nn.log_softmax(llama.head(config, rest, x)[:, :-1], axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0].sum(axis=-1)


def _ablate(config, kind: str, model: dict, fparams: dict, tokens, batch_size: int, progress: bool) -> BlockAblation:
  """Per-block losses: ``model`` (float, or dequantized quantized) ablated by skipping (block from
  ``model``, residual zeroed) or restoring (block from ``fparams``); base losses of both models."""
  tokens = llama.check_tokens(config, tokens)
  batch_size = data.check_count(batch_size, "batch_size")
  L, (n, t) = config.n_layers, tokens.shape
  names = llama.layer_names(config)
  if any(name not in model for name in names):
    raise ValueError(f"params must hold the config's {L} blocks {names[0]}..{names[-1]}")
  blocks = [model[name] for name in names]
  stack = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
  rest = {k: v for k, v in model.items() if k not in names}
  frest = {k: v for k, v in fparams.items() if k not in names}
  sums, base, float_base = np.zeros((L,), np.float64), 0.0, 0.0
  bar = tqdm(total=-(-n // batch_size) * L, desc=f"ablation ({kind})", disable=not progress, unit="block")
  for s in range(0, n, batch_size):
    batch = tokens[s:s + batch_size]
    m = len(batch)
    if m < batch_size:  # pad with repeats: one compiled shape serves every batch
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - m, axis=0)])
    batch = jnp.asarray(batch)

    def nll(first, x, i, head=rest):
      """Summed NLL over the batch's real windows, from block ``i`` (params ``first``) on."""
      return float(np.sum(np.asarray(_nll_from(config, first, stack, head, x, jnp.int32(i), batch), np.float64)[:m]))

    xs = _hidden_states(config, model, batch)  # L + 1 residual streams (B, T, D)
    base += nll(blocks[-1], xs[-2], L - 1)
    if kind == "restore":  # the float model: its last block on its own residual stream, no block after it
      float_base += nll(fparams[names[-1]], _hidden_states(config, fparams, batch)[-2], L - 1, frest)
    for i in range(L):
      sums[i] += nll(_zero_residual(blocks[i]) if kind == "skip" else fparams[names[i]], xs[i], i)
      bar.update()
  bar.close()
  per = n * (t - 1)  # predicted tokens
  return BlockAblation(kind=kind, base=base / per, float_loss=(base if kind == "skip" else float_base) / per,
                       losses=tuple(float(v) for v in sums / per))
