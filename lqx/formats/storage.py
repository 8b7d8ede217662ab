"""What format classes share: exact storage counted from their leaves, and a wrapper's delegation to its base."""

from __future__ import annotations

import jax
import numpy as np


class Stored:
  """Mixin for a format dataclass whose leaves are everything it stores (a wrapper's include its base's).

  Needs ``shape`` ``(IC, OC)``. Works on ``jax.ShapeDtypeStruct`` leaves too (reads shapes and dtypes only).
  """

  @property
  def nbytes(self) -> int:
    """Bytes of all leaves (global, not per shard)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

  @property
  def stored_bits(self) -> int:
    """Exact storage: every leaf at its stored dtype, padding included."""
    return 8 * self.nbytes

  @property
  def bits_per_weight(self) -> float:
    """``stored_bits`` per weight of the ``(IC, OC)`` kernel."""
    return self.stored_bits / (self.shape[0] * self.shape[1])


class Wrapper(Stored):
  """Mixin for a format that wraps another in its ``base`` field: the logical kernel is the base's."""

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.base.shape)

  @property
  def dtype(self) -> np.dtype:
    return self.base.dtype

  @property
  def ndim(self) -> int:
    return 2
