"""lqx.io.export.hf against transformers and lqx's own HF reader; the folder writer; experiments/export.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the export tests load the folders with PyTorch transformers")
transformers = pytest.importorskip("transformers")

from lqx import formats, recipe, tree  # noqa: E402
from lqx.formats import affine  # noqa: E402
from lqx.formats.actquant import ActQuant  # noqa: E402
from lqx.io import checkpoint, hf  # noqa: E402
from lqx.io.export import MANIFEST, check_destination, write_folder  # noqa: E402
from lqx.io.export.hf import export_hf  # noqa: E402
from lqx.models import llama  # noqa: E402

from conftest import run_script  # noqa: E402

SMALL = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
             bos_token_id=1, eos_token_id=2)


def small_model(seed=0, **overrides):
  """A random small config and params: norms and biases non-trivial, every block linear RTN W4 g32,
  and layers_1's q_proj an act-order QArray (codes stored in a permuted row order)."""
  config = llama.LlamaConfig(**{**SMALL, **overrides})
  params = llama.init_params(config, jax.random.key(seed), std=0.08)
  rng = np.random.default_rng(seed)
  for path in tree.paths(params):
    if path.endswith(("scale", "bias")):
      leaf = tree.get(params, path)
      noise = jnp.asarray(rng.standard_normal(leaf.shape), jnp.float32)
      params = tree.replace(params, path, (1 + 0.1 * noise) if path.endswith("scale") else 0.1 * noise)
  method = recipe.make_method("rtn", bits=4, group_size=32)
  params, _ = recipe.quantize(None, params, recipe.default_recipe(method), progress=False)
  w = params["layers_1"]["attn"]["q_proj"]["kernel"].dequantize() + 0.01
  perm = jnp.asarray(rng.permutation(w.shape[0]), jnp.int32)
  scale = jnp.full((w.shape[0] // 32, w.shape[1]), 0.02)
  qa = affine.quantize_with_params(w, scale, None, bits=4, group_size=32, group_axis="oc", perm=perm)
  return config, tree.replace(params, "layers_1/attn/q_proj/kernel", qa)


def dequantized(params):
  return jax.tree.map(lambda x: np.asarray(x.dequantize() if formats.is_quantized(x) else x), params,
                      is_leaf=formats.is_quantized)


def hf_logits(folder, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=False, rope_theta=5e5), dict(attn_bias=True)],
                         ids=["tied", "untied", "qwen2-bias"])
def test_transformers_matches_lqx(tmp_path, overrides):
  config, params = small_model(**overrides)
  assert any(formats.is_quantized(x) for x in jax.tree.leaves(params, is_leaf=formats.is_quantized))
  out = export_hf(tmp_path / "out", config, params)
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["architectures"] == ["Qwen2ForCausalLM" if config.attn_bias else "LlamaForCausalLM"]
  assert cfg["tie_word_embeddings"] == config.tie_embeddings and cfg["dtype"] == "float32"
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 13))
  want = np.asarray(llama.apply(config, params, jnp.asarray(tokens)))
  np.testing.assert_allclose(hf_logits(out, tokens), want, atol=1e-4, rtol=0)
  # lqx's reader gets back exactly the dequantized params and the same config
  config2, params2 = hf.load_hf(out)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, dequantized(params))


def test_sharded_and_dtype(tmp_path):
  config, params = small_model()
  out = export_hf(tmp_path / "out", config, params, dtype=jnp.bfloat16, max_shard_bytes=20_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and all((out / s).is_file() for s in shards)
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  _, params2 = hf.load_hf(out, dtype=None)
  want = jax.tree.map(lambda x: x.astype(jnp.bfloat16), dequantized(params))
  jax.tree.map(np.testing.assert_array_equal, params2, want)
  manifest = json.loads((out / MANIFEST).read_text())
  assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {MANIFEST}


def test_llama3_rope_scaling_round_trips(tmp_path):
  if "rope_scaling" not in llama.LlamaConfig.__dataclass_fields__:
    pytest.skip("this lqx has no RoPE scaling")
  config, params = small_model(rope_theta=5e5, rope_scaling=(8.0, 1.0, 4.0, 16))
  out = export_hf(tmp_path / "out", config, params)
  assert hf.load_hf(out)[0] == config
  tokens = np.arange(40)[None] % config.vocab_size
  np.testing.assert_allclose(hf_logits(out, tokens), np.asarray(llama.apply(config, params, jnp.asarray(tokens))),
                             atol=1e-4, rtol=0)


def test_tokenizer_forms(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "to", "be", "or", "not"])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  config, params = small_model()
  a = export_hf(tmp_path / "a", config, params, tokenizer=tok)  # a bare tokenizers.Tokenizer
  assert transformers.AutoTokenizer.from_pretrained(a)("to be or not")["input_ids"] == [3, 4, 5, 6]
  b = export_hf(tmp_path / "b", config, params, tokenizer=a)  # a model folder: its files
  assert (b / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()
  with pytest.raises(ValueError, match="tokenizer file '../x'"):
    export_hf(tmp_path / "c", config, params, tokenizer={"../x": b"{}"})
  with pytest.raises(TypeError, match="tokenizer must be"):
    export_hf(tmp_path / "c", config, params, tokenizer=3)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_bad_inputs_named(tmp_path):
  config, params = small_model()
  with pytest.raises(ValueError, match="muP settings embed_multiplier=2.0"):
    export_hf(tmp_path / "a", llama.LlamaConfig(**SMALL, embed_multiplier=2.0), params)
  extra = {**params, "lm_head": {"kernel": jnp.zeros((64, 128))}}
  with pytest.raises(ValueError, match="params has lm_head/kernel"):
    export_hf(tmp_path / "b", config, extra)
  with pytest.raises(ValueError, match="params lacks final_norm/scale"):
    export_hf(tmp_path / "c", config, {k: v for k, v in params.items() if k != "final_norm"})
  aq = tree.replace(params, "layers_0/mlp/up_proj/kernel", ActQuant(params["layers_0"]["mlp"]["up_proj"]["kernel"], 8, -1))
  with pytest.raises(ValueError, match=r"layers_0/mlp/up_proj/kernel: quantizes its input activations \(ActQuant\)"):
    export_hf(tmp_path / "e", config, aq)
  big = tree.replace(params, "final_norm/scale", jnp.full((64,), 1e6))
  with pytest.raises(ValueError, match="final_norm/scale: NaN or Inf as float16"):
    export_hf(tmp_path / "d", config, big, dtype=jnp.float16)
  assert not any(tmp_path.iterdir())  # nothing left behind, not even temp folders


def test_folder_never_clobbers_user_files(tmp_path):
  def write(text):
    return lambda folder: (folder / "a.txt").write_text(text)

  dest = tmp_path / "out"
  dest.mkdir()
  assert write_folder(dest, write("1"), kind="t") == dest  # an empty folder is fine
  with pytest.raises(FileExistsError, match="pass overwrite=True"):
    write_folder(dest, write("2"), kind="t")
  write_folder(dest, write("2"), kind="t", overwrite=True)  # an earlier export: replaced
  assert (dest / "a.txt").read_text() == "2"
  (dest / "notes.md").write_text("mine")
  with pytest.raises(FileExistsError, match="holds notes.md, which lqx did not write"):
    write_folder(dest, write("3"), kind="t", overwrite=True)
  assert (dest / "notes.md").read_text() == "mine" and (dest / "a.txt").read_text() == "2"
  user = tmp_path / "user"
  user.mkdir()
  (user / "config.json").write_text("{}")
  with pytest.raises(FileExistsError, match="not an lqx export"):
    check_destination(user, overwrite=True)

  def fail(folder):
    (folder / "a.txt").write_text("half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    write_folder(tmp_path / "new", fail, kind="t")
  (dest / "notes.md").unlink()
  with pytest.raises(RuntimeError, match="disk full"):  # a failed overwrite keeps the earlier export
    write_folder(dest, fail, kind="t", overwrite=True)
  assert (dest / "a.txt").read_text() == "2"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "user"]  # no temp folders left


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def rtn_smollm2(smollm2):
  """SmolLM2 with every block linear RTN W4 g128 (asymmetric, float16 scales)."""
  config, params, tokenizer = smollm2
  method = recipe.make_method("rtn", bits=4, group_size=128)
  qparams, _ = recipe.quantize(None, params, recipe.default_recipe(method), progress=False)
  return config, qparams, tokenizer


@pytest.mark.slow
def test_smollm2_rtn_w4_loads_in_transformers(tmp_path, rtn_smollm2, heldout_tokens):
  config, qparams, tokenizer = rtn_smollm2
  out = export_hf(tmp_path / "smollm2-w4", config, qparams, tokenizer=tokenizer)
  tokens = np.asarray(heldout_tokens[:96])[None]
  want = np.asarray(llama.apply(config, qparams, jnp.asarray(tokens)))
  got = hf_logits(out, tokens)
  np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)  # logits up to ~36; measured max diff 1.4e-4 (T=256)
  assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99
  config2, params2 = hf.load_hf(out)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, dequantized(qparams))
  tok2 = transformers.AutoTokenizer.from_pretrained(out)
  text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
  assert tok2(text)["input_ids"] == tokenizer(text)["input_ids"]
  assert (tok2.bos_token, tok2.eos_token) == (tokenizer.bos_token, tokenizer.eos_token)


@pytest.mark.slow
def test_export_script_smoke(tmp_path, smollm2):
  config, params, tokenizer = smollm2
  method = recipe.make_method("rtn", bits=4, group_size=128)
  qparams, _ = recipe.quantize(None, params, (recipe.Rule(r"layers_0/(attn|mlp)/\w+_proj/kernel", method),),
                               progress=False)
  ckpt = checkpoint.save(tmp_path / "ckpt", config, qparams, tokenizer=tokenizer)
  out = run_script("export", ["--model", str(ckpt), "--to", "hf", str(tmp_path / "hf")])
  assert out["to"] == "hf" and out["quantized_leaves"] == 7
  stored = checkpoint.read_tokenizer(ckpt)  # the checkpoint's tokenizer files, copied as they are
  assert {name: (tmp_path / "hf" / name).read_bytes() for name in stored} == stored
  _, params2 = hf.load_hf(tmp_path / "hf")
  np.testing.assert_array_equal(params2["layers_0"]["mlp"]["down_proj"]["kernel"],
                                np.asarray(qparams["layers_0"]["mlp"]["down_proj"]["kernel"].dequantize()))
  with pytest.raises(SystemExit):  # exists: a usage error before anything loads
    run_script("export", ["--model", str(ckpt), "--to", "hf", str(tmp_path / "hf")])
  with pytest.raises(SystemExit):  # a GPTQ checkpoint quantizes every block: checked before writing
    run_script("export", ["--model", "smollm2-135m", "--to", "gptq", str(tmp_path / "gptq")])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]
