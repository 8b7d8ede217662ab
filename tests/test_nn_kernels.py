"""The switch between Pallas kernels and XLA in quantized ``linear`` (``lqx.nn.pallas_target``).

On CPU ``auto`` takes XLA; ``nn.kernels("interpret")`` forces the Pallas kernels through the
interpreter, which is how these tests prove every format reaches its kernel and that a
quantized SmolLM2 computes the same logits and generation through the kernels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.dequant_matmul as dq
import pallas_kernels.lut_matmul as lut
from lqx import data, nn, recipe
from lqx.formats import affine, codebook, lowrank, sparse
from lqx.models import llama


@pytest.fixture
def calls(monkeypatch):
  """Counts calls of the two public kernel ops (the formats import them at trace time)."""
  seen = {"dequant_matmul": 0, "lut_matmul": 0}

  def spy(mod, name):
    real = getattr(mod, name)

    def wrapped(*a, **k):
      seen[name] += 1
      return real(*a, **k)

    monkeypatch.setattr(mod, name, wrapped)

  spy(dq, "dequant_matmul")
  spy(lut, "lut_matmul")
  return seen


def test_modes_and_errors(monkeypatch):
  assert nn.pallas_target() is None  # CPU: XLA
  with nn.kernels("interpret"):
    assert nn.pallas_target() == ("triton", True)
  with nn.kernels("interpret", backend="tpu"):
    assert nn.pallas_target() == ("tpu", True)
  with nn.kernels("xla"):
    assert nn.pallas_target() is None
  with pytest.raises(ValueError, match="mode='fast'"):
    with nn.kernels("fast"):
      pass
  with pytest.raises(ValueError, match="backend='cuda'"):
    with nn.kernels("interpret", backend="cuda"):
      pass
  monkeypatch.setenv("LQX_KERNELS", "interpret")
  assert nn.pallas_target() == ("triton", True)
  monkeypatch.setenv("LQX_KERNELS", "bogus")
  with pytest.raises(ValueError, match="LQX_KERNELS='bogus'"):
    nn.pallas_target()


def _affine(key, shape, bits, g, axis, zero, perm=False):
  kc, ks, kz, kp = jax.random.split(key, 4)
  codes = jax.random.randint(kc, shape, 0, 1 << bits).astype(jnp.uint8)
  gs = affine.scale_shape(shape, g, axis)
  scale = jax.random.uniform(ks, gs, minval=0.01, maxval=0.05)
  z = jax.random.randint(kz, gs, 0, 1 << bits).astype(jnp.float32) if zero else None
  p = jax.random.permutation(kp, shape[0]).astype(jnp.int32) if perm else None
  return affine.from_codes(codes, scale, z, bits=bits, group_size=g, group_axis=axis, dtype=jnp.float32, perm=p)


def _codebook(key, shape, bits):
  kc, kt = jax.random.split(key)
  codes = jax.random.randint(kc, shape, 0, 1 << bits).astype(jnp.uint8)
  table = jnp.sort(jax.random.normal(kt, (shape[1], 1 << bits)), axis=1) * 0.05
  return codebook.from_codes(codes, table, bits=bits, dtype=jnp.float32)


CASES = {
    "affine-4-oc-g128-short-group": (lambda k: _affine(k, (320, 192), 4, 128, "oc", True), "dequant_matmul"),
    "affine-3-ic-g64-sym": (lambda k: _affine(k, (256, 192), 3, 64, "ic", False), "dequant_matmul"),
    "affine-4-perm": (lambda k: _affine(k, (256, 128), 4, 64, "oc", True, perm=True), "dequant_matmul"),
    "codebook-3": (lambda k: _codebook(k, (256, 192), 3), "lut_matmul"),
    "sparse(codebook-4)": (lambda k: sparse.Sparse.from_dense(
        _codebook(k, (256, 128), 4), jax.random.normal(k, (256, 128)) * 0.05,
        jnp.array([0, 5, 999, 256 * 128], jnp.int32)), "lut_matmul"),
    "lowrank(affine-2)": (lambda k: lowrank.from_factors(
        _affine(k, (256, 128), 2, 64, "oc", True), jax.random.normal(k, (256, 4)) * 0.1,
        jax.random.normal(jax.random.fold_in(k, 1), (4, 128)) * 0.1), "dequant_matmul"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_format_reaches_its_kernel(name, calls):
  make, op = CASES[name]
  q = make(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, q.shape[0]), jnp.float32)  # leading dims are flattened
  want = np.asarray(jnp.einsum("...i,io->...o", x, q.dequantize(), precision="highest"))
  with nn.kernels("interpret"):
    got = np.asarray(jax.jit(nn.linear)(x, q))
  assert calls[op] == 1
  np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=1e-4)
  with nn.kernels("xla"):
    jax.jit(nn.linear)(x, q)
  assert calls[op] == 1  # the reference path does not call the kernel


def test_unsupported_layouts_fall_back_to_xla(calls):
  qt = affine.from_codes(jnp.zeros((64, 32), jnp.uint8), jnp.ones((1, 1)), None, bits=4, group_size=-1,
                         group_axis="tensor", dtype=jnp.float32)
  x16 = jnp.ones((3, 64), jnp.float16)
  with nn.kernels("interpret"):
    nn.linear(jnp.ones((3, 64)), qt)  # per-tensor scale: no kernel layout
    nn.linear(x16, _affine(jax.random.key(0), (64, 32), 4, 32, "oc", True))  # float16 x
  assert calls["dequant_matmul"] == 0


def test_smollm2_through_kernels_matches_dequantized_model(smollm2, calls):
  """Blocks 0-1 quantized (RTN 4-bit g128, and one codebook kernel): the model run through the Pallas
  kernels (interpreted) gives the dequantized model's logits and the same greedy generation."""
  config, params, tok = smollm2
  rule = recipe.Rule(r"layers_(0|1)/(attn|mlp)/\w+_proj/kernel", recipe.make_method("rtn", bits=4, group_size=128))
  qparams, _ = recipe.quantize(config, params, (rule,), None, progress=False)
  w = params["layers_1"]["mlp"]["down_proj"]["kernel"]
  table = jnp.quantile(w, jnp.linspace(0.02, 0.98, 16), axis=0).T
  qparams["layers_1"]["mlp"]["down_proj"]["kernel"] = codebook.codebook_quantize(w, table)
  prompt = jnp.asarray(data.tokenize(tok, "To be, or not to be, that is the question:"))[None]

  with nn.kernels("xla"):
    want_logits = np.asarray(llama.apply(config, qparams, prompt))
    want_tokens = np.asarray(llama.generate(config, qparams, prompt, 8))
  with nn.kernels("interpret"):
    logits = np.asarray(llama.apply(config, qparams, prompt))
    tokens = np.asarray(llama.generate(config, qparams, prompt, 8))
  assert calls["dequant_matmul"] >= 13 and calls["lut_matmul"] >= 1
  np.testing.assert_allclose(logits, want_logits, atol=2e-3 * np.abs(want_logits).max(), rtol=0)
  np.testing.assert_array_equal(tokens, want_tokens)
