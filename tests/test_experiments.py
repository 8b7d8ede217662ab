"""Smoke tests: every experiment script runs end to end with a tiny config and writes its JSON."""

import importlib.util
import json
import pathlib

import pytest

EXPERIMENTS = pathlib.Path(__file__).parent.parent / "experiments"


def run_script(name: str, argv: list[str]) -> dict:
  spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.main(argv)


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
  res = run_script("demo", ["--seq-len", "128", "--eval-tokens", "256", "--new-tokens", "2", "--quick",
                            "--methods", "rtn,gptq", "--calib-samples", "2", "--calib-seq-len", "64",
                            "--out", str(tmp_path)])
  rows = res["quantization"]
  assert [r["method"] for r in rows] == ["rtn", "gptq"]
  assert (tmp_path / "quant_ppl_vs_bits.png").stat().st_size > 10_000
  assert "| W3 g64 | gptq |" in (tmp_path / "quant_table.md").read_text()


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
