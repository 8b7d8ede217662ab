"""Held-out perplexity over calibration seeds: mean and standard deviation per method and setting.

  python experiments/seed_variance.py [--settings 3:128 3:64 4:128] [--seeds 0 1 2]
      [--methods rtn gptq adadim-gptq] [--pipelines true-sequential reference]
      [--scale-dtypes float16 float32] [--from-parity results/gptq_parity.json]
      [--json results/seed_variance.json [--resume]] [--md results/seed_variance.md]

Each seed draws its own 32 x 512 calibration windows from the training works (lqx's
sampler); every run is evaluated on the same first ``--eval-tokens`` held-out tokens.
GPTQ runs in each pipeline and scale dtype; AdaDim-GPTQ in the default pipeline with
float16 scales; RTN needs no calibration, so it runs once per setting. Runs already in
a ``gptq_parity.py`` JSON (same settings and seeds) are taken from it, not rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp

from lqx import data, evaluate, io, recipe

SCALE_DTYPES = {"float16": jnp.float16, "float32": jnp.float32}
DEFAULT_PIPELINE = "true-sequential" if recipe.DEFAULT_TRUE_SEQUENTIAL else "reference"


def summarize(runs: list[dict]) -> list[dict]:
  """One row per (method, bits, group_size, pipeline, scale_dtype): ppl per seed, mean, sd."""
  groups: dict = {}
  for r in runs:
    key = (r["method"], r["bits"], r["group_size"], r["pipeline"], r["scale_dtype"])
    groups.setdefault(key, []).append(r)
  rows = []
  for (method, bits, g, pipeline, sd), rs in groups.items():
    ppls = [r["ppl"] for r in sorted(rs, key=lambda r: r["seed"])]
    rows.append({"method": method, "bits": bits, "group_size": g, "pipeline": pipeline, "scale_dtype": sd,
                 "seeds": [r["seed"] for r in sorted(rs, key=lambda r: r["seed"])], "ppls": ppls,
                 "ppl_mean": statistics.fmean(ppls), "ppl_sd": statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
                 "n": len(ppls),
                 "default": pipeline in (DEFAULT_PIPELINE, "-") and sd == "float16"})
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| setting | method | pipeline | scales | ppl per seed | mean ± sd | sd / mean |",
           "|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (-r["bits"], r["group_size"], r["method"], r["pipeline"], r["scale_dtype"])):
    per = ", ".join(f"{p:.1f}" for p in r["ppls"])
    if r["n"] < 2:
      lines.append(f"| W{r['bits']} g{r['group_size']} | {r['method']} | {r['pipeline']} | {r['scale_dtype']} | "
                   f"{per} | (one seed) | – |")
      continue
    cv = r["ppl_sd"] / r["ppl_mean"]
    lines.append(f"| W{r['bits']} g{r['group_size']} | {r['method']} | {r['pipeline']} | {r['scale_dtype']} | "
                 f"{per} | {r['ppl_mean']:.1f} ± {r['ppl_sd']:.1f} | {cv:.0%}{' ⚠' if cv >= 0.1 else ''} |")
  return "\n".join(lines)


def from_parity(path: str) -> list[dict]:
  """Runs of a gptq_parity.py JSON as seed_variance runs (the reference's own included)."""
  res = json.loads(Path(path).read_text())
  runs = []
  for run in res["runs"]:
    base = {"bits": run["bits"], "group_size": res["group_size"], "seed": run["seed"]}
    runs.append({**base, "method": "gptq (IST-DASLab reference)", "pipeline": "reference", "scale_dtype": "float32",
                 "ppl": run["reference"]["ppl"]})
    for key, v in run.items():
      if key.startswith("lqx_"):
        runs.append({**base, "method": "gptq", "pipeline": v["mode"], "scale_dtype": v["scale_dtype"],
                     "ppl": v["ppl"]})
  return runs


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--settings", nargs="*", default=["3:128", "3:64", "4:128"],
                  help="bits:group_size (none: only summarize --from-parity)")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "adadim-gptq"])
  ap.add_argument("--pipelines", nargs="+", default=["true-sequential", "reference"],
                  choices=["true-sequential", "reference"], help="for GPTQ")
  ap.add_argument("--scale-dtypes", nargs="+", default=["float16", "float32"], choices=list(SCALE_DTYPES),
                  help="for GPTQ")
  ap.add_argument("--calib-samples", type=int, default=32)
  ap.add_argument("--calib-seq-len", type=int, default=512)
  ap.add_argument("--eval-tokens", type=int, default=16384)
  ap.add_argument("--from-parity", nargs="*", default=[], help="gptq_parity.py JSONs whose runs to reuse")
  ap.add_argument("--json", help="write runs and summary here (rewritten after every run)")
  ap.add_argument("--resume", action="store_true", help="keep the runs already in --json (skip them)")
  ap.add_argument("--md", help="write the summary table here")
  args = ap.parse_args(argv)

  config, params = io.load_model(args.model)
  params = jax.tree.map(jnp.asarray, params)
  tok = io.load_tokenizer(args.model)
  train = data.tokenize(tok, data.load_text("train"))
  heldout = data.tokenize(tok, data.load_text("heldout"))
  runs = [r for p in args.from_parity for r in from_parity(p)]
  if args.resume and args.json and Path(args.json).exists():  # keep this script's own earlier runs
    runs += [r for r in json.loads(Path(args.json).read_text())["runs"] if "quantize_seconds" in r]
  done = {(r["method"], r["bits"], r["group_size"], r["pipeline"], r["scale_dtype"], r["seed"]) for r in runs}

  def save():
    out = {"calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
           "eval_tokens": args.eval_tokens, "default_pipeline": DEFAULT_PIPELINE, "runs": runs,
           "summary": summarize(runs)}
    if args.json:
      Path(args.json).write_text(json.dumps(out, indent=1))
    if args.md:
      Path(args.md).write_text(markdown(out["summary"]) + "\n")
    return out

  for setting in args.settings:
    bits, g = (int(v) for v in setting.split(":"))
    for seed in args.seeds:
      calib = data.sample_windows(train, args.calib_samples, args.calib_seq_len, seed)
      jobs = []
      for name in args.methods:
        if name == "rtn":
          if seed == args.seeds[0]:
            jobs.append((name, "-", "float16"))
        elif name == "gptq":
          jobs += [(name, p, sd) for p in args.pipelines for sd in args.scale_dtypes]
        else:
          jobs.append((name, DEFAULT_PIPELINE, "float16"))
      for name, pipeline, sd in jobs:
        if (name, bits, g, pipeline, sd, seed) in done:
          continue
        method = recipe.make_method(name, bits=bits, group_size=g, scale_dtype=SCALE_DTYPES[sd])
        qparams, report = recipe.quantize(config, params, recipe.default_recipe(method),
                                          None if name == "rtn" else calib,
                                          true_sequential=pipeline == "true-sequential", progress=False)
        ppl = evaluate.perplexity(config, qparams, heldout, seq_len=512, max_tokens=args.eval_tokens,
                                  progress=False).ppl
        seeds = args.seeds if name == "rtn" else [seed]
        for s in seeds:  # RTN does not depend on the calibration seed
          runs.append({"method": name, "bits": bits, "group_size": g, "pipeline": pipeline, "scale_dtype": sd,
                       "seed": s, "ppl": ppl, "quantize_seconds": report.seconds})
        print(f"W{bits} g{g} seed {seed} {name} {pipeline} {sd}: ppl {ppl:.2f} ({report.seconds:.0f} s)", flush=True)
        save()
  out = save()
  print(markdown(out["summary"]))
  return out


if __name__ == "__main__":
  main()
