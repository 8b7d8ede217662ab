"""Export a model out of lqx: a Hugging Face folder (dequantized), a GPTQ checkpoint, or a GGUF file.

  python experiments/export.py --model CKPT --to hf OUT [--dtype float16]   # transformers loads OUT
  python experiments/export.py --model CKPT --to gptq OUT [--checkpoint-format gptq_v2] [--round-scales]
  python experiments/export.py --model CKPT --to gguf OUT.gguf [--float-type f32]
      [--tokenizer MODEL | --no-tokenizer] [--overwrite] [--json F]

``--model`` is an lqx checkpoint folder (``experiments/quantize.py --save``); ``--to hf`` and
``--to gguf`` also take a named model, a .gguf file or a Hugging Face folder. The tokenizer
written is ``--model``'s (the one stored in an lqx checkpoint, or its ``source_model``'s), unless
``--tokenizer`` names another model or ``--no-tokenizer`` leaves it out. What each format can
hold: docs/export.md. Arguments and the destination are checked before the model loads; an
error prints one ``error: ...`` line (``--debug``: the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

from lqx import formats, io
from lqx.io import checkpoint, export
from lqx.io.export import hf as export_hf
from lqx.models.llama import LlamaConfig

if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402

TARGETS = ("hf", "gptq", "gguf")


def _tokenizer(ap, args):
  """``(source, tokenizer)`` to write (``(None, None)``: none), read before the model loads: the tokenizer
  object for gguf, its files for hf and gptq (an lqx checkpoint's stored files as they are)."""
  if args.no_tokenizer:
    return None, None
  source = args.tokenizer or args.model
  try:
    return source, io.load_tokenizer(source) if args.to == "gguf" else export_hf.tokenizer_files(source)
  except ValueError as e:
    ap.error(f"argument {'--tokenizer' if args.tokenizer else '--model'}: no tokenizer: {e}; "
             f"pass --tokenizer MODEL or --no-tokenizer")


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--model", type=_cli.model, required=True,
                  help="an lqx checkpoint folder; for --to hf/gguf also a named model, .gguf file or HF folder")
  ap.add_argument("--to", choices=TARGETS, required=True, help="the format to write")
  ap.add_argument("out", metavar="OUT", help="folder to write (hf, gptq) or .gguf file (gguf)")
  ap.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier export")
  ap.add_argument("--tokenizer", type=_cli.model, help="write this model's tokenizer (default: --model's)")
  ap.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
  ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                  help="hf: dtype of every tensor (default: each weight's own)")
  ap.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default=None,
                  help="gptq: 'gptq' stores zero points minus one (AutoGPTQ), 'gptq_v2' as they are "
                       "(default: gptq)")
  ap.add_argument("--round-scales", action="store_true", help="gptq: round scales that are not float16 values")
  ap.add_argument("--float-type", choices=("f16", "f32"), default=None,
                  help="gguf: type of the tensors no block type holds exactly (default: f16)")
  ap.add_argument("--json", type=_cli.output_file, help="write a summary here")
  args = ap.parse_args(argv)
  for option, value, target in (("--dtype", args.dtype, "hf"), ("--checkpoint-format", args.checkpoint_format, "gptq"),
                                ("--round-scales", args.round_scales, "gptq"), ("--float-type", args.float_type, "gguf")):
    if value and args.to != target:
      ap.error(f"argument {option}: only applies with --to {target}")
  if args.tokenizer and args.no_tokenizer:
    ap.error("argument --no-tokenizer: not allowed with --tokenizer")
  model_path = Path(args.model).expanduser()
  is_ckpt = checkpoint.is_checkpoint(model_path)
  if args.to == "gptq" and not is_ckpt:
    ap.error(f"argument --model: --to gptq needs an lqx checkpoint of a quantized model "
             f"(experiments/quantize.py --save), got {args.model!r}")
  if args.to == "gguf":
    try:
      _cli.output_file(args.out)
    except argparse.ArgumentTypeError as e:
      ap.error(f"argument OUT: {e}")
    if not args.out.endswith(".gguf"):
      ap.error(f"argument OUT: {args.out!r} must end with .gguf for --to gguf")
    if Path(args.out).expanduser().exists() and not args.overwrite:
      ap.error(f"argument OUT: {args.out!r} already exists; pass --overwrite to replace it")
  else:
    dest = Path(args.out).expanduser()
    if dest.is_dir() and any(dest.iterdir()) and not args.overwrite:
      ap.error(f"argument OUT: {args.out!r} exists and is not empty; pass --overwrite to replace an earlier export")
    try:
      export.check_destination(dest, overwrite=True)
    except FileExistsError as e:
      ap.error(f"argument OUT: {e}")
  tok_source, tokenizer = _tokenizer(ap, args)

  t0 = time.perf_counter()
  config, params = io.load_model(args.model)
  if not isinstance(config, LlamaConfig):
    raise _cli.UsageError(f"argument --model: {args.model} holds a {type(config).__name__} config; the exporters "
                          f"write LLaMA-family models (LlamaConfig)")
  if args.to == "hf":
    path = export_hf.export_hf(args.out, config, params, tokenizer=tokenizer, dtype=args.dtype, overwrite=args.overwrite)
  elif args.to == "gptq":
    from lqx.io.export.gptq import export_gptq

    path = export_gptq(args.out, config, params, tokenizer=tokenizer, overwrite=args.overwrite,
                       checkpoint_format=args.checkpoint_format or "gptq", round_scales=args.round_scales)
  else:
    from lqx.io.export.gguf import export_gguf

    path = export_gguf(args.out, config, params, tokenizer=tokenizer, overwrite=args.overwrite,
                       float_type=args.float_type or "f16")
  leaves = jax.tree.leaves(params, is_leaf=formats.is_quantized)
  n_q = sum(formats.is_quantized(x) for x in leaves)
  out = {"model": str(args.model), "to": args.to, "out": str(path), "tokenizer": tok_source,
         "quantized_leaves": n_q, "leaves": len(leaves), "seconds": time.perf_counter() - t0}
  print(f"wrote {args.to} {'file' if args.to == 'gguf' else 'folder'} {path} ({n_q} of {len(leaves)} leaves quantized"
        f"{', tokenizer of ' + tok_source if tok_source else ', no tokenizer'}) in {out['seconds']:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  _cli.run(main)
