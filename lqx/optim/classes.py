"""Parameter classes from base shapes (muP's "infshapes"), for any pytree.

Build the parameter tree's shapes at a base width ``d0`` and at the target width
``d`` (``jax.eval_shape`` of the init function costs nothing) and compare them
leaf by leaf. An axis whose size changes is a *width axis*:

- two or more width axes: **matrix-like** (hidden kernels ``(D, F)``, ``(F, D)``, ...);
- one width axis: **vector-like** (norm gains and biases ``(D,)``, the embedding
  ``(V, D)``, a readout ``(D, V)`` whose other side is fixed);
- none: **fixed** (e.g. the bias of a fixed-size output).

The rank never decides the class: a ``(V, D)`` embedding is vector-like.
If the target tree *is* the base tree (``d == d0``), pass ``delta=``, a tree at a
third width, to find the width axes; multipliers then come out as 1.

Trees may be nested dicts, Linen variables, or an ``nnx.State``: an nnx ``Variable``
(``nnx.Param``, ...) counts as one leaf, read through its value, so
``nnx.state(model, nnx.Param)`` and its ``.to_pure_dict()`` give the same paths.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import numpy as np

from lqx.tree import path_str

MATRIX = "matrix"
VECTOR = "vector"
FIXED = "fixed"
KINDS = (MATRIX, VECTOR, FIXED)


@dataclasses.dataclass(frozen=True)
class ParamClass:
  """How one parameter scales with width. A pytree *leaf* (not a node).

  kind: ``"matrix"``, ``"vector"`` or ``"fixed"``.
  width_axes: the axes whose size changes with width.
  width_mult: ``d / d0`` measured on the fan-in width axis: the first width axis,
    which is ``in`` for an ``(in, out)`` kernel and the only one for a vector.
    1.0 for fixed parameters.
  """

  kind: str
  width_axes: tuple[int, ...] = ()
  width_mult: float = 1.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"ParamClass.kind must be one of {KINDS}, got {self.kind!r}")
    if not self.width_mult > 0:
      raise ValueError(f"ParamClass.width_mult must be > 0, got {self.width_mult}")


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def is_variable(x) -> bool:
  """Whether ``x`` is an nnx ``Variable`` (``nnx.Param``, ...)."""
  nnx = sys.modules.get("flax.nnx")  # never imported: no Variable can exist
  return nnx is not None and isinstance(x, nnx.Variable)


def unwrap(x):
  """The value of an nnx ``Variable``; anything else unchanged."""
  return x.get_value() if is_variable(x) else x


def flatten(tree) -> tuple[list[str], list[Any], Any]:
  """``(paths, leaves, treedef)`` with nnx Variables as leaves, unwrapped.

  ``jax.tree.unflatten(treedef, new_leaves)`` puts ``new_leaves`` where the
  Variables were (a prefix of ``tree`` when it holds Variables).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)
  return [path_str(p) for p, _ in flat], [unwrap(x) for _, x in flat], treedef


def _leaves(tree) -> dict[str, tuple[int, ...]]:
  paths, leaves, _ = flatten(tree)
  return {p: _shape(x) for p, x in zip(paths, leaves)}


def _check_same_structure(a: dict, b: dict, a_name: str, b_name: str) -> None:
  for path in a:
    if path not in b:
      raise ValueError(f"param {path!r} is in {a_name} but not in {b_name}: "
                       f"the trees must have the same structure")
  for path in b:
    if path not in a:
      raise ValueError(f"param {path!r} is in {b_name} but not in {a_name}: "
                       f"the trees must have the same structure")


def param_classes(base: Any, target: Any, *, delta: Any = None) -> Any:
  """Classifies every leaf of ``target`` by comparing shapes with ``base``.

  Args:
    base: the parameter tree (arrays or ``jax.ShapeDtypeStruct``) at the base width.
    target: the same tree at the width being trained.
    delta: optional tree at another width (not the base) that defines the width
      axes; needed when ``target`` has the base shapes. Default: ``target``.

  Returns:
    A tree like ``target`` whose leaves are ``ParamClass`` (in place of nnx
    Variables for an ``nnx.State``).

  Raises:
    ValueError naming the param path if the trees differ in structure, in the rank
    of a leaf, or (with ``delta``) in an axis that is not a width axis; or if no
    axis changes at all.
  """
  ref = target if delta is None else delta
  ref_name = "target" if delta is None else "delta"
  b, t, r = _leaves(base), _leaves(target), _leaves(ref)
  _check_same_structure(b, t, "base", "target")
  if delta is not None:
    _check_same_structure(b, r, "base", "delta")
  base_def, target_def = flatten(base)[2], flatten(target)[2]
  if base_def != target_def:
    raise ValueError(f"base and target have the same leaf paths but different tree types: "
                     f"{base_def} vs {target_def}")

  classes = {}
  for path, b_shape in b.items():
    t_shape, r_shape = t[path], r[path]
    for other, name in ((t_shape, "target"), (r_shape, ref_name)):
      if len(other) != len(b_shape):
        raise ValueError(f"param {path!r}: shape {b_shape} at base vs {other} at {name} differ in "
                         f"rank; only the sizes of width axes may change")
    axes = tuple(i for i, (x, y) in enumerate(zip(b_shape, r_shape)) if x != y)
    for i, (x, y) in enumerate(zip(b_shape, t_shape)):
      if x != y and i not in axes:
        raise ValueError(f"param {path!r}: axis {i} changes from {x} at base to {y} at target but "
                         f"not between base and delta ({b_shape} vs {r_shape}); only width axes "
                         f"may change")
    kind = MATRIX if len(axes) >= 2 else VECTOR if len(axes) == 1 else FIXED
    mult = t_shape[axes[0]] / b_shape[axes[0]] if axes else 1.0
    classes[path] = ParamClass(kind, axes, float(mult))

  if all(c.kind == FIXED for c in classes.values()):
    raise ValueError(f"no axis of any param differs between base and {ref_name}, so no width axes "
                     f"can be found; build {ref_name} at another width"
                     + ("" if delta is not None else " (or pass delta= a tree at a third width)"))
  return jax.tree.unflatten(target_def, [classes[p] for p in flatten(target)[0]])


def class_paths(classes: Any) -> dict[str, ParamClass]:
  """``{path: ParamClass}`` of a classes tree, in tree order (for reports and tests)."""
  paths, leaves, _ = flatten(classes)
  return dict(zip(paths, leaves))
