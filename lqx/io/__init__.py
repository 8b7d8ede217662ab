"""Model loading: one entry point for named models, GGUF files and Hugging Face folders.

``load_model(x)`` returns ``(LlamaConfig, params)`` and ``load_tokenizer(x)`` the
matching tokenizer, where ``x`` is

- a packaged model name (``"smollm2-135m"``: the cached SmolLM2-135M-Instruct Q4_1 GGUF);
- a ``.gguf`` file (``lqx.io.gguf``);
- a folder with ``config.json`` and safetensors (``lqx.io.hf``);
- an lqx checkpoint folder holding ``lqx_checkpoint.json`` (``lqx.io.checkpoint``;
  its params may hold QArrays; its tokenizer is that of the ``source_model`` its
  metadata names, if any).
"""

from __future__ import annotations

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


def load_tokenizer(path_or_name: str | Path):
  """The Hugging Face tokenizer of a named model, a .gguf file or a Hugging Face folder."""
  kind, path = _resolve(path_or_name)
  if kind == "lqx":
    from lqx.io.checkpoint import read_json

    source = (read_json(path).get("metadata") or {}).get("source_model")
    if not source:
      raise ValueError(f"{path}: this lqx checkpoint names no source_model in its metadata, so it has no "
                       f"tokenizer; load the tokenizer from the model it was made from")
    return load_tokenizer(source)
  if kind == "gguf":
    from lqx.io import gguf

    return gguf.load_tokenizer(path)
  from lqx.io import hf

  return hf.load_tokenizer(path)


__all__ = ["load_model", "load_tokenizer"]
