"""Measured activation sensitivity (lqx.quant.act_sensitivity) on a tiny random LLaMA, and the A8 choice."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqx import evaluate, tree
from lqx.formats.actquant import ActQuant
from lqx.models import llama
from lqx.quant import act_sensitivity as S
from lqx.quant import activations as A

CONFIG = llama.LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=64)
G = 32  # activation and weight groups (64 = 2 groups, 160 = 5)


@pytest.fixture(scope="module")
def model():
  params = llama.init_params(CONFIG, jax.random.key(0), std=0.15)
  q = params
  for p in tree.paths(params):
    if p.startswith("layers_") and p.endswith("_proj/kernel"):
      q = tree.replace(q, p, A.absmax_quantize(tree.get(params, p), 6, G))
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (4, 24), 0, CONFIG.vocab_size), np.int32)
  return q, tokens


def _loss(q, tokens, batch_size=2):
  """Mean next-token NLL, the whole model jitted at once (evaluate.window_nll), ``batch_size`` windows a call.

  The same batches as ``measure``'s: a 6-bit code can flip on a rounding difference between two
  compiled programs, which moves a 24-token window's loss by ~1e-3 in this tiny model."""
  total = sum(float(evaluate.window_nll(CONFIG, q, jnp.asarray(tokens[i: i + batch_size])).sum())
              for i in range(0, len(tokens), batch_size))
  return total / (tokens.shape[0] * (tokens.shape[1] - 1))


def test_units_are_the_block_inputs(model):
  q, _ = model
  u = S.units(CONFIG, q)
  assert list(u) == [f"layers_{i}/{t}" for i in range(2) for t in ("attn_in", "o_in", "mlp_in", "down_in")]
  assert u["layers_1/attn_in"] == tuple(f"layers_1/attn/{p}_proj/kernel" for p in "qkv")
  assert u["layers_0/mlp_in"] == ("layers_0/mlp/gate_proj/kernel", "layers_0/mlp/up_proj/kernel")
  assert list(S.units(CONFIG, q, r"layers_1/mlp/down_proj/kernel")) == ["layers_1/down_in"]
  with pytest.raises(ValueError, match="only part of layers_0/attn_in"):
    S.units(CONFIG, q, r"layers_0/attn/q_proj/kernel")
  with pytest.raises(ValueError, match="activation quantization"):
    S.units(CONFIG, A.with_activation_bits(q, 8, G), r"layers_0/mlp/down_proj/kernel")
  assert S.unit_costs(q, u, "width") == {k: (160 if k.endswith("down_in") else 64) for k in u}
  macs = S.unit_costs(q, u)
  assert macs["layers_0/attn_in"] == 64 * (64 + 32 + 32) and macs["layers_0/mlp_in"] == 2 * 64 * 160
  assert macs["layers_0/o_in"] == 64 * 64 and macs["layers_0/down_in"] == 160 * 64
  with pytest.raises(ValueError, match="cost must be"):
    S.unit_costs(q, u, "flops")


@pytest.mark.parametrize("low", [False, True])
def test_switch_is_actquant(model, low):
  q, _ = model
  base = tree.get(q, "layers_0/mlp/down_proj/kernel")
  x = jax.random.normal(jax.random.key(2), (3, 7, 160)) * jnp.where(jnp.arange(160) == 5, 40.0, 1.0)[None, None]
  got = jax.jit(lambda s, v: s.linear(v))(S._Switch(base, jnp.asarray(low), G), x)
  want = ActQuant(base, 6 if low else 8, G).linear(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_delta_is_the_direct_loss_difference(model):
  """A unit's delta (one of each kind, both layers) equals loss(unit at A6, the rest A8) - loss(all A8),
  each computed as a whole model."""
  q, tokens = model
  sens = S.measure(CONFIG, q, tokens, group_size=G, batch_size=2, progress=False)
  u = sens.units
  everything = set(u)
  base = _loss(S.with_choice(q, u, everything, G), tokens)
  assert sens.tokens == 4 * 23 and sens.loss == pytest.approx(base, abs=2e-6)
  some = ["layers_0/attn_in", "layers_0/mlp_in", "layers_1/o_in", "layers_1/down_in"]  # each kind, both layers
  deltas = np.array([sens.delta[k] for k in some])
  direct = np.array([_loss(S.with_choice(q, u, everything - {k}, G), tokens) - base for k in some])
  assert np.abs(direct).max() > 1e-3  # the test can tell units apart
  np.testing.assert_allclose(deltas, direct, atol=5e-6)
  with pytest.raises(ValueError, match="batch_size"):
    S.measure(CONFIG, q, tokens, group_size=G, batch_size=0, progress=False)


def test_with_choice_sets_every_kernel(model):
  q, _ = model
  u = S.units(CONFIG, q)
  out = S.with_choice(q, u, {"layers_0/attn_in", "layers_1/down_in"}, G)
  for unit, kernels in u.items():
    for k in kernels:
      leaf = tree.get(out, k)
      assert isinstance(leaf, ActQuant) and leaf.act_group_size == G
      assert leaf.act_bits == (8 if unit in ("layers_0/attn_in", "layers_1/down_in") else 6)
  with pytest.raises(ValueError, match="not among"):
    S.with_choice(q, u, {"layers_9/o_in"}, G)


def _brute(delta, costs, budget):
  best = None
  for r in range(len(delta) + 1):
    for high in itertools.combinations(delta, r):
      if S.bits_of(costs, set(high)) <= budget:
        err = sum(d for k, d in delta.items() if k not in high)
        if best is None or err < best - 1e-12:
          best = err
  return best


@pytest.mark.parametrize("seed", range(6))
def test_choose_is_the_exact_optimum_within_budget(seed):
  rng = np.random.default_rng(seed)
  n = 7
  delta = {f"u{i}": float(d) for i, d in enumerate(rng.exponential(1.0, n) - (0.2 if seed % 2 else 0.0))}
  costs = {f"u{i}": int(c) for i, c in enumerate(rng.choice([576, 960, 1536, 3072], n))}
  low = S.bits_of(costs, set())
  for budget in (low, low + int(rng.integers(0, 2 * sum(costs.values()))), S.bits_of(costs, set(delta))):
    high = S.choose(delta, costs, budget)
    assert S.bits_of(costs, high) <= budget
    assert sum(d for k, d in delta.items() if k not in high) == pytest.approx(_brute(delta, costs, budget))


def test_choose_extremes_and_the_rule_budget(model):
  q, tokens = model
  sens = S.measure(CONFIG, q, tokens, group_size=G, progress=False)
  costs = S.unit_costs(q, sens.units)
  everything = S.choose(sens.delta, costs, S.bits_of(costs, set(sens.units)))
  assert everything == {k for k, d in sens.delta.items() if d > 0}  # all A8 but units that A6 does not hurt
  positive = {k: abs(d) + 1e-3 for k, d in sens.delta.items()}
  assert S.choose(positive, costs, S.bits_of(costs, set(sens.units))) == set(sens.units)
  assert S.choose(positive, costs, S.bits_of(costs, set())) == set()
  rule = {k for k in sens.units if k.endswith("down_in")}
  budget = S.bits_of(costs, rule)
  high = S.choose(sens.delta, costs, budget)
  assert S.bits_of(costs, high) <= budget
  assert sum(d for k, d in sens.delta.items() if k not in high) <= sum(
      d for k, d in sens.delta.items() if k not in rule) + 1e-12  # never worse than the rule on its own signal
  with pytest.raises(ValueError, match="same units"):
    S.choose({"a": 1.0}, {"b": 3}, 100)
