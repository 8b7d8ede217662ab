"""Old name of ``lqx.evaluate`` (it shadowed the builtin ``eval``); kept for one release."""

from lqx.evaluate import *  # noqa: F401,F403
from lqx.evaluate import PerplexityResult, paired_difference, perplexity, window_nll  # noqa: F401
