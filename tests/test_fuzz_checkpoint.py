"""Fuzzing lqx.io.checkpoint.restore: a damaged checkpoint restores exactly or raises CheckpointError.

From one small valid checkpoint (a tiny LLaMA, attention kernels RTN-quantized),
seeded mutations (byte flips anywhere, truncations, deleted or swapped files,
edits of the JSON files: types, numbers, names, nesting) are each restored in a
worker subprocess bounded in memory (``RLIMIT_AS``) and time (per case). Each
must give every array bit for bit (and the config) or a ``CheckpointError``:
never another exception, changed weights, a timeout, a memory error or a crash.

``LQX_FUZZ_CASES`` (default 400) sets the number of cases, ``LQX_FUZZ_SEED``
(default 0) the seed; a failure names the case's seed and mutation.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import pytest

N_CASES = int(os.environ.get("LQX_FUZZ_CASES", "400"))
SEED = int(os.environ.get("LQX_FUZZ_SEED", "0"))
WORKERS = 2
CASE_S = 5  # time limit of one restore
START_S = 90  # time limit of a worker's start (imports, reference restore)
MEMORY = 2 * 2**30  # RLIMIT_AS of a worker
ROOT = Path(__file__).resolve().parent.parent


def _config():
  from lqx.models.llama import LlamaConfig

  return LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64)


def _params():
  """Tiny LLaMA params, the attention projections RTN-quantized (4 bits, groups of 16)."""
  import jax

  import lqx
  from lqx.models import llama

  params = llama.init_params(_config(), jax.random.key(0))
  rules = [lqx.Rule(r"layers_0/attn/\w+_proj/kernel", lqx.RTNConfig(bits=4, group_size=16))]
  return lqx.quantize(None, params, rules, progress=False)[0]


# ----------------------------------------------------------------------------- mutations (no JAX needed)


def _files(folder: Path) -> list[str]:
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _dirs(folder: Path) -> list[str]:
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_dir())


def _positions(doc, path=()):
  """Every ``(container, key, path)`` of a JSON document, the root's children first."""
  items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
  for k, v in items:
    yield doc, k, path + (k,)
    yield from _positions(v, path + (k,))


_VALUES = [None, True, False, 0, 1, -1, 3, 2**31, 2**64, -(2**63), 1.5, -0.0, 1e308, float("inf"), float("nan"),
           "", "x", "float32", "bfloat16", "affine", "layers_0", "0" * 64, [], {}, [1, 2], {"tuple": [32, 32]},
           {"dtype": "int8"}, {"dict": {}}, {"array": {"shape": [2], "dtype": "float32"}}]


def _edit_json(doc, rng: random.Random) -> str:
  """Apply one random edit to ``doc`` in place; returns what it did."""
  pos = list(_positions(doc))
  if not pos:
    return "empty document"
  parent, key, path = rng.choice(pos)
  where = "/".join(map(str, path))
  v = parent[key]
  op = rng.choice(["type", "number", "number", "rename", "delete", "insert", "nest", "unnest", "swap", "string"])
  if op == "number" and isinstance(v, (int, float)) and not isinstance(v, bool):
    new = rng.choice([v + 1, v - 1, v * 2, -v, 0, v + 0.5, v // 2 if isinstance(v, int) else v / 2, 2**63, 10**30])
    parent[key] = new
    return f"{where}: number {v!r} -> {new!r}"
  if op == "string" and isinstance(v, str) and v:
    i = rng.randrange(len(v))
    new = v[:i] + rng.choice([c for c in "0aZ_./-" if c != v[i]]) + v[i + 1:]
    parent[key] = new
    return f"{where}: string {v!r} -> {new!r}"
  if op == "rename" and isinstance(parent, dict):
    new = rng.choice([k for k in [key + "x", key.upper(), key[:-1], "tuple", "dtype", "dict", "array", "format"]
                      + list(parent) if k != key])
    value = parent.pop(key)
    parent[new] = value
    return f"{where}: key renamed to {new!r}"
  if op == "delete":
    del parent[key]
    return f"{where}: deleted"
  if op == "insert":
    extra = rng.choice(_VALUES)
    if isinstance(v, dict):
      v[rng.choice(["extra", "sha256", "shape", "dtype", "dict", "tuple"])] = extra
    elif isinstance(v, list):
      v.insert(rng.randrange(len(v) + 1), extra)
    else:
      parent[key] = [v, extra]
    return f"{where}: inserted {extra!r}"
  if op == "nest":
    parent[key] = rng.choice([[v], {"dict": v}, {"array": v}, {"tuple": v}, {key: v}])
    return f"{where}: nested"
  if op == "unnest" and isinstance(v, (dict, list)) and v:
    children = list(v.values()) if isinstance(v, dict) else v
    parent[key] = rng.choice(children)
    return f"{where}: replaced by a child"
  if op == "swap":
    other_parent, other_key, other_path = rng.choice(pos)
    if other_path[:len(path)] != path and path[:len(other_path)] != other_path:
      parent[key], other_parent[other_key] = other_parent[other_key], v
      return f"{where}: swapped with {'/'.join(map(str, other_path))}"
  new = rng.choice(_VALUES)
  parent[key] = new
  return f"{where}: {type(v).__name__} -> {new!r}"


def _flip(file: Path, rng: random.Random, offset: int | None = None) -> str:
  data = bytearray(file.read_bytes())
  if not data:
    return "empty file"
  i = rng.randrange(len(data)) if offset is None else offset
  mask = rng.choice([1 << rng.randrange(8), rng.randrange(1, 256)])
  data[i] ^= mask
  file.write_bytes(bytes(data))
  return f"byte {i} ^= {mask:#04x}"


def mutate(folder: Path, seed: int) -> str:
  """Damage the checkpoint folder ``folder`` in one seeded way; returns a description."""
  rng = random.Random(seed)
  files = _files(folder)
  sizes = {f: (folder / f).stat().st_size for f in files}
  kind = rng.choices(["flip", "flip_data", "flips", "truncate", "delete", "delete_dir", "swap", "json", "json_orbax"],
                     weights=[3, 4, 1, 2, 1, 0.5, 0.5, 6, 2])[0]
  if kind in ("json", "json_orbax"):
    candidates = ["lqx_checkpoint.json"] if kind == "json" else []
    for f in files:
      if kind == "json_orbax" and f != "lqx_checkpoint.json":
        try:
          json.loads((folder / f).read_text())
          candidates.append(f)
        except (ValueError, UnicodeDecodeError):
          pass
    f = rng.choice(candidates)
    doc = json.loads((folder / f).read_text())
    what = _edit_json(doc, rng)
    (folder / f).write_text(json.dumps(doc))
    return f"{kind} {f}: {what}"
  if kind == "flip_data":  # a byte drawn over all bytes: mostly array data
    total = sum(sizes.values())
    at = rng.randrange(total)
    for f in files:
      if at < sizes[f]:
        return f"flip {f}: {_flip(folder / f, rng, at)}"
      at -= sizes[f]
  f = rng.choice(files)
  if kind == "flip":
    return f"flip {f}: {_flip(folder / f, rng)}"
  if kind == "flips":
    return f"flips {f}: " + ", ".join(_flip(folder / f, rng) for _ in range(rng.randint(2, 8)))
  if kind == "truncate":
    n = rng.randrange(sizes[f]) if sizes[f] else 0
    os.truncate(folder / f, n)
    return f"truncate {f} to {n} of {sizes[f]} bytes"
  if kind == "delete":
    (folder / f).unlink()
    return f"delete {f}"
  if kind == "delete_dir":
    d = rng.choice(_dirs(folder))
    shutil.rmtree(folder / d)
    return f"delete folder {d}"
  g = rng.choice([x for x in files if x != f])
  a, b = (folder / f).read_bytes(), (folder / g).read_bytes()
  (folder / f).write_bytes(b)
  (folder / g).write_bytes(a)
  return f"swap {f} and {g}"


# ----------------------------------------------------------------------------- worker (a subprocess)


class _Timeout(BaseException):
  """A case ran past CASE_S (a BaseException, so no ``except Exception`` in the code under test eats it)."""


def _alarm(signum, frame):
  raise _Timeout()


def _same(a, b) -> str | None:
  """None if trees ``a`` and ``b`` are equal bit for bit (structure, static fields, dtypes, bytes); else what differs."""
  import jax
  import numpy as np

  if jax.tree.structure(a) != jax.tree.structure(b):
    return "tree structure or static fields differ"
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    if not isinstance(y, jax.Array) or (x.dtype, x.shape) != (y.dtype, y.shape):
      return f"{jax.tree_util.keystr(path)}: {type(y).__name__} {getattr(y, 'dtype', '')} {getattr(y, 'shape', '')}"
    if np.asarray(x).tobytes() != np.asarray(y).tobytes():
      return f"{jax.tree_util.keystr(path)}: other values"
  return None


def worker(reference: str, cases: list[list], out: str) -> None:
  """Restore each ``(case id, folder)``; append a JSON line per start and per outcome to ``out``."""
  import resource
  import warnings

  resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
  warnings.simplefilter("ignore")
  from lqx.io import checkpoint as ck

  config, ref, _ = ck.restore(reference)
  signal.signal(signal.SIGALRM, _alarm)
  with open(out, "a", buffering=1) as log:
    for i, folder in cases:
      log.write(json.dumps({"i": i, "start": True}) + "\n")
      detail = None
      signal.setitimer(signal.ITIMER_REAL, CASE_S)
      try:
        c, params, _ = ck.restore(folder)
        detail = _same(ref, params) or (None if c == config else f"config differs: {c!r}")
        outcome = "changed" if detail else "exact"
      except ck.CheckpointError as e:
        outcome, detail = "error", str(e).replace(folder, "<case>")[:400]
      except _Timeout:
        outcome = "timeout"
      except MemoryError:
        outcome = "memory"
      except BaseException:
        outcome, detail = "exception", traceback.format_exc()[-2000:]
      finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
      log.write(json.dumps({"i": i, "outcome": outcome, "detail": detail}) + "\n")
      if outcome in ("timeout", "memory"):
        return  # the process may be in a bad state: the parent starts a fresh one for the rest


_WORKER = textwrap.dedent("""
    import json, sys
    from tests.test_fuzz_checkpoint import worker
    with open(sys.argv[2]) as f:
      worker(sys.argv[1], json.load(f), sys.argv[3])
""")


def _read(out: Path) -> list[dict]:
  if not out.exists():
    return []
  return [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]


def _run_workers(reference: Path, cases: list[tuple[int, str]], tmp: Path) -> dict[int, dict]:
  """Outcomes by case id; a worker that dies or stalls is replaced, its current case marked crash/timeout."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "OMP_NUM_THREADS": "1",
         "TF_CPP_MIN_LOG_LEVEL": "3"}
  results: dict[int, dict] = {}
  pending = [cases[k::WORKERS] for k in range(WORKERS)]
  running, n_started = {}, 0

  def start(chunk):
    nonlocal n_started
    out, todo = tmp / f"worker{n_started}.jsonl", tmp / f"worker{n_started}.cases.json"
    n_started += 1
    todo.write_text(json.dumps(chunk))
    with open(out.with_suffix(".err"), "wb") as err:  # a file, not a pipe: orbax logs a lot on damaged input
      proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(reference), str(todo), str(out)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    running[proc] = {"chunk": chunk, "out": out, "seen": 0, "since": time.monotonic(), "limit": START_S}

  def absorb(proc):
    info = running[proc]
    lines = _read(info["out"])
    if len(lines) > info["seen"]:
      info["seen"], info["since"], info["limit"] = len(lines), time.monotonic(), CASE_S + 5
    done = {r["i"]: r for r in lines if "outcome" in r}
    current = next((r["i"] for r in reversed(lines) if "start" in r and r["i"] not in done), None)
    return done, current

  for chunk in pending:
    start(chunk)
  while running:
    time.sleep(0.1)
    for proc in list(running):
      info = running[proc]
      done, current = absorb(proc)
      stalled = time.monotonic() - info["since"] > info["limit"]
      if proc.poll() is None and not stalled:
        continue
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
      err = info["out"].with_suffix(".err").read_text(errors="replace")[-3000:]
      del running[proc]
      results.update(done)
      if current is None and not done and proc.returncode != 0:
        raise RuntimeError(f"fuzz worker failed to start (rc {proc.returncode}):\n{err}")
      if current is not None:
        why = "timeout" if stalled else f"crash (rc {proc.returncode})"
        results[current] = {"i": current, "outcome": why.split()[0], "detail": f"{why}\n{err}"}
      rest = [c for c in info["chunk"] if c[0] not in results]
      if rest:
        start(rest)
  return results


# ----------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The valid checkpoint every case damages a copy of (the workers compare against it); it restores exactly."""
  import jax

  from lqx.formats.affine import QArray
  from lqx.io import checkpoint as ck

  params = _params()
  path = ck.save(tmp_path_factory.mktemp("fuzz") / "model", _config(), params, metadata={"recipe": "rtn"})
  config, restored, _ = ck.restore(path)
  assert config == _config() and _same(params, restored) is None
  leaves = jax.tree.leaves(restored, is_leaf=lambda x: isinstance(x, QArray))
  assert sum(isinstance(x, QArray) for x in leaves) == 4
  return path


def test_mutations_are_seeded(reference, tmp_path):
  runs = [[mutate(shutil.copytree(reference, tmp_path / f"{k}-{s}"), s) for s in range(40)] for k in range(2)]
  assert runs[0] == runs[1]
  assert all(_files(tmp_path / f"0-{s}") == _files(tmp_path / f"1-{s}") for s in range(40))
  assert len({d.split()[0] for d in runs[0]}) >= 6  # several kinds of damage


def test_fuzzed_checkpoints_restore_exactly_or_raise_checkpoint_error(reference, tmp_path):
  t0 = time.monotonic()
  seeds = {i: SEED * 1_000_003 + i for i in range(N_CASES)}
  cases, what = [], {}
  for i, seed in seeds.items():
    folder = shutil.copytree(reference, tmp_path / "cases" / str(i) / "model")
    what[i] = mutate(folder, seed)
    cases.append((i, str(folder)))
  results = _run_workers(reference, cases, tmp_path)
  counts: dict[str, int] = {}
  for r in results.values():
    counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
  errors: dict[str, int] = {}
  for r in results.values():
    if r["outcome"] == "error":
      head = re.sub(r"(array|,) [\w/.]+ (is|does)", r"\1 <path> \2", r["detail"].split(": ", 1)[-1])
      head = re.sub(r"arrays/[\w/.]+", "arrays/<file>", head).split(":")[0].split(" (")[0][:70]
      errors[head] = errors.get(head, 0) + 1
  print(f"\nfuzz: {N_CASES} cases (seed {SEED}), {counts.get('error', 0)} clean CheckpointErrors, "
        f"{counts.get('exact', 0)} exact restores, outcomes {counts}, {time.monotonic() - t0:.1f}s")
  for head, n in sorted(errors.items(), key=lambda x: -x[1])[:12]:
    print(f"  {n:4d}  {head}")
  bad = [f"case {i} (seed {seeds[i]}): {what[i]}\n  -> {r['outcome']}: {r['detail']}"
         for i, r in sorted(results.items()) if r["outcome"] not in ("exact", "error")]
  assert len(results) == N_CASES
  assert not bad, f"{len(bad)} of {N_CASES} cases neither restored exactly nor raised CheckpointError:\n" + \
      "\n".join(bad[:10])
  assert counts.get("error", 0) >= N_CASES // 2  # most damage is detected, not harmless
