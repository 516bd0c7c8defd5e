"""Per-layer precision from TensorRT's engine layer information.

Two spellings of the same information: the one-line text TensorRT-RTX logs at the end of a
DETAILED build ("Name: conv1_myl0_1, LayerType: correlation, Inputs: [ { ..., Datatype: Int8,
... }], ..., Metadata: [ONNX Layer: conv1]...") and the engine inspector's JSON (datacenter
TensorRT: "LayerType": "CaskConvolution", "Inputs": [{"Format/Datatype": "... Int8 ..."}]).

A compute layer runs int8 when all its data inputs are Int8 (weights are constants, listed
apart; a Bool attention mask or an integer index input is no data input: TensorRT-RTX's fused
int8 attention of a masked encoder reads Bool/Int8/Int8/Int8). Compute layers are found by
type (conv/gemm kernels) and, because TensorRT may lower a small Gemm/MatMul into a generated
kernel ("kgen", "runtime_fusion"), also by the ONNX nodes each layer's metadata names: an ONNX
Conv/Gemm/MatMul that no conv/gemm-type layer claims is reported on the first layer that names
it, so a float fallback cannot hide inside a fused kernel.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import onnx

from qat_deploy.deploy.engines.adapter import LayerPrecision

ONNX_COMPUTE_OPS = {
    "Conv": "conv",
    "ConvTranspose": "conv_transpose",
    "Gemm": "linear",
    "MatMul": "matmul",
}

_TEXT_LAYER = re.compile(
    r"^Name: (?P<name>.*?), LayerType: (?P<type>[^,]+), "
    r"Inputs: \[(?P<inputs>.*?)\], (?:Constants|Outputs): \["
)
_DATATYPE = re.compile(r"Datatype: (\w+)")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]*)\]")
_INT8 = re.compile(r"\bint8\b", re.IGNORECASE)  # "UInt8" does not match
#: Input types that carry masks or indices, not the values a layer computes on.
_NOT_DATA = re.compile(r"\b(bool|int32|int64)\b", re.IGNORECASE)
#: TensorRT-RTX's fused attention kernel (named after its "_gemm_mha_v2" tactic) takes Q, K
#: and V, and masks or additive score biases (T5's relative positions with the mask folded in,
#: Swin's shifted-window masks), which it adds to the scores in float whatever the two GEMMs
#: run in. Q, K and V decide: the kernel is int8 when three of its inputs are.
_FUSED_ATTENTION = re.compile(r"_gemm_mha", re.IGNORECASE)
_ATTENTION_OPERANDS = 3


@dataclass(frozen=True)
class EngineLayer:
    name: str
    layer_type: str
    input_types: tuple[str, ...]  # activation inputs only, in the backend's own words
    onnx_nodes: tuple[str, ...]  # ONNX nodes the layer implements, from its metadata

    @property
    def precision(self) -> str:
        if _FUSED_ATTENTION.search(self.name):
            int8 = sum(bool(_INT8.search(t)) for t in self.input_types)
            return "int8" if int8 >= _ATTENTION_OPERANDS else "float"
        data = [t for t in self.input_types if not _NOT_DATA.search(t)]
        return "int8" if data and all(_INT8.search(t) for t in data) else "float"


def layers_from_text(text: str) -> list[EngineLayer]:
    """Layers of a TensorRT-RTX "Layers:" log message (one line per layer)."""
    layers = []
    for line in text.splitlines():
        match = _TEXT_LAYER.match(line)
        if match is None:
            continue
        metadata = line.partition(", Metadata: ")[2]
        layers.append(
            EngineLayer(
                name=match["name"],
                layer_type=match["type"].strip(),
                input_types=tuple(_DATATYPE.findall(match["inputs"])),
                onnx_nodes=tuple(_ONNX_LAYER.findall(metadata)),
            )
        )
    return layers


def layers_from_json(text: str) -> list[EngineLayer]:
    """Layers of an engine inspector JSON document (ProfilingVerbosity.DETAILED)."""
    return [
        EngineLayer(
            name=layer.get("Name", ""),
            layer_type=layer.get("LayerType", ""),
            input_types=tuple(str(i.get("Format/Datatype", "")) for i in layer.get("Inputs", [])),
            onnx_nodes=tuple(_ONNX_LAYER.findall(str(layer.get("Metadata", "")))),
        )
        for layer in json.loads(text).get("Layers", [])
        if isinstance(layer, dict)  # without DETAILED verbosity layers are bare names
    ]


def onnx_compute_nodes(onnx_path: Path) -> dict[str, str]:
    """Name -> compute kind of the model's Conv/ConvTranspose/Gemm/MatMul nodes."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return {
        n.name: ONNX_COMPUTE_OPS[n.op_type] for n in graph.node if n.op_type in ONNX_COMPUTE_OPS
    }


def kind_of_layer_type(layer_type: str) -> str | None:
    """Compute kind of TensorRT kernel types: CaskConvolution, correlation, gemm, ..."""
    t = layer_type.lower()
    if "deconv" in t:
        return "conv_transpose"
    if "conv" in t or t == "correlation":
        return "conv"
    if "gemm" in t or "fullyconnected" in t:
        return "linear"
    if "matrixmultiply" in t or "matmul" in t:
        return "matmul"
    return None


def layer_precisions(
    layers: list[EngineLayer], compute_nodes: dict[str, str]
) -> list[LayerPrecision]:
    """Every layer with its precision; compute layers carry the kind of ONNX op they implement."""
    typed = {
        n for layer in layers if kind_of_layer_type(layer.layer_type) for n in layer.onnx_nodes
    }
    reported: set[str] = set()
    result = []
    for layer in layers:
        kind = kind_of_layer_type(layer.layer_type)
        ops = [n for n in layer.onnx_nodes if n in compute_nodes]
        if kind is None:  # a generated kernel: compute only if it hosts an unclaimed compute op
            ops = [n for n in ops if n not in typed and n not in reported]
            reported.update(ops)
        if ops:
            kind = compute_nodes[ops[0]]
        result.append(LayerPrecision(layer.name, layer.layer_type, layer.precision, kind))
    return result
