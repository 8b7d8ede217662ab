"""Width-scaled AdamW, parameter classes from base shapes, muP for the LLaMA family.

  classes = param_classes(jax.eval_shape(init, base_cfg), jax.eval_shape(init, cfg))
  opt = width_scaled_adamw(lr, classes, weight_decay=wd, wd_exponent=0.5)

``lqx.optim.mup`` holds the LLaMA muP config/init; the transfer study that uses them is
``lqx.studies.mup_transfer`` (its teacher-student MLP ``lqx.studies.synthetic``).
"""

from lqx.optim.adamw import (decay_mask, effective_hparams, lr_multiplier, wd_multiplier,
                             width_scaled_adamw)
from lqx.optim.classes import FIXED, MATRIX, VECTOR, ParamClass, class_paths, param_classes

__all__ = [
    "FIXED", "MATRIX", "VECTOR", "ParamClass", "class_paths", "decay_mask", "effective_hparams",
    "lr_multiplier", "param_classes", "wd_multiplier", "width_scaled_adamw",
]
