"""Timing results kept across runs, keyed by everything that decides them.

A key is a hash of the runtime and its version, the CPU's identity and ISA, the thread count,
the timing settings and the bytes of both graphs compared (which fixes ops, shapes, dtypes and
placement), so an entry is reused only for the same comparison on the same kind of machine.
The file is JSON, rewritten atomically; an unreadable one is set aside as empty and one that
cannot be written is left as it was, and the report says so instead of failing the build over
a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from qat_deploy.deploy.common.artifacts import write_atomic

#: 2: only timings no other process disturbed are stored (deploy.engines.contention);
#: version-1 files may hold ratios timed under load, and are set aside as empty
CACHE_VERSION = 2


def default_cache_path() -> Path:
    """$XDG_CACHE_HOME/qat_deploy/latency_tuning.json (~/.cache when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qat_deploy" / "latency_tuning.json"


def digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class TimingCache:
    """Measured time ratios by key; `hits` and `misses` count lookups."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.hits = self.misses = 0
        self.problem: str | None = None
        self._entries: dict[str, float] = self._read() if path is not None else {}
        self._new: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(Path(self.path).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self.problem = f"unreadable cache {self.path} ignored: {type(exc).__name__}"
            return {}
        entries = data.get("entries") if isinstance(data, dict) else None
        if data.get("version") != CACHE_VERSION or not isinstance(entries, dict):
            self.problem = f"cache {self.path} has another format; ignored"
            return {}
        return {k: float(v) for k, v in entries.items() if isinstance(v, int | float)}

    def get(self, key: str) -> float | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: float) -> None:
        self._entries[key] = self._new[key] = value

    def save(self) -> None:
        """Merge this run's entries into the file as it is now (another run may have added
        some since) and replace it atomically."""
        if self.path is None or not self._new:
            return
        on_disk = TimingCache(self.path)._entries
        entries = {**on_disk, **self._new}
        text = json.dumps({"version": CACHE_VERSION, "entries": entries}, sort_keys=True)
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(Path(self.path), text.encode())
        except OSError as exc:  # a full disk or a read-only home costs the cache, not the build
            self.problem = f"cache {self.path} not saved: {exc.strerror or type(exc).__name__}"
            return
        self._new = {}

    def to_dict(self) -> dict:
        return {
            "path": None if self.path is None else str(self.path),
            "hits": self.hits,
            "misses": self.misses,
            "problem": self.problem,
        }
