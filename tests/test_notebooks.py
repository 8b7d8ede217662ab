"""Every notebook executes headless on CPU with a small config (LQX_NOTEBOOK_SMALL=1), is committed
stripped, and installs lqx on Colab from the user's LQX_SOURCE without touching the runtime's jax."""

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOURCE_LINE = re.compile(r'^LQX_SOURCE = ""$', re.M)


def _strip_tool():
  spec = importlib.util.spec_from_file_location("strip_notebooks", ROOT / "tools" / "strip_notebooks.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _code_cells(path):
  return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def _install_cell():
  return _code_cells(NOTEBOOKS[0])[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path):
  env = dict(os.environ, LQX_NOTEBOOK_SMALL="1")
  out = tmp_path / path.name
  # The limits only catch a hang: a notebook needs a few CPU-minutes, which shared cores stretch.
  proc = subprocess.run(
      [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
       "--ExecutePreprocessor.timeout=1800", f"--output={out}", str(path)],
      env=env, capture_output=True, text=True, timeout=2700)
  errors = [line for line in proc.stderr.splitlines() if re.match(r"[\w.]*(Error|Exception)\b", line)]
  assert proc.returncode == 0, "\n".join(errors[-5:]) + "\n...\n" + proc.stderr[-3000:]
  nb = json.loads(out.read_text())
  errors = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors


def test_there_are_notebooks():
  assert [p.name for p in NOTEBOOKS] == ["mup_transfer.ipynb", "quantize_smollm2.ipynb", "quickstart.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_stripped(path):
  nb = json.loads(path.read_text())
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, (
          f"{path.name} has outputs: run python tools/strip_notebooks.py {path.relative_to(ROOT)}")
  assert _strip_tool().main(["--check", str(path)]) == 0


def test_strip_tool_clears_outputs_and_run_state(tmp_path, capsys):
  tool = _strip_tool()
  nb = json.loads(NOTEBOOKS[0].read_text())
  code = next(c for c in nb["cells"] if c["cell_type"] == "code")
  code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
  code["execution_count"] = 3
  code["metadata"] = {"colab": {"base_uri": "https://localhost:8080/"}, "outputId": "x1", "tags": ["keep"]}
  nb["metadata"]["colab"]["provenance"] = [{"file_id": "abc"}]
  nb["metadata"]["widgets"] = {"state": {}}
  path = tmp_path / "run.ipynb"
  path.write_text(json.dumps(nb))

  assert tool.main(["--check", str(path)]) == 1
  assert "run.ipynb: has outputs" in capsys.readouterr().out
  assert tool.main([str(path)]) == 0
  assert tool.main(["--check", str(path)]) == 0
  stripped = json.loads(path.read_text())
  code = next(c for c in stripped["cells"] if c["cell_type"] == "code")
  assert code["outputs"] == [] and code["execution_count"] is None
  assert code["metadata"] == {"tags": ["keep"]}
  assert stripped["metadata"]["colab"]["provenance"] == [] and "widgets" not in stripped["metadata"]
  assert [c["source"] for c in stripped["cells"]] == [c["source"] for c in nb["cells"]]


@pytest.mark.parametrize("text", ["{not json", '{"cells": "x", "nbformat": 4}', "[]"])
def test_strip_tool_rejects_a_non_notebook_naming_it(tmp_path, capsys, text):
  good = tmp_path / "good.ipynb"
  good.write_text(json.dumps({"cells": [{"cell_type": "code", "source": "", "metadata": {}, "outputs": [1],
                                         "execution_count": 1}], "metadata": {}, "nbformat": 4}))
  bad = tmp_path / "bad.ipynb"
  bad.write_text(text)
  before = good.read_text()
  assert _strip_tool().main([str(good), str(bad)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "bad.ipynb" in err and len(err.strip().splitlines()) == 1
  assert good.read_text() == before  # nothing written when any input is bad


def test_every_notebook_starts_with_the_same_install_cell():
  cells = {p.name: _code_cells(p)[0] for p in NOTEBOOKS}
  assert len(set(cells.values())) == 1, "the install cells differ: keep them identical"
  assert len(SOURCE_LINE.findall(_install_cell())) == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_link_to_a_repository_that_does_not_exist(path):
  """lqx has no public home: every github/colab link names the reader's own copy as <you>."""
  text = path.read_text()
  owners = re.findall(r"github(?:\.com)?/([^/\s\"]+)", text)
  assert all(o == "<you>" for o in owners), owners
  assert "lqx-dev" not in text


@pytest.fixture
def colab(monkeypatch):
  """A fake Colab runtime without lqx: google.colab imported, lqx not found, pip recorded, not run."""
  mounts, commands = [], []
  drive = types.SimpleNamespace(mount=mounts.append)
  monkeypatch.setitem(sys.modules, "google.colab", types.SimpleNamespace(drive=drive))
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "lqx" else find_spec(name, *a))
  state = types.SimpleNamespace(mounts=mounts, commands=commands, returncode=0)

  def run(cmd, **kwargs):
    constraints = cmd[cmd.index("--constraint") + 1]
    commands.append((cmd, pathlib.Path(constraints).read_text()))
    return subprocess.CompletedProcess(cmd, state.returncode, "", "pip says no\n" * state.returncode)

  monkeypatch.setattr(subprocess, "run", run)
  return state


def _run_install_cell(source=None):
  cell = _install_cell()
  if source is not None:
    cell = SOURCE_LINE.sub(f"LQX_SOURCE = {source!r}", cell)
  exec(compile(cell, "<install cell>", "exec"), {"__name__": "__main__"})


def test_install_cell_is_a_no_op_outside_colab(monkeypatch):
  monkeypatch.delitem(sys.modules, "google.colab", raising=False)
  monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran outside Colab"))
  _run_install_cell()


def test_install_cell_is_a_no_op_once_lqx_imports(monkeypatch):
  monkeypatch.setitem(sys.modules, "google.colab", types.SimpleNamespace())
  monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran with lqx installed"))
  _run_install_cell()


def test_install_cell_on_colab_without_a_source_says_what_to_set(colab):
  with pytest.raises(ValueError, match=r"LQX_SOURCE is empty\. Set it .*git\+https://github.com/<you>/lqx"):
    _run_install_cell()
  assert colab.commands == []


def test_install_cell_pins_the_installed_jax(colab):
  source = "git+https://example.org/me/lqx@main"
  _run_install_cell(source)
  [(cmd, constraints)] = colab.commands
  assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and cmd[-1] == source
  assert not {"-U", "--upgrade", "--force-reinstall", "--no-deps", "--upgrade-strategy"} & set(cmd)
  pins = constraints.splitlines()
  for name in ("jax", "jaxlib"):
    assert f"{name}=={importlib.metadata.version(name)}" in pins
  assert all(re.fullmatch(r"(jax|jaxlib|libtpu.*|jax-(cuda|rocm).*)==\S+", p) for p in pins), pins


def test_install_cell_reports_a_pip_failure(colab, tmp_path):
  wheel = tmp_path / "lqx-0.1.0-py3-none-any.whl"
  wheel.write_bytes(b"")
  colab.returncode = 1
  with pytest.raises(RuntimeError, match=r"could not install lqx from .*lqx-0\.1\.0.* while keeping jax=="):
    _run_install_cell(str(wheel))
  assert colab.commands[0][0][-1] == str(wheel)


def test_install_cell_names_a_missing_upload(colab):
  with pytest.raises(ValueError, match=r"LQX_SOURCE='/content/nowhere/lqx\.whl': no such file"):
    _run_install_cell("/content/nowhere/lqx.whl")
  assert colab.mounts == [] and colab.commands == []


def test_install_cell_mounts_drive_for_a_drive_path(colab):
  if os.path.isdir("/content/drive/MyDrive"):
    pytest.skip("a real Drive is mounted here")
  with pytest.raises(ValueError, match="no such file"):  # the fake mount mounts nothing
    _run_install_cell("/content/drive/MyDrive/lqx")
  assert colab.mounts == ["/content/drive"] and colab.commands == []
