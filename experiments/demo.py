"""`make demo`: SmolLM2-135M on held-out Shakespeare — perplexity and a generated continuation.

  python experiments/demo.py [--eval-tokens N] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lqx import data, eval as lqx_eval, io
from lqx.models import llama

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?"


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--seq-len", type=int, default=512)
  ap.add_argument("--eval-tokens", type=int, default=None, help="cap on held-out tokens (default: all)")
  ap.add_argument("--new-tokens", type=int, default=48)
  ap.add_argument("--out", default="results", help="folder for demo.json")
  args = ap.parse_args(argv)

  config, params = io.load_model(args.model)
  params = jax.tree.map(jnp.asarray, params)
  tokenizer = io.load_tokenizer(args.model)
  print(f"{args.model}: {config.n_layers} layers, d={config.dim}, {config.n_heads}/{config.n_kv_heads} heads, "
        f"vocab {config.vocab_size}, {config.num_params() / 1e6:.1f}M params")

  tokens = data.tokenize(tokenizer, data.load_text("heldout"))
  res = lqx_eval.perplexity(config, params, tokens, seq_len=args.seq_len, max_tokens=args.eval_tokens)
  print(f"held-out perplexity ({', '.join(data.HELDOUT_WORKS)}): {res.ppl:.3f} "
        f"over {res.tokens} predicted tokens ({res.windows} windows of {res.seq_len}), "
        f"{res.tokens_per_second:.0f} tok/s")

  prompt = np.array([data.tokenize(tokenizer, PROMPT)])
  new = llama.generate(config, params, prompt, args.new_tokens)
  continuation = tokenizer.decode(np.asarray(new[0]))
  print(f"\n--- greedy continuation ---\n{PROMPT}{continuation}\n---------------------------")

  out = {"model": args.model, "perplexity": res.to_json(), "prompt": PROMPT, "continuation": continuation}
  Path(args.out).mkdir(parents=True, exist_ok=True)
  with open(Path(args.out) / "demo.json", "w") as f:
    json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  main()
