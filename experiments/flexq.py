"""FlexQ-style W6A16 / W6A8 / W6A6, FlexQ's fixed A8 rule and lqx's measured A8 choice: held-out perplexity.

  python experiments/flexq.py [--model smollm2-135m] [--eval-tokens 16384] [--seeds 0 1 2]
      [--calib-samples 4] [--calib-seq-len 256] [--cost macs] [--json F] [--md F] [--plot F.png]

Weights: 6-bit symmetric groups of 128 input channels on every block linear, in two grids:
FlexQ's (scale = absmax / 31, codes in [-31, 31]: ``activations.absmax_quantize``) and
lqx's ``rtn`` with ``sym=True`` (reference GPTQ's grid, scale = 2 absmax / 63). Activations:
dynamic symmetric per-token quantization in groups of 128 input channels
(``lqx.formats.ActQuant``; short last groups at 576 inputs, where FlexQ's code would run
groups across tokens), at 8 bits, 6 bits, FlexQ's fixed rule (8 bits into ``down_proj``,
6 elsewhere), or lqx's measured choice (``lqx.quant.act_sensitivity``): each block input's
calibration loss increase from A8 to A6 (the rest at A8), measured on windows sampled from
the TRAINING works (``--seed``s), then the A8 set minimizing the summed increase at the
rule's activation-bit cost (``--cost``: per-token MACs, or input width), by the exact
knapsack. Perplexity is on the held-out works. Attention matmuls, the embedding and the head
stay in float. Everything but the measured choice is data-free (no seed spread).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lqx import data, evaluate, io, quant, recipe, tree
from lqx.quant import act_sensitivity, activations

if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402

GRIDS = ("flexq", "rtn-sym")
RULE = "FlexQ rule (A8 into down_proj, A6 elsewhere)"
MEASURED = "lqx measured (A8 where A6 hurts most, at the rule's cost)"
TAPS = ("attn_in", "o_in", "mlp_in", "down_in")
TAP_LABELS = ("q/k/v", "o", "gate/up", "down")


def weights(params: dict, grid: str, paths: str) -> dict:
  """Every block linear at 6 bits, symmetric g128, in ``grid`` ("flexq" or "rtn-sym")."""
  if grid == "rtn-sym":
    method = quant.make("rtn", bits=6, group_size=128, sym=True)
    return recipe.quantize(None, params, (recipe.Rule(paths, method),), progress=False)[0]
  out = params
  for p in tree.paths(params):
    if re.fullmatch(paths, p):
      out = tree.replace(out, p, activations.absmax_quantize(tree.get(params, p), 6, 128))
  return out


def plot_sensitivity(runs: list[dict], n_layers: int, path: str, title: str) -> None:
  """Heatmap of the mean (over ``runs``) loss increase per (layer, block input); dots: the first run's A8 set."""
  from matplotlib.colors import TwoSlopeNorm  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415
  grid = np.full((n_layers, len(TAPS)), np.nan)
  for unit in runs[0]["delta"]:
    layer, tap = unit.split("/")
    grid[int(layer.split("_")[1]), TAPS.index(tap)] = np.mean([r["delta"][unit] for r in runs]) * 1e3
  fig = Figure(figsize=(4.8, 0.22 * n_layers + 1.8))
  ax = fig.subplots()
  lo, hi = np.nanmin(grid), np.nanmax(grid)
  norm = TwoSlopeNorm(0.0, min(lo, -1e-9), max(hi, 1e-9))
  im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", norm=norm)
  for unit in runs[0]["a8"]:
    layer, tap = unit.split("/")
    ax.plot(TAPS.index(tap), int(layer.split("_")[1]), "k.", markersize=5)
  ax.set_xticks(range(len(TAPS)), TAP_LABELS)
  ax.set_ylabel("layer")
  ax.set_title(title, fontsize=8)
  fig.colorbar(im, ax=ax, label="calibration loss increase A8 -> A6 (millinats)")
  fig.tight_layout()
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--model", type=_cli.model, default="smollm2-135m",
                  help="smollm2-135m, a .gguf file or a Hugging Face folder")
  ap.add_argument("--eval-tokens", type=_cli.int_at_least(512, "an int >= 512 (one window of 512 tokens)"),
                  default=16384, help="held-out tokens evaluated")
  ap.add_argument("--blocks", type=_cli.positive_int, default=None, help="only the first N blocks (smoke runs)")
  ap.add_argument("--grids", choices=GRIDS, nargs="+", default=list(GRIDS), help="weight grids")
  ap.add_argument("--seeds", type=_cli.nonneg_int, nargs="+", default=[0],
                  help="calibration seeds of the measured choice (one measurement each)")
  ap.add_argument("--calib-samples", type=_cli.positive_int, default=4, help="calibration windows (training works)")
  ap.add_argument("--calib-seq-len", type=_cli.seq_len, default=256, help="tokens per calibration window")
  ap.add_argument("--cost", choices=act_sensitivity.COSTS, default="macs",
                  help="activation-bit cost of a block input: bits x per-token MACs, or bits x input width")
  ap.add_argument("--json", type=_cli.output_file, help="write the results here")
  ap.add_argument("--md", type=_cli.output_file, help="write the table here")
  ap.add_argument("--plot", type=_cli.output_file, help="write the sensitivity heatmap (first grid) here (.png)")
  args = ap.parse_args(argv)
  if len(set(args.seeds)) != len(args.seeds):
    ap.error(f"argument --seeds: repeated seeds {args.seeds}")

  config, params = io.load_model(args.model)
  if args.calib_seq_len > config.max_seq_len:
    raise _cli.UsageError(f"argument --calib-seq-len: {args.calib_seq_len} exceeds the model's max_seq_len "
                          f"{config.max_seq_len}")
  params = jax.tree.map(jnp.asarray, params)
  tokenizer = io.load_tokenizer(args.model)
  heldout = data.tokenize(tokenizer, data.load_text("heldout"))
  train = data.tokenize(tokenizer, data.load_text("train"))
  def only(pattern: str) -> str:  # restrict a block-linear regex to the blocks quantized here
    return _cli.first_blocks(pattern, args.blocks)

  paths = only(recipe.BLOCK_LINEARS)

  def ppl(p) -> float:
    return evaluate.perplexity(config, p, heldout, seq_len=512, max_tokens=args.eval_tokens, progress=False).ppl

  out = {"model": str(args.model), "eval_tokens": args.eval_tokens, "ppl_fp": ppl(params), "cost": args.cost,
         "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len, "seeds": args.seeds,
         "rows": [], "measured": []}
  for grid in args.grids:
    w6 = weights(params, grid, paths)
    acts = {"A16": lambda q: q,
            "A8": lambda q: activations.with_activation_bits(q, 8, paths=paths),
            "A6": lambda q: activations.with_activation_bits(q, 6, paths=paths),
            RULE: lambda q: activations.with_activation_bits(
                activations.with_activation_bits(q, 8, paths=only(activations.DOWN_PROJ)), 6,
                paths=only(activations.NOT_DOWN_PROJ))}
    for label, wrap in acts.items():
      row = {"weights": grid, "activations": label, "ppl": ppl(wrap(w6))}
      out["rows"].append(row)
      print(f"W6 ({grid}) {label}: ppl {row['ppl']:.3f}", flush=True)
    runs = []
    for seed in args.seeds:
      calib = data.sample_windows(train, args.calib_samples, args.calib_seq_len, seed)
      sens = act_sensitivity.measure(config, w6, calib, paths=paths)
      costs = act_sensitivity.unit_costs(w6, sens.units, args.cost)
      rule = {u for u in sens.units if u.endswith("/down_in")}
      budget = act_sensitivity.bits_of(costs, rule)
      a8 = act_sensitivity.choose(sens.delta, costs, budget)
      run = {"weights": grid, "seed": seed, "ppl": ppl(act_sensitivity.with_choice(w6, sens.units, a8)),
             "calib_loss_a8": sens.loss, "calib_tokens": sens.tokens, "measure_seconds": sens.seconds,
             "budget_bits_per_token": budget, "bits_per_token": act_sensitivity.bits_of(costs, a8),
             "all_a8_bits_per_token": act_sensitivity.bits_of(costs, set(sens.units)),
             "predicted_increase": sum(d for u, d in sens.delta.items() if u not in a8),
             "rule_predicted_increase": sum(d for u, d in sens.delta.items() if u not in rule),
             "a8": [u for u in sens.units if u in a8], "a8_down": sum(u.endswith("/down_in") for u in a8),
             "delta": sens.delta}
      runs.append(run)
      print(f"W6 ({grid}) measured, seed {seed}: ppl {run['ppl']:.3f}; {len(a8)} inputs at A8 "
            f"({run['a8_down']} down_proj) in {sens.seconds:.0f} s of measurement", flush=True)
    ppls = [r["ppl"] for r in runs]
    out["rows"].append({"weights": grid, "activations": MEASURED, "ppl": statistics.mean(ppls),
                        "ppl_sd": statistics.stdev(ppls) if len(ppls) > 1 else 0.0, "n_seeds": len(ppls)})
    out["measured"] += runs
    if args.plot and grid == args.grids[0]:
      plot_sensitivity(runs, config.n_layers, args.plot,
                       f"W6 ({grid}): calibration loss increase A8 -> A6\nmean of {len(runs)} seed(s); "
                       f"dots: A8 (seed {runs[0]['seed']})")

  seeds = ", ".join(map(str, args.seeds))
  lines = [f"float: {out['ppl_fp']:.2f}", "", "| weights (6-bit, g128) | activations (g128) | ppl | vs float |",
           "|---|---|---|---|"]
  for r in out["rows"]:
    sd = f" ± {r['ppl_sd']:.2f}" if r.get("n_seeds", 1) > 1 else ""
    lines.append(f"| {r['weights']} | {r['activations']} | {r['ppl']:.2f}{sd} | {r['ppl'] / out['ppl_fp'] - 1:+.1%} |")
  lines += ["", f"Measured choice: {args.calib_samples} x {args.calib_seq_len} calibration tokens from the training "
            f"works, seed(s) {seeds} (mean ± sd over seeds); cost = activation bits x per-token "
            f"{'MACs' if args.cost == 'macs' else 'input width'}, budget = the rule's.", "",
            "| weights | seed | ppl | A8 inputs (of which down_proj) | bits used / budget | predicted increase "
            "(measured / rule, millinats) |", "|---|---|---|---|---|---|"]
  for r in out["measured"]:
    lines.append(f"| {r['weights']} | {r['seed']} | {r['ppl']:.2f} | {len(r['a8'])} ({r['a8_down']}) | "
                 f"{r['bits_per_token'] / r['budget_bits_per_token']:.4f} | "
                 f"{r['predicted_increase'] * 1e3:.1f} / {r['rule_predicted_increase'] * 1e3:.1f} |")
  print("\n".join(lines))
  if args.json:
    Path(args.json).write_text(json.dumps(out, indent=1))
  if args.md:
    Path(args.md).write_text("\n".join(lines) + "\n")
  return out


if __name__ == "__main__":
  _cli.run(main)
