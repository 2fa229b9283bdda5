"""The project's console logger: progress lines and tables on stdout, library chatter kept quiet.

Orbax, grain and tfds log every checkpoint and file at INFO through absl; `setup()` raises absl's
threshold to WARNING, drops tfds's per-builder config notice and progress bars, and gives
`unialign_jax` messages their own INFO handler.
"""

from __future__ import annotations

import logging
import sys

from absl import logging as absl_logging

logger = logging.getLogger("unialign_jax")


class _DropNotice(logging.Filter):
    """Drops tfds's warning, repeated for every builder, that a custom BuilderConfig is in use."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Using custom data configuration" not in record.getMessage()


def setup() -> None:
    """Call once from a CLI's main()."""
    import tensorflow_datasets as tfds

    absl_logging.set_verbosity(absl_logging.WARNING)
    tfds.disable_progress_bar()
    logging.getLogger("absl").addFilter(_DropNotice())
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
