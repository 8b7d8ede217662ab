"""GPTQ solve time for one square layer, beside a plain matmul's GFLOP/s in the same run.

The Hessian comes from correlated random inputs (``2 * size`` tokens). Prints the
compile-included first call, the best of ``--repeats`` warm calls, and the achieved
GFLOP/s of the solve (flops as run and useful flops, :func:`gptq_flops`) next to a jitted float32
2048x2048 matmul's GFLOP/s measured in the same run (the machine's practical limit).

  python experiments/bench_gptq.py [--size 4096] [--bits 4] [--group-size 128] [--act-order]
                                   [--repeats 2] [--json OUT]
  python experiments/bench_gptq.py --smollm2 [--calib-samples 8]   # every SmolLM2 linear instead

With ``--smollm2`` the Hessians come from the float model's inputs to each linear on
calibration windows of the training works, and every one of the 210 linears is timed.

  python experiments/bench_gptq.py --pipeline [--bits 3] [--calib-samples 32] [--reference]

``--pipeline`` times a whole ``lqx.quantize`` run on SmolLM2 (calibration windows of
512 tokens, every block linear, compilation included) in both pipelines (true-
sequential and the reference's), broken down into embedding, calibration forwards,
Hessians, solves and compilation (XLA's own compile-time events), and the held-out
evaluation; with ``--reference`` the reference pipeline on PyTorch
(``experiments/gptq_reference.py``) runs in the same process on the same windows and
the ratio is to its time, else to ``REFERENCE_SECONDS`` (IST-DASLab/gptq measured on
these CPUs when the issue was filed; machines differ, so prefer ``--reference``).
Arguments are checked before any model loads; an error prints one ``error: ...``
line (``--debug``: the traceback).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lqx.quant import gptq

if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402
from _bench import matmul_gflops  # noqa: E402


def gptq_flops(ic: int, oc: int, block_size: int = 128, chol_block: int = gptq.CHOL_BLOCK) -> dict:
  """Flops of one solve (multiply-adds x2; elementwise work ignored), two ways.

  ``run``: what ``lqx.quant.gptq`` executes. Static shapes make it mask
  instead of shrink: the blocked Cholesky's trailing updates are full
  ``n x n`` matmuls (``2 n^3``), the inverse of the triangular factor is a
  triangular solve against the identity (``ic^3``), and each of the ``icp/bs``
  lazy block updates touches all ``icp`` rows (``2 icp^2 oc``, ``icp`` = IC
  rounded up to whole blocks); in-block feedback is ``2 icp bs oc``.

  ``useful``: the same algorithm without masked work, as the reference counts
  it: Cholesky ``ic^3/3``, triangular inverse ``ic^3/3``, trailing updates
  ``ic^2 oc``, in-block feedback ``ic bs oc``.
  """
  icp = -(-ic // block_size) * block_size
  npad = -(-ic // chol_block) * chol_block
  run = 2 * npad**3 + ic**3 + 2 * icp**2 * oc + 2 * icp * block_size * oc
  useful = ic**3 / 3 + ic**3 / 3 + ic**2 * oc + ic * block_size * oc
  return dict(run=float(run), useful=float(useful))


def correlated_layer(size: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """A ``(size, size)`` kernel and the Hessian ``2/N X^T X`` of correlated inputs, ``N = 2 size``."""
  k_mix, k_x, k_w = jax.random.split(jax.random.key(seed), 3)
  mix = jnp.eye(size) + jax.random.normal(k_mix, (size, size)) / np.sqrt(size)
  x = jax.random.normal(k_x, (2 * size, size)) @ mix
  h = 2 / x.shape[0] * jnp.einsum("ni,nj->ij", x, x, precision=jax.lax.Precision.HIGHEST)
  w = jax.random.normal(k_w, (size, size)) * 0.02
  return jax.block_until_ready(w), jax.block_until_ready(h)


def time_layers(layers, config: gptq.GPTQConfig, repeats: int = 1) -> list[dict]:
  """Time ``gptq_quantize`` on each ``(name, w, h)``: first call (with compilation), best warm call."""
  rows = []
  for name, w, h in layers:
    t = time.perf_counter()
    _, info = gptq.gptq_quantize(w, h, config, name=name)
    first = time.perf_counter() - t
    best = min(gptq.gptq_quantize(w, h, config, name=name)[1]["seconds"] for _ in range(repeats))
    flops = gptq_flops(*w.shape, config.block_size)
    rows.append(dict(name=name, shape=list(w.shape), first_call_s=first, seconds=best,
                     gflop_run=flops["run"] / 1e9, gflop_useful=flops["useful"] / 1e9,
                     gflops_per_s_run=flops["run"] / best / 1e9, gflops_per_s_useful=flops["useful"] / best / 1e9,
                     proxy_loss=info["proxy_loss"], damp=info["damp"]))
  return rows


def smollm2_layers(n_samples: int, seq_len: int = 256, n_blocks: int | None = None):
  """``(name, w, H)`` for every linear of SmolLM2, H from the float model's own inputs."""
  from lqx import data, io
  from lqx.models import llama
  from lqx.quant import hessian

  config, params = io.load_model("smollm2-135m")
  params = jax.tree.map(jnp.asarray, params)
  tok = io.load_tokenizer("smollm2-135m")
  calib = data.sample_windows(data.tokenize(tok, data.load_text("train")), n_samples, seq_len, seed=0)
  xs = llama.hidden_states(config, params, jnp.asarray(calib))
  layers = []
  for i, name in enumerate(llama.layer_names(config)[:n_blocks]):
    _, taps = jax.jit(llama.block_taps, static_argnums=0)(config, params[name], xs[i])
    for stage in llama.STAGES:
      h = hessian.finalize(hessian.update(hessian.init(taps[stage.tap].shape[-1]), taps[stage.tap]))
      for lin in stage.linears:
        group, proj = lin.split("/")
        layers.append((f"{name}/{lin}", params[name][group][proj]["kernel"], h))
  return layers


REFERENCE_SECONDS = 80.0  # IST-DASLab/gptq, SmolLM2 W3 g128, 32 x 512 calibration (78-82 s, issue #13)


def main_pipeline(args) -> dict:
  """Whole quantize runs, phase by phase, beside the reference pipeline's time."""
  from pathlib import Path

  from lqx import data, evaluate, io, recipe

  compile_s = {"t": 0.0}
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, d, **kw: compile_s.__setitem__("t", compile_s["t"] + d) if event.startswith(
          "/jax/core/compile/") else None)
  model_config, params = io.load_model("smollm2-135m")
  params = jax.tree.map(jnp.asarray, params)
  tok = io.load_tokenizer("smollm2-135m")
  calib = data.sample_windows(data.tokenize(tok, data.load_text("train")), args.calib_samples, 512, seed=0)
  heldout = data.tokenize(tok, data.load_text("heldout"))
  peak = matmul_gflops()
  method = gptq.GPTQConfig(bits=args.bits, group_size=args.group_size, act_order=args.act_order)
  result = dict(bits=args.bits, group_size=args.group_size, calib=list(calib.shape),
                matmul_2048_gflops_per_s=peak, runs={})
  ref_s = None
  if args.reference:
    sys.path.insert(0, str(Path(__file__).parent))
    import torch

    import gptq_reference
    from bench_forward import torch_model
    torch.set_num_threads(2)
    model = torch_model(model_config, params)
    t = time.perf_counter()
    gptq_reference.ref_pipeline(model, calib, args.bits, args.group_size, progress=False)
    ref_s = time.perf_counter() - t
    del model
  result["reference_seconds"] = ref_s
  base = ref_s if ref_s is not None else REFERENCE_SECONDS
  for true_seq in (True, False):
    c0 = compile_s["t"]
    t = time.perf_counter()
    qparams, report = recipe.quantize(model_config, params, recipe.default_recipe(method), calib,
                                      true_sequential=true_seq, progress=False)
    total = time.perf_counter() - t
    t = time.perf_counter()
    ppl = evaluate.perplexity(model_config, qparams, heldout, seq_len=512, max_tokens=args.eval_tokens,
                              progress=False).ppl
    row = dict(seconds=total, **report.timings, compile=compile_s["t"] - c0, eval_seconds=time.perf_counter() - t,
               ppl=ppl, ratio_to_reference=total / base)
    name = "true-sequential" if true_seq else "reference"
    result["runs"][name] = row
    print(f"lqx {name:15s}: {total:6.1f} s = " + ", ".join(
        f"{k} {row[k]:.1f}" for k in ("embed", "forward", "hessian", "solve")) +
        f" (compilation inside them: {row['compile']:.1f}); evaluation {row['eval_seconds']:.1f} s "
        f"(ppl {ppl:.2f} on {args.eval_tokens} tokens); {row['ratio_to_reference']:.2f}x the reference's "
        f"{base:.0f} s" + ("" if ref_s is not None else " (issue figure; run with --reference to measure)"))
  print(f"float32 2048^3 matmul in this run: {peak:.0f} GFLOP/s"
        + (f"; reference pipeline (PyTorch, same windows): {ref_s:.1f} s" if ref_s is not None else ""))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--size", type=_cli.positive_int, default=4096, help="IC = OC of the layer")
  ap.add_argument("--bits", type=int, choices=range(2, 9), metavar="{2..8}", default=4, help="bits per weight")
  ap.add_argument("--group-size", type=_cli.group_size, default=128, help="-1: per channel")
  ap.add_argument("--act-order", action="store_true", help="GPTQ's act-order")
  ap.add_argument("--repeats", type=_cli.positive_int, default=2, help="warm calls timed (the best is kept)")
  ap.add_argument("--json", type=_cli.output_file, default=None, help="write the results here")
  ap.add_argument("--smollm2", action="store_true", help="time every SmolLM2 linear instead")
  ap.add_argument("--calib-samples", type=_cli.positive_int, default=8,
                  help="with --smollm2: windows of 256 tokens (--pipeline: of 512, default 32)")
  ap.add_argument("--blocks", type=_cli.positive_int, default=None, help="with --smollm2: only the first N blocks")
  ap.add_argument("--pipeline", action="store_true", help="time whole SmolLM2 quantize runs, phase by phase")
  ap.add_argument("--reference", action="store_true", help="with --pipeline: time the PyTorch reference too")
  ap.add_argument("--eval-tokens", type=_cli.int_at_least(512, "an int >= 512 (one window of 512 tokens)"),
                  default=16384, help="with --pipeline: held-out tokens evaluated")
  args = ap.parse_args(argv)
  if args.pipeline and args.smollm2:
    ap.error("argument --pipeline: not allowed with --smollm2 (pick one)")
  if args.pipeline:
    if args.calib_samples == 8 and "--calib-samples" not in (argv or sys.argv):
      args.calib_samples = 32
    return main_pipeline(args)
  if args.smollm2:
    return main_smollm2(args)

  config = gptq.GPTQConfig(bits=args.bits, group_size=args.group_size, act_order=args.act_order)
  w, h = correlated_layer(args.size)
  peak = matmul_gflops()
  (row,) = time_layers([(f"random_{args.size}x{args.size}", w, h)], config, args.repeats)
  result = dict(config=dict(bits=args.bits, group_size=args.group_size, act_order=args.act_order,
                            block_size=config.block_size), devices=str(jax.devices()),
                matmul_2048_gflops_per_s=peak, **row)
  print(f"GPTQ {args.size}x{args.size} W{args.bits} g{args.group_size}{' act-order' if args.act_order else ''}: "
        f"{row['seconds']:.2f} s warm ({row['first_call_s']:.2f} s first call incl. compile); "
        f"{row['gflop_run']:.0f} GFLOP as run -> {row['gflops_per_s_run']:.1f} GFLOP/s "
        f"({row['gflop_useful']:.0f} useful -> {row['gflops_per_s_useful']:.1f}) "
        f"vs f32 2048^2 matmul {peak:.1f} GFLOP/s ({row['gflops_per_s_run'] / peak:.0%} as run)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


def main_smollm2(args) -> dict:
  config = gptq.GPTQConfig(bits=args.bits, group_size=args.group_size, act_order=args.act_order)
  layers = smollm2_layers(args.calib_samples, n_blocks=args.blocks)
  peak = matmul_gflops()
  rows = time_layers(layers, config, repeats=1)
  total = sum(r["seconds"] for r in rows)
  run = sum(r["gflop_run"] for r in rows)
  result = dict(config=dict(bits=args.bits, group_size=args.group_size, act_order=args.act_order),
                matmul_2048_gflops_per_s=peak, layers=rows, total_seconds=total,
                total_first_call_seconds=sum(r["first_call_s"] for r in rows), gflops_per_s_run=run / total)
  by_shape = {}
  for r in rows:
    by_shape.setdefault(tuple(r["shape"]), []).append(r["seconds"])
  for shape, ts in by_shape.items():
    print(f"  {shape[0]:5d} x {shape[1]:5d}: {len(ts):3d} layers, median {1e3 * float(np.median(ts)):6.1f} ms warm")
  print(f"GPTQ on all {len(rows)} SmolLM2 linears, W{args.bits} g{args.group_size}: {total:.1f} s warm "
        f"({result['total_first_call_seconds']:.1f} s first calls incl. compile), {run / total:.1f} GFLOP/s as run "
        f"vs f32 2048^2 matmul {peak:.1f} GFLOP/s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  _cli.run(main)
