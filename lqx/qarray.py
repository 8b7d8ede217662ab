"""Old home of the affine format; it lives in ``lqx.formats.affine`` now (kept for one release)."""

from lqx.formats.affine import *  # noqa: F401,F403
from lqx.formats.affine import QArray  # noqa: F401
