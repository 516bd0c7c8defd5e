"""OpenVINO CPU rules, as NNCF's CPU hardware config states them (setups/cpu.py, qspaces.py).

- Activations uint8 affine per-tensor (Convolution needs per-tensor activation dequantization);
  weights int8 symmetric per-channel, narrow range.
- Quantize inputs of Convolution, MatMul, Add (both inputs in CNNs), Multiply, AvgPool,
  ReduceMean, Interpolate; Concat inputs share one scale; MaxPool, Reshape, Transpose and Pad
  are quantization-agnostic.
- Transformer mode (NNCF model_type=TRANSFORMER): quantize only Linear/MatMul inputs, with
  symmetric activations; Add, LayerNorm, Softmax and GELU stay float.
"""

from deploy.quant.spec import INT8_SYM_ACT, INT8_WEIGHT, UINT8_AFFINE_ACT
from deploy.rules import WEIGHTED_OPS, BackendRules, Inputs, OpRule

RULES = BackendRules(
    name="openvino",
    activation=UINT8_AFFINE_ACT,
    weight=INT8_WEIGHT,
    ops={
        **WEIGHTED_OPS,
        "add": OpRule(Inputs.ALL),
        "mul": OpRule(Inputs.ALL),
        "avgpool": OpRule(Inputs.ALL),
        "global_avgpool": OpRule(Inputs.ALL),
        "reduce_mean": OpRule(Inputs.ALL),
        "interpolate": OpRule(Inputs.ALL),
        "concat": OpRule(Inputs.ALL, shared_scale=True),
    },
    pass_through=frozenset({"maxpool", "reshape", "transpose", "pad", "identity", "getitem"}),
    fusions=(("conv", "bn"), ("conv", "bn", "relu"), ("conv", "bn", "relu6"), ("linear", "relu")),
    transformer_ops={
        "linear": OpRule(Inputs.ACTIVATION, activation=INT8_SYM_ACT),
        "matmul": OpRule(Inputs.ALL, activation=INT8_SYM_ACT),
    },
    weight_axis={"conv_transpose": 1},
    # ONNX post-passes (deploy/export_passes.py) that let openvino fuse more int8 kernels
    export_passes=("quantize_before_pass_through",),
    # The CPU plugin fuses a residual Add into the Conv feeding it as a oneDNN sum post-op and
    # rounds only at the last post-op: that Conv's output quantizer becomes a clamp. Measured
    # with OpenVINO 2026.4 on random MobileNetV2: int8 vs a rounding fake-quant model cosine
    # 0.986, vs this emulation 0.9966; ResNet-18: error 6x lower with the first Conv operand
    # unrounded than with none or with the second (downsample) operand.
    unrounded_fused_add=True,
)
