"""The paper's minimal synthetic setting: a pre-norm residual MLP on teacher-student regression.

Student of width ``d`` (muP relative to ``d0``), inputs ``x ~ N(0, I_k)``::

  h_0     = x @ in/kernel                                    (k, d)   vector-like
  h_{l+1} = h_l + relu(rms_norm(h_l) * g_l @ fc1) @ fc2      (d, F), (F, D) matrix-like; g_l (d,) vector-like
  y       = (rms_norm(h_L) * g @ out/kernel) * d0 / d        (d, m)   vector-like, zero init (MuReadout)

with ``F = ffn_mult * d``. The teacher is a fixed random two-layer tanh network
``R^k -> R^m`` (width ``teacher_width``), the loss the mean squared error on fresh
samples each step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lqx import nn


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """Student architecture. Hashable: usable as a static jit arg."""

  width: int
  base_width: int
  n_blocks: int = 2
  in_dim: int = 16
  out_dim: int = 4
  ffn_mult: int = 2
  norm_eps: float = 1e-6


def init_params(config: MLPConfig, key: jax.Array) -> dict:
  """muP init: input N(0, 1/k), hidden N(0, 1/fan_in), unit gains, zero readout."""
  c = config
  keys = iter(jax.random.split(key, 2 * c.n_blocks + 1))
  f = c.ffn_mult * c.width

  def normal(shape):
    return jax.random.normal(next(keys), shape) / shape[0] ** 0.5

  params = {"in": {"kernel": normal((c.in_dim, c.width))}}
  for i in range(c.n_blocks):
    params[f"blocks_{i}"] = {"norm": {"scale": jnp.ones((c.width,))},
                             "fc1": {"kernel": normal((c.width, f))},
                             "fc2": {"kernel": normal((f, c.width))}}
  params["final_norm"] = {"scale": jnp.ones((c.width,))}
  params["out"] = {"kernel": jnp.zeros((c.width, c.out_dim))}
  return params


def apply(config: MLPConfig, params: dict, x: jax.Array) -> jax.Array:
  """x (B, in_dim) -> y (B, out_dim)."""
  c = config
  h = nn.linear(x, params["in"]["kernel"])
  for i in range(c.n_blocks):
    p = params[f"blocks_{i}"]
    z = jax.nn.relu(nn.linear(nn.rms_norm(h, p["norm"]["scale"], c.norm_eps), p["fc1"]["kernel"]))
    h = h + nn.linear(z, p["fc2"]["kernel"])
  h = nn.rms_norm(h, params["final_norm"]["scale"], c.norm_eps)
  return nn.linear(h, params["out"]["kernel"]) * (c.base_width / c.width)


def init_teacher(in_dim: int, out_dim: int, width: int, key: jax.Array) -> dict:
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (in_dim, width)) / in_dim ** 0.5,
          "w2": jax.random.normal(k2, (width, out_dim)) / width ** 0.5}


def teacher(t: dict, x: jax.Array) -> jax.Array:
  """Fixed target: tanh(x @ w1) @ w2, (B, in_dim) -> (B, out_dim)."""
  return jnp.tanh(x @ t["w1"]) @ t["w2"]


def loss(config: MLPConfig, params: dict, t: dict, x: jax.Array) -> jax.Array:
  """Mean squared error of the student against the teacher on ``x`` (B, in_dim)."""
  return jnp.mean(jnp.square(apply(config, params, x) - teacher(t, x)))
