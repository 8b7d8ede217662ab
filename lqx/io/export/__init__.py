"""Exporters: an lqx ``(config, params)`` written in a format other tools load (docs/export.md).

* ``lqx.io.export.hf.export_hf``: a Hugging Face safetensors folder of the dequantized model;
* ``lqx.io.export.gptq.export_gptq``: a GPTQ checkpoint folder (packed codes, as AutoGPTQ writes);
* ``lqx.io.export.gguf.export_gguf``: a llama.cpp GGUF file.

The three names are also attributes of this package, imported on first use.

Folders are written by :func:`write_folder`: into a hidden sibling temp folder, renamed into
place only when complete, with a manifest (``lqx_export.json``) listing the files written.
An existing destination is used only if it is empty, or replaced (``overwrite=True``) only if
everything in it is listed in its own manifest: files lqx did not write are never deleted.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from lqx.io import checkpoint

MANIFEST = "lqx_export.json"
TMP_MARK = ".lqx-export-tmp-"
OLD_MARK = ".lqx-export-old-"
_EXPORTERS = {"export_hf": "hf", "export_gptq": "gptq", "export_gguf": "gguf"}


def __getattr__(name: str):
  if name in _EXPORTERS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTERS[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _files(folder: Path) -> dict[str, int]:
  """``{relative posix path: size}`` of every file and symlink under ``folder``."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
      full = os.path.join(root, name)
      out[Path(full).relative_to(folder).as_posix()] = os.lstat(full).st_size
  return out


def _owned(folder: Path) -> dict[str, int]:
  """The files of an earlier export in ``folder`` (its manifest included); ``FileExistsError`` if it
  holds anything that export did not write, or has no readable manifest."""
  found = _files(folder)
  try:
    listed = json.loads((folder / MANIFEST).read_text())["files"]
    if not (isinstance(listed, dict) and all(isinstance(k, str) for k in listed)):
      raise TypeError
  except (OSError, ValueError, KeyError, TypeError):
    raise FileExistsError(f"{folder}: not empty and not an lqx export (no readable {MANIFEST}); "
                          f"refusing to replace it") from None
  foreign = sorted(set(found) - set(listed) - {MANIFEST})
  if foreign:
    raise FileExistsError(f"{folder}: holds {foreign[0]}"
                          f"{f' and {len(foreign) - 1} more files' if len(foreign) > 1 else ''}, which lqx "
                          f"did not write; refusing to replace it (move them out first)")
  return found


def check_destination(out_dir: str | Path, overwrite: bool = False) -> Path:
  """``out_dir`` as an absolute path, after checking that an export may write there.

  It may be missing or an empty folder; an existing non-empty folder needs ``overwrite``
  and must hold only files of an earlier lqx export. Raises ``FileExistsError`` otherwise.
  """
  dest = Path(out_dir).expanduser().absolute()
  if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
    raise FileExistsError(f"{dest}: exists and is not a folder")
  if dest.is_dir() and any(dest.iterdir()):
    if not overwrite:
      raise FileExistsError(f"{dest}: exists and is not empty; pass overwrite=True to replace an earlier export")
    _owned(dest)
  return dest


def write_folder(out_dir: str | Path, write: Callable[[Path], None], *, kind: str,
                 overwrite: bool = False) -> Path:
  """Runs ``write(tmp)`` to fill a new temp folder, then puts it at ``out_dir``; returns that path.

  ``kind`` (e.g. ``"hf"``) is recorded in the manifest with the list of files. On any
  failure the temp folder is removed and ``out_dir`` is left as it was. An earlier export
  at ``out_dir`` (``overwrite=True``) is moved aside, the new folder renamed in, then the
  old one's listed files deleted.
  """
  dest = check_destination(out_dir, overwrite)
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = dest.parent / f".{dest.name}{TMP_MARK}{uuid.uuid4().hex[:12]}"
  tmp.mkdir()
  try:
    write(tmp)
    if (tmp / MANIFEST).exists():
      raise RuntimeError(f"the exporter wrote {MANIFEST} itself")
    manifest = {"format": "lqx-export", "kind": kind, "files": dict(sorted(_files(tmp).items()))}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    old = None
    if dest.is_dir():
      old_files = _owned(dest) if any(dest.iterdir()) else {}  # checked again: it may have changed
      old = dest.parent / f".{dest.name}{OLD_MARK}{uuid.uuid4().hex[:12]}"
      os.rename(dest, old)
      try:
        os.rename(tmp, dest)
      except BaseException:
        os.rename(old, dest)
        raise
      checkpoint.remove_owned(old, old_files)  # what this export owned; a folder left is warned about
    else:
      os.rename(tmp, dest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dest


__all__ = ["check_destination", "write_folder", "MANIFEST", *_EXPORTERS]
