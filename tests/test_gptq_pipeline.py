"""lqx's reference-pipeline GPTQ against a PyTorch transcription of reference GPTQ's pipeline.

Both sides get identical calibration token ids. The transcription
(``experiments/gptq_reference.py``) runs reference ``llama_sequential`` on
transformers' ``LlamaForCausalLM`` in float32 (bit-identical to IST-DASLab/gptq's
own classes where they were run side by side; README "GPTQ parity").

Criterion, per layer: at least 99.9% identical codes and relative proxy losses
within 1e-3. With both solvers in float64 on the reference's own Hessian (scales
rounded to float32 on both sides) this holds in every layer, without exception
(``assert_float64_parity``). GPTQ in float32 is discontinuous (a near-tie rounding flip feeds a
whole step of error into every later column): in ill-conditioned layers the
reference's own codes change by more than 0.1% under float32 rounding alone (its own codes with U factored in float64 and rounded differ
that much). There the test asks that lqx differ from the reference by no more
than twice that floor.
"""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lqx import recipe  # noqa: E402
from lqx.tree import get as _get  # noqa: E402
from lqx.models import llama  # noqa: E402
from lqx.quant.gptq import GPTQConfig, gptq_quantize  # noqa: E402

EXPERIMENTS = pathlib.Path(__file__).parent.parent / "experiments"


def _module(name):
  if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))
  spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


gr = _module("gptq_reference")
torch_model = _module("bench_forward").torch_model


def rel_proxy(w, q, h):
  w, q, h = (np.asarray(a, np.float64) for a in (w, q, h))
  d = w - q
  return float(np.sum(d * (h @ d)) / np.sum(w * (h @ w)))


def reference_run(config, params, calib, bits, g, n_blocks=None):
  """The transcription's pipeline; per layer: its codes, H, weights, proxy, and lqx's solve of its H."""
  model = torch_model(config, params)
  cfg = GPTQConfig(bits=bits, group_size=g, scale_dtype=jnp.float32)
  out = {}

  def on_layer(i, path, w, h, q, codes):
    wk, hk = w.numpy().T, h.numpy()
    qa, _ = gptq_quantize(jnp.asarray(wk), jnp.asarray(hk), cfg, name=path)
    with jax.enable_x64(True):
      qa64, _ = gptq_quantize(jnp.asarray(wk, jnp.float64), jnp.asarray(hk, jnp.float64), cfg, name=path)
      codes64, deq64 = np.asarray(qa64.codes()), np.asarray(qa64.dequantize())
    q64, c64 = gr.ref_solve(w, h, bits, g, dtype=torch.float64, scale_dtype=torch.float32)
    out[path] = dict(codes=codes.numpy().T, w=wk, h=hk, w_t=w, h_t=h, proxy=rel_proxy(wk, q.numpy().T, hk),
                     solver_codes=np.asarray(qa.codes()), solver_proxy=rel_proxy(wk, qa.dequantize(), hk),
                     solver64_codes=codes64, solver64_proxy=rel_proxy(wk, deq64, hk),
                     ref64_codes=c64.numpy().T, ref64_proxy=rel_proxy(wk, q64.numpy().T, hk))

  gr.ref_pipeline(model, calib, bits, g, n_blocks=n_blocks, on_layer=on_layer, progress=False)
  return out


def rounding_floor(ref, bits, g) -> float:
  """Fraction of codes the reference's own float32 solve changes when only its factor U is computed
  more accurately (in float64, then rounded to float32): the spread between valid float32 solves."""
  _, c2 = gr.ref_solve(ref["w_t"], ref["h_t"], bits, g, u_dtype=torch.float64)
  return float(np.mean(c2.numpy().T != ref["codes"]))


def assert_parity(path, lqx_codes, lqx_proxy, ref, bits, g):
  """>= 99.9% identical codes and proxy within 1e-3 relative, or no more apart than twice the spread
  between two valid float32 solves of the same H (``rounding_floor``)."""
  differ = float(np.mean(lqx_codes != ref["codes"]))
  rel = abs(lqx_proxy - ref["proxy"]) / ref["proxy"]
  if differ <= 1e-3 and rel <= 1e-3:
    return
  floor = rounding_floor(ref, bits, g)
  assert differ <= max(1e-3, 2 * floor) and rel <= max(1e-3, 2 * floor), (
      f"{path}: {differ:.5f} of codes differ (reference's own rounding floor {floor:.5f}), "
      f"relative proxy losses {lqx_proxy:.6g} vs {ref['proxy']:.6g}")


def assert_float64_parity(path, r):
  """Both solvers in float64 on the same H: >= 99.9% identical codes and proxy within 1e-3, no floor."""
  same = float(np.mean(r["solver64_codes"] == r["ref64_codes"]))
  rel = abs(r["solver64_proxy"] - r["ref64_proxy"]) / r["ref64_proxy"]
  assert same >= 0.999 and rel <= 1e-3, (
      f"{path}: float64 solves of the reference's H: {same:.5f} identical codes, proxy losses "
      f"{r['solver64_proxy']:.6g} vs {r['ref64_proxy']:.6g}")


SMALL = llama.LlamaConfig(vocab_size=256, dim=96, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=64)


@pytest.fixture(scope="module")
def small_runs():
  params = llama.init_params(SMALL, jax.random.key(0))
  calib = np.random.default_rng(0).integers(0, SMALL.vocab_size, (8, 64)).astype(np.int32)
  ref = reference_run(SMALL, params, calib, 3, 64)  # 96 = 64 + 32 and 160 = 2 x 64 + 32: short last groups
  qparams, report = recipe.quantize(SMALL, params, recipe.default_recipe(
      GPTQConfig(bits=3, group_size=64, scale_dtype=jnp.float32)), calib, true_sequential=False, progress=False)
  return ref, qparams, report


def test_small_solver_on_reference_hessians(small_runs):
  ref, _, _ = small_runs
  assert len(ref) == 7 * SMALL.n_layers
  for path, r in ref.items():
    assert_parity(path, r["solver_codes"], r["solver_proxy"], r, 3, 64)
    assert_float64_parity(path, r)


def test_small_reference_pipeline_end_to_end(small_runs):
  ref, qparams, report = small_runs
  assert [l.name for l in report.layers] and report.true_sequential is False
  for layer in report.layers:
    assert_parity(layer.name, np.asarray(_get(qparams, layer.name).codes()), layer.error, ref[layer.name], 3, 64)


def test_hessians_match_on_identical_inputs(small_runs):
  # Block 0 sees identical inputs on both sides: lqx's H (2/N over tokens) is the reference's
  # (2/N over sequences) divided by the tokens per sequence.
  from lqx import calibrate
  ref, _, _ = small_runs
  params = llama.init_params(SMALL, jax.random.key(0))
  calib = np.random.default_rng(0).integers(0, SMALL.vocab_size, (8, 64)).astype(np.int32)
  x = llama.embed(SMALL, params, jnp.asarray(calib))
  taps = calibrate._taps(SMALL, params["layers_0"], x, ("attn_in", "o_in", "mlp_in", "down_in"))
  from lqx.quant import hessian
  for tap, lin in (("attn_in", "attn/q_proj"), ("o_in", "attn/o_proj"), ("mlp_in", "mlp/up_proj"),
                   ("down_in", "mlp/down_proj")):
    h = hessian.finalize(hessian.update(hessian.init(taps[tap].shape[-1]), taps[tap]))
    want = ref[f"layers_0/{lin}/kernel"]["h"]
    np.testing.assert_allclose(np.asarray(h) * 64, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
def test_smollm2_first_two_blocks(smollm2, train_tokens):
  from lqx import data
  config, params, _ = smollm2
  calib = data.sample_windows(train_tokens, 4, 512, seed=0)
  ref = reference_run(config, params, calib, 3, 128, n_blocks=2)
  for path, r in ref.items():  # (a) lqx's solver on the reference's own Hessians, both blocks
    assert_parity(path, r["solver_codes"], r["solver_proxy"], r, 3, 128)
    assert_float64_parity(path, r)
  qparams, report = recipe.quantize(config, params, [recipe.Rule(
      r"layers_[01]/(attn|mlp)/\w+_proj/kernel", GPTQConfig(bits=3, group_size=128, scale_dtype=jnp.float32))],
      calib, true_sequential=False, progress=False)
  # End to end, block 0 has identical inputs on both sides; block 1's inputs differ by block 0's
  # few near-tie flips, which GPTQ's error feedback amplifies (measured in experiments/gptq_parity.py).
  for layer in report.layers:
    if layer.name.startswith("layers_0/"):
      assert_parity(layer.name, np.asarray(_get(qparams, layer.name).codes()), layer.error, ref[layer.name], 3, 128)


def test_advance_steps_rebuild_the_block(monkeypatch):
  # True-sequential calibration advances a block stage by stage; the steps compose to block().
  cfg = llama.LlamaConfig(vocab_size=64, dim=48, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=80, attn_bias=True)
  p = llama.init_params(cfg, jax.random.key(1))["layers_0"]
  x = jax.random.normal(jax.random.key(2), (2, 300, 48))  # 300 = 2 x 128 + 44: a short last attention chunk
  state = {"x": x}
  for step in llama.STEP_INPUTS:
    state.update(llama.advance(cfg, p, {k: state[k] for k in llama.STEP_INPUTS[step]}, step))
  want = llama.block(cfg, p, x)[0]
  np.testing.assert_allclose(np.asarray(state["out"]), np.asarray(want), atol=1e-6)
  monkeypatch.setattr(llama, "ATTN_CHUNK", 4096)  # one unchunked (T, S) product: same attention
  np.testing.assert_allclose(np.asarray(llama.block(cfg, p, x)[0]), np.asarray(want), atol=1e-6)
