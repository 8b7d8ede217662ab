"""Quantized kernels inside Flax: ``QLinear`` + ``load_quantized`` (NNX) and ``QDense`` (Linen)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import lqx
from lqx import tree
from lqx.layers import QDense, QLinear, Quantized, load_quantized
from lqx.nn import materialize

jax.config.update("jax_numpy_rank_promotion", "raise")

RTN4 = lqx.RTNConfig(bits=4, group_size=32)
RULES = [lqx.Rule(r".*kernel", RTN4)]


def dequantized(qparams):
  return jax.tree.map(materialize, qparams, is_leaf=tree.is_kernel_leaf)


class Block(nnx.Module):
  def __init__(self, d, rngs):
    self.up = nnx.Linear(d, d, rngs=rngs)
    self.down = nnx.Linear(d, d, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.gelu(self.up(x)))


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.inp = nnx.Linear(48, 64, rngs=rngs)
    self.block = Block(64, rngs)
    self.head = nnx.Linear(64, 10, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.head(self.block(nnx.relu(self.inp(x))))


def randomize(model, seed=0):
  """Nonzero random biases (nnx.Linear starts them at 0, which would hide a dropped bias)."""
  state = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
  nnx.update(model, jax.tree.map(lambda p: 0.1 * jax.random.normal(next(keys), p.shape), state))
  return model


def quantized_and_reference(model):
  """``model`` with its kernels loaded quantized, and a clone on the dequantized floats."""
  qparams, report = lqx.quantize(None, nnx.to_pure_dict(nnx.state(model, nnx.Param)), RULES, progress=False)
  assert len(report.layers) == 4
  ref = nnx.clone(model)
  load_quantized(ref, dequantized(qparams))
  load_quantized(model, qparams)
  return model, ref


def test_nnx_mlp_matches_dequantized_floats():
  model, ref = quantized_and_reference(randomize(MLP(nnx.Rngs(0))))
  x = jax.random.normal(jax.random.key(1), (5, 48))
  for layer in (model.inp, model.block.up, model.block.down, model.head):
    assert isinstance(layer, QLinear) and isinstance(layer.kernel, Quantized)
  assert isinstance(ref.inp, nnx.Linear)
  assert model.block.down.bias is None and model.inp.bias is not None
  want = ref(x)
  np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), want, rtol=1e-5, atol=1e-6)
  # Quantized kernels are not Params: an optimizer over nnx.Param sees only the biases.
  assert tree.paths(nnx.to_pure_dict(nnx.state(model, nnx.Param))) == ["block/up/bias", "inp/bias"]
  assert len(tree.paths(nnx.to_pure_dict(nnx.state(model, Quantized)))) == 4
  # Float kernels loaded over quantized ones make them Params again.
  load_quantized(model, dequantized(nnx.to_pure_dict(nnx.state(model))))
  assert isinstance(model.block.down.kernel, nnx.Param)
  np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-6)


def test_nnx_split_merge_round_trip():
  model, _ = quantized_and_reference(randomize(MLP(nnx.Rngs(0))))
  x = jax.random.normal(jax.random.key(1), (5, 48))
  graphdef, state = nnx.split(model)
  back = nnx.merge(graphdef, state)
  assert isinstance(back.block.up.kernel.get_value(), lqx.QArray)
  assert jax.tree.structure(nnx.state(back)) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(back(x), model(x))
  # The state crosses jit as a pytree and merges back inside.
  np.testing.assert_allclose(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x), model(x), rtol=1e-5, atol=1e-6)


def test_nnx_sequential():
  model = randomize(nnx.Sequential(nnx.Linear(48, 64, rngs=nnx.Rngs(0)), nnx.relu,
                                   nnx.Linear(64, 10, use_bias=False, rngs=nnx.Rngs(1))))
  x = jax.random.normal(jax.random.key(1), (3, 48))
  qparams, _ = lqx.quantize(None, nnx.to_pure_dict(nnx.state(model, nnx.Param)), RULES, progress=False)  # int keys
  ref = nnx.clone(model)
  load_quantized(ref, dequantized(qparams))
  load_quantized(model, qparams)
  assert isinstance(model.layers[0], QLinear) and isinstance(model.layers[2], QLinear)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), ref(x), rtol=1e-5, atol=1e-6)


def test_qlinear_float_kernel_is_a_param():
  layer = randomize(nnx.Linear(32, 16, rngs=nnx.Rngs(0)))
  q = QLinear.from_linear(layer, layer.kernel.get_value())
  assert isinstance(q.kernel, nnx.Param)
  x = jnp.ones((2, 32))
  np.testing.assert_allclose(q(x), layer(x), rtol=1e-5, atol=1e-6)


class Net(nnx.Module):
  def __init__(self, rngs):
    self.emb = nnx.Embed(64, 32, rngs=rngs)
    self.fc = nnx.Linear(32, 32, rngs=rngs)


def test_load_quantized_errors_name_the_path():
  model = Net(nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  w = params["emb"]["embedding"]
  with pytest.raises(ValueError, match=r"emb/embedding: .*kernel of an nnx.Linear; 'emb' is Embed"):
    load_quantized(model, tree.replace(params, "emb/embedding", lqx.rtn_quantize(w, RTN4)))
  with pytest.raises(ValueError, match=r"fc/kernel: kernel has shape \(64, 32\); the layer is \(32, 32\)"):
    load_quantized(model, tree.replace(params, "fc/kernel", lqx.rtn_quantize(w, RTN4)))
  with pytest.raises(ValueError, match=r"fc/bias: shape \(3,\) does not match"):
    load_quantized(model, tree.replace(params, "fc/bias", jnp.zeros(3)))
  with pytest.raises(ValueError, match=r"other/kernel: .*no submodule 'other'"):
    load_quantized(model, {"other": {"kernel": lqx.rtn_quantize(w, RTN4)}})
  with pytest.raises(ValueError, match=r"fc/bias: .*kernel of an nnx.Linear; 'fc' is Linear"):
    load_quantized(model, tree.replace(params, "fc/bias", lqx.rtn_quantize(w, RTN4)))
  # A failed load leaves the model as it was.
  assert isinstance(model.fc, nnx.Linear) and not isinstance(model.fc, QLinear)


class LinenMLP(nn.Module):
  dense: type = QDense

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.dense(64, name="fc1")(x))
    x = nn.relu(self.dense(64, use_bias=False, name="fc2")(x))
    return self.dense(10, name="out")(x)


def linen_params(model, x):
  params = model.init(jax.random.key(0), x)["params"]
  return jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)


@pytest.mark.parametrize("train_cls", [QDense, nn.Dense])
def test_linen_on_quantized_params(train_cls):
  x = jax.random.normal(jax.random.key(1), (4, 48))
  params = linen_params(LinenMLP(dense=train_cls), x)
  qparams, _ = lqx.quantize(None, params, RULES, progress=False)
  assert isinstance(qparams["fc2"]["kernel"], lqx.QArray)
  got = LinenMLP().apply({"params": qparams}, x)
  want = LinenMLP(dense=nn.Dense).apply({"params": dequantized(qparams)}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(LinenMLP().apply)({"params": qparams}, x), want, rtol=1e-5, atol=1e-6)
  # On float params QDense is nn.Dense.
  np.testing.assert_allclose(LinenMLP().apply({"params": params}, x),
                             LinenMLP(dense=nn.Dense).apply({"params": params}, x), rtol=1e-5, atol=1e-6)


def test_linen_shape_error_names_the_path():
  x = jnp.ones((2, 48))
  params = linen_params(LinenMLP(), x)
  bad = tree.replace(params, "fc2/kernel", lqx.rtn_quantize(jnp.ones((32, 64)), RTN4))
  with pytest.raises(ValueError, match=r"fc2/kernel: kernel has shape \(32, 64\); input and features need \(64, 64\)"):
    LinenMLP().apply({"params": bad}, x)
