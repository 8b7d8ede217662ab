"""Width-scaled AdamW: muP learning rates and a width-dependent weight decay (arXiv 2510.15262).

Per parameter class (``lqx.optim.classes``), with ``m = d / d0`` the param's width
multiplier, the base learning rate ``lr`` and base weight decay ``wd`` become::

  class    lr            weight decay
  matrix   lr / m        wd * m**e        (hidden kernels)
  vector   lr            0                (norm gains, biases, embedding, readout)
  fixed    lr            0

The exponent ``e`` (``wd_exponent``) picks the decay rule: 0 keeps ``wd`` constant
(nanoGPT-mup), 0.5 is the paper's ``lambda_2 ∝ sqrt(d)`` (the top singular value
of each matrix, ``∝ sqrt(lr_2/wd_2) * d**0.75``, is then flat in width), 1 keeps
the per-step decay ``lr_2 * wd_2`` constant (MuAdamW / independent decay). At the
base width every rule is plain AdamW.

Decay is coupled as in ``optax.adamw`` and ``torch.optim.AdamW``::

  W <- W - lr_p * (u + wd_p * W)          u: the Adam direction m_hat / (sqrt(v_hat) + eps)

With ``independent_decay=True`` it is not multiplied by the learning rate (nor by
its schedule): ``W <- W - lr_p * u - wd_p * W``; coupled ``e`` then corresponds to
independent ``e - 1`` (so coupled ``e = 1`` is independent constant decay).

The readout follows muP's ``MuReadout`` form: the readout kernel is vector-like
(lr unscaled, no decay) and the *model* multiplies the logits by ``d0 / d``
(``LlamaConfig.readout_multiplier``, set by ``lqx.optim.mup.mup_config``), with a
zero init. No optimizer-side readout rule is needed.

The transform is a chain of optax pieces (``scale_by_adam``, ``optax.partition`` of
``add_decayed_weights`` and ``scale`` by class, ``scale_by_learning_rate``, and a
final cast of the updates to the params' dtype), so it composes with
``optax.chain``, schedules and ``optax.inject_hyperparams``, and bf16 params get
bf16 updates even when a schedule returns float32.

Classes are matched to params by path, not by tree type, so the same classes work
for a pure pytree, an ``nnx.State`` (``nnx.Optimizer`` passes ``Variable``-wrapped
params to ``init`` and plain arrays to ``update``), its ``.to_pure_dict()``, and
Linen params (classes built from the variables ``{"params": ...}`` or from their
``"params"`` subtree).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from lqx.optim.classes import MATRIX, ParamClass, flatten


def _check_nonnegative(name: str, value) -> None:
  """Raises if ``value`` is a known negative number; schedules and tracers pass."""
  if callable(value):
    return
  try:
    v = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return
  if not v >= 0:
    raise ValueError(f"{name} must be >= 0, got {value}")


def _check_classes(classes: Any) -> None:
  for c in jax.tree.leaves(classes):
    if not isinstance(c, ParamClass):
      raise TypeError(f"classes must be a tree of ParamClass (from lqx.optim.param_classes), "
                      f"found a leaf {c!r}")


def lr_multiplier(c: ParamClass) -> float:
  """Learning-rate multiplier of one class: ``1 / m`` for matrix-like params, else 1."""
  return 1.0 / c.width_mult if c.kind == MATRIX else 1.0


def wd_multiplier(c: ParamClass, wd_exponent=0.5):
  """Weight-decay multiplier of one class: ``m**e`` for matrix-like params, else 0."""
  return c.width_mult ** wd_exponent if c.kind == MATRIX else 0.0


def effective_hparams(classes: Any, learning_rate: float, weight_decay: float,
                      wd_exponent: float = 0.5) -> tuple[Any, Any]:
  """Per-param ``(lr, wd)`` trees (like ``classes``) that the optimizer applies."""
  _check_classes(classes)
  lrs = jax.tree.map(lambda c: learning_rate * lr_multiplier(c), classes)
  wds = jax.tree.map(lambda c: weight_decay * wd_multiplier(c, wd_exponent), classes)
  return lrs, wds


def decay_mask(classes: Any) -> Any:
  """Bool tree: True where the param is decayed (matrix-like)."""
  _check_classes(classes)
  return jax.tree.map(lambda c: c.kind == MATRIX, classes)


def _label(c: ParamClass) -> str:
  return f"{MATRIX}@{c.width_mult!r}" if c.kind == MATRIX else c.kind


def _scaled(value, mult):
  """``value * mult`` for a number, array or schedule."""
  if callable(value):
    return lambda count: value(count) * mult
  return value * mult


def _flatten_params(tree) -> tuple[list[str], list[Any], Any]:
  """``classes.flatten``, with the sole key of Linen variables ``{"params": ...}`` dropped."""
  paths, leaves, treedef = flatten(tree)
  if isinstance(tree, Mapping) and list(tree) == ["params"]:
    paths = [p.removeprefix("params/") for p in paths]
  return paths, leaves, treedef


def _hint(path: str, others) -> str:
  """What to pass instead, when ``path`` is only off by a Linen ``params/`` prefix."""
  if path.startswith("params/") and path.removeprefix("params/") in others:
    return "; pass only variables['params'] (the params the optimizer gets) to param_classes"
  if "params/" + path in others:
    return "; pass only variables['params'] to the optimizer"
  return ""


def _check_all_in(paths, others, what: str) -> None:
  """Raises naming a path not in ``others`` (in order, one with a hint first), if any."""
  missing = [p for p in paths if p not in others]
  if missing:
    path = next((p for p in missing if _hint(p, others)), missing[0])
    raise ValueError(f"param {path!r} {what}: classes must be built for this param "
                     f"tree{_hint(path, others)}")


def _check_params_match(classes: dict[str, ParamClass], params: Any) -> None:
  paths, leaves, _ = _flatten_params(params)
  got = dict(zip(paths, leaves))
  _check_all_in(classes, got, "has a class but is not in params")
  _check_all_in(got, classes, "is in params but has no class")
  for path, c in classes.items():
    ndim = len(getattr(got[path], "shape", ()))
    if any(a >= ndim for a in c.width_axes):
      raise ValueError(f"param {path!r} has rank {ndim} but its class has width axes "
                       f"{c.width_axes}: classes must be built for this param tree")


def width_scaled_adamw(
    learning_rate: optax.ScalarOrSchedule,
    classes: Any,
    *,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    wd_exponent: float = 0.5,
    independent_decay: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """AdamW with muP learning rates and weight decay ``wd * (d/d0)**wd_exponent`` (see module doc).

  Args:
    learning_rate: base lr (at the base width ``d0``), a number or an optax schedule.
    classes: tree of ``ParamClass`` with the leaf paths of the params
      (``lqx.optim.param_classes(base_shapes, target_shapes)``); any tree type
      (see module doc).
    weight_decay: base weight decay, a number or a schedule of the step count.
    wd_exponent: ``e`` in ``wd_2 = wd * (d/d0)**e`` for matrix-like params.
    independent_decay: decay not multiplied by the learning rate.
    b1, b2, eps, eps_root, mu_dtype, nesterov: as ``optax.scale_by_adam``.

  With every class matrix-like and ``width_mult == 1`` this is exactly
  ``optax.adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay)``.
  """
  _check_nonnegative("learning_rate", learning_rate)
  _check_nonnegative("weight_decay", weight_decay)
  _check_classes(classes)
  paths, leaves, _ = _flatten_params(classes)
  by_path = dict(zip(paths, leaves))
  groups = {_label(c): c for c in leaves}

  def labels(tree):
    """Labels by path, as a prefix of ``tree`` (params, grads or updates, any tree type)."""
    paths, _, treedef = _flatten_params(tree)
    _check_all_in(paths, by_path, "is in params but has no class")
    return jax.tree.unflatten(treedef, [_label(by_path[p]) for p in paths])

  def lr_scale(c):
    return optax.scale(lr_multiplier(c)) if c.kind == MATRIX else optax.identity()

  def decay(c, sign):
    if c.kind != MATRIX:
      return optax.identity()
    return optax.add_decayed_weights(_scaled(weight_decay, sign * wd_multiplier(c, wd_exponent)))

  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
                             nesterov=nesterov)
  if independent_decay:
    # After scale_by_learning_rate the updates are -lr_p * u; add -wd_p * W.
    tx = optax.chain(
        adam,
        optax.partition({k: lr_scale(c) for k, c in groups.items()}, labels),
        optax.scale_by_learning_rate(learning_rate),
        optax.partition({k: decay(c, -1.0) for k, c in groups.items()}, labels),
    )
  else:
    tx = optax.chain(
        adam,
        optax.partition({k: optax.chain(decay(c, 1.0), lr_scale(c)) for k, c in groups.items()},
                        labels),
        optax.scale_by_learning_rate(learning_rate),
    )

  # f32 schedule values or hyperparameters would promote bf16 updates: keep the params' dtype.
  tx = optax.chain(tx, optax.stateless(
      lambda updates, params: jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params)))

  def init_fn(params):
    _check_params_match(by_path, params)
    return tx.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, tx.update)

