"""Parameter-path helpers: one place for how lqx names and reaches pytree leaves.

A path is the "/"-joined keys of a leaf, e.g. ``"layers_3/attn/q_proj/kernel"``.
Quantized kernels (anything with ``dequantize()``) count as leaves.
"""

from __future__ import annotations

import re

import jax


def is_kernel_leaf(x) -> bool:
  """Quantized kernels are leaves of a param tree, not subtrees."""
  return hasattr(x, "dequantize")


def path_str(path) -> str:
  """A JAX key path as ``"layers_0/attn/q_proj/kernel"``."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def paths(tree) -> list[str]:
  """The path of every leaf (quantized kernels count as leaves), layers in numeric order."""
  out = [path_str(keys) for keys, _ in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_kernel_leaf)]
  return sorted(out, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)])


def _key(node, k: str):
  """Dict key ``k`` of ``node``; integer keys (``nnx.Sequential`` pure dicts) are written as digits in paths."""
  return int(k) if k not in node and k.isdigit() and int(k) in node else k


def get(tree, path: str):
  """The node at ``path`` of nested dicts ``tree``."""
  for k in path.split("/"):
    tree = tree[_key(tree, k)]
  return tree


def replace(tree: dict, path: str, value) -> dict:
  """A copy of nested dicts ``tree`` with ``path`` set to ``value`` (the input is not mutated)."""
  head, _, rest = path.partition("/")
  head = _key(tree, head)
  return {**tree, head: value if not rest else replace(tree[head], rest, value)}
