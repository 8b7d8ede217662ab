"""Perplexity of a model on text (GPTQ protocol: non-overlapping windows).

  python experiments/eval_ppl.py --model smollm2-135m [--text-file F] [--seq-len 512]
      [--max-tokens N] [--batch-size 4] [--json OUT]

``--model`` is ``smollm2-135m``, a GGUF file, a Hugging Face folder, or a quantized
checkpoint saved by ``experiments/quantize.py --save DIR`` (its tokenizer is the one
stored in it, so the folder may have moved; the JSON records its recipe). Without
``--text-file`` the held-out Shakespeare works are used. Arguments, then the
tokenizer, are checked before the model loads; an error prints one ``error: ...``
line (``--debug``: the traceback).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lqx import data, evaluate, io
from lqx.io import checkpoint

if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--model", type=_cli.model, default="smollm2-135m",
                  help="a named model, a .gguf file, a Hugging Face or lqx checkpoint folder")
  ap.add_argument("--text-file", type=_cli.existing_file,
                  help="UTF-8 text to evaluate (default: held-out Shakespeare works)")
  ap.add_argument("--seq-len", type=_cli.seq_len, default=512, help="tokens per window")
  ap.add_argument("--max-tokens", type=_cli.positive_int, help="cap on tokens read from the start of the text")
  ap.add_argument("--batch-size", type=_cli.positive_int, default=4, help="windows per forward")
  ap.add_argument("--json", type=_cli.output_file, help="write the results here")
  args = ap.parse_args(argv)
  if args.max_tokens is not None and args.max_tokens < args.seq_len:
    ap.error(f"argument --max-tokens: {args.max_tokens} is less than one window of --seq-len {args.seq_len}")

  tokenizer = io.load_tokenizer(args.model)  # first: a checkpoint whose tokenizer is gone fails before the load
  config, params = io.load_model(args.model)
  if args.seq_len > config.max_seq_len:
    raise _cli.UsageError(f"argument --seq-len: {args.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
  if args.text_file:
    with open(args.text_file, encoding="utf-8") as f:
      text = f.read()
  else:
    text = data.load_text("heldout")
  tokens = data.tokenize(tokenizer, text)
  result = evaluate.perplexity(config, params, tokens, seq_len=args.seq_len,
                               batch_size=args.batch_size, max_tokens=args.max_tokens)
  stored = checkpoint.read_json(args.model).get("recipe") if checkpoint.is_checkpoint(args.model) else None
  out = {"model": str(args.model), "text": args.text_file or "heldout", "recipe": stored, **result.to_json()}
  print(f"{args.model}: ppl {result.ppl:.3f} (nll {result.nll:.4f}) on {result.tokens} predicted tokens, "
        f"{result.windows} windows of {result.seq_len}; {result.tokens_per_second:.0f} tok/s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  _cli.run(main)
