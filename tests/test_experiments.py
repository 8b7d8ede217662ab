"""Smoke tests: every experiment script runs end to end with a tiny config and writes its JSON."""

import importlib.util
import json

import pytest

from conftest import EXPERIMENTS, run_script  # noqa: E402




def test_eval_ppl(tmp_path):
  out = tmp_path / "ppl.json"
  res = run_script("eval_ppl", ["--seq-len", "128", "--max-tokens", "512", "--json", str(out)])
  saved = json.loads(out.read_text())
  assert saved["ppl"] == res["ppl"] and saved["tokens"] == 4 * 127
  for key in ("ppl", "nll", "tokens", "seq_len", "seconds", "tokens_per_second"):
    assert key in saved


def test_eval_ppl_on_a_text_file(tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 20)
  res = run_script("eval_ppl", ["--text-file", str(text), "--seq-len", "64", "--max-tokens", "128"])
  # Repeated text is easy to predict after its first occurrence.
  assert res["tokens"] == 2 * 63 and res["ppl"] < 20


def test_bench_forward(tmp_path):
  out = tmp_path / "bench.json"
  res = run_script("bench_forward", ["--seq-len", "64", "--repeats", "1", "--json", str(out)])
  assert json.loads(out.read_text())["lqx_tokens_per_second"] > 0
  if "max_abs_logit_diff" in res:  # torch installed: same weights, same logits
    assert res["max_abs_logit_diff"] < 1e-3


def test_demo(tmp_path):
  res = run_script("demo", ["--seq-len", "128", "--eval-tokens", "256", "--new-tokens", "4", "--no-quant",
                            "--out", str(tmp_path)])
  assert (tmp_path / "demo.json").exists() and res["perplexity"]["windows"] == 2


def test_demo_quant_table(tmp_path):
  # The quick demo (the default) with a seed-variance summary beside it: the spread lands in its row.
  (tmp_path / "seed_variance.json").write_text(json.dumps({"summary": [
      {"method": "gptq", "bits": 3, "group_size": 64, "pipeline": "true-sequential", "scale_dtype": "float16",
       "default": True,
       "ppl_mean": 100.0, "ppl_sd": 5.0, "n": 3}]}))
  res = run_script("demo", ["--seq-len", "128", "--eval-tokens", "256", "--new-tokens", "2",
                            "--methods", "rtn,gptq", "--calib-samples", "2", "--calib-seq-len", "64",
                            "--out", str(tmp_path)])
  rows = res["quantization"]
  assert [r["method"] for r in rows] == ["rtn", "gptq"]
  table = (tmp_path / "demo_table.md").read_text()
  assert "| W3 g64 | gptq |" in table and "100.0 ± 5.0 (3 seeds)" in table
  assert not (tmp_path / "quant_table.md").exists()  # the README's full table is --full's alone


def test_quantize_save_then_eval_checkpoint(tmp_path):
  out = tmp_path / "q.json"
  res = run_script("quantize", ["--method", "adadim-rtn", "--bits", "4", "--group-size", "64",
                                "--calib-samples", "2", "--calib-seq-len", "64", "--eval-tokens", "256",
                                "--eval-seq-len", "128", "--save", str(tmp_path / "ckpt"), "--json", str(out)])
  saved = json.loads(out.read_text())
  for key in ("method", "bits", "group_size", "group_axis", "bits_per_weight", "ppl_fp", "ppl_q", "eval_tokens",
              "quantize_seconds", "layers"):
    assert key in saved
  assert {"name", "error", "group_axis"} <= set(saved["layers"][0])
  assert len(saved["layers"]) == 210 and saved["bits_per_weight"] == res["bits_per_weight"]
  # The saved checkpoint evaluates to the same perplexity through eval_ppl.
  again = run_script("eval_ppl", ["--model", str(tmp_path / "ckpt"), "--seq-len", "128", "--max-tokens", "256"])
  assert again["ppl"] == pytest.approx(res["ppl_q"], rel=1e-5)


def test_bench_gptq(tmp_path):
  out = tmp_path / "g.json"
  res = run_script("bench_gptq", ["--size", "256", "--repeats", "1", "--json", str(out)])
  assert json.loads(out.read_text())["seconds"] > 0 and res["gflops_per_s_run"] > 0
  res = run_script("bench_gptq", ["--smollm2", "--blocks", "1", "--calib-samples", "2"])
  assert [r["name"] for r in res["layers"]][0] == "layers_0/attn/q_proj" and len(res["layers"]) == 7


def test_quantize_reference_pipeline_flags(tmp_path):
  out = tmp_path / "q.json"
  run_script("quantize", ["--method", "gptq", "--bits", "4", "--group-size", "64", "--no-true-sequential",
                          "--scale-dtype", "float32", "--calib-samples", "1", "--calib-seq-len", "64",
                          "--eval-tokens", "256", "--eval-seq-len", "128", "--json", str(out)])
  saved = json.loads(out.read_text())
  assert saved["true_sequential"] is False and saved["scale_dtype"] == "float32"
  assert {"embed", "forward", "hessian", "solve"} <= set(saved["timings"])


def test_bench_gptq_pipeline(tmp_path):
  res = run_script("bench_gptq", ["--pipeline", "--calib-samples", "1", "--eval-tokens", "512"])
  for name in ("true-sequential", "reference"):
    run = res["runs"][name]
    assert run["seconds"] > 0 and run["ratio_to_reference"] > 0 and run["ppl"] > 1


def test_gptq_parity_smoke(tmp_path):
  pytest.importorskip("torch")
  out = tmp_path / "p.json"
  res = run_script("gptq_parity", ["--bits", "3", "--seeds", "0", "--calib-samples", "2", "--n-blocks", "1",
                                   "--lqx-modes", "reference", "--eval-tokens", "512", "--reference-variants",
                                   "--variants", "float64_hessian", "--json", str(out)])
  run = json.loads(out.read_text())["runs"][0]
  assert run["solver_on_reference_hessian"]["layers"] == 7
  assert run["solver_on_reference_hessian"]["mean_same_codes"] > 0.99
  f64 = run["solver_on_reference_hessian_float64"]  # both solvers in float64: every layer >= 99.9%
  assert f64["layers"] == 7 and f64["min_same_codes"] >= 0.999 and f64["layers_below_99.9%"] == 0
  assert run["reference_float64_hessian"]["ppl"] > 1 and "reference_batch8" not in run
  assert run["lqx_reference_float32"]["e2e_same_codes_mean"] > 0.99  # block 0: identical inputs
  assert res["runs"][0]["reference"]["ppl"] > 1


def test_seed_variance_smoke(tmp_path):
  res = run_script("seed_variance", ["--settings", "4:64", "--seeds", "0", "1", "--methods", "rtn", "gptq",
                                     "--pipelines", "reference", "--scale-dtypes", "float16", "--calib-samples", "1",
                                     "--calib-seq-len", "64", "--eval-tokens", "512", "--json",
                                     str(tmp_path / "s.json"), "--md", str(tmp_path / "s.md")])
  rows = {(r["method"], r["pipeline"]): r for r in res["summary"]}
  assert rows[("rtn", "-")]["ppl_sd"] == 0 and rows[("rtn", "-")]["n"] == 2  # RTN needs no calibration
  assert rows[("gptq", "reference")]["n"] == 2
  assert "| W4 g64 | gptq | reference | float16 |" in (tmp_path / "s.md").read_text()


def test_seed_variance_takes_runs_from_pareto(tmp_path):
  """pareto.py's RTN/GPTQ/AdaDim runs (same protocol) fill the table without reruns; other sizes are refused."""
  runs = [{"config": c, "options": {}, "bits": 4, "seed": s, "ppl": p}
          for c, s, p in (("gptq", 0, 50.0), ("gptq", 1, 52.0), ("adadim-gptq", 0, 49.0), ("rtn", 0, 60.0))]
  runs.append({"config": "squeezellm-s0.45", "options": {"outlier_frac": 0.004}, "bits": 4, "seed": 0, "ppl": 1.0})
  pareto = tmp_path / "p.json"
  pareto.write_text(json.dumps({"group_size": 128, "calib_samples": 32, "calib_seq_len": 512, "eval_tokens": 16384,
                                "runs": runs}))
  res = run_script("seed_variance", ["--settings", "--from-pareto", str(pareto), "--md", str(tmp_path / "s.md")])
  rows = {r["method"]: r for r in res["summary"]}
  assert set(rows) == {"gptq", "adadim-gptq", "rtn"} and rows["gptq"]["ppls"] == [50.0, 52.0]
  assert "| W4 g128 | gptq | reference | float16 | 50.0, 52.0 | 51.0 ± 1.4 |" in (tmp_path / "s.md").read_text()
  with pytest.raises(Exception, match="calib_samples"):
    run_script("seed_variance", ["--settings", "--from-pareto", str(pareto), "--calib-samples", "8"])


def test_allocate_smoke(tmp_path):
  """The allocator's recipe, applied by lqx.quantize, stores exactly the promised bits, within the budget."""
  res = run_script("allocate", ["--budget", "3.5", "--blocks", "1", "--candidates", "gptq:2:128", "gptq:4:128",
                                "gptq+wlorc:2:128:4", "--calib-samples", "2", "--calib-seq-len", "64",
                                "--eval-tokens", "512", "--json", str(tmp_path / "a.json"), "--md",
                                str(tmp_path / "a.md")])
  run = next(r for r in res["runs"] if r["recipe"] == "allocator")
  assert run["bits_per_weight"] == pytest.approx(run["promised_bits_per_weight"], rel=1e-12)
  assert run["bits_per_weight"] <= 3.5 and len(run["chosen"]) == 7 and sum(run["counts"].values()) == 7
  assert {r["recipe"] for r in res["runs"]} == {"allocator", "gptq w3 g128", "squeezellm w3"}
  assert "| 3.5 | allocator |" in (tmp_path / "a.md").read_text()
  with pytest.raises(Exception, match="--candidates"):
    run_script("allocate", ["--budget", "3", "--candidates", "gptq:three", "--json", str(tmp_path / "b.json")])


def test_allocate_candidates():
  """``method:bits[:group][:rank][:key=value]``: defaults, options and clear errors (no model loaded)."""
  spec = importlib.util.spec_from_file_location("allocate", EXPERIMENTS / "allocate.py")
  allocate = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(allocate)
  label, m = allocate.candidate("squeezellm:3:sensitive_frac=0.0005:outlier_frac=0.004")
  assert label.startswith("squeezellm:3") and m.bits == 3 and m.outlier_frac == 0.004
  assert allocate.candidate("gptq:3")[1].group_size == 128 and allocate.candidate("gptq:4:64")[1].group_size == 64
  assert allocate.candidate("gptq+wlorc:3:128:8")[1].rank == 8
  for bad in ("gptq", "gptq:x:128", "gptq:3:128:8", "gptq+lorc:3:128", "gptq:3:bits=4:128", "nope:3",
              "squeezellm:3:outlier_frac=abc"):
    with pytest.raises(Exception, match="--candidates"):
      allocate.candidate(bad)


def test_flexq_smoke(tmp_path):
  res = run_script("flexq", ["--blocks", "1", "--eval-tokens", "512", "--grids", "flexq", "--seeds", "0", "1",
                             "--calib-samples", "2", "--calib-seq-len", "64", "--json", str(tmp_path / "f.json"),
                             "--md", str(tmp_path / "f.md"), "--plot", str(tmp_path / "f.png")])
  assert len(res["rows"]) == 5 and all(r["ppl"] < 1.5 * res["ppl_fp"] for r in res["rows"])
  md = (tmp_path / "f.md").read_text()
  assert "| flexq | A8 |" in md and "| flexq | lqx measured" in md and (tmp_path / "f.png").stat().st_size > 0
  runs = res["measured"]
  assert [r["seed"] for r in runs] == [0, 1] and res["rows"][-1]["n_seeds"] == 2
  for r in runs:  # block 0's four inputs; A8 within the rule's budget (down_proj at A8)
    assert sorted(r["delta"]) == ["layers_0/attn_in", "layers_0/down_in", "layers_0/mlp_in", "layers_0/o_in"]
    assert r["bits_per_token"] <= r["budget_bits_per_token"] < r["all_a8_bits_per_token"]
    assert r["a8_down"] == ("layers_0/down_in" in r["a8"])


def test_pareto_smoke(tmp_path):
  res = run_script("pareto", ["--bits", "3", "--seeds", "0", "1", "--blocks", "1", "--configs", "rtn",
                              "squeezellm-s0.45", "gptq+wlorc-r4", "--calib-samples", "2", "--calib-seq-len", "64",
                              "--eval-tokens", "512", "--json", str(tmp_path / "p.json"), "--md",
                              str(tmp_path / "p.md"), "--plot", str(tmp_path / "p.png")])
  rows = {r["config"]: r for r in res["summary"]}
  assert set(rows) == {"rtn", "squeezellm-s0.45", "gptq+wlorc-r4"} and all(r["n"] == 2 for r in rows.values())
  assert rows["rtn"]["ppl_sd"] == 0  # RTN needs no calibration: one run serves both seeds
  assert rows["gptq+wlorc-r4"]["bits_per_weight"] > 3.1 and (tmp_path / "p.png").stat().st_size > 0
  assert "| 3 | squeezellm-s0.45 |" in (tmp_path / "p.md").read_text()
  again = run_script("pareto", ["--bits", "3", "--seeds", "0", "1", "--blocks", "1", "--configs", "rtn",
                                "--calib-samples", "2", "--calib-seq-len", "64", "--eval-tokens", "512",
                                "--json", str(tmp_path / "p.json"), "--resume"])
  assert len(again["runs"]) == len(res["runs"])  # nothing rerun


def test_bench_kernels_smoke(tmp_path):
  """CPU: the XLA path timed against a float matmul, the machine's rate printed; the device check's
  kernel-vs-reference comparison runs (interpreted here) and passes for every case."""
  out = tmp_path / "k.json"
  res = run_script("bench_kernels", ["--shapes", "576x192", "--ms", "1", "3", "--formats", "int4-g128", "lut3",
                                     "--repeats", "1", "--json", str(out), "--md", str(tmp_path / "k.md")])
  assert "| 576x192 | lut3 |" in (tmp_path / "k.md").read_text()
  assert res["path"] == "xla" and res["matmul_gflops_f32"] > 0 and json.loads(out.read_text())["rows"]
  rows = {(r["format"], r["m"]): r for r in res["rows"]}
  assert set(rows) == {("int4-g128", 1), ("int4-g128", 3), ("lut3", 1), ("lut3", 3)}
  assert 3 < rows["lut3", 1]["bits_per_weight"] < 3.3 and rows["int4-g128", 1]["ideal_speedup"] > 3.5
  spec = importlib.util.spec_from_file_location("bench_kernels", EXPERIMENTS / "bench_kernels.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  check = mod.device_check(ms=(7,), k=256, n=128)
  assert len(check) == 2 * (16 + 2) and all(r["ok"] for r in check), [r for r in check if not r["ok"]]


def test_bench_kmeans_smoke(tmp_path):
  """In a subprocess: scikit-learn (and its OpenMP runtime) stays out of the test process, whose
  later XLA compilations aborted once it had been imported there."""
  import json
  import subprocess
  import sys

  from conftest import EXPERIMENTS

  subprocess.run([sys.executable, str(EXPERIMENTS / "bench_kmeans.py"), "--layers", "1", "--bits", "3", "--sample",
                  "4", "--oracle-max-n", "600", "--json", str(tmp_path / "k.json")], check=True, timeout=900)
  res = json.loads((tmp_path / "k.json").read_text())
  assert res["rows"] == 5184 and 0 <= res["bits"]["3"]["frac_lqx_le_sklearn"] <= 1


def _parity_doc(seeds, ref_ppl, lqx_ppl, sha="s"):
  settings = {"model": "m", "group_size": 128, "calib_samples": 32, "calib_seq_len": 512, "eval_tokens": 16384}
  lqx = lambda p: {"ppl": p, "e2e_same_codes_mean": 0.8, "proxy_ratio_median": 1.0}  # noqa: E731
  runs = [{"bits": 3, "seed": s, "calibration_sha256": f"{sha}{s}", "reference": {"ppl": r},
           "lqx_reference_float32": lqx(q),
           "solver_on_reference_hessian_float64": {"min_same_codes": 1.0, "mean_same_codes": 1.0,
                                                   "layers_below_99.9%": 0, "layers": 210}}
          for s, r, q in zip(seeds, ref_ppl, lqx_ppl)]
  return {**settings, "runs": runs}


def test_parity_table_merges_seeds_and_pairs_them(tmp_path):
  a, b = tmp_path / "a.json", tmp_path / "b.json"
  doc = _parity_doc([0, 1], [100.0, 120.0], [95.0, 114.0])
  for run in doc["runs"]:  # a column only the first file has
    run["lqx_true-sequential_float32"] = {**run["lqx_reference_float32"], "ppl": run["reference"]["ppl"]}
  a.write_text(json.dumps(doc))
  b.write_text(json.dumps(_parity_doc([2], [110.0], [104.5])))
  text = run_script("parity_table", [str(a), str(b), "--md", str(tmp_path / "t.md")])
  assert "seeds 0, 1, 2" in text and "| 2 | 110.0 | 104.5 | – |" in text
  assert "**110.0 ± 14.1** (n=2)" in text
  assert "-5.0% ± 0.0%" in text  # every seed's lqx is 0.95x its reference: the paired ratio has no spread
  assert "both solvers in float64" in text and (tmp_path / "t.md").read_text() == text
  b.write_text(json.dumps(_parity_doc([1], [120.0], [114.0], sha="other")))  # seed 1 with other tokens
  with pytest.raises(ValueError, match="other calibration tokens"):
    run_script("parity_table", [str(a), str(b)])


def test_seed_variance_counts_a_seed_in_two_parity_files_once(tmp_path):
  spec = importlib.util.spec_from_file_location("seed_variance", EXPERIMENTS / "seed_variance.py")
  sv = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sv)
  docs = [_parity_doc([0, 1], [100.0, 120.0], [95.0, 114.0]), _parity_doc([1, 2], [121.0, 110.0], [115.0, 104.0])]
  paths = []
  for i, doc in enumerate(docs):
    for run in doc["runs"]:
      run["lqx_reference_float32"].update(mode="reference", scale_dtype="float32")
    paths.append(tmp_path / f"{i}.json")
    paths[-1].write_text(json.dumps(doc))
  rows = {r["method"]: r for r in sv.summarize(sv.merge_parity([str(p) for p in paths]))}
  assert rows["gptq (IST-DASLab reference)"]["ppls"] == [100.0, 121.0, 110.0]  # seed 1 from the later file
  assert rows["gptq"]["seeds"] == [0, 1, 2]
