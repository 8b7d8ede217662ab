"""Perplexity (the GPTQ-paper protocol) and paired comparisons between models.

Protocol: concatenate the text, cut non-overlapping windows of ``seq_len`` tokens,
run each window independently, and take perplexity = exp(mean NLL) over every
predicted token (positions 1..seq_len-1 of each window).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lqx import data
from lqx.models import llama

__all__ = ["PerplexityResult", "paired_difference", "perplexity", "window_nll"]


@functools.partial(jax.jit, static_argnums=0)
def window_nll(config: llama.LlamaConfig, params, tokens: jax.Array) -> jax.Array:
  """Summed NLL (B,) float32 of each window's predicted tokens; tokens (B, T) int32."""
  logits = llama.apply(config, params, tokens)[:, :-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0].sum(axis=-1)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  ppl: float
  nll: float  # mean NLL per predicted token (nats)
  tokens: int  # predicted tokens
  windows: int
  seq_len: int
  seconds: float
  tokens_per_second: float  # forward throughput over all window tokens
  window_nlls: tuple[float, ...]  # mean NLL of each window, for paired comparisons

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("window_nlls")
    return d


def perplexity(config: llama.LlamaConfig, params, tokens: np.ndarray, *, seq_len: int = 512,
               batch_size: int = 4, max_tokens: int | None = None,
               progress: bool = True) -> PerplexityResult:
  """Perplexity of ``params`` on a token stream (N,) with non-overlapping windows.

  ``max_tokens`` caps the tokens read from the start of the stream. The last batch is
  padded with repeats so that a single compiled shape serves every batch. Raises
  ``ValueError`` naming the argument for token ids outside ``[0, vocab_size)``,
  ``seq_len`` outside ``[2, config.max_seq_len]`` (one token predicts nothing), a
  stream shorter than one window, or ``batch_size`` / ``max_tokens`` out of range.
  """
  batch_size = data.check_count(batch_size, "batch_size")
  seq_len = data.check_count(seq_len, "seq_len", min_value=2, max_value=config.max_seq_len,
                             max_what="config.max_seq_len")
  if max_tokens is not None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)):
      raise ValueError(f"max_tokens must be an int >= seq_len={seq_len} or None, got {max_tokens!r}")
    if max_tokens < seq_len:
      raise ValueError(f"max_tokens={max_tokens} is less than one window of seq_len={seq_len}")
  tokens = data.check_tokens(tokens, config.vocab_size, name="tokens", ndim=1, min_len=1)
  if max_tokens is not None:
    tokens = tokens[:max_tokens]
  if len(tokens) < seq_len:
    raise ValueError(f"tokens holds {len(tokens)} tokens, fewer than one window of seq_len={seq_len}")
  wins = data.windows(tokens, seq_len)
  sums = []
  start = time.perf_counter()
  for i in tqdm(range(0, len(wins), batch_size), desc=f"ppl (seq_len={seq_len})", disable=not progress,
                unit="batch"):
    batch = wins[i: i + batch_size]
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
    sums.append(np.asarray(window_nll(config, params, jnp.asarray(batch)))[:n])
  seconds = time.perf_counter() - start
  sums = np.concatenate(sums).astype(np.float64)
  predicted = len(wins) * (seq_len - 1)
  nll = float(sums.sum() / predicted)
  return PerplexityResult(
      ppl=math.exp(nll), nll=nll, tokens=predicted, windows=len(wins), seq_len=seq_len,
      seconds=seconds, tokens_per_second=wins.size / seconds,
      window_nlls=tuple(float(s / (seq_len - 1)) for s in sums))


def paired_difference(a: PerplexityResult, b: PerplexityResult) -> dict:
  """Mean per-window NLL difference b - a with a 95% interval (windows are the pairs).

  Both results must come from the same windows. Positive means ``b`` is worse.
  """
  if (a.windows, a.seq_len) != (b.windows, b.seq_len):
    raise ValueError(f"results are not paired: {a.windows}x{a.seq_len} vs {b.windows}x{b.seq_len} windows")
  d = np.asarray(b.window_nlls) - np.asarray(a.window_nlls)
  se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
  return {"mean_nll_diff": float(d.mean()), "ci95": 1.96 * se, "windows": len(d)}
