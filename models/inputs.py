"""Named model inputs: what each forward() argument is (shape, dtype, value range).

A model takes one or more inputs; each is an InputSpec named after its forward() parameter, so
the pipeline can call ``model(**{name: tensor})`` and feed engines by name. Specs come from the
zoo, a user factory, ``--input-shape NAME:SHAPE:DTYPE`` or an ``--input-spec`` JSON file, and are
checked against the forward() signature here: a wrong name or a missing input would otherwise
surface as a TypeError deep inside calibration.
"""

from __future__ import annotations

import inspect
import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from qat_deploy.deploy.common.errors import BadInputError, one_line

DTYPES = ("float32", "int64", "int32", "bool")
INTEGER_DTYPES = ("int64", "int32")
SPEC_KEYS = ("shape", "dtype", "range", "vocab_size")


@dataclass(frozen=True)
class InputSpec:
    """One model input. name None means "the forward()'s first parameter" (the unnamed
    single-input form); range is the half-open [low, high) of integer inputs (token ids)."""

    name: str | None
    shape: tuple[int, ...]
    dtype: str = "float32"
    range: tuple[int, int] | None = None

    @property
    def is_mask(self) -> bool:
        """Masks are recognised by name: synthetic data makes them ones then zeros."""
        return self.name is not None and "mask" in self.name.lower()

    @property
    def label(self) -> str:
        return self.name or "input"

    def to_dict(self) -> dict:
        out: dict = {"name": self.label, "shape": list(self.shape), "dtype": self.dtype}
        if self.range is not None:
            out["range"] = list(self.range)
        return out


def check_shape(where: str, shape: object) -> tuple[int, ...]:
    if (
        isinstance(shape, (tuple, list))
        and shape
        and all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in shape
        )
    ):
        return tuple(int(d) for d in shape)
    raise BadInputError(
        f"bad input shape {shape!r} for {where}; "
        "expected positive integers such as (1, 3, 224, 224)"
    )


def check_dtype(where: str, dtype: object) -> str:
    if dtype not in DTYPES:
        raise BadInputError(
            f"bad input dtype {dtype!r} for {where}; expected one of {', '.join(DTYPES)}"
        )
    return str(dtype)


def check_range(where: str, value: object, dtype: str) -> tuple[int, int] | None:
    if value is None:
        return None
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
        and value[0] < value[1]
    )
    if not ok:
        raise BadInputError(
            f"bad range {value!r} for {where}; expected [low, high) with low < high"
        )
    if dtype not in INTEGER_DTYPES:
        raise BadInputError(f"range given for {where}, but only int64/int32 inputs take a range")
    return int(value[0]), int(value[1])


def specs_from_mapping(mapping: object, where: str) -> tuple[InputSpec, ...]:
    """{"input_ids": {"shape": [1, 128], "dtype": "int64", "range": [0, 30522]}, ...} (or
    name -> shape) as InputSpecs, in the mapping's order. "vocab_size": V means range [0, V)."""
    if not isinstance(mapping, dict) or not mapping:
        raise BadInputError(f"{where}: expected a non-empty object of input name -> spec")
    specs = []
    for name, entry in mapping.items():
        at = f"input '{name}' in {where}"
        if isinstance(entry, (list, tuple)):
            entry = {"shape": entry}
        if not isinstance(entry, dict):
            raise BadInputError(f"{at}: expected an object with shape and dtype")
        unknown = sorted(set(entry) - set(SPEC_KEYS))
        if unknown:
            raise BadInputError(f"{at}: unknown key '{unknown[0]}'; known: {', '.join(SPEC_KEYS)}")
        if "shape" not in entry:
            raise BadInputError(f"{at}: no shape")
        dtype = check_dtype(at, entry.get("dtype", "float32"))
        value_range = entry.get("range")
        if "vocab_size" in entry:
            value_range = [0, entry["vocab_size"]]
        specs.append(
            InputSpec(
                str(name),
                check_shape(at, entry["shape"]),
                dtype,
                check_range(at, value_range, dtype),
            )
        )
    return check_batch(tuple(specs), where)


def load_spec_file(path: str | Path) -> tuple[InputSpec, ...]:
    """An --input-spec JSON file as InputSpecs."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BadInputError(f"input spec file not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot read input spec file {path}: {one_line(exc)}") from exc
    return specs_from_mapping(mapping, str(path))


def check_batch(specs: tuple[InputSpec, ...], where: str) -> tuple[InputSpec, ...]:
    """Every input is sliced into the same batches, so they must share the batch size."""
    batches = {s.shape[0] for s in specs}
    if len(batches) > 1:
        sizes = ", ".join(f"{s.label} {s.shape[0]}" for s in specs)
        raise BadInputError(f"inputs of {where} have different batch sizes ({sizes})")
    names = [s.name for s in specs]
    if len(specs) > 1 and (None in names or len(set(names)) != len(names)):
        raise BadInputError(f"inputs of {where} need distinct names, got {names}")
    return specs


def bind_to_forward(
    module: nn.Module, specs: Sequence[InputSpec], ref: str
) -> tuple[tuple[InputSpec, ...], bool]:
    """Name, check and order `specs` by `module.forward`'s parameters.

    Returns the specs in forward() order and whether the model must be called with keyword
    arguments (several inputs, or one that is not the first parameter)."""
    specs = check_batch(tuple(specs), f"model '{ref}'")
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature: trust the specs
        params = []
    named = [p for p in params if p.kind not in (inspect.Parameter.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not named:  # forward(*args, **kwargs) or unknown: nothing to check against
        return _default_names(specs), len(specs) > 1
    names = [p.name for p in named]
    if len(specs) == 1 and specs[0].name is None:
        specs = (replace(specs[0], name=names[0]),)
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    signature = f"{type(module).__name__}.forward({', '.join(names)})"
    for spec in specs:
        if spec.name not in names and not takes_kwargs:
            raise BadInputError(f"input '{spec.name}' is not a parameter of {signature}")
    given = {s.name for s in specs}
    missing = [p.name for p in named if p.default is p.empty and p.name not in given]
    if missing:
        raise BadInputError(f"missing required input '{missing[0]}' of {signature}")
    order = {n: i for i, n in enumerate(names)}
    ordered = tuple(sorted(specs, key=lambda s: order.get(s.name, len(order))))
    return ordered, len(ordered) > 1 or ordered[0].name != names[0]


def _default_names(specs: tuple[InputSpec, ...]) -> tuple[InputSpec, ...]:
    if len(specs) == 1 and specs[0].name is None:
        return (replace(specs[0], name="input"),)
    return specs


def with_vocab_ranges(module: nn.Module, specs: tuple[InputSpec, ...]) -> tuple[InputSpec, ...]:
    """Token-id inputs without a range draw synthetic ids from [0, num_embeddings) of the
    model's first nn.Embedding (the word embedding in BERT-style models)."""
    first = next((m for m in module.modules() if isinstance(m, nn.Embedding)), None)
    if first is None:
        return specs
    return tuple(
        replace(s, range=(0, first.num_embeddings))
        if s.dtype in INTEGER_DTYPES and s.range is None and not s.is_mask
        else s
        for s in specs
    )
