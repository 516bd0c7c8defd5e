"""Atomic artifact writes: a failed run never leaves a half-written file where a good one was."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A fresh temp path beside `final`, renamed onto it only if the block succeeds. The
    writer creates the file itself, so it gets the usual permissions."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> Path:
    with atomic_path(Path(path)) as tmp, open(tmp, "xb") as f:
        f.write(data)
    return Path(path)
