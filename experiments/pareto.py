"""Held-out perplexity against bits per weight for every P7 method (the Pareto study).

  python experiments/pareto.py [--bits 3 4] [--seeds 0 1 2] [--configs gptq squeezellm ...]
      [--json pareto.json [--resume]] [--md pareto.md] [--plot pareto.png]

Each seed draws its own calibration windows from the training works (32 x 512 by
default, the sampler and sizes of ``seed_variance.py``); the diagonal Fisher of
SqueezeLLM is computed once per seed on those same windows and shared by its
configurations; every run is evaluated on the same first ``--eval-tokens`` held-out
tokens. Affine methods use per-OC groups of ``--group-size`` (128: GPTQ g128 is the
equal-bits baseline of SqueezeLLM's per-channel tables on SmolLM2); RTN needs no
calibration and runs once per width. Bits per weight count everything stored
(codes, scales, zeros, tables, sparse indices and values, low-rank factors).
``--resume`` keeps the runs already in ``--json``. Arguments are checked before the
model loads.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from lqx import data, evaluate, io, plots, recipe
from lqx.quant import fisher as fisher_lib

if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402

# label -> (registered method, options, family, point label); bits and group size are set per run.
CONFIGS = {
    "rtn": ("rtn", {}, "rtn", ""),
    "gptq": ("gptq", {}, "gptq", ""),
    "adadim-gptq": ("adadim-gptq", {}, "adadim-gptq", ""),
    "squeezellm": ("squeezellm", {}, "squeezellm", "dense"),
    "squeezellm-s0.05": ("squeezellm", {"sensitive_frac": 0.0005}, "squeezellm", "0.05%"),
    "squeezellm-s0.45": ("squeezellm", {"sensitive_frac": 0.0005, "outlier_frac": 0.004}, "squeezellm", "0.45%"),
    **{f"gptq+lorc-r{r}": ("gptq+lorc", {"rank": r}, "gptq+lorc (int8)", f"r{r}") for r in (4, 8, 16)},
    **{f"gptq+wlorc-r{r}": ("gptq+wlorc", {"rank": r}, "gptq+wlorc (int8)", f"r{r}") for r in (4, 8, 16)},
}


def summarize(runs: list[dict]) -> list[dict]:
  """One row per (config, bits): ppl per seed, mean, sd, bits per weight."""
  groups: dict = {}
  for r in runs:
    groups.setdefault((r["config"], r["bits"]), []).append(r)
  rows = []
  for (label, bits), rs in groups.items():
    rs = sorted(rs, key=lambda r: r["seed"])
    ppls = [r["ppl"] for r in rs]
    _, _, family, point = CONFIGS.get(label, (None, None, label, ""))
    rows.append({"config": label, "family": family, "label": point, "bits": bits, "seeds": [r["seed"] for r in rs],
                 "ppls": ppls, "ppl_mean": statistics.fmean(ppls),
                 "ppl_sd": statistics.stdev(ppls) if len(ppls) > 1 else 0.0, "n": len(ppls),
                 "bits_per_weight": statistics.fmean(r["bits_per_weight"] for r in rs),
                 "quantize_seconds": statistics.fmean(r["quantize_seconds"] for r in rs)})
  return sorted(rows, key=lambda r: (r["bits"], r["bits_per_weight"]))


def markdown(rows: list[dict], ppl_fp: float | None) -> str:
  lines = [f"float: {ppl_fp:.2f}" if ppl_fp else "",
           "| W | method | bits/weight | ppl per seed | mean ± sd | vs GPTQ g128 |", "|---|---|---|---|---|---|"]
  base = {r["bits"]: r["ppl_mean"] for r in rows if r["config"] == "gptq"}
  for r in rows:
    per = ", ".join(f"{p:.1f}" for p in r["ppls"])
    ms = f"{r['ppl_mean']:.1f} ± {r['ppl_sd']:.1f}" if r["n"] > 1 else f"{r['ppl_mean']:.1f} (one seed)"
    rel = f"{r['ppl_mean'] / base[r['bits']] - 1:+.1%}" if r["bits"] in base else "–"
    lines.append(f"| {r['bits']} | {r['config']} | {r['bits_per_weight']:.3f} | {per} | {ms} | {rel} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--model", type=_cli.model, default="smollm2-135m",
                  help="a named model, a .gguf file, or a Hugging Face folder")
  ap.add_argument("--bits", type=int, nargs="+", choices=range(2, 9), metavar="{2..8}", default=[3, 4])
  ap.add_argument("--group-size", type=_cli.group_size, default=128, help="per-OC groups of the affine methods")
  ap.add_argument("--seeds", type=_cli.nonneg_int, nargs="+", default=[0, 1, 2], help="calibration seeds")
  ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="what to run")
  ap.add_argument("--calib-samples", type=_cli.positive_int, default=32, help="calibration windows")
  ap.add_argument("--calib-seq-len", type=_cli.seq_len, default=512, help="tokens per calibration window")
  ap.add_argument("--eval-tokens", type=_cli.int_at_least(512, "an int >= 512 (one window of 512 tokens)"),
                  default=16384, help="held-out tokens evaluated (windows of 512)")
  ap.add_argument("--blocks", type=_cli.positive_int, default=None,
                  help="quantize only the first N blocks (quick runs; default: all)")
  ap.add_argument("--json", type=_cli.output_file, help="write runs and summary here (rewritten after every run)")
  ap.add_argument("--resume", action="store_true", help="keep the runs already in --json (skip them)")
  ap.add_argument("--md", type=_cli.output_file, help="write the summary table here")
  ap.add_argument("--plot", type=_cli.output_file, help="write the figure here (PNG)")
  args = ap.parse_args(argv)
  if args.resume and not args.json:
    ap.error("argument --resume: needs --json (the file whose runs to keep)")

  config, params = io.load_model(args.model)
  if args.calib_seq_len > config.max_seq_len:
    raise _cli.UsageError(f"argument --calib-seq-len: {args.calib_seq_len} exceeds the model's max_seq_len "
                          f"{config.max_seq_len}")
  params = jax.tree.map(jnp.asarray, params)
  tok = io.load_tokenizer(args.model)
  train = data.tokenize(tok, data.load_text("train"))
  heldout = data.tokenize(tok, data.load_text("heldout"))
  prev = json.loads(Path(args.json).read_text()) if args.resume and Path(args.json).exists() else {}
  runs = prev.get("runs", [])
  ppl_fp = prev.get("ppl_fp") or evaluate.perplexity(config, params, heldout, seq_len=512,
                                                      max_tokens=args.eval_tokens, progress=False).ppl
  done = {(r["config"], r["bits"], r["seed"]) for r in runs}
  blocks = _cli.first_blocks(recipe.BLOCK_LINEARS, args.blocks)

  def save() -> dict:
    out = {"model": str(args.model), "group_size": args.group_size, "calib_samples": args.calib_samples,
           "calib_seq_len": args.calib_seq_len, "eval_tokens": args.eval_tokens, "ppl_fp": ppl_fp,
           "runs": runs, "summary": summarize(runs)}
    if args.json:
      Path(args.json).write_text(json.dumps(out, indent=1))
    if args.md:
      Path(args.md).write_text(markdown(out["summary"], ppl_fp) + "\n")
    if args.plot and out["summary"]:
      plots.pareto(out["summary"], args.plot, ppl_fp=ppl_fp,
                   title=f"{args.model}: held-out perplexity vs bits per weight "
                         f"({args.calib_samples}x{args.calib_seq_len} calibration, seeds {sorted({r['seed'] for r in runs})})")
    return out

  for seed in args.seeds:
    calib = data.sample_windows(train, args.calib_samples, args.calib_seq_len, seed)
    fisher, fisher_seconds = None, 0.0
    for bits in args.bits:
      for label in args.configs:
        name, options, _, _ = CONFIGS[label]
        if (label, bits, seed) in done or (name == "rtn" and seed != args.seeds[0]):
          continue
        method = recipe.make_method(name, bits=bits, group_size=args.group_size, **options)
        if "fisher" in method.stats and fisher is None:
          t = time.perf_counter()
          paths = list(recipe.match((recipe.Rule(blocks, method),), params))
          fisher = jax.block_until_ready(fisher_lib.llama_fisher(config, params, calib, paths=paths, progress=False))
          fisher_seconds = time.perf_counter() - t
          print(f"seed {seed}: Fisher of {len(paths)} kernels on {calib.shape[0]} x {calib.shape[1]} "
                f"in {fisher_seconds:.0f} s", flush=True)
        qparams, report = recipe.quantize(config, params, (recipe.Rule(blocks, method),),
                                          None if not method.stats else calib, fisher=fisher, progress=False)
        ppl = evaluate.perplexity(config, qparams, heldout, seq_len=512, max_tokens=args.eval_tokens,
                                  progress=False).ppl
        bpw = report.bits_per_weight
        for s in (args.seeds if name == "rtn" else [seed]):  # RTN does not depend on the calibration seed
          runs.append({"config": label, "method": name, "method_name": method.name, "options": options,
                       "bits": bits, "group_size": args.group_size, "seed": s, "ppl": ppl, "bits_per_weight": bpw,
                       "quantize_seconds": report.seconds,
                       "fisher_seconds": fisher_seconds if "fisher" in method.stats else 0.0})
        print(f"W{bits} seed {seed} {label}: {bpw:.3f} bits/weight, ppl {ppl:.2f} ({report.seconds:.0f} s)",
              flush=True)
        save()
  out = save()
  print(markdown(out["summary"], ppl_fp))
  return out


if __name__ == "__main__":
  _cli.run(main)
