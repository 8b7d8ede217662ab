"""Perplexity of a model on text (GPTQ protocol: non-overlapping windows).

  python experiments/eval_ppl.py --model smollm2-135m [--text-file F] [--seq-len 512]
      [--max-tokens N] [--batch-size 4] [--json OUT]

``--model`` is ``smollm2-135m``, a GGUF file, a Hugging Face folder, or a quantized
checkpoint saved by ``experiments/quantize.py --save DIR``. Without ``--text-file``
the held-out Shakespeare works are used.
"""

from __future__ import annotations

import argparse
import json

from lqx import data, evaluate, io


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--text-file", help="UTF-8 text to evaluate (default: held-out Shakespeare works)")
  ap.add_argument("--seq-len", type=int, default=512)
  ap.add_argument("--max-tokens", type=int, help="cap on tokens read from the start of the text")
  ap.add_argument("--batch-size", type=int, default=4)
  ap.add_argument("--json", help="write the results here")
  args = ap.parse_args(argv)

  config, params = io.load_model(args.model)
  tokenizer = io.load_tokenizer(args.model)
  if args.text_file:
    with open(args.text_file, encoding="utf-8") as f:
      text = f.read()
  else:
    text = data.load_text("heldout")
  tokens = data.tokenize(tokenizer, text)
  result = evaluate.perplexity(config, params, tokens, seq_len=args.seq_len,
                               batch_size=args.batch_size, max_tokens=args.max_tokens)
  out = {"model": str(args.model), "text": args.text_file or "heldout", **result.to_json()}
  print(f"{args.model}: ppl {result.ppl:.3f} (nll {result.nll:.4f}) on {result.tokens} predicted tokens, "
        f"{result.windows} windows of {result.seq_len}; {result.tokens_per_second:.0f} tok/s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  main()
