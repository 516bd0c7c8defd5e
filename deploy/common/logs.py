"""Library loggers held quiet while one step runs, and as the user had them afterwards: what
torch.export and the ONNX exporter log is theirs to debug, not the user's, who gets our one line
or nothing."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence


@contextlib.contextmanager
def quieted(names: Sequence[str], level: int) -> Iterator[None]:
    """The named loggers at `level` inside the block, at their own levels again after it."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, previous in zip(loggers, levels, strict=True):
            logger.setLevel(previous)
