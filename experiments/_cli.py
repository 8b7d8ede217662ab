"""What the experiment scripts' command lines share: check everything before any work starts.

* :func:`parser`: an ``ArgumentParser`` whose ``--help`` shows defaults (and keeps the
  module docstring's layout), with ``--debug`` and ``--out-dir``; a usage error prints one
  line ``error: argument --x: ...`` and exits 2 (``SystemExit``, as argparse does).
* Outputs: every argument of type :func:`output_file` / :func:`output_dir` given as a
  relative path is written under ``--out-dir`` (default: ``results/`` beside the repo,
  whatever the current directory; created when needed). Absolute paths are kept as given.
  Inputs (:func:`existing_file`, ...) stay relative to the current directory.
* argparse ``type=`` checkers: :func:`int_at_least` (``positive_int``, ``nonneg_int``),
  :func:`group_size`, :func:`existing_file`, :func:`existing_dir`, :func:`model`, :func:`output_file`,
  :func:`output_dir`; and :func:`check_save` for a ``--save`` folder with ``--overwrite``.
* :func:`run`: the ``__main__`` entry: ``main(argv)``, any exception printed as one
  line ``error: ...`` on stderr, exit status 2 (:class:`UsageError`, an argument found
  bad after parsing) or 1 (anything else); ``--debug`` shows the traceback instead.

The scripts are not a package; each puts its own folder on ``sys.path`` to import this.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"  # default --out-dir


class UsageError(ValueError):
  """A bad command-line argument (the message names it)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """The description as written, and ``(default: ...)`` after every option that has a default."""

  def _format_action(self, action):
    if not action.help and action.option_strings and self._shows_default(action):
      action.help = "(default: %(default)s)"  # options without help text get their default shown too
    return super()._format_action(action)

  def _get_help_string(self, action):
    if self._shows_default(action) and "(default" not in (action.help or ""):
      return super()._get_help_string(action)
    return action.help

  @staticmethod
  def _shows_default(action) -> bool:
    """Not for None defaults, nor for plain flags (``store_true``/``store_false``/``store_const``)."""
    flag = isinstance(action, (argparse._StoreConstAction, argparse._HelpAction, argparse._VersionAction))
    return action.default not in (None, argparse.SUPPRESS) and not flag


class Parser(argparse.ArgumentParser):
  """``ArgumentParser`` whose usage errors print one line ``error: ...`` (no usage block), then exit 2."""

  def error(self, message):
    self.exit(2, f"error: {' '.join(message.split())}\n")

  def parse_args(self, args=None, namespace=None):
    """Parsed arguments, with relative output paths moved under ``--out-dir`` and checked there."""
    ns = super().parse_args(args, namespace)
    out_dir = Path(getattr(ns, "out_dir", None) or RESULTS).expanduser()
    for action in self._actions:
      if action.type not in (output_file, output_dir) or getattr(ns, action.dest, None) is None:
        continue
      value = getattr(ns, action.dest)
      try:
        if out_dir.exists() and not out_dir.is_dir():
          raise argparse.ArgumentTypeError(f"--out-dir {str(out_dir)!r} exists and is not a folder")
        placed = [_place(out_dir, v, action.type) for v in value] if isinstance(value, list) else (
            _place(out_dir, value, action.type))
      except argparse.ArgumentTypeError as e:
        self.error(f"argument {'/'.join(action.option_strings) or action.dest}: {e}")
      setattr(ns, action.dest, placed)
    return ns


def _place(out_dir: Path, text: str, kind) -> str:
  """``text`` under ``out_dir`` unless absolute (``~`` expanded); checked again by ``kind`` there."""
  path = Path(text).expanduser()
  if not path.is_absolute():
    path = out_dir / path
    if path.parent == out_dir or kind is output_dir:
      out_dir.mkdir(parents=True, exist_ok=True)
  return kind(str(path))


def parser(description: str | None) -> Parser:
  """The scripts' parser: :class:`HelpFormatter`, one-line usage errors (exit 2), ``--debug``, ``--out-dir``."""
  ap = Parser(description=description, formatter_class=HelpFormatter)
  ap.add_argument("--debug", action="store_true", help="on an error, show the full traceback instead of one line")
  ap.add_argument("--out-dir", default=str(RESULTS),
                  help="relative output paths (--json, --md, --plot, ...) are written under this folder")
  return ap


def run(main, argv: list[str] | None = None) -> None:
  """Runs ``main(argv)``; an exception becomes one ``error: ...`` line on stderr and a non-zero exit.

  Exit status 2 for usage errors, 1 for any other error, 130 on Ctrl-C; ``--debug`` in
  ``argv`` re-raises instead (full traceback).
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  debug = "--debug" in argv
  try:
    main(argv)
  except SystemExit:
    raise
  except KeyboardInterrupt:
    if debug:
      raise
    print("error: interrupted", file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # noqa: BLE001 (the point: one line for any error)
    if debug:
      raise
    print(f"error: {describe(e)}", file=sys.stderr)
    sys.exit(2 if isinstance(e, UsageError) else 1)


def describe(e: BaseException) -> str:
  """One line for ``e``: its message (newlines folded), prefixed by its type unless a value or file error."""
  msg = " ".join(str(e).split()) or type(e).__name__
  if not isinstance(e, (ValueError, OSError)):
    msg = f"{type(e).__name__}: {msg}"
  return msg + " (rerun with --debug for the traceback)" if not isinstance(e, UsageError) else msg


# ----------------------------------------------------------------------------- argument types


def int_at_least(lo: int, what: str | None = None):
  """argparse type: an int ``>= lo`` (``what``: how to describe it in the error)."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {what or f'an int >= {lo}'}, got {text!r}") from None
    if value < lo:
      raise argparse.ArgumentTypeError(f"expected {what or f'an int >= {lo}'}, got {value}")
    return value

  parse.__name__ = f"int>={lo}"
  return parse


positive_int = int_at_least(1, "a positive int")
nonneg_int = int_at_least(0, "an int >= 0")
seq_len = int_at_least(2, "a sequence length >= 2 (one token predicts nothing)")


def group_size(text: str) -> int:
  """argparse type: a group size, a positive int or -1 (one group spanning the axis)."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value != -1 and value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive int or -1 (per channel), got {text!r}")
  return value


def existing_file(text: str) -> str:
  """argparse type: the path of an existing file."""
  path = Path(text).expanduser()
  if not path.exists():
    raise argparse.ArgumentTypeError(f"file {text!r} does not exist")
  if not path.is_file():
    raise argparse.ArgumentTypeError(f"{text!r} is not a file")
  return text


def existing_dir(text: str) -> str:
  """argparse type: the path of an existing folder."""
  if not Path(text).expanduser().is_dir():
    raise argparse.ArgumentTypeError(f"{text!r} is not an existing folder")
  return text


def model(text: str) -> str:
  """argparse type: a named model (``lqx.io.NAMED_MODELS``) or an existing file or folder."""
  from lqx.io import NAMED_MODELS

  if text in NAMED_MODELS or Path(text).expanduser().exists():
    return text
  raise argparse.ArgumentTypeError(f"{text!r} is neither a named model ({', '.join(NAMED_MODELS)}) nor an existing "
                                   f"file or folder (a .gguf file, a Hugging Face or lqx checkpoint folder)")


def output_file(text: str) -> str:
  """argparse type: a file to write: not a folder, and its folder exists (a relative path: checked
  under ``--out-dir`` once parsed, see :meth:`Parser.parse_args`)."""
  path = Path(text).expanduser()
  if not path.is_absolute():
    return text
  if path.is_dir():
    raise argparse.ArgumentTypeError(f"{text!r} is a folder, expected a file path to write")
  if not path.absolute().parent.is_dir():
    raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist")
  return text


def output_dir(text: str) -> str:
  """argparse type: a folder to write into (created if missing): not an existing file (a relative
  path: checked under ``--out-dir`` once parsed)."""
  path = Path(text).expanduser()
  if path.is_absolute() and path.exists() and not path.is_dir():
    raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
  return text


def check_save(ap: argparse.ArgumentParser, dest: str | None, overwrite: bool, option: str = "--save") -> None:
  """Usage error unless ``dest`` (an lqx checkpoint folder to write) is new, or ``overwrite`` may replace it.

  As ``lqx.io.checkpoint.save``: an existing folder needs ``--overwrite``, and is
  replaced only if it is an lqx checkpoint or empty.
  """
  if dest is None:
    if overwrite:
      ap.error(f"argument --overwrite: only applies with {option}")
    return
  from lqx.io.checkpoint import JSON_NAME

  path = Path(dest).expanduser()
  if not path.exists():
    return
  if not path.is_dir():
    ap.error(f"argument {option}: {dest!r} exists and is not a folder")
  if not overwrite:
    ap.error(f"argument {option}: {dest!r} already exists; pass --overwrite to replace it")
  if not (path / JSON_NAME).is_file() and any(path.iterdir()):
    ap.error(f"argument {option}: {dest!r} is not an lqx checkpoint folder (no {JSON_NAME}); "
             f"--overwrite replaces only checkpoints or empty folders")


def first_blocks(pattern: str, n_blocks: int | None) -> str:
  """``pattern`` (a param-path regex starting ``layers_\\d+``) restricted to blocks ``0..n_blocks-1``
  (``--blocks`` of the smoke runs); unchanged for ``None``."""
  if n_blocks is None:
    return pattern
  if not pattern.startswith(r"layers_\d+"):
    raise ValueError(f"{pattern!r} does not start with layers_\\d+")
  return "layers_(" + "|".join(map(str, range(n_blocks))) + ")" + pattern[len(r"layers_\d+"):]
