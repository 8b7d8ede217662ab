"""Checkpoints carry their tokenizer: moved or copied anywhere, they still tokenize as their source did."""

import hashlib
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqx import assets, data, evaluate, recipe
from lqx import io as lqx_io
from lqx.io import checkpoint as ck
from lqx.io.checkpoint import CheckpointError
from lqx.quant.rtn import RTNConfig, rtn_quantize

TEXT = "to be or not to be , that is the question"
PARAMS = {"w": rtn_quantize(jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32) / 100,
                            RTNConfig(bits=4, group_size=32)),
          "b": jnp.ones((3,), jnp.bfloat16)}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  """A tiny Hugging Face folder: a word-level tokenizer (saved by transformers) and a config.json."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  words = ["[UNK]", "<eos>", "to", "be", "or", "not", "that", "is", "the", "question"]
  tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="<eos>")
  path = tmp_path_factory.mktemp("hf") / "model"
  tok.save_pretrained(path)
  (path / "config.json").write_text("{}")
  return path


def _ids(tok, text=TEXT):
  return tok(text)["input_ids"]


def test_tokenizer_files_of_a_folder_load_alone(hf_folder, tmp_path):
  files = lqx_io.tokenizer_files(hf_folder)
  assert "tokenizer.json" in files and "tokenizer_config.json" in files and "config.json" not in files
  assert all(isinstance(v, bytes) and v for v in files.values())
  assert lqx_io.tokenizer_files(lqx_io.load_tokenizer(hf_folder)) == files  # an object gives the same files
  for name, blob in files.items():
    (tmp_path / name).write_bytes(blob)
  assert _ids(lqx_io.load_tokenizer(hf_folder)) == [2, 3, 4, 5, 2, 3, 0, 6, 7, 8, 9]
  from transformers import AutoTokenizer
  assert _ids(AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)) == _ids(lqx_io.load_tokenizer(hf_folder))


def test_checkpoint_with_tokenizer_survives_a_move_and_the_source_deleted(hf_folder, tmp_path):
  source = shutil.copytree(hf_folder, tmp_path / "source")
  path = ck.save(tmp_path / "ckpt", None, PARAMS, tokenizer=source, metadata={"source_model": str(source)})
  want = _ids(lqx_io.load_tokenizer(source))
  files = lqx_io.tokenizer_files(source)
  shutil.rmtree(source)
  moved = shutil.move(path, tmp_path / "elsewhere" / "moved")
  assert sorted(p.name for p in moved.iterdir()) == [ck.ARRAYS_NAME, ck.JSON_NAME, ck.TOKENIZER_NAME]
  assert _ids(lqx_io.load_tokenizer(moved)) == want
  assert lqx_io.tokenizer_files(moved) == ck.read_tokenizer(moved) == files
  doc = ck.read_json(moved)
  assert doc["tokenizer"] == {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}
  assert all(f"{ck.TOKENIZER_NAME}/{n}" in doc["files"] for n in files)
  _, params, meta = ck.restore(moved)
  assert np.array_equal(params["w"].dequantize(), PARAMS["w"].dequantize()) and meta == {"source_model": str(source)}


def test_tokenizer_given_as_files_or_object(hf_folder, tmp_path):
  tok = lqx_io.load_tokenizer(hf_folder)
  files = lqx_io.tokenizer_files(hf_folder)
  a = ck.save(tmp_path / "a", None, PARAMS, tokenizer=files)
  b = ck.save(tmp_path / "b", None, PARAMS, tokenizer=tok)
  assert ck.read_tokenizer(a) == ck.read_tokenizer(b) == files
  assert ck.read_tokenizer(ck.save(tmp_path / "none", None, PARAMS)) is None


def test_old_checkpoint_follows_its_source_then_says_how_to_fix(hf_folder, tmp_path):
  source = shutil.copytree(hf_folder, tmp_path / "source")
  path = ck.save(tmp_path / "old", None, PARAMS, metadata={"source_model": str(source)})
  assert ck.read_json(path)["tokenizer"] is None
  assert _ids(lqx_io.load_tokenizer(path)) == _ids(lqx_io.load_tokenizer(hf_folder))
  shutil.rmtree(source)
  for call in (lqx_io.load_tokenizer, lqx_io.tokenizer_files):
    with pytest.raises(ValueError) as e:
      call(path)
    msg = str(e.value)
    assert str(path) in msg and str(source) in msg and "no longer exists" in msg and "add_tokenizer" in msg
  assert ck.add_tokenizer(path, hf_folder) == path  # the fix the message names
  assert _ids(lqx_io.load_tokenizer(path)) == _ids(lqx_io.load_tokenizer(hf_folder))
  _, params, meta = ck.restore(path)
  assert meta == {"source_model": str(source)} and params["b"].dtype == jnp.bfloat16


def test_damaged_tokenizer_is_refused(hf_folder, tmp_path):
  path = ck.save(tmp_path / "ckpt", None, PARAMS, tokenizer=hf_folder)
  f = path / ck.TOKENIZER_NAME / "tokenizer.json"
  data = f.read_bytes()
  f.write_bytes(data.replace(b'"question"', b'"questioN"'))  # same size: only the sha256 catches it
  with pytest.raises(CheckpointError, match="corrupt, tokenizer/tokenizer.json does not match the sha256"):
    lqx_io.load_tokenizer(path)
  f.unlink()
  with pytest.raises(CheckpointError, match="tokenizer/tokenizer.json is unreadable"):
    ck.read_tokenizer(path)
  with pytest.raises(CheckpointError, match="incomplete checkpoint, tokenizer/tokenizer.json is missing"):
    ck.restore(path)


def test_extra_file_in_the_tokenizer_folder_is_ignored_and_blocks_overwrite(hf_folder, tmp_path):
  path = ck.save(tmp_path / "ckpt", None, PARAMS, tokenizer=hf_folder)
  want = _ids(lqx_io.load_tokenizer(path))
  (path / ck.TOKENIZER_NAME / "added_tokens.json").write_text('{"question": 2}')
  assert _ids(lqx_io.load_tokenizer(path)) == want  # built from the listed, checked files only
  with pytest.raises(FileExistsError, match="tokenizer/added_tokens.json, which lqx did not write"):
    ck.save(path, None, PARAMS, overwrite=True)
  (path / ck.TOKENIZER_NAME / "added_tokens.json").unlink()
  ck.save(path, None, PARAMS, overwrite=True)  # replaces the checkpoint and its tokenizer files
  assert sorted(p.name for p in path.iterdir()) == [ck.ARRAYS_NAME, ck.JSON_NAME]


@pytest.mark.parametrize("tokenizer, error, words", [
    ({"../evil.json": b"{}"}, ValueError, "not a plain file name"),
    ({"sub/tokenizer.json": b"{}"}, ValueError, "not a plain file name"),
    ({"tokenizer.json": "text"}, TypeError, "expected bytes"),
    ({}, ValueError, "no files"),
    (3, TypeError, "model name or path, or a tokenizer object"),
])
def test_bad_tokenizer_argument_writes_nothing(tmp_path, tokenizer, error, words):
  with pytest.raises(error, match=words):
    ck.save(tmp_path / "ckpt", None, PARAMS, tokenizer=tokenizer)
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("edit", [
    lambda d: d.update(tokenizer={"tokenizer.json": "0" * 63}),
    lambda d: d.update(tokenizer={"../x": "0" * 64}),
    lambda d: d.update(tokenizer={"other.json": "0" * 64}),  # not in "files"
    lambda d: d.update(tokenizer=[]),
    lambda d: d.update(recipe={"paths": "x"}),
])
def test_hand_edited_tokenizer_or_recipe_entries_are_corrupt(hf_folder, tmp_path, edit):
  path = ck.save(tmp_path / "ckpt", None, PARAMS, tokenizer=hf_folder)
  doc = json.loads((path / ck.JSON_NAME).read_text())
  edit(doc)
  (path / ck.JSON_NAME).write_text(json.dumps(doc))
  with pytest.raises(CheckpointError, match="corrupt, '(tokenizer|recipe)'"):
    ck.restore(path)


@pytest.mark.slow
def test_moved_smollm2_checkpoint_tokenizes_and_evaluates_without_its_source(
    smollm2, heldout_tokens, tmp_path, monkeypatch):
  """Block 0 quantized (RTN), saved with the tokenizer of the packaged GGUF, moved, the model cache gone:
  the moved checkpoint tokenizes exactly as the GGUF does and evaluates to the same perplexity."""
  config, params, gguf_tokenizer = smollm2
  text = data.load_text("heldout")  # from the cache, before it goes away
  rules = (recipe.Rule(r"layers_0/(attn|mlp)/\w+_proj/kernel", RTNConfig(bits=4, group_size=64)),)
  qparams, _ = recipe.quantize(config, params, rules, progress=False)
  files = lqx_io.tokenizer_files("smollm2-135m")
  assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
  path = ck.save(tmp_path / "made" / "ckpt", config, qparams, tokenizer=files, recipe=rules,
                 metadata={"source_model": "smollm2-135m"})
  moved = shutil.move(path, tmp_path / "moved")
  shutil.rmtree(tmp_path / "made")

  def no_source(*_):
    raise AssertionError("the source model was looked up")

  monkeypatch.setenv("LQX_CACHE", str(tmp_path / "empty-cache"))
  monkeypatch.setattr(assets, "_fetch_archive", no_source)
  tok = lqx_io.load_tokenizer(moved)
  tokens = data.tokenize(tok, text)
  assert np.array_equal(tokens, heldout_tokens)
  assert _ids(tok, "Hello, world!\n<|im_start|>user") == _ids(gguf_tokenizer, "Hello, world!\n<|im_start|>user")
  assert ck.read_recipe(moved) == rules

  config2, restored = lqx_io.load_model(moved)
  moved_ppl = evaluate.perplexity(config2, restored, tokens, seq_len=256, max_tokens=1024)
  want = evaluate.perplexity(config, jax.tree.map(jnp.asarray, qparams), heldout_tokens, seq_len=256, max_tokens=1024)
  assert moved_ppl.ppl == want.ppl and moved_ppl.tokens == want.tokens == 1020
