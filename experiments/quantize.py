"""Quantize a model with any registered method and compare held-out perplexity.

  python experiments/quantize.py --method gptq --bits 3 --group-size 64 [--act-order]
  python experiments/quantize.py --method squeezellm --bits 3 [--sensitive-frac 0.0005 --outlier-frac 0.004]
      [--fisher F.npz]                                # SqueezeLLM; Fisher from calibration, or this cache
  python experiments/quantize.py --method gptq+wlorc --bits 3 --rank 8 [--factor-bits 8|16]
  python experiments/quantize.py --recipe R.yaml|R.json|CKPT_DIR [--recipe-out R2.yaml]  # instead of --method ...
      [--no-true-sequential --scale-dtype float32]   # the reference GPTQ's llama.py pipeline
      [--calib-samples 32 --calib-seq-len 512 | --calib-tokens F.npy | --calib-text F]
      [--save-calib-tokens F.npy] [--eval-tokens 32768] [--save DIR [--overwrite]] [--json OUT]

Calibration windows are sampled (seeded) from the training works by default;
``--calib-text F`` samples them the same way from any UTF-8 text file, and
``--calib-tokens F.npy`` uses the exact (N, T) integer windows of a .npy file
(``--calib-samples``/``--calib-seq-len`` are then ignored). The JSON records
``calibration_source`` and ``calibration_sha256`` (``lqx.data.tokens_sha256``), and
``--save-calib-tokens`` writes the (N, T) int32 windows used, to reuse elsewhere.
Evaluation uses the held-out works or ``--text-file``. ``--save DIR`` writes an orbax
checkpoint that ``experiments/eval_ppl.py --model DIR`` evaluates (an existing DIR
needs ``--overwrite``); it holds the tokenizer and the recipe applied, so it can be
moved anywhere and its recipe re-applied.

``--recipe F`` applies a recipe file (``lqx.recipe_file``: a list of ``{paths: <regex>,
method: <name>, ...fields}``, JSON or YAML) or the recipe stored in an lqx checkpoint
folder, instead of ``--method`` and its options (giving both is an error). Without it
the recipe is ``--method`` with its options on every block linear. ``--recipe-out F``
writes the recipe applied to a ``.json``/``.yaml`` file; to dump a checkpoint's recipe
without quantizing::

  python -c "import sys; from lqx import recipe; from lqx.io import checkpoint; \
             recipe.save_recipe(sys.argv[2], checkpoint.read_recipe(sys.argv[1]))" CKPT_DIR R.yaml

Arguments, input files (the recipe included) and output destinations are checked
before the model loads; an error prints one ``error: ...`` line (``--debug``: the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lqx import data, evaluate, io, recipe, recipe_file, tree
from lqx.io import checkpoint

if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402


METHOD_OPTIONS = ("method", "bits", "group_size", "group_axis", "sym", "act_order", "static_groups", "mse",
                  "scale_dtype", "sensitive_frac", "outlier_frac", "rank", "factor_bits")
"""Destinations of the options that build one method: not allowed with ``--recipe``."""
_UNSET = object()


def _parse(ap: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, list[str]]:
  """``(args, the METHOD_OPTIONS given on the command line)``; options not given take their defaults."""
  args = ap.parse_args(argv, namespace=argparse.Namespace(**{d: _UNSET for d in METHOD_OPTIONS}))
  given = [d for d in METHOD_OPTIONS if getattr(args, d) is not _UNSET]
  for d in METHOD_OPTIONS:
    if getattr(args, d) is _UNSET:
      setattr(args, d, ap.get_default(d))
  return args, given


def recipe_path(text: str) -> str:
  """argparse type: an existing recipe file (.json, .yaml, .yml) or lqx checkpoint folder."""
  path = Path(text).expanduser()
  if path.is_dir():
    if not checkpoint.is_checkpoint(path):
      raise argparse.ArgumentTypeError(f"{text!r} is a folder but not an lqx checkpoint (no {checkpoint.JSON_NAME})")
    return text
  return recipe_out(_cli.existing_file(text))


def recipe_out(text: str) -> str:
  """argparse type: a recipe file name (.json, .yaml, .yml)."""
  if Path(text).suffix.lower() not in recipe_file.SUFFIXES:
    raise argparse.ArgumentTypeError(f"{text!r}: a recipe file ends with {', '.join(recipe_file.SUFFIXES)}")
  return text


def _read_recipe(text: str) -> tuple:
  """The rules of ``--recipe`` (a file, or the recipe stored in a checkpoint folder)."""
  if Path(text).expanduser().is_dir():
    rules = checkpoint.read_recipe(text)
    if rules is None:
      raise ValueError(f"{text}: this lqx checkpoint stores no recipe (saved without one, or before lqx "
                       f"checkpoint version 4)")
    return rules
  return recipe.load_recipe(text)


def _scale_dtype(x):
  """The scale dtype of a method config or format (looking through wrappers' ``base``); None if it has none."""
  while x is not None and not hasattr(x, "scale_dtype"):
    x = getattr(x, "base", None)
  return None if x is None else np.dtype(x.scale_dtype)


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--model", type=_cli.model, default="smollm2-135m",
                  help="a named model, a .gguf file, or a Hugging Face folder")
  ap.add_argument("--recipe", metavar="F", type=recipe_path,
                  help="apply this recipe: a .json/.yaml/.yml file of rules {paths, method, ...fields} or an lqx "
                       "checkpoint folder's stored recipe (instead of --method and its options)")
  ap.add_argument("--recipe-out", metavar="F", type=lambda t: recipe_out(_cli.output_file(t)),
                  help="write the recipe applied to this .json/.yaml/.yml file")
  ap.add_argument("--method", choices=recipe.METHODS, default="gptq")
  ap.add_argument("--bits", type=int, choices=range(2, 9), metavar="{2..8}", default=4)
  ap.add_argument("--group-size", type=_cli.group_size, default=128, help="-1: per channel")
  ap.add_argument("--group-axis", choices=("oc", "ic"), default="oc", help="ignored by AdaDim (it chooses)")
  ap.add_argument("--sym", action=argparse.BooleanOptionalAction, default=False, help="--sym / --no-sym (asym)")
  ap.add_argument("--asym", dest="sym", action="store_false", help="same as --no-sym")
  ap.add_argument("--act-order", action="store_true", help="GPTQ: quantize rows by descending Hessian diagonal")
  ap.add_argument("--static-groups", action="store_true", help="GPTQ: group parameters fixed before the solve")
  ap.add_argument("--mse", action="store_true", help="MSE clipping search for the scales")
  ap.add_argument("--scale-dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                  help="storage dtype of the scales (float32: the reference GPTQ's); kernels whose scales "
                       "overflow it get float32 scales")
  ap.add_argument("--sensitive-frac", type=float, default=0.0,
                  help="SqueezeLLM: fraction of weights (most Fisher-sensitive) kept sparse (paper: 0.0005)")
  ap.add_argument("--outlier-frac", type=float, default=0.0,
                  help="SqueezeLLM: fraction of magnitude outliers kept sparse (paper: 0.004)")
  ap.add_argument("--fisher", metavar="F.npz", type=_cli.existing_file,
                  help="SqueezeLLM: diagonal Fisher saved by experiments/sensitivity.py --save-fisher "
                       "(default: computed from the calibration windows)")
  ap.add_argument("--rank", type=_cli.positive_int, default=8, help="LoRC (+lorc, +wlorc): rank of the error factors")
  ap.add_argument("--factor-bits", type=int, choices=(8, 16), default=8,
                  help="LoRC: factors stored as int8 (per-row scales) or float16")
  ap.add_argument("--true-sequential", action=argparse.BooleanOptionalAction,
                  default=recipe.DEFAULT_TRUE_SEQUENTIAL,
                  help="GPTQ's --true-sequential: each stage of a block is calibrated with the earlier stages "
                       "quantized; --no-true-sequential: all Hessians of a block from one forward, as the "
                       "reference llama.py does by default")
  ap.add_argument("--calib-samples", type=_cli.positive_int, default=None, help="windows sampled (default 32)")
  ap.add_argument("--calib-seq-len", type=_cli.seq_len, default=None,
                  help="tokens per sampled window (default 512)")
  source = ap.add_mutually_exclusive_group()
  source.add_argument("--calib-tokens", metavar="F.npy",
                      help="use these exact (N, T) integer calibration "
                      "windows (np.save); --calib-samples/--calib-seq-len are then ignored")
  source.add_argument("--calib-text", metavar="F",
                      help="sample the calibration windows from this UTF-8 text file instead of the training works")
  ap.add_argument("--save-calib-tokens", metavar="F.npy", type=_cli.output_file,
                  help="write the (N, T) int32 calibration windows used")
  ap.add_argument("--eval-tokens", type=_cli.nonneg_int, default=32768, help="held-out tokens evaluated (0: all)")
  ap.add_argument("--eval-seq-len", type=_cli.seq_len, default=512, help="tokens per evaluation window")
  ap.add_argument("--text-file", type=_cli.existing_file, help="evaluation text (default: held-out Shakespeare works)")
  ap.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
  ap.add_argument("--save", metavar="DIR", help="write the quantized model here (orbax checkpoint)")
  ap.add_argument("--overwrite", action="store_true", help="with --save: replace an existing checkpoint folder")
  ap.add_argument("--json", type=_cli.output_file, help="write the results here")
  args, given = _parse(ap, argv)
  for option, path in (("--calib-tokens", args.calib_tokens), ("--calib-text", args.calib_text)):
    if path is not None:  # checked after parsing, so that giving both is reported as such first
      try:
        _cli.existing_file(path)
      except argparse.ArgumentTypeError as e:
        ap.error(f"argument {option}: {e}")
  _cli.check_save(ap, args.save, args.overwrite)
  if args.eval_tokens and args.eval_tokens < args.eval_seq_len:
    ap.error(f"argument --eval-tokens: {args.eval_tokens} is less than one window of --eval-seq-len "
             f"{args.eval_seq_len} (0: all tokens)")
  if args.calib_tokens and (args.calib_samples is not None or args.calib_seq_len is not None):
    print(f"note: --calib-tokens {args.calib_tokens} gives the exact windows; --calib-samples/--calib-seq-len ignored")
  n_calib = 32 if args.calib_samples is None else args.calib_samples
  calib_len = 512 if args.calib_seq_len is None else args.calib_seq_len

  options = {}
  if args.recipe:
    if given:
      ap.error(f"argument --{given[0].replace('_', '-')}: not allowed with --recipe (the recipe sets the methods "
               f"and all their options)")
    try:
      rules = _read_recipe(args.recipe)
    except ValueError as e:  # RecipeError, CheckpointError: they name the file, rule and field
      ap.error(f"argument --recipe: {e}")
  else:
    if args.method.split("+")[0] == "squeezellm":
      options.update(sensitive_frac=args.sensitive_frac, outlier_frac=args.outlier_frac)
    elif args.sensitive_frac or args.outlier_frac:
      ap.error(f"--sensitive-frac/--outlier-frac are SqueezeLLM options; --method {args.method} takes neither")
    if "+" in args.method:
      options.update(rank=args.rank, factor_bits=args.factor_bits)
    try:
      method = recipe.make_method(args.method, bits=args.bits, group_size=args.group_size,
                                  group_axis=args.group_axis, sym=args.sym, act_order=args.act_order,
                                  static_groups=args.static_groups, mse=args.mse,
                                  scale_dtype=getattr(jnp, args.scale_dtype), **options)
    except ValueError as e:
      ap.error(str(e))
    rules = recipe.default_recipe(method)
  methods = [r.method for r in rules if r.method is not None]
  recipe_json = recipe_file.encode(rules)
  fisher = None
  if args.fisher:
    if not any("fisher" in m.stats for m in methods):
      what = f"--recipe {args.recipe}" if args.recipe else f"--method {args.method}"
      ap.error(f"--fisher is for methods that use the Fisher (SqueezeLLM); {what} has none")
    from lqx.quant import fisher as fisher_lib  # noqa: PLC0415
    fisher = fisher_lib.load_fisher(args.fisher)
  config, params = io.load_model(args.model)
  params = jax.tree.map(jnp.asarray, params)
  for option, n in (("--calib-seq-len", calib_len), ("--eval-seq-len", args.eval_seq_len)):
    if n > config.max_seq_len:
      raise _cli.UsageError(f"argument {option}: {n} exceeds the model's max_seq_len {config.max_seq_len}")
  tokenizer = io.load_tokenizer(args.model)
  if args.calib_tokens:
    calib = data.load_calibration_tokens(args.calib_tokens, vocab_size=config.vocab_size)
    calib_source = str(args.calib_tokens)
  elif args.calib_text:
    calib = data.sample_text_windows(tokenizer, args.calib_text, n_calib, calib_len, args.seed)
    calib_source = str(args.calib_text)
  else:
    train = data.tokenize(tokenizer, data.load_text("train"))
    calib = data.sample_windows(train, n_calib, calib_len, args.seed)
    calib_source = "train-works"
  calib_sha = data.tokens_sha256(calib)
  if args.save_calib_tokens:
    with open(args.save_calib_tokens, "wb") as f:  # to this exact path (np.save would append ".npy")
      np.save(f, calib.astype(np.int32), allow_pickle=False)
    print(f"saved {calib.shape[0]} x {calib.shape[1]} calibration windows (sha256 {calib_sha}) "
          f"to {args.save_calib_tokens}")
  if args.text_file:
    with open(args.text_file, encoding="utf-8") as f:
      evaluation = data.tokenize(tokenizer, f.read())
  else:
    evaluation = data.tokenize(tokenizer, data.load_text("heldout"))
  if len(evaluation) < args.eval_seq_len:
    raise _cli.UsageError(f"argument --text-file: {args.text_file or 'the held-out text'} has {len(evaluation)} "
                          f"tokens, fewer than one window of --eval-seq-len {args.eval_seq_len}")
  max_tokens = args.eval_tokens or None

  qparams, report = recipe.quantize(config, params, rules, calib, true_sequential=args.true_sequential, fisher=fisher)
  fp = evaluate.perplexity(config, params, evaluation, seq_len=args.eval_seq_len, max_tokens=max_tokens)
  q = evaluate.perplexity(config, qparams, evaluation, seq_len=args.eval_seq_len, max_tokens=max_tokens)
  axes = sorted({l.group_axis for l in report.layers})
  targets = recipe.match(rules, params)
  wide = [l.name for l in report.layers  # kernels whose scales overflowed their method's scale dtype (float32 instead)
          if _scale_dtype(tree.get(qparams, l.name)) not in (None, _scale_dtype(targets.get(l.name)))]
  if args.recipe:
    label = f"recipe {args.recipe}"
    one = {"method": "recipe", "method_name": ", ".join(sorted({m.name for m in methods})), "options": {},
           "bits": None, "group_size": None, "group_axis": None, "sym": None, "act_order": None, "scale_dtype": None}
  else:
    label = f"{args.method} W{args.bits} g{args.group_size}"
    one = {"method": args.method, "method_name": method.name, "options": options, "bits": args.bits,
           "group_size": args.group_size,
           "group_axis": args.group_axis if not args.method.startswith("adadim") else "adaptive",
           "sym": args.sym, "act_order": args.act_order, "scale_dtype": args.scale_dtype}
  out = {
      "model": str(args.model), **one, "recipe_source": args.recipe, "recipe": recipe_json,
      "bits_per_weight": report.bits_per_weight,
      "ppl_fp": fp.ppl, "ppl_q": q.ppl, "paired": evaluate.paired_difference(fp, q),
      "eval_tokens": q.tokens, "eval_seq_len": args.eval_seq_len,
      "calib_samples": int(calib.shape[0]), "calib_seq_len": int(calib.shape[1]), "seed": args.seed,
      "calibration_source": calib_source, "calibration_sha256": report.calibration_sha256,
      "quantize_seconds": report.seconds, "timings": report.timings, "axes_used": axes,
      "float32_scale_layers": wide, "true_sequential": args.true_sequential,
      "layers": [{"name": l.name, "error": l.error, "error_kind": l.error_kind, "group_axis": l.group_axis,
                  "bits_per_weight": l.bits_per_weight, "candidates": l.candidates, "skipped": l.skipped}
                 for l in report.layers],
  }
  print(f"{label}: {report.bits_per_weight:.3f} bits/weight, "
        f"ppl {fp.ppl:.2f} (float) -> {q.ppl:.2f} on {q.tokens} tokens; quantized in {report.seconds:.0f} s")
  if any(m.name.startswith("adadim") for m in methods):
    n_ic = sum(l.group_axis == "ic" for l in report.layers)
    print(f"AdaDim chose per-IC for {n_ic} of {len(report.layers)} layers")
  if wide:
    print(f"{len(wide)} layers have float32 scales (their method's scale dtype would overflow): {', '.join(wide)}")
  if args.save:
    source = args.model if args.model in io.NAMED_MODELS else str(Path(args.model).resolve())
    meta = {k: v for k, v in out.items() if k not in ("layers", "recipe")}  # the recipe is stored on its own
    path = checkpoint.save(args.save, config, qparams, metadata={**meta, "source_model": source},
                           tokenizer=tokenizer, recipe=rules, overwrite=args.overwrite)
    print(f"saved to {path} (with its tokenizer and recipe)")
  if args.recipe_out:
    recipe.save_recipe(args.recipe_out, rules)
    print(f"wrote the recipe to {args.recipe_out}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  _cli.run(main)
