"""Smoke tests: every experiment script runs end to end with a tiny config and writes its JSON."""

import importlib.util
import json
import pathlib

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
  res = run_script("demo", ["--seq-len", "128", "--eval-tokens", "256", "--new-tokens", "4",
                            "--out", str(tmp_path)])
  assert (tmp_path / "demo.json").exists() and res["perplexity"]["windows"] == 2
