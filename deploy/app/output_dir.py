"""An output folder owned by one build at a time, free of a dead run's debris.

Why a kernel lock (fcntl.flock) and not a pid file: the kernel drops it when its holder dies,
even by SIGKILL, so a stale lock cannot exist and nothing has to guess whether a pid is dead
or reused. The lock file keeps the holder's pid only to name it in the refusal. Temp files of
atomic writes (deploy.common.artifacts) carry their writer's pid; those of dead processes are
removed when a build takes the folder over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from qat_deploy.deploy.common.artifacts import TEMP_PATTERN
from qat_deploy.deploy.common.errors import EnvironmentFaultError

LOCK_NAME = ".deploy.lock"


@contextlib.contextmanager
def owned(out: Path) -> Iterator[Path]:
    """Create `out` if needed, hold its lock for the block, clean dead runs' temp files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EnvironmentFaultError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except (FileExistsError, NotADirectoryError) as exc:
        raise EnvironmentFaultError(f"--out {out}: {exc.filename} is a file") from exc
    except OSError as exc:
        raise EnvironmentFaultError(f"cannot write in --out {out}: {exc.strerror}") from exc
    try:
        _lock(fd, out)
        remove_stale_temps(out)
        yield out
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, out: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        raise EnvironmentFaultError(
            f"--out {out} is in use by another build (pid {holder}); wait for it or pick "
            "another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)


def stale_temps(folder: Path) -> list[Path]:
    """Temp files of atomic writes (and temp folders, deploy.common.artifacts.temp_folder) under
    `folder` whose writer is no longer running."""
    return [path for path, writer in _temps(folder) if not _alive(writer)]


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete stale_temps(folder); returns them."""
    return _remove(stale_temps(folder))


def remove_own_temps(folder: Path) -> list[Path]:
    """Delete the temp files and folders this process left under `folder`: on the way out of
    a failed or interrupted run every atomic write has ended, so any left is debris (CI has
    twice seen onnxruntime's engine temp file left after a SIGINT in the engine stage; the
    path that leaves it is not known)."""
    return _remove([path for path, writer in _temps(folder) if writer == os.getpid()])


def _temps(folder: Path) -> list[tuple[Path, int]]:
    """Every temp file and folder of an atomic write under `folder`, with its writer's pid."""
    return [
        (path, int(match["pid"]))
        for path in Path(folder).rglob(".*.tmp")
        if (match := TEMP_PATTERN.fullmatch(path.name))
    ]


def _remove(removed: list[Path]) -> list[Path]:
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def report_problems(out: Path) -> list[str]:
    """What in `out` contradicts its report.json: an artifact it lists that is missing or
    differs from its recorded sha256, a finished report without an exit code, an "ok" one
    without its artifacts, a dead writer's temp file. Empty when the folder is consistent."""
    out = Path(out)
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"report.json unreadable: {exc}"]
    problems = []
    for key, entry in report.get("artifacts", {}).items():
        path = Path(entry["path"])
        if not path.is_file():
            problems.append(f"{key}: {path} is missing")
        elif sha256(path) != entry["sha256"]:
            problems.append(f"{key}: {path} differs from its recorded sha256")
    status = report.get("status", "")
    if status != "running" and "exit_code" not in report:
        problems.append(f"status '{status}' without an exit code")
    if status == "ok" and not report.get("artifacts"):
        problems.append("status ok but no artifacts listed")
    problems += [f"temp file left: {p}" for p in stale_temps(out)]
    return problems
