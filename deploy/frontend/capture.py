"""Graph capture: torch.export turns a user's model into an ATen graph, the IR the ONNX exporter
and torchao's PT2E quantization build on too. One capture for every model: nn.Modules and
functional code (F.conv2d on its own parameters) look the same in it.

A model torch.export cannot capture cannot be exported to ONNX either (the dynamo exporter
captures with torch.export), so there is no fallback capture: the user gets one line naming
the construct that stopped it, where it is, and how to fix it.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import warnings
from collections.abc import Mapping

import torch
from torch import fx, nn
from torch.fx import _pytree as fx_pytree

from qat_deploy.deploy.common.errors import BadInputError, one_line
from qat_deploy.deploy.common.logs import quieted

#: Why torch.export fails on user code, and what the user can do about it.
_FIXES: tuple[tuple[str, str, str], ...] = (
    (
        r"data-dependent|GuardOnDataDependentSymNode|Could not extract specialized integer",
        "data-dependent Python control flow",
        "branch with torch.cond or torch.where, or make the condition depend on shapes only",
    ),
    (
        r"Unsupported|graph break",
        "a Python construct torch.export does not support",
        "move it out of forward() or rewrite it with torch operations",
    ),
)

#: torch.export logs graph dumps on failure; the user gets our one line instead
CAPTURE_LOGGERS = ("torch", "torch._dynamo", "torch.export")


def capture(
    model: nn.Module, args: tuple[torch.Tensor, ...], kwargs: Mapping[str, torch.Tensor]
) -> fx.GraphModule:
    """torch.export `model` (in eval mode) with a dynamic batch axis, so calibration and
    evaluation batches of any size run through the same graph; returns the graph module,
    callable like `model`."""
    _check_runs(model, args, kwargs)
    program = _export(model, _batch_of_two(args), _batch_of_two(kwargs), dynamic=True)
    if program is None:  # the model fixes its batch size: capture it as it is
        program = _export(model, args, dict(kwargs), dynamic=False)
    gm = program.module()
    # torch.export's module refuses train()/eval() because BN and dropout in its graph are
    # frozen in the captured mode; deploy.frontend.lowering turns them back into modules that
    # switch.
    del gm.train, gm.eval
    for node in list(gm.graph.nodes):  # shape guards of the example; the graph is general
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            delattr(gm, "_guards_fn")
    gm.recompile()
    return gm


def _check_runs(model: nn.Module, args, kwargs) -> None:
    """A model that fails on its own example fails here, in the user's terms, not inside
    torch.export."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:
        shapes = ", ".join(
            f"{name}={tuple(x.shape)}" if name else str(tuple(x.shape))
            for name, x in [*((None, a) for a in args), *kwargs.items()]
            if torch.is_tensor(x)
        )
        raise BadInputError(
            f"example input of shape {shapes} does not fit the model: {one_line(exc)}"
        ) from exc


def flat_inputs(
    gm: fx.GraphModule, args: tuple[torch.Tensor, ...], kwargs: Mapping[str, torch.Tensor]
) -> list[torch.Tensor]:
    """The example inputs in the order of the captured graph's placeholders."""
    return list(fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), gm._in_spec))


def _batch_of_two(inputs):
    """torch.export specialises size-1 axes: capture with a batch of two so the batch axis
    stays symbolic (the example is repeated; its values do not matter for capture)."""

    def grow(x):
        if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == 1:
            return torch.cat([x, x])
        return x

    if isinstance(inputs, Mapping):
        return {k: grow(v) for k, v in inputs.items()}
    return tuple(grow(x) for x in inputs)


def _export(model: nn.Module, args, kwargs, *, dynamic: bool):
    dim = torch.export.Dim.AUTO
    shapes = None
    if dynamic:
        shapes = {
            "args": tuple({0: dim} if _batched(x) else None for x in args),
            "kwargs": {k: {0: dim} if _batched(v) else None for k, v in kwargs.items()},
        }
        shapes = _as_signature_shapes(model, args, kwargs, shapes)
    noise = io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(noise),
            contextlib.redirect_stderr(noise),
            quieted(CAPTURE_LOGGERS, logging.CRITICAL),
        ):
            warnings.simplefilter("ignore")
            return torch.export.export(model, tuple(args), dict(kwargs), dynamic_shapes=shapes)
    except Exception as exc:  # torch.export raises many types; all mean "cannot capture"
        if dynamic:
            return None
        raise BadInputError(explain_capture_failure(model, exc)) from exc


def _batched(x) -> bool:
    return torch.is_tensor(x) and x.dim() > 0


def _as_signature_shapes(model, args, kwargs, shapes):
    """dynamic_shapes keyed the way torch.export wants them: by forward() parameter name
    when inputs are keywords, as a tuple when they are positional."""
    if not kwargs:
        return shapes["args"]
    if not args:
        return shapes["kwargs"]
    names = list(inspect.signature(model.forward).parameters)
    return {**dict(zip(names, shapes["args"], strict=False)), **shapes["kwargs"]}


def explain_capture_failure(model: nn.Module, exc: BaseException) -> str:
    """One line: what torch.export stopped on, in which file and line of the user's code,
    and the fix."""
    text = str(exc)
    construct, fix = "a construct torch.export cannot capture", "see the torch.export docs"
    for pattern, what, how in _FIXES:
        if re.search(pattern, f"{type(exc).__name__} {text}"):
            construct, fix = what, how
            break
    where = _user_frame(text)
    at = f" at {where}" if where else ""
    first = one_line(exc)
    return (
        f"torch.export cannot capture {type(model).__name__}: {construct}{at} ({first}); fix: {fix}"
    )


def _user_frame(text: str) -> str | None:
    """'file.py:12 `code`' of the call torch.export's message names, if it names one."""
    match = re.search(r'File "([^"]+)", line (\d+), in \w+\n\s+(.+)', text)
    if match is None:
        return None
    path, line, code = match.groups()
    return f"{path.rsplit('/', 1)[-1]}:{line} `{code.strip()}`"
