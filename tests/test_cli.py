"""CLIs that check before they work: bad arguments fail at once, in one line, before any model loads."""

import subprocess
import sys
import time

import pytest

from conftest import EXPERIMENTS  # noqa: E402

SCRIPTS = ("demo", "quantize", "eval_ppl", "bench_forward", "bench_gptq", "gptq_parity", "seed_variance",
           "mup_transfer", "pareto", "sensitivity", "bench_kmeans")
FAST = 30.0  # seconds: argument checks only (a model load and one quantization take minutes on 2 CPUs)


def run(name: str, argv: list[str], cwd) -> tuple[subprocess.CompletedProcess, float]:
  t = time.perf_counter()
  p = subprocess.run([sys.executable, str(EXPERIMENTS / f"{name}.py"), *argv], capture_output=True, text=True,
                     cwd=cwd, timeout=300)
  return p, time.perf_counter() - t


def assert_one_line_error(p, seconds: float, *words: str) -> str:
  assert p.returncode != 0, p.stdout + p.stderr
  assert "Traceback" not in p.stderr, p.stderr
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error: ")]
  assert len(errors) == 1 and errors[0] == lines[-1], p.stderr
  for w in words:
    assert w in errors[0], errors[0]
  assert seconds < FAST, f"took {seconds:.1f} s: the check did not come first"
  return errors[0]


@pytest.fixture
def bogus_model(tmp_path):
  """A .gguf file that fails to load: an error naming another argument proves the model was not loaded first."""
  path = tmp_path / "bogus.gguf"
  path.write_bytes(b"not a gguf file")
  return str(path)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_defaults(name, tmp_path):
  p, _ = run(name, ["--help"], tmp_path)
  assert p.returncode == 0, p.stderr
  assert "(default:" in p.stdout and "--debug" in p.stdout


@pytest.mark.parametrize("name, argv, words", [
    ("quantize", ["--eval-tokens", "-5"], ["--eval-tokens", "-5"]),
    ("quantize", ["--eval-seq-len", "0"], ["--eval-seq-len", ">= 2"]),
    ("quantize", ["--calib-samples", "0"], ["--calib-samples", "positive"]),
    ("quantize", ["--group-size", "0"], ["--group-size"]),
    ("quantize", ["--eval-tokens", "100", "--eval-seq-len", "512"], ["--eval-tokens", "one window"]),
    ("quantize", ["--calib-tokens", "missing.npy"], ["--calib-tokens", "missing.npy", "does not exist"]),
    ("quantize", ["--text-file", "missing.txt"], ["--text-file", "does not exist"]),
    ("quantize", ["--json", "no/such/folder/out.json"], ["--json", "does not exist"]),
    ("quantize", ["--overwrite"], ["--overwrite", "--save"]),
    ("quantize", ["--method", "gptq", "--outlier-frac", "0.01"], ["--outlier-frac", "SqueezeLLM"]),
    ("quantize", ["--method", "squeezellm", "--outlier-frac", "0.9"], ["outlier_frac", "[0, 0.5)"]),
    ("quantize", ["--method", "gptq+wlorc", "--rank", "0"], ["--rank", "positive"]),
    ("quantize", ["--method", "squeezellm", "--act-order"], ["act_order", "squeezellm"]),
    ("quantize", ["--method", "squeezellm", "--fisher", "missing.npz"], ["--fisher", "does not exist"]),
    ("eval_ppl", ["--seq-len", "1"], ["--seq-len", ">= 2"]),
    ("eval_ppl", ["--batch-size", "0"], ["--batch-size"]),
    ("eval_ppl", ["--max-tokens", "10", "--seq-len", "64"], ["--max-tokens", "one window"]),
    ("demo", ["--new-tokens", "0"], ["--new-tokens"]),
    ("demo", ["--methods", "rtn,nope"], ["--methods", "nope"]),
    ("demo", ["--eval-tokens", "-1"], ["--eval-tokens"]),
    ("bench_forward", ["--repeats", "0"], ["--repeats"]),
    ("bench_forward", ["--batch", "-2"], ["--batch"]),
])
def test_bad_arguments_fail_before_the_model_loads(name, argv, words, bogus_model, tmp_path):
  p, seconds = run(name, ["--model", bogus_model, *argv], tmp_path)
  assert_one_line_error(p, seconds, *words)


@pytest.mark.parametrize("name, argv, words", [
    ("bench_gptq", ["--size", "0"], ["--size"]),
    ("bench_gptq", ["--pipeline", "--eval-tokens", "100"], ["--eval-tokens", "512"]),
    ("gptq_parity", ["--calib-seq-len", "1"], ["--calib-seq-len"]),
    ("gptq_parity", ["--reference-dir", "no-such-dir"], ["--reference-dir"]),
    ("seed_variance", ["--settings", "3:0"], ["--settings", "3:0"]),
    ("seed_variance", ["--from-parity", "missing.json"], ["--from-parity", "missing.json"]),
    ("seed_variance", ["--resume"], ["--resume", "--json"]),
    ("mup_transfer", ["--replot", "missing.json"], ["--replot", "missing.json"]),
    ("pareto", ["--configs", "nope"], ["--configs", "nope"]),
    ("pareto", ["--resume"], ["--resume", "--json"]),
    ("bench_kmeans", ["--fisher", "missing.npz"], ["--fisher", "missing.npz"]),
    ("mup_transfer", ["--unknown-flag"], ["unrecognized arguments"]),
])
def test_bad_arguments_other_scripts(name, argv, words, tmp_path):
  p, seconds = run(name, argv, tmp_path)
  assert_one_line_error(p, seconds, *words)


def test_unknown_model_is_a_one_line_error(tmp_path):
  p, seconds = run("eval_ppl", ["--model", "no-such-model"], tmp_path)
  assert_one_line_error(p, seconds, "--model", "no-such-model")


def test_save_onto_existing_folder_needs_overwrite(bogus_model, tmp_path):
  dest = tmp_path / "ckpt"
  dest.mkdir()
  (dest / "keep.txt").write_text("mine")
  p, seconds = run("quantize", ["--model", bogus_model, "--save", str(dest)], tmp_path)
  line = assert_one_line_error(p, seconds, "--save", "already exists", "--overwrite")
  assert "overwrite=True" not in line
  # --overwrite replaces only lqx checkpoints (or empty folders): this one is refused too, up front.
  p, seconds = run("quantize", ["--model", bogus_model, "--save", str(dest), "--overwrite"], tmp_path)
  assert_one_line_error(p, seconds, "--save", "not an lqx checkpoint")
  assert (dest / "keep.txt").read_text() == "mine"
  (tmp_path / "file").write_text("x")
  p, seconds = run("quantize", ["--model", bogus_model, "--save", str(tmp_path / "file")], tmp_path)
  assert_one_line_error(p, seconds, "--save", "not a folder")


def test_runtime_errors_are_one_line_and_debug_shows_the_traceback(bogus_model, tmp_path):
  # Arguments are fine; the model file is not: one line naming the file, or the traceback with --debug.
  p, _ = run("eval_ppl", ["--model", bogus_model, "--seq-len", "64"], tmp_path)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "bogus.gguf" in last
  p, _ = run("eval_ppl", ["--model", bogus_model, "--seq-len", "64", "--debug"], tmp_path)
  assert p.returncode != 0 and "Traceback" in p.stderr


def test_usage_error_in_process_exits_with_one_line(capsys):
  from conftest import run_script

  with pytest.raises(SystemExit) as e:
    run_script("quantize", ["--eval-tokens", "-5"])
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: argument --eval-tokens: expected an int >= 0, got -5\n"


def test_outputs_go_under_out_dir(tmp_path, monkeypatch):
  """Relative output paths land under --out-dir (default: the repo's results/), whatever the current
  directory; absolute ones stay; inputs are not moved; a missing sub-folder is a one-line error."""
  monkeypatch.syspath_prepend(str(EXPERIMENTS))
  import _cli  # noqa: PLC0415

  monkeypatch.chdir(tmp_path)
  ap = _cli.parser("t")
  ap.add_argument("--json", type=_cli.output_file)
  ap.add_argument("--figures", type=_cli.output_dir)
  ap.add_argument("--inp", type=str)
  ns = ap.parse_args(["--json", "a.json", "--figures", "figs", "--inp", "x.txt"])
  assert ns.json == str(_cli.RESULTS / "a.json") and ns.figures == str(_cli.RESULTS / "figs") and ns.inp == "x.txt"
  assert _cli.RESULTS == EXPERIMENTS.parent / "results"
  ns = ap.parse_args(["--json", "a.json", "--out-dir", str(tmp_path / "new"), "--figures", str(tmp_path / "f")])
  assert ns.json == str(tmp_path / "new" / "a.json") and (tmp_path / "new").is_dir()
  assert ns.figures == str(tmp_path / "f")
  with pytest.raises(SystemExit):
    ap.parse_args(["--json", "no/such/a.json", "--out-dir", str(tmp_path)])
  (tmp_path / "file").write_text("")
  with pytest.raises(SystemExit):
    ap.parse_args(["--json", "a.json", "--out-dir", str(tmp_path / "file")])
