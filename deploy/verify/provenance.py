"""QDQ file -> its fake-quant model: does the file hold what the model computes?

The per-layer engine check (engine_check.per_layer_verdict) compares an engine with its QDQ
file, quantizer by quantizer. That acquits the engine only if the file is the model's: an
export that wrote one activation on another grid, or one layer's weights wrong, would run
"faithfully" and still compute something else. These two checks tie the file to the model: every
activation grid the file uses is one of the model's, and every int8 weight the file holds is
the fake-quantized weight of the model's layer the export tagged its reader with (of one of
the model's weight quantizers where the reader has no tag).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from qat_deploy.deploy.export.passes import GraphIndex, along_axis
from qat_deploy.deploy.export.qdq import export_mode
from qat_deploy.deploy.frontend.prepare import PreparedModel
from qat_deploy.deploy.quant.fake_quant import FakeQuantize
from qat_deploy.deploy.rules.ops import layer_of
from qat_deploy.deploy.verify.layer_debug import quantizers

#: the share of a weight's values allowed one step from the model's: the export quantizes the
#: same float weight with the same scale in numpy, which may round an exact tie the other way
#: (at least one value is allowed, whatever the size)
WEIGHT_TIE_SHARE = 1e-3


def foreign_grids(model: onnx.ModelProto, fake_quant: nn.Module) -> tuple[str, ...]:
    """Tensors a per-tensor activation quantizer of `model` quantizes on a grid (float32 scale,
    integer zero point) that no per-tensor FakeQuantize of `fake_quant` has."""
    grids = activation_grids(fake_quant)
    return tuple(
        p.tensor
        for p in quantizers(model, {})
        if p.kind == "activation"
        and p.scale.size == 1
        and _grid(p.scale, p.zero_point) not in grids
    )


def activation_grids(fake_quant: nn.Module) -> set[tuple[float, int]]:
    """The (scale, zero point) of every per-tensor FakeQuantize of `fake_quant`."""
    return {
        _grid(*m.effective_qparams())
        for m in fake_quant.modules()
        if isinstance(m, FakeQuantize) and not m.spec.per_channel
    }


def _grid(scale, zero_point) -> tuple[float, int]:
    """(scale, zero point) as the export writes them: float32 and an integer."""
    return float(np.float32(scale.item())), int(zero_point.item())


@dataclass(frozen=True)
class FileWeight:
    """An integer initializer of a QDQ file, dequantized."""

    name: str
    values: np.ndarray  # float32
    step: np.ndarray  # each value's scale
    #: (scale, zero point) where one pair covers the whole tensor, else None
    grid: tuple[float, int] | None


def foreign_weights(model: onnx.ModelProto, fake_quant: PreparedModel) -> tuple[str, ...]:
    """The integer initializers of `model` that are neither a fake-quantized weight of
    `fake_quant` (same shape; no value more than one step apart, and at most
    WEIGHT_TIE_SHARE of them one step apart) nor, per tensor, on one of its activation grids
    (a constant an activation quantizer reads, as ConvNeXt's layer scales on onnxruntime: the
    export folds its QuantizeLinear into integers too). A weight whose reader the export
    tagged with a layer of the model (LAYER_KEY) must be that layer's: two layers' weights
    swapped are foreign too."""
    layers = model_weights(fake_quant)
    grids = activation_grids(fake_quant)
    readers = reading_layers(model)

    def candidates(w: FileWeight) -> list[np.ndarray]:
        own = [layers[name] for name in readers.get(w.name, ()) if name in layers]
        return own or list(layers.values())

    return tuple(
        w.name
        for w in file_weights(model)
        if w.grid not in grids
        and not any(
            m.shape == w.values.shape and _same_codes(w.values, m, w.step) for m in candidates(w)
        )
    )


def model_weights(fake_quant: PreparedModel) -> dict[str, np.ndarray]:
    """Each weight quantizer's output on the weight export writes (float32), by the layer's
    module path as the export's LAYER_KEY tags name it."""
    modules = dict(fake_quant.named_modules())
    paths = [
        s.module.removesuffix(".weight_quant") for s in fake_quant.plan.sites if s.role == "weight"
    ]
    with export_mode(fake_quant), torch.no_grad():
        return {
            path.removeprefix("model."): modules[path].export_weight().float().numpy()
            for path in paths
        }


def reading_layers(model: onnx.ModelProto) -> dict[str, set[str]]:
    """Initializer -> the layers (LAYER_KEY tags) of the nodes that read its
    DequantizeLinear's output."""
    g = GraphIndex(model)
    found: dict[str, set[str]] = defaultdict(set)
    for node in g.graph.node:
        if node.op_type == "DequantizeLinear":
            tags = (layer_of(reader) for reader in g.consumers.get(node.output[0], []))
            found[node.input[0]].update(tag for tag in tags if tag is not None)
    return found


def file_weights(model: onnx.ModelProto) -> list[FileWeight]:
    """Every integer initializer a DequantizeLinear reads: what the export quantized (other
    constants stay float)."""
    g = GraphIndex(model)
    found, seen = [], set()
    for node in g.graph.node:
        name = node.input[0]
        if node.op_type != "DequantizeLinear" or name not in g.inits or name in seen:
            continue
        codes = numpy_helper.to_array(g.inits[name])
        scale, zero_point = g.const(node.input[1]), g.const(node.input[2])
        if codes.dtype.kind not in "iu" or codes.dtype.itemsize != 1 or scale is None:
            continue
        if zero_point is None:
            zero_point = np.zeros_like(scale, dtype=np.int32)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        step = np.broadcast_to(along_axis(scale.astype(np.float32), axis, codes.ndim), codes.shape)
        offset = along_axis(zero_point.astype(np.float32), axis, codes.ndim)
        grid = _grid(scale, zero_point) if scale.size == 1 else None
        found.append(FileWeight(name, (codes.astype(np.float32) - offset) * step, step, grid))
        seen.add(name)
    return found


def _same_codes(values: np.ndarray, weight: np.ndarray, step: np.ndarray) -> bool:
    """Whether `values` (steps `step`) and `weight` are the same codes, allowing ties."""
    apart = np.abs(values - weight) / step
    if not np.all(apart <= 1.01):
        return False
    return int(np.count_nonzero(apart > 0.5)) <= max(1, int(WEIGHT_TIE_SHARE * values.size))
