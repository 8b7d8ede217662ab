"""width_scaled_adamw and param_classes inside nnx.Optimizer and a Linen TrainState."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import freeze, unfreeze
from flax.training import train_state

from lqx.optim import class_paths, decay_mask, param_classes, width_scaled_adamw

BASE, WIDE = 8, 32  # WIDE / BASE = 4
LR, WD, E = 3e-2, 0.1, 0.5

X = jax.random.normal(jax.random.key(0), (64, 4))
Y = jnp.stack([jnp.sin(X[:, 0] * X[:, 1]), jnp.cos(X[:, 2]) - X[:, 3]], axis=1)


def mse(pred):
  return jnp.mean((pred - Y) ** 2)


# ----------------------------------------------------------------------------- nnx


class Net(nnx.Module):
  """4 -> width -> width -> 2, with a LayerNorm on the hidden layer."""

  def __init__(self, width, rngs):
    self.inp = nnx.Linear(4, width, rngs=rngs)
    self.hidden = nnx.Linear(width, width, rngs=rngs)
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.out = nnx.Linear(width, 2, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.inp(x))
    return self.out(jnp.tanh(self.norm(self.hidden(h))))


def net_shapes(width, pure):
  state = nnx.state(nnx.eval_shape(lambda: Net(width, nnx.Rngs(0))), nnx.Param)
  return state.to_pure_dict() if pure else state


def net_classes(width, pure):
  """Classes at ``width``; at the base width the width axes come from a third width."""
  delta = net_shapes(2 * BASE, pure) if width == BASE else None
  return param_classes(net_shapes(BASE, pure), net_shapes(width, pure), delta=delta)


def train_nnx(width, tx, steps):
  """``steps`` steps of ``nnx.Optimizer`` from the same init; (losses, final params as dicts)."""
  model = Net(width, nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: mse(m(X)))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(steps)]
  return losses, nnx.state(model, nnx.Param).to_pure_dict()


def assert_trees_close(got, want, rtol=1e-6, atol=1e-7):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), got, want)


@pytest.mark.parametrize("width", [BASE, WIDE])
@pytest.mark.parametrize("pure", [False, True], ids=["state", "pure_dict"])
def test_nnx_optimizer_trains(pure, width):
  classes = net_classes(width, pure)
  tx = width_scaled_adamw(LR, classes, weight_decay=WD, wd_exponent=E)
  losses, params = train_nnx(width, tx, 50)
  assert losses[-1] < 0.5 * losses[0]
  if width == BASE:  # every multiplier is 1: plain AdamW that decays only the hidden kernel
    mask = decay_mask(net_classes(width, pure=False))  # an nnx.State, like the params
    assert [p for p, m in class_paths(mask).items() if m] == ["hidden/kernel"]
    _, want = train_nnx(width, optax.adamw(LR, weight_decay=WD, mask=mask), 50)
    assert_trees_close(params, want)


def test_nnx_first_update_is_hand_computed():
  """At m = 4: hidden kernel lr / m and decay wd * m**e; norm gain lr and no decay."""
  model = Net(WIDE, nnx.Rngs(1))
  before = nnx.state(model, nnx.Param).to_pure_dict()
  grads = nnx.grad(lambda net: mse(net(X)))(model)
  eps, m = 1e-8, WIDE / BASE
  tx = width_scaled_adamw(LR, net_classes(WIDE, pure=False), weight_decay=WD, wd_exponent=E,
                          eps=eps)
  nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads)
  after = nnx.state(model, nnx.Param).to_pure_dict()
  grads = grads.to_pure_dict()

  def adam(g):  # the first Adam direction
    return g / (jnp.abs(g) + eps)

  w, g = before["hidden"]["kernel"], grads["hidden"]["kernel"]
  want = w - LR / m * (adam(g) + WD * m ** E * w)
  np.testing.assert_allclose(after["hidden"]["kernel"], want, rtol=1e-5, atol=1e-7)
  s, g = before["norm"]["scale"], grads["norm"]["scale"]
  np.testing.assert_allclose(after["norm"]["scale"], s - LR * adam(g), rtol=1e-5, atol=1e-7)


def test_nnx_matches_the_pure_pytree_path():
  """nnx.Optimizer with State classes == optax on the pure dict with pure-dict classes."""
  _, got = train_nnx(WIDE, width_scaled_adamw(LR, net_classes(WIDE, pure=False),
                                              weight_decay=WD, wd_exponent=E), 5)

  graphdef, params = nnx.split(Net(WIDE, nnx.Rngs(1)))
  params = params.to_pure_dict()
  tx = width_scaled_adamw(LR, net_classes(WIDE, pure=True), weight_decay=WD, wd_exponent=E)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: mse(nnx.merge(graphdef, p)(X)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(5):
    params, opt_state = step(params, opt_state)
  assert_trees_close(got, params, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- linen


class LinenNet(linen.Module):
  width: int

  @linen.compact
  def __call__(self, x):
    h = jnp.tanh(linen.Dense(self.width)(x))
    h = jnp.tanh(linen.LayerNorm()(linen.Dense(self.width)(h)))
    return linen.Dense(2)(h)


def linen_shapes(width):
  return jax.eval_shape(LinenNet(width).init, jax.random.key(0), X[:1])


def train_linen(classes, params, steps=10):
  module = LinenNet(WIDE)
  state = train_state.TrainState.create(
      apply_fn=module.apply, params=params,
      tx=width_scaled_adamw(LR, classes, weight_decay=WD, wd_exponent=E))

  @jax.jit
  def step(state):
    loss, grads = jax.value_and_grad(lambda p: mse(state.apply_fn({"params": p}, X)))(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(steps):
    state, loss = step(state)
    losses.append(float(loss))
  return losses, state.params


def test_linen_train_state():
  """Classes from the variables, from their "params" subtree, or frozen: the same training."""
  variables = LinenNet(WIDE).init(jax.random.key(1), X[:1])
  full = param_classes(linen_shapes(BASE), linen_shapes(WIDE))
  sub = param_classes(linen_shapes(BASE)["params"], linen_shapes(WIDE)["params"])
  assert class_paths(sub)["Dense_1/kernel"].kind == "matrix"

  losses, want = train_linen(full, variables["params"])
  assert losses[-1] < 0.5 * losses[0]
  _, got = train_linen(sub, variables["params"])
  assert_trees_close(got, want, rtol=0, atol=0)
  _, got = train_linen(freeze(full), freeze(variables["params"]))
  assert_trees_close(unfreeze(got), want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- mismatches


class NoNorm(nnx.Module):
  def __init__(self, width, rngs):
    self.inp = nnx.Linear(4, width, rngs=rngs)
    self.hidden = nnx.Linear(width, width, rngs=rngs)
    self.out = nnx.Linear(width, 2, rngs=rngs)


def test_classes_of_another_model_name_the_param():
  tx = width_scaled_adamw(LR, net_classes(WIDE, pure=False))
  with pytest.raises(ValueError, match=r"param 'norm/bias' has a class but is not in params"):
    nnx.Optimizer(NoNorm(WIDE, nnx.Rngs(0)), tx, wrt=nnx.Param)

  def no_norm_shapes(width):
    return nnx.state(nnx.eval_shape(lambda: NoNorm(width, nnx.Rngs(0))), nnx.Param)

  tx = width_scaled_adamw(LR, param_classes(no_norm_shapes(BASE), no_norm_shapes(WIDE)))
  with pytest.raises(ValueError, match=r"param 'norm/bias' is in params but has no class"):
    nnx.Optimizer(Net(WIDE, nnx.Rngs(0)), tx, wrt=nnx.Param)


class BatchNormNet(linen.Module):
  width: int

  @linen.compact
  def __call__(self, x):
    return linen.Dense(2)(linen.BatchNorm(use_running_average=True)(linen.Dense(self.width)(x)))


def test_linen_variables_with_other_collections_say_what_to_pass():
  def shapes(width):
    return jax.eval_shape(BatchNormNet(width).init, jax.random.key(0), X[:1])

  variables = BatchNormNet(WIDE).init(jax.random.key(0), X[:1])
  tx = width_scaled_adamw(LR, param_classes(shapes(BASE), shapes(WIDE)))
  with pytest.raises(ValueError, match=r"'params/BatchNorm_0/bias' has a class but is not in params"
                                       r".*pass only variables\['params'\].* to param_classes"):
    tx.init(variables["params"])
  tx = width_scaled_adamw(LR, param_classes(shapes(BASE)["params"], shapes(WIDE)["params"]))
  tx.init(variables["params"])
  with pytest.raises(ValueError, match=r"'BatchNorm_0/bias' has a class but is not in params"
                                       r".*pass only variables\['params'\] to the optimizer"):
    tx.init(variables)
