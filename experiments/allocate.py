"""Mixed precision under a bits-per-weight budget: the knapsack allocator on a real model.

  python experiments/allocate.py --budget 2.5 3.0 3.25 3.5 4.25 [--candidates gptq:3:128 squeezellm:4 ...]
      [--error fisher|hessian] [--seeds 0 1 2] [--calib-tokens F.npy] [--text-file F]
      [--no-baseline] [--from-pareto results/pareto.json] [--resume] [--merge F ...]
      --json OUT [--md F] [--plot F.png]

For each calibration seed: the statistics of every block linear are captured once on the
float model (Hessians; the diagonal Fisher when ``--error fisher`` or a candidate needs it),
every candidate is measured on every linear from them (exact stored bits and an error),
and ``lqx.quant.allocate.solve`` picks one candidate per linear minimizing the summed error
within each budget. ``--error fisher`` (default) sums ``sum F (W - Q)^2``, a second-order
estimate of the loss increase that is on one scale for every layer; ``--error hessian``
sums each layer's relative output error weighted by its size (``lqx.quant.allocate``). The
recipe is applied by ``lqx.quantize`` (block-sequential as usual, with the same Fisher) and
evaluated on the held-out works (or ``--text-file``).

Baselines (unless ``--no-baseline``): uniform GPTQ g128 and uniform SqueezeLLM (dense) at
the budget's whole bit width (``int(budget)``; SqueezeLLM W4 stores 4.375 bits per weight,
so it sits above a 4.25 budget), on the same windows. ``--from-pareto`` takes those runs
from a ``pareto.py`` JSON made with the same sampler, sizes and evaluation (checked,
including the float perplexity) instead of rerunning them.

Candidates are ``method:bits[:group_size][:rank][:key=value ...]`` (group size default 128;
rank for ``+lorc``/``+wlorc`` methods; ``key=value`` for method options, e.g.
``squeezellm:3:sensitive_frac=0.0005:outlier_frac=0.004``). The JSON holds, per budget and
seed, ``bits_per_weight`` (realized), ``promised_bits_per_weight``, ``ppl_fp``, ``ppl_q``
and the chosen candidate per linear. ``--resume`` keeps the runs already in ``--json``;
``--merge`` adds the runs of other allocate.py JSONs (e.g. seeds run in parallel).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp

from lqx import data, evaluate, io, plots, recipe, tree
from lqx.quant import fisher as fisher_lib
from lqx.quant import allocate as alloc

if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402

S045 = "sensitive_frac=0.0005:outlier_frac=0.004"  # P7's SqueezeLLM dense-and-sparse 0.45%
DEFAULT_CANDIDATES = ("gptq:2:128", "squeezellm:2", "squeezellm:3", f"squeezellm:3:{S045}",
                      "gptq:4:128", "squeezellm:4")


def _number(v: str):
  return int(v) if re.fullmatch(r"-?\d+", v) else float(v)


def candidate(text: str):
  """``method:bits[:group][:rank][:key=value ...]`` -> (label, method config); raises UsageError naming
  the argument."""
  parts = text.split(":")
  try:
    name, bits = parts[0], int(parts[1])
    plain = [p for p in parts[2:] if "=" not in p]
    options = {k: _number(v) for k, v in (p.split("=", 1) for p in parts[2:] if "=" in p)}
    if len(plain) > 2 or parts[2:] != plain + [p for p in parts[2:] if "=" in p]:
      raise ValueError("group size and rank come before key=value options")
    g = int(plain[0]) if plain else 128
    if len(plain) == 2:
      options["rank"] = int(plain[1])
    if ("+" in name) != ("rank" in options):
      raise ValueError("a rank is needed by, and only by, +lorc/+wlorc methods")
    return text, recipe.make_method(name, bits=bits, group_size=g, **options)
  except (ValueError, IndexError, TypeError) as e:
    detail = f" ({e})" if str(e) else ""
    raise _cli.UsageError(f"argument --candidates: {text!r} is not method:bits[:group_size][:rank][:key=value] "
                          f"with a registered method{detail}") from None


def budget(text: str) -> float:
  try:
    v = float(text)
  except ValueError:
    v = -1.0
  if not 1.0 <= v <= 16.0:
    raise _cli.UsageError(f"argument --budget: {text!r} is not a bits-per-weight budget in [1, 16]")
  return v


def markdown(rows: list[dict], ppl_fp: float) -> str:
  lines = [f"float: {ppl_fp:.2f}", "", "| budget | recipe | bits/weight | ppl per seed | mean ± sd | gap to float |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    per = ", ".join(f"{p:.1f}" for p in r["ppls"])
    ms = f"{r['ppl_mean']:.1f} ± {r['ppl_sd']:.1f}" if len(r["ppls"]) > 1 else f"{r['ppl_mean']:.1f} (one seed)"
    lines.append(f"| {r['budget']} | {r['recipe']} | {r['bits_per_weight']:.3f} | {per} | {ms} | "
                 f"{r['ppl_mean'] - ppl_fp:.1f} |")
  return "\n".join(lines)


def summarize(runs: list[dict]) -> list[dict]:
  groups: dict = {}
  for r in runs:
    groups.setdefault((r["budget"], r["recipe"]), []).append(r)
  rows = []
  for (b, name), rs in sorted(groups.items()):
    rs = sorted(rs, key=lambda r: r["seed"])
    ppls = [r["ppl_q"] for r in rs]
    rows.append({"budget": b, "recipe": name, "seeds": [r["seed"] for r in rs], "ppls": ppls,
                 "ppl_mean": statistics.fmean(ppls), "ppl_sd": statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
                 "bits_per_weight": statistics.fmean(r["bits_per_weight"] for r in rs)})
  return rows


def plot(rows: list[dict], path: str, ppl_fp: float) -> None:
  """Perplexity against realized bits per weight: the allocator per budget beside the uniform baselines."""
  pts = [{"family": r["recipe"].split(" w")[0], "bits": 0 if r["recipe"] == "allocator" else int(r["budget"]),
          "label": f"{r['budget']}" if r["recipe"] == "allocator" else r["recipe"].split(" ", 1)[1],
          "bits_per_weight": r["bits_per_weight"], "ppl_mean": r["ppl_mean"], "ppl_sd": r["ppl_sd"]}
         for r in rows]
  seen, uniq = set(), []
  for p in pts:  # a baseline appears once per budget sharing its width
    key = (p["family"], p["label"], round(p["bits_per_weight"], 6))
    if key not in seen:
      seen.add(key)
      uniq.append(p)
  plots.pareto(uniq, path, ppl_fp=ppl_fp, title="SmolLM2-135M: knapsack allocation vs uniform (mean ± sd over seeds)")


BASELINES = {"gptq": lambda w: (f"gptq w{w} g128", recipe.make_method("gptq", bits=w, group_size=128)),
             "squeezellm": lambda w: (f"squeezellm w{w}", recipe.make_method("squeezellm", bits=w))}


def from_pareto(path: str, args, ppl_fp: float) -> list[dict]:
  """Uniform GPTQ g128 / SqueezeLLM runs of a pareto.py JSON as baseline runs, one per budget they serve."""
  res = json.loads(Path(path).read_text())
  want = {"calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len, "eval_tokens": args.eval_tokens,
          "group_size": 128}
  got = {k: res.get(k) for k in want}
  if got != want or args.calib_tokens or args.text_file or args.blocks:
    raise _cli.UsageError(f"argument --from-pareto: {path} was run with {got} on the default windows and "
                          f"held-out text; this run uses {want}"
                          f"{' with --calib-tokens/--text-file/--blocks' if args.calib_tokens or args.text_file or args.blocks else ''}")
  if abs(res["ppl_fp"] - ppl_fp) > 1e-6 * ppl_fp:
    raise _cli.UsageError(f"argument --from-pareto: {path} has float perplexity {res['ppl_fp']:.6f}, this "
                          f"evaluation gives {ppl_fp:.6f}: not the same evaluation")
  out = []
  for r in res["runs"]:
    if r["config"] not in BASELINES or r["options"] or r["seed"] not in args.seeds:
      continue
    for b in args.budget:
      if int(b) == r["bits"]:
        out.append({"budget": b, "recipe": BASELINES[r["config"]](r["bits"])[0], "seed": r["seed"],
                    "bits_per_weight": r["bits_per_weight"], "ppl_fp": ppl_fp, "ppl_q": r["ppl"],
                    "quantize_seconds": r["quantize_seconds"], "source": str(path)})
  return out


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--model", type=_cli.model, default="smollm2-135m",
                  help="smollm2-135m, a .gguf file or a Hugging Face folder")
  ap.add_argument("--budget", type=budget, nargs="+", required=True, help="bits per weight over the block linears")
  ap.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES),
                  help="options per linear, method:bits[:group_size][:rank][:key=value ...]")
  ap.add_argument("--error", choices=alloc.ERRORS, default="fisher",
                  help="what the solver sums: Fisher-weighted error or size-weighted relative output error")
  ap.add_argument("--seeds", type=_cli.nonneg_int, nargs="+", default=[0], help="calibration seeds")
  ap.add_argument("--calib-samples", type=_cli.positive_int, default=32, help="calibration windows")
  ap.add_argument("--calib-seq-len", type=_cli.seq_len, default=512, help="tokens per calibration window")
  ap.add_argument("--calib-tokens", type=_cli.existing_file, help="exact (N, T) int32 calibration windows (.npy)")
  ap.add_argument("--text-file", type=_cli.existing_file, help="evaluation text (default: held-out works)")
  ap.add_argument("--eval-tokens", type=_cli.int_at_least(512, "an int >= 512 (one window of 512 tokens)"),
                  default=16384, help="held-out tokens evaluated")
  ap.add_argument("--blocks", type=_cli.positive_int, default=None, help="only the first N blocks (smoke runs)")
  ap.add_argument("--no-baseline", action="store_true", help="skip the uniform GPTQ g128 / SqueezeLLM baselines")
  ap.add_argument("--from-pareto", type=_cli.existing_file, help="take baseline runs from this pareto.py JSON")
  ap.add_argument("--json", type=_cli.output_file, required=True, help="write runs, plans and summary here")
  ap.add_argument("--resume", action="store_true", help="keep the runs already in --json (skip them)")
  ap.add_argument("--merge", type=_cli.existing_file, nargs="+", default=[],
                  help="add the runs of these allocate.py JSONs (same candidates and evaluation)")
  ap.add_argument("--md", type=_cli.output_file, help="write the summary table here")
  ap.add_argument("--plot", type=_cli.output_file, help="write the perplexity / bits-per-weight figure here")
  args = ap.parse_args(argv)
  cands = dict(candidate(c) for c in args.candidates)
  previous = []
  for f in ([args.json] if args.resume and Path(args.json).exists() else []) + args.merge:
    prev = json.loads(Path(f).read_text())
    if prev.get("candidates") != list(cands) or prev.get("eval_tokens") != args.eval_tokens:
      raise _cli.UsageError(f"{f} was run with other candidates or --eval-tokens ({prev.get('candidates')}, "
                            f"{prev.get('eval_tokens')}); it cannot be resumed or merged into this run")
    previous.append(prev)

  config, params = io.load_model(args.model)
  params = jax.tree.map(jnp.asarray, params)
  tok = io.load_tokenizer(args.model)
  if args.text_file:
    evaluation = data.tokenize(tok, Path(args.text_file).read_text(encoding="utf-8"))
  else:
    evaluation = data.tokenize(tok, data.load_text("heldout"))
  if len(evaluation) < 512:
    raise _cli.UsageError(f"argument --text-file: {args.text_file} has {len(evaluation)} tokens, fewer than "
                          f"one window of 512")
  train = data.tokenize(tok, data.load_text("train"))
  paths = _cli.first_blocks(recipe.BLOCK_LINEARS, args.blocks)

  def ppl(p) -> float:
    return evaluate.perplexity(config, p, evaluation, seq_len=512, max_tokens=args.eval_tokens, progress=False).ppl

  ppl_fp = ppl(params)
  runs = []
  for prev in previous:
    if abs(prev["ppl_fp"] - ppl_fp) > 1e-6 * ppl_fp:
      raise _cli.UsageError(f"a --resume/--merge file has float perplexity {prev['ppl_fp']:.6f}, this "
                            f"evaluation gives {ppl_fp:.6f}: not the same evaluation")
    runs += prev["runs"]
  if args.from_pareto and not args.no_baseline:
    runs += from_pareto(args.from_pareto, args, ppl_fp)
  unique = {}
  for r in runs:  # the first copy of a (budget, recipe, seed) wins
    unique.setdefault((r["budget"], r["recipe"], r["seed"]), r)
  runs = list(unique.values())

  def done(b, name, seed) -> bool:
    return any((x["budget"], x["recipe"], x["seed"]) == (b, name, seed) for x in runs)

  def save() -> dict:
    out = {"model": str(args.model), "candidates": list(cands), "error": args.error, "ppl_fp": ppl_fp,
           "eval_tokens": args.eval_tokens, "runs": runs, "summary": summarize(runs)}
    Path(args.json).write_text(json.dumps(out, indent=1))
    if args.md:
      Path(args.md).write_text(markdown(out["summary"], ppl_fp) + "\n")
    if args.plot:
      plot(out["summary"], args.plot, ppl_fp)
    return out

  for seed in args.seeds:
    todo = [b for b in args.budget if not done(b, "allocator", seed)]
    if args.calib_tokens:
      calib = data.load_calibration_tokens(args.calib_tokens, vocab_size=config.vocab_size)
    else:
      calib = data.sample_windows(train, args.calib_samples, args.calib_seq_len, seed)
    targets = [p for p in tree.paths(params) if re.fullmatch(paths, p)]
    needs_fisher = bool(todo) and (args.error == "fisher" or any("fisher" in m.stats for m in cands.values())) or (
        not args.no_baseline and any(not done(b, BASELINES["squeezellm"](int(b))[0], seed)
                                     for b in args.budget if int(b) >= 2))
    fisher = None
    if needs_fisher:
      t = time.perf_counter()
      fisher = jax.block_until_ready(fisher_lib.llama_fisher(config, params, calib, paths=targets, progress=False))
      print(f"seed {seed}: diagonal Fisher in {time.perf_counter() - t:.0f} s", flush=True)
    measured = None
    if todo:
      measured = alloc.measure(config, params, calib, cands, paths=paths, error=args.error, fisher=fisher,
                               progress=False)  # once per seed, for every budget
      print(f"seed {seed}: {len(cands)} candidates measured on {len(measured.targets)} linears in "
            f"{measured.seconds:.0f} s", flush=True)
    for b in args.budget:
      if b in todo:
        t = time.perf_counter()
        rules, plan = alloc.plan(measured, b)
        plan_s = measured.seconds + time.perf_counter() - t
        qparams, report = recipe.quantize(config, params, rules, calib, fisher=fisher, progress=False)
        chosen = {path: layer["label"] for path, layer in plan["layers"].items()}
        runs.append({"budget": b, "recipe": "allocator", "seed": seed, "calib_sha256": data.tokens_sha256(calib),
                     "error": args.error, "bits_per_weight": report.bits_per_weight,
                     "promised_bits_per_weight": plan["bits_per_weight"], "ppl_fp": ppl_fp, "ppl_q": ppl(qparams),
                     "plan_seconds": plan_s, "quantize_seconds": report.seconds,
                     "counts": dict(Counter(chosen.values())), "chosen": chosen})
        r = runs[-1]
        print(f"budget {b} seed {seed}: allocator {r['bits_per_weight']:.3f} bits/weight (promised "
              f"{r['promised_bits_per_weight']:.3f}), ppl {r['ppl_q']:.2f}; {r['counts']}", flush=True)
        save()
      width = int(b)
      for kind in ([] if args.no_baseline or width < 2 else BASELINES):
        name, method = BASELINES[kind](width)
        previous_run = next((x for x in runs if x["recipe"] == name and x["seed"] == seed and int(x["budget"]) == width),
                            None)
        if done(b, name, seed):
          continue
        if previous_run is None:
          qparams, report = recipe.quantize(config, params, (recipe.Rule(paths, method),), calib, fisher=fisher,
                                            progress=False)
          previous_run = {"bits_per_weight": report.bits_per_weight, "ppl_q": ppl(qparams),
                          "quantize_seconds": report.seconds}
        runs.append({"budget": b, "recipe": name, "seed": seed, "bits_per_weight": previous_run["bits_per_weight"],
                     "ppl_fp": ppl_fp, "ppl_q": previous_run["ppl_q"],
                     "quantize_seconds": previous_run["quantize_seconds"]})
        print(f"budget {b} seed {seed}: uniform {name} {runs[-1]['bits_per_weight']:.3f} bits/weight, "
              f"ppl {runs[-1]['ppl_q']:.2f}", flush=True)
        save()
  out = save()
  print(markdown(out["summary"], ppl_fp))
  return out


if __name__ == "__main__":
  _cli.run(main)
