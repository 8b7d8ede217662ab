"""lqx.io.checkpoint: exact orbax round trips of float + format trees, atomic saves, clear errors."""

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqx import formats, packing
from lqx import io as lqx_io
from lqx.formats import affine
from lqx.io import checkpoint as ck
from lqx.io.checkpoint import CheckpointError
from lqx.models.llama import LlamaConfig
from lqx.formats.affine import QArray
from lqx.quant.rtn import RTNConfig, rtn_quantize

CONFIG = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64,
                     rope_theta=1e5, eos_token_id=2)


def _is_q(x):
  return isinstance(x, QArray)


def _tree():
  """A small LLaMA-shaped tree: float leaves of several dtypes and QArrays at 2..8 bits, all layouts
  (a ragged per-OC one included)."""
  rng = np.random.default_rng(0)

  def w(*shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)

  up = w(32, 64)
  perm = jnp.asarray(rng.permutation(32), jnp.int32)
  s_up = jnp.max(jnp.abs(up[perm].reshape(2, 16, 64)), axis=1) / 31
  return {
      "embed": {"embedding": w(64, 32)},
      "layers_0": {
          "attn_norm": {"scale": jnp.ones((32,), jnp.float32)},
          "attn": {
              "q_proj": {"kernel": rtn_quantize(w(32, 32), RTNConfig(bits=2, group_size=16)),
                         "bias": w(32, dtype=jnp.float16)},
              "k_proj": {"kernel": rtn_quantize(w(32, 16), RTNConfig(
                  bits=3, group_size=8, group_axis="ic", sym=True, scale_dtype=jnp.bfloat16))},
              "v_proj": {"kernel": rtn_quantize(w(32, 16), RTNConfig(
                  bits=4, group_size=-1, group_axis="tensor", scale_dtype=jnp.float32))},
              "o_proj": {"kernel": rtn_quantize(w(32, 32), RTNConfig(bits=8, group_size=-1))},
          },
          "mlp_norm": {"scale": jnp.ones((32,), jnp.float32)},
          "mlp": {
              "gate_proj": {"kernel": rtn_quantize(  # ragged per-OC groups: 12 + 12 + 8 rows
                  w(32, 64, dtype=jnp.bfloat16), RTNConfig(bits=5, group_size=12))},
              "up_proj": {"kernel": affine.quantize_with_params(
                  up, s_up, None, bits=6, group_size=16, group_axis="oc", perm=perm)},
              "down_proj": {"kernel": w(64, 32, dtype=jnp.bfloat16)},
          },
      },
      "final_norm": {"scale": w(32)},
      "odd.key": {"a/b": jnp.arange(5, dtype=jnp.int32), "empty": {}},
  }


@pytest.fixture(scope="module")
def params():
  return _tree()


@pytest.fixture(scope="module")
def saved(params, tmp_path_factory):
  """A checkpoint of ``params``, saved once; tests that damage it work on a copy."""
  return ck.save(tmp_path_factory.mktemp("ckpt") / "model", CONFIG, params, metadata={"recipe": "rtn", "ppl": 12.5})


def _copy(saved, tmp_path):
  return shutil.copytree(saved, tmp_path / "copy")


def _assert_identical(a, b):
  """Same tree spec (QArray static fields included) and every leaf bit for bit with the same dtype."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    assert isinstance(y, jax.Array), path
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path
  for x, y in zip(jax.tree.leaves(a, is_leaf=_is_q), jax.tree.leaves(b, is_leaf=_is_q)):
    if _is_q(x):
      for f in ("bits", "group_size", "group_axis", "shape", "dtype", "scale_dtype"):
        assert getattr(x, f) == getattr(y, f) and type(getattr(x, f)) is type(getattr(y, f)), f


def _du(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


# ----------------------------------------------------------------------------- round trip


def test_round_trip_is_exact(params, saved):
  config, restored, metadata = ck.restore(saved)
  assert config == CONFIG
  assert metadata == {"recipe": "rtn", "ppl": 12.5}
  _assert_identical(params, restored)
  q = restored["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert q.perm is not None and q.zero is None and q.bits == 6
  assert np.array_equal(q.dequantize(), params["layers_0"]["mlp"]["up_proj"]["kernel"].dequantize())
  assert sorted(os.listdir(saved)) == [ck.ARRAYS_NAME, ck.JSON_NAME]


def test_restore_into_matching_target(params, saved):
  _, restored, _ = ck.restore(saved, target=jax.eval_shape(lambda: params))
  _assert_identical(params, restored)
  _, restored, _ = ck.restore(saved, target=params)
  _assert_identical(params, restored)


def test_load_model_reads_checkpoint_folder(params, saved):
  config, restored = lqx_io.load_model(saved)
  assert config == CONFIG
  _assert_identical(params, restored)
  with pytest.raises(ValueError, match="no source_model"):
    lqx_io.load_tokenizer(saved)


def test_restore_with_shardings(params, saved):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  _, restored, _ = ck.restore(saved, shardings=rep)
  assert all(x.sharding == rep for x in jax.tree.leaves(restored))
  _assert_identical(params, restored)
  tree = jax.tree.map(lambda _: rep, params)  # a QArray node holds one Sharding per field
  _, restored, _ = ck.restore(saved, shardings=tree)
  assert all(x.sharding == rep for x in jax.tree.leaves(restored))
  with pytest.raises(CheckpointError, match="embed: shardings has a str"):
    ck.restore(saved, shardings={**tree, "embed": "x"})
  with pytest.raises(CheckpointError, match="final_norm: missing from shardings"):
    ck.restore(saved, shardings={k: v for k, v in tree.items() if k != "final_norm"})


def test_restore_sharded_over_8_devices(tmp_path):
  """Arrays sharded over a simulated 8-device mesh restore into the requested NamedShardings."""
  script = textwrap.dedent(f"""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from lqx.io import checkpoint as ck
      from lqx.quant.rtn import RTNConfig, rtn_quantize
      from tests.test_checkpoint import CONFIG
      assert len(jax.devices()) == 8
      mesh = Mesh(np.array(jax.devices()), ("x",))
      oc = NamedSharding(mesh, P(None, "x"))
      w = jax.device_put(jax.random.normal(jax.random.key(0), (64, 256)), oc)
      q = jax.tree.map(lambda a: jax.device_put(a, oc), rtn_quantize(w, RTNConfig(bits=3, group_size=32)))
      params = {{"w": w, "q": q}}
      ck.save({str(tmp_path / "sharded")!r}, CONFIG, params)
      shardings = jax.tree.map(lambda a: a.sharding, params)
      saved = ck.read_json({str(tmp_path / "sharded")!r})["tree"]["dict"]["w"]["array"]["sha256"]
      assert saved == ck.array_sha256(np.asarray(w)) == ck.array_sha256(w)  # independent of the sharding
      _, out, _ = ck.restore({str(tmp_path / "sharded")!r}, shardings=shardings)  # verified, 8 shards each
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(out)):
        assert b.sharding == a.sharding and len(b.addressable_shards) == 8, b.sharding
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
      print("ok")
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_size_on_disk_matches_bits_per_weight(tmp_path):
  """Bytes on disk ~= sum(QArray.nbytes) + float bytes: packed codes are stored packed.

  Codes, zeros and scales are uniform random (incompressible; orbax compresses
  chunks, so low-entropy leaves can take less than their nbytes). Measured with
  orbax-checkpoint 0.12.8: ~7 KiB fixed (orbax manifests + JSON head) plus ~0.8
  KiB per array leaf (orbax's per-array metadata and our JSON entry).
  """
  rng = np.random.default_rng(1)

  def rand_q(bits, ic, oc, g):
    gs = (ic // g, oc)
    return affine.from_codes(
        jnp.asarray(rng.integers(0, 2**bits, (ic, oc), dtype=np.uint8)),
        jnp.asarray(rng.uniform(0.01, 1.0, gs), jnp.float32), jnp.asarray(rng.integers(0, 2**bits, gs)),
        bits=bits, group_size=g, group_axis="oc", dtype=jnp.float32, scale_dtype=jnp.float16)

  params = {f"layers_{i}": {"kernel": rand_q(b, 512, 512, 64), "norm": jnp.asarray(rng.normal(size=512), jnp.float32)}
            for i, b in enumerate((2, 3, 4, 8))}
  path = ck.save(tmp_path / "size", CONFIG, params)
  payload = sum(x.nbytes for x in jax.tree.leaves(params, is_leaf=_is_q))
  n_arrays = len(jax.tree.leaves(params))
  total = _du(path)
  assert 0.98 * payload <= total <= payload + 16 * 1024 + 1024 * n_arrays, (total, payload, n_arrays)
  bpw = 8 * sum(x.nbytes for x in jax.tree.leaves(params, is_leaf=_is_q) if _is_q(x)) / (4 * 512 * 512)
  assert bpw < (2 + 3 + 4 + 8) / 4 + 1  # sanity: packed, not one byte per code


# ----------------------------------------------------------------------------- atomic saves


def test_refuses_to_overwrite(params, saved, tmp_path):
  with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
    ck.save(saved, CONFIG, params)
  other = tmp_path / "notes"
  other.mkdir()
  (other / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not an lqx checkpoint folder"):
    ck.save(other, CONFIG, params, overwrite=True)
  assert (other / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_replaces(params, saved, tmp_path, monkeypatch, exchange):
  path = _copy(saved, tmp_path)
  if not exchange:
    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
  small = {"w": jnp.arange(6, dtype=jnp.float32)}
  ck.save(path, CONFIG, small, metadata={"v": 2}, overwrite=True)
  _, restored, metadata = ck.restore(path)
  assert metadata == {"v": 2}
  _assert_identical(small, restored)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def _boom(*args, **kwargs):
  raise RuntimeError("simulated crash")


@pytest.mark.parametrize("where", ["json", "orbax"])
def test_interrupted_save_leaves_nothing(params, tmp_path, monkeypatch, where):
  dest = tmp_path / "model"
  real = ck._save_arrays
  if where == "json":
    monkeypatch.setattr(ck, "_write_json", _boom)
  else:
    def partial(path, tree):
      real(path, {k: tree[k] for k in list(tree)[:1]})
      raise RuntimeError("simulated crash")

    monkeypatch.setattr(ck, "_save_arrays", partial)
  with pytest.raises(RuntimeError, match="simulated crash"):
    ck.save(dest, CONFIG, params)
  assert not dest.exists()
  assert list(tmp_path.iterdir()) == []  # the temp folder was cleaned up
  with pytest.raises(CheckpointError, match="does not exist"):
    ck.restore(dest)


def test_killed_save_leaves_only_a_refused_temp_folder(params, tmp_path, monkeypatch):
  """A process killed before cleanup leaves a hidden temp folder that never restores as valid."""
  dest = tmp_path / "model"
  monkeypatch.setattr(ck, "_discard", lambda path: None)  # no cleanup: the process died
  real_rename = os.rename

  def rename(src, dst):  # dies just before the final rename, after JSON and arrays are complete
    if ck.TMP_MARK in os.path.basename(src):
      raise RuntimeError("simulated crash")
    real_rename(src, dst)

  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(RuntimeError, match="simulated crash"):
    ck.save(dest, CONFIG, params)
  monkeypatch.undo()
  assert not dest.exists()
  (tmp,) = tmp_path.iterdir()
  assert tmp.name.startswith(".model" + ck.TMP_MARK) and (tmp / ck.JSON_NAME).is_file()
  with pytest.raises(CheckpointError, match="leftover of an interrupted save"):
    ck.restore(dest)
  with pytest.raises(CheckpointError, match="temporary folder of an lqx save"):
    ck.restore(tmp)
  with pytest.raises(CheckpointError, match="temporary folder of an lqx save"):
    lqx_io.load_model(tmp)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_failed_overwrite_keeps_old_checkpoint(params, saved, tmp_path, monkeypatch, exchange):
  path = _copy(saved, tmp_path)
  if not exchange:
    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
  monkeypatch.setattr(ck, "_write_json", _boom)
  with pytest.raises(RuntimeError, match="simulated crash"):
    ck.save(path, CONFIG, {"w": jnp.zeros(3)}, overwrite=True)
  monkeypatch.undo()
  if not exchange:  # the last step fails: the old folder was moved aside, and must come back
    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
      if ck.TMP_MARK in os.path.basename(src):
        raise OSError("simulated rename failure")
      real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated rename failure"):
      ck.save(path, CONFIG, {"w": jnp.zeros(3)}, overwrite=True)
    monkeypatch.undo()
  _, restored, metadata = ck.restore(path)
  _assert_identical(params, restored)
  assert metadata["recipe"] == "rtn"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_save_rejects_bad_inputs_before_writing(params, tmp_path):
  dest = tmp_path / "model"
  with pytest.raises(TypeError, match="metadata is not JSON-serializable"):
    ck.save(dest, CONFIG, params, metadata={"f": object()})
  with pytest.raises(TypeError, match="config must be a dataclass instance, a dict or None, got list"):
    ck.save(dest, [32], params)
  with pytest.raises(TypeError, match="config.width: value of type object is not JSON-encodable"):
    ck.save(dest, ToyConfig(width=object()), params)
  with pytest.raises(CheckpointError, match="layers_0/x: unsupported node of type list"):
    ck.save(dest, CONFIG, {"layers_0": {"x": [1, 2]}})
  with pytest.raises(CheckpointError, match="w: numpy array of dtype float64"):
    ck.save(dest, CONFIG, {"w": np.zeros(3)})
  assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- errors


def _shape_tree(params):
  return jax.eval_shape(lambda: params)


def _drop(t):
  del t["layers_0"]["mlp"]["down_proj"]
  return t


def _add(t):
  t["layers_0"]["mlp"]["extra"] = jax.ShapeDtypeStruct((3,), jnp.float32)
  return t


def _reshape(t):
  t["embed"]["embedding"] = jax.ShapeDtypeStruct((64, 16), jnp.float32)
  return t


def _retype(t):
  t["final_norm"]["scale"] = jax.ShapeDtypeStruct((32,), jnp.bfloat16)
  return t


def _rebits(t):
  k = t["layers_0"]["attn"]["q_proj"]
  k["kernel"] = dataclasses.replace(k["kernel"], bits=3)
  return t


def _dequantized(t):
  t["layers_0"]["attn"]["k_proj"]["kernel"] = jax.ShapeDtypeStruct((32, 16), jnp.float32)
  return t


def _symmetric(t):
  k = t["layers_0"]["attn"]["o_proj"]
  k["kernel"] = dataclasses.replace(k["kernel"], zero=None)
  return t


@pytest.mark.parametrize("edit, message", [
    (_drop, "layers_0/mlp/down_proj: in the checkpoint but not in the target"),
    (_add, "layers_0/mlp/extra: in the target but not in the checkpoint"),
    (_reshape, r"embed/embedding: checkpoint has an array \(64, 32\) float32, target has an array \(64, 16\)"),
    (_retype, "final_norm/scale: checkpoint has an array .* float32, target has an array .* bfloat16"),
    (_rebits, "layers_0/attn/q_proj/kernel: QArray bits is 2 in the checkpoint, 3 in the target"),
    (_dequantized, "layers_0/attn/k_proj/kernel: checkpoint has a QArray, target has an array"),
    (_symmetric, r"layers_0/attn/o_proj/kernel.zero: checkpoint has an array \(1, 32\) uint8, target has None"),
])
def test_mismatched_target_names_first_path(params, saved, edit, message):
  with pytest.raises(CheckpointError, match="target does not match the checkpoint at " + message):
    ck.restore(saved, target=edit(_shape_tree(params)))


def _edit_json(path, fn):
  jpath = path / ck.JSON_NAME
  doc = json.loads(jpath.read_text())
  fn(doc)
  jpath.write_text(json.dumps(doc))


def _set_shape(doc):
  doc["tree"]["dict"]["embed"]["dict"]["embedding"]["array"]["shape"] = [32, 64]


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / ck.JSON_NAME).write_text((p / ck.JSON_NAME).read_text()[:200]), "corrupt, not valid JSON"),
    (lambda p: _edit_json(p, lambda d: d.update(version=5)), "format version 5; this lqx reads versions 1, 2, 3, 4"),
    (lambda p: _edit_json(p, lambda d: d.update(format="other")), "corrupt, not an lqx checkpoint description"),
    (lambda p: _edit_json(p, lambda d: d.pop("tree")), "corrupt, 'tree' is missing"),
    (lambda p: _edit_json(p, lambda d: d["config"]["fields"].update(dim=-1)), "corrupt config: LlamaConfig.dim"),
    (lambda p: _edit_json(p, lambda d: d.update(config={"dim": 1})), "corrupt, 'config' is missing or not a config"),
    (lambda p: _edit_json(p, _set_shape), r"corrupt, embed/embedding is \(32, 64\) float32 in lqx_checkpoint.json "
                                          r"but \(64, 32\) float32 in arrays/"),
    (lambda p: _edit_json(p, lambda d: d.update(tree={"dict": {"w": {"arr": 1}}})), "corrupt tree description"),
    (lambda p: (p / ck.JSON_NAME).unlink(), "not an lqx checkpoint folder"),
    (lambda p: shutil.rmtree(p / ck.ARRAYS_NAME), "arrays/ folder is missing"),
])
def test_damaged_checkpoint_errors(saved, tmp_path, damage, message):
  path = _copy(saved, tmp_path)
  damage(path)
  with pytest.raises(CheckpointError, match=message):
    ck.restore(path)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist; expected an lqx checkpoint folder"):
    ck.restore(tmp_path / "missing")
  with pytest.raises(CheckpointError, match=r"not an lqx checkpoint folder \(no lqx_checkpoint.json\)"):
    ck.restore(tmp_path)


# ----------------------------------------------------------------------------- any layout, any format


def _random_qarray(rng):
  """A QArray of a random layout: bits, group axis/size (ragged per-OC included), sym/asym, perm, dtypes."""
  bits = int(rng.choice(packing.BITS))
  ic, oc = int(rng.choice([8, 24, 40, 64])), int(rng.choice([4, 12, 32]))
  axis = str(rng.choice(affine.GROUP_AXES))
  if axis == "oc":
    g = int(rng.choice([-1, int(rng.integers(1, ic + 5))]))
  elif axis == "ic":
    g = int(rng.choice([-1] + [d for d in range(1, oc + 1) if oc % d == 0]))
  else:
    g = -1
  gshape = affine.scale_shape((ic, oc), g, axis)
  zero = None if rng.random() < 0.4 else jnp.asarray(rng.integers(0, 2**bits, gshape))
  perm = None if rng.random() < 0.5 else jnp.asarray(rng.permutation(ic), jnp.int32)
  return affine.from_codes(
      jnp.asarray(rng.integers(0, 2**bits, (ic, oc), dtype=np.uint8)),
      jnp.asarray(rng.uniform(0.01, 1.0, gshape), jnp.float32), zero, bits=bits, group_size=g, group_axis=axis,
      dtype=rng.choice([jnp.float32, jnp.bfloat16, jnp.float16]),
      scale_dtype=affine.SCALE_DTYPES[int(rng.integers(3))], perm=perm)


def test_random_qarray_layouts_round_trip_exactly(tmp_path):
  rng = np.random.default_rng(7)
  params = {f"q{i}": {"kernel": _random_qarray(rng)} for i in range(16)}
  qs = [p["kernel"] for p in params.values()]
  assert {q.group_axis for q in qs} == set(affine.GROUP_AXES) and len({q.bits for q in qs}) >= 4
  assert {q.zero is None for q in qs} == {True, False} and {q.perm is None for q in qs} == {True, False}
  path = ck.save(tmp_path / "random", CONFIG, params)
  _, restored, _ = ck.restore(path)
  _assert_identical(params, restored)
  _, restored, _ = ck.restore(path, target=jax.eval_shape(lambda: params))
  _assert_identical(params, restored)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["inner", "a", "b", "mask"],
                   meta_fields=["rank", "note"])
@dataclasses.dataclass(frozen=True)
class Wrapper:
  """Test format: ``inner.dequantize() + a @ b``, ``a`` ``(IC, rank)``, ``b`` ``(rank, OC)``; ``mask`` unused."""

  inner: Any
  a: jax.Array
  b: jax.Array
  mask: jax.Array | None
  rank: int
  note: tuple

  @property
  def shape(self):
    return self.inner.shape

  @property
  def dtype(self):
    return self.inner.dtype

  def dequantize(self):
    return (self.inner.dequantize().astype(jnp.float32) + self.a @ self.b).astype(self.dtype)

  def linear(self, x):
    return x @ self.dequantize().astype(x.dtype)

  @property
  def stored_bits(self):
    own = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in (self.a, self.b))
    return self.inner.stored_bits + 8 * own

  @property
  def bits_per_weight(self):
    return self.stored_bits / (self.shape[0] * self.shape[1])

  def check(self):
    if (self.a.shape, self.b.shape) != ((self.shape[0], self.rank), (self.rank, self.shape[1])):
      raise ValueError(f"rank={self.rank} does not fit a {self.a.shape} and b {self.b.shape}")


@pytest.fixture
def wrapper():
  formats.register("test-wrapper", Wrapper)
  yield Wrapper
  formats.FORMATS.pop("test-wrapper")


def _wrapped():
  rng = np.random.default_rng(3)
  q = _random_qarray(rng)
  ic, oc = q.shape

  def wrap(inner, rank, dtype):
    a, b = (jnp.asarray(rng.normal(size=s), dtype) for s in ((ic, rank), (rank, oc)))
    return Wrapper(inner, a, b, None, rank, ("low", "rank"))

  return {"w": {"kernel": wrap(wrap(q, 2, jnp.float32), 3, jnp.bfloat16)}, "norm": jnp.ones((oc,), jnp.float32)}


def test_nested_wrapper_format_round_trips(wrapper, tmp_path):
  params = _wrapped()
  path = ck.save(tmp_path / "wrapped", None, params)
  spec = ck.read_json(path)["tree"]["dict"]["w"]["dict"]["kernel"]["format"]
  assert spec["name"] == "test-wrapper" and spec["data"]["mask"] is None
  assert spec["data"]["inner"]["format"]["data"]["inner"]["format"]["name"] == "affine"
  config, restored, _ = ck.restore(path)
  assert config is None
  _assert_identical(params, restored)
  k = restored["w"]["kernel"]
  assert type(k) is Wrapper and type(k.inner) is Wrapper and type(k.inner.inner) is QArray
  assert k.note == ("low", "rank") and k.inner.rank == 2
  assert np.asarray(k.dequantize()).tobytes() == np.asarray(params["w"]["kernel"].dequantize()).tobytes()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  _, restored, _ = ck.restore(path, target=params, shardings=jax.tree.map(lambda _: rep, params))
  assert all(x.sharding == rep for x in jax.tree.leaves(restored))
  target = _wrapped()
  target["w"]["kernel"] = dataclasses.replace(target["w"]["kernel"], note=("other",))
  with pytest.raises(CheckpointError, match=r"at w/kernel: Wrapper note is \('low', 'rank'\) in the checkpoint, "
                                            r"\('other',\) in the target"):
    ck.restore(path, target=target)


def test_unregistered_format_is_refused_on_save(tmp_path):
  with pytest.raises(CheckpointError, match="w/kernel: Wrapper is not a registered format"):
    ck.save(tmp_path / "x", None, _wrapped())
  assert list(tmp_path.iterdir()) == []


def _kernel_spec(doc, *path):
  node = doc["tree"]
  for k in path:
    node = node["dict"][k]
  return node["format"]


def test_unknown_format_name(wrapper, tmp_path):
  path = ck.save(tmp_path / "wrapped", None, _wrapped())
  formats.FORMATS.pop("test-wrapper")
  names = re.escape(str(sorted(formats.FORMATS)))
  with pytest.raises(CheckpointError, match=r"w/kernel: unknown format 'test-wrapper'; registered formats are "
                                            + names):
    ck.restore(path)
  formats.register("test-wrapper", Wrapper)
  _edit_json(path, lambda d: _kernel_spec(d, "w", "kernel")["data"]["inner"]["format"].update(name="nope"))
  with pytest.raises(CheckpointError, match=r"w/kernel.inner: unknown format 'nope'; registered formats are "
                                            + re.escape(str(sorted(formats.FORMATS)))):
    ck.restore(path)


def test_format_check_method_runs_on_restore(wrapper, tmp_path):
  path = ck.save(tmp_path / "wrapped", None, _wrapped())
  _edit_json(path, lambda d: _kernel_spec(d, "w", "kernel")["data"]["inner"]["format"]["static"].update(rank=5))
  with pytest.raises(CheckpointError, match=r"w/kernel.inner: saved test-wrapper format does not fit its arrays: "
                                            r"rank=5 does not fit"):
    ck.restore(path)


def _edit_q(field, value):
  def edit(doc):
    spec = _kernel_spec(doc, "layers_0", "attn", "q_proj", "kernel")
    if value is None:
      del spec["static"][field]
    else:
      spec["static"][field] = value
  return edit


@pytest.mark.parametrize("edit, message", [
    (_edit_q("bits", 3), r"packed is \(2, 32\) uint32, but bits=3, .* need \(3, 32\) uint32"),
    (_edit_q("bits", 7), "bits=7 is not a packable code width"),
    (_edit_q("group_size", 8), r"scale is \(2, 32\) float16, but .*group_size=8, .* need \(4, 32\) float16"),
    (_edit_q("group_size", 5), r"scale is \(2, 32\) float16, but .*group_size=5, .* need \(7, 32\) float16"),
    (_edit_q("group_axis", "ic"), r"scale is \(2, 32\) float16, but .*group_axis='ic'.* need \(32, 2\)"),
    (_edit_q("shape", {"tuple": [32, 16]}), r"packed is \(2, 32\) uint32, but .*shape=\(32, 16\).* need \(2, 16\)"),
    (_edit_q("shape", [32, 32]), r"kernel.shape: corrupt static field: unexpected static value \[32, 32\]"),
    (_edit_q("shape", {"tuple": [32, 0]}), r"shape=\(32, 0\) is not a pair of positive ints"),
    (_edit_q("scale_dtype", {"dtype": "bfloat16"}), r"scale is \(2, 32\) float16, but .* need \(2, 32\) bfloat16"),
    (_edit_q("scale_dtype", {"dtype": "int8"}), "scale_dtype=.* is not a scale storage type"),
    (_edit_q("dtype", {"dtype": "int32"}), "dtype=dtype\\('int32'\\) is not a float dtype"),
    (_edit_q("dtype", {"dtype": "bfloat16"}), "tree description does not match its tree_sha256"),
    (_edit_q("bits", None), "saved affine fields .* do not fit QArray"),
])
def test_hand_edited_format_settings_are_refused(saved, tmp_path, edit, message):
  path = _copy(saved, tmp_path)
  _edit_json(path, edit)
  with pytest.raises(CheckpointError, match=message) as e:
    ck.restore(path)
  assert ("tree_sha256" in message) != ("layers_0/attn/q_proj/kernel" in str(e.value))


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """A non-LLaMA model config."""

  width: Any
  widths: tuple = (1, 2)
  act: str = "gelu"
  eps: float = 1e-6
  dtype: Any = np.dtype(jnp.bfloat16)
  extra: dict | None = None


@pytest.fixture
def registry(monkeypatch):
  monkeypatch.setattr(ck, "CONFIGS", dict(ck.CONFIGS))
  return ck.CONFIGS


def test_registered_config_round_trips(registry, tmp_path):
  assert ck.register_config(ToyConfig) is ToyConfig
  config = ToyConfig(width=3, widths=(4, 5, 6), extra={"rope": (1.0, 2.5), "name": None})
  path = ck.save(tmp_path / "toy", config, {"w": jnp.arange(4, dtype=jnp.float32)})
  assert ck.read_json(path)["config"]["class"] == ck.config_name(ToyConfig)
  restored, params, _ = ck.restore(path)
  assert restored == config and type(restored) is ToyConfig
  assert type(restored.widths) is tuple and type(restored.extra["rope"]) is tuple
  assert restored.dtype == np.dtype(jnp.bfloat16)
  assert lqx_io.load_model(path)[0] == config


def test_unregistered_config_class(registry, tmp_path):
  params = {"w": jnp.arange(4, dtype=jnp.float32)}
  path = ck.save(tmp_path / "toy", ToyConfig(width=3), params)
  name = ck.config_name(ToyConfig)
  with pytest.raises(CheckpointError, match=f"config class '{name}' is not an allowed config class .*"
                                            f"register_config.*build_config=False"):
    ck.restore(path)
  with pytest.raises(CheckpointError, match="is not an allowed config class"):
    lqx_io.load_model(path)
  config, restored, _ = ck.restore(path, build_config=False)
  assert config == {"class": name, "fields": {"width": 3, "widths": (1, 2), "act": "gelu", "eps": 1e-6,
                                              "dtype": np.dtype(jnp.bfloat16), "extra": None}}
  _assert_identical(params, restored)
  ck.register_config(ToyConfig)
  assert ck.restore(path)[0] == ToyConfig(width=3)


def test_none_and_dict_configs(tmp_path):
  params = {"w": jnp.arange(4, dtype=jnp.float32)}
  path = ck.save(tmp_path / "none", None, params)
  assert ck.restore(path)[0] is None and ck.restore(path, build_config=False)[0] is None
  path = ck.save(tmp_path / "dict", {"dim": 32, "axes": (0, 1)}, params)
  assert ck.restore(path)[0] == {"dim": 32, "axes": (0, 1)}
  assert ck.restore(path, build_config=False)[0] == {"class": None, "fields": {"dim": 32, "axes": (0, 1)}}


def test_llama_config_is_stored_as_class_and_fields(saved):
  doc = ck.read_json(saved)
  assert doc["version"] == ck.VERSION == 4
  assert doc["config"] == {"class": "lqx.models.llama:LlamaConfig", "fields": dataclasses.asdict(CONFIG)}


# ----------------------------------------------------------------------------- version 1


def _v1_tree(spec):
  """A version-2 tree spec as version 1 wrote it (spec key "qarray", leaves as bare array specs)."""
  if "dict" in spec:
    return {"dict": {k: _v1_tree(v) for k, v in spec["dict"].items()}}
  if "format" in spec:
    f = spec["format"]
    assert f["name"] == "affine"
    return {"qarray": {"static": f["static"],
                       "leaves": {n: None if s is None else _no_sha(s)["array"] for n, s in f["data"].items()}}}
  return _no_sha(spec)


def _no_sha(spec):
  """An array node without its sha256 (as versions 1 and 2 wrote it)."""
  return {"array": {k: v for k, v in spec["array"].items() if k != "sha256"}} if "array" in spec else spec


def _to_v1(doc):
  """``doc`` rewritten as the version-1 code wrote it (bare LlamaConfig fields, no digest)."""
  return {"format": doc["format"], "version": 1, "orbax_checkpoint": doc["orbax_checkpoint"],
          "config": doc["config"]["fields"], "metadata": doc["metadata"], "tree": _v1_tree(doc["tree"])}


def test_version_1_checkpoint_restores(params, saved, tmp_path):
  path = _copy(saved, tmp_path)
  jpath = path / ck.JSON_NAME
  jpath.write_text(json.dumps(_to_v1(json.loads(jpath.read_text())), indent=1) + "\n")
  assert '"qarray"' in jpath.read_text() and '"sha256"' not in jpath.read_text()
  with pytest.warns(UserWarning, match="arrays have no saved sha256 .* restored without verification"):
    config, restored, metadata = ck.restore(path)
  assert config == CONFIG and metadata == {"recipe": "rtn", "ppl": 12.5}
  _assert_identical(params, restored)
  _, restored, _ = ck.restore(path, target=jax.eval_shape(lambda: params), verify=False)
  _assert_identical(params, restored)
  with pytest.warns(UserWarning, match="no saved sha256"):
    assert lqx_io.load_model(path)[0] == CONFIG
  _edit_json(path, lambda d: d["tree"]["dict"]["layers_0"]["dict"]["attn"]["dict"]["q_proj"]["dict"]["kernel"]
             ["qarray"]["static"].update(bits=4))
  with pytest.raises(CheckpointError, match="layers_0/attn/q_proj/kernel: saved affine format does not fit"):
    ck.restore(path)


def _to_v2(doc):
  """``doc`` as version 2 wrote it: no array sha256s, no config_sha256, no file list."""
  tree = json.loads(json.dumps(doc["tree"]), object_hook=lambda d: _no_sha({"array": d})["array"]
                    if set(d) == {"shape", "dtype", "sha256"} else d)
  out = {k: v for k, v in doc.items() if k not in ("config_sha256", "files")}
  return {**out, "version": 2, "tree": tree, "tree_sha256": ck._digest(tree)}


def test_version_2_checkpoint_restores_unverified(params, saved, tmp_path):
  path = _copy(saved, tmp_path)
  _edit_json(path, lambda d: d.update(_to_v2(d)))
  assert '"sha256"' not in (path / ck.JSON_NAME).read_text()
  with pytest.warns(UserWarning, match=r"\d+ arrays have no saved sha256 .*version 3.*embed/embedding"):
    config, restored, _ = ck.restore(path)
  assert config == CONFIG
  _assert_identical(params, restored)


# ----------------------------------------------------------------------------- checksums


def _data_files(path):
  """The array data files under ``arrays/``, largest first."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(path / ck.ARRAYS_NAME) for f in fs
           if os.path.basename(r) == "d"]
  return sorted(files, key=os.path.getsize, reverse=True)


def _flip(file, offset, mask=0x5A):
  with open(file, "r+b") as f:
    f.seek(offset)
    b = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([b ^ mask]))


def test_array_sha256_is_canonical():
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  h = ck.array_sha256(x)
  assert h == ck.array_sha256(jnp.asarray(x)) == ck.array_sha256(np.asfortranarray(x))
  assert h == ck.array_sha256(x.astype(">f4"))  # big-endian bytes hash as little-endian
  assert h != ck.array_sha256(x.reshape(4, 3)) and h != ck.array_sha256(x.view(np.int32))
  assert ck.array_sha256(jnp.zeros((2, 0), jnp.bfloat16)) != ck.array_sha256(jnp.zeros((0, 2), jnp.bfloat16))
  assert ck.array_sha256(np.zeros(0, np.uint8)) == __import__("hashlib").sha256(b"uint8 0\n").hexdigest()


def test_saved_sha256_matches_the_arrays(params, saved):
  spec = ck.read_json(saved)["tree"]
  assert spec["dict"]["embed"]["dict"]["embedding"]["array"]["sha256"] == ck.array_sha256(params["embed"]["embedding"])
  q = params["layers_0"]["attn"]["q_proj"]["kernel"]
  got = _kernel_spec({"tree": spec}, "layers_0", "attn", "q_proj", "kernel")["data"]["packed"]["array"]["sha256"]
  assert got == ck.array_sha256(q.packed)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax: failed reads
def test_byte_flips_in_array_data_never_restore_changed_weights(params, saved, tmp_path):
  """The tester's case: flips inside arrays/ data restored changed weights; now they are a CheckpointError."""
  rng = np.random.default_rng(4)
  outcomes = {"error": 0, "sha256": 0, "exact": 0, "changed_unverified": 0}
  for i in range(24):
    path = shutil.copytree(saved, tmp_path / f"c{i}")
    files = _data_files(path)
    file = files[0] if i % 2 else files[int(rng.integers(len(files)))]
    _flip(file, int(rng.integers(os.path.getsize(file))), int(rng.integers(1, 256)))
    try:
      _, restored, _ = ck.restore(path)
      _assert_identical(params, restored)
      outcomes["exact"] += 1
      continue
    except CheckpointError as e:
      outcomes["error"] += 1
      if "does not match the sha256 saved for it" in str(e):
        outcomes["sha256"] += 1
        assert str(e).startswith(f"{path}: corrupt, array ")
    try:  # what restore did before checksums
      _, restored, _ = ck.restore(path, verify=False)
      _assert_identical(params, restored)
    except CheckpointError:
      pass
    except AssertionError:
      outcomes["changed_unverified"] += 1
  assert outcomes["error"] + outcomes["exact"] == 24, outcomes
  assert outcomes["sha256"] >= 3 and outcomes["changed_unverified"] >= 3, outcomes


def _edit_sha(leaf_path, value):
  """Set one array's saved sha256 and re-sign the tree, as damage the digests cannot see would."""
  def edit(doc):
    node = doc["tree"]
    for k in leaf_path[:-1]:
      node = node["dict"][k]
    node = node["format"]["data"][leaf_path[-1]] if "format" in node else node["dict"][leaf_path[-1]]
    node["array"]["sha256"] = value
    doc["tree_sha256"] = ck._digest(doc["tree"])
  return edit


def test_sha256_mismatch_names_the_array(params, saved, tmp_path):
  path = _copy(saved, tmp_path)
  _edit_json(path, _edit_sha(("layers_0", "attn", "q_proj", "kernel", "scale"), "0" * 64))
  with pytest.raises(CheckpointError, match=r"corrupt, array layers_0/attn/q_proj/kernel.scale does not match "
                                            r"the sha256 saved for it in lqx_checkpoint.json"):
    ck.restore(path)
  _, restored, _ = ck.restore(path, verify=False)  # verification off: trusts the bytes
  _assert_identical(params, restored)
  _edit_json(path, _edit_sha(("embed", "embedding"), "xyz"))
  with pytest.raises(CheckpointError, match=r"embed/embedding: corrupt array description .*sha256"):
    ck.restore(path, verify=False)


def test_sha256_verified_under_shardings(params, saved, tmp_path):
  path = _copy(saved, tmp_path)
  _edit_json(path, _edit_sha(("final_norm", "scale"), "0" * 64))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with pytest.raises(CheckpointError, match="array final_norm/scale does not match the sha256"):
    ck.restore(path, shardings=rep)


@pytest.mark.parametrize("damage, message", [
    (lambda p: _flip(_data_files(p)[0], 0, 0xFF) or _truncate(_data_files(p)[0]),
     r"corrupt, arrays/ocdbt.process_0/d/\w+ is \d+ bytes, lqx_checkpoint.json says \d+ \(truncated"),
    (lambda p: os.unlink(_data_files(p)[-1]), r"incomplete checkpoint, arrays/.*/d/\w+ is missing"),
    (lambda p: _edit_json(p, lambda d: d.update(files={"../x": 1})), r"'files' lists '../x', not a path under arrays/"),
    (lambda p: _edit_json(p, lambda d: d.pop("files")), r"'files' is missing or not a \{path: size\} dict"),
    (lambda p: _edit_json(p, lambda d: d.pop("tree_sha256")), "'tree_sha256' is missing or not a sha256"),
    (lambda p: _edit_json(p, lambda d: d.update(config_sha256=1)), "'config_sha256' is missing or not a sha256"),
    (lambda p: _edit_json(p, lambda d: d["config"]["fields"].update(rope_theta=1e4)),
     "the config does not match its config_sha256"),
    (lambda p: _edit_json(p, lambda d: d.update(version=3.0)), "checkpoint format version 3.0"),
    (lambda p: _edit_json(p, lambda d: d.update(version=True)), "checkpoint format version True"),
])
def test_damaged_files_and_digests(saved, tmp_path, damage, message):
  path = _copy(saved, tmp_path)
  damage(path)
  with pytest.raises(CheckpointError, match=message):
    ck.restore(path)


def _truncate(file):
  os.truncate(file, os.path.getsize(file) // 2)


def test_hand_edited_group_size_that_fits_the_arrays_is_refused(params, saved, tmp_path):
  """group_size 16 -> 20 keeps every array shape (2 groups of 32 rows) but would shift the logits."""
  path = _copy(saved, tmp_path)
  _edit_json(path, _edit_q("group_size", 20))
  with pytest.raises(CheckpointError, match="tree description does not match its tree_sha256"):
    ck.restore(path)
  doc = json.loads((path / ck.JSON_NAME).read_text())  # re-signed: restores, with other weights
  doc["tree_sha256"] = ck._digest(doc["tree"])
  (path / ck.JSON_NAME).write_text(json.dumps(doc))
  _, restored, _ = ck.restore(path)
  a, b = (t["layers_0"]["attn"]["q_proj"]["kernel"] for t in (params, restored))
  assert b.group_size == 20 and not np.array_equal(a.dequantize(), b.dequantize())


# ----------------------------------------------------------------------------- overwrite: only lqx's files


@pytest.mark.parametrize("extra", ["notes.txt", "arrays/notes.txt", "arrays/d/mine", "empty_dir/"])
def test_overwrite_refuses_a_checkpoint_holding_user_files(params, saved, tmp_path, extra):
  path = _copy(saved, tmp_path)
  if extra.endswith("/"):
    (path / extra).mkdir()
  else:
    (path / extra).write_text("mine")
  with pytest.raises(FileExistsError, match=f"holds {extra.rstrip('/')}, which lqx did not write; refusing"):
    ck.save(path, CONFIG, {"w": jnp.zeros(3)}, overwrite=True)
  assert extra.endswith("/") or (path / extra).read_text() == "mine"
  _assert_identical(params, ck.restore(path)[1])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_overwrite_refuses_a_foreign_marker(params, tmp_path):
  for text in ('{"hello": 1}', "not json"):
    other = tmp_path / "other"
    other.mkdir(exist_ok=True)
    (other / ck.JSON_NAME).write_text(text)
    with pytest.raises(FileExistsError, match=r"not an lqx checkpoint folder \(no readable lqx_checkpoint.json\)"):
      ck.save(other, CONFIG, params, overwrite=True)
    assert (other / ck.JSON_NAME).read_text() == text
  link = tmp_path / "link"
  link.symlink_to(ck.save(tmp_path / "real", CONFIG, {"w": jnp.zeros(3)}))
  with pytest.raises(FileExistsError, match="exists and is not a folder"):
    ck.save(link, CONFIG, params, overwrite=True)


def test_overwrite_replaces_an_empty_folder(tmp_path):
  (tmp_path / "empty").mkdir()
  ck.save(tmp_path / "empty", None, {"w": jnp.ones(3)}, overwrite=True)
  assert ck.restore(tmp_path / "empty")[1]["w"].tolist() == [1, 1, 1]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_keeps_a_file_added_during_the_save(saved, tmp_path, monkeypatch, exchange):
  """A user file that appears after the checks survives; the old folder stays (with a warning) to hold it."""
  path = _copy(saved, tmp_path)
  real = ck._exchange

  def exchange_late(a, b):
    (path / "late.txt").write_text("mine")
    return real(a, b) if exchange else False

  monkeypatch.setattr(ck, "_exchange", exchange_late)
  with pytest.warns(UserWarning, match="left in place, it holds files lqx did not write"):
    ck.save(path, CONFIG, {"w": jnp.zeros(3)}, overwrite=True)
  assert ck.restore(path)[1]["w"].shape == (3,)
  (kept,) = (p for p in tmp_path.iterdir() if p.name != "copy")
  assert sorted(os.listdir(kept)) == ["late.txt"] and (kept / "late.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- leftovers of interrupted saves


def _killed_save(dest):
  """Run a save of a 4 MB tree in a subprocess that SIGKILLs itself once the arrays are written."""
  script = textwrap.dedent(f"""
      import os, signal, jax.numpy as jnp, numpy as np
      from lqx.io import checkpoint as ck
      real = ck._save_arrays
      def save_arrays(path, tree):
        real(path, tree)
        os.kill(os.getpid(), signal.SIGKILL)
      ck._save_arrays = save_arrays
      ck.save({str(dest)!r}, None, {{"w": jnp.asarray(np.random.default_rng(0).normal(size=(1024, 1024)), jnp.float32), "b": jnp.zeros(3)}})
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, timeout=120)
  assert out.returncode == -9, out.stderr[-3000:]


def test_next_save_removes_what_a_killed_save_left(params, tmp_path):
  dest = tmp_path / "model"
  _killed_save(dest)
  (tmp,) = tmp_path.iterdir()
  assert tmp.name.startswith(".model" + ck.TMP_MARK) and (tmp / ck.SAVE_MARK).is_file()
  assert _du(tmp) > 4 * 2**20 * 0.9  # a full copy of the arrays: what used to pile up
  assert not dest.exists()
  with pytest.raises(CheckpointError, match="leftover of an interrupted save"):
    ck.restore(dest)
  other = tmp_path / f".other{ck.TMP_MARK}0123"  # another destination's leftover: not ours to judge
  shutil.copytree(tmp, other)
  ck.save(dest, CONFIG, params)
  assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "model"]
  _assert_identical(params, ck.restore(dest)[1])


def _fake_tmp(tmp_path, name, marker):
  p = tmp_path / f".model{ck.TMP_MARK}{name}"
  (p / ck.ARRAYS_NAME).mkdir(parents=True)
  (p / ck.ARRAYS_NAME / "x").write_bytes(b"0" * 100)
  if marker is not None:
    (p / ck.SAVE_MARK).write_text(json.dumps(marker) if isinstance(marker, dict) else marker)
  return p


def test_leftovers_that_may_be_live_or_foreign_are_reported_not_removed(tmp_path):
  import socket

  here = socket.gethostname()
  kept = [_fake_tmp(tmp_path, "live", {"pid": os.getpid(), "host": here, "dest": "model"}),
          _fake_tmp(tmp_path, "remote", {"pid": 1, "host": here + "-other", "dest": "model"}),
          _fake_tmp(tmp_path, "nomark", None),
          _fake_tmp(tmp_path, "badmark", "{"),
          _fake_tmp(tmp_path, "pid0", {"pid": 0, "host": here, "dest": "model"})]
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  gone = _fake_tmp(tmp_path, "dead", {"pid": int(dead.stdout), "host": here, "dest": "model"})
  with pytest.warns(UserWarning) as record:
    ck.save(tmp_path / "model", None, {"w": jnp.zeros(3)})
  messages = "\n".join(str(w.message) for w in record)
  assert "process %d that writes it is alive" % os.getpid() in messages
  assert "may still run" in messages and "not recognised" in messages and "marker is unreadable" in messages
  assert all(p.is_dir() for p in kept) and not gone.exists()


def test_killed_overwrite_leftovers(params, saved, tmp_path):
  """An old checkpoint moved aside: removed once the new one is in place, kept while it is the only copy."""
  dest = tmp_path / "model"
  old = tmp_path / f".model{ck.OLD_MARK}abc"
  shutil.copytree(saved, old)  # killed between the two renames: no model/, the old one aside
  with pytest.warns(UserWarning, match="holds the previous checkpoint of model .*rename it back"):
    ck.save(dest, None, {"w": jnp.zeros(3)})
  assert old.is_dir()
  shutil.copytree(saved, tmp_path / f".model{ck.TMP_MARK}done")  # killed just before the final rename
  (old / "mine.txt").write_text("mine")
  with pytest.warns(UserWarning, match=r"\.model\.lqx-old-abc: leftover .* not recognised"):
    ck.save(dest, CONFIG, params, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == [old.name, "model"]
  (old / "mine.txt").unlink()
  ck.save(dest, CONFIG, params, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
