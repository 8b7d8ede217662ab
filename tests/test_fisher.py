"""Diagonal empirical Fisher (lqx.quant.fisher) on a tiny random LLaMA: references, properties, cache, summaries."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from lqx import tree
from lqx.models import llama
from lqx.quant import fisher
from lqx.quant.rtn import RTNConfig

CONFIG = llama.LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)
N, T = 4, 24


@pytest.fixture(scope="module")
def setup():
  params = llama.init_params(CONFIG, jax.random.key(0), std=0.1)  # larger than 0.02: gradients well above noise
  tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (N, T)).astype(np.int32)
  return params, tokens, fisher.llama_fisher(CONFIG, params, tokens, progress=False)


def test_block_linears_regex_matches_recipe():
  from lqx import recipe

  assert fisher.BLOCK_LINEARS == recipe.BLOCK_LINEARS


def test_loss_is_mean_next_token_cross_entropy(setup):
  params, tokens, _ = setup
  logits = np.asarray(llama.apply(CONFIG, params, jnp.asarray(tokens[:1])), np.float64)[0]  # (T, V)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  want = -np.mean(logp[np.arange(T - 1), tokens[0, 1:]])
  got = float(jax.jit(fisher.llama_loss(CONFIG))(params, jnp.asarray(tokens[0])))
  assert got == pytest.approx(want, rel=1e-5)
  assert fisher.llama_loss(CONFIG) is fisher.llama_loss(CONFIG)  # one function per config: one compilation


def test_equals_per_sequence_grad_loop(setup):
  params, tokens, f = setup
  paths = fisher.block_linear_paths(params)
  assert list(f) == paths and len(paths) == 7 * CONFIG.n_layers
  loss = fisher.llama_loss(CONFIG)
  want = {p: np.zeros(np.shape(tree.get(params, p)), np.float64) for p in paths}
  grad = jax.jit(jax.grad(loss))
  for seq in tokens:  # autodiff of the whole tree, one sequence at a time
    g = grad(params, jnp.asarray(seq))
    for p in paths:
      want[p] += np.asarray(tree.get(g, p), np.float64) ** 2
  for p in paths:
    assert f[p].dtype == jnp.float32 and f[p].shape == want[p].shape
    np.testing.assert_allclose(np.asarray(f[p]), want[p], rtol=2e-4, atol=1e-6 * want[p].max(), err_msg=p)
    assert want[p].max() > 0


def test_streamed_halves_sum_to_all(setup):
  params, tokens, f = setup
  a = fisher.llama_fisher(CONFIG, params, tokens[:2], progress=False)
  b = fisher.llama_fisher(CONFIG, params, tokens[2:], progress=False)
  resumed = fisher.llama_fisher(CONFIG, params, tokens[2:], init=a, progress=False)
  for p in f:
    scale = float(f[p].max())
    np.testing.assert_allclose(np.asarray(a[p] + b[p]), np.asarray(f[p]), rtol=1e-5, atol=1e-6 * scale, err_msg=p)
    np.testing.assert_allclose(np.asarray(resumed[p]), np.asarray(f[p]), rtol=1e-5, atol=1e-6 * scale, err_msg=p)
  assert float(jnp.sum(a[next(iter(a))])) > 0  # init was not consumed by the donated accumulator


def test_matches_central_finite_difference(setup):
  params, tokens, f = setup
  loss = jax.jit(fisher.llama_loss(CONFIG))
  for path in ("layers_1/mlp/down_proj/kernel", "layers_0/attn/v_proj/kernel"):
    w = np.asarray(tree.get(params, path))
    i, j = np.unravel_index(int(np.argmax(np.asarray(f[path]))), w.shape)
    eps = 1e-2
    fd = []
    for seq in tokens:
      def at(delta):
        w2 = w.copy()
        w2[i, j] += delta
        return float(loss(tree.replace(params, path, jnp.asarray(w2)), jnp.asarray(seq)))
      fd.append((at(eps) - at(-eps)) / (2 * eps))
    assert float(f[path][i, j]) == pytest.approx(sum(g * g for g in fd), rel=2e-2), path


def test_generic_loss_against_closed_form():
  """loss = 0.5 ||x W||^2 has gradient x^T x W: F = sum_s (x_s^T x_s W)^2; other leaves are not returned."""
  rng = np.random.default_rng(1)
  params = {"lin": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}, "other": jnp.ones((1, 3))}
  xs = rng.normal(size=(6, 7, 5)).astype(np.float32)
  loss_fn = lambda p, x: 0.5 * jnp.sum(jnp.square(x @ p["lin"]["kernel"] * p["other"]))
  got = fisher.diagonal_fisher(loss_fn, params, (x for x in xs), paths=["lin/kernel"], progress=False)
  w = np.asarray(params["lin"]["kernel"], np.float64)
  want = sum((x.astype(np.float64).T @ x @ w) ** 2 for x in xs)
  assert list(got) == ["lin/kernel"]
  np.testing.assert_allclose(np.asarray(got["lin/kernel"]), want, rtol=1e-5)


def test_only_requested_paths(setup):
  params, tokens, f = setup
  paths = ["layers_1/attn/v_proj/kernel", "layers_0/mlp/up_proj/kernel"]
  got = fisher.llama_fisher(CONFIG, params, tokens, paths=paths, progress=False)
  assert list(got) == paths
  for p in paths:
    np.testing.assert_allclose(np.asarray(got[p]), np.asarray(f[p]), rtol=1e-5, atol=1e-6 * float(f[p].max()))


@pytest.mark.parametrize("tokens, match", [
    (np.full((2, 8), 96), r"tokens holds token ids in \[96, 96\].*vocab_size=96"),
    (np.full((2, 8), -1), r"tokens holds token ids"),
    (np.zeros((2, 8), np.float32), "integer token ids"),
    (np.zeros((8,), np.int32), r"2-D \(batch, seq_len\)"),
    (np.zeros((2, 33), np.int32), r"<= 32 \(config.max_seq_len\)"),
    (np.zeros((2, 1), np.int32), "sequence length >= 2"),
    (np.zeros((0, 8), np.int32), "empty"),
])
def test_bad_tokens(setup, tokens, match):
  with pytest.raises(ValueError, match=match):
    fisher.llama_fisher(CONFIG, setup[0], tokens, progress=False)


def test_bad_paths_and_inputs(setup):
  params, tokens, f = setup
  with pytest.raises(ValueError, match="'layers_9/attn/q_proj/kernel' is not a param path"):
    fisher.llama_fisher(CONFIG, params, tokens, paths=["layers_9/attn/q_proj/kernel"], progress=False)
  with pytest.raises(ValueError, match="non-empty list of param paths"):
    fisher.llama_fisher(CONFIG, params, tokens, paths=[], progress=False)
  q = RTNConfig(bits=4, group_size=32).quantize(tree.get(params, "layers_0/attn/q_proj/kernel"))[0]
  with pytest.raises(ValueError, match="must be a float array.*quantized"):
    fisher.llama_fisher(CONFIG, tree.replace(params, "layers_0/attn/q_proj/kernel", q), tokens,
                        paths=["layers_0/attn/q_proj/kernel"], progress=False)
  with pytest.raises(ValueError, match="sequences is empty"):
    fisher.diagonal_fisher(fisher.llama_loss(CONFIG), params, [], paths=list(f), progress=False)
  with pytest.raises(ValueError, match="init has paths"):
    fisher.llama_fisher(CONFIG, params, tokens, paths=list(f)[:1], init=f, progress=False)


def test_save_load_round_trip(setup, tmp_path):
  params, _, f = setup
  path = fisher.save_fisher(tmp_path / "fisher.npz", f)
  assert path == tmp_path / "fisher.npz" and path.is_file()
  back = fisher.load_fisher(path, params)
  assert list(back) == list(f)
  for p in f:
    assert back[p].dtype == np.float32
    np.testing.assert_array_equal(back[p], np.asarray(f[p]))


def test_bad_cache_files(setup, tmp_path):
  params, _, f = setup
  corrupt = tmp_path / "corrupt.npz"
  corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
  with pytest.raises(ValueError, match="corrupt.npz: not a Fisher .npz file"):
    fisher.load_fisher(corrupt)
  npy = tmp_path / "single.npy"
  np.save(npy, np.zeros((2, 2), np.float32))
  with pytest.raises(ValueError, match="single.npy: not a Fisher .npz file.*single array"):
    fisher.load_fisher(npy)
  pickled = tmp_path / "pickled.npz"
  np.savez(pickled, **{"a/kernel": np.array([{"x": 1}], dtype=object)})
  with pytest.raises(ValueError, match="pickled.npz: not a Fisher .npz file"):
    fisher.load_fisher(pickled)
  for name, bad, match in (("neg", -np.ones((2, 2), np.float32), "finite and >= 0"),
                           ("f64", np.ones((2, 2)), "float32"), ("vec", np.ones((4,), np.float32), "2-D")):
    file = tmp_path / f"{name}.npz"
    np.savez(file, **{"layers_0/attn/q_proj/kernel": bad})
    with pytest.raises(ValueError, match=f"{name}.npz: .*{match}"):
      fisher.load_fisher(file)
  wrong = tmp_path / "wrong.npz"
  np.savez(wrong, **{"layers_0/attn/q_proj/kernel": np.ones((3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"wrong.npz: .*shape \(3, 3\).*\(64, 64\)"):
    fisher.load_fisher(wrong, params)
  with pytest.raises(ValueError, match="finite"):
    fisher.save_fisher(tmp_path / "nan.npz", {"a": np.full((2, 2), np.nan, np.float32)})
  with pytest.raises(FileNotFoundError):
    fisher.load_fisher(tmp_path / "missing.npz")


def test_summarize_against_numpy():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(32, 16)).astype(np.float32)
  f = rng.random((32, 16)).astype(np.float32)
  x = rng.normal(size=(64, 32))
  h = (2 / 64 * x.T @ x).astype(np.float32)
  qa = RTNConfig(bits=3, group_size=16).quantize(jnp.asarray(w))[0]
  q = np.asarray(qa.dequantize(), np.float64)
  d = w - q
  s = fisher.summarize(w, f, hessian=h, q=qa)
  assert s["numel"] == 512
  assert s["fisher_trace"] == pytest.approx(f.sum(dtype=np.float64), rel=1e-5)
  assert s["fisher_mean"] == pytest.approx(f.mean(dtype=np.float64), rel=1e-5)
  assert s["fisher_max"] == pytest.approx(f.max())
  assert s["fisher_error"] == pytest.approx(np.sum(f * d * d), rel=1e-4)
  assert s["weight_error"] == pytest.approx(np.sum(d * d), rel=1e-4)
  assert s["hessian_trace"] == pytest.approx(np.trace(h.astype(np.float64)), rel=1e-5)
  assert s["hessian_error"] == pytest.approx(np.trace(d.T @ h @ d), rel=1e-4)
  assert set(fisher.summarize(w, f)) == {"numel", "fisher_trace", "fisher_mean", "fisher_max"}
  assert fisher.summarize(w, f, q=q)["fisher_error"] == pytest.approx(s["fisher_error"], rel=1e-5)
  with pytest.raises(ValueError, match=r"fisher has shape \(16, 32\)"):
    fisher.summarize(w, f.T)
  with pytest.raises(ValueError, match=r"hessian has shape \(16, 16\)"):
    fisher.summarize(w, f, hessian=h[:16, :16])


def test_compare_and_top_overlap():
  rng = np.random.default_rng(3)
  fa = {f"k{i}": rng.random((40, 50)).astype(np.float32) for i in range(4)}
  same = fisher.compare(fa, {k: v ** 2 for k, v in fa.items()})  # a monotone map keeps every rank
  assert same["summary"]["spearman_min"] == pytest.approx(1.0)
  assert same["summary"]["top_overlap_min"] == 1.0 and same["layers"]["spearman_trace"] < 1.0 + 1e-12
  noise = fisher.compare(fa, {k: rng.random(v.shape).astype(np.float32) for k, v in fa.items()}, frac=0.01)
  assert abs(noise["summary"]["spearman_mean"]) < 0.1 and noise["summary"]["top_overlap_mean"] < 0.3
  a = np.arange(10.0)
  assert fisher.top_overlap(a, a[::-1], frac=0.2) == 0.0
  assert fisher.top_overlap(a, a + 1, frac=0.3) == 1.0
  b = a.copy()
  b[9], b[0] = b[0], b[9]  # the top entry of a is now the bottom of b
  assert fisher.top_overlap(a, b, frac=0.2) == 0.5
  with pytest.raises(ValueError, match="same paths"):
    fisher.compare(fa, {"k0": fa["k0"]})


# ----------------------------------------------------------------------------- experiments/sensitivity.py


def test_sensitivity_cli_on_a_tiny_checkpoint(setup, tmp_path):
  import json

  from conftest import run_script
  from lqx.io import checkpoint

  params, tokens, f = setup
  checkpoint.save(tmp_path / "tiny", CONFIG, params)
  np.save(tmp_path / "tokens.npy", tokens)
  fisher.save_fisher(tmp_path / "same.npz", f)
  out = tmp_path / "sens.json"
  res = run_script("sensitivity", [
      "--model", str(tmp_path / "tiny"), "--calib-tokens", str(tmp_path / "tokens.npy"), "--subset", "2",
      "--hessian", "--group-size", "32", "--compare", str(tmp_path / "same.npz"),
      "--save-fisher", str(tmp_path / "f.npz"), "--json", str(out), "--plot", str(tmp_path / "sens.png")])
  assert json.loads(out.read_text())["calibration_sha256"] == res["calibration_sha256"]
  assert (res["samples"], res["seq_len"], res["kernels"], res["subset"]["windows"]) == (N, T, 14, 2)
  assert res["compare"]["summary"]["spearman_min"] > 0.999 and res["compare"]["summary"]["top_overlap_min"] == 1
  assert res["seconds_per_window"] > 0 and res["matmul_gflops"] > 0 and (tmp_path / "sens.png").stat().st_size
  saved = fisher.load_fisher(tmp_path / "f.npz", params)
  rows = {r["name"]: r for r in res["layers"]}
  for p in f:
    np.testing.assert_allclose(saved[p], np.asarray(f[p]), rtol=1e-5, atol=1e-6 * float(f[p].max()))
    assert rows[p]["fisher_trace"] == pytest.approx(float(np.sum(saved[p], dtype=np.float64)), rel=1e-4)
    assert rows[p]["hessian_trace"] > 0 and rows[p]["fisher_error"] > 0
  assert {r["proj"] for r in res["layers"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"}


@pytest.mark.parametrize("argv, match", [
    (["--samples", "4", "--subset", "4"], "--subset: 4 must be less than --samples 4"),
    (["--load-fisher", __file__, "--subset", "2"], "--subset: needs the Fisher computed here"),
    (["--save-fisher", "x.npz", "--load-fisher", __file__], "not allowed with argument"),
    (["--frac", "0"], "--frac"),
    (["--seq-len", "1"], "--seq-len"),
    (["--compare", "/nonexistent.npz"], "does not exist"),
])
def test_sensitivity_cli_checks_arguments_first(argv, match, capsys):
  from conftest import run_script

  with pytest.raises(SystemExit) as e:
    run_script("sensitivity", argv)
  assert e.value.code == 2 and match in capsys.readouterr().err
