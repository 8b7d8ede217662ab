"""What the Pallas kernel tests share: the dtype tolerance table, the comparison, the test base class.

STYLE.md item 4: one test class runs the compiled kernels where a GPU or TPU is the default
backend (``INTERPRET = False``); a one-line subclass with ``INTERPRET = True`` runs the same
tests in the Pallas interpreter on CPU, for both backends' kernel variants.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# dtype -> (atol, rtol), compared in float32 after dividing by max|reference|.
TOLERANCE = {jnp.dtype(jnp.float32): (1e-5, 1e-5), jnp.dtype(jnp.bfloat16): (1.5e-2, 1e-2)}


def assert_close(out, ref):
  """``out`` equals ``ref`` in dtype and shape, and in value to ``TOLERANCE`` relative to max|ref|."""
  assert out.dtype == ref.dtype and out.shape == ref.shape
  atol, rtol = TOLERANCE[jnp.dtype(ref.dtype)]
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  s = max(float(np.max(np.abs(ref))), 1e-6)
  np.testing.assert_allclose(out / s, ref / s, atol=atol, rtol=rtol)


class KernelTest:
  """Base of a kernel's test class: skips compiled runs off GPU/TPU; ``backends()`` to run."""

  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _need_device(self):
    if not self.INTERPRET and jax.default_backend() not in ("gpu", "tpu"):
      pytest.skip("compiled kernels need a GPU or TPU")

  def backends(self) -> tuple[str, ...]:
    """Kernel variants to run: both in interpret mode, else the default backend's."""
    if self.INTERPRET:
      return ("tpu", "triton")
    return ("tpu",) if jax.default_backend() == "tpu" else ("triton",)
