"""FlexQ-style W6A16 / W6A8 / W6A6 and FlexQ's fixed A8 rule on a real model: held-out perplexity.

  python experiments/flexq.py [--model smollm2-135m] [--eval-tokens 16384] [--json F] [--md F]

Weights: 6-bit symmetric groups of 128 input channels on every block linear, in two grids:
FlexQ's (scale = absmax / 31, codes in [-31, 31]: ``activations.absmax_quantize``) and
lqx's ``rtn`` with ``sym=True`` (reference GPTQ's grid, scale = 2 absmax / 63). Activations:
dynamic symmetric per-token quantization in groups of 128 input channels
(``lqx.formats.ActQuant``; short last groups at 576 inputs, where FlexQ's code would run
groups across tokens), at 8 bits, 6 bits, or FlexQ's fixed rule (8 bits into ``down_proj``,
6 elsewhere). Attention matmuls, the embedding and the head stay in float. Data-free: no
calibration, so no seed spread.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from lqx import data, evaluate, io, quant, recipe, tree
from lqx.quant import activations

if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402


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


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--model", type=_cli.model, default="smollm2-135m",
                  help="smollm2-135m, a .gguf file or a Hugging Face folder")
  ap.add_argument("--eval-tokens", type=_cli.int_at_least(512, "an int >= 512 (one window of 512 tokens)"),
                  default=16384, help="held-out tokens evaluated")
  ap.add_argument("--blocks", type=_cli.positive_int, default=None, help="only the first N blocks (smoke runs)")
  ap.add_argument("--json", type=_cli.output_file, help="write the results here")
  ap.add_argument("--md", type=_cli.output_file, help="write the table here")
  args = ap.parse_args(argv)

  config, params = io.load_model(args.model)
  params = jax.tree.map(jnp.asarray, params)
  heldout = data.tokenize(io.load_tokenizer(args.model), data.load_text("heldout"))
  def only(pattern: str) -> str:  # restrict a block-linear regex to the blocks quantized here
    return _cli.first_blocks(pattern, args.blocks)

  paths = only(recipe.BLOCK_LINEARS)

  def ppl(p) -> float:
    return evaluate.perplexity(config, p, heldout, seq_len=512, max_tokens=args.eval_tokens, progress=False).ppl

  out = {"model": str(args.model), "eval_tokens": args.eval_tokens, "ppl_fp": ppl(params), "rows": []}
  for grid in ("flexq", "rtn-sym"):
    w6 = weights(params, grid, paths)
    acts = {"A16": lambda q: q,
            "A8": lambda q: activations.with_activation_bits(q, 8, paths=paths),
            "A6": lambda q: activations.with_activation_bits(q, 6, paths=paths),
            "FlexQ rule (A8 into down_proj, A6 elsewhere)": lambda q: activations.with_activation_bits(
                activations.with_activation_bits(q, 8, paths=only(activations.DOWN_PROJ)), 6,
                paths=only(activations.NOT_DOWN_PROJ))}
    for label, wrap in acts.items():
      row = {"weights": grid, "activations": label, "ppl": ppl(wrap(w6))}
      out["rows"].append(row)
      print(f"W6 ({grid}) {label}: ppl {row['ppl']:.3f}", flush=True)
  lines = [f"float: {out['ppl_fp']:.2f}", "", "| weights (6-bit, g128) | activations (g128) | ppl | vs float |",
           "|---|---|---|---|"]
  lines += [f"| {r['weights']} | {r['activations']} | {r['ppl']:.2f} | {r['ppl'] / out['ppl_fp'] - 1:+.1%} |"
            for r in out["rows"]]
  print("\n".join(lines))
  if args.json:
    Path(args.json).write_text(json.dumps(out, indent=1))
  if args.md:
    Path(args.md).write_text("\n".join(lines) + "\n")
  return out


if __name__ == "__main__":
  _cli.run(main)
