"""Model loading: one entry point for named models, GGUF files and Hugging Face folders.

``load_model(x)`` returns ``(LlamaConfig, params)`` and ``load_tokenizer(x)`` the
matching tokenizer, where ``x`` is

- a packaged model name (``"smollm2-135m"``: the cached SmolLM2-135M-Instruct Q4_1 GGUF);
- a ``.gguf`` file (``lqx.io.gguf``);
- a folder with ``config.json`` and safetensors (``lqx.io.hf``);
- an lqx checkpoint folder holding ``lqx_checkpoint.json`` (``lqx.io.checkpoint``;
  its params may hold quantized formats; its tokenizer is the one stored in it, or for
  checkpoints saved without one, that of the ``source_model`` its metadata names).

``tokenizer_files(x)`` gives the Hugging Face tokenizer files of any of these (or of a
tokenizer object) as ``{file name: bytes}``: what ``checkpoint.save(..., tokenizer=)``
stores and exporters write beside the weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp


NAMED_MODELS = ("smollm2-135m",)


def _named() -> dict:
  from lqx import assets

  return {"smollm2-135m": assets.smollm2_gguf}


def _resolve(path_or_name: str | Path) -> tuple[str, Path]:
  """``("gguf" | "hf" | "lqx", path)`` for a model name, a .gguf file, a Hugging Face or lqx checkpoint folder."""
  from lqx.io import checkpoint

  named = _named()
  if isinstance(path_or_name, str) and path_or_name.lower() in named:
    return "gguf", Path(named[path_or_name.lower()]())
  path = Path(path_or_name).expanduser()
  if path.is_file() and path.suffix == ".gguf":
    return "gguf", path
  if path.is_dir() and (path / "config.json").is_file():
    return "hf", path
  if checkpoint.is_checkpoint(path):
    return "lqx", path
  if path.is_dir():
    raise ValueError(f"{path}: folder has no config.json nor {checkpoint.JSON_NAME} "
                     f"(not a Hugging Face model folder or an lqx checkpoint)")
  if path.exists():
    raise ValueError(f"{path}: not a .gguf file or a Hugging Face model folder")
  raise ValueError(f"{str(path_or_name)!r} is not a known model name ({', '.join(named)}) "
                   f"nor an existing .gguf file or Hugging Face folder")


def load_model(path_or_name: str | Path) -> tuple:
  """``(config, params)`` of a named model, a .gguf file, a Hugging Face or lqx checkpoint folder.

  Every array leaf of ``params`` is a ``jax.Array`` whatever the source (quantized
  kernels from a checkpoint keep their format).
  """
  kind, path = _resolve(path_or_name)
  if kind == "lqx":
    from lqx.io.checkpoint import restore

    config, params, _ = restore(path)
  elif kind == "gguf":
    from lqx.io.gguf import load_gguf

    config, params = load_gguf(path)
  else:
    from lqx.io.hf import load_hf

    config, params = load_hf(path)
  return config, jax.tree.map(jnp.asarray, params)


def _checkpoint_source(path: Path) -> str:
  """The ``source_model`` of a checkpoint without a stored tokenizer, if it still exists.

  Otherwise a ``ValueError`` naming the checkpoint, the missing path and the fix.
  """
  from lqx.io.checkpoint import read_json

  source = (read_json(path).get("metadata") or {}).get("source_model")
  fix = (f"store a tokenizer in it with lqx.io.checkpoint.add_tokenizer({str(path)!r}, <the model it was made "
         f"from: a name, .gguf file or Hugging Face folder>)")
  if not isinstance(source, str) or not source:
    raise ValueError(f"{path}: this lqx checkpoint has no tokenizer stored in it and names no source_model in its "
                     f"metadata; {fix}")
  if source.lower() not in _named() and not Path(source).expanduser().exists():
    raise ValueError(f"{path}: this lqx checkpoint (saved before checkpoints stored their tokenizer) takes its "
                     f"tokenizer from its source_model {source}, which no longer exists; {fix}")
  return source


def _load_files(files: dict[str, bytes], where: Path):
  """A tokenizer built from exactly ``files`` (in a temporary folder), as ``hf.load_tokenizer`` builds it."""
  from lqx.io import hf

  with tempfile.TemporaryDirectory(prefix="lqx-tokenizer-") as tmp:
    for name, data in files.items():
      (Path(tmp) / name).write_bytes(data)
    try:
      tok = hf.load_tokenizer(tmp)
    except hf.HFError as e:
      raise ValueError(f"{where}: {str(e).replace(tmp, 'stored tokenizer')}") from e
  tok.name_or_path = str(where)
  return tok


def load_tokenizer(path_or_name: str | Path):
  """The Hugging Face tokenizer of a named model, a .gguf file, a Hugging Face or lqx checkpoint folder.

  An lqx checkpoint's is the one stored in it (its files checked against their
  sha256); one saved without (before version 4) takes its ``source_model``'s while
  that exists, else the ``ValueError`` names the checkpoint, the missing path and the fix.
  """
  kind, path = _resolve(path_or_name)
  if kind == "lqx":
    from lqx.io import checkpoint

    files = checkpoint.read_tokenizer(path)
    if files is not None:
      return _load_files(files, path / checkpoint.TOKENIZER_NAME)
    return load_tokenizer(_checkpoint_source(path))
  if kind == "gguf":
    from lqx.io import gguf

    return gguf.load_tokenizer(path)
  from lqx.io import hf

  return hf.load_tokenizer(path)


def tokenizer_files(tokenizer) -> dict[str, bytes]:
  """``{file name: bytes}``: the Hugging Face tokenizer files of a model name, .gguf file, HF or lqx checkpoint.

  ``tokenizer`` may also be a tokenizer object (anything with ``save_pretrained``).
  A checkpoint's stored files come back as stored (checked against their sha256);
  otherwise the tokenizer lqx loads (``load_tokenizer``; a GGUF's is built from its
  metadata) is written with ``save_pretrained`` (``tokenizer.json``,
  ``tokenizer_config.json``, ...), files that ``transformers.AutoTokenizer`` reads alone.
  """
  if hasattr(tokenizer, "save_pretrained"):
    with tempfile.TemporaryDirectory(prefix="lqx-tokenizer-") as tmp:
      tokenizer.save_pretrained(tmp)
      return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
  if not isinstance(tokenizer, (str, Path)):
    raise TypeError(f"tokenizer_files takes a model name or path, or a tokenizer object, got {type(tokenizer).__name__}")
  kind, path = _resolve(tokenizer)
  if kind == "lqx":
    from lqx.io import checkpoint

    files = checkpoint.read_tokenizer(path)
    if files is not None:
      return files
  return tokenizer_files(load_tokenizer(tokenizer))


__all__ = ["NAMED_MODELS", "load_model", "load_tokenizer", "tokenizer_files"]
