"""The contract every registered method (``lqx.quant.METHODS``) and its format keep.

As optax's ``_common_test.py`` does for optimizers: a new method registered in
``lqx.quant`` gets these tests for free.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lqx
from lqx import calibrate, formats, nn, quant
from lqx.io import checkpoint
from lqx.models import llama
from lqx.quant import hessian
from lqx.quant.gptq import proxy_loss

CONFIG = llama.LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)


@pytest.fixture(scope="module")
def problem():
  """A fixed (IC, OC) = (64, 96) kernel and the Hessian of correlated inputs."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  w = jax.random.normal(k1, (64, 96)) / 8
  x = jax.random.normal(k2, (512, 16)) @ jax.random.normal(k3, (16, 64)) + 0.1 * jax.random.normal(k1, (512, 64))
  return w, hessian.finalize(hessian.update(hessian.init(64), x)), x


def make(name):
  return quant.make(name, bits=4, group_size=16)


def fisher_of(h, w):
  """A stand-in (IC, OC) Fisher: inputs with more energy make their weights more sensitive."""
  return jnp.broadcast_to(jnp.diag(h)[:, None], w.shape) * (1 + jnp.abs(w))


def run_method(m, w, h):
  stats = {}
  if "hessian" in m.stats:
    stats["hessian"] = h
  if "fisher" in m.stats:
    stats["fisher"] = fisher_of(h, w)
  judge = lambda probes: calibrate._own_output_mse(w, h, probes)  # noqa: E731
  return m.quantize(w, stats, name="w", judge=judge)


def objective(m, w, deq, h):
  """What ``m`` minimizes: the output error if it reads the Hessian, else the Fisher-weighted or plain error."""
  if "hessian" in m.stats:
    return float(proxy_loss(w, deq, h))
  weight = fisher_of(h, w) if "fisher" in m.stats else 1.0
  return float(jnp.sum(weight * (w - deq) ** 2))


@pytest.mark.parametrize("name", sorted(quant.METHODS))
def test_format_protocol_and_exact_bits(name, problem):
  w, h, x = problem
  m = make(name)
  q, info = run_method(m, w, h)
  assert formats.is_quantized(q) and formats.name_of(q) in formats.FORMATS
  assert tuple(q.shape) == w.shape and q.dequantize().shape == w.shape
  leaves = jax.tree.leaves(q)
  assert q.stored_bits == sum(8 * l.size * l.dtype.itemsize for l in leaves)  # every array counted
  assert q.bits_per_weight == q.stored_bits / w.size
  assert m.bits <= q.bits_per_weight < m.bits + 8  # (64, 96): 4-bit tables alone cost 4 bits per weight
  assert isinstance(info, dict)
  # The format is a pytree: it crosses jit, and nn.linear equals x @ dequantize().
  y = jax.jit(nn.linear)(x[:8], q)
  np.testing.assert_allclose(y, x[:8] @ q.dequantize(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(quant.METHODS))
def test_beats_trivial_baselines_on_its_objective(name, problem):
  """Better than zero; a wrapper (AdaDim, LoRC) no worse than its base; a data-aware method
  no worse than data-free RTN at the same layout (SqueezeLLM's per-channel tables: per-channel RTN)."""
  w, h, _ = problem
  m = make(name)
  q, _ = run_method(m, w, h)
  own = objective(m, w, q.dequantize(), h)
  assert own < 0.05 * objective(m, w, jnp.zeros_like(w), h), name
  if hasattr(m, "base"):
    baseline = m.base
  elif "hessian" in m.stats:
    baseline = quant.make("rtn", bits=4, group_size=16)
  elif "fisher" in m.stats:
    baseline = quant.make("rtn", bits=4, group_size=-1)
  else:
    return
  q0, _ = run_method(baseline, w, h)
  assert own <= objective(m, w, q0.dequantize(), h) * (1 + 1e-6), name


@pytest.mark.parametrize("name", sorted(quant.METHODS))
def test_on_a_tiny_llama_runs_and_checkpoints(name, tmp_path):
  params = llama.init_params(CONFIG, jax.random.key(1))
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (4, 32), 0, CONFIG.vocab_size), np.int32)
  m = make(name)
  qparams, report = lqx.quantize(CONFIG, params, lqx.default_recipe(m), tokens if m.stats else None, progress=False)
  assert len(report.layers) == 7 * CONFIG.n_layers and {l.method for l in report.layers} == {m.name}
  logits = llama.apply(CONFIG, qparams, jnp.asarray(tokens))
  assert logits.shape == (4, 32, CONFIG.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
  path = checkpoint.save(tmp_path / "ckpt", CONFIG, qparams)
  config2, restored, _ = checkpoint.restore(path)
  assert config2 == CONFIG
  flat_a, tree_a = jax.tree_util.tree_flatten(qparams)
  flat_b, tree_b = jax.tree_util.tree_flatten(restored)
  assert tree_a == tree_b
  for a, b in zip(flat_a, flat_b):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(llama.apply(CONFIG, restored, jnp.asarray(tokens)), logits)
