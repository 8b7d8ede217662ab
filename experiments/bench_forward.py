"""Forward-pass throughput of lqx vs transformers/PyTorch on SmolLM2, same tokens.

Prints tokens/s for both, their ratio, the achieved GFLOP/s of each beside a plain
jitted float32 matmul's GFLOP/s measured in the same run (the machine's practical
limit), and the max |logit| difference between the two implementations.

  python experiments/bench_forward.py [--seq-len 512] [--batch 1] [--repeats 5] [--json OUT]

Arguments are checked before the model loads; an error prints one ``error: ...``
line (``--debug``: the traceback).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lqx import data, io
from lqx.models import llama

if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402
from _bench import matmul_gflops, time_best  # noqa: E402


def forward_flops(c: llama.LlamaConfig, batch: int, seq_len: int) -> float:
  """Multiply-adds x2 of one forward: projections, MLP, full (unmasked) attention, readout."""
  per_token_layer = 2 * (c.dim * c.q_dim + 2 * c.dim * c.kv_dim + c.q_dim * c.dim + 3 * c.dim * c.ffn_dim)
  attn = 2 * 2 * seq_len * c.q_dim  # QK^T and PV per query token
  per_token = c.n_layers * (per_token_layer + attn) + 2 * c.dim * c.vocab_size
  return float(per_token * batch * seq_len)


def torch_model(config: llama.LlamaConfig, params):
  """transformers' LlamaForCausalLM holding the same weights (float32, eval mode)."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  hf = LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.dim, num_hidden_layers=config.n_layers,
      num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
      intermediate_size=config.ffn_dim, head_dim=config.head_dim, rope_theta=config.rope_theta,
      rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
      max_position_embeddings=config.max_seq_len)
  model = LlamaForCausalLM(hf).eval()
  t = lambda x: torch.from_numpy(np.array(x, np.float32))
  sd = {"model.embed_tokens.weight": t(params["embed"]["embedding"]),
        "model.norm.weight": t(params["final_norm"]["scale"])}
  names = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
           "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
           "down_proj": "mlp.down_proj"}
  for i, name in enumerate(llama.layer_names(config)):
    p = params[name]
    pre = f"model.layers.{i}."
    sd[pre + "input_layernorm.weight"] = t(p["attn_norm"]["scale"])
    sd[pre + "post_attention_layernorm.weight"] = t(p["mlp_norm"]["scale"])
    for group in ("attn", "mlp"):
      for proj, leaf in p[group].items():
        if proj in names:
          sd[pre + names[proj] + ".weight"] = t(np.asarray(leaf["kernel"]).T)
  if config.tie_embeddings:
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
  else:
    sd["lm_head.weight"] = t(np.asarray(params["lm_head"]["kernel"]).T)
  model.load_state_dict(sd, strict=True)
  return model


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--model", type=_cli.model, default="smollm2-135m",
                  help="a named model, a .gguf file, or a Hugging Face folder")
  ap.add_argument("--seq-len", type=_cli.positive_int, default=512, help="tokens per sequence")
  ap.add_argument("--batch", type=_cli.positive_int, default=1, help="sequences per forward")
  ap.add_argument("--repeats", type=_cli.positive_int, default=5, help="timed forwards (the best is kept)")
  ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
  ap.add_argument("--json", type=_cli.output_file, help="write the results here")
  args = ap.parse_args(argv)

  config, params = io.load_model(args.model)
  if args.seq_len > config.max_seq_len:
    raise _cli.UsageError(f"argument --seq-len: {args.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
  tokenizer = io.load_tokenizer(args.model)
  tokens = data.tokenize(tokenizer, data.load_text("heldout")[: 20 * args.seq_len * args.batch])
  batch = data.windows(tokens, args.seq_len)[: args.batch]
  params = jax.tree.map(jnp.asarray, params)
  flops = forward_flops(config, *batch.shape)

  peak = matmul_gflops()
  x = jnp.asarray(batch)
  lqx_s = time_best(lambda: llama.apply(config, params, x).block_until_ready(), args.repeats)
  out = {"model": args.model, "batch": args.batch, "seq_len": args.seq_len,
         "gflop_per_forward": flops / 1e9, "matmul_gflops": peak,
         "lqx_seconds": lqx_s, "lqx_tokens_per_second": batch.size / lqx_s,
         "lqx_gflops": flops / lqx_s / 1e9}
  print(f"float32 2048^3 matmul (XLA): {peak:7.1f} GFLOP/s")
  print(f"lqx forward       : {out['lqx_tokens_per_second']:8.1f} tok/s  {out['lqx_gflops']:6.1f} GFLOP/s "
        f"({out['lqx_gflops'] / peak:.0%} of matmul)")

  if not args.no_torch:
    try:
      import torch
    except ImportError:
      print("torch is not installed: no PyTorch baseline (pip install torch==2.13.0)")
    else:
      model = torch_model(config, params)
      tx = torch.from_numpy(batch.astype(np.int64))
      with torch.inference_mode():
        torch_s = time_best(lambda: model(tx).logits, args.repeats)
        ref = model(tx).logits.numpy()
      diff = float(np.max(np.abs(ref - np.asarray(llama.apply(config, params, x)))))
      out.update(torch_threads=torch.get_num_threads(), torch_seconds=torch_s,
                 torch_tokens_per_second=batch.size / torch_s, torch_gflops=flops / torch_s / 1e9,
                 speedup_vs_torch=torch_s / lqx_s, max_abs_logit_diff=diff)
      print(f"PyTorch forward   : {out['torch_tokens_per_second']:8.1f} tok/s  {out['torch_gflops']:6.1f} GFLOP/s "
            f"({out['torch_gflops'] / peak:.0%} of matmul, {out['torch_threads']} threads)")
      print(f"lqx / PyTorch tokens per second: {out['speedup_vs_torch']:.2f}x   max |logit diff| {diff:.2e}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  _cli.run(main)
