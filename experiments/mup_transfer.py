"""Width transfer of lr and weight decay under width-scaled AdamW (arXiv 2510.15262).

  python experiments/mup_transfer.py [--quick] [--only llama|synthetic] [--json OUT]
      [--figures DIR] [--no-progress]
  python experiments/mup_transfer.py --replot results/mup_transfer.json [--json OUT]

Byte-level LLaMA models on Shakespeare's training works and the teacher-student
residual MLP, each swept over base lr and base weight decay at several widths
for the decay rules wd_2 ∝ (d/d0)**e, e in {0, 0.5, 1} (``lqx.studies.mup_transfer``).
The full study takes about an hour on 2 CPU cores and writes its figures to
results/; ``--quick`` runs every code path in a few minutes (figures only with
``--figures``). ``--replot`` re-fits and redraws a saved result without training.
Arguments are checked before any model loads; an error prints one ``error: ...``
line (``--debug``: the traceback).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path


if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--quick", action="store_true", help="small widths and grids, short runs")
  ap.add_argument("--only", choices=["llama", "synthetic"], help="run one setting only")
  ap.add_argument("--json", type=_cli.output_file, help="write the results here")
  ap.add_argument("--figures", type=_cli.output_dir, help="folder for the figures (default: --out-dir without --quick)")
  ap.add_argument("--no-progress", action="store_true", help="no progress bars")
  ap.add_argument("--replot", type=_cli.existing_file, help="a saved result JSON: re-fit and redraw it, no training")
  args = ap.parse_args(argv)
  if args.replot and (args.quick or args.only):
    ap.error("argument --replot: redraws a saved result; --quick/--only apply to a new run")
  from lqx.studies import mup_transfer  # after the arguments are checked: it loads slowly

  if args.replot:
    with open(args.replot) as f:
      result = mup_transfer.reanalyze(json.load(f))
  else:
    config = mup_transfer.quick_config() if args.quick else mup_transfer.full_config()
    if args.only:
      config = dataclasses.replace(config, **{"synthetic" if args.only == "llama" else "llama": None})
    result = mup_transfer.run_study(config, progress=not args.no_progress)
  figures = args.figures if args.figures or args.quick else args.out_dir
  if figures:
    result["figures"] = mup_transfer.save_figures(result, figures)
  for name in ("llama", "synthetic"):
    if name in result:
      r = result[name]
      slopes = {k: v["slope"] for k, v in (r["steady"] or r["sigma"]).items()}
      print(f"{name}: optimum log2 lr per width "
            f"{ {k: {w: o['log2_lr'] for w, o in v.items()} for k, v in r['optima'].items()} }")
      print(f"{name}: sigma_top slopes {slopes}; joint fit {r['joint']}; claims {r['claims']}")
  if args.json:
    with open(args.json, "w") as f:
      f.write(_dumps(result))
  return result


def _dumps(result: dict) -> str:
  """Indented JSON with lists of numbers (traces, spectra) kept on one line each."""
  text = json.dumps(result, indent=1)
  compact = lambda m: json.dumps(json.loads(m.group(0)), separators=(",", ":"))  # noqa: E731
  text = re.sub(r"\[[-\d.e,\s]*\]", compact, text)
  return re.sub(r"\[\s*(\[[-\d.e,]*\],?\s*)+\]", compact, text)


if __name__ == "__main__":
  _cli.run(main)
