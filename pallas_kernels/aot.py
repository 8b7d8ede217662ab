"""Ahead-of-time compile of the Pallas kernels for real TPU and GPU chips, on a CPU machine.

The real backend compilers (Mosaic TPU from libtpu, Triton + ptxas from the CUDA
plugin) run without a chip, against a described topology. They catch what interpret
mode and lowering miss: HBM tiling by dtype, VMEM and shared-memory overflow. A
compile proves a kernel is legal for that chip, not that its numbers or speed are
right there. Needs the separate env `make kernels-env` (requirements-kernels.txt)
and JAX_PLATFORMS=cpu; imports jax only, never lqx.

    python -m pallas_kernels.aot [--targets v5e h100] [--cases NAME ...] [--json out.json]

prints one line per (case, target) and exits non-zero if any compile failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pl_triton

GPU_TARGETS_DIR = pathlib.Path(__file__).parent / "gpu_targets"

# libtpu looks for a real chip and its metadata server (and logs that) unless told it is
# on a v5e host; and it takes /tmp/libtpu_lockfile, so a second compiling process fails
# with "ABORTED: Internal error when accessing libtpu multi-process lockfile" unless allowed.
_LIBTPU_ENV = {"TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost",
               "TPU_WORKER_ID": "0", "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


# ----------------------------------------------------------------------------- targets

@dataclasses.dataclass(frozen=True)
class Target:
  """A chip to compile for: how to describe its topology, and which kernel backend it takes."""
  platform: str                  # "tpu" or "cuda"
  backend: str                   # kernel backend passed to the ops: "tpu" (Mosaic) or "triton"
  topology: str                  # TPU topology name; "1x1x1" for one GPU
  chip_config: str = "default"   # TPU only ("megacore" for v4 / v5p)
  gpu_config: str = ""           # CUDA only: a GpuTargetConfigProto text file in gpu_targets/

  def describe(self):
    """The compile-only `TopologyDescription` (libtpu or the CUDA plugin must be installed)."""
    from jax.experimental import topologies
    if self.platform == "tpu":
      for key, value in _LIBTPU_ENV.items():
        os.environ.setdefault(key, value)
      return topologies.get_topology_desc(
          topology_name=self.topology, platform="tpu", chip_config_name=self.chip_config,
          chips_per_host_bounds=(2, 2, 1), num_slices=1)
    text = (GPU_TARGETS_DIR / self.gpu_config).read_text()
    return topologies.get_topology_desc(platform="cuda", topology=self.topology, target_config=text)


TARGETS: dict[str, Target] = {
    "v4": Target("tpu", "tpu", "v4:2x2x1", chip_config="megacore"),
    "v5e": Target("tpu", "tpu", "v5e:2x2"),
    "v6e": Target("tpu", "tpu", "v6e:2x2"),
    "tpu7x": Target("tpu", "tpu", "tpu7x:2x2x1"),
    "a100": Target("cuda", "triton", "1x1x1", gpu_config="a100.textproto"),  # sm_80
    "h100": Target("cuda", "triton", "1x1x1", gpu_config="h100.textproto"),  # sm_90
}


@functools.cache
def _first_device(target: str):
  return TARGETS[target].describe().devices[0]


def compile_for(fn: Callable, *shape_dtype_structs: jax.ShapeDtypeStruct, target: str):
  """Lower and compile `fn` ahead of time for one chip of `target` (a name in TARGETS).

  Each argument is placed, by its sharding, on a one-device mesh of the topology's
  first device; the backend compiler runs and its errors propagate.
  """
  mesh = jax.sharding.Mesh(np.array([_first_device(target)]), ("d",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated) for s in shape_dtype_structs]
  return jax.jit(fn).trace(*args).lower().compile()


# ----------------------------------------------------------------------------- self-test kernel

def _selftest_kernel(x_ref, w_ref, o_ref, *, bk: int):
  """o = x @ w over one (bm, bn) output block, looping over K in steps of bk."""
  def body(i, acc):
    start = pl.multiple_of(i * bk, bk)
    x = x_ref[:, pl.ds(start, bk)]
    w = w_ref[pl.ds(start, bk), :]
    return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)
  acc = jax.lax.fori_loop(0, x_ref.shape[1] // bk, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("bm", "bn", "bk", "backend", "interpret"))
def selftest_matmul(x, w, *, bm: int, bn: int, bk: int, backend: str, interpret: bool = False):
  """A plain tiled matmul (f32 out), to prove the toolchain; blocks hold all of K."""
  (m, k), n = x.shape, w.shape[1]
  if m % bm or n % bn or k % bk:
    raise ValueError(f"{m=}, {n=}, {k=} must be multiples of {bm=}, {bn=}, {bk=}")
  if backend == "tpu":
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
  else:
    params = pl_triton.CompilerParams(num_warps=4, num_stages=2)
  return pl.pallas_call(
      functools.partial(_selftest_kernel, bk=bk),
      out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32),
      grid=(m // bm, n // bn),
      in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((k, bn), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      compiler_params=params,
      interpret=interpret,
  )(x, w)


# ----------------------------------------------------------------------------- cases

@dataclasses.dataclass(frozen=True)
class Case:
  """One representative kernel call: op, shapes and quantization format (no arrays)."""
  name: str
  op: str                 # "dequant_matmul", "lut_matmul" or "selftest_matmul"
  m: int
  k: int
  n: int
  bits: int = 16
  group_size: int = 0     # dequant_matmul only
  group_axis: str = "oc"  # "oc": scale (ceil(K/g), N); "ic": scale (K, ceil(N/g))
  zero: bool = False      # dequant_matmul: pass a float32 zero point
  blocks: tuple[int, int, int] = (0, 0, 0)  # selftest_matmul only: (bm, bn, bk)

  def build(self, backend: str) -> tuple[Callable, list[jax.ShapeDtypeStruct]]:
    """(fn, argument shapes) for a kernel backend; imports the kernel module lazily."""
    sds = jax.ShapeDtypeStruct
    x = sds((self.m, self.k), jnp.bfloat16)
    if self.op == "selftest_matmul":
      bm, bn, bk = self.blocks
      fn = functools.partial(selftest_matmul, bm=bm, bn=bn, bk=bk, backend=backend)
      return fn, [x, sds((self.k, self.n), jnp.bfloat16)]
    op = getattr(importlib.import_module(f"pallas_kernels.{self.op}"), self.op)
    packed = sds((math.ceil(self.k * self.bits / 32), self.n), jnp.uint32)
    if self.op == "lut_matmul":
      fn = functools.partial(op, bits=self.bits, backend=backend)
      return fn, [x, packed, sds((self.n, 2 ** self.bits), jnp.float16)]
    g = self.group_size
    scale_shape = ((math.ceil(self.k / g), self.n) if self.group_axis == "oc"
                   else (self.k, math.ceil(self.n / g)))
    fn = functools.partial(op, bits=self.bits, group_size=g, group_axis=self.group_axis,
                           backend=backend)
    args = [x, packed, sds(scale_shape, jnp.float16)]
    if self.zero:
      args.append(sds(scale_shape, jnp.float32))
    return fn, args


def _dq(m, k, n, bits, g, axis, zero):
  tag = f"{axis}g{g}{'z' if zero else 's'}"
  return Case(f"dq{bits}_{tag}_{m}x{k}x{n}", "dequant_matmul", m, k, n, bits, g, axis, zero)


def _lut(m, k, n, bits):
  return Case(f"lut{bits}_{m}x{k}x{n}", "lut_matmul", m, k, n, bits)


# SmolLM2-135M projections (K, N): q/o (576, 576), k/v (576, 192), gate/up (576, 1536),
# down (1536, 576); Llama-7B-sized 4096x4096 and 4096x11008. M: decode 1, small batch 16,
# prefill 256. g128 on "oc" is lqx's default; "ic" uses g64 where N is not a multiple of 128.
CASES: list[Case] = [
    Case("selftest_256x512x256", "selftest_matmul", 256, 512, 256, blocks=(128, 128, 128)),
    # 4-bit affine, the main format: every shape, each M once.
    _dq(1, 576, 576, 4, 128, "oc", True),
    _dq(16, 576, 192, 4, 128, "oc", True),
    _dq(256, 576, 1536, 4, 128, "oc", True),
    _dq(16, 1536, 576, 4, 128, "oc", True),
    _dq(1, 4096, 4096, 4, 128, "oc", True),
    _dq(16, 4096, 11008, 4, 128, "oc", True),
    _dq(256, 4096, 4096, 4, 128, "oc", True),
    _dq(1, 576, 1536, 4, 128, "oc", False),
    _dq(256, 4096, 11008, 4, 128, "oc", False),
    _dq(16, 576, 576, 4, 64, "ic", True),
    _dq(1, 576, 192, 4, 64, "ic", False),
    _dq(256, 4096, 4096, 4, 128, "ic", True),
    # 3-bit affine (the dense stream read in place), both group axes.
    _dq(16, 576, 576, 3, 128, "oc", True),
    _dq(1, 4096, 11008, 3, 128, "oc", False),
    _dq(256, 1536, 576, 3, 64, "ic", True),
    # 2- and 8-bit affine, both group axes, with and without zero.
    _dq(16, 576, 1536, 2, 128, "oc", True),
    _dq(1, 4096, 4096, 2, 64, "ic", False),
    _dq(256, 1536, 576, 8, 128, "oc", False),
    _dq(16, 4096, 11008, 8, 128, "ic", True),
    # Codebooks (one 2^b table per output channel).
    _lut(1, 576, 576, 3),
    _lut(256, 576, 1536, 3),
    _lut(16, 4096, 11008, 3),
    _lut(16, 576, 192, 4),
    _lut(256, 1536, 576, 4),
    _lut(1, 4096, 4096, 4),
]

# Deliberately illegal, only run when named; interpret mode and lowering accept both.
# selftest_vmem: a (16384, 1024) bf16 weight block is 32 MiB of VMEM, over every TPU's
# scoped default (16-32 MiB). selftest_smem: (1024, 256) bf16 weight slices, pipelined,
# need 544 KiB of shared memory, over the opt-in limit (163 KiB A100, 227 KiB H100);
# legal on TPU.
ILLEGAL_CASES: list[Case] = [
    Case("selftest_vmem", "selftest_matmul", 16, 16384, 1024, blocks=(16, 1024, 16384)),
    Case("selftest_smem", "selftest_matmul", 16, 4096, 256, blocks=(16, 256, 1024)),
]


# ----------------------------------------------------------------------------- check

def _full(err: BaseException, limit: int = 20000) -> str:
  """The error's text, less the module bytecode that Triton appends."""
  return str(err).split("\ninput ir:")[0][:limit]


def _one_line(err: BaseException, limit: int = 400) -> str:
  """The error's type and its first informative lines, as one line."""
  lines = [ln.strip() for ln in _full(err).splitlines() if ln.strip()]
  text = f"{type(err).__name__}: " + " | ".join(lines[:4])
  return text if len(text) <= limit else text[:limit] + " ..."


def check(cases: list[Case], targets: list[str], log=print) -> list[dict[str, Any]]:
  """Compile every case for every target; one record (and one log line) per pair.

  A record's status is "ok", "error" (the compiler's or the op's error), or "skip"
  (the case's kernel module does not exist yet).
  """
  records = []
  for case in cases:
    for name in targets:
      rec = {"case": case.name, "target": name, "op": case.op, "backend": TARGETS[name].backend}
      t0 = time.perf_counter()
      try:
        fn, args = case.build(TARGETS[name].backend)
        compile_for(fn, *args, target=name)
        rec["status"] = "ok"
      except ModuleNotFoundError as e:
        missing = e.name and e.name.endswith(f".{case.op}")
        rec["status"], rec["error"] = ("skip" if missing else "error"), _one_line(e)
        rec["error_full"] = _full(e)
      except Exception as e:  # noqa: BLE001 - every compiler error is a result here
        rec["status"], rec["error"], rec["error_full"] = "error", _one_line(e), _full(e)
      rec["seconds"] = round(time.perf_counter() - t0, 3)
      records.append(rec)
      detail = rec.get("error", "")
      log(f"{case.name:30s} {name:6s} {rec['status']:5s} {rec['seconds']:6.2f}s  {detail}".rstrip())
  return records


def _versions() -> dict[str, str]:
  from importlib import metadata
  out = {}
  for dist in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cuda-nvcc-cu12"):
    try:
      out[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      out[dist] = None
  return out


def main(argv: list[str] | None = None) -> int:
  every = {c.name: c for c in CASES + ILLEGAL_CASES}
  parser = argparse.ArgumentParser(prog="python -m pallas_kernels.aot", description=__doc__.splitlines()[0])
  parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=list(TARGETS))
  parser.add_argument("--cases", nargs="+", metavar="NAME",
                      help=f"case names (default: all of CASES); illegal on purpose: "
                           f"{', '.join(c.name for c in ILLEGAL_CASES)}")
  parser.add_argument("--json", type=pathlib.Path, help="write the records and timings here")
  parser.add_argument("--list", action="store_true", help="list the case names and exit")
  args = parser.parse_args(argv)
  if args.list:
    print("\n".join(every))
    return 0
  unknown = sorted(set(args.cases or ()) - set(every))
  if unknown:
    parser.error(f"unknown cases: {unknown}")
  jax.config.update("jax_platforms", "cpu")  # compile only: never touch a local accelerator
  cases = [every[n] for n in args.cases] if args.cases else CASES

  t0 = time.perf_counter()
  records = check(cases, args.targets)
  seconds = time.perf_counter() - t0
  counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "error", "skip")}
  print(f"{counts['ok']} ok, {counts['error']} failed, {counts['skip']} skipped "
        f"in {seconds:.1f}s ({len(cases)} cases x {len(args.targets)} targets)")
  if args.json:
    args.json.write_text(json.dumps({"seconds": round(seconds, 2), "counts": counts,
                                     "versions": _versions(), "records": records}, indent=1))
  return 1 if counts["error"] else 0


if __name__ == "__main__":
  sys.exit(main())
