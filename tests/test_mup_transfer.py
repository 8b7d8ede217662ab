"""The transfer study: fits, the synthetic model, and experiments/mup_transfer.py --quick end to end."""

import functools
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from lqx.optim import MATRIX, VECTOR, class_paths, param_classes
from lqx.studies import mup_transfer, synthetic

SCRIPT = pathlib.Path(__file__).parent.parent / "experiments" / "mup_transfer.py"


def test_fit_optimum():
  xs = [-8, -7, -6, -5, -4]
  assert mup_transfer.fit_optimum(xs, [(x + 6.3) ** 2 for x in xs]) == (pytest.approx(-6.3), False)
  assert mup_transfer.fit_optimum(xs, [3, 2, 1, 0.5, 0.4]) == (-4.0, True)
  assert mup_transfer.fit_optimum(xs, [1, 2, 3, float("inf"), float("inf")]) == (-8.0, True)
  # A diverged neighbour: no parabola, the grid minimum.
  assert mup_transfer.fit_optimum(xs, [3, 2, 1, float("inf"), 1.5]) == (-6.0, False)


def test_synthetic_mlp_classes_and_loss():
  def shapes(w):
    return jax.eval_shape(functools.partial(synthetic.init_params, synthetic.MLPConfig(w, 16)),
                          jax.random.key(0))

  got = {k: c.kind for k, c in class_paths(param_classes(shapes(16), shapes(64))).items()}
  assert got == {"in/kernel": VECTOR, "out/kernel": VECTOR, "final_norm/scale": VECTOR,
                 **{f"blocks_{i}/{n}": k for i in range(2) for n, k in
                    (("norm/scale", VECTOR), ("fc1/kernel", MATRIX), ("fc2/kernel", MATRIX))}}
  cfg = synthetic.MLPConfig(32, 16)
  params = synthetic.init_params(cfg, jax.random.key(0))
  t = synthetic.init_teacher(16, 4, 64, jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (128, 16))
  # Zero readout: the initial loss is the teacher's output power.
  assert float(synthetic.loss(cfg, params, t, x)) == pytest.approx(
      float(np.mean(np.square(synthetic.teacher(t, x)))), rel=1e-6)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("mup")
  spec = importlib.util.spec_from_file_location("mup_transfer", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  res = mod.main(["--quick", "--no-progress", "--json", str(out / "r.json"), "--figures", str(out)])
  return res, out


def test_quick_study_json(quick):
  res, out = quick
  saved = json.loads((out / "r.json").read_text())
  assert saved["tokenizer"] == "bytes (vocab 256)"
  for name in ("llama", "synthetic"):
    st = saved[name]
    sweep = st["sweep"]
    widths, rules = sweep["widths"], sweep["rules"]
    # one run per (width, rule, lr) of (a) and (width, rule, wd) of (b), the base width shared
    # and (d) one long run per (width, rule) at the base width's best lr
    n_wd_new = len(sweep["log2_wds"]) - 1
    per_width = len(rules) * (len(sweep["log2_lrs"]) + n_wd_new + 1)
    assert len(st["runs"]) == per_width * (len(widths) - 1) + len(sweep["log2_lrs"]) + n_wd_new + 1
    assert sum(r["steps"] == sweep["steady_steps"] for r in st["runs"]) == len(rules) * (len(widths) - 1) + 1
    for r in st["runs"]:
      assert {"width", "rule", "log2_lr", "log2_wd", "train_loss", "heldout_loss", "sigma_top",
              "sigma_trace", "timescales"} <= set(r)
      assert (r["rule"] is None) == (r["width"] == sweep["base_width"])
      assert np.isfinite(r["train_loss"]) and np.isfinite(r["heldout_loss"])
    for rk in ("e=0", "e=0.5", "e=1"):
      for w in widths:
        o = st["optima"][rk][str(w)]
        assert min(sweep["log2_lrs"]) <= o["log2_lr"] <= max(sweep["log2_lrs"])
        assert min(sweep["log2_wds"]) <= o["log2_wd"] <= max(sweep["log2_wds"])
      assert isinstance(st["sigma"][rk]["slope"], float)
      steady = st["steady"][rk]
      assert isinstance(steady["slope"], float) and steady["steps"] == sweep["steady_steps"]
      assert set(steady["sigma_gmean"]) == {str(w) for w in widths}
    assert set(st["claims"]) >= {"e0.5_lr_within_one_octave", "e0.5_sigma_flat", "e0_e1_opposite_signs"}
  assert np.shape(saved["llama"]["coord_check"]["rms"])[:2] == (3, 3)
  # the saved result re-analyzes to itself
  again = mup_transfer.reanalyze(saved)
  for rk, per_width in saved["llama"]["optima"].items():
    for w, o in per_width.items():
      assert again["llama"]["optima"][rk][w]["log2_lr_grid"] == o["log2_lr_grid"]
      assert again["llama"]["optima"][rk][w]["log2_lr"] == pytest.approx(o["log2_lr"], abs=1e-3)
  assert res["llama"]["claims"] == saved["llama"]["claims"]


FIGURES = ("mup_lr", "mup_wd", "mup_sigma", "mup_coord_check", "mup_synthetic_lr", "mup_synthetic_wd",
           "mup_synthetic_sigma")


def test_quick_study_figures_and_replot(quick, tmp_path):
  _, out = quick
  for name in FIGURES:
    assert (out / f"{name}.png").stat().st_size > 10_000, name
  spec = importlib.util.spec_from_file_location("mup_transfer", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  res = mod.main(["--replot", str(out / "r.json"), "--figures", str(tmp_path)])
  assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"{n}.png" for n in FIGURES)
  assert res["synthetic"]["claims"] == json.loads((out / "r.json").read_text())["synthetic"]["claims"]
