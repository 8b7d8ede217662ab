"""Markdown tables of ``gptq_parity.py`` runs: reference vs lqx per calibration seed, with mean, spread and ratios.

  python experiments/parity_table.py results/gptq_parity_w3.json [MORE.json ...] [--md OUT.md]

Runs of several JSON files (e.g. extra seeds run later) are merged by (bits, seed);
the files must agree on model, group size, calibration and evaluation sizes, and a
seed present in two files must have the same calibration sha256 (the same token
ids). Per bit width it prints:

* perplexity per seed for the reference and each lqx pipeline / scale dtype, mean ±
  sample sd, the ratio of means, and the **paired** ratio (lqx / reference on the same
  seed, mean ± sd over seeds, with a 95% t-interval when there are 3 seeds or more);
* end-to-end identical codes and the per-layer proxy-loss ratio (medians);
* (a) lqx's solver on the reference's own Hessians: both in float32 as run, and both
  in float64 (where the JSON has it), as min / mean identical codes and layers under 99.9%;
* the reference's rounding-only variants, paired with the reference on the same seed.

Arguments are checked before anything is read; an error prints one ``error: ...``
line (``--debug``: the traceback).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _cli  # noqa: E402

SETTINGS = ("model", "group_size", "calib_samples", "calib_seq_len", "eval_tokens")
# Two-sided 95% Student-t quantiles by degrees of freedom (n - 1), for the paired interval.
T95 = {2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def load(paths: list[str]) -> tuple[dict, dict]:
  """``(settings, {(bits, seed): run})`` merged over ``paths``; ``ValueError`` on mismatches."""
  settings, runs = None, {}
  for path in paths:
    try:
      doc = json.loads(Path(path).read_text())
      these = {k: doc[k] for k in SETTINGS}
      doc_runs = list(doc["runs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path}: not a gptq_parity.py JSON ({_cli.describe(e)})") from None
    if settings is None:
      settings = these
    elif these != settings:
      diff = {k: (settings[k], these[k]) for k in SETTINGS if settings[k] != these[k]}
      raise ValueError(f"{path}: settings differ from {paths[0]}'s: {diff}")
    for run in doc_runs:
      key = (run["bits"], run["seed"])
      old = runs.get(key)
      if old is not None and old["calibration_sha256"] != run["calibration_sha256"]:
        raise ValueError(f"{path}: W{key[0]} seed {key[1]} has other calibration tokens than an earlier file's")
      runs[key] = {**(old or {}), **run}
  return settings, runs


def _sd(xs: list[float]) -> float:
  return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _paired(ratios: list[float]) -> str:
  """Mean ± sd of per-seed ratios - 1, in percent, with a 95% t-interval for n >= 3."""
  m, s = statistics.fmean(ratios) - 1, _sd(ratios)
  out = f"{m:+.1%} ± {s:.1%}"
  if len(ratios) >= 3:
    half = T95.get(len(ratios) - 1, 1.96) * s / len(ratios) ** 0.5
    out += f" [{m - half:+.1%}, {m + half:+.1%}]"
  return out


def columns(runs: list[dict]) -> list[str]:
  """lqx result keys present in any run, reference pipeline first."""
  keys = {k for r in runs for k in r if k.startswith("lqx_")}
  return sorted(keys, key=lambda k: (k.split("_")[1] != "reference", k))


def label(key: str) -> str:
  _, mode, sd = key.split("_")
  return f"lqx {'reference' if mode == 'reference' else 'true-seq'}, {'f32' if sd == 'float32' else 'f16'} scales"


def table(bits: int, runs: list[dict], group_size: int) -> str:
  """Markdown for one bit width; ``runs`` sorted by seed. A column missing on some seeds shows "–"
  there, and its summaries (marked ``n=``) use the seeds it has."""
  cols = columns(runs)
  ref = [r["reference"]["ppl"] for r in runs]
  lines = [f"**W{bits} g{group_size}**, seeds {', '.join(str(r['seed']) for r in runs)}", "",
           "| calibration seed | reference GPTQ | " + " | ".join(label(c) for c in cols) + " |",
           "|---" * (len(cols) + 2) + "|"]
  for r in runs:
    lines.append(f"| {r['seed']} | {r['reference']['ppl']:.1f} | " +
                 " | ".join(f"{r[c]['ppl']:.1f}" if c in r else "–" for c in cols) + " |")
  have = {c: [r for r in runs if c in r] for c in cols}
  n = {c: "" if len(rs) == len(runs) else f" (n={len(rs)})" for c, rs in have.items()}
  ppl = {c: [r[c]["ppl"] for r in rs] for c, rs in have.items()}
  ref_of = {c: [r["reference"]["ppl"] for r in rs] for c, rs in have.items()}
  lines.append(f"| **mean ± sd** | **{statistics.fmean(ref):.1f} ± {_sd(ref):.1f}** | " +
               " | ".join(f"**{statistics.fmean(ppl[c]):.1f} ± {_sd(ppl[c]):.1f}**{n[c]}" for c in cols) + " |")
  lines.append("| mean vs reference's mean (same seeds) | | " +
               " | ".join(f"{statistics.fmean(ppl[c]) / statistics.fmean(ref_of[c]) - 1:+.1%}" for c in cols) + " |")
  lines.append("| paired: lqx / reference per seed, mean ± sd [95% t-interval] | | " +
               " | ".join(_paired([a / b for a, b in zip(ppl[c], ref_of[c])]) for c in cols) + " |")
  for key, what in (("e2e_same_codes_mean", "same codes as the reference end to end (mean over layers)"),
                    ("proxy_ratio_median", "per-layer proxy loss / reference's (median over layers)")):
    lines.append(f"| {what}; median over seeds | | " +
                 " | ".join(f"{statistics.median(r[c][key] for r in have[c]):.3f}" for c in cols) + " |")
  lines.append("")
  for key, what in (("solver_on_reference_hessian", "both solvers in float32, as run"),
                    ("solver_on_reference_hessian_float64", "both solvers in float64 (scales rounded to float32)")):
    have = [r for r in runs if key in r]
    if not have:
      continue
    per = "; ".join(f"seed {r['seed']}: min {r[key]['min_same_codes']:.5f}, mean {r[key]['mean_same_codes']:.5f}, "
                    f"{r[key]['layers_below_99.9%']} of {r[key]['layers']} layers below 99.9%" for r in have)
    lines.append(f"(a) lqx's solver on the reference's own Hessians, {what}: {per}.")
    lines.append("")
  variants = sorted({k for r in runs for k in r if k.startswith("reference_") and "ppl" in r[k]})
  for v in variants:
    have = [r for r in runs if v in r]
    per = ", ".join(f"seed {r['seed']} {r[v]['ppl']:.1f} vs {r['reference']['ppl']:.1f} "
                    f"({r[v]['ppl'] / r['reference']['ppl'] - 1:+.1%})" for r in have)
    lines.append(f"Reference rerun with a rounding-only change ({v.removeprefix('reference_')}): {per}.")
  return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> str:
  ap = _cli.parser(__doc__)
  ap.add_argument("json", nargs="+", type=_cli.existing_file, help="gptq_parity.py JSON files")
  ap.add_argument("--md", type=_cli.output_file, help="write the tables here")
  args = ap.parse_args(argv)
  settings, runs = load(args.json)
  out = []
  for bits in sorted({b for b, _ in runs}, reverse=True):
    these = [runs[k] for k in sorted(runs) if k[0] == bits]
    if not all("reference" in r for r in these):
      raise _cli.UsageError(f"W{bits}: a run has no reference result")
    out.append(table(bits, these, settings["group_size"]))
  text = "\n".join(out)
  print(text)
  if args.md:
    Path(args.md).write_text(text)
  return text


if __name__ == "__main__":
  _cli.run(main)
