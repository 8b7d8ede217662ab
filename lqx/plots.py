"""Figures shared by the experiment scripts and notebooks.

Built on ``matplotlib.figure.Figure``, not pyplot: importing this module leaves the
backend alone (a notebook keeps its inline backend) and saving works headless.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

MARKERS = {"rtn": "o", "gptq": "s", "adadim-rtn": "^", "adadim-gptq": "D"}


def ppl_vs_bits(rows: list[dict], path: str | Path, *, ppl_fp: float | None = None, title: str = "") -> Path:
  """Perplexity (log scale) against bits per weight, one series per method.

  ``rows``: dicts with ``method``, ``bits_per_weight``, ``ppl_q`` and ``label`` (e.g. "W3 g64").
  """
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for method in dict.fromkeys(r["method"] for r in rows):
    rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["bits_per_weight"])
    ax.plot([r["bits_per_weight"] for r in rs], [r["ppl_q"] for r in rs], marker=MARKERS.get(method, "x"),
            linestyle="none", label=method, alpha=0.85)
    for r in rs:
      ax.annotate(r["label"], (r["bits_per_weight"], r["ppl_q"]), fontsize=6, alpha=0.7,
                  xytext=(3, 3), textcoords="offset points")
  if ppl_fp is not None:
    ax.axhline(ppl_fp, color="k", linestyle="--", linewidth=1, label=f"float ({ppl_fp:.1f})")
  ax.set_yscale("log")
  ax.set_xlabel("bits per weight (codes + scales + zeros)")
  ax.set_ylabel("held-out perplexity")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  return path


def pareto(rows: list[dict], path: str | Path, *, ppl_fp: float | None = None, title: str = "") -> Path:
  """Perplexity (log scale, mean ± sd over seeds) against bits per weight, one series per family.

  ``rows``: dicts with ``family`` (one marker and line, e.g. "gptq+wlorc"), ``label``
  (annotation, e.g. "r8"), ``bits_per_weight``, ``ppl_mean`` and ``ppl_sd``. A family's
  points are joined in order of bits per weight within each code width (``bits``).
  """
  fig = Figure(figsize=(8, 5))
  ax = fig.subplots()
  for i, family in enumerate(dict.fromkeys(r["family"] for r in rows)):
    color = f"C{i % 10}"
    rs = [r for r in rows if r["family"] == family]
    for j, b in enumerate(sorted({r["bits"] for r in rs})):
      pts = sorted((r for r in rs if r["bits"] == b), key=lambda r: r["bits_per_weight"])
      ax.errorbar([r["bits_per_weight"] for r in pts], [r["ppl_mean"] for r in pts],
                  yerr=[r["ppl_sd"] for r in pts], marker="osD^v<>ph*"[i % 10], color=color, capsize=2,
                  linewidth=1, markersize=5, alpha=0.85, label=family if j == 0 else None)
      for r in pts:
        if r.get("label"):
          ax.annotate(r["label"], (r["bits_per_weight"], r["ppl_mean"]), fontsize=6, alpha=0.7,
                      xytext=(3, 3), textcoords="offset points")
  if ppl_fp is not None:
    ax.axhline(ppl_fp, color="k", linestyle="--", linewidth=1, label=f"float ({ppl_fp:.1f})")
  ax.set_yscale("log")
  ax.set_xlabel("bits per weight (everything stored: codes, scales, zeros, tables, sparse, factors)")
  ax.set_ylabel("held-out perplexity (mean ± sd over calibration seeds)")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  return path
