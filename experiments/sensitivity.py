"""Per-layer sensitivity: diagonal empirical Fisher of every block linear (SqueezeLLM's weights).

  python experiments/sensitivity.py [--model smollm2-135m] [--samples 32 --seq-len 512 --seed 0 | --calib-tokens F.npy]
      [--subset 16] [--compare F.npz] [--save-fisher F.npz | --load-fisher F.npz]
      [--rtn-bits 3 --group-size 128] [--hessian] [--ablation [--ablation-quant rtn:3:128]]
      [--json OUT] [--plot OUT.png]

F = sum over windows of (d loss / d W)^2, one window per gradient (``lqx.quant.fisher``).
The windows are sampled from the training works exactly as ``experiments/quantize.py``
samples its calibration (same ``--samples``/``--seq-len``/``--seed``: same windows, same
``calibration_sha256``); ``--calib-tokens`` uses the exact (N, T) windows of a .npy file.

Per kernel the JSON has the Fisher trace / mean / max, and under round-to-nearest at
``--rtn-bits``/``--group-size`` (per-OC groups, asym) the Fisher-weighted error
sum F (W - Q)^2 and the plain sum (W - Q)^2; ``--hessian`` adds tr H and GPTQ's proxy
tr((W-Q)^T H (W-Q)) from ``lqx.calibrate.capture`` (a forward and a full (IC, IC) H per
kernel: about 0.3x the Fisher's FLOPs, estimated, not timed on SmolLM2). ``--subset K`` compares the Fisher of the first K
windows with that of all (nested sets); ``--compare F.npz`` compares with a saved Fisher
(e.g. another seed: independent sets). The cost is reported as seconds per window (the
first, which compiles, excluded) beside the machine's float32 2048^3 matmul GFLOP/s
measured in the same run.

``--ablation`` adds per block (``lqx.quant.ablation``, HierarchicalPrune's block removal) the
change of the calibration loss (nats/token, same windows) when the block is skipped in
the float model (``skip_delta`` = loss skipped - loss float) and when it is restored to
float in the model quantized by ``--ablation-quant`` (``restore_delta`` = loss quantized -
loss restored); both > 0 when the block matters. Beside them, the block's summed Fisher
trace and its summed Fisher-weighted (and, with ``--hessian``, GPTQ-proxy) error under
that same quantization, and the Spearman/Pearson agreement of these across blocks.
``--plot`` draws layers x projections heatmaps (log scale), and with ``--ablation`` the
per-block deltas beside them.
Arguments and files are checked before the model loads; an error prints one
``error: ...`` line (``--debug``: the traceback).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np

from lqx import calibrate, data, io, recipe, tree
from lqx.models import llama
from lqx.quant import ablation, fisher
from lqx.quant.rtn import RTNConfig

if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402
from _bench import matmul_gflops  # noqa: E402
from bench_forward import forward_flops  # noqa: E402

PROJECTIONS = tuple(lin.split("/")[1] for stage in llama.STAGES for lin in stage.linears)  # q, k, v, o, gate, up, down
ABLATION_QUANT = "rtn:3:128"


def quant_spec(text: str) -> tuple[str, object]:
  """argparse type: ``method:bits:group_size`` -> (the text, the method config)."""
  parts = text.split(":")
  try:
    if len(parts) != 3:
      raise ValueError
    return text, recipe.make_method(parts[0], bits=int(parts[1]), group_size=int(parts[2]))
  except ValueError as e:
    detail = f" ({e})" if str(e) else ""
    raise argparse.ArgumentTypeError(f"{text!r} is not method:bits:group_size with a registered method, "
                                     f"e.g. {ABLATION_QUANT}{detail}") from None


def parse(argv=None):
  ap = _cli.parser(__doc__)
  ap.add_argument("--model", type=_cli.model, default="smollm2-135m",
                  help="a named model, a .gguf file, or a Hugging Face or lqx checkpoint folder")
  ap.add_argument("--samples", type=_cli.positive_int, default=32, help="calibration windows sampled")
  ap.add_argument("--seq-len", type=_cli.seq_len, default=512, help="tokens per window")
  ap.add_argument("--seed", type=int, default=0, help="window sampling seed (as quantize.py's)")
  ap.add_argument("--calib-tokens", metavar="F.npy", type=_cli.existing_file,
                  help="use these exact (N, T) integer windows (np.save); --samples/--seq-len/--seed are then ignored")
  ap.add_argument("--subset", type=_cli.positive_int, metavar="K",
                  help="also compare the Fisher of the first K windows with that of all of them")
  ap.add_argument("--compare", metavar="F.npz", type=_cli.existing_file,
                  help="compare the Fisher with this saved one (--save-fisher of another run)")
  cache = ap.add_mutually_exclusive_group()
  cache.add_argument("--save-fisher", metavar="F.npz", type=_cli.output_file, help="write the Fisher here")
  cache.add_argument("--load-fisher", metavar="F.npz", type=_cli.existing_file,
                     help="read the Fisher from here instead of computing it")
  ap.add_argument("--rtn-bits", type=int, choices=range(2, 9), metavar="{2..8}", default=3,
                  help="bits of the RTN quantization whose Fisher-weighted error is reported")
  ap.add_argument("--group-size", type=_cli.group_size, default=128, help="RTN group size (-1: per channel)")
  ap.add_argument("--hessian", action="store_true", help="also tr H and GPTQ's proxy error (lqx.calibrate.capture)")
  ap.add_argument("--ablation", action="store_true",
                  help="also per block: the loss change with it skipped, and with it restored to float in the "
                       "model quantized by --ablation-quant (lqx.quant.ablation)")
  ap.add_argument("--ablation-quant", type=quant_spec, metavar="METHOD:BITS:GROUP",
                  help=f"the uniform quantization of --ablation's float-restore (default: {ABLATION_QUANT}, data-free)")
  ap.add_argument("--frac", type=float, default=0.0005, help="top fraction of entries compared (SqueezeLLM: 0.05%%)")
  ap.add_argument("--json", type=_cli.output_file, help="write the results here")
  ap.add_argument("--plot", metavar="OUT.png", type=_cli.output_file, help="write the heatmaps here")
  args = ap.parse_args(argv)
  if args.load_fisher and args.subset:
    ap.error("argument --subset: needs the Fisher computed here, not --load-fisher")
  if args.subset and not args.calib_tokens and args.subset >= args.samples:
    ap.error(f"argument --subset: {args.subset} must be less than --samples {args.samples}")
  if not 0 < args.frac <= 1:
    ap.error(f"argument --frac: expected a fraction in (0, 1], got {args.frac}")
  if args.ablation_quant and not args.ablation:
    ap.error("argument --ablation-quant: only applies with --ablation")
  if args.ablation and not args.ablation_quant:
    args.ablation_quant = quant_spec(ABLATION_QUANT)
  return args


def windows(args, config) -> tuple[np.ndarray, str]:
  """The (N, T) calibration windows and where they come from."""
  if args.calib_tokens:
    return data.load_calibration_tokens(args.calib_tokens, vocab_size=config.vocab_size), str(args.calib_tokens)
  if args.seq_len > config.max_seq_len:
    raise _cli.UsageError(f"argument --seq-len: {args.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
  train = data.tokenize(io.load_tokenizer(args.model), data.load_text("train"))
  return data.sample_windows(train, args.samples, args.seq_len, args.seed), "train-works"


def timed_fisher(config, params, tokens, subset: int | None) -> tuple[dict, dict | None, dict]:
  """Fisher over all windows, over the first ``subset`` (or None), and timings (first window, which compiles, apart)."""
  t0 = time.perf_counter()
  f = jax.block_until_ready(fisher.llama_fisher(config, params, tokens[:1], progress=False))
  first = time.perf_counter() - t0
  f_sub = None
  if subset:
    f = fisher.llama_fisher(config, params, tokens[1:subset], init=f) if subset > 1 else f
    f_sub = {k: np.asarray(v) for k, v in f.items()}
  start = subset or 1
  if start < len(tokens):
    f = fisher.llama_fisher(config, params, tokens[start:], init=f)
  f = {k: np.asarray(v) for k, v in f.items()}  # blocks
  total = time.perf_counter() - t0
  n = len(tokens)
  steady = (total - first) / (n - 1) if n > 1 else None
  return f, f_sub, {"seconds_total": total, "seconds_first_window": first, "seconds_per_window": steady}


def layer_rows(params, f: dict, hessians: dict | None, rtn: RTNConfig) -> list[dict]:
  """One ``fisher.summarize`` row per kernel of ``f``, with its layer and projection, under RTN ``rtn``."""
  rows = []
  for path, fp in f.items():
    m = re.fullmatch(r"layers_(\d+)/(attn|mlp)/(\w+_proj)/kernel", path)
    w = tree.get(params, path)
    q = rtn.quantize(w, name=path)[0]
    h = None if hessians is None else hessians[path]["hessian"]
    rows.append({"name": path, "layer": int(m[1]) if m else None, "proj": m[3] if m else None,
                 **fisher.summarize(w, fp, hessian=h, q=q)})
  return rows


def block_rows(config, params, qparams, f: dict, hessians: dict | None, skip, restore) -> list[dict]:
  """One row per block: its two ablations (``lqx.quant.ablation.BlockAblation``), and the sums over its
  kernels of the Fisher trace and, under the quantization ``qparams``, of F (W-Q)^2 (and GPTQ's proxy)."""
  keys = ("fisher_trace", "fisher_error", "hessian_error")
  rows = []
  for i in range(config.n_layers):
    sums = {}
    for path in (p for p in f if p.startswith(f"layers_{i}/")):
      h = None if hessians is None else hessians[path]["hessian"]
      s = fisher.summarize(tree.get(params, path), f[path], hessian=h, q=tree.get(qparams, path))
      for k in keys:
        if k in s:
          sums[k] = sums.get(k, 0.0) + s[k]
    rows.append({"block": i, "skip_loss": skip.losses[i], "skip_delta": skip.deltas[i],
                 "restore_loss": restore.losses[i], "restore_delta": restore.deltas[i], **sums})
  return rows


def block_correlations(blocks: list[dict]) -> dict:
  """Pearson and Spearman across blocks of the restore delta with the other signals (those present)."""
  pairs = (("restore_delta", "fisher_error"), ("restore_delta", "hessian_error"), ("restore_delta", "skip_delta"),
           ("fisher_error", "hessian_error"))
  return {f"{a}_vs_{b}": fisher.correlations([r[a] for r in blocks], [r[b] for r in blocks])
          for a, b in pairs if len(blocks) >= 2 and a in blocks[0] and b in blocks[0]}


def heatmaps(rows: list[dict], keys: dict, path: str | Path, *, title: str = "", blocks: list[dict] | None = None,
             quant: str = "") -> Path:
  """One layers x projections heatmap (log color scale) per ``keys`` entry (row key -> panel title); with
  ``blocks`` (``block_rows``), two more panels of their skip and float-restore (under ``quant``) deltas."""
  from matplotlib.colors import LogNorm
  from matplotlib.figure import Figure

  layers = sorted({r["layer"] for r in rows})
  bars = {} if blocks is None else {"skip_delta": "skip delta (float model), nats/token",
                                    "restore_delta": f"float-restore delta ({quant}), nats/token"}
  fig = Figure(figsize=(4.2 * len(keys) + 3.4 * len(bars), 0.22 * len(layers) + 2.0))
  axes = fig.subplots(1, len(keys) + len(bars), squeeze=False,
                      gridspec_kw={"width_ratios": [4.2] * len(keys) + [3.4] * len(bars)})[0]
  for ax, (key, label) in zip(axes[len(keys):], bars.items()):  # rows line up with the heatmaps' layers
    ax.barh([r["block"] for r in blocks], [r[key] for r in blocks], height=0.8, color="tab:red")
    ax.axvline(0, color="k", linewidth=0.6)
    ax.set_ylim(max(r["block"] for r in blocks) + 0.5, min(r["block"] for r in blocks) - 0.5)
    ax.set_yticks([r["block"] for r in blocks], [r["block"] for r in blocks], fontsize=6)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_ylabel("block")
    ax.set_title(label, fontsize=9)
  for ax, (key, label) in zip(axes, keys.items()):
    grid = np.full((len(layers), len(PROJECTIONS)), np.nan)
    for r in rows:
      if r["proj"] in PROJECTIONS and r.get(key, 0) > 0:
        grid[layers.index(r["layer"]), PROJECTIONS.index(r["proj"])] = r[key]
    finite = grid[np.isfinite(grid)]
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None
    im = ax.imshow(grid, aspect="auto", norm=norm, cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(PROJECTIONS)), [p.removesuffix("_proj") for p in PROJECTIONS], fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.set_ylabel("layer")
    ax.set_title(label, fontsize=9)
    fig.colorbar(im, ax=ax)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  return path


def main(argv=None) -> dict:
  args = parse(argv)
  rtn = RTNConfig(bits=args.rtn_bits, group_size=args.group_size)
  config, params = io.load_model(args.model)[:2]
  tokens, source = windows(args, config)
  tokens = llama.check_tokens(config, tokens)
  n, seq_len = tokens.shape
  if args.subset and args.subset >= n:
    raise _cli.UsageError(f"argument --subset: {args.subset} must be less than the {n} windows")
  paths = fisher.block_linear_paths(params)
  if not paths:
    raise ValueError(f"{args.model}: no block linear kernels ({fisher.BLOCK_LINEARS}) in the model")
  other = fisher.load_fisher(args.compare, params) if args.compare else None
  gflops = matmul_gflops()
  if args.load_fisher:
    f, f_sub, timing = fisher.load_fisher(args.load_fisher, params), None, {}
    if set(f) != set(paths):
      raise ValueError(f"{args.load_fisher}: holds {len(f)} kernels; expected the model's {len(paths)} block linears")
  else:
    f, f_sub, timing = timed_fisher(config, params, tokens, args.subset)
  hessians = None
  if args.hessian:
    t0 = time.perf_counter()
    hessians = calibrate.capture(llama.units(config), params, [tokens[i:i + 1] for i in range(n)], paths=set(paths))
    timing["seconds_hessian"] = time.perf_counter() - t0
  rows = layer_rows(params, f, hessians, rtn)
  blocks = None
  if args.ablation:
    quant_label, method = args.ablation_quant
    t0 = time.perf_counter()
    qparams, report = recipe.quantize(config, params, recipe.default_recipe(method), tokens, fisher=f, progress=False)
    timing["seconds_ablation_quantize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    skip = ablation.skip_block_losses(config, params, tokens)
    restore = ablation.restore_block_losses(config, qparams, params, tokens)
    timing["seconds_ablation"] = time.perf_counter() - t0
    blocks = block_rows(config, params, qparams, f, hessians, skip, restore)
  # One backward costs about two forwards; the tied embedding's weight gradient is not needed.
  gflop = (3 * forward_flops(config, 1, seq_len) - 2 * config.dim * config.vocab_size * seq_len) / 1e9
  out = {
      "model": str(args.model), "samples": n, "seq_len": seq_len, "seed": None if args.calib_tokens else args.seed,
      "calibration_source": source, "calibration_sha256": data.tokens_sha256(tokens), "kernels": len(f),
      "fisher": "sum over windows of (d mean-token-CE / dW)^2, float32", "fisher_file": args.load_fisher,
      "rtn": {"bits": args.rtn_bits, "group_size": args.group_size, "group_axis": "oc", "sym": False},
      "matmul_gflops": gflops, "gflop_per_window_estimate": gflop, **timing,
      "layers": rows,
  }
  if timing.get("seconds_per_window"):
    out["achieved_gflops_estimate"] = gflop / timing["seconds_per_window"]
  if blocks is not None:
    out["ablation"] = {
        "quant": quant_label, "bits_per_weight": report.bits_per_weight, "loss_float": skip.base, "loss_quant": restore.base,
        "loss": "mean next-token NLL (nats/token) on the calibration windows",
        "skip_delta": "loss with the block skipped in the float model - loss_float (> 0: the block matters)",
        "restore_delta": "loss_quant - loss with the block restored to float (> 0: quantizing it costs loss)",
        "fisher_error": "sum over the block's kernels of F (W - Q)^2, Q the quant's kernels (hessian_error: "
                        "sum of tr((W-Q)^T H (W-Q)))",
        "correlations": block_correlations(blocks)}
    out["blocks"] = blocks
  if hessians is not None:
    out["layers_fisher_vs_hessian_error"] = fisher.correlations([r["fisher_error"] for r in rows],
                                                                [r["hessian_error"] for r in rows])
  if f_sub is not None:
    out["subset"] = {"windows": args.subset, "vs": n, **fisher.compare(f_sub, f, frac=args.frac)}
  if other is not None:
    out["compare"] = {"file": str(args.compare), **fisher.compare(f, other, frac=args.frac)}
  if args.save_fisher:
    fisher.save_fisher(args.save_fisher, f)
    print(f"saved the Fisher of {len(f)} kernels ({n} x {seq_len} windows) to {args.save_fisher}")

  spw = timing.get("seconds_per_window")
  if spw:
    print(f"Fisher: {n} windows x {seq_len} tokens in {timing['seconds_total']:.0f} s; {spw:.2f} s per window "
          f"after the first ({timing['seconds_first_window']:.1f} s, compiles), ~{gflop:.0f} GFLOP each "
          f"({gflop / spw:.0f} GFLOP/s); float32 2048^3 matmul here: {gflops:.0f} GFLOP/s")
  by_proj = {p: sum(r["fisher_trace"] for r in rows if r["proj"] == p) for p in PROJECTIONS}
  print("Fisher trace by projection: " + ", ".join(f"{p} {v:.3g}" for p, v in by_proj.items()))
  top = sorted(rows, key=lambda r: -r["fisher_error"])[:5]
  print(f"largest sum F (W-Q)^2 under RTN W{args.rtn_bits} g{args.group_size}: "
        + ", ".join(f"{r['name']} {r['fisher_error']:.3g}" for r in top))
  for key, label in (("subset", f"first {args.subset} vs all {n}"), ("compare", f"vs {args.compare}")):
    if key in out:
      s, l = out[key]["summary"], out[key]["layers"]
      print(f"{label}: layer traces Spearman {l['spearman_trace']:.3f}, log-Pearson {l['pearson_log_trace']:.3f}; "
            f"entries Spearman mean {s['spearman_mean']:.3f} (min {s['spearman_min']:.3f}), top-{args.frac:.2%} "
            f"overlap mean {s['top_overlap_mean']:.3f} (min {s['top_overlap_min']:.3f})")
  if blocks is not None:
    ab = out["ablation"]
    print(f"calibration loss: float {ab['loss_float']:.4f}, {quant_label} {ab['loss_quant']:.4f} nats/token "
          f"({ab['bits_per_weight']:.2f} bits/weight)")
    for key, what in (("skip_delta", "skip"), ("restore_delta", f"float-restore ({quant_label})")):
      order = sorted(blocks, key=lambda b: -b[key])
      print(f"{what} delta by block: largest " + ", ".join(f"{b['block']} {b[key]:+.4f}" for b in order[:5])
            + "; smallest " + ", ".join(f"{b['block']} {b[key]:+.4f}" for b in order[-3:]))
    print("across blocks, Spearman: " + ", ".join(f"{k} {v['spearman']:.3f}" for k, v in ab["correlations"].items()))
  if args.plot:
    keys = {"fisher_mean": "mean Fisher per weight", "fisher_trace": "Fisher trace",
            "fisher_error": f"sum F (W-Q)^2, RTN W{args.rtn_bits} g{args.group_size}"}
    heatmaps(rows, keys, args.plot, title=f"{args.model}: Fisher of {n} x {seq_len} windows ({source})",
             blocks=blocks, quant=quant_label if blocks else "")
    print(f"plot: {args.plot}")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(out, fh, indent=2)
  return out


if __name__ == "__main__":
  _cli.run(main)
