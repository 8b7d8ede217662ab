"""pallas_kernels.lut_matmul: kernel vs reference, reference vs lqx's Codebook, validation, lowering.

On a CPU machine only the interpret subclass and the lowering tests run; the base
class runs the compiled kernels where a GPU or TPU is the default backend.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_testing import KernelTest, assert_close
from lqx.formats import codebook
from pallas_kernels import lut_matmul as lut

jax.config.update("jax_numpy_rank_promotion", "raise")


def make_case(m, k, n, bits, x_dtype, table_dtype, seed=0):
  """Random codes and tables through lqx's own packing -> (x, Codebook)."""
  rng = np.random.default_rng(seed)
  codes = jnp.asarray(rng.integers(0, 2**bits, (k, n)), jnp.int32)
  table = jnp.asarray(rng.normal(size=(n, 2**bits)), jnp.float32)
  cb = codebook.from_codes(codes, table, bits=bits, dtype=jnp.float32, table_dtype=table_dtype)
  x = jnp.asarray(rng.normal(size=(m, k)), x_dtype)
  return x, cb


BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32

# (m, k, n, bits, x dtype, table dtype, block sizes per backend or None)
CASES = [
    (1, 576, 192, 3, BF16, F16, None),
    (7, 576, 192, 4, F32, F32, None),
    (64, 256, 576, 3, F32, F16, None),
    (300, 256, 192, 4, BF16, F32, None),  # several M blocks, M padded
    (1, 576, 576, 4, BF16, F16, None),
    (7, 192, 256, 2, BF16, BF16, None),
    # Several K tiles (accumulator across the grid / the fori_loop).
    (7, 512, 256, 3, F32, F16, {"tpu": lut.BlockSizes(8, 128, 128), "triton": lut.BlockSizes(16, 64, 64)}),
    # Tiles that divide neither K nor N: weights padded per call.
    (7, 576, 192, 4, F32, F32, {"tpu": lut.BlockSizes(8, 256, 128), "triton": lut.BlockSizes(16, 128, 128)}),
    # Odd shapes (K not a multiple of 32, N of 16): the defaults pad too.
    (5, 100, 40, 3, F32, F16, None),
    (5, 200, 130, 4, BF16, F16, None),
]


def _case_id(c):
  m, k, n, bits, xd, td, bs = c
  return f"{m}x{k}x{n}-b{bits}-x{jnp.dtype(xd).name}-t{jnp.dtype(td).name}{'-bs' if bs else ''}"


class TestLutMatmul(KernelTest):
  @pytest.mark.parametrize("case", CASES, ids=_case_id)
  def test_matches_reference(self, case):
    m, k, n, bits, x_dtype, table_dtype, bs = case
    x, cb = make_case(m, k, n, bits, x_dtype, table_dtype)
    ref = lut.lut_matmul_reference(x, cb.packed, cb.table, bits=bits)
    for backend in self.backends():
      out = lut.lut_matmul(x, cb.packed, cb.table, bits=bits, backend=backend, interpret=self.INTERPRET,
                           block_sizes=None if bs is None else bs[backend])
      assert_close(out, ref)


class TestLutMatmulInterpret(TestLutMatmul):
  INTERPRET = True


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("table_dtype", [F16, BF16, F32])
@pytest.mark.parametrize("k,n", [(576, 192), (100, 40)])
def test_reference_matches_lqx(bits, table_dtype, k, n):
  """The reference reads lqx's layouts: x @ Codebook.dequantize()."""
  x, cb = make_case(5, k, n, bits, F32, table_dtype)
  ref = lut.lut_matmul_reference(x, cb.packed, cb.table, bits=bits)
  want = jnp.dot(x, cb.dequantize(), precision=jax.lax.Precision.HIGHEST)
  assert_close(ref, want)


def _args(k=256, n=128, bits=4):
  x, cb = make_case(3, k, n, bits, F32, F16)
  return (x, cb.packed, cb.table), dict(bits=bits)


@pytest.mark.parametrize("fn", [lut.lut_matmul, lut.lut_matmul_reference])
@pytest.mark.parametrize("change,pattern", [
    (lambda a, kw: (a, {**kw, "bits": 8}), "bits="),
    (lambda a, kw: (a, {**kw, "bits": True}), "bits="),
    (lambda a, kw: ((a[0], a[1][:-1], a[2]), kw), "packed.shape"),
    (lambda a, kw: ((a[0], a[1].astype(jnp.int32), a[2]), kw), "packed"),
    (lambda a, kw: ((a[0], a[1], a[2][:, :8]), kw), "table.shape"),
    (lambda a, kw: ((a[0], a[1], a[2].astype(jnp.int32)), kw), "table.dtype"),
    (lambda a, kw: ((a[0][None], *a[1:]), kw), "x.shape"),
    (lambda a, kw: ((a[0].astype(jnp.float16), *a[1:]), kw), "x.dtype"),
])
def test_validation_names_argument(fn, change, pattern):
  args, kw = change(*_args())
  with pytest.raises(ValueError, match=pattern):
    fn(*args, **kw, backend="tpu")


@pytest.mark.parametrize("backend,bs,pattern", [
    ("cuda", None, "backend="),
    ("tpu", lut.BlockSizes(4, 256, 128), "bm="),
    ("tpu", lut.BlockSizes(8, 96, 128), "bk="),
    ("tpu", lut.BlockSizes(8, 128, 64), "bn="),
    ("triton", lut.BlockSizes(16, 96, 64), "bk="),
    ("triton", lut.BlockSizes(8, 64, 64), "bm="),
    ("tpu", (8, 256, 128), "block_sizes="),
])
def test_validation_backend_and_blocks(backend, bs, pattern):
  args, kw = _args(k=512, n=256)
  with pytest.raises(ValueError, match=pattern):
    lut.lut_matmul(*args, **kw, backend=backend, block_sizes=bs, interpret=True)


@pytest.mark.skipif(jax.default_backend() in ("gpu", "tpu"), reason="CPU-only check")
def test_backend_required_on_cpu():
  args, kw = _args()
  with pytest.raises(ValueError, match="backend"):
    lut.lut_matmul(*args, **kw)


SMOLLM2 = [(576, 576), (576, 192), (576, 1536), (1536, 576)]


@pytest.mark.parametrize("backend", ["tpu", "triton"])
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("k,n", SMOLLM2 + [(4096, 4096)])
def test_default_block_sizes_need_no_weight_padding(backend, m, k, n):
  """The defaults divide K and N of these shapes (no per-call weight copy) and are legal."""
  bs = lut.default_block_sizes(m, k, n, bits=3, backend=backend)
  assert k % bs.bk == 0 and n % bs.bn == 0, bs
  lut._check_block_sizes(bs, m, k, n, backend)


# ----------------------------------------------------------------------------- lowering

LOWER = [(16, k, n, bits) for k, n in SMOLLM2 for bits in (3, 4)] + [(1, 4096, 4096, 4), (300, 576, 192, 2)]


@pytest.mark.parametrize("backend,platform", [("tpu", "tpu"), ("triton", "cuda")])
@pytest.mark.parametrize("m,k,n,bits", LOWER)
def test_lowers(backend, platform, m, k, n, bits):
  sds = jax.ShapeDtypeStruct
  args = [sds((m, k), BF16), sds((-(-k * bits // 32), n), jnp.uint32), sds((n, 2**bits), F16)]
  fn = functools.partial(lut.lut_matmul, bits=bits, backend=backend)
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert ("tpu_custom_call" if backend == "tpu" else "triton") in text
