"""Orbax save/restore of a (possibly quantized) LLaMA parameter pytree.

A checkpoint is a folder::

  <directory>/
    lqx_checkpoint.json   format + version, LlamaConfig, user metadata, and the tree:
                          nested dicts whose leaves are arrays (shape, dtype) or
                          QArrays (static fields + shape/dtype of each leaf, null if None)
    arrays/               orbax-checkpoint PyTree (OCDBT) holding every array leaf

Nothing is pickled. ``params`` are nested dicts with ``str`` keys whose leaves
are float (or any) arrays or ``lqx.qarray.QArray`` nodes; in the orbax tree a
QArray is a dict of its non-None array fields and dict keys are %-escaped (orbax
joins key paths with ``.``, so ``{"a.b": x}`` and ``{"a": {"b": y}}`` would clash).

Saves are atomic: everything is written into a hidden sibling folder
``.<name>.lqx-tmp-<id>`` and renamed to ``<name>`` only when complete, so an
interrupted save never leaves a folder that restores. ``overwrite=True`` swaps
the new folder in with one ``renameat2(RENAME_EXCHANGE)`` where the OS offers
it (Linux), else with two renames (the old folder is moved aside to
``.<name>.lqx-old-<id>`` first and deleted only after the new one is in place).

Arrays come back bit for bit with their saved dtypes (uint32/uint8 codes,
float16/bfloat16 scales, float32 weights) as ``jax.Array``, on
``jax.devices()[0]`` unless ``shardings`` says otherwise. Single-process only:
multi-host saves (every process writing its shards) are not handled yet.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jax
import ml_dtypes  # noqa: F401  registers bfloat16 & co. with numpy, so np.dtype("bfloat16") parses
import numpy as np

from lqx.models.llama import LlamaConfig
from lqx.qarray import QArray

FORMAT = "lqx-checkpoint"
VERSION = 1
JSON_NAME = "lqx_checkpoint.json"
ARRAYS_NAME = "arrays"
TMP_MARK = ".lqx-tmp-"
OLD_MARK = ".lqx-old-"


class CheckpointError(ValueError):
  """A folder is not a complete, readable lqx checkpoint, or does not match the target tree."""


# ----------------------------------------------------------------------------- tree <-> spec


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _check_leaf(x, where: str, concrete: bool) -> None:
  if not _is_array(x):
    raise CheckpointError(f"{where}: is a {type(x).__name__}, expected an array")
  if concrete and isinstance(x, jax.ShapeDtypeStruct):
    raise CheckpointError(f"{where}: is a ShapeDtypeStruct; save needs concrete arrays")
  if concrete and jax.dtypes.canonicalize_dtype(x.dtype) != x.dtype:
    raise CheckpointError(f"{where}: numpy array of dtype {x.dtype} would be held by JAX as "
                          f"{jax.dtypes.canonicalize_dtype(x.dtype)} (jax_enable_x64 is off); cast it first")


def _array_spec(x) -> dict:
  return {"shape": [int(d) for d in x.shape], "dtype": np.dtype(x.dtype).name}


def _qarray_fields(q: QArray) -> tuple[list[str], list[str]]:
  """``(data, static)`` field names of a QArray, as registered with JAX (None data fields included)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(q, is_leaf=lambda x: x is None)
  data = [p[0].name for p, _ in flat]
  static = [f.name for f in dataclasses.fields(q) if f.name not in data]
  return data, static


def _enc_static(v, where: str):
  """A QArray static field as JSON, tagging tuples and dtypes so they decode to the same value."""
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  if isinstance(v, np.integer):
    return int(v)
  if isinstance(v, tuple):
    return {"tuple": [_enc_static(x, where) for x in v]}
  if isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(v, np.generic)):
    return {"dtype": np.dtype(v).name}
  raise CheckpointError(f"{where}: static field of type {type(v).__name__} is not JSON-encodable "
                        f"(expected None, bool, int, float, str, tuple or dtype)")


def _dec_static(v):
  if isinstance(v, dict) and set(v) == {"tuple"}:
    return tuple(_dec_static(x) for x in v["tuple"])
  if isinstance(v, dict) and set(v) == {"dtype"}:
    return np.dtype(v["dtype"])
  if isinstance(v, (dict, list)):
    raise ValueError(f"unexpected static value {v!r}")
  return v


def _spec(node, path: str = "", concrete: bool = False) -> dict:
  """JSON description of a params tree: ``{"dict": {k: spec}}``, ``{"array": ...}`` or ``{"qarray": ...}``.

  Leaves may be arrays or, unless ``concrete``, ``jax.ShapeDtypeStruct`` (so
  ``jax.eval_shape`` trees describe targets).
  """
  where = path or "params"
  check = functools.partial(_check_leaf, concrete=concrete)
  if isinstance(node, QArray):
    data, static = _qarray_fields(node)
    leaves = {}
    for name in data:
      v = getattr(node, name)
      if v is not None:
        check(v, f"{where}.{name}")
      leaves[name] = None if v is None else _array_spec(v)
    return {"qarray": {"static": {k: _enc_static(getattr(node, k), f"{where}.{k}") for k in static},
                       "leaves": leaves}}
  if isinstance(node, dict):
    out = {}
    for k, v in node.items():
      if not isinstance(k, str) or not k:
        raise CheckpointError(f"{where}: dict key {k!r} is not a non-empty str")
      out[k] = _spec(v, f"{path}/{k}" if path else k, concrete)
    return {"dict": out}
  if _is_array(node):
    check(node, where)
    return {"array": _array_spec(node)}
  raise CheckpointError(f"{where}: unsupported node of type {type(node).__name__}; "
                        f"expected nested dicts of arrays and QArrays")


def _okey(k: str) -> str:
  """Dict key as used in the orbax tree (injective, free of orbax's ``.`` separator)."""
  return quote(k, safe="").replace(".", "%2E")


def _orbax_tree(node):
  """The params tree as orbax saves it: QArrays become dicts of their non-None arrays."""
  if isinstance(node, QArray):
    data, _ = _qarray_fields(node)
    return {n: getattr(node, n) for n in data if getattr(node, n) is not None}
  if isinstance(node, dict):
    sub = {_okey(k): _orbax_tree(v) for k, v in node.items()}
    return {k: v for k, v in sub.items() if not isinstance(v, dict) or v}  # orbax keeps no empty dicts
  return node


def _walk_leaves(spec: dict, path: str = ""):
  """Yield ``(path, orbax key tuple, array spec)`` for every array of a tree spec."""
  if "dict" in spec:
    for k, v in spec["dict"].items():
      for p, ok, s in _walk_leaves(v, f"{path}/{k}" if path else k):
        yield p, (_okey(k),) + ok, s
  elif "qarray" in spec:
    for name, s in spec["qarray"]["leaves"].items():
      if s is not None:
        yield f"{path}.{name}", (name,), s
  else:
    yield path, (), spec["array"]


def _build(spec: dict, arrays: dict, path: str = ""):
  """Params from a tree spec and the restored orbax tree."""
  if "dict" in spec:
    return {k: _build(v, arrays.get(_okey(k), {}), f"{path}/{k}" if path else k) for k, v in spec["dict"].items()}
  if "qarray" in spec:
    q = spec["qarray"]
    fields = {k: _dec_static(v) for k, v in q["static"].items()}
    fields.update({n: None if s is None else arrays[n] for n, s in q["leaves"].items()})
    try:
      return QArray(**fields)
    except TypeError as e:
      raise CheckpointError(f"{path}: saved QArray fields {sorted(fields)} do not fit lqx.qarray.QArray "
                            f"({e}); the checkpoint was written by another lqx version") from e
  return arrays


def _describe(spec: dict | None) -> str:
  if spec is None:
    return "None"
  if "dict" in spec:
    return "a dict"
  if "qarray" in spec:
    return "a QArray"
  a = spec["array"]
  return f"an array {tuple(a['shape'])} {a['dtype']}"


def first_mismatch(saved: dict, target: dict, path: str = "") -> str | None:
  """``"<path>: <what differs>"`` for the first difference of two tree specs, or None if equal."""
  where = path or "params"
  kind_s, kind_t = next(iter(saved)), next(iter(target))
  if kind_s != kind_t:
    return f"{where}: checkpoint has {_describe(saved)}, target has {_describe(target)}"
  s, t = saved[kind_s], target[kind_t]
  if kind_s == "dict":
    for k in list(s) + [k for k in t if k not in s]:
      p = f"{path}/{k}" if path else k
      if k not in t:
        return f"{p}: in the checkpoint but not in the target"
      if k not in s:
        return f"{p}: in the target but not in the checkpoint"
      m = first_mismatch(s[k], t[k], p)
      if m:
        return m
    return None
  if kind_s == "array":
    if s != t:
      return f"{where}: checkpoint has {_describe(saved)}, target has {_describe(target)}"
    return None
  for k in list(s["static"]) + [k for k in t["static"] if k not in s["static"]]:
    a, b = s["static"].get(k, "<missing>"), t["static"].get(k, "<missing>")
    if a != b:
      return f"{where}: QArray {k} is {_dec_static(a)!r} in the checkpoint, {_dec_static(b)!r} in the target"
  for k in list(s["leaves"]) + [k for k in t["leaves"] if k not in s["leaves"]]:
    a, b = s["leaves"].get(k), t["leaves"].get(k)
    if a != b:
      da = _describe(None if a is None else {"array": a})
      db = _describe(None if b is None else {"array": b})
      return f"{where}.{k}: checkpoint has {da}, target has {db}"
  return None


# ----------------------------------------------------------------------------- filesystem


def _tmp_sibling(dest: Path, mark: str) -> Path:
  return dest.parent / f".{dest.name}{mark}{uuid.uuid4().hex[:12]}"


def _leftovers(dest: Path) -> list[Path]:
  """Temp/old siblings that interrupted saves of ``dest`` left behind."""
  if not dest.parent.is_dir():
    return []
  return sorted(p for p in dest.parent.glob(f".{dest.name}.lqx-*")
                if TMP_MARK in p.name or OLD_MARK in p.name)


def _write_json(path: Path, obj: dict) -> None:
  with open(path, "x") as f:
    json.dump(obj, f, indent=1)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())


def _save_arrays(path: Path, tree: dict) -> None:
  import orbax.checkpoint as ocp

  ocp.PyTreeCheckpointer().save(path.absolute(), args=ocp.args.PyTreeSave(tree))


def _discard(path: Path) -> None:
  shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
  """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  at_fdcwd, rename_exchange = -100, 2
  if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
    return False
  raise OSError(err, f"renameat2(RENAME_EXCHANGE) of {a} and {b} failed: {os.strerror(err)}")


def _replace(tmp: Path, dest: Path) -> None:
  """Put the complete folder ``tmp`` at ``dest`` (an existing checkpoint); never loses the old one on failure."""
  if _exchange(tmp, dest):
    _discard(tmp)  # now holds the old checkpoint
    return
  old = _tmp_sibling(dest, OLD_MARK)
  os.rename(dest, old)
  try:
    os.rename(tmp, dest)
  except BaseException:
    os.rename(old, dest)
    raise
  _discard(old)


def is_checkpoint(path: str | Path) -> bool:
  """Whether ``path`` is a folder holding ``lqx_checkpoint.json`` or a temp folder of an lqx save."""
  path = Path(path)
  return path.is_dir() and ((path / JSON_NAME).is_file() or TMP_MARK in path.name)


# ----------------------------------------------------------------------------- save


def save(directory: str | Path, config: LlamaConfig, params, *, metadata: dict | None = None,
         overwrite: bool = False) -> Path:
  """Save ``(config, params, metadata)`` to the folder ``directory``, atomically; returns its path.

  ``params``: nested dicts (str keys) of arrays and QArrays. ``metadata``: a
  JSON-serializable dict (it comes back through JSON: tuples become lists).
  Raises ``FileExistsError`` if ``directory`` exists, unless ``overwrite=True``
  and it is an lqx checkpoint (or an empty folder), which is then replaced.
  """
  dest = Path(directory).expanduser().absolute()
  if not isinstance(config, LlamaConfig):
    raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
  if metadata is None:
    metadata = {}
  if not isinstance(metadata, dict):
    raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
  try:
    json.dumps(metadata)
  except (TypeError, ValueError) as e:
    raise TypeError(f"metadata is not JSON-serializable: {e}") from e
  spec = _spec(params, concrete=True)
  if dest.exists():
    if not dest.is_dir():
      raise FileExistsError(f"{dest}: exists and is not a folder")
    if not overwrite:
      raise FileExistsError(f"{dest}: already exists; pass overwrite=True to replace it")
    if not (dest / JSON_NAME).is_file() and any(dest.iterdir()):
      raise FileExistsError(f"{dest}: is not an lqx checkpoint folder (no {JSON_NAME}); refusing to replace it")

  import orbax.checkpoint as ocp

  doc = {"format": FORMAT, "version": VERSION, "orbax_checkpoint": ocp.__version__,
         "config": dataclasses.asdict(config), "metadata": metadata, "tree": spec}
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_sibling(dest, TMP_MARK)
  tmp.mkdir()
  try:
    tree = _orbax_tree(params)
    if tree:
      _save_arrays(tmp / ARRAYS_NAME, tree)
    else:
      (tmp / ARRAYS_NAME).mkdir()  # orbax refuses an empty tree
    _write_json(tmp / JSON_NAME, doc)
    _fsync_dir(tmp)
    if dest.exists():
      _replace(tmp, dest)
    else:
      os.rename(tmp, dest)
  except BaseException:
    _discard(tmp)
    raise
  _fsync_dir(dest.parent)
  return dest


# ----------------------------------------------------------------------------- restore


def read_json(directory: str | Path) -> dict:
  """The validated ``lqx_checkpoint.json`` of a checkpoint folder; raises ``CheckpointError`` otherwise."""
  path = Path(directory).expanduser().absolute()
  if TMP_MARK in path.name:
    raise CheckpointError(f"{path}: temporary folder of an lqx save that did not complete (or was not "
                          f"cleaned up); it is not a checkpoint. Delete it and save again")
  if not path.is_dir():
    hint = "".join(f"\n  leftover of an interrupted save: {p}" for p in _leftovers(path))
    what = "is not a folder" if path.exists() else "does not exist"
    raise CheckpointError(f"{path}: {what}; expected an lqx checkpoint folder{hint}")
  jpath = path / JSON_NAME
  if not jpath.is_file():
    raise CheckpointError(f"{path}: not an lqx checkpoint folder (no {JSON_NAME})")
  try:
    doc = json.loads(jpath.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{jpath}: corrupt, not valid JSON: {e}") from e
  if not isinstance(doc, dict) or doc.get("format") != FORMAT:
    raise CheckpointError(f"{jpath}: corrupt, not an lqx checkpoint description (format != {FORMAT!r})")
  version = doc.get("version")
  if version != VERSION:
    raise CheckpointError(f"{jpath}: checkpoint format version {version!r}; this lqx reads version {VERSION}")
  for key, typ in (("config", dict), ("metadata", dict), ("tree", dict)):
    if not isinstance(doc.get(key), typ):
      raise CheckpointError(f"{jpath}: corrupt, {key!r} is missing or not a {typ.__name__}")
  return doc


def _shardings_for(shardings, spec: dict, default):
  """Sharding of every leaf path: ``shardings`` is None, a Sharding, or a tree like params."""
  out = {}

  def walk(sh, sp, path):
    if sh is None or isinstance(sh, jax.sharding.Sharding):
      for p, _, _ in _walk_leaves(sp, path):
        out[p] = default if sh is None else sh
      return
    where = path or "shardings"
    if "dict" in sp:
      if not isinstance(sh, dict):
        raise CheckpointError(f"{where}: shardings has a {type(sh).__name__}, expected a dict or a Sharding")
      for k, v in sp["dict"].items():
        p = f"{path}/{k}" if path else k
        if k not in sh:
          raise CheckpointError(f"{p}: missing from shardings")
        walk(sh[k], v, p)
    elif "qarray" in sp:
      for name, s in sp["qarray"]["leaves"].items():
        if s is not None:
          v = getattr(sh, name, None)
          out[f"{path}.{name}"] = default if v is None else v
    else:
      raise CheckpointError(f"{where}: shardings has a {type(sh).__name__} at an array, expected a Sharding")

  walk(shardings, spec, "")
  for p, s in out.items():
    if not isinstance(s, jax.sharding.Sharding):
      raise CheckpointError(f"{p}: shardings holds a {type(s).__name__}, expected a jax.sharding.Sharding")
  return out


def _set(tree: dict, keys: tuple, value) -> None:
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


class _Anything(dict):
  """Stands in for the restored orbax tree when only the tree description is checked."""

  def __getitem__(self, key):
    return self

  def get(self, key, default=None):
    return self


def restore(directory: str | Path, target=None, *, shardings=None) -> tuple[LlamaConfig, Any, dict]:
  """``(config, params, metadata)`` from a checkpoint folder written by :func:`save`.

  ``target``: optional tree like params (arrays, ``ShapeDtypeStruct``s, QArrays of
  either); if its structure, shapes, dtypes or QArray static fields differ from
  the checkpoint, raises ``CheckpointError`` naming the first mismatching path.
  ``shardings``: None (all on ``jax.devices()[0]``), one ``Sharding`` for every
  array, or a tree like params (a Sharding may stand for a whole subtree; a
  QArray node holds one per field, e.g. ``jax.tree.map(lambda _: s, params)``).
  """
  import orbax.checkpoint as ocp

  path = Path(directory).expanduser().absolute()
  doc = read_json(path)
  jpath = path / JSON_NAME
  try:
    config = LlamaConfig(**doc["config"])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{jpath}: corrupt config: {e}") from e
  spec = doc["tree"]
  try:
    leaves = list(_walk_leaves(spec))
    dtypes = {p: np.dtype(s["dtype"]) for p, _, s in leaves}
    _build(spec, _Anything())  # decodes every QArray's static fields
  except (KeyError, TypeError, AttributeError, ValueError) as e:
    raise CheckpointError(f"{jpath}: corrupt tree description: {e!r}") from e
  if target is not None:
    m = first_mismatch(spec, _spec(target))
    if m:
      raise CheckpointError(f"{path}: target does not match the checkpoint at {m}")
  apath = path / ARRAYS_NAME
  if not apath.is_dir():
    raise CheckpointError(f"{path}: incomplete checkpoint, {ARRAYS_NAME}/ folder is missing")
  if not leaves:
    return config, _build(spec, {}), doc["metadata"]
  ck = ocp.PyTreeCheckpointer()
  try:
    stored = ck.metadata(apath).item_metadata.tree
  except Exception as e:  # orbax raises assorted types for unreadable folders
    raise CheckpointError(f"{apath}: unreadable orbax checkpoint: {e}") from e
  shard = _shardings_for(shardings, spec, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  item, args = {}, {}
  for p, okeys, s in leaves:
    node = stored
    try:
      for k in okeys:
        node = node[k]
      on_disk = (tuple(node.shape), np.dtype(node.dtype))
    except (KeyError, TypeError, AttributeError):
      raise CheckpointError(f"{path}: corrupt, {p} is described in {JSON_NAME} but not stored in "
                            f"{ARRAYS_NAME}/") from None
    if on_disk != (tuple(s["shape"]), dtypes[p]):
      raise CheckpointError(f"{path}: corrupt, {p} is {tuple(s['shape'])} {dtypes[p]} in {JSON_NAME} "
                            f"but {on_disk[0]} {on_disk[1]} in {ARRAYS_NAME}/")
    _set(item, okeys, jax.ShapeDtypeStruct(on_disk[0], on_disk[1], sharding=shard[p]))
    _set(args, okeys, ocp.ArrayRestoreArgs(sharding=shard[p], global_shape=on_disk[0], dtype=on_disk[1]))
  try:
    arrays = ck.restore(apath, args=ocp.args.PyTreeRestore(item=item, restore_args=args))
  except Exception as e:
    raise CheckpointError(f"{apath}: orbax could not restore the arrays: {e}") from e
  return config, _build(spec, arrays), doc["metadata"]


__all__ = ["CheckpointError", "save", "restore", "read_json", "is_checkpoint", "first_mismatch"]
