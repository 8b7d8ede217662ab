"""lqx.io.hf against transformers' PyTorch models on small random configs."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="HF parity tests need PyTorch (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers", reason="HF parity tests need transformers")

import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from lqx.io import hf, load_model, load_tokenizer  # noqa: E402
from lqx.models import llama  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
             bos_token_id=1, eos_token_id=2)


def _randomize(model, seed=0):
  """Non-trivial values everywhere: HF init leaves norm gains at 1 and biases at 0."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      p.copy_(1 + 0.1 * noise if "norm" in name else (0.1 if name.endswith("bias") else 0.08) * noise)
  return model


def save_hf(folder, arch="llama", shard=None, dtype=torch.float32, **overrides):
  """A random transformers model saved as safetensors in ``folder``; returns the torch model."""
  cls_config, cls_model = {
      "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
      "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
  }[arch]
  config = cls_config(**{**SMALL, **overrides})
  model = _randomize(cls_model(config).eval())
  model.config._attn_implementation = "eager"
  kw = {"max_shard_size": shard} if shard else {}
  model.to(dtype).save_pretrained(folder, safe_serialization=True, **kw)
  return model.float()


def _tokens(config, T=11, B=2, seed=0):
  return np.random.default_rng(seed).integers(0, config.vocab_size, (B, T)).astype(np.int32)


def _assert_logits_match(model, config, params, T=11):
  tokens = _tokens(config, T)
  with torch.no_grad():
    want = model(torch.from_numpy(tokens).long()).logits.numpy()
  got = np.asarray(llama.apply(config, params, jnp.asarray(tokens)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie,theta,shard", [(False, 10000.0, None), (True, 500000.0, None),
                                             (False, 10000.0, "20KB")],
                         ids=["gqa-untied", "tied-theta5e5", "sharded"])
def test_llama_parity(tmp_path, tie, theta, shard):
  model = save_hf(tmp_path, tie_word_embeddings=tie, rope_theta=theta, shard=shard)
  if shard:
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
  config, params = hf.load_hf(tmp_path)
  assert (config.n_heads, config.n_kv_heads, config.head_dim) == (4, 2, 16)
  assert config.rope_theta == theta and config.tie_embeddings == tie
  assert (config.bos_token_id, config.eos_token_id, config.max_seq_len) == (1, 2, 64)
  assert ("lm_head" in params) == (not tie)
  assert params["layers_1"]["attn"]["k_proj"]["kernel"].shape == (64, 32)  # (in, out)
  _assert_logits_match(model, config, params)


def test_qwen2_biases(tmp_path):
  model = save_hf(tmp_path, arch="qwen2", tie_word_embeddings=True, rope_theta=1e6)
  config, params = load_model(tmp_path)
  assert config.attn_bias and config.rope_theta == 1e6
  assert params["layers_0"]["attn"]["q_proj"]["bias"].shape == (64,)
  assert "bias" not in params["layers_0"]["attn"]["o_proj"]
  _assert_logits_match(model, config, params)


def test_mistral_sliding_window_caps_max_seq_len(tmp_path):
  model = save_hf(tmp_path, arch="mistral", sliding_window=16, head_dim=16)
  config, params = hf.load_hf(tmp_path)
  assert config.max_seq_len == 16  # full causal attention == sliding window up to 16 tokens
  _assert_logits_match(model, config, params, T=16)


def test_bf16_checkpoint(tmp_path):
  model = save_hf(tmp_path, dtype=torch.bfloat16)
  config, params = hf.load_hf(tmp_path)
  w = params["layers_0"]["mlp"]["down_proj"]["kernel"]
  want = model.model.layers[0].mlp.down_proj.weight.detach().to(torch.bfloat16).float().numpy().T
  assert w.dtype == np.float32 and np.array_equal(w, want)
  _, raw = hf.load_hf(tmp_path, dtype=None)
  assert raw["layers_0"]["mlp"]["down_proj"]["kernel"].dtype.name == "bfloat16"


def test_generate_matches_recompute_and_hf(tmp_path):
  model = save_hf(tmp_path, rope_theta=10000.0)
  config, params = hf.load_hf(tmp_path)
  prompt = _tokens(config, T=5)
  steps = 6
  got = np.asarray(llama.generate(config, params, prompt, steps))
  seq = prompt
  for _ in range(steps):  # greedy by recomputing the whole prefix
    nxt = np.asarray(llama.apply(config, params, jnp.asarray(seq)))[:, -1].argmax(-1)
    seq = np.concatenate([seq, nxt[:, None].astype(np.int32)], axis=1)
  np.testing.assert_array_equal(got, seq[:, prompt.shape[1]:])
  model.generation_config.eos_token_id = None  # random weights: never stop early
  with torch.no_grad():
    out = model.generate(torch.from_numpy(prompt).long(), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                         do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)
  np.testing.assert_array_equal(got, out[:, prompt.shape[1]:].numpy())


def test_tokenizer_from_folder(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "to", "be", "or", "not"])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path)
  save_hf(tmp_path)
  assert load_tokenizer(tmp_path)("to be or not")["input_ids"] == [3, 4, 5, 6]


# ----------------------------------------------------------------------------- bad input


def test_truncated_safetensors_names_file(tmp_path):
  save_hf(tmp_path)
  file = tmp_path / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[: len(data) // 2])
  with pytest.raises(hf.HFError, match=r"model\.safetensors.*truncated"):
    hf.load_hf(tmp_path)


def test_truncated_shard_names_file(tmp_path):
  save_hf(tmp_path, shard="20KB")
  file = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
  file.write_bytes(file.read_bytes()[:100])
  with pytest.raises(hf.HFError, match=file.name):
    hf.load_hf(tmp_path)


def _rewrite(folder, edit):
  """Rewrites model.safetensors with ``edit(tensors)`` applied (numpy writer, float32)."""
  from safetensors.numpy import load_file

  tensors = load_file(folder / "model.safetensors")
  edit(tensors)
  save_file(tensors, folder / "model.safetensors")


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
  save_hf(tmp_path)
  name = "model.layers.1.self_attn.k_proj.weight"
  _rewrite(tmp_path, lambda t: t.__setitem__(name, np.zeros((24, 64), np.float32)))
  with pytest.raises(hf.HFError, match=rf"{name}.*\(24, 64\).*expected \(32, 64\)"):
    hf.load_hf(tmp_path)


def test_missing_tensor_names_it(tmp_path):
  save_hf(tmp_path)
  name = "model.layers.0.mlp.up_proj.weight"
  _rewrite(tmp_path, lambda t: t.pop(name))
  with pytest.raises(hf.HFError, match=name):
    hf.load_hf(tmp_path)


def test_nan_names_tensor(tmp_path):
  save_hf(tmp_path)
  name = "model.norm.weight"
  _rewrite(tmp_path, lambda t: t[name].__setitem__(3, np.inf))
  with pytest.raises(hf.HFError, match=rf"{name}.*NaN or Inf"):
    hf.load_hf(tmp_path)


def _edit_config(folder, **changes):
  cfg = json.loads((folder / "config.json").read_text())
  cfg.update(changes)
  (folder / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture_names_it(tmp_path):
  save_hf(tmp_path)
  _edit_config(tmp_path, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
  with pytest.raises(hf.HFError, match=r"GPTNeoXForCausalLM.*supported: LlamaForCausalLM"):
    load_model(tmp_path)


def test_rope_scaling_rejected(tmp_path):  # llama3 scaling is read: tests/test_model_families.py
  save_hf(tmp_path)
  _edit_config(tmp_path, rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0})
  with pytest.raises(hf.HFError, match="rope_parameters type 'yarn' is not supported"):
    hf.load_hf(tmp_path)


def test_dispatch_errors(tmp_path):
  with pytest.raises(ValueError, match="not a known model name"):
    load_model(tmp_path / "nope")
  with pytest.raises(ValueError, match="no config.json"):
    load_model(tmp_path)
  save_hf(tmp_path)
  with pytest.raises(hf.HFError, match="no tokenizer files"):
    load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- hostile folders (P6)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Folders saved once per module: ``saved(kind)`` copies one to a fresh folder and returns its path."""
  import shutil

  bases = {}
  for kind, kw in {"plain": {}, "sharded": {"shard": "20KB"}, "tied": {"tie_word_embeddings": True}}.items():
    bases[kind] = tmp_path_factory.mktemp(kind)
    save_hf(bases[kind], **kw)
  counter = iter(range(10**6))

  def copy(kind="plain"):
    dst = tmp_path_factory.mktemp("case") / f"{kind}{next(counter)}"
    shutil.copytree(bases[kind], dst, symlinks=True)
    return dst
  return copy


def test_hf_error_is_model_file_error():
  from lqx.io.errors import ModelFileError

  assert issubclass(hf.HFError, ModelFileError) and issubclass(hf.HFError, ValueError)


@pytest.mark.parametrize("value,match", [
    (10**6, r"=1000000 is out of range"), (2**32, "=4294967296 is out of range"),
    (3, r"=3 but the safetensors files hold 2 layers"), (0, "out of range"),
    (True, "must be an integer"), ("2", "must be an integer"), (2.0, "must be an integer"), (None, "integer")])
def test_layer_count_checked_before_building_tensors(saved, monkeypatch, value, match):
  folder = saved()
  _edit_config(folder, num_hidden_layers=value)
  monkeypatch.setattr(hf, "expected_tensors", lambda c: pytest.fail("built the expected tree"))
  with pytest.raises(hf.HFError, match=rf"config\.json: num_hidden_layers.*{match}"):
    hf.load_hf(folder)


@pytest.mark.parametrize("changes,match", [
    (dict(hidden_size=2**40), "hidden_size=.* out of range"), (dict(vocab_size=-1), "vocab_size=-1"),
    (dict(intermediate_size="96"), "intermediate_size must be an integer"),
    (dict(num_attention_heads=3, head_dim=None), "hidden_size=64 is not a multiple of num_attention_heads=3"),
    (dict(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (dict(num_key_value_heads=0), "num_key_value_heads=0 is out of range"),
    (dict(max_position_embeddings=1e300), "max_position_embeddings must be an integer"),
    (dict(head_dim=15), "head_dim=15 must be even"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false, got 'false'"),
    (dict(tie_word_embeddings=0), "tie_word_embeddings must be true or false"),
    (dict(attention_bias="no"), "attention_bias must be true or false"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": float("nan")}), "rope_theta must be a finite number"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 0}), "rope_theta must be a finite number"),
    (dict(rope_parameters=None, rope_theta=-1.0), "rope_theta must be a finite number above 0, got -1.0"),
    (dict(rope_parameters=None, rope_theta="1e4"), "rope_theta must be a finite number"),
    (dict(rope_theta=5e5), "RoPE bases disagree"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "factor": 8.0}), "'factor'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling type 'linear' is not supported"),
    (dict(rope_parameters=[1]), "rope_parameters must be an object"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5 is not supported"),
    (dict(num_local_experts=8), "num_local_experts=8: mixture-of-experts"),
    (dict(rms_norm_eps=float("inf")), "rms_norm_eps must be a finite number"),
    (dict(eos_token_id="2"), "eos_token_id must be null, a token id"),
    (dict(architectures="LlamaForCausalLM"), "architectures must be a list"),
    (dict(auto_map={"AutoModelForCausalLM": "modeling_x.X"}), "custom model code"),
    (dict(hidden_act=["silu"]), r"hidden_act \['silu'\] is not supported"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_config_fields_checked(saved, changes, match):
  folder = saved()
  _edit_config(folder, **changes)
  with pytest.raises(hf.HFError, match=rf"config\.json: .*{match}"):
    hf.load_hf(folder)


def test_sliding_window_checks(saved):
  folder = saved()
  _edit_config(folder, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=0)
  with pytest.raises(hf.HFError, match="sliding_window=0 is out of range"):
    hf.read_config(folder)
  _edit_config(folder, architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=None,
               use_sliding_window=True)
  with pytest.raises(hf.HFError, match="sliding_window is null"):
    hf.read_config(folder)
  _edit_config(folder, use_sliding_window="true")
  with pytest.raises(hf.HFError, match="use_sliding_window must be true or false"):
    hf.read_config(folder)


@pytest.mark.parametrize("data,match", [
    (b'{"vocab_size": 128, "x": "\xff\xfe"}', "not UTF-8"), (b"[1, 2]", "top level is a JSON list"),
    (b"{'a': 1}", "not valid JSON"), (b"", "not valid JSON"), (b"[" * 100000, "not valid JSON"),
    (b'{"num_hidden_layers": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    (b'{"num_hidden_layers": 2, "num_hidden_layers": 3}', "'num_hidden_layers' appears twice")])
def test_config_json_never_raises_raw(saved, data, match):
  folder = saved()
  (folder / "config.json").write_bytes(data)
  with pytest.raises(hf.HFError, match=rf"config\.json.*{match}"):
    hf.load_hf(folder)


def _edit_index(folder, edit):
  file = folder / "model.safetensors.index.json"
  index = json.loads(file.read_text())
  edit(index)
  file.write_text(json.dumps(index))


def test_weight_map_entries_checked(saved, tmp_path):
  folder = saved("sharded")
  name = "model.norm.weight"
  shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  (outside / shard).write_bytes((folder / shard).read_bytes())
  for value, match in [(7, "is 7, expected a file name"), (None, "expected a file name"),
                       (f"../{outside.name}/{shard}", "inside the model folder"),
                       (str(outside / shard), "inside the model folder"), ("config.json", "inside the model folder")]:
    _edit_index(folder, lambda ix: ix["weight_map"].__setitem__(name, value))
    with pytest.raises(hf.HFError, match=rf"index\.json: weight_map\['model\.norm\.weight'\].*{match}"):
      hf.load_hf(folder)
  _edit_index(folder, lambda ix: ix.__setitem__("weight_map", [shard]))
  with pytest.raises(hf.HFError, match=r"index\.json: 'weight_map' is \["):
    hf.load_hf(folder)


def test_symlink_outside_folder_rejected(saved, tmp_path):
  folder = saved()
  outside = tmp_path / "model.safetensors"
  (folder / "model.safetensors").rename(outside)
  (folder / "model.safetensors").symlink_to(outside)
  with pytest.raises(hf.HFError, match=r"model\.safetensors resolves to .* outside the model folder"):
    hf.load_hf(folder)
  (folder / "config.json").rename(tmp_path / "config.json")
  (folder / "config.json").symlink_to(tmp_path / "config.json")
  with pytest.raises(hf.HFError, match=r"config\.json resolves to .* outside the model folder"):
    hf.load_hf(folder)


def test_hub_cache_snapshot_symlinks_load(saved, tmp_path):
  """A hub cache snapshot links its files to ../../blobs: that stays readable."""
  folder = saved()
  repo = tmp_path / "models--org--tiny"
  snap = repo / "snapshots" / "abc123"
  snap.mkdir(parents=True)
  (repo / "blobs").mkdir()
  for f in folder.iterdir():
    f.rename(repo / "blobs" / f.name)
    (snap / f.name).symlink_to(f"../../blobs/{f.name}")
  config, params = hf.load_hf(snap)
  assert config.n_layers == 2 and "lm_head" in params


def test_duplicate_tensors_across_shards_rejected(saved):
  from safetensors.numpy import load_file

  folder = saved("sharded")
  index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
  name = "model.norm.weight"
  other = next(f for f in sorted(set(index.values())) if f != index[name])
  tensors = load_file(folder / other)
  tensors[name] = np.full(64, 3.0, np.float32)  # a second, different copy
  save_file(tensors, folder / other)
  with pytest.raises(hf.HFError, match=rf"{other}: holds tensor '{name}' but .*index\.json maps it to"):
    hf.load_hf(folder)
  (folder / "model.safetensors.index.json").unlink()  # no index: every shard is read, duplicates still fail
  with pytest.raises(hf.HFError, match=rf"tensor '{name}' is also in"):
    hf.load_hf(folder)


def test_tensor_missing_from_index_rejected(saved):
  folder = saved("sharded")
  index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
  name = next(n for n in index if list(index.values()).count(index[n]) > 1)  # its shard stays listed
  _edit_index(folder, lambda ix: ix["weight_map"].pop(name))
  with pytest.raises(hf.HFError, match=rf"holds tensor '{name}' but .* does not list it"):
    hf.load_hf(folder)


def test_tied_head_must_equal_embedding(saved):
  folder = saved("tied")
  def add_head(t, v):
    t["lm_head.weight"] = v(t["model.embed_tokens.weight"])
  _rewrite(folder, lambda t: add_head(t, lambda e: e.copy()))
  config, params = hf.load_hf(folder)  # an identical copy is harmless
  assert config.tie_embeddings and "lm_head" not in params
  _rewrite(folder, lambda t: add_head(t, lambda e: e + 1))
  with pytest.raises(hf.HFError, match="tie_word_embeddings is true but tensor 'lm_head.weight' differs"):
    hf.load_hf(folder)


def test_f64_overflowing_float32_rejected(saved):
  folder = saved()
  name = "model.norm.weight"
  _rewrite(folder, lambda t: t.__setitem__(name, np.full(64, 1e300, np.float64)))
  with pytest.raises(hf.HFError, match=rf"{name}.*overflows float32"):
    hf.load_hf(folder)
  assert hf.load_hf(folder, dtype=None)[1]["final_norm"]["scale"].dtype == np.float64


@pytest.mark.parametrize("length", [2**63, 2**64 - 1, 2**32, 100_000_000, 0, 7])
def test_hostile_header_length(saved, length):
  import struct

  folder = saved()
  file = folder / "model.safetensors"
  data = bytearray(file.read_bytes())
  data[:8] = struct.pack("<Q", length)
  file.write_bytes(bytes(data))
  with pytest.raises(hf.HFError, match=r"model\.safetensors"):
    hf.load_hf(folder)


def test_duplicate_key_in_safetensors_header(saved):
  import struct

  folder = saved()
  file = folder / "model.safetensors"
  data = file.read_bytes()
  n = struct.unpack("<Q", data[:8])[0]
  header = data[8:8 + n]
  entry = header[1:header.index(b"},") + 1]  # the first entry, repeated
  header = b"{" + entry + b"," + header[1:]
  file.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])
  with pytest.raises(hf.HFError, match=r"model\.safetensors \(safetensors header\): key .* appears twice"):
    hf.load_hf(folder)


# ----------------------------------------------------------------------------- tokenizer: no custom code


_EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
  pass
"""

_PROBE = """
import sys
from lqx.io import hf, load_tokenizer
if sys.argv[2] == "bypass":  # skip lqx's auto_map check: transformers itself must not run or prompt
  hf._read_json = lambda *a, **k: {{}}
try:
  tok = load_tokenizer(sys.argv[1])
  print("TOKENIZER", type(tok).__name__, tok("to be")["input_ids"])
except hf.HFError as e:
  print("HFERROR", e)
"""


def _tokenizer_folder(folder):
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "to", "be", "or", "not"])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


@pytest.mark.parametrize("where,mode,answer", [
    ("tokenizer_config", "checked", None), ("config", "checked", None),
    ("tokenizer_config", "bypass", None), ("tokenizer_config", "bypass", "y\n")])
def test_tokenizer_auto_map_never_runs_code_nor_prompts(saved, tmp_path, where, mode, answer):
  """auto_map + an unknown tokenizer_class is what makes transformers ask "[y/N]" (and run the code on y)."""
  import os
  import subprocess
  import sys

  folder = saved()
  _tokenizer_folder(folder)
  marker = tmp_path / "marker"
  (folder / "evil_tok.py").write_text(_EVIL.format(marker=str(marker)))
  edits = {"tokenizer_config": {"tokenizer_class": "EvilTokenizer"}}
  edits.setdefault(where, {})["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", "evil_tok.EvilTokenizer"]}
  for name, changes in edits.items():
    file = folder / f"{name}.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
  env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
  stdin = dict(stdin=subprocess.DEVNULL) if answer is None else dict(input=answer)
  out = subprocess.run([sys.executable, "-c", _PROBE.format(), str(folder), mode], capture_output=True, text=True,
                       timeout=120, env=env, **stdin)
  text = out.stdout + out.stderr
  assert out.returncode == 0, text
  assert "[y/N]" not in text and "Do you wish to run" not in text, text
  assert not marker.exists(), "the folder's Python ran"
  if mode == "checked":  # lqx refuses before transformers is asked
    assert f"HFERROR {folder / where}.json: auto_map" in out.stdout, text
  else:  # transformers refuses (trust_remote_code=False) or builds its own class, never the folder's
    assert ("HFERROR" in out.stdout or "TOKENIZER" in out.stdout) and "EvilTokenizer" not in out.stdout, text


def test_tokenizer_built_without_remote_code(saved, monkeypatch):
  folder = saved()
  _tokenizer_folder(folder)
  seen = {}
  monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: seen.update(k) or "tok")
  assert load_tokenizer(folder) == "tok"
  assert seen["trust_remote_code"] is False and seen["local_files_only"] is True
