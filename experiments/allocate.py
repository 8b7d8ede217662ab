"""Mixed precision under a bits-per-weight budget: the knapsack allocator on a real model.

  python experiments/allocate.py --budget 3.5 [--budget 3.0 ...] [--candidates gptq:3:128 gptq+wlorc:3:128:8 ...]
      [--seeds 0 1 2] [--calib-tokens F.npy] [--text-file F] [--no-baseline] --json OUT [--md F]

For each calibration seed: the Hessians of every block linear are captured once on the
float model, every candidate is measured on every linear from them (exact stored bits,
relative output error), and ``lqx.quant.allocate.solve`` picks one candidate per linear
minimizing the size-weighted error within each budget. The recipe is then applied by
``lqx.quantize`` (block-sequential GPTQ as usual) and evaluated on the held-out works (or
``--text-file``). With the baseline on (default), uniform GPTQ g128 at the widest whole
bit width that fits the budget is run on the same windows. Candidates are
``method:bits:group_size[:rank]`` (rank for ``+lorc``/``+wlorc`` methods). The JSON holds,
per budget and seed, ``bits_per_weight`` (realized), ``promised_bits_per_weight``,
``ppl_fp``, ``ppl_q`` and the chosen candidate per linear.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp

from lqx import data, evaluate, io, recipe
from lqx.quant import allocate as alloc

if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402

DEFAULT_CANDIDATES = ("gptq:2:128", "gptq:3:128", "gptq:3:64", "gptq:4:128", "gptq+wlorc:2:128:16",
                      "gptq+wlorc:3:128:8")


def candidate(text: str):
  """``method:bits:group[:rank]`` -> (label, method config); raises UsageError naming the argument."""
  parts = text.split(":")
  try:
    name, bits, g = parts[0], int(parts[1]), int(parts[2])
    options = {"rank": int(parts[3])} if len(parts) == 4 else {}
    if len(parts) not in (3, 4) or ("+" in name) != bool(options):
      raise ValueError
    return text, recipe.make_method(name, bits=bits, group_size=g, **options)
  except (ValueError, IndexError) as e:
    detail = f" ({e})" if str(e) else ""
    raise _cli.UsageError(f"argument --candidates: {text!r} is not method:bits:group_size[:rank] with a "
                          f"registered method (rank only for +lorc/+wlorc){detail}") from None


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
    ppls = [r["ppl_q"] for r in sorted(rs, key=lambda r: r["seed"])]
    rows.append({"budget": b, "recipe": name, "ppls": ppls, "ppl_mean": statistics.fmean(ppls),
                 "ppl_sd": statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
                 "bits_per_weight": statistics.fmean(r["bits_per_weight"] for r in rs)})
  return rows


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--model", type=_cli.model, default="smollm2-135m",
                  help="smollm2-135m, a .gguf file or a Hugging Face folder")
  ap.add_argument("--budget", type=budget, nargs="+", required=True, help="bits per weight over the block linears")
  ap.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES),
                  help="options per linear, method:bits:group_size[:rank]")
  ap.add_argument("--seeds", type=_cli.nonneg_int, nargs="+", default=[0], help="calibration seeds")
  ap.add_argument("--calib-samples", type=_cli.positive_int, default=32, help="calibration windows")
  ap.add_argument("--calib-seq-len", type=_cli.seq_len, default=512, help="tokens per calibration window")
  ap.add_argument("--calib-tokens", type=_cli.existing_file, help="exact (N, T) int32 calibration windows (.npy)")
  ap.add_argument("--text-file", type=_cli.existing_file, help="evaluation text (default: held-out works)")
  ap.add_argument("--eval-tokens", type=_cli.int_at_least(512, "an int >= 512 (one window of 512 tokens)"),
                  default=16384, help="held-out tokens evaluated")
  ap.add_argument("--blocks", type=_cli.positive_int, default=None, help="only the first N blocks (smoke runs)")
  ap.add_argument("--no-baseline", action="store_true", help="skip uniform GPTQ g128 at the budget's bit width")
  ap.add_argument("--json", type=_cli.output_file, required=True, help="write runs, plans and summary here")
  ap.add_argument("--md", type=_cli.output_file, help="write the summary table here")
  args = ap.parse_args(argv)
  cands = dict(candidate(c) for c in args.candidates)

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

  def save() -> dict:
    out = {"model": str(args.model), "candidates": list(cands), "ppl_fp": ppl_fp, "eval_tokens": args.eval_tokens,
           "runs": runs, "summary": summarize(runs)}
    Path(args.json).write_text(json.dumps(out, indent=1))
    if args.md:
      Path(args.md).write_text(markdown(out["summary"], ppl_fp) + "\n")
    return out

  for seed in args.seeds:
    if args.calib_tokens:
      calib = data.load_calibration_tokens(args.calib_tokens, vocab_size=config.vocab_size)
    else:
      calib = data.sample_windows(train, args.calib_samples, args.calib_seq_len, seed)
    measured = alloc.measure(config, params, calib, cands, paths=paths, progress=False)  # once per seed
    print(f"seed {seed}: {len(cands)} candidates measured on {len(measured.targets)} linears in "
          f"{measured.seconds:.0f} s", flush=True)
    for b in args.budget:
      t = time.perf_counter()
      rules, plan = alloc.plan(measured, b)
      plan_s = measured.seconds + time.perf_counter() - t
      qparams, report = recipe.quantize(config, params, rules, calib, progress=False)
      chosen = {path: layer["label"] for path, layer in plan["layers"].items()}
      runs.append({"budget": b, "recipe": "allocator", "seed": seed, "calib_sha256": data.tokens_sha256(calib),
                   "bits_per_weight": report.bits_per_weight, "promised_bits_per_weight": plan["bits_per_weight"],
                   "ppl_fp": ppl_fp, "ppl_q": ppl(qparams), "plan_seconds": plan_s,
                   "quantize_seconds": report.seconds, "counts": dict(Counter(chosen.values())), "chosen": chosen})
      r = runs[-1]
      print(f"budget {b} seed {seed}: allocator {r['bits_per_weight']:.3f} bits/weight (promised "
            f"{r['promised_bits_per_weight']:.3f}), ppl {r['ppl_q']:.2f}; {r['counts']}", flush=True)
      save()
      width = int(b)
      if not args.no_baseline and width >= 2 and not any(
          x["recipe"] == f"gptq w{width} g128" and x["seed"] == seed for x in runs):
        method = recipe.make_method("gptq", bits=width, group_size=128)
        qparams, report = recipe.quantize(config, params, (recipe.Rule(paths, method),), calib, progress=False)
        runs.append({"budget": b, "recipe": f"gptq w{width} g128", "seed": seed,
                     "bits_per_weight": report.bits_per_weight, "ppl_fp": ppl_fp, "ppl_q": ppl(qparams),
                     "quantize_seconds": report.seconds})
        print(f"budget {b} seed {seed}: uniform GPTQ w{width} g128 {report.bits_per_weight:.3f} bits/weight, "
              f"ppl {runs[-1]['ppl_q']:.2f}", flush=True)
        save()
  out = save()
  print(markdown(out["summary"], ppl_fp))
  return out


if __name__ == "__main__":
  _cli.run(main)
