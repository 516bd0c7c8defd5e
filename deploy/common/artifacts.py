"""Atomic artifact writes: a failed run never leaves a half-written file where a good one was."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

#: `.{name}.{writer pid}.{random}.tmp`: the pid lets a later run remove a dead writer's debris
TEMP_PATTERN = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


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
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(final)  # a failed write() names no file; the error should
        raise


@contextlib.contextmanager
def temp_folder(parent: Path, name: str) -> Iterator[Path]:
    """A scratch folder in `parent` for the block, named like atomic_path's temp files so a
    later build removes it if this process dies before the block ends."""
    folder = Path(parent) / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_atomic(path: Path, data: bytes) -> Path:
    with atomic_path(Path(path)) as tmp, open(tmp, "xb") as f:
        f.write(data)
    return Path(path)
