"""Width-scaled AdamW, parameter classes from base shapes, muP init for LLaMA."""

import dataclasses
import functools

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lqx.models import llama
from lqx.optim import (FIXED, MATRIX, VECTOR, ParamClass, class_paths, decay_mask,
                       effective_hparams, param_classes, width_scaled_adamw)
from lqx.optim import mup


def llama_config(d, **kw):
  return llama.LlamaConfig(vocab_size=64, dim=d, n_layers=2, n_heads=2, n_kv_heads=1,
                           ffn_dim=3 * d, tie_embeddings=False, **kw)


def llama_shapes(config):
  return jax.eval_shape(functools.partial(llama.init_params, config), jax.random.key(0))


# ----------------------------------------------------------------------------- classes


@pytest.mark.parametrize("attn_bias", [False, True])
def test_llama_classes(attn_bias):
  base, target = llama_config(32, attn_bias=attn_bias), llama_config(128, attn_bias=attn_bias)
  got = class_paths(param_classes(llama_shapes(base), llama_shapes(target)))
  want = {"embed/embedding": VECTOR, "final_norm/scale": VECTOR, "lm_head/kernel": VECTOR}
  for i in range(2):
    want.update({f"layers_{i}/attn_norm/scale": VECTOR, f"layers_{i}/mlp_norm/scale": VECTOR})
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      want[f"layers_{i}/attn/{name}/kernel"] = MATRIX
    for name in ("q_proj", "k_proj", "v_proj"):
      if attn_bias:
        want[f"layers_{i}/attn/{name}/bias"] = VECTOR
    for name in ("gate_proj", "up_proj", "down_proj"):
      want[f"layers_{i}/mlp/{name}/kernel"] = MATRIX
  assert {k: c.kind for k, c in got.items()} == want
  assert all(c.width_mult == 4.0 for c in got.values())
  assert got["embed/embedding"].width_axes == (1,)  # (V, D): the vocab axis is fixed
  assert got["lm_head/kernel"].width_axes == (0,)
  assert got["layers_0/mlp/down_proj/kernel"].width_axes == (0, 1)


def test_llama_classes_at_the_base_width_need_a_delta():
  base = llama_config(32)
  with pytest.raises(ValueError, match="no axis of any param differs"):
    param_classes(llama_shapes(base), llama_shapes(base))
  classes = class_paths(param_classes(llama_shapes(base), llama_shapes(base),
                                      delta=llama_shapes(llama_config(64))))
  assert classes["layers_1/attn/o_proj/kernel"] == ParamClass(MATRIX, (0, 1), 1.0)
  assert class_paths(mup.llama_classes(base, base)) == classes


class MLP(linen.Module):
  width: int

  @linen.compact
  def __call__(self, x):
    x = linen.relu(linen.Dense(self.width)(x))
    x = linen.relu(linen.Dense(self.width)(x))
    return linen.Dense(3)(x)


def test_linen_mlp_classes():
  def shapes(width):
    return jax.eval_shape(MLP(width).init, jax.random.key(0), jnp.zeros((1, 8)))

  got = {k: (c.kind, c.width_mult) for k, c in class_paths(param_classes(shapes(16), shapes(64))).items()}
  assert got == {
      "params/Dense_0/bias": (VECTOR, 4.0), "params/Dense_0/kernel": (VECTOR, 4.0),
      "params/Dense_1/bias": (VECTOR, 4.0), "params/Dense_1/kernel": (MATRIX, 4.0),
      "params/Dense_2/bias": (FIXED, 1.0), "params/Dense_2/kernel": (VECTOR, 4.0),
  }


def test_nnx_state_as_pure_dict_classes():
  from flax import nnx

  def shapes(width):
    model = nnx.eval_shape(lambda: nnx.Sequential(nnx.Linear(8, width, rngs=nnx.Rngs(0)),
                                                  nnx.Linear(width, width, rngs=nnx.Rngs(0))))
    return nnx.state(model, nnx.Param).to_pure_dict()

  got = {k: c.kind for k, c in class_paths(param_classes(shapes(16), shapes(32))).items()}
  assert got == {"layers/0/bias": VECTOR, "layers/0/kernel": VECTOR,
                 "layers/1/bias": VECTOR, "layers/1/kernel": MATRIX}


def test_bad_base_shapes_name_the_param():
  base = {"a": {"w": jnp.zeros((4, 4))}, "b": jnp.zeros((4,))}
  with pytest.raises(ValueError, match=r"'a/w'.*differ in rank"):
    param_classes(base, {"a": {"w": jnp.zeros((8, 8, 1))}, "b": jnp.zeros((8,))})
  with pytest.raises(ValueError, match=r"'c' is in target but not in base"):
    param_classes(base, {"a": {"w": jnp.zeros((8, 8))}, "b": jnp.zeros((8,)), "c": jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"'b' is in base but not in target"):
    param_classes(base, {"a": {"w": jnp.zeros((8, 8))}})
  # With a delta, the target may change only the axes that delta changes.
  delta = {"a": {"w": jnp.zeros((8, 4))}, "b": jnp.zeros((8,))}
  with pytest.raises(ValueError, match=r"'a/w': axis 1 changes from 4 at base to 8 at target"):
    param_classes(base, {"a": {"w": jnp.zeros((8, 8))}, "b": jnp.zeros((8,))}, delta=delta)


# ----------------------------------------------------------------------------- optimizer

RULES = [0.0, 0.5, 1.0]


@pytest.mark.parametrize("e", RULES)
@pytest.mark.parametrize("width", [64, 256])
def test_effective_hparams_hand_computed(e, width):
  base = llama_config(32)
  classes = param_classes(llama_shapes(base), llama_shapes(llama_config(width)))
  lrs, wds = (class_paths(t) for t in effective_hparams(classes, 0.01, 0.1, wd_exponent=e))
  m = width / 32
  assert lrs["layers_0/attn/q_proj/kernel"] == pytest.approx(0.01 / m)
  assert wds["layers_0/attn/q_proj/kernel"] == pytest.approx(0.1 * m ** e)
  hand = {64: {0.0: 0.1, 0.5: 0.1 * 2 ** 0.5, 1.0: 0.2}, 256: {0.0: 0.1, 0.5: 0.1 * 8 ** 0.5, 1.0: 0.8}}
  assert wds["layers_1/mlp/down_proj/kernel"] == pytest.approx(hand[width][e])
  for path in ("embed/embedding", "lm_head/kernel", "final_norm/scale", "layers_1/mlp_norm/scale"):
    assert lrs[path] == 0.01 and wds[path] == 0.0


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("e", RULES)
def test_applied_update_matches_hand_computed(e, independent):
  """One real step: the first Adam direction is g / (|g| + eps); check lr_p and wd_p."""
  base = {"w": jnp.zeros((4, 8)), "g": jnp.zeros((4,)), "out": jnp.zeros((4, 3))}
  target = {"w": jnp.zeros((16, 32)), "g": jnp.zeros((16,)), "out": jnp.zeros((16, 3))}
  classes = param_classes(base, target)
  key = jax.random.key(1)
  params = jax.tree.map(lambda x: jax.random.normal(key, x.shape), target)
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(key, 1), x.shape), target)
  lr, wd, eps = 0.03, 0.2, 1e-8
  opt = width_scaled_adamw(lr, classes, weight_decay=wd, wd_exponent=e, eps=eps,
                           independent_decay=independent)
  updates, _ = opt.update(grads, opt.init(params), params)
  m = 4.0
  lr_p = {"w": lr / m, "g": lr, "out": lr}
  wd_p = {"w": wd * m ** e, "g": 0.0, "out": 0.0}
  for k in params:
    u = grads[k] / (jnp.abs(grads[k]) + eps)
    want = (-lr_p[k] * u - wd_p[k] * params[k] if independent
            else -lr_p[k] * (u + wd_p[k] * params[k]))
    np.testing.assert_allclose(updates[k], want, rtol=3e-5, atol=1e-7, err_msg=k)  # f32 bias correction


def mlp_problem(dtype=jnp.float32):
  base = {"a": {"kernel": jnp.zeros((8, 4))}, "b": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}}
  target = {"a": {"kernel": jnp.zeros((8, 16))}, "b": {"kernel": jnp.zeros((16, 16)), "bias": jnp.zeros(16)}}
  key = jax.random.key(0)
  params = jax.tree.map(lambda x: jax.random.normal(key, x.shape).astype(dtype), target)

  def loss(p, x):
    h = jnp.tanh(x @ p["a"]["kernel"].astype(jnp.float32))
    return jnp.mean((h @ p["b"]["kernel"].astype(jnp.float32) + p["b"]["bias"][None, :]) ** 2)

  return param_classes(base, target), params, loss


def run_steps(opt, params, loss, n=3):
  state = opt.init(params)
  x = jnp.ones((2, 8))

  @jax.jit
  def step(params, state):
    g = jax.grad(loss)(params, x)
    u, state = opt.update(g, state, params)
    return optax.apply_updates(params, u), state, u

  states = [state]
  for _ in range(n):
    params, state, updates = step(params, state)
    states.append(state)
  return params, states, updates


def _spec(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


OPTIMIZERS = {
    "plain": lambda c: width_scaled_adamw(1e-2, c, weight_decay=0.1),
    "independent": lambda c: width_scaled_adamw(1e-2, c, weight_decay=1e-3, independent_decay=True),
    "schedule": lambda c: width_scaled_adamw(optax.cosine_decay_schedule(1e-2, 10), c,
                                             weight_decay=optax.linear_schedule(0.1, 0.0, 10)),
    "chain": lambda c: optax.chain(optax.clip_by_global_norm(1.0),
                                   width_scaled_adamw(1e-2, c, weight_decay=0.1)),
    # float32 hyperparameters (in bf16, b2=0.999 rounds to 1, as for optax.adamw) and
    # a float32 first moment (else b1 * mu promotes it from bf16 after the first step).
    "inject": lambda c: optax.inject_hyperparams(width_scaled_adamw, static_args="mu_dtype",
                                      hyperparam_dtype=jnp.float32)(
        learning_rate=optax.linear_schedule(0.0, 1e-2, 5), classes=c, weight_decay=0.1,
        wd_exponent=0.5, mu_dtype=jnp.float32),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optax_contract(name, dtype):
  """jit, dtype preservation, stable state tree/shapes/dtypes, finite and changing params."""
  classes, params, loss = mlp_problem(dtype)
  opt = OPTIMIZERS[name](classes)
  new, states, updates = run_steps(opt, params, loss)
  assert _spec(new) == _spec(params)
  assert _spec(updates) == _spec(params)
  for s in states[1:]:
    assert jax.tree.structure(s) == jax.tree.structure(states[0])
    assert _spec(s) == _spec(states[0])
  for k in ("a", "b"):
    assert bool(jnp.all(jnp.isfinite(new[k]["kernel"].astype(jnp.float32))))
    assert not np.array_equal(np.asarray(new[k]["kernel"], np.float32),
                              np.asarray(params[k]["kernel"], np.float32))
  if name == "inject":
    assert float(states[-1].hyperparams["learning_rate"]) > float(states[1].hyperparams["learning_rate"])


@pytest.mark.parametrize("mask", [False, True])
def test_matches_optax_adamw_when_multipliers_are_one(mask):
  classes, params, loss = mlp_problem()
  if mask:  # the real classes at width multiplier 1: vector-like params are not decayed
    classes = jax.tree.map(lambda c: dataclasses.replace(c, width_mult=1.0), classes)
    ref = optax.adamw(3e-3, b1=0.8, b2=0.99, weight_decay=0.3, mask=decay_mask(classes))
  else:  # every param matrix-like at width multiplier 1: every param decayed
    classes = jax.tree.map(lambda c: ParamClass(MATRIX, (), 1.0), classes)
    ref = optax.adamw(3e-3, b1=0.8, b2=0.99, weight_decay=0.3)
  ours = width_scaled_adamw(3e-3, classes, b1=0.8, b2=0.99, weight_decay=0.3, wd_exponent=0.5)
  got, _, _ = run_steps(ours, params, loss, n=4)
  want, _, _ = run_steps(ref, params, loss, n=4)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_bad_hyperparameters_are_named():
  classes, params, _ = mlp_problem()
  with pytest.raises(ValueError, match="learning_rate must be >= 0, got -0.1"):
    width_scaled_adamw(-0.1, classes)
  with pytest.raises(ValueError, match="weight_decay must be >= 0, got -1"):
    width_scaled_adamw(0.1, classes, weight_decay=-1)
  with pytest.raises(ValueError, match="weight_decay must be >= 0"):
    optax.inject_hyperparams(width_scaled_adamw)(0.1, classes, weight_decay=-1.0).init(params)
  with pytest.raises(TypeError, match="tree of ParamClass"):
    width_scaled_adamw(0.1, {"a": "matrix"})
  other = {"a": {"kernel": params["a"]["kernel"]}}
  with pytest.raises(ValueError, match=r"'b/(bias|kernel)' has a class but is not in params"):
    width_scaled_adamw(0.1, classes).init(other)


# ----------------------------------------------------------------------------- muP LLaMA


def test_mup_llama_config_and_init():
  base, cfg = llama_config(32), llama_config(128)
  m = mup.mup_config(cfg, base)
  assert m.readout_multiplier == 0.25
  assert m.attn_logit_scale == pytest.approx(16 ** 0.5 / 64)  # sqrt(dh0)/dh: 1/sqrt(dh0) at base
  assert mup.mup_config(base, base).attn_logit_scale == pytest.approx(16 ** -0.5)
  assert mup.mup_config(cfg, base, attn="standard").attn_logit_scale is None
  with pytest.raises(ValueError, match="n_layers"):
    mup.mup_config(dataclasses.replace(cfg, n_layers=3), base)

  params = mup.init_params(m, jax.random.key(0))
  assert _spec(params) == _spec(llama.init_params(m, jax.random.key(0)))
  assert not np.any(params["lm_head"]["kernel"])
  std = float(jnp.std(params["layers_0"]["mlp"]["down_proj"]["kernel"]))
  assert std == pytest.approx(1 / (3 * 128) ** 0.5, rel=0.05)  # 1/sqrt(fan_in)
  assert float(jnp.std(params["embed"]["embedding"])) == pytest.approx(1.0, rel=0.05)
  logits = llama.apply(m, params, jnp.zeros((1, 4), jnp.int32))
  assert not np.any(logits)  # zero readout
  with pytest.raises(ValueError, match="untied lm_head"):
    mup.init_params(dataclasses.replace(m, tie_embeddings=True), jax.random.key(0))
