"""Orbax save/restore of a (possibly quantized) parameter pytree, any registered format.

A checkpoint is a folder::

  <directory>/
    lqx_checkpoint.json   format + version, the model config, user metadata, the recipe, the tree, checksums
    arrays/               orbax-checkpoint PyTree (OCDBT) holding every array leaf
    tokenizer/            optional: the Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, ..)

``"tokenizer"`` is ``null`` or ``{file name: sha256}`` of the files in ``tokenizer/``
(:func:`read_tokenizer` checks them), so a checkpoint moved or copied anywhere still
has its tokenizer (``lqx.io.load_tokenizer``). ``"recipe"`` is ``null`` or the rules
that made the params, as the JSON list of a recipe file (``lqx.recipe_file``;
:func:`read_recipe`).

The tree description (``"tree"``) is a node per params node::

  {"dict": {key: node}}                              nested dicts, str keys
  {"array": {"shape": [..], "dtype": "bfloat16",     an array leaf and its array_sha256
             "sha256": ".."}}
  {"format": {"name": "affine",                      a quantized kernel: its lqx.formats name,
              "static": {"bits": 4, "shape": {"tuple": [64, 32]}, "dtype": {"dtype": "float32"}, ..},
              "data": {"packed": {"array": ..}, "zero": null, "inner": {"format": ..}, ..}}}

A format's static fields are JSON with tuples and dtypes tagged (``{"tuple": [..]}``,
``{"dtype": ".."}``) so they decode to equal values of the same type; each data
field is an array, ``null`` or another format (wrappers nest). Restore looks the
class up by name in ``lqx.formats.FORMATS``, rebuilds it (on
``jax.ShapeDtypeStruct`` leaves first, before any array is read) and validates
it: the format's ``VALIDATORS`` entry if any, then its ``check()`` method if the
class has one (both must read only shapes, dtypes and static fields, and raise
``ValueError`` on a mismatch). A new format registers a validator with
``VALIDATORS[name] = fn`` or defines ``check()``.

Checksums: ``tree_sha256`` (a digest of the tree description) catches hand edits
no validator can see, ``config_sha256`` the same for the config, and each
array's ``sha256`` (:func:`array_sha256`, taken at save) is checked against the
restored array (``restore(..., verify=False)`` skips that), so a damaged byte
in ``arrays/`` is a ``CheckpointError`` naming the array, never changed weights.
``"files"`` lists every file under ``arrays/`` with its size: restore names a
missing or truncated one, and ``overwrite=True`` replaces only such a folder.
``"metadata"`` is not covered by any checksum.

``"config"`` is ``null``, or ``{"class": "module:QualName" | null, "fields": {..}}``
(a dataclass instance, or a plain dict when ``class`` is null; fields encoded like
static fields). Restore builds a class only from the allow-list ``CONFIGS``
(:class:`lqx.models.llama.LlamaConfig` and what :func:`register_config` adds);
nothing is imported by name from the file and nothing is pickled.

Older files still restore: version 3 (no ``"tokenizer"`` or ``"recipe"``; their
tokenizer is the ``source_model`` their metadata names), version 2 (no array checksums, ``config_sha256`` or
``"files"``; restore warns that the arrays are not verified) and version 1 (spec
key ``"qarray"`` for an affine QArray, ``"config"`` the bare ``LlamaConfig``
fields, no digests). In the orbax tree a format is a dict of its non-None data
fields (nested formats nested dicts) and dict keys are %-escaped (orbax joins key
paths with ``.``, so ``{"a.b": x}`` and ``{"a": {"b": y}}`` would clash).

Saves are atomic: everything is written into a hidden sibling folder
``.<name>.lqx-tmp-<id>`` (holding a ``.lqx-save`` marker with the writer's pid
and host until it is complete) and renamed to ``<name>`` only when complete, so
an interrupted save never leaves a folder that restores. ``overwrite=True`` swaps
the new folder in with one ``renameat2(RENAME_EXCHANGE)`` where the OS offers
it (Linux), else with two renames (the old folder is moved aside to
``.<name>.lqx-old-<id>`` first and deleted only after the new one is in place).
It replaces only an lqx checkpoint that holds nothing lqx did not write (or an
empty folder), and deletes only the files lqx wrote. Leftovers of interrupted
saves of the same destination are removed by the next save when they are
provably stale (temp folders whose writer is dead, or complete checkpoints that
were superseded); others are reported with a warning. Orbax's own finalization
(temp dir + rename) is not enough here: it covers only ``arrays/`` (not the JSON
written beside it), its ``force=True`` deletes the old checkpoint before writing
the new one, and its temp name is not unique.

Arrays come back bit for bit with their saved dtypes (uint32/uint8 codes,
float16/bfloat16 scales, float32 weights) as ``jax.Array``, on
``jax.devices()[0]`` unless ``shardings`` says otherwise. Single-process only:
multi-host saves (every process writing its shards) are not handled yet.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import uuid
import warnings
import re
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import jax
import ml_dtypes  # noqa: F401  registers bfloat16 & co. with numpy, so np.dtype("bfloat16") parses
import numpy as np

from lqx import formats, packing
from lqx.formats import affine
from lqx.models.llama import LlamaConfig

FORMAT = "lqx-checkpoint"
VERSION = 4
READS = (1, 2, 3, 4)
JSON_NAME = "lqx_checkpoint.json"
ARRAYS_NAME = "arrays"
TOKENIZER_NAME = "tokenizer"
_TOKENIZER_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # a plain file name, no folders
TMP_MARK = ".lqx-tmp-"
OLD_MARK = ".lqx-old-"
SAVE_MARK = ".lqx-save"
"""Marker file inside a temp folder while its save runs: ``{"pid", "host", "dest"}`` of the writer."""


class CheckpointError(ValueError):
  """A folder is not a complete, readable lqx checkpoint, or does not match the target tree."""


# ----------------------------------------------------------------------------- config classes

CONFIGS: dict[str, type] = {}


def config_name(cls: type) -> str:
  """``"module:QualName"``, the name a config class is stored and looked up under."""
  return f"{cls.__module__}:{cls.__qualname__}"


def register_config(cls: type) -> type:
  """Allow :func:`restore` to build config dataclass ``cls`` (by :func:`config_name`). Returns ``cls``."""
  if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
    raise TypeError(f"register_config takes a dataclass type, got {cls!r}")
  name = config_name(cls)
  if CONFIGS.get(name, cls) is not cls:
    raise ValueError(f"config class name {name!r} is taken by another class")
  CONFIGS[name] = cls
  return cls


register_config(LlamaConfig)


# ----------------------------------------------------------------------------- static values


def _enc_static(v, where: str):
  """A static value as JSON, tagging tuples, dicts and dtypes so they decode to an equal value of the same type."""
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  if isinstance(v, np.integer):
    return int(v)
  if isinstance(v, np.floating):
    return float(v)
  if isinstance(v, tuple):
    return {"tuple": [_enc_static(x, where) for x in v]}
  if isinstance(v, dict) and all(isinstance(k, str) for k in v):
    return {"dict": {k: _enc_static(x, f"{where}.{k}") for k, x in v.items()}}
  if isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(v, np.generic)):
    return {"dtype": np.dtype(v).name}
  raise CheckpointError(f"{where}: value of type {type(v).__name__} is not JSON-encodable "
                        f"(expected None, bool, int, float, str, tuple, dict with str keys or dtype)")


def _dec_static(v):
  if isinstance(v, dict) and set(v) == {"tuple"}:
    return tuple(_dec_static(x) for x in v["tuple"])
  if isinstance(v, dict) and set(v) == {"dict"} and isinstance(v["dict"], dict):
    return {k: _dec_static(x) for k, x in v["dict"].items()}
  if isinstance(v, dict) and set(v) == {"dtype"}:
    return np.dtype(v["dtype"])
  if isinstance(v, (dict, list)):
    raise ValueError(f"unexpected static value {v!r}")
  return v


def _enc_config(config) -> dict | None:
  """``config`` (None, a plain dict or a dataclass instance) as its JSON description."""
  if config is None:
    return None
  if isinstance(config, dict):
    cls, fields = None, config
  elif dataclasses.is_dataclass(config) and not isinstance(config, type):
    cls = config_name(type(config))
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
  else:
    raise TypeError(f"config must be a dataclass instance, a dict or None, got {type(config).__name__}")
  if not all(isinstance(k, str) for k in fields):
    raise TypeError("config dict keys must be str")
  try:
    return {"class": cls, "fields": {k: _enc_static(v, f"config.{k}") for k, v in fields.items()}}
  except CheckpointError as e:
    raise TypeError(str(e)) from None


# ----------------------------------------------------------------------------- formats


def _format_name(node) -> str | None:
  for name, cls in formats.FORMATS.items():
    if type(node) is cls:
      return name
  return None


def _format_fields(node) -> tuple[list[str], list[str]]:
  """``(data, static)`` field names of a format, as registered with JAX (None data fields included)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
  data = [p[0].name for p, _ in flat]
  static = [f.name for f in dataclasses.fields(node) if f.name not in data]
  return data, static


def _class_label(name: str) -> str:
  cls = formats.FORMATS.get(name)
  return cls.__name__ if cls is not None else f"{name!r} format"


def _check_affine(q: affine.QArray) -> None:
  """Raise ``ValueError`` unless the QArray's arrays have the shapes and dtypes its settings imply."""
  packing.check_bits(q.bits)
  shape = q.shape
  if not (isinstance(shape, tuple) and len(shape) == 2
          and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
    raise ValueError(f"shape={shape!r} is not a pair of positive ints")
  if not isinstance(q.group_axis, str):
    raise ValueError(f"group_axis={q.group_axis!r} is not a str")
  if not (isinstance(q.dtype, np.dtype) and jax.numpy.issubdtype(q.dtype, jax.numpy.floating)):
    raise ValueError(f"dtype={q.dtype!r} is not a float dtype")
  sd = affine.check_scale_dtype(q.scale_dtype)
  if not isinstance(q.scale_dtype, np.dtype):
    raise ValueError(f"scale_dtype={q.scale_dtype!r} is not a dtype")
  g_ic, g_oc = affine.scale_shape(shape, q.group_size, q.group_axis)
  ic, oc = shape
  want = {"packed": ((packing.num_words(ic, q.bits, affine.CODE_WORD), oc), affine.CODE_WORD),
          "scale": ((g_ic, g_oc), sd),
          "zero": ((packing.num_words(g_ic, q.bits, affine.ZERO_WORD), g_oc), affine.ZERO_WORD),
          "perm": ((ic,), np.dtype(np.int32))}
  for name, (wshape, wdtype) in want.items():
    x = getattr(q, name)
    if x is None and name in ("zero", "perm"):
      continue
    if x is None or (tuple(x.shape), np.dtype(x.dtype)) != (wshape, wdtype):
      got = "None" if x is None else f"{tuple(x.shape)} {np.dtype(x.dtype)}"
      raise ValueError(f"{name} is {got}, but bits={q.bits}, group_size={q.group_size}, "
                       f"group_axis={q.group_axis!r}, shape={shape}, scale_dtype={sd} need {wshape} {wdtype}")


VALIDATORS: dict[str, Callable[[Any], None]] = {"affine": _check_affine}
"""Format name -> function raising ``ValueError`` if a rebuilt format's settings do not fit its arrays."""


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


def array_sha256(x) -> str:
  """sha256 hex of an array in a canonical layout: ``b"<dtype name> <d0>,<d1>,..\\n"``, then its C-order little-endian bytes.

  A ``jax.Array`` is gathered to host first (all its shards: one array at a time,
  single process), so the digest does not depend on how the array is sharded.
  """
  a = np.asarray(x)
  head = f"{a.dtype.name} {','.join(str(int(d)) for d in a.shape)}\n".encode()
  big = a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big")
  if big and a.dtype.itemsize > 1:
    a = a.byteswap()
  h = hashlib.sha256(head)
  h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
  return h.hexdigest()


def _is_sha256(h) -> bool:
  return isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h)


def _check_array_spec(a, where: str) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype of an ``"array"`` node; ``CheckpointError`` unless it is well formed."""
  dtype = None
  if (isinstance(a, dict) and {"shape", "dtype"} <= set(a) <= {"shape", "dtype", "sha256"}
      and isinstance(a["shape"], list) and all(type(d) is int and 0 <= d < 2**62 for d in a["shape"])
      and isinstance(a["dtype"], str) and _is_sha256(a.get("sha256", "0" * 64))):
    try:
      dtype = np.dtype(a["dtype"])
    except (TypeError, ValueError):
      pass
  if dtype is None or dtype.name != a["dtype"] or dtype.kind in "OUSM":
    raise CheckpointError(f"{where}: corrupt array description {a!r}; expected {{'shape': [ints >= 0], "
                          f"'dtype': a numpy dtype name, 'sha256': 64 hex digits}}")
  return tuple(a["shape"]), dtype


def _join(path: str, key: str) -> str:
  return f"{path}/{key}" if path else key


def _spec(node, path: str = "", concrete: bool = False) -> dict:
  """JSON description of a params tree (module docstring).

  Leaves may be arrays or, unless ``concrete``, ``jax.ShapeDtypeStruct`` (so
  ``jax.eval_shape`` trees describe targets).
  """
  where = path or "params"
  name = _format_name(node)
  if name is not None:
    data, static = _format_fields(node)
    out = {}
    for field in data:
      v = getattr(node, field)
      if v is None:
        out[field] = None
      elif _format_name(v) is not None or _is_array(v):
        out[field] = _spec(v, f"{where}.{field}", concrete)
      else:
        raise CheckpointError(f"{where}.{field}: data field holds a {type(v).__name__}; "
                              f"expected an array, None or a registered format")
    return {"format": {"name": name,
                       "static": {k: _enc_static(getattr(node, k), f"{where}.{k}") for k in static},
                       "data": out}}
  if isinstance(node, dict):
    out = {}
    for k, v in node.items():
      if not isinstance(k, str) or not k:
        raise CheckpointError(f"{where}: dict key {k!r} is not a non-empty str")
      out[k] = _spec(v, _join(path, k), concrete)
    return {"dict": out}
  if _is_array(node):
    _check_leaf(node, where, concrete)
    if concrete:
      return {"array": {**_array_spec(node), "sha256": array_sha256(node)}}
    return {"array": _array_spec(node)}
  if formats.is_quantized(node):
    raise CheckpointError(f"{where}: {type(node).__name__} is not a registered format "
                          f"(lqx.formats.FORMATS: {sorted(formats.FORMATS)}); register it with lqx.formats.register")
  raise CheckpointError(f"{where}: unsupported node of type {type(node).__name__}; "
                        f"expected nested dicts of arrays and registered formats")


def _upgrade(spec: dict) -> dict:
  """A tree spec with version-1 ``"qarray"`` nodes turned into ``"affine"`` format nodes."""
  if "dict" in spec:
    return {"dict": {k: _upgrade(v) for k, v in spec["dict"].items()}}
  if "qarray" in spec:
    q = spec["qarray"]
    return {"format": {"name": "affine", "static": q["static"],
                       "data": {n: None if s is None else {"array": s} for n, s in q["leaves"].items()}}}
  if "format" in spec:
    f = spec["format"]
    return {"format": {**f, "data": {n: None if s is None else _upgrade(s) for n, s in f["data"].items()}}}
  return spec


def _digest(spec: dict) -> str:
  return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _okey(k: str) -> str:
  """Dict key as used in the orbax tree (injective, free of orbax's ``.`` separator)."""
  return quote(k, safe="").replace(".", "%2E")


def _orbax_tree(node):
  """The params tree as orbax saves it: formats become dicts of their non-None data fields."""
  if _format_name(node) is not None:
    data, _ = _format_fields(node)
    sub = {n: _orbax_tree(getattr(node, n)) for n in data if getattr(node, n) is not None}
  elif isinstance(node, dict):
    sub = {_okey(k): _orbax_tree(v) for k, v in node.items()}
  else:
    return node
  return {k: v for k, v in sub.items() if not isinstance(v, dict) or v}  # orbax keeps no empty dicts


def _walk_leaves(spec: dict, path: str = ""):
  """Yield ``(path, orbax key tuple, array spec)`` for every array of a tree spec."""
  if "dict" in spec:
    for k, v in spec["dict"].items():
      for p, ok, s in _walk_leaves(v, _join(path, k)):
        yield p, (_okey(k),) + ok, s
  elif "format" in spec:
    for n, v in spec["format"]["data"].items():
      if v is not None:
        for p, ok, s in _walk_leaves(v, f"{path}.{n}"):
          yield p, (n,) + ok, s
  else:
    yield path, (), spec["array"]


def _build(spec: dict, arrays: dict | None, path: str = ""):
  """Params from a tree spec and the restored orbax tree; ``arrays=None``: on ``ShapeDtypeStruct`` leaves.

  Every format is rebuilt from ``lqx.formats.FORMATS`` by name and validated
  (module docstring); a problem raises ``CheckpointError`` naming its path.
  """
  where = path or "params"
  if "dict" in spec:
    return {k: _build(v, None if arrays is None else arrays.get(_okey(k), {}), _join(path, k))
            for k, v in spec["dict"].items()}
  if "array" in spec:
    if arrays is None:
      return jax.ShapeDtypeStruct(*_check_array_spec(spec["array"], where))
    return arrays
  f = spec["format"]
  name = f["name"]
  cls = formats.FORMATS.get(name)
  if cls is None:
    raise CheckpointError(f"{where}: unknown format {name!r}; registered formats are {sorted(formats.FORMATS)} "
                          f"(lqx.formats.register adds one)")
  fields = {}
  for k, v in f["static"].items():
    try:
      fields[k] = _dec_static(v)
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"{where}.{k}: corrupt static field: {e}") from e
  for n, s in f["data"].items():
    if s is not None and not ("array" in s or "format" in s):
      raise CheckpointError(f"{where}.{n}: data field is {next(iter(s), '{}')!r}; expected an array, a format or null")
    fields[n] = None if s is None else _build(s, None if arrays is None else arrays.get(n, {}), f"{where}.{n}")
  expected = {fl.name for fl in dataclasses.fields(cls) if fl.init}
  if set(fields) != expected:
    raise CheckpointError(f"{where}: saved {name} fields {sorted(fields)} do not fit {cls.__name__} "
                          f"({sorted(expected)}); the checkpoint was written by another lqx version or edited")
  try:
    node = cls(**fields)
    data, _ = _format_fields(node)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: cannot rebuild {cls.__name__} from the saved fields: {e}") from e
  if set(data) != set(f["data"]):
    raise CheckpointError(f"{where}: saved data fields {sorted(f['data'])} are not {cls.__name__}'s {sorted(data)}")
  validator, method = VALIDATORS.get(name), getattr(node, "check", None)
  try:
    if validator is not None:
      validator(node)
    if callable(method):
      method()
  except (TypeError, ValueError, AssertionError) as e:
    raise CheckpointError(f"{where}: saved {name} format does not fit its arrays: {e}") from e
  return node


def _describe(spec: dict | None) -> str:
  if spec is None:
    return "None"
  if "dict" in spec:
    return "a dict"
  if "format" in spec:
    return f"a {_class_label(spec['format']['name'])}"
  a = spec["array"]
  return f"an array {tuple(a['shape'])} {a['dtype']}"


def first_mismatch(saved: dict | None, target: dict | None, path: str = "") -> str | None:
  """``"<path>: <what differs>"`` for the first difference of two tree specs, or None if equal."""
  where = path or "params"
  kind_s = None if saved is None else next(iter(saved))
  kind_t = None if target is None else next(iter(target))
  if kind_s != kind_t or kind_s is None:
    return None if kind_s == kind_t else f"{where}: checkpoint has {_describe(saved)}, target has {_describe(target)}"
  s, t = saved[kind_s], target[kind_t]
  if kind_s == "dict":
    for k in list(s) + [k for k in t if k not in s]:
      p = _join(path, k)
      if k not in t:
        return f"{p}: in the checkpoint but not in the target"
      if k not in s:
        return f"{p}: in the target but not in the checkpoint"
      m = first_mismatch(s[k], t[k], p)
      if m:
        return m
    return None
  if kind_s == "array":
    if (s["shape"], s["dtype"]) != (t["shape"], t["dtype"]):  # a saved array also has its sha256
      return f"{where}: checkpoint has {_describe(saved)}, target has {_describe(target)}"
    return None
  if s["name"] != t["name"]:
    return f"{where}: checkpoint has {_describe(saved)}, target has {_describe(target)}"
  label = _class_label(s["name"])
  for k in list(s["static"]) + [k for k in t["static"] if k not in s["static"]]:
    a, b = s["static"].get(k, "<missing>"), t["static"].get(k, "<missing>")
    if a != b:
      return f"{where}: {label} {k} is {_dec_static(a)!r} in the checkpoint, {_dec_static(b)!r} in the target"
  for k in list(s["data"]) + [k for k in t["data"] if k not in s["data"]]:
    m = first_mismatch(s["data"].get(k), t["data"].get(k), f"{where}.{k}")
    if m:
      return m
  return None


# ----------------------------------------------------------------------------- filesystem


def _tmp_sibling(dest: Path, mark: str) -> Path:
  return dest.parent / f".{dest.name}{mark}{uuid.uuid4().hex[:12]}"


def _leftovers(dest: Path) -> list[Path]:
  """Temp/old siblings that interrupted saves of ``dest`` left behind."""
  heads = (f".{dest.name}{TMP_MARK}", f".{dest.name}{OLD_MARK}")
  try:
    return sorted(dest.parent / n for n in os.listdir(dest.parent) if n.startswith(heads))
  except OSError:
    return []


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


def _files(folder: Path) -> dict[str, int]:
  """``{relative posix path: size}`` of every file (and symlink) under ``folder``."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
      full = os.path.join(root, name)
      out[Path(full).relative_to(folder).as_posix()] = os.lstat(full).st_size
  return out


def _owned_files(folder: Path) -> list[str]:
  """Every file in ``folder`` if it is an lqx checkpoint holding only files lqx wrote; else ``FileExistsError``.

  Recognised by its ``lqx_checkpoint.json`` (format ``lqx-checkpoint``), nothing
  beside it but ``arrays/`` and ``tokenizer/``, and under them only the files its
  ``"files"`` list names (checkpoints older than version 3 have no list: all of
  ``arrays/`` counts as lqx's). An empty folder holds nothing to delete.
  """
  if folder.is_symlink() or not folder.is_dir():
    raise FileExistsError(f"{folder}: exists and is not a folder; refusing to replace it")
  found = _files(folder)
  top = set(os.listdir(folder))
  if not top:
    return []
  try:
    doc = json.loads((folder / JSON_NAME).read_text())
    listed = doc.get("files") if isinstance(doc, dict) and doc.get("format") == FORMAT else False
  except (OSError, ValueError):
    listed = False
  if listed is False:
    raise FileExistsError(f"{folder}: is not an lqx checkpoint folder (no readable {JSON_NAME}); "
                          f"refusing to replace it")
  for rel in sorted(found) + sorted(top - {JSON_NAME, ARRAYS_NAME, TOKENIZER_NAME}):
    if rel == JSON_NAME:
      continue
    ours = rel.split("/")[0] in (ARRAYS_NAME, TOKENIZER_NAME) if isinstance(listed, dict) else rel.startswith(
        ARRAYS_NAME + "/")
    if not (ours and (rel in listed if isinstance(listed, dict) else True)):
      raise FileExistsError(f"{folder}: holds {rel}, which lqx did not write; refusing to replace this "
                            f"checkpoint (move the file out of it first)")
  return sorted(found)


def remove_owned(folder: Path, files) -> None:
  """Delete ``files`` (relative to ``folder``), then its folders that are left empty; warn if ``folder`` stays."""
  for rel in files:
    try:
      os.unlink(folder / rel)
    except FileNotFoundError:
      pass
  for root, dirs, _ in os.walk(folder, topdown=False):
    for d in dirs:
      try:
        os.rmdir(os.path.join(root, d))
      except OSError:
        pass
  try:
    os.rmdir(folder)
  except FileNotFoundError:
    pass
  except OSError:
    warnings.warn(f"{folder}: left in place, it holds files lqx did not write", stacklevel=3)


def _write_marker(tmp: Path, dest: Path) -> None:
  with open(tmp / SAVE_MARK, "x") as f:
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "dest": dest.name}, f)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # e.g. EPERM: exists, owned by another user
    return True
  return True


def _stale(p: Path, dest: Path) -> tuple[list[str] | None, str]:
  """``(files to delete, "")`` if ``p``, a leftover of a save of ``dest``, can go; else ``(None, why not)``."""
  if p.is_symlink() or not p.is_dir():
    return None, "not a folder"
  marker = p / SAVE_MARK
  if TMP_MARK in p.name and marker.is_file():
    try:
      m = json.loads(marker.read_text())
      pid, host = m["pid"], m["host"]
      ok = type(pid) is int and pid > 0 and isinstance(host, str) and m.get("dest") == dest.name
    except (OSError, ValueError, TypeError, KeyError):
      ok = False
    if not ok:
      return None, f"its {SAVE_MARK} marker is unreadable"
    if host != socket.gethostname():
      return None, f"written by a save on host {host!r}, which may still run"
    if _alive(pid):
      return None, f"process {pid} that writes it is alive (a save in progress?)"
    return sorted(_files(p)), ""
  if OLD_MARK in p.name and not dest.is_dir():
    return None, (f"it holds the previous checkpoint of {dest.name} (a save was interrupted while "
                  f"replacing it); rename it back to {dest.name} or delete it")
  try:  # a complete temp folder (killed before its rename) or a superseded old checkpoint
    return _owned_files(p), ""
  except FileExistsError:
    return None, "not recognised as an lqx checkpoint or save in progress"


def _clean_leftovers(dest: Path) -> None:
  """Remove the leftovers of interrupted saves of ``dest`` that are provably stale; warn about the others."""
  for p in _leftovers(dest):
    files, why = _stale(p, dest)
    if files is None:
      warnings.warn(f"{p}: leftover of an earlier save of {dest.name}, not removed: {why}", stacklevel=3)
    elif SAVE_MARK in files:
      _discard(p)  # a temp folder whose writer is dead: everything in it is lqx's
    else:
      remove_owned(p, files)


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


def _replace(tmp: Path, dest: Path, old_files: list[str]) -> None:
  """Put the complete folder ``tmp`` at ``dest``, whose files are ``old_files``; never loses the old one on failure."""
  if _exchange(tmp, dest):
    remove_owned(tmp, old_files)  # ``tmp`` now holds the old checkpoint
    return
  old = _tmp_sibling(dest, OLD_MARK)
  os.rename(dest, old)
  try:
    os.rename(tmp, dest)
  except BaseException:
    os.rename(old, dest)
    raise
  remove_owned(old, old_files)


def is_checkpoint(path: str | Path) -> bool:
  """Whether ``path`` is a folder holding ``lqx_checkpoint.json`` or a temp folder of an lqx save."""
  path = Path(path)
  return path.is_dir() and ((path / JSON_NAME).is_file() or TMP_MARK in path.name)


# ----------------------------------------------------------------------------- save


def _tokenizer_files(tokenizer) -> dict[str, bytes]:
  """``tokenizer`` (``{file name: bytes}``, or what ``lqx.io.tokenizer_files`` takes) as checked files, by name."""
  if not isinstance(tokenizer, dict):
    from lqx.io import tokenizer_files  # noqa: PLC0415 (lqx.io imports this module)

    tokenizer = tokenizer_files(tokenizer)
  if not tokenizer:
    raise ValueError("tokenizer holds no files")
  for name, data in tokenizer.items():
    if not (isinstance(name, str) and _TOKENIZER_FILE.fullmatch(name)):
      raise ValueError(f"tokenizer file name {name!r} is not a plain file name (letters, digits, '_', '.', '-')")
    if not isinstance(data, bytes):
      raise TypeError(f"tokenizer file {name!r} holds a {type(data).__name__}, expected bytes")
  return dict(sorted(tokenizer.items()))


def _write_file(path: Path, data: bytes) -> None:
  with open(path, "xb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def save(directory: str | Path, config, params, *, metadata: dict | None = None, tokenizer=None,
         recipe=None, overwrite: bool = False) -> Path:
  """Save ``(config, params, metadata)`` to the folder ``directory``, atomically; returns its path.

  ``config``: a dataclass instance (stored as class name + fields; restore builds
  it only if its class is in ``CONFIGS``, see :func:`register_config`), a plain
  dict or None; fields must be JSON-encodable (None, bool, int, float, str,
  tuple, dict, dtype). ``params``: nested dicts (str keys) of arrays and
  registered formats (``lqx.formats.FORMATS``); each array's :func:`array_sha256`
  is stored. ``metadata``: a JSON-serializable dict (it comes back through JSON:
  tuples become lists). ``tokenizer``: None, ``{file name: bytes}`` or anything
  ``lqx.io.tokenizer_files`` takes (a model name or path, a tokenizer object): its
  files are stored in ``tokenizer/`` with their sha256. ``recipe``: None or the
  ``Rule``s that made ``params`` (stored as recipe-file JSON, ``lqx.recipe_file``;
  ``TypeError`` if a method cannot be written). Raises ``FileExistsError`` if ``directory`` exists, unless
  ``overwrite=True`` and it is an empty folder or an lqx checkpoint holding only
  files lqx wrote, which is then replaced (only those files are deleted). Leftovers
  of interrupted saves of ``directory`` are removed first if stale, else reported
  with a warning (module docstring).
  """
  dest = Path(directory).expanduser().absolute()
  config_doc = _enc_config(config)
  if metadata is None:
    metadata = {}
  if not isinstance(metadata, dict):
    raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
  try:
    json.dumps(metadata)
  except (TypeError, ValueError) as e:
    raise TypeError(f"metadata is not JSON-serializable: {e}") from e
  spec = _spec(params, concrete=True)
  tok = {} if tokenizer is None else _tokenizer_files(tokenizer)
  if recipe is not None:
    from lqx import recipe_file  # noqa: PLC0415 (imports the quantization code)

    recipe = recipe_file.encode(recipe)
  if dest.exists() or dest.is_symlink():
    if not overwrite:
      raise FileExistsError(f"{dest}: already exists; pass overwrite=True to replace it")
    _owned_files(dest)

  import orbax.checkpoint as ocp

  doc = {"format": FORMAT, "version": VERSION, "orbax_checkpoint": ocp.__version__,
         "config": config_doc, "config_sha256": _digest(config_doc), "metadata": metadata,
         "tokenizer": {n: hashlib.sha256(b).hexdigest() for n, b in tok.items()} or None, "recipe": recipe,
         "tree_sha256": _digest(spec), "tree": spec}
  dest.parent.mkdir(parents=True, exist_ok=True)
  _clean_leftovers(dest)
  tmp = _tmp_sibling(dest, TMP_MARK)
  tmp.mkdir()
  try:
    _write_marker(tmp, dest)
    tree = _orbax_tree(params)
    if tree:
      _save_arrays(tmp / ARRAYS_NAME, tree)
    else:
      (tmp / ARRAYS_NAME).mkdir()  # orbax refuses an empty tree
    if tok:
      (tmp / TOKENIZER_NAME).mkdir()
      for name, data in tok.items():
        _write_file(tmp / TOKENIZER_NAME / name, data)
    files = {k: v for k, v in sorted(_files(tmp).items()) if k != SAVE_MARK}
    _write_json(tmp / JSON_NAME, {**doc, "files": files})
    os.unlink(tmp / SAVE_MARK)
    _fsync_dir(tmp)
    if dest.exists() or dest.is_symlink():
      _replace(tmp, dest, _owned_files(dest))
    else:
      os.rename(tmp, dest)
  except BaseException:
    _discard(tmp)
    raise
  _fsync_dir(dest.parent)
  return dest


# ----------------------------------------------------------------------------- restore


def read_json(directory: str | Path) -> dict:
  """The validated ``lqx_checkpoint.json`` of a checkpoint folder, as on disk; raises ``CheckpointError`` otherwise."""
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
  except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
    raise CheckpointError(f"{jpath}: corrupt, not valid JSON: {e}") from e
  except OSError as e:
    raise CheckpointError(f"{jpath}: unreadable: {e}") from e
  if not isinstance(doc, dict) or doc.get("format") != FORMAT:
    raise CheckpointError(f"{jpath}: corrupt, not an lqx checkpoint description (format != {FORMAT!r})")
  version = doc.get("version")
  if type(version) is not int or version not in READS:
    raise CheckpointError(f"{jpath}: checkpoint format version {version!r}; this lqx reads versions "
                          f"{', '.join(map(str, READS))}")
  for key, typ in (("metadata", dict), ("tree", dict)):
    if not isinstance(doc.get(key), typ):
      raise CheckpointError(f"{jpath}: corrupt, {key!r} is missing or not a {typ.__name__}")
  c = doc.get("config", "<missing>")
  ok = isinstance(c, dict) if version == 1 else c is None or (
      isinstance(c, dict) and set(c) == {"class", "fields"} and isinstance(c["fields"], dict)
      and (c["class"] is None or isinstance(c["class"], str)))
  if not ok:
    raise CheckpointError(f"{jpath}: corrupt, 'config' is missing or not a config description")
  need = {1: (), 2: ("tree_sha256",)}.get(version, ("tree_sha256", "config_sha256"))
  for key in need:
    if not _is_sha256(doc.get(key)):
      raise CheckpointError(f"{jpath}: corrupt, {key!r} is missing or not a sha256 hex digest")
  f = doc.get("files")
  if (version >= 3 or f is not None) and not (
      isinstance(f, dict) and all(type(v) is int and v >= 0 for v in f.values())):
    raise CheckpointError(f"{jpath}: corrupt, 'files' is missing or not a {{path: size}} dict")
  t = doc.get("tokenizer")
  if t is not None and not (
      isinstance(t, dict) and t and all(isinstance(k, str) and _TOKENIZER_FILE.fullmatch(k) and _is_sha256(v)
                                        and f"{TOKENIZER_NAME}/{k}" in (f or {}) for k, v in t.items())):
    raise CheckpointError(f"{jpath}: corrupt, 'tokenizer' is not a {{file name: sha256}} dict of files "
                          f"listed in 'files'")
  if not isinstance(doc.get("recipe"), (list, type(None))):
    raise CheckpointError(f"{jpath}: corrupt, 'recipe' is not a list of rules")
  return doc


def read_tokenizer(directory: str | Path) -> dict[str, bytes] | None:
  """``{file name: bytes}`` of the tokenizer stored in a checkpoint, each checked against its sha256; None if none.

  Checkpoints before version 4 store none (``lqx.io.load_tokenizer`` then follows
  their ``source_model``).
  """
  path = Path(directory).expanduser().absolute()
  doc = read_json(path)
  if doc.get("tokenizer") is None:
    return None
  out = {}
  for name, sha in doc["tokenizer"].items():
    rel = f"{TOKENIZER_NAME}/{name}"
    try:
      data = (path / rel).read_bytes()
    except OSError as e:
      raise CheckpointError(f"{path}: incomplete checkpoint, {rel} is unreadable: {e.strerror or e}") from e
    if hashlib.sha256(data).hexdigest() != sha:
      raise CheckpointError(f"{path}: corrupt, {rel} does not match the sha256 saved for it in {JSON_NAME} "
                            f"(damaged or edited?)")
    out[name] = data
  return out


def read_recipe(directory: str | Path) -> tuple | None:
  """The recipe (``lqx.recipe.Rule``s) stored in a checkpoint by ``save(..., recipe=)``; None if it has none.

  ``lqx.recipe.save_recipe(file, rules)`` writes it to a recipe file.
  """
  from lqx import recipe_file  # noqa: PLC0415

  path = Path(directory).expanduser().absolute()
  doc = read_json(path)
  if doc.get("recipe") is None:
    return None
  try:
    return recipe_file.decode(doc["recipe"], f"{path / JSON_NAME} 'recipe'")
  except recipe_file.RecipeError as e:
    raise CheckpointError(str(e)) from None


def add_tokenizer(directory: str | Path, tokenizer) -> Path:
  """Re-save the checkpoint ``directory`` with ``tokenizer`` stored in it (config, params, metadata and recipe kept).

  ``tokenizer`` as :func:`save` takes it, e.g. the model the checkpoint was made
  from. The arrays are restored (verified) and written again; atomic like :func:`save`.
  """
  files = _tokenizer_files(tokenizer)
  recipe = read_recipe(directory)
  config, params, metadata = restore(directory)
  return save(directory, config, params, metadata=metadata, tokenizer=files, recipe=recipe, overwrite=True)


def _config(doc: dict, jpath: Path, build: bool):
  """The checkpoint's config: built from ``CONFIGS`` if ``build``, else its description with decoded fields.

  Checked against ``config_sha256`` (after building, so a bad field is named first).
  """
  config = _config_unchecked(doc, jpath, build)
  if "config_sha256" in doc and doc["config_sha256"] != _digest(doc["config"]):
    raise CheckpointError(f"{jpath}: the config does not match its config_sha256 (edited by hand?); "
                          f"refusing to restore a model config the arrays were not saved with")
  return config


def _config_unchecked(doc: dict, jpath: Path, build: bool):
  c = doc["config"]
  if doc["version"] == 1:
    c = {"class": config_name(LlamaConfig), "fields": c}
  if c is None:
    return None
  try:
    fields = {k: _dec_static(v) for k, v in c["fields"].items()}
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{jpath}: corrupt config: {e}") from e
  name = c["class"]
  if not build:
    return {"class": name, "fields": fields}
  if name is None:
    return fields
  cls = CONFIGS.get(name)
  if cls is None:
    raise CheckpointError(f"{jpath}: config class {name!r} is not an allowed config class ({sorted(CONFIGS)}); "
                          f"register it with lqx.io.checkpoint.register_config(cls) before restoring, or pass "
                          f"build_config=False to restore with the config as {{'class': .., 'fields': ..}}")
  try:
    return cls(**fields)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{jpath}: corrupt config: {e}") from e


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
        p = _join(path, k)
        if k not in sh:
          raise CheckpointError(f"{p}: missing from shardings")
        walk(sh[k], v, p)
    elif "format" in sp:
      for name, v in sp["format"]["data"].items():
        if v is not None:
          walk(getattr(sh, name, None), v, f"{path}.{name}")
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


def _check_digest(doc: dict, jpath: Path) -> None:
  if "tree_sha256" in doc and doc["tree_sha256"] != _digest(doc["tree"]):
    raise CheckpointError(f"{jpath}: the tree description does not match its tree_sha256 (edited by hand?); "
                          f"refusing to restore arrays under settings they were not saved with")


def _check_files(doc: dict, path: Path) -> None:
  """Every file of ``"files"`` is there with its size (checkpoints before version 3 have no list)."""
  for rel, size in (doc.get("files") or {}).items():
    parts = rel.split("/")
    if not (rel and parts[0] in (ARRAYS_NAME, TOKENIZER_NAME) and all(x and x not in (".", "..") for x in parts)):
      raise CheckpointError(f"{path / JSON_NAME}: corrupt, 'files' lists {rel!r}, not a path under {ARRAYS_NAME}/ "
                            f"or {TOKENIZER_NAME}/")
    f = path / rel
    if not f.is_file():
      raise CheckpointError(f"{path}: incomplete checkpoint, {rel} is missing")
    if f.stat().st_size != size:
      raise CheckpointError(f"{path}: corrupt, {rel} is {f.stat().st_size} bytes, {JSON_NAME} says {size} "
                            f"(truncated or overwritten?)")


def _verify(leaves: list, arrays: dict, path: Path) -> None:
  """Every restored array against the ``sha256`` saved for it; warns once if the checkpoint has none."""
  unchecked = []
  for p, okeys, s in leaves:
    if "sha256" not in s:
      unchecked.append(p)
      continue
    x = arrays
    for k in okeys:
      x = x[k]
    if array_sha256(x) != s["sha256"]:
      raise CheckpointError(f"{path}: corrupt, array {p} does not match the sha256 saved for it in {JSON_NAME} "
                            f"(damaged on disk?); refusing to restore changed weights")
  if unchecked:
    warnings.warn(f"{path}: {len(unchecked)} arrays have no saved sha256 (a checkpoint older than lqx "
                  f"checkpoint version 3), e.g. {unchecked[0]}; restored without verification", stacklevel=3)


def restore(directory: str | Path, target=None, *, shardings=None, build_config: bool = True,
            verify: bool = True) -> tuple[Any, Any, dict]:
  """``(config, params, metadata)`` from a checkpoint folder written by :func:`save`.

  ``config`` is rebuilt only from an allowed class (``CONFIGS``, see
  :func:`register_config`), else ``CheckpointError``; a dict config comes back
  as a dict. ``build_config=False`` never builds it: ``config`` is then
  ``{"class": "module:QualName" | None, "fields": {...}}`` (or None).
  ``target``: optional tree like params (arrays, ``ShapeDtypeStruct``s, formats of
  either); if its structure, shapes, dtypes or format static fields differ from
  the checkpoint, raises ``CheckpointError`` naming the first mismatching path.
  ``shardings``: None (all on ``jax.devices()[0]``), one ``Sharding`` for every
  array, or a tree like params (a Sharding may stand for a whole subtree; a
  format node holds one per data field, e.g. ``jax.tree.map(lambda _: s, params)``).
  ``verify``: check every restored array against the sha256 saved for it (a
  mismatch is a ``CheckpointError`` naming the array); each array is gathered to
  host once for this, so ``verify=False`` is faster. Checkpoints older than
  version 3 have no array checksums: they restore unverified, with a warning.
  Damage anywhere in the folder gives an exact restore or a ``CheckpointError``.
  """
  import orbax.checkpoint as ocp

  path = Path(directory).expanduser().absolute()
  doc = read_json(path)
  jpath = path / JSON_NAME
  config = _config(doc, jpath, build_config)
  try:
    spec = _upgrade(doc["tree"])
    _build(spec, None)
    leaves = list(_walk_leaves(spec))
    dtypes = {p: np.dtype(s["dtype"]) for p, _, s in leaves}
  except CheckpointError:
    raise
  except Exception as e:  # any damage to the description: KeyError, TypeError, RecursionError, ..
    raise CheckpointError(f"{jpath}: corrupt tree description: {e!r}") from e
  if target is not None:
    m = first_mismatch(spec, _spec(target))
    if m:
      raise CheckpointError(f"{path}: target does not match the checkpoint at {m}")
  apath = path / ARRAYS_NAME
  if not apath.is_dir():
    raise CheckpointError(f"{path}: incomplete checkpoint, {ARRAYS_NAME}/ folder is missing")
  _check_files(doc, path)
  if not leaves:
    _check_digest(doc, jpath)
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
      on_disk = (tuple(int(d) for d in node.shape), np.dtype(node.dtype))
    except Exception:  # missing, or metadata orbax could not make sense of
      raise CheckpointError(f"{path}: corrupt, {p} is described in {JSON_NAME} but not stored in "
                            f"{ARRAYS_NAME}/") from None
    if on_disk != (tuple(s["shape"]), dtypes[p]):
      raise CheckpointError(f"{path}: corrupt, {p} is {tuple(s['shape'])} {dtypes[p]} in {JSON_NAME} "
                            f"but {on_disk[0]} {on_disk[1]} in {ARRAYS_NAME}/")
    _set(item, okeys, jax.ShapeDtypeStruct(on_disk[0], on_disk[1], sharding=shard[p]))
    _set(args, okeys, ocp.ArrayRestoreArgs(sharding=shard[p], global_shape=on_disk[0], dtype=on_disk[1]))
  _check_digest(doc, jpath)
  try:
    arrays = ck.restore(apath, args=ocp.args.PyTreeRestore(item=item, restore_args=args))
  except Exception as e:
    raise CheckpointError(f"{apath}: orbax could not restore the arrays: {e}") from e
  if verify:
    _verify(leaves, arrays, path)
  return config, _build(spec, arrays), doc["metadata"]


__all__ = ["CheckpointError", "CONFIGS", "VALIDATORS", "save", "restore", "read_json", "read_tokenizer",
           "read_recipe", "add_tokenizer", "is_checkpoint", "first_mismatch", "register_config", "config_name",
           "array_sha256"]
