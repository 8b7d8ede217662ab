"""Ahead-of-time compiles of the Pallas kernels for real TPU and GPU chips (pallas_kernels/aot.py).

The compilers live in the separate env `.venv-kernels` (`make kernels-env`): these tests
run the check there in a subprocess and skip when it is absent. The main env only
imports aot.py, runs interpret mode and lowers.
"""
import json
import os
import pathlib
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import aot

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS_PY = ROOT / ".venv-kernels" / "bin" / "python"
needs_kernels_env = pytest.mark.skipif(
    not (ROOT / ".venv-kernels" / ".installed").exists(),
    reason=".venv-kernels is absent (make kernels-env): no TPU/GPU compilers")

TPU_TARGETS = [n for n, t in aot.TARGETS.items() if t.platform == "tpu"]
GPU_TARGETS = [n for n, t in aot.TARGETS.items() if t.platform == "cuda"]


def _run_check(tmp_path, *args: str) -> tuple[int, dict, str]:
  """(exit code, JSON report, output) of `python -m pallas_kernels.aot` in .venv-kernels."""
  out = tmp_path / "aot.json"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run([str(KERNELS_PY), "-m", "pallas_kernels.aot", "--json", str(out), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  log = proc.stdout + proc.stderr
  assert out.exists(), f"no report (exit {proc.returncode}):\n{log[-5000:]}"
  return proc.returncode, json.loads(out.read_text()), log


@needs_kernels_env
def test_every_case_compiles_for_every_target(tmp_path):
  rc, report, log = _run_check(tmp_path)
  records = report["records"]
  assert len(records) == len(aot.CASES) * len(aot.TARGETS)
  # A case may be skipped only while its kernel file does not exist yet.
  bad = [r for r in records
         if r["status"] != "ok" and not (r["status"] == "skip"
                                         and not (ROOT / "pallas_kernels" / f"{r['op']}.py").exists())]
  assert not bad, "\n".join(f"{r['case']} on {r['target']}: {r.get('error')}" for r in bad)
  assert rc == 0, log[-5000:]
  print(f"aot check: {report['counts']} in {report['seconds']}s")


@pytest.mark.parametrize("name", [c.name for c in aot.ILLEGAL_CASES])
def test_illegal_blocks_pass_interpret_mode_and_lowering(name):
  """What the negative test below needs: only the real compilers reject these blocks."""
  case = next(c for c in aot.ILLEGAL_CASES if c.name == name)
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (case.m, case.k), jnp.bfloat16)
  w = jax.random.normal(kw, (case.k, case.n), jnp.bfloat16)
  for backend, platform in (("tpu", "tpu"), ("triton", "cuda")):
    fn, _ = case.build(backend)
    got = fn(x, w, interpret=True)
    want = jnp.dot(x, w, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-2, atol=1.0)
    jax.jit(fn).trace(x, w).lower(lowering_platforms=(platform,))


@needs_kernels_env
def test_check_reports_blocks_the_real_compilers_reject(tmp_path):
  rc, report, log = _run_check(tmp_path, "--cases", "selftest_vmem", "selftest_smem")
  assert rc == 1, log[-5000:]
  status = {(r["case"], r["target"]): r for r in report["records"]}
  for target in TPU_TARGETS:
    rec = status["selftest_vmem", target]
    assert rec["status"] == "error" and "vmem" in rec["error_full"].lower(), rec
  for target in GPU_TARGETS:
    rec = status["selftest_smem", target]
    assert rec["status"] == "error" and "shared memory" in rec["error_full"].lower(), rec
  for case, target in status:  # one printed line per (case, target)
    assert re.search(rf"^{case}\s+{target}\s+(ok|error)\s", log, re.M), (case, target)


def test_cases_cover_the_formats():
  """CASES spans the shapes and formats the brief asks for, with unique names."""
  names = [c.name for c in aot.CASES + aot.ILLEGAL_CASES]
  assert len(names) == len(set(names))
  dq = [c for c in aot.CASES if c.op == "dequant_matmul"]
  lut = [c for c in aot.CASES if c.op == "lut_matmul"]
  assert {c.bits for c in dq} == {2, 3, 4, 8} and {c.bits for c in lut} == {3, 4}
  assert {(c.group_axis, c.zero) for c in dq} == {("oc", True), ("oc", False), ("ic", True), ("ic", False)}
  assert {c.m for c in dq} == {1, 16, 256} and {c.m for c in lut} == {1, 16, 256}
  shapes = {(576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008)}
  assert {(c.k, c.n) for c in dq} == shapes

