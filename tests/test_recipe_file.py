"""Recipe files (JSON/YAML): every registered method round-trips, bad files name file, rule and field."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from conftest import run_script
from lqx import quant, recipe, recipe_file
from lqx.io import checkpoint as ck
from lqx.quant.gptq import GPTQConfig
from lqx.quant.lorc import LoRCConfig
from lqx.quant.rtn import RTNConfig
from lqx.recipe import Rule
from lqx.recipe_file import RecipeError
from test_cli import assert_one_line_error, run


def _other(v):
  """A different value of the same type (None if there is none to try)."""
  if isinstance(v, bool):
    return not v
  if isinstance(v, int):
    return v + 1 if v >= 0 else 64
  if isinstance(v, float):
    return v * 2 + 0.001
  if isinstance(v, tuple):
    return tuple(reversed(v)) if len(v) > 1 else None
  if isinstance(v, np.dtype):
    return np.dtype(jnp.bfloat16) if v != jnp.bfloat16 else np.dtype(np.float32)
  if isinstance(v, str):
    return {"oc": "ic", "ic": "oc", "method": "rtn", "rtn": "method"}.get(v)
  return None


def _variants(method):
  """``method`` and every config that differs from it in one field (nested bases included) and is valid."""
  out = [method]
  for f in dataclasses.fields(method):
    v = getattr(method, f.name)
    subs = _variants(v)[1:] if dataclasses.is_dataclass(v) else [_other(v)]
    for sub in subs:
      if sub is None:
        continue
      try:
        out.append(dataclasses.replace(method, **{f.name: sub}))
      except (TypeError, ValueError):
        pass  # not a valid combination (e.g. per-IC groups with static_groups)
  return out


def _typed(method):
  """Every field as ``(name, type, value)``, recursively: equal only if types match too (1 != 1.0 here)."""
  return tuple((f.name, type(v), _typed(v) if dataclasses.is_dataclass(v) else v)
               for f in dataclasses.fields(method) for v in [getattr(method, f.name)])


def _field_names(method):
  return {f.name for f in dataclasses.fields(method)}


@pytest.mark.parametrize("name", list(quant.METHODS))
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_every_registered_method_round_trips(name, suffix, tmp_path):
  methods = _variants(quant.make(name, bits=3, group_size=64))
  assert len(methods) >= 6, name  # several fields really changed
  rules = tuple(Rule(rf"layers_{i}/.*", m) for i, m in enumerate(methods)) + (Rule(".*", None),)
  path = tmp_path / f"r{suffix}"
  recipe.save_recipe(path, rules)
  back = recipe.load_recipe(path)
  assert back == rules
  for a, b in zip(rules[:-1], back):
    assert _typed(a.method) == _typed(b.method) and hash(a.method) == hash(b.method)
  doc = (json.loads if suffix == ".json" else yaml.safe_load)(path.read_text())
  assert doc[-1] == {"paths": ".*", "method": None}
  for rule, d in zip(rules[:-1], doc):
    assert d["paths"] == rule.pattern and d["method"] in quant.METHODS
    assert set(d) - {"paths", "method"} == _field_names(rule.method)  # every field written
    assert recipe_file.decode_method({k: v for k, v in d.items() if k != "paths"}) == rule.method


def test_written_name_follows_the_config():
  wlorc = LoRCConfig(GPTQConfig(bits=3), whiten=True)
  assert recipe_file.encode_method(wlorc)["method"] == "gptq+wlorc"
  sparse = quant.make("squeezellm", bits=3, sensitive_frac=0.001)
  assert sparse.name == "squeezellm-s0.1" and recipe_file.encode_method(sparse)["method"] == "squeezellm"
  assert recipe_file.encode_method(RTNConfig(bits=4))["scale_dtype"] == "float16"


@pytest.mark.parametrize("doc, method", [
    ({"method": "gptq", "bits": 3, "group_size": 64, "act_order": True},
     recipe.make_method("gptq", bits=3, group_size=64, act_order=True)),
    ({"method": "gptq+lorc", "bits": 3, "rank": 16},  # the base's fields at the rule's level
     recipe.make_method("gptq+lorc", bits=3, rank=16)),
    ({"method": "gptq+lorc", "rank": 16, "damp": 0.1, "base": {"bits": 3, "damp": 0.05}},  # damp: LoRC's, then GPTQ's
     LoRCConfig(GPTQConfig(bits=3, damp=0.05), rank=16, damp=0.1)),
    ({"method": "adadim-gptq", "bits": 2, "select_with": "rtn", "axes": ["ic"]},
     dataclasses.replace(recipe.make_method("adadim-gptq", bits=2), axes=("ic",), select_with="rtn")),
    ({"method": "squeezellm", "bits": 3, "sensitive_frac": 0.0005, "table_dtype": "float32"},
     quant.make("squeezellm", bits=3, sensitive_frac=0.0005, table_dtype=np.float32)),
    ({"method": "rtn", "bits": 4, "scale_dtype": "bfloat16", "sym": True},
     RTNConfig(bits=4, scale_dtype=jnp.bfloat16, sym=True)),
])
def test_hand_written_rules(doc, method, tmp_path):
  path = tmp_path / "r.yaml"
  path.write_text(yaml.safe_dump([{"paths": "x", **doc}]))
  assert recipe.load_recipe(path) == (Rule("x", method),)


RULE0 = {"paths": r"layers_\d+/attn/.*", "method": "rtn", "bits": 4}


@pytest.mark.parametrize("rule, words", [
    ({"paths": "x", "method": "gptqq", "bits": 4}, ["rules[1].method", "unknown method 'gptqq'", "gptq+lorc"]),
    ({"paths": "x", "method": "gptq", "bits": 4, "gruop_size": 64}, ["rules[1].gruop_size", "unknown field"]),
    ({"paths": "x", "method": "gptq", "bits": "4"}, ["rules[1].bits", "expected an int", "'4'"]),
    ({"paths": "x", "method": "gptq", "bits": 4.0}, ["rules[1].bits", "expected an int"]),
    ({"paths": "x", "method": "gptq", "bits": 4, "sym": 1}, ["rules[1].sym", "true or false"]),
    ({"paths": "x", "method": "rtn", "bits": 4, "scale_dtype": "half-ish"}, ["rules[1].scale_dtype", "dtype"]),
    ({"paths": "x", "method": "adadim-rtn", "bits": 4, "axes": "oc"}, ["rules[1].axes", "expected a list"]),
    ({"paths": "x", "method": "gptq+lorc", "base": {"bits": "3"}}, ["rules[1].base.bits", "expected an int"]),
    ({"paths": "x", "method": "gptq+lorc", "rank": 4}, ["rules[1].base.bits", "missing"]),
    ({"paths": "x", "method": "gptq+lorc", "bits": 3, "base": {"bits": 3}}, ["rules[1].bits", "both"]),
    ({"paths": "x", "method": "gptq+lorc", "bits": 3, "base": [3]}, ["rules[1].base", "mapping"]),
    ({"paths": "x", "method": "gptq+lorc", "bits": 3, "whiten": True}, ["rules[1].method", "gptq+wlorc"]),
    ({"paths": "x", "method": "gptq+lorc", "bits": 3, "rank": 0}, ["rules[1]", "rank=0"]),
    ({"paths": "x", "method": "rtn", "bits": 9}, ["rules[1]", "bits"]),
    ({"paths": "(", "method": "rtn", "bits": 4}, ["rules[1].paths", "not a valid regex"]),
    ({"paths": 3, "method": "rtn", "bits": 4}, ["rules[1].paths", "regex string"]),
    ({"method": "rtn", "bits": 4}, ["rules[1]", "no 'paths'"]),
    ({"paths": "x", "bits": 4}, ["rules[1]", "no 'method'"]),
    ({"paths": "x", "method": None, "bits": 4}, ["rules[1]", "null", "bits"]),
    ({"paths": "x", "method": "squeezellm", "bits": 3, "sensitive_frac": "5e-4"},
     ["rules[1].sensitive_frac", "5.0e-4"]),
    ("rtn", ["rules[1]", "expected a mapping"]),
])
@pytest.mark.parametrize("suffix", [".json", ".yml"])
def test_bad_rule_names_file_rule_and_field(rule, words, suffix, tmp_path):
  path = tmp_path / f"bad{suffix}"
  text = json.dumps([RULE0, rule]) if suffix == ".json" else yaml.safe_dump([RULE0, rule])
  path.write_text(text)
  with pytest.raises(RecipeError) as e:
    recipe.load_recipe(path)
  msg = str(e.value)
  assert msg.startswith(f"{path}: ") and "\n" not in msg
  for w in words:
    assert w in msg, msg


@pytest.mark.parametrize("name, text, words", [
    ("r.json", "{not json", ["not valid JSON"]),
    ("r.yaml", "- paths: x\n  method: !!python/object/apply:os.system ['echo hi']\n", ["not valid YAML"]),
    ("r.yaml", "paths: x\nmethod: rtn\n", ["expected a non-empty list of rules"]),
    ("r.json", "[]", ["non-empty list", "empty list"]),
    ("r.txt", "[]", ["must end with .json, .yaml, .yml"]),
])
def test_bad_files(name, text, words, tmp_path):
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(RecipeError) as e:
    recipe.load_recipe(path)
  assert str(path) in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
  with pytest.raises(RecipeError, match="cannot read"):
    recipe.load_recipe(tmp_path / "missing.json")


def test_unwritable_methods_are_refused_before_writing(tmp_path):
  @dataclasses.dataclass(frozen=True)
  class Mine:
    bits: int = 4
    name = "mine"

  path = tmp_path / "r.json"
  with pytest.raises(TypeError, match=r"rules\[1\]: Mine .* no registered method"):
    recipe.save_recipe(path, [Rule("a", RTNConfig(bits=4)), Rule("b", Mine())])
  with pytest.raises(TypeError, match=r"rules\[0\]: expected a lqx.recipe.Rule"):
    recipe.save_recipe(path, [("a", RTNConfig(bits=4))])
  assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- recipes in checkpoints


PARAMS = {"w": jnp.ones((4, 4), jnp.float32)}


def test_checkpoint_stores_its_recipe(tmp_path):
  rules = (Rule("w", LoRCConfig(GPTQConfig(bits=3, act_order=True), rank=2, whiten=True)), Rule(".*", None))
  path = ck.save(tmp_path / "ckpt", None, PARAMS, recipe=rules)
  assert ck.read_recipe(path) == rules
  assert ck.read_json(path)["recipe"] == recipe_file.encode(rules)
  assert ck.read_recipe(ck.save(tmp_path / "none", None, PARAMS)) is None
  recipe.save_recipe(tmp_path / "dumped.yaml", ck.read_recipe(path))  # the documented dump
  assert recipe.load_recipe(tmp_path / "dumped.yaml") == rules
  with pytest.raises(TypeError, match="expected a lqx.recipe.Rule"):
    ck.save(tmp_path / "bad", None, PARAMS, recipe=["w"])
  assert not (tmp_path / "bad").exists()


def test_hand_edited_checkpoint_recipe_names_the_json(tmp_path):
  path = ck.save(tmp_path / "ckpt", None, PARAMS, recipe=(Rule("w", RTNConfig(bits=4)),))
  doc = json.loads((path / ck.JSON_NAME).read_text())
  doc["recipe"][0]["bits"] = 99
  (path / ck.JSON_NAME).write_text(json.dumps(doc))
  with pytest.raises(ck.CheckpointError, match=r"lqx_checkpoint.json 'recipe': rules\[0\]: .*bits"):
    ck.read_recipe(path)
  ck.restore(path)  # the arrays do not depend on it


# ----------------------------------------------------------------------------- experiments/quantize.py --recipe


@pytest.fixture
def bogus_model(tmp_path):
  path = tmp_path / "bogus.gguf"
  path.write_bytes(b"not a gguf file")
  return str(path)


def test_quantize_recipe_errors_come_before_the_model_loads(bogus_model, tmp_path):
  good = tmp_path / "r.yaml"
  recipe.save_recipe(good, [Rule("x", RTNConfig(bits=4))])
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([RULE0, {"paths": "x", "method": "rtn", "bits": 4, "rnk": 2}]))
  cases = [
      (["--recipe", str(good), "--bits", "3"], ["--bits", "not allowed with --recipe"]),
      (["--recipe", str(good), "--method", "rtn"], ["--method", "not allowed with --recipe"]),
      (["--recipe", str(good), "--asym"], ["--sym", "not allowed with --recipe"]),
      (["--recipe", str(bad)], ["--recipe", "bad.json", "rules[1].rnk", "unknown field"]),
      (["--recipe", str(tmp_path / "none.yaml")], ["--recipe", "does not exist"]),
      (["--recipe", str(tmp_path)], ["--recipe", "not an lqx checkpoint"]),
      (["--recipe", str(good), "--recipe-out", str(tmp_path / "out.txt")], ["--recipe-out", ".json"]),
      (["--recipe", str(good), "--fisher", str(good)], ["--fisher", "--recipe"]),
  ]
  for argv, words in cases:
    p, seconds = run("quantize", ["--model", bogus_model, *argv], tmp_path)
    assert_one_line_error(p, seconds, *words)
  plain = ck.save(tmp_path / "plain", None, PARAMS)
  p, seconds = run("quantize", ["--model", bogus_model, "--recipe", str(plain)], tmp_path)
  assert_one_line_error(p, seconds, "--recipe", "plain", "stores no recipe")
  made = ck.save(tmp_path / "made", None, PARAMS, recipe=recipe.load_recipe(good))
  for source in (good, made):  # a good recipe (a file, or a checkpoint's): on to the model
    p, _ = run("quantize", ["--model", bogus_model, "--recipe", str(source)], tmp_path)
    assert p.returncode == 1 and "bogus.gguf" in p.stderr.splitlines()[-1], p.stderr


@pytest.mark.slow
def test_quantize_with_recipe_file_then_reapply_from_checkpoint(smollm2, tmp_path):
  """SmolLM2 block 0 by a recipe file (GPTQ attention, RTN MLP, the rest float): the checkpoint's stored recipe,
  re-applied to the float model with the same calibration windows, gives identical params."""
  config, params, _ = smollm2
  rules = (Rule(r"layers_0/attn/\w+_proj/kernel", GPTQConfig(bits=4, group_size=64, act_order=True)),
           Rule(r"layers_0/mlp/\w+_proj/kernel", RTNConfig(bits=3, group_size=64, sym=True)),
           Rule(".*", None))
  recipe.save_recipe(tmp_path / "r.yaml", rules)
  ckpt, calib_file, out = tmp_path / "ckpt", tmp_path / "calib.npy", tmp_path / "r2.json"
  res = run_script("quantize", ["--recipe", str(tmp_path / "r.yaml"), "--calib-samples", "2", "--calib-seq-len", "64",
                                "--eval-tokens", "256", "--eval-seq-len", "128", "--save", str(ckpt),
                                "--save-calib-tokens", str(calib_file), "--recipe-out", str(out)])
  assert res["method"] == "recipe" and res["method_name"] == "gptq, rtn" and len(res["layers"]) == 7
  assert res["recipe"] == recipe_file.encode(rules) and recipe.load_recipe(out) == rules
  stored = ck.read_recipe(ckpt)
  assert stored == rules
  _, saved, meta = ck.restore(ckpt)
  assert meta["recipe_source"] == str(tmp_path / "r.yaml") and "recipe" not in meta
  again, _ = recipe.quantize(config, params, stored, np.load(calib_file), progress=False)
  assert jax.tree.structure(saved) == jax.tree.structure(again)  # format static fields included
  for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(saved), jax.tree.leaves(again)):
    assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes(), p
  # eval_ppl of the checkpoint records its recipe and reproduces the perplexity
  again = run_script("eval_ppl", ["--model", str(ckpt), "--seq-len", "128", "--max-tokens", "256"])
  assert again["recipe"] == recipe_file.encode(rules) and again["ppl"] == pytest.approx(res["ppl_q"], rel=1e-5)
