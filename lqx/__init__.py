"""lqx: sensitivity-aware weight transforms for JAX parameter pytrees.

The whole public surface; the modules say the rest.
"""

from lqx.io import load_model, load_tokenizer
from lqx.formats.affine import QArray
from lqx.quant.adadim import AdaDimConfig
from lqx.quant.gptq import GPTQConfig, gptq_quantize
from lqx.quant.rtn import RTNConfig, rtn_quantize
from lqx.recipe import Rule, default_recipe, make_method, quantize

__all__ = [
    "AdaDimConfig", "GPTQConfig", "QArray", "RTNConfig", "Rule", "default_recipe", "gptq_quantize",
    "load_model", "load_tokenizer", "make_method", "quantize", "rtn_quantize",
]
