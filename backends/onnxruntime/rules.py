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
- QLinearConv reads a DQ and writes a Q: a Conv runs int8 only when its output is quantized
  too, so Conv quantizes its output (after a fused ReLU) whatever reads it (OpRule.output;
  onnxruntime's own tool quantizes every tensor). QGemm and MatMulIntegerToFloat may write
  float: Linear does not. Measured on a Xeon with AVX-512 VNNI and AMX (2 threads, same run,
  against quantizing the inputs of HardSwish, HardSigmoid, GroupNorm, LayerNorm and GELU for
  the same purpose): the U-Net's Convs before its float ConvTranspose 52 -> 56 of 61 int8 and
  0.68x -> 1.08x fp32; MobileNetV3-Large 0.76x -> 0.90x, -Small 0.70x -> 0.81x (their Q/DQ
  around float HardSwish costs what int8 depthwise Convs gain); EfficientNet-B0 0.98x ->
  1.03x; ConvNeXt 1.05x -> 1.07x; DeiT's patch embedding Conv int8, 1.54x -> 1.60x.
- HardSwish runs int8 written out as x * HardSigmoid(x), and HardSigmoid between a DQ and a Q
  as an Add before a Q with scaled qparams (exact; the adapter's hardsigmoid.py), so the two
  become QLinearAdd + QLinearMul where they were DQ, HardSigmoid, Mul and Q in float: on
  MobileNetV3-Small (AMD EPYC Zen 4, 2 threads, profiled) the 26 HardSwish/HardSigmoid took
  2.7 ms of the int8 model's 6.2 ms that way and 1.9 of 5.3 ms in int8.
- SiLU runs int8 written out as QLinearSigmoid + QLinearMul (0.65 of fp32 time, measured on an
  AMD EPYC without VNNI; with the SiLU float between quantized Convs: 0.86), so it is
  decomposed. A depthwise Conv with a channel multiplier stays float (float_conv_groups
  below). ConvTranspose has no int8 kernel (a QDQ ConvTranspose ran 1.07-1.25x the fp32
  time there): it stays float, weights included.
- GELU (erf form) runs as x * gate: the front end quantizes the gate on a fixed grid (scale
  1/254) on which the adapter's gelu_gate.py turns DQ, Div, Erf, Add, Mul, Q into DQ, Erf, Q,
  and the product becomes a QLinearMul. Kept as one float op, its four float ops over the
  MLP's wide tensor made timm ConvNeXt-atto 1.09x the time of quantize_static's model (which
  quantizes the Add and both Muls); written out, 0.91x (AMD EPYC Zen 4, 2 threads, paired).
  In transformer mode the Mul has no rule, so the gate stays float there as before.
- Transformer mode: quantize Linear inputs (and Convs, the patch embeddings of vision
  transformers, with their outputs); Softmax, LayerNorm, GELU and residual Adds stay
  float (quantizing them all destroys encoder accuracy: cosine 0.41 measured), and so do the
  two attention MatMuls: with both inputs activations they need two QuantizeLinear per head
  matmul and become MatMulIntegerToFloat / u8u8 QLinearMatMul, which cost more than the fp32
  FusedMatMul they replace (bert_tiny, 2 threads: 10.4 ms quantized vs 8.6 ms float, same run;
  docs/performance.md). On the AVX-512 VNNI + AMX Xeon quantizing them changed little
  (speedup over fp32, float vs int8 attention, same run: bert_tiny 1.24x vs 1.16x, DeiT-Tiny
  1.52x vs 1.51x, all-MiniLM-L6 1.83x vs 1.88x, a 4-layer HF BERT 1.46x vs 1.59x) and cost
  worst-case accuracy (HF BERT min cosine vs fp32 0.99997 -> 0.99656): they stay float, and
  the kernel report counts them as float by rule, not as fallbacks.
"""

from qat_deploy.deploy.quant.spec import INT8_WEIGHT, UINT8_AFFINE_ACT
from qat_deploy.deploy.rules.backend import CONV_FUSIONS, WEIGHTED_OPS, BackendRules, Inputs, OpRule

#: QLinearConv: a quantized input and a quantized output
CONV = OpRule(Inputs.ACTIVATION, output=True)

PASS_THROUGH = frozenset(
    {"maxpool", "reshape", "transpose", "pad", "identity", "getitem", "interpolate"}
)

RULES = BackendRules(
    name="onnxruntime",
    activation=UINT8_AFFINE_ACT,
    weight=INT8_WEIGHT,
    ops={
        **{k: v for k, v in WEIGHTED_OPS.items() if k != "conv_transpose"},
        "conv": CONV,
        "add": OpRule(Inputs.ALL),
        "mul": OpRule(Inputs.ALL),
        # QLinearConcat needs a Q after the Concat: without one (DenseNet's Concats read by a
        # float BatchNorm) every input was dequantized for every Concat reading it (600 DQs)
        # and the Concat copied float. Quantized on its inputs' grid (exact), DenseNet-121
        # ran 1.53x fp32 against 1.47x (quantize_static 1.58x; paired, median of 3).
        "concat": OpRule(Inputs.ALL, shared_scale=True, output=True),
        "avgpool": OpRule(Inputs.ALL),
        "global_avgpool": OpRule(Inputs.ALL),
        "sigmoid": OpRule(Inputs.ALL),
        "hardsigmoid": OpRule(Inputs.ALL),  # run as QLinearAdd (hardsigmoid.py)
        "softmax": OpRule(Inputs.ALL),
        "leaky_relu": OpRule(Inputs.ALL),
    },
    decompose=frozenset({"silu", "hardswish", "gelu"}),
    # a Conv is a QLinearConv only when one Q reads its output (a ReLU between folds into the
    # Q): GoogLeNet's Conv -> ReLU -> MaxPool -> {Convs, MaxPool -> Conv} left it in float
    quantize_pass_through_inputs=PASS_THROUGH,
    pass_through=PASS_THROUGH,
    fusions=CONV_FUSIONS,
    transformer_ops={"linear": WEIGHTED_OPS["linear"], "conv": CONV},
    weight_axis={"conv_transpose": 1},  # its weight is [in, out, ...]; lint reads the axis
    # ONNX post-passes (deploy/export/passes.py) that let onnxruntime fuse more int8 kernels
    export_passes=("fold_pad_into_conv", "global_average_pool", "matmul_bias_3d"),
    # QLinearConv / QGemm add an int32 bias (round(b / (x_scale * w_scale))). The QDQ Gemm
    # selector requires it as an int32 DequantizeLinear (a float bias keeps Gemm in fp32); Conv
    # would round a float bias itself. Measured: ORT's int8 MobileNetV2 matches a float-bias
    # fake-quant model to cosine 0.984 and the rounded-bias one to 0.997 (the float floor).
    int32_bias=frozenset({"conv", "linear"}),
    # Measured on an AMD EPYC without VNNI (ORT 1.32): 8-bit weights made the int8 digits CNN
    # differ from its fake-quant model by 44 output steps (p99.9, cosine 0.988); the MLAS
    # u8s8 AVX2 kernels saturate int16 pair sums.
    int16_pair_sums_without_vnni=True,
    # An Add of parallel Conv/BN branches of one input stays float (RepVGG's identity BN + the
    # merged 3x3 Conv, which still writes int8 through QLinearConv): no per-tensor scale on
    # the identity BN's output, whose per-channel gains spread it over thousands of steps.
    float_branch_sums=True,
    # A Conv with one input and several output channels per group (timm FastViT's 7x7
    # downsampling, 48 -> 96 channels in 48 groups) has no int8 depthwise kernel in MLAS: its
    # QLinearConv runs per-group GEMMs of 2 rows. Measured on an AMD EPYC Zen 4 (AVX-512 VNNI),
    # 2 threads: FastViT-T8's three such Convs took 8.7 ms as QLinearConv vs 0.37 ms as fp32
    # Conv, the int8 model 0.53x fp32; a lone 48 -> 96, 7x7 one: 9.8 ms int8 vs 1.9 ms fp32.
    float_conv_groups=frozenset({"channel_multiplier"}),
    # MobileNetV3's stem (3 -> 16 channels, then a float HardSwish): its QLinearConv took 168 us
    # against 87 us for the fp32 Conv, before the input's Q and its output's DQ (profiled on an
    # AMD EPYC Zen 4, 2 threads). Kept float, paired runs of the whole model (int8 vs fp32):
    # MobileNetV3-Small 0.99/0.94x -> 1.12/1.10x, -Large 1.25/1.15x -> 1.30/1.28x. A stem read
    # by int8 ops stays int8 when it is wide: floating ResNet-18's (64 channels, ReLU ->
    # MaxPool) cost 2.3x -> 1.7x.
    float_thin_convs=3,
    # A narrow one stays float whatever reads it. RGB stems kept float, int8 model vs the
    # same model with the stem float, paired, median of 3 (2026-12-06, Zen 4, 2 threads):
    # 3 -> 16: MobileNetV3-Small 1.068x faster, LeViT-128S 1.057, MNASNet 1.018, GhostNet
    # 1.012, MobileNetV3-Large 1.008, MobileViT-XXS 0.997; 3 -> 24: EdgeNeXt 1.021, ECA-ResNet
    # 0.985, ShuffleNetV2 0.607; 3 -> 32: EfficientNet-B0 0.995. ShuffleNetV2's loss is its
    # MaxPool: fed from a float Conv it ran as an NCHW 8-bit MaxPool, 0.88 ms against 0.08 ms
    # for the NHWC one inside the int8 chain, hence no pooling reader.
    float_thin_conv_outputs=16,
    # DenseNet's stem ReLU -> MaxPool feeds every Concat of the first dense block beside the
    # dense layers' signed Conv outputs. On their one grid (zero point 132) onnxruntime kept
    # the ReLU, so the 7x7 stem ran as a float FusedConv and the MaxPool as an NCHW u8 one.
    # On its own grid (zero point 0), requantized by QLinearConcat, DenseNet-121 ran 1.78x
    # fp32 against 1.51x (quantize_static 1.56x; an ONNX rewrite of our model, paired, median
    # of 3, AMD EPYC Zen 4, 2 threads).
    relu_fold_needs_lowest_zero_point=True,
)
