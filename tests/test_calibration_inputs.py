"""Calibration inputs from user files: exact .npy windows, sampled text, and their sha256."""

import hashlib
import json
import pickle
import re

import numpy as np
import pytest

from lqx import data

VOCAB = 1000
from conftest import run_script  # noqa: E402




def windows(n=3, t=16, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, size=(n, t)).astype(np.int32)


def raises_naming(path, *extra):
  """pytest.raises(ValueError) whose message names ``path`` (and matches each regex in ``extra``)."""
  return pytest.raises(ValueError, match=re.escape(path.name) + "".join(f"(?s:.*){x}" for x in extra))


def test_round_trip_and_sha256(tmp_path):
  a = windows()
  f = tmp_path / "calib.npy"
  np.save(f, a.astype(np.int64))  # any integer dtype loads as int32
  got = data.load_calibration_tokens(f, vocab_size=VOCAB, seq_len=16)
  assert got.dtype == np.int32 and got.shape == (3, 16)
  np.testing.assert_array_equal(got, a)
  sha = data.tokens_sha256(got)
  assert sha == data.tokens_sha256(a) == data.tokens_sha256(a.astype(np.int64))
  # The documented definition, recomputed by hand.
  assert sha == hashlib.sha256(b"3x16:" + a.astype("<i4").tobytes()).hexdigest()
  b = a.copy()
  b[0, 0] = (b[0, 0] + 1) % VOCAB
  assert data.tokens_sha256(b) != sha
  # Same bytes, other shape: (2, 4) vs (4, 2), and a transpose.
  c = np.arange(8, dtype=np.int32)
  assert data.tokens_sha256(c.reshape(2, 4)) != data.tokens_sha256(c.reshape(4, 2))
  assert data.tokens_sha256(a.T) != sha
  assert data.tokens_sha256(np.asfortranarray(a)) == sha  # C order, whatever the memory layout


def test_ids_outside_the_vocabulary(tmp_path):
  f = tmp_path / "oov.npy"
  a = windows()
  a[1, 2] = VOCAB + 5
  np.save(f, a)
  with raises_naming(f, str(VOCAB + 5), str(VOCAB)):
    data.load_calibration_tokens(f, vocab_size=VOCAB)
  a[1, 2] = -1
  np.save(f, a)
  with raises_naming(f, r"\[-1, "):
    data.load_calibration_tokens(f, vocab_size=VOCAB)
  with raises_naming(f):  # negative ids are refused even without a vocabulary size
    data.load_calibration_tokens(f)


def test_wrong_rank_and_wrong_seq_len(tmp_path):
  f = tmp_path / "flat.npy"
  np.save(f, windows().reshape(-1))
  with raises_naming(f, "1-D"):
    data.load_calibration_tokens(f)
  g = tmp_path / "cube.npy"
  np.save(g, windows().reshape(3, 4, 4))
  with raises_naming(g, "3-D"):
    data.load_calibration_tokens(g)
  h = tmp_path / "short.npy"
  np.save(h, windows())
  with raises_naming(h, "T=16", "seq_len=32"):
    data.load_calibration_tokens(h, seq_len=32)


def test_float_dtype_refused_even_if_integral(tmp_path):
  f = tmp_path / "floats.npy"
  np.save(f, windows().astype(np.float32))
  with raises_naming(f, "float32"):
    data.load_calibration_tokens(f)


def test_object_array_refused_without_unpickling(tmp_path, monkeypatch):
  f = tmp_path / "objects.npy"
  np.save(f, np.array([[1, 2], [3, 4]], dtype=object), allow_pickle=True)

  def no_unpickling(*args, **kwargs):
    raise AssertionError("a pickle was loaded")

  monkeypatch.setattr(pickle, "load", no_unpickling)
  monkeypatch.setattr(pickle, "loads", no_unpickling)
  with raises_naming(f, "object"):
    data.load_calibration_tokens(f)


def test_zero_windows(tmp_path):
  f = tmp_path / "empty.npy"
  np.save(f, np.zeros((0, 16), dtype=np.int32))
  with raises_naming(f, "fewer than one window"):
    data.load_calibration_tokens(f)
  g = tmp_path / "one_token.npy"
  np.save(g, np.zeros((4, 1), dtype=np.int32))
  with raises_naming(g, "fewer than one window"):
    data.load_calibration_tokens(g)


def test_not_a_npy_file(tmp_path):
  f = tmp_path / "tokens.txt"
  f.write_text("1 2 3 4\n5 6 7 8\n")
  with raises_naming(f, "not a .npy"):
    data.load_calibration_tokens(f)
  g = tmp_path / "tokens.npz"
  np.savez(g, windows())
  with raises_naming(g, "npz"):
    data.load_calibration_tokens(g)
  h = tmp_path / "truncated.npy"
  np.save(h, windows())
  h.write_bytes(h.read_bytes()[:-10])
  with raises_naming(h, "could not be loaded"):
    data.load_calibration_tokens(h)


def test_missing_file(tmp_path):
  f = tmp_path / "nowhere.npy"
  with raises_naming(f, "does not exist"):
    data.load_calibration_tokens(f)


class ByteTokenizer:
  """A stand-in Hugging Face tokenizer: one token per UTF-8 byte."""

  def __call__(self, text, add_special_tokens=False):
    return {"input_ids": list(text.encode("utf-8"))}


def test_sample_text_windows(tmp_path):
  f = tmp_path / "notes.txt"
  f.write_text("Ünïcode is fine. " * 20, encoding="utf-8")
  a = data.sample_text_windows(ByteTokenizer(), f, 4, 32, seed=1)
  assert a.shape == (4, 32) and a.dtype == np.int32
  np.testing.assert_array_equal(a, data.sample_text_windows(ByteTokenizer(), f, 4, 32, seed=1))
  assert not np.array_equal(a, data.sample_text_windows(ByteTokenizer(), f, 4, 32, seed=2))
  with raises_naming(f, "too few"):
    data.sample_text_windows(ByteTokenizer(), f, 4, 10_000, seed=0)
  g = tmp_path / "latin1.txt"
  g.write_bytes("café crème".encode("latin-1"))
  with raises_naming(g, "not UTF-8"):
    data.sample_text_windows(ByteTokenizer(), g, 1, 4, seed=0)
  with raises_naming(tmp_path / "gone.txt", "does not exist"):
    data.sample_text_windows(ByteTokenizer(), tmp_path / "gone.txt", 1, 4, seed=0)


def test_calib_options_are_mutually_exclusive(tmp_path, capsys):
  with pytest.raises(SystemExit):
    run_script("quantize", ["--calib-tokens", "a.npy", "--calib-text", "b.txt"])
  assert "not allowed with" in capsys.readouterr().err


def test_quantize_script_with_calib_tokens(tmp_path):
  from lqx import io

  tok = io.load_tokenizer("smollm2-135m")
  real = data.tokenize(tok, data.load_text("train")[:20_000])
  calib = data.windows(real, 64)[:2]
  f = tmp_path / "calib.npy"
  np.save(f, calib)
  out = tmp_path / "q.json"
  saved_calib = tmp_path / "used.npy"
  res = run_script("quantize", ["--method", "rtn", "--bits", "4", "--calib-tokens", str(f), "--eval-tokens", "256",
                                "--eval-seq-len", "64", "--save-calib-tokens", str(saved_calib), "--json", str(out)])
  saved = json.loads(out.read_text())
  assert saved["calibration_sha256"] == data.tokens_sha256(np.load(f)) == res["calibration_sha256"]
  assert saved["calibration_source"] == str(f)
  assert (saved["calib_samples"], saved["calib_seq_len"]) == (2, 64)
  np.testing.assert_array_equal(np.load(saved_calib), calib)
  assert np.load(saved_calib).dtype == np.int32
