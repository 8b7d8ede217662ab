"""Block ablation (lqx.quant.ablation) on a tiny random LLaMA: the skip trick, references, sign conventions, CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqx import recipe, tree
from lqx.models import llama
from lqx.quant import ablation, fisher
from lqx.quant.rtn import RTNConfig

CONFIG = llama.LlamaConfig(vocab_size=96, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)
N, T = 5, 24
RTN2 = RTNConfig(bits=2, group_size=32)


@pytest.fixture(scope="module")
def setup():
  params = llama.init_params(CONFIG, jax.random.key(0), std=0.1)
  tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (N, T)).astype(np.int32)
  qparams = recipe.quantize(None, params, recipe.default_recipe(RTN2), progress=False)[0]
  return params, qparams, tokens


def _loss(params, tokens) -> float:
  """Reference: mean next-token NLL over the windows, one full forward per window (quantized kernels as they are)."""
  loss = jax.jit(fisher.llama_loss(CONFIG))
  return float(np.mean([float(loss(params, jnp.asarray(seq))) for seq in tokens]))


def test_skip_block_equals_a_forward_that_omits_it(setup):
  params, _, tokens = setup
  x0 = jnp.asarray(tokens[:2])
  for i in range(CONFIG.n_layers):
    x = llama.embed(CONFIG, params, x0)
    for j, name in enumerate(llama.layer_names(CONFIG)):
      if j != i:
        x = llama.block(CONFIG, params[name], x)[0]
    want = np.asarray(llama.head(CONFIG, params, x))
    got = np.asarray(llama.forward(CONFIG, ablation.skip_block(params, i), x0))  # eager: the same ops
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, np.asarray(llama.forward(CONFIG, params, x0)))
  assert tree.paths(ablation.skip_block(params, 1)) == tree.paths(params)  # same tree: one compilation
  assert float(jnp.abs(params["layers_1"]["attn"]["o_proj"]["kernel"]).max()) > 0  # the input is not mutated
  with pytest.raises(ValueError, match="block 3 is not in the model"):
    ablation.skip_block(params, 3)


def test_skip_block_losses_match_full_forwards(setup):
  params, _, tokens = setup
  res = ablation.skip_block_losses(CONFIG, params, tokens, batch_size=2, progress=False)  # 5 windows: one padded
  assert res.kind == "skip" and len(res.losses) == CONFIG.n_layers
  assert res.base == pytest.approx(_loss(params, tokens), rel=1e-5) and res.float_loss == res.base
  for i in range(CONFIG.n_layers):
    assert res.losses[i] == pytest.approx(_loss(ablation.skip_block(params, i), tokens), rel=1e-5)
    assert res.deltas[i] == res.losses[i] - res.base  # > 0: skipping the block hurts
  assert max(abs(d) for d in res.deltas) > 1e-3


def test_restore_block_losses_match_full_forwards(setup):
  params, qparams, tokens = setup
  res = ablation.restore_block_losses(CONFIG, qparams, params, tokens, batch_size=3, progress=False)
  assert res.kind == "restore" and len(res.losses) == CONFIG.n_layers
  assert res.base == pytest.approx(_loss(qparams, tokens), rel=1e-5)  # the QArray kernels' own product
  assert res.float_loss == pytest.approx(_loss(params, tokens), rel=1e-5)
  assert res.base > res.float_loss + 0.01  # W2 hurts this model
  for i in range(CONFIG.n_layers):
    assert res.losses[i] == pytest.approx(_loss(ablation.restore_blocks(qparams, params, [i]), tokens), rel=1e-5)
    assert res.deltas[i] == res.base - res.losses[i]  # > 0: quantizing the block costs loss


def test_restore_all_is_float_and_restore_none_is_quantized(setup):
  params, qparams, _ = setup
  all_ = ablation.restore_blocks(qparams, params, range(CONFIG.n_layers))
  assert jax.tree.structure(all_) == jax.tree.structure(params)
  assert all(a is b for a, b in zip(jax.tree.leaves(all_), jax.tree.leaves(params)))
  none = ablation.restore_blocks(qparams, params, [])
  assert all(a is b for a, b in zip(jax.tree.leaves(none, is_leaf=tree.is_kernel_leaf),
                                     jax.tree.leaves(qparams, is_leaf=tree.is_kernel_leaf)))
  assert isinstance(tree.get(qparams, "layers_0/attn/q_proj/kernel"), type(tree.get(none, "layers_0/attn/q_proj/kernel")))


def test_sign_conventions_on_a_model_quantized_in_one_block(setup):
  """Only block 0 quantized: restoring it wins back the whole gap, restoring another block nothing;
  a block with zero residual contributes nothing, so skipping it changes nothing."""
  params, _, tokens = setup
  q0 = recipe.quantize(None, params, (recipe.Rule(r"layers_0/(attn|mlp)/\w+_proj/kernel", RTN2),), progress=False)[0]
  res = ablation.restore_block_losses(CONFIG, q0, params, tokens, progress=False)
  assert res.deltas[0] == pytest.approx(res.base - res.float_loss, rel=1e-4) and res.deltas[0] > 0.01
  assert max(abs(d) for d in res.deltas[1:]) < 1e-5
  dead = ablation.skip_block(params, 1)
  skip = ablation.skip_block_losses(CONFIG, dead, tokens, progress=False)
  assert abs(skip.deltas[1]) < 1e-5 and abs(skip.deltas[0]) > 1e-3


def test_refuses_mismatched_trees_and_activation_quantization(setup):
  from lqx.quant import activations

  params, qparams, tokens = setup
  with pytest.raises(ValueError, match="quantizes its input activations"):
    ablation.restore_block_losses(CONFIG, activations.with_activation_bits(qparams, 8, 32), params, tokens)
  small = llama.init_params(llama.LlamaConfig(**{**vars(CONFIG), "head_dim": None, "ffn_dim": 64}), jax.random.key(1))
  with pytest.raises(ValueError, match="has shape"):
    ablation.restore_block_losses(CONFIG, small, params, tokens)
  with pytest.raises(ValueError, match="batch_size"):
    ablation.skip_block_losses(CONFIG, params, tokens, batch_size=0)


# ----------------------------------------------------------------------------- experiments/sensitivity.py --ablation


def test_sensitivity_cli_ablation(setup, tmp_path, capsys):
  from conftest import run_script
  from lqx.io import checkpoint

  params, _, tokens = setup
  checkpoint.save(tmp_path / "tiny", CONFIG, params)
  np.save(tmp_path / "tokens.npy", tokens)
  out = tmp_path / "sens.json"
  res = run_script("sensitivity", [
      "--model", str(tmp_path / "tiny"), "--calib-tokens", str(tmp_path / "tokens.npy"), "--group-size", "32",
      "--hessian", "--ablation", "--ablation-quant", "rtn:2:32", "--json", str(out), "--plot", str(tmp_path / "s.png")])
  assert json.loads(out.read_text())["blocks"] == res["blocks"] and (tmp_path / "s.png").stat().st_size
  blocks, ab = res["blocks"], res["ablation"]
  assert [b["block"] for b in blocks] == list(range(CONFIG.n_layers)) and ab["quant"] == "rtn:2:32"
  want = ablation.restore_block_losses(CONFIG, recipe.quantize(None, params, recipe.default_recipe(RTN2),
                                                               progress=False)[0], params, tokens, progress=False)
  assert ab["loss_quant"] == pytest.approx(want.base, rel=1e-6) and ab["loss_float"] == pytest.approx(want.float_loss)
  rows = {r["name"]: r for r in res["layers"]}  # RTN W3 g32 kernels; the blocks' errors are under rtn:2:32
  for b in blocks:
    assert b["restore_delta"] == pytest.approx(ab["loss_quant"] - b["restore_loss"])
    assert b["skip_delta"] == pytest.approx(b["skip_loss"] - ab["loss_float"])
    mine = [r for r in rows.values() if r["layer"] == b["block"]]
    assert b["fisher_trace"] == pytest.approx(sum(r["fisher_trace"] for r in mine), rel=1e-6)
    assert b["fisher_error"] > sum(r["fisher_error"] for r in mine) > 0  # W2 errs more than W3
    assert b["hessian_error"] > 0
  assert "float-restore (rtn:2:32) delta by block: largest" in capsys.readouterr().out
  assert set(ab["correlations"]) == {"restore_delta_vs_fisher_error", "restore_delta_vs_hessian_error",
                                     "restore_delta_vs_skip_delta", "fisher_error_vs_hessian_error"}


@pytest.mark.parametrize("argv, match", [
    (["--ablation-quant", "rtn:3:128"], "--ablation-quant: only applies with --ablation"),
    (["--ablation", "--ablation-quant", "rtn:3"], "--ablation-quant: 'rtn:3' is not method:bits:group_size"),
    (["--ablation", "--ablation-quant", "nope:3:128"], "--ablation-quant: 'nope:3:128'"),
])
def test_sensitivity_cli_checks_ablation_arguments(argv, match, capsys):
  from conftest import run_script

  with pytest.raises(SystemExit) as e:
    run_script("sensitivity", argv)
  assert e.value.code == 2 and match in capsys.readouterr().err
