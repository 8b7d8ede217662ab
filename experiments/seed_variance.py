"""Held-out perplexity over calibration seeds: mean and standard deviation per method and setting.

  python experiments/seed_variance.py [--settings 3:128 3:64 4:128] [--seeds 0 1 2]
      [--methods rtn gptq adadim-gptq] [--pipelines true-sequential reference]
      [--scale-dtypes float16 float32] [--from-parity results/gptq_parity.json]
      [--from-pareto results/pareto.json]
      [--json seed_variance.json [--resume]] [--md seed_variance.md]

Each seed draws its own 32 x 512 calibration windows from the training works (lqx's
sampler); every run is evaluated on the same first ``--eval-tokens`` held-out tokens.
GPTQ runs in each pipeline and scale dtype; AdaDim-GPTQ in the default pipeline with
float16 scales; RTN needs no calibration, so it runs once per setting. Runs already in
a ``gptq_parity.py`` JSON (same settings and seeds) are taken from it, not rerun; so are
the RTN, GPTQ and AdaDim-GPTQ runs of a ``pareto.py`` JSON (the same sampler, sizes and
evaluation, the default pipeline and float16 scales), which must match
``--calib-samples``, ``--calib-seq-len`` and ``--eval-tokens``.
Arguments are checked before any model loads; an error prints one ``error: ...``
line (``--debug``: the traceback).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from lqx import data, evaluate, io, recipe

if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402

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


def run_key(r: dict) -> tuple:
  """What makes two runs the same run: method, setting, pipeline, scale dtype and seed."""
  return r["method"], r["bits"], r["group_size"], r["pipeline"], r["scale_dtype"], r["seed"]


def merge_parity(paths: list[str]) -> list[dict]:
  """:func:`from_parity` over ``paths``; a run in several files (e.g. seeds rerun with more checks)
  counts once, the last file's."""
  merged = {}
  for path in paths:
    for r in from_parity(path):
      merged[run_key(r)] = r
  return list(merged.values())


def from_pareto(path: str, calib_samples: int, calib_seq_len: int, eval_tokens: int) -> list[dict]:
  """RTN, GPTQ and AdaDim-GPTQ runs of a pareto.py JSON as seed_variance runs (``source: pareto``)."""
  res = json.loads(Path(path).read_text())
  want = {"calib_samples": calib_samples, "calib_seq_len": calib_seq_len, "eval_tokens": eval_tokens}
  got = {k: res.get(k) for k in want}
  if got != want:
    raise _cli.UsageError(f"argument --from-pareto: {path} was run with {got}, this run uses {want}")
  return [{"method": r["config"], "bits": r["bits"], "group_size": res["group_size"],
           "pipeline": "-" if r["config"] == "rtn" else DEFAULT_PIPELINE, "scale_dtype": "float16",
           "seed": r["seed"], "ppl": r["ppl"], "source": "pareto"}
          for r in res["runs"] if r["config"] in ("rtn", "gptq", "adadim-gptq") and not r["options"]]


def parse_setting(text: str) -> str:
  """argparse type: ``bits:group_size``, bits in 2..8 and group_size a positive int or -1."""
  try:
    bits, g = (int(v) for v in text.split(":"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected bits:group_size (e.g. 3:128), got {text!r}") from None
  if not 2 <= bits <= 8 or (g != -1 and g < 1):
    raise argparse.ArgumentTypeError(f"expected bits in 2..8 and group_size > 0 or -1, got {text!r}")
  return text


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--model", type=_cli.model, default="smollm2-135m",
                  help="a named model, a .gguf file, or a Hugging Face folder")
  ap.add_argument("--settings", nargs="*", type=parse_setting, default=["3:128", "3:64", "4:128"],
                  help="bits:group_size (none: only summarize --from-parity)")
  ap.add_argument("--seeds", type=_cli.nonneg_int, nargs="+", default=[0, 1, 2], help="calibration seeds")
  ap.add_argument("--methods", nargs="+", choices=recipe.METHODS, default=["rtn", "gptq", "adadim-gptq"],
                  help="methods run at every setting")
  ap.add_argument("--pipelines", nargs="+", default=["true-sequential", "reference"],
                  choices=["true-sequential", "reference"], help="for GPTQ")
  ap.add_argument("--scale-dtypes", nargs="+", default=["float16", "float32"], choices=list(SCALE_DTYPES),
                  help="for GPTQ")
  ap.add_argument("--calib-samples", type=_cli.positive_int, default=32, help="calibration windows")
  ap.add_argument("--calib-seq-len", type=_cli.seq_len, default=512, help="tokens per calibration window")
  ap.add_argument("--eval-tokens", type=_cli.int_at_least(512, "an int >= 512 (one window of 512 tokens)"),
                  default=16384, help="held-out tokens evaluated (windows of 512)")
  ap.add_argument("--from-parity", nargs="*", type=_cli.existing_file, default=[],
                  help="gptq_parity.py JSONs whose runs to reuse (a run in several: the last file's)")
  ap.add_argument("--from-pareto", nargs="*", type=_cli.existing_file, default=[],
                  help="take RTN/GPTQ/AdaDim-GPTQ runs from these pareto.py JSON files instead of rerunning them")
  ap.add_argument("--json", type=_cli.output_file, help="write runs and summary here (rewritten after every run)")
  ap.add_argument("--resume", action="store_true", help="keep the runs already in --json (skip them)")
  ap.add_argument("--md", type=_cli.output_file, help="write the summary table here")
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
  runs = merge_parity(args.from_parity)
  if args.resume and args.json and Path(args.json).exists():  # keep this script's own earlier runs
    done = {run_key(r) for r in runs}  # a run the parity files also have counts once (theirs)
    runs += [r for r in json.loads(Path(args.json).read_text())["runs"]
             if "quantize_seconds" in r and run_key(r) not in done]

  done = {run_key(r) for r in runs}
  for p in args.from_pareto:
    runs += [r for r in from_pareto(p, args.calib_samples, args.calib_seq_len, args.eval_tokens)
             if run_key(r) not in done]
  done = {run_key(r) for r in runs}

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
  _cli.run(main)
