"""Every report.json a test reads is checked against deploy/app/report.schema.json."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema

from qat_deploy.deploy.app.pipeline import REPORT_SCHEMA


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(REPORT_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def read_report(folder: Path) -> dict:
    """OUT/report.json, after checking it against the schema."""
    report = json.loads((Path(folder) / "report.json").read_text())
    errors = sorted(_validator().iter_errors(report), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
    return report
