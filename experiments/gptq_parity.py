"""End-to-end GPTQ parity: the reference pipeline on PyTorch vs lqx, on identical calibration tokens.

  python experiments/gptq_parity.py --bits 3 4 --group-size 128 --seeds 0 1 2 [--json OUT]
      [--lqx-modes reference true-sequential] [--scale-dtypes float32 float16]
      [--reference-dir DIR]  # run IST-DASLab/gptq's own classes from a local copy

For each setting and calibration seed, the calibration windows are sampled once
with lqx's sampler and handed, as the same token ids, to

* the reference side (``experiments/gptq_reference.py``): reference GPTQ's
  ``llama_sequential`` on transformers' ``LlamaForCausalLM`` in float32, float32
  scales, all Hessians of a block from one forward;
* lqx, in each ``--lqx-modes`` pipeline and ``--scale-dtypes``.

It reports (a) given the reference's own Hessian of each layer, the fraction of
identical codes lqx's solver picks (per layer; the minimum over the model is
the number to read), with both solvers in float32 as run, and with both in
float64 (the transcription's ``ref_solve`` and lqx's solver under
``jax.enable_x64``, scales rounded to float32 on both sides), which takes
float32 rounding out of the comparison; (b) end to end, identical codes per layer, per-layer
relative proxy losses ``tr(dW^T H dW) / tr(W^T H W)`` (each side on its own
Hessian), held-out perplexity of both models with one evaluator, and wall time.
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

sys.path.insert(0, str(Path(__file__).parent))
import _cli  # noqa: E402
from bench_forward import torch_model  # noqa: E402

from lqx import data, evaluate, io, recipe  # noqa: E402
from lqx.tree import get as _get, replace as _set  # noqa: E402
from lqx.quant.gptq import GPTQConfig, gptq_quantize  # noqa: E402

SCALE_DTYPES = {"float32": jnp.float32, "float16": jnp.float16}


def _gr():
  """``experiments/gptq_reference.py``, imported on first use (it imports torch, slow to load)."""
  import gptq_reference

  return gptq_reference


def relative_proxy(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
  """tr(D^T H D) / tr(W^T H W), D = W - Q, for (IC, OC) kernels, in float64."""
  w, q, h = (np.asarray(a, np.float64) for a in (w, q, h))
  d = w - q
  return float(np.sum(d * (h @ d)) / max(np.sum(w * (h @ w)), 1e-300))


def run_reference(config, params, calib, bits, group_size, *, solver, n_blocks=None, check_solver=True,
                  progress=True, **pipeline_kw):
  """The reference pipeline; returns (float params with the reference's quantized kernels, per-layer dict, s)."""
  import torch
  model = torch_model(config, params)
  layers = {}

  def on_layer(i, path, w, h, q, codes):
    wk, hk = w.numpy().T, h.numpy()
    rec = {"ref_proxy": relative_proxy(wk, q.numpy().T, hk)}
    if check_solver and codes is not None:  # (a) lqx's solver on the reference's own Hessian
      qa, _ = gptq_quantize(jnp.asarray(wk), jnp.asarray(hk),
                            GPTQConfig(bits=bits, group_size=group_size, scale_dtype=jnp.float32), name=path)
      lqx_codes = np.asarray(qa.codes())
      rec["solver_same_codes"] = float(np.mean(lqx_codes == codes.numpy().T))
      # Both solvers in float64 on the same H (scales rounded to float32 storage on both sides): the
      # same algorithm must then pick the same codes, with float32's rounding out of the comparison.
      _, c64 = _gr().ref_solve(w, h, bits, group_size, dtype=torch.float64, scale_dtype=torch.float32)
      c64 = c64.numpy().T
      with jax.enable_x64(True):
        qa64, _ = gptq_quantize(jnp.asarray(wk, jnp.float64), jnp.asarray(hk, jnp.float64),
                                GPTQConfig(bits=bits, group_size=group_size, scale_dtype=jnp.float32), name=path)
        lqx64 = np.asarray(qa64.codes())
      rec["f64_solver_same_codes"] = float(np.mean(lqx64 == c64))
      if rec["solver_same_codes"] < 0.999:  # how far is each float32 solve from the float64 one?
        rec["f64_same_codes_lqx"] = float(np.mean(lqx_codes == c64))
        rec["f64_same_codes_reference"] = float(np.mean(codes.numpy().T == c64))
    layers[path] = rec

  t = time.perf_counter()
  codes = _gr().ref_pipeline(model, calib, bits, group_size, solver=solver, n_blocks=n_blocks, on_layer=on_layer,
                          progress=progress, **pipeline_kw)
  seconds = time.perf_counter() - t
  qparams = params
  for path in codes:
    i, rest = path.split("/", 1)
    mod = dict(model.model.layers[int(i.split("_")[1])].named_modules())[
        {v: k for k, v in _gr().LQX_NAME.items()}[rest.rsplit("/", 1)[0]]]
    qparams = _set(qparams, path, jnp.asarray(mod.weight.data.numpy().T))
    layers[path]["codes"] = codes[path]
  del torch
  return qparams, layers, seconds


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--model", type=_cli.model, default="smollm2-135m",
                  help="a named model, a .gguf file, or a Hugging Face folder")
  ap.add_argument("--bits", type=int, nargs="+", choices=range(2, 9), metavar="{2..8}", default=[3, 4],
                  help="bits per weight, one run each")
  ap.add_argument("--group-size", type=_cli.group_size, default=128, help="-1: per channel")
  ap.add_argument("--seeds", type=_cli.nonneg_int, nargs="+", default=[0, 1, 2], help="calibration seeds")
  ap.add_argument("--calib-samples", type=_cli.positive_int, default=32, help="calibration windows")
  ap.add_argument("--calib-seq-len", type=_cli.seq_len, default=512, help="tokens per calibration window")
  ap.add_argument("--eval-tokens", type=_cli.nonneg_int, default=16384, help="held-out tokens evaluated (0: all)")
  ap.add_argument("--eval-seq-len", type=_cli.seq_len, default=512, help="tokens per evaluation window")
  ap.add_argument("--lqx-modes", nargs="+", default=["reference", "true-sequential"],
                  choices=["reference", "true-sequential"], help="lqx calibration pipelines")
  ap.add_argument("--scale-dtypes", nargs="+", default=["float32"], choices=list(SCALE_DTYPES),
                  help="lqx scale storage dtypes")
  ap.add_argument("--reference-dir", type=_cli.existing_dir,
                  help="a local copy of IST-DASLab/gptq: run its GPTQ/Quantizer classes")
  ap.add_argument("--n-blocks", type=_cli.positive_int, help="quantize only the first N blocks (both sides)")
  ap.add_argument("--no-solver-check", action="store_true", help="skip (a), lqx's solver on the reference's H")
  ap.add_argument("--reference-variants", action="store_true",
                  help="also run the reference with rounding-only changes (8 sequences per forward; float64 "
                       "Hessian sums) on --variant-seeds and evaluate them: how far the reference moves under float "
                       "rounding alone")
  ap.add_argument("--variants", nargs="+", choices=["batch8", "float64_hessian"], default=["batch8", "float64_hessian"],
                  help="with --reference-variants: which rounding-only changes to run")
  ap.add_argument("--variant-seeds", type=_cli.nonneg_int, nargs="+",
                  help="with --reference-variants: the seeds to run them on (default: the first of --seeds)")
  ap.add_argument("--json", type=_cli.output_file, help="write the results here")
  args = ap.parse_args(argv)
  variant_seeds = args.seeds[:1] if args.variant_seeds is None else args.variant_seeds
  if args.reference_variants and not set(variant_seeds) <= set(args.seeds):
    ap.error(f"argument --variant-seeds: {sorted(set(variant_seeds) - set(args.seeds))} not in --seeds")
  if args.eval_tokens and args.eval_tokens < args.eval_seq_len:
    ap.error(f"argument --eval-tokens: {args.eval_tokens} is less than one window of --eval-seq-len "
             f"{args.eval_seq_len} (0: all tokens)")

  import torch
  torch.set_num_threads(2)
  solver = _gr().official_solver(args.reference_dir) if args.reference_dir else _gr().ref_solve
  config, params = io.load_model(args.model)
  for option, n in (("--calib-seq-len", args.calib_seq_len), ("--eval-seq-len", args.eval_seq_len)):
    if n > config.max_seq_len:
      raise _cli.UsageError(f"argument {option}: {n} exceeds the model's max_seq_len {config.max_seq_len}")
  params = jax.tree.map(jnp.asarray, params)
  tokenizer = io.load_tokenizer(args.model)
  train = data.tokenize(tokenizer, data.load_text("train"))
  heldout = data.tokenize(tokenizer, data.load_text("heldout"))
  ppl = lambda p: evaluate.perplexity(config, p, heldout, seq_len=args.eval_seq_len,  # noqa: E731
                                      max_tokens=args.eval_tokens or None, progress=False).ppl
  block_re = None if args.n_blocks is None else "|".join(str(i) for i in range(args.n_blocks))
  pattern = recipe.BLOCK_LINEARS if block_re is None else rf"layers_({block_re})/(attn|mlp)/\w+_proj/kernel"
  results = {"model": args.model, "group_size": args.group_size, "calib_samples": args.calib_samples,
             "calib_seq_len": args.calib_seq_len, "eval_tokens": args.eval_tokens, "runs": []}
  print(f"float ppl {ppl(params):.3f}")
  for bits in args.bits:
    for seed in args.seeds:
      calib = data.sample_windows(train, args.calib_samples, args.calib_seq_len, seed)
      run = {"bits": bits, "seed": seed, "calibration_sha256": data.tokens_sha256(calib)}
      ref_params, ref_layers, ref_s = run_reference(config, params, calib, bits, args.group_size, solver=solver,
                                                    n_blocks=args.n_blocks, check_solver=not args.no_solver_check)
      run["reference"] = {"ppl": ppl(ref_params), "seconds": ref_s,
                          "proxy_sum": sum(l["ref_proxy"] for l in ref_layers.values())}
      same = [l["solver_same_codes"] for l in ref_layers.values() if "solver_same_codes" in l]
      if same:
        worst = min(ref_layers, key=lambda k: ref_layers[k].get("solver_same_codes", 1.0))
        below = {k: {n: v for n, v in l.items() if n != "codes"} for k, l in ref_layers.items()
                 if l.get("solver_same_codes", 1.0) < 0.999}
        run["solver_on_reference_hessian"] = {
            "min_same_codes": min(same), "mean_same_codes": float(np.mean(same)), "worst_layer": worst,
            "layers_below_99.9%": len(below), "layers": len(same), "below": below}
      print(f"W{bits} g{args.group_size} seed {seed}: reference ppl {run['reference']['ppl']:.3f} "
            f"({ref_s:.0f} s)" + (f"; lqx solver on the reference's H: identical codes min "
                                  f"{min(same):.5f} mean {np.mean(same):.5f} ({worst})" if same else ""),
            flush=True)
      same64 = {k: l["f64_solver_same_codes"] for k, l in ref_layers.items() if "f64_solver_same_codes" in l}
      if same64:
        worst64 = min(same64, key=same64.get)
        run["solver_on_reference_hessian_float64"] = {
            "min_same_codes": same64[worst64], "mean_same_codes": float(np.mean(list(same64.values()))),
            "worst_layer": worst64, "layers_below_99.9%": sum(v < 0.999 for v in same64.values()),
            "layers": len(same64), "by_layer": same64}
        print(f"  both solvers in float64 on the reference's H: identical codes min {same64[worst64]:.5f} "
              f"mean {np.mean(list(same64.values())):.5f} ({worst64}), "
              f"{sum(v < 0.999 for v in same64.values())} layers below 99.9%", flush=True)
      for k, l in run.get("solver_on_reference_hessian", {}).get("below", {}).items():
        print(f"  {k}: lqx vs reference {l['solver_same_codes']:.5f}; against a float64 solve: "
              f"lqx {l['f64_same_codes_lqx']:.5f}, reference {l['f64_same_codes_reference']:.5f}")
      if args.reference_variants and seed in variant_seeds:
        variants = {"batch8": dict(batch_size=8), "float64_hessian": dict(hessian_dtype=torch.float64)}
        for label, kw in ((v, variants[v]) for v in args.variants):
          var_params, _, var_s = run_reference(config, params, calib, bits, args.group_size, solver=solver,
                                               n_blocks=args.n_blocks, check_solver=False, **kw)
          run[f"reference_{label}"] = {"ppl": ppl(var_params), "seconds": var_s}
          print(f"  reference, {label}: ppl {run[f'reference_{label}']['ppl']:.3f}", flush=True)
      for mode in args.lqx_modes:
        for sd in args.scale_dtypes:
          method = GPTQConfig(bits=bits, group_size=args.group_size, scale_dtype=SCALE_DTYPES[sd])
          t = time.perf_counter()
          qparams, report = recipe.quantize(config, params, [recipe.Rule(pattern, method)], calib,
                                            true_sequential=mode == "true-sequential", progress=False)
          seconds = time.perf_counter() - t
          same_e2e = {l.name: float(np.mean(np.asarray(_get(qparams, l.name).codes()) ==
                                            ref_layers[l.name]["codes"])) for l in report.layers}
          proxy_ratio = [l.error / max(ref_layers[l.name]["ref_proxy"], 1e-30) for l in report.layers]
          res = {"mode": mode, "scale_dtype": sd, "ppl": ppl(qparams), "seconds": seconds,
                 "timings": report.timings, "proxy_sum": sum(l.error for l in report.layers),
                 "proxy_ratio_median": float(np.median(proxy_ratio)),
                 "proxy_ratio_min": float(np.min(proxy_ratio)), "proxy_ratio_max": float(np.max(proxy_ratio)),
                 "e2e_same_codes_mean": float(np.mean(list(same_e2e.values()))),
                 "e2e_same_codes_by_layer": same_e2e}
          run[f"lqx_{mode}_{sd}"] = res
          print(f"  lqx {mode:15s} {sd}: ppl {res['ppl']:.3f} ({seconds:.0f} s: "
                + ", ".join(f"{k} {v:.1f}" for k, v in report.timings.items())
                + f"); same codes as the reference end to end {res['e2e_same_codes_mean']:.4f}; "
                f"proxy loss / reference's median {res['proxy_ratio_median']:.4f} "
                f"[{res['proxy_ratio_min']:.3f}, {res['proxy_ratio_max']:.3f}]", flush=True)
      results["runs"].append(run)
      if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
  return results


if __name__ == "__main__":
  _cli.run(main)
