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
- Real CNNs (measured with QDQ probes on this project's machines, ORT 1.32; int8/fp32 time):
  SiLU runs int8 written out as QLinearSigmoid + QLinearMul (0.65; with the SiLU float
  between a quantized Conv output and the next Conv: 0.86), so SiLU is decomposed; HardSwish,
  HardSigmoid, GroupNorm and (in CNNs such as ConvNeXt) LayerNorm and GELU have no int8
  kernel, but quantizing their input makes the Conv before them a QLinearConv (0.82 / 0.51 /
  0.64 vs a float Conv with a dequantized input at 1.0-1.15), so their inputs are quantized
  (ConvNeXt-Atto: 29 -> 41 of 41 convs int8 with LayerNorm and GELU inputs quantized).
  ConvTranspose has no int8 kernel (a QDQ ConvTranspose runs 1.07-1.25x the fp32 time): it
  stays float, weights included.
- Transformer mode: quantize Linear inputs only; Softmax, LayerNorm, GELU and residual Adds stay
  float (quantizing them all destroys encoder accuracy: cosine 0.41 measured), and so do the
  two attention MatMuls: with both inputs activations they need two QuantizeLinear per head
  matmul and become MatMulIntegerToFloat / u8u8 QLinearMatMul, which cost more than the fp32
  FusedMatMul they replace (bert_tiny, 2 threads: 10.4 ms quantized vs 8.6 ms float, same run;
  docs/performance.md).
"""

from deploy.quant.spec import INT8_WEIGHT, UINT8_AFFINE_ACT
from deploy.rules import CONV_FUSIONS, WEIGHTED_OPS, BackendRules, Inputs, OpRule

RULES = BackendRules(
    name="onnxruntime",
    activation=UINT8_AFFINE_ACT,
    weight=INT8_WEIGHT,
    ops={
        **{k: v for k, v in WEIGHTED_OPS.items() if k != "conv_transpose"},
        "add": OpRule(Inputs.ALL),
        "mul": OpRule(Inputs.ALL),
        "concat": OpRule(Inputs.ALL, shared_scale=True),
        "avgpool": OpRule(Inputs.ALL),
        "global_avgpool": OpRule(Inputs.ALL),
        "sigmoid": OpRule(Inputs.ALL),
        "softmax": OpRule(Inputs.ALL),
        "leaky_relu": OpRule(Inputs.ALL),
        "hardswish": OpRule(Inputs.ALL),
        "hardsigmoid": OpRule(Inputs.ALL),
        "group_norm": OpRule(Inputs.ALL),
        "layer_norm": OpRule(Inputs.ALL),  # ConvNeXt: its depthwise Conv needs an output Q
        "gelu": OpRule(Inputs.ALL),  # ConvNeXt's 1x1-Conv MLP, the same way
    },
    decompose=frozenset({"silu"}),
    # a Conv is a QLinearConv only when one Q reads its output (a ReLU between folds into the
    # Q): GoogLeNet's Conv -> ReLU -> MaxPool -> {Convs, MaxPool -> Conv} left it in float
    quantize_pass_through_inputs=True,
    pass_through=frozenset(
        {"maxpool", "reshape", "transpose", "pad", "identity", "getitem", "interpolate"}
    ),
    fusions=CONV_FUSIONS,
    transformer_ops={"linear": WEIGHTED_OPS["linear"]},
    weight_axis={"conv_transpose": 1},  # its weight is [in, out, ...]; lint reads the axis
    # ONNX post-passes (deploy/export_passes.py) that let onnxruntime fuse more int8 kernels
    export_passes=("global_average_pool", "matmul_bias_3d"),
    # QLinearConv / QGemm add an int32 bias (round(b / (x_scale * w_scale))). The QDQ Gemm
    # selector requires it as an int32 DequantizeLinear (a float bias keeps Gemm in fp32); Conv
    # would round a float bias itself. Measured: ORT's int8 MobileNetV2 matches a float-bias
    # fake-quant model to cosine 0.984 and the rounded-bias one to 0.997 (the float floor).
    int32_bias=frozenset({"conv", "linear"}),
    # Measured on an AMD EPYC without VNNI (ORT 1.32): 8-bit weights made the int8 digits CNN
    # differ from its fake-quant model by 44 output steps (p99.9, cosine 0.988); the MLAS
    # u8s8 AVX2 kernels saturate int16 pair sums.
    int16_pair_sums_without_vnni=True,
)
