"""Weighted 1-D k-means on SmolLM2's kernels: lqx's speed, and its error against sklearn and the exact optimum.

  python experiments/bench_kmeans.py [--fisher F.npz] [--bits 3 4] [--sample 2000] [--json OUT]

A row is one output channel of a block linear (its IC weights; 30 layers x 7 kernels,
155,520 rows). For each ``--bits`` b (k = 2**b centroids):

(i)  time ``lqx.quant.kmeans.weighted_kmeans_1d`` on every row of all 210 block linears,
     one call per kernel (compilation, one per kernel shape, is timed apart), and the
     machine's 2048-cube float32 matmul GFLOP/s measured in the same run, for scale;
(ii) on ``--sample`` rows drawn with ``--seed``, the weighted error of lqx's centroids,
     of SqueezeLLM's scikit-learn call ``KMeans(n_clusters=k, n_init="auto", max_iter=50,
     random_state=0).fit(row, sample_weight=F_row)``, and of the exact optimum
     (``optimal_1d``, dynamic programming on the whole row; rows longer than
     ``--oracle-max-n`` are left out of the oracle columns). Errors are recomputed in
     float64 with nearest-centroid assignment for all three.

Weights: ``--fisher F.npz`` (keys are param paths such as ``layers_0/attn/q_proj/kernel``,
values the (IC, OC) float32 Fisher diagonal). Without it, a stand-in (no gradients are
computed here): ``--stand-in wsq`` uses ``w**2 + 0.01 * mean(w**2)`` per row (large weights
matter more, no weight is zero), ``uniform`` plain k-means. The output says which.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from lqx import io, tree
from lqx.quant import kmeans

if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402
from _bench import matmul_gflops  # noqa: E402

BLOCK_LINEAR = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                "mlp/down_proj")


def block_kernels(params) -> list[str]:
  """Param paths of every block linear's kernel, layers in order."""
  return [p for p in tree.paths(params) if p.startswith("layers_") and p.endswith("/kernel")
          and any(f"/{name}/" in p for name in BLOCK_LINEAR)]


def row_weights(path: str, w: np.ndarray, fisher, stand_in: str) -> np.ndarray:
  """``(OC, IC)`` float32 weights of the rows of kernel ``w`` ``(IC, OC)``."""
  if fisher is not None:
    if path not in fisher.files:
      raise ValueError(f"--fisher has no entry {path!r}")
    f = np.asarray(fisher[path], np.float32)
    if f.shape != w.shape:
      raise ValueError(f"--fisher entry {path!r} has shape {f.shape}; the kernel is {w.shape}")
    return np.ascontiguousarray(f.T)
  if stand_in == "uniform":
    return np.ones(w.T.shape, np.float32)
  sq = np.square(w.T, dtype=np.float32)
  return sq + 0.01 * sq.mean(axis=1, keepdims=True)


def sse64(x: np.ndarray, w: np.ndarray, c: np.ndarray) -> float:
  """float64 weighted error of row ``x`` with nearest-centroid assignment to ``c``."""
  c = np.sort(np.asarray(c, np.float64))
  x = np.asarray(x, np.float64)
  i = np.clip(np.searchsorted(c, x), 1, len(c) - 1)
  d = np.minimum(np.abs(x - c[i - 1]), np.abs(x - c[i]))
  return float(np.sum(np.asarray(w, np.float64) * d * d))


def sklearn_centroids(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
  from sklearn.cluster import KMeans

  w = w if w.sum() > 0 else np.ones_like(w)
  km = KMeans(n_clusters=k, n_init="auto", max_iter=50, random_state=0).fit(x[:, None], sample_weight=w)
  return np.sort(km.cluster_centers_[:, 0])


def compare(sample, rows, cents, k: int, oracle_max_n: int) -> dict:
  """Errors of lqx's centroids, sklearn's and the optimum's on the sampled ``(path, row)`` pairs."""
  ours, skl, opt, skl_s, opt_s = [], [], [], 0.0, 0.0
  for p, r in sample:
    x, w = rows[p][0][r], rows[p][1][r]
    ours.append(sse64(x, w, np.asarray(cents[p][r])))
    t = time.perf_counter()
    skl.append(sse64(x, w, sklearn_centroids(x, w, k)))
    skl_s += time.perf_counter() - t
    t = time.perf_counter()
    opt.append(kmeans.optimal_1d(x[None], w[None], k)[1][0] if x.size <= oracle_max_n else np.nan)
    opt_s += time.perf_counter() - t
  ours, skl, opt = np.array(ours), np.array(skl), np.array(opt)
  has = np.isfinite(opt)
  ex_ours = ours[has] / np.maximum(opt[has], 1e-300) - 1
  ex_skl = skl[has] / np.maximum(opt[has], 1e-300) - 1
  nan = float("nan")
  stat = lambda f, v: float(f(v)) if v.size else nan  # noqa: E731
  return {"sample": len(sample), "oracle_rows": int(has.sum()),
          "frac_lqx_le_sklearn": float(np.mean(ours <= skl * (1 + 1e-6))),
          "median_excess_lqx": stat(np.median, ex_ours), "median_excess_sklearn": stat(np.median, ex_skl),
          "mean_excess_lqx": stat(np.mean, ex_ours), "mean_excess_sklearn": stat(np.mean, ex_skl),
          "max_excess_lqx": stat(np.max, ex_ours), "frac_lqx_optimal": stat(np.mean, ex_ours <= 1e-6),
          "frac_sklearn_optimal": stat(np.mean, ex_skl <= 1e-6),
          "sklearn_seconds_per_row": skl_s / len(sample), "oracle_seconds": opt_s}


def main(argv=None) -> dict:
  ap = _cli.parser(__doc__)
  ap.add_argument("--model", type=_cli.model, default="smollm2-135m")
  ap.add_argument("--fisher", type=_cli.existing_file, metavar="F.npz", help="Fisher diagonals per kernel path")
  ap.add_argument("--stand-in", choices=("wsq", "uniform"), default="wsq", help="weights when --fisher is absent")
  ap.add_argument("--bits", type=int, nargs="+", choices=range(2, 9), metavar="{2..8}", default=[3, 4])
  ap.add_argument("--n-init", type=_cli.positive_int, default=None, help="lqx starts (default: the library's)")
  ap.add_argument("--max-iter", type=_cli.positive_int, default=None, help="lqx Lloyd steps (default: the library's)")
  ap.add_argument("--atoms", type=_cli.positive_int, default=None, help="lqx DP start atoms (default: the library's)")
  ap.add_argument("--layers", type=_cli.positive_int, default=None, help="only the first N layers (quick runs)")
  ap.add_argument("--sample", type=_cli.nonneg_int, default=2000, help="rows compared with sklearn and the optimum")
  ap.add_argument("--oracle-max-n", type=_cli.positive_int, default=1536, help="longest row given to the exact DP")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", type=_cli.output_file, help="write the results here")
  args = ap.parse_args(argv)
  fisher = np.load(args.fisher) if args.fisher else None
  options = {k: v for k, v in (("n_init", args.n_init), ("max_iter", args.max_iter), ("atoms", args.atoms))
             if v is not None}

  _, params = io.load_model(args.model)
  paths = block_kernels(params)
  if args.layers:
    paths = [p for p in paths if int(p.split("/")[0].split("_")[1]) < args.layers]
  kernels = {p: np.asarray(tree.get(params, p), np.float32) for p in paths}
  rows = {p: (np.ascontiguousarray(w.T), row_weights(p, w, fisher, args.stand_in)) for p, w in kernels.items()}
  n_rows = sum(x.shape[0] for x, _ in rows.values())
  weights = f"fisher:{args.fisher}" if fisher is not None else {
      "wsq": "stand-in w**2 + 0.01*mean(w**2) per row (no Fisher given)",
      "uniform": "stand-in uniform (no Fisher given)"}[args.stand_in]
  import sklearn

  gflops = matmul_gflops()
  print(f"{len(paths)} kernels, {n_rows} rows; weights: {weights}; sklearn {sklearn.__version__}; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; 2048^3 f32 matmul {gflops:.1f} GFLOP/s")
  rng = np.random.default_rng(args.seed)
  flat = [(p, r) for p, (x, _) in rows.items() for r in range(x.shape[0])]
  sample = [flat[i] for i in np.sort(rng.choice(len(flat), size=min(args.sample, len(flat)), replace=False))]
  results = {"model": args.model, "weights": weights, "kernels": len(paths), "rows": n_rows,
             "sklearn": sklearn.__version__, "jax": jax.__version__, "matmul_gflops": gflops,
             "lqx_options": options, "bits": {}}
  for bits in args.bits:
    k = 2 ** bits
    key = jax.random.key(args.seed)
    t = time.perf_counter()
    seen = set()
    for x, w in rows.values():  # compile once per row shape
      if x.shape not in seen:
        seen.add(x.shape)
        jax.block_until_ready(kmeans.weighted_kmeans_1d(x, w, k, key=key, **options))
    compile_s = time.perf_counter() - t
    cents = {}
    t = time.perf_counter()
    for p, (x, w) in rows.items():
      c, _ = kmeans.weighted_kmeans_1d(x, w, k, key=key, **options)
      cents[p] = c
    jax.block_until_ready(cents)
    seconds = time.perf_counter() - t
    print(f"bits={bits}: lqx clustered {n_rows} rows in {seconds:.1f} s ({n_rows / seconds:.0f} rows/s; "
          f"compile+first calls {compile_s:.1f} s apart)")
    res = {"rows": n_rows, "seconds": seconds, "rows_per_s": n_rows / seconds, "compile_seconds": compile_s}
    results["bits"][str(bits)] = res
    if sample:
      res.update(compare(sample, rows, cents, k, args.oracle_max_n))
      print(f"  sample {len(sample)} rows ({res['oracle_rows']} with the optimum): lqx <= sklearn on "
            f"{100 * res['frac_lqx_le_sklearn']:.2f}%; median excess over the optimum: lqx "
            f"{res['median_excess_lqx']:.1e}, sklearn {res['median_excess_sklearn']:.1e} (mean "
            f"{res['mean_excess_lqx']:.1e}, {res['mean_excess_sklearn']:.1e}; max lqx {res['max_excess_lqx']:.1e}); "
            f"optimal: lqx {100 * res['frac_lqx_optimal']:.1f}%, sklearn {100 * res['frac_sklearn_optimal']:.1f}% "
            f"of rows; sklearn {1e3 * res['sklearn_seconds_per_row']:.1f} ms/row")
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
  return results


if __name__ == "__main__":
  _cli.run(main)
