"""pallas_kernels.dequant_matmul: kernel vs reference, reference vs lqx's QArray, validation, lowering.

On a CPU machine only the interpret subclass and the lowering tests run; the base
class runs the compiled kernels where a GPU or TPU is the default backend.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_testing import KernelTest, assert_close
from lqx.formats import affine
from pallas_kernels import dequant_matmul as dq
from pallas_kernels import unpack as unpack_lib

jax.config.update("jax_numpy_rank_promotion", "raise")


def make_case(m, k, n, bits, g, axis, zero, dtype, seed=0):
  """Random codes/scales/zeros through lqx's own packing -> (x, QArray, scale, zero)."""
  rng = np.random.default_rng(seed)
  gshape = affine.scale_shape((k, n), g, axis)
  codes = jnp.asarray(rng.integers(0, 2**bits, (k, n)), jnp.int32)
  scale = jnp.asarray(rng.uniform(0.01, 0.1, gshape), jnp.float16)
  zp = jnp.asarray(rng.integers(0, 2**bits, gshape), jnp.float32) if zero else None
  q = affine.from_codes(codes, scale, zp, bits=bits, group_size=g, group_axis=axis, dtype=jnp.float32)
  x = jnp.asarray(rng.normal(size=(m, k)), dtype)
  return x, q, scale, zp


# (m, k, n, bits, group_size, group_axis, zero, x dtype, block sizes per backend or None)
CASES = [
    (1, 576, 192, 4, 128, "oc", True, jnp.bfloat16, None),   # short last group (64 rows)
    (7, 576, 192, 4, 128, "oc", False, jnp.float32, None),
    (64, 256, 256, 2, 64, "ic", True, jnp.float32, None),
    (300, 256, 192, 8, -1, "oc", True, jnp.bfloat16, None),
    (7, 256, 576, 3, 128, "oc", True, jnp.float32, None),
    (1, 576, 256, 3, 64, "ic", False, jnp.bfloat16, None),
    (64, 576, 576, 2, 128, "oc", False, jnp.bfloat16, None),  # 2-bit: bk = K whole on TPU
    (300, 192, 256, 4, -1, "ic", True, jnp.float32, None),
    (7, 256, 192, 8, 64, "ic", True, jnp.bfloat16, None),
    (16, 576, 576, 4, 64, "ic", True, jnp.bfloat16, None),  # TPU: one (576, 576) tile, 9 segments
    # Several K tiles (accumulator across the grid / the fori_loop).
    (1, 512, 256, 4, 128, "oc", True, jnp.float32,
     {"tpu": dq.BlockSizes(16, 128, 128), "triton": dq.BlockSizes(16, 64, 64)}),
    # Tiles that divide neither K nor N: packed padded per call; segments of gcd(bk, g) rows.
    (7, 576, 192, 4, 128, "oc", True, jnp.float32,
     {"tpu": dq.BlockSizes(16, 384, 128), "triton": dq.BlockSizes(16, 128, 128)}),
    (7, 576, 192, 3, 64, "ic", True, jnp.bfloat16,
     {"tpu": dq.BlockSizes(16, 512, 128), "triton": dq.BlockSizes(16, 128, 128)}),
]


def _case_id(c):
  m, k, n, bits, g, axis, zero, dtype, bs = c
  return f"{m}x{k}x{n}-b{bits}-{axis}{g}-{'z' if zero else 's'}-{jnp.dtype(dtype).name}{'-bs' if bs else ''}"


class TestDequantMatmul(KernelTest):
  @pytest.mark.parametrize("case", CASES, ids=_case_id)
  def test_matches_reference(self, case):
    m, k, n, bits, g, axis, zero, dtype, bs = case
    x, q, scale, zp = make_case(m, k, n, bits, g, axis, zero, dtype)
    kw = dict(bits=bits, group_size=g, group_axis=axis)
    ref = dq.dequant_matmul_reference(x, q.packed, scale, zp, **kw)
    for backend in self.backends():
      out = dq.dequant_matmul(x, q.packed, scale, zp, **kw, backend=backend, interpret=self.INTERPRET,
                              block_sizes=None if bs is None else bs[backend])
      assert_close(out, ref)


class TestDequantMatmulInterpret(TestDequantMatmul):
  INTERPRET = True


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis,g", [("oc", 128), ("oc", -1), ("ic", 64), ("ic", -1)])
@pytest.mark.parametrize("zero", [True, False])
def test_reference_matches_lqx(bits, axis, g, zero):
  """The reference reads lqx's layouts: x @ QArray.dequantize()."""
  x, q, scale, zp = make_case(5, 576, 192, bits, g, axis, zero, jnp.float32)
  ref = dq.dequant_matmul_reference(x, q.packed, scale, zp, bits=bits, group_size=g, group_axis=axis)
  want = jnp.dot(x, q.dequantize().astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  assert_close(ref, want)


@pytest.mark.parametrize("bk,bn,sb", [(576, 576, 64), (64, 256, 128), (16, 384, 128), (8, 512, 16),
                                      (8, 512, 8), (8, 256, 256)])
def test_expand_ic_lane_select_matches_reshape(bk, bn, sb):
  """The TPU's per-IC select chain gives exactly the broadcast-and-reshape expansion."""
  a = jnp.asarray(np.random.default_rng(bk + bn + sb).normal(size=(bk, bn // sb)), jnp.float32)
  want = np.repeat(np.asarray(a), sb, axis=1)
  for lane_select in (False, True):
    got = dq._expand(a, sb, (bk, bn), "ic", lane_select=lane_select)
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), (bk, bn)), want)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_reference_matches_lqx(bits):
  codes = np.random.default_rng(bits).integers(0, 2**bits, (100, 3))
  words = affine.packing.pack(codes, bits, axis=0)
  np.testing.assert_array_equal(unpack_lib.unpack_reference(words, bits, 100), codes)


def _args(k=256, n=256, bits=4, g=128, axis="oc"):
  x, q, scale, zp = make_case(3, k, n, bits, g, axis, True, jnp.float32)
  return (x, q.packed, scale, zp), dict(bits=bits, group_size=g, group_axis=axis)


@pytest.mark.parametrize("fn", [dq.dequant_matmul, dq.dequant_matmul_reference])
@pytest.mark.parametrize("change,name", [
    (lambda a, kw: (a, {**kw, "bits": 5}), "bits"),
    (lambda a, kw: (a, {**kw, "group_axis": "tensor"}), "group_axis"),
    (lambda a, kw: (a, {**kw, "group_size": 0}), "group_size"),
    (lambda a, kw: ((a[0], a[1][:-1], *a[2:]), kw), "packed"),
    (lambda a, kw: ((a[0], a[1].astype(jnp.int32), *a[2:]), kw), "packed"),
    (lambda a, kw: ((a[0], a[1], a[2][:1], a[3]), kw), "scale"),
    (lambda a, kw: ((*a[:3], a[3].astype(jnp.float16)), kw), "zero"),
    (lambda a, kw: ((a[0][None], *a[1:]), kw), "x"),
    (lambda a, kw: (a, {**kw, "backend": "cuda"}), "backend"),
])
def test_validation_names_argument(fn, change, name):
  args, kw = change(*_args())
  kw.setdefault("backend", "tpu")
  with pytest.raises(ValueError, match=name):
    fn(*args, **kw)


def test_validation_ic_group_and_blocks():
  args, kw = _args(n=192, g=64, axis="ic")
  with pytest.raises(ValueError, match="group_size"):
    dq.dequant_matmul(*args, **{**kw, "group_size": 128}, backend="tpu", interpret=True)
  args, kw = _args()
  with pytest.raises(ValueError, match="block_sizes"):
    dq.dequant_matmul(*args, **kw, backend="triton", interpret=True, block_sizes=dq.BlockSizes(16, 96, 64))
  with pytest.raises(ValueError, match="bk="):
    dq.dequant_matmul(*args, **kw, backend="tpu", interpret=True, block_sizes=dq.BlockSizes(16, 4, 128))


@pytest.mark.skipif(jax.default_backend() in ("gpu", "tpu"), reason="CPU-only check")
def test_backend_required_on_cpu():
  args, kw = _args()
  with pytest.raises(ValueError, match="backend"):
    dq.dequant_matmul(*args, **kw)


# ----------------------------------------------------------------------------- lowering

SMOLLM2 = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
LOWER = ([(16, k, n, 4, 128, "oc", True) for k, n in SMOLLM2] + [(1, 4096, 4096, 4, 128, "oc", True)]
         + [(256, 576, 192, 3, 64, "ic", False), (1, 1536, 576, 2, 128, "oc", False),
            (7, 576, 1536, 8, 128, "ic", True)])


@pytest.mark.parametrize("backend,platform", [("tpu", "tpu"), ("triton", "cuda")])
@pytest.mark.parametrize("m,k,n,bits,g,axis,zero", LOWER)
def test_lowers(backend, platform, m, k, n, bits, g, axis, zero):
  sds = jax.ShapeDtypeStruct
  gshape = affine.scale_shape((k, n), g, axis)
  args = [sds((m, k), jnp.bfloat16), sds((-(-k * bits // 32), n), jnp.uint32), sds(gshape, jnp.float16)]
  if zero:
    args.append(sds(gshape, jnp.float32))
  fn = functools.partial(dq.dequant_matmul, bits=bits, group_size=g, group_axis=axis, backend=backend)
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert ("tpu_custom_call" if backend == "tpu" else "triton") in text
