"""P7 methods on the real SmolLM2-135M (reduced calibration and evaluation sizes)."""

import jax.numpy as jnp
import numpy as np
import pytest

from lqx import data, evaluate, formats, quant, recipe, tree
from lqx.formats.codebook import Codebook
from lqx.formats.sparse import Sparse
from lqx.quant import fisher as fisher_lib

EVAL_TOKENS = 8 * 256
FIRST_BLOCK = r"layers_0/(attn|mlp)/\w+_proj/kernel"


@pytest.fixture(scope="module")
def calib(train_tokens):
  return data.sample_windows(train_tokens, 4, 256, seed=0)


@pytest.fixture(scope="module")
def fisher(smollm2, calib):
  config, params, _ = smollm2
  return fisher_lib.llama_fisher(config, params, calib, progress=False)


def _ppl(config, params, tokens):
  return evaluate.perplexity(config, params, tokens, seq_len=256, max_tokens=EVAL_TOKENS, progress=False).ppl


def test_squeezellm_w3_beats_rtn_with_fewer_bits(smollm2, fisher, heldout_tokens):
  """SqueezeLLM 3-bit (per-channel float16 tables, ~3.19 bits) beats RTN W3 g64 (~3.31 bits)."""
  config, params, _ = smollm2
  q_sq, rep_sq = recipe.quantize(config, params, recipe.default_recipe(quant.make("squeezellm", bits=3)),
                                 fisher=fisher, progress=False)
  q_rtn, rep_rtn = recipe.quantize(config, params, recipe.default_recipe(quant.make("rtn", bits=3, group_size=64)),
                                   progress=False)
  assert rep_sq.bits_per_weight < rep_rtn.bits_per_weight
  assert isinstance(tree.get(q_sq, "layers_3/mlp/up_proj/kernel"), Codebook)
  ppl_fp, ppl_sq, ppl_rtn = (_ppl(config, p, heldout_tokens) for p in (params, q_sq, q_rtn))
  assert ppl_fp < ppl_sq < ppl_rtn, (ppl_fp, ppl_sq, ppl_rtn)


def test_squeezellm_dense_and_sparse_keeps_the_chosen_weights(smollm2, fisher):
  """0.45% sparse: dense + sparse reproduces the kept weights to float16 rounding of the delta;
  the Fisher-weighted error of the dense part is below the dense-only method's."""
  config, params, _ = smollm2
  path = "layers_1/mlp/down_proj/kernel"
  w, f = tree.get(params, path), fisher[path]
  dense, info_d = quant.make("squeezellm", bits=3).quantize(w, {"fisher": f})
  q, info = quant.make("squeezellm", bits=3, sensitive_frac=0.0005, outlier_frac=0.004).quantize(w, {"fisher": f})
  assert isinstance(q, Sparse) and formats.name_of(q.base) == "codebook"
  k = round(0.0045 * w.size)
  assert k - 1 <= info["sparse"] <= k and q.index.shape == (k,)
  idx = np.asarray(q.index)[np.asarray(q.index) < w.size]
  got = np.asarray(q.dequantize()).reshape(-1)[idx]
  want = np.asarray(w).reshape(-1)[idx]
  delta = want - np.asarray(q.base.dequantize()).reshape(-1)[idx]  # stored in float16: half an ulp of it
  assert np.all(np.abs(got - want) <= 2 ** -11 * np.abs(delta) + 2 ** -24 * np.abs(want) + 2 ** -25)
  assert info["fisher_error"] < info_d["fisher_error"]
  assert q.bits_per_weight == pytest.approx(dense.bits_per_weight + 48 * k / w.size)


def test_gptq_whitened_lorc_beats_gptq_on_calibration_output_error(smollm2, calib):
  config, params, _ = smollm2
  errors = {}
  for name in ("gptq", "gptq+lorc", "gptq+wlorc"):
    method = quant.make(name, bits=3, group_size=128, rank=8) if "+" in name else quant.make(name, bits=3,
                                                                                               group_size=128)
    _, rep = recipe.quantize(config, params, (recipe.Rule(FIRST_BLOCK, method),), calib, progress=False)
    errors[name] = {l.name: l.error for l in rep.layers}
    assert len(rep.layers) == 7 and all(l.error_kind == "output" for l in rep.layers)
  # Block 0 sees identical (float) inputs in all three runs: whitened LoRC lowers every linear's
  # output error, more than plain LoRC does.
  for path, e in errors["gptq"].items():
    assert errors["gptq+wlorc"][path] < errors["gptq+lorc"][path] < e, path
