"""Quantized matmul speed: the path ``nn.linear`` takes for each format, against a dense matmul.

  python experiments/bench_kernels.py [--shapes 576x576 4096x11008 ...] [--ms 1 16 256]
      [--formats int4-g128 ...] [--repeats 20] [--json F] [--md F] [--device-check]

On CPU the quantized path is XLA's (dequantize, then matmul); it is timed against a
float32 matmul of the same shape. On a GPU or TPU it is the Pallas kernel
(``pallas_kernels/``, chosen by ``lqx.nn.pallas_target``), timed against
a bfloat16 matmul (``nn.linear`` on a float kernel: the same call, without
dequantization) and against the XLA dequantize-then-matmul path. Each row
prints the speedup over the dense matmul, the bytes the quantized matmul must move
(codes, scales, zeros, tables, x and y), the fraction of the memory roofline that
reaches (bandwidth = a device copy measured in the same run) and the ideal speedup
``16 / (bits + 16/g)`` of a purely memory-bound matmul. The machine's own matmul
rate is printed first.

``--device-check`` first compares every kernel with its pure-jnp reference on the
device (bits 2, 3, 4, 8 on both group axes, with and without zero points, codebooks
of 3 and 4 bits; M in 1, 7, 64, 300), then runs the benchmark: one short call gives
every figure a GPU or TPU can give. Exits non-zero when a check fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lqx import nn
from lqx.formats import affine, codebook

if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402
from _bench import matmul_gflops, time_best  # noqa: E402

SMOLLM2_SHAPES = ("576x576", "576x192", "576x1536", "1536x576")
LARGE_SHAPES = ("4096x4096", "4096x11008")
# name -> (kind, bits, group_size, group_axis, zero points)
FORMATS = {
    "int4-g128": ("affine", 4, 128, "oc", True),
    "int4-g128-sym": ("affine", 4, 128, "oc", False),
    "int4-ic-g64": ("affine", 4, 64, "ic", True),
    "int3-g128": ("affine", 3, 128, "oc", True),
    "int2-g64": ("affine", 2, 64, "oc", True),
    "int8-chan": ("affine", 8, -1, "oc", False),
    "lut4": ("codebook", 4, None, None, None),
    "lut3": ("codebook", 3, None, None, None),
}


def shape_arg(text: str) -> tuple[int, int]:
  try:
    k, n = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise _cli.UsageError(f"argument --shapes: {text!r} is not KxN (e.g. 4096x11008)") from None
  if k <= 0 or n <= 0:
    raise _cli.UsageError(f"argument --shapes: {text!r} needs positive K and N")
  return k, n


def make_kernel(name: str, k: int, n: int, key) -> object:
  """A random quantized ``(k, n)`` kernel of format ``name`` (FORMATS), dtype bfloat16."""
  kind, bits, g, axis, zero = FORMATS[name]
  kc, ks, kz = jax.random.split(key, 3)
  codes = jax.random.randint(kc, (k, n), 0, 1 << bits).astype(jnp.uint8)
  if kind == "codebook":
    table = jnp.sort(jax.random.normal(ks, (n, 1 << bits)) * 0.02, axis=1)
    return codebook.from_codes(codes, table, bits=bits, dtype=jnp.bfloat16)
  shape = affine.scale_shape((k, n), g, axis)
  scale = jax.random.uniform(ks, shape, minval=0.001, maxval=0.01)
  zeros = jax.random.randint(kz, shape, 0, 1 << bits).astype(jnp.float32) if zero else None
  return affine.from_codes(codes, scale, zeros, bits=bits, group_size=g, group_axis=axis, dtype=jnp.bfloat16)


def ideal_speedup(q) -> float:
  """``16 / bits_per_weight``: a memory-bound matmul's speedup over bfloat16 weights (16 / (b + 16/g))."""
  return 16 / q.bits_per_weight


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
  """Bytes per second of a device array copy (read + write), the memory roofline used here."""
  n = nbytes // 4
  a = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda a: a + 1)
  return 2 * n * 4 / time_best(lambda: jax.block_until_ready(f(a)), repeats)


def moved_bytes(q, m: int, x_dtype) -> int:
  """What ``x @ q`` must read and write at least: every stored array of ``q``, x and y."""
  k, n = q.shape
  return q.nbytes + m * (k + n) * np.dtype(x_dtype).itemsize


def device_check(ms=(1, 7, 64, 300), k: int = 576, n: int = 384) -> list[dict]:
  """Kernel vs reference on the default device for every supported case; one dict per case."""
  from pallas_kernels import dequant_matmul as dq
  from pallas_kernels import lut_matmul as lut
  target = nn.pallas_target()
  backend = target[0] if target else "triton"
  interpret = target is None or target[1]
  rows = []
  key = jax.random.key(0)
  cases = [(f"affine int{b} {axis} g{g} {'asym' if z else 'sym'}", "affine", b, g, axis, z)
           for b in (2, 3, 4, 8) for axis, g in (("oc", 128), ("ic", 64)) for z in (True, False)]
  cases += [(f"codebook {b}-bit", "codebook", b, None, None, None) for b in (3, 4)]
  for label, kind, b, g, axis, z in cases:
    key, kw, kx = jax.random.split(key, 3)
    if kind == "codebook":
      q = make_kernel(f"lut{b}", k, n, kw)
      args = (q.packed, q.table)
      kw_ = dict(bits=b)
      op, ref = lut.lut_matmul, lut.lut_matmul_reference
    else:
      shape = affine.scale_shape((k, n), g, axis)
      ks, kz, kc = jax.random.split(kw, 3)
      codes = jax.random.randint(kc, (k, n), 0, 1 << b).astype(jnp.uint8)
      scale = jax.random.uniform(ks, shape, minval=0.001, maxval=0.01).astype(jnp.float16)
      zero = jax.random.randint(kz, shape, 0, 1 << b).astype(jnp.float32) if z else None
      q = affine.from_codes(codes, scale, zero, bits=b, group_size=g, group_axis=axis, dtype=jnp.bfloat16)
      args = (q.packed, q.scale, zero)
      kw_ = dict(bits=b, group_size=g, group_axis=axis)
      op, ref = dq.dequant_matmul, dq.dequant_matmul_reference
    for m in ms:
      for dt in (jnp.bfloat16, jnp.float32):
        x = jax.random.normal(jax.random.fold_in(kx, m), (m, k), dt)
        row = {"case": label, "m": m, "dtype": np.dtype(dt).name}
        try:
          got = op(x, *args, **kw_, backend=backend, interpret=interpret).astype(jnp.float32)
          want = ref(x, *args, **kw_).astype(jnp.float32)
          err = float(jnp.max(jnp.abs(got - want)) / (jnp.max(jnp.abs(want)) + 1e-30))
          row |= {"rel_err": err, "ok": bool(err < (2e-2 if dt == jnp.bfloat16 else 1e-4))}
        except Exception as e:  # report every case, then fail at the end
          row |= {"rel_err": None, "ok": False, "error": _cli.describe(e)}
        rows.append(row)
  return rows


def bench(shapes, ms, formats, repeats: int) -> list[dict]:
  """One row per (shape, format, M): quantized path vs a dense matmul (module doc)."""
  on_device = nn.pallas_target() is not None
  dense_dtype = jnp.bfloat16 if on_device else jnp.float32
  linear = jax.jit(nn.linear)  # the same call for the dense baseline (a float kernel) and the formats
  dense = linear
  rows = []
  for k, n in shapes:
    w = jax.random.normal(jax.random.key(1), (k, n), dense_dtype) * 0.02
    xs = {m: jax.random.normal(jax.random.key(3), (m, k), dense_dtype) for m in ms}
    # One dense baseline per (shape, M), shared by every format's row.
    dense_s = {m: time_best(lambda: jax.block_until_ready(dense(xs[m], w)), 2 * repeats) for m in ms}
    for name in formats:
      q = make_kernel(name, k, n, jax.random.key(2))
      for m in ms:
        x, t_dense = xs[m], dense_s[m]
        t_q = time_best(lambda: jax.block_until_ready(linear(x, q)), repeats)
        row = {"shape": [k, n], "format": name, "m": m, "bits_per_weight": q.bits_per_weight,
               "dense_dtype": np.dtype(dense_dtype).name, "dense_s": t_dense, "quantized_s": t_q,
               "speedup": t_dense / t_q, "ideal_speedup": ideal_speedup(q),
               "moved_bytes": moved_bytes(q, m, dense_dtype)}
        if on_device:
          with nn.kernels("xla"):
            xla = jax.jit(lambda x, q: nn.linear(x, q))
            row["xla_dequant_s"] = time_best(lambda: jax.block_until_ready(xla(x, q)), repeats)
        rows.append(row)
        print(f"{k:>5}x{n:<6} {name:<14} M={m:<4} {q.bits_per_weight:5.2f} b/w  dense {t_dense * 1e6:9.1f} us  "
              f"quantized {t_q * 1e6:9.1f} us  speedup {t_dense / t_q:5.2f}x (ideal {ideal_speedup(q):4.2f}x)"
              + (f"  xla-dequant {row['xla_dequant_s'] * 1e6:9.1f} us" if on_device else ""), flush=True)
  return rows


def markdown(out: dict) -> str:
  """The rows as a table, headed by the device and its matmul rate."""
  head = (f"{out['device']}, float32 2048^3 matmul {out['matmul_gflops_f32']:.0f} GFLOP/s; quantized path: "
          f"{out['path']}; dense: {out['rows'][0]['dense_dtype']} matmul" if out["rows"] else out["device"])
  lines = [head, "", "| K x N | format | bits/weight | M | dense µs | quantized µs | speedup | ideal |",
           "|---|---|---|---|---|---|---|---|"]
  for r in out["rows"]:
    lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['format']} | {r['bits_per_weight']:.2f} | {r['m']} | "
                 f"{r['dense_s'] * 1e6:.0f} | {r['quantized_s'] * 1e6:.0f} | {r['speedup']:.2f}x | "
                 f"{r['ideal_speedup']:.2f}x |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--shapes", nargs="+", type=shape_arg, default=None,
                  help="KxN kernels (default: SmolLM2's four shapes, plus 4096x4096 and 4096x11008 off CPU)")
  ap.add_argument("--ms", nargs="+", type=_cli.positive_int, default=None,
                  help="rows of x (default: 1 16 256 on CPU, 1 4 16 64 256 on a GPU/TPU)")
  ap.add_argument("--formats", nargs="+", choices=list(FORMATS), default=["int4-g128", "int4-ic-g64", "int3-g128",
                                                                          "int8-chan", "lut4", "lut3"])
  ap.add_argument("--repeats", type=_cli.positive_int, default=10, help="timed calls per figure (best is kept)")
  ap.add_argument("--device-check", action="store_true", help="check every kernel on the device first")
  ap.add_argument("--json", type=_cli.output_file, help="write the results here")
  ap.add_argument("--md", type=_cli.output_file, help="write the table here")
  args = ap.parse_args(argv)

  target = nn.pallas_target()
  dev = jax.devices()[0]
  print(f"device: {dev.platform} {dev.device_kind}; quantized path: "
        f"{'Pallas ' + target[0] + (' (interpreted)' if target[1] else '') if target else 'XLA (dequantize, matmul)'}")
  out = {"device": f"{dev.platform} {dev.device_kind}", "path": target[0] if target else "xla",
         "jax": jax.__version__, "matmul_gflops_f32": matmul_gflops()}
  print(f"float32 2048^3 matmul: {out['matmul_gflops_f32']:.0f} GFLOP/s")
  if target:
    out["matmul_gflops_bf16"] = matmul_gflops(dtype=jnp.bfloat16)
    out["copy_bandwidth"] = copy_bandwidth()
    print(f"bfloat16 2048^3 matmul: {out['matmul_gflops_bf16']:.0f} GFLOP/s; "
          f"copy bandwidth {out['copy_bandwidth'] / 1e9:.0f} GB/s")
  ok = True
  if args.device_check:
    out["check"] = device_check()
    bad = [r for r in out["check"] if not r["ok"]]
    worst = max((r["rel_err"] for r in out["check"] if r["rel_err"] is not None), default=float("nan"))
    print(f"device check: {len(out['check']) - len(bad)}/{len(out['check'])} cases within tolerance "
          f"(worst relative error {worst:.2e})")
    for r in bad:
      print(f"  FAILED {r['case']} M={r['m']} {r['dtype']}: {r.get('error') or r['rel_err']}")
    ok = not bad
  shapes = args.shapes or [shape_arg(s) for s in SMOLLM2_SHAPES + (LARGE_SHAPES if target else ())]
  ms = args.ms or ([1, 4, 16, 64, 256] if target else [1, 16, 256])
  out["rows"] = bench(shapes, ms, args.formats, args.repeats)
  if target:
    for r in out["rows"]:
      r["roofline_fraction"] = r["moved_bytes"] / out["copy_bandwidth"] / r["quantized_s"]
  if args.json:
    Path(args.json).write_text(json.dumps(out, indent=1))
  if args.md:
    Path(args.md).write_text(markdown(out) + "\n")
  if not ok:
    raise SystemExit(1)
  return out


if __name__ == "__main__":
  _cli.run(main)
