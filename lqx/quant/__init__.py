"""Quantization methods behind one protocol, and a registry by name.

A method is a frozen (hashable) config dataclass that provides:

  name          e.g. "rtn", "gptq", "adadim-gptq" (reports, CLIs)
  bits          bits per code
  stats         statistics ``quantize`` needs: ``()`` (data-free), ``"hessian"``
                (``H = 2/N X^T X`` of the linear's inputs, ``lqx.quant.hessian``) and/or
                ``"fisher"`` (the kernel's (IC, OC) diagonal Fisher, ``lqx.quant.fisher``)
  quantize(w, stats, *, name=None, judge=None, solved=None) -> (kernel, info)
                ``w`` (IC, OC) float; ``stats`` {stat: array}; ``kernel`` a format
                (``lqx.formats``); ``info`` a dict (the report reads ``proxy_loss``,
                ``damp``, ``group_axis``, ``candidates``, ``skipped``, ``seconds``).
                ``judge``: ``{label: (IC, OC) float kernel} -> {label: output MSE}``
                on calibration data, for methods that choose between candidates.

Optional, for solves that kernels reading one input can share (q/k/v, gate/up):
``shared(shape) -> [config, ...]`` and ``config.quantize_shared(ws, stats, names)``;
the results reach ``quantize`` as ``solved`` (config -> (kernel, info)).

``METHODS`` maps a CLI name to a factory ``(bits=, **options) -> method``; every
factory accepts the affine layout options (``AFFINE_OPTIONS``) and ignores those that
do not apply to it (SqueezeLLM's per-channel tables have no groups). ``<base>+lorc``
/ ``<base>+wlorc`` wrap a base method with plain / activation-whitened low-rank error
compensation (options ``rank``, ``factor_bits``). Add a method: one file here, one
``register`` line below.
"""

from __future__ import annotations

from typing import Callable

from lqx.quant.adadim import AdaDimConfig
from lqx.quant.gptq import GPTQConfig
from lqx.quant.lorc import LoRCConfig
from lqx.quant.rtn import RTNConfig
from lqx.quant.squeezellm import SqueezeLLMConfig

METHODS: dict[str, Callable] = {}


def register(name: str, factory: Callable) -> Callable:
  """Adds ``factory(bits=, group_size=, **options) -> method`` under ``name``. Returns it."""
  if name in METHODS and METHODS[name] is not factory:
    raise ValueError(f"method name {name!r} is taken")
  METHODS[name] = factory
  return factory


def make(name: str, **options):
  """The method registered as ``name``, built from ``options`` (bits=, group_size=, ...)."""
  if name not in METHODS:
    raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
  return METHODS[name](**options)


AFFINE_OPTIONS = ("group_size", "group_axis", "sym", "mse", "scale_dtype", "act_order", "static_groups")


def _squeezellm(**options) -> SqueezeLLMConfig:
  return SqueezeLLMConfig(**{k: v for k, v in options.items() if k not in AFFINE_OPTIONS})


def _lorc(base: str, whiten: bool) -> Callable:
  def factory(*, rank: int = 8, factor_bits: int = 8, **options) -> LoRCConfig:
    return LoRCConfig(make(base, **options), rank=rank, whiten=whiten, factor_bits=factor_bits)
  return factory


register("rtn", RTNConfig)
register("gptq", GPTQConfig)
register("adadim-rtn", lambda **kw: AdaDimConfig(RTNConfig(**kw)))
register("adadim-gptq", lambda **kw: AdaDimConfig(GPTQConfig(**kw)))
register("squeezellm", _squeezellm)
for _base in ("rtn", "gptq", "adadim-gptq", "squeezellm"):
  register(_base + "+lorc", _lorc(_base, whiten=False))
  register(_base + "+wlorc", _lorc(_base, whiten=True))
