"""LoRC: Eckart-Young for the plain factors, optimality of the whitened ones, int8 factors, the method."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqx import quant
from lqx.formats.lowrank import LowRank
from lqx.quant.adadim import AdaDimConfig
from lqx.quant.gptq import GPTQConfig, gptq_quantize, proxy_loss
from lqx.quant.lorc import LoRCConfig, damped, low_rank_factors
from lqx.quant.rtn import RTNConfig


def problem(seed, ic=96, oc=64, n=1024):
  """A kernel-sized error ``e`` (IC, OC) and the Hessian of correlated, anisotropic inputs (a few outlier channels)."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(ic, oc)) / 8
  mix = rng.normal(size=(ic // 4, ic)) * np.exp(rng.normal(size=ic))[None, :]
  x = rng.normal(size=(n, ic // 4)) @ mix + 0.05 * rng.normal(size=(n, ic))
  x[:, :3] *= 20.0  # activation outliers
  return jnp.asarray(w, jnp.float32), jnp.asarray(2 / n * x.T @ x, jnp.float32)  # H = 2/N X^T X (lqx.quant.hessian)


def out_err(d, h):
  d, h = np.asarray(d, np.float64), np.asarray(h, np.float64)
  return float(np.sum(d * (h @ d)))


def sqrt_psd(h):
  """Symmetric square root by float64 eigendecomposition (an independent square root from the Cholesky one)."""
  lam, q = np.linalg.eigh(np.asarray(h, np.float64))
  return (q * np.sqrt(np.clip(lam, 0, None))) @ q.T


def test_plain_is_eckart_young_and_balanced():
  e, _ = problem(0)
  e64 = np.asarray(e, np.float64)
  s = np.linalg.svd(e64, compute_uv=False)
  prev = np.inf
  for r in (1, 4, 16, 63):
    a, b = low_rank_factors(e, r)
    assert a.shape == (96, r) and b.shape == (r, 64) and a.dtype == b.dtype == jnp.float32
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    res = float(np.sum((e64 - a @ b) ** 2))
    np.testing.assert_allclose(res, np.sum(s[r:] ** 2), rtol=2e-4, atol=1e-6)
    assert res < prev
    prev = res
    # S^{1/2} on both sides: a^T a = b b^T = diag(top singular values).
    np.testing.assert_allclose(a.T @ a, np.diag(s[:r]), atol=2e-4 * s[0])
    np.testing.assert_allclose(b @ b.T, np.diag(s[:r]), atol=2e-4 * s[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whitened_is_optimal_and_never_worse_than_plain(seed):
  e, h = problem(seed)
  hd = np.asarray(damped(h, 0.01), np.float64)
  root = sqrt_psd(hd)
  sv = np.linalg.svd(root @ np.asarray(e, np.float64), compute_uv=False)
  e64 = np.asarray(e, np.float64)
  for r in (2, 8, 24):
    pa, pb = (np.asarray(f, np.float64) for f in low_rank_factors(e, r))
    wa, wb = (np.asarray(f, np.float64) for f in low_rank_factors(e, r, h=h))
    d_plain, d_white = e64 - pa @ pb, e64 - wa @ wb
    # Optimal for the damped objective: the SVD tail of H_d^{1/2} e (symmetric root, float64).
    np.testing.assert_allclose(out_err(d_white, hd), np.sum(sv[r:] ** 2), rtol=1e-3)
    # ... hence never worse than the plain factors on the undamped output error (module doc).
    assert out_err(d_white, h) <= out_err(d_plain, h) * (1 + 1e-5), (r, out_err(d_white, h), out_err(d_plain, h))
  # On these anisotropic inputs the whitened fit is much better, not just no worse.
  assert out_err(d_white, h) < 0.8 * out_err(d_plain, h)


def test_whitened_beats_alternating_least_squares_brute_force():
  """A small case where ALS (any rank-r M, from random starts) is run to convergence in float64."""
  e, h = problem(7, ic=16, oc=12, n=256)
  hd = np.asarray(damped(h, 0.01), np.float64)
  e64 = np.asarray(e, np.float64)
  rng = np.random.default_rng(0)
  r = 3
  a, b = low_rank_factors(e, r, h=h)
  ours = out_err(e64 - np.asarray(a, np.float64) @ np.asarray(b, np.float64), hd)
  for _ in range(3):
    bb = rng.normal(size=(r, 12))
    for _ in range(300):
      aa = e64 @ bb.T @ np.linalg.inv(bb @ bb.T)  # argmin over A given B (H_d invertible)
      bb = np.linalg.solve(aa.T @ hd @ aa, aa.T @ hd @ e64)  # argmin over B given A
    assert ours <= out_err(e64 - aa @ bb, hd) * (1 + 1e-4)
    np.testing.assert_allclose(ours, out_err(e64 - aa @ bb, hd), rtol=1e-3)


def test_low_rank_factors_validates_and_jits():
  e, h = problem(0, ic=32, oc=24, n=128)
  for bad in (0, 25, 2.0, True):
    with pytest.raises(ValueError, match="rank"):
      low_rank_factors(e, bad)
  with pytest.raises(ValueError, match="h has shape"):
    low_rank_factors(e, 2, h=h[:-1, :-1])
  with pytest.raises(ValueError, match="damp"):
    low_rank_factors(e, 2, h=h, damp=0.0)
  a, b = jax.jit(lambda e, h: low_rank_factors(e, 4, h=h))(e, h)
  a2, b2 = low_rank_factors(e, 4, h=h)
  np.testing.assert_allclose(a @ b, a2 @ b2, rtol=1e-5, atol=1e-6)
  # H all zeros (no data): the whitened form is the plain one.
  za, zb = low_rank_factors(e, 4, h=jnp.zeros_like(h))
  pa, pb = low_rank_factors(e, 4)
  np.testing.assert_allclose(za @ zb, pa @ pb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("whiten", [False, True])
def test_int8_factors_cost_little(whiten):
  w, h = problem(4)
  base = RTNConfig(bits=3, group_size=32)
  f16, _ = LoRCConfig(base, rank=8, whiten=whiten, factor_bits=16).quantize(w, {"hessian": h})
  i8, _ = LoRCConfig(base, rank=8, whiten=whiten, factor_bits=8).quantize(w, {"hessian": h})
  p16, p8 = np.matmul(*f16.factors()), np.matmul(*i8.factors())
  assert np.linalg.norm(p8 - p16) <= 0.01 * np.linalg.norm(p16)  # 127 levels per row: ~0.3% typically
  err = {k: out_err(w - q.dequantize(), h) for k, q in (("f16", f16), ("i8", i8))}
  assert err["i8"] <= err["f16"] * 1.01 + 1e-9, err
  assert i8.stored_bits < f16.stored_bits


@pytest.fixture(scope="module")
def gptq_problem():
  w, h = problem(5, ic=128, oc=96)
  return w, h, GPTQConfig(bits=3, group_size=64)


@pytest.mark.parametrize("base_name", ["rtn", "gptq"])
def test_method_reduces_output_error(base_name, gptq_problem):
  w, h, _ = gptq_problem
  base = quant.make(base_name, bits=3, group_size=64)
  q0, _ = base.quantize(w, {"hessian": h}, name="w")
  base_err = float(proxy_loss(w, q0.dequantize(), h))
  errs = {}
  for whiten in (False, True):
    m = LoRCConfig(base, rank=8, whiten=whiten)
    q, info = m.quantize(w, {"hessian": h}, name="w")
    assert isinstance(q, LowRank) and q.rank == 8 and q.factor_bits == 8
    np.testing.assert_array_equal(q.base.dequantize(), q0.dequantize())  # the base's own kernel, untouched
    errs[whiten] = float(proxy_loss(w, q.dequantize(), h))
    np.testing.assert_allclose(info["proxy_loss"], errs[whiten], rtol=1e-6)
    np.testing.assert_allclose(info["base_proxy_loss"], base_err, rtol=1e-6)
    np.testing.assert_allclose(info["output_residual"], errs[whiten] / base_err, rtol=1e-6)
    assert info["rank"] == 8 and info["whiten"] is whiten and 0 < info["weight_residual"] < 1
    assert q.bits_per_weight > q0.bits_per_weight
  assert errs[True] < errs[False] < base_err, (errs, base_err)
  assert errs[True] < 0.5 * base_err


def test_method_protocol_and_delegation(gptq_problem):
  w, h, gptq = gptq_problem
  m = LoRCConfig(gptq, rank=4, whiten=True)
  assert (m.name, m.bits, m.stats, m.judges) == ("gptq+wlorc", 3, ("hessian",), False)
  rtn = RTNConfig(bits=3, group_size=64)
  assert (LoRCConfig(rtn).name, LoRCConfig(rtn).stats, LoRCConfig(rtn, whiten=True).stats) == (
      "rtn+lorc", (), ("hessian",))
  assert LoRCConfig(rtn).shared((128, 96)) == [] and m.shared((128, 96)) == [gptq]
  ada = LoRCConfig(AdaDimConfig(gptq))
  assert ada.judges is True and ada.name == "adadim-gptq+lorc" and ada.shared((128, 96))
  assert hash(m) == hash(dataclasses.replace(m)) and {m: 1}[LoRCConfig(gptq, rank=4, whiten=True)] == 1
  # A shared solve reaches the base through ``solved``: its kernel is used as is.
  solved_q, solved_info = gptq_quantize(w, h, gptq)
  q, info = m.quantize(w, {"hessian": h}, name="w", solved={gptq: (solved_q, {**solved_info, "marker": 1})})
  assert q.base is solved_q and info["marker"] == 1
  with pytest.raises(ValueError, match="needs calibration data"):
    LoRCConfig(rtn, whiten=True).quantize(w, {}, name="w")
  with pytest.raises(ValueError, match="rank=200 exceeds"):
    LoRCConfig(rtn, rank=200).quantize(w, {}, name="w")
  for bad in (dict(rank=0), dict(factor_bits=4), dict(damp=0.0), dict(whiten=1)):
    with pytest.raises(ValueError):
      LoRCConfig(rtn, **bad)
  with pytest.raises(ValueError, match="base"):
    LoRCConfig("gptq")
  # Data-free over RTN: no Hessian, no output figures; the weight error still falls.
  q, info = LoRCConfig(rtn, rank=8).quantize(w, {}, name="w")
  assert "proxy_loss" not in info and info["weight_residual"] < 1
