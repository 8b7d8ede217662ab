"""Strip notebooks for committing: ``python tools/strip_notebooks.py notebooks/*.ipynb``.

Clears every code cell's outputs and execution count, drops what Jupyter and Colab record
in a cell's metadata when it runs (timings, output ids, view state), the notebook's widget
state and its Colab provenance (file ids), and writes the JSON as nbformat does (indent 1,
sorted keys, trailing newline), so stripping a stripped notebook changes nothing.
``--check`` writes nothing and exits 1 naming each notebook that would change;
tests/test_notebooks.py runs it over notebooks/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RUN_STATE_KEYS = ("execution", "executionInfo", "outputId", "colab", "collapsed", "scrolled")


class NotebookError(ValueError):
  """A file that is not a Jupyter notebook (the message names it)."""


def strip(nb: dict) -> dict:
  """``nb`` (nbformat 4 JSON, modified in place) without outputs or run state."""
  for cell in nb["cells"]:
    for key in RUN_STATE_KEYS:
      cell.get("metadata", {}).pop(key, None)
    if cell.get("cell_type") == "code":
      cell["outputs"] = []
      cell["execution_count"] = None
  nb.get("metadata", {}).pop("widgets", None)
  if "provenance" in nb.get("metadata", {}).get("colab", {}):
    nb["metadata"]["colab"]["provenance"] = []
  return nb


def dumps(nb: dict) -> str:
  """The notebook's text as nbformat writes it."""
  return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def read(path: Path) -> tuple[str, dict]:
  """(text, parsed JSON) of the notebook at ``path``; NotebookError if it is not one."""
  try:
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise NotebookError(f"{path}: not a readable notebook ({e})") from None
  if not (isinstance(nb, dict) and isinstance(nb.get("cells"), list)
          and all(isinstance(c, dict) for c in nb["cells"]) and nb.get("nbformat") == 4):
    raise NotebookError(f"{path}: not an nbformat 4 notebook (expected a JSON object with "
                        "'nbformat': 4 and a 'cells' list)")
  return text, nb


def main(argv: list[str] | None = None) -> int:
  """Strips (or with --check, checks) each notebook; 0 if all were already stripped or now are."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("notebooks", nargs="+", type=Path, help=".ipynb files")
  parser.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if any notebook is not stripped")
  args = parser.parse_args(argv)
  try:
    notebooks = [(path, *read(path)) for path in args.notebooks]  # all read before any is written
  except NotebookError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  changed = 0
  for path, text, nb in notebooks:
    new = dumps(strip(nb))
    if new != text:
      changed += 1
      if args.check:
        print(f"{path}: has outputs or run state (python tools/strip_notebooks.py {path})")
      else:
        path.write_text(new, encoding="utf-8")
        print(f"{path}: stripped")
  return 1 if args.check and changed else 0


if __name__ == "__main__":
  sys.exit(main())
