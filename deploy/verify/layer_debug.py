"""Per-layer debugging: where int8 error enters a model, and whether the engine adds any.

The QDQ model runs three ways on the same inputs, every activation quantizer's tensors marked
as graph outputs (polygraphy's "mark all", limited to the tensors the model quantizes):
- float: the QDQ graph with every Q/DQ pair bypassed and the float weights put back;
- fake-quant: the QDQ graph under onnxruntime with graph optimizations off, i.e. ONNX's
  QuantizeLinear/DequantizeLinear arithmetic, what the fake-quant model computes;
- engine: the target's adapter builds the marked QDQ graph and runs it, where it can run here.
  Marked outputs are the quantizers' integer codes, which int8 kernels produce anyway, so
  marking leaves the fusions alone; the kernel counts with and without marks are reported.

Per quantizer, the error that *enters* there is the SQNR of quantizing the float tensor alone
(clipping + rounding of the true values); the error that has *arrived* is the SQNR of the
fake-quant tensor against the float one, which also carries everything upstream. A layer whose
entering figure is low is a cause; one whose arrived figure is low while its entering one is
high only propagates. The engine column is the engine's codes against the fake-quant codes in
quantization steps: nonzero means the engine computes something the fake-quant model does not.
Those differences propagate, so the engine column also has its entering form: each quantizer's
codes recomputed by ONNX arithmetic from the engine's *own* upstream codes (one run of a
teacher-forced copy, every quantizer reading the engine's codes). A layer the engine computes
differently shows steps there; near-tie rounding flips that a deep model amplifies do not.
Weight quantizers have only an entering figure (their float weights against the int8 ones).
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from qat_deploy.deploy.common.artifacts import temp_folder, write_atomic
from qat_deploy.deploy.common.errors import BackendUnavailableError, BadInputError, one_line
from qat_deploy.deploy.common.measured import Measured, NotMeasured
from qat_deploy.deploy.engines.adapter import Adapter
from qat_deploy.deploy.export.passes import (
    GraphIndex,
    along_axis,
    drop_dead_nodes,
    drop_unused_initializers,
)
from qat_deploy.deploy.quant.fake_quant import SMOOTH_ATTRIBUTE
from qat_deploy.deploy.rules.ops import layer_of
from qat_deploy.deploy.verify.closeness import sqnr_db

#: rows shown first: the quantizers where most error enters
RANKED = 10
#: a quantizer is flagged when this many dB less SQNR enter there than at the model's median
#: one: a scale 10x too coarse costs 20 dB; in clean models the worst sat 8.0 dB
#: (digits_resnet) and 10.9 dB (random MobileNetV3-S) under the median
FLAG_DB = 12.0


@dataclass(frozen=True)
class Quantizer:
    """One quantizer of the QDQ model: an activation (a QuantizeLinear on a tensor) or a
    weight (an integer initializer behind a DequantizeLinear)."""

    kind: str  # "activation" or "weight"
    layer: str  # the user's layer that produces the tensor (activations) or owns the weight
    tensor: str  # float tensor (activation) or the integer initializer (weight)
    codes: str  # the QuantizeLinear output holding the integer codes (activations)
    consumers: tuple[str, ...]  # layers that read the dequantized value
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int


@dataclass(frozen=True)
class LayerError:
    """One quantizer's figures; dB are SQNR against float (higher is better)."""

    kind: str
    layer: str
    tensor: str
    consumers: tuple[str, ...]
    entering_db: float  # the float values quantized by this quantizer alone
    arrived_db: float | None  # the fake-quant values vs float (activations)
    clipped: float  # fraction of float values outside the quantizer's range
    engine_max_steps: float | None  # |engine codes - fake-quant codes|, max
    engine_mismatch: float | None  # fraction of codes that differ
    #: the same, against codes recomputed from the engine's own upstream codes: what the engine
    #: adds at this quantizer alone
    engine_entering_max_steps: float | None = None
    engine_entering_mismatch: float | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["consumers"] = list(self.consumers)
        for key in ("entering_db", "arrived_db"):
            out[key] = _finite(out[key])
        return out


#: An engine computes its QDQ model when, layer by layer, each quantizer's codes recomputed from
#: the engine's own upstream codes differ by at most one step (a rounding flip at a near-tie:
#: fused multiply-adds, approximate exp, scale-shift rounding) in at most this fraction of the
#: codes. Measured with OpenVINO 2026.4 on a VNNI EPYC: random MixNet-S 0.026% and FastViT-T8
#: 0.004% at their worst quantizer (while their outputs drift 30 and 9 steps from the fake-quant
#: model's: amplification); an engine computing one layer with a 10x scale: 44% (tests).
FAITHFUL_MISMATCH = 0.01


@dataclass(frozen=True)
class Faithfulness:
    """The engine against its QDQ model, quantizer by quantizer (the entering columns)."""

    quantizers: int
    worst_layer: str
    worst_max_steps: float
    worst_mismatch: float
    #: tensors the QDQ file quantizes on a grid (scale, zero point) no fake-quantizer of the
    #: model has: there the file, not the engine, computes something else (provenance)
    foreign: tuple[str, ...] = ()
    #: int8 weights of the file that no weight quantizer of the model computes (provenance)
    foreign_weights: tuple[str, ...] = ()

    @property
    def faithful(self) -> bool:
        return (
            not self.foreign
            and not self.foreign_weights
            and self.worst_max_steps <= 1
            and self.worst_mismatch <= FAITHFUL_MISMATCH
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "faithful": self.faithful, "bound_mismatch": FAITHFUL_MISMATCH}


@dataclass(frozen=True)
class LayerDebug:
    samples: int
    rows: list[LayerError]  # in graph order
    engine: Measured | NotMeasured  # kernel counts with and without marks, or why not run

    def ranked(self) -> list[LayerError]:
        """Most entering error first; ties in graph order."""
        order = {id(row): i for i, row in enumerate(self.rows)}
        return sorted(self.rows, key=lambda r: (r.entering_db, order[id(r)]))

    def flagged(self) -> list[LayerError]:
        """Quantizers entering FLAG_DB or more below the median entering SQNR, worst first."""
        finite = [r.entering_db for r in self.rows if math.isfinite(r.entering_db)]
        if not finite:
            return []
        bar = float(np.median(finite)) - FLAG_DB
        return [r for r in self.ranked() if r.entering_db < bar]

    def faithfulness(self) -> Faithfulness | None:
        """The worst entering engine mismatch; None where the engine did not run."""
        rows = [r for r in self.rows if r.engine_entering_max_steps is not None]
        if not rows:
            return None
        worst = max(rows, key=lambda r: (r.engine_entering_max_steps, r.engine_entering_mismatch))
        return Faithfulness(
            len(rows),
            worst.layer,
            worst.engine_entering_max_steps,
            max(r.engine_entering_mismatch for r in rows),
        )

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "engine": self.engine.to_dict(),
            "ranked": [row.tensor for row in self.ranked()[:RANKED]],
            "flagged": [row.tensor for row in self.flagged()],
            "quantizers": [row.to_dict() for row in self.rows],
        }


def quantizers(model: onnx.ModelProto, float_weights: Mapping[str, np.ndarray]) -> list[Quantizer]:
    """The model's activation quantizers with constant parameters, and its weight quantizers
    whose float weights are known, in graph order."""
    g = GraphIndex(model)
    found = []
    for node in g.graph.node:
        params = [g.const(name) for name in node.input[1:3]]
        if len(params) < 2 or any(p is None for p in params):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if node.op_type == "QuantizeLinear" and node.input[0] not in g.inits:
            dequantized = [c for c in g.consumers.get(node.output[0], []) if _is_dq(c)]
            readers = [r for dq in dequantized for r in g.consumers.get(dq.output[0], [])]
            found.append(
                Quantizer(
                    "activation",
                    _producer_layer(node.input[0], g),
                    node.input[0],
                    node.output[0],
                    tuple(dict.fromkeys(_layer(r) for r in readers)),
                    *params,
                    axis,
                )
            )
        elif _is_dq(node) and node.input[0] in float_weights:
            readers = g.consumers.get(node.output[0], [])
            layer = _layer(readers[0]) if readers else node.input[0]
            found.append(Quantizer("weight", layer, node.input[0], "", (layer,), *params, axis))
    return found


def float_twin(model: onnx.ModelProto, float_weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The QDQ graph computing in float: each activation Q -> DQ read as the Q's input, each
    int8 weight's DQ read as the float weight. Integer biases stay (their DQ is exact enough:
    a 32-bit code per value)."""
    twin = copy.deepcopy(model)
    g = GraphIndex(twin)
    source: dict[str, str] = {}
    for node in g.graph.node:
        if not _is_dq(node):
            continue
        if node.input[0] in float_weights:
            name = g.add_init(f"{node.input[0]}_float", float_weights[node.input[0]])
            source[node.output[0]] = name
        else:
            q = g.made_by(node.input[0], "QuantizeLinear")
            if q is not None and q.input[0] not in g.inits:
                source[node.output[0]] = q.input[0]
    for node in g.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = source.get(name, name)
    for output in g.graph.output:  # a model ending in Q/DQ: keep the output's name
        if output.name in source:
            g.graph.node.append(helper.make_node("Identity", [source[output.name]], [output.name]))
    drop_dead_nodes(g.graph)
    drop_unused_initializers(g.graph)
    return twin


def marked(model: onnx.ModelProto, names: Mapping[str, int]) -> onnx.ModelProto:
    """A copy whose graph outputs also include `names` (tensor name -> ONNX element type)."""
    out = copy.deepcopy(model)
    present = {o.name for o in out.graph.output}
    for name, elem_type in names.items():
        if name not in present:
            out.graph.output.append(helper.make_tensor_value_info(name, elem_type, None))
    return out


#: suffix of a teacher-forced quantizer's own output
LOCAL = "__local"


def teacher_forced(model: onnx.ModelProto, codes: Mapping[str, int]) -> onnx.ModelProto:
    """A copy in which each QuantizeLinear writing one of `codes` (name -> element type) writes
    `<name>__local`, a graph output, while its readers read `<name>`, a graph input: fed with
    an engine's codes, one run recomputes every quantizer from the engine's upstream values."""
    out = copy.deepcopy(model)
    for node in out.graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] in codes:
            name = node.output[0]
            node.output[0] = name + LOCAL
            out.graph.input.append(helper.make_tensor_value_info(name, codes[name], None))
            out.graph.output.append(helper.make_tensor_value_info(name + LOCAL, codes[name], None))
    return out


def reference_runs(
    model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Every graph output over all feeds (concatenated on axis 0), run by onnxruntime with graph
    optimizations off: ONNX's own arithmetic, no fused kernels."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    runs = [dict(zip(names, session.run(names, dict(feed)), strict=True)) for feed in feeds]
    return _concatenated(runs, names)


def analyse(
    qdq_path: Path,
    float_weights: Mapping[str, np.ndarray],
    feeds: Sequence[Mapping[str, np.ndarray]],
    adapter: Adapter,
    engine_int8_layers: int,
    threads: int,
) -> LayerDebug:
    """Compare every quantizer's tensors float / fake-quant / engine over `feeds` (dicts keyed
    by the QDQ model's input names). The engine is built from a marked copy in a temporary
    folder beside `qdq_path`; `engine_int8_layers` is the unmarked engine's int8 layer count."""
    model = onnx.load(str(qdq_path))
    points = quantizers(model, float_weights)
    if not any(p.kind == "activation" for p in points):
        raise BadInputError(f"{qdq_path.name} has no activation quantizer to debug")
    activations = [p for p in points if p.kind == "activation"]
    float_names = {p.tensor: onnx.TensorProto.FLOAT for p in activations}
    code_names = {p.codes: helper.np_dtype_to_tensor_dtype(p.zero_point.dtype) for p in activations}
    floats = reference_runs(marked(float_twin(model, float_weights), float_names), feeds)
    fake = reference_runs(marked(model, float_names | code_names), feeds)
    with temp_folder(qdq_path.parent, "layer_debug") as work:
        engine_runs, engine = _engine_codes(
            marked(model, code_names), list(code_names), feeds, adapter, work, threads
        )
    if isinstance(engine, Measured):
        engine.values["int8_compute_layers"] = engine_int8_layers
    engine_codes = local = {}
    if engine_runs is not None:
        engine_codes = _concatenated(engine_runs, code_names)
        forced = teacher_forced(model, code_names)
        local = reference_runs(
            forced, [{**feed, **run} for feed, run in zip(feeds, engine_runs, strict=True)]
        )
    rows = []
    for p in points:
        if p.kind == "weight":
            weight = np.asarray(float_weights[p.tensor], np.float32)
            rows.append(_row(p, weight, None, None))
        else:
            row = _row(p, floats[p.tensor], fake[p.codes], engine_codes.get(p.codes))
            if p.codes in engine_codes:
                entering = _code_difference(p, engine_codes[p.codes], local[p.codes + LOCAL])
                row = replace(
                    row, engine_entering_max_steps=entering[0], engine_entering_mismatch=entering[1]
                )
            rows.append(row)
    return LayerDebug(len(next(iter(floats.values()))), rows, engine)


def _row(
    p: Quantizer,
    reference: np.ndarray,
    fake_codes: np.ndarray | None,
    engine_codes: np.ndarray | None,
) -> LayerError:
    scale, zero = _broadcast(p, reference.ndim)
    info = np.iinfo(p.zero_point.dtype)
    # ONNX QuantizeLinear / DequantizeLinear arithmetic, float32 like the runtimes
    raw = np.rint(reference.astype(np.float32) / scale) + zero
    entering = (np.clip(raw, info.min, info.max) - zero) * scale
    clipped = float(np.mean((raw < info.min) | (raw > info.max)))
    arrived = None
    if fake_codes is not None:
        arrived = sqnr_db(reference, (fake_codes.astype(np.float32) - zero) * scale)
    max_steps = mismatch = None
    if engine_codes is not None and fake_codes is not None:
        max_steps, mismatch = _code_difference(p, engine_codes, fake_codes)
    return LayerError(
        p.kind,
        p.layer,
        p.tensor,
        p.consumers,
        sqnr_db(reference, entering),
        arrived,
        clipped,
        max_steps,
        mismatch,
    )


def _code_difference(
    p: Quantizer, engine_codes: np.ndarray, reference_codes: np.ndarray
) -> tuple[float, float]:
    """Max |engine - reference| in steps, and the fraction of codes that differ."""
    if engine_codes.shape != reference_codes.shape:
        raise BadInputError(
            f"the engine's {p.codes} has shape {engine_codes.shape}; the model's is "
            f"{reference_codes.shape}"
        )
    diff = np.abs(engine_codes.astype(np.int32) - reference_codes.astype(np.int32))
    return float(diff.max(initial=0)), float(np.mean(diff > 0))


def _concatenated(runs: Sequence[Mapping[str, np.ndarray]], names) -> dict[str, np.ndarray]:
    return {name: np.concatenate([run[name] for run in runs]) for name in names}


def _engine_codes(
    model: onnx.ModelProto,
    code_names: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    adapter: Adapter,
    work_dir: Path,
    threads: int,
) -> tuple[list[dict[str, np.ndarray]] | None, Measured | NotMeasured]:
    """The marked model's extra outputs (the integer codes) as the engine computes them, per
    feed, and the marked engine's int8 layer count; or why the engine cannot run here."""
    path = write_atomic(work_dir / "model.qdq.marked.onnx", model.SerializeToString())
    built = adapter.build(path, work_dir, precision="int8", threads=threads)
    counts = {"int8_compute_layers_marked": len(adapter.kernel_report(built).int8_compute)}
    try:
        runner = adapter.runner(built)
    except BackendUnavailableError as exc:
        return None, NotMeasured(one_line(exc))
    runner.activate()
    try:
        # built from the same file, the engine takes the QDQ model's input names
        runs = [runner.infer(dict(feed), check_inputs=False) for feed in feeds]
    finally:
        runner.deactivate()
    return [{name: run[name] for name in code_names} for run in runs], Measured(counts)


def plot(result: LayerDebug, title: str, path: Path) -> Path:
    """PNG: per quantizer in graph order, the error entering and the error arrived (dB), and
    the engine's code mismatch in steps; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.kind == "activation"]
    x = np.arange(len(rows))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, len(rows) * 0.12), 7), sharex=True)
    top.plot(x, [_clamp(r.arrived_db) for r in rows], "-o", ms=3, label="arrived (fake-quant)")
    top.plot(x, [_clamp(r.entering_db) for r in rows], "x", ms=4, label="entering (this quantizer)")
    top.set_ylabel("SQNR vs float, dB")
    top.legend(loc="lower left")
    top.set_title(title)
    top.grid(alpha=0.3)
    steps = [_nan_if_none(r.engine_max_steps) for r in rows]
    entering = [_nan_if_none(r.engine_entering_max_steps) for r in rows]
    bottom.bar(x, steps, color="tab:red", label="arrived")
    bottom.bar(x, entering, color="black", width=0.4, label="entering (own upstream codes)")
    bottom.set_ylabel("engine vs fake-quant,\nmax steps")
    bottom.legend(loc="upper left", fontsize=7)
    bottom.set_xlabel("activation quantizer (graph order)")
    worst = sorted(range(len(rows)), key=lambda i: rows[i].entering_db)[:5]
    for i in worst:
        top.annotate(rows[i].layer, (x[i], _clamp(rows[i].entering_db)), fontsize=7, rotation=30)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return write_atomic(path, buffer.getvalue())


def _broadcast(p: Quantizer, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale, zero = p.scale.astype(np.float32), p.zero_point.astype(np.float32)
    return along_axis(scale, p.axis, ndim), along_axis(zero, p.axis, ndim)


def _producer_layer(tensor: str, g: GraphIndex) -> str:
    """The layer writing `tensor`: a graph input's own name; through a SmoothQuant Mul
    (deploy.training.smooth), the layer before it."""
    producer = g.producer.get(tensor)
    if producer is None:
        return tensor
    if producer.op_type == "Mul" and _layer(producer).endswith(f".{SMOOTH_ATTRIBUTE}"):
        return f"{_producer_layer(producer.input[0], g)} (smoothed)"
    return _layer(producer)


def _layer(node: onnx.NodeProto) -> str:
    return layer_of(node) or node.name or node.op_type


def _is_dq(node: onnx.NodeProto) -> bool:
    return node.op_type == "DequantizeLinear"


def _nan_if_none(value: float | None) -> float:
    return np.nan if value is None else value


def _finite(value: float | None) -> float | None:
    """JSON has no infinity: an exact match (+inf dB) or an all-zero tensor (-inf) is null."""
    return None if value is None or not math.isfinite(value) else value


def _clamp(value: float | None, high: float = 80.0) -> float:
    return high if value is None or value > high else value
