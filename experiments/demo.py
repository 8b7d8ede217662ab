"""`make demo`: SmolLM2-135M on held-out Shakespeare — perplexity, generation, quantization table.

  python experiments/demo.py            # quick (`make demo`): W3 g64 with RTN, GPTQ, AdaDim-GPTQ
  python experiments/demo.py --full     # `make demo-full`: every method at every setting (~40 min)
      [--eval-tokens N] [--seq-len 512] [--calib-samples 16] [--methods rtn,gptq]

The quick run writes results/demo.json and results/demo_table.md, with the
perplexity spread over calibration seeds beside each row where
results/seed_variance.json (``experiments/seed_variance.py``) has it. ``--full``
writes results/quant_table.md and results/quant_ppl_vs_bits.png.
The source model is itself stored as Q4_1 (4-bit, groups of 32): its dequantized
weights are the float reference, and 4-bit results on it are flattering.
Arguments are checked before the model loads; an error prints one ``error: ...``
line (``--debug``: the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lqx import data, evaluate, io, plots, recipe
from lqx.models import llama

if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402

# (label, bits, group_size); every method runs at every setting.
SETTINGS = (("W3 g64", 3, 64), ("W3 g128", 3, 128), ("W4 g128", 4, 128), ("W2 g64", 2, 64), ("W3 per-ch", 3, -1))
QUICK_SETTINGS = (("W3 g64", 3, 64),)
QUICK_METHODS = "rtn,gptq,adadim-gptq"
FULL_METHODS = "rtn,gptq,adadim-rtn,adadim-gptq"  # the group-size table; P7 methods: experiments/pareto.py
PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?"


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--model", type=_cli.model, default="smollm2-135m",
                  help="a named model, a .gguf file, or a Hugging Face folder")
  ap.add_argument("--seq-len", type=_cli.seq_len, default=512, help="tokens per evaluation window")
  ap.add_argument("--eval-tokens", type=_cli.nonneg_int, default=16384, help="cap on held-out tokens (0: all)")
  ap.add_argument("--calib-samples", type=_cli.positive_int, default=16, help="calibration windows")
  ap.add_argument("--calib-seq-len", type=_cli.seq_len, default=512, help="tokens per calibration window")
  ap.add_argument("--methods", type=methods_arg,
                  help=f"comma-separated, of {recipe.METHODS} (default: {QUICK_METHODS}; --full: {FULL_METHODS})")
  ap.add_argument("--full", action="store_true", help="every setting and method (the README's full table)")
  ap.add_argument("--quick", action="store_true", help="the default; kept for old command lines")
  ap.add_argument("--no-quant", action="store_true", help="skip the quantization table")
  ap.add_argument("--new-tokens", type=_cli.positive_int, default=48, help="tokens generated after the prompt")
  ap.add_argument("--out", type=_cli.output_dir, default=".", help="folder for demo.json (relative: under --out-dir)")
  args = ap.parse_args(argv)
  if args.eval_tokens and args.eval_tokens < args.seq_len:
    ap.error(f"argument --eval-tokens: {args.eval_tokens} is less than one window of --seq-len {args.seq_len} "
             f"(0: all tokens)")
  if args.methods is None:
    args.methods = FULL_METHODS if args.full else QUICK_METHODS

  config, params = io.load_model(args.model)
  for option, n in (("--seq-len", args.seq_len), ("--calib-seq-len", args.calib_seq_len)):
    if n > config.max_seq_len:
      raise _cli.UsageError(f"argument {option}: {n} exceeds the model's max_seq_len {config.max_seq_len}")
  params = jax.tree.map(jnp.asarray, params)
  tokenizer = io.load_tokenizer(args.model)
  print(f"{args.model}: {config.n_layers} layers, d={config.dim}, {config.n_heads}/{config.n_kv_heads} heads, "
        f"vocab {config.vocab_size}, {config.num_params() / 1e6:.1f}M params")

  tokens = data.tokenize(tokenizer, data.load_text("heldout"))
  res = evaluate.perplexity(config, params, tokens, seq_len=args.seq_len, max_tokens=args.eval_tokens or None)
  print(f"held-out perplexity ({', '.join(data.HELDOUT_WORKS)}): {res.ppl:.3f} "
        f"over {res.tokens} predicted tokens ({res.windows} windows of {res.seq_len}), "
        f"{res.tokens_per_second:.0f} tok/s")

  prompt = np.array([data.tokenize(tokenizer, PROMPT)])
  new = llama.generate(config, params, prompt, args.new_tokens)
  continuation = tokenizer.decode(np.asarray(new[0]))
  print(f"\n--- greedy continuation ---\n{PROMPT}{continuation}\n---------------------------")

  out = {"model": args.model, "perplexity": res.to_json(), "prompt": PROMPT, "continuation": continuation}
  Path(args.out).mkdir(parents=True, exist_ok=True)
  if not args.no_quant:
    train = data.tokenize(tokenizer, data.load_text("train"))
    calib = data.sample_windows(train, args.calib_samples, args.calib_seq_len, seed=0)
    out["quantization"] = quant_table(config, params, calib, tokens, res, args)
  with open(Path(args.out) / "demo.json", "w") as f:
    json.dump(out, f, indent=2)
  return out


def methods_arg(text: str) -> str:
  """argparse type: comma-separated method names of ``recipe.METHODS``."""
  names = [n.strip() for n in text.split(",")]
  bad = [n for n in names if n not in recipe.METHODS]
  if bad or not names:
    raise argparse.ArgumentTypeError(f"unknown method(s) {bad or [text]}; expected comma-separated names "
                                     f"from {', '.join(recipe.METHODS)}")
  return ",".join(names)


def quant_table(config, params, calib, tokens, fp, args) -> list[dict]:
  """Every method at every setting: bits per weight, perplexity, paired NLL difference."""
  rows = []
  settings = SETTINGS if args.full else QUICK_SETTINGS
  spread = seed_spread(Path(args.out) / "seed_variance.json")
  for label, bits, group_size in settings:
    for name in args.methods.split(","):
      method = recipe.make_method(name, bits=bits, group_size=group_size)
      print(f"\n== {name} {label} ==")
      qparams, report = recipe.quantize(config, params, recipe.default_recipe(method), calib)
      q = evaluate.perplexity(config, qparams, tokens, seq_len=args.seq_len, max_tokens=args.eval_tokens or None)
      n_ic = sum(l.group_axis == "ic" for l in report.layers)
      rows.append({"method": name, "label": label, "bits": bits, "group_size": group_size,
                   "bits_per_weight": report.bits_per_weight, "ppl_q": q.ppl,
                   "paired": evaluate.paired_difference(fp, q), "quantize_seconds": report.seconds,
                   "per_ic_layers": n_ic, "layers": len(report.layers),
                   "seed_spread": spread.get((name, bits, group_size))})
      print(f"{name} {label}: {report.bits_per_weight:.3f} bits/weight, ppl {q.ppl:.2f}, "
            f"per-IC layers {n_ic}/{len(report.layers)}, {report.seconds:.0f} s")
      table = format_table(rows, fp.ppl, fp.tokens, calib.shape)  # rewritten after every row
      (Path(args.out) / ("quant_table.md" if args.full else "demo_table.md")).write_text(table + "\n")
  print("\n" + format_table(rows, fp.ppl, fp.tokens, calib.shape))
  if args.full:
    plots.ppl_vs_bits(rows, Path(args.out) / "quant_ppl_vs_bits.png", ppl_fp=fp.ppl,
                      title=f"SmolLM2-135M, held-out Shakespeare ({fp.tokens} tokens)")
  return rows


def seed_spread(path: Path) -> dict:
  """(method, bits, group_size) -> "mean ± sd (n seeds)" of perplexity, from a seed_variance.py JSON."""
  if not path.exists():
    return {}
  out = {}
  for r in json.loads(path.read_text()).get("summary", []):
    if r.get("default"):  # the default pipeline and float16 scales, as the demo runs
      out[(r["method"], r["bits"], r["group_size"])] = f"{r['ppl_mean']:.1f} ± {r['ppl_sd']:.1f} ({r['n']} seeds)"
  return out


def format_table(rows, ppl_fp, eval_tokens, calib_shape) -> str:
  lines = [f"Float (Q4_1 source dequantized): ppl {ppl_fp:.2f}; {eval_tokens} held-out tokens; "
           f"calibration {calib_shape[0]} x {calib_shape[1]} training tokens.", "",
           "| setting | method | bits/weight | ppl (calibration seed 0) | ppl over calibration seeds | "
           "mean NLL diff vs float (95% CI) | per-IC layers | seconds |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    d = r["paired"]
    lines.append(f"| {r['label']} | {r['method']} | {r['bits_per_weight']:.3f} | {r['ppl_q']:.2f} | "
                 f"{r.get('seed_spread') or '–'} | {d['mean_nll_diff']:+.4f} ± {d['ci95']:.4f} | "
                 f"{r['per_ic_layers']}/{r['layers']} | {r['quantize_seconds']:.0f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  _cli.run(main)
