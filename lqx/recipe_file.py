"""Recipes as JSON or YAML files, and the same JSON inside checkpoints.

A recipe file is a list of rules, one mapping each::

  - paths: 'layers_\\d+/attn/\\w+_proj/kernel'     # regex over the "/"-joined param path (Rule.pattern)
    method: gptq                                  # a registered name (lqx.quant.METHODS), or null: keep float
    bits: 4                                       # the method config's fields; omitted ones take their defaults
    group_size: 128
  - paths: 'layers_\\d+/mlp/\\w+_proj/kernel'
    method: gptq+lorc                             # a wrapper: its own fields here ...
    rank: 16
    base: {bits: 3, group_size: 64, damp: 0.01}   # ... and its base method's under "base"

A method config is a frozen dataclass (``lqx.quant``); its fields are written as
JSON values: bool, int, float, str, a tuple as a list, a dtype as its name
(``"float16"``), a nested method config (``base``) as a mapping of its fields. The
method name fixes the classes (``"gptq+lorc"`` is a ``LoRCConfig`` over a
``GPTQConfig``); by hand, a base's field may also be written at the rule's level when
the wrapper has no field of that name (``{method: gptq+lorc, bits: 3, rank: 16}``).
:func:`encode` writes every field, nested, so a file records the whole config and
reads back equal.

Reading checks everything and names the place: ``recipe.yaml: rules[2].base.bits:
expected an int, got '4'``. JSON files use ``json``, YAML files ``yaml.safe_load`` /
``yaml.safe_dump`` only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np

from lqx import quant
from lqx.recipe import Rule

SUFFIXES = (".json", ".yaml", ".yml")
_RULE_KEYS = ("paths", "method")


class RecipeError(ValueError):
  """A recipe file (or a checkpoint's recipe) that does not describe valid rules; the message names the place."""


# ----------------------------------------------------------------------------- method config <-> dict


@functools.cache
def _prototype(name: str):
  """The config ``name`` builds (``bits=4``): its classes and field types guide decoding."""
  return quant.make(name, bits=4)


def _classes(method) -> tuple[type, ...]:
  """The classes of a config and its nested configs, outermost first."""
  out = [type(method)]
  for f in _fields(method):
    v = getattr(method, f.name)
    if _is_config(v):
      out += _classes(v)
  return tuple(out)


def _is_config(v) -> bool:
  return dataclasses.is_dataclass(v) and not isinstance(v, type)


def _fields(method) -> list:
  return [f for f in dataclasses.fields(method) if f.init]


def registered_name(method) -> str:
  """The ``lqx.quant.METHODS`` name that builds configs of ``method``'s classes (``method.name`` if it is one)."""
  if not _is_config(method):
    raise TypeError(f"a recipe's method must be a method config dataclass or None, got {type(method).__name__}")
  chain = _classes(method)
  names = [n for n in quant.METHODS if _classes(_prototype(n)) == chain]
  if not names:
    raise TypeError(f"{type(method).__name__} ({' over '.join(c.__name__ for c in chain)}) is built by no "
                    f"registered method (lqx.quant.METHODS); register it to write it in a recipe")
  return method.name if getattr(method, "name", None) in names else names[0]


def _enc(v, where: str):
  if _is_config(v):
    return _enc_fields(v, where)
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  if isinstance(v, np.integer):
    return int(v)
  if isinstance(v, np.floating):
    return float(v)
  if isinstance(v, tuple):
    return [_enc(x, where) for x in v]
  if isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(v, np.generic)):
    return np.dtype(v).name
  raise TypeError(f"{where}: a {type(v).__name__} cannot be written in a recipe file")


def _enc_fields(method, where: str) -> dict:
  """Plain fields first (dataclass order), nested configs last."""
  plain = {f.name: _enc(getattr(method, f.name), f"{where}.{f.name}") for f in _fields(method)
           if not _is_config(getattr(method, f.name))}
  nested = {f.name: _enc(getattr(method, f.name), f"{where}.{f.name}") for f in _fields(method)
            if _is_config(getattr(method, f.name))}
  return {**plain, **nested}


def _show(v) -> str:
  return repr(v) if not isinstance(v, (dict, list)) else type(v).__name__


def _dec(v, proto, where: str):
  """JSON value ``v`` as a value of the type of ``proto`` (the prototype's value of that field)."""
  if isinstance(proto, bool):
    if not isinstance(v, bool):
      raise RecipeError(f"{where}: expected true or false, got {_show(v)}")
    return v
  if isinstance(proto, (int, np.integer)):
    if isinstance(v, bool) or not isinstance(v, int):
      raise RecipeError(f"{where}: expected an int, got {_show(v)}")
    return v
  if isinstance(proto, (float, np.floating)):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      hint = ""
      if isinstance(v, str):
        try:
          float(v)
          hint = " (YAML reads 5e-4 as a string: write 5.0e-4)"
        except ValueError:
          pass
      raise RecipeError(f"{where}: expected a number, got {_show(v)}{hint}")
    return float(v)
  if isinstance(proto, str):
    if not isinstance(v, str):
      raise RecipeError(f"{where}: expected a string, got {_show(v)}")
    return v
  if isinstance(proto, tuple):
    if not isinstance(v, list):
      raise RecipeError(f"{where}: expected a list, got {_show(v)}")
    return tuple(_dec(x, proto[0], f"{where}[{i}]") if proto else x for i, x in enumerate(v))
  if isinstance(proto, np.dtype):
    if isinstance(v, str):
      try:
        return np.dtype(v)
      except TypeError:
        pass
    raise RecipeError(f"{where}: expected a dtype name such as 'float16', got {_show(v)}")
  if proto is None:
    if isinstance(v, (dict, list)):
      raise RecipeError(f"{where}: expected a number, string, bool or null, got {_show(v)}")
    return v
  raise RecipeError(f"{where}: this field ({type(proto).__name__}) cannot be set from a recipe file")


def _known(proto) -> set[str]:
  """Field names a rule may hold for ``proto``: its own and, through its single nested config, its base's."""
  own = {f.name for f in _fields(proto)}
  nested = [f.name for f in _fields(proto) if _is_config(getattr(proto, f.name))]
  return own | (_known(getattr(proto, nested[0])) if len(nested) == 1 else set())


def _build(proto, fields: dict, where: str, at: dict | None = None):
  """A config of ``proto``'s classes from ``fields`` (checked), by its class constructors.

  ``at``: where each field was written, for fields passed down from an outer level.
  """
  at = {k: at.get(k, f"{where}.{k}") for k in fields} if at else {k: f"{where}.{k}" for k in fields}
  own = {f.name: f for f in _fields(proto)}
  nested = [n for n in own if _is_config(getattr(proto, n))]
  for k in fields:
    if not isinstance(k, str):
      raise RecipeError(f"{where}: field name {k!r} is not a string")
  unknown = sorted(k for k in fields if k not in _known(proto))
  if unknown:
    raise RecipeError(f"{at[unknown[0]]}: unknown field of {type(proto).__name__}; fields are "
                      f"{', '.join(sorted(_known(proto)))}")
  kw, down = {}, {}
  for k, v in fields.items():
    if k in own and k not in nested:
      kw[k] = _dec(v, getattr(proto, k), at[k])
    elif k not in own:
      down[k] = v  # a base's field written at this level
  for n in nested:
    sub = fields.get(n, {})
    if not isinstance(sub, dict):
      raise RecipeError(f"{at.get(n, where)}: expected a mapping of {type(getattr(proto, n)).__name__} fields, "
                        f"got {_show(sub)}")
    twice = sorted(set(sub) & set(down))
    if twice:
      raise RecipeError(f"{at[twice[0]]}: given both here and in {n!r}")
    kw[n] = _build(getattr(proto, n), {**down, **sub}, f"{where}.{n}", {k: at[k] for k in down})
  for name, f in own.items():
    if name not in kw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
      raise RecipeError(f"{where}.{name}: missing; {type(proto).__name__} needs it")
  try:
    return type(proto)(**kw)
  except (TypeError, ValueError) as e:
    raise RecipeError(f"{where}: {e}") from None


def encode_method(method) -> dict:
  """``{"method": registered name, **fields}`` of a method config (nested configs as mappings)."""
  name = registered_name(method)
  return {"method": name, **_enc_fields(method, name)}


def decode_method(doc: dict, where: str = "method"):
  """The method config a rule's ``{"method": name, **fields}`` (without ``"paths"``) describes."""
  name = doc.get("method")
  if not isinstance(name, str) or name not in quant.METHODS:
    raise RecipeError(f"{where}.method: unknown method {name!r}; registered methods are {', '.join(quant.METHODS)}")
  try:
    proto = _prototype(name)
  except (TypeError, ValueError) as e:
    raise RecipeError(f"{where}.method: {name!r} cannot be described in a recipe file ({e})") from None
  method = _build(proto, {k: v for k, v in doc.items() if k != "method"}, where)
  if getattr(method, "name", None) in quant.METHODS and method.name != name:
    raise RecipeError(f"{where}.method: the fields make a {method.name!r} config, not {name!r}; "
                      f"write method: {method.name}")
  return method


# ----------------------------------------------------------------------------- rules <-> JSON


def encode(rules) -> list[dict]:
  """The JSON list of ``rules`` (``Rule``s); raises ``TypeError`` unless it reads back equal."""
  rules = tuple(rules)
  out = []
  for i, r in enumerate(rules):
    if not isinstance(r, Rule):
      raise TypeError(f"rules[{i}]: expected a lqx.recipe.Rule, got {type(r).__name__}")
    if r.method is None:
      out.append({"paths": r.pattern, "method": None})
    else:
      try:
        out.append({"paths": r.pattern, **encode_method(r.method)})
      except TypeError as e:
        raise TypeError(f"rules[{i}]: {e}") from None
  back = decode(json.loads(json.dumps(out)), "encoded recipe")
  for i, (a, b) in enumerate(zip(rules, back)):
    if a != b:
      raise TypeError(f"rules[{i}]: {a.method!r} does not read back equal from its fields ({b.method!r}); "
                      f"its config holds state its fields do not")
  return out


def decode(doc, source: str = "recipe") -> tuple[Rule, ...]:
  """The rules of a parsed recipe (a list of rule mappings); ``RecipeError`` naming ``source``, rule and field."""
  if not isinstance(doc, list) or not doc:
    raise RecipeError(f"{source}: expected a non-empty list of rules ({{paths: <regex>, method: <name>, ...}}), "
                      f"got {_show(doc) if doc != [] else 'an empty list'}")
  rules = []
  for i, r in enumerate(doc):
    where = f"{source}: rules[{i}]"
    if not isinstance(r, dict):
      raise RecipeError(f"{where}: expected a mapping with paths and method, got {_show(r)}")
    for key in _RULE_KEYS:
      if key not in r:
        raise RecipeError(f"{where}: no {key!r}")
    paths = r["paths"]
    if not isinstance(paths, str):
      raise RecipeError(f"{where}.paths: expected a regex string, got {_show(paths)}")
    try:
      re.compile(paths)
    except re.error as e:
      raise RecipeError(f"{where}.paths: {paths!r} is not a valid regex: {e}") from None
    fields = {k: v for k, v in r.items() if k != "paths"}
    if r["method"] is None:
      if len(fields) > 1:
        raise RecipeError(f"{where}: method is null (keep float), so it takes no fields; got "
                          f"{', '.join(sorted(str(k) for k in fields if k != 'method'))}")
      rules.append(Rule(paths, None))
    else:
      rules.append(Rule(paths, decode_method(fields, where)))
  return tuple(rules)


# ----------------------------------------------------------------------------- files


def _kind(path: Path) -> str:
  if path.suffix.lower() not in SUFFIXES:
    raise RecipeError(f"{path}: a recipe file must end with {', '.join(SUFFIXES)}, got {path.suffix or 'no suffix'!r}")
  return "json" if path.suffix.lower() == ".json" else "yaml"


def load(path: str | Path) -> tuple[Rule, ...]:
  """The rules of a ``.json`` / ``.yaml`` / ``.yml`` recipe file (module doc); ``RecipeError`` naming the file."""
  path = Path(path).expanduser()
  kind = _kind(path)
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise RecipeError(f"{path}: cannot read the recipe file: {e}") from None
  if kind == "json":
    try:
      doc = json.loads(text)
    except (ValueError, RecursionError) as e:
      raise RecipeError(f"{path}: not valid JSON: {e}") from None
  else:
    import yaml

    try:
      doc = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as e:
      raise RecipeError(f"{path}: not valid YAML (safe_load): {' '.join(str(e).split())}") from None
  return decode(doc, str(path))


def save(path: str | Path, rules) -> Path:
  """Write ``rules`` to a ``.json`` or ``.yaml``/``.yml`` file (replaced atomically); returns its path."""
  path = Path(path).expanduser()
  kind = _kind(path)
  doc = encode(rules)
  if kind == "json":
    text = json.dumps(doc, indent=2) + "\n"
  else:
    import yaml

    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
  try:
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


__all__ = ["RecipeError", "SUFFIXES", "decode", "decode_method", "encode", "encode_method", "load", "save",
           "registered_name"]
