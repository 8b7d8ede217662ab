"""Every notebook executes headless on CPU with a small config (LQX_NOTEBOOK_SMALL=1)."""

import os
import pathlib
import subprocess
import sys

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path):
  env = dict(os.environ, LQX_NOTEBOOK_SMALL="1")
  out = tmp_path / path.name
  proc = subprocess.run(
      [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
       "--ExecutePreprocessor.timeout=600", f"--output={out}", str(path)],
      env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  nb = json.loads(out.read_text())
  errors = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors
