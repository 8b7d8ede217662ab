"""Learning-rate and weight-decay transfer across width under width-scaled AdamW.

Two settings share one sweep protocol (``Sweep``), for each weight-decay rule ``e``:

(a) the base lr over ``log2_lrs`` at every width, at base weight decay ``2**log2_base_wd``;
(b) the base wd over ``log2_wds`` at the best grid lr of (a) for that (rule, width);
(c) sigma_top of every matrix param, logged every ``log_every`` steps
    (warm-started power iteration, ``lqx.diagnostics.top_singular_values``);
(d) with ``steady_steps``: the base width's best lr at the base wd trained
    ``steady_steps`` steps at every width and rule, deeper into the steady state,
    for the sigma_top slopes (``analysis["steady"]``).

At the base width every rule is the same optimizer, so those runs are done once
(``"rule": null`` in the run list). Settings:

- ``llama``: byte-level (vocab 256) LLaMA models of fixed depth on Shakespeare's
  training works (``lqx.data``), held-out loss on the held-out works;
- ``synthetic``: the teacher-student residual MLP of ``lqx.studies.synthetic``.

Fits (``analyze``): the optimum log2 lr / log2 wd per (rule, width) is the vertex of
the parabola through the grid minimum and its two neighbours (``at_edge`` when the
minimum is at the end of the grid); the sigma_top slope against width per rule is
the log2-log2 slope of the geometric mean of the final sigma_top over matrix-like
params; and a joint fit ``log2 sigma = beta*log2(lr_2/wd_2) + alpha*log2(d) + c``
over every run that reached ``min_timescales`` decay timescales (``steps*lr_2*wd_2``).
The theory (arXiv 2510.15262) predicts beta = 0.5, alpha = 0.75, hence slopes
``alpha - (1 + e)/2``: +0.25, 0, -0.25 for e = 0, 0.5, 1; a measured alpha implies
the flat rule ``wd_2 ∝ d**(2*alpha - 1)``. Each run also records the normalized
spectrum shape of one hidden matrix (compared across widths) and, for LLaMA, the
sublayer gains on held-out text at the end of training.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lqx import data, diagnostics
from lqx.models import llama
from lqx.optim import mup
from lqx.optim.adamw import width_scaled_adamw
from lqx.optim.classes import MATRIX, class_paths, param_classes
from lqx.studies import synthetic


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Widths, grids (log2 of *base* values) and training length of one setting."""

  widths: tuple[int, ...]
  base_width: int
  log2_lrs: tuple[float, ...]
  log2_wds: tuple[float, ...]
  log2_base_wd: float
  steps: int
  warmup: int
  log_every: int
  rules: tuple[float, ...] = (0.0, 0.5, 1.0)
  b1: float = 0.9
  b2: float = 0.95
  min_timescales: float = 3.0  # runs with fewer decay timescales are left out of the joint fit
  steady_steps: int = 0  # (d): if > 0, the base width's best lr trained this long, every rule
  seed: int = 0

  def __post_init__(self):
    if self.base_width not in self.widths:
      raise ValueError(f"base_width={self.base_width} must be one of widths={self.widths}")
    if self.log2_base_wd not in self.log2_wds:
      raise ValueError(f"log2_base_wd={self.log2_base_wd} must be one of log2_wds={self.log2_wds}")
    if self.steps % self.log_every:
      raise ValueError(f"steps={self.steps} is not a multiple of log_every={self.log_every}")
    if list(self.widths) != sorted(set(self.widths)):
      raise ValueError(f"widths must be ascending and distinct, got {self.widths}")
    if self.steady_steps and (self.steady_steps % self.log_every or self.base_width != self.widths[0]):
      raise ValueError(f"steady_steps={self.steady_steps} needs a multiple of log_every="
                       f"{self.log_every} and base_width={self.base_width} == widths[0]")

  @property
  def max_steps(self) -> int:
    return max(self.steps, self.steady_steps)


@dataclasses.dataclass(frozen=True)
class LlamaStudy:
  sweep: Sweep
  n_layers: int = 2
  n_heads: int = 2  # fixed; head_dim = width / n_heads grows with width
  ffn_mult: int = 2
  seq_len: int = 64
  batch: int = 16
  eval_windows: int = 64


@dataclasses.dataclass(frozen=True)
class SyntheticStudy:
  sweep: Sweep
  n_blocks: int = 2
  in_dim: int = 16
  out_dim: int = 4
  ffn_mult: int = 2
  teacher_width: int = 64
  batch: int = 64
  eval_batch: int = 1024


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  llama: LlamaStudy | None
  synthetic: SyntheticStudy | None
  coord_steps: int = 4


def full_config() -> StudyConfig:
  """The committed study (~50 minutes on 2 CPU cores); docs/mup_transfer.md gives the reasons."""
  return StudyConfig(
      llama=LlamaStudy(Sweep(widths=(32, 64, 128, 256), base_width=32,
                             log2_lrs=(-9, -8, -7, -6, -5, -4),
                             log2_wds=(-5, -4, -3, -2, -1, 0, 1, 2), log2_base_wd=2,
                             steps=400, warmup=20, log_every=40, steady_steps=1200),
                       seq_len=64, batch=8),
      synthetic=SyntheticStudy(Sweep(widths=(32, 64, 128, 256), base_width=32,
                                     log2_lrs=(-11, -10, -9, -8, -7, -6),
                                     log2_wds=(-2, -1, 0, 1, 2), log2_base_wd=1,
                                     steps=1500, warmup=50, log_every=100, steady_steps=4500)),
  )


def quick_config() -> StudyConfig:
  """Every code path in well under 3 minutes on 2 CPU cores (the tests use it)."""
  return StudyConfig(
      llama=LlamaStudy(Sweep(widths=(16, 32, 64), base_width=16, log2_lrs=(-8, -7, -6),
                             log2_wds=(0, 1), log2_base_wd=1, steps=40, warmup=4, log_every=20,
                             steady_steps=80),
                       seq_len=32, batch=8, eval_windows=16),
      synthetic=SyntheticStudy(Sweep(widths=(16, 32, 64), base_width=16, log2_lrs=(-8, -7, -6),
                                     log2_wds=(0, 1), log2_base_wd=1, steps=60, warmup=6,
                                     log_every=30, steady_steps=120), batch=32, eval_batch=256),
      coord_steps=2,
  )


def tiny_config() -> StudyConfig:
  """Smaller than quick: two widths, for executing the notebook in tests."""
  return StudyConfig(
      llama=LlamaStudy(Sweep(widths=(16, 32), base_width=16, log2_lrs=(-8, -7, -6),
                             log2_wds=(0, 1), log2_base_wd=1, steps=20, warmup=2, log_every=10,
                             steady_steps=40),
                       seq_len=32, batch=8, eval_windows=8),
      synthetic=SyntheticStudy(Sweep(widths=(16, 32), base_width=16, log2_lrs=(-8, -7, -6),
                                     log2_wds=(0, 1), log2_base_wd=1, steps=40, warmup=4,
                                     log_every=20), batch=32, eval_batch=256),
      coord_steps=2,
  )


# ----------------------------------------------------------------------------- training


class _Trainer:
  """Trains one width for any ``(lr, wd, rule)``; compiles once per width.

  ``loss_fn(params, batch)``: scalar; ``batches``: a pytree with a leading step axis;
  ``eval_fn(params)``: held-out loss.
  """

  def __init__(self, sweep: Sweep, params, classes, loss_fn, batches, eval_fn, final_fn=None,
               spectrum_path: str | None = None):
    self.sweep, self.params, self.classes = sweep, params, classes
    self.final_fn, self.spectrum_path = final_fn, spectrum_path
    self.batches, self.eval_fn = batches, jax.jit(eval_fn)
    self.matrix_paths = [k for k, c in class_paths(classes).items() if c.kind == MATRIX]
    self.init = jax.jit(lambda p: self.optimizer(1.0, 0.0, 0.5).init(p))

    @jax.jit
    def chunk(params, opt_state, batches, lr, wd, e):
      opt = self.optimizer(lr, wd, e)

      def step(carry, batch):
        p, s = carry
        loss, g = jax.value_and_grad(loss_fn)(p, batch)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

      (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
      return params, opt_state, losses

    self.chunk = chunk

  def optimizer(self, lr, wd, e):
    warmup = max(self.sweep.warmup, 1)
    schedule = lambda count: lr * jnp.minimum(1.0, (count + 1) / warmup)  # noqa: E731
    return width_scaled_adamw(schedule, self.classes, weight_decay=wd, wd_exponent=e,
                              b1=self.sweep.b1, b2=self.sweep.b2)

  def __call__(self, lr: float, wd: float, e: float, *, steps: int | None = None,
               n_tail: int = 3) -> dict:
    s = self.sweep
    steps = s.steps if steps is None else steps
    t0 = time.perf_counter()
    params, opt_state, sig_state = self.params, self.init(self.params), None
    losses, trace, tails = [], [], []
    diverged = False
    for c in range(steps // s.log_every):
      sl = slice(c * s.log_every, (c + 1) * s.log_every)
      params, opt_state, l = self.chunk(params, opt_state, jax.tree.map(lambda b: b[sl], self.batches),
                                        lr, wd, e)
      losses.append(np.asarray(l))
      if not np.all(np.isfinite(losses[-1])):
        diverged = True
        break
      sig, sig_state = diagnostics.top_singular_values(params, sig_state,
                                                       iters=100 if sig_state is None else 20)
      sig = {k: float(v) for k, v in sig.items()}
      tails.append(sig)
      gmean = _gmean([sig[k] for k in self.matrix_paths])
      trace.append([(c + 1) * s.log_every, gmean])
    losses = np.concatenate(losses)
    n_last = max(1, steps // 10)
    out = {"train_loss": float(np.mean(losses[-n_last:])) if not diverged else math.inf,
           "heldout_loss": float(self.eval_fn(params)) if not diverged else math.inf,
           "diverged": diverged, "collapsed": False, "sigma_trace": trace,
           "seconds": time.perf_counter() - t0}
    if not diverged:
      tail = tails[-n_tail:]
      out["sigma_top"] = {k: _gmean([t[k] for t in tail]) for k in tail[0]}
      out["sigma_gmean"] = _gmean([out["sigma_top"][k] for k in self.matrix_paths])
      # Matrices decayed to ~0 (a pair of factors whose gradients fall below Adam's eps):
      # not the sqrt(lr/wd) steady state, so left out of the sigma fits.
      out["collapsed"] = min(out["sigma_top"][k] for k in self.matrix_paths) < 1e-3
      if self.final_fn is not None:
        out.update({k: {n: float(v) for n, v in d.items()} for k, d in self.final_fn(params).items()})
      if self.spectrum_path is not None:
        w = diagnostics.matrix_params(params)[self.spectrum_path]
        out["spectrum_shape"] = diagnostics.spectrum_shape(diagnostics.singular_values(w), 16).tolist()
    return out


def _gmean(xs) -> float:
  xs = np.asarray(xs, np.float64)
  return float(np.exp(np.mean(np.log(np.maximum(xs, 1e-30)))))


def _llama_configs(study: LlamaStudy, width: int):
  def cfg(d):
    return llama.LlamaConfig(vocab_size=256, dim=d, n_layers=study.n_layers, n_heads=study.n_heads,
                             n_kv_heads=study.n_heads, ffn_dim=study.ffn_mult * d,
                             tie_embeddings=False, max_seq_len=study.seq_len)
  base = cfg(study.sweep.base_width)
  return mup.mup_config(cfg(width), base), base


class LlamaTask:
  """Byte-level LLaMA models on Shakespeare: ``task.trainer(width)(lr, wd, e) -> run``."""

  def __init__(self, study: LlamaStudy):
    self.study = study
    s = study.sweep
    train = data.encode_bytes(data.load_text("train"))
    heldout = data.encode_bytes(data.load_text("heldout"))
    win = data.sample_windows(train, s.max_steps * study.batch, study.seq_len + 1, seed=s.seed)
    self.batches = jnp.asarray(win.reshape(s.max_steps, study.batch, study.seq_len + 1))
    held = data.windows(heldout, study.seq_len + 1)
    idx = np.linspace(0, len(held) - 1, study.eval_windows).astype(int)
    self.heldout = jnp.asarray(held[idx])
    self.tokens = {"train": len(train), "heldout": len(heldout)}

  def config(self, width: int) -> llama.LlamaConfig:
    return _llama_configs(self.study, width)[0]

  def trainer(self, width: int) -> _Trainer:
    config, base = _llama_configs(self.study, width)
    classes = mup.llama_classes(config, base)
    params = mup.init_params(config, jax.random.key(self.study.sweep.seed))
    loss_fn = functools.partial(_lm_loss, config)
    tokens = self.heldout[:8, :-1]
    return _Trainer(self.study.sweep, params, classes, loss_fn, self.batches,
                    lambda p: loss_fn(p, self.heldout),
                    lambda p: {"sublayer_gains": diagnostics.sublayer_gains(config, p, tokens)},
                    spectrum_path="layers_0/mlp/up_proj/kernel")

  def coord_trajectory(self, width: int, lr: float, wd: float, e: float, n_steps: int) -> list[dict]:
    """Activations on a fixed held-out batch at init and after each of ``n_steps`` steps."""
    tr = self.trainer(width)
    config = self.config(width)
    tokens = self.heldout[:8, :-1]
    params, state = tr.params, tr.init(tr.params)
    acts = [diagnostics.llama_activations(config, params, tokens)]
    for i in range(n_steps):
      params, state, _ = tr.chunk(params, state, self.batches[i:i + 1], lr, wd, e)
      acts.append(diagnostics.llama_activations(config, params, tokens))
    return acts


def _lm_loss(config, params, batch):
  logits = llama.forward(config, params, batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


class SyntheticTask:
  """Teacher-student residual MLP: ``task.trainer(width)(lr, wd, e) -> run``."""

  def __init__(self, study: SyntheticStudy):
    self.study = study
    s = study.sweep
    key = jax.random.key(s.seed + 1)
    self.teacher = synthetic.init_teacher(study.in_dim, study.out_dim, study.teacher_width, key)
    self.batches = jax.random.normal(jax.random.fold_in(key, 1), (s.max_steps, study.batch, study.in_dim))
    self.eval_x = jax.random.normal(jax.random.fold_in(key, 2), (study.eval_batch, study.in_dim))

  def config(self, width: int) -> synthetic.MLPConfig:
    st = self.study
    return synthetic.MLPConfig(width=width, base_width=st.sweep.base_width, n_blocks=st.n_blocks,
                               in_dim=st.in_dim, out_dim=st.out_dim, ffn_mult=st.ffn_mult)

  def trainer(self, width: int) -> _Trainer:
    config = self.config(width)
    base = self.config(self.study.sweep.base_width)
    delta = self.config(2 * width)
    shapes = lambda c: jax.eval_shape(functools.partial(synthetic.init_params, c),  # noqa: E731
                                      jax.random.key(0))
    classes = param_classes(shapes(base), shapes(config), delta=shapes(delta))
    params = synthetic.init_params(config, jax.random.key(self.study.sweep.seed))
    loss_fn = lambda p, x: synthetic.loss(config, p, self.teacher, x)  # noqa: E731
    return _Trainer(self.study.sweep, params, classes, loss_fn, self.batches,
                    lambda p: loss_fn(p, self.eval_x), spectrum_path="blocks_0/fc1/kernel")


# ----------------------------------------------------------------------------- sweeps


def run_sweep(sweep: Sweep, make_trainer: Callable[[int], _Trainer], *, name: str = "",
              progress: bool = True) -> list[dict]:
  """Runs (a), (b) and (d) of the protocol; returns one dict per distinct run."""
  from tqdm import tqdm

  n_rules = len(sweep.rules)
  per_width = n_rules * (len(sweep.log2_lrs) + len(sweep.log2_wds) - 1 + bool(sweep.steady_steps))
  total = (per_width * (len(sweep.widths) - 1) + len(sweep.log2_lrs) + len(sweep.log2_wds) - 1
           + bool(sweep.steady_steps))
  steady_lr = None
  runs: dict[tuple, dict] = {}
  bar = tqdm(total=total, desc=name, disable=not progress, leave=True)
  for width in sweep.widths:
    trainer = make_trainer(width)
    m = width / sweep.base_width

    def get(rule, log2_lr, log2_wd, steps=sweep.steps):
      rkey = None if width == sweep.base_width else rule
      key = (width, rkey, log2_lr, log2_wd, steps)
      if key not in runs:
        lr, wd = 2.0 ** log2_lr, 2.0 ** log2_wd
        r = trainer(lr, wd, rule, steps=steps)
        lr2, wd2 = lr / m, wd * m ** rule
        runs[key] = {"width": width, "rule": rkey, "log2_lr": log2_lr, "log2_wd": log2_wd,
                     "steps": steps, "lr_2": lr2, "wd_2": wd2, "timescales": steps * lr2 * wd2, **r}
        bar.set_postfix(width=width, rule=rkey, loss=f"{r['train_loss']:.3f}")
        bar.update()
      return runs[key]

    for rule in sweep.rules:
      curve = [get(rule, x, sweep.log2_base_wd) for x in sweep.log2_lrs]
      best = sweep.log2_lrs[int(np.argmin([_loss(r, "train_loss") for r in curve]))]
      for y in sweep.log2_wds:
        get(rule, best, y)
      if width == sweep.base_width:
        steady_lr = best
      if sweep.steady_steps:
        get(rule, steady_lr, sweep.log2_base_wd, sweep.steady_steps)
    del trainer
  bar.close()
  return list(runs.values())


def _loss(r: dict, key: str) -> float:
  """A run's loss; inf for a diverged run (stored as null in JSON)."""
  v = r[key]
  return math.inf if v is None else float(v)


def _runs_for(runs, width, rule):
  return [r for r in runs if r["width"] == width and r["rule"] in (None, rule)]


def fit_optimum(xs, losses) -> tuple[float, bool]:
  """Optimum x of a loss curve on a grid: vertex of the parabola through the minimum and
  its neighbours (clipped to them); ``(x, at_edge)``, the grid end if the minimum is there."""
  xs, ys = np.asarray(xs, float), np.asarray(losses, float)
  ys = np.where(np.isfinite(ys), ys, np.inf)
  i = int(np.argmin(ys))
  if i == 0 or i == len(xs) - 1 or not np.isfinite(ys[[i - 1, i + 1]]).all():
    return float(xs[i]), i == 0 or i == len(xs) - 1
  a, b, _ = np.polyfit(xs[i - 1:i + 2], ys[i - 1:i + 2], 2)
  x = -b / (2 * a) if a > 0 else xs[i]
  return float(np.clip(x, xs[i - 1], xs[i + 1])), False


def _slope(xs, ys) -> float | None:
  xs, ys = np.asarray(xs, float), np.asarray(ys, float)
  ok = np.isfinite(ys)
  if ok.sum() < 2:
    return None
  return float(np.polyfit(xs[ok], ys[ok], 1)[0])


def _param_type(path: str) -> str:
  parts = path.split("/")
  return "/".join(p for p in parts if not p.startswith(("layers_", "blocks_")))


def analyze(sweep: Sweep, runs: list[dict], *, loss_key: str = "train_loss") -> dict:
  """Optima, transfer shifts, sigma_top slopes and the joint sigma fit (module doc)."""
  steady_runs = [r for r in runs if r["steps"] != sweep.steps]
  runs = [r for r in runs if r["steps"] == sweep.steps]
  optima, transfer, sigma, steady = {}, {}, {}, {}
  widths = list(sweep.widths)
  lw = np.log2(widths)
  for rule in sweep.rules:
    rk = f"e={rule:g}"
    optima[rk] = {}
    best_lr = {}
    for w in widths:
      rs = _runs_for(runs, w, rule)
      lr_curve = {r["log2_lr"]: _loss(r, loss_key) for r in rs if r["log2_wd"] == sweep.log2_base_wd}
      xs = sorted(lr_curve)
      x_lr, edge_lr = fit_optimum(xs, [lr_curve[x] for x in xs])
      best_lr[w] = xs[int(np.argmin([lr_curve[x] for x in xs]))]
      wd_curve = {r["log2_wd"]: _loss(r, loss_key) for r in rs if r["log2_lr"] == best_lr[w]}
      ys = sorted(wd_curve)
      x_wd, edge_wd = fit_optimum(ys, [wd_curve[y] for y in ys])
      optima[rk][str(w)] = {"log2_lr": x_lr, "log2_lr_at_edge": edge_lr, "log2_lr_grid": best_lr[w],
                            "log2_wd": x_wd, "log2_wd_at_edge": edge_wd,
                            "best_loss": float(min(wd_curve.values()))}
    o = optima[rk]
    base = str(sweep.base_width)
    transfer[rk] = {
        "lr_max_shift_octaves": max(abs(o[str(w)]["log2_lr"] - o[base]["log2_lr"]) for w in widths),
        "wd_max_shift_octaves": max(abs(o[str(w)]["log2_wd"] - o[base]["log2_wd"]) for w in widths),
        "any_optimum_at_grid_edge": any(o[str(w)]["log2_lr_at_edge"] or o[str(w)]["log2_wd_at_edge"]
                                        for w in widths),
    }
    # sigma_top against width at each fixed base lr (base wd); the headline one at the
    # base width's best lr, which every rule shares.
    by_lr = {}
    for x in sweep.log2_lrs:
      sel = {r["width"]: r for r in runs if r["rule"] in (None, rule) and r["log2_lr"] == x
             and r["log2_wd"] == sweep.log2_base_wd and not r["diverged"] and not r["collapsed"]}
      if len(sel) == len(widths):
        by_lr[str(x)] = _slope(lw, [math.log2(sel[w]["sigma_gmean"]) for w in widths])
    x0 = best_lr[sweep.base_width]
    sel = {r["width"]: r for r in runs if r["rule"] in (None, rule) and r["log2_lr"] == x0
           and r["log2_wd"] == sweep.log2_base_wd and not r["diverged"] and not r["collapsed"]}
    entry = {"log2_lr": x0, "slope_by_log2_lr": by_lr, "slope": None, "sigma_gmean": {}}
    if len(sel) == len(widths):
      entry["sigma_gmean"] = {str(w): sel[w]["sigma_gmean"] for w in widths}
      entry["slope"] = by_lr.get(str(x0))
      types = sorted({_param_type(k) for k in sel[widths[0]]["sigma_top"]})
      entry["slope_by_param"] = {
          t: _slope(lw, [math.log2(_gmean([v for k, v in sel[w]["sigma_top"].items()
                                          if _param_type(k) == t])) for w in widths])
          for t in types}
      if "sublayer_gains" in sel[widths[0]]:
        g = {w: _gmean([v for k, v in sel[w]["sublayer_gains"].items() if k.count("/")])
             for w in widths}
        entry["sublayer_gain_gmean"] = {str(w): g[w] for w in widths}
        entry["sublayer_gain_slope"] = _slope(lw, [math.log2(g[w]) for w in widths])
      if "spectrum_shape" in sel[widths[0]]:
        shapes = {w: np.asarray(sel[w]["spectrum_shape"]) for w in widths}
        entry["spectrum_shape"] = {str(w): shapes[w].tolist() for w in widths}
        entry["spectrum_shape_max_diff"] = float(max(np.max(np.abs(shapes[w] - shapes[widths[0]]))
                                                     for w in widths))
      entry["alpha_implied"] = entry["slope"] + (1 + rule) / 2 if entry["slope"] is not None else None
      entry["timescales_widest"] = sel[widths[-1]]["timescales"]
    sigma[rk] = entry

  for rule in sweep.rules if steady_runs else ():
    sel = {r["width"]: r for r in steady_runs if r["rule"] in (None, rule)
           and not r["diverged"] and not r["collapsed"]}
    rk = f"e={rule:g}"
    if len(sel) != len(widths):
      steady[rk] = {"slope": None}
      continue
    ref = sel[widths[0]]
    slope = _slope(lw, [math.log2(sel[w]["sigma_gmean"]) for w in widths])
    types = sorted({_param_type(k) for k in ref["sigma_top"]})
    steady[rk] = {
        "log2_lr": ref["log2_lr"], "log2_wd": ref["log2_wd"], "steps": ref["steps"],
        "slope": slope, "alpha_implied": slope + (1 + rule) / 2,
        # without the base width: at the base lr/wd run this long, a small model can be
        # over-decayed (sublayer gains near 0), which bends the fit at its narrow end
        "slope_without_base": _slope(lw[1:], [math.log2(sel[w]["sigma_gmean"]) for w in widths[1:]])
        if len(widths) > 2 else None,
        "sigma_gmean": {str(w): sel[w]["sigma_gmean"] for w in widths},
        "timescales": {str(w): sel[w]["timescales"] for w in widths},
        "train_loss": {str(w): sel[w]["train_loss"] for w in widths},
        "slope_by_param": {t: _slope(lw, [math.log2(_gmean([v for k, v in sel[w]["sigma_top"].items()
                                                            if _param_type(k) == t])) for w in widths])
                           for t in types},
        "sigma_trace": {str(w): sel[w]["sigma_trace"] for w in widths},
    }
    if "spectrum_shape" in ref:
      shapes = {w: np.asarray(sel[w]["spectrum_shape"]) for w in widths}
      steady[rk]["spectrum_shape"] = {str(w): shapes[w].tolist() for w in widths}
      steady[rk]["spectrum_shape_max_diff"] = float(max(np.max(np.abs(shapes[w] - shapes[widths[0]]))
                                                         for w in widths))
    if "sublayer_gains" in ref:
      g = {w: _gmean([v for k, v in sel[w]["sublayer_gains"].items() if k.count("/")]) for w in widths}
      steady[rk]["sublayer_gain_gmean"] = {str(w): g[w] for w in widths}
      steady[rk]["sublayer_gain_slope"] = _slope(lw, [math.log2(g[w]) for w in widths])

  ok = [r for r in runs if not r["diverged"] and not r["collapsed"] and r["wd_2"] > 0
        and r["timescales"] >= sweep.min_timescales]
  joint = {"n_runs": len(ok), "n_collapsed": sum(bool(r.get("collapsed")) for r in runs),
           "min_timescales": sweep.min_timescales}
  if len(ok) >= 4:
    a = np.stack([[math.log2(r["lr_2"] / r["wd_2"]) for r in ok],
                  [math.log2(r["width"]) for r in ok], np.ones(len(ok))], axis=1)
    y = np.asarray([math.log2(r["sigma_gmean"]) for r in ok])
    (beta, alpha, c), *_ = np.linalg.lstsq(a, y, rcond=None)
    # alpha with beta held at the theory's 0.5
    alpha_half = _slope(a[:, 1], y - 0.5 * a[:, 0])
    joint.update(beta=float(beta), alpha=float(alpha), intercept=float(c), alpha_at_beta_half=alpha_half,
                 implied_wd_exponent=2 * float(alpha) - 1,
                 residual_rms=float(np.sqrt(np.mean((a @ [beta, alpha, c] - y) ** 2))))
    # lr_2 and wd_2 with exponents of their own (the theory: +0.5 and -0.5)
    a2 = np.stack([[math.log2(r["lr_2"]) for r in ok], [math.log2(r["wd_2"]) for r in ok],
                   a[:, 1], np.ones(len(ok))], axis=1)
    (b_lr, b_wd, alpha2, _), *_ = np.linalg.lstsq(a2, y, rcond=None)
    joint["separate"] = {"lr_2_exponent": float(b_lr), "wd_2_exponent": float(b_wd),
                         "alpha": float(alpha2)}
  return {"optima": optima, "transfer": transfer, "sigma": sigma, "steady": steady, "joint": joint}


def claims(analysis: dict) -> dict:
  """The study's claims (issue P3.5), each measured, with the numbers behind it."""
  t = analysis["transfer"]
  steady = analysis.get("steady") or {}
  use_steady = bool(steady) and all(v.get("slope") is not None for v in steady.values())
  s = steady if use_steady else analysis["sigma"]
  out = {"sigma_slopes_from": "steady (d)" if use_steady else "sweep (a)"}
  if "e=0.5" in t:
    out["e0.5_lr_within_one_octave"] = t["e=0.5"]["lr_max_shift_octaves"] <= 1.0
    out["e0.5_wd_within_one_octave"] = t["e=0.5"]["wd_max_shift_octaves"] <= 1.0
    slope = s["e=0.5"]["slope"]
    out["e0.5_sigma_flat"] = slope is not None and abs(slope) <= 0.1
  if "e=0" in s and "e=1" in s and s["e=0"]["slope"] is not None and s["e=1"]["slope"] is not None:
    out["e0_e1_opposite_signs"] = s["e=0"]["slope"] * s["e=1"]["slope"] < 0
    out["e0_positive_e1_negative"] = s["e=0"]["slope"] > 0 > s["e=1"]["slope"]
  return out


# ----------------------------------------------------------------------------- study


def _round(x, digits=5):
  if isinstance(x, float):
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None  # JSON has no inf/nan
  if isinstance(x, dict):
    return {k: _round(v, digits) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_round(v, digits) for v in x]
  return x


def run_study(config: StudyConfig, *, progress: bool = True) -> dict:
  """Runs every setting of ``config``; returns the JSON-ready result."""
  t0 = time.perf_counter()
  out = {"config": _round(dataclasses.asdict(config)), "tokenizer": "bytes (vocab 256)"}
  if config.llama is not None:
    task = LlamaTask(config.llama)
    s = config.llama.sweep
    runs = run_sweep(s, task.trainer, name="llama", progress=progress)
    res = analyze(s, runs)
    res["heldout_optima"] = analyze(s, runs, loss_key="heldout_loss")["optima"]
    x0 = res["sigma"]["e=0.5"]["log2_lr"] if "e=0.5" in res["sigma"] else s.log2_lrs[0]
    cc = diagnostics.coord_check(
        s.widths, lambda w: task.coord_trajectory(w, 2.0 ** x0, 2.0 ** s.log2_base_wd, 0.5,
                                                  config.coord_steps))
    configs = {w: task.config(w) for w in s.widths}
    gains = {}
    for w in s.widths:  # sublayer gains at init (muP init) on held-out windows
      p = mup.init_params(configs[w], jax.random.key(s.seed))
      gains[str(w)] = {k: float(v) for k, v in
                       diagnostics.sublayer_gains(configs[w], p, task.heldout[:8, :-1]).items()}
    out["llama"] = {"sweep": dataclasses.asdict(s), "tokens": task.tokens, "runs": runs, **res,
                    "claims": claims(res),
                    "coord_check": {"log2_lr": x0, **cc}, "sublayer_gains_at_init": gains}
  if config.synthetic is not None:
    task = SyntheticTask(config.synthetic)
    s = config.synthetic.sweep
    runs = run_sweep(s, task.trainer, name="synthetic", progress=progress)
    res = analyze(s, runs)
    out["synthetic"] = {"sweep": dataclasses.asdict(s), "runs": runs, **res, "claims": claims(res)}
  out["seconds"] = time.perf_counter() - t0
  return _round(out)


def reanalyze(result: dict) -> dict:
  """Recomputes fits and claims of a saved study result from its runs (no training)."""
  out = dict(result)
  for name in ("llama", "synthetic"):
    if name in result:
      st = dict(result[name])
      sweep = Sweep(**{k: tuple(v) if isinstance(v, list) else v for k, v in st["sweep"].items()})
      res = analyze(sweep, st["runs"])
      if name == "llama":
        res["heldout_optima"] = analyze(sweep, st["runs"], loss_key="heldout_loss")["optima"]
      st.update(res, claims=claims(res))
      out[name] = _round(st)
  return out


# ----------------------------------------------------------------------------- plots


def _rules(result_setting):
  return list(result_setting["optima"])


def plot_sweeps(setting: dict, *, axis: str = "lr", loss_key: str = "train_loss", title: str = ""):
  """Loss against log2 base lr (``axis="lr"``) or wd, a curve per width, a panel per rule."""
  from matplotlib.figure import Figure

  rules = _rules(setting)
  widths = sorted({r["width"] for r in setting["runs"]})
  base_wd = setting["sweep"]["log2_base_wd"]
  fig = Figure(figsize=(4 * len(rules), 3.4))
  axes = fig.subplots(1, len(rules), sharey=True, squeeze=False)[0]
  finite = [r[loss_key] for r in setting["runs"] if r[loss_key] is not None]
  lo = min(finite)
  for ax, rk in zip(axes, rules):
    rule = float(rk[2:])
    for i, w in enumerate(widths):
      o = setting["optima"][rk][str(w)]
      rs = [r for r in setting["runs"] if r["width"] == w and r["rule"] in (None, rule)
            and r["steps"] == setting["sweep"]["steps"]]
      if axis == "lr":
        pts = sorted(((r["log2_lr"], r[loss_key]) for r in rs if r["log2_wd"] == base_wd),
                     key=lambda p: p[0])
        x_opt = o["log2_lr"]
      else:
        pts = sorted(((r["log2_wd"], r[loss_key]) for r in rs if r["log2_lr"] == o["log2_lr_grid"]),
                     key=lambda p: p[0])
        x_opt = o["log2_wd"]
      xs = [p[0] for p in pts]
      ys = [np.nan if p[1] is None else p[1] for p in pts]
      color = f"C{i}"
      ax.plot(xs, ys, "o-", color=color, label=f"d={w}")
      ax.axvline(x_opt, color=color, ls=":", lw=1)
    ax.set(xlabel=f"log2 base {axis}", title=f"{title} {rk}".strip())
    if lo < 0.5:  # a regression MSE: log scale
      ax.set_yscale("log")
    else:  # a cross-entropy: zoom on the minimum
      ax.set_ylim(lo - 0.02 * lo, min(max(finite), lo + 0.3 * lo) + 0.01)
  axes[0].set_ylabel(loss_key.replace("_", " "))
  axes[-1].legend(fontsize=8)
  fig.tight_layout()
  return fig


def plot_sigma(setting: dict, *, title: str = ""):
  """Left: sigma_top (geometric mean over matrix-like params) vs width per rule with
  fitted slopes. Right: every run's sigma_top against lr_2/wd_2 (the joint fit)."""
  from matplotlib.figure import Figure

  steady = setting.get("steady") or {}
  src = steady if steady.get("e=0.5", {}).get("spectrum_shape") else setting["sigma"]
  spectra = src.get("e=0.5", {}).get("spectrum_shape")
  fig = Figure(figsize=(13 if spectra else 9, 3.6))
  ax, ax2, *ax3 = fig.subplots(1, 3 if spectra else 2)
  for i, (rk, s) in enumerate(setting["sigma"].items()):
    for entry, style, what in ((s, "o--" if steady else "o-", f"{setting['sweep']['steps']} steps"),
                               (steady.get(rk, {}), "s-", "steady")):
      if not entry.get("sigma_gmean") or entry.get("slope") is None:
        continue
      ws = sorted(int(w) for w in entry["sigma_gmean"])
      ys = [entry["sigma_gmean"][str(w)] for w in ws]
      ax.plot(ws, ys, style, color=f"C{i}", label=f"{rk}, {what}: slope {entry['slope']:+.2f}")
  ax.set(xscale="log", yscale="log", xlabel="width d", ylabel="sigma_top (geo. mean)",
         title=f"{title} sigma_top vs width".strip())
  ws = sorted({r["width"] for r in setting["runs"]})
  ax.set_xticks(ws, [str(w) for w in ws])
  ax.xaxis.set_minor_formatter("")
  ax.legend(fontsize=7)
  j = setting["joint"]
  for i, w in enumerate(ws):
    rs = [r for r in setting["runs"] if r["width"] == w and not r["diverged"] and r["wd_2"] > 0
          and r["steps"] == setting["sweep"]["steps"]]
    rs = [r for r in rs if not r["collapsed"]]
    good = [r for r in rs if r["timescales"] >= j["min_timescales"]]
    ax2.scatter([r["lr_2"] / r["wd_2"] for r in good], [r["sigma_gmean"] for r in good],
                s=12, color=f"C{i}", label=f"d={w}")
    bad = [r for r in rs if r["timescales"] < j["min_timescales"]]
    ax2.scatter([r["lr_2"] / r["wd_2"] for r in bad], [r["sigma_gmean"] for r in bad],
                s=12, facecolors="none", edgecolors=f"C{i}")
  if "beta" in j:
    ax2.set_title(f"joint fit: beta {j['beta']:.2f}, alpha {j['alpha']:.2f}", fontsize=9)
  ax2.set(xscale="log", yscale="log", xlabel="lr_2 / wd_2 (hollow: < min timescales)",
          ylabel="sigma_top")
  ax2.legend(fontsize=7)
  if spectra:
    ax3 = ax3[0]
    for i, (w, shape) in enumerate(spectra.items()):
      ax3.plot(np.linspace(0, 1, len(shape)), shape, "o-", ms=3, color=f"C{i}", label=f"d={w}")
    diff = src["e=0.5"]["spectrum_shape_max_diff"]
    ax3.set(xlabel="relative rank", ylabel="sigma_i / sigma_top")
    ax3.set_title(f"spectrum shape at e=0.5 (max diff {diff:.2f})", fontsize=9)
    ax3.legend(fontsize=7)
  fig.tight_layout()
  return fig


def save_figures(result: dict, out_dir) -> list[str]:
  """Writes the study's figures (``mup_*.png``) into ``out_dir``; returns their paths."""
  from pathlib import Path

  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  figs = {}
  if "llama" in result:
    st = result["llama"]
    figs["mup_lr.png"] = plot_sweeps(st, axis="lr", title="LLaMA")
    figs["mup_wd.png"] = plot_sweeps(st, axis="wd", title="LLaMA")
    figs["mup_sigma.png"] = plot_sigma(st, title="LLaMA")
    figs["mup_coord_check.png"] = diagnostics.plot_coord_check(st["coord_check"])
  if "synthetic" in result:
    st = result["synthetic"]
    figs["mup_synthetic_lr.png"] = plot_sweeps(st, axis="lr", title="MLP")
    figs["mup_synthetic_wd.png"] = plot_sweeps(st, axis="wd", title="MLP")
    figs["mup_synthetic_sigma.png"] = plot_sigma(st, title="MLP")
  paths = []
  for name, fig in figs.items():
    fig.savefig(out / name, dpi=110)
    paths.append(str(out / name))
  return paths
