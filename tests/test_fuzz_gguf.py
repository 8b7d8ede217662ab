"""Fuzzing lqx.io.gguf with seeded mutations of small valid GGUF files (issue P6).

Each mutated file is loaded (``load_gguf``, ``read_config``, ``load_tokenizer``) in a
worker subprocess whose address space may grow by at most ~1.5 GB over what the
imports took, with a timeout per case. Every case must either load (finite float32
arrays of the shapes its config declares) or raise ``GGUFError``: never another
exception, a timeout or a memory error. ``LQX_FUZZ_CASES`` sets the number of cases
(default 240); ``LQX_FUZZ_SEED`` the seed.
"""

import json
import os
import random
import selectors
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the GGUF reader needs the gguf package")

CASES = int(os.environ.get("LQX_FUZZ_CASES", "240"))
SEED = int(os.environ.get("LQX_FUZZ_SEED", "0"))
CASE_TIMEOUT_S = 10.0
MEMORY_GROWTH = 1536 << 20

# ----------------------------------------------------------------------------- valid seed files


def _tokenizer():
  tokens = ["<unk>", "<s>", "</s>", "\u0120", *"abcdefghijklmnopqrstuvwxyz"]
  merges = []
  for a, b in (("t", "h"), ("th", "e"), ("\u0120", "the"), ("i", "n"), ("\u0120", "k")):
    merges.append(f"{a} {b}")
    tokens.append(a + b)
  return tokens, merges


def write_seed(path, *, dim, n_layers, n_heads, n_kv, ffn, tie, qtype, bias=False, seed=0):
  """A tiny random llama GGUF with a byte-level BPE tokenizer; returns its path."""
  from lqx.io.gguf import expected_tensors
  from lqx.models.llama import LlamaConfig

  tokens, merges = _tokenizer()
  config = LlamaConfig(vocab_size=len(tokens), dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                       ffn_dim=ffn, tie_embeddings=tie, attn_bias=bias)
  rng = np.random.default_rng(seed)
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_context_length(64)
  w.add_embedding_length(dim)
  w.add_block_count(n_layers)
  w.add_feed_forward_length(ffn)
  w.add_head_count(n_heads)
  w.add_head_count_kv(n_kv)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(len(tokens))
  w.add_rope_dimension_count(dim // n_heads)
  w.add_tokenizer_model("gpt2")
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  w.add_token_types([3 if t.startswith("<") else 1 for t in tokens])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  for name, (_, shape, _, _) in expected_tensors(config).items():
    t = (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.1 * rng.standard_normal(shape))
    t = t.astype(np.float32)
    if len(shape) == 2 and qtype != gguf.GGMLQuantizationType.F32:
      w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def field_sites(data: bytes):
  """Offsets of the header's fields in a valid file: ``[(offset, width, kind)]`` and the data offset."""
  sites = [(4, 4, "version"), (8, 8, "tensor_count"), (16, 8, "kv_count")]
  pos = 24
  n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
  widths = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

  def string(kind):
    nonlocal pos
    (n,) = struct.unpack_from("<Q", data, pos)
    sites.append((pos, 8, kind))
    pos += 8 + n

  for _ in range(n_kv):
    string("key_len")
    (vtype,) = struct.unpack_from("<I", data, pos)
    sites.append((pos, 4, "kv_type"))
    pos += 4
    if vtype == 8:
      string("str_len")
    elif vtype == 9:
      (item, n) = struct.unpack_from("<IQ", data, pos)
      sites += [(pos, 4, "array_type"), (pos + 4, 8, "array_len")]
      pos += 12
      if item == 8:
        for i in range(n):
          if i < 4:  # a few element lengths are sites; the rest are skipped
            sites.append((pos, 8, "array_str_len"))
          pos += 8 + struct.unpack_from("<Q", data, pos)[0]
      else:
        pos += n * widths[item]
    else:
      sites.append((pos, widths[vtype], "kv_value"))
      pos += widths[vtype]
  for _ in range(n_tensors):
    string("tensor_name_len")
    (nd,) = struct.unpack_from("<I", data, pos)
    sites.append((pos, 4, "tensor_ndims"))
    pos += 4
    for _ in range(nd):
      sites.append((pos, 8, "tensor_dim"))
      pos += 8
    sites += [(pos, 4, "tensor_type"), (pos + 4, 8, "tensor_offset")]
    pos += 12
  return sites, -(-pos // 32) * 32


_EXTREMES = (0, 1, 2, 3, 255, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)


def mutate(data: bytes, sites, data_offset: int, rng: random.Random):
  """One seeded mutation of ``data``: ``(new bytes, description)``."""
  b = bytearray(data)
  kind = rng.choice(["flip_header", "flip_header", "flip_any", "truncate", "field", "field", "field",
                     "retype", "tensor", "splice"])
  if kind in ("flip_header", "flip_any"):
    hi = data_offset if kind == "flip_header" else len(b)
    at = [rng.randrange(hi) for _ in range(rng.randint(1, 4))]
    for i in at:
      b[i] ^= rng.randint(1, 255)
    return bytes(b), f"{kind} at {at}"
  if kind == "truncate":
    cut = rng.randrange(data_offset if rng.random() < 0.6 else len(b))
    return bytes(b[:cut]), f"truncate at {cut}"
  if kind == "splice":  # insert or delete a few bytes inside the header: every later field shifts
    at = rng.randrange(24, data_offset)
    if rng.random() < 0.5:
      n = rng.randint(1, 16)
      return bytes(b[:at] + bytes(rng.getrandbits(8) for _ in range(n)) + b[at:]), f"insert {n} at {at}"
    n = rng.randint(1, 16)
    return bytes(b[:at] + b[at + n:]), f"delete {n} at {at}"
  if kind == "retype":
    pool = [s for s in sites if s[2] in ("kv_type", "array_type")]
    value = rng.choice([*range(14), 255, 2**31, 2**32 - 1])
  elif kind == "tensor":
    pool = [s for s in sites if s[2].startswith("tensor_")]
    value = rng.choice([*_EXTREMES, *range(0, 42), rng.getrandbits(64)])
  else:
    pool = sites
    value = rng.choice([*_EXTREMES, rng.getrandbits(64), rng.getrandbits(8)])
  at, width, what = rng.choice(pool)
  value %= 1 << (8 * width)
  b[at:at + width] = value.to_bytes(width, "little")
  return bytes(b), f"{kind}: {what}@{at} = {value}"


# ----------------------------------------------------------------------------- worker

WORKER = r"""
import json, math, resource, sys, time, traceback
import numpy as np
from lqx.io import gguf as G
from lqx.io.errors import ModelFileError
from lqx.io.hf import expected_tensors

cases = json.load(open(sys.argv[1]))
growth = int(sys.argv[2])
bases = {}
for base in {c["base"] for c in cases}:
  bases[base] = G.load_gguf(base)
  G.load_tokenizer(base)  # imports transformers before the limit
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + growth, vm + growth))

def leaves(node, prefix=()):
  out = {}
  for k, v in node.items():
    out.update(leaves(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out

def check(config, params):
  want = {}
  for _, (sub, shape, kernel) in expected_tensors(config).items():
    want[sub] = tuple(reversed(shape)) if kernel else shape
  got = leaves(params)
  assert set(got) == set(want), sorted(set(got) ^ set(want))
  for k, v in got.items():
    assert isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == want[k], (k, v.shape, want[k])
    assert np.isfinite(v).all(), k

print(json.dumps({"ready": True}), flush=True)
for c in cases:
  t0 = time.perf_counter()
  out = {"i": c["i"]}
  try:
    try:
      G.read_config(c["path"])
      config, params = G.load_gguf(c["path"])
    except ModelFileError as e:
      out.update(kind="error", exc=type(e).__name__, msg=str(e)[:300])
    else:
      check(config, params)
      bc, bp = bases[c["base"]]
      got, want = leaves(params), leaves(bp)
      same = config == bc and got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
      out.update(kind="load", exact=bool(same))
    try:
      G.load_tokenizer(c["path"])
      out["tokenizer"] = "ok"
    except ModelFileError:
      out["tokenizer"] = "error"
  except BaseException as e:
    out.update(kind="bad", exc=type(e).__name__, msg=str(e)[:300], tb=traceback.format_exc()[-1500:])
  out["dt"] = time.perf_counter() - t0
  print(json.dumps(out), flush=True)
"""


def run_cases(cases, tmp_path):
  """Runs ``cases`` in worker subprocesses, restarting after a timeout; ``{i: result}``."""
  results = {}
  todo = list(cases)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
  root = Path(__file__).resolve().parents[1]
  while todo:
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(todo))
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(spec), str(MEMORY_GROWTH)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    ready, pending = False, list(todo)
    limit = 120.0  # imports and warm-up
    while pending:
      if not sel.select(timeout=limit):
        proc.kill()
        proc.wait()
        if not ready:
          raise AssertionError(f"fuzz worker did not start: {proc.stderr.read()[-3000:]}")
        c = pending.pop(0)
        results[c["i"]] = {"i": c["i"], "kind": "timeout", "case": c["what"]}
        break
      line = proc.stdout.readline()
      if not line:  # the worker died (e.g. killed for memory)
        proc.wait()
        err = proc.stderr.read()[-2000:]
        if not ready:
          raise AssertionError(f"fuzz worker did not start: {err}")
        c = pending.pop(0)
        results[c["i"]] = {"i": c["i"], "kind": "crash", "case": c["what"], "msg": f"rc={proc.returncode} {err}"}
        break
      r = json.loads(line)
      if r.get("ready"):
        ready, limit = True, CASE_TIMEOUT_S
        continue
      c = pending.pop(0)
      assert c["i"] == r["i"]
      results[r["i"]] = {**r, "case": c["what"]}
    else:
      proc.wait()
    todo = pending
  return results


def test_fuzzed_gguf_files_load_or_raise_gguf_error(tmp_path):
  F32, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0
  seeds = [
      write_seed(tmp_path / "a.gguf", dim=32, n_layers=2, n_heads=4, n_kv=2, ffn=48, tie=False, qtype=F32),
      write_seed(tmp_path / "b.gguf", dim=32, n_layers=1, n_heads=2, n_kv=1, ffn=64, tie=True, qtype=Q8_0, seed=1),
      write_seed(tmp_path / "c.gguf", dim=16, n_layers=2, n_heads=2, n_kv=2, ffn=24, tie=True, qtype=F32, seed=2),
  ]
  rng = random.Random(SEED)
  infos = []
  for p in seeds:
    data = p.read_bytes()
    infos.append((p, data, *field_sites(data)))
  cases = []
  for i in range(CASES):
    p, data, sites, data_offset = infos[i % len(infos)]
    new, what = mutate(data, sites, data_offset, rng)
    path = tmp_path / f"case{i:05d}.gguf"
    path.write_bytes(new)
    cases.append({"i": i, "path": str(path), "base": str(p), "what": f"{p.name} {what}", "changed": new != data})

  t0 = time.perf_counter()
  results = run_cases(cases, tmp_path)
  elapsed = time.perf_counter() - t0
  kinds = {k: sum(r["kind"] == k for r in results.values()) for k in ("error", "load", "bad", "timeout", "crash")}
  exact = sum(r["kind"] == "load" and r["exact"] for r in results.values())
  toks = sum(r.get("tokenizer") == "ok" for r in results.values())
  slowest = max((r.get("dt", 0) for r in results.values()), default=0)
  print(f"\nGGUF fuzz: {len(results)} cases (seed {SEED}) in {elapsed:.1f}s: {kinds['error']} clean GGUFErrors, "
        f"{kinds['load']} loads ({exact} exact, {kinds['load'] - exact} with changed values/config but valid), "
        f"{kinds['bad']} other exceptions, {kinds['timeout']} timeouts, {kinds['crash']} crashes; "
        f"tokenizer built for {toks}; slowest case {slowest:.2f}s")
  bad = [r for r in results.values() if r["kind"] not in ("error", "load")]
  assert not bad, "\n".join(f"{r['case']}: {r['kind']} {r.get('exc', '')} {r.get('msg', '')} {r.get('tb', '')}"
                            for r in bad[:10])
  assert len(results) == CASES
  assert kinds["error"] > 0 and kinds["load"] > 0
  errors = [r["msg"] for r in results.values() if r["kind"] == "error"]
  assert all(".gguf" in m for m in errors), [m for m in errors if ".gguf" not in m][:5]
