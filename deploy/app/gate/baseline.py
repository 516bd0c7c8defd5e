"""The baseline file: what --update-baseline records and a check reads back, validated field
by field (a baseline is data; see ci/README.md for its schema)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qat_deploy.deploy.app.gate.statistics import RatioCI
from qat_deploy.deploy.common.errors import BadInputError

SCHEMA = 1
REFERENCE_KINDS = ("fp32", "artifact")


@dataclass(frozen=True)
class Reference:
    """What the candidate is divided by: the fp32 model (exported from the repo, or --reference
    FILE), or a pinned ONNX artifact stored beside the baseline and checked by its sha256."""

    kind: str  # one of REFERENCE_KINDS
    path: str | None = None  # artifact only: relative to the baseline file's directory
    sha256: str | None = None


@dataclass(frozen=True)
class Pinned:
    """The int8 candidate the baseline measured, copied beside it (a bare file name in the
    baseline's directory) and checked by its sha256."""

    path: str
    sha256: str


@dataclass(frozen=True)
class Baseline:
    model: str
    target: str
    input_shape: tuple[int, ...]
    threads: int
    reference: Reference
    ratio: RatioCI
    tolerance: float
    measured_at: str
    environment: dict
    candidate: dict  # {"source": "repo"} or {"source": "onnx", "path": ...}
    pinned_candidate: Pinned | None = None  # absent in baselines made before it existed
    p50_ms: dict[str, float] = field(default_factory=dict)  # informational
    timing: dict = field(default_factory=dict)  # informational
    schema: int = SCHEMA

    def to_json(self) -> str:
        doc = {"schema": self.schema, **asdict(self)}
        doc["reference"] = {k: v for k, v in doc["reference"].items() if v is not None}
        if doc["pinned_candidate"] is None:
            del doc["pinned_candidate"]
        return json.dumps(doc, indent=2) + "\n"


def load_baseline(path: Path) -> Baseline:
    """Read and validate a baseline: any problem is one line naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"baseline not found: {path} (create it with --update-baseline)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read baseline {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise BadInputError(f"corrupt baseline {path}: not JSON ({exc})") from exc
    return _parse_baseline(doc, path)


def _parse_baseline(doc: object, path: Path) -> Baseline:
    check = _Fields(doc, f"corrupt baseline {path}")
    schema = check.get("schema", _is_int, "an integer")
    if schema != SCHEMA:
        raise BadInputError(f"baseline {path} has schema {schema}; this gate reads {SCHEMA}")
    ratio = _Fields(check.get("ratio", _is_dict, "an object"), f"{check.where}: ratio")
    value, low, high = (
        ratio.get(k, _is_positive, "a number > 0") for k in ("value", "low", "high")
    )
    if not low <= value <= high:
        raise BadInputError(f"{check.where}: ratio value {value} is not within [{low}, {high}]")
    reference = _Fields(check.get("reference", _is_dict, "an object"), f"{check.where}: reference")
    kind = reference.get("kind", lambda v: v in REFERENCE_KINDS, " or ".join(REFERENCE_KINDS))
    ref = Reference(kind)
    if kind == "artifact":
        ref = Reference(
            kind,
            reference.get("path", _is_str, "a path"),
            reference.get("sha256", _is_str, "a hex digest"),
        )
    return Baseline(
        model=check.get("model", _is_str, "a model name"),
        target=check.get("target", _is_str, "a target name"),
        input_shape=tuple(check.get("input_shape", _is_shape, "a list of positive integers")),
        threads=check.get("threads", _is_count, "a positive integer"),
        reference=ref,
        ratio=RatioCI(
            value,
            low,
            high,
            confidence=ratio.get("confidence", lambda v: _is_positive(v) and v < 1, "in (0, 1)"),
            blocks=ratio.get("blocks", _is_count, "a positive integer"),
        ),
        tolerance=check.get("tolerance", lambda v: _is_number(v) and 0 <= v <= 1, "in [0, 1]"),
        measured_at=check.get("measured_at", _is_str, "a timestamp"),
        environment=check.get("environment", _is_dict, "an object"),
        candidate=check.get("candidate", _is_dict, "an object"),
        pinned_candidate=_parse_pinned(check),
        p50_ms=check.optional("p50_ms", {}),
        timing=check.optional("timing", {}),
    )


def _parse_pinned(check: _Fields) -> Pinned | None:
    if check.optional("pinned_candidate", None) is None:
        return None
    pin = _Fields(check.doc["pinned_candidate"], f"{check.where}: pinned_candidate")
    return Pinned(
        pin.get("path", _is_file_name, "a file name, no folders"),
        pin.get("sha256", _is_str, "a hex digest"),
    )


class _Fields:
    """Typed access to a JSON object's fields, failing with the field's name."""

    def __init__(self, doc: object, where: str) -> None:
        if not isinstance(doc, dict):
            raise BadInputError(f"{where}: expected a JSON object")
        self.doc, self.where = doc, where

    def get(self, key: str, valid, expected: str):
        if key not in self.doc:
            raise BadInputError(f"{self.where}: missing '{key}'")
        if not valid(self.doc[key]):
            raise BadInputError(f"{self.where}: '{key}' is {self.doc[key]!r}; expected {expected}")
        return self.doc[key]

    def optional(self, key: str, default):
        return self.doc.get(key, default)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_positive(v: object) -> bool:
    return _is_number(v) and v > 0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_count(v: object) -> bool:
    return _is_int(v) and v >= 1


def _is_str(v: object) -> bool:
    return isinstance(v, str) and bool(v)


def _is_file_name(v: object) -> bool:
    return _is_str(v) and Path(v).name == v and v != ".."


def _is_dict(v: object) -> bool:
    return isinstance(v, dict)


def _is_shape(v: object) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_count(d) for d in v)
