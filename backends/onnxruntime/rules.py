"""onnxruntime CPU execution provider rules (its QDQ selector/action transformers).

- Activations uint8 affine per-tensor: signed activations leave most Conv/Gemm in float on x86
  (measured: 10/21 ResNet-18 Conv/Gemm became int8 kernels with s8 vs 21/21 with u8).
- Quantize around every op with an int8 kernel: Conv -> QLinearConv, MatMul -> QLinearMatMul,
  Gemm -> QGemm, Add/Mul -> QLinearAdd/Mul, Concat, AveragePool, GlobalAveragePool, Sigmoid,
  Softmax, LeakyRelu.
- ReLU/ReLU6 before a quantizer fold into it (the observed range starts at 0, so the zero point
  is qmin and onnxruntime drops the ReLU/Clip).
- Reshape, Transpose, Squeeze, MaxPool, Resize, Gather are quantization-agnostic.
- QGemm needs an int32-quantized bias; QLinearConv takes a float one.
- Transformer mode: quantize Linear inputs only; Softmax, LayerNorm, GELU and residual Adds stay
  float (quantizing them all destroys encoder accuracy: cosine 0.41 measured), and so do the
  two attention MatMuls: with both inputs activations they need two QuantizeLinear per head
  matmul and become MatMulIntegerToFloat / u8u8 QLinearMatMul, which cost more than the fp32
  FusedMatMul they replace (bert_tiny, 2 threads: 10.4 ms quantized vs 8.6 ms float, same run;
  docs/performance.md).
"""

from deploy.quant.spec import INT8_WEIGHT, UINT8_AFFINE_ACT
from deploy.rules import WEIGHTED_OPS, BackendRules, Inputs, OpRule

RULES = BackendRules(
    name="onnxruntime",
    activation=UINT8_AFFINE_ACT,
    weight=INT8_WEIGHT,
    ops={
        **WEIGHTED_OPS,
        "add": OpRule(Inputs.ALL),
        "mul": OpRule(Inputs.ALL),
        "concat": OpRule(Inputs.ALL, shared_scale=True),
        "avgpool": OpRule(Inputs.ALL),
        "global_avgpool": OpRule(Inputs.ALL),
        "sigmoid": OpRule(Inputs.ALL),
        "softmax": OpRule(Inputs.ALL),
        "leaky_relu": OpRule(Inputs.ALL),
    },
    pass_through=frozenset(
        {"maxpool", "reshape", "transpose", "pad", "identity", "getitem", "interpolate"}
    ),
    fusions=(("conv", "bn"), ("conv", "bn", "relu"), ("conv", "bn", "relu6"), ("linear", "relu")),
    transformer_ops={"linear": WEIGHTED_OPS["linear"]},
    weight_axis={"conv_transpose": 1},
    # ONNX post-passes (deploy/export_passes.py) that let onnxruntime fuse more int8 kernels
    export_passes=("global_average_pool", "matmul_bias_3d"),
    # QLinearConv / QGemm add an int32 bias (round(b / (x_scale * w_scale))). The QDQ Gemm
    # selector requires it as an int32 DequantizeLinear (a float bias keeps Gemm in fp32); Conv
    # would round a float bias itself. Measured: ORT's int8 MobileNetV2 matches a float-bias
    # fake-quant model to cosine 0.984 and the rounded-bias one to 0.997 (the float floor).
    int32_bias=frozenset({"conv", "linear"}),
)
